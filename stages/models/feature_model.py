"""What extraction needs of a model, whatever its kind: the one small interface every kind implements.

    kind                     what was loaded: "unet" (pixel-space UNet2DModel), "stable-diffusion", "dit",
                             "hf" or "timm" (vision backbones without noise)
    store_kind               the store's "kind": "diffusion", or "backbone" (no noise, the one timestep 0)
    block_table()            the numbered blocks (stages.models.blocks.Block rows)
    preprocessing()          what the store records about how an image becomes model input
    image_options()          keyword arguments of stages.data.images.read_image for one image
    noise_shape()            the shape of one noise draw (the image's, or the latent's), None without noise
    prepare(device)          move the networks to the device, in eval mode
    encode(x0)               a batch of read images (B, C, H, W) on the device -> what is noised (or, for a
                             backbone, what the network takes): identity, VAE mean latents x scaling factor,
                             or per-channel normalisation; float32, outside any autocast
    capture(blocks)          a stages.models.capture.BlockCapture running the truncated forward
    bind_classes(classes)    the data set's class names, before identity() (a prompt template uses them)
    identity()               everything about the model that decides its features (the store's "model")
    num_train_timesteps, alphas_cumprod()   the noise schedule (diffusion kinds)
    noise_scales(t)          (a, b) of x_t = a x0 + b eps: sqrt(abar_t), sqrt(1 - abar_t) for the DDPM family,
                             (1 - sigma_t, sigma_t) for rectified flow (stages.models.flow)
    noise_formula()          that formula in words, for the store's info
    cast(dtype)              at bf16 / fp16, the kinds made for today's sizes cast their network's weights
    memory_estimate(deepest, precision)   weights and activations for --dry-run (latent kinds), else None

The chunk and batch scheduling, the noise function, the store and resuming stay in
stages.extract.run, shared by every kind.
"""

from __future__ import annotations

import math

import torch

# The timestep a backbone's features are stored under: it has no noise, and the store's layout
# (block<B>/t<T>) and every reader stay the same for it.
NO_NOISE_TIMESTEP = 0


class FeatureModel:
    kind: str = "unet"
    store_kind: str = "diffusion"
    source: str

    @property
    def diffusion(self) -> bool:
        return self.store_kind == "diffusion"

    def default_timesteps(self) -> tuple[int, ...]:
        return (90,) if self.diffusion else (NO_NOISE_TIMESTEP,)

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0

    def cast(self, dtype: torch.dtype) -> None:
        """Cast the network's weights to a low compute precision, where the kind does (stages.models.memory)."""

    def input_summary(self) -> str | None:
        """One line above `pipeline blocks`' table: what an image becomes before the blocks (latent kinds)."""
        return None

    def memory_estimate(self, deepest: int, precision: str):
        """A stages.models.memory.MemoryEstimate for --dry-run, or None where the kind gives none."""
        return None

    def noise_scales(self, timestep: int) -> tuple[float, float]:
        abar = self.alphas_cumprod()
        return float(math.sqrt(abar[timestep])), float(math.sqrt(1.0 - abar[timestep]))

    def noise_formula(self) -> str:
        x0 = "x0" if self.kind == "unet" else "z0 (the VAE's posterior mean x its scaling factor)"
        return f"x_t = sqrt(abar_t) {x0} + sqrt(1 - abar_t) eps"

    def bind_classes(self, classes: list[str]) -> None:
        pass

    def noise_shape(self) -> tuple[int, ...] | None:
        raise NotImplementedError

    def block_table(self):
        raise NotImplementedError

    def preprocessing(self) -> dict:
        raise NotImplementedError

    def image_options(self) -> dict:
        raise NotImplementedError

    def prepare(self, device: torch.device) -> None:
        raise NotImplementedError

    def capture(self, blocks):
        raise NotImplementedError

    def identity(self) -> dict:
        raise NotImplementedError
