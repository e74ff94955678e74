"""Spatial pyramid pooling: SPP-net's pyramid (``spp``) and YOLOv5's SPPF block (``sppf``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torch_ext._args import int_arg

__all__ = ["spp", "sppf"]


def spp(input: torch.Tensor, levels: Sequence[int] = (1, 2, 4), mode: str = "max") -> torch.Tensor:
    """Spatial pyramid pooling of a batch of feature maps into fixed-length vectors.

    For each level ``l`` (in the given order) the ``[N, C, H, W]`` input is pooled into an
    ``l x l`` grid by adaptive max (``mode="max"``) or average (``mode="avg"``) pooling, and the
    grids are flattened per sample and concatenated: the result ``[N, C * sum(l * l)]`` equals
    ``torch.cat([F.adaptive_max_pool2d(input, l).flatten(1) for l in levels], 1)``, computed in
    one pass over the input.

    Bins follow PyTorch's adaptive pooling rule (bin ``i`` of ``l`` spans rows
    ``floor(i * H / l)`` to ``ceil((i + 1) * H / l)``), so every level has ``l * l`` bins for any
    ``H, W >= 1``, also when ``H`` or ``W`` is smaller than ``l``. Max ties go to the first
    element in row-major order, as in PyTorch.

    Args:
        input: float32, float64, float16 or bfloat16 tensor ``[N, C, H, W]``, contiguous or
            channels_last, on CPU or CUDA.
        levels: grid sizes, each ``>= 1``.
        mode: ``"max"`` or ``"avg"``.

    Returns:
        Tensor ``[N, C * sum(l * l for l in levels)]`` of the input's dtype.
    """
    levels = [int_arg("spp", "levels", level) for level in levels]
    return torch.ops.torch_ext.spp(input, levels, mode)


def sppf(input: torch.Tensor, kernel_size: int = 5, repeats: int = 3) -> torch.Tensor:
    """The pooling part of YOLOv5's SPPF block, fused into one op.

    Returns ``torch.cat([x, m1, ..., m_repeats], dim=1)`` where ``m0 = x`` and
    ``m(i+1) = F.max_pool2d(m(i), kernel_size, stride=1, padding=kernel_size // 2)``. The input
    is read once; the forward equals the cascade exactly and the backward equals autograd
    through the cascade (gradients routed to the same maxima).

    Args:
        input: float32, float64, float16 or bfloat16 tensor ``[N, C, H, W]``.
        kernel_size: odd window size ``>= 1``.
        repeats: number of chained poolings, ``>= 1``.

    Returns:
        Tensor ``[N, C * (repeats + 1), H, W]`` in the input's memory format.
    """
    kernel_size = int_arg("sppf", "kernel_size", kernel_size)
    repeats = int_arg("sppf", "repeats", repeats)
    return torch.ops.torch_ext.sppf(input, kernel_size, repeats)
