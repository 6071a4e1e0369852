"""Streamed linear CKA of every pair of a store's arrays versus the straightforward in-memory NumPy computation.

    python bench/cka.py                            # 4,096 samples, 24 blocks x 1 timestep, 32-256 channels
    python bench/cka.py --samples 16384 --blocks 37
    python bench/cka.py --store features/pretrained.zarr --split val   # an existing store, every array, pool 1

Both sides compute the same pairs (every unordered pair of arrays, the diagonal included) in the
same process, one after the other, under the same thread limit:

* in memory: every array read whole (`FeatureStore.read`), as float64, centred; each array's
  ||X^T X||_F once, then ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) for every pair.
* streamed: `pipeline cka`'s code (`stages.cka.streaming.linear_and_debiased`), chunk by chunk, with
  float64 sums; once with the default memory budget (one pass), once with `--budget` (several passes
  over the store, memory bounded by the budget).

Printed: wall and CPU time (CPU time is the fairer measure on a shared machine), peak memory allocated
by NumPy and Python during each (tracemalloc: NumPy's buffers are traced), and the largest absolute
difference between the two sides' CKA values.
The synthetic store has related blocks (each a random linear map of the previous one plus noise),
so CKA values spread over (0, 1).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import FeatureStore, FeatureStoreWriter, layout  # noqa: E402
from cache.text import format_bytes  # noqa: E402
from cache.writer import SplitIndex  # noqa: E402
from stages.cka import streaming  # noqa: E402


def write(path: Path, samples: int, blocks: int, channels: list[int], chunk_samples: int) -> None:
    settings = {key: {} for key in layout.IDENTITY_KEYS}
    settings.update(
        kind="bench",
        data={"classes": ["a"]},
        noise_seed=0,
        dtype="float16",
        precision="fp32",
        chunk_samples=chunk_samples,
    )
    widths = [channels[b % len(channels)] for b in range(blocks)]
    table = [
        {"number": b + 1, "module": f"m{b}", "adm_name": f"a{b}", "channels": c, "resolution": 1}
        for b, c in enumerate(widths)
    ]
    splits = {"val": SplitIndex(np.zeros(samples, np.int64), [f"{i}.png" for i in range(samples)])}
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(widths[b - 1], widths[b])) / np.sqrt(widths[b - 1]) for b in range(1, blocks)]
    with FeatureStoreWriter.open(path, settings=settings, splits=splits, block_table=table) as writer:
        writer.add_arrays({b + 1: 1 for b in range(blocks)}, [0], [1])
        for chunk in range(layout.num_chunks(samples, chunk_samples)):
            rows = layout.chunk_slice(chunk, samples, chunk_samples)
            x = rng.normal(size=(rows.stop - rows.start, widths[0]))
            arrays = {}
            for b in range(blocks):
                if b:
                    x = np.tanh(x @ maps[b - 1]) + 0.5 * rng.normal(size=(len(x), widths[b]))
                arrays[(b + 1, 0)] = x[:, :, None, None].astype(np.float16)
            writer.write_chunk("val", chunk, arrays)


def in_memory(store: FeatureStore, split: str, features) -> np.ndarray:
    xs = []
    for f in features:
        x = store.read(split, f.block, f.timestep, f.pool).reshape(store.num_samples(split), -1).astype(np.float64)
        xs.append(x - x.mean(axis=0))
    norms = [np.linalg.norm(x.T @ x) for x in xs]
    out = np.empty((len(xs), len(xs)))
    for i in range(len(xs)):
        for j in range(i, len(xs)):
            out[i, j] = out[j, i] = np.linalg.norm(xs[j].T @ xs[i]) ** 2 / (norms[i] * norms[j])
    return out


def measured(function):
    tracemalloc.start()
    tracemalloc.reset_peak()
    started, cpu = time.perf_counter(), time.process_time()
    value = function()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return value, (seconds, cpu), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--store", default=None, help="An existing store (every array at pool 1) instead of a synthetic one."
    )
    parser.add_argument("--split", default="val")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--channels", default="32,64,128,256")
    parser.add_argument("--chunk-samples", type=int, default=512)
    parser.add_argument("--budget", default="32MB", help="The small memory budget of the second streamed run.")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads for both sides.")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    from pipeline.options import parse_byte_size

    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=args.threads):
        path = args.store
        if path is None:
            path = Path(tmp) / "store.zarr"
            write(path, args.samples, args.blocks, [int(c) for c in args.channels.split(",")], args.chunk_samples)
        store = FeatureStore.open(path)
        features = [streaming.Feature("s", b, t, 1, int(store.block_info(b)["channels"])) for b, t in store.arrays()]
        rows = np.arange(store.num_samples(args.split))
        reader = streaming.Reader({"s": store}, args.split, threads=1, progress=False)
        width = sum(f.width for f in features)
        print(
            f"store: {len(rows)} {args.split} samples, {len(features)} arrays, {width} features in all, "
            f"{len(features) * (len(features) + 1) // 2} pairs; {args.threads} BLAS thread(s)"
        )
        memory, (t_memory, c_memory), p_memory = measured(lambda: in_memory(store, args.split, features))
        print(
            f"in memory (NumPy, float64)  : {t_memory:7.2f} s wall {c_memory:7.2f} s CPU  peak "
            f"{format_bytes(p_memory):>10}"
        )
        for label, budget in (
            ("streamed, one pass", 1 << 40),
            (f"streamed, budget {args.budget}", parse_byte_size(args.budget)),
        ):
            (linear, _), (seconds, cpu), peak = measured(
                lambda budget=budget: streaming.linear_and_debiased(reader, features, rows, budget=budget)
            )
            groups = len(streaming.plan_groups(features, budget, reader.window))
            print(
                f"{label:<28}: {seconds:7.2f} s wall {cpu:7.2f} s CPU  peak {format_bytes(peak):>10}  "
                f"({groups * (groups + 1) // 2} pass(es)); ratios: wall {seconds / t_memory:.2f}, CPU "
                f"{cpu / c_memory:.2f}, memory {peak / p_memory:.2f}; largest |difference| "
                f"{np.abs(linear - memory).max():.2e}"
            )


if __name__ == "__main__":
    main()
