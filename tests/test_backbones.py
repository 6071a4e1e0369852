"""Vision backbones (transformers ResNet, ViT, DINOv2, CLIP vision; timm ResNet from a torchvision state
dict, timm ViT) in the same store: every stored feature equals an independent plain forward pass on
images read by the model's own image processor (transformers) or timm's data config written out; the
one no-noise timestep 0; probes read the store like any other."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from cache import FeatureStore
from pipeline.cli import main
from stages.extract.plan import ExtractConfig
from stages.extract.run import run_extract

from helpers import make_image_folder

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
POOLS = (1, 2)


def _fill(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return module


def save_hf(directory, model, processor: dict):
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(
        tmp_path_factory.mktemp("images") / "data", counts={"train": 6, "val": 4}, classes=2, size=(30, 36)
    )


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        ResNetConfig,
        ResNetModel,
        ViTConfig,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    resnet = _fill(
        ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="bottleneck")), 0
    ).eval()
    vit = _fill(
        ViTModel(
            ViTConfig(
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                image_size=16,
                patch_size=4,
            )
        ),
        1,
    ).eval()
    dino = _fill(
        Dinov2Model(
            Dinov2Config(
                hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=16, patch_size=4
            )
        ),
        2,
    ).eval()
    clip = _fill(
        CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                image_size=16,
                patch_size=4,
            )
        ),
        3,
    ).eval()
    return {
        # CLIPImageProcessor: short side 18, centre crop 16, CLIP's mean and std
        "clip": save_hf(
            root / "clip",
            clip,
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": 18},
                "do_center_crop": True,
                "crop_size": {"height": 16, "width": 16},
                "resample": 3,
                "do_normalize": True,
                "image_mean": CLIP[0],
                "image_std": CLIP[1],
            },
        ),
        # ConvNextImageProcessor (what microsoft/resnet-50 ships): short side 28 / crop_pct, crop 28
        "resnet": save_hf(
            root / "resnet",
            resnet,
            {
                "image_processor_type": "ConvNextImageProcessor",
                "crop_pct": 0.875,
                "size": {"shortest_edge": 28},
                "resample": 3,
                "do_normalize": True,
                "image_mean": IMAGENET[0],
                "image_std": IMAGENET[1],
            },
        ),
        # ViTImageProcessor: a square resize, mean and std 0.5
        "vit": save_hf(
            root / "vit",
            vit,
            {
                "image_processor_type": "ViTImageProcessor",
                "size": {"height": 16, "width": 16},
                "resample": 2,
                "do_normalize": True,
                "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3,
            },
        ),
        # BitImageProcessor (DINOv2's): short side 20, centre crop 16
        "dinov2": save_hf(
            root / "dinov2",
            dino,
            {
                "image_processor_type": "BitImageProcessor",
                "size": {"shortest_edge": 20},
                "do_center_crop": True,
                "crop_size": {"height": 16, "width": 16},
                "resample": 3,
                "do_normalize": True,
                "image_mean": IMAGENET[0],
                "image_std": IMAGENET[1],
            },
        ),
    }


def timm_eval_transform(model):
    """timm's own evaluation transform for the model (torchvision Resize, CenterCrop, ToTensor, Normalize)."""
    import timm

    return timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)


def extract(model, data, out, **changes):
    config = dict(
        model=model,
        data=str(data),
        out=str(out),
        blocks=None,
        pools=POOLS,
        batch_size=4,
        dtype="float32",
        chunk_samples=4,
    )
    run_extract(ExtractConfig(**{**config, **changes}), progress=False)
    return FeatureStore.open(out)


def assert_matches(store, reference):
    """`reference(paths)` -> {block number: (N, C, H, W)} for every block of the store."""
    assert store.timesteps == [0] and store.attrs["kind"] == "backbone" and store.attrs["noise_seed"] is None
    for split in store.splits:
        expected = reference(store.paths(split))
        assert sorted(expected) == store.blocks
        for row in (r for r in store.attrs["block_table"] if r["number"] in store.blocks):
            full = expected[row["number"]]
            assert full.shape[1:] == (row["channels"], row["resolution"], row["resolution"]), row
            for pool in POOLS:
                np.testing.assert_allclose(
                    store.read(split, row["number"], 0, pool=pool),
                    F.adaptive_avg_pool2d(full, min(pool, row["resolution"])).numpy(),
                    rtol=1e-4,
                    atol=1e-5,
                    err_msg=f"{split} block {row['number']} pool {pool}",
                )


def test_hf_resnet_stem_and_every_bottleneck(hf_dirs, images, tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    store = extract(f"hf:{hf_dirs['resnet']}", images, tmp_path / "r.zarr")
    model = AutoModel.from_pretrained(hf_dirs["resnet"]).eval()
    processor = AutoImageProcessor.from_pretrained(hf_dirs["resnet"], backend="pil")  # crop_pct: 32, then 28
    names = ["embedder", "encoder.stages.0.layers.0", "encoder.stages.1.layers.0", "encoder.stages.1.layers.1"]

    def reference(paths):
        x = processor([Image.open(images / p).convert("RGB") for p in paths], return_tensors="pt").pixel_values
        outputs = {}
        handles = [
            model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in names
        ]
        with torch.no_grad():
            last = model(pixel_values=x).last_hidden_state
        for handle in handles:
            handle.remove()
        torch.testing.assert_close(outputs[names[-1]], last)
        return {i + 1: outputs[n] for i, n in enumerate(names)}

    assert_matches(store, reference)
    assert store.attrs["preprocessing"]["resize"] == "short side to 32, bicubic"
    assert store.attrs["preprocessing"]["mean"] == pytest.approx(IMAGENET[0])


@pytest.mark.parametrize("name", ["vit", "dinov2", "clip"])
def test_hf_vision_transformers_patch_grid_and_class_token(name, hf_dirs, images, tmp_path):
    """The reference reads the images with the model's own image processor (transformers' PIL backend)."""
    from transformers import AutoImageProcessor, AutoModel

    store = extract(f"hf:{hf_dirs[name]}", images, tmp_path / f"{name}.zarr")
    model = AutoModel.from_pretrained(hf_dirs[name]).eval()
    processor = AutoImageProcessor.from_pretrained(hf_dirs[name], backend="pil")

    def reference(paths):
        x = processor([Image.open(images / p).convert("RGB") for p in paths], return_tensors="pt").pixel_values
        with torch.no_grad():
            out = model(pixel_values=x, output_hidden_states=True)

        def grid(h):  # the class token first, then 4x4
            return h[:, 1:].transpose(1, 2).reshape(len(paths), -1, 4, 4)

        maps = {i + 1: grid(h) for i, h in enumerate(out.hidden_states)}  # CLIP's [0]: after its pre-norm
        # the class token after the final norm: ViT's and DINOv2's last state, CLIP's pooled output
        cls = out.pooler_output if name == "clip" else out.last_hidden_state[:, 0]
        maps[len(maps) + 1] = cls[:, :, None, None]
        return maps

    assert_matches(store, reference)
    assert store.blocks == [1, 2, 3, 4] and store.attrs["block_table"][-1]["resolution"] == 1
    if name == "vit":  # ViTImageProcessor resizes both sides (these images are 30x36)
        assert store.attrs["preprocessing"]["resize"] == "to 16x16, aspect not kept, bilinear"


# The set-up leaves timm out where no torchvision built for the installed torch loads (Makefile);
# tests/test_extras.py checks what a timm: model says then.
needs_timm = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None,
    reason="timm is not installed (no torchvision built for this torch: see the Makefile)",
)


@needs_timm
def test_timm_resnet_from_a_torchvision_state_dict(images, tmp_path):
    import timm
    import torchvision

    torch.manual_seed(0)
    reference_model = torchvision.models.resnet18(weights=None).eval()
    torch.save(reference_model.state_dict(), tmp_path / "r18.pth")
    store = extract(
        "timm:resnet18",
        images,
        tmp_path / "t.zarr",
        checkpoint=str(tmp_path / "r18.pth"),
        blocks=(1, 2, 4),
        splits=("val",),
    )
    transform = timm_eval_transform(timm.create_model("resnet18"))
    names = {1: reference_model.maxpool, 2: reference_model.layer1[0], 4: reference_model.layer2[0]}

    def reference(paths):
        x = torch.stack([transform(Image.open(images / p).convert("RGB")) for p in paths])
        outputs = {}
        handles = [m.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n, m in names.items()]
        with torch.no_grad():
            reference_model(x)
        for handle in handles:
            handle.remove()
        return outputs

    assert_matches(store, reference)
    assert store.attrs["preprocessing"]["rounding"] == "torchvision"


def test_a_backbone_store_probes_like_any_other(hf_dirs, tmp_path):
    import csv

    data = make_image_folder(tmp_path / "data", counts={"train": 8, "val": 4, "test": 4}, classes=2, size=(30, 36))
    out = tmp_path / "r.zarr"
    extract(f"hf:{hf_dirs['resnet']}", data, out, blocks=(1, 3), splits=("train", "val", "test"))
    result = CliRunner().invoke(
        main,
        [
            "probe",
            "--store",
            str(out),
            "--head",
            "knn",
            "--val-split",
            "val",
            "--out",
            str(tmp_path / "results"),
            "--no-render",
        ],
    )
    assert result.exit_code == 0, result.output
    with open(tmp_path / "results" / "knn" / "configs.csv") as file:
        rows = list(csv.DictReader(file))
    assert {(row["blocks"], row["timesteps"]) for row in rows} == {("1", "0"), ("3", "0")}


def test_blocks_command_for_backbones(hf_dirs):
    result = CliRunner().invoke(main, ["blocks", "--model", f"hf:{hf_dirs['dinov2']}"])
    assert result.exit_code == 0, result.output
    assert "encoder.layer.1" in result.output and "class token" in result.output


@needs_timm
def test_blocks_command_for_timm():
    result = CliRunner().invoke(main, ["blocks", "--model", "timm:resnet18"])  # the table needs no weights
    assert result.exit_code == 0 and "layer4.1" in result.output, result.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--timesteps", "10"], "is not a diffusion model: it has no noise timesteps"),
        (["--ensemble", "2"], "has no noise to average over"),
    ],
)
def test_noise_options_for_a_backbone_are_refused(args, fragment, hf_dirs, images, tmp_path):
    result = CliRunner().invoke(
        main,
        ["extract", "--model", f"hf:{hf_dirs['vit']}", "--data", str(images), "--out", str(tmp_path / "x.zarr"), *args],
    )
    assert result.exit_code == 1 and fragment in result.output and "Traceback" not in result.output, result.output


def test_missing_processor_and_checkpoint_are_one_line_errors(hf_dirs, images, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(hf_dirs["vit"], bare)
    (bare / "preprocessor_config.json").unlink()
    base = ["extract", "--data", str(images), "--out", str(tmp_path / "x.zarr")]
    result = CliRunner().invoke(main, [*base, "--model", f"hf:{bare}"])
    assert result.exit_code == 1 and "no preprocessor_config.json" in result.output, result.output
    assert not (tmp_path / "x.zarr").exists()


@needs_timm
def test_timm_without_checkpoint_is_a_one_line_error(images, tmp_path):
    result = CliRunner().invoke(
        main, ["extract", "--data", str(images), "--out", str(tmp_path / "x.zarr"), "--model", "timm:resnet18"]
    )
    assert result.exit_code == 1 and "needs --checkpoint" in result.output, result.output
    assert not (tmp_path / "x.zarr").exists()


@needs_timm
def test_timm_vision_transformer_equals_timm_forward_intermediates(images, tmp_path):
    """timm's own `forward_intermediates` (patch grid, prefix tokens dropped) is the reference."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "vit.pth")
    store = extract(
        "timm:vit_tiny_patch16_224",
        images,
        tmp_path / "v.zarr",
        checkpoint=str(tmp_path / "vit.pth"),
        blocks=(1, 2, 13, 14),
        splits=("val",),
    )
    assert store.attrs["block_table"][13]["module"] == "norm" and store.attrs["block_table"][1]["module"] == "blocks.0"
    transform = timm_eval_transform(vit)

    def reference(paths):
        x = torch.stack([transform(Image.open(images / p).convert("RGB")) for p in paths])
        with torch.no_grad():
            final, maps = vit.forward_intermediates(x, indices=[0, 11], output_fmt="NCHW")
            embedded = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))[:, vit.num_prefix_tokens :]
        grid = embedded.transpose(1, 2).reshape(len(paths), -1, 14, 14)
        return {1: grid, 2: maps[0], 13: maps[1], 14: final[:, 0, :, None, None]}

    assert_matches(store, reference)
