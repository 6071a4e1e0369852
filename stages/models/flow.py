"""The rectified-flow noise of SD3 / SD3.5 and FLUX.1: sigma for each of the model's integer timesteps.

    x_t = (1 - sigma_t) z0 + sigma_t eps                    (FlowMatchEulerDiscreteScheduler.scale_noise)

Timestep t in [0, N) (N = num_train_timesteps, 1000) is the scheduler's training grid read from the
low-noise end: s = (t + 1) / N, so t = 999 is pure noise and t = 0 nearly clean, as in the DDPM
family's numbering. The model's shift then moves s to the sigma it was trained with:

    static shift (SD3: shift 3.0)         sigma = shift s / (1 + (shift - 1) s)
    resolution-dependent (FLUX.1)         sigma = e^mu / (e^mu + 1/s - 1),
                                          mu = base_shift + (max_shift - base_shift)
                                               (tokens - base_image_seq_len) / (max_image_seq_len - base_image_seq_len)

with `tokens` the image's packed token count ((H/16) (W/16) for FLUX at 8x VAE and 2x2 packing). The
sigmas are read from the model's own scheduler (so they equal, bit for bit, what its pipeline uses)
and the network is given the scheduler's timestep for them: sigma N (SD3), or sigma as FLUX's
pipeline passes it (t / 1000, the transformer multiplying by 1000 again).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stages.models.blocks import UnsupportedModelError

# scheduler options that change the sigmas away from the training grid above: refused, not guessed
_UNSUPPORTED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@dataclass(frozen=True)
class FlowSchedule:
    sigmas: torch.Tensor  # (N,) float32, sigmas[t] for t = 0..N-1 (ascending)
    timesteps: torch.Tensor  # (N,) float32, the scheduler's timestep for each t (sigma x N)
    record: dict  # what the store records: shift or mu, and the formula

    @property
    def num_train_timesteps(self) -> int:
        return len(self.sigmas)


def calculate_mu(tokens: int, config) -> float:
    """FLUX's resolution-dependent shift: linear in the image's token count (the module docstring)."""
    base_len, max_len = int(config["base_image_seq_len"]), int(config["max_image_seq_len"])
    base, top = float(config["base_shift"]), float(config["max_shift"])
    slope = (top - base) / (max_len - base_len)
    return tokens * slope + (base - slope * base_len)


def flow_schedule(scheduler, tokens: int, source: str) -> FlowSchedule:
    """The sigmas of `scheduler` (a FlowMatchEulerDiscreteScheduler) for an image of `tokens` packed tokens."""
    config = scheduler.config
    used = [name for name in _UNSUPPORTED if config.get(name)]
    if used or config.get("time_shift_type", "exponential") != "exponential":
        raise UnsupportedModelError(
            f"--model {source}: its scheduler sets {', '.join(used) or 'time_shift_type'}, "
            "a sigma schedule not supported for feature extraction; the static or "
            "resolution-dependent shift of SD3 and FLUX.1 is"
        )
    n = int(config.num_train_timesteps)
    if config.get("use_dynamic_shifting"):
        mu = calculate_mu(tokens, config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
        record = {
            "shift": "resolution-dependent",
            "mu": mu,
            "image_tokens": int(tokens),
            "sigma": "e^mu / (e^mu + 1/s - 1), s = (t + 1) / N",
        }
    else:
        shift = float(config.get("shift", 1.0))
        record = {"shift": shift, "sigma": "shift s / (1 + (shift - 1) s), s = (t + 1) / N"}
    sigmas = scheduler.sigmas[:n].flip(0).to(torch.float32).clone()
    timesteps = scheduler.timesteps[:n].flip(0).to(torch.float32).clone()
    return FlowSchedule(sigmas, timesteps, {"family": "rectified-flow", "num_train_timesteps": n, **record})
