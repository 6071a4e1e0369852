"""A model directory whose own record holds its weights' sha256 is verified on every load (stages.models.records),
and the error's command, run verbatim, restores it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from stages.data import mnist as default_data
from stages.models.loading import load_model, weights_hash
from stages.models.records import WEIGHTS_FILE, WeightsChangedError, pretrain_command

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """5 real MNIST images per class: 40 train, 10 val."""
    images, labels = default_data._load_mnist_5k()
    keep = np.concatenate([np.flatnonzero(labels == c)[:5] for c in range(10)])
    patch = pytest.MonkeyPatch()
    patch.setattr(default_data, "_load_mnist_5k", lambda: (images[keep], labels[keep]))
    try:
        out = tmp_path_factory.mktemp("data") / "mnist"
        default_data.write_mnist_folder(out, val_fraction=0.2)
    finally:
        patch.undo()
    return out


@pytest.fixture(scope="module")
def made(data_dir, tmp_path_factory):
    """A `pipeline pretrain` output and its `pipeline random-init` twin, made through the command line."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("made")
    runner = CliRunner()
    done = runner.invoke(
        main,
        [
            "pretrain",
            "--data",
            str(data_dir),
            "--out",
            str(root / "ddpm"),
            "--epochs",
            "1",
            "--image-size",
            "8",
            "--channels",
            "32,32",
            "--attention-levels",
            "none",
            "--batch-size",
            "8",
            "--seed",
            "3",
        ],
    )
    assert done.exit_code == 0, done.output
    done = runner.invoke(
        main, ["random-init", "--model", str(root / "ddpm"), "--out", str(root / "twin"), "--seed", "3"]
    )
    assert done.exit_code == 0, done.output
    return root


def damage(directory: Path) -> None:
    tensors = load_file(directory / WEIGHTS_FILE)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, directory / WEIGHTS_FILE)


def run_verbatim(command: str, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def advised_command(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message.split("restore them: ", 1)[1]


def test_an_intact_directory_loads_and_matches_its_record(made):
    for name, record_file in (("ddpm", "train_log.json"), ("twin", "random_init.json")):
        record = json.loads((made / name / record_file).read_text())
        assert load_model(made / name).weights_sha256 == record["weights_sha256"]


def test_the_recorded_command_is_the_one_that_trained_it(made, data_dir):
    log = json.loads((made / "ddpm" / "train_log.json").read_text())
    assert pretrain_command(log, "OUT") == (
        f"pipeline pretrain --data {data_dir} --out OUT --epochs 1 --image-size 8 "
        f"--batch-size 8 --lr 0.002 --channels 32,32 --attention-levels none "
        f"--seed 3"
    )


@pytest.mark.parametrize("name", ["ddpm", "twin"])
def test_changed_weights_are_refused_and_the_advised_command_remakes_them(made, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(made / name, copy)
    damage(copy)
    with pytest.raises(WeightsChangedError, match="changed or damaged") as error:
        load_model(copy)
    command = advised_command(error)
    assert command.startswith("pipeline pretrain" if name == "ddpm" else "pipeline random-init")
    run_verbatim(command, tmp_path)
    loaded = load_model(copy)  # verified against the record the command wrote
    record = json.loads((copy / ("train_log.json" if name == "ddpm" else "random_init.json")).read_text())
    assert loaded.weights_sha256 == record["weights_sha256"]
    if name == "twin":  # no training: the seed alone gives the weights (training's last bits vary with threads)
        assert loaded.weights_sha256 == weights_hash(load_model(made / name).unet)


def test_weights_tracked_by_git_are_restored_by_git(made, tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    shutil.copytree(made / "ddpm", tmp_path / "models" / "ddpm")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "bundle"]):
        subprocess.run(git + args, cwd=tmp_path, check=True, capture_output=True)
    damage(tmp_path / "models" / "ddpm")
    with pytest.raises(WeightsChangedError) as error:
        load_model(tmp_path / "models" / "ddpm")
    command = advised_command(error)
    assert command == f"git checkout -- {tmp_path / 'models' / 'ddpm'}"
    run_verbatim(command, tmp_path)
    assert load_model(tmp_path / "models" / "ddpm").weights_sha256 == load_model(made / "ddpm").weights_sha256


def test_the_command_line_says_it_in_one_line(made, tmp_path):
    from pipeline.cli import main

    shutil.copytree(made / "ddpm", tmp_path / "ddpm")
    damage(tmp_path / "ddpm")
    done = CliRunner().invoke(main, ["random-init", "--model", str(tmp_path / "ddpm"), "--out", str(tmp_path / "r")])
    assert done.exit_code == 1 and "Traceback" not in done.output
    assert "changed or damaged" in done.output and "pipeline pretrain" in done.output
    assert not (tmp_path / "r").exists()


# -- the bundled checkpoint the default pipeline reads ------------------------------------------------------
BUNDLE = REPO / "models" / "ddpm-mnist16"


def test_the_bundled_checkpoint_is_the_defaults_model_and_what_its_record_says():
    import hashlib

    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["extract"]["models"]["pretrained"] == "models/ddpm-mnist16"
    log = json.loads((BUNDLE / "train_log.json").read_text())
    assert log["generator"] == "pipeline pretrain" and log["reproducible"]
    assert load_model(BUNDLE).weights_sha256 == log["weights_sha256"]  # the check every load makes
    # the retraining stage's parameters (models/dvc.yaml) are the bundle's recipe
    recipe = params["pretrain"]
    command = pretrain_command(log, "models/ddpm-mnist16")
    assert command == (
        f"pipeline pretrain --data data/mnist --out models/ddpm-mnist16 --epochs {recipe['epochs']} "
        f"--image-size {recipe['image_size']} --batch-size {recipe['batch_size']} --lr {recipe['lr']:g} "
        f"--channels {recipe['channels']} --attention-levels {recipe['attention_levels']} "
        f"--seed {recipe['seed']}"
    )
    readme = (REPO / "models" / "README.md").read_text()
    assert " ".join(readme.replace("\\\n", " ").split()).count(command) == 1
    assert log["weights_sha256"] in readme and log["init_weights_sha256"] in readme
    for file in ("diffusion_pytorch_model.safetensors", "config.json", "scheduler_config.json"):
        assert f"{hashlib.sha256((BUNDLE / file).read_bytes()).hexdigest()}  {file}" in readme
    assert sum(f.stat().st_size for f in BUNDLE.iterdir()) < 5e6  # small enough for git
