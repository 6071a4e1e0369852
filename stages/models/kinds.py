"""Which kind of model `--model` names, and loading it behind the one interface (stages.models.feature_model).

    hf:<directory or hub id>      a vision backbone `transformers.AutoModel` loads (ResNet, ViT, DINOv2, CLIP)
    timm:<name>                   a timm architecture, weights from --checkpoint (stages.models.backbones)
    a pipeline directory with unet/ holding a UNet2DConditionModel, vae/, text_encoder/, tokenizer/
                                  Stable Diffusion 1.x/2.x (stages.models.latent)
    ... whose UNet2DConditionModel has addition_embed_type "text_time", with text_encoder_2/, tokenizer_2/
                                  SDXL (stages.models.prompted)
    a pipeline directory with transformer/ holding a DiTTransformer2DModel, vae/
                                  DiT (stages.models.latent)
    ... an SD3Transformer2DModel, a FluxTransformer2DModel or a PixArtTransformer2DModel, with the pipeline's
        text encoders and tokenizers, vae/, scheduler/
                                  SD3 / SD3.5, FLUX.1, PixArt-Alpha / Sigma (stages.models.transformers)
    ... a SanaTransformer2DModel, with text_encoder/ (Gemma-2), tokenizer/, vae/ (AutoencoderDC), scheduler/
                                  Sana 1.0 / 1.5 (stages.models.sana)
    anything else                 a pixel-space UNet2DModel (stages.models.loading)

Anything else a diffusers pipeline directory can hold (video models, ControlNets, other transformers
such as Sana-Sprint's or video transformers, SDXL refiners) is refused by name, with the list of what is supported.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.models.blocks import UnsupportedModelError
from stages.models.feature_model import FeatureModel
from stages.models.loading import ModelLoadError, load_model


def _class_name(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


SUPPORTED = (
    "pixel-space UNet2DModel directories, Stable Diffusion 1.x/2.x, SDXL, DiT, SD3/SD3.5, FLUX.1-dev/schnell, "
    "PixArt-Alpha/Sigma and Sana pipeline directories, hf: and timm: vision backbones"
)
TRANSFORMERS = {
    "DiTTransformer2DModel": "dit",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "PixArtTransformer2DModel": "pixart",
    "SanaTransformer2DModel": "sana",
}
TEXT_CONDITIONED = ("stable-diffusion", "sdxl", "sd3", "flux", "pixart", "sana")
TOKEN_KINDS = ("dit", "sd3", "flux", "pixart", "sana")  # transformer kinds: --feature-norm applies
PROMPTED = ("sdxl", "sd3", "flux", "pixart", "sana")  # text encoders run once per store: --offload applies
OFFLOADS = ("none", "text")


def refuse(source: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"--model {source}: {what} is not supported; supported: {SUPPORTED}")


def _pipeline_kind(path: Path, source: str) -> str | None:
    """The kind of a diffusers pipeline directory, None if it is not one; unsupported ones are refused."""
    index = path / "model_index.json"
    try:
        entries = json.loads(index.read_text()) if index.exists() else {}
    except ValueError:
        entries = {}
    pipeline = str(entries.get("_class_name") or "")
    if "controlnet" in entries or (path / "controlnet").is_dir() or "ControlNet" in pipeline:
        raise refuse(source, f"a ControlNet pipeline ({pipeline or 'controlnet/'})")
    if "Video" in pipeline or "Vid" in pipeline:
        raise refuse(source, f"a video pipeline ({pipeline})")
    transformer = _class_name(path / "transformer" / "config.json")
    if transformer is not None:
        if transformer not in TRANSFORMERS:
            raise refuse(source, f"its transformer/ class {transformer}")
        return TRANSFORMERS[transformer]
    unet = _class_name(path / "unet" / "config.json")
    if unet == "UNet2DConditionModel":
        config = json.loads((path / "unet" / "config.json").read_text())
        addition = config.get("addition_embed_type")
        if addition == "text_time":
            if not (path / "text_encoder").is_dir() and (path / "text_encoder_2").is_dir():
                raise refuse(source, "an SDXL refiner (text_encoder_2/ only, aesthetic-score conditioning)")
            return "sdxl"
        if addition:
            raise refuse(source, f"a U-Net with added {addition!r} conditioning")
        return "stable-diffusion"
    if unet is not None and unet != "UNet2DModel":
        raise refuse(source, f"its unet/ class {unet}")
    if "transformer" in entries:
        return "dit"
    if "text_encoder" in entries or "vae" in entries:
        return "stable-diffusion"
    return None


def model_kind(source: str) -> str:
    """ "hf", "timm", "stable-diffusion", "sdxl", "dit", "sd3", "flux", "pixart", "sana" or "unet", from the name and
    (for a directory) its layout; a pipeline of another kind is refused (UnsupportedModelError)."""
    text = str(source)
    if text.startswith("hf:"):
        return "hf"
    if text.startswith("timm:"):
        return "timm"
    path = Path(text).expanduser()
    if path.is_dir():
        return _pipeline_kind(path, text) or "unet"
    return "unet"


def load_feature_model(
    source: str,
    *,
    prompt: str | None = None,
    checkpoint: str | None = None,
    weights: bool = True,
    feature_norm: str | None = None,
    guidance: float | None = None,
    offload: str | None = None,
    device: str = "auto",
) -> FeatureModel:
    """Load what `--model` names (module docstring); options that do not apply to its kind are refused.

    `weights=False` is enough for the block table: a timm model then needs no checkpoint. `offload` "none" runs
    the text encoders on `device` (the extraction's --device), "text" or None keeps them on the CPU."""
    kind = model_kind(source)
    if offload is not None and (offload not in OFFLOADS or kind not in PROMPTED):
        raise ModelLoadError(
            f"--offload {offload}: it applies to the pipelines whose text encoders run once per store "
            f"({', '.join(PROMPTED)}) with one of {', '.join(OFFLOADS)}; --model {source} is a {kind} "
            "model: leave --offload out"
        )
    model = _load(
        kind,
        source,
        prompt=prompt,
        checkpoint=checkpoint,
        weights=weights,
        feature_norm=feature_norm,
        guidance=guidance,
    )
    if kind in PROMPTED:
        model.offload_text, model.text_device = offload != "none", device
    return model


def _load(kind: str, source: str, *, prompt, checkpoint, weights, feature_norm, guidance) -> FeatureModel:
    if prompt is not None and kind not in TEXT_CONDITIONED:
        raise ModelLoadError(
            f"--prompt applies to text-conditioned pipelines ({', '.join(TEXT_CONDITIONED)}); "
            f"--model {source} is a {kind} model"
        )
    if checkpoint is not None and kind != "timm":
        raise ModelLoadError(
            f"--checkpoint applies to timm: models only; --model {source} is a {kind} model "
            "(its weights are in its directory)"
        )
    if feature_norm not in (None, "none") and kind not in TOKEN_KINDS:
        raise ModelLoadError(
            f"--feature-norm applies to the transformer kinds ({', '.join(TOKEN_KINDS)}); --model "
            f"{source} is a {kind} model: leave --feature-norm out"
        )
    if guidance is not None and kind != "flux":
        raise ModelLoadError(f"--guidance applies to FLUX.1 pipelines only; --model {source} is a {kind} model")
    if kind == "hf":
        from stages.models.backbones import load_hf

        return load_hf(source[len("hf:") :])
    if kind == "timm":
        from stages.models.backbones import load_timm

        return load_timm(source[len("timm:") :], checkpoint, weights=weights)
    if kind == "stable-diffusion":
        from stages.models.latent import load_stable_diffusion

        return load_stable_diffusion(source, prompt=prompt)
    if kind == "sdxl":
        from stages.models.prompted import load_sdxl

        return load_sdxl(source, prompt=prompt)
    if kind == "dit":
        from stages.models.latent import load_dit

        return load_dit(source, feature_norm=feature_norm)
    if kind in ("sd3", "flux", "pixart"):
        from stages.models import transformers

        options = {"guidance": guidance} if kind == "flux" else {}
        loaders = {"sd3": transformers.load_sd3, "flux": transformers.load_flux, "pixart": transformers.load_pixart}
        loader = loaders[kind]
        return loader(source, prompt=prompt, feature_norm=feature_norm, **options)
    if kind == "sana":
        from stages.models.sana import load_sana

        return load_sana(source, prompt=prompt, feature_norm=feature_norm)
    return load_model(source)
