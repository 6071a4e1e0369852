"""`bench/extract.py --nproc N`: one process against N processes (torchrun) on the same model and images,
and the store's object count and bytes with and without shards.

Each run is the whole `pipeline extract` command (process start, model loading, the rendezvous of N
processes), timed from outside, so images/s include those fixed costs; run enough images for them
not to dominate. On a CPU the N processes share the machine's cores (OMP_NUM_THREADS = cores / N
each, as torchrun would set), so the ratio shows the overhead of coordination, not a speed-up; on a
machine with N GPUs it is the speed-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(model_dir: Path, data: Path, out: Path, nproc: int, device: str, extra: list[str]) -> float:
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "-q",
        "extract",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--splits",
        "train",
        "--device",
        device,
        *extra,
    ]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - start


def objects(store: Path) -> tuple[int, int]:
    files = [p for p in store.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def compare(
    model_dir: Path,
    data: Path,
    workdir: Path,
    *,
    nproc: int,
    images: int,
    timesteps: list[int],
    batch: int,
    device: str,
) -> None:
    common = [
        "--blocks",
        "all",
        "--timesteps",
        ",".join(map(str, timesteps)),
        "--pool",
        "1,2",
        "--batch-size",
        str(batch),
        "--chunk-samples",
        "16",
    ]
    single = run(model_dir, data, workdir / "one.zarr", 1, device, common)
    many = run(model_dir, data, workdir / "many.zarr", nproc, device, common)
    n = images * len(timesteps)
    print(f"1 process     : {single:7.2f} s  {n / single:8.1f} img*t/s")
    print(f"{nproc} processes   : {many:7.2f} s  {n / many:8.1f} img*t/s")
    print(f"ratio {nproc} / 1 (throughput) = {single / many:.3f}")
    unsharded = run(model_dir, data, workdir / "unsharded.zarr", 1, device, [*common, "--shard-samples", "16"])
    del unsharded
    for name in ("one.zarr", "unsharded.zarr"):
        count, size = objects(workdir / name)
        label = "sharded (default)" if name == "one.zarr" else "unsharded (shard = chunk)"
        print(f"store {label:<26}: {count:6d} files, {size / 1e6:8.2f} MB")
