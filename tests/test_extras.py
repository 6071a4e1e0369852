"""Optional parts: with an extra's packages missing, the command that needs them fails with one line
naming the extra and a pip command for it; pyproject.toml's extras and `cache.extras` agree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cache.extras import EXTRAS, MissingExtraError, install_command, require

from helpers import digits_features, run_without, write_store

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_extras_are_the_ones_the_code_names():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    assert extras["all"] == [f"diffusion-feature-cache[{','.join(EXTRAS)}]"]
    # the Makefile's set-up without a working torchvision: every extra but timm's
    no_timm = next(line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("NO_TIMM :="))
    assert set(no_timm.split(":=")[1].strip().split(",")) == set(EXTRAS) - {"backbones"}


def test_require_names_the_extra_and_a_pip_command_for_this_interpreter():
    with pytest.raises(MissingExtraError) as caught:
        require("no_such_module_for_the_test", "s3", "an S3 store")
    message = str(caught.value)
    assert "\n" not in message and "[s3]" in message
    assert message.endswith(install_command("s3"))
    assert install_command("s3").startswith(f"{sys.executable} -m pip install 'diffusion-feature-cache[s3]'")
    assert require("json", "s3", "x").__name__ == "json"


@pytest.mark.slow  # a pipeline process with modules blocked
def test_s3_without_the_s3_extra(tmp_path):
    done = run_without(["s3fs"], "verify", "--store", "s3://bucket/features.zarr", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "[s3]" in last and "pip install 'diffusion-feature-cache[s3]'" in last, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # a pipeline process with modules blocked
def test_sweep_on_workers_without_the_cluster_extra(tmp_path):
    features, labels = digits_features(n_train=200)
    store = write_store(tmp_path / "digits.zarr", features, labels)
    done = run_without(
        ["distributed", "dask_jobqueue"],
        "sweep",
        "--store",
        str(store),
        "--head",
        "linear",
        "--workers",
        "2",
        "--out",
        str(tmp_path / "results"),
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "[cluster]" in last and "pip install 'diffusion-feature-cache[cluster]'" in last, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("metrics.json"))


@pytest.mark.slow  # a pipeline process with modules blocked
def test_timm_backbone_without_timm(tmp_path):
    done = run_without(["timm"], "blocks", "--model", "timm:resnet18", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "[backbones]" in last and "--model timm:resnet18" in last and "Traceback" not in done.stderr, done.stderr
