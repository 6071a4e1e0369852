"""A tiny random Sana pipeline directory for the tests (nothing is downloaded).

The configs follow diffusers' own Sana tests (`get_dummy_components`), shrunk: a 2-block
SanaTransformer2DModel (patch 1), a 2-level AutoencoderDC (ResBlock, then EfficientViTBlock; /2 instead
of /32), a 2-layer Gemma-2 and a Gemma tokenizer (BPE with byte fallback) over a vocabulary written
here: the special tokens, the word-start mark, the letters and the digits. Every weight gets a value.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaTransformer2DModel,
)

from latent_models import LETTERS, _fill

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
VOCAB = [*SPECIALS, "▁", *LETTERS, *"0123456789"]
# Sana_1600M_1024px_diffusers' scheduler: DPM-Solver++ on flow sigmas, shift 3
DPM_FLOW = dict(
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    algorithm_type="dpmsolver++",
    solver_order=2,
)


def write_gemma_tokenizer(directory: Path) -> Path:
    from transformers import GemmaTokenizer

    GemmaTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}, add_bos_token=True).save_pretrained(directory)
    return directory


def gemma_encoder(hidden: int = 16, seed: int = 11):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _fill(Gemma2Model(config).eval(), seed, std=0.2)


def tiny_dcae(seed: int = 12) -> AutoencoderDC:
    model = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    return _fill(model, seed, std=0.1)


def tiny_sana(seed: int = 13, **changes) -> SanaTransformer2DModel:
    config = dict(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=16,
        sample_size=8,
    )
    return _fill(SanaTransformer2DModel(**{**config, **changes}), seed, std=0.2)


def make_sana_dir(path: Path, skip: tuple[str, ...] = (), scheduler: str = "flow-match", **changes) -> Path:
    schedulers = {
        "flow-match": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "dpm": DPMSolverMultistepScheduler(**DPM_FLOW),
    }
    parts = {
        "transformer": tiny_sana(**changes),
        "vae": tiny_dcae(),
        "text_encoder": gemma_encoder(),
        "scheduler": schedulers[scheduler],
    }
    for name, part in parts.items():
        if name not in skip:
            part.save_pretrained(path / name)
    if "tokenizer" not in skip:
        write_gemma_tokenizer(path / "tokenizer")
    index = {
        "_class_name": "SanaPipeline",
        "transformer": ["diffusers", "SanaTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderDC"],
        "text_encoder": ["transformers", "Gemma2Model"],
        "tokenizer": ["transformers", "GemmaTokenizer"],
        "scheduler": ["diffusers", type(parts["scheduler"]).__name__],
    }
    (path / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k not in skip}))
    return path
