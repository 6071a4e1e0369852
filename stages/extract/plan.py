"""Planning an extraction: the request checked against the model and the data before any work.

`make_plan` resolves blocks, grids, splits and the store's chunking into a `Plan`, whose `describe`
is what `--dry-run` prints. Work is organised by the store's shards (the unit of writing, many
sample chunks each): batches never cross a chunk (`chunk_batches`), so a rerun, or a job with another
number of processes, computes a chunk with exactly the batches an uninterrupted single process uses.

Chunks (`CHUNK_BYTES` in the widest array) are small enough for shuffled probe reads; shards hold
`SHARD_BYTES` of the widest array, fewer where one shard of every array of the plan would exceed
`SHARD_BUFFER_BYTES`: a process holds the shard it fills, uncompressed, for all of them at once.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np

from cache import FeatureStore, layout
from cache.errors import ConfigError
from cache.pooling import stored_grid
from cache.storage import Location
from cache.text import format_bytes
from stages.data.augment import Augment, parse_augment
from stages.data.folders import ImageFolderSplit, dataset_identity
from stages.data.images import DECODES, PREPROCESSES, decode_of, preprocessing, with_decode
from stages.data.registry import open_dataset
from stages.models.blocks import Block, resolve_blocks
from stages.models.feature_model import NO_NOISE_TIMESTEP, FeatureModel

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = ("float16", "float32")
CHUNK_BYTES = 4 << 20  # aim for sample chunks of about 4 MB in the widest array
SHARD_BYTES = 128 << 20  # and shards (objects) of about 128 MB in it: object stores like tens to hundreds of MB
SHARD_BUFFER_BYTES = 1 << 30  # at most this much of one shard of every array held in memory per process
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    data: str
    out: str
    blocks: tuple[int, ...] | None = None  # None: all (`pipeline.options.parse_block_spec` reads "18-30")
    timesteps: tuple[int, ...] | None = None  # None: the model's default (90; the marker 0 for a backbone)
    pools: tuple[int, ...] = (1, 2, 4)
    splits: tuple[str, ...] | None = None  # None: the data set's official splits (an image folder's: train, val)
    batch_size: int = 64
    dtype: str = "float16"
    precision: str = "fp32"
    device: str = "auto"
    workers: int | None = None
    noise_seed: int = 0
    chunk_samples: int | None = None  # None: the store's, or sized to CHUNK_BYTES
    shard_samples: int | None = None  # None: the store's, or sized to SHARD_BYTES (a multiple of chunk_samples)
    storage_options: dict = field(default_factory=dict)  # for an object store --out (fsspec)
    overwrite: bool = False
    verify: bool = False  # decode every finished chunk first, and recompute the damaged ones
    classes: str | None = None  # --classes: a class list file or a shipped name (stages.data.subsets)
    subset: str | None = None  # --subset: an image list file or a shipped name
    ensemble: int = 1  # the mean feature over this many noise draws per (image, timestep)
    prompt: str | None = None  # Stable Diffusion: a template with {} for the class name (None: the empty prompt)
    checkpoint: str | None = None  # timm: a state dict file for the model
    preprocess: str | None = None  # "bicubic" or "adm"; None: what the model directory names, else bicubic
    views: int = 1  # views of each image of `view_splits`: the centre view and views - 1 augmented ones
    augment: str | Augment | None = None  # e.g. "resized-crop,flip" (stages.data.augment); None: that default
    view_splits: tuple[str, ...] = ("train",)  # the splits that get augmented views (evaluation splits keep one)
    feature_norm: str | None = None  # transformer kinds: "layernorm" normalises each token (stages.models.tokens)
    guidance: float | None = None  # FLUX.1-dev: the guidance embedding's value (None: the pipeline's 3.5)
    offload: str | None = None  # text-conditioned pipelines: "none" runs the text encoders on --device (None: "text")
    image_column: str | None = None  # wds: / hf: data: the image's extension or column (None: found from the data)
    label_column: str | None = None  # wds: the .json field of the label (None: .cls); hf: the label column
    decode: str = "exact"  # "draft": JPEGs decoded at a reduced scale where the model is small (recorded)

    def __post_init__(self):
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))
        if isinstance(self.blocks, str):
            raise ConfigError(
                f"blocks must be block numbers or None, got the string {self.blocks!r}; "
                "pipeline.options.parse_block_spec reads '18-30' and the like"
            )
        for name in ("blocks", "timesteps", "pools", "splits", "view_splits"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.splits is not None:
            check_split_names(self.splits)


@dataclass
class Plan:
    config: ExtractConfig  # with the model's default timesteps filled in
    model: FeatureModel
    table: list[Block]
    blocks: list[Block]
    grids: dict[int, int]
    splits: dict[str, ImageFolderSplit]
    chunk_samples: int
    shard_samples: int
    settings: dict = field(repr=False)
    views: dict[str, tuple[str, int]] = field(default_factory=dict)  # stored split -> (split, view), views >= 1
    augment: Augment | None = None

    def image_options(self, split: str) -> dict:
        """How the images of stored split `split` are made: the preprocessing, and for a view >= 1 its
        augmentation and view number (`stages.data.augment`)."""
        method = self.settings["preprocessing"].get("method", "bicubic")
        base, view = self.views.get(split, (split, 0))
        return {
            "method": method,
            "view": view,
            "augment": self.augment if view else None,
            "draft": decode_of(self.settings["preprocessing"]) == "draft",
        }

    @property
    def location(self) -> Location:
        return Location.parse(self.config.out, self.config.storage_options)

    def arrays(self) -> list[tuple[str, Block, int, tuple[int, ...]]]:
        return [
            (
                split,
                block,
                t,
                (len(self.splits[split].paths), block.channels, self.grids[block.number], self.grids[block.number]),
            )
            for split in self.splits
            for block in self.blocks
            for t in self.config.timesteps
        ]

    def objects(self, split: str) -> int:
        """Objects (files) of one feature array of `split`: one per shard, or per chunk where unsharded."""
        n = len(self.splits[split].paths)
        return layout.num_chunks(n, self.shard_samples if n > self.chunk_samples else self.chunk_samples)

    def describe(self, world_size: int = 1) -> str:
        itemsize = np.dtype(self.config.dtype).itemsize
        lines = [
            f"model {self.config.model}: {len(self.table)} blocks, deepest requested {max(self.grids)}",
            f"store {self.config.out}: {self.config.dtype}, sample chunks of {self.chunk_samples}, shards of "
            f"{self.shard_samples} samples (the unit of writing: one object per array and shard)",
        ]
        images = images_per_pass(self.config.batch_size, len(self.config.timesteps))
        if self.views:
            counts = {base: view + 1 for base, view in self.views.values()}
            lines.append(
                "views: "
                + ", ".join(
                    f"{base} {count} (the centre view and {count - 1} augmented: "
                    f"{', '.join(a['name'] for a in self.augment.record(1))})"
                    for base, count in sorted(counts.items())
                )
                + "; each view costs the split's passes and bytes again"
            )
        for split, data in self.splits.items():
            n = len(data.paths)
            shards = layout.num_chunks(n, self.shard_samples)
            per_rank = [
                self._passes(split, list(range(shards))[rank::world_size], images) for rank in range(world_size)
            ]
            lines.append(
                f"{split}: {n} images in {shards} shards, {sum(per_rank)} forward passes of up to {images} images x "
                f"{len(self.config.timesteps)} timesteps"
                + (f"; per process (of {world_size}): {', '.join(map(str, per_rank))}" if world_size > 1 else "")
            )
        width = max(6, *(len(name) for name in self.splits))
        lines.append(f"{'split':<{width}} {'block':>5} {'timestep':>8}  {'shape':<24} {'objects':>7} {'MB':>10}")
        total = objects = 0
        for split, block, t, shape in self.arrays():
            size = int(np.prod(shape)) * itemsize
            total += size
            count = self.objects(split)
            objects += count
            lines.append(f"{split:<{width}} {block.number:>5} {t:>8}  {str(shape):<24} {count:>7} {size / 1e6:>10.2f}")
        estimate = self.model.memory_estimate(max(self.grids), self.config.precision)
        if estimate is not None:
            lines += estimate.lines(images * len(self.config.timesteps), images, self.config.precision)
        flags = sum(layout.num_chunks(len(d.paths), self.shard_samples) for d in self.splits.values())
        index = sum(3 + self.objects(split) for split in self.splits)  # labels, paths, metadata; file records
        lines.append(
            f"total {format_bytes(total)} before compression in {len(self.arrays())} arrays: {objects} "
            f"objects "
            f"of features, {flags} completion flags, about {index} of labels, paths and file records"
        )
        return "\n".join(lines)

    def _passes(self, split: str, shards: list[int], images: int) -> int:
        n = len(self.splits[split].paths)
        per = self.shard_samples // self.chunk_samples
        chunks = [
            c for s in shards for c in range(s * per, min((s + 1) * per, layout.num_chunks(n, self.chunk_samples)))
        ]
        return len(chunk_batches(chunks, n, self.chunk_samples, images))


# The request fields a store records: what decides its numbers (the rest: where and how fast it runs)
RECIPE_FIELDS = (
    "model",
    "data",
    "classes",
    "subset",
    "prompt",
    "checkpoint",
    "preprocess",
    "ensemble",
    "views",
    "augment",
    "view_splits",
    "splits",
    "noise_seed",
    "dtype",
    "precision",
    "batch_size",
    "chunk_samples",
    "shard_samples",
    "blocks",
    "timesteps",
    "pools",
)


def recipe(config: ExtractConfig, chunk_samples: int, shard_samples: int) -> dict:
    """The store's record of `config` (JSON): local paths absolute, so it can be run from anywhere."""
    record = {name: getattr(config, name) for name in RECIPE_FIELDS}
    record.update(
        model=absolute_path(config.model),
        data=absolute_data(config.data),
        classes=absolute_path(config.classes),
        subset=absolute_path(config.subset),
        checkpoint=absolute_path(config.checkpoint),
        chunk_samples=int(chunk_samples),
        shard_samples=int(shard_samples),
        # an Augment object (library use) has no text form: its views' settings are recorded anyway
        augment=config.augment if isinstance(config.augment, str) else None,
    )
    return {key: list(value) if isinstance(value, tuple) else value for key, value in record.items()}


def absolute_path(path: str | None) -> str | None:
    """`path` made absolute where it names something here (a model directory, a list file); else as given
    (a Hub id, a shipped list's name)."""
    if path is None:
        return None
    candidate = Path(str(path)).expanduser()
    return str(candidate.resolve()) if candidate.exists() else str(path)


def absolute_data(spec: str) -> str:
    """A `--data` value (PATH or KIND:PATH) with its path made absolute."""
    kind, sep, rest = str(spec).partition(":")
    if sep and not Path(str(spec)).exists() and kind.isalpha() and len(kind) > 1:
        return f"{kind}:{absolute_path(rest)}"
    return absolute_path(spec)


def package_version() -> str:
    try:
        return metadata.version("diffusion-feature-cache")
    except metadata.PackageNotFoundError:
        return "unknown"


def _validate(config: ExtractConfig, model: FeatureModel) -> None:
    if not config.timesteps:
        raise ConfigError("no timesteps requested")
    if not model.diffusion and tuple(config.timesteps) != (NO_NOISE_TIMESTEP,):
        raise ConfigError(
            f"--model {config.model} is not a diffusion model: it has no noise timesteps (its features "
            f"are stored under the marker timestep {NO_NOISE_TIMESTEP}); leave --timesteps out"
        )
    if not model.diffusion and config.ensemble != 1:
        raise ConfigError(
            f"--ensemble {config.ensemble}: --model {config.model} is not a diffusion model and has no "
            "noise to average over; leave --ensemble out"
        )
    steps = model.num_train_timesteps if model.diffusion else 1
    bad = [t for t in config.timesteps if not 0 <= t < steps]
    if bad:
        raise ConfigError(f"timestep(s) {bad} outside [0, {steps}): this model's scheduler has {steps} training steps")
    if config.ensemble < 1:
        raise ConfigError(f"--ensemble must be at least 1 (noise draws per image and timestep), got {config.ensemble}")
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
    if config.decode not in DECODES:
        raise ConfigError(f"decode must be one of {', '.join(DECODES)}, got {config.decode!r}")
    if config.preprocess is not None and config.preprocess not in PREPROCESSES:
        raise ConfigError(f"preprocess must be one of {', '.join(PREPROCESSES)}, got {config.preprocess!r}")
    if isinstance(config.views, bool) or not isinstance(config.views, int) or config.views < 1:
        raise ConfigError(f"--views must be a positive integer (1: the centre view only), got {config.views!r}")
    if config.views == 1 and config.augment is not None:
        raise ConfigError("--augment has no effect without --views 2 or more: view 0 is always the centre crop")


def check_split_names(splits) -> None:
    """Split names become store groups: non-empty, distinct, and no '/', leading '.' or '_' (reserved)."""
    if not splits:
        raise ConfigError("no splits requested: name at least one split folder, e.g. --splits train,val")
    for name in splits:
        if not isinstance(name, str) or not _SPLIT_NAME.fullmatch(name):
            raise ConfigError(
                f"split name {name!r} is not usable: use letters, digits, '-' and '_', not starting "
                "with '_' or '.' (e.g. train, val, test)"
            )
    if len(set(splits)) != len(splits):
        raise ConfigError(f"splits {list(splits)} name a split twice")


def _existing_layout(location: Location) -> tuple[int, int] | None:
    """(chunk_samples, shard_samples) of a store already at `location`, or None."""
    with contextlib.suppress(Exception):
        store = FeatureStore.open(location)
        return store.chunk_samples, store.shard_samples
    return None


def default_shard_samples(chunk_samples: int, widest: int, all_arrays: int) -> int:
    """A multiple of `chunk_samples`: about SHARD_BYTES of the widest array's rows (`widest` bytes per sample),
    and no more than SHARD_BUFFER_BYTES of every array's (`all_arrays` bytes per sample)."""
    rows = min(SHARD_BYTES // widest, SHARD_BUFFER_BYTES // all_arrays)
    return chunk_samples * max(1, rows // chunk_samples)


def make_plan(config: ExtractConfig, model: FeatureModel | None = None) -> Plan:
    """Validate everything against the model and the data before any work is done."""
    if model is None:
        from stages.models.kinds import load_feature_model

        model = load_feature_model(
            config.model,
            prompt=config.prompt,
            checkpoint=config.checkpoint,
            feature_norm=config.feature_norm,
            guidance=config.guidance,
            offload=config.offload,
            device=config.device,
        )
    if config.timesteps is None:
        config = replace(config, timesteps=model.default_timesteps())
    _validate(config, model)
    table = model.block_table()
    blocks = resolve_blocks(config.blocks, table)
    grids = {block.number: stored_grid(block.resolution, list(config.pools)) for block in blocks}
    splits = open_dataset(
        config.data,
        splits=config.splits,
        classes=config.classes,
        subset=config.subset,
        image_column=config.image_column,
        label_column=config.label_column,
        storage_options=config.storage_options,
    )  # wds: shards at a URL use --out's options
    model.bind_classes(next(iter(splits.values())).classes)
    data_identity = dataset_identity(splits)  # of the data set; views are not more data
    augment, views = None, {}
    unknown = [name for name in config.view_splits if name not in splits]
    if config.views > 1 and unknown:
        raise ConfigError(
            f"--view-splits names {', '.join(unknown)}, which --splits does not (the data set's "
            f"splits: {', '.join(splits)})"
        )
    if config.views > 1:
        augment = (
            config.augment
            if isinstance(config.augment, Augment)
            else parse_augment(config.augment or "resized-crop,flip")
        )
        for base in config.view_splits:
            for view in range(1, config.views):
                name = layout.view_split(base, view)
                splits[name], views[name] = splits[base], (base, view)
    itemsize = np.dtype(config.dtype).itemsize
    widest = max(block.channels * grids[block.number] ** 2 * itemsize for block in blocks)
    all_arrays = sum(block.channels * grids[block.number] ** 2 * itemsize for block in blocks) * len(config.timesteps)
    location = Location.parse(config.out, config.storage_options)
    existing = _existing_layout(location)
    chunk_samples = config.chunk_samples or (existing and existing[0]) or int(np.clip(CHUNK_BYTES // widest, 16, 4096))
    shard_samples = (
        config.shard_samples
        or (existing[1] if existing and existing[0] == chunk_samples else None)
        or default_shard_samples(chunk_samples, widest, all_arrays)
    )
    if shard_samples % chunk_samples:
        raise ConfigError(
            f"--shard-samples {shard_samples} is not a multiple of --chunk-samples {chunk_samples}: a "
            "shard holds whole chunks"
        )
    identity = {k: v for k, v in model.identity().items() if k != "source"}
    if config.ensemble > 1:  # recorded only when used: a one-draw store stays what it always was
        identity["ensemble"] = int(config.ensemble)
    settings = {
        "kind": model.store_kind,
        "model": identity,
        "data": data_identity,
        "preprocessing": _preprocessing(model, config.preprocess, config.decode),
        "noise_seed": int(config.noise_seed) if model.diffusion else None,
        "dtype": config.dtype,
        "precision": config.precision,
        "chunk_samples": int(chunk_samples),
        "shard_samples": int(shard_samples),
    }
    if views:  # only stores with augmented views record them: a store without stays as it always was
        settings["views"] = {
            "count": int(config.views),
            "splits": list(config.view_splits),
            "augment": augment.record(model.image_options()["size"]),
            "draws": "stages.data.augment.view_generator(noise_seed, index, view)",
            "noise": "stages.extract.noise(noise_seed, index, t, shape, view)",
        }
    return Plan(
        config, model, table, blocks, grids, splits, int(chunk_samples), int(shard_samples), settings, views, augment
    )


def _preprocessing(model: FeatureModel, method: str | None, decode: str = "exact") -> dict:
    """What the store records about the preprocessing: a pixel U-Net's `--preprocess` (or its directory's
    choice), every other kind its own processor's; with `--decode draft`, that too."""
    if model.kind == "unet":
        return preprocessing(model.image_size, int(model.unet.config.in_channels), method or model.preprocess, decode)
    if method is not None:
        raise ConfigError(
            f"--preprocess {method} applies to pixel-space U-Nets; --model {model.source} makes its "
            "inputs its own way (recorded in the store): leave --preprocess out"
        )
    return with_decode(model.preprocessing(), decode)


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
