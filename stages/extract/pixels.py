"""The raw-pixel baseline as a feature store, so the probe stage treats it like any other.

The store has one "block" numbered 0 (the preprocessed image, no noise) at "timestep" 0, kind
"pixels". Pools are derived from it exactly as for U-Net blocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache import FeatureStoreWriter, layout
from cache.errors import ConfigError
from cache.pooling import adaptive_avg_pool, stored_grid
from cache.text import format_bytes
from cache.writer import SplitIndex
from stages.data.folders import dataset_identity
from stages.data.images import preprocessing
from stages.data.registry import open_dataset
from stages.devices import available_memory
from stages.extract.plan import CHUNK_BYTES, absolute_data, absolute_path, check_split_names
from stages.extract.run import check_images_unchanged

PIXEL_BLOCK = 0
PIXEL_TIMESTEP = 0


def write_pixel_store(
    data: str | Path,
    out: str | Path,
    *,
    size: int,
    channels: int,
    pools: tuple[int, ...] | None = None,
    splits: tuple[str, ...] | None = None,
    chunk_samples: int | None = None,
    overwrite: bool = False,
    classes: str | None = None,
    subset: str | None = None,
) -> Path:
    """Write every split's preprocessed images (float32, in [-1, 1]) to a store; pools default to full size.

    Chunks hold about 4 MB (`chunk_samples` overrides); an image size whose images would not fit in
    memory is refused before anything is read. `data`, `splits` (None: the data set's own), `classes`
    and `subset` name the data as for extraction (`stages.data.registry.open_dataset`)."""
    if pools is not None and (not pools or min(pools) < 1):
        raise ConfigError(f"pools must be positive integers, got {list(pools)}")
    if size < 1 or channels not in (1, 3):
        raise ConfigError(
            f"the pixel store needs a positive size and 1 or 3 channels, got size {size}, {channels} channels"
        )
    per_image = 4 * channels * size * size
    if 4 * per_image > available_memory():
        largest = int((available_memory() / (16 * channels)) ** 0.5)
        raise ConfigError(
            f"--size {size} makes each image {format_bytes(per_image)} of float32 pixels, more than this "
            f"machine can hold while writing them ({format_bytes(available_memory())} available); "
            f"choose --size {largest} or less"
        )
    if splits is not None:
        check_split_names(splits)
    chunk_samples = chunk_samples or int(np.clip(CHUNK_BYTES // per_image, 1, 4096))
    folders = open_dataset(str(data), splits=splits, classes=classes, subset=subset)
    grid = stored_grid(size, list(pools or (size,)))
    row = {"number": PIXEL_BLOCK, "module": "input", "adm_name": "pixels", "channels": channels, "resolution": size}
    settings = {
        "kind": "pixels",
        "model": {"name": "pixels"},
        "data": dataset_identity(folders),
        "preprocessing": preprocessing(size, channels),
        "noise_seed": None,
        "dtype": "float32",
        "precision": "fp32",
        "chunk_samples": chunk_samples,
    }
    index = {name: SplitIndex(split.labels, split.paths) for name, split in folders.items()}
    # what `stages.extract.repair` runs to make the store again (local paths absolute)
    recipe = {
        "maker": "pixels",
        "data": absolute_data(str(data)),
        "size": size,
        "channels": channels,
        "pools": list(pools) if pools is not None else None,
        "splits": list(splits) if splits else None,
        "chunk_samples": chunk_samples,
        "classes": absolute_path(classes),
        "subset": absolute_path(subset),
    }
    with FeatureStoreWriter.open(
        out, settings=settings, splits=index, block_table=[row], overwrite=overwrite, recipe=recipe
    ) as writer:
        writer.add_arrays({PIXEL_BLOCK: grid}, [PIXEL_TIMESTEP], list(pools or (size,)))
        writer.update_info(data_root=str(next(iter(folders.values())).root.resolve()))
        for name, split in folders.items():
            check_images_unchanged(writer, name, split)
            n = len(split.paths)
            pending = writer.pending_shards(name, PIXEL_BLOCK, PIXEL_TIMESTEP)
            write_set = writer.write_set(name, [(PIXEL_BLOCK, PIXEL_TIMESTEP)]) if pending else None
            for chunk in pending:
                rows = range(*layout.chunk_slice(chunk, n, writer.chunk_samples).indices(n))
                loaded = [split.read(i, size, channels) for i in rows]
                images = np.stack([image.numpy() for image, _ in loaded])
                records = np.asarray([record for _, record in loaded], dtype=np.uint64)
                writer.write_shard(
                    name,
                    chunk,
                    {(PIXEL_BLOCK, PIXEL_TIMESTEP): adaptive_avg_pool(images, grid)},
                    write_set=write_set,
                    files=records,
                )
    return Path(out)
