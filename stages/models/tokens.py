"""Transformer block outputs as feature maps, the optional `--feature-norm`, and massive activations.

A DiT-family block returns a token sequence (B, N, D) row-major over the patch grid (for MMDiT a
tuple (text tokens, image tokens): the image tokens are kept, the text tokens dropped). It becomes
the (B, D, g, g) map every store holds.

Massive activations: in trained DiT-family models a few channels of the residual stream carry values
hundreds to thousands of times the median magnitude (Sun et al. 2024 for LLMs and ViTs; arXiv
2505.18584 for diffusion transformers). They dominate average pooling, standardisation and CKA.
`--feature-norm layernorm` applies what the model itself applies before its output head:
LayerNorm over the channels of each token without affine parameters (`norm_out`, eps 1e-6 in
SD3, FLUX, PixArt and DiT), before pooling. The default, "none", keeps the raw residual stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.models.capture import output_tensor

FEATURE_NORMS = ("none", "layernorm")
LAYERNORM_EPS = 1e-6  # the eps of every supported transformer's norm_out (elementwise_affine=False)


def feature_norm_record(norm: str) -> dict:
    """What the store's identity records of a `--feature-norm` in use."""
    return {"name": norm, "eps": LAYERNORM_EPS, "affine": False}


def image_tokens(output, *, joint: bool = False) -> torch.Tensor:
    """(B, N, D) image tokens of a block's output: the second of MMDiT's (text, image) pair, else the tensor."""
    if joint:
        return output[1]
    return output_tensor(output)


def token_map(tokens: torch.Tensor, grid: int, *, norm: str | None = None) -> torch.Tensor:
    """(B, g*g, D) row-major tokens -> (B, D, g, g); `norm` "layernorm" normalises each token first (float32)."""
    if norm == "layernorm":
        tokens = F.layer_norm(tokens.float(), (tokens.shape[-1],), eps=LAYERNORM_EPS)
    b, n, d = tokens.shape
    if n != grid * grid:
        raise ValueError(f"a block returned {n} image tokens; the patch grid {grid}x{grid} has {grid * grid}")
    return tokens.transpose(1, 2).reshape(b, d, grid, grid)


def massive_activations(features: torch.Tensor, top: int = 3) -> dict:
    """How far a block's largest activations stand out, over a (B, C, H, W) map or (B, N, C) tokens.

    ratio: max |x| / median |x| over every value; channels: the `top` channels by max |x| and their
    share of the squared norm (what dominates an L2 or CKA comparison)."""
    x = features.detach().float()
    channels_last = x.movedim(1, -1) if x.dim() == 4 else x
    flat = channels_last.reshape(-1, channels_last.shape[-1]).abs()
    peak = flat.max(dim=0).values
    order = torch.argsort(peak, descending=True)[:top]
    energy = (flat**2).sum(dim=0)
    return {
        "max_abs": float(flat.max()),
        "median_abs": float(flat.median()),
        "ratio": float(flat.max() / flat.median().clamp_min(1e-12)),
        "top_channels": [int(c) for c in order],
        "top_energy_share": float(energy[order].sum() / energy.sum().clamp_min(1e-30)),
    }
