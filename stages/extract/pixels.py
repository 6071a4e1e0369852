"""The raw-pixel baseline as a feature store, so the probe stage treats it like any other.

The store has one "block" numbered 0 (the preprocessed image, no noise) at "timestep" 0, kind
"pixels". Pools are derived from it exactly as for U-Net blocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cache import FeatureStoreWriter, layout
from cache.pooling import stored_grid
from cache.writer import SplitIndex
from stages.data.folders import dataset_identity, scan
from stages.data.images import load_image, preprocessing

PIXEL_BLOCK = 0
PIXEL_TIMESTEP = 0


def write_pixel_store(
    data: str | Path,
    out: str | Path,
    *,
    size: int,
    channels: int,
    pools: tuple[int, ...] | None = None,
    splits: tuple[str, ...] = ("train", "val"),
    chunk_samples: int = 1024,
    overwrite: bool = False,
) -> Path:
    """Write every split's preprocessed images (float32, in [-1, 1]) to a store; pools default to full size."""
    folders = scan(data, list(splits))
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
    with FeatureStoreWriter.open(out, settings=settings, splits=index, block_table=[row], overwrite=overwrite) as writer:
        writer.add_arrays({PIXEL_BLOCK: grid}, [PIXEL_TIMESTEP], list(pools or (size,)))
        writer.update_info(data_root=str(Path(data).resolve()))
        for name, split in folders.items():
            n = len(split.paths)
            for chunk in writer.pending_chunks(name, PIXEL_BLOCK, PIXEL_TIMESTEP):
                rows = range(*layout.chunk_slice(chunk, n, chunk_samples).indices(n))
                images = torch.stack([load_image(split.root / split.paths[i], size, channels) for i in rows])
                pooled = torch.nn.functional.adaptive_avg_pool2d(images, grid).numpy().astype(np.float32)
                writer.write_chunk(name, chunk, {(PIXEL_BLOCK, PIXEL_TIMESTEP): pooled})
    return Path(out)
