"""The extraction stage: one forward pass per batch (all timesteps at once) into the feature store.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   eps = noise(seed, index, t, shape)

Work is organised by the store's sample chunks: every batch lies inside one chunk, and a chunk's
arrays are handed to a background writer as soon as the chunk is complete, so the forward passes
never wait on compression or disk. A rerun computes only the (chunk, block, timestep) triples that
are not marked done, and, because batches never cross chunks, recomputes them with exactly the
batches an uninterrupted run would have used.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cache import FeatureStore, FeatureStoreWriter, layout
from cache.pooling import stored_grid
from cache.writer import SplitIndex
from stages.models.blocks import Block, block_table, resolve_blocks
from stages.models.capture import BlockCapture
from stages.data.folders import ImageFolderSplit, dataset_identity, load_image, preprocessing, scan
from stages.devices import resolve_device
from stages.models.loading import LoadedModel, load_model

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = ("float16", "float32")
CHUNK_BYTES = 4 << 20  # aim for sample chunks of about 4 MB in the widest array


def noise(seed: int, index: int, timestep: int, shape: tuple[int, ...]) -> torch.Tensor:
    """eps for sample `index` (its position in its split) at `timestep`: float32 N(0, 1) on the CPU.

    A pure function: a `torch.Generator` seeded with 64 bits drawn from
    `numpy.random.SeedSequence([seed, index, timestep])`, then `torch.randn(shape)`. A stored feature
    therefore does not depend on batch size, device, order or process count.
    """
    if min(seed, index, timestep) < 0:
        raise ValueError(f"seed, index and timestep must be non-negative, got {(seed, index, timestep)}")
    high, low = np.random.SeedSequence([seed, index, timestep]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed((int(high) << 32) | int(low))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    data: str
    out: str
    blocks: str | list[int] | None = None  # None: all
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
        for split, data in self.splits.items():
            n = len(data.paths)
            images = images_per_pass(self.config.batch_size, len(self.config.timesteps))
            batches = len(_batches(list(range(layout.num_chunks(n, self.chunk_samples))), n, self.chunk_samples, images))
            lines.append(
                f"{split}: {n} images, {batches} forward passes of up to {images} images x "
                f"{len(self.config.timesteps)} timesteps"
            )
        lines.append(f"{'split':<6} {'block':>5} {'timestep':>8}  {'shape':<24} {'MB':>10}")
        for split, block, t, shape in self.arrays():
            size = int(np.prod(shape)) * itemsize
            total += size
            lines.append(f"{split:<6} {block.number:>5} {t:>8}  {str(shape):<24} {size / 1e6:>10.2f}")
        lines.append(f"total {total / 1e6:.2f} MB before compression, {len(self.arrays())} arrays")
        return "\n".join(lines)


def _package_version() -> str:
    try:
        return metadata.version("diffusion-feature-cache")
    except metadata.PackageNotFoundError:
        return "unknown"


def _validate(config: ExtractConfig, model: LoadedModel) -> None:
    steps = model.num_train_timesteps
    bad = [t for t in config.timesteps if not 0 <= t < steps]
    if bad:
        raise ValueError(f"timestep(s) {bad} outside [0, {steps}): this model's scheduler has {steps} training steps")
    if not config.timesteps:
        raise ValueError("no timesteps requested")
    if not config.pools or min(config.pools) < 1:
        raise ValueError(f"pools must be positive integers, got {list(config.pools)}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {config.dtype!r}")
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {config.precision!r}")
    if config.batch_size < 1:
        raise ValueError(f"batch size must be positive, got {config.batch_size}")


def _existing_chunk_samples(out: str) -> int | None:
    if not (Path(out) / "zarr.json").exists():
        return None
    with contextlib.suppress(Exception):
        return int(FeatureStore.open(out).attrs["chunk_samples"])
    return None


def make_plan(config: ExtractConfig, model: LoadedModel | None = None) -> Plan:
    """Validate everything against the model and the data before any work is done."""
    model = model or load_model(config.model)
    _validate(config, model)
    table = block_table(model.unet)
    blocks = resolve_blocks(config.blocks, table)
    grids = {block.number: stored_grid(block.resolution, list(config.pools)) for block in blocks}
    splits = scan(config.data, list(config.splits))
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
        "data": dataset_identity(splits),
        "preprocessing": preprocessing(size, int(model.unet.config.in_channels)),
        "noise_seed": int(config.noise_seed),
        "dtype": config.dtype,
        "precision": config.precision,
        "chunk_samples": int(chunk_samples),
    }
    return Plan(config, model, table, blocks, grids, splits, int(chunk_samples), settings)


class _NoisedImages(Dataset):
    """(x0 (C, H, W), eps (T, C, H, W), index) per sample; runs in DataLoader workers."""

    def __init__(self, split: ImageFolderSplit, size: int, channels: int, timesteps: list[int], seed: int):
        self.split, self.size, self.channels, self.timesteps, self.seed = split, size, channels, timesteps, seed

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, index: int):
        x0 = load_image(self.split.root / self.split.paths[index], self.size, self.channels)
        eps = torch.stack([noise(self.seed, index, t, x0.shape) for t in self.timesteps])
        return x0, eps, index


def images_per_pass(batch_size: int, num_timesteps: int) -> int:
    """Images per forward pass: `batch_size` counts rows (images x timesteps), the memory and speed knob.

    Sharing a pass between timesteps saves kernel launches on a GPU, but a pass T times larger than
    the one asked for is slower per row on a CPU (cache) and may not fit a GPU.
    """
    return max(1, batch_size // num_timesteps)


def _batches(chunks: list[int], num_samples: int, chunk_samples: int, batch_size: int) -> list[list[int]]:
    batches = []
    for chunk in chunks:
        rows = layout.chunk_slice(chunk, num_samples, chunk_samples)
        batches += [list(range(s, min(s + batch_size, rows.stop))) for s in range(rows.start, rows.stop, batch_size)]
    return batches


def default_workers(device: torch.device) -> int:
    cpus = os.cpu_count() or 1
    return min(8, cpus - 1) if device.type == "cuda" else 0


def run_extract(config: ExtractConfig, *, progress: bool = True, model: LoadedModel | None = None) -> Plan:
    """Extract every requested (block, timestep) of every split into `config.out`; resumable."""
    plan = make_plan(config, model)
    device = resolve_device(config.device)
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    splits = {name: SplitIndex(s.labels, s.paths) for name, s in plan.splits.items()}
    with FeatureStoreWriter.open(
        config.out,
        settings=plan.settings,
        splits=splits,
        block_table=[block.as_dict() for block in plan.table],
        grids=plan.grids,
        overwrite=config.overwrite,
    ) as writer:
        writer.add_arrays(plan.grids, list(config.timesteps), list(config.pools))
        writer.update_info(
            model_source=str(config.model),
            data_root=str(Path(config.data).resolve()),
            noise={"formula": "x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps", "eps": "stages.extract.noise(seed, index, t, shape)"},
            package_version=_package_version(),
        )
        unet = plan.model.unet.to(device).eval()
        if device.type == "cuda":
            unet = unet.to(memory_format=torch.channels_last)
        with BlockCapture(unet, plan.blocks) as capture, ThreadPoolExecutor(1, thread_name_prefix="store-writer") as pool:
            for split in plan.splits:
                _extract_split(plan, split, writer, capture, pool, device, progress)
    return plan


def exact_fp32(device: torch.device, precision: str):
    """fp32 means fp32 on a GPU too: cuDNN would otherwise run convolutions in TF32 (10-bit mantissa),
    and the store would no longer equal a float32 forward pass. bf16 is the fast setting."""
    if device.type != "cuda" or precision != "fp32":
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


def _extract_split(plan, split, writer, capture, pool, device, progress) -> None:
    config = plan.config
    data = plan.splits[split]
    n, cs = len(data.paths), plan.chunk_samples
    # Which (block, timestep) arrays each chunk still needs.
    needs: dict[int, set[tuple[int, int]]] = {}
    for block in plan.blocks:
        for t in config.timesteps:
            for chunk in writer.pending_chunks(split, block.number, t):
                needs.setdefault(chunk, set()).add((block.number, t))
    if not needs:
        log.info("%s: nothing to do, every requested chunk is done", split)
        return
    chunks = sorted(needs)
    # Every pass of this split runs the same timesteps, even for a chunk a killed run had partly
    # marked done: the batch composition, and so the float round-off, must match an uninterrupted run.
    steps = sorted({t for wanted in needs.values() for _, t in wanted})
    batches = _batches(chunks, n, cs, images_per_pass(config.batch_size, len(steps)))
    size = plan.settings["preprocessing"]["size"]
    channels = plan.settings["preprocessing"]["channels"]
    workers = default_workers(device) if config.workers is None else config.workers
    loader = DataLoader(
        _NoisedImages(data, size, channels, steps, config.noise_seed),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    abar = plan.model.alphas_cumprod()
    scale_x0 = [float(math.sqrt(abar[t])) for t in steps]
    scale_eps = [float(math.sqrt(1.0 - abar[t])) for t in steps]
    autocast = (
        torch.autocast(device.type, dtype=PRECISIONS[config.precision])
        if config.precision != "fp32"
        else contextlib.nullcontext()
    )
    store_dtype = torch.float16 if config.dtype == "float16" else torch.float32
    pending: deque[Future] = deque()
    buffers: dict[tuple[int, int], np.ndarray] = {}
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, desc=f"extract {split}", unit="img", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode(), exact_fp32(device, config.precision), bar:
        for x0, eps, index in loader:
            chunk = int(index[0]) // cs
            wanted = needs[chunk]
            grids = {b: plan.grids[b] for b in sorted({b for b, _ in wanted})}
            x0 = x0.to(device, non_blocking=True)
            eps = eps.to(device, non_blocking=True)
            # (T*B, C, H, W): timestep-major, so rows [i*B:(i+1)*B] belong to steps[i].
            xt = torch.cat([scale_x0[i] * x0 + scale_eps[i] * eps[:, i] for i in range(len(steps))])
            tt = torch.tensor(steps, device=device).repeat_interleave(x0.shape[0])
            if device.type == "cuda":
                xt = xt.contiguous(memory_format=torch.channels_last)
            with autocast:
                features = capture(xt, tt, grids)
            rows = layout.chunk_slice(chunk, n, cs)
            offset = int(index[0]) - rows.start
            batch = x0.shape[0]
            host = {b: f.to(store_dtype).cpu().numpy() for b, f in features.items()}
            for b, t in wanted:
                target = buffers.get((b, t))
                if target is None:
                    target = buffers[(b, t)] = np.empty((rows.stop - rows.start, *host[b].shape[1:]), host[b].dtype)
                i = steps.index(t)
                target[offset : offset + batch] = host[b][i * batch : (i + 1) * batch]
            bar.update(batch)
            if offset + batch == rows.stop - rows.start:
                arrays = {key: buffers.pop(key) for key in list(wanted)}
                while len(pending) >= 2:  # bound the memory held by chunks waiting to be written
                    pending.popleft().result()
                pending.append(pool.submit(writer.write_chunk, split, chunk, arrays))
        while pending:
            pending.popleft().result()
