"""The paper's attention head and its fusion of blocks and timesteps (soumik-kanad/diffssl, DifFormer).

`ssl_diff/attention_fusion.py` with `--norm_type layer` and `scripts/attention.sh`'s
`--fusion_arc Use_CLS_Token:True:1024,Insert_CLS_Token,Attention:1024:8:4:2,Extract_CLS_Token`:

    per block b (shared by every timestep): LayerNorm over the whole (C_b, g, g) map, a 1x1
        convolution to d channels, the g*g cells as tokens (no position embedding)
    per timestep t: the tokens of every requested block, concatenated, after a zero-initialised
        class token; k pre-norm transformer blocks of width d (h heads, MLP ratio 4, GELU, no qkv
        bias; ssl_diff/attention_head.py's Block); the class token out (no final norm)
    the class tokens of all timesteps concatenated -> Linear(d * T, K)

One (block, timestep) is the paper's attention head (`attention.sh`: block 24, t = 150, pool 16);
several are `fusion.sh` (blocks 19, 24, 30 at t = 90, 150, 300). For d = 1024 on a 1024 x 16 x 16
input and 1000 classes it has 27,786,216 parameters. Every layer keeps PyTorch's default
initialisation, as in the paper's code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cache.errors import ConfigError


class Attention(nn.Module):
    """ssl_diff/attention_head.py's Attention: one qkv projection without bias, softmax(q k^T / sqrt(d_h)) v, proj."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DiffSSLAttention(nn.Module):
    """Inputs (B, C_i, g_i, g_i), block-major over `steps` timesteps (input i: block i // steps, timestep
    i % steps) -> (B, K) logits; see the module docstring."""

    def __init__(
        self,
        inputs: Sequence[tuple[int, int]],
        num_classes: int,
        *,
        dim: int = 1024,
        depth: int = 2,
        heads: int = 8,
        steps: int = 1,
    ):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"the attention dim ({dim}) must be divisible by the number of heads ({heads})")
        if steps < 1 or len(inputs) % steps:
            raise ConfigError(f"{len(inputs)} inputs cannot be {steps} timesteps of the same blocks")
        self.steps = steps
        blocks = [inputs[i] for i in range(0, len(inputs), steps)]  # one (channels, grid) per block
        if any(inputs[i] != blocks[i // steps] for i in range(len(inputs))):
            raise ConfigError(f"inputs {list(inputs)} are not the same blocks at each of {steps} timesteps")
        self.pre_layer = nn.ModuleList(nn.Sequential(nn.LayerNorm([c, g, g]), nn.Conv2d(c, dim, 1)) for c, g in blocks)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.head = nn.Linear(dim * steps, num_classes)

    @classmethod
    def build(
        cls,
        inputs: Sequence[tuple[int, int]],
        num_classes: int,
        *,
        dim: int = 1024,
        depth: int = 2,
        heads: int = 8,
        steps: int = 1,
    ) -> DiffSSLAttention:
        return cls(inputs, num_classes, dim=int(dim), depth=int(depth), heads=int(heads), steps=int(steps))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        per_step = []
        for t in range(self.steps):
            tokens = [
                self.pre_layer[b](x).flatten(2).transpose(1, 2)  # 'b c h w -> b (h w) c'
                for b, x in enumerate(inputs[t :: self.steps])
            ]
            x = torch.cat([self.cls_token.expand(tokens[0].shape[0], -1, -1), *tokens], dim=1)
            per_step.append(self.blocks(x)[:, 0])
        return self.head(torch.cat(per_step, dim=1))
