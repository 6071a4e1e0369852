"""The raw-pixel baseline store holds exactly the preprocessed images."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from cache import FeatureStore
from pipeline.cli import main
from stages.data.images import load_image


def test_pixel_store_holds_the_preprocessed_images(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "pixels.zarr"
    result = CliRunner().invoke(
        main, ["pixels", "--data", str(tiny_data), "--out", str(out), "--model", str(tiny_model)]
    )
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(out)
    assert store.attrs["kind"] == "pixels" and store.blocks == [0] and store.timesteps == [0]
    paths = store.paths("val")
    expected = np.stack([load_image(tiny_data / p, 16, 3).numpy() for p in paths])
    np.testing.assert_array_equal(store.read("val", 0, 0), expected)
    np.testing.assert_allclose(
        store.read("val", 0, 0, pool=4), expected.reshape(9, 3, 4, 4, 4, 4).mean((3, 5)), rtol=1e-6, atol=1e-6
    )


def test_pixel_command_needs_a_size(tiny_data, tmp_path):
    result = CliRunner().invoke(main, ["pixels", "--data", str(tiny_data), "--out", str(tmp_path / "p.zarr")])
    assert result.exit_code == 2 and "--model, or both --size and --channels" in result.output
