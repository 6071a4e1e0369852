"""The one image preprocessing, for extraction, the pixel baseline and the default DDPM's training alike.

RGB or grayscale to the model's input channels, short side resized to the model's sample size
(bicubic), centre crop, scaled to [-1, 1]. 16-bit grayscale images are scaled to the same range (not
clipped to 8 bits); images too large to decode safely are refused with their path.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stages.data.errors import DataError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


CONVENTIONS = ("project", "transformers", "torchvision")
RESAMPLING = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


def preprocessing(size: int, channels: int) -> dict:
    """What the store records about the preprocessing (part of its identity)."""
    return {"resize": "short side, bicubic", "size": size, "crop": "centre", "channels": channels, "range": [-1, 1]}


def backbone_preprocessing(size: int, resize: int, resample: str, mean, std, squash: bool = False,
                           convention: str = "transformers") -> dict:
    """A vision backbone's image processor as the store records it: short side to `resize` (`resample`;
    with `squash` both sides, the aspect ratio not kept), centre crop to `size`, [0, 1], then
    (x - mean) / std per channel."""
    how = f"to {resize}x{resize}, aspect not kept" if squash else f"short side to {resize}"
    return {"resize": f"{how}, {resample}", "size": size, "crop": "centre", "rounding": convention, "channels": 3,
            "range": [0, 1], "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def image_channels(path: Path) -> int:
    """1 for a grayscale image, 3 for anything else (what a model trained on this data set should take)."""
    try:
        with Image.open(path) as image:
            return 1 if image.mode in ("1", "L", "I", "F", *SIXTEEN_BIT_MODES) else 3
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error


def content_hash(data: bytes) -> int:
    """A 63-bit hash of a file's bytes (blake2b), what the store records to notice a changed image."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def file_record(path: Path) -> tuple[int, int]:
    """(content hash, mtime in ns) of a file, as the store records them."""
    mtime = os.stat(path).st_mtime_ns
    return content_hash(Path(path).read_bytes()), mtime


def read_image(path: Path, size: int, channels: int, *, crop_bottom: int = 0, resize: int | None = None,
               resample: str = "bicubic", squash: bool = False,
               convention: str = "project") -> tuple[torch.Tensor, tuple[int, int]]:
    """`load_image` of the file's bytes, and the (content hash, mtime in ns) of exactly those bytes."""
    try:
        mtime = os.stat(path).st_mtime_ns
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read image {path}: {error.strerror}") from None
    image = load_image(path, size, channels, data=data, crop_bottom=crop_bottom, resize=resize, resample=resample,
                       squash=squash, convention=convention)
    return image, (content_hash(data), mtime)


def load_image(path: Path, size: int, channels: int, *, data: bytes | None = None, crop_bottom: int = 0,
               resize: int | None = None, resample: str = "bicubic", squash: bool = False,
               convention: str = "project") -> torch.Tensor:
    """(channels, size, size) float32 in [-1, 1]; a file that is not a readable image is a DataError naming it.

    `data`, when given, are the file's bytes already read (the image is decoded from them).
    `crop_bottom` rows are cut off the bottom first (FGVC-Aircraft's copyright banner), before the
    resize and crop. `resize` (default `size`) is the short side before the centre crop to `size`
    (with `squash`, both sides: the aspect ratio is not kept), and `resample` the filter: what a
    backbone's image processor asks for (`backbone_preprocessing`). `convention` rounds the long side
    and the crop offset as this project always has ("project": round, floor), as transformers'
    processors do ("transformers": floor, floor) or as torchvision's Resize and CenterCrop do
    ("torchvision", timm's: floor, round): a pixel's shift between them is a different feature."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if channels not in (1, 3):
        raise DataError(f"models with {channels} input channels are not supported (1 or 3)")
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as image:
            image = _eight_bit_range(image, channels)
            if crop_bottom:
                if image.size[1] <= crop_bottom:
                    raise DataError(f"it is {image.size[1]} pixels high: nothing is left after cutting the "
                                    f"{crop_bottom}-pixel banner off its bottom")
                image = image.crop((0, 0, image.size[0], image.size[1] - crop_bottom))
            width, height = image.size
            short = resize or size
            scale = short / min(width, height)
            if squash:
                resized = (short, short)
            elif convention == "project":
                resized = (max(short, round(width * scale)), max(short, round(height * scale)))
            else:
                resized = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
            if resized != image.size:
                image = image.resize(resized, RESAMPLING[resample])
            if convention == "torchvision":
                left, top = int(round((image.size[0] - size) / 2)), int(round((image.size[1] - size) / 2))
            else:
                left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
            array = np.asarray(image, dtype=np.float32)
    except Image.DecompressionBombError as error:
        raise DataError(f"cannot read image {path}: {error} Shrink the image, or remove it from the data set.") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    if array.ndim == 2 and channels == 3:  # a 16-bit grayscale image for an RGB model
        array = np.repeat(array[:, :, None], 3, axis=2)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array / 127.5 - 1.0)


def _eight_bit_range(image: Image.Image, channels: int) -> Image.Image:
    """The image in the model's channels with values in [0, 255]: 8-bit images as PIL converts them,
    16-bit grayscale as a float image scaled by 255/65535 (PIL's own conversion would clip it)."""
    if image.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(np.asarray(image, dtype=np.float32) * np.float32(255 / 65535), mode="F")
    return image.convert("RGB" if channels == 3 else "L")
