"""Sana extraction: every stored feature equals an independent forward pass of the same SanaTransformer2DModel, with
the conditioning from diffusers' SanaPipeline.encode_prompt, the latents from its AutoencoderDC, the noise from the
scheduler's own `scale_noise` / `add_noise` and hooks on the blocks; batching and truncation change nothing; the
conditioning is in the store's identity; `--offload text` changes nothing stored; bad input is a one-line error."""

from __future__ import annotations

import inspect
import json
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from sana_models import DPM_FLOW, make_sana_dir

from cache.errors import StoreMismatchError
from pipeline.cli import main
from stages.extract.plan import ExtractConfig
from stages.extract.run import run_extract
from stages.models.kinds import load_feature_model
from tests.test_latent_models import POOLS, extract
from tests.test_transformer_models import as_map, eps_for, hook_all

from helpers import make_image_folder, reference_image

TIMESTEPS = (0, 261, 999)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "data", counts={"train": 5, "val": 3}, classes=2)


@pytest.fixture(scope="module")
def sana(tmp_path_factory):
    return make_sana_dir(tmp_path_factory.mktemp("pipes") / "sana")


@pytest.fixture(scope="module")
def store(sana, images, tmp_path_factory):
    return extract(sana, images, tmp_path_factory.mktemp("stores") / "sana.zarr", timesteps=TIMESTEPS)


# -- the reference: diffusers' SanaPipeline and scheduler, our code nowhere ------------------------------------------
@cache
def pipeline(directory: str):
    from pathlib import Path

    import diffusers
    import transformers

    path = Path(directory)
    index = json.loads((path / "model_index.json").read_text())
    parts = {}
    for name, (library, cls) in ((k, v) for k, v in index.items() if not k.startswith("_")):
        parts[name] = getattr(diffusers if library == "diffusers" else transformers, cls).from_pretrained(path / name)
        if hasattr(parts[name], "eval"):
            parts[name].eval()
    return diffusers.SanaPipeline(**parts)


def instruction() -> list[str]:
    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


@torch.no_grad()
def reference(directory, data, paths, t, *, prompts=None, labels=None):
    """{module: (N, C, g, g)}: one plain forward pass of the pipeline's transformer on its own conditioning."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = pipeline(str(directory))
    n = len(paths)
    x0 = torch.stack([reference_image(data / p, 16) for p in paths])
    z0 = pipe.vae.encode(x0).latent * pipe.vae.config.scaling_factor
    eps = eps_for(z0, t)
    if prompts:  # a prompt, as the pipeline encodes one: its default complex human instruction first
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, complex_human_instruction=instruction()
        )
        embeds, mask = embeds[torch.as_tensor(labels)], mask[torch.as_tensor(labels)]
    else:  # the empty prompt: the unconditional (classifier-free guidance) branch
        _, _, embeds, mask = pipe.encode_prompt("", do_classifier_free_guidance=True, negative_prompt="")
        embeds, mask = embeds.expand(n, -1, -1), mask.expand(n, -1)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    step = scheduler.timesteps[scheduler.config.num_train_timesteps - 1 - t].expand(n)
    zt = scheduler.scale_noise(z0, step, eps)
    net = pipe.transformer
    names = ["patch_embed"] + [f"transformer_blocks.{i}" for i in range(len(net.transformer_blocks))]
    outputs, handles = hook_all(net, names)
    net(zt, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=step * net.config.timestep_scale)
    for handle in handles:
        handle.remove()
    grid = net.config.sample_size // net.config.patch_size
    return {name: as_map(o, grid) for name, o in outputs.items()}


def assert_matches(store, directory, data, timesteps=TIMESTEPS, **options):
    for split in store.splits:
        for t in timesteps:
            full = reference(directory, data, store.paths(split), t, labels=store.labels(split), **options)
            for row in store.attrs["block_table"]:
                if row["number"] not in store.blocks:
                    continue
                features = full[row["module"]]
                assert features.shape[1:] == (row["channels"], row["resolution"], row["resolution"]), row
                for pool in POOLS:
                    expected = F.adaptive_avg_pool2d(features, min(pool, row["resolution"])).numpy()
                    np.testing.assert_allclose(
                        store.read(split, row["number"], t, pool=pool),
                        expected,
                        rtol=1e-5,
                        atol=1e-5,
                        err_msg=f"{split} block {row['number']} t={t}",
                    )


# -- parity -----------------------------------------------------------------------------------------------------
def test_features_equal_the_pipelines_forward_pass(store, sana, images):
    assert_matches(store, sana, images)
    model = store.attrs["model"]
    assert store.attrs["kind"] == "diffusion" and model["kind"] == "sana" and store.blocks == [1, 2, 3]
    conditioning = model["conditioning"]
    assert conditioning["prompt"] == "" and len(conditioning["sha256"]) == 64
    assert conditioning["complex_human_instruction"] is None and conditioning["max_sequence_length"] == 300
    assert model["noising"]["shift"] == 3.0 and model["noising"]["family"] == "rectified-flow"


def test_a_prompt_template_is_encoded_with_the_pipelines_instruction(store, sana, images, tmp_path):
    empty = store
    store = extract(sana, images, tmp_path / "p.zarr", blocks=(1, 3), timesteps=(261,), prompt="a photo of a {}")
    assert_matches(store, sana, images, timesteps=(261,), prompts=["a photo of a class0", "a photo of a class1"])
    conditioning = store.attrs["model"]["conditioning"]
    assert conditioning["per_class"] is True and conditioning["complex_human_instruction"] == instruction()
    assert not np.allclose(store.read("val", 3, 261), empty.read("val", 3, 261))  # the conditioning reaches block 3


def test_batch_size_and_truncation_change_nothing(store, sana, images, tmp_path):
    small = extract(sana, images, tmp_path / "b1.zarr", blocks=(2,), timesteps=(261,), batch_size=1)
    for split in ("train", "val"):
        np.testing.assert_allclose(small.read(split, 2, 261), store.read(split, 2, 261), rtol=1e-5, atol=1e-6)


def test_the_pass_stops_after_the_deepest_block(sana, images, tmp_path):
    model = load_feature_model(str(sana))
    ran = []
    for i, block in enumerate(model.network.transformer_blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: ran.append(i))
    run_extract(
        ExtractConfig(
            model=str(sana),
            data=str(images),
            out=str(tmp_path / "u.zarr"),
            blocks=(2,),
            timesteps=(10,),
            splits=("val",),
            batch_size=8,
        ),
        progress=False,
        model=model,
    )
    assert ran == [0]  # block 2 is transformer_blocks.0: transformer_blocks.1 never runs


# -- the noise ------------------------------------------------------------------------------------------------------
def test_noising_is_the_schedulers_scale_noise_and_the_published_shift(sana):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = load_feature_model(str(sana))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(sana / "scheduler")
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in (0, 261, 500, 999):
        a, b = model.noise_scales(t)
        s = (t + 1) / 1000
        assert b == pytest.approx(3.0 * s / (1 + 2.0 * s), rel=1e-6) and a == pytest.approx(1 - b, rel=1e-6)
        step = scheduler.timesteps[999 - t].expand(2)
        torch.testing.assert_close(a * z0 + b * eps, scheduler.scale_noise(z0, step, eps), rtol=1e-5, atol=1e-6)
        assert float(model.model_timesteps(torch.tensor([t]))[0]) == pytest.approx(1000 * b, rel=1e-5)


def test_a_dpm_solver_flow_scheduler_noises_as_its_add_noise(tmp_path):
    """The published Sana pipelines' DPMSolverMultistepScheduler (flow sigmas, flow_shift): the same shifted sigmas,
    and x_t = (1 - sigma) z0 + sigma eps is its own add_noise at its own timesteps."""
    from diffusers import DPMSolverMultistepScheduler

    model = load_feature_model(str(make_sana_dir(tmp_path / "dpm", scheduler="dpm")))
    assert model.identity()["scheduler"]["use_flow_sigmas"] is True
    dpm = DPMSolverMultistepScheduler(**DPM_FLOW)
    dpm.set_timesteps(1000)  # its grid: s_k = k (N - 1) / N^2, shifted; timesteps int(sigma N)
    z0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for k in (5, 300, 700):
        k = dpm.index_for_timestep(dpm.timesteps[k])  # the step add_noise reads (integer timesteps repeat)
        sigma = float(dpm.sigmas[k])
        s = 1 - np.linspace(1, 1 / 1000, 1001)[::-1][k]  # the unshifted sigma of that step
        assert sigma == pytest.approx(3.0 * s / (1 + 2.0 * s), rel=1e-5)
        torch.testing.assert_close(dpm.add_noise(z0, eps, dpm.timesteps[k : k + 1]), (1 - sigma) * z0 + sigma * eps)
    for t in (0, 261, 999):  # and ours: the same formula on the training grid s = (t + 1) / N
        s = (t + 1) / 1000
        assert model.noise_scales(t)[1] == pytest.approx(3.0 * s / (1 + 2.0 * s), rel=1e-6)


# -- conditioning, identity, the block table ------------------------------------------------------------------------
def test_another_prompt_is_another_store(store, sana, images, tmp_path):
    out = tmp_path / "s.zarr"
    extract(sana, images, out, blocks=(2,), timesteps=(261,))
    with pytest.raises(StoreMismatchError, match="other settings"):
        extract(sana, images, out, blocks=(2,), timesteps=(261,), prompt="a photo of a {}")


def test_the_block_table_matches_the_module_tree(sana):
    model = load_feature_model(str(sana))
    table = model.block_table()
    net = model.network
    assert [b.number for b in table] == [1, 2, 3]
    assert [b.module for b in table] == ["patch_embed", "transformer_blocks.0", "transformer_blocks.1"]
    assert [b.adm_name for b in table] == ["x_embedder", "blocks[0]", "blocks[1]"]
    for block in table:
        net.get_submodule(block.module)
        assert block.channels == net.config.num_attention_heads * net.config.attention_head_dim
        assert block.resolution == 8 and block.stride * block.resolution == model.image_size == 16
    result = CliRunner().invoke(main, ["blocks", "--model", str(sana)])
    assert result.exit_code == 0, result.output
    assert "transformer_blocks.1" in result.output and "blocks[1]" in result.output
    assert f"250 -> {model.noise_scales(250)[1]:.3f}" in result.output and "shift 3" in result.output


# -- --feature-norm, bf16 ------------------------------------------------------------------------------------------
def test_feature_norm_layernorm_normalises_each_token(store, sana, images, tmp_path):
    normed_store = extract(sana, images, tmp_path / "n.zarr", blocks=(3,), timesteps=(261,), feature_norm="layernorm")
    assert normed_store.attrs["model"]["feature_norm"] == {"name": "layernorm", "eps": 1e-6, "affine": False}
    full = reference(sana, images, normed_store.paths("val"), 261)["transformer_blocks.1"]
    tokens = full.flatten(2).transpose(1, 2)
    normed = F.layer_norm(tokens, (tokens.shape[-1],), eps=1e-6).transpose(1, 2).reshape(full.shape)
    np.testing.assert_allclose(
        normed_store.read("val", 3, 261, pool=2), F.adaptive_avg_pool2d(normed, 2).numpy(), rtol=1e-5, atol=1e-5
    )
    assert "feature_norm" not in store.attrs["model"]


def test_bf16_stays_close_to_fp32(store, sana, images, tmp_path):
    low = extract(sana, images, tmp_path / "bf16.zarr", blocks=(3,), timesteps=(261,), precision="bf16")
    a, b = low.read("train", 3, 261), store.read("train", 3, 261)
    assert np.isfinite(a).all() and not np.array_equal(a, b)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


# -- --offload --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_offload_text_changes_nothing_stored(device, store, sana, images, tmp_path):
    """--offload text (the default: the encoder stays on the CPU) and none (it runs on --device first): the same
    features. On the CPU bit for bit; on a GPU within float32 rounding (the conditioning's sha256 then differs)."""
    stores = {}
    for offload in ("text", "none"):
        model = load_feature_model(str(sana), offload=offload, device=device)
        assert model.offload_text is (offload == "text")
        seen = []
        model.encoders[0][1].register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].device.type))
        stores[offload] = extract(
            sana, images, tmp_path / f"{offload}.zarr", blocks=(2, 3), timesteps=(261,), device=device, offload=offload
        )
        run_extract(
            ExtractConfig(
                model=str(sana),
                data=str(images),
                out=str(tmp_path / f"{offload}-m.zarr"),
                blocks=(2,),
                timesteps=(261,),
                device=device,
            ),
            progress=False,
            model=model,
        )
        assert seen == ["cpu" if offload == "text" else device]  # where Gemma-2 ran, once
    for block in (2, 3):
        for split in ("train", "val"):
            a, b = stores["text"].read(split, block, 261), stores["none"].read(split, block, 261)
            if device == "cpu":
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(a, store.read(split, block, 261), rtol=1e-4, atol=1e-5)
    assert "offload" not in json.dumps(stores["none"].attrs["model"])


def test_dry_run_counts_the_text_encoder_where_it_runs(sana, images, tmp_path):
    outputs = {}
    for flags in ([], ["--offload", "none"]):
        result = CliRunner().invoke(
            main,
            [
                "extract",
                "--model",
                str(sana),
                "--data",
                str(images),
                "--out",
                str(tmp_path / "x.zarr"),
                "--blocks",
                "3",
                "--timesteps",
                "10,500",
                "--precision",
                "bf16",
                "--dry-run",
                *flags,
            ],
        )
        assert result.exit_code == 0, result.output
        outputs[bool(flags)] = result.output
    for fragment in (
        "memory (estimate; bf16):",
        "SanaTransformer2DModel",
        "per batch row (64 image + 0 text tokens x width 8 x 20)",
        "text encoders",
    ):
        assert fragment in outputs[False] and fragment in outputs[True]
    assert "never on the GPU (--offload text)" in outputs[False]
    assert "on the device in float32" in outputs[True] and "never on the GPU" not in outputs[True]
    assert not (tmp_path / "x.zarr").exists()


# -- bad input: one-line errors, nothing written -----------------------------------------------------------------------
def _set_class(path, component, name):
    config = path / component / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": name}))
    return path


def _scheduler(path, **changes):
    config = path / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    return path


@pytest.mark.parametrize(
    "setup, flags, fragment",
    [
        (
            lambda d: make_sana_dir(d, skip=("text_encoder",)),
            [],
            "the Sana pipeline directory lacks text_encoder/ (Gemma-2)",
        ),
        (lambda d: make_sana_dir(d, skip=("tokenizer",)), [], "the Sana pipeline directory lacks tokenizer/"),
        (
            lambda d: _set_class(make_sana_dir(d), "transformer", "SanaVideoTransformer3DModel"),
            [],
            "its transformer/ class SanaVideoTransformer3DModel is not supported; supported: ",
        ),
        (lambda d: make_sana_dir(d, guidance_embeds=True), [], "(Sana-Sprint, few-step distilled) is not supported"),
        (
            lambda d: _scheduler(make_sana_dir(d, scheduler="dpm"), use_flow_sigmas=False),
            [],
            "DPMSolverMultistepScheduler without flow sigmas",
        ),
        (lambda d: make_sana_dir(d), ["--guidance", "2"], "--guidance applies to FLUX.1 pipelines only"),
        (lambda d: make_sana_dir(d), ["--timesteps", "1000"], "outside [0, 1000)"),
    ],
)
def test_bad_pipelines_and_options_are_one_line_errors(setup, flags, fragment, images, tmp_path):
    model = setup(tmp_path / "pipe")
    args = ["extract", "--model", str(model), "--data", str(images), "--out", str(tmp_path / "x.zarr"), "--blocks", "2"]
    if "--timesteps" not in flags:
        args += ["--timesteps", "10"]
    result = CliRunner().invoke(main, [*args, *flags])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert fragment in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "x.zarr").exists()


def test_offload_on_a_model_without_text_encoders_is_refused(images, tmp_path):
    from latent_models import make_dit_dir

    dit = make_dit_dir(tmp_path / "dit")
    result = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(dit),
            "--data",
            str(images),
            "--out",
            str(tmp_path / "x.zarr"),
            "--offload",
            "none",
            "--timesteps",
            "10",
        ],
    )
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "--offload none: it applies to" in result.output and "leave --offload out" in result.output
