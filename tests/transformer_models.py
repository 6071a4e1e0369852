"""Tiny random SDXL, SD3, FLUX.1 and PixArt pipeline directories for the tests (nothing is downloaded).

The configs follow diffusers' own tests (`get_dummy_components`), shrunk; the CLIP tokenizers are the
hand-written letter vocabulary of tests/latent_models.py and the T5 tokenizer a Unigram model over the
same letters, built with the `tokenizers` library. Every weight gets a value (`_fill`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from latent_models import LETTERS, _fill, write_tokenizer

CLIP_VOCAB = 2 + 2 * len(LETTERS)
FLUX_SCHEDULER = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)  # FLUX.1-dev's scheduler_config.json


def clip_encoder(hidden: int, *, projection: int | None = None, seed: int = 2, max_length: int = 24):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection or hidden,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return _fill(model.eval(), seed, std=0.2)


def write_t5_tokenizer(directory: Path) -> Path:
    """A T5 tokenizer (Unigram over the letters, '▁' word starts, </s> appended), saved as a pipeline saves it."""
    from transformers import T5TokenizerFast

    pieces = [
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        ("▁", -1.0),
        *((c, -2.0) for c in LETTERS),
        *(("▁" + c, -1.5) for c in LETTERS),
    ]
    T5TokenizerFast(
        vocab=pieces, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0, model_max_length=512
    ).save_pretrained(directory)
    return directory


def t5_encoder(d_model: int = 32, seed: int = 5):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=3 + 1 + 2 * len(LETTERS),
        d_model=d_model,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return _fill(T5EncoderModel(config).eval(), seed, std=0.2)


def vae(shift: float | None = None, seed: int = 1) -> AutoencoderKL:
    model = AutoencoderKL(
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
    _fill(model, seed)
    model.register_to_config(scaling_factor=0.5, shift_factor=shift)
    return model


def _save(path: Path, parts: dict, index: dict, skip: tuple[str, ...]) -> Path:
    for name, part in parts.items():
        if name in skip:
            continue
        if isinstance(part, str):  # a tokenizer kind
            (write_tokenizer if part == "clip" else write_t5_tokenizer)(path / name)
        else:
            part.save_pretrained(path / name)
    (path / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k not in skip}))
    return path


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 4 + 8,
        cross_attention_dim=16 + 8,
        norm_num_groups=8,
    )
    return _fill(unet, seed)


def make_sdxl_dir(path: Path, skip: tuple[str, ...] = ()) -> Path:
    parts = {
        "unet": tiny_sdxl_unet(),
        "vae": vae(),
        "text_encoder": clip_encoder(16, seed=2),
        "tokenizer": "clip",
        "text_encoder_2": clip_encoder(8, projection=8, seed=3),
        "tokenizer_2": "clip",
        "scheduler": DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    }
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    return _save(path, parts, index, skip)


def tiny_sd3(seed: int = 6) -> SD3Transformer2DModel:
    return _fill(
        SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=16 + 8,
            out_channels=4,
            pos_embed_max_size=16,
        ),
        seed,
    )


def make_sd3_dir(path: Path, skip: tuple[str, ...] = ()) -> Path:
    # CLIP-L 16 + CLIP-G 8 wide: their states are zero-padded to T5's 32 as SD3's are (768 + 1280 -> 4096)
    parts = {
        "transformer": tiny_sd3(),
        "vae": vae(shift=0.1),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder": clip_encoder(16, projection=16, seed=2),
        "tokenizer": "clip",
        "text_encoder_2": clip_encoder(8, projection=8, seed=3),
        "tokenizer_2": "clip",
        "text_encoder_3": t5_encoder(),
        "tokenizer_3": "t5",
    }
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
    }
    return _save(path, parts, index, skip)


def tiny_flux(seed: int = 7, guidance: bool = True) -> FluxTransformer2DModel:
    return _fill(
        FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=guidance,
            axes_dims_rope=(4, 4, 8),
        ),
        seed,
    )


def make_flux_dir(path: Path, skip: tuple[str, ...] = (), guidance: bool = True) -> Path:
    parts = {
        "transformer": tiny_flux(guidance=guidance),
        "vae": vae(shift=0.1),
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        "text_encoder": clip_encoder(16, seed=2),
        "tokenizer": "clip",
        "text_encoder_2": t5_encoder(),
        "tokenizer_2": "t5",
    }
    index = {
        "_class_name": "FluxPipeline",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
    }
    return _save(path, parts, index, skip)


def tiny_pixart(seed: int = 8) -> PixArtTransformer2DModel:
    return _fill(
        PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=24,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            use_additional_conditions=True,
        ),
        seed,
    )


def make_pixart_dir(path: Path, skip: tuple[str, ...] = ()) -> Path:
    parts = {
        "transformer": tiny_pixart(),
        "vae": vae(),
        "scheduler": DDPMScheduler(num_train_timesteps=1000),
        "text_encoder": t5_encoder(),
        "tokenizer": "t5",
    }
    index = {
        "_class_name": "PixArtAlphaPipeline",
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
    }
    return _save(path, parts, index, skip)
