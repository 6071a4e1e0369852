"""Feature stores written directly from known features (`helpers.write_store`), read back."""

from __future__ import annotations

import numpy as np

from cache import FeatureStore

from helpers import digits_features, write_store


def test_written_store_reads_back(tmp_path):
    features, labels = digits_features()
    store = FeatureStore.open(write_store(tmp_path / "s.zarr", features, labels, pools=(1, 2, 4, 8)))
    assert store.blocks == [1, 2] and store.timesteps == [10, 90]
    np.testing.assert_array_equal(store.read("train", 1, 90), features[(1, 90)]["train"])
    np.testing.assert_array_equal(store.labels("val"), labels["val"])
    assert store.missing() == {}
