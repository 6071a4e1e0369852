"""The extraction run: one forward pass per batch (all timesteps at once) into the feature store.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   eps = noise(seed, index, t, shape)   (stages.extract.noising)
    (rectified flow: x_t = (1 - sigma_t) z0 + sigma_t eps; each model's FeatureModel.noise_scales)

Work is organised by the store's shards: every batch lies inside one sample chunk, and a shard's
arrays are handed to a background writer as soon as the shard is complete, so the forward passes
never wait on compression or storage. A rerun computes only the (shard, block, timestep) triples
that are not marked done, and, because batches never cross chunks, recomputes them with exactly the
batches an uninterrupted run would have used, whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache import FeatureStoreWriter, layout
from cache.errors import ConfigError, DataChangedError, UserError
from cache.writer import SplitIndex
from stages.data.augment import view_generator
from stages.data.errors import DataError
from stages.data.folders import ImageFolderSplit, changed_images
from stages.devices import resolve_device
from stages.extract.distributed import JobError, join_job, peer_loss_is_one_line, share_of
from stages.extract.noising import noise
from stages.extract.plan import ExtractConfig, Plan, chunk_batches, images_per_pass, make_plan, package_version, recipe
from stages.models.feature_model import FeatureModel
from stages.progress import progress_bar

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _NoisedImages(Dataset):
    """(x0 (C, H, W), eps (T, K, *noise_shape), index, (content hash, mtime), error) per sample; runs in
    DataLoader workers. `read` are read_image's arguments (the model's image_options), K the noise draws
    (eps is empty for a model without noise). An unreadable image comes back as its error message (and
    zeros), so that the main process raises it as a plain DataError rather than a worker's traceback."""

    def __init__(
        self,
        split: ImageFolderSplit,
        read: dict,
        timesteps: list[int],
        seed: int,
        noise_shape: tuple[int, ...] | None,
        draws: int = 1,
        *,
        view: int = 0,
        augment=None,
    ):
        self.split, self.read, self.timesteps, self.seed = split, read, timesteps, seed
        self.noise_shape, self.draws = noise_shape, draws
        self.view, self.augment = view, augment  # Plan.image_options

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, index: int):
        # view >= 1: an augmented view, its draws a pure function of (seed, index, view) (stages.data.augment)
        rng = view_generator(self.seed, index, self.view) if self.view else None
        try:
            x0, record = self.split.read(index, **self.read, augment=self.augment, rng=rng)
            error = ""
        except DataError as failure:
            size = self.read["size"]
            x0, record, error = torch.zeros(self.read["channels"], size, size), (0, 0), str(failure)
        if self.noise_shape is None:
            eps = torch.zeros(0)
        else:
            eps = torch.stack(
                [
                    torch.stack(
                        [noise(self.seed, index, t, self.noise_shape, self.view, draw=k) for k in range(self.draws)]
                    )
                    for t in self.timesteps
                ]
            )
        return x0, eps, index, torch.tensor(record, dtype=torch.int64), error


# DataLoader workers one GPU needs (docs/data.md, bench/decode.py): an H200 running ADM-256 to block 30 in
# bf16 at half its peak takes 537 images/s at one timestep; one core makes 200-220 samples/s (JPEG decode,
# bicubic resize, the noise) from files, tar shards or parquet alike: 3 cores, and one to spare.
WORKERS_PER_GPU = 4


def default_workers(device: torch.device) -> int:
    """0 on the CPU (the forward is the bottleneck there); on CUDA `WORKERS_PER_GPU`, or fewer where this
    process's share of the cores (its affinity over the local ranks, one core kept for itself) is smaller."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(WORKERS_PER_GPU, share - 1))


def run_extract(config: ExtractConfig, *, progress: bool = True, model: FeatureModel | None = None) -> Plan:
    """Extract every requested (block, timestep) of every split into `config.out`; resumable.

    Under torchrun every rank runs this: rank 0 opens the store and shares the pending shards, and
    each rank computes and writes its share of them (`stages.extract.distributed`)."""
    with join_job() as job, peer_loss_is_one_line(job):
        plan = make_plan(config, model)
        config = plan.config  # the model's default timesteps filled in
        device = resolve_device(job.device_name(config.device))
        if config.precision == "fp16" and device.type != "cuda":
            raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        new_store = job.is_main and not set(plan.location.children()) - {layout.LEASE}
        writer, work = _open_store(plan, job)
        try:
            plan.model.prepare(device)
            if config.precision != "fp32":
                plan.model.cast(COMPUTE_DTYPES[config.precision])  # a no-op but for the kinds sized for today's models
            writer_thread = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
            with plan.model.capture(plan.blocks) as capture, writer_thread as pool:
                for split in plan.splits:
                    _extract_split(plan, split, work[split], writer, capture, pool, device, progress, job)
            job.barrier()  # the store stays held until every rank has written its shards
        except DataError:
            writer.close()
            if new_store:
                _remove_new_store(plan.location)
            raise
        finally:
            writer.close()
    return plan


def _remove_new_store(location) -> None:
    # A bad image stops the run that created the store. The data set's identity (file sizes) changes when the
    # image is replaced or removed, so the store it began could only be refused by the rerun: removed instead,
    # the same command starts afresh once the data is fixed.
    log.warning("%s: removed the store this run had begun; it starts afresh once the data set is fixed", location)
    for child in location.children():  # the location itself (a directory the user made) stays
        location.delete(child)


def _open_store(plan: Plan, job) -> tuple[FeatureStoreWriter, dict]:
    """Rank 0 opens (creates, repairs) the store and tells every rank the pending work, or the error."""
    config = plan.config
    fingerprint = json.dumps(plan.settings, sort_keys=True, default=str)
    outcome, writer = None, None
    if job.is_main:
        try:
            writer = _open_writer(plan)
            outcome = {
                "work": {split: _pending_work(plan, writer, split) for split in plan.splits},
                "settings": fingerprint,
            }
        except UserError as error:
            outcome = {"error": str(error)}
            if writer is not None:
                writer.close()
            job.share(outcome)
            raise
        except BaseException:
            if writer is not None:
                writer.close()
            job.share({"error": f"rank 0 stopped with an unexpected error; see its log ({config.out})"})
            raise
    outcome = job.share(outcome)
    if "error" in outcome:
        raise JobError(outcome["error"])
    if not job.is_main:
        if outcome["settings"] != fingerprint:
            raise JobError(
                f"rank {job.rank} sees another model, data set or settings than rank 0 (e.g. a data "
                "folder that differs between nodes): every rank must see the same files"
            )
        writer = FeatureStoreWriter.attach(plan.location)
    return writer, outcome["work"]


def _open_writer(plan: Plan) -> FeatureStoreWriter:
    config = plan.config
    splits = {name: SplitIndex(s.labels, s.paths) for name, s in plan.splits.items()}
    writer = FeatureStoreWriter.open(
        plan.location,
        settings=plan.settings,
        splits=splits,
        block_table=[block.as_dict() for block in plan.table],
        grids=plan.grids,
        overwrite=config.overwrite,
        verify=config.verify,
        recipe=recipe(config, plan.chunk_samples, plan.shard_samples),
    )
    try:
        for name, folder in plan.splits.items():
            check_images_unchanged(writer, name, folder)
        writer.add_arrays(plan.grids, list(config.timesteps), list(config.pools))
        writer.update_info(
            model_source=str(config.model),
            data_root=str(next(iter(plan.splits.values())).root.resolve()),
            noise=noise_record(plan.model, config.ensemble),
            package_version=package_version(),
        )
    except BaseException:
        writer.close()
        raise
    return writer


def _pending_work(plan: Plan, writer: FeatureStoreWriter, split: str) -> dict:
    """{"needs": {shard: [(block, timestep), ...]}, "steps": [...], "write_set": path} of one split."""
    needs: dict[int, set[tuple[int, int]]] = {}
    for block in plan.blocks:
        for t in plan.config.timesteps:
            for shard in writer.pending_shards(split, block.number, t):
                needs.setdefault(shard, set()).add((block.number, t))
    if not needs:
        return {"needs": {}, "steps": [], "write_set": None}
    # The arrays this run computes complete their shards together, with one flag each (cache.layout).
    write_set = writer.write_set(split, {key for wanted in needs.values() for key in wanted})
    # Every pass of this split runs the same timesteps, even for a shard a killed run had partly
    # marked done: the batch composition, and so the float round-off, must match an uninterrupted run.
    steps = sorted({t for wanted in needs.values() for _, t in wanted})
    return {"needs": {k: sorted(v) for k, v in needs.items()}, "steps": steps, "write_set": write_set}


def noise_record(model: FeatureModel, draws: int) -> dict:
    """What the store's info says about the noise (the settings hold what decides it)."""
    if not model.diffusion:
        return {"formula": "none: not a diffusion model; features are stored under the marker timestep 0"}
    record = {"formula": model.noise_formula(), "eps": "stages.extract.noise(seed, index, t, shape)"}
    if draws > 1:
        record["ensemble"] = (
            f"the mean feature over draws k = 0..{draws - 1}, "
            "eps_k = stages.extract.noise(seed, index, t, shape, draw=k)"
        )
    return record


def check_images_unchanged(writer: FeatureStoreWriter, split: str, folder: ImageFolderSplit) -> None:
    """Refuse a store whose images changed in place since their features were computed (same size, other
    content: the data set's identity cannot see it); images only touched get their new mtime recorded."""
    records = writer.file_records(split)
    changed, touched, updated = changed_images(folder, records)
    if changed:
        raise DataChangedError(
            f"{len(changed)} image(s) of {split} changed since the store's features were computed from them (same "
            f"size, other content): {', '.join(folder.paths[i] for i in changed[:5])}"
            f"{' ...' if len(changed) > 5 else ''}."  # the remedy's advice follows (pipeline.advice)
        )
    if touched:
        writer.update_file_records(split, np.asarray(touched), updated)


def exact_fp32(device: torch.device, precision: str):
    """fp32 means fp32 on a GPU too: cuDNN would otherwise run convolutions in TF32 (10-bit mantissa),
    and the store would no longer equal a float32 forward pass. bf16 is the fast setting."""
    if device.type != "cuda" or precision != "fp32":
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
    )


def _extract_split(plan, split, work, writer, capture, pool, device, progress, job) -> None:
    config = plan.config
    data = plan.splits[split]
    n, cs, ss = len(data.paths), plan.chunk_samples, plan.shard_samples
    if not work["needs"]:
        log.info("%s: nothing to do, every requested shard is done", split)
        return
    needs = {int(shard): {tuple(key) for key in keys} for shard, keys in work["needs"].items()}
    steps, write_set = work["steps"], work["write_set"]
    if not job.is_main:
        writer.reload_write_sets()  # rank 0 may have made the set just now
    mine = share_of(sorted(needs), job)
    per_shard = ss // cs
    num_chunks = layout.num_chunks(n, cs)
    chunks = [c for shard in mine for c in range(shard * per_shard, min((shard + 1) * per_shard, num_chunks))]
    batches = chunk_batches(chunks, n, cs, images_per_pass(config.batch_size, len(steps)))
    everyone = sum(writer.shard_rows(split, shard).stop - writer.shard_rows(split, shard).start for shard in needs)
    model: FeatureModel = plan.model
    draws = config.ensemble
    options = plan.image_options(split)  # the preprocessing, and a view's augmentation
    workers = default_workers(device) if config.workers is None else config.workers
    loader = DataLoader(
        _NoisedImages(
            data,
            {**model.image_options(), "method": options["method"], "draft": options["draft"]},
            steps,
            config.noise_seed,
            model.noise_shape(),
            draws,
            view=options["view"],
            augment=options["augment"],
        ),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    if model.diffusion:  # x_t = a x0 + b eps, the model's own noising (FeatureModel.noise_scales)
        scale_x0, scale_eps = (list(column) for column in zip(*(model.noise_scales(t) for t in steps)))
    labels = torch.as_tensor(data.labels, dtype=torch.int64)
    autocast = (
        torch.autocast(device.type, dtype=COMPUTE_DTYPES[config.precision])
        if config.precision != "fp32"
        else contextlib.nullcontext()
    )
    store_dtype = torch.float16 if config.dtype == "float16" else torch.float32
    pending: deque[Future] = deque()
    buffers: dict[tuple[int, int], np.ndarray] = {}
    records = np.zeros((n, 2), np.uint64)
    # Rank 0's bar counts every rank's images: the whole job's throughput.
    bar = progress_bar(total=everyone, desc=f"extract {split}", unit="img", enabled=progress and job.is_main)
    with torch.inference_mode(), exact_fp32(device, config.precision), bar:
        for x0, eps, index, record, errors in loader:
            failed = [message for message in errors if message]
            if failed:
                raise DataError(failed[0])
            records[index.numpy()] = record.numpy().astype(np.uint64)
            shard = int(index[0]) // ss
            wanted = needs[shard]
            grids = {b: plan.grids[b] for b in sorted({b for b, _ in wanted})}
            x0 = x0.to(device, non_blocking=True)
            eps = eps.to(device, non_blocking=True)
            z0 = model.encode(x0)  # x0 itself for a pixel U-Net; VAE latents; a backbone's normalised input
            tt = torch.tensor(steps, device=device).repeat_interleave(x0.shape[0])
            # the class of each row (a prompt template's class name), timestep-major like the rows
            yy = labels[index].repeat(len(steps)).to(device)
            features = {}
            for k in range(draws):
                if model.diffusion:
                    # (T*B, C, H, W): timestep-major, so rows [i*B:(i+1)*B] belong to steps[i].
                    xt = torch.cat([scale_x0[i] * z0 + scale_eps[i] * eps[:, i, k] for i in range(len(steps))])
                else:
                    xt = z0
                if device.type == "cuda" and xt.dim() == 4:
                    xt = xt.contiguous(memory_format=torch.channels_last)
                with autocast:
                    draw = capture(xt, tt, grids, labels=yy)
                features = draw if k == 0 else {b: features[b] + draw[b] for b in draw}
            if draws > 1:
                features = {b: f / draws for b, f in features.items()}
            rows = writer.shard_rows(split, shard)
            offset = int(index[0]) - rows.start
            batch = x0.shape[0]
            host = {b: f.to(store_dtype).cpu().numpy() for b, f in features.items()}
            for b, t in wanted:
                target = buffers.get((b, t))
                if target is None:
                    target = buffers[(b, t)] = np.empty((rows.stop - rows.start, *host[b].shape[1:]), host[b].dtype)
                i = steps.index(t)
                target[offset : offset + batch] = host[b][i * batch : (i + 1) * batch]
            _advance(bar, job, split, batch)
            if offset + batch == rows.stop - rows.start:
                arrays = {key: buffers.pop(key) for key in list(wanted)}
                while len(pending) >= 1:  # bound the memory: one shard filling, one being written
                    pending.popleft().result()
                pending.append(
                    pool.submit(writer.write_shard, split, shard, arrays, write_set=write_set, files=records[rows])
                )
        while pending:
            pending.popleft().result()
        while job.is_main and job.distributed and bar.n < everyone:  # the other ranks' last shards
            time.sleep(0.5)
            _advance(bar, job, split, 0)


def _advance(bar, job, split: str, images: int) -> None:
    """Count this rank's images; rank 0's bar shows the job's total."""
    total = job.count(split, images)
    if not job.distributed:
        bar.update(images)
    elif job.is_main:
        bar.update(total - bar.n)
