"""Modules for spatial pyramid pooling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from torch_ext.spp import spp, sppf

__all__ = ["SPPF", "SpatialPyramidPooling"]


class SpatialPyramidPooling(nn.Module):
    """SPP-net's pyramid pooling layer: ``[N, C, H, W] -> [N, C * sum(l * l)]``.

    Turns feature maps of any spatial size into a fixed-length vector (see
    :func:`torch_ext.spp`).

    Args:
        levels: grid sizes of the pyramid, each ``>= 1``. Default ``(1, 2, 4)``.
        mode: ``"max"`` or ``"avg"``.
    """

    def __init__(self, levels: Sequence[int] = (1, 2, 4), mode: str = "max") -> None:
        super().__init__()
        self.levels = tuple(int(level) for level in levels)
        self.mode = mode
        if not self.levels or min(self.levels) < 1:
            raise ValueError(f"levels must be a non-empty sequence of ints >= 1, got {levels!r}")
        if mode not in ("max", "avg"):
            raise ValueError(f'mode must be "max" or "avg", got {mode!r}')

    def output_features(self, channels: int) -> int:
        """Length of the output vector for inputs with ``channels`` channels."""
        return channels * sum(level * level for level in self.levels)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return spp(input, self.levels, self.mode)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}"


class SPPF(nn.Module):
    """The pooling of YOLOv5's SPPF block: ``cat([x, m1, m2, m3], 1)``, fused.

    ``m(i+1) = max_pool2d(m(i), kernel_size, stride=1, padding=kernel_size // 2)``; output
    ``[N, C * (repeats + 1), H, W]`` (see :func:`torch_ext.sppf`). YOLOv5's block puts a 1x1
    convolution before and after this.

    Args:
        kernel_size: odd window size. Default 5.
        repeats: number of chained poolings. Default 3.
    """

    def __init__(self, kernel_size: int = 5, repeats: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats!r}")
        self.kernel_size = int(kernel_size)
        self.repeats = int(repeats)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return sppf(input, self.kernel_size, self.repeats)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, repeats={self.repeats}"
