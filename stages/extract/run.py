"""The extraction run: one forward pass per batch (all timesteps at once) into the feature store.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   eps = noise(seed, index, t, shape)   (stages.extract.noising)

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
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache import FeatureStoreWriter, layout
from cache.errors import ConfigError, DataChangedError
from cache.writer import SplitIndex
from stages.data.augment import view_generator
from stages.data.errors import DataError
from stages.data.folders import ImageFolderSplit, changed_images
from stages.data.images import read_image
from stages.devices import resolve_device
from stages.extract.noising import noise
from stages.extract.plan import ExtractConfig, Plan, chunk_batches, images_per_pass, make_plan, package_version
from stages.models.capture import BlockCapture
from stages.models.loading import LoadedModel
from stages.progress import progress_bar

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _NoisedImages(Dataset):
    """(x0 (C, H, W), eps (T, C, H, W), index, (content hash, mtime), error) per sample; runs in DataLoader
    workers. An unreadable image comes back as its error message (and zeros), so that the main process
    raises it as a plain DataError rather than a worker's traceback."""

    def __init__(self, split: ImageFolderSplit, size: int, channels: int, timesteps: list[int], seed: int, *,
                 method: str = "bicubic", view: int = 0, augment=None):
        self.split, self.size, self.channels, self.timesteps, self.seed = split, size, channels, timesteps, seed
        self.method, self.view, self.augment = method, view, augment  # Plan.image_options

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, index: int):
        # view >= 1: an augmented view, its draws a pure function of (seed, index, view) (stages.data.augment)
        rng = view_generator(self.seed, index, self.view) if self.view else None
        try:
            x0, record = read_image(self.split.root / self.split.paths[index], self.size, self.channels,
                                    method=self.method, augment=self.augment, rng=rng)
            error = ""
        except DataError as failure:
            x0, record, error = torch.zeros(self.channels, self.size, self.size), (0, 0), str(failure)
        eps = torch.stack([noise(self.seed, index, t, x0.shape, self.view) for t in self.timesteps])
        return x0, eps, index, torch.tensor(record, dtype=torch.int64), error


def default_workers(device: torch.device) -> int:
    cpus = os.cpu_count() or 1
    return min(8, cpus - 1) if device.type == "cuda" else 0


def run_extract(config: ExtractConfig, *, progress: bool = True, model: LoadedModel | None = None) -> Plan:
    """Extract every requested (block, timestep) of every split into `config.out`; resumable."""
    plan = make_plan(config, model)
    device = resolve_device(config.device)
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    splits = {name: SplitIndex(s.labels, s.paths) for name, s in plan.splits.items()}
    with FeatureStoreWriter.open(
        config.out,
        settings=plan.settings,
        splits=splits,
        block_table=[block.as_dict() for block in plan.table],
        grids=plan.grids,
        overwrite=config.overwrite,
        verify=config.verify,
    ) as writer:
        for name, folder in plan.splits.items():
            check_images_unchanged(writer, name, folder)
        writer.add_arrays(plan.grids, list(config.timesteps), list(config.pools))
        writer.update_info(
            model_source=str(config.model),
            data_root=str(Path(config.data).resolve()),
            noise={"formula": "x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps", "eps": "stages.extract.noise(seed, index, t, shape)"},
            package_version=package_version(),
        )
        unet = plan.model.unet.to(device).eval()
        if device.type == "cuda":
            unet = unet.to(memory_format=torch.channels_last)
        with BlockCapture(unet, plan.blocks) as capture, ThreadPoolExecutor(1, thread_name_prefix="store-writer") as pool:
            for split in plan.splits:
                _extract_split(plan, split, writer, capture, pool, device, progress)
    return plan


def check_images_unchanged(writer: FeatureStoreWriter, split: str, folder: ImageFolderSplit) -> None:
    """Refuse a store whose images changed in place since their features were computed (same size, other
    content: the data set's identity cannot see it); images only touched get their new mtime recorded."""
    records = writer.file_records(split)
    changed, touched, updated = changed_images(folder, records)
    if changed:
        raise DataChangedError(
            f"{len(changed)} image(s) of {split} changed since the store's features were computed from them (same "
            f"size, other content): {', '.join(folder.paths[i] for i in changed[:5])}{' ...' if len(changed) > 5 else ''}. "
            f"Restore them, or re-extract with --overwrite"
        )
    if touched:
        writer.update_file_records(split, np.asarray(touched), updated)


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
    # The arrays this run computes complete their chunks together, with one flag each (cache.layout).
    write_set = writer.write_set(split, {key for wanted in needs.values() for key in wanted})
    # Every pass of this split runs the same timesteps, even for a chunk a killed run had partly
    # marked done: the batch composition, and so the float round-off, must match an uninterrupted run.
    steps = sorted({t for wanted in needs.values() for _, t in wanted})
    batches = chunk_batches(chunks, n, cs, images_per_pass(config.batch_size, len(steps)))
    size = plan.settings["preprocessing"]["size"]
    channels = plan.settings["preprocessing"]["channels"]
    workers = default_workers(device) if config.workers is None else config.workers
    loader = DataLoader(
        _NoisedImages(data, size, channels, steps, config.noise_seed, **plan.image_options(split)),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    abar = plan.model.alphas_cumprod()
    scale_x0 = [float(math.sqrt(abar[t])) for t in steps]
    scale_eps = [float(math.sqrt(1.0 - abar[t])) for t in steps]
    autocast = (
        torch.autocast(device.type, dtype=COMPUTE_DTYPES[config.precision])
        if config.precision != "fp32"
        else contextlib.nullcontext()
    )
    store_dtype = torch.float16 if config.dtype == "float16" else torch.float32
    pending: deque[Future] = deque()
    buffers: dict[tuple[int, int], np.ndarray] = {}
    records = np.zeros((n, 2), np.uint64)
    total = sum(len(b) for b in batches)
    bar = progress_bar(total=total, desc=f"extract {split}", unit="img", enabled=progress)
    with torch.inference_mode(), exact_fp32(device, config.precision), bar:
        for x0, eps, index, record, errors in loader:
            failed = [message for message in errors if message]
            if failed:
                raise DataError(failed[0])
            records[index.numpy()] = record.numpy().astype(np.uint64)
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
                pending.append(pool.submit(writer.write_chunk, split, chunk, arrays, write_set=write_set,
                                           files=records[rows]))
        while pending:
            pending.popleft().result()
