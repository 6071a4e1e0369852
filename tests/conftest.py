"""Shared fixtures: a tiny random-init ADM-shaped U-Net on disk and tiny image folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import make_image_folder, make_model_dir

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


@pytest.fixture(scope="session", autouse=True)
def wds_index_cache(tmp_path_factory):
    """Shard indexes (stages.data.wds.index_cache) are saved in a temporary folder, not the user's cache;
    commands the tests start inherit it."""
    before = os.environ.get("WDS_INDEX_CACHE")
    os.environ["WDS_INDEX_CACHE"] = str(tmp_path_factory.mktemp("wds-index"))
    yield
    if before is None:
        os.environ.pop("WDS_INDEX_CACHE", None)
    else:
        os.environ["WDS_INDEX_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", counts={"train": 23, "val": 9})
