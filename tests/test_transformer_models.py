"""SDXL, SD3, FLUX.1 and PixArt extraction: every stored feature equals an independent forward pass of the same
network, with the conditioning from the diffusers pipeline's own `encode_prompt`, the noise from the scheduler's
own `scale_noise` / `add_noise`, hooks on the blocks, image tokens laid out on the patch grid; batching and
truncation change nothing; the noising follows the published formulas; the conditioning is in the store's
identity; bad input is a one-line error."""

from __future__ import annotations

import json
import math
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformer_models import make_flux_dir, make_pixart_dir, make_sd3_dir, make_sdxl_dir

from cache.errors import StoreMismatchError
from pipeline.cli import main
from stages.extract import noise
from stages.extract.plan import ExtractConfig, make_plan
from stages.extract.run import run_extract
from stages.models.kinds import load_feature_model
from tests.test_extract import reference_image
from tests.test_latent_models import POOLS, extract

from helpers import make_image_folder

TIMESTEPS = (0, 261, 999)
MAKERS = {"sdxl": make_sdxl_dir, "sd3": make_sd3_dir, "flux": make_flux_dir, "pixart": make_pixart_dir}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "data", counts={"train": 5, "val": 3}, classes=2)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {kind: make(root / kind) for kind, make in MAKERS.items()}


@pytest.fixture(scope="module")
def stores(dirs, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {kind: extract(dirs[kind], images, root / f"{kind}.zarr", timesteps=TIMESTEPS) for kind in dirs}


# -- the references: diffusers' pipelines and schedulers, our code nowhere --------------------------------------
@cache
def pipeline(kind: str, directory: str):
    """The diffusers pipeline of `kind` built from the directory's components (float32, CPU)."""
    from pathlib import Path

    import diffusers
    import transformers

    path = Path(directory)
    index = json.loads((path / "model_index.json").read_text())
    parts = {}
    for name, (library, cls) in ((k, v) for k, v in index.items() if not k.startswith("_")):
        module = diffusers if library == "diffusers" else transformers
        parts[name] = getattr(module, cls).from_pretrained(path / name)
        if hasattr(parts[name], "eval"):
            parts[name].eval()
    cls = {
        "sdxl": "StableDiffusionXLPipeline",
        "sd3": "StableDiffusion3Pipeline",
        "flux": "FluxPipeline",
        "pixart": "PixArtAlphaPipeline",
    }[kind]
    return getattr(diffusers, cls)(**parts)


def latents(pipe, data, paths):
    vae = pipe.vae
    x0 = torch.stack([reference_image(data / p, 16) for p in paths])
    mean = vae.encode(x0).latent_dist.mean
    shift = vae.config.get("shift_factor") or 0.0
    return (mean - shift) * vae.config.scaling_factor


def eps_for(z0, t, draw=0):
    return torch.stack([noise(0, i, t, z0.shape[1:], draw=draw) for i in range(len(z0))])


def flow_scheduler(pipe, tokens: int):
    """The pipeline's scheduler on its N-step training grid, shifted as the pipeline shifts it."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    n = scheduler.config.num_train_timesteps
    if scheduler.config.use_dynamic_shifting:
        c = scheduler.config
        mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
    return scheduler


def hook_all(network, names):
    outputs = {}
    handles = [
        network.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in names
    ]
    return outputs, handles


def as_map(tokens, grid):
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid)


@torch.no_grad()
def reference(kind, directory, data, paths, t, *, prompts=None, labels=None, guidance=3.5):
    """{module: (N, C, g, g)}: one plain forward pass of the pipeline's network on its own conditioning."""
    pipe = pipeline(kind, str(directory))
    n = len(paths)
    z0 = latents(pipe, data, paths)
    eps = eps_for(z0, t)
    texts = prompts or [""]

    def pick(x):
        return x[torch.as_tensor(labels)] if prompts else x.expand(n, *x.shape[1:])

    if kind == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False)
        zt = pipe.scheduler.add_noise(z0, eps, torch.full((n,), t))
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        time_ids = pipe._get_add_time_ids(
            (size, size), (0, 0), (size, size), torch.float32, pipe.text_encoder_2.config.projection_dim
        )
        names = [name for name, _ in pipe.unet.named_modules() if name]
        outputs, handles = hook_all(pipe.unet, names)
        pipe.unet(
            zt,
            torch.full((n,), t),
            encoder_hidden_states=pick(embeds),
            added_cond_kwargs={"text_embeds": pick(pooled), "time_ids": time_ids.expand(n, 6)},
        )
        result = {name: (o[0] if isinstance(o, tuple) else getattr(o, "sample", o)) for name, o in outputs.items()}
    elif kind == "pixart":
        embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, max_sequence_length=120)
        zt = pipe.scheduler.add_noise(z0, eps, torch.full((n,), t))
        net = pipe.transformer
        names = ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(len(net.transformer_blocks))]
        outputs, handles = hook_all(net, names)
        size = net.config.sample_size * pipe.vae_scale_factor
        added = {
            "resolution": torch.tensor([[size, size]], dtype=torch.float32).repeat(n, 1),
            "aspect_ratio": torch.tensor([[1.0]]).repeat(n, 1),
        }
        net(
            zt,
            encoder_hidden_states=pick(embeds),
            encoder_attention_mask=pick(mask),
            timestep=torch.full((n,), t),
            added_cond_kwargs=added,
        )
        grid = net.config.sample_size // net.config.patch_size
        result = {name: as_map(o, grid) for name, o in outputs.items()}
    elif kind == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(
            texts, None, None, do_classifier_free_guidance=False, max_sequence_length=256
        )
        net = pipe.transformer
        scheduler = flow_scheduler(pipe, 0)
        step = scheduler.timesteps[scheduler.config.num_train_timesteps - 1 - t].expand(n)
        zt = scheduler.scale_noise(z0, step, eps)
        names = ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(len(net.transformer_blocks))]
        outputs, handles = hook_all(net, names)
        net(hidden_states=zt, encoder_hidden_states=pick(embeds), pooled_projections=pick(pooled), timestep=step)
        grid = net.config.sample_size // net.config.patch_size
        result = {name: as_map(o if name == "pos_embed" else o[1], grid) for name, o in outputs.items()}
    else:  # flux
        embeds, pooled, text_ids = pipe.encode_prompt(texts, None, max_sequence_length=512)
        net = pipe.transformer
        b, c, h, w = z0.shape
        scheduler = flow_scheduler(pipe, (h // 2) * (w // 2))
        step = scheduler.timesteps[scheduler.config.num_train_timesteps - 1 - t].expand(n)
        zt = scheduler.scale_noise(z0, step, eps)
        packed = pipe._pack_latents(zt, b, c, h, w)
        ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, zt.device, zt.dtype)
        names = (
            ["x_embedder"]
            + [f"transformer_blocks.{i}" for i in range(len(net.transformer_blocks))]
            + [f"single_transformer_blocks.{i}" for i in range(len(net.single_transformer_blocks))]
        )
        outputs, handles = hook_all(net, names)
        g = torch.full((n,), guidance) if net.config.guidance_embeds else None
        net(
            hidden_states=packed,
            encoder_hidden_states=pick(embeds),
            pooled_projections=pick(pooled),
            timestep=step / 1000,
            img_ids=ids,
            txt_ids=text_ids,
            guidance=g,
        )
        result = {name: as_map(o if name == "x_embedder" else o[1], h // 2) for name, o in outputs.items()}
    for handle in handles:
        handle.remove()
    return result


def assert_matches(store, kind, directory, data, timesteps=TIMESTEPS, **options):
    for split in store.splits:
        for t in timesteps:
            full = reference(kind, directory, data, store.paths(split), t, labels=store.labels(split), **options)
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
                        err_msg=f"{kind} {split} block {row['number']} t={t}",
                    )


# -- parity ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MAKERS))
def test_features_equal_the_pipelines_forward_pass(kind, stores, dirs, images):
    store = stores[kind]
    assert_matches(store, kind, dirs[kind], images)
    model = store.attrs["model"]
    assert store.attrs["kind"] == "diffusion" and model["kind"] == kind
    assert model["conditioning"]["prompt"] == "" and len(model["conditioning"]["sha256"]) == 64


@pytest.mark.parametrize("kind, blocks", [("sdxl", (3, 6)), ("sd3", (2,)), ("flux", (3, 4)), ("pixart", (1, 2))])
def test_batch_size_and_truncation_change_nothing(kind, blocks, stores, dirs, images, tmp_path):
    small = extract(dirs[kind], images, tmp_path / "b1.zarr", blocks=blocks, timesteps=(261,), batch_size=1)
    for block in blocks:
        for split in ("train", "val"):
            np.testing.assert_allclose(
                small.read(split, block, 261), stores[kind].read(split, block, 261), rtol=1e-5, atol=1e-6
            )


def test_the_flux_pass_stops_after_the_deepest_block(dirs, images, tmp_path):
    model = load_feature_model(str(dirs["flux"]))
    ran = []
    net = model.network
    for name, blocks in (("double", net.transformer_blocks), ("single", net.single_transformer_blocks)):
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda m, args, name=name, i=i: ran.append((name, i)))
    run_extract(
        ExtractConfig(
            model=str(dirs["flux"]),
            data=str(images),
            out=str(tmp_path / "u.zarr"),
            blocks=(4,),
            timesteps=(10,),
            splits=("val",),
            batch_size=8,
        ),
        progress=False,
        model=model,
    )
    assert ran == [("double", 0), ("double", 1), ("single", 0)]  # block 4 is the first single-stream block


def test_flux_tokens_are_the_2x2_patches_of_the_latent_grid(dirs):
    """Block 1 (x_embedder) at cell (i, j) is the linear map of latent cells (2i..2i+1, 2j..2j+1), channel-major."""
    model = load_feature_model(str(dirs["flux"]))
    z = torch.randn(2, *model.noise_shape())
    captured = {}
    with model.capture(model.block_table()[:1]) as capture, torch.inference_mode():
        model.prepare(torch.device("cpu"))
        captured = capture(z, torch.tensor([5, 5]), {1: model.grid})
    linear = model.network.x_embedder
    for i, j in ((0, 0), (1, 3), (3, 2)):
        patch = z[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, -1)
        torch.testing.assert_close(captured[1][:, :, i, j], linear(patch), rtol=1e-5, atol=1e-6)


# -- the noise: the published formulas and the schedulers ---------------------------------------------------------
def test_flow_sigmas_follow_the_published_shift(dirs):
    sd3 = load_feature_model(str(dirs["sd3"]))
    for t in (0, 261, 500, 999):
        s = (t + 1) / 1000
        a, b = sd3.noise_scales(t)
        assert b == pytest.approx(3.0 * s / (1 + 2.0 * s), rel=1e-6) and a == pytest.approx(1 - b, rel=1e-6)
    flux = load_feature_model(str(dirs["flux"]))
    tokens = flux.grid**2  # FLUX.1-dev's scheduler: mu linear from 0.5 at 256 tokens to 1.15 at 4096
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    for t in (0, 261, 999):
        s = (t + 1) / 1000
        assert flux.noise_scales(t)[1] == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / s - 1), rel=1e-5)
    record = flux.identity()["noising"]
    assert record["mu"] == pytest.approx(mu) and record["image_tokens"] == tokens
    assert sd3.identity()["noising"]["shift"] == 3.0


def test_ddpm_kinds_noise_as_the_schedulers_add_noise(dirs):
    # within float32's cumprod error: the project recomputes abar_t in float64 (FeatureModel.noise_scales)
    for kind in ("sdxl", "pixart"):
        model = load_feature_model(str(dirs[kind]))
        scheduler = pipeline(kind, str(dirs[kind])).scheduler
        z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        for t in (0, 261, 999):
            a, b = model.noise_scales(t)
            torch.testing.assert_close(
                a * z0 + b * eps, scheduler.add_noise(z0, eps, torch.tensor([t, t])), rtol=1e-5, atol=1e-5
            )


def test_a_timestep_outside_the_schedule_is_refused(dirs, images, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(dirs["flux"]),
            "--data",
            str(images),
            "--out",
            str(tmp_path / "x.zarr"),
            "--timesteps",
            "1000",
        ],
    )
    assert result.exit_code == 1 and "outside [0, 1000)" in result.output, result.output
    assert not (tmp_path / "x.zarr").exists()


# -- conditioning in the identity ----------------------------------------------------------------------------
def test_another_prompt_or_guidance_is_another_store(dirs, images, tmp_path):
    out = tmp_path / "f.zarr"
    base = extract(dirs["flux"], images, out, blocks=(2,), timesteps=(261,))
    assert base.attrs["model"]["conditioning"]["guidance"] == 3.5
    for changes in ({"guidance": 2.0}, {"prompt": "a photo of a {}"}):
        with pytest.raises(StoreMismatchError, match="other settings"):
            extract(dirs["flux"], images, out, blocks=(2,), timesteps=(261,), **changes)
    other = extract(dirs["flux"], images, tmp_path / "g.zarr", blocks=(2,), timesteps=(261,), guidance=2.0)
    assert not np.allclose(other.read("val", 2, 261), base.read("val", 2, 261))


def test_a_prompt_template_conditions_each_image_on_its_class(dirs, images, tmp_path):
    store = extract(dirs["sd3"], images, tmp_path / "p.zarr", blocks=(1, 3), timesteps=(261,), prompt="a photo of a {}")
    assert_matches(
        store, "sd3", dirs["sd3"], images, timesteps=(261,), prompts=["a photo of a class0", "a photo of a class1"]
    )
    assert store.attrs["model"]["conditioning"]["per_class"] is True


def test_text_encoders_are_loaded_only_to_encode_and_freed_before_any_image(dirs, images, tmp_path):
    from stages.models.text import Deferred

    model = load_feature_model(str(dirs["sd3"]))
    assert model.block_table() and all(isinstance(e, Deferred) for _, e in model._encoders)  # `blocks` loads no T5
    plan = make_plan(
        ExtractConfig(
            model=str(dirs["sd3"]), data=str(images), out=str(tmp_path / "x.zarr"), blocks=(2,), timesteps=(10,)
        ),
        model,
    )
    assert plan.model.encoders is None and plan.model.text_parameters > 0


# -- --feature-norm and massive activations ---------------------------------------------------------------------
def test_feature_norm_layernorm_normalises_each_token_before_pooling(dirs, images, stores, tmp_path):
    store = extract(
        dirs["pixart"], images, tmp_path / "n.zarr", blocks=(2,), timesteps=(261,), feature_norm="layernorm"
    )
    assert store.attrs["model"]["feature_norm"] == {"name": "layernorm", "eps": 1e-6, "affine": False}
    full = reference("pixart", dirs["pixart"], images, store.paths("val"), 261)["transformer_blocks.0"]
    tokens = full.flatten(2).transpose(1, 2)
    normed = F.layer_norm(tokens, (tokens.shape[-1],), eps=1e-6).transpose(1, 2).reshape(full.shape)
    np.testing.assert_allclose(
        store.read("val", 2, 261, pool=2), F.adaptive_avg_pool2d(normed, 2).numpy(), rtol=1e-5, atol=1e-5
    )
    assert "feature_norm" not in stores["pixart"].attrs["model"]  # the default: the raw residual stream


def test_massive_activations_are_measured_and_layernorm_tames_them():
    from stages.models.tokens import massive_activations, token_map

    tokens = torch.randn(2, 16, 32)
    tokens[..., 7] += 3000.0  # one massive channel, as trained DiTs have
    raw = massive_activations(token_map(tokens, 4))
    assert raw["top_channels"][0] == 7 and raw["ratio"] > 1000 and raw["top_energy_share"] > 0.99
    normed = massive_activations(token_map(tokens, 4, norm="layernorm"))
    assert normed["top_channels"][0] == 7 and normed["top_energy_share"] < raw["top_energy_share"]


# -- the block table ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MAKERS))
def test_the_block_table_matches_the_module_tree(kind, dirs):
    model = load_feature_model(str(dirs[kind]))
    table = model.block_table()
    assert [b.number for b in table] == list(range(1, len(table) + 1))
    for block in table:
        model.network.get_submodule(block.module)  # every row names a module
        assert block.stride * block.resolution == model.image_size
    if kind != "sdxl":  # the patch embedding, then every transformer block in execution order
        net = model.network
        stacks = [net.transformer_blocks, *([net.single_transformer_blocks] if kind == "flux" else [])]
        names = [
            f"{stack}.{i}"
            for stack, blocks in zip(("transformer_blocks", "single_transformer_blocks"), stacks)
            for i in range(len(blocks))
        ]
        assert [b.module for b in table[1:]] == names


def test_blocks_command_shows_the_transformer_blocks(dirs):
    result = CliRunner().invoke(main, ["blocks", "--model", str(dirs["flux"])])
    assert result.exit_code == 0, result.output
    assert "single_transformer_blocks.1" in result.output and "double_blocks[0]" in result.output
    model = load_feature_model(str(dirs["flux"]))
    assert f"250 -> {model.noise_scales(250)[1]:.3f}" in result.output and "mu " in result.output


# -- bad input: one-line errors, nothing written -------------------------------------------------------------------
def _set_class(path, component, name):
    config = path / component / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": name}))
    return path


def _index(path, **changes):
    index = path / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), **changes}))
    return path


@pytest.mark.parametrize(
    "setup, flags, fragment",
    [
        (lambda d: make_sd3_dir(d, skip=("text_encoder_3", "tokenizer_3")), [], "with its T5 encoder dropped"),
        (lambda d: make_flux_dir(d, skip=("text_encoder_2",)), [], "the FLUX pipeline directory lacks text_encoder_2/"),
        (
            lambda d: make_sdxl_dir(d, skip=("text_encoder_2", "tokenizer_2")),
            [],
            "SDXL pipeline directory lacks text_encoder_2/",
        ),
        (lambda d: make_sdxl_dir(d, skip=("text_encoder", "tokenizer")), [], "an SDXL refiner"),
        (
            lambda d: _set_class(make_pixart_dir(d), "transformer", "HunyuanDiT2DModel"),
            [],
            "its transformer/ class HunyuanDiT2DModel is not supported; supported: ",
        ),
        (
            lambda d: _set_class(make_sdxl_dir(d), "unet", "UNetSpatioTemporalConditionModel"),
            [],
            "its unet/ class UNetSpatioTemporalConditionModel is not supported",
        ),
        (
            lambda d: _index(make_sd3_dir(d), _class_name="StableDiffusion3ControlNetPipeline"),
            [],
            "a ControlNet pipeline",
        ),
        (lambda d: make_flux_dir(d, guidance=False), ["--guidance", "2"], "has no guidance embedding (FLUX.1-schnell)"),
        (
            lambda d: make_sdxl_dir(d),
            ["--feature-norm", "layernorm"],
            "--feature-norm applies to the transformer kinds",
        ),
        (lambda d: make_pixart_dir(d), ["--guidance", "2"], "--guidance applies to FLUX.1 pipelines only"),
    ],
)
def test_bad_pipelines_and_options_are_one_line_errors(setup, flags, fragment, images, tmp_path):
    model = setup(tmp_path / "pipe")
    result = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(model),
            "--data",
            str(images),
            "--out",
            str(tmp_path / "x.zarr"),
            "--blocks",
            "2",
            "--timesteps",
            "10",
            *flags,
        ],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert fragment in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "x.zarr").exists()


def test_bf16_casts_the_network_and_stays_close_to_fp32(dirs, images, stores, tmp_path):
    store = extract(dirs["flux"], images, tmp_path / "bf16.zarr", blocks=(2, 5), timesteps=(261,), precision="bf16")
    for block in (2, 5):
        low, exact = store.read("train", block, 261), stores["flux"].read("train", block, 261)
        assert np.isfinite(low).all() and not np.array_equal(low, exact)  # computed in bf16, not fp32
        assert np.corrcoef(low.ravel(), exact.ravel())[0, 1] > 0.99
    model = load_feature_model(str(dirs["flux"]))
    model.cast(torch.bfloat16)
    assert next(model.network.parameters()).dtype == torch.bfloat16
    assert next(model.vae.parameters()).dtype == torch.float32  # the latents are what gets noised


def test_dry_run_prints_the_memory_estimate(dirs, images, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(dirs["flux"]),
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
        ],
    )
    assert result.exit_code == 0, result.output
    for fragment in (
        "memory (estimate; bf16):",
        "FluxTransformer2DModel",
        "of weights",
        "never on the GPU",
        "per batch row (16 image + 512 text tokens x width 32 x 14)",
        "peak",
    ):
        assert fragment in result.output, result.output
    assert not (tmp_path / "x.zarr").exists()


def test_dit_feature_norm_is_the_layernorm_of_its_tokens(images, tmp_path):
    from tests.test_latent_models import dit_reference

    from latent_models import make_dit_dir

    dit = make_dit_dir(tmp_path / "dit")
    store = extract(dit, images, tmp_path / "n.zarr", blocks=(3,), timesteps=(261,), feature_norm="layernorm")
    full = dit_reference(dit, images, store.paths("val"), 261)["transformer_blocks.1"]
    tokens = full.flatten(2).transpose(1, 2)
    normed = F.layer_norm(tokens, (tokens.shape[-1],), eps=1e-6).transpose(1, 2).reshape(full.shape)
    np.testing.assert_allclose(
        store.read("val", 3, 261, pool=2), F.adaptive_avg_pool2d(normed, 2).numpy(), rtol=1e-5, atol=1e-5
    )
    assert store.attrs["model"]["feature_norm"]["name"] == "layernorm"


@pytest.mark.slow  # torch.distributed process groups
def test_two_processes_write_the_store_one_process_writes(dirs, images, tmp_path):
    """FLUX under torch.distributed (gloo, 2 ranks, started as torchrun starts them) equals one process, bit for bit."""
    import os
    import subprocess
    import sys

    from tests.s3_server import closed_port
    from tests.test_distributed import REPO, assert_same, decoded, finish

    def launch(out, world_size):
        port, processes = closed_port(), []
        for rank in range(world_size):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            if world_size > 1:
                env.update(
                    RANK=str(rank),
                    LOCAL_RANK=str(rank),
                    WORLD_SIZE=str(world_size),
                    LOCAL_WORLD_SIZE=str(world_size),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                    PIPELINE_DIST_TIMEOUT="120",
                )
            command = [
                sys.executable,
                "-m",
                "pipeline",
                "extract",
                "--model",
                str(dirs["flux"]),
                "--data",
                str(images),
                "--out",
                str(out),
                "--blocks",
                "2,5",
                "--timesteps",
                "10,500",
                "--pool",
                "1,2",
                "--batch-size",
                "4",
                "--chunk-samples",
                "2",
                "--shard-samples",
                "2",
                "--device",
                "cpu",
            ]
            processes.append(
                subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        return finish(processes)

    for world_size in (1, 2):
        for code, _, err in launch(tmp_path / f"w{world_size}.zarr", world_size):
            assert code == 0, err[-3000:]
    assert_same(decoded(tmp_path / "w1.zarr"), decoded(tmp_path / "w2.zarr"))
