"""Pretraining the default DDPM and its random-init twin, on a few dozen real digits with a tiny U-Net."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stages.data import mnist as default_data
from stages.models.blocks import block_table
from stages.models.loading import load_model, weights_hash
from stages.pretrain.ddpm import load_train_images, pretrain_ddpm
from stages.pretrain.random_init import random_init_copy

TINY = dict(image_size=8, channels=(32, 32), layers_per_block=1, attention_levels=(1,), head_channels=32, batch_size=8)


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
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpm") / "ddpm"
    log = pretrain_ddpm(data_dir, out, epochs=4, seed=0, log_every=1, progress=False, **TINY)
    return out, log


def test_loader_reads_train_only_scaled(data_dir):
    images = load_train_images(data_dir, 8)
    assert images.shape == (40, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.min() < -0.9 and images.max() > 0.5  # black background, bright strokes


def test_loss_goes_down(trained):
    _, log = trained
    losses = [point["loss"] for point in log["loss_curve"]]
    assert log["steps"] == 20 == len(losses)  # 4 epochs x 5 batches of 8
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:2])
    assert log["final_loss"] == pytest.approx(np.mean(losses[-5:]))


def test_log_records_the_run(trained, data_dir):
    out, log = trained
    assert json.loads((out / "train_log.json").read_text()) == log
    assert log["seed"] == 0 and log["epochs"] == 4 and log["stopped_by"] == "epochs" and log["reproducible"]
    assert log["train_images"] == 40 and log["images_seen"] == 160
    assert log["device"] == "cpu" and log["wall_seconds"] > 0
    assert log["config"]["in_channels"] == 1 and log["config"]["resnet_time_scale_shift"] == "scale_shift"


def test_saved_model_loads_with_its_scheduler(trained):
    out, log = trained
    assert (out / "config.json").exists() and (out / "scheduler_config.json").exists()
    loaded = load_model(out)
    assert loaded.unet.config.sample_size == 8 and loaded.unet.config.in_channels == 1
    assert tuple(loaded.unet.config.block_out_channels) == (32, 32)
    assert loaded.num_train_timesteps == 1000
    assert loaded.scheduler.config.beta_schedule == "linear"
    assert loaded.scheduler.config.prediction_type == "epsilon"
    assert weights_hash(loaded.unet) == log["weights_sha256"]
    assert len(block_table(loaded.unet)) == 9
    with torch.no_grad():
        out_sample = loaded.unet(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999])).sample
    assert out_sample.shape == (2, 1, 8, 8)


def test_same_seed_same_weights_other_seed_other_weights(data_dir, trained, tmp_path):
    _, log = trained
    again = pretrain_ddpm(data_dir, tmp_path / "again", epochs=4, seed=0, log_every=1, progress=False, **TINY)
    other = pretrain_ddpm(data_dir, tmp_path / "other", epochs=1, seed=1, progress=False, **TINY)
    assert again["weights_sha256"] == log["weights_sha256"]
    assert again["loss_curve"] == log["loss_curve"]
    assert other["init_weights_sha256"] != log["init_weights_sha256"]


def test_max_seconds_stops_early_and_says_so(data_dir, tmp_path):
    log = pretrain_ddpm(data_dir, tmp_path / "m", epochs=50, max_seconds=0.0, progress=False, **TINY)
    assert log["steps"] == 1 and log["stopped_by"] == "max_seconds" and not log["reproducible"]


def test_random_init_copy_same_config_other_weights(trained, tmp_path):
    model_dir, log = trained
    record = random_init_copy(model_dir, tmp_path / "random", seed=7)
    trained_model, random_model = load_model(model_dir), load_model(tmp_path / "random")
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    assert public(random_model.unet.config) == public(trained_model.unet.config)
    assert public(random_model.scheduler.config) == public(trained_model.scheduler.config)
    assert weights_hash(random_model.unet) == record["weights_sha256"] != log["weights_sha256"]
    assert record["config_from_weights_sha256"] == log["weights_sha256"]


def test_random_init_with_training_seed_is_the_training_start(trained, tmp_path):
    model_dir, log = trained
    assert random_init_copy(model_dir, tmp_path / "r0", seed=0)["weights_sha256"] == log["init_weights_sha256"]
    assert random_init_copy(model_dir, tmp_path / "r1", seed=1)["weights_sha256"] != log["init_weights_sha256"]


def test_random_init_refuses_to_overwrite_its_source(trained):
    model_dir, _ = trained
    with pytest.raises(ValueError):
        random_init_copy(model_dir, model_dir, seed=0)


def test_missing_train_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        pretrain_ddpm(tmp_path, tmp_path / "out", epochs=1, progress=False, **TINY)


def test_cli_pretrain_and_random_init(data_dir, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    runner = CliRunner()
    model = tmp_path / "ddpm"
    result = runner.invoke(
        main,
        [
            "pretrain",
            "--data",
            str(data_dir),
            "--out",
            str(model),
            "--epochs",
            "1",
            "--image-size",
            "8",
            "--seed",
            "2",
            "--batch-size",
            "20",
            "--lr",
            "1e-3",
        ],
    )
    assert result.exit_code == 0, result.output
    log = json.loads((model / "train_log.json").read_text())
    assert log["steps"] == 2 and log["seed"] == 2 and log["optimizer"]["lr"] == 1e-3
    assert log["config"]["block_out_channels"] == [32, 64, 64]  # the default architecture
    assert load_model(model).unet.config.sample_size == 8

    result = runner.invoke(main, ["random-init", "--model", str(model), "--out", str(tmp_path / "r"), "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert weights_hash(load_model(tmp_path / "r").unet) == log["init_weights_sha256"]

    result = runner.invoke(main, ["pretrain", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "no train split" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["random-init", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_cli_defaults_match_the_stage_defaults():
    import inspect

    from pipeline.cli import main

    signature = inspect.signature(pretrain_ddpm).parameters
    options = {p.name: p.default for p in main.commands["pretrain"].params}
    for name in ("epochs", "image_size", "seed", "batch_size", "lr", "device"):
        assert options[name] == signature[name].default, name


def test_default_architecture_is_adm_shaped():
    from diffusers import UNet2DModel

    from stages.pretrain.ddpm import ddpm_unet_config

    config = ddpm_unet_config(
        image_size=16, in_channels=1, channels=(32, 64, 64), layers_per_block=1, attention_levels=(1,), head_channels=32
    )
    assert config["down_block_types"] == ("ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
    assert config["resnet_time_scale_shift"] == "scale_shift"
    unet = UNet2DModel(**config)
    assert len(block_table(unet)) == 13
    conv = ddpm_unet_config(
        image_size=16,
        in_channels=1,
        channels=(32, 64, 64),
        layers_per_block=1,
        attention_levels=(1,),
        head_channels=32,
        resblock_updown=False,
    )
    assert conv["downsample_type"] == "conv" and conv["down_block_types"][0] == "DownBlock2D"
    with pytest.raises(ValueError):
        ddpm_unet_config(
            image_size=10,
            in_channels=1,
            channels=(32, 64, 64),
            layers_per_block=1,
            attention_levels=(1,),
            head_channels=32,
        )
    with pytest.raises(ValueError):
        ddpm_unet_config(
            image_size=16, in_channels=1, channels=(32, 64), layers_per_block=1, attention_levels=(2,), head_channels=32
        )
