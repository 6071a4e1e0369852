"""The decode paths against the exact one: torchvision's decode_jpeg gives PIL's pixels; PIL's JPEG draft
stays within the documented tolerance, changes nothing where it cannot reduce, and is recorded in the
store; the DataLoader's default worker count follows a rank's share of the cores."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.data.images import (
    DRAFT_MAX_DIFFERENCE,
    DRAFT_MEAN_DIFFERENCE,
    decode_of,
    load_image,
    preprocessing,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from decode import photographs


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return photographs(6, 500, 375, 90, seed=1)


def test_torchvision_decode_jpeg_gives_pils_pixels(jpegs):
    # torchvision is not a dependency: `make install` leaves it out where PyPI's build does not match torch
    decode_jpeg = pytest.importorskip("torchvision.io", reason="torchvision is not installed").decode_jpeg

    for data in jpegs:
        with Image.open(io.BytesIO(data)) as image:
            expected = np.asarray(image.convert("RGB"))
        decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("size", [128, 64])
@pytest.mark.parametrize("method", ["bicubic", "adm"])
def test_draft_stays_within_the_documented_tolerance_of_exact(jpegs, size, method):
    differences = torch.stack(
        [
            (
                load_image("x", size, 3, data=d, method=method, draft=True)
                - load_image("x", size, 3, data=d, method=method)
            ).abs()
            for d in jpegs
        ]
    )
    assert 0 < differences.max() <= DRAFT_MAX_DIFFERENCE
    assert differences.mean() <= DRAFT_MEAN_DIFFERENCE


def test_draft_is_exact_where_it_cannot_reduce(jpegs, tmp_path):
    # 500x375 for a 256-pixel model: half would be 188 pixels high, below 256
    for data in jpegs[:2]:
        torch.testing.assert_close(
            load_image("x", 256, 3, data=data, draft=True), load_image("x", 256, 3, data=data), rtol=0, atol=0
        )
    png = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).save(png, "PNG")  # draft applies to JPEG only
    torch.testing.assert_close(
        load_image("x", 64, 3, data=png.getvalue(), draft=True),
        load_image("x", 64, 3, data=png.getvalue()),
        rtol=0,
        atol=0,
    )


def test_the_decode_is_recorded_only_when_it_is_draft():
    assert preprocessing(256, 3) == {
        "resize": "short side, bicubic",
        "size": 256,
        "crop": "centre",
        "channels": 3,
        "range": [-1, 1],
    }
    assert decode_of(preprocessing(256, 3)) == "exact"
    assert decode_of(preprocessing(256, 3, "adm", "draft")) == "draft"
    assert preprocessing(256, 3, "adm", "draft")["method"] == "adm"


def test_an_extraction_with_draft_records_it_and_decodes_so(tiny_model, tmp_path):
    from cache import FeatureStore
    from stages.extract.plan import ExtractConfig, make_plan
    from stages.extract.run import run_extract

    folder = tmp_path / "images"
    for i, data in enumerate(photographs(4, 64, 48, 90, seed=2)):  # 64x48 for a 16-pixel model: draft halves it
        (folder / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / "train" / f"c{i % 2}" / f"{i}.jpg").write_bytes(data)
    common = {
        "model": str(tiny_model),
        "data": str(folder),
        "blocks": (2,),
        "timesteps": (10,),
        "pools": (1,),
        "splits": ("train",),
    }
    plan = make_plan(ExtractConfig(out=str(tmp_path / "draft.zarr"), decode="draft", **common))
    assert plan.image_options("train")["draft"] is True
    run_extract(ExtractConfig(out=str(tmp_path / "draft.zarr"), decode="draft", **common), progress=False)
    run_extract(ExtractConfig(out=str(tmp_path / "exact.zarr"), **common), progress=False)
    draft, exact = FeatureStore.open(tmp_path / "draft.zarr"), FeatureStore.open(tmp_path / "exact.zarr")
    assert decode_of(draft.attrs["preprocessing"]) == "draft"
    assert "decode" not in exact.attrs["preprocessing"]
    assert not np.array_equal(draft.read("train", 2, 10), exact.read("train", 2, 10))


@pytest.mark.parametrize(
    ("cores", "local_ranks", "expected"), [(64, 8, 4), (16, 8, 1), (16, 4, 3), (2, 1, 1), (32, 1, 4)]
)
def test_default_workers_follow_a_ranks_share_of_the_cores(monkeypatch, cores, local_ranks, expected):
    from stages.extract.run import WORKERS_PER_GPU, default_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert WORKERS_PER_GPU == 4
    assert default_workers(torch.device("cuda")) == expected
    assert default_workers(torch.device("cpu")) == 0
