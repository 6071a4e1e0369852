"""What a latent model needs of the GPU, for `--dry-run`: weights exactly, activations estimated.

    weights        parameters x bytes: the network at the compute precision (SDXL, SD3, FLUX and PixArt are
                   cast to bf16 / fp16 when asked; SD 1.x/2.x and DiT keep float32 weights under autocast),
                   the VAE in float32 always
    text encoders  never on the GPU with --offload text (the default): run once on the CPU in float32 and freed
                   (stages.models.prompted); --offload none runs them on the device first, alone (the peak
                   is then the larger of that phase and extraction)
    activations    per batch row, up to the deepest requested block, at the compute precision:
                   transformers: (image tokens + text tokens in the residual stream) x width x 14, the
                   tensors live at once inside one block at inference (residual, normed input, q, k, v,
                   attention output, 4x-wide MLP hidden and its activation); attention scores are not
                   counted (PyTorch's fused SDPA kernels on CUDA do not materialise them)
                   Sana: 20 (its GLUMBConv MLP holds a 5x-wide inverted convolution, its depthwise
                   convolution and the 2.5x-wide gated product; linear attention's key-value state is small)
                   U-Nets: 4 x the sum of the block outputs up to the deepest (the encoder's outputs are
                   held for the skip connections, plus a resnet's working copies)
    VAE encoding   per image, float32: 4 x the first level's channels x pixels; images are encoded in slices
                   that keep it under VAE_BUDGET

These are estimates to size `--batch-size` with; bench/gpu_check.sh measures the peak on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache.text import format_bytes

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BLOCK_COPIES = 14
UNET_COPIES = 4
VAE_COPIES = 4
VAE_BUDGET = 4 << 30  # bytes of VAE activations per encoding slice


@dataclass(frozen=True)
class MemoryEstimate:
    network: str  # the network's class
    network_parameters: int
    network_bytes: int
    vae_parameters: int
    text_parameters: int
    row_bytes: int  # activations per batch row up to the deepest requested block
    vae_image_bytes: int  # VAE encoding activations per image
    basis: str  # what the activation figure counts
    text_offloaded: bool = True  # --offload text (the default): the text encoders never reach the device

    def lines(self, rows: int, images: int, precision: str) -> list[str]:
        vae_bytes = 4 * self.vae_parameters
        slice_images = vae_slice(self.vae_image_bytes, images)
        peak = self.network_bytes + vae_bytes + rows * self.row_bytes + slice_images * self.vae_image_bytes
        text_bytes = 4 * self.text_parameters
        if self.text_offloaded:
            text = (
                f"run once on the CPU in float32 ({format_bytes(text_bytes)} of host memory) and freed; never on "
                "the GPU (--offload text)"
            )
        else:  # they run, alone on the device, before the network is moved there: the peak is the larger phase
            text = (
                f"run once on the device in float32 ({format_bytes(text_bytes)}) and freed before the network is "
                "moved there (--offload none)"
            )
            peak = max(peak, text_bytes)
        return [
            f"memory (estimate; {precision}):",
            f"  network         {self.network}: {count(self.network_parameters)} parameters, "
            f"{format_bytes(self.network_bytes)} of weights",
            f"  vae             {count(self.vae_parameters)} parameters, {format_bytes(vae_bytes)} (float32)",
            f"  text encoders   {count(self.text_parameters)} parameters: {text}",
            f"  activations     {format_bytes(self.row_bytes)} per batch row ({self.basis})",
            f"  VAE encoding    {format_bytes(self.vae_image_bytes)} per image, {slice_images} image(s) at a time",
            f"  peak            about {format_bytes(peak)} on the device at {rows} rows per pass",
        ]


def count(n: int) -> str:
    """11_901_408_320 -> '11.90 B', 83_653_863 -> '83.7 M'."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "B" else f"{n / size:.1f} {unit}"
    return str(n)


def vae_slice(image_bytes: int, images: int) -> int:
    """Images per VAE encoding slice: as many as VAE_BUDGET holds, at least one, at most the batch."""
    return max(1, min(images, VAE_BUDGET // max(1, image_bytes)))


def vae_image_bytes(vae, image_size: int) -> int:
    return VAE_COPIES * vae_widths(vae)[0] * image_size**2 * 4


def vae_widths(vae) -> tuple[int, ...]:
    """The channels of each level of a VAE's encoder: AutoencoderKL's block_out_channels, the DC-AE's
    (Sana's AutoencoderDC) encoder_block_out_channels; a level halves the image side."""
    config = vae.config
    widths = config.get("block_out_channels") or config.get("encoder_block_out_channels")
    return tuple(int(w) for w in widths)


def transformer_row_bytes(tokens: int, width: int, precision: str, copies: int = BLOCK_COPIES) -> int:
    return copies * tokens * width * PRECISION_BYTES[precision]


def unet_row_bytes(table, deepest: int, precision: str) -> int:
    outputs = sum(b.channels * b.resolution**2 for b in table if b.number <= deepest)
    return UNET_COPIES * outputs * PRECISION_BYTES[precision]


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
