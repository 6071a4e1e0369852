"""Convert OpenAI guided-diffusion (ADM) checkpoints exactly into a diffusers `UNet2DModel` directory.

A published ADM checkpoint is a flat state dict; what it means is fixed by the MODEL_FLAGS it was
trained with. `parse_adm_flags` reads those flags with guided-diffusion's own names, types and
defaults (`model_and_diffusion_defaults()` in its `script_util.py`); `adm_architecture` checks that
`UNet2DModel` can express the network and refuses what it cannot; `convert_adm_checkpoint` renames
every tensor onto the diffusers model (splitting the fused qkv attention projection in the layout
the flags select), and writes the model with a `DDPMScheduler` config beside it:

    convert_adm_checkpoint("256x256_diffusion_uncond.pt", "models/adm256", flags=MODEL_FLAGS)
    load_model("models/adm256")  # stages.models.loading

The block numbering (`stages.models.blocks.block_table`) then matches guided-diffusion's `input_blocks`,
`middle_block`, `output_blocks` one to one.
"""

from __future__ import annotations

import difflib
import json
import math
import pickle
import shlex
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from cache.errors import UserError
from stages.models.loading import PREPROCESS_FILE
from stages.models.unet_configs import adm_unet_config


class AdmConversionError(UserError, ValueError):
    """A checkpoint, flag string or output directory the conversion cannot use (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

# guided-diffusion's `model_and_diffusion_defaults()` (model defaults, then `diffusion_defaults()`).
# The type of each default is the type argparse converts the flag's value to.
ADM_DEFAULTS: dict[str, object] = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    num_head_channels=-1,
    attention_resolutions="16,8",
    channel_mult="",
    dropout=0.0,
    class_cond=False,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    learn_sigma=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
)

# `create_model`'s channel_mult for an empty --channel_mult; other sizes raise there, and here.
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

_TRUE = ("yes", "true", "t", "y", "1")
_FALSE = ("no", "false", "f", "n", "0")


def _convert(name: str, raw: str) -> object:
    """Convert one flag value as guided-diffusion's argparse does (`str2bool` for booleans)."""
    default = ADM_DEFAULTS[name]
    if isinstance(default, bool):
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise AdmConversionError(f"--{name} expects a boolean (True/False), got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise AdmConversionError(f"--{name} expects an integer, got {raw!r}") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise AdmConversionError(f"--{name} expects a number, got {raw!r}") from None
    return raw


def parse_adm_flags(text: str) -> dict:
    """Parse a guided-diffusion MODEL_FLAGS string into its full argument dict, defaults filled in.

    `text` is `--name value` pairs (or `--name=value`) as guided-diffusion's READMEs write
    MODEL_FLAGS and DIFFUSION_FLAGS; both may be passed together. The result has exactly the keys
    of `model_and_diffusion_defaults()`, typed as its argparse would type them (`channel_mult` and
    `attention_resolutions` stay comma-separated strings, as `create_model` receives them).
    Unknown, repeated or value-less flags are errors; nothing is checked against a model here.
    """
    if not isinstance(text, str):
        raise AdmConversionError(f"flags must be a string such as '--image_size 256 ...', got {type(text).__name__}")
    try:
        tokens = shlex.split(text)
    except ValueError as error:
        raise AdmConversionError(f"cannot split the flags {text!r}: {error}") from None
    given: dict[str, object] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or token == "--":
            raise AdmConversionError(
                f"expected a flag such as --image_size, got {token!r} in {text!r}; write flags as '--name value' pairs"
            )
        name, has_inline, raw = token[2:].partition("=")
        if not has_inline:
            if index + 1 >= len(tokens) or tokens[index + 1].startswith("--"):
                raise AdmConversionError(f"flag --{name} has no value; write it as '--{name} VALUE'")
            raw = tokens[index + 1]
            index += 1
        index += 1
        if name not in ADM_DEFAULTS:
            close = difflib.get_close_matches(name, ADM_DEFAULTS, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise AdmConversionError(
                f"unknown guided-diffusion flag --{name}{hint}. Valid flags: "
                + ", ".join(f"--{valid}" for valid in sorted(ADM_DEFAULTS))
                + ". Sampling flags such as --batch_size or --use_ddim do not describe the model: leave them out"
            )
        if name in given:
            raise AdmConversionError(f"flag --{name} is given twice; give it once")
        given[name] = _convert(name, raw)
    return {**ADM_DEFAULTS, **given}


# ---------------------------------------------------------------------------------------------
# Architecture: what the flags build, and whether UNet2DModel can express it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdmArchitecture:
    """The parts of guided-diffusion's `UNetModel` that decide its weights and its forward pass."""

    image_size: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_ds: tuple[int, ...]  # downsampling factors with attention, as `create_model` computes them
    head_channels: int  # one size for every attention layer (UNet2DModel has one attention_head_dim)
    use_scale_shift_norm: bool
    resblock_updown: bool
    new_attention_order: bool  # QKVAttention ([q | k | v] of all heads) rather than QKVAttentionLegacy
    out_channels: int

    def has_attention(self, level: int) -> bool:
        return 2**level in self.attention_ds

    def unet_config(self) -> dict:
        """`UNet2DModel(**config)` keyword arguments for this network."""
        return adm_unet_config(
            image_size=self.image_size,
            num_channels=self.model_channels,
            channel_mult=self.channel_mult,
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=self.attention_ds,
            num_head_channels=self.head_channels,
            resblock_updown=self.resblock_updown,
            use_scale_shift_norm=self.use_scale_shift_norm,
            in_channels=3,
            out_channels=self.out_channels,
        )


def _as_flags(flags: str | Mapping) -> dict:
    if isinstance(flags, str):
        return parse_adm_flags(flags)
    unknown = sorted(set(flags) - set(ADM_DEFAULTS))
    if unknown:
        raise AdmConversionError(f"unknown guided-diffusion flag(s) {', '.join(unknown)}")
    return {**ADM_DEFAULTS, **flags}


def _int_list(name: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise AdmConversionError(
            f"--{name} must be comma-separated integers (guided-diffusion reads it with int()), got {text!r}"
        ) from None
    if any(value <= 0 for value in values):
        raise AdmConversionError(f"--{name} must hold positive integers, got {text!r}")
    return values


def _channel_mult(flags: dict) -> tuple[float, ...]:
    if flags["channel_mult"] == "":
        size = flags["image_size"]
        if size not in DEFAULT_CHANNEL_MULT:
            raise AdmConversionError(
                f"guided-diffusion has no default channel_mult for --image_size {size} (only for "
                f"{', '.join(map(str, DEFAULT_CHANNEL_MULT))}); pass the --channel_mult the checkpoint was trained "
                "with, e.g. --channel_mult 1,2,2,2"
            )
        return DEFAULT_CHANNEL_MULT[size]
    return _int_list("channel_mult", flags["channel_mult"])


def _head_channels(flags: dict, layers: list[tuple[str, int, bool]]) -> int:
    """The one head size shared by every attention layer, or an error naming the layers that differ.

    `layers` is (where, channels, in the decoder) for every attention layer.
    guided-diffusion sizes heads by `num_head_channels` when set, else splits each layer's channels
    into `num_heads` heads (`num_heads_upsample` in the decoder).
    """
    fixed = flags["num_head_channels"]
    heads_down = flags["num_heads"]
    heads_up = flags["num_heads_upsample"] if flags["num_heads_upsample"] != -1 else heads_down
    sizes: dict[int, list[str]] = {}
    for where, channels, decoder in layers:
        if fixed != -1:
            if fixed <= 0 or channels % fixed:
                raise AdmConversionError(
                    f"--num_head_channels {fixed} does not divide the {channels} channels of the attention in {where}"
                )
            size = fixed
        else:
            heads = heads_up if decoder else heads_down
            if heads <= 0 or channels % heads:
                flag = "--num_heads_upsample" if decoder and flags["num_heads_upsample"] != -1 else "--num_heads"
                raise AdmConversionError(
                    f"{flag} {heads} does not divide the {channels} channels of the attention in {where}"
                )
            size = channels // heads
        sizes.setdefault(size, []).append(where)
    if len(sizes) > 1:
        detail = "; ".join(f"{size} channels per head in {', '.join(places)}" for size, places in sorted(sizes.items()))
        raise AdmConversionError(
            "UNet2DModel has one attention_head_dim for all attention layers, but these flags give different head "
            f"sizes: {detail}. Checkpoints trained with --num_head_channels (one head size everywhere), or with "
            "--num_heads where every attention layer has the same width, convert"
        )
    return next(iter(sizes))


def adm_architecture(flags: str | Mapping) -> AdmArchitecture:
    """Resolve the flags into the network guided-diffusion builds, refusing what UNet2DModel cannot express."""
    flags = _as_flags(flags)
    if flags["class_cond"]:
        raise AdmConversionError(
            "class-conditional checkpoints (--class_cond True) are not supported: their forward pass needs a class "
            "label (label_emb), which this pipeline's feature extraction does not supply; use an unconditional "
            "checkpoint such as 256x256_diffusion_uncond.pt"
        )
    size, width, depth = flags["image_size"], flags["num_channels"], flags["num_res_blocks"]
    if size <= 0 or width <= 0:
        raise AdmConversionError(f"--image_size and --num_channels must be positive, got {size} and {width}")
    if depth < 1:
        raise AdmConversionError(f"--num_res_blocks must be at least 1 for UNet2DModel, got {depth}")
    mult = _channel_mult(flags)
    if int(mult[0] * width) != width:
        raise AdmConversionError(
            f"channel_mult {mult} starts at {mult[0]}, so conv_in is {int(mult[0] * width)} channels wide while the "
            f"time embedding is sized by --num_channels {width}; UNet2DModel sizes both by its first level's width, "
            "so it cannot express this network (guided-diffusion's 512x512 model is such a case)"
        )
    channels = [int(m * width) for m in mult]
    odd = [c for c in channels if c % 32]
    if odd:
        raise AdmConversionError(
            f"level widths {channels} must be multiples of 32 (GroupNorm with 32 groups); {odd} are not"
        )
    if size % 2 ** (len(mult) - 1):
        raise AdmConversionError(
            f"--image_size {size} is not divisible by 2^{len(mult) - 1}, so the {len(mult)}-level U-Net cannot run on "
            f"it"
        )
    attention_ds = tuple(size // res for res in _int_list("attention_resolutions", flags["attention_resolutions"]))
    attention_layers = [
        (f"{'encoder' if not decoder else 'decoder'} level {level} ({size >> level}px)", channels[level], decoder)
        for decoder in (False, True)
        for level in range(len(mult))
        if 2**level in attention_ds
    ] + [("the middle block", channels[-1], False)]
    return AdmArchitecture(
        image_size=size,
        model_channels=width,
        channel_mult=tuple(int(m) for m in mult),  # whole numbers: only 512's 0.5 is not, refused above
        num_res_blocks=depth,
        attention_ds=attention_ds,
        head_channels=_head_channels(flags, attention_layers),
        use_scale_shift_norm=flags["use_scale_shift_norm"],
        resblock_updown=flags["resblock_updown"],
        new_attention_order=flags["use_new_attention_order"],
        out_channels=6 if flags["learn_sigma"] else 3,
    )


# ---------------------------------------------------------------------------------------------
# Noise schedule
# ---------------------------------------------------------------------------------------------


def adm_betas(flags: str | Mapping) -> np.ndarray:
    """guided-diffusion's `get_named_beta_schedule` in float64, shape (diffusion_steps,)."""
    flags = _as_flags(flags)
    steps, name = flags["diffusion_steps"], flags["noise_schedule"]
    if steps < 1:
        raise AdmConversionError(f"--diffusion_steps must be positive, got {steps}")
    if name == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    if name == "cosine":
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)])
    raise AdmConversionError(f"--noise_schedule {name!r} is not one of guided-diffusion's schedules: linear, cosine")


# How far diffusers' float32 betas may move the noising coefficients sqrt(abar), sqrt(1 - abar).
SCHEDULE_TOLERANCE = 1e-6


def adm_scheduler(flags: str | Mapping) -> DDPMScheduler:
    """A `DDPMScheduler` with guided-diffusion's training schedule, checked against it.

    diffusers keeps betas in float32, so the schedule matches to float32 rounding; anything larger
    (a schedule diffusers computes differently) is refused rather than saved.
    """
    flags = _as_flags(flags)
    reference = adm_betas(flags)
    steps = flags["diffusion_steps"]
    if reference.max() >= 1:
        raise AdmConversionError(
            f"--diffusion_steps {steps} makes the linear schedule reach beta={reference.max():.3g} >= 1; "
            "no such checkpoint can have been trained"
        )
    if flags["rescale_timesteps"] and steps != 1000:
        raise AdmConversionError(
            f"--rescale_timesteps True with --diffusion_steps {steps} feeds the network t*1000/{steps}, "
            "which UNet2DModel (fed t itself) cannot reproduce"
        )
    if flags["noise_schedule"] == "linear":
        scale = 1000 / steps
        schedule = dict(beta_schedule="linear", beta_start=scale * 0.0001, beta_end=scale * 0.02)
    else:
        schedule = dict(beta_schedule="squaredcos_cap_v2")
    scheduler = DDPMScheduler(
        num_train_timesteps=steps,
        **schedule,
        variance_type="learned_range" if flags["learn_sigma"] else "fixed_large",
        prediction_type="sample" if flags["predict_xstart"] else "epsilon",
        clip_sample=True,
    )
    ours = np.cumprod(1 - scheduler.betas.to(torch.float64).numpy())
    theirs = np.cumprod(1 - reference)
    error = max(np.abs(np.sqrt(ours) - np.sqrt(theirs)).max(), np.abs(np.sqrt(1 - ours) - np.sqrt(1 - theirs)).max())
    if error > SCHEDULE_TOLERANCE:
        raise AdmConversionError(
            f"diffusers' {schedule['beta_schedule']} schedule differs from guided-diffusion's "
            f"{flags['noise_schedule']} "
            f"schedule by {error:.2g} in the noising coefficients (tolerance {SCHEDULE_TOLERANCE}); not converting"
        )
    return scheduler


# ---------------------------------------------------------------------------------------------
# Loading a checkpoint
# ---------------------------------------------------------------------------------------------


def _unpickling_reason(error: Exception) -> str:
    # torch's message is a paragraph of advice; the line naming the refused global is the useful one.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(error).__name__])[0]


def load_adm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a guided-diffusion state dict without running any code stored in the file."""
    path = Path(path)
    if not path.is_file():
        raise AdmConversionError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # not a refused object: the bytes are simply not a checkpoint
            raise AdmConversionError(f"{path}: not a torch checkpoint ({_unpickling_reason(error)})") from None
        reason = _unpickling_reason(error)
        raise AdmConversionError(
            f"{path}: refused to load: the file asks to run code or build objects other than tensors while it is "
            f"read (torch weights_only: {reason}). A guided-diffusion checkpoint is a plain dict of tensors; do not "
            "load this file with weights_only=False unless you trust whoever made it"
        ) from None
    except Exception as error:  # torch's unpickler meets arbitrary bytes here: any error means "not a checkpoint"
        raise AdmConversionError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, Mapping):
        raise AdmConversionError(f"{path}: expected a state dict (name -> tensor), got a {type(state).__name__}")
    odd = [f"{key!r} ({type(value).__name__})" for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if odd:
        raise AdmConversionError(
            f"{path}: expected a flat state dict (name -> tensor) as guided-diffusion saves it; these entries are "
            f"not tensors: {', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}"
        )
    return dict(state)


# ---------------------------------------------------------------------------------------------
# Renaming: guided-diffusion module paths -> UNet2DModel module paths
# ---------------------------------------------------------------------------------------------

# (guided-diffusion, diffusers) sub-module names inside a ResBlock / ResnetBlock2D.
_RESBLOCK = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),  # only where the channel count changes
)


def module_pairs(arch: AdmArchitecture) -> list[tuple[str, str, str]]:
    """(guided-diffusion module, UNet2DModel module, kind) for every module with weights.

    kind is "plain" (same tensors), "resblock" or "attention". The walk mirrors `UNetModel.__init__`:
    `input_blocks[k]` is a ResBlock (plus an AttentionBlock at attention levels) or a downsampler,
    `output_blocks[k]` a ResBlock (plus attention) with the level's upsampler appended to its last one.
    """
    levels = len(arch.channel_mult)
    updown = arch.resblock_updown
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
        ("input_blocks.0.0", "conv_in", "plain"),
    ]
    k = 1
    for level in range(levels):
        for step in range(arch.num_res_blocks):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{step}", "resblock"))
            if arch.has_attention(level):
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{step}", "attention"))
            k += 1
        if level != levels - 1:
            target = f"down_blocks.{level}.downsamplers.0"
            pairs.append(
                (f"input_blocks.{k}.0", target, "resblock")
                if updown
                else (f"input_blocks.{k}.0.op", f"{target}.conv", "plain")
            )
            k += 1
    pairs += [
        ("middle_block.0", "mid_block.resnets.0", "resblock"),
        ("middle_block.1", "mid_block.attentions.0", "attention"),
        ("middle_block.2", "mid_block.resnets.1", "resblock"),
    ]
    k = 0
    for up, level in enumerate(reversed(range(levels))):
        for step in range(arch.num_res_blocks + 1):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{up}.resnets.{step}", "resblock"))
            if arch.has_attention(level):
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{up}.attentions.{step}", "attention"))
            if level and step == arch.num_res_blocks:
                index = 2 if arch.has_attention(level) else 1
                target = f"up_blocks.{up}.upsamplers.0"
                pairs.append(
                    (f"output_blocks.{k}.{index}", target, "resblock")
                    if updown
                    else (f"output_blocks.{k}.{index}.conv", f"{target}.conv", "plain")
                )
            k += 1
    pairs += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return pairs


Transform = Callable[[dict], torch.Tensor]  # source tensors by key -> target tensor


def _take(key: str, squeeze: bool = False) -> Transform:
    # conv1d with kernel 1 (C_out, C_in, 1) is the same map as linear (C_out, C_in).
    return lambda source: source[key][..., 0] if squeeze else source[key]


def _qkv_part(key: str, part: int, head_channels: int, new_order: bool) -> Transform:
    """Rows `part` (0 q, 1 k, 2 v) of a fused qkv projection, as diffusers' to_q/to_k/to_v want them.

    qkv.weight is (3C, C, 1), qkv.bias (3C,). QKVAttentionLegacy reads the 3C rows as
    (head, q/k/v, d), QKVAttention as (q/k/v, head, d); diffusers reads each of to_q/to_k/to_v as
    (head, d). Returns (C, C) or (C,).
    """

    def transform(source: dict) -> torch.Tensor:
        tensor = source[key]
        if tensor.dim() == 3:
            tensor = tensor[..., 0]
        rows, rest = tensor.shape[0] // 3, tuple(tensor.shape[1:])
        if tensor.shape[0] % 3 or rows % head_channels:
            raise AdmConversionError(
                f"{key} has {tensor.shape[0]} rows; expected 3 x channels, channels a multiple of the head size "
                f"{head_channels}"
            )
        if new_order:
            return tensor.reshape(3, rows, *rest)[part]
        heads = rows // head_channels
        return tensor.reshape(heads, 3, head_channels, *rest)[:, part].reshape(rows, *rest)

    return transform


def _expand(
    pair: tuple[str, str, str], arch: AdmArchitecture, target_keys: set[str]
) -> list[tuple[str, str, Transform]]:
    """(source key, target key, transform) for every tensor of one module pair."""
    source, target, kind = pair
    out: list[tuple[str, str, Transform]] = []
    for param in ("weight", "bias"):
        if kind == "plain":
            out.append((f"{source}.{param}", f"{target}.{param}", _take(f"{source}.{param}")))
        elif kind == "resblock":
            for ours, theirs in _RESBLOCK:
                # A skip convolution exists only where the channel count changes, exactly where the
                # target has conv_shortcut; a source that has one anyway is reported as unused.
                if ours == "skip_connection" and f"{target}.{theirs}.{param}" not in target_keys:
                    continue
                out.append(
                    (f"{source}.{ours}.{param}", f"{target}.{theirs}.{param}", _take(f"{source}.{ours}.{param}"))
                )
        elif kind == "attention":
            key = f"{source}.norm.{param}"
            out.append((key, f"{target}.group_norm.{param}", _take(key)))
            key = f"{source}.qkv.{param}"
            for part, name in enumerate(("to_q", "to_k", "to_v")):
                out.append(
                    (
                        key,
                        f"{target}.{name}.{param}",
                        _qkv_part(key, part, arch.head_channels, arch.new_attention_order),
                    )
                )
            key = f"{source}.proj_out.{param}"
            out.append((key, f"{target}.to_out.0.{param}", _take(key, squeeze=param == "weight")))
        else:
            raise ValueError(f"unknown module kind {kind!r}")
    return out


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def adm_to_diffusers(
    state: Mapping[str, torch.Tensor], arch: AdmArchitecture, target_shapes: Mapping[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """Rename (and split) a guided-diffusion state dict onto a UNet2DModel's keys, float32.

    Every source key must be used exactly once and every target key filled with its exact shape;
    otherwise the error names the keys, which almost always means the flags are not the ones the
    checkpoint was trained with.
    """
    plan = [item for pair in module_pairs(arch) for item in _expand(pair, arch, set(target_shapes))]
    uses = Counter(source for source, _, _ in plan)
    sources_per_target = Counter(target for _, target, _ in plan)
    twice = [key for key, count in sources_per_target.items() if count > 1]
    if twice:
        raise AssertionError(f"internal error: target keys filled twice: {_listing(twice)}")
    missing = sorted(set(uses) - set(state))
    unused = sorted(set(state) - set(uses))
    # A fused qkv tensor feeds three targets; any other source key feeding more than one is a bug.
    overused = [key for key, count in uses.items() if count > (3 if ".qkv." in key else 1)]
    unfilled = sorted(set(target_shapes) - set(sources_per_target))
    unknown = sorted(set(sources_per_target) - set(target_shapes))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) these flags imply are not in the checkpoint: {_listing(missing)}")
    if unused:
        hint = " (label_emb.weight: the checkpoint is class-conditional)" if "label_emb.weight" in unused else ""
        problems.append(
            f"{len(unused)} tensor(s) in the checkpoint have no place in this model{hint}: {_listing(unused)}"
        )
    if overused or unfilled or unknown:
        problems.append(
            "internal mapping error: "
            + "; ".join(
                text
                for text in (
                    overused and f"used more than once: {_listing(overused)}",
                    unfilled and f"UNet2DModel keys not filled: {_listing(unfilled)}",
                    unknown and f"keys UNet2DModel lacks: {_listing(unknown)}",
                )
                if text
            )
        )
    if problems:
        raise AdmConversionError(
            "the checkpoint does not match the flags: " + "; ".join(problems) + ". Pass the MODEL_FLAGS it was trained "
            "with"
        )
    converted: dict[str, torch.Tensor] = {}
    wrong_shape = []
    for source, target, transform in plan:
        tensor = transform(state)
        if tuple(tensor.shape) != tuple(target_shapes[target]):
            wrong_shape.append(
                f"{source} {tuple(state[source].shape)} -> {target} needs {tuple(target_shapes[target])}"
            )
            continue
        # clone: safetensors refuses tensors that share storage, and qkv splits are views of one tensor.
        converted[target] = tensor.detach().to(torch.float32).clone().contiguous()
    if wrong_shape:
        raise AdmConversionError(
            "the checkpoint does not match the flags: shapes differ for "
            + "; ".join(wrong_shape[:6])
            + (f" ... ({len(wrong_shape)} in all)" if len(wrong_shape) > 6 else "")
            + ". Pass the MODEL_FLAGS it was trained with (--num_channels, --channel_mult, --learn_sigma ...)"
        )
    return converted


# ---------------------------------------------------------------------------------------------
# The whole conversion
# ---------------------------------------------------------------------------------------------


def build_unet(arch: AdmArchitecture, *, device: str | torch.device | None = None) -> UNet2DModel:
    """An uninitialised-or-random UNet2DModel for `arch` (device "meta" allocates nothing)."""
    with torch.device(device or "cpu"):
        return UNet2DModel(**arch.unet_config())


def convert_adm_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, flags: str | Mapping) -> Path:
    """Convert a guided-diffusion checkpoint into a UNet2DModel directory; returns `out_dir`.

    `flags` is the MODEL_FLAGS string the checkpoint was trained with (DIFFUSION_FLAGS may be
    appended), or a dict from `parse_adm_flags`. The directory gets `config.json`,
    `diffusion_pytorch_model.safetensors` (float32; fp16 checkpoints are widened losslessly) and
    `scheduler_config.json` and `preprocessing.json` (guided-diffusion's preprocessing, "adm", which
    extraction then uses by default), and loads with `stages.models.loading.load_model`. Everything is checked before
    anything is written; `out_dir` must not exist or be empty.
    """
    if isinstance(flags, str) and not flags.strip():
        raise AdmConversionError(
            "no flags given: pass the MODEL_FLAGS the checkpoint was trained with, e.g. "
            '--flags "--image_size 256 --num_channels 256 --num_res_blocks 2 ..." (its README '
            "lists them)"
        )
    flags = _as_flags(flags)
    arch = adm_architecture(flags)
    scheduler = adm_scheduler(flags)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AdmConversionError(f"{out_dir}: exists and is not an empty directory; choose a new output directory")
    state = load_adm_state_dict(checkpoint_path)
    # Built on the meta device: the converted tensors become its parameters, so a 550M-parameter
    # model is never randomly initialised only to be overwritten.
    unet = build_unet(arch, device="meta")
    shapes = {key: value.shape for key, value in unet.state_dict().items()}
    try:
        converted = adm_to_diffusers(state, arch, shapes)
    except AdmConversionError as error:
        raise AdmConversionError(f"{checkpoint_path}: {error}") from None
    unet.load_state_dict(converted, strict=True, assign=True)
    unet.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir, safe_serialization=True)
    scheduler.save_pretrained(out_dir)
    # The paper's data loader (guided-diffusion's center_crop_arr) is this model's preprocessing.
    (out_dir / PREPROCESS_FILE).write_text(json.dumps({"preprocess": "adm"}) + "\n")
    return out_dir
