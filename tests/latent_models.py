"""Tiny random Stable Diffusion and DiT pipeline directories for the tests (nothing is downloaded).

Each component is built from a small config, every weight given a value (zero-initialised output
layers would hide mapping errors), and saved with `save_pretrained` as a diffusers pipeline would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, PNDMScheduler, UNet2DConditionModel

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _fill(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module


def tiny_vae(seed: int = 1) -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    _fill(vae, seed)
    vae.register_to_config(scaling_factor=0.5)
    return vae


def tiny_sd_unet(seed: int = 0, **changes) -> UNet2DConditionModel:
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return _fill(UNet2DConditionModel(**{**config, **changes}), seed)


def write_tokenizer(directory: Path, max_length: int = 24) -> Path:
    """A CLIPTokenizer from a small vocabulary and merges file: the letters, as word pieces and word ends."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(directory)
    return directory


def tiny_text_encoder(vocab_size: int, seed: int = 2, max_length: int = 24):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return _fill(CLIPTextModel(config).eval(), seed, std=0.2)


def make_sd_dir(path: Path, *, unet: UNet2DConditionModel | None = None, skip: tuple[str, ...] = ()) -> Path:
    """unet/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json, as StableDiffusionPipeline saves
    them."""
    parts = {
        "unet": unet or tiny_sd_unet(),
        "vae": tiny_vae(),
        "scheduler": PNDMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
        ),
    }
    for name, part in parts.items():
        if name not in skip:
            part.save_pretrained(path / name)
    if "tokenizer" not in skip:
        write_tokenizer(path / "tokenizer")
    if "text_encoder" not in skip:
        tiny_text_encoder(2 + 2 * len(LETTERS)).save_pretrained(path / "text_encoder")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def tiny_dit(seed: int = 3) -> DiTTransformer2DModel:
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=5,
        norm_num_groups=4,
    )
    return _fill(dit, seed)


def make_dit_dir(path: Path) -> Path:
    tiny_dit().save_pretrained(path / "transformer")
    tiny_vae().save_pretrained(path / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    index = {
        "_class_name": "DiTPipeline",
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index))
    return path
