"""Train the default pipeline's own small DDPM, and make its untrained twin.

`pretrain_ddpm` trains an ADM-shaped `UNet2DModel` (scale-shift norm, residual up/down-sampling,
attention at chosen levels; see `stages.models.unet_configs`) as a DDPM: linear 1000-step schedule,
epsilon prediction, MSE loss, AdamW. Only the train split's images are used; labels are not.
Epochs are the stopping rule (reproducible); `max_seconds` is an optional safety cap that makes a
run irreproducible when it fires, and the log says so.

`random_init_copy` saves a freshly initialised U-Net with exactly the same config and scheduler as
a trained one: the "same U-Net, no pretraining" baseline. With the seed of the training run it is
bit-for-bit the trained model's starting point (`init_weights_sha256` in both logs).

Both save `save_pretrained` directories (`config.json`, weights, `scheduler_config.json`) that
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
from PIL import Image

from stages.devices import resolve_device
from stages.models.loading import DEFAULT_SCHEDULE, load_model, weights_hash
from stages.models.unet_configs import adm_unet_config

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _load_train_images(data_dir: str | Path, image_size: int) -> torch.Tensor:
    """All images of `data_dir/train/<class>/*`, resized (bicubic), as float32 (N, C, H, W) in [-1, 1].

    Minimal on purpose (labels are not needed to train a DDPM); an ImageFolder-style reader in
    `stages.data.folders` can replace it. Grayscale data gives C=1, anything else is converted to RGB.
    """
    train = Path(data_dir) / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{train}: no train split (expected {data_dir}/train/<class>/<image>)")
    files = sorted(p for p in train.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{train}: no images in train/<class>/")
    with Image.open(files[0]) as first:
        mode = "L" if first.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    arrays = []
    for path in files:
        with Image.open(path) as image:
            image = image.convert(mode)
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BICUBIC)
            arrays.append(np.asarray(image, dtype=np.uint8))
    batch = np.stack(arrays)
    if batch.ndim == 3:
        batch = batch[:, None]
    else:
        batch = batch.transpose(0, 3, 1, 2)
    return torch.from_numpy(batch).float().div_(127.5).sub_(1.0)


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
        raise ValueError("channels must name at least one level")
    bad = [level for level in attention_levels if not 0 <= level < len(channels)]
    if bad:
        raise ValueError(f"attention_levels {bad} out of range for {len(channels)} levels")
    if image_size % 2 ** (len(channels) - 1):
        raise ValueError(f"image_size {image_size} is not divisible by 2^{len(channels) - 1} ({len(channels)} levels)")
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


def _seed_everything(seed: int) -> None:
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
) -> dict:
    """Train a DDPM on `data_dir/train` and save it to `out_dir`; return the training log.

    Deterministic for a given seed and device: the weights, the data order, the timesteps and the
    noise all come from `seed` (noise and timesteps are drawn on the CPU, so the sequence is the
    same on any device). `out_dir` gets `config.json`, the weights, `scheduler_config.json` and
    `train_log.json`.
    """
    from tqdm.auto import tqdm

    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    images = _load_train_images(data_dir, image_size)
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

    _seed_everything(seed)
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
    bar = tqdm(total=total_steps, desc="pretrain", unit="step", disable=not progress, dynamic_ncols=True)
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
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", img_s=f"{seen / max(elapsed, 1e-9):.0f}")
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

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet.eval().to("cpu")
    unet.save_pretrained(out)
    scheduler.save_pretrained(out)
    log = {
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
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def random_init_copy(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> dict:
    """Save a freshly initialised U-Net with `model_dir`'s exact config and scheduler to `out_dir`.

    Initialised as `pretrain_ddpm` initialises (seed, then construct), so with the training seed
    the weights equal the trained model's starting point. Writes `random_init.json` and returns it.
    """
    out = Path(out_dir)
    if out.resolve() == Path(model_dir).resolve():
        raise ValueError(f"{out_dir}: the random-init copy must not overwrite the model it copies")
    loaded = load_model(model_dir)
    _seed_everything(seed)
    unet = UNet2DModel.from_config(loaded.unet.config).eval()
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out)
    loaded.scheduler.save_pretrained(out)
    record = {
        "seed": int(seed),
        "config_from": str(model_dir),
        "config_from_weights_sha256": weights_hash(loaded.unet),
        "weights_sha256": weights_hash(unet),
        "parameters": sum(p.numel() for p in unet.parameters()),
    }
    (out / "random_init.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
