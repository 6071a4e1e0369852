"""Train the default pipeline's own small DDPM, and make its untrained twin.

`pretrain_ddpm` trains an ADM-shaped `UNet2DModel` (scale-shift norm, residual up/down-sampling,
attention at chosen levels; see `stages.models.unet_configs`) as a DDPM: linear 1000-step schedule,
epsilon prediction, MSE loss, AdamW. Only the train split's images are used; labels are not.
Epochs are the stopping rule (reproducible); `max_seconds` is an optional safety cap that makes a
run irreproducible when it fires, and the log says so.

Its untrained twin, the "same U-Net, no pretraining" baseline, is `stages.pretrain.random_init`.

It saves `save_pretrained` directories (`config.json`, weights, `scheduler_config.json`) that
`stages.models.loading.load_model` reads.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from cache.errors import ConfigError
from stages.data.errors import MissingDataError
from stages.data.folders import scan
from stages.data.images import image_channels, load_image
from stages.devices import resolve_device
from stages.models.loading import DEFAULT_SCHEDULE, weights_hash
from stages.models.unet_configs import adm_unet_config
from stages.outputs import check_output_dir, holds_only, staged_output
from stages.progress import progress_bar

GENERATOR = "pipeline pretrain"
MODEL_FILES = {"config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"}


def is_pretrain_output(out: Path) -> bool:
    """Whether `out` holds only what `pretrain_ddpm` writes."""
    try:
        log = json.loads((out / "train_log.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(log, dict) and "init_weights_sha256" in log and holds_only(out, MODEL_FILES | {"train_log.json"})


def load_train_images(data_dir: str | Path, image_size: int, split: str = "train") -> torch.Tensor:
    """Every image of `data_dir/<split>/<class>/*` as float32 (N, C, image_size, image_size) in [-1, 1].

    Preprocessed exactly as extraction preprocesses them (`stages.data.images.load_image`), so the DDPM
    trains on the images it is later probed with. Labels are not used. C is 1 when the first image is
    grayscale, else 3.
    """
    if not (Path(data_dir) / split).is_dir():
        raise MissingDataError(
            f"{Path(data_dir) / split}: no {split} split (expected {data_dir}/{split}/<class>/<image>)"
        )
    folder = scan(data_dir, [split])[split]
    paths = [folder.root / p for p in folder.paths]
    channels = image_channels(paths[0])
    return torch.stack([load_image(path, image_size, channels) for path in paths])


def ddpm_unet_config(
    *,
    image_size: int,
    in_channels: int,
    channels: tuple[int, ...],
    layers_per_block: int,
    attention_levels: tuple[int, ...],
    head_channels: int,
    resblock_updown: bool = True,
) -> dict:
    """An ADM-shaped `UNet2DModel` config: one level per entry of `channels`, attention at `attention_levels`.

    `resblock_updown` (ADM's default) resamples with residual blocks; False uses strided/nearest convolutions
    (about 13% fewer parameters at the default size).
    """
    if not channels:
        raise ConfigError("channels must name at least one level")
    if any(c < 32 or c % 32 for c in channels):
        raise ConfigError(
            f"channels {list(channels)}: every level needs a multiple of 32 (its group norms have 32 groups)"
        )
    bad = [level for level in attention_levels if not 0 <= level < len(channels)]
    if bad:
        raise ConfigError(f"attention_levels {bad} out of range for {len(channels)} levels")
    if image_size % 2 ** (len(channels) - 1):
        raise ConfigError(f"image_size {image_size} is not divisible by 2^{len(channels) - 1} ({len(channels)} levels)")
    config = adm_unet_config(
        image_size=image_size,
        num_channels=channels[0],
        channel_mult=(1,) * len(channels),
        num_res_blocks=layers_per_block,
        attention_resolutions=tuple(2**level for level in attention_levels),
        num_head_channels=head_channels,
        resblock_updown=resblock_updown,
        in_channels=in_channels,
        out_channels=in_channels,
    )
    config["block_out_channels"] = tuple(int(c) for c in channels)
    return config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrain_ddpm(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    image_size: int = 16,
    channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_levels: tuple[int, ...] = (1,),
    head_channels: int = 32,
    resblock_updown: bool = True,
    epochs: int = 16,
    max_seconds: float | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    device: str = "auto",
    log_every: int = 10,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train a DDPM on `data_dir/train` and save it to `out_dir`; return the training log.

    Deterministic for a given seed and device: the weights, the data order, the timesteps and the
    noise all come from `seed` (noise and timesteps are drawn on the CPU, so the sequence is the
    same on any device). `out_dir` gets `config.json`, the weights, `scheduler_config.json` and
    `train_log.json`.
    """
    check_output_dir(Path(out_dir), made_by=is_pretrain_output, command="pretrain", overwrite=overwrite)
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    images = load_train_images(data_dir, image_size)
    n = images.shape[0]
    config = ddpm_unet_config(
        image_size=image_size,
        in_channels=images.shape[1],
        channels=tuple(channels),
        layers_per_block=layers_per_block,
        attention_levels=tuple(attention_levels),
        head_channels=head_channels,
        resblock_updown=resblock_updown,
    )
    dev = resolve_device(device)

    seed_everything(seed)
    unet = UNet2DModel(**config)
    init_hash = weights_hash(unet)
    unet.to(dev).train()
    scheduler = DDPMScheduler(**DEFAULT_SCHEDULE, prediction_type="epsilon")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)  # data order, timesteps, noise
    data = images.to(dev)

    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = steps_per_epoch * epochs
    curve, window, epoch_losses = [], [], []
    step = seen = 0
    stopped_by = "epochs"
    train_started = time.perf_counter()
    bar = progress_bar(total=total_steps, desc="pretrain", unit="step", enabled=progress)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        epoch_sum, epoch_count = 0.0, 0
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            x0 = data[index.to(dev)]
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
            noise = torch.randn(x0.shape, generator=generator).to(dev)
            t = t.to(dev)
            xt = scheduler.add_noise(x0, noise, t)
            loss = F.mse_loss(unet(xt, t).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
            optimizer.step()

            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step}; try a lower lr")
            step += 1
            seen += len(index)
            window.append(value)
            epoch_sum += value * len(index)
            epoch_count += len(index)
            if step % log_every == 0 or step == total_steps:
                curve.append({"step": step, "epoch": epoch, "loss": float(np.mean(window))})
                window = []
            elapsed = time.perf_counter() - train_started
            bar.update(1)
            bar.set_postfix(
                epoch=epoch + 1, loss=f"{value:.4f}", img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False
            )
            if max_seconds is not None and elapsed > max_seconds:
                stopped_by = "max_seconds"
                break
        epoch_losses.append(epoch_sum / max(epoch_count, 1))
        if stopped_by != "epochs":
            break
    bar.close()
    if window:
        curve.append({"step": step, "epoch": len(epoch_losses) - 1, "loss": float(np.mean(window))})
    train_seconds = time.perf_counter() - train_started

    unet.eval().to("cpu")
    log = {
        "generator": GENERATOR,
        "seed": int(seed),
        "data_dir": str(data_dir),
        "train_images": int(n),
        "image_size": int(image_size),
        "epochs": len(epoch_losses),
        "epochs_requested": int(epochs),
        "steps": step,
        "stopped_by": stopped_by,
        "reproducible": stopped_by == "epochs",
        "batch_size": int(batch_size),
        "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": weight_decay, "grad_clip": grad_clip},
        "objective": "epsilon MSE, t uniform in [0, num_train_timesteps)",
        "final_loss": epoch_losses[-1],  # mean over the last epoch (less noisy than one batch)
        "epoch_losses": epoch_losses,
        "loss_curve": curve,
        "log_every": int(log_every),
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "images_seen": seen,
        "images_per_second": seen / max(train_seconds, 1e-9),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": _diffusers_version()},
        "parameters": sum(p.numel() for p in unet.parameters()),
        "init_weights_sha256": init_hash,
        "weights_sha256": weights_hash(unet),
        "config": json.loads(json.dumps(config)),
    }
    with staged_output(Path(out_dir)) as out:
        unet.save_pretrained(out)
        scheduler.save_pretrained(out)
        (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
