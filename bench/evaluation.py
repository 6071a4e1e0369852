"""The evaluation protocols on scikit-learn's digits, side by side in one run (docs/evaluation.md, "Measured").

    PATH=.venv/bin:$PATH python bench/evaluation.py

1. `pipeline probe --head knn` with each `--vote` on the same store (digits features as the tests write
   them: block 1 = the 8x8 image, block 2 = a random projection; timesteps 10 and 90 = noise 0.5 and 4);
2. `--seeds 0,1,2 --shots 1,2,5,10,20 --episodes 5` (knn) and `--seeds 0,1,2` (linear);
3. the costs: the stable neighbour order against `torch.topk`, and the bootstrap on an ImageNet-sized
   test split (50000 samples, 1000 classes, 20 configurations).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.probe.metrics import bootstrap_intervals  # noqa: E402
from stages.probe.sklearn_probes import _stable_top  # noqa: E402
from tests.test_probe_support import digits_features, write_store  # noqa: E402


def probe(store: Path, out: Path, *flags: str) -> None:
    command = [
        "pipeline",
        "-q",
        "probe",
        "--store",
        str(store),
        "--threads",
        "1",
        "--no-render",
        "--out",
        str(out),
        *flags,
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    print(f"$ pipeline probe --store digits.zarr {' '.join(flags)}   ({time.perf_counter() - started:.1f} s)")
    print(result.stdout if result.returncode == 0 else result.stderr[-2000:])


def timed(fn, repeats: int = 5) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-evaluation-"))
    features, labels = digits_features(n_train=1200)
    store = write_store(work / "digits.zarr", features, labels, pools=(1, 2, 4, 8), resolution={1: 16, 2: 16})
    grid = ["--blocks", "1,2", "--timesteps", "10,90", "--pool", "8", "--knn-k", "10,20,100,200"]
    for vote in ("softmax", "distance", "uniform"):
        probe(store, work / vote, "--head", "knn", *grid, "--vote", vote)
    one = ["--blocks", "1", "--timesteps", "10", "--pool", "8"]
    probe(
        store,
        work / "knn",
        "--head",
        "knn",
        *one,
        "--knn-k",
        "10,20,100,200",
        "--seeds",
        "0,1,2",
        "--shots",
        "1,2,5,10,20",
        "--episodes",
        "5",
    )
    probe(store, work / "linear", "--head", "linear", *one, "--seeds", "0,1,2")

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    train = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(20000, 256)).astype(np.float32)), dim=1)
    queries = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(1024, 256)).astype(np.float32)), dim=1)
    sims = queries @ train.T
    matmul = timed(lambda: queries @ train.T)
    topk = timed(lambda: torch.topk(sims, 200, dim=1))
    stable = timed(lambda: _stable_top(sims, 200))
    print(
        f"1024 queries x 20000 rows x 256 dims, k = 200, 1 thread: similarities {1000 * matmul:.0f} ms, "
        f"torch.topk {1000 * topk:.0f} ms, stable order {1000 * stable:.0f} ms ({stable / topk:.2f}x topk)"
    )
    labels = rng.integers(0, 1000, 50000)
    correct = rng.random((50000, 20)) < 0.7
    plain = timed(lambda: bootstrap_intervals(correct, labels, 0), repeats=1)
    balanced = timed(lambda: bootstrap_intervals(correct, labels, 0, balanced=True), repeats=1)
    print(
        f"bootstrap, 1000 resamples of 50000 test samples, 20 configurations, 1000 classes: top-1 {plain:.1f} s, "
        f"balanced {balanced:.1f} s"
    )


if __name__ == "__main__":
    main()
