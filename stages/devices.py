"""Choosing the torch device from a user's `--device` (auto, cpu, cuda, cuda:N)."""

from __future__ import annotations

import torch

from cache.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; an unusable name is a ValueError that says why."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device
