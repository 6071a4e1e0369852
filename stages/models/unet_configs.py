"""`UNet2DModel` configurations with ADM's structure (the one shared place that knows the mapping).

ADM ("Diffusion Models Beat GANs on Image Synthesis") maps onto diffusers' `UNet2DModel` as:
levels with attention -> Attn{Down,Up}Block2D, others -> Resnet{Downsample,Upsample}Block2D (residual
up/down-sampling) or {Down,Up}Block2D (convolutional), scale-shift norm -> resnet_time_scale_shift,
fixed channels per head -> attention_head_dim, cos-first sinusoidal time embedding, GroupNorm(32, eps 1e-5).
"""

from __future__ import annotations


def adm_unet_config(
    *,
    image_size: int,
    num_channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    attention_resolutions: tuple[int, ...],
    num_head_channels: int,
    resblock_updown: bool = True,
    use_scale_shift_norm: bool = True,
    in_channels: int = 3,
    out_channels: int = 3,
) -> dict:
    """Keyword arguments for `UNet2DModel(**config)` equivalent to guided-diffusion's `UNetModel`.

    `attention_resolutions` are downsampling factors as guided-diffusion stores them internally
    (image_size // resolution), e.g. (8, 16, 32) for attention at 32, 16 and 8 px of a 256 model.
    """
    down_types, up_types = [], []
    for level in range(len(channel_mult)):
        attention = 2**level in attention_resolutions
        if attention:
            down_types.append("AttnDownBlock2D")
        else:
            down_types.append("ResnetDownsampleBlock2D" if resblock_updown else "DownBlock2D")
    for level in reversed(range(len(channel_mult))):
        attention = 2**level in attention_resolutions
        if attention:
            up_types.append("AttnUpBlock2D")
        else:
            up_types.append("ResnetUpsampleBlock2D" if resblock_updown else "UpBlock2D")
    return dict(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(num_channels * m for m in channel_mult),
        layers_per_block=num_res_blocks,
        down_block_types=tuple(down_types),
        up_block_types=tuple(up_types),
        downsample_type="resnet" if resblock_updown else "conv",
        upsample_type="resnet" if resblock_updown else "conv",
        resnet_time_scale_shift="scale_shift" if use_scale_shift_norm else "default",
        attention_head_dim=num_head_channels,
        norm_num_groups=32,
        # UNetMidBlock2D drops the attention's group norm under scale-shift unless told the groups.
        attn_norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
        time_embedding_type="positional",
        dropout=0.0,
    )


def tiny_adm_config(image_size: int = 16, in_channels: int = 3) -> dict:
    """A few-hundred-KB ADM-shaped U-Net for tests: 3 levels, attention at the two deeper ones."""
    return adm_unet_config(
        image_size=image_size,
        num_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(2, 4),
        num_head_channels=16,
        in_channels=in_channels,
        out_channels=in_channels,
    )
