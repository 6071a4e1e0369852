"""Extraction overhead, measured side by side in one run on the same model and images.

    python bench/extract.py                          # CPU: ADM-shaped 32 px model, 3 timesteps
    python bench/extract.py --device cuda --adm256   # GPU: ADM-256-sized random weights, blocks 18-30
    python bench/extract.py --nproc 2                # 1 process against 2 (torchrun), and the store's objects
    python bench/extract.py --model-kind sd|dit      # latent models (bench/extract_latent.py;
                                                     # --full: SD-2.1 / DiT-XL/2 sizes)
    python bench/extract.py --model-kind sdxl|sd3|flux|pixart|sana   # bench/extract_transformers.py (--full: real
                                                                     # sizes)

CPU mode prints wall time of (a) bare full forward passes, one per timestep, on tensors already in
memory; (b) extraction of every block at those timesteps into a store (decoding, noise, hooks,
pooling, compression and writes included); (c) extraction of blocks up to the middle of the network;
and the ratios (b)/(a), (c)/(a). CUDA mode prints images per second for the bare forward to block 30
at fp32 and bf16 and for extracting blocks 18-30 at 3 timesteps at each precision.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.data.folders import scan  # noqa: E402
from stages.data.images import load_image  # noqa: E402
from stages.extract import noise  # noqa: E402
from stages.extract.plan import ExtractConfig  # noqa: E402
from stages.extract.run import COMPUTE_DTYPES, exact_fp32, run_extract  # noqa: E402
from stages.models.blocks import block_table  # noqa: E402
from stages.models.capture import BlockCapture  # noqa: E402
from stages.models.loading import load_model  # noqa: E402
from stages.models.unet_configs import adm_unet_config  # noqa: E402

ADM256 = dict(
    image_size=256,
    num_channels=256,
    channel_mult=(1, 1, 2, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(8, 16, 32),
    num_head_channels=64,
    out_channels=6,
)
SMALL = dict(
    image_size=32,
    num_channels=64,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(2, 4),
    num_head_channels=32,
    out_channels=6,
)


def build(workdir: Path, images: int, adm256: bool) -> tuple[Path, Path]:
    config = adm_unet_config(**(ADM256 if adm256 else SMALL))
    torch.manual_seed(0)
    unet = UNet2DModel(**config)
    model_dir = workdir / "model"
    unet.save_pretrained(model_dir)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    size = config["sample_size"]
    for split, count in (("train", images),):
        for i in range(count):
            folder = workdir / "data" / split / f"c{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return model_dir, workdir / "data"


def inputs(model_dir: Path, data: Path, timesteps: list[int]):
    unet = UNet2DModel.from_pretrained(model_dir, low_cpu_mem_usage=False).eval()
    split = scan(data, ["train"])["train"]
    x0 = torch.stack([load_image(data / p, unet.config.sample_size, 3) for p in split.paths])
    abar = DDPMScheduler.from_pretrained(model_dir).alphas_cumprod
    xts = {
        t: abar[t].sqrt() * x0
        + (1 - abar[t]).sqrt() * torch.stack([noise(0, i, t, x0.shape[1:]) for i in range(len(x0))])
        for t in timesteps
    }
    return unet, xts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare(unet, xts, batch: int, device, precision="fp32", stop_block=None) -> float:
    """Seconds for forward passes over every image at every timestep, batch by batch."""
    unet = unet.to(device)
    if device.type == "cuda":  # the same layout the extraction stage uses
        unet = unet.to(memory_format=torch.channels_last)
    capture = None
    if stop_block is not None:
        block = block_table(unet)[stop_block - 1]
        capture = BlockCapture(unet, [block])
    autocast = torch.autocast(device.type, dtype=COMPUTE_DTYPES[precision], enabled=precision != "fp32")
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast, exact_fp32(device, precision):  # as the extraction stage runs
        for t, xt in xts.items():
            for s in range(0, len(xt), batch):
                x = xt[s : s + batch].to(device, non_blocking=True)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                tt = torch.full((len(x),), t, device=device)
                if capture is None:
                    unet(x, tt)
                else:
                    capture(x, tt, {stop_block: block.resolution})
    sync(device)
    if capture is not None:
        capture.close()
    return time.perf_counter() - start


def extraction(model, data, out, blocks, timesteps, batch, device, precision="fp32", workers=None) -> float:
    """Seconds for `pipeline extract` on an already loaded model (loading and hashing it once is not per image)."""
    shutil.rmtree(out, ignore_errors=True)
    config = ExtractConfig(
        model=model.source,
        data=str(data),
        out=str(out),
        blocks=blocks,
        timesteps=tuple(timesteps),
        pools=(1, 2, 4),
        splits=("train",),
        batch_size=batch,
        device=str(device),
        precision=precision,
        workers=workers,
    )
    start = time.perf_counter()
    run_extract(config, progress=False, model=model)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--adm256", action="store_true", help="ADM-256-sized random weights (554M parameters)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--timesteps", default="10,90,150")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each measurement")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="compare 1 process with N under torchrun, and count the store's objects (bench/extract_scale.py)",
    )
    parser.add_argument(
        "--model-kind",
        choices=("unet", "sd", "dit", "sdxl", "sd3", "flux", "pixart", "sana"),
        default="unet",
        help="sd, dit: a latent model (bench/extract_latent.py); sdxl, sd3, flux, pixart, sana: "
        "bench/extract_transformers.py; VAE encoding timed separately",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="with --model-kind: SD-2.1-, DiT-XL/2-, SDXL-, SD3-medium-, FLUX.1-dev-, "
        "PixArt-Sigma- or Sana-1600M-sized random weights",
    )
    parser.add_argument("--precision", default=None, help="with --model-kind [default: bf16 on cuda, fp32 on cpu]")
    args = parser.parse_args()
    device = torch.device(args.device)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    if args.model_kind != "unet":
        if args.model_kind in ("sd", "dit"):
            from bench.extract_latent import run
        else:
            from bench.extract_transformers import run

        run(
            args.model_kind,
            full=args.full,
            device=device,
            images=args.images or (128 if device.type == "cuda" else 32),
            batch=args.batch_size or (32 if device.type == "cuda" else 8),
            timesteps=timesteps,
            precision=args.precision or ("bf16" if device.type == "cuda" else "fp32"),
            repeats=args.repeats,
        )
        return
    images = args.images or (256 if device.type == "cuda" else 384)
    batch = args.batch_size or 32
    workdir = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        model_dir, data = build(workdir, images, args.adm256)
        unet, xts = inputs(model_dir, data, timesteps)
        loaded = load_model(model_dir)
        loaded.unet = unet
        table = block_table(unet)
        if args.nproc:
            from extract_scale import compare

            print(
                f"model: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, {len(table)} blocks; "
                f"{images} images x {len(timesteps)} timesteps; {device}"
            )
            compare(
                model_dir,
                data,
                workdir,
                nproc=args.nproc,
                images=images,
                timesteps=timesteps,
                batch=batch,
                device=str(device),
            )
            return
        middle = next(b.number for b in table if b.module == "mid_block")
        print(
            f"model: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, {len(table)} blocks, "
            f"{unet.config.sample_size}px; {images} images x {len(timesteps)} timesteps; batch {batch}; {device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        )
        store = workdir / "features.zarr"
        if device.type == "cpu":
            bare(unet, {timesteps[0]: xts[timesteps[0]][:batch]}, batch, device)  # warm-up
            # Interleaved repeats, best of each: drift in machine load hits all three alike.
            runs = [
                (
                    bare(unet, xts, batch, device),
                    extraction(loaded, data, store, None, timesteps, batch, device),
                    extraction(loaded, data, store, tuple(range(1, middle + 1)), timesteps, batch, device),
                )
                for _ in range(args.repeats)
            ]
            a, b, c = (min(column) for column in zip(*runs))
            n = images * len(timesteps)
            print(f"(a) bare full forward, one pass per timestep : {a:7.2f} s  {n / a:8.1f} img*t/s")
            print(f"(b) extract all {len(table)} blocks into a store   : {b:7.2f} s  {n / b:8.1f} img*t/s")
            print(f"(c) extract blocks 1-{middle} (to the middle)    : {c:7.2f} s  {n / c:8.1f} img*t/s")
            print(f"ratio (b)/(a) = {b / a:.3f}   (target <= 1.10)")
            print(f"ratio (c)/(a) = {c / a:.3f}   (target well under 1)")
        else:
            last = min(30, len(table))
            first = max(1, last - 12)
            for precision in ("bf16", "fp32"):  # the fast setting first, in case a time limit cuts the run
                bare(unet, {timesteps[0]: xts[timesteps[0]][:batch]}, batch, device, precision, last)
                runs = [
                    (
                        bare(unet, xts, batch, device, precision, last),
                        extraction(
                            loaded, data, store, tuple(range(first, last + 1)), timesteps, batch, device, precision
                        ),
                    )
                    for _ in range(args.repeats)
                ]
                a, b = (min(column) for column in zip(*runs))
                n = images * len(timesteps)
                label = precision + (" (no TF32)" if precision == "fp32" else "")
                print(
                    f"{label}: bare forward to block {last}: {n / a:8.1f} img*t/s | extract blocks {first}-{last} "
                    f"x {len(timesteps)} timesteps into a store: {n / b:8.1f} img*t/s | ratio {b / a:.3f} "
                    "(target <= 1.10)"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
