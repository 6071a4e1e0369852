"""Loading a diffusion U-Net and its noise schedule, and naming them (weights hash, config)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import SafetensorError

from cache.errors import UserError
from stages.models.feature_model import FeatureModel
from stages.models.records import check_recorded_weights

# What a model directory without a scheduler config is assumed to have been trained with.
DEFAULT_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
# A model directory may name the image preprocessing its model was trained with ({"preprocess": "adm"};
# `pipeline convert-adm` writes it): extraction uses it unless --preprocess says otherwise.
PREPROCESS_FILE = "preprocessing.json"


@dataclass
class LoadedModel(FeatureModel):
    """A pixel-space `UNet2DModel` and its scheduler: the image itself is noised (stages.models.feature_model)."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    source: str  # what the user passed: a directory or a hub id
    preprocess: str = "bicubic"  # the preprocessing its directory names (PREPROCESS_FILE), else "bicubic"

    @property
    def image_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def block_table(self):
        from stages.models.blocks import block_table

        return block_table(self.unet)

    def preprocessing(self) -> dict:
        from stages.data.images import preprocessing

        return preprocessing(self.image_size, int(self.unet.config.in_channels))

    def image_options(self) -> dict:
        return {"size": self.image_size, "channels": int(self.unet.config.in_channels)}

    def noise_shape(self) -> tuple[int, ...]:
        return (int(self.unet.config.in_channels), self.image_size, self.image_size)

    def prepare(self, device: torch.device) -> None:
        self.unet = self.unet.to(device).eval()
        if device.type == "cuda":
            self.unet = self.unet.to(memory_format=torch.channels_last)

    def capture(self, blocks):
        from stages.models.capture import BlockCapture

        return BlockCapture(self.unet, blocks)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t for every t, float64: recomputed from the betas, so x_t is not limited by float32 cumprod."""
        betas = self.scheduler.betas.to(torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)

    @cached_property
    def weights_sha256(self) -> str:
        return weights_hash(self.unet)

    def identity(self) -> dict:
        """Everything about the model that determines its features."""
        return {
            "source": self.source,
            "weights_sha256": self.weights_sha256,
            "config": _public(self.unet.config),
            "scheduler": _public(self.scheduler.config),
        }


def _public(config) -> dict:
    # Keys like "_name_or_path" and "_diffusers_version" say where a model was loaded from, not what it is.
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=str))


class ModelLoadError(UserError):
    """A model directory or hub id that cannot be loaded; the message names it and what to pass instead."""


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes), independent of how it was saved."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        # reshape(-1) also flattens tensors that count as contiguous with a stride != 1 in a size-1
        # dimension (1x1 convolution weights in channels-last), which a byte view refuses
        array = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{array.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return digest.hexdigest()


def _layout(path: Path) -> tuple[Path, Path | None]:
    """(unet directory, scheduler directory or None) for a bare model dir or a pipeline dir."""
    if (path / "model_index.json").exists() or (path / "unet" / "config.json").exists():
        scheduler = path / "scheduler"
        return path / "unet", scheduler if (scheduler / "scheduler_config.json").exists() else None
    return path, path if (path / "scheduler_config.json").exists() else None


def load_model(source: str | Path) -> LoadedModel:
    """Load a `UNet2DModel` (a `save_pretrained` directory, a pipeline directory or a hub id).

    The scheduler comes from `scheduler_config.json` beside the weights (or `scheduler/` in a
    pipeline directory); without one the model is assumed to use DDPM's linear 1000-step schedule.
    A directory whose own record holds its weights' sha256 (`pipeline pretrain`, `pipeline random-init`)
    is verified against it (`stages.models.records`).
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"--model {text}: expected a directory saved by UNet2DModel.save_pretrained, got a file"
            )
        unet_dir, scheduler_dir = _layout(path)
        if not (unet_dir / "config.json").exists():
            raise ModelLoadError(
                f"--model {text}: no config.json in {unet_dir}; expected a directory saved by "
                f"UNet2DModel.save_pretrained"
            )
        try:
            unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False)
            scheduler = (
                DDPMScheduler.from_pretrained(scheduler_dir) if scheduler_dir else DDPMScheduler(**DEFAULT_SCHEDULE)
            )
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
            # diffusers says which file is missing or not valid JSON; truncated weights come from safetensors
            raise ModelLoadError(
                f"--model {text}: cannot load it ({type(error).__name__}: {error}); expected a "
                f"directory "
                "saved by UNet2DModel.save_pretrained (config.json and its weights)"
            ) from None
        loaded = LoadedModel(unet.eval(), scheduler, text, _recorded_preprocess(path, unet_dir))
        check_recorded_weights(unet_dir, loaded.weights_sha256)  # nothing a result depends on is read unverified
        return loaded
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelLoadError(f"--model {text}: no such directory")
    return _load_from_hub(text)


def _recorded_preprocess(path: Path, unet_dir: Path) -> str:
    for directory in (path, unet_dir):
        file = directory / PREPROCESS_FILE
        if file.exists():
            try:
                method = json.loads(file.read_text())["preprocess"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ModelLoadError(
                    f'{file} cannot be read ({error}); it should hold {{"preprocess": "adm"}} '
                    'or {"preprocess": "bicubic"}'
                ) from None
            if method not in ("bicubic", "adm"):
                raise ModelLoadError(f'{file} names the preprocessing {method!r}; use "adm" or "bicubic"')
            return method
    return "bicubic"


def hub_snapshot(repo_id: str, patterns: list[str], *, prefix: str = "") -> Path:
    """A local copy of Hub repository `repo_id` (the files matching `patterns`); offline or not found is a
    ModelLoadError that says how to pass a downloaded copy (`prefix`: how --model names its kind, e.g. "hf:")."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # the hub client raises many types for "offline" and "not found"
        raise ModelLoadError(
            f"--model {prefix}{repo_id}: could not fetch it from the Hugging Face Hub ({type(error).__name__}: "
            f"{error}). Without network, download it elsewhere (`huggingface-cli download {repo_id} --local-dir "
            f"models/NAME`), copy the directory here and pass --model {prefix}models/NAME"
        ) from error


def _load_from_hub(repo_id: str) -> LoadedModel:
    local = hub_snapshot(repo_id, ["*.json", "*.safetensors", "unet/*", "scheduler/*"])
    loaded = load_model(local)
    loaded.source = repo_id
    return loaded
