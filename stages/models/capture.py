"""Capturing block outputs with forward hooks, pooled on the device, stopping after the deepest block.

Block numbers follow execution order, so once the deepest requested block has produced its output
nothing after it can matter: its hook raises, and the rest of the U-Net never runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.models.blocks import Block


class _StopForward(Exception):
    pass


class BlockCapture:
    """Hooks on `blocks` of `unet`; each `__call__` returns {block: (B, C, g, g) float32} pooled to `grids`.

    Use as a context manager so the hooks are removed afterwards.
    """

    def __init__(self, unet: nn.Module, blocks: list[Block]):
        self.unet = unet
        self._blocks = {block.number: block for block in blocks}
        self._wanted: dict[int, int] = {}
        self._deepest = 0
        self._captured: dict[int, torch.Tensor] = {}
        self._handles = [
            unet.get_submodule(block.module).register_forward_hook(self._hook(block.number)) for block in blocks
        ]

    def _hook(self, number: int):
        def hook(module, inputs, output):
            grid = self._wanted.get(number)
            if grid is None:
                return
            # Pool in float32 whatever the compute precision: the stored features average many cells.
            self._captured[number] = F.adaptive_avg_pool2d(output.float(), grid)
            if number == self._deepest:
                raise _StopForward

        return hook

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, grids: dict[int, int]) -> dict[int, torch.Tensor]:
        unknown = set(grids) - set(self._blocks)
        if unknown:
            raise KeyError(f"blocks {sorted(unknown)} are not hooked")
        self._wanted, self._deepest, self._captured = dict(grids), max(grids), {}
        try:
            self.unet(sample, timesteps)
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
