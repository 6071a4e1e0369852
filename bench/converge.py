"""Benchmark: probe heads against a converged, C-tuned scikit-learn LogisticRegression on every input set.

    python bench/converge.py STORE OUT linear,logreg                     # the defaults
    python bench/converge.py STORE OUT linear --pools 1,2 --set solver=minibatch --tag -old   # the old default
    python bench/converge.py STORE OUT linear --set 'Cs=[0.1,1]'
    python bench/converge.py STORE OUT linear,logreg --pools 1 --blocks 1,7,13   # a subset of the input sets

The reference, per (block, timestep, pool): the probe's fit rows standardised with their statistics,
LogisticRegression(lbfgs, tol 1e-8, max_iter 5000) along C = 1e-4 .. 1e3 in half-decades with warm
starts (converged: the optimum does not depend on the start), C chosen on the probe's validation rows
by the probe's rule (validation top-1, ties to the lower validation loss), its test top-1 reported.
It is computed once per OUT (OUT/ref.json) under one BLAS thread: several threads per fit on a shared
2-core machine made it 100x slower. Printed per head: the mean and lowest difference (points) and
how many input sets fall more than 0.3 / 0.5 points below.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np


def reference(
    store_path: str,
    combos: list[tuple[int, int, int]],
    Cs: list[float],
    test_split: str,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """{key: {val, test, C, oracle}} of the converged, C-tuned LogisticRegression (see the module docstring)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from cache import FeatureStore
    from stages.probe.plan import carve_validation

    store = FeatureStore.open(store_path)
    y, y_test = store.labels("train"), store.labels(test_split)
    fit, val = carve_validation(y, np.arange(len(y)), val_fraction, seed)
    out = {}
    with threadpool_limits(limits=1):
        for b, t, p in combos:
            train = store.read("train", b, t, p).reshape(len(y), -1).astype(np.float64)
            test = store.read(test_split, b, t, p).reshape(len(y_test), -1).astype(np.float64)
            mean, std = train[fit].mean(0), train[fit].std(0)
            std[std < 1e-6] = 1
            x_fit, x_val, x_test = (train[fit] - mean) / std, (train[val] - mean) / std, (test - mean) / std
            model = LogisticRegression(C=Cs[0], max_iter=5000, tol=1e-8, warm_start=True)
            rows = []
            for C in Cs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    model.set_params(C=C).fit(x_fit, y[fit])
                proba = model.predict_proba(x_val)
                loss = -np.mean(np.log(proba[np.arange(len(val)), np.searchsorted(model.classes_, y[val])] + 1e-300))
                rows.append((model.score(x_val, y[val]), loss, model.score(x_test, y_test), C))
            best = min(range(len(rows)), key=lambda i: (-rows[i][0], rows[i][1], i))
            out[f"b{b}_t{t}_p{p}"] = {
                "val": rows[best][0],
                "test": rows[best][2],
                "C": rows[best][3],
                "oracle": max(r[2] for r in rows),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("out", type=Path)
    parser.add_argument("heads", help="Comma list, e.g. linear,logreg.")
    parser.add_argument("--pools", default="1,2")
    parser.add_argument("--blocks", default=None, help="Comma list of blocks [default: every block in the store].")
    parser.add_argument("--set", action="append", default=[], help="A ProbeSettings field as NAME=JSON; repeatable.")
    parser.add_argument("--tag", default="", help="Appended to each run's name.")
    args = parser.parse_args()

    from cache import FeatureStore
    from stages.probe.run import run_probe
    from stages.probe.settings import ProbeSettings

    extra = {}
    for item in args.set:
        name, value = item.split("=", 1)
        try:
            extra[name] = json.loads(value)
        except json.JSONDecodeError:
            extra[name] = value
    pools = tuple(int(p) for p in args.pools.split(","))
    store = FeatureStore.open(args.store)
    test_split = "test" if "test" in store.splits else "val"
    blocks = None if args.blocks is None else [int(b) for b in args.blocks.split(",")]
    combos = [(i.block, i.timestep, i.pool) for i in store.select(blocks=blocks, pools=pools).inputs]
    cache = args.out / "ref.json"
    if cache.exists():
        ref = json.loads(cache.read_text())
    else:
        started = time.perf_counter()
        ref = reference(args.store, combos, [float(c) for c in 10.0 ** (np.arange(-8, 7) / 2)], test_split)
        print(f"reference: {len(combos)} input sets in {time.perf_counter() - started:.1f} s")
        args.out.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(ref))
    for head in args.heads.split(","):
        started, cpu = time.perf_counter(), time.process_time()
        result = run_probe(
            ProbeSettings(
                store=args.store,
                head=head,
                out=str(args.out),
                name=head + args.tag,
                pools=pools,
                blocks=None if args.blocks is None else tuple(blocks),
                threads=1,
                **extra,
            )
        )
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        chosen = {r["key"]: r for r in result.rows if r["selected"]}
        diffs = {k: 100 * (chosen[k]["test_top1"] - ref[k]["test"]) for k in ref}
        worst = min(diffs, key=diffs.get)
        print(
            f"{head}{args.tag}: {seconds:.1f} s ({cpu:.1f} s CPU), mean {np.mean(list(diffs.values())):+.2f}, "
            f"lowest {diffs[worst]:+.2f} "
            f"({worst}: {chosen[worst]['test_top1']:.4f} vs {ref[worst]['test']:.4f} at C {ref[worst]['C']:g}); "
            f"below -0.3: {sum(d < -0.3 for d in diffs.values())}/{len(diffs)}, "
            f"below -0.5: {sum(d < -0.5 for d in diffs.values())}"
        )


if __name__ == "__main__":
    main()
