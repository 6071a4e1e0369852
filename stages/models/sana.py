"""Sana (`SanaTransformer2DModel`): a linear-attention DiT over a 32x-compressing DC-AE, conditioned on Gemma-2.

Run as diffusers' SanaPipeline runs it:

    latents       z0 = AutoencoderDC(x).latent x scaling_factor (the DC-AE is deterministic: no posterior,
                  no shift), float32; 1024 px -> 32 x 32 x 32 latents, patch 1: 1024 tokens
    conditioning  Gemma-2's last hidden state over 300 tokens with its attention mask (given to the
                  transformer's cross-attention), computed once per store (stages.models.prompted):
                  the empty prompt is the pipeline's unconditional embedding (its classifier-free guidance
                  branch: "" without the instruction); a `--prompt` template is encoded as the pipeline
                  encodes a prompt: lower-cased, after its complex human instruction (the pipeline's
                  default, read from diffusers and recorded), padded to instruction + 298 tokens, then the
                  first token and the last 299 kept (Sana's paper, section 3.1)
    noise         rectified flow x_t = (1 - sigma_t) z0 + sigma_t eps, static shift (stages.models.flow):
                  FlowMatchEulerDiscreteScheduler's `shift`, or DPMSolverMultistepScheduler's `flow_shift`
                  with `use_flow_sigmas` (the published Sana pipelines' scheduler; the same shifted grid)
    timestep      sigma x 1000 x the transformer's timestep_scale, as the pipeline passes it with
                  FlowMatchEuler (with DPM-Solver it passes the integer part of sigma x 1000)

Blocks: 1 = `patch_embed` (`x_embedder` in the original code), 2.. = `transformer_blocks.i` (`blocks[i]`),
each stored as the (D, g, g) map of its tokens (cross-attention: no text tokens in the stream).
Sana-Sprint (a guidance-embedded few-step distillation) and other schedulers are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stages.models.blocks import UnsupportedModelError
from stages.models.flow import flow_schedule
from stages.models.latent import _loading, _need
from stages.models.loading import ModelLoadError
from stages.models.transformers import FlowTransformer, _encoders

MAX_SEQUENCE_LENGTH = 300  # SanaPipeline's default
SANA_BLOCK_COPIES = 20  # token-sized tensors live in one block at inference (stages.models.memory)


def complex_human_instruction() -> list[str]:
    """SanaPipeline's default instruction lines, read from the installed diffusers (recorded in the store)."""
    import inspect

    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


@torch.inference_mode()
def gemma(
    tokenizer, encoder, prompts: list[str], length: int, instruction: list[str] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state (P, length, D) float32, attention mask (P, length) int64) as SanaPipeline computes them
    (the module docstring); `instruction` None: the unconditional branch, no instruction."""
    tokenizer.padding_side = "right"
    texts = [p.lower().strip() for p in prompts]  # the pipeline's preprocessing without clean_caption
    total = length
    if instruction:
        prefix = "\n".join(instruction)
        texts = [prefix + t for t in texts]
        total = len(tokenizer.encode(prefix)) + length - 2
    tokens = tokenizer(
        texts, padding="max_length", max_length=total, truncation=True, add_special_tokens=True, return_tensors="pt"
    )
    mask = tokens.attention_mask
    hidden = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask.to(encoder.device))[0]
    keep = [0, *range(total - length + 1, total)]  # the first token and the last length - 1
    return hidden[:, keep].float().cpu().clone(), mask[:, keep].long().clone()


class SanaModel(FlowTransformer):
    kind = "sana"

    def __init__(
        self,
        transformer,
        vae,
        scheduler,
        encoders,
        source: str,
        *,
        prompt=None,
        feature_norm=None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ):
        if transformer.config.get("guidance_embeds"):
            raise UnsupportedModelError(
                f"--model {source}: a Sana transformer with a guidance embedding (Sana-Sprint, "
                "few-step distilled) is not supported; Sana 1.0 / 1.5 pipelines are"
            )
        self.patch = int(transformer.config.patch_size)
        super().__init__(transformer, vae, scheduler, source, prompt=prompt, feature_norm=feature_norm)
        self.encoders = encoders  # [(tokenizer, Gemma-2)]
        self.max_sequence_length = int(max_sequence_length)
        self.timestep_scale = float(transformer.config.get("timestep_scale", 1.0))
        self.schedule = flow_schedule(flow_equivalent(scheduler, source), self.grid**2, source)
        self._instruction = None if prompt is None else complex_human_instruction()

    def block_modules(self):
        return [
            ("patch_embed", "x_embedder"),
            *((f"transformer_blocks.{i}", f"blocks[{i}]") for i in range(len(self.network.transformer_blocks))),
        ]

    def activation_row_bytes(self, deepest: int, precision: str) -> tuple[int, str]:
        from stages.models import memory

        return (
            memory.transformer_row_bytes(self.grid**2, self.width, precision, SANA_BLOCK_COPIES),
            f"{self.grid**2} image + 0 text tokens x width {self.width} x {SANA_BLOCK_COPIES}",
        )

    def _encode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the DC-AE's latent x scaling factor, float32 (no posterior, no shift)."""
        with torch.autocast(x0.device.type, enabled=False):
            latent = self.vae.encode(x0.float()).latent
        return latent * float(self.vae.config.scaling_factor)

    def encode_text(self, prompts):
        ((tokenizer, encoder),) = self.encoders
        states, mask = gemma(tokenizer, encoder, prompts, self.max_sequence_length, self._instruction)
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def conditioning_settings(self):
        return {
            "max_sequence_length": self.max_sequence_length,
            "complex_human_instruction": self._instruction,
            "encoder_hidden_states": "Gemma-2's last hidden state, attention mask to the cross-attention; "
            "empty prompt: the unconditional branch (no instruction)",
            "timestep_scale": self.timestep_scale,
        }

    def forward(self, network, sample, timesteps, rows):
        network(
            hidden_states=sample,
            encoder_hidden_states=rows["encoder_hidden_states"],
            encoder_attention_mask=rows["encoder_attention_mask"],
            timestep=self.model_timesteps(timesteps) * self.timestep_scale,
        )


def flow_equivalent(scheduler, source: str):
    """A FlowMatchEulerDiscreteScheduler with the sigmas `scheduler` trains and samples on: itself, or for a
    DPMSolverMultistepScheduler with flow sigmas, the same static shift (`flow_shift`) on the same N."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    name = type(scheduler).__name__
    if name == "FlowMatchEulerDiscreteScheduler":
        return scheduler
    config = scheduler.config
    if (
        name == "DPMSolverMultistepScheduler"
        and config.get("use_flow_sigmas")
        and config.get("prediction_type") == "flow_prediction"
    ):
        used = [
            n
            for n in (
                "use_dynamic_shifting",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_lu_lambdas",
            )
            if config.get(n)
        ]
        if used:
            raise UnsupportedModelError(
                f"--model {source}: its scheduler sets {', '.join(used)}, a sigma schedule "
                "not supported for feature extraction; Sana's static flow_shift is"
            )
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(config.num_train_timesteps), shift=float(config.flow_shift)
        )
    raise UnsupportedModelError(
        f"--model {source}: scheduler/ is a {name} without flow sigmas; Sana is supported "
        "with FlowMatchEulerDiscreteScheduler or DPMSolverMultistepScheduler "
        "(use_flow_sigmas, prediction_type flow_prediction)"
    )


def _sana_scheduler(path: Path, source: str):
    import diffusers

    config = path / "scheduler" / "scheduler_config.json"
    if not config.exists():
        raise ModelLoadError(
            f"--model {source}: the pipeline directory lacks scheduler/ (its flow shift decides the "
            "noise); a diffusers pipeline saved with save_pretrained has one"
        )
    name = json.loads(config.read_text()).get("_class_name")
    if name not in ("FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        raise UnsupportedModelError(
            f"--model {source}: scheduler/ is a {name}; Sana is supported with "
            "FlowMatchEulerDiscreteScheduler or DPMSolverMultistepScheduler (flow sigmas)"
        )
    return getattr(diffusers, name).from_pretrained(path / "scheduler")


def load_sana(source: str, *, prompt=None, feature_norm=None) -> SanaModel:
    """A Sana pipeline directory: transformer/, vae/ (AutoencoderDC), text_encoder/ (Gemma-2), tokenizer/,
    scheduler/."""
    try:
        from diffusers import AutoencoderDC, SanaTransformer2DModel
    except ImportError:  # both arrived in diffusers 0.32; the project's floor is older
        import diffusers

        raise ModelLoadError(
            f"--model {source}: Sana needs diffusers >= 0.32 (AutoencoderDC, SanaTransformer2DModel); "
            f"this is {diffusers.__version__}: pip install -U 'diffusers>=0.32'"
        ) from None

    path = Path(source).expanduser()
    _need(
        path,
        {
            "transformer": "SanaTransformer2DModel",
            "vae": "AutoencoderDC",
            "text_encoder": "Gemma-2",
            "tokenizer": "Gemma's tokenizer",
            "scheduler": "its flow-matching scheduler",
        },
        "Sana",
    )
    transformer = _loading(
        source, lambda: SanaTransformer2DModel.from_pretrained(path / "transformer", low_cpu_mem_usage=False)
    )
    vae = _loading(source, lambda: AutoencoderDC.from_pretrained(path / "vae", low_cpu_mem_usage=False))
    encoders = _encoders(path, [("tokenizer", "text_encoder", "Gemma2Model")])
    return SanaModel(
        transformer, vae, _sana_scheduler(path, source), encoders, str(source), prompt=prompt, feature_norm=feature_norm
    )
