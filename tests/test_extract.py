"""Extraction: stored features equal an independent full forward pass, whatever the batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from cache import FeatureStore
from pipeline.options import parse_block_spec
from stages.extract import noise
from stages.extract.plan import ExtractConfig
from stages.extract.run import run_extract

from helpers import reference_image

TIMESTEPS = (0, 90, 500)
POOLS = (1, 2, 4)


def reference_features(model_dir, data_dir, split, paths, timestep, seed=0):
    """{module path: (N, C, H, W)} from a plain full forward pass with hooks on every block module."""
    unet = UNet2DModel.from_pretrained(model_dir, low_cpu_mem_usage=False).eval()
    abar = DDPMScheduler.from_pretrained(model_dir).alphas_cumprod.double()
    x0 = torch.stack([reference_image(data_dir / p, unet.config.sample_size) for p in paths])
    eps = torch.stack([noise(seed, i, timestep, x0.shape[1:]) for i in range(len(paths))])
    xt = (abar[timestep].sqrt() * x0 + (1 - abar[timestep]).sqrt() * eps).float()
    outputs = {}
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
        for name, module in unet.named_modules()
        if name
    ]
    with torch.no_grad():
        unet(xt, torch.full((len(paths),), timestep))
    for handle in handles:
        handle.remove()
    return outputs


@pytest.fixture(scope="module")
def store_f32(tiny_model, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "f.zarr"
    config = ExtractConfig(
        model=str(tiny_model),
        data=str(tiny_data),
        out=str(out),
        blocks=parse_block_spec("all"),
        timesteps=TIMESTEPS,
        pools=POOLS,
        batch_size=7,
        dtype="float32",
        chunk_samples=8,
    )
    run_extract(config, progress=False)
    return FeatureStore.open(out)


def test_noise_is_a_pure_function_of_seed_index_timestep():
    a = noise(3, 17, 90, (3, 4, 4))
    assert torch.equal(a, noise(3, 17, 90, (3, 4, 4)))
    assert not torch.equal(a, noise(3, 18, 90, (3, 4, 4)))
    assert not torch.equal(a, noise(3, 17, 91, (3, 4, 4)))
    assert not torch.equal(a, noise(4, 17, 90, (3, 4, 4)))
    assert a.dtype == torch.float32


@pytest.mark.parametrize("timestep", TIMESTEPS)
def test_every_stored_feature_equals_a_plain_forward_pass(store_f32, tiny_model, tiny_data, timestep):
    for split in store_f32.splits:
        paths = store_f32.paths(split)
        reference = reference_features(tiny_model, tiny_data, split, paths, timestep)
        for row in store_f32.attrs["block_table"]:
            full = reference[row["module"]]
            assert full.shape[1:] == (row["channels"], row["resolution"], row["resolution"])
            for pool in POOLS:
                expected = F.adaptive_avg_pool2d(full, min(pool, row["resolution"])).numpy()
                stored = store_f32.read(split, row["number"], timestep, pool=pool)
                np.testing.assert_allclose(
                    stored,
                    expected,
                    rtol=1e-5,
                    atol=1e-5,
                    err_msg=f"{split} block {row['number']} t={timestep} pool={pool}",
                )


def test_store_records_labels_paths_and_settings(store_f32, tiny_data):
    assert store_f32.splits == ["train", "val"]
    assert len(store_f32.paths("train")) == 23 and len(store_f32.labels("val")) == 9
    assert store_f32.paths("train") == sorted(store_f32.paths("train"))
    assert store_f32.labels("train").tolist() == [int(p.split("/")[1][-1]) for p in store_f32.paths("train")]
    attrs = store_f32.attrs
    assert attrs["noise_seed"] == 0 and attrs["dtype"] == "float32" and len(attrs["block_table"]) == 13
    assert len(attrs["model"]["weights_sha256"]) == 64 and attrs["data"]["classes"] == ["class0", "class1", "class2"]
    assert store_f32.timesteps == list(TIMESTEPS) and store_f32.blocks == list(range(1, 14))
    assert not store_f32.missing()


def test_batch_size_and_truncation_do_not_change_features(store_f32, tiny_model, tiny_data, tmp_path):
    # batch size 1 and only blocks up to the middle: the pass stops early, the numbers must not move
    out = tmp_path / "b1.zarr"
    config = ExtractConfig(
        model=str(tiny_model),
        data=str(tiny_data),
        out=str(out),
        blocks=parse_block_spec("2,5-7"),
        timesteps=(90,),
        pools=POOLS,
        batch_size=1,
        dtype="float32",
        chunk_samples=8,
    )
    run_extract(config, progress=False)
    small = FeatureStore.open(out)
    assert small.blocks == [2, 5, 6, 7]
    for block in small.blocks:
        np.testing.assert_allclose(small.read("val", block, 90), store_f32.read("val", block, 90), rtol=1e-5, atol=1e-6)


def test_truncated_pass_stops_after_deepest_block(tiny_model, tiny_data, tmp_path, monkeypatch):
    ran = []
    original = torch.nn.Conv2d.forward

    def spy(self, x):
        ran.append(self)
        return original(self, x)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    config = ExtractConfig(
        model=str(tiny_model),
        data=str(tiny_data),
        out=str(tmp_path / "s.zarr"),
        blocks=parse_block_spec("1"),
        timesteps=(10,),
        batch_size=32,
        splits=("val",),
    )
    run_extract(config, progress=False)
    assert len(ran) == 1  # conv_in only, not one convolution more


def test_float16_store_matches_float32_store(store_f32, tiny_model, tiny_data, tmp_path):
    out = tmp_path / "h.zarr"
    run_extract(
        ExtractConfig(
            model=str(tiny_model),
            data=str(tiny_data),
            out=str(out),
            blocks=parse_block_spec("4,9"),
            timesteps=(90,),
            pools=POOLS,
            batch_size=5,
            chunk_samples=8,
        ),
        progress=False,
    )
    half = FeatureStore.open(out)
    for block in (4, 9):
        np.testing.assert_allclose(
            half.read("train", block, 90, pool=1), store_f32.read("train", block, 90, pool=1), rtol=2e-3, atol=2e-3
        )


def test_dask_reader_matches_numpy_reader(store_f32):
    lazy = store_f32.read_dask("train", 8, 90, pool=2)
    np.testing.assert_array_equal(lazy.compute(), store_f32.read("train", 8, 90, pool=2))
    assert lazy.chunks[0] == (8, 8, 7)


def test_plain_zarr_and_xarray_can_read_the_store(store_f32):
    import xarray as xr
    import zarr

    group = zarr.open_group(store_f32.path, mode="r")
    assert group["train/block8/t90"].shape == (23, 64, 4, 4)
    dataset = xr.open_zarr(store_f32.path, group="train/block8", consolidated=False)
    assert set(dataset.data_vars) == {"t0", "t90", "t500"}
    assert dataset["t90"].dims == ("sample", "channel", "y", "x")


def test_weights_hash_ignores_memory_format(tiny_model):
    """A GPU run converts the model to channels-last; its 1x1 convolution weights then count as
    contiguous with a last stride != 1, and the recorded hash must not change (or fail)."""
    from stages.models.loading import load_model, weights_hash

    unet = load_model(str(tiny_model)).unet
    before = weights_hash(unet)
    unet = unet.to(memory_format=torch.channels_last)
    assert any(t.dim() == 4 and t.shape[-1] == 1 and t.stride(-1) != 1 for t in unet.state_dict().values())
    assert weights_hash(unet) == before


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    from stages.data.images import load_image

    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as image:
        assert image.mode == "I;16"
    x = load_image(tmp_path / "ramp.png", 16, 1)
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535 * 2 - 1)[None]
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)  # 8-bit clipping would put 99% of it at 1.0
    assert float((x == 1.0).float().mean()) < 0.01
