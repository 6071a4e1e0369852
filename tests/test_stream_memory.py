"""A streamed probe keeps to its memory budget: the features of a store larger than the budget are read a
window at a time, and the process grows by no more than the budget while it trains, validates and tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import write_store

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20
BUDGET = 32 * MB
WINDOW = 4096  # rows shuffled together: 16 MB of 1,024 float32 features


def _store(path: Path, per_class: int = 2048) -> Path:
    """8 x `per_class` train rows of 1,024 features (256 channels at 2x2): 64 MB as float32, well over the budget."""
    rng = np.random.default_rng(0)
    labels = {"train": np.repeat(np.arange(8), per_class), "val": np.repeat(np.arange(8), 128)}
    means = rng.standard_normal((8, 256, 2, 2)).astype(np.float32)
    features = {
        (1, 10): {
            split: means[y] + rng.standard_normal((len(y), 256, 2, 2), dtype=np.float32) for split, y in labels.items()
        }
    }
    return write_store(path, features, labels, chunk_samples=64, pools=(2,))


# Run in a child, so that what is measured is the probe's process alone: its peak resident set (VmHWM, reset to the
# current resident set by writing 5 to /proc/self/clear_refs) against a --memory-budget of the resident set just
# before it starts plus HEADROOM, after a probe of a small store has imported everything a probe uses (torch loads
# some modules only on a first optimizer step: 150 MB that are no feature's). The budget is the process's: the plan
# leaves the features what the process does not already hold. A window that does not fit is refused before
# training, naming the largest --shuffle-window that does; the child then runs the probe at that window.
CHILD = textwrap.dedent("""
    import dataclasses, json, sys
    from stages.probe.plan import MemoryBudgetError
    from stages.probe.run import run_probe
    from stages.probe.settings import ProbeSettings

    warm, settings = (ProbeSettings(**s) for s in json.loads(sys.argv[1]))
    run_probe(warm)

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    settings = dataclasses.replace(settings, memory_budget=before + int(sys.argv[2]))
    refused = None
    try:
        result = run_probe(settings)
    except MemoryBudgetError as error:
        refused = str(error)
        window = int(refused.split("--shuffle-window ")[1].split()[0])
        result = run_probe(dataclasses.replace(settings, shuffle_window=window))
    peak = status("VmHWM")
    print(json.dumps({"before": before, "peak": peak, "budget": settings.memory_budget, "refused": refused,
                      "mode": result.record["data_mode"], "window": result.record["shuffle_window"],
                      "top1": result.metrics["best"]["test_top1"]}))
""")
HEADROOM = BUDGET


def _measure(tmp_path: Path, window: int) -> dict:
    store, small = _store(tmp_path / "s.zarr"), _store(tmp_path / "small.zarr", per_class=64)
    settings = {
        "store": str(store),
        "out": str(tmp_path / "out"),
        "head": "linear",
        "pools": [2],
        "epochs": 1,
        "lrs": [1e-3],
        "weight_decays": [0.0],
        "shuffle_window": window,
        "read_threads": 1,
        "threads": 1,
        "device": "cpu",
        "test_split": "val",
    }
    warm = {**settings, "store": str(small), "out": str(tmp_path / "warm"), "shuffle_window": WINDOW}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([warm, settings]), str(HEADROOM)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["mode"] == "stream"  # chosen by the budget: the train rows' features are 64 MB
    assert measured["top1"] > 0.5  # it trained on what it read
    over = (measured["peak"] - measured["budget"]) / MB
    assert measured["peak"] <= measured["budget"], f"the streamed probe peaked {over:.1f} MB over its budget"
    return measured


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_a_streamed_probe_of_a_store_larger_than_its_budget_stays_within_it(tmp_path):
    measured = _measure(tmp_path, WINDOW)
    assert measured["refused"] is None and measured["window"] == WINDOW


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_a_window_over_the_budget_is_refused_and_the_advised_one_stays_within_it(tmp_path):
    measured = _measure(tmp_path, 65536)  # 256 MB of rows: the whole store, eight times over the budget
    assert measured["refused"].startswith("b1_t10_p2 needs ") and "--memory-budget" in measured["refused"]
    assert WINDOW <= measured["window"] < 65536
