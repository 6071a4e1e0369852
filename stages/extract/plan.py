"""Planning an extraction: the request checked against the model and the data before any work.

`make_plan` resolves blocks, grids, splits and the store's chunking into a `Plan`, whose `describe`
is what `--dry-run` prints. Work is organised by the store's sample chunks: batches never cross a
chunk (`chunk_batches`), so a rerun recomputes a chunk with exactly the batches an uninterrupted run uses.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from cache import FeatureStore, layout
from cache.errors import ConfigError
from cache.pooling import stored_grid
from stages.data.augment import Augment, parse_augment
from stages.data.folders import ImageFolderSplit, dataset_identity, scan
from stages.data.images import PREPROCESSES, preprocessing
from stages.models.blocks import Block, block_table, resolve_blocks
from stages.models.loading import LoadedModel, load_model

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = ("float16", "float32")
CHUNK_BYTES = 4 << 20  # aim for sample chunks of about 4 MB in the widest array
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    data: str
    out: str
    blocks: tuple[int, ...] | None = None  # None: all (`pipeline.options.parse_block_spec` reads "18-30")
    timesteps: tuple[int, ...] = (90,)
    pools: tuple[int, ...] = (1, 2, 4)
    splits: tuple[str, ...] = ("train", "val")
    batch_size: int = 64
    dtype: str = "float16"
    precision: str = "fp32"
    device: str = "auto"
    workers: int | None = None
    noise_seed: int = 0
    chunk_samples: int | None = None  # None: the store's, or sized to CHUNK_BYTES
    overwrite: bool = False
    verify: bool = False  # decode every finished chunk first, and recompute the damaged ones
    preprocess: str | None = None  # "bicubic" or "adm"; None: what the model directory names, else bicubic
    views: int = 1  # views of each image of `view_splits`: the centre view and views - 1 augmented ones
    augment: str | Augment | None = None  # e.g. "resized-crop,flip" (stages.data.augment); None: that default
    view_splits: tuple[str, ...] = ("train",)  # the splits that get augmented views (evaluation splits keep one)

    def __post_init__(self):
        if isinstance(self.blocks, str):
            raise ConfigError(f"blocks must be block numbers or None, got the string {self.blocks!r}; "
                              "pipeline.options.parse_block_spec reads '18-30' and the like")
        for name in ("blocks", "timesteps", "pools", "splits", "view_splits"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        check_split_names(self.splits)


@dataclass
class Plan:
    config: ExtractConfig
    model: LoadedModel
    table: list[Block]
    blocks: list[Block]
    grids: dict[int, int]
    splits: dict[str, ImageFolderSplit]
    chunk_samples: int
    settings: dict = field(repr=False)
    views: dict[str, tuple[str, int]] = field(default_factory=dict)  # stored split -> (split, view), views >= 1
    augment: Augment | None = None

    def image_options(self, split: str) -> dict:
        """How the images of stored split `split` are made: the preprocessing, and for a view >= 1 its
        augmentation and view number (`stages.data.augment`)."""
        method = self.settings["preprocessing"].get("method", "bicubic")
        base, view = self.views.get(split, (split, 0))
        return {"method": method, "view": view, "augment": self.augment if view else None}

    def arrays(self) -> list[tuple[str, Block, int, tuple[int, ...]]]:
        return [
            (split, block, t, (len(self.splits[split].paths), block.channels, self.grids[block.number], self.grids[block.number]))
            for split in self.splits
            for block in self.blocks
            for t in self.config.timesteps
        ]

    def describe(self) -> str:
        itemsize = np.dtype(self.config.dtype).itemsize
        lines = [
            f"model {self.config.model}: {len(self.table)} blocks, deepest requested {max(self.grids)}",
            f"store {self.config.out}: {self.config.dtype}, sample chunks of {self.chunk_samples}",
        ]
        total = 0
        if self.views:
            counts = {base: view + 1 for base, view in self.views.values()}
            lines.append("views: " + ", ".join(f"{base} {count} (the centre view and {count - 1} augmented: "
                                                f"{', '.join(a['name'] for a in self.augment.record(1))})"
                                                for base, count in sorted(counts.items()))
                         + "; each view costs the split's passes and bytes again")
        for split, data in self.splits.items():
            n = len(data.paths)
            images = images_per_pass(self.config.batch_size, len(self.config.timesteps))
            passes = len(chunk_batches(list(range(layout.num_chunks(n, self.chunk_samples))), n, self.chunk_samples, images))
            lines.append(
                f"{split}: {n} images, {passes} forward passes of up to {images} images x "
                f"{len(self.config.timesteps)} timesteps"
            )
        width = max(6, *(len(name) for name in self.splits))
        lines.append(f"{'split':<{width}} {'block':>5} {'timestep':>8}  {'shape':<24} {'MB':>10}")
        for split, block, t, shape in self.arrays():
            size = int(np.prod(shape)) * itemsize
            total += size
            lines.append(f"{split:<{width}} {block.number:>5} {t:>8}  {str(shape):<24} {size / 1e6:>10.2f}")
        lines.append(f"total {total / 1e6:.2f} MB before compression, {len(self.arrays())} arrays")
        return "\n".join(lines)


def package_version() -> str:
    try:
        return metadata.version("diffusion-feature-cache")
    except metadata.PackageNotFoundError:
        return "unknown"


def _validate(config: ExtractConfig, model: LoadedModel) -> None:
    steps = model.num_train_timesteps
    bad = [t for t in config.timesteps if not 0 <= t < steps]
    if bad:
        raise ConfigError(f"timestep(s) {bad} outside [0, {steps}): this model's scheduler has {steps} training steps")
    if not config.timesteps:
        raise ConfigError("no timesteps requested")
    if len(set(config.timesteps)) != len(config.timesteps):
        raise ConfigError(f"timesteps {list(config.timesteps)} name a timestep twice")
    if not config.pools or min(config.pools) < 1:
        raise ConfigError(f"pools must be positive integers, got {list(config.pools)}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {config.dtype!r}")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {config.precision!r}")
    if config.batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {config.batch_size}")
    if config.preprocess is not None and config.preprocess not in PREPROCESSES:
        raise ConfigError(f"preprocess must be one of {', '.join(PREPROCESSES)}, got {config.preprocess!r}")
    if isinstance(config.views, bool) or not isinstance(config.views, int) or config.views < 1:
        raise ConfigError(f"--views must be a positive integer (1: the centre view only), got {config.views!r}")
    if config.views == 1 and config.augment is not None:
        raise ConfigError("--augment has no effect without --views 2 or more: view 0 is always the centre crop")
    unknown = [s for s in config.view_splits if s not in config.splits]
    if config.views > 1 and unknown:
        raise ConfigError(f"--view-splits names {', '.join(unknown)}, which --splits does not ({', '.join(config.splits)})")


def check_split_names(splits) -> None:
    """Split names become store groups: non-empty, distinct, and no '/', leading '.' or '_' (reserved)."""
    if not splits:
        raise ConfigError("no splits requested: name at least one split folder, e.g. --splits train,val")
    for name in splits:
        if not isinstance(name, str) or not _SPLIT_NAME.fullmatch(name):
            raise ConfigError(f"split name {name!r} is not usable: use letters, digits, '-' and '_', not starting "
                              "with '_' or '.' (e.g. train, val, test)")
    if len(set(splits)) != len(splits):
        raise ConfigError(f"splits {list(splits)} name a split twice")


def _existing_chunk_samples(out: str) -> int | None:
    if not (Path(out) / "zarr.json").exists():
        return None
    with contextlib.suppress(Exception):
        return FeatureStore.open(out).chunk_samples
    return None


def make_plan(config: ExtractConfig, model: LoadedModel | None = None) -> Plan:
    """Validate everything against the model and the data before any work is done."""
    model = model or load_model(config.model)
    _validate(config, model)
    table = block_table(model.unet)
    blocks = resolve_blocks(config.blocks, table)
    grids = {block.number: stored_grid(block.resolution, list(config.pools)) for block in blocks}
    splits = scan(config.data, list(config.splits))
    data_identity = dataset_identity(splits)  # of the image folders; views are not more data
    augment, views = None, {}
    if config.views > 1:
        augment = config.augment if isinstance(config.augment, Augment) else parse_augment(config.augment or
                                                                                           "resized-crop,flip")
        for base in config.view_splits:
            for view in range(1, config.views):
                name = layout.view_split(base, view)
                splits[name], views[name] = splits[base], (base, view)
    itemsize = np.dtype(config.dtype).itemsize
    widest = max(block.channels * grids[block.number] ** 2 * itemsize for block in blocks)
    chunk_samples = (
        config.chunk_samples
        or _existing_chunk_samples(config.out)
        or int(np.clip(CHUNK_BYTES // widest, 16, 4096))
    )
    size = int(model.unet.config.sample_size if not isinstance(model.unet.config.sample_size, (list, tuple)) else model.unet.config.sample_size[0])
    settings = {
        "kind": "diffusion",
        "model": {k: v for k, v in model.identity().items() if k != "source"},
        "data": data_identity,
        "preprocessing": preprocessing(size, int(model.unet.config.in_channels), config.preprocess or model.preprocess),
        "noise_seed": int(config.noise_seed),
        "dtype": config.dtype,
        "precision": config.precision,
        "chunk_samples": int(chunk_samples),
    }
    if views:  # only stores with augmented views record them: a store without stays as it always was
        settings["views"] = {
            "count": int(config.views), "splits": list(config.view_splits), "augment": augment.record(size),
            "draws": "stages.data.augment.view_generator(noise_seed, index, view)",
            "noise": "stages.extract.noise(noise_seed, index, t, shape, view)",
        }
    return Plan(config, model, table, blocks, grids, splits, int(chunk_samples), settings, views, augment)




def images_per_pass(batch_size: int, num_timesteps: int) -> int:
    """Images per forward pass: `batch_size` counts rows (images x timesteps), the memory and speed knob.

    Sharing a pass between timesteps saves kernel launches on a GPU, but a pass T times larger than
    the one asked for is slower per row on a CPU (cache) and may not fit a GPU.
    """
    return max(1, batch_size // num_timesteps)


def chunk_batches(chunks: list[int], num_samples: int, chunk_samples: int, batch_size: int) -> list[list[int]]:
    """Sample indices of each forward pass over `chunks`: up to `batch_size` images, never across a chunk."""
    batches = []
    for chunk in chunks:
        rows = layout.chunk_slice(chunk, num_samples, chunk_samples)
        batches += [list(range(s, min(s + batch_size, rows.stop))) for s in range(rows.start, rows.stop, batch_size)]
    return batches
