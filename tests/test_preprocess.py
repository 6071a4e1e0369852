"""`--preprocess adm` is guided-diffusion's center_crop_arr exactly, and the preprocessing is part of the store's
identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cache import FeatureStore
from cache.errors import StoreMismatchError
from stages.data.images import load_image
from stages.extract.plan import ExtractConfig, make_plan
from stages.extract.run import run_extract

from helpers import make_model_dir


def center_crop_arr(pil_image, image_size):
    """guided_diffusion/image_datasets.py (openai/guided-diffusion, and soumik-kanad/diffssl's copy), verbatim."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def reference(path, size: int) -> np.ndarray:
    """ImageDataset.__getitem__ without augmentation: RGB, center_crop_arr, / 127.5 - 1, CHW."""
    arr = center_crop_arr(Image.open(path).convert("RGB"), size)
    return np.transpose(arr.astype(np.float32) / 127.5 - 1, [2, 0, 1])


def smooth_image(path, width: int, height: int, seed: int) -> None:
    """A photo-like image (smooth gradients plus noise), so that the resampling filters differ visibly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([127 + 120 * np.sin(x / (5 + c) + y / (7 + 2 * c)) for c in range(3)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path)


# (width, height): no halving, one, two (short side 4x the model size), odd sizes and both orientations
@pytest.mark.parametrize("width, height", [(20, 24), (24, 20), (40, 33), (64, 64), (64, 90), (101, 67), (130, 200)])
def test_adm_is_center_crop_arr(tmp_path, width, height):
    size = 16
    path = tmp_path / "image.png"
    smooth_image(path, width, height, seed=width * height)
    ours = load_image(path, size, 3, method="adm").numpy()
    assert ours.shape == (3, size, size)
    np.testing.assert_array_equal(ours, reference(path, size))


def test_adm_differs_from_one_bicubic_resize_on_large_images(tmp_path):
    path = tmp_path / "image.png"
    smooth_image(path, 64, 80, seed=1)  # short side 4x the model size: two BOX halvings first
    adm = load_image(path, 16, 3, method="adm").numpy()
    bicubic = load_image(path, 16, 3).numpy()
    assert np.abs(adm - bicubic).max() > 0.02
    np.testing.assert_array_equal(bicubic, load_image(path, 16, 3, method="bicubic").numpy())


def test_default_preprocessing_record_is_unchanged(tiny_model, tiny_data, tmp_path):
    """Stores made before --preprocess existed keep their identity: the default records what they recorded."""
    plan = make_plan(ExtractConfig(model=str(tiny_model), data=str(tiny_data), out=str(tmp_path / "s.zarr")))
    assert plan.settings["preprocessing"] == {
        "resize": "short side, bicubic",
        "size": 16,
        "crop": "centre",
        "channels": 3,
        "range": [-1, 1],
    }
    assert "views" not in plan.settings


def test_preprocess_is_part_of_the_store_identity(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "s.zarr"
    base = dict(model=str(tiny_model), data=str(tiny_data), out=str(out), blocks=(3,), timesteps=(10,), pools=(1,))
    run_extract(ExtractConfig(**base), progress=False)
    with pytest.raises(StoreMismatchError, match="preprocessing"):
        run_extract(ExtractConfig(**base, preprocess="adm"), progress=False)
    run_extract(ExtractConfig(**base, preprocess="adm", overwrite=True), progress=False)
    assert FeatureStore.open(out).attrs["preprocessing"]["method"] == "adm"


def test_model_directory_names_its_preprocessing(tmp_path, tiny_data):
    model = make_model_dir(tmp_path / "model")
    (model / "preprocessing.json").write_text(json.dumps({"preprocess": "adm"}))
    config = dict(model=str(model), data=str(tiny_data), out=str(tmp_path / "s.zarr"))
    assert make_plan(ExtractConfig(**config)).settings["preprocessing"]["method"] == "adm"
    assert "method" not in make_plan(ExtractConfig(**config, preprocess="bicubic")).settings["preprocessing"]


def test_extracted_adm_images_are_the_reference(tmp_path):
    """The store's features are those of the reference preprocessing (compared through the pixel path:
    the U-Net's input of one sample, rebuilt from the image alone)."""
    from stages.data.folders import scan
    from stages.extract.run import _NoisedImages

    from helpers import make_image_folder

    data = make_image_folder(tmp_path / "data", counts={"train": 2}, size=(70, 64))
    split = scan(data, ["train"])["train"]
    x0, *_ = _NoisedImages(split, {"size": 16, "channels": 3, "method": "adm"}, [10], 0, (3, 16, 16))[1]
    np.testing.assert_array_equal(x0.numpy(), reference(split.root / split.paths[1], 16))
