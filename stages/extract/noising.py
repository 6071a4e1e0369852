"""The noise of a stored feature: a pure function of (noise seed, sample index, timestep, view).

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   eps = noise(seed, index, t, shape, view)

View 0 is the store's centre view (the only one without `--views`); views 1..K-1 are augmented
views of training images, whose crop and flip are drawn by `stages.data.augment.view_generator(seed,
index, view)`: x0 of view v is `load_image(..., augment=..., rng=view_generator(seed, index, v))`.

`abar_t` is the model's own schedule (`stages.models.loading.LoadedModel.alphas_cumprod`). Anyone can
recompute a stored feature from the image alone with this function.
"""

from __future__ import annotations

import numpy as np
import torch

from cache.errors import ConfigError


def noise(seed: int, index: int, timestep: int, shape: tuple[int, ...], view: int = 0) -> torch.Tensor:
    """eps for sample `index` (its position in its split) at `timestep`: float32 N(0, 1) on the CPU.

    A pure function: a `torch.Generator` seeded with 64 bits drawn from
    `numpy.random.SeedSequence([seed, index, timestep])` (view 0) or
    `SeedSequence([seed, index, timestep, view])` (view >= 1: every view its own noise), then
    `torch.randn(shape)`. A stored feature therefore does not depend on batch size, device, order or
    process count.
    """
    if min(seed, index, timestep, view) < 0:
        raise ConfigError(f"seed, index, timestep and view must be non-negative, got {(seed, index, timestep, view)}")
    entropy = [seed, index, timestep] if view == 0 else [seed, index, timestep, view]
    high, low = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed((int(high) << 32) | int(low))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
