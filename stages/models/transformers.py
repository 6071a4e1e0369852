"""Today's latent diffusion transformers: Stable Diffusion 3 / 3.5 and FLUX.1 (MMDiT), PixArt-Alpha / Sigma.

Each is run as its diffusers pipeline runs it, on the empty prompt (or `--prompt`'s per-class prompts)
encoded once by the pipeline's own encoders (stages.models.prompted):

    kind    network                   noise                         conditioning
    sd3     SD3Transformer2DModel     rectified flow, shift 3.0     CLIP-L + CLIP-G penultimate states, padded to
                                      (stages.models.flow)          T5's width, then T5-XXL's 256 tokens; pooled =
                                                                    both CLIPs' projections; timestep sigma x 1000
    flux    FluxTransformer2DModel    rectified flow, shift by the  T5-XXL's 512 tokens; pooled = CLIP-L's
                                      image's token count (mu)      pooler_output; guidance embedding (dev: 3.5,
                                                                    --guidance); timestep sigma; 2x2-packed latents
    pixart  PixArtTransformer2DModel  DDPM (linear betas), as       T5-XXL's 300 (Sigma) or 120 (Alpha) tokens
                                      SD 1.x                        with their attention mask; resolution and
                                                                    aspect-ratio conditioning where the model has it

Blocks: 1 is the patch embedding's output (image tokens), then every transformer block in execution
order (FLUX: its 19 double-stream blocks, then its 38 single-stream blocks); each stored as the
(D, g, g) map of the image tokens only (text tokens dropped), g the patch grid (FLUX: the latent
grid / 2, its 2x2 packing). The pass stops after the deepest requested block.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.models import text
from stages.models.blocks import Block, UnsupportedModelError
from stages.models.capture import BlockCapture
from stages.models.flow import FlowSchedule, flow_schedule
from stages.models.latent import _loading, _need, _scheduler
from stages.models.loading import ModelLoadError
from stages.models.prompted import PromptedModel
from stages.models.tokens import FEATURE_NORMS, feature_norm_record, image_tokens, token_map

FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (FLUX.1-dev); schnell has no guidance embedding


class TokenTransformer(PromptedModel):
    """A latent transformer whose blocks return image tokens (the module docstring)."""

    patch: int  # latent cells per token side
    joint = False  # MMDiT: blocks return (text tokens, image tokens)

    def __init__(self, network, vae, scheduler, source: str, *, prompt=None, feature_norm: str | None = None, **sizes):
        super().__init__(network, vae, scheduler, source, prompt=prompt, **sizes)
        if feature_norm not in (None, *FEATURE_NORMS):
            raise UnsupportedModelError(f"--feature-norm {feature_norm}: use one of {', '.join(FEATURE_NORMS)}")
        self.feature_norm = None if feature_norm in (None, "none") else feature_norm
        self.grid = self.latent_size // self.patch

    @property
    def width(self) -> int:
        return int(self.network.config.num_attention_heads * self.network.config.attention_head_dim)

    def block_modules(self) -> list[tuple[str, str]]:
        """(module path, the original code's name) of block 1 (the patch embedding) and each transformer block."""
        raise NotImplementedError

    def block_table(self) -> list[Block]:
        stride = self.patch * self.vae_factor
        return [
            Block(i + 1, module, original, self.width, self.grid, stride)
            for i, (module, original) in enumerate(self.block_modules())
        ]

    def _to_map(self, number: int):
        joint = self.joint and number > 1  # the patch embedding returns image tokens alone

        def to_map(output):
            return token_map(image_tokens(output, joint=joint), self.grid, norm=self.feature_norm)

        return to_map

    def forward(self, network, sample: torch.Tensor, timesteps: torch.Tensor, rows: dict) -> None:
        raise NotImplementedError

    def text_tokens(self) -> int:
        """Text tokens in the residual stream beside the image tokens (MMDiT's joint sequence; 0: cross-attention)."""
        return 0

    def activation_row_bytes(self, deepest: int, precision: str) -> tuple[int, str]:
        from stages.models import memory

        tokens = self.grid**2 + self.text_tokens()
        return (
            memory.transformer_row_bytes(tokens, self.width, precision),
            f"{self.grid**2} image + {self.text_tokens()} text tokens x width {self.width} x {memory.BLOCK_COPIES}",
        )

    def capture(self, blocks) -> BlockCapture:
        def forward(network, sample, timesteps, *, labels=None, **_):
            self.forward(network, sample, timesteps, self.rows(labels, sample.shape[0]))

        maps = {block.number: self._to_map(block.number) for block in blocks}
        return BlockCapture(self.network, blocks, forward=forward, maps=maps)

    def noising_record(self) -> dict:
        return {"family": "ddpm", "formula": self.noise_formula()}

    def identity(self) -> dict:
        identity = {**self._identity(), "conditioning": self.conditioning_record(), "noising": self.noising_record()}
        if self.feature_norm:  # recorded only when used: the default store is the raw residual stream
            identity["feature_norm"] = feature_norm_record(self.feature_norm)
        return identity


class FlowTransformer(TokenTransformer):
    """Rectified flow: x_t = (1 - sigma_t) z0 + sigma_t eps, sigma_t from the model's scheduler (stages.models.flow)."""

    schedule: FlowSchedule

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def alphas_cumprod(self):
        raise TypeError(f"{self.kind} is a rectified-flow model: its noise is noise_scales(t), not abar_t")

    def noise_scales(self, timestep: int) -> tuple[float, float]:
        sigma = float(self.schedule.sigmas[timestep])
        return 1.0 - sigma, sigma

    def noise_formula(self) -> str:
        return (
            "x_t = (1 - sigma_t) z0 + sigma_t eps, z0 = (the VAE's posterior mean - shift factor) x scaling "
            "factor; sigma_t: the model's scheduler (model.noising)"
        )

    def noising_record(self) -> dict:
        return {**self.schedule.record, "formula": self.noise_formula()}

    def input_summary(self) -> str:
        """`pipeline blocks`' header, with the timestep -> sigma mapping a user picks timesteps by."""
        record = self.schedule.record
        shift = f"mu {record['mu']:.3f}" if "mu" in record else f"shift {record['shift']:g}"
        points = ", ".join(f"{t} -> {float(self.schedule.sigmas[t]):.3f}" for t in (0, 100, 250, 500, 750, 999))
        return (
            f"{super().input_summary()}\nnoise: x_t = (1 - sigma_t) z0 + sigma_t eps, sigma_t = {record['sigma']} "
            f"({shift}); t -> sigma: {points}"
        )

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The network's timestep input for our integer timesteps: the scheduler's timestep (sigma x N)."""
        return self.schedule.timesteps.to(timesteps.device)[timesteps]


# -- SD3 / SD3.5 -------------------------------------------------------------------------------------------
class SD3Model(FlowTransformer):
    kind = "sd3"
    joint = True
    max_sequence_length = 256  # StableDiffusion3Pipeline's default

    def __init__(self, transformer, vae, scheduler, encoders, source, *, prompt=None, feature_norm=None):
        self.patch = int(transformer.config.patch_size)
        super().__init__(transformer, vae, scheduler, source, prompt=prompt, feature_norm=feature_norm)
        self.encoders = encoders  # [(tokenizer, CLIP-L), (tokenizer_2, CLIP-G), (tokenizer_3, T5)]
        self.clip_length = text.max_length(*encoders[0])
        self.schedule = flow_schedule(scheduler, self.grid**2, source)

    def text_tokens(self):
        return self.clip_length + self.max_sequence_length

    def block_modules(self):
        blocks = [
            (f"transformer_blocks.{i}", f"joint_blocks[{i}]") for i in range(len(self.network.transformer_blocks))
        ]
        return [("pos_embed", "x_embedder"), *blocks]

    def encode_text(self, prompts):
        (tok1, clip1), (tok2, clip2), (tok3, t5) = self.encoders
        hidden1, pooled1 = text.clip(tok1, clip1, prompts, penultimate=True)
        hidden2, pooled2 = text.clip(tok2, clip2, prompts, penultimate=True)
        t5_states, _ = text.t5(tok3, t5, prompts, self.max_sequence_length)
        clip_states = torch.cat([hidden1, hidden2], dim=-1)
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip_states, t5_states], dim=-2),
            "pooled_projections": torch.cat([pooled1, pooled2], dim=-1),
        }

    def conditioning_settings(self):
        return {
            "max_sequence_length": self.max_sequence_length,
            "encoder_hidden_states": "CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's "
            "width, then T5's last hidden state",
            "pooled": "both CLIPs' text_embeds",
        }

    def forward(self, network, sample, timesteps, rows):
        network(
            hidden_states=sample,
            encoder_hidden_states=rows["encoder_hidden_states"],
            pooled_projections=rows["pooled_projections"],
            timestep=self.model_timesteps(timesteps),
        )


# -- FLUX.1 ----------------------------------------------------------------------------------------------------
def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/2)(W/2), 4C): FLUX's 2x2 patches, row-major over the (H/2, W/2) grid."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(grid: int, device, dtype) -> torch.Tensor:
    """(g*g, 3) position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(grid, grid, 3, device=device, dtype=dtype)
    ids[..., 1] += torch.arange(grid, device=device, dtype=dtype)[:, None]
    ids[..., 2] += torch.arange(grid, device=device, dtype=dtype)[None, :]
    return ids.reshape(grid * grid, 3)


class FluxModel(FlowTransformer):
    kind = "flux"
    joint = True
    patch = 2
    max_sequence_length = 512  # FluxPipeline's default

    def __init__(
        self,
        transformer,
        vae,
        scheduler,
        encoders,
        source,
        *,
        prompt=None,
        feature_norm=None,
        guidance: float | None = None,
    ):
        size = vae.config.sample_size
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        channels = int(transformer.config.in_channels) // 4
        super().__init__(
            transformer,
            vae,
            scheduler,
            source,
            prompt=prompt,
            feature_norm=feature_norm,
            latent_size=size // factor,
            latent_channels=channels,
        )
        if self.latent_size % 2:
            raise UnsupportedModelError(
                f"--model {source}: FLUX packs 2x2 latents, but vae/'s sample_size {size} "
                f"makes a {self.latent_size}x{self.latent_size} latent"
            )
        self.guided = bool(transformer.config.guidance_embeds)
        if guidance is not None and not self.guided:
            raise UnsupportedModelError(
                f"--guidance {guidance}: --model {source} has no guidance embedding "
                "(FLUX.1-schnell); leave --guidance out"
            )
        self.guidance = (FLUX_DEFAULT_GUIDANCE if guidance is None else float(guidance)) if self.guided else None
        self.encoders = encoders  # [(tokenizer, CLIP-L), (tokenizer_2, T5)]
        self.schedule = flow_schedule(scheduler, self.grid**2, source)

    def text_tokens(self):
        return self.max_sequence_length

    def block_modules(self):
        double = [
            (f"transformer_blocks.{i}", f"double_blocks[{i}]") for i in range(len(self.network.transformer_blocks))
        ]
        single = [
            (f"single_transformer_blocks.{i}", f"single_blocks[{i}]")
            for i in range(len(self.network.single_transformer_blocks))
        ]
        return [("x_embedder", "img_in"), *double, *single]

    def encode_text(self, prompts):
        (tok1, clip1), (tok2, t5) = self.encoders
        _, pooled = text.clip(tok1, clip1, prompts, penultimate=False)
        states, _ = text.t5(tok2, t5, prompts, self.max_sequence_length)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def conditioning_settings(self):
        return {
            "max_sequence_length": self.max_sequence_length,
            "guidance": self.guidance,
            "pooled": "CLIP-L pooler_output",
        }

    def forward(self, network, sample, timesteps, rows):
        states = rows["encoder_hidden_states"]
        guidance = None
        if self.guided:
            guidance = torch.full((len(sample),), self.guidance, device=sample.device, dtype=torch.float32)
        # FluxPipeline passes the scheduler's timestep / 1000; the transformer multiplies by 1000 again
        network(
            hidden_states=pack(sample),
            encoder_hidden_states=states,
            pooled_projections=rows["pooled_projections"],
            timestep=self.model_timesteps(timesteps) / 1000,
            img_ids=image_ids(self.grid, sample.device, sample.dtype),
            txt_ids=torch.zeros(states.shape[1], 3, device=sample.device, dtype=sample.dtype),
            guidance=guidance,
        )


# -- PixArt-Alpha / Sigma ----------------------------------------------------------------------------------------
class PixArtModel(TokenTransformer):
    kind = "pixart"

    def __init__(
        self,
        transformer,
        vae,
        scheduler,
        encoders,
        source,
        *,
        prompt=None,
        feature_norm=None,
        max_sequence_length: int = 300,
    ):
        self.patch = int(transformer.config.patch_size)
        super().__init__(transformer, vae, scheduler, source, prompt=prompt, feature_norm=feature_norm)
        self.encoders = encoders  # [(tokenizer, T5)]
        self.max_sequence_length = int(max_sequence_length)

    def block_modules(self):
        return [
            ("pos_embed", "x_embedder"),
            *((f"transformer_blocks.{i}", f"blocks[{i}]") for i in range(len(self.network.transformer_blocks))),
        ]

    def encode_text(self, prompts):
        ((tokenizer, t5),) = self.encoders
        states, mask = text.t5(tokenizer, t5, prompts, self.max_sequence_length, masked=True)
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def conditioning_settings(self):
        return {
            "max_sequence_length": self.max_sequence_length,
            "size_conditioning": [self.image_size, self.image_size] if self.network.use_additional_conditions else None,
        }

    def forward(self, network, sample, timesteps, rows):
        added = {"resolution": None, "aspect_ratio": None}
        if network.use_additional_conditions:  # PixArt-Alpha 1024: (height, width) and height / width
            b = len(sample)
            added = {
                "resolution": torch.tensor(
                    [[self.image_size, self.image_size]], dtype=sample.dtype, device=sample.device
                ).expand(b, 2),
                "aspect_ratio": torch.ones(b, 1, dtype=sample.dtype, device=sample.device),
            }
        network(
            sample,
            encoder_hidden_states=rows["encoder_hidden_states"],
            encoder_attention_mask=rows["encoder_attention_mask"],
            timestep=timesteps,
            added_cond_kwargs=added,
        )


# -- loading -----------------------------------------------------------------------------------------------------
def _transformer(path: Path, cls_name: str, source: str):
    import diffusers

    cls = getattr(diffusers, cls_name)
    return _loading(source, lambda: cls.from_pretrained(path / "transformer", low_cpu_mem_usage=False))


def _vae(path: Path, source: str):
    from diffusers import AutoencoderKL

    return _loading(source, lambda: AutoencoderKL.from_pretrained(path / "vae", low_cpu_mem_usage=False))


def _flow_scheduler(path: Path, source: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = path / "scheduler" / "scheduler_config.json"
    if not config.exists():
        raise ModelLoadError(
            f"--model {source}: the pipeline directory lacks scheduler/ (its flow-matching shift "
            "decides the noise); a diffusers pipeline saved with save_pretrained has one"
        )
    name = json.loads(config.read_text()).get("_class_name")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise UnsupportedModelError(
            f"--model {source}: scheduler/ is a {name}; the rectified-flow transformers are "
            "supported with their FlowMatchEulerDiscreteScheduler"
        )
    return FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")


def _encoders(path: Path, pairs: list[tuple[str, str, str]]):
    return [
        (text.load_tokenizer(path, tokenizer), text.load_text_encoder(path, encoder, default))
        for tokenizer, encoder, default in pairs
    ]


def load_sd3(source: str, *, prompt=None, feature_norm=None) -> SD3Model:
    path = Path(source).expanduser()
    if not (path / "text_encoder_3").is_dir() and (path / "text_encoder").is_dir():
        raise UnsupportedModelError(
            f"--model {source}: an SD3 pipeline with its T5 encoder dropped (no "
            "text_encoder_3/) is not supported: its features would differ from the model's "
            "with T5; use the full pipeline directory"
        )
    _need(
        path,
        {
            "transformer": "SD3Transformer2DModel",
            "vae": "AutoencoderKL",
            "text_encoder": "CLIP-L",
            "tokenizer": "CLIP-L's tokenizer",
            "text_encoder_2": "CLIP-G",
            "tokenizer_2": "CLIP-G's tokenizer",
            "text_encoder_3": "T5-XXL",
            "tokenizer_3": "T5's tokenizer",
        },
        "SD3",
    )
    encoders = _encoders(
        path,
        [
            ("tokenizer", "text_encoder", "CLIPTextModelWithProjection"),
            ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
            ("tokenizer_3", "text_encoder_3", "T5EncoderModel"),
        ],
    )
    return SD3Model(
        _transformer(path, "SD3Transformer2DModel", source),
        _vae(path, source),
        _flow_scheduler(path, source),
        encoders,
        str(source),
        prompt=prompt,
        feature_norm=feature_norm,
    )


def load_flux(source: str, *, prompt=None, feature_norm=None, guidance=None) -> FluxModel:
    path = Path(source).expanduser()
    _need(
        path,
        {
            "transformer": "FluxTransformer2DModel",
            "vae": "AutoencoderKL",
            "text_encoder": "CLIP-L",
            "tokenizer": "CLIP-L's tokenizer",
            "text_encoder_2": "T5-XXL",
            "tokenizer_2": "T5's tokenizer",
        },
        "FLUX",
    )
    encoders = _encoders(
        path, [("tokenizer", "text_encoder", "CLIPTextModel"), ("tokenizer_2", "text_encoder_2", "T5EncoderModel")]
    )
    return FluxModel(
        _transformer(path, "FluxTransformer2DModel", source),
        _vae(path, source),
        _flow_scheduler(path, source),
        encoders,
        str(source),
        prompt=prompt,
        feature_norm=feature_norm,
        guidance=guidance,
    )


def load_pixart(source: str, *, prompt=None, feature_norm=None) -> PixArtModel:
    path = Path(source).expanduser()
    _need(
        path,
        {
            "transformer": "PixArtTransformer2DModel",
            "vae": "AutoencoderKL",
            "text_encoder": "T5-XXL",
            "tokenizer": "T5's tokenizer",
        },
        "PixArt",
    )
    try:
        pipeline = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        pipeline = ""
    # the pipelines' defaults: PixArtSigmaPipeline 300 tokens, PixArtAlphaPipeline 120
    length = 120 if pipeline == "PixArtAlphaPipeline" else 300
    encoders = _encoders(path, [("tokenizer", "text_encoder", "T5EncoderModel")])
    return PixArtModel(
        _transformer(path, "PixArtTransformer2DModel", source),
        _vae(path, source),
        _scheduler(path),
        encoders,
        str(source),
        prompt=prompt,
        feature_norm=feature_norm,
        max_sequence_length=length,
    )
