"""Augmented views of an image: named, composable augmentations and their seeded random draws.

    --augment resized-crop,flip          the paper's training augmentation (diffssl / guided-diffusion)
    --augment resized-crop=0.9-1.0,crop=2 scale range and padding given explicitly (suits digits: no flips)

Augmentations (`AUGMENTATIONS`), applied in this order whatever order they are named in:

- `resized-crop=A-B`: the short side is resized to a random size s in [ceil(size / B), ceil(size / A)]
  (guided-diffusion's `random_crop_arr`, min_crop_frac A = 0.8 and max_crop_frac B = 1.0 by default:
  s in [256, 320] for a 256 model), then a random size x size crop is taken;
- `crop=P`: the (resized) image is padded by P black pixels on every side (P = size // 8 by default),
  then a random size x size crop is taken;
- `flip=p`: a horizontal flip with probability p (0.5 by default).

The random draws of view v of sample `index` are a pure function of (seed, index, v): a numpy
`Generator` seeded with `SeedSequence([seed, index, v], spawn_key=(1,))` draws, in this order, s
(resized-crop), the crop's top and left offsets (resized-crop or crop), then the flip. View 0 is
never augmented (the store's centre view). With the noise of `stages.extract.noising.noise(seed,
index, t, shape, view=v)`, a stored view can be recomputed from the image alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cache.errors import ConfigError

AUGMENTATIONS = ("resized-crop", "crop", "flip")
# The paper's range (guided-diffusion random_crop_arr: min_crop_frac 0.8, max_crop_frac 1.0)
DEFAULT_CROP_FRACTIONS = (0.8, 1.0)
DEFAULT_FLIP = 0.5


@dataclass(frozen=True)
class Augment:
    """Which augmentations a view gets and their parameters; `record()` is what the store keeps."""

    crop_fractions: tuple[float, float] | None = None  # resized-crop: (min_crop_frac, max_crop_frac)
    padding: int | None = None  # crop: pixels of black padding on each side (None: size // 8)
    crop: bool = False
    flip: float = 0.0  # probability of a horizontal flip

    def __post_init__(self):
        if self.crop_fractions is not None:
            low, high = self.crop_fractions
            if not 0.0 < low <= high <= 1.0:
                raise ConfigError(
                    f"resized-crop needs crop fractions 0 < A <= B <= 1 (A-B, e.g. 0.8-1.0), got {low}-{high}"
                )
        if self.padding is not None and self.padding < 0:
            raise ConfigError(f"crop padding must be a non-negative number of pixels, got {self.padding}")
        if not 0.0 <= self.flip <= 1.0:
            raise ConfigError(f"the flip probability must be in [0, 1], got {self.flip}")

    @property
    def random_crop(self) -> bool:
        return self.crop_fractions is not None or self.crop

    def record(self, size: int) -> list[dict]:
        """The augmentations with every parameter resolved for a model of `size`, as the store records them."""
        out = []
        if self.crop_fractions is not None:
            low, high = self.crop_fractions
            out.append(
                {
                    "name": "resized-crop",
                    "min_crop_frac": low,
                    "max_crop_frac": high,
                    "short_side": list(self.short_sides(size)),
                }
            )
        if self.crop:
            out.append({"name": "crop", "padding": self.pad(size)})
        if self.flip:
            out.append({"name": "flip", "p": self.flip})
        return out

    def short_sides(self, size: int) -> tuple[int, int]:
        low, high = self.crop_fractions or (1.0, 1.0)
        return math.ceil(size / high), math.ceil(size / low)

    def pad(self, size: int) -> int:
        return size // 8 if self.padding is None else int(self.padding)


def parse_augment(text: str) -> Augment:
    """'resized-crop,flip' / 'resized-crop=0.8-1.0,crop=2,flip=0.5' -> Augment; unknown names are an error."""
    fields: dict = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AUGMENTATIONS:
            raise ConfigError(
                f"unknown augmentation {name!r} in {text!r}; choose from {', '.join(AUGMENTATIONS)} "
                "(e.g. resized-crop,flip or resized-crop=0.8-1.0,crop=2)"
            )
        if (name == "resized-crop" and "crop_fractions" in fields) or (name in ("crop", "flip") and name in fields):
            raise ConfigError(f"augmentation {name!r} is named twice in {text!r}")
        try:
            if name == "resized-crop":
                low, _, high = value.partition("-") if value else ("", "", "")
                fields["crop_fractions"] = (float(low), float(high)) if value else DEFAULT_CROP_FRACTIONS
            elif name == "crop":
                fields["crop"] = True
                if value:
                    fields["padding"] = int(value)
            else:
                fields["flip"] = float(value) if value else DEFAULT_FLIP
        except ValueError:
            raise ConfigError(
                f"cannot read the parameter of {part!r}: use resized-crop=0.8-1.0, crop=2 or flip=0.5"
            ) from None
    if not fields:
        raise ConfigError(f"--augment {text!r} names no augmentation; choose from {', '.join(AUGMENTATIONS)}")
    return Augment(**fields)


def view_generator(seed: int, index: int, view: int) -> np.random.Generator:
    """The random draws of view `view` of sample `index` (see the module docstring)."""
    if min(seed, index, view) < 0:
        raise ConfigError(f"seed, index and view must be non-negative, got {(seed, index, view)}")
    return np.random.default_rng(np.random.SeedSequence([seed, index, view], spawn_key=(1,)))
