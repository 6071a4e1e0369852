"""The block table: which modules of a `UNet2DModel` a user may tap, numbered as the paper numbers ADM.

Block 1 is `conv_in`; then, level by level down the encoder, each resnet (or the attention that
follows it, where the level has attention) and the level's downsampler; then the whole mid block;
then, level by level up the decoder, each step's attention or resnet, the level's last step being its
upsampler where it has one. This is guided-diffusion's `input_blocks`, `middle_block`,
`output_blocks` order, so for ADM-256 there are 37 blocks and block 24 is `output_blocks[4]`.

Every consumer (the `blocks` command, extraction, the store, the heads) reads this one table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from cache.errors import ConfigError, UserError

if TYPE_CHECKING:  # the block table reads a model's structure; parsing a selection needs no torch
    from torch import nn


class UnsupportedModelError(UserError, ValueError):
    """The model's structure is one the block table cannot number."""


@dataclass(frozen=True)
class Block:
    number: int
    module: str  # dotted path inside the UNet2DModel, e.g. "up_blocks.1.attentions.0"
    adm_name: str  # guided-diffusion's name for the same output, e.g. "output_blocks[4]"
    channels: int
    resolution: int  # the feature map is resolution x resolution
    # models over latents or patches: image pixels per cell of the map (a 16x16 map of a 512 px image: 32)
    stride: int | None = None

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "stride" or value is not None}


def _square(sample_size) -> int:
    if isinstance(sample_size, (tuple, list)):
        if len(set(sample_size)) != 1:
            raise UnsupportedModelError(f"only square inputs are supported; the model's sample_size is {sample_size}")
        return int(sample_size[0])
    if sample_size is None:
        raise UnsupportedModelError("the model config has no sample_size; set it in config.json")
    return int(sample_size)


def _out_channels(module: nn.Module, fallback: int) -> int:
    return int(getattr(module, "out_channels", None) or fallback)


def block_table(unet: nn.Module) -> list[Block]:
    """Number the tappable blocks of a diffusers `UNet2DModel` (see the module docstring)."""
    size = _square(unet.config.sample_size)
    blocks: list[Block] = []
    adm_input = 0
    adm_output = 0

    def add(module: str, adm_name: str, channels: int, resolution: int) -> None:
        blocks.append(Block(len(blocks) + 1, module, adm_name, int(channels), int(resolution)))

    add("conv_in", "input_blocks[0]", unet.conv_in.out_channels, size)
    adm_input = 1
    resolution = size
    for level, down in enumerate(unet.down_blocks):
        attentions = getattr(down, "attentions", None)
        for step, resnet in enumerate(down.resnets):
            module = f"down_blocks.{level}.attentions.{step}" if attentions else f"down_blocks.{level}.resnets.{step}"
            add(module, f"input_blocks[{adm_input}]", resnet.out_channels, resolution)
            adm_input += 1
        if getattr(down, "downsamplers", None):
            resolution //= 2
            channels = _out_channels(down.downsamplers[0], down.resnets[-1].out_channels)
            add(f"down_blocks.{level}.downsamplers.0", f"input_blocks[{adm_input}]", channels, resolution)
            adm_input += 1
    if unet.mid_block is None:
        raise UnsupportedModelError("models without a mid block are not supported")
    add("mid_block", "middle_block", unet.mid_block.resnets[-1].out_channels, resolution)
    for level, up in enumerate(unet.up_blocks):
        attentions = getattr(up, "attentions", None)
        last = len(up.resnets) - 1
        for step, resnet in enumerate(up.resnets):
            if step == last and getattr(up, "upsamplers", None):
                resolution *= 2
                channels = _out_channels(up.upsamplers[0], resnet.out_channels)
                module = f"up_blocks.{level}.upsamplers.0"
            else:
                channels = resnet.out_channels
                module = f"up_blocks.{level}.attentions.{step}" if attentions else f"up_blocks.{level}.resnets.{step}"
            add(module, f"output_blocks[{adm_output}]", channels, resolution)
            adm_output += 1
    return blocks


def resolve_blocks(numbers: tuple[int, ...] | None, table: list[Block]) -> list[Block]:
    """Turn a user's block selection (None: all) into rows of the table, failing on any number it lacks."""
    if numbers is None:
        return list(table)
    by_number = {block.number: block for block in table}
    unknown = [n for n in numbers if n not in by_number]
    if unknown:
        raise ConfigError(
            f"unknown block(s) {', '.join(map(str, unknown))}: this model has blocks 1-{len(table)} "
            "(`pipeline blocks --model ...` prints the table)"
        )
    return [by_number[n] for n in sorted(set(numbers))]


def format_table(table: list[Block], *, latent_factor: int | None = None, title: str | None = None) -> str:
    """The table as `pipeline blocks` prints it; for a latent model (`latent_factor`: its VAE's downsampling)
    also each block's cells (a transformer's image tokens) and how many latent cells one cell covers."""
    latent = any(b.stride is not None for b in table)
    header = f"{'block':>5}  {'module':<32} {'adm':<18} {'channels':>8}  {'resolution':>10}"
    header += f"  {'px/cell':>7}" if latent else ""
    header += f"  {'cells':>6}  {'latent/cell':>11}" if latent and latent_factor else ""
    rows = [
        f"{b.number:>5}  {b.module:<32} {b.adm_name:<18} {b.channels:>8}  {f'{b.resolution}x{b.resolution}':>10}"
        + (f"  {b.stride:>7}" if latent else "")
        + (
            f"  {b.resolution**2:>6}  {f'{b.stride // latent_factor}x{b.stride // latent_factor}':>11}"
            if latent and latent_factor
            else ""
        )
        for b in table
    ]
    return "\n".join([*([title] if title else []), header, *rows])
