"""The noise of a stored feature: a pure function of (noise seed, sample index, timestep).

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   eps = noise(seed, index, t, shape)

`abar_t` is the model's own schedule (`stages.models.loading.LoadedModel.alphas_cumprod`). Anyone can
recompute a stored feature from the image alone with this function.
"""

from __future__ import annotations

import numpy as np
import torch

from cache.errors import ConfigError


def noise(seed: int, index: int, timestep: int, shape: tuple[int, ...], *, draw: int = 0) -> torch.Tensor:
    """eps for sample `index` (its position in its split) at `timestep`: float32 N(0, 1) on the CPU.

    A pure function: a `torch.Generator` seeded with 64 bits drawn from
    `numpy.random.SeedSequence([seed, index, timestep])`, then `torch.randn(shape)`. A stored feature
    therefore does not depend on batch size, device, order or process count. `shape` is the image's
    for a pixel-space model and the latent's for a latent one.

    `draw` k > 0 is the k-th draw of a noise ensemble (`--ensemble K` stores the mean over draws
    0..K-1): `SeedSequence([seed, index, timestep, k])`. Draw 0 is the single draw above, so an
    ensemble of one is exactly the plain store.
    """
    if min(seed, index, timestep, draw) < 0:
        raise ConfigError(f"seed, index, timestep and draw must be non-negative, got {(seed, index, timestep, draw)}")
    entropy = [seed, index, timestep] + ([draw] if draw else [])
    high, low = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed((int(high) << 32) | int(low))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
