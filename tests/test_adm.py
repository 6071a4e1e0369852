"""ADM (guided-diffusion) checkpoint conversion: exactness against guided-diffusion's own outputs, then refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import UNet2DModel

from pipeline.cli import main
from stages.models.adm import (
    ADM_DEFAULTS,
    AdmConversionError,
    adm_architecture,
    adm_to_diffusers,
    convert_adm_checkpoint,
    parse_adm_flags,
)
from stages.models.blocks import block_table
from stages.models.loading import load_model

from adm_reference import ReferenceUNet, reference_from_flags

FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/adm_tiny"
FIXTURE_FLAGS = (FIXTURE / "flags.txt").read_text().strip()
ATOL = 1e-5

ADM_256_FLAGS = (
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 --learn_sigma True "
    "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
    "--use_fp16 True --use_scale_shift_norm True"
)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "golden.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert_adm_checkpoint(FIXTURE / "model.pt", tmp_path_factory.mktemp("adm") / "tiny", FIXTURE_FLAGS)


def diffusers_blocks(unet: UNet2DModel, x: torch.Tensor, t: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    """(output, [block 1 output, block 2 output, ...]) of a UNet2DModel, taken by hooks on the block table's modules."""
    table = block_table(unet)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        unet.get_submodule(block.module).register_forward_hook(
            lambda _module, _inputs, output, number=block.number: outputs.__setitem__(number, output)
        )
        for block in table
    ]
    try:
        with torch.no_grad():
            out = unet(x, t).sample
    finally:
        for hook in hooks:
            hook.remove()
    return out.numpy(), [outputs[block.number].numpy() for block in table]


def reference_blocks(reference: ReferenceUNet, x: torch.Tensor, t: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    with torch.no_grad():
        out, blocks = reference.eval()(x, t)
    return out.numpy(), [block.numpy() for block in blocks]


def assert_blocks_close(actual, expected, atol=ATOL):
    assert len(actual) == len(expected)
    for number, (ours, theirs) in enumerate(zip(actual, expected), start=1):
        assert ours.shape == theirs.shape, f"block {number}: shape {ours.shape} != {theirs.shape}"
        error = np.abs(ours - theirs).max()
        assert error <= atol, f"block {number}: max abs error {error:.3g} > {atol}"


# --- (a) the fixture: guided-diffusion's own outputs ---------------------------------------------


def test_fixture_converts_exactly(converted, golden):
    loaded = load_model(converted)
    x_t, t = torch.from_numpy(golden["x_t"]), torch.from_numpy(golden["t"])
    out, blocks = diffusers_blocks(loaded.unet, x_t, t)
    assert_blocks_close(blocks, [golden[f"block_{k}"] for k in range(1, 20)])
    assert out.shape == golden["out"].shape == (2, 6, 32, 32)
    assert np.abs(out - golden["out"]).max() <= ATOL


def test_fixture_block_table_matches_blocks_json(converted):
    expected = json.loads((FIXTURE / "blocks.json").read_text())
    table = block_table(load_model(converted).unet)
    assert len(table) == expected["num_blocks"] == 19
    for block in table:
        channels, height, width = expected["blocks"][str(block.number)]
        assert (block.channels, block.resolution, block.resolution) == (channels, height, width)


def test_fixture_noising_matches_q_sample(converted, golden):
    loaded = load_model(converted)
    abar = loaded.alphas_cumprod()[torch.from_numpy(golden["t"]).long()][:, None, None, None]
    x0, noise = (torch.from_numpy(golden[key]).double() for key in ("x0", "noise"))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    assert np.abs(x_t.numpy() - golden["x_t"]).max() <= ATOL
    assert loaded.num_train_timesteps == 1000
    assert loaded.scheduler.config.variance_type == "learned_range"  # --learn_sigma True


def test_converted_directory_layout(converted):
    names = sorted(path.name for path in converted.iterdir())
    assert names == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "preprocessing.json",
        "scheduler_config.json",
    ]
    assert load_model(converted).preprocess == "adm"  # guided-diffusion's center_crop_arr, the paper's loader


def test_reference_is_guided_diffusion(golden):
    """The test-only re-implementation has guided-diffusion's keys and shapes and reproduces its outputs."""
    state = torch.load(FIXTURE / "model.pt", map_location="cpu", weights_only=True)
    reference = reference_from_flags(parse_adm_flags(FIXTURE_FLAGS))
    assert {k: tuple(v.shape) for k, v in reference.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    reference.load_state_dict(state, strict=True)
    out, blocks = reference_blocks(reference, torch.from_numpy(golden["x_t"]), torch.from_numpy(golden["t"]))
    assert_blocks_close(blocks, [golden[f"block_{k}"] for k in range(1, 20)])
    assert np.abs(out - golden["out"]).max() <= ATOL


# --- (b) full-size ADM-256, on the meta device ---------------------------------------------------


def test_adm256_block_table_and_mapping_on_meta():
    flags = parse_adm_flags(ADM_256_FLAGS)
    arch = adm_architecture(flags)
    assert arch.channel_mult == (1, 1, 2, 2, 4, 4) and arch.head_channels == 64 and arch.out_channels == 6
    with torch.device("meta"):
        unet = UNet2DModel(**arch.unet_config())
        reference = reference_from_flags(flags)
    table = block_table(unet)
    assert len(table) == 37
    block = table[23]
    assert (block.number, block.adm_name, block.channels, block.resolution) == (24, "output_blocks[4]", 1024, 16)
    # Every one of the ~550M-parameter model's tensors has a place, with the right shape (no memory used).
    shapes = {key: value.shape for key, value in unet.state_dict().items()}
    converted = adm_to_diffusers(reference.state_dict(), arch, shapes)
    assert set(converted) == set(shapes)


# --- (c) the qkv layout matters ------------------------------------------------------------------


def test_wrong_qkv_order_is_caught(tmp_path, golden):
    """Read the legacy fused qkv as the new order: attention blocks go wrong, so the exactness test would fail."""
    wrong = convert_adm_checkpoint(
        FIXTURE / "model.pt", tmp_path / "wrong", FIXTURE_FLAGS + " --use_new_attention_order True"
    )
    _, blocks = diffusers_blocks(load_model(wrong).unet, torch.from_numpy(golden["x_t"]), torch.from_numpy(golden["t"]))
    errors = [np.abs(ours - golden[f"block_{k}"]).max() for k, ours in enumerate(blocks, start=1)]
    assert max(errors[:4]) <= ATOL  # blocks 1-4 have no attention
    assert errors[4] > 100 * ATOL  # block 5 is the first with attention
    assert min(errors[4:]) > 100 * ATOL


# --- (d) configurations the fixture does not cover, against the reference ------------------------

SECOND_CONFIGS = {
    # convolutional resampling, additive time conditioning, epsilon only, one resnet per level, head size fixed
    "conv-additive-legacy": "--image_size 32 --num_channels 32 --channel_mult 1,2,3 --num_res_blocks 1 "
    "--attention_resolutions 16 --num_head_channels 32 --resblock_updown False --use_scale_shift_norm False "
    "--learn_sigma False",
    "conv-additive-new-order": "--image_size 32 --num_channels 32 --channel_mult 1,2,3 --num_res_blocks 1 "
    "--attention_resolutions 16 --num_head_channels 32 --resblock_updown False --use_scale_shift_norm False "
    "--learn_sigma False --use_new_attention_order True",
    # heads by count (every attention layer 64 wide), residual resampling, additive, three resnets per level
    "num-heads-resblock": "--image_size 16 --num_channels 32 --channel_mult 1,2,2 --num_res_blocks 3 "
    "--attention_resolutions 8,4 --num_heads 4 --resblock_updown True --use_scale_shift_norm False "
    "--learn_sigma True --use_new_attention_order True",
}


def random_checkpoint(flags: str, path: Path, seed: int = 0) -> ReferenceUNet:
    torch.manual_seed(seed)
    reference = reference_from_flags(parse_adm_flags(flags))
    with torch.no_grad():  # zero-initialised layers could hide a mapping error: give every tensor a value
        for parameter in reference.parameters():
            parameter.normal_(0, 0.05)
    torch.save(reference.state_dict(), path)
    return reference


@pytest.mark.parametrize("name", sorted(SECOND_CONFIGS))
def test_other_configurations_match_reference(tmp_path, name):
    flags = SECOND_CONFIGS[name]
    reference = random_checkpoint(flags, tmp_path / "model.pt")
    unet = load_model(convert_adm_checkpoint(tmp_path / "model.pt", tmp_path / "out", flags)).unet
    size = parse_adm_flags(flags)["image_size"]
    x, t = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 700])
    ref_out, ref_blocks = reference_blocks(reference, x, t)
    out, blocks = diffusers_blocks(unet, x, t)
    assert_blocks_close(blocks, ref_blocks)
    assert np.abs(out - ref_out).max() <= ATOL


def test_second_configuration_has_guided_diffusion_structure(tmp_path):
    """Key names and shapes worked out by hand from guided-diffusion's UNetModel.__init__ for these flags."""
    state = random_checkpoint(SECOND_CONFIGS["conv-additive-legacy"], tmp_path / "model.pt").state_dict()
    # channel_mult 1,2,3 x 32; attention only at 16px (level 1); one resnet per level
    expected = {
        "input_blocks.0.0.weight": (32, 3, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (32, 128),  # additive: C, not 2C
        "input_blocks.2.0.op.weight": (32, 32, 3, 3),  # conv downsampling
        "input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
        "input_blocks.3.1.qkv.weight": (192, 64, 1),
        "input_blocks.4.0.op.weight": (64, 64, 3, 3),
        "input_blocks.5.0.in_layers.2.weight": (96, 64, 3, 3),
        "middle_block.1.proj_out.weight": (96, 96, 1),
        "output_blocks.0.0.in_layers.0.weight": (192,),  # 96 + skip 96
        "output_blocks.1.0.in_layers.0.weight": (160,),  # 96 + skip 64 from the downsampler
        "output_blocks.1.1.conv.weight": (96, 96, 3, 3),  # conv upsampling, no attention at 8px
        "output_blocks.3.1.qkv.weight": (192, 64, 1),
        "output_blocks.3.2.conv.weight": (64, 64, 3, 3),  # upsampler after the attention
        "output_blocks.5.0.skip_connection.weight": (32, 64, 1, 1),
        "out.2.weight": (3, 32, 3, 3),  # learn_sigma False
    }
    assert {key: tuple(state[key].shape) for key in expected} == expected
    assert not any(key.startswith(("input_blocks.6", "output_blocks.6")) for key in state)
    assert not any(".op." in key and key.startswith("output") for key in state)


# --- (e) flags: parsing and refusals -------------------------------------------------------------


def test_parse_fills_guided_diffusion_defaults():
    flags = parse_adm_flags(FIXTURE_FLAGS)
    assert set(flags) == set(ADM_DEFAULTS)
    assert flags["image_size"] == 32 and flags["channel_mult"] == "1,2,2" and flags["attention_resolutions"] == "16,8"
    assert flags["learn_sigma"] is True and flags["use_fp16"] is False
    assert flags["num_heads"] == 4 and flags["num_heads_upsample"] == -1 and flags["use_new_attention_order"] is False
    assert parse_adm_flags("") == ADM_DEFAULTS


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("--learn_sigma true", "learn_sigma", True),
        ("--learn_sigma=1", "learn_sigma", True),
        ("--use_fp16 no", "use_fp16", False),
        ("--num_heads_upsample -1", "num_heads_upsample", -1),
        ("--dropout 0.1", "dropout", 0.1),
        ("--noise_schedule cosine", "noise_schedule", "cosine"),
        ("  --image_size\n256  ", "image_size", 256),
    ],
)
def test_parse_values(text, key, value):
    assert parse_adm_flags(text)[key] == value


@pytest.mark.parametrize(
    "text, message",
    [
        ("--num_chanels 64", "did you mean --num_channels"),
        ("--batch_size 4", "Valid flags: --attention_resolutions"),
        ("--image_size", "has no value"),
        ("--image_size --num_channels 64", "has no value"),
        ("image_size 64", "expected a flag"),
        ("--image_size 64 --image_size 128", "given twice"),
        ("--learn_sigma maybe", "expects a boolean"),
        ("--num_channels 1.5", "expects an integer"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(AdmConversionError, match=message):
        parse_adm_flags(text)


def test_default_channel_mult_follows_create_model():
    assert adm_architecture("--image_size 256 --num_head_channels 64").channel_mult == (1, 1, 2, 2, 4, 4)
    assert adm_architecture("--image_size 128 --num_head_channels 64").channel_mult == (1, 1, 2, 3, 4)
    assert adm_architecture("--image_size 64 --num_head_channels 64").channel_mult == (1, 2, 3, 4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (FIXTURE_FLAGS.replace("--class_cond False", "--class_cond True"), "class-conditional"),
        # num_heads 4 splits the 64-wide attention into 16-channel heads and the 96-wide one into 24
        (
            "--image_size 32 --num_channels 32 --channel_mult 1,2,3 --attention_resolutions 16 --num_heads 4",
            "different head sizes",
        ),
        (
            FIXTURE_FLAGS.replace("--num_head_channels 16", "--num_heads 4 --num_heads_upsample 2"),
            "different head sizes",
        ),
        ("--image_size 512 --num_head_channels 64", "starts at 0.5"),
        ("--image_size 32 --num_head_channels 32", "no default channel_mult for --image_size 32"),
        ("--image_size 32 --channel_mult 1,2,2 --num_head_channels 48", "does not divide"),
        (FIXTURE_FLAGS.replace("--noise_schedule linear", "--noise_schedule quadratic"), "not one of guided-diffusion"),
        (FIXTURE_FLAGS.replace("--diffusion_steps 1000", "--diffusion_steps 10"), "beta="),
        (
            FIXTURE_FLAGS.replace("--diffusion_steps 1000", "--rescale_timesteps True --diffusion_steps 4000"),
            "rescale_timesteps",
        ),
        (FIXTURE_FLAGS.replace("1,2,2", "1,2.5,2"), "comma-separated integers"),
    ],
)
def test_unsupported_flags_are_refused(tmp_path, flags, message):
    with pytest.raises(AdmConversionError, match=message):
        convert_adm_checkpoint(FIXTURE / "model.pt", tmp_path / "out", flags)
    assert not (tmp_path / "out").exists()


def test_checkpoint_that_does_not_match_flags_names_keys(tmp_path):
    with pytest.raises(AdmConversionError, match=r"no place in this model.*input_blocks\.\d+"):
        convert_adm_checkpoint(
            FIXTURE / "model.pt", tmp_path / "a", FIXTURE_FLAGS.replace("--num_res_blocks 2", "--num_res_blocks 1")
        )
    with pytest.raises(AdmConversionError, match=r"shapes differ.*out\.2\.weight"):
        convert_adm_checkpoint(
            FIXTURE / "model.pt", tmp_path / "b", FIXTURE_FLAGS.replace("--learn_sigma True", "--learn_sigma False")
        )
    state = torch.load(FIXTURE / "model.pt", weights_only=True)
    state["label_emb.weight"] = torch.zeros(1000, 128)
    torch.save(state, tmp_path / "classes.pt")
    with pytest.raises(AdmConversionError, match="class-conditional"):
        convert_adm_checkpoint(tmp_path / "classes.pt", tmp_path / "c", FIXTURE_FLAGS)


def test_refuses_non_empty_output_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(AdmConversionError, match="not an empty directory"):
        convert_adm_checkpoint(FIXTURE / "model.pt", tmp_path / "out", FIXTURE_FLAGS)


# --- (f) a malicious pickle ----------------------------------------------------------------------


class _RunsCommand:
    """Unpickling this calls os.system(command): what a hostile "checkpoint" does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"time_embed.0.weight": _RunsCommand(f"touch {marker}")}, evil)
    with pytest.raises(AdmConversionError, match=r"evil\.pt: refused to load") as caught:
        convert_adm_checkpoint(evil, tmp_path / "out", FIXTURE_FLAGS)
    assert "system" in str(caught.value)  # torch names the global it would not call
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# --- the command ---------------------------------------------------------------------------------


def test_cli_convert_adm(tmp_path, golden):
    out = tmp_path / "converted"
    result = CliRunner().invoke(main, ["convert-adm", str(FIXTURE / "model.pt"), str(out), "--flags", FIXTURE_FLAGS])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    blocks = CliRunner().invoke(main, ["blocks", "--model", str(out)])
    assert blocks.exit_code == 0 and "output_blocks[8]" in blocks.output


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--image_size 32 --num_chanels 32", "unknown guided-diffusion flag --num_chanels"),
        ("--class_cond True", "class-conditional"),
    ],
)
def test_cli_convert_adm_errors_without_traceback(tmp_path, flags, message):
    result = CliRunner().invoke(main, ["convert-adm", str(FIXTURE / "model.pt"), str(tmp_path / "o"), "--flags", flags])
    assert result.exit_code == 1
    assert "Error:" in result.output and message in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
