"""Which kind of model `--model` names, and loading it behind the one interface (stages.models.feature_model).

    hf:<directory or hub id>      a vision backbone `transformers.AutoModel` loads (ResNet, ViT, DINOv2, CLIP)
    timm:<name>                   a timm architecture, weights from --checkpoint (stages.models.backbones)
    a pipeline directory with unet/ holding a UNet2DConditionModel, vae/, text_encoder/, tokenizer/
                                  Stable Diffusion 1.x/2.x (stages.models.latent)
    a pipeline directory with transformer/ holding a DiTTransformer2DModel, vae/
                                  DiT (stages.models.latent)
    anything else                 a pixel-space UNet2DModel (stages.models.loading)
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.models.feature_model import FeatureModel
from stages.models.loading import ModelLoadError, load_model


def _class_name(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def model_kind(source: str) -> str:
    """"hf", "timm", "stable-diffusion", "dit" or "unet", from the name and (for a directory) its layout."""
    text = str(source)
    if text.startswith("hf:"):
        return "hf"
    if text.startswith("timm:"):
        return "timm"
    path = Path(text).expanduser()
    if path.is_dir():
        if _class_name(path / "transformer" / "config.json") == "DiTTransformer2DModel":
            return "dit"
        if _class_name(path / "unet" / "config.json") == "UNet2DConditionModel":
            return "stable-diffusion"
        index = path / "model_index.json"
        if index.exists():
            try:
                entries = json.loads(index.read_text())
            except ValueError:
                entries = {}
            if "transformer" in entries:
                return "dit"
            if "text_encoder" in entries or "vae" in entries:
                return "stable-diffusion"
    return "unet"


def load_feature_model(source: str, *, prompt: str | None = None, checkpoint: str | None = None,
                       weights: bool = True) -> FeatureModel:
    """Load what `--model` names (module docstring); options that do not apply to its kind are refused.

    `weights=False` is enough for the block table: a timm model then needs no checkpoint."""
    kind = model_kind(source)
    if prompt is not None and kind != "stable-diffusion":
        raise ModelLoadError(f"--prompt applies to Stable Diffusion pipelines only; --model {source} is a {kind} model")
    if checkpoint is not None and kind != "timm":
        raise ModelLoadError(f"--checkpoint applies to timm: models only; --model {source} is a {kind} model "
                             "(its weights are in its directory)")
    if kind == "hf":
        from stages.models.backbones import load_hf

        return load_hf(source[len("hf:"):])
    if kind == "timm":
        from stages.models.backbones import load_timm

        return load_timm(source[len("timm:"):], checkpoint, weights=weights)
    if kind == "stable-diffusion":
        from stages.models.latent import load_stable_diffusion

        return load_stable_diffusion(source, prompt=prompt)
    if kind == "dit":
        from stages.models.latent import load_dit

        return load_dit(source)
    return load_model(source)
