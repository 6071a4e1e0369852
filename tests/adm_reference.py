"""An independent re-implementation of guided-diffusion's `UNetModel`, the reference the ADM conversion is
tested against.

Written from the structure of guided-diffusion's `unet.py`, `nn.py` and `script_util.create_model`
(module names and nesting match, so `state_dict()` keys and shapes are the ones its checkpoints
carry), sharing nothing with `stages.models.adm`. It is trusted because it reproduces the fixture's golden
outputs, which guided-diffusion itself produced; it then stands in for guided-diffusion on
configurations the fixture does not cover. float32 only, no class conditioning, dims=2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) sinusoids, cosines first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


class ResBlock(nn.Module):
    """(N, C, H, W), (N, E) -> (N, C_out, H', W'); H' = 2H (up), H/2 (down) or H."""

    def __init__(self, channels, emb_channels, out_channels=None, scale_shift=False, up=False, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.scale_shift, self.up, self.down = scale_shift, up, down
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(
            norm(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x, emb):
        h = self.in_layers[:-1](x)
        # the resampling sits between the activation and the first convolution, on both paths
        h, x = self._resample(h), self._resample(x)
        h = self.in_layers[-1](h)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """(N, C, H, W) -> (N, C, H, W): self-attention over the H*W positions, with residual."""

    def __init__(self, channels, heads, new_order=False):
        super().__init__()
        self.heads, self.new_order = heads, new_order
        self.norm = norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        n, c, *spatial = x.shape
        flat = x.reshape(n, c, -1)
        qkv = self.qkv(self.norm(flat))  # (N, 3C, T)
        d, length = c // self.heads, flat.shape[-1]
        if self.new_order:  # [q of all heads | k of all heads | v of all heads]
            q, k, v = (part.reshape(n * self.heads, d, length) for part in qkv.chunk(3, dim=1))
        else:  # [head 0: q k v | head 1: q k v | ...]
            q, k, v = qkv.reshape(n * self.heads, 3 * d, length).split(d, dim=1)
        scale = d**-0.25
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        h = torch.einsum("bts,bcs->bct", weight, v).reshape(n, c, length)
        return (flat + self.proj_out(h)).reshape(n, c, *spatial)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Step(nn.Sequential):
    """guided-diffusion's TimestepEmbedSequential: ResBlocks get the embedding, the rest do not."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ReferenceUNet(nn.Module):
    """guided-diffusion's UNetModel (conv_resample=True, dims=2, no classes).

    `forward(x (N, 3, S, S), t (N,))` returns (output (N, out_channels, S, S), [block outputs]) with
    the block outputs in input_blocks, middle_block, output_blocks order (block k is index k-1).
    """

    def __init__(
        self,
        *,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_ds,
        channel_mult,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        scale_shift=False,
        resblock_updown=False,
        new_order=False,
        in_channels=3,
    ):
        super().__init__()
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.model_channels = model_channels
        emb = 4 * model_channels

        def attention(ch, heads):
            return AttentionBlock(ch, ch // num_head_channels if num_head_channels != -1 else heads, new_order)

        def res(ch, out=None, **updown):
            return ResBlock(ch, emb, out, scale_shift, **updown)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([Step(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(Step(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Step(res(ch, down=True) if resblock_updown else Downsample(ch)))
                skips.append(ch)
                ds *= 2
        self.middle_block = Step(res(ch), attention(ch, num_heads), res(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attention(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(res(ch, up=True) if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Step(*layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x, t):
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        blocks, skips, h = [], [], x
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
            blocks.append(h)
        h = self.middle_block(h, emb)
        blocks.append(h)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
            blocks.append(h)
        return self.out(h), blocks


# script_util.create_model's defaults for an empty --channel_mult
_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def reference_from_flags(flags: dict) -> ReferenceUNet:
    """script_util.create_model: guided-diffusion's argument dict (defaults filled in) -> the network."""
    size = flags["image_size"]
    given = flags["channel_mult"]
    mult = _CHANNEL_MULT[size] if given == "" else tuple(int(m) for m in given.split(","))
    return ReferenceUNet(
        model_channels=flags["num_channels"],
        out_channels=6 if flags["learn_sigma"] else 3,
        num_res_blocks=flags["num_res_blocks"],
        attention_ds=tuple(size // int(r) for r in flags["attention_resolutions"].split(",")),
        channel_mult=mult,
        num_heads=flags["num_heads"],
        num_head_channels=flags["num_head_channels"],
        num_heads_upsample=flags["num_heads_upsample"],
        scale_shift=flags["use_scale_shift_norm"],
        resblock_updown=flags["resblock_updown"],
        new_order=flags["use_new_attention_order"],
    )
