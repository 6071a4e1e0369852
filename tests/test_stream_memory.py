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
    features = {(1, 10): {split: means[y] + rng.standard_normal((len(y), 256, 2, 2), dtype=np.float32)
                          for split, y in labels.items()}}
    return write_store(path, features, labels, chunk_samples=64, pools=(2,))


# Run in a child, so that the growth measured is the probe's alone: its peak resident set (VmHWM, reset to the
# current resident set by writing 5 to /proc/self/clear_refs) over the resident set just before it starts,
# after a probe of a small store has imported everything a probe uses (torch loads some modules only on a
# first optimizer step: 150 MB that are no feature's).
CHILD = textwrap.dedent("""
    import json, sys
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
    result = run_probe(settings)
    peak = status("VmHWM")
    print(json.dumps({"before": before, "peak": peak, "mode": result.record["data_mode"],
                      "top1": result.metrics["best"]["test_top1"]}))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_a_streamed_probe_of_a_store_larger_than_its_budget_stays_within_it(tmp_path):
    store, small = _store(tmp_path / "s.zarr"), _store(tmp_path / "small.zarr", per_class=64)
    settings = {"store": str(store), "out": str(tmp_path / "out"), "head": "linear", "pools": [2], "epochs": 1,
                "lrs": [1e-3], "weight_decays": [0.0], "memory_budget": BUDGET, "shuffle_window": WINDOW,
                "read_threads": 1, "threads": 1, "device": "cpu", "test_split": "val"}
    warm = {**settings, "store": str(small), "out": str(tmp_path / "warm")}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps([warm, settings])], cwd=REPO, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["mode"] == "stream"  # chosen by the budget: the train rows' features are 64 MB
    assert measured["top1"] > 0.5  # it trained on what it read
    grown = measured["peak"] - measured["before"]
    assert grown <= BUDGET, f"the streamed probe grew by {grown / MB:.1f} MB, over its {BUDGET / MB:.0f} MB budget"
