"""Shared fixtures: a tiny random-init ADM-shaped U-Net on disk and tiny image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from stages.models.unet_configs import tiny_adm_config

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test model and probe is tiny: intra-op and BLAS threads only add synchronisation, which
    on a busy 2-core machine made single convolutions and solves 50-200x slower. Results do not
    depend on the thread count, but float sums do: session scope puts every fixture on one setting."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


def make_model_dir(path: Path, *, image_size: int = 16, in_channels: int = 3, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    unet = UNet2DModel(**tiny_adm_config(image_size=image_size, in_channels=in_channels))
    # Zero-initialised output convolutions would hide mapping errors: give every weight a value.
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0, 0.05)
    unet.save_pretrained(path)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path)
    return path


def make_image_folder(root: Path, *, counts: dict[str, int], classes: int = 3, size=(20, 24), seed: int = 0,
                      mode: str = "RGB", suffix: str = ".png") -> Path:
    """`counts` images per split, spread over `classes` folders; odd sizes exercise resize and crop."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for i in range(count):
            directory = root / split / f"class{i % classes}"
            directory.mkdir(parents=True, exist_ok=True)
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(directory / f"img{i:04d}{suffix}")
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", counts={"train": 23, "val": 9})
