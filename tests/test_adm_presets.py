"""convert-adm presets: the published checkpoints' MODEL_FLAGS, as guided-diffusion's README gives them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from stages.models.adm import AdmConversionError, adm_architecture, parse_adm_flags
from stages.models.adm_presets import PRESETS, UnknownPresetError, preset_flags, preset_for_file

# guided-diffusion's README, "Sampling from pre-trained models", verbatim
README = {
    "256x256_diffusion_uncond": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "64x64_diffusion": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
    "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 "
    "--num_res_blocks 3 --resblock_updown True --use_new_attention_order True --use_fp16 True "
    "--use_scale_shift_norm True",
    "128x128_diffusion": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "256x256_diffusion": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "512x512_diffusion": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 False --use_scale_shift_norm True",
    "lsun_bedroom": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "lsun_horse_nodropout": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.0 "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
}


@pytest.mark.parametrize("name", sorted(README))
def test_presets_are_the_readme_flags(name):
    assert parse_adm_flags(preset_flags(name)) == parse_adm_flags(README[name])


def test_lsun_cat_and_horse_are_bedroom_flags():
    assert PRESETS["lsun_cat"] == PRESETS["lsun_horse"] == PRESETS["lsun_bedroom"]


def test_the_papers_checkpoint_converts_and_class_conditional_ones_say_why_not():
    architecture = adm_architecture(preset_flags("256x256_diffusion_uncond.pt"))
    shape = (architecture.image_size, architecture.channel_mult, architecture.head_channels)
    assert shape == (256, (1, 1, 2, 2, 4, 4), 64)
    with pytest.raises(AdmConversionError, match="class-conditional"):
        adm_architecture(preset_flags("64x64_diffusion"))


@pytest.mark.parametrize(
    "path, preset",
    [
        ("/models/256x256_diffusion_uncond.pt", "256x256_diffusion_uncond"),
        ("lsun_cat.pt", "lsun_cat"),
        ("my_finetune.pt", None),
        ("256x256_diffusion_uncond (1).pt", None),
    ],
)
def test_presets_are_recognised_from_the_file_name(path, preset):
    assert preset_for_file(path) == preset


def test_an_unknown_preset_lists_the_published_ones():
    with pytest.raises(UnknownPresetError, match="256x256_diffusion_uncond, 256x256_diffusion"):
        preset_flags("256_uncond")


FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/adm_tiny"


def test_convert_adm_takes_the_preset_from_the_file_name(tmp_path, monkeypatch):
    """A checkpoint named as a preset converts with no flags, to the same directory --flags gives."""
    monkeypatch.setitem(PRESETS, "adm_tiny", (FIXTURE / "flags.txt").read_text().strip())
    named = tmp_path / "adm_tiny.pt"
    shutil.copyfile(FIXTURE / "model.pt", named)
    by_name = CliRunner().invoke(main, ["convert-adm", str(named), str(tmp_path / "a")])
    assert by_name.exit_code == 0 and "adm_tiny preset" in by_name.output, by_name.output
    by_flags = CliRunner().invoke(
        main, ["convert-adm", str(FIXTURE / "model.pt"), str(tmp_path / "b"), "--flags", PRESETS["adm_tiny"]]
    )
    assert by_flags.exit_code == 0, by_flags.output
    for name in ("config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_convert_adm_without_flags_or_a_preset_name(tmp_path):
    result = CliRunner().invoke(main, ["convert-adm", str(FIXTURE / "model.pt"), str(tmp_path / "o")])
    assert result.exit_code == 2 and "give its MODEL_FLAGS with --flags, or --preset NAME" in result.output
    result = CliRunner().invoke(
        main,
        [
            "convert-adm",
            str(FIXTURE / "model.pt"),
            str(tmp_path / "o"),
            "--preset",
            "lsun_cat",
            "--flags",
            "--image_size 32",
        ],
    )
    assert result.exit_code == 2 and "not both" in result.output
    result = CliRunner().invoke(
        main, ["convert-adm", str(FIXTURE / "model.pt"), str(tmp_path / "o"), "--preset", "256_uncond"]
    )
    assert result.exit_code == 2 and "256x256_diffusion_uncond" in result.output
    assert not (tmp_path / "o").exists()
