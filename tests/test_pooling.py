"""The one pooling definition: torch's bins, the same numbers for numpy arrays and torch tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cache.pooling import adaptive_avg_pool, derivable, stored_grid


@pytest.mark.parametrize(
    "shape, out",
    [
        ((5, 3, 8, 8), 2),
        ((5, 3, 8, 8), 1),
        ((4, 2, 16, 16), 4),
        ((5, 3, 7, 7), 2),
        ((5, 3, 7, 7), 3),
        ((3, 2, 6, 6), 4),
        ((2, 2, 5, 5), 5),
    ],
)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_numpy_and_torch_give_identical_numbers_and_torch_bins(shape, out, dtype):
    x = np.random.default_rng(0).normal(size=shape).astype(dtype)
    from_numpy = adaptive_avg_pool(x, out)
    from_torch = adaptive_avg_pool(torch.from_numpy(x), out)
    assert isinstance(from_numpy, np.ndarray) and isinstance(from_torch, torch.Tensor)
    assert from_numpy.dtype == np.float32 and from_numpy.shape == (shape[0], shape[1], out, out)
    np.testing.assert_array_equal(from_numpy, from_torch.numpy())
    reference = F.adaptive_avg_pool2d(torch.from_numpy(x.astype(np.float32)), out).numpy()
    np.testing.assert_allclose(from_numpy, reference, rtol=1e-6, atol=1e-6)


def test_a_grid_already_of_the_size_is_returned_as_float32():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float16).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(adaptive_avg_pool(x, 2), x.astype(np.float32))


def test_stored_grids_derive_every_requested_pool_exactly():
    assert stored_grid(16, [1, 2, 4]) == 4 and stored_grid(16, [3]) == 16 and stored_grid(8, [16]) == 8
    assert derivable(4, 16, 2) and derivable(16, 16, 3) and not derivable(4, 16, 3)
