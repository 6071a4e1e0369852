"""Time and peak memory of every `pipeline similarity` metric at N = 10,000 and 100,000 samples, and the
chunked neighbour search against the N x N in-memory form where that fits.

    nice -n 10 python bench/similarity.py                       # N = 10000 and 100000, 64 features
    python bench/similarity.py --samples 2000 --width 256 --budget 64MB

Two related feature sets X (N, width) and Y (a noisy nonlinear map of X), prepared as
`--preprocess clamp-l2` does. For each N, in one process, one after the other:

* neighbour search of each side (`stages.similarity.neighbours.nearest_neighbours`, row blocks within
  `--budget`), k = 10: the cost every kNN metric and CKNNA share;
* the same search streamed (`stages.similarity.streamed.streamed_neighbours`, what a run does when the
  prepared features do not fit its budget): the raw float32 features are read in windows of 4,096 rows,
  as from a store, the clamp quantile is found in three passes, and neither the prepared N x width array
  nor N x N is held; its ratio to the in-memory chunked search, and a check that both find the same neighbours;
* each metric on the prepared pair (its own work once the neighbours are known; the feature-space
  metrics read the features); rbf is left out (an N x N Gram matrix per side);
* where N x N float64 fits `--in-memory-limit`: the in-memory form (the whole similarity matrix,
  diagonal excluded, the k largest of each row), and the ratio chunked / in-memory of time and memory,
  with a check that both find the same neighbours.

Printed: wall and CPU time, peak memory allocated by NumPy and Python during each (tracemalloc).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.text import format_bytes
from stages.similarity.metrics import METRICS, Parameters, Side, score
from stages.similarity.preprocess import preprocess
from stages.similarity.streamed import streamed_neighbours


def measured(function):
    tracemalloc.start()
    tracemalloc.reset_peak()
    started, cpu = time.perf_counter(), time.process_time()
    value = function()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return value, seconds, cpu, peak


def in_memory_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """The N x N form: every inner product, the diagonal excluded, the k largest per row (ties: smaller index)."""
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    top = np.argpartition(-s, k, axis=1)[:, : k + 1]  # k + 1 so that a tie at the k-th is seen
    order = np.lexsort((top, -np.take_along_axis(s, top, axis=1)), axis=1)
    return np.take_along_axis(top, order, axis=1)[:, :k]


def line(label: str, seconds: float, cpu: float, peak: int, extra: str = "") -> None:
    print(f"  {label:<34} {seconds:8.2f} s wall {cpu:8.2f} s CPU  peak {format_bytes(peak):>10}{extra}", flush=True)


def bench(
    n: int, width: int, k: int, budget: int, in_memory_limit: int, metrics: list[str], *, search_only: bool = False
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, width)).astype(np.float32).astype(np.float64)  # values a float32 store holds
    y = np.tanh(x @ rng.normal(size=(width, width)) / np.sqrt(width)) + 0.5 * rng.normal(size=(n, width))
    y = y.astype(np.float32).astype(np.float64)
    params = Parameters(
        topk=k, cca_dim=10, budget=budget, batches=tuple(np.array_split(rng.permutation(n), -(-n // 256)))
    )
    a, b = Side(preprocess(x, "clamp-l2"), params), Side(preprocess(y, "clamp-l2"), params)
    print(f"N = {n}, {width} features per side, k = {k}, neighbour-search budget {format_bytes(budget)}", flush=True)
    for name, side in (("X", a), ("Y", b))[1 if search_only else 0 :]:
        _, seconds, cpu, peak = measured(lambda side=side: side.neighbours)
        line(f"neighbour search of {name} (chunked)", seconds, cpu, peak)
        chunked = (seconds, cpu, peak)
    stored = y.astype(np.float32)  # the store's rows, outside what is measured

    def windows(positions, size=4096):
        for lo in range(0, len(positions), size):
            yield stored[positions[lo : lo + size]]

    (found, plan), seconds, cpu, peak = measured(
        lambda: streamed_neighbours(windows, n, k, how="clamp-l2", budget=budget, width=width, window=4096)
    )
    line(
        "neighbour search of Y (streamed)",
        seconds,
        cpu,
        peak,
        f"; {plan.rows} rows per block, {plan.passes} passes (+3 for the clamp); streamed / chunked in memory: "
        f"wall {seconds / chunked[0]:.2f}, CPU {cpu / chunked[1]:.2f}, memory {peak / chunked[2]:.3f}; "
        f"same neighbours: {np.array_equal(found.indices, b.neighbours.indices)}",
    )
    if search_only:
        return
    if 8 * n * n <= in_memory_limit:
        whole, seconds, cpu, peak = measured(lambda: in_memory_neighbours(b.x, k))
        same = np.array_equal(whole, b.neighbours.indices)
        line(
            "neighbour search of Y (N x N)",
            seconds,
            cpu,
            peak,
            f"; chunked / in-memory: wall {chunked[0] / seconds:.2f}, CPU {chunked[1] / cpu:.2f}, memory "
            f"{chunked[2] / peak:.3f}; same neighbours: {same}",
        )
    else:
        print(f"  neighbour search of Y (N x N)      not run: {format_bytes(8 * n * n)} for the similarities alone")
    for metric in metrics:
        value, seconds, cpu, peak = measured(lambda metric=metric: score(metric, a, b))
        line(metric, seconds, cpu, peak, f"  score {value:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="10000,100000", help="Comma list of N.")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--budget", default="256MB", help="Memory for one block of the neighbour search.")
    parser.add_argument("--in-memory-limit", default="2GB", help="Run the N x N form only where it needs at most this.")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads.")
    parser.add_argument(
        "--search-only",
        action="store_true",
        help="Only Y's neighbour search, chunked in memory and streamed (the long part at 100k).",
    )
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    from pipeline.options import parse_byte_size

    metrics = [m for m in METRICS if m != "rbf"]
    with threadpool_limits(limits=args.threads):
        for n in (int(s) for s in args.samples.split(",")):
            bench(
                n,
                args.width,
                args.topk,
                parse_byte_size(args.budget),
                parse_byte_size(args.in_memory_limit),
                metrics,
                search_only=args.search_only,
            )


if __name__ == "__main__":
    main()
