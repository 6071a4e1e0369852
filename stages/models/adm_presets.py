"""The MODEL_FLAGS of OpenAI's published guided-diffusion checkpoints, by checkpoint name.

Copied as data from guided-diffusion's README (its "Sampling from pre-trained models" section), so
`pipeline convert-adm 256x256_diffusion_uncond.pt models/adm256` needs no flags: the preset is the
file's name without `.pt`, recognised when the name says which checkpoint it is. Sampling-only flags
(`--use_fp16`, which only casts the network when sampling) are kept: they describe nothing the
conversion reads, and keeping the README's strings whole makes them easy to check against it.

Not every published network can be expressed as a diffusers `UNet2DModel` for feature extraction:
`adm_architecture` refuses the class-conditional ones (their forward pass needs a class label, and
the true label would leak into the features) and 512x512 (its first level is half the time
embedding's width). Their presets are listed anyway so the refusal says why, not "unknown flags".
"""

from __future__ import annotations

from pathlib import Path

from cache.errors import UserError

_BASE = (
    "--diffusion_steps 1000 --learn_sigma True --noise_schedule linear --num_channels 256 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True --attention_resolutions 32,16,8"
)
_LSUN = f"{_BASE} --class_cond False --image_size 256 --num_head_channels 64"

PRESETS: dict[str, str] = {
    # the paper's checkpoint ("Diffusion Models Beat GANs on Image Classification")
    "256x256_diffusion_uncond": f"{_BASE} --class_cond False --image_size 256 --num_head_channels 64",
    "256x256_diffusion": f"{_BASE} --class_cond True --image_size 256 --num_head_channels 64",
    "64x64_diffusion": (
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
        "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
        "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
        "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
    ),
    "128x128_diffusion": f"{_BASE} --class_cond True --image_size 128 --num_heads 4",
    "512x512_diffusion": f"{_BASE.replace('--use_fp16 True', '--use_fp16 False')} --class_cond True --image_size 512 "
    "--num_head_channels 64",
    "lsun_bedroom": f"{_LSUN} --dropout 0.1",
    "lsun_cat": f"{_LSUN} --dropout 0.1",
    "lsun_horse": f"{_LSUN} --dropout 0.1",
    "lsun_horse_nodropout": f"{_LSUN} --dropout 0.0",
}


class UnknownPresetError(UserError, ValueError):
    """A --preset that is not one of the published checkpoints', or a file name that names none."""


def preset_flags(name: str) -> str:
    """The MODEL_FLAGS of a published checkpoint, by its name (with or without `.pt`)."""
    key = name.removesuffix(".pt")
    if key not in PRESETS:
        raise UnknownPresetError(
            f"unknown preset {name!r}; the published guided-diffusion checkpoints are: {', '.join(PRESETS)}"
        )
    return PRESETS[key]


def preset_for_file(checkpoint: str | Path) -> str | None:
    """The preset a checkpoint's file name names (`256x256_diffusion_uncond.pt`, `lsun_cat (1).pt` is not), or None."""
    stem = Path(checkpoint).name.removesuffix(".pt")
    return stem if stem in PRESETS else None
