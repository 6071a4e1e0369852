"""Vision backbones without noise: `transformers` (`hf:`) and `timm` (`timm:`), in the same store layout.

    hf:<directory or hub id>    what `transformers.AutoModel` loads: ResNet, ViT, DINOv2, CLIP vision ...
    timm:<name> --checkpoint F  a timm architecture with the state dict in F (read with weights_only=True;
                                torchvision's ResNet names are timm's, so SimCLR/SwAV/MoCo exports load)

Block tables (the same Block rows as the U-Net's, numbered in execution order):
- ResNets: block 1 is the stem (after its max-pool), then every residual (bottleneck) block.
- Vision transformers: block 1 is the patch embedding (position embedding added), then every
  transformer layer, as the patch grid (the class token and any register tokens left out); the last
  block is the class token after the final norm, a 1x1 "map" (what a linear probe of DINOv2 reads).

There is no noise: the store's kind is "backbone" and its one timestep is the marker 0
(stages.models.feature_model.NO_NOISE_TIMESTEP), so probes and readers treat it like any store.
Images are read by the one image reader (short side resized, or both sides where the processor
resizes to a fixed height and width, centre crop) at the sizes and with the filter the model's image
processor names, then scaled to [0, 1] and normalised with its mean and std (recorded); this equals
transformers' PIL processors to float round-off (tested).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from cache.extras import require
from stages.models.blocks import Block, UnsupportedModelError
from stages.models.capture import BlockCapture, output_tensor
from stages.models.feature_model import FeatureModel
from stages.models.loading import ModelLoadError, _public, hub_snapshot, weights_hash

log = logging.getLogger(__name__)

_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's numbering, as processors save it


@dataclass(frozen=True)
class _Tap:
    module: str
    name: str  # the table's "adm" column: what the model's own code calls it
    # "map" (B, C, H, W), "tokens" (B, prefix + h*w, D), "cls" (B, prefix + h*w, D) -> token 0, "pooled" (B, D)
    shape: str


@dataclass(frozen=True)
class ImageSpec:
    size: int  # the centre crop
    resize: int  # the short side before it
    resample: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    squash: bool = False  # resize both sides to `resize` (the aspect ratio not kept), as ViT's processor does
    convention: str = "transformers"  # how sizes and crop offsets round (stages.data.images.load_image)


class BackboneModel(FeatureModel):
    store_kind = "backbone"

    def __init__(
        self,
        kind: str,
        network: nn.Module,
        taps: list[_Tap],
        image: ImageSpec,
        source: str,
        config: dict,
        forward: Callable[[nn.Module, torch.Tensor], object],
    ):
        self.kind, self.network, self.taps, self.image, self.source = kind, network.eval(), taps, image, source
        self.config, self._call = config, forward
        self._shapes = self._probe()

    def _probe(self) -> dict[str, tuple[int, ...]]:
        """Each tap's output shape, from one forward pass of a blank image (the block table's channels and grid)."""
        shapes, handles = {}, []
        for tap in self.taps:
            handles.append(
                self.network.get_submodule(tap.module).register_forward_hook(
                    lambda m, i, o, name=tap.module: shapes.__setitem__(name, tuple(output_tensor(o).shape))
                )
            )
        try:
            with torch.inference_mode():
                self._call(self.network, torch.zeros(1, 3, self.image.size, self.image.size))
        finally:
            for handle in handles:
                handle.remove()
        return shapes

    def _grid(self, tap: _Tap) -> tuple[int, int]:
        """(channels, grid side) of a tap's map; for tokens also checks that the patch grid is square."""
        shape = self._shapes[tap.module]
        if tap.shape == "map":
            return shape[1], shape[2]
        if tap.shape in ("cls", "pooled"):
            return shape[-1], 1
        tokens = self._patch_tokens(shape[1])
        return shape[2], int(math.isqrt(tokens))

    def _patch_tokens(self, sequence: int) -> int:
        patch = int(getattr(self, "patch_size", 0) or 0)
        side = self.image.size // patch if patch else int(math.isqrt(sequence))
        if side * side > sequence:
            raise UnsupportedModelError(
                f"--model {self.source}: {sequence} tokens cannot hold a {side}x{side} patch grid"
            )
        return side * side

    def block_table(self) -> list[Block]:
        rows = []
        for number, tap in enumerate(self.taps, start=1):
            channels, side = self._grid(tap)
            rows.append(Block(number, tap.module, tap.name, int(channels), int(side), self.image.size // side))
        return rows

    def preprocessing(self) -> dict:
        from stages.data.images import backbone_preprocessing

        spec = self.image
        return backbone_preprocessing(
            spec.size, spec.resize, spec.resample, spec.mean, spec.std, spec.squash, spec.convention
        )

    def image_options(self) -> dict:
        spec = self.image
        return {
            "size": spec.size,
            "channels": 3,
            "resize": spec.resize,
            "resample": spec.resample,
            "squash": spec.squash,
            "convention": spec.convention,
        }

    def noise_shape(self) -> None:
        return None

    def prepare(self, device: torch.device) -> None:
        self.network = self.network.to(device).eval()

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the processor's input: [0, 1], minus mean, over std per channel."""
        mean = torch.tensor(self.image.mean, device=x0.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image.std, device=x0.device).view(1, -1, 1, 1)
        return ((x0.float() + 1.0) / 2.0 - mean) / std

    def _to_map(self, tap: _Tap):
        if tap.shape == "map":
            return None
        if tap.shape == "pooled":
            return lambda output: output_tensor(output)[:, :, None, None]
        if tap.shape == "cls":
            return lambda output: output_tensor(output)[:, 0, :, None, None]

        def tokens_to_map(output):
            tokens = output_tensor(output)
            b, n, d = tokens.shape
            patches = self._patch_tokens(n)
            side = math.isqrt(patches)
            return tokens[:, n - patches :].transpose(1, 2).reshape(b, d, side, side)

        return tokens_to_map

    def capture(self, blocks) -> BlockCapture:
        taps = {tap.module: tap for tap in self.taps}
        maps = {block.number: self._to_map(taps[block.module]) for block in blocks}

        def forward(network, sample, timesteps, **_):
            self._call(network, sample)

        return BlockCapture(self.network, blocks, forward=forward, maps={k: v for k, v in maps.items() if v})

    @cached_property
    def weights_sha256(self) -> str:
        return weights_hash(self.network)

    def identity(self) -> dict:
        return {"kind": self.kind, "source": self.source, "weights_sha256": self.weights_sha256, "config": self.config}


# -- transformers --------------------------------------------------------------------------------------
def _hf_taps(network: nn.Module, model_type: str) -> list[_Tap]:
    names = dict(network.named_modules())
    if model_type == "resnet":
        taps = [_Tap("embedder", "stem", "map")]
        for stage, module in enumerate(network.encoder.stages):
            taps += [
                _Tap(f"encoder.stages.{stage}.layers.{j}", f"stage{stage + 1}.block{j}", "map")
                for j in range(len(module.layers))
            ]
        return taps

    def find(leaf: str) -> str | None:  # the outermost module of that name ("embeddings", "vision_model.embeddings")
        found = sorted((name for name in names if name.rsplit(".", 1)[-1] == leaf), key=lambda n: n.count("."))
        return found[0] if found else None

    lists = [
        (name, module)
        for name, module in names.items()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers")
    ]
    embeddings = find("embeddings")
    if embeddings is None or not lists:
        raise UnsupportedModelError(
            f"{type(network).__name__} ({model_type}): not a ResNet or a vision transformer "
            f"with "
            "embeddings and a list of layers; supported: ResNet, ViT, DINOv2, CLIP vision"
        )
    layers, module = max(lists, key=lambda item: len(item[1]))
    # CLIP normalises the embeddings before its first layer: the patch embedding block is what that layer reads
    first = find("pre_layrnorm") or embeddings
    taps = [_Tap(first, "patch embedding", "tokens")]
    taps += [_Tap(f"{layers}.{i}", f"layer{i}", "tokens") for i in range(len(module))]
    if find("layernorm"):
        taps.append(_Tap(find("layernorm"), "class token (final norm)", "cls"))
    elif find("post_layernorm"):
        taps.append(_Tap(find("post_layernorm"), "class token (final norm)", "pooled"))
    return taps


def _processor_spec(directory: Path, source: str) -> ImageSpec:
    """The image processor's sizes, filter, mean and std, read from its preprocessor_config.json."""
    path = directory / "preprocessor_config.json"
    if not path.exists():
        raise ModelLoadError(
            f"--model hf:{source}: no preprocessor_config.json beside the model, so its image size, "
            f"mean "
            "and std are unknown; save the model's image processor there too "
            "(AutoImageProcessor.from_pretrained(...).save_pretrained(DIR))"
        )
    config = json.loads(path.read_text())
    size = config.get("size", 224)
    size = size if isinstance(size, dict) else {"shortest_edge": int(size)}
    crop = config.get("crop_size") if config.get("do_center_crop", False) else None
    crop = crop if isinstance(crop, dict) or crop is None else {"height": int(crop), "width": int(crop)}
    if "shortest_edge" in size:
        short = int(size["shortest_edge"])
        if config.get("crop_pct") is not None and short < 384:  # ConvNextImageProcessor (ResNets): resize, then crop
            resize, final = int(short / float(config["crop_pct"])), short
        else:
            resize, final = short, int(crop["height"]) if crop else short
    else:
        if int(size["height"]) != int(size["width"]):
            raise UnsupportedModelError(f"--model hf:{source}: the processor resizes to a non-square {size}")
        resize = int(size["height"])  # both sides to that size, as the processor does
        final = int(crop["height"]) if crop else resize
    if not config.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean, std = tuple(config.get("image_mean", (0.5,) * 3)), tuple(config.get("image_std", (0.5,) * 3))
    return ImageSpec(
        final,
        resize,
        _RESAMPLE.get(config.get("resample", 2), "bilinear"),
        mean,
        std,
        squash="shortest_edge" not in size,
    )


def load_hf(source: str) -> BackboneModel:
    """A vision backbone from a local `save_pretrained` directory or a Hub id (module docstring)."""
    require("transformers", "transformers", f"--model hf:{source}")
    from transformers import AutoConfig, AutoModel

    path = Path(source).expanduser()
    if not path.is_dir():
        if source.startswith((".", "/", "~")) or source.count("/") != 1:
            raise ModelLoadError(f"--model hf:{source}: no such directory")
        path = _hub_snapshot(source)
    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"--model hf:{source}: no config.json in {path}; expected a transformers save_pretrained directory"
        )
    try:
        config = AutoConfig.from_pretrained(path)
        if config.model_type == "clip":  # a full CLIP model: its vision tower
            from transformers import CLIPVisionModel

            network = CLIPVisionModel.from_pretrained(path)
        elif config.model_type == "vit_mae":
            raise UnsupportedModelError(
                f"--model hf:{source}: ViT-MAE shuffles and masks its tokens at random; its "
                "features would not be reproducible (not supported yet)"
            )
        else:
            network = AutoModel.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        if isinstance(error, UnsupportedModelError):
            raise
        raise ModelLoadError(f"--model hf:{source}: cannot load it ({type(error).__name__}: {error})") from None
    model_type = network.config.model_type
    image = _processor_spec(path, source)

    def forward(network, pixels):
        return network(pixel_values=pixels)

    model = BackboneModel(
        "hf", network, _hf_taps(network, model_type), image, f"hf:{source}", _public(network.config.to_dict()), forward
    )
    model.patch_size = getattr(network.config, "patch_size", None)
    return model


def _hub_snapshot(repo_id: str) -> Path:
    return hub_snapshot(repo_id, ["*.json", "*.safetensors", "*.txt"], prefix="hf:")


# -- timm ---------------------------------------------------------------------------------------------
def _timm_taps(network: nn.Module, name: str) -> list[_Tap]:
    if all(hasattr(network, f"layer{i}") for i in range(1, 5)) and hasattr(network, "maxpool"):
        taps = [_Tap("maxpool", "stem", "map")]
        for i in range(1, 5):
            taps += [_Tap(f"layer{i}.{j}", f"layer{i}[{j}]", "map") for j in range(len(getattr(network, f"layer{i}")))]
        return taps
    if hasattr(network, "blocks") and hasattr(network, "patch_embed") and hasattr(network, "norm_pre"):
        taps = [_Tap("norm_pre", "patch embedding", "tokens")]
        taps += [_Tap(f"blocks.{i}", f"blocks[{i}]", "tokens") for i in range(len(network.blocks))]
        if getattr(network, "cls_token", None) is not None:
            taps.append(_Tap("norm", "class token (final norm)", "cls"))
        return taps
    raise UnsupportedModelError(
        f"--model timm:{name}: only ResNets (layer1..layer4) and vision transformers "
        "(patch_embed, blocks) have block tables so far"
    )


def _state_dict(checkpoint: str, name: str) -> dict:
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and "unsupported global" errors all mean the same here
        raise ModelLoadError(
            f"--checkpoint {checkpoint}: cannot read it as a state dict with weights_only=True "
            f"({type(error).__name__}: {error})"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelLoadError(f"--checkpoint {checkpoint}: holds a {type(state).__name__}, not a state dict")
    prefixes = ("module.", "encoder.", "backbone.")
    for prefix in prefixes:  # DDP and SSL wrappers
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_timm(name: str, checkpoint: str | None, *, weights: bool = True) -> BackboneModel:
    """A timm architecture with the weights of `checkpoint` (`weights=False`: structure only, for the table)."""
    timm = require("timm", "backbones", f"--model timm:{name}")
    from timm.data import resolve_model_data_config

    try:
        network = timm.create_model(name, pretrained=False)
    except RuntimeError as error:  # timm: "Unknown model"
        raise ModelLoadError(f"--model timm:{name}: {error}; `timm.list_models()` lists the names") from None
    if weights:
        if checkpoint is None:
            raise ModelLoadError(
                f"--model timm:{name} needs --checkpoint FILE: nothing is downloaded, and features of "
                "random weights are rarely what is meant"
            )
        state = _state_dict(checkpoint, name)
        head = network.default_cfg.get("classifier", "fc")
        result = network.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(head + ".")]
        if missing:
            raise ModelLoadError(
                f"--checkpoint {checkpoint} does not fit timm:{name}: {len(missing)} weights missing "
                f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})"
            )
        if result.unexpected_keys:
            log.info(
                "--checkpoint %s: %d entries not used by timm:%s (%s ...)",
                checkpoint,
                len(result.unexpected_keys),
                name,
                result.unexpected_keys[0],
            )
    data = resolve_model_data_config(network)
    if data.get("crop_mode", "center") != "center":
        raise UnsupportedModelError(
            f"--model timm:{name}: its data config crops with mode {data['crop_mode']!r}; only "
            "centre crops are supported"
        )
    size = int(data["input_size"][-1])
    image = ImageSpec(
        size,
        int(math.floor(size / float(data.get("crop_pct", 1.0)))),
        str(data["interpolation"]),
        tuple(data["mean"]),
        tuple(data["std"]),
        convention="torchvision",
    )

    def forward(network, pixels):
        return network.forward_features(pixels)

    config = {"architecture": name, "pretrained_cfg": _public(dict(network.pretrained_cfg or {}))}
    model = BackboneModel("timm", network, _timm_taps(network, name), image, f"timm:{name}", config, forward)
    patch = getattr(getattr(network, "patch_embed", None), "patch_size", None)
    model.patch_size = patch[0] if isinstance(patch, (tuple, list)) else patch
    return model
