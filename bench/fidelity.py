"""What the cache costs in accuracy, and what it saves in time: recompute vs. the cache, side by side in one run.

    python bench/fidelity.py                                   # the bundled default: MNIST, the default DDPM
    python bench/fidelity.py --model models/ddpm-mnist16 --data data/mnist   # the bundled checkpoint

One (block, timestep, pool) and the linear head trained with the paper's recipe (nn.Linear's init,
SGD without momentum, StepLR(7, 0.1) per epoch, batch 128 with the last partial batch dropped;
`--epochs`, 28 by default), on standardised features at lr 1 by default: the recipe's raw features
at lr 1e-2 (`--no-standardise --lr 0.01`) leave every arm at chance with the small default DDPM.
Three ways that differ only in the features each training step sees:

1. recompute: the paper's loop. Every batch of every epoch runs the U-Net on a fresh augmentation
   and a fresh noise draw (epoch e of sample i: `view_generator(seed + 1, i, e + 1)` and
   `noise(seed + 1, i, t, shape, e + 1)`: never a stored view);
2. the cache with one view: the stored centre view and its one noise draw, every epoch;
3. the cache with K views (`--views 2,4,8`): one stored view per sample per epoch,
   `view_choice(seed, epoch, index, K)`, as `pipeline probe` reads them.

Every arm is scored on the same test features (the centre view of the val split, the store's noise),
with the same initial weights and the same batches. Augmentations suit digits: `resized-crop` (short
side to a random size in [16, 20] for a 16-pixel model, then a random 16 crop), no flips (a flipped
digit is another digit, or none). Timings: recompute is its whole loop; a cache arm is its
extraction plus its training (the K-view store is extracted once; K views cost the extraction of
one view K times, measured). The sweep line compares all blocks x timesteps: recompute trains each
configuration with its own loop (each measured loop's time, times the number of configurations);
the cache extracts them all once and trains each configuration from it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import FeatureStore  # noqa: E402
from stages.data.augment import parse_augment, view_generator  # noqa: E402
from stages.data.folders import scan  # noqa: E402
from stages.data.images import load_image  # noqa: E402
from stages.extract import noise  # noqa: E402
from stages.extract.plan import ExtractConfig  # noqa: E402
from stages.extract.run import run_extract  # noqa: E402
from stages.models.blocks import block_table  # noqa: E402
from stages.models.capture import BlockCapture  # noqa: E402
from stages.models.loading import load_model  # noqa: E402
from stages.probe.plan import view_choice  # noqa: E402
from stages.probe.recipes import RECIPES, STEP_EPOCHS, STEP_GAMMA  # noqa: E402

RECIPE = RECIPES["diffssl"]["linear"]


def batches(n: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    order = np.random.default_rng([seed, 3, epoch]).permutation(n)
    return [order[i * batch : (i + 1) * batch] for i in range(n // batch)]  # the last partial batch dropped


def train_linear(
    features_of,
    n: int,
    dim: int,
    classes: int,
    labels: np.ndarray,
    epochs: int,
    seed: int,
    lr: float,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> nn.Module:
    """The paper's linear recipe at learning rate `lr`, on (x - mean) / std (0 and 1: raw features, the
    paper's); `features_of(epoch, rows)` gives the (len(rows), dim) float32 features."""
    torch.manual_seed(seed)
    head = nn.Linear(dim, classes)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, STEP_EPOCHS, STEP_GAMMA)
    y = torch.from_numpy(labels)
    for epoch in range(epochs):
        for rows in batches(n, RECIPE["batch_size"], seed, epoch):
            loss = nn.functional.cross_entropy(head((features_of(epoch, rows) - mean) / std), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return lambda x: head((x - mean) / std)


def top1(head, x: torch.Tensor, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((head(x).argmax(1).numpy() == y).mean())


class Recompute:
    """The paper's loop: images decoded and augmented, noised and run through the U-Net for every batch."""

    def __init__(self, model, data: Path, block: int, timestep: int, pool: int, augment, seed: int):
        self.model, self.split = model, scan(data, ["train"])["train"]
        self.unet = model.unet.eval()
        self.block = next(b for b in block_table(self.unet) if b.number == block)
        self.timestep, self.pool, self.augment, self.seed = timestep, pool, augment, seed
        abar = model.alphas_cumprod()
        self.a, self.s = float(abar[timestep].sqrt()), float((1 - abar[timestep]).sqrt())
        self.size, self.channels = int(self.unet.config.sample_size), int(self.unet.config.in_channels)

    def __call__(self, epoch: int, rows: np.ndarray) -> torch.Tensor:
        view = epoch + 1  # a fresh draw every epoch, never one of the stored views (seed + 1)
        x0 = torch.stack(
            [
                load_image(
                    self.split.root / self.split.paths[i],
                    self.size,
                    self.channels,
                    augment=self.augment,
                    rng=view_generator(self.seed + 1, int(i), view),
                )
                for i in rows
            ]
        )
        eps = torch.stack([noise(self.seed + 1, int(i), self.timestep, x0.shape[1:], view) for i in rows])
        with torch.inference_mode(), BlockCapture(self.unet, [self.block]) as capture:
            out = capture(
                self.a * x0 + self.s * eps, torch.full((len(rows),), self.timestep), {self.block.number: self.pool}
            )
        return out[self.block.number].flatten(1).clone()


def extract(model: str, data: Path, out: Path, **options) -> float:
    """Seconds to extract a new store (one left by an earlier run is removed first: it would only be resumed)."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    run_extract(
        ExtractConfig(
            model=model, data=str(data), out=str(out), dtype="float32", batch_size=128, overwrite=True, **options
        ),
        progress=False,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="A trained model directory [default: train the default DDPM here].")
    parser.add_argument("--data", help="An image folder with train and val [default: the bundled MNIST-5k].")
    parser.add_argument("--work", help="Where stores (and the default model and data) go [default: a temp dir].")
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="The default DDPM's epochs (params.yaml: 20).")
    parser.add_argument("--per-class", type=int, default=0, help="Bundled MNIST: images per digit (0: all 500).")
    parser.add_argument("--block", type=int, default=6, help="Near the best of the default sweep (docs/benchmarks.md).")
    parser.add_argument("--timestep", type=int, default=100)
    parser.add_argument("--pool", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    parser.add_argument("--views", default="2,4,8")
    parser.add_argument("--augment", default="resized-crop", help="For digits: crops, no flips.")
    parser.add_argument("--sweep-timesteps", default="100,200", help="The sweep line: every block at these.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr",
        type=float,
        default=1.0,
        help="SGD learning rate (the recipe's is 1e-2: with --no-standardise, on this small DDPM every "
        "arm stays at "
        "chance).",
    )
    parser.add_argument(
        "--standardise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Standardise features with the centre view's train statistics (--no-standardise: raw "
        "features, as the paper's recipe).",
    )
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else work / "data"
    if not args.data and not (data / "train").exists():
        from stages.data.mnist import write_mnist_folder

        write_mnist_folder(data, per_class=args.per_class or None)
    model_dir = args.model or str(work / "model")
    if not args.model and not (work / "model" / "config.json").exists():
        from stages.pretrain.ddpm import pretrain_ddpm

        started = time.perf_counter()
        pretrain_ddpm(
            data,
            model_dir,
            epochs=args.pretrain_epochs,
            image_size=16,
            channels=(32, 32, 64),
            attention_levels=(),
            batch_size=128,
            lr=2e-3,
            seed=0,
            progress=False,
        )
        print(f"trained the default DDPM ({args.pretrain_epochs} epochs) in {time.perf_counter() - started:.0f} s")
    views = sorted(int(v) for v in args.views.split(","))
    augment = parse_augment(args.augment)
    one = dict(blocks=(args.block,), timesteps=(args.timestep,), pools=(args.pool,), noise_seed=args.seed)
    t_one = extract(model_dir, data, work / "one.zarr", **one)
    t_many = extract(model_dir, data, work / "views.zarr", views=max(views), augment=args.augment, **one)
    per_view = (t_many - t_one) / (max(views) - 1)  # one more view of the train split
    store = FeatureStore.open(work / "views.zarr")
    y_train, y_test = store.labels("train"), store.labels("val")
    n, classes = len(y_train), int(max(y_train.max(), y_test.max())) + 1
    stored = np.stack(
        [store.read("train", args.block, args.timestep, args.pool, view=v).reshape(n, -1) for v in range(max(views))]
    )
    test = torch.from_numpy(store.read("val", args.block, args.timestep, args.pool).reshape(len(y_test), -1))
    dim = stored.shape[-1]
    if args.standardise:
        mean, std = torch.from_numpy(stored[0].mean(0)), torch.from_numpy(stored[0].std(0)).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(dim), torch.ones(dim)
    rows = []

    def cache_arm(k: int) -> None:
        feats = torch.from_numpy(stored[:k])
        started = time.perf_counter()
        head = train_linear(
            lambda e, r: feats[view_choice(args.seed, e, r, k), r],
            n,
            dim,
            classes,
            y_train,
            args.epochs,
            args.seed,
            args.lr,
            mean,
            std,
        )
        seconds = time.perf_counter() - started
        rows.append(
            (f"cache, {k} view{'s' if k > 1 else ''}", top1(head, test, y_test), t_one + (k - 1) * per_view, seconds)
        )

    cache_arm(1)
    for k in views:
        cache_arm(k)
    recompute = Recompute(load_model(model_dir), data, args.block, args.timestep, args.pool, augment, args.seed)
    started = time.perf_counter()
    head = train_linear(recompute, n, dim, classes, y_train, args.epochs, args.seed, args.lr, mean, std)
    t_rec = time.perf_counter() - started
    rows.insert(0, ("recompute (fresh noise + augmentation)", top1(head, test, y_test), 0.0, t_rec))

    torch_threads = torch.get_num_threads()
    print(
        f"\nblock {args.block}, t={args.timestep}, pool {args.pool}, {dim} features; linear head, the paper's recipe "
        f"at lr {args.lr:g} on {'standardised' if args.standardise else 'raw'} features, {args.epochs} epochs; {n} "
        f"train / {len(y_test)} test images; augmentation {augment.record(16)}; "
        f"torch threads {torch_threads}"
    )
    print(f"{'arm':<40} {'test top-1':>10} {'extract s':>10} {'train s':>9} {'total s':>9} {'speed-up':>9}")
    for name, acc, ext, train in rows:
        total = ext + train
        print(f"{name:<40} {100 * acc:>9.1f}% {ext:>10.1f} {train:>9.1f} {total:>9.1f} {t_rec / total:>8.1f}x")
    # the sweep: every block x timestep, one configuration each
    timesteps = tuple(int(t) for t in args.sweep_timesteps.split(","))
    t_sweep = extract(
        model_dir, data, work / "sweep.zarr", timesteps=timesteps, pools=(args.pool,), noise_seed=args.seed
    )
    sweep = FeatureStore.open(work / "sweep.zarr")
    configs = len(sweep.arrays())
    train_one = rows[1][3]
    print(
        f"sweep of {configs} (block, timestep) configurations: recompute ~{configs * t_rec:.0f} s "
        f"({configs} loops of {t_rec:.0f} s; deeper blocks cost more, shallower less), cache {t_sweep:.0f} s "
        f"extraction + ~{configs * train_one:.0f} s training = ~{t_sweep + configs * train_one:.0f} s: "
        f"{configs * t_rec / (t_sweep + configs * train_one):.0f}x"
    )
    print(f"(one view of the train split costs {per_view:.1f} s of extraction; stores in {work})")


if __name__ == "__main__":
    main()
