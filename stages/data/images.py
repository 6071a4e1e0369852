"""The one image preprocessing, for extraction, the pixel baseline and the default DDPM's training alike.

RGB or grayscale to the model's input channels, short side resized to the model's sample size,
centre crop, scaled to [-1, 1]. 16-bit grayscale images are scaled to the same range (not clipped to
8 bits); images too large to decode safely are refused with their path. Two resizes (`PREPROCESSES`):

- "bicubic" (the default): one bicubic resize of the short side to the model's size;
- "adm": guided-diffusion's `center_crop_arr`, which the paper's data loader uses: while the short
  side is at least twice the model's size the image is halved with a BOX filter (each side // 2),
  then the short side is resized with BICUBIC (sides rounded), then centre-cropped. On ImageNet-sized
  images the two differ by up to about 0.38 on [-1, 1]. `pipeline convert-adm` makes it the default
  of the models it writes.

Augmented views (`stages.data.augment`) change the short side and the crop's position and may flip.

Decoding (`DECODES`): "exact" decodes every pixel (the default; PIL and torchvision's `decode_jpeg`
give identical pixels, bench/decode.py); "draft" lets libjpeg scale a JPEG by 1/2, 1/4 or 1/8 in the
DCT while decoding (PIL's `Image.draft`), as far as the short side stays at least the resize's side.
It changes the pixels (`DRAFT_MAX_DIFFERENCE`), so a store records it; it only helps where the image is at
least twice the model's size (an ImageNet photo, 500x375, for a 128- or 64-pixel model, not for a
256-pixel one).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stages.data.errors import DataError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
PREPROCESSES = ("bicubic", "adm")
DECODES = ("exact", "draft")
# How far "draft" is from "exact" on [-1, 1], largest and mean over pixels, on ImageNet-like JPEGs (500x375,
# q90) at 128 and 64 pixels with either resize: bench/decode.py measured 0.61 and 0.052 at most
# (tests/test_decode.py holds them to these bounds). Both resize the same picture, from a 1/2^k-scale DCT
# decode and from every pixel; the largest differences are single pixels at edges.
DRAFT_MAX_DIFFERENCE = 0.75
DRAFT_MEAN_DIFFERENCE = 0.06


CONVENTIONS = ("project", "transformers", "torchvision")
RESAMPLING = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


def preprocessing(size: int, channels: int, method: str = "bicubic", decode: str = "exact") -> dict:
    """What the store records about the preprocessing (part of its identity). "bicubic" records what
    stores always recorded, so that stores made before "adm" existed keep their identity; so does
    the "exact" decode, for stores made before "draft" existed."""
    check_preprocess(method)
    if method == "adm":
        record = {
            "resize": "guided-diffusion center_crop_arr: BOX halving while the short side >= 2 x size, then "
            "short side bicubic",
            "size": size,
            "crop": "centre",
            "channels": channels,
            "range": [-1, 1],
            "method": "adm",
        }
    else:
        record = {
            "resize": "short side, bicubic",
            "size": size,
            "crop": "centre",
            "channels": channels,
            "range": [-1, 1],
        }
    return with_decode(record, decode)


def with_decode(record: dict, decode: str) -> dict:
    """A preprocessing record with the decode added where it is not the exact one."""
    if decode not in DECODES:
        raise DataError(f"unknown decode {decode!r}; choose from {', '.join(DECODES)}")
    if decode == "draft":
        return {
            **record,
            "decode": "draft: JPEG decoded at 1/2, 1/4 or 1/8 scale (PIL Image.draft) while the short "
            "side stays >= the resize's side",
        }
    return record


def decode_of(record: dict) -> str:
    """The decode of a recorded preprocessing dict ("exact" where none is recorded)."""
    return "draft" if str(record.get("decode", "")).startswith("draft") else "exact"


def preprocess_method(record: dict) -> str:
    """The method of a recorded `preprocessing` dict ("bicubic" for stores that predate the choice)."""
    return record.get("method", "bicubic")


def check_preprocess(method: str) -> None:
    if method not in PREPROCESSES:
        raise DataError(f"unknown preprocessing {method!r}; choose from {', '.join(PREPROCESSES)}")


def backbone_preprocessing(
    size: int, resize: int, resample: str, mean, std, squash: bool = False, convention: str = "transformers"
) -> dict:
    """A vision backbone's image processor as the store records it: short side to `resize` (`resample`;
    with `squash` both sides, the aspect ratio not kept), centre crop to `size`, [0, 1], then
    (x - mean) / std per channel."""
    how = f"to {resize}x{resize}, aspect not kept" if squash else f"short side to {resize}"
    return {
        "resize": f"{how}, {resample}",
        "size": size,
        "crop": "centre",
        "rounding": convention,
        "channels": 3,
        "range": [0, 1],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def image_channels(path: Path) -> int:
    """1 for a grayscale image, 3 for anything else (what a model trained on this data set should take)."""
    try:
        with Image.open(path) as image:
            return 1 if image.mode in ("1", "L", "I", "F", *SIXTEEN_BIT_MODES) else 3
    except Image.DecompressionBombError as error:
        raise DataError(
            f"cannot read image {path}: {error} Shrink the image, or remove it from the data set."
        ) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise unreadable_image(path, error) from None


def unreadable_image(path: Path, error: BaseException) -> DataError:
    """The one-line error of an image file that does not decode: what is wrong with it, in words (PIL names
    the in-memory copy it decoded, `<_io.BytesIO object at 0x...>`, not the file), and the fix."""
    text = str(error)
    try:
        empty = os.stat(path).st_size == 0
    except OSError:
        empty = False
    if empty:
        reason = "the file is empty"
    elif "cannot identify image file" in text:
        reason = "it is not an image file (its content is no image format PIL reads)"
    elif "truncated" in text or "broken data stream" in text or "unrecognized data stream" in text:
        reason = "the file is truncated or damaged"
    else:
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the file", text) or type(error).__name__
    return DataError(
        f"cannot read image {path}: {reason}. Replace it with a readable copy and run the same command "
        "again (what was finished is kept), or remove it from the data set"
    )


def content_hash(data: bytes) -> int:
    """A 63-bit hash of a file's bytes (blake2b), what the store records to notice a changed image."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def file_record(path: Path) -> tuple[int, int]:
    """(content hash, mtime in ns) of a file, as the store records them."""
    mtime = os.stat(path).st_mtime_ns
    return content_hash(Path(path).read_bytes()), mtime


def read_image(path: Path, size: int, channels: int, **options) -> tuple[torch.Tensor, tuple[int, int]]:
    """`load_image` of the file's bytes (`options` are its keywords), and the (content hash, mtime in ns)
    of exactly those bytes."""
    try:
        mtime = os.stat(path).st_mtime_ns
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read image {path}: {error.strerror}") from None
    return load_image(path, size, channels, data=data, **options), (content_hash(data), mtime)


def load_image(
    path: Path,
    size: int,
    channels: int,
    *,
    data: bytes | None = None,
    crop_bottom: int = 0,
    method: str = "bicubic",
    resize: int | None = None,
    resample: str = "bicubic",
    squash: bool = False,
    convention: str = "project",
    augment=None,
    rng: np.random.Generator | None = None,
    draft: bool = False,
) -> torch.Tensor:
    """(channels, size, size) float32 in [-1, 1]; a file that is not a readable image is a DataError naming it.

    `data`, when given, are the file's bytes already read (the image is decoded from them).
    `crop_bottom` rows are cut off the bottom first (FGVC-Aircraft's copyright banner), before the
    resize and crop. `method` is the resize ("bicubic" or "adm", module docstring). `resize` (default
    `size`) is the short side before the centre crop to `size` (with `squash`, both sides: the aspect
    ratio is not kept), and `resample` the filter: what a backbone's image processor asks for
    (`backbone_preprocessing`). `convention` rounds the long side and the crop offset as this project
    always has ("project": round, floor), as transformers' processors do ("transformers": floor,
    floor) or as torchvision's Resize and CenterCrop do ("torchvision", timm's: floor, round): a
    pixel's shift between them is a different feature. `augment` (a `stages.data.augment.Augment`)
    with its generator `rng` makes an augmented view instead of the centre crop. `draft` decodes a JPEG
    at the smallest 1/2^k scale whose short side is still at least the resize's (module docstring)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if channels not in (1, 3):
        raise DataError(f"models with {channels} input channels are not supported (1 or 3)")
    check_preprocess(method)
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as image:
            side = resize or size
            if augment is not None and augment.crop_fractions is not None:
                low, high = augment.short_sides(size)
                side = int(rng.integers(low, high + 1))
            if draft and not crop_bottom and image.format == "JPEG":
                # both sides stay >= side, so the short side the resize starts from is never below it
                image.draft("RGB" if channels == 3 else "L", (side, side))
            image = _eight_bit_range(image, channels)
            if crop_bottom:
                if image.size[1] <= crop_bottom:
                    raise DataError(
                        f"it is {image.size[1]} pixels high: nothing is left after cutting the "
                        f"{crop_bottom}-pixel banner off its bottom"
                    )
                image = image.crop((0, 0, image.size[0], image.size[1] - crop_bottom))
            image = _resize_short_side(image, side, method, resample=resample, squash=squash, convention=convention)
            if augment is not None and augment.crop:
                image = _pad(image, augment.pad(size))
            if augment is not None and augment.random_crop:
                top = int(rng.integers(0, image.size[1] - size + 1))
                left = int(rng.integers(0, image.size[0] - size + 1))
            elif convention == "torchvision":
                left, top = int(round((image.size[0] - size) / 2)), int(round((image.size[1] - size) / 2))
            else:
                left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
            if augment is not None and augment.flip and rng.random() < augment.flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            array = np.asarray(image, dtype=np.float32)
    except Image.DecompressionBombError as error:
        raise DataError(
            f"cannot read image {path}: {error} Shrink the image, or remove it from the data set."
        ) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise unreadable_image(path, error) from None
    if array.ndim == 2 and channels == 3:  # a 16-bit grayscale image for an RGB model
        array = np.repeat(array[:, :, None], 3, axis=2)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array / 127.5 - 1.0)


def _resize_short_side(
    image: Image.Image,
    side: int,
    method: str,
    *,
    resample: str = "bicubic",
    squash: bool = False,
    convention: str = "project",
) -> Image.Image:
    """The image with its short side `side` pixels (`load_image`'s options): one resize, or guided-diffusion's
    BOX halvings first and then bicubic ("adm")."""
    if method == "adm":  # guided_diffusion/image_datasets.py, center_crop_arr and random_crop_arr
        while min(*image.size) >= 2 * side:
            image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
        scale = side / min(*image.size)
        resized = tuple(round(x * scale) for x in image.size)
        return image.resize(resized, Image.BICUBIC) if resized != image.size else image
    width, height = image.size
    scale = side / min(width, height)
    if squash:
        resized = (side, side)
    elif convention == "project":
        resized = (max(side, round(width * scale)), max(side, round(height * scale)))
    else:
        resized = (side, int(side * height / width)) if width <= height else (int(side * width / height), side)
    return image.resize(resized, RESAMPLING[resample]) if resized != image.size else image


def _pad(image: Image.Image, padding: int) -> Image.Image:
    if padding == 0:
        return image
    padded = Image.new(image.mode, (image.size[0] + 2 * padding, image.size[1] + 2 * padding), 0)
    padded.paste(image, (padding, padding))
    return padded


def _eight_bit_range(image: Image.Image, channels: int) -> Image.Image:
    """The image in the model's channels with values in [0, 255]: 8-bit images as PIL converts them,
    16-bit grayscale as a float image scaled by 255/65535 (PIL's own conversion would clip it)."""
    if image.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(np.asarray(image, dtype=np.float32) * np.float32(255 / 65535), mode="F")
    return image.convert("RGB" if channels == 3 else "L")
