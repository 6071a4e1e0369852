"""Latent models' extraction overhead, side by side in one run (`bench/extract.py --model-kind sd|dit`).

    python bench/extract.py --model-kind sd                          # CPU: a small SD-shaped pipeline
    python bench/extract.py --model-kind dit
    python bench/extract.py --model-kind sd --full --device cuda     # SD-2.1-sized random weights, 768 px, bf16

Prints the wall time of (v) VAE encoding of every image (float32, the posterior mean), (a) bare
truncated forward passes to the deepest requested block on latents already noised in memory, one
pass per timestep, and (b) extraction of the requested blocks into a store (decoding, VAE, noise,
hooks, pooling, compression and writes included), then (b) / ((v) + (a)).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel
from PIL import Image

from stages.data.folders import scan
from stages.data.images import load_image
from stages.extract import noise
from stages.extract.plan import ExtractConfig
from stages.extract.run import COMPUTE_DTYPES, exact_fp32, run_extract
from stages.models.kinds import load_feature_model

SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
SIZES = {
    # SD 2.1 (stabilityai/stable-diffusion-2-1, 768 px) and its VAE; the text encoder has SD 2.1's width, one layer
    ("sd", True): dict(
        unet=dict(
            sample_size=96,
            block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            layers_per_block=2,
            down_block_types=SD_DOWN,
            up_block_types=SD_UP,
        ),
        vae=(128, 256, 512, 512),
        text=1024,
        blocks="13-19",
    ),
    ("sd", False): dict(
        unet=dict(
            sample_size=16,
            block_out_channels=(32, 64, 64, 64),
            attention_head_dim=8,
            cross_attention_dim=64,
            layers_per_block=2,
            down_block_types=SD_DOWN,
            up_block_types=SD_UP,
        ),
        vae=(32, 32, 64, 64),
        text=64,
        blocks="13-19",
    ),
    # DiT-XL/2-256
    ("dit", True): dict(
        dit=dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32),
        vae=(128, 256, 512, 512),
        blocks="1-15",
    ),
    ("dit", False): dict(
        dit=dict(num_attention_heads=4, attention_head_dim=16, num_layers=8, sample_size=16),
        vae=(32, 32, 64, 64),
        blocks="1-5",
    ),
}


def build(workdir: Path, kind: str, full: bool, images: int) -> tuple[Path, Path, str]:
    sizes = SIZES[(kind, full)]
    torch.manual_seed(0)
    pipe = workdir / "pipe"
    vae = AutoencoderKL(
        block_out_channels=sizes["vae"],
        layers_per_block=2,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(pipe / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(pipe / "scheduler")
    if kind == "sd":
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        unet = UNet2DConditionModel(**sizes["unet"])
        unet.save_pretrained(pipe / "unet")
        tokens = ["<|startoftext|>", "<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz"]
        (pipe / "tokenizer").mkdir(parents=True)
        (pipe / "tokenizer" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (pipe / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(
            str(pipe / "tokenizer" / "vocab.json"),
            str(pipe / "tokenizer" / "merges.txt"),
            pad_token="<|endoftext|>",
            model_max_length=77,
        ).save_pretrained(pipe / "tokenizer")
        CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokens),
                hidden_size=sizes["text"],
                num_hidden_layers=1,
                num_attention_heads=8,
                intermediate_size=4 * sizes["text"],
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        ).save_pretrained(pipe / "text_encoder")
        latent = sizes["unet"]["sample_size"]
        (pipe / "model_index.json").write_text(
            json.dumps({"_class_name": "StableDiffusionPipeline", "text_encoder": []})
        )
    else:
        dit = DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2, **sizes["dit"])
        dit.save_pretrained(pipe / "transformer")
        latent = sizes["dit"]["sample_size"]
        (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": []}))
    size = latent * 8
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = workdir / "data" / "train" / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return pipe, workdir / "data", sizes["blocks"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(
    kind: str,
    *,
    full: bool,
    device: torch.device,
    images: int,
    batch: int,
    timesteps: list[int],
    precision: str,
    repeats: int,
) -> None:
    from pipeline.options import parse_block_spec

    workdir = Path(tempfile.mkdtemp(prefix="bench-latent-"))
    try:
        pipe, data, spec = build(workdir, kind, full, images)
        blocks = tuple(parse_block_spec(spec))
        model = load_feature_model(str(pipe))
        model.prepare(device)
        model.identity()  # hashing the weights is once per model, not per image: outside the timings
        table = model.block_table()
        deepest = table[max(blocks) - 1]
        split = scan(data, ["train"])["train"]
        x0 = torch.stack([load_image(data / p, model.image_size, 3) for p in split.paths])
        abar = model.alphas_cumprod()
        autocast = torch.autocast(device.type, dtype=COMPUTE_DTYPES[precision], enabled=precision != "fp32")
        params = sum(p.numel() for p in model.network.parameters()) / 1e6
        print(
            f"{kind}: {params:.0f}M parameters, {len(table)} blocks, {model.image_size} px -> {model.latent_size}^2 "
            f"latents; blocks {spec}; {images} images x {len(timesteps)} timesteps; batch {batch} rows; {device} "
            f"{precision}"
        )

        def vae() -> tuple[float, torch.Tensor]:
            sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                z = torch.cat([model.encode(x0[s : s + batch].to(device)) for s in range(0, images, batch)])
            sync(device)
            return time.perf_counter() - start, z

        _, z0 = vae()  # warm-up
        z0 = z0.cpu()
        zts = {
            t: (
                abar[t].sqrt() * z0
                + (1 - abar[t]).sqrt() * torch.stack([noise(0, i, t, z0.shape[1:]) for i in range(images)])
            ).float()
            for t in timesteps
        }

        def bare() -> float:
            per_pass = max(1, batch // len(timesteps))
            with model.capture([deepest]) as capture:
                sync(device)
                start = time.perf_counter()
                with torch.inference_mode(), autocast, exact_fp32(device, precision):
                    for t, zt in zts.items():
                        for s in range(0, images, per_pass):
                            z = zt[s : s + per_pass].to(device)
                            labels = torch.zeros(len(z), dtype=torch.long, device=device)
                            capture(z, torch.full((len(z),), t, device=device), {deepest.number: 1}, labels=labels)
                sync(device)
            return time.perf_counter() - start

        def extraction() -> float:
            out = workdir / "features.zarr"
            shutil.rmtree(out, ignore_errors=True)
            config = ExtractConfig(
                model=str(pipe),
                data=str(data),
                out=str(out),
                blocks=blocks,
                timesteps=tuple(timesteps),
                pools=(1, 2),
                splits=("train",),
                batch_size=batch,
                device=str(device),
                precision=precision,
            )
            sync(device)
            start = time.perf_counter()
            run_extract(config, progress=False, model=model)
            sync(device)
            return time.perf_counter() - start

        runs = [(vae()[0], bare(), extraction()) for _ in range(repeats)]
        v, a, b = (min(column) for column in zip(*runs))
        n = images * len(timesteps)
        print(f"(v) VAE encoding, every image once           : {v:7.2f} s  {images / v:8.1f} img/s")
        print(f"(a) bare truncated forward to block {deepest.number:<3}      : {a:7.2f} s  {n / a:8.1f} img*t/s")
        print(f"(b) extract blocks {spec} into a store        : {b:7.2f} s  {n / b:8.1f} img*t/s")
        print(f"ratio (b)/((v)+(a)) = {b / (v + a):.3f}   (target <= 1.10)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
