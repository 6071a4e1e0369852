"""Latent models conditioned on text computed once per store, and SDXL.

`PromptedModel` holds what every text-conditioned kind shares (SDXL here; SD3, FLUX.1, PixArt in
stages.models.transformers; Sana in stages.models.sana): the prompts (the empty prompt, DIFT's choice,
or `--prompt "a photo of a {}"` with one prompt per class), the conditioning tensors computed from them
once by the pipeline's own encoders (stages.models.text), which are then dropped, and the rows of each
batch (one per image). The conditioning is part of the store's identity (the prompt and the tensors' sha256), so another
prompt is another store.

SDXL (`UNet2DConditionModel` with `addition_embed_type="text_time"`) is run as its pipeline runs it:
encoder_hidden_states = both CLIP encoders' penultimate hidden states side by side (768 + 1280),
text_embeds = the second encoder's projected pooled embedding, and time_ids = (original size, crop
top-left, target size) = (S, S, 0, 0, S, S) with S the model's resolution (sample_size x 8). The VAE
is the pipeline directory's vae/, run in float32 (SDXL's VAE overflows in float16; the
madebyollin/sdxl-vae-fp16-fix weights are a different VAE, and its sha256 would say so). Its blocks
are numbered as SD 1.x/2.x's (stages.models.blocks).
"""

from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path

import torch

from stages.models import text
from stages.models.blocks import Block, UnsupportedModelError, block_table
from stages.models.capture import BlockCapture
from stages.models.latent import LatentModel, PromptError, _loading, _need, _scheduler
from stages.models.loading import ModelLoadError


def check_template(prompt: str | None) -> None:
    if prompt is not None and "{}" not in prompt:
        raise PromptError(
            f"--prompt {prompt!r} has no {{}} where the class name goes: give a template such as "
            "'a photo of a {}', or leave --prompt out for the empty prompt (the default)"
        )


class PromptedModel(LatentModel):
    """A latent model whose conditioning is computed once from text (the module docstring)."""

    at_scale = True

    def __init__(self, network, vae, scheduler, source: str, *, prompt: str | None = None, **sizes):
        super().__init__(network, vae, scheduler, source, **sizes)
        check_template(prompt)
        self.prompt = prompt
        self.prompts: list[str] = [""] if prompt is None else []
        self._conditioning: dict[str, torch.Tensor] | None = None
        self.text_parameters = 0  # of the text encoders, counted when loaded (for --dry-run)
        self._encoders: list | None = None
        self._encoders_dropped = False
        # --offload: True (text, the default) keeps the text encoders on the CPU; False runs them on
        # `text_device` (the extraction's --device). Not in the identity: it changes where, not what, is computed
        # (on a GPU the float32 kernels round differently, and the conditioning's sha256 records that)
        self.offload_text = True
        self.text_device = "auto"

    @property
    def encoders(self) -> list | None:
        """[(tokenizer, text encoder), ...], the encoders loaded on first use (stages.models.text.Deferred)."""
        if self._encoders is not None and any(isinstance(e, text.Deferred) for _, e in self._encoders):
            self._encoders = [(t, e.load() if isinstance(e, text.Deferred) else e) for t, e in self._encoders]
            self.text_parameters = sum(p.numel() for _, e in self._encoders for p in e.parameters())
        return self._encoders

    @encoders.setter
    def encoders(self, value: list | None) -> None:
        self._encoders = value
        if value is not None and not any(isinstance(e, text.Deferred) for _, e in value):
            self.text_parameters = sum(p.numel() for _, e in value for p in e.parameters())

    # -- what a kind says -------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{name: (P, ...) float32} for P prompts, as the kind's pipeline computes it."""
        raise NotImplementedError

    def drop_text_encoders(self) -> None:
        self.encoders = None

    def conditioning_settings(self) -> dict:
        """What else decides the conditioning (sequence lengths, guidance, size conditioning)."""
        return {}

    # -- shared -------------------------------------------------------------------------------------------
    def bind_classes(self, classes: list[str]) -> None:
        if self.prompt is not None:
            prompts = [self.prompt.replace("{}", name.replace("_", " ")) for name in classes]
            if prompts != self.prompts:
                self.prompts, self._conditioning = prompts, None

    def conditioning(self) -> dict[str, torch.Tensor]:
        if self._conditioning is None:
            if not self.prompts:
                raise PromptError("a prompt template needs the data set's class names first (bind_classes)")
            if self._encoders_dropped:
                raise PromptError(
                    f"--model {self.source}: its text encoders were freed after encoding; load the "
                    "model again to encode other prompts"
                )
            if not self.offload_text:
                device = text.encoding_device(self.text_device)
                self._encoders = [(t, e.to(device)) for t, e in self.encoders]
            self._conditioning = self.encode_text(self.prompts)
            # freed before any image is processed: T5-XXL alone is 19 GB in float32
            self.drop_text_encoders()
            self._encoders_dropped = True
            gc.collect()
            if not self.offload_text and torch.cuda.is_available():
                torch.cuda.empty_cache()  # the encoders' device memory, back before the network arrives
        return self._conditioning

    def rows(self, labels: torch.Tensor | None, batch: int) -> dict[str, torch.Tensor]:
        """The conditioning of each row of a batch: its class's prompt, or the one prompt expanded."""
        conditioning = self.conditioning()
        if self.prompt is not None:
            return {name: value[labels] for name, value in conditioning.items()}
        return {name: value.expand(batch, *value.shape[1:]) for name, value in conditioning.items()}

    def prepare(self, device: torch.device) -> None:
        conditioning = self.conditioning()
        super().prepare(device)
        self._conditioning = {name: value.to(device) for name, value in conditioning.items()}

    def conditioning_record(self) -> dict:
        tensors = self.conditioning()
        return {
            "prompt": "" if self.prompt is None else self.prompt,
            "per_class": self.prompt is not None,
            "tensors": sorted(tensors),
            "sha256": text.digest(tensors),
            **self.conditioning_settings(),
        }


class SDXLModel(PromptedModel):
    kind = "sdxl"

    def __init__(self, unet, vae, scheduler, encoders, source: str, prompt: str | None = None):
        """`encoders`: [(tokenizer, CLIPTextModel), (tokenizer_2, CLIPTextModelWithProjection)]."""
        super().__init__(unet, vae, scheduler, source, prompt=prompt)
        self.encoders = encoders
        expected = int(unet.add_embedding.linear_1.in_features)
        pooled = int(encoders[-1][1].config.projection_dim)
        got = 6 * int(unet.config.addition_time_embed_dim) + pooled
        if expected != got:
            raise ModelLoadError(
                f"--model {source}: the U-Net's added embedding takes {expected} values but six "
                f"time ids and text_encoder_2's {pooled}-wide pooled embedding make {got}"
            )

    @property
    def time_ids(self) -> list[int]:
        """(original height, width, crop top, left, target height, width): the model's own resolution, no crop."""
        return [self.image_size, self.image_size, 0, 0, self.image_size, self.image_size]

    def encode_text(self, prompts):
        hidden, pooled = [], None
        for tokenizer, encoder in self.encoders:
            states, pooled = text.clip(tokenizer, encoder, prompts, penultimate=True)
            hidden.append(states)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def conditioning_settings(self):
        return {
            "time_ids": self.time_ids,
            "hidden_states": "penultimate layer of text_encoder and text_encoder_2",
            "pooled": "text_encoder_2 text_embeds",
        }

    def block_table(self) -> list[Block]:
        return [replace(b, stride=self.image_size // b.resolution) for b in block_table(self.network)]

    def capture(self, blocks) -> BlockCapture:
        def forward(unet, sample, timesteps, *, labels=None, **_):
            rows = self.rows(labels, sample.shape[0])
            time_ids = torch.tensor([self.time_ids], dtype=sample.dtype, device=sample.device)
            unet(
                sample,
                timesteps,
                encoder_hidden_states=rows["encoder_hidden_states"],
                added_cond_kwargs={"text_embeds": rows["text_embeds"], "time_ids": time_ids.expand(len(sample), 6)},
            )

        return BlockCapture(self.network, blocks, forward=forward)

    def identity(self) -> dict:
        return {**self._identity(), "conditioning": self.conditioning_record()}


def load_sdxl(source: str, *, prompt: str | None = None) -> SDXLModel:
    """An SDXL pipeline directory: unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(source).expanduser()
    _need(
        path,
        {
            "unet": "UNet2DConditionModel",
            "vae": "AutoencoderKL",
            "text_encoder": "the first CLIP text encoder",
            "tokenizer": "its tokenizer",
            "text_encoder_2": "the second CLIP text encoder, with projection",
            "tokenizer_2": "its tokenizer",
        },
        "SDXL",
    )
    unet = _loading(source, lambda: UNet2DConditionModel.from_pretrained(path / "unet", low_cpu_mem_usage=False))
    if unet.config.addition_embed_type != "text_time":
        raise UnsupportedModelError(
            f"--model {source}: a U-Net with addition_embed_type "
            f"{unet.config.addition_embed_type!r} is not SDXL's text_time conditioning"
        )
    vae = _loading(source, lambda: AutoencoderKL.from_pretrained(path / "vae", low_cpu_mem_usage=False))
    encoders = [
        (text.load_tokenizer(path, "tokenizer"), text.load_text_encoder(path, "text_encoder", "CLIPTextModel")),
        (
            text.load_tokenizer(path, "tokenizer_2"),
            text.load_text_encoder(path, "text_encoder_2", "CLIPTextModelWithProjection"),
        ),
    ]
    if encoders[1][1].cls.__name__ != "CLIPTextModelWithProjection":
        raise ModelLoadError(
            f"--model {source}: text_encoder_2/ is not a CLIPTextModelWithProjection (SDXL's pooled "
            "embedding is its projection)"
        )
    return SDXLModel(unet, vae, _scheduler(path), encoders, str(source), prompt)
