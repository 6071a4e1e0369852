"""The extract and blocks commands through click, bad input first."""

from __future__ import annotations

import re
import shlex
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cache import FeatureStore
from pipeline.cli import main
from pipeline.options import parse_block_spec

from helpers import make_image_folder


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("24", [24]),
        ("18-20", [18, 19, 20]),
        ("6,12,18-20", [6, 12, 18, 19, 20]),
        (" 3 , 1-2 ", [1, 2, 3]),
        ("all", None),
        ("ALL", None),
        ("5,5", [5]),
    ],
)
def test_block_spec_parser(spec, expected):
    assert parse_block_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "a", "3-", "-3", "4-2", "1;2", "1.5", "1--2"])
def test_block_spec_parser_rejects(spec):
    with pytest.raises(ValueError):
        parse_block_spec(spec)


def test_blocks_command_prints_the_table(tiny_model):
    result = invoke("blocks", "--model", tiny_model)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 14 and "mid_block" in result.output and "middle_block" in result.output


def test_missing_model_directory_names_the_path(tmp_path):
    result = invoke("blocks", "--model", tmp_path / "nope")
    assert result.exit_code == 1 and f"{tmp_path / 'nope'}: no such directory" in result.output


def test_hub_id_without_network_says_how_to_pass_a_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("blocks", "--model", "google/ddpm-cifar10-32-not-cached")
    assert result.exit_code == 1
    assert "Hugging Face Hub" in result.output and "--model models/NAME" in result.output


def extract_args(model, data, out, *extra):
    return ["extract", "--model", model, "--data", data, "--out", out, *extra]


def test_unknown_block_lists_the_valid_range(tiny_model, tiny_data, tmp_path):
    result = invoke(*extract_args(tiny_model, tiny_data, tmp_path / "s.zarr", "--blocks", "12-14"))
    assert result.exit_code == 1
    assert "unknown block(s) 14: this model has blocks 1-13" in result.output and "pipeline blocks" in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_malformed_blocks_is_a_usage_error(tiny_model, tiny_data, tmp_path):
    result = invoke(*extract_args(tiny_model, tiny_data, tmp_path / "s.zarr", "--blocks", "18-x"))
    assert result.exit_code == 2 and "cannot read block list '18-x'" in result.output


def test_timestep_out_of_range(tiny_model, tiny_data, tmp_path):
    result = invoke(*extract_args(tiny_model, tiny_data, tmp_path / "s.zarr", "--timesteps", "10,1000"))
    assert result.exit_code == 1 and "timestep(s) [1000] outside [0, 1000)" in result.output
    result = invoke(*extract_args(tiny_model, tiny_data, tmp_path / "s.zarr", "--timesteps", "ten"))
    assert result.exit_code == 2 and "comma list of integers" in result.output


def test_empty_split_and_missing_data(tiny_model, tmp_path):
    data = make_image_folder(tmp_path / "d", counts={"train": 4})
    (data / "val" / "class0").mkdir(parents=True)
    result = invoke(*extract_args(tiny_model, data, tmp_path / "s.zarr"))
    assert result.exit_code == 1 and "split 'val'" in result.output and "has no images" in result.output
    result = invoke(*extract_args(tiny_model, tmp_path / "none", tmp_path / "s.zarr"))
    assert result.exit_code == 1 and "no such directory" in result.output
    shutil.rmtree(data / "val")
    result = invoke(*extract_args(tiny_model, data, tmp_path / "s.zarr"))
    assert result.exit_code == 1 and f"no split folder {data / 'val'}" in result.output


def test_unreadable_image_is_named_and_finished_chunks_survive(tiny_model, tmp_path):
    """A store an earlier run finished keeps every finished chunk when a later run meets a damaged image.
    (A run that created the store itself removes it: tests/test_bad_input.py, the same command then finishes.)"""
    data = make_image_folder(tmp_path / "d", counts={"train": 12, "val": 3}, classes=1)
    broken = data / "train" / "class0" / "img0010.png"
    out = tmp_path / "s.zarr"
    common = ("--chunk-samples", "4", "--shard-samples", "4", "--batch-size", "2")
    assert invoke(*extract_args(tiny_model, data, out, "--blocks", "3", *common)).exit_code == 0
    before = FeatureStore.open(out).read("train", 3, 90)
    broken.write_bytes(b"x" * broken.stat().st_size)  # same size: the same data set by its listing, unreadable
    result = invoke(*extract_args(tiny_model, data, out, "--blocks", "3,4", *common))
    assert result.exit_code == 1 and "train/class0/img0010.png" in result.output, result.output
    assert "Traceback" not in result.output and result.output.count("--overwrite") == 1, result.output
    store = FeatureStore.open(out)
    assert store.missing().get(("train", 3, 90), []) == []  # block 3, finished before, is whole
    np.testing.assert_array_equal(store.read("train", 3, 90), before)


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "s.zarr"
    result = invoke(
        *extract_args(tiny_model, tiny_data, out, "--blocks", "5-8", "--timesteps", "10,90,150", "--dry-run")
    )
    assert result.exit_code == 0, result.output
    assert "train: 23 images" in result.output and "total" in result.output and "MB" in result.output
    assert not out.exists()


def test_fp16_on_cpu_is_refused(tiny_model, tiny_data, tmp_path):
    result = invoke(*extract_args(tiny_model, tiny_data, tmp_path / "s.zarr", "--precision", "fp16", "--device", "cpu"))
    assert result.exit_code == 1 and "fp16 needs a CUDA device" in result.output


def test_a_store_of_other_settings_is_replaced_by_running_the_advice_verbatim(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "s.zarr"
    assert invoke(*extract_args(tiny_model, tiny_data, out, "--blocks", "3", "--timesteps", "90")).exit_code == 0
    result = invoke(
        *extract_args(tiny_model, tiny_data, out, "--blocks", "3", "--timesteps", "90", "--noise-seed", "7")
    )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert FeatureStore.open(out).attrs["noise_seed"] == 0  # refused: nothing of the old store is lost
    command = re.search(r"To replace it, run: `([^`]+)`", result.output)
    assert command, result.output
    argv = shlex.split(command.group(1))
    assert argv[0] == "pipeline" and argv[-1] == "--overwrite"
    assert invoke(*argv[1:]).exit_code == 0
    replaced = FeatureStore.open(out)
    assert replaced.attrs["noise_seed"] == 7 and replaced.missing() == {}


def test_the_overwrite_advice_repeats_only_an_extraction_and_never_a_credential():
    from pipeline.advice import overwrite_command

    assert overwrite_command(["-q", "extract", "--out", "a b"]) == "pipeline -q extract --out 'a b' --overwrite"
    assert overwrite_command(["extract", "--overwrite"]) == "pipeline extract --overwrite"
    assert overwrite_command(["probe", "--store", "x"]) is None and overwrite_command(None) is None
    assert overwrite_command(["extract", "--storage-option", "secret=abc"]) is None
    assert overwrite_command(["extract", "--storage-option", "client_kwargs.region_name=x"]) is not None
