"""SDXL, SD3, FLUX.1, PixArt and Sana extraction overhead, side by side in one run (`bench/extract.py --model-kind`).

    python bench/extract.py --model-kind flux                          # CPU: FLUX's structure, narrow, 256 px
    python bench/extract.py --model-kind flux --full --device cuda     # FLUX.1-dev-sized random weights, 1024 px, bf16
    python bench/extract.py --model-kind sd3 --full --device cuda      # SD3-medium-sized
    python bench/extract.py --model-kind sana --full --device cuda     # Sana-1600M-sized (1.6B), 1024 px, bf16

The networks and VAEs are built from the published configs (bench/model_memory.py) with random weights,
in memory (a 12B FLUX is never written to disk); the text encoders have the real widths and one layer
(their depth does not change extraction: they run once, on the CPU). Prints the wall time of (v) VAE
encoding, (a) bare truncated forward passes to the deepest requested block on latents noised in memory
(the network cast to the precision, as extraction casts it), (b) extraction into a store, the ratio
(b) / ((v) + (a)), and on CUDA the peak GPU memory of (b) beside the --dry-run estimate.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.model_memory import build
from stages.data.folders import scan
from stages.data.images import load_image
from stages.extract import noise
from stages.extract.plan import ExtractConfig, make_plan
from stages.extract.run import COMPUTE_DTYPES, exact_fp32, run_extract

KINDS = {"sdxl": "sdxl", "sd3": "sd3-medium", "flux": "flux.1-dev", "pixart": "pixart-sigma-1024", "sana": "sana-1600m"}


def tokenizers(workdir: Path) -> dict:
    """A CLIP tokenizer (letters), a T5 tokenizer (Unigram over letters) and a Gemma tokenizer (BPE over letters),
    written here: nothing downloaded."""
    import json

    from transformers import AutoTokenizer, CLIPTokenizer, GemmaTokenizer, T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    clip = workdir / "clip"
    clip.mkdir(parents=True)
    (clip / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *letters])})
    )
    (clip / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(
        str(clip / "vocab.json"), str(clip / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    ).save_pretrained(clip)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), *((c, -2.0) for c in letters)]
    T5TokenizerFast(
        vocab=pieces, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0, model_max_length=512
    ).save_pretrained(workdir / "t5")
    GemmaTokenizer(
        vocab={t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁", *letters])},
        add_bos_token=True,
    ).save_pretrained(workdir / "gemma")
    return {
        "clip": AutoTokenizer.from_pretrained(clip),
        "t5": AutoTokenizer.from_pretrained(workdir / "t5"),
        "gemma": AutoTokenizer.from_pretrained(workdir / "gemma"),
    }


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
    workdir = Path(tempfile.mkdtemp(prefix="bench-transformer-"))
    try:
        torch.manual_seed(0)
        start = time.perf_counter()
        model = build(
            KINDS[kind],
            device=str(device) if full else "cpu",
            small=not full,
            text_layers=1,
            tokenizers=tokenizers(workdir),
        )
        if full:  # hashing 48 GB of random weights on the CPU would dominate; the store only needs a name
            model.__dict__["weights_sha256"] = f"random-init {KINDS[kind]} seed 0"
        built = time.perf_counter() - start
        table = model.block_table()
        lo, hi = max(1, len(table) // 3), max(1, 2 * len(table) // 3)  # the middle third (FLUX: double and single)
        blocks = tuple(range(lo, hi + 1))
        deepest = table[max(blocks) - 1]
        size = model.image_size
        rng = np.random.default_rng(0)
        for i in range(images):
            folder = workdir / "data" / "train" / f"c{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        data = workdir / "data"
        config = ExtractConfig(
            model=f"random-init {KINDS[kind]}",
            data=str(data),
            out=str(workdir / "f.zarr"),
            blocks=blocks,
            timesteps=tuple(timesteps),
            pools=(1, 2),
            splits=("train",),
            batch_size=batch,
            device=str(device),
            precision=precision,
        )
        plan = make_plan(config, model)  # encodes the prompt once and frees the text encoders
        params = sum(p.numel() for p in model.network.parameters()) / 1e9
        print(
            f"{kind} ({KINDS[kind]}{'' if full else ', narrow'}): {params:.2f}B parameters, {len(table)} blocks, "
            f"{size} px -> {model.latent_size}^2 x {model.latent_channels} latents; blocks {lo}-{hi}; "
            f"{images} images x {len(timesteps)} timesteps; batch {batch} rows; {device} {precision}; "
            f"built in {built:.0f} s"
        )
        estimate = model.memory_estimate(max(blocks), precision)
        print("\n".join(estimate.lines(batch, max(1, batch // len(timesteps)), precision)))
        model.prepare(device)
        if precision != "fp32":
            model.cast(COMPUTE_DTYPES[precision])
        split = scan(data, ["train"])["train"]
        x0 = torch.stack([load_image(data / p, size, 3) for p in split.paths])
        autocast = torch.autocast(device.type, dtype=COMPUTE_DTYPES[precision], enabled=precision != "fp32")
        per_pass = max(1, batch // len(timesteps))

        def vae() -> tuple[float, torch.Tensor]:
            sync(device)
            begin = time.perf_counter()
            with torch.inference_mode():
                z = torch.cat([model.encode(x0[s : s + per_pass].to(device)) for s in range(0, images, per_pass)])
            sync(device)
            return time.perf_counter() - begin, z.cpu()

        _, z0 = vae()  # warm-up
        zts = {}
        for t in timesteps:
            a, b = model.noise_scales(t)
            zts[t] = a * z0 + b * torch.stack([noise(0, i, t, z0.shape[1:]) for i in range(images)])

        def bare() -> float:
            with model.capture([deepest]) as capture:
                sync(device)
                begin = time.perf_counter()
                with torch.inference_mode(), autocast, exact_fp32(device, precision):
                    for t, zt in zts.items():
                        for s in range(0, images, per_pass):
                            z = zt[s : s + per_pass].to(device)
                            capture(z, torch.full((len(z),), t, device=device), {deepest.number: 1})
                sync(device)
            return time.perf_counter() - begin

        def extraction() -> float:
            shutil.rmtree(workdir / "f.zarr", ignore_errors=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            begin = time.perf_counter()
            run_extract(plan.config, progress=False, model=model)
            sync(device)
            return time.perf_counter() - begin

        runs = [(vae()[0], bare(), extraction()) for _ in range(repeats)]
        v, a, b = (min(column) for column in zip(*runs))
        n = images * len(timesteps)
        print(f"(v) VAE encoding, every image once           : {v:7.2f} s  {images / v:8.1f} img/s")
        print(f"(a) bare truncated forward to block {deepest.number:<3}      : {a:7.2f} s  {n / a:8.1f} img*t/s")
        print(f"(b) extract blocks {lo}-{hi} into a store         : {b:7.2f} s  {n / b:8.1f} img*t/s")
        print(f"ratio (b)/((v)+(a)) = {b / (v + a):.3f}   (target <= 1.10)")
        if device.type == "cuda":
            print(f"peak GPU memory of (b): {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
