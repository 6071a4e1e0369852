"""`--dry-run`'s memory figures for the real model sizes, without their weights (meta-device models).

    python bench/model_memory.py [--precision bf16] [--gpu-gb 80]

Builds each kind's network, VAE and text encoders from the published configs on PyTorch's meta
device (no memory, no download), wraps them in the project's model kinds and prints what
`pipeline extract --dry-run` prints for them (stages.models.memory), for all blocks and for the
middle block, and the largest batch (rows per pass) whose estimated peak fits the GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.text import format_bytes  # noqa: E402
from stages.models.memory import count, vae_slice  # noqa: E402

VAE4 = dict(
    block_out_channels=(128, 256, 512, 512),
    latent_channels=4,
    sample_size=1024,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
)
VAE16 = {**VAE4, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
)
CLIP_G = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
)
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"
)
# google/gemma-2-2b-it, Sana's text encoder
GEMMA2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
)
_DCAE_LEVELS = dict(
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
    decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
)
DCAE_WIDTHS = (128, 256, 512, 512, 1024, 1024)
DCAE_F32C32 = dict(
    latent_channels=32,
    attention_head_dim=32,
    encoder_block_out_channels=DCAE_WIDTHS,
    decoder_block_out_channels=DCAE_WIDTHS,
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    upsample_block_type="interpolate",
    downsample_block_type="conv",
    scaling_factor=0.41407,
    **_DCAE_LEVELS,
)  # dc-ae-f32c32-sana-1.0
SMALL_DCAE = dict(
    encoder_block_out_channels=(16, 16, 32, 32, 64, 64),
    decoder_block_out_channels=(16, 16, 32, 32, 64, 64),
    encoder_layers_per_block=(1,) * 6,
    decoder_layers_per_block=(1,) * 6,
    attention_head_dim=16,
)
SANA = {
    "sana-1600m": dict(
        num_layers=20,
        num_attention_heads=70,
        num_cross_attention_heads=20,
        cross_attention_head_dim=112,
        cross_attention_dim=2240,
    ),  # Sana_1600M_1024px
    "sana-600m": dict(
        num_layers=28,
        num_attention_heads=36,
        num_cross_attention_heads=16,
        cross_attention_head_dim=72,
        cross_attention_dim=1152,
    ),
}  # Sana_600M_1024px
TOKENIZER = SimpleNamespace(model_max_length=77)
# --small: the same structures, narrow (a CPU benchmark); the text encoders keep their widths, with --text-layers
SMALL_VAE = dict(block_out_channels=(32, 32, 64, 64), sample_size=256, norm_num_groups=32)


def build(kind: str, *, device="meta", small: bool = False, text_layers: int | None = None, tokenizers=None):
    """The project's model of `kind` (stages.models) around networks built from the published configs on `device`
    (meta: no memory), random weights; `small`: narrow widths and 256 px; `text_layers`: shallow text encoders
    of the real widths (for a benchmark: their depth does not change the extraction); `tokenizers`:
    {"clip": ..., "t5": ...} where the encoders are to be run."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from stages.models.prompted import SDXLModel
    from stages.models.transformers import FluxModel, PixArtModel, SD3Model

    clip_tok = (tokenizers or {}).get("clip", TOKENIZER)
    t5_tok = (tokenizers or {}).get("t5", TOKENIZER)
    shallow = {} if text_layers is None else {"num_hidden_layers": text_layers}
    vae4 = {**VAE4, **SMALL_VAE} if small else VAE4
    vae16 = {**VAE16, **SMALL_VAE} if small else VAE16
    with torch.device("meta" if device == "meta" else "cpu"):  # text encoders run on the CPU, as extraction runs them
        clip_l = CLIPTextModel(CLIPTextConfig(**{**CLIP_L, **shallow}))
        clip_lp = CLIPTextModelWithProjection(CLIPTextConfig(**{**CLIP_L, **shallow}))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**{**CLIP_G, **shallow}))
        t5 = (
            None
            if kind == "sdxl"
            else T5EncoderModel(T5Config(**{**T5_XXL, **({} if text_layers is None else {"num_layers": text_layers})}))
        )
    with torch.device(device):
        if kind == "sdxl":  # stabilityai/stable-diffusion-xl-base-1.0
            widths = (
                dict(
                    block_out_channels=(32, 64, 128),
                    transformer_layers_per_block=(1, 1, 2),
                    attention_head_dim=(2, 4, 8),
                    sample_size=32,
                )
                if small
                else dict(
                    block_out_channels=(320, 640, 1280),
                    transformer_layers_per_block=(1, 2, 10),
                    attention_head_dim=(5, 10, 20),
                    sample_size=128,
                )
            )
            unet = diffusers.UNet2DConditionModel(
                layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
                **widths,
            )
            return SDXLModel(
                unet,
                diffusers.AutoencoderKL(**vae4),
                diffusers.DDPMScheduler(),
                [(clip_tok, clip_l), (clip_tok, clip_g)],
                "stable-diffusion-xl-base-1.0",
            )
        if kind in ("sd3-medium", "sd3.5-large"):
            medium = dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536)
            large = dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm")
            size = medium if kind == "sd3-medium" else large
            if small:
                size = dict(num_layers=6, num_attention_heads=4, caption_projection_dim=256)
            net = diffusers.SD3Transformer2DModel(
                sample_size=32 if small else 128,
                patch_size=2,
                in_channels=16,
                attention_head_dim=64,
                joint_attention_dim=4096,
                pooled_projection_dim=2048,
                out_channels=16,
                pos_embed_max_size=192,
                **size,
            )
            return SD3Model(
                net,
                diffusers.AutoencoderKL(**vae16),
                diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                [(clip_tok, clip_lp), (clip_tok, clip_g), (t5_tok, t5)],
                kind,
            )
        if kind == "flux.1-dev":
            size = (
                dict(num_layers=2, num_single_layers=4, num_attention_heads=2)
                if small
                else dict(num_layers=19, num_single_layers=38, num_attention_heads=24)
            )
            net = diffusers.FluxTransformer2DModel(
                in_channels=64,
                attention_head_dim=128,
                joint_attention_dim=4096,
                pooled_projection_dim=768,
                guidance_embeds=True,
                axes_dims_rope=(16, 56, 56),
                **size,
            )
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
            return FluxModel(net, diffusers.AutoencoderKL(**vae16), scheduler, [(clip_tok, clip_l), (t5_tok, t5)], kind)
        if kind == "pixart-sigma-1024":
            size = (
                dict(sample_size=32, num_layers=6, num_attention_heads=4)
                if small
                else dict(sample_size=128, num_layers=28, num_attention_heads=16)
            )
            net = diffusers.PixArtTransformer2DModel(
                attention_head_dim=72,
                patch_size=2,
                in_channels=4,
                out_channels=8,
                caption_channels=4096,
                cross_attention_dim=72 * size["num_attention_heads"],
                norm_type="ada_norm_single",
                num_embeds_ada_norm=1000,
                norm_elementwise_affine=False,
                norm_eps=1e-6,
                attention_bias=True,
                activation_fn="gelu-approximate",
                use_additional_conditions=False,
                interpolation_scale=2,
                **size,
            )
            return PixArtModel(net, diffusers.AutoencoderKL(**vae4), diffusers.DDPMScheduler(), [(t5_tok, t5)], kind)
        if kind in SANA:
            gemma_tok = (tokenizers or {}).get("gemma", TOKENIZER)
            return _sana(kind, small=small, text_layers=text_layers, tokenizer=gemma_tok, device=device)
    raise ValueError(kind)


def _sana(kind: str, *, small: bool, text_layers: int | None, tokenizer, device):
    import diffusers
    from transformers import Gemma2Config, Gemma2Model

    from stages.models.sana import SanaModel

    # a shallow benchmark encoder also gets a small vocabulary: Gemma's 256k-row embedding is 2.4 GB in float32
    shallow = {} if text_layers is None else {"num_hidden_layers": text_layers, "vocab_size": 1024}
    size = (
        dict(
            num_layers=6,
            num_attention_heads=4,
            num_cross_attention_heads=4,
            cross_attention_head_dim=32,
            cross_attention_dim=128,
        )
        if small
        else SANA[kind]
    )
    with torch.device("meta" if device == "meta" else "cpu"):
        gemma = Gemma2Model(Gemma2Config(**{**GEMMA2_2B, **shallow}))
    with torch.device(device):
        net = diffusers.SanaTransformer2DModel(
            in_channels=32,
            out_channels=32,
            attention_head_dim=32,
            caption_channels=2304,
            mlp_ratio=2.5,
            patch_size=1,
            sample_size=8 if small else 32,
            **size,
        )
        vae = diffusers.AutoencoderDC(**{**DCAE_F32C32, **(SMALL_DCAE if small else {})})
    with torch.device("cpu"):  # the schedulers' tables are real numbers, also when the networks are on meta
        # the published pipelines' scheduler: DPM-Solver on flow sigmas (the shift does not change the memory)
        scheduler = diffusers.DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
        return SanaModel(net, vae, scheduler, [(tokenizer, gemma)], kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="the GPU to fit (GB, 10^9 bytes)")
    parser.add_argument(
        "--kinds", default="sdxl,sd3-medium,sd3.5-large,flux.1-dev,pixart-sigma-1024,sana-1600m,sana-600m"
    )
    args = parser.parse_args()
    budget = 0.9 * args.gpu_gb * 1e9  # 10% for the allocator's fragmentation and the CUDA context
    print(
        f"{'model':<18} {'network':>10} {'weights':>10} {'text enc.':>10} {'blocks':>7} {'deepest':>8} "
        f"{'act./row':>10} {'rows fit':>9}"
    )
    for kind in args.kinds.split(","):
        model = build(kind)
        table = model.block_table()
        for deepest in (len(table), (len(table) + 1) // 2):
            e = model.memory_estimate(deepest, args.precision)
            fixed = e.network_bytes + 4 * e.vae_parameters + vae_slice(e.vae_image_bytes, 64) * e.vae_image_bytes
            rows = int((budget - fixed) // e.row_bytes) if budget > fixed else 0
            print(
                f"{kind:<18} {count(e.network_parameters):>10} {format_bytes(e.network_bytes):>10} "
                f"{count(e.text_parameters):>10} {len(table):>7} {deepest:>8} {format_bytes(e.row_bytes):>10} "
                f"{rows:>9}"
            )
        print("    " + "\n    ".join(model.memory_estimate(len(table), args.precision).lines(64, 64, args.precision)))


if __name__ == "__main__":
    main()
