"""Capturing block outputs with forward hooks, pooled on the device, stopping after the deepest block.

Block numbers follow execution order, so once the deepest requested block has produced its output
nothing after it can matter: its hook raises, and the rest of the network never runs.

Every model kind (stages.models.kinds) uses this one capture: a kind says how its network is called
(`forward`) and, for blocks whose output is not a (B, C, H, W) map (transformer tokens, a class token),
how the output becomes one (`maps`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stages.models.blocks import Block


class _StopForward(Exception):
    pass


def output_tensor(output) -> torch.Tensor:
    """The tensor a module returns: itself, or the first element of a tuple or of a diffusers /
    transformers output dataclass (cross-attention and transformer blocks return more than a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return output_tensor(output[0])
    if hasattr(output, "to_tuple"):
        return output_tensor(output.to_tuple()[0])
    raise TypeError(f"a hooked module returned {type(output).__name__}, not a tensor")


def _call_unet(module: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor, **_) -> None:
    module(sample, timesteps)


class BlockCapture:
    """Hooks on `blocks` of `unet`; each `__call__` returns {block: (B, C, g, g) float32} pooled to `grids`.

    `forward(module, sample, timesteps, **context)` runs the network (default: `module(sample, timesteps)`);
    `maps[number](output)` turns a block's output into a (B, C, H, W) map (default: the output tensor).
    Use as a context manager so the hooks are removed afterwards.
    """

    def __init__(
        self,
        unet: nn.Module,
        blocks: list[Block],
        *,
        forward: Callable | None = None,
        maps: dict[int, Callable] | None = None,
    ):
        self.unet = unet
        self._forward = forward or _call_unet
        self._maps = maps or {}
        self._blocks = {block.number: block for block in blocks}
        self._wanted: dict[int, int] = {}
        self._deepest = 0
        self._captured: dict[int, torch.Tensor] = {}
        self._handles = [
            unet.get_submodule(block.module).register_forward_hook(self._hook(block.number)) for block in blocks
        ]

    def _hook(self, number: int):
        to_map = self._maps.get(number)

        def hook(module, inputs, output):
            grid = self._wanted.get(number)
            if grid is None:
                return
            output = output_tensor(output) if to_map is None else to_map(output)
            # Pool in float32 whatever the compute precision: the stored features average many cells.
            self._captured[number] = F.adaptive_avg_pool2d(output.float(), grid)
            if number == self._deepest:
                raise _StopForward

        return hook

    def __call__(
        self, sample: torch.Tensor, timesteps: torch.Tensor, grids: dict[int, int], **context
    ) -> dict[int, torch.Tensor]:
        unknown = set(grids) - set(self._blocks)
        if unknown:
            raise KeyError(f"blocks {sorted(unknown)} are not hooked")
        self._wanted, self._deepest, self._captured = dict(grids), max(grids), {}
        try:
            self._forward(self.unet, sample, timesteps, **context)
        except _StopForward:
            pass
        finally:
            self._wanted = {}
        captured, self._captured = self._captured, {}
        return captured

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> BlockCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
