"""Latent diffusion models: Stable Diffusion 1.x/2.x (UNet2DConditionModel) and DiT (DiTTransformer2DModel).

Both run over the latents of an `AutoencoderKL`: an image (read as for a pixel U-Net, [-1, 1] at the
VAE's input size) becomes z0 = the VAE posterior's *mean* (not a sample, so features are
reproducible) times the VAE's scaling factor, computed in float32; the noise is added to z0 with the
pipeline's own schedule and the project's noise function over the latent shape.

- Stable Diffusion is conditioned on the text encoder's embedding of the empty prompt (DIFT's
  choice), computed once; `--prompt "a photo of a {}"` conditions each image on its class name
  instead (the class folder's name, `_` read as a space). The prompt and the embeddings' sha256 are
  part of the store's identity. Its block table numbers the U-Net as `stages.models.blocks` numbers
  `UNet2DModel`, which for SD 1.x/2.x is the original LDM code's `input_blocks`, `middle_block`,
  `output_blocks`. SDXL (added text-time conditioning) is stages.models.prompted's.
- DiT is class-conditional; it is run with the null class (the unconditional embedding of
  classifier-free guidance), which the store records. Its blocks are the patch embedding and each
  transformer block, tokens laid out as the patch grid.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from cache.errors import UserError
from cache.extras import require
from stages.models.blocks import Block, UnsupportedModelError, block_table
from stages.models.capture import BlockCapture, output_tensor
from stages.models.feature_model import FeatureModel
from stages.models.loading import DEFAULT_SCHEDULE, ModelLoadError, _public, weights_hash
from stages.models.memory import vae_widths


class PromptError(UserError, ValueError):
    """A prompt template that cannot be used."""


def _square(size) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise UnsupportedModelError(f"only square inputs are supported; the model's sample_size is {size}")
        size = size[0]
    return int(size)


class LatentModel(FeatureModel):
    """A network over the latents of `vae`, noised with `scheduler` (shared by Stable Diffusion and DiT)."""

    # The kinds made for today's model sizes (SDXL, SD3, FLUX, PixArt) cast the network's weights to the compute
    # precision and encode images in VAE slices (stages.models.memory); SD 1.x/2.x and DiT keep computing as their
    # existing stores were computed (float32 weights under autocast, one VAE call per batch).
    at_scale = False

    def __init__(
        self,
        network: nn.Module,
        vae: nn.Module,
        scheduler,
        source: str,
        *,
        latent_size: int | None = None,
        latent_channels: int | None = None,
    ):
        # the VAE runs in float32 whatever the compute precision (SDXL's VAE overflows in fp16): the latents are
        # what gets noised
        vae = vae if next(vae.parameters()).dtype == torch.float32 else vae.float()
        self.network, self.vae, self.scheduler, self.source = network, vae.eval(), scheduler, source
        self.network.eval()
        self.vae_factor = 2 ** (len(vae_widths(vae)) - 1)
        self.latent_size = latent_size or _square(network.config.sample_size)
        self.image_size = self.latent_size * self.vae_factor
        self.latent_channels = latent_channels or int(network.config.in_channels)
        if int(vae.config.latent_channels) != self.latent_channels:
            raise ModelLoadError(
                f"--model {source}: the VAE makes {vae.config.latent_channels}-channel latents but "
                f"the "
                f"{type(network).__name__} takes {self.latent_channels} channels"
            )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.scheduler.betas.to(torch.float64), dim=0)

    def preprocessing(self) -> dict:
        from stages.data.images import preprocessing

        return preprocessing(self.image_size, int(self.vae.config.in_channels))

    def image_options(self) -> dict:
        return {"size": self.image_size, "channels": int(self.vae.config.in_channels)}

    def noise_shape(self) -> tuple[int, ...]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    def prepare(self, device: torch.device) -> None:
        self.network = self.network.to(device).eval()
        self.vae = self.vae.to(device).eval()

    def cast(self, dtype: torch.dtype) -> None:
        if self.at_scale:
            self.network = self.network.to(dtype)

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H / f, W / f): (posterior mean - shift factor) x scaling factor,
        in float32 (SD3 and FLUX's VAEs have a shift factor; SD's and DiT's none)."""
        if self.at_scale:
            from stages.models.memory import vae_image_bytes, vae_slice

            step = vae_slice(vae_image_bytes(self.vae, self.image_size), len(x0))
            if step < len(x0):
                return torch.cat([self._encode(x0[i : i + step]) for i in range(0, len(x0), step)])
        return self._encode(x0)

    def _encode(self, x0: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x0.device.type, enabled=False):
            mean = self.vae.encode(x0.float()).latent_dist.mean
        shift = self.vae.config.get("shift_factor")
        if shift:
            mean = mean - float(shift)
        return mean * float(self.vae.config.scaling_factor)

    def input_summary(self) -> str:
        side = self.latent_size
        return (
            f"{self.kind}: {self.image_size} px images -> {side}x{side}x{self.latent_channels} latents "
            f"(VAE /{self.vae_factor}); px/cell and latent/cell: what one cell of a block's map covers"
        )

    def memory_estimate(self, deepest: int, precision: str):
        """stages.models.memory.MemoryEstimate for blocks up to `deepest` at `precision` (for --dry-run)."""
        from stages.models import memory

        params = memory.parameters(self.network)
        row_bytes, basis = self.activation_row_bytes(deepest, precision)
        return memory.MemoryEstimate(
            type(self.network).__name__,
            params,
            params * (memory.PRECISION_BYTES[precision] if self.at_scale else 4),
            memory.parameters(self.vae),
            int(getattr(self, "text_parameters", 0)),
            row_bytes,
            memory.vae_image_bytes(self.vae, self.image_size),
            basis,
            text_offloaded=bool(getattr(self, "offload_text", True)),
        )

    def activation_row_bytes(self, deepest: int, precision: str) -> tuple[int, str]:
        from stages.models import memory

        return memory.unet_row_bytes(self.block_table(), deepest, precision), "U-Net block outputs x 4"

    @cached_property
    def weights_sha256(self) -> str:
        return weights_hash(self.network)

    @cached_property
    def vae_sha256(self) -> str:
        return weights_hash(self.vae)

    def _identity(self) -> dict:
        return {
            "kind": self.kind,
            "source": self.source,
            "weights_sha256": self.weights_sha256,
            "config": _public(self.network.config),
            "vae_sha256": self.vae_sha256,
            "vae_config": _public(self.vae.config),
            "scheduler": _public(self.scheduler.config),
        }


# -- Stable Diffusion -------------------------------------------------------------------------------
class StableDiffusionModel(LatentModel):
    kind = "stable-diffusion"

    def __init__(self, unet, vae, scheduler, text_encoder, tokenizer, source: str, prompt: str | None = None):
        super().__init__(unet, vae, scheduler, source)
        self.text_encoder, self.tokenizer = text_encoder.eval(), tokenizer
        if prompt is not None and "{}" not in prompt:
            raise PromptError(
                f"--prompt {prompt!r} has no {{}} where the class name goes: give a template such as "
                "'a photo of a {}', or leave --prompt out for the empty prompt (the default)"
            )
        self.prompt = prompt
        self.prompts: list[str] = [""] if prompt is None else []
        self._embeddings: torch.Tensor | None = None
        self.text_parameters = sum(p.numel() for p in text_encoder.parameters())  # on the CPU, for --dry-run

    def bind_classes(self, classes: list[str]) -> None:
        if self.prompt is not None:
            self.prompts = [self.prompt.replace("{}", name.replace("_", " ")) for name in classes]
            self._embeddings = None

    def embeddings(self) -> torch.Tensor:
        """(P, L, D) float32: the text encoder's last hidden state of each prompt (one, or one per class)."""
        if self._embeddings is None:
            if not self.prompts:
                raise PromptError("a prompt template needs the data set's class names first (bind_classes)")
            length = self.tokenizer.model_max_length
            if length > 10**6:  # a tokenizer saved without one: the encoder's positions are the limit
                length = int(self.text_encoder.config.max_position_embeddings)
            tokens = self.tokenizer(
                self.prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            )
            with torch.inference_mode():
                self._embeddings = self.text_encoder(tokens.input_ids)[0].float().clone()
        return self._embeddings

    def block_table(self) -> list[Block]:
        return [replace(b, stride=self.image_size // b.resolution) for b in block_table(self.network)]

    def prepare(self, device: torch.device) -> None:
        embeddings = self.embeddings()
        super().prepare(device)
        self._embeddings = embeddings.to(device)

    def capture(self, blocks) -> BlockCapture:
        embeddings = self.embeddings()
        per_class = self.prompt is not None

        def forward(unet, sample, timesteps, *, labels=None, **_):
            rows = embeddings[labels] if per_class else embeddings.expand(sample.shape[0], -1, -1)
            unet(sample, timesteps, encoder_hidden_states=rows.to(embeddings.device))

        return BlockCapture(self.network, blocks, forward=forward)

    def identity(self) -> dict:
        digest = hashlib.sha256(self.embeddings().cpu().contiguous().numpy().tobytes()).hexdigest()
        conditioning = {
            "prompt": "" if self.prompt is None else self.prompt,
            "embedding_sha256": digest,
            "per_class": self.prompt is not None,
        }
        return {**self._identity(), "conditioning": conditioning}


# -- DiT ---------------------------------------------------------------------------------------------
class DiTModel(LatentModel):
    kind = "dit"

    def __init__(self, transformer, vae, scheduler, source: str, *, feature_norm: str | None = None):
        from stages.models.tokens import FEATURE_NORMS

        super().__init__(transformer, vae, scheduler, source)
        if feature_norm not in (None, *FEATURE_NORMS):
            raise UnsupportedModelError(f"--feature-norm {feature_norm}: use one of {', '.join(FEATURE_NORMS)}")
        self.feature_norm = None if feature_norm in (None, "none") else feature_norm
        classes = transformer.config.num_embeds_ada_norm
        table = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        if classes is None or table.num_embeddings <= int(classes):
            raise UnsupportedModelError(
                f"--model {source}: this DiT has no null-class embedding (class dropout 0), "
                "so it cannot be run unconditionally"
            )
        self.null_class = int(classes)
        self.patch_size = int(transformer.config.patch_size)
        self.grid = self.latent_size // self.patch_size

    def block_table(self) -> list[Block]:
        width = int(self.network.config.num_attention_heads * self.network.config.attention_head_dim)
        stride = self.patch_size * self.vae_factor
        rows = [Block(1, "pos_embed", "x_embedder", width, self.grid, stride)]
        for i in range(len(self.network.transformer_blocks)):
            rows.append(Block(i + 2, f"transformer_blocks.{i}", f"blocks[{i}]", width, self.grid, stride))
        return rows

    def activation_row_bytes(self, deepest: int, precision: str) -> tuple[int, str]:
        from stages.models import memory

        width = int(self.network.config.num_attention_heads * self.network.config.attention_head_dim)
        return (
            memory.transformer_row_bytes(self.grid**2, width, precision),
            f"{self.grid**2} image tokens x width {width} x {memory.BLOCK_COPIES}",
        )

    def _tokens_to_map(self, output) -> torch.Tensor:
        from stages.models.tokens import token_map

        # (B, h*w, D), row-major over the patch grid
        return token_map(output_tensor(output), self.grid, norm=self.feature_norm)

    def capture(self, blocks) -> BlockCapture:
        def forward(transformer, sample, timesteps, **_):
            labels = torch.full((sample.shape[0],), self.null_class, dtype=torch.long, device=sample.device)
            transformer(sample, timestep=timesteps, class_labels=labels)

        maps = {block.number: self._tokens_to_map for block in blocks}
        return BlockCapture(self.network, blocks, forward=forward, maps=maps)

    def identity(self) -> dict:
        identity = {**self._identity(), "conditioning": {"class_label": self.null_class, "null_class": True}}
        if self.feature_norm:  # recorded only when used: a store without it stays what it always was
            from stages.models.tokens import feature_norm_record

            identity["feature_norm"] = feature_norm_record(self.feature_norm)
        return identity


# -- loading -------------------------------------------------------------------------------------------
def _need(path: Path, parts: dict[str, str], kind: str = "") -> None:
    missing = [f"{name}/ ({what})" for name, what in parts.items() if not (path / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"--model {path}: the {kind + ' ' if kind else ''}pipeline directory lacks "
            f"{', '.join(missing)}; a diffusers pipeline saved with save_pretrained has one folder "
            "per component"
        )


def _scheduler(path: Path):
    from diffusers import DDPMScheduler

    if (path / "scheduler" / "scheduler_config.json").exists():
        config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        # only the schedule matters here (betas); any diffusers scheduler's config carries it
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        return DDPMScheduler(**{k: config[k] for k in keys if k in config and config[k] is not None})
    return DDPMScheduler(**DEFAULT_SCHEDULE)


def _loading(source, what):
    try:
        return what()
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ModelLoadError(f"--model {source}: cannot load it ({type(error).__name__}: {error})") from None


def load_stable_diffusion(source: str, *, prompt: str | None = None) -> StableDiffusionModel:
    """A Stable Diffusion 1.x/2.x pipeline directory: unet/, vae/, text_encoder/, tokenizer/ (scheduler/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    require("transformers", "transformers", "a Stable Diffusion pipeline's text encoder")
    from transformers import AutoTokenizer, CLIPTextModel

    path = Path(source).expanduser()
    _need(
        path,
        {
            "unet": "UNet2DConditionModel",
            "vae": "AutoencoderKL",
            "text_encoder": "the text encoder",
            "tokenizer": "the text encoder's tokenizer",
        },
    )
    unet_config = json.loads((path / "unet" / "config.json").read_text())
    if unet_config.get("addition_embed_type"):
        raise UnsupportedModelError(
            f"--model {source}: a U-Net with added {unet_config['addition_embed_type']} "
            "conditioning is not Stable Diffusion 1.x/2.x (SDXL's text_time is supported)"
        )
    unet = _loading(source, lambda: UNet2DConditionModel.from_pretrained(path / "unet", low_cpu_mem_usage=False))
    vae = _loading(source, lambda: AutoencoderKL.from_pretrained(path / "vae", low_cpu_mem_usage=False))
    text_encoder = _loading(source, lambda: CLIPTextModel.from_pretrained(path / "text_encoder"))
    tokenizer = _loading(source, lambda: AutoTokenizer.from_pretrained(path / "tokenizer"))
    return StableDiffusionModel(unet, vae, _scheduler(path), text_encoder, tokenizer, str(source), prompt)


def load_dit(source: str, *, feature_norm: str | None = None) -> DiTModel:
    """A DiT pipeline directory: transformer/ (DiTTransformer2DModel), vae/, scheduler/."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    path = Path(source).expanduser()
    _need(path, {"transformer": "DiTTransformer2DModel", "vae": "AutoencoderKL"})
    transformer = _loading(
        source, lambda: DiTTransformer2DModel.from_pretrained(path / "transformer", low_cpu_mem_usage=False)
    )
    vae = _loading(source, lambda: AutoencoderKL.from_pretrained(path / "vae", low_cpu_mem_usage=False))
    return DiTModel(transformer, vae, _scheduler(path), str(source), feature_norm=feature_norm)
