"""Text conditioning of the latent pipelines, computed once per store as each pipeline's `encode_prompt` does.

The text encoders are loaded from the pipeline directory, run once in float32 over the prompts (the
empty prompt, or one per class with `--prompt "a photo of a {}"`), and dropped: their memory (T5-XXL
is 4.7B parameters) is never held while images are processed. With `--offload text` (the default)
they run on the CPU and never reach the GPU; `--offload none` runs them on the extraction's device
(encoding_device), before the network is moved there (faster for many per-class prompts).

    clip(...)   CLIPTextModel / CLIPTextModelWithProjection: (hidden (P, 77, D), pooled (P, Dp))
                hidden is the last layer, or the penultimate one (SDXL, SD3: clip_skip None)
                pooled is `text_embeds` of a model with projection, else `pooler_output`
    t5(...)     T5EncoderModel: (last hidden state (P, L, D), attention mask (P, L)), padded to L
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from stages.models.loading import ModelLoadError


def component_class(path: Path, name: str) -> str | None:
    """The class model_index.json names for component `name` (e.g. "T5EncoderModel"), else None."""
    try:
        entry = json.loads((path / "model_index.json").read_text()).get(name)
    except (OSError, ValueError, AttributeError):
        return None
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None


class Deferred:
    """A text encoder not loaded yet: its config now (cheap), its weights when `load()` is called.

    `pipeline blocks` and `pipeline pixels` never load T5-XXL's 19 GB; extraction loads it once to encode the
    prompts and drops it."""

    def __init__(self, path: Path, name: str, default: str):
        import transformers

        self.path, self.name = path, name
        cls_name = component_class(path, name) or default
        self.cls = getattr(transformers, cls_name, None)
        if self.cls is None:
            raise ModelLoadError(f"--model {path}: {name}/ is a {cls_name}, which transformers does not have")
        try:
            self.config = self.cls.config_class.from_pretrained(path / name)
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(
                f"--model {path}: cannot read {name}/config.json ({type(error).__name__}: {error})"
            ) from None

    def load(self):
        try:
            return self.cls.from_pretrained(self.path / self.name, dtype=torch.float32).eval()
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise ModelLoadError(
                f"--model {self.path}: cannot load {self.name}/ ({type(error).__name__}: {error})"
            ) from None


def load_text_encoder(path: Path, name: str, default: str) -> Deferred:
    """The transformers model in `path/name`, of the class model_index.json names (else `default`), float32,
    loaded when first needed (Deferred)."""
    return Deferred(path, name, default)


def load_tokenizer(path: Path, name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path / name)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise ModelLoadError(f"--model {path}: cannot load {name}/ ({type(error).__name__}: {error})") from None


def max_length(tokenizer, encoder) -> int:
    length = int(tokenizer.model_max_length)
    if length > 10**6:  # a tokenizer saved without one: the encoder's positions are the limit
        length = int(encoder.config.max_position_embeddings)
    return length


@torch.inference_mode()
def clip(tokenizer, encoder, prompts: list[str], *, penultimate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (P, L, D), pooled (P, Dp)) float32, as the SDXL / SD3 / FLUX pipelines compute them."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length(tokenizer, encoder), truncation=True, return_tensors="pt"
    ).input_ids
    out = encoder(ids.to(encoder.device), output_hidden_states=True)
    hidden = out.hidden_states[-2] if penultimate else out.last_hidden_state
    pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
    return hidden.float().cpu().clone(), pooled.float().cpu().clone()


@torch.inference_mode()
def t5(
    tokenizer, encoder, prompts: list[str], length: int, *, masked: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state (P, length, D) float32, attention mask (P, length) int64), padded to `length`.

    `masked`: the encoder sees the attention mask (PixArt's pipeline); SD3 and FLUX run it without one."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="pt"
    )
    mask = tokens.attention_mask.to(encoder.device) if masked else None
    hidden = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]
    return hidden.float().cpu().clone(), tokens.attention_mask.long().clone()


def encoding_device(requested: str) -> torch.device:
    """Where `--offload none` runs the text encoders: the extraction's device (`--device`), one GPU per local
    rank as stages.extract.distributed.Job.device_name places a torchrun process."""
    import os

    from stages.devices import resolve_device

    device = resolve_device(requested)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return device


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the conditioning tensors (names, shapes, float32 bytes): the store's record of them."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        array = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{array.dtype}:{tuple(array.shape)};".encode())
        h.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return h.hexdigest()
