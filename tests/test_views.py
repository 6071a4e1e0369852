"""Augmented views in the store (`extract --views K --augment ...`) and probes that train on one view per sample
per epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from diffusers import DDPMScheduler, UNet2DModel

from cache import FeatureStore
from cache.errors import ConfigError, StoreMismatchError
from pipeline.cli import main
from stages.data.augment import Augment, parse_augment, view_generator
from stages.data.images import load_image
from stages.extract import noise
from stages.extract.plan import ExtractConfig, make_plan
from stages.extract.run import run_extract
from stages.probe.features import Layout, MemorySource, Reader, StreamSource, Views
from stages.probe.plan import Combo, view_choice
from stages.probe.run import run_probe
from stages.probe.settings import ProbeSettings

AUGMENT = "resized-crop,crop=1,flip"
BLOCKS, TIMESTEPS = (3, 7), (10, 50)


def config(model, data, out, **extra) -> ExtractConfig:
    return ExtractConfig(
        model=str(model),
        data=str(data),
        out=str(out),
        blocks=BLOCKS,
        timesteps=TIMESTEPS,
        pools=(1, 2),
        chunk_samples=8,
        dtype="float32",
        **extra,
    )


@pytest.fixture(scope="module")
def stores(tiny_model, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    run_extract(config(tiny_model, tiny_data, root / "plain.zarr"), progress=False)
    run_extract(config(tiny_model, tiny_data, root / "views.zarr", views=3, augment=AUGMENT), progress=False)
    return FeatureStore.open(root / "plain.zarr"), FeatureStore.open(root / "views.zarr")


def test_parse_augment_table():
    assert parse_augment("resized-crop,flip") == Augment(crop_fractions=(0.8, 1.0), flip=0.5)
    assert parse_augment("resized-crop=0.9-1.0, crop=2") == Augment(crop_fractions=(0.9, 1.0), crop=True, padding=2)
    assert parse_augment("flip=0.25").record(16) == [{"name": "flip", "p": 0.25}]
    assert Augment(crop_fractions=(0.8, 1.0)).short_sides(256) == (256, 320)  # the paper's [256, 320]
    for bad, message in (
        ("rotate", "unknown augmentation 'rotate'"),
        ("flip,flip", "named twice"),
        ("crop,crop=2", "named twice"),
        ("resized-crop=1.2-0.3", "0 < A <= B <= 1"),
        ("crop=x", "cannot read the parameter"),
        ("", "names no augmentation"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_augment(bad)


def test_view_zero_and_evaluation_splits_equal_a_store_without_views(stores):
    plain, views = stores
    assert plain.views("train") == 1 and views.views("train") == 3 and views.views("val") == 1
    assert views.splits == plain.splits == ["train", "val"]
    assert "views" not in plain.attrs and views.attrs["views"]["count"] == 3
    # index digests are keyed by the identity settings (views among them), and the recipe names the views asked for
    derived = ("views", "splits", "index_digests", "recipe")
    assert {k: v for k, v in views.attrs.items() if k not in derived} == {
        k: v for k, v in plain.attrs.items() if k not in derived
    }
    assert views.attrs["recipe"] == {**plain.attrs["recipe"], "views": 3, "augment": AUGMENT}
    assert sorted(views.attrs["index_digests"]) == ["train", "train@view1", "train@view2", "val"]
    for split in plain.splits:
        for b, t in plain.arrays():
            np.testing.assert_array_equal(views.read(split, b, t), plain.read(split, b, t))
    one = views.read("train", 3, 10, view=1)
    assert one.shape == plain.read("train", 3, 10).shape and not np.array_equal(one, plain.read("train", 3, 10))
    with pytest.raises(KeyError, match="3 view"):
        views.read("train", 3, 10, view=3)


def test_each_view_is_recomputable_from_the_image(stores, tiny_model, tiny_data):
    """View v of sample i: the documented draws and noise, one plain forward pass with a hook, pooled."""
    _, store = stores
    unet = UNet2DModel.from_pretrained(tiny_model, low_cpu_mem_usage=False).eval()
    abar = DDPMScheduler.from_pretrained(tiny_model).alphas_cumprod.double()
    augment = parse_augment(AUGMENT)
    table = {row["number"]: row for row in store.attrs["block_table"]}
    paths = store.paths("train")
    for view in (1, 2):
        for index in (0, 5, len(paths) - 1):
            x0 = load_image(tiny_data / paths[index], 16, 3, augment=augment, rng=view_generator(0, index, view))
            for t in TIMESTEPS:
                eps = noise(0, index, t, x0.shape, view)
                xt = (abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps).float()[None]
                captured = {}
                for block in BLOCKS:
                    module = unet.get_submodule(table[block]["module"])
                    handle = module.register_forward_hook(lambda m, i, o, b=block, c=captured: c.__setitem__(b, o))
                    with torch.no_grad():
                        unet(xt, torch.tensor([t]))
                    handle.remove()
                    expected = F.adaptive_avg_pool2d(captured[block], store.block_info(block)["grid"])[0].numpy()
                    stored = store.read_chunk("train", block, t, index // 8, view=view)[index % 8]
                    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)


def test_views_draw_differently_and_repeat_exactly(tiny_data):
    path = next((tiny_data / "train").rglob("*.png"))
    augment = parse_augment(AUGMENT)

    def draw(index, view):
        return load_image(path, 16, 3, augment=augment, rng=view_generator(0, index, view))

    assert torch.equal(draw(3, 1), draw(3, 1))
    assert not torch.equal(draw(3, 1), draw(3, 2)) and not torch.equal(draw(3, 1), draw(4, 1))
    assert not torch.equal(noise(0, 3, 10, (3, 4, 4), 1), noise(0, 3, 10, (3, 4, 4)))
    assert torch.equal(noise(0, 3, 10, (3, 4, 4), 0), noise(0, 3, 10, (3, 4, 4)))


def test_views_are_part_of_the_store_identity(stores, tiny_model, tiny_data):
    _, store = stores
    with pytest.raises(StoreMismatchError, match="views"):
        run_extract(config(tiny_model, tiny_data, store.path, views=3, augment="resized-crop"), progress=False)
    with pytest.raises(StoreMismatchError, match="views"):
        run_extract(config(tiny_model, tiny_data, store.path), progress=False)
    run_extract(
        config(tiny_model, tiny_data, store.path, views=3, augment=AUGMENT), progress=False
    )  # resumes: nothing to do
    with pytest.raises(ConfigError, match="--views"):
        run_extract(config(tiny_model, tiny_data, store.path, augment=AUGMENT), progress=False)


def test_view_choice_is_a_seeded_function_of_seed_epoch_index():
    rows = np.arange(4000)
    a = view_choice(0, 3, rows, 4)
    np.testing.assert_array_equal(a[[5, 17, 900]], view_choice(0, 3, np.array([5, 17, 900]), 4))
    assert not np.array_equal(a, view_choice(0, 4, rows, 4)) and not np.array_equal(a, view_choice(1, 3, rows, 4))
    assert set(np.unique(a)) == {0, 1, 2, 3} and np.bincount(a).min() > 900
    assert not view_choice(0, 3, rows, 1).any()


@pytest.mark.parametrize("source", ["memory", "stream"])
def test_training_rows_read_their_epochs_view_and_evaluation_rows_view_zero(stores, source):
    _, store = stores
    combo = Combo(((3, 10),), 1, ((32, 1),))
    reader, layout = Reader(store, combo.pieces), Layout([combo], flat=True)
    n = store.num_samples("train")
    identity = {combo.pieces[0]: (np.zeros((32, 1, 1), np.float32), np.ones((32, 1, 1), np.float32))}
    views = Views(3, seed=7)
    if source == "memory":
        data = MemorySource(reader, layout, "train", np.ones(n, bool), False, raw=True, views=views)
    else:
        data = StreamSource(reader, layout, "train", identity, views=views)
    stored = [store.read("train", 3, 10, pool=1, view=v).reshape(n, -1) for v in range(3)]
    chunks = list(range(store.num_chunks("train")))
    for epoch in (0, 1, 5):
        packed, local = data.window(chunks, epoch)
        rows = np.arange(n)
        got = layout.take(packed, local(rows), torch.device("cpu"))[0][0].numpy()
        chosen = view_choice(7, epoch, rows, 3)
        np.testing.assert_array_equal(got, np.stack([stored[v][i] for i, v in zip(rows, chosen)]))
    packed, local = data.window(chunks)  # validation: the centre view
    np.testing.assert_array_equal(
        layout.take(packed, local(np.arange(n)), torch.device("cpu"))[0][0].numpy(), stored[0]
    )


def test_probe_with_one_view_is_bit_for_bit_a_probe_without_views(stores, tmp_path):
    plain, views = stores
    common = dict(head="linear", blocks=(3,), timesteps=(10,), pools=(1,), epochs=3, batch_size=8, lrs=(1e-2,))
    a = run_probe(ProbeSettings(store=plain.path, out=str(tmp_path / "a"), **common))
    b = run_probe(ProbeSettings(store=views.path, out=str(tmp_path / "b"), views=1, **common))
    c = run_probe(ProbeSettings(store=views.path, out=str(tmp_path / "c"), **common))
    assert a.rows == b.rows and a.record["views"]["train"] == 1 and c.record["views"]["train"] == 3
    assert a.rows != c.rows  # the augmented views change the training
    pa, pb = (np.load(r.run_dir / "predictions.npz") for r in (a, b))
    assert all(np.array_equal(pa[k], pb[k]) for k in pa.files)
    with pytest.raises(Exception, match="holds 3 view"):
        run_probe(ProbeSettings(store=views.path, out=str(tmp_path / "d"), views=4, **common))


def test_dry_run_shows_the_cost_of_views(tiny_model, tiny_data, tmp_path):
    def dry_run(*extra):
        result = CliRunner().invoke(
            main,
            [
                "extract",
                "--model",
                str(tiny_model),
                "--data",
                str(tiny_data),
                "--out",
                str(tmp_path / "s.zarr"),
                "--blocks",
                "3",
                "--dry-run",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        return result.output

    one, four = dry_run(), dry_run("--views", "4", "--augment", "resized-crop,crop")
    assert "train@view3" in four and "views: train 4" in four and "train@view1" not in one
    passes = lambda text, split: [line for line in text.splitlines() if line.startswith(f"{split}: ")]  # noqa: E731
    assert passes(four, "train@view2")[0].split(":", 1)[1] == passes(one, "train")[0].split(":", 1)[1]

    def nbytes(plan, split):
        return sum(int(np.prod(shape)) for s, _, _, shape in plan.arrays() if s == split)

    plan1 = make_plan(config(tiny_model, tiny_data, tmp_path / "s.zarr"))
    plan4 = make_plan(config(tiny_model, tiny_data, tmp_path / "s.zarr", views=4))
    total = lambda plan: sum(int(np.prod(shape)) for *_, shape in plan.arrays())  # noqa: E731
    assert total(plan4) == total(plan1) + 3 * nbytes(plan1, "train")
