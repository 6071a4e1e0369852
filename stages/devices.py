"""The machine: the torch device from a user's `--device` (auto, cpu, cuda, cuda:N), its free memory and this
process's resident set."""

from __future__ import annotations

import os

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


def resident_memory() -> int:
    """Bytes of this process's resident set now (/proc/self/statm); 0 where the system does not report it."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable where Linux reports it)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
