"""Stable Diffusion and DiT extraction: every stored feature equals an independent plain forward pass of
the same components (VAE mean latents, the documented noise, the empty-prompt embedding or the null
class, hooks on every module, adaptive average pooling), whatever the batching; ensembles; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from cache import FeatureStore
from pipeline.cli import main
from pipeline.options import parse_block_spec
from stages.extract import noise
from stages.extract.plan import ExtractConfig
from stages.extract.run import run_extract

from helpers import make_image_folder, reference_image
from latent_models import make_dit_dir, make_sd_dir

TIMESTEPS = (0, 261)
POOLS = (1, 2)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_sd_dir(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return make_dit_dir(tmp_path_factory.mktemp("dit") / "pipe")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "data", counts={"train": 5, "val": 3}, classes=2)


def extract(model_dir, data, out, **changes):
    config = dict(
        model=str(model_dir),
        data=str(data),
        out=str(out),
        blocks=None,
        timesteps=TIMESTEPS,
        pools=POOLS,
        batch_size=4,
        dtype="float32",
        chunk_samples=4,
    )
    run_extract(ExtractConfig(**{**config, **changes}), progress=False)
    return FeatureStore.open(out)


def first(output):
    return output[0] if isinstance(output, tuple) else getattr(output, "sample", output)


def latents(model_dir, data, paths):
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", low_cpu_mem_usage=False).eval()
    x0 = torch.stack([reference_image(data / p, 16) for p in paths])
    return vae.encode(x0).latent_dist.mean * vae.config.scaling_factor


def noised(z0, abar, timestep, seed=0, draw=0):
    eps = torch.stack([noise(seed, i, timestep, z0.shape[1:], draw=draw) for i in range(len(z0))])
    return (abar[timestep].sqrt() * z0.double() + (1 - abar[timestep]).sqrt() * eps).float()


def hooked(network, names):
    outputs = {}
    handles = [
        network.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: outputs.__setitem__(name, first(o))
        )
        for name in names
    ]
    return outputs, handles


def sd_reference(model_dir, data, paths, timestep, *, prompts=None, labels=None, draw=0):
    """{module: (N, C, H, W)}: the VAE's mean latents noised, a full UNet2DConditionModel pass on the text embedding."""
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", low_cpu_mem_usage=False).eval()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval()
    abar = PNDMScheduler.from_pretrained(model_dir / "scheduler").alphas_cumprod.double()
    with torch.no_grad():
        ids = tokenizer(
            prompts or [""],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        text = encoder(ids).last_hidden_state
        text = text[torch.as_tensor(labels)] if prompts else text.expand(len(paths), -1, -1)
        zt = noised(latents(model_dir, data, paths), abar, timestep, draw=draw)
        outputs, handles = hooked(unet, [name for name, _ in unet.named_modules() if name])
        unet(zt, torch.full((len(paths),), timestep), encoder_hidden_states=text)
    for handle in handles:
        handle.remove()
    return outputs


def dit_reference(model_dir, data, paths, timestep, draw=0):
    """{module: (N, D, h, w)}: tokens of the patch embedding and each transformer block as the patch grid."""
    dit = DiTTransformer2DModel.from_pretrained(model_dir / "transformer", low_cpu_mem_usage=False).eval()
    abar = DDPMScheduler.from_pretrained(model_dir / "scheduler").alphas_cumprod.double()
    names = ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(dit.config.num_layers)]
    with torch.no_grad():
        zt = noised(latents(model_dir, data, paths), abar, timestep, draw=draw)
        outputs, handles = hooked(dit, names)
        null = torch.full((len(paths),), dit.config.num_embeds_ada_norm)
        dit(zt, timestep=torch.full((len(paths),), timestep), class_labels=null)
    for handle in handles:
        handle.remove()
    side = dit.config.sample_size // dit.config.patch_size
    return {name: tokens.transpose(1, 2).reshape(len(paths), -1, side, side) for name, tokens in outputs.items()}


def assert_store_matches(store, reference_for, timesteps=TIMESTEPS):
    for split in store.splits:
        for t in timesteps:
            reference = reference_for(store.paths(split), t, store.labels(split))
            for row in store.attrs["block_table"]:
                if row["number"] not in store.blocks:
                    continue
                full = reference[row["module"]]
                assert full.shape[1:] == (row["channels"], row["resolution"], row["resolution"]), row
                for pool in POOLS:
                    expected = F.adaptive_avg_pool2d(full, min(pool, row["resolution"])).numpy()
                    np.testing.assert_allclose(
                        store.read(split, row["number"], t, pool=pool),
                        expected,
                        rtol=1e-5,
                        atol=2e-5,
                        err_msg=f"{split} block {row['number']} t={t} pool={pool}",
                    )


@pytest.fixture(scope="module")
def sd_store(sd_dir, images, tmp_path_factory):
    return extract(sd_dir, images, tmp_path_factory.mktemp("s") / "sd.zarr")


def test_stable_diffusion_features_equal_a_plain_forward_pass(sd_store, sd_dir, images):
    assert_store_matches(sd_store, lambda paths, t, labels: sd_reference(sd_dir, images, paths, t))
    attrs = sd_store.attrs
    assert attrs["kind"] == "diffusion" and attrs["model"]["kind"] == "stable-diffusion"
    conditioning = attrs["model"]["conditioning"]
    assert conditioning["prompt"] == "" and len(conditioning["embedding_sha256"]) == 64
    assert attrs["preprocessing"]["size"] == 16 and attrs["block_table"][2]["stride"] == 4


def test_stable_diffusion_batching_and_truncation_change_nothing(sd_store, sd_dir, images, tmp_path):
    small = extract(
        sd_dir, images, tmp_path / "b1.zarr", blocks=parse_block_spec("2,5"), timesteps=(261,), batch_size=1
    )
    for block in (2, 5):
        np.testing.assert_allclose(
            small.read("train", block, 261), sd_store.read("train", block, 261), rtol=1e-5, atol=1e-6
        )


def test_a_prompt_template_conditions_each_image_on_its_class(sd_store, sd_dir, images, tmp_path):
    store = extract(
        sd_dir, images, tmp_path / "p.zarr", blocks=parse_block_spec("2,8"), timesteps=(261,), prompt="a photo of a {}"
    )
    prompts = ["a photo of a class0", "a photo of a class1"]
    assert_store_matches(
        store,
        lambda paths, t, labels: sd_reference(sd_dir, images, paths, t, prompts=prompts, labels=labels),
        timesteps=(261,),
    )
    assert store.attrs["model"]["conditioning"]["prompt"] == "a photo of a {}"
    assert store.attrs["model"] != sd_store.attrs["model"]  # another identity: never mixed into the empty-prompt store
    assert not np.allclose(store.read("val", 8, 261), sd_store.read("val", 8, 261))


def test_dit_features_equal_a_plain_forward_pass(dit_dir, images, tmp_path):
    store = extract(dit_dir, images, tmp_path / "dit.zarr")
    assert_store_matches(store, lambda paths, t, labels: dit_reference(dit_dir, images, paths, t))
    assert store.attrs["model"]["conditioning"] == {"class_label": 5, "null_class": True}
    small = extract(dit_dir, images, tmp_path / "dit1.zarr", blocks=(2,), timesteps=(261,), batch_size=1)
    np.testing.assert_allclose(small.read("val", 2, 261), store.read("val", 2, 261), rtol=1e-5, atol=1e-6)


def test_an_ensemble_stores_the_mean_over_its_noise_draws(dit_dir, images, tmp_path):
    store = extract(dit_dir, images, tmp_path / "e.zarr", blocks=(1, 3), timesteps=(261,), ensemble=3)
    assert store.attrs["model"]["ensemble"] == 3
    for split in store.splits:
        paths = store.paths(split)
        draws = [dit_reference(dit_dir, images, paths, 261, draw=k) for k in range(3)]
        for block, module in ((1, "pos_embed"), (3, "transformer_blocks.1")):
            mean = sum(F.adaptive_avg_pool2d(d[module], 2) for d in draws) / 3
            np.testing.assert_allclose(store.read(split, block, 261, pool=2), mean.numpy(), rtol=1e-5, atol=2e-5)
    # the patch embedding sees the noised latents: the draws differ, and the mean is none of them
    assert not np.allclose(F.adaptive_avg_pool2d(draws[1]["pos_embed"], 2).numpy(), store.read("val", 1, 261, pool=2))


def test_draw_zero_is_the_plain_noise():
    assert torch.equal(noise(1, 2, 3, (4, 2, 2), draw=0), noise(1, 2, 3, (4, 2, 2)))
    assert not torch.equal(noise(1, 2, 3, (4, 2, 2), draw=1), noise(1, 2, 3, (4, 2, 2)))


def test_dift_up_ft_index_is_the_last_row_of_each_up_block():
    """SD 2.1's structure (channels shrunk): DIFT's up_ft_index 1 (its default) is block 19."""
    from stages.models.blocks import block_table

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=8,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    table = block_table(unet)
    assert len(table) == 25 and table[12].module == "mid_block"
    last = {i: max(b.number for b in table if b.module.startswith(f"up_blocks.{i}.")) for i in range(4)}
    assert last == {0: 16, 1: 19, 2: 22, 3: 25}
    assert [table[n - 1].adm_name for n in (13, 19)] == ["middle_block", "output_blocks[5]"]
    assert table[18].resolution == 8 // 2  # SD 2.1 at 768 px: a 96x96 latent, block 19 at 48x48 (DIFT's grid)


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda d: make_sd_dir(d, skip=("vae",)), "lacks vae/ (AutoencoderKL)"),
        (
            lambda d: make_sd_dir(d, skip=("text_encoder", "tokenizer")),
            "lacks text_encoder/ (the text encoder), tokenizer/",
        ),
        (lambda d: _sdxl(make_sd_dir(d)), "the SDXL pipeline directory lacks text_encoder_2/"),
    ],
)
def test_bad_pipeline_directories_are_one_line_errors(setup, fragment, images, tmp_path):
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
        ],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert fragment in result.output and not (tmp_path / "x.zarr").exists()


def _sdxl(path):
    config = json.loads((path / "unet" / "config.json").read_text())
    config.update(addition_embed_type="text_time", addition_time_embed_dim=8)
    (path / "unet" / "config.json").write_text(json.dumps(config))
    return path


def test_a_prompt_template_without_a_slot_is_refused(sd_dir, images, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(sd_dir),
            "--data",
            str(images),
            "--out",
            str(tmp_path / "x.zarr"),
            "--prompt",
            "a photo",
        ],
    )
    assert result.exit_code == 1 and "has no {} where the class name goes" in result.output, result.output


def test_blocks_command_prints_latent_cells_and_pixels(sd_dir, dit_dir):
    result = CliRunner().invoke(main, ["blocks", "--model", str(sd_dir)])
    assert result.exit_code == 0, result.output
    assert "px/cell" in result.output and "up_blocks.1.attentions.1" in result.output
    result = CliRunner().invoke(main, ["blocks", "--model", str(dit_dir)])
    assert result.exit_code == 0 and "transformer_blocks.2" in result.output, result.output


def test_the_dit_pass_stops_after_the_deepest_block(dit_dir, images, tmp_path):
    from stages.models.kinds import load_feature_model

    model = load_feature_model(str(dit_dir))
    ran = []
    for i, block in enumerate(model.network.transformer_blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: ran.append(i))
    run_extract(
        ExtractConfig(
            model=str(dit_dir),
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
    assert ran == [0]  # block 2 is transformer_blocks.0: one pass of 3 images, nothing after it


def test_hooks_read_tuples_and_output_dataclasses():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from stages.models.capture import output_tensor

    x = torch.ones(2, 3)
    assert output_tensor(x) is x and output_tensor((x, None)) is x
    assert output_tensor(Transformer2DModelOutput(sample=x)) is x
    with pytest.raises(TypeError):
        output_tensor({"a": x})


def test_an_ensemble_of_the_pixel_unet_is_the_mean_of_its_draws(tiny_model, tiny_data, tmp_path):
    from diffusers import UNet2DModel

    store = extract(
        tiny_model, tiny_data, tmp_path / "e.zarr", blocks=(7,), timesteps=(90,), ensemble=2, splits=("val",)
    )
    unet = UNet2DModel.from_pretrained(tiny_model, low_cpu_mem_usage=False).eval()
    abar = DDPMScheduler.from_pretrained(tiny_model).alphas_cumprod.double()
    paths = store.paths("val")
    x0 = torch.stack([reference_image(tiny_data / p, 16) for p in paths])
    outputs, handles = hooked(unet, ["mid_block"])
    draws = []
    with torch.no_grad():
        for k in range(2):
            unet(noised(x0, abar, 90, draw=k), torch.full((len(paths),), 90))
            draws.append(F.adaptive_avg_pool2d(outputs["mid_block"], 2))
    for handle in handles:
        handle.remove()
    np.testing.assert_allclose(
        store.read("val", 7, 90, pool=2), ((draws[0] + draws[1]) / 2).numpy(), rtol=1e-5, atol=2e-5
    )
    assert store.attrs["model"]["ensemble"] == 2
