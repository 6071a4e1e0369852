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


def noise(
    seed: int, index: int, timestep: int, shape: tuple[int, ...], view: int = 0, *, draw: int = 0
) -> torch.Tensor:
    """eps for sample `index` (its position in its split) at `timestep`: float32 N(0, 1) on the CPU.

    A pure function: a `torch.Generator` seeded with 64 bits drawn from
    `numpy.random.SeedSequence(entropy)`, then `torch.randn(shape)`, where entropy is

        [seed, index, timestep]                      the centre view (view 0), draw 0: every plain store
        [seed, index, timestep, draw]                draw k >= 1 of a noise ensemble (`--ensemble K`
                                                     stores the mean over draws 0..K-1), view 0
        [seed, index, timestep, view, draw, 1]       view v >= 1 (`--views`): every view its own noise

    (the trailing 1 keeps a view's entropy from ever equalling an ensemble draw's). A stored feature
    therefore does not depend on batch size, device, order or process count. `shape` is the image's
    for a pixel-space model and the latent's for a latent one. An ensemble of one, and view 0, are
    exactly the plain store.
    """
    if min(seed, index, timestep, view, draw) < 0:
        raise ConfigError(
            f"seed, index, timestep, view and draw must be non-negative, got {(seed, index, timestep, view, draw)}"
        )
    if view:
        entropy = [seed, index, timestep, view, draw, 1]
    else:
        entropy = [seed, index, timestep] + ([draw] if draw else [])
    high, low = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed((int(high) << 32) | int(low))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
