"""A fake CUB-200-2011 through `pipeline extract` and `pipeline probe` with its official splits, and
the per-kind split roles (Flowers-102 chooses on its official val split)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cache import FeatureStore
from pipeline.cli import main

import fake_archives as fa


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_fake_cub_end_to_end_with_the_official_splits(tiny_model, tmp_path):
    root, expected = fa.make_cub(tmp_path / "download", per_class=(6, 3))
    store_path = tmp_path / "cub.zarr"
    result = invoke(
        "extract",
        "--model",
        tiny_model,
        "--data",
        tmp_path / "download",
        "--out",
        store_path,
        "--blocks",
        "3",
        "--timesteps",
        "10",
        "--pool",
        "1",
        "--batch-size",
        "16",
    )
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(store_path)
    assert store.splits == ["train", "test"]
    assert store.classes == fa.CUB_CLASSES
    data = store.attrs["data"]
    assert data["kind"] == "cub" and data["roles"] == {"train": "train", "test": "test"}
    assert set(data["files"]) == {"images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"}
    assert data["splits"] == {"train": 18, "test": 9}
    assert [int(x) for x in store.labels("test")] == [label for _, label in expected["test"]]
    assert store.attrs["data_root"] == str(root.resolve())

    result = invoke("probe", "--store", store_path, "--head", "ridge", "--out", tmp_path / "results", "--no-render")
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "results" / "ridge" / "run.json").read_text())
    assert run["splits"]["train"] == "train" and run["splits"]["test"] == "test"
    assert run["splits"]["validation"].startswith("train (a stratified")  # CUB has no official val
    assert run["data_kind"] == "cub" and run["samples"]["test"] == 9

    # the same store is reopened, not rebuilt, by the same request with the kind named
    again = invoke(
        "extract",
        "--model",
        tiny_model,
        "--data",
        f"cub:{root}",
        "--out",
        store_path,
        "--blocks",
        "3",
        "--timesteps",
        "10",
        "--pool",
        "1",
    )
    assert again.exit_code == 0, again.output


def test_flowers_probe_chooses_on_its_official_val_split(tiny_model, tmp_path):
    root, _ = fa.make_flowers(tmp_path / "flowers")
    store_path = tmp_path / "flowers.zarr"
    result = invoke(
        "extract",
        "--model",
        tiny_model,
        "--data",
        root,
        "--out",
        store_path,
        "--blocks",
        "2",
        "--timesteps",
        "10",
        "--pool",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(store_path).splits == ["train", "val", "test"]
    result = invoke("probe", "--store", store_path, "--head", "ridge", "--out", tmp_path / "r", "--no-render")
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "r" / "ridge" / "run.json").read_text())
    assert run["splits"] == {"train": "train", "validation": "val", "test": "test"}
    # named roles still win
    result = invoke(
        "probe",
        "--store",
        store_path,
        "--head",
        "ridge",
        "--out",
        tmp_path / "r",
        "--name",
        "carved",
        "--val-split",
        "test",
        "--test-split",
        "val",
        "--no-render",
    )
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "r" / "carved" / "run.json").read_text())
    assert run["splits"] == {"train": "train", "validation": "test", "test": "val"}


def test_extract_names_a_missing_file_and_the_layout(tiny_model, tmp_path):
    root, _ = fa.make_dogs(tmp_path)
    (root / "train_list.mat").unlink()
    result = CliRunner().invoke(
        main, ["extract", "--model", str(tiny_model), "--data", f"dogs:{root}", "--out", str(tmp_path / "s.zarr")]
    )
    assert result.exit_code == 1
    assert f"{root / 'train_list.mat'} is missing: Stanford Dogs (dogs:) expects" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s.zarr").exists()


def test_pixels_take_a_kind_and_a_selection(tmp_path):
    root, _ = fa.make_aircraft(tmp_path)
    keep = tmp_path / "keep.txt"
    keep.write_text("F/A-18\n707-320\n")
    result = invoke(
        "pixels", "--data", root, "--classes", keep, "--out", tmp_path / "px.zarr", "--size", "8", "--channels", "3"
    )
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(tmp_path / "px.zarr")
    assert store.splits == ["train", "val", "test"] and store.classes == ["F/A-18", "707-320"]
    assert store.attrs["data"]["crop_bottom"] == 20 and store.attrs["data"]["class_list"]["classes"] == 2
    assert float(store.read("train", block=0, timestep=0, pool=8).max()) == -1.0  # black once the banner is cut
