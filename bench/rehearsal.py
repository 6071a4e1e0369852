"""An ImageNet-sized rehearsal of every stage after extraction, on this machine, in minutes.

    nice -n 10 python bench/rehearsal.py                       # 10% of ImageNet's train rows, all 50k val
    python bench/rehearsal.py --fraction 0.02 --listing-fraction 0.1   # a quick look
    python bench/rehearsal.py --listing-only --listing-fraction 0.1    # the listings alone

(a) Planning and listing: `pipeline extract --dry-run` (listing, the data set's identity, the plan)
    over an ImageNet-sized image folder (1,281,167 train and 50,000 val files, 1,000 classes; empty
    files, since the dry run reads no pixel) and over the same samples as WebDataset shards
    (imagenet-1k-wds's layout: 1,282 train and 50 val shards; key.jpg + key.cls, tiny images, since
    the index reads the tar headers only), listed twice: reading every header, then the saved index.
(b) A synthetic store in the store's own format (`cache.FeatureStoreWriter`, no model) at the real
    shapes of ADM-256: block 24 (1,024 channels) and block 30 (512), stored at 2x2 for pools 1 and
    2, float16, one timestep; `--fraction` of ImageNet's train rows (class-sorted, as an image folder
    is extracted) and its 50,000 val rows; features = a class mean + unit noise, the class means spread
    so that a linear probe learns some of it (SIGNAL).
(c) `pipeline probe --head linear` streamed within `--memory-budget`, `pipeline sweep` over both blocks
    and pools, `pipeline cka` on the 50,000 val samples: each a subprocess, with the store's files
    evicted from the page cache first (so they are read from the disk), measured by /usr/bin/time
    (wall time, peak resident memory, bytes read from the file system).
(d) The disk's sequential read bandwidth, measured in the same run on a file of random bytes (evicted
    from the page cache before it is read), and every stage's read rate as a ratio of it.
Then the figures extrapolated to all 1,281,167 train rows and to an 8-GPU node.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cache import FeatureStoreWriter, layout  # noqa: E402
from cache.text import format_bytes  # noqa: E402
from cache.writer import SplitIndex  # noqa: E402
from stages.extract.plan import CHUNK_BYTES, default_shard_samples  # noqa: E402

IMAGENET_TRAIN, IMAGENET_VAL, CLASSES = 1_281_167, 50_000, 1000
TRAIN_SHARDS, VAL_SHARDS = 1282, 50  # imagenet-1k-wds
BLOCKS = {24: 1024, 30: 512}  # ADM-256's block 24 and block 30: channels
GRID, TIMESTEP = 2, 90
# The class signal (class_means): at 0.8 (block 24, pool 2) the nearest true class mean is right for 99% of
# samples, and the nearest class mean estimated from 115 rows per class (the fit rows at 10% of ImageNet) for
# 79% (4,096 features); block 30 is weaker, and a pool of 1 averages the signal of 4 cells down by half.
# The probes' accuracy is then their own, not 100% (the rehearsal's first run had 5.8 and 2.7: 100% top-1).
CODE, SIGNAL = 64, {24: 0.8, 30: 0.7}


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}


# A probe or sweep whose --shuffle-window the process's --memory-budget cannot hold refuses, naming the one it can.
ADVISED = re.compile(r"pass --shuffle-window (\d+) or --memory-budget")


def measured(command: list[str], label: str, log: Path) -> dict:
    """Run `command` under /usr/bin/time: wall s, peak RSS bytes, bytes read from the file system, CPU s; a probe
    refused for its shuffle window runs again at the largest window its memory budget holds."""
    stats = log.with_suffix(".time")
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(
            ["/usr/bin/time", "-o", str(stats), "-f", "%e %M %I %U %S", *command],
            cwd=REPO,
            env=environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - started
    advised = ADVISED.search(log.read_text()) if done.returncode != 0 else None
    if advised and "--shuffle-window" not in command:  # refused before training: run at the window that fits
        print(f"  {label}: --memory-budget holds a --shuffle-window of {int(advised[1]):,} samples: run at it")
        return {**measured([*command, "--shuffle-window", advised[1]], label, log), "shuffle_window": int(advised[1])}
    if done.returncode != 0:
        raise SystemExit(f"{label} failed ({done.returncode}); its output: {log}\n" + log.read_text()[-3000:])
    elapsed, rss, inputs, user, system = stats.read_text().split()[-5:]
    return {
        "label": label,
        "wall_s": float(elapsed) or wall,
        "peak_rss": int(rss) * 1024,
        "read_bytes": int(inputs) * 512,
        "cpu_s": float(user) + float(system),
    }


def evict(path: Path) -> None:
    """Drop `path`'s files from the page cache (their own pages only), so the next read comes from the disk."""
    os.sync()
    for file in [path] if path.is_file() else path.rglob("*"):
        if file.is_file():
            descriptor = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def disk_bandwidth(workdir: Path, size: int) -> float:
    """Bytes/s of one sequential read (16 MB requests) of `size` fresh random bytes, evicted first."""
    path = workdir / "bandwidth.bin"
    rng = np.random.default_rng(0)
    with open(path, "wb") as file:
        for _ in range(size // (64 << 20)):
            file.write(rng.bytes(64 << 20))
        file.flush()
        os.fsync(file.fileno())
    evict(path)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as file:
        while file.read(16 << 20):
            pass
    seconds = time.perf_counter() - started
    path.unlink()
    return size // (64 << 20) * (64 << 20) / seconds


# -- (a) listings ----------------------------------------------------------------------------------------------
def class_counts(total: int, classes: int) -> list[int]:
    return [total // classes + (1 if c < total % classes else 0) for c in range(classes)]


def make_folder(root: Path, train: int, val: int) -> None:
    for split, total in (("train", train), ("val", val)):
        for c, count in enumerate(class_counts(total, CLASSES)):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"n{c:08d}_{i}.JPEG").touch()


def make_shards(root: Path, train: int, val: int, shards: dict[str, int]) -> None:
    """imagenet-1k-wds's layout: imagenet1k-<split>-<number>.tar, samples in class order split evenly."""
    root.mkdir(parents=True, exist_ok=True)
    tiny = b"\xff\xd8\xff\xd9"  # an empty JPEG: the index reads headers only
    for split, total in (("train", train), ("validation", val)):
        labels = np.repeat(np.arange(CLASSES), class_counts(total, CLASSES))
        count = shards[split]
        bounds = np.linspace(0, total, count + 1).astype(int)
        for s in range(count):
            with tarfile.open(root / f"imagenet1k-{split}-{s:04d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(bounds[s], bounds[s + 1]):
                    key = f"{split}_{i:08d}"
                    for name, data in ((f"{key}.jpg", tiny), (f"{key}.cls", str(int(labels[i])).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, _Bytes(data))


class _Bytes:
    def __init__(self, data: bytes):
        self.data = data

    def read(self, size: int = -1) -> bytes:
        data, self.data = self.data, b""
        return data


def tiny_model(path: Path) -> Path:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from stages.models.unet_configs import tiny_adm_config

    torch.manual_seed(0)
    UNet2DModel(**tiny_adm_config(image_size=16)).save_pretrained(path)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path)
    return path


# -- (b) the synthetic store ------------------------------------------------------------------------------------
def class_means(rng: np.random.Generator, features: int, signal: float) -> np.ndarray:
    """(CLASSES, features): each class's code z_c ~ N(0, I) in CODE dimensions, mapped to the features by one
    Gaussian matrix and scaled so that along each of the CODE directions the means spread with standard
    deviation `signal` against the unit noise (the features are mean + N(0, 1))."""
    codes = rng.standard_normal((CLASSES, CODE), dtype=np.float32)
    return codes @ rng.standard_normal((CODE, features), dtype=np.float32) * np.float32(signal / math.sqrt(features))


def write_store(path: Path, train: int, val: int, seed: int = 0) -> dict:
    """The store at ADM-256's shapes (module docstring); {rows, bytes, seconds, cpu_s}."""
    import torch
    from diffusers import UNet2DModel

    from stages.models.blocks import block_table
    from stages.models.unet_configs import adm_unet_config

    with torch.device("meta"):
        unet = UNet2DModel(
            **adm_unet_config(
                image_size=256,
                num_channels=256,
                channel_mult=(1, 1, 2, 2, 4, 4),
                num_res_blocks=2,
                attention_resolutions=(8, 16, 32),
                num_head_channels=64,
                out_channels=6,
            )
        )
    table = [block.as_dict() for block in block_table(unet)]
    assert all(table[b - 1]["channels"] == c for b, c in BLOCKS.items()), "ADM-256's block table changed"
    widest = max(BLOCKS.values()) * GRID * GRID * 2
    chunk = int(np.clip(CHUNK_BYTES // widest, 16, 4096))  # what extraction would choose (stages.extract.plan)
    shard = default_shard_samples(chunk, widest, sum(BLOCKS.values()) * GRID * GRID * 2)
    labels = {
        split: np.repeat(np.arange(CLASSES), class_counts(n, CLASSES)) for split, n in (("train", train), ("val", val))
    }
    settings = {key: {} for key in layout.IDENTITY_KEYS}
    settings.update(
        kind="rehearsal",
        model={"name": "ADM-256 shapes, synthetic features"},
        data={"classes": [f"n{c:08d}" for c in range(CLASSES)], "synthetic": f"class mean + N(0, 1), signal {SIGNAL}"},
        noise_seed=seed,
        dtype="float16",
        precision="bf16",
        chunk_samples=chunk,
        shard_samples=shard,
    )
    splits = {s: SplitIndex(y, [f"{s}/{i}" for i in range(len(y))]) for s, y in labels.items()}
    rng = np.random.default_rng(seed)
    means = {b: class_means(rng, c * GRID * GRID, SIGNAL[b]) for b, c in BLOCKS.items()}
    started, cpu = time.perf_counter(), time.process_time()
    with FeatureStoreWriter.open(path, settings=settings, splits=splits, block_table=table) as writer:
        writer.add_arrays({b: GRID for b in BLOCKS}, [TIMESTEP], [1, 2])
        for split, y in labels.items():
            for s in range(layout.num_chunks(len(y), shard)):
                rows = layout.chunk_slice(s, len(y), shard)
                noise = np.random.default_rng([seed, s, len(split)])
                arrays = {}
                for b, c in BLOCKS.items():
                    values = noise.standard_normal((rows.stop - rows.start, c * GRID * GRID), dtype=np.float32)
                    values += means[b][y[rows]]
                    arrays[(b, TIMESTEP)] = values.astype(np.float16).reshape(-1, c, GRID, GRID)
                writer.write_shard(split, s, arrays)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "rows": train + val,
        "bytes": size,
        "seconds": seconds,
        "cpu_s": cpu,
        "chunk": chunk,
        "shard": shard,
        "feature_bytes": (train + val) * sum(BLOCKS.values()) * GRID * GRID * 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.1, help="of ImageNet's train rows in the store")
    parser.add_argument("--listing-fraction", type=float, default=1.0, help="of ImageNet's files in the listings")
    parser.add_argument("--memory-budget", default="2GB", help="the probes' and CKA's --memory-budget")
    parser.add_argument("--workdir", type=Path, default=None, help="[default: a temporary directory, removed]")
    parser.add_argument("--skip-listing", action="store_true")
    parser.add_argument("--listing-only", action="store_true", help="(a) and (d) only")
    parser.add_argument("--bandwidth-bytes", type=int, default=1 << 30)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rehearsal-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pipeline = [sys.executable, "-m", "pipeline"]
    free = shutil.disk_usage(workdir).free
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(
        f"{platform.node()}: {os.cpu_count()} cores, {format_bytes(memory)} "
        f"memory, {format_bytes(free)} free on {workdir}'s disk"
    )
    results = {"machine": {"cores": os.cpu_count(), "node": platform.node()}}
    try:
        bandwidth = disk_bandwidth(workdir, args.bandwidth_bytes)
        results["disk_read_bytes_per_s"] = bandwidth
        print(
            f"(d) disk sequential read: {format_bytes(bandwidth)}/s ({format_bytes(args.bandwidth_bytes)} of random "
            "bytes, evicted from the page cache first)"
        )

        if not args.skip_listing:
            train, val = round(IMAGENET_TRAIN * args.listing_fraction), round(IMAGENET_VAL * args.listing_fraction)
            model = tiny_model(workdir / "tiny-model")
            started = time.perf_counter()
            make_folder(workdir / "imagenet", train, val)
            made_folder = time.perf_counter() - started
            shards = {
                "train": max(1, round(TRAIN_SHARDS * args.listing_fraction)),
                "validation": max(1, round(VAL_SHARDS * args.listing_fraction)),
            }
            started = time.perf_counter()
            make_shards(workdir / "imagenet-wds", train, val, shards)
            made_shards = time.perf_counter() - started
            print(
                f"\n(a) listings of {train:,} train + {val:,} val samples, {CLASSES} classes "
                f"(made in {made_folder:.0f} s as empty files, {made_shards:.0f} s as {sum(shards.values())} shards)"
            )
            # the shards' saved index (stages.data.wds.index_cache) in the workdir: the first wds listing reads
            # every header, the second (a resumed run's) the saved index
            os.environ["WDS_INDEX_CACHE"] = str(workdir / "wds-index")
            for label, data in (
                ("image folder", str(workdir / "imagenet")),
                ("wds shards", f"wds:{workdir / 'imagenet-wds'}"),
                ("wds again", f"wds:{workdir / 'imagenet-wds'}"),
            ):
                evict(workdir / ("imagenet" if label == "image folder" else "imagenet-wds"))
                run = measured(
                    [
                        *pipeline,
                        "-q",
                        "extract",
                        "--model",
                        str(model),
                        "--data",
                        data,
                        "--out",
                        str(workdir / "never.zarr"),
                        "--blocks",
                        "3",
                        "--dry-run",
                    ],
                    label,
                    workdir / f"listing-{label.split()[0]}.log",
                )
                results[f"listing {label}"] = run
                print(
                    f"  {label:<13} extract --dry-run: {run['wall_s']:6.1f} s ({run['cpu_s']:.1f} CPU s), read "
                    f"{format_bytes(run['read_bytes'])}, peak {format_bytes(run['peak_rss'])}, "
                    f"{(train + val) / run['wall_s']:,.0f} samples/s; at 1.28M: "
                    f"{run['wall_s'] / args.listing_fraction:.0f} s"
                )
            shutil.rmtree(workdir / "imagenet")
            shutil.rmtree(workdir / "imagenet-wds")
            shutil.rmtree(workdir / "wds-index", ignore_errors=True)
        if args.listing_only:
            return

        train = math.ceil(IMAGENET_TRAIN * args.fraction)
        store = workdir / "rehearsal.zarr"
        written = write_store(store, train, IMAGENET_VAL)
        results["store"] = written
        print(
            f"\n(b) store: {train:,} train + {IMAGENET_VAL:,} val rows, blocks 24 (1,024 ch) and 30 (512 ch) at "
            f"2x2, float16: {format_bytes(written['feature_bytes'])} of features, "
            f"{format_bytes(written['bytes'])} on "
            f"disk (chunks of {written['chunk']}, shards of {written['shard']} rows); written in "
            f"{written['seconds']:.0f} s ({written['rows'] / written['seconds']:,.0f} rows/s, "
            f"{written['cpu_s'] / written['seconds']:.1f} cores)"
        )

        budget = ["--memory-budget", args.memory_budget]
        common = [
            "--epochs",
            "1",
            "--lr",
            "1e-3",
            "--weight-decay",
            "0",
            "--data-mode",
            "stream",
            "--threads",
            "2",
            "--device",
            "cpu",
            "--test-split",
            "val",
            *budget,
        ]
        stages = [
            (
                "probe linear, block 24 pool 2 (4,096 features), 1 epoch",
                [
                    *pipeline,
                    "probe",
                    "--store",
                    str(store),
                    "--head",
                    "linear",
                    "--blocks",
                    "24",
                    "--pool",
                    "2",
                    "--out",
                    str(workdir / "probe"),
                    "--no-render",
                    *common,
                ],
                train + IMAGENET_VAL,
            ),
            (
                "sweep linear, block 30 x pools 1,2 (512 and 2,048 features), 1 epoch",
                [
                    *pipeline,
                    "sweep",
                    "--store",
                    str(store),
                    "--head",
                    "linear",
                    "--blocks",
                    "30",
                    "--out",
                    str(workdir / "sweep"),
                    *common,
                ],
                train + IMAGENET_VAL,
            ),
            (
                "cka linear, 4 arrays, 50,000 val samples",
                [
                    *pipeline,
                    "cka",
                    "--store",
                    str(store),
                    "--split",
                    "val",
                    "--samples",
                    "50000",
                    "--pool",
                    "1,2",
                    "--out",
                    str(workdir / "cka"),
                    *budget,
                ],
                IMAGENET_VAL,
            ),
        ]
        print(f"\n(c) the stages, the store read from the disk (evicted first), --memory-budget {args.memory_budget}:")
        for label, command, rows in stages:
            evict(store)
            run = measured(command, label, workdir / f"{label.split()[0]}.log")
            run["rows"] = rows
            results[label] = run
            rate = run["read_bytes"] / run["wall_s"]
            print(
                f"  {label}\n    {run['wall_s']:.0f} s wall ({run['cpu_s']:.0f} CPU s), peak "
                f"{format_bytes(run['peak_rss'])}; {rows / run['wall_s']:,.0f} samples/s; read "
                f"{format_bytes(run['read_bytes'])} from the file system, {format_bytes(rate)}/s = "
                f"{rate / bandwidth:.3f} of the disk's sequential bandwidth"
            )
        for name in ("probe", "sweep"):
            chosen = [line for line in (workdir / f"{name}.log").read_text().splitlines() if "chosen on" in line]
            print(f"  {name}: {chosen[-1] if chosen else '(no result line)'}")

        scale = IMAGENET_TRAIN / train
        print(
            f"\nextrapolated to {IMAGENET_TRAIN:,} train rows (x{scale:.1f}; linear in rows, memory held by the "
            "budget):"
        )
        for label, _, _ in stages[:2]:
            run = results[label]
            print(
                f"  {label.split(',')[0]}: {run['wall_s'] * scale / 60:.0f} min on this machine; its reads at the "
                f"disk's bandwidth alone: {run['read_bytes'] * scale / bandwidth / 60:.1f} min"
            )
        per_row = written["bytes"] / written["rows"]
        print(
            f"  the store: {format_bytes(per_row * (IMAGENET_TRAIN + IMAGENET_VAL))} on disk for these 2 arrays, "
            f"written at this machine's {written['rows'] / written['seconds']:,.0f} rows/s in "
            f"{(IMAGENET_TRAIN + IMAGENET_VAL) / (written['rows'] / written['seconds']) / 60:.0f} min"
        )
        node = 8 * 537  # images/s: 8 H200s at 537 forwards/s each (bench/decode.py), one timestep
        print(
            f"  an 8-GPU node extracting at {node:,} images/s (bench/decode.py) writes "
            f"{format_bytes(node * per_row)}/s of these arrays' store; 1.28M images in "
            f"{IMAGENET_TRAIN / node / 60:.1f} min per timestep"
        )
        (workdir / "rehearsal.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
