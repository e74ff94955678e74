"""Receptive-field arithmetic of convolution stacks: their extent and whether they grid."""

from __future__ import annotations

import operator
from collections.abc import Sequence

from torch_ext.nn._args import is_int, positive_ints

__all__ = ["check_gridding", "receptive_field"]


def receptive_field(
    kernel_sizes: Sequence[int],
    dilations: Sequence[int],
    strides: Sequence[int] | None = None,
) -> int:
    """Receptive field, along one axis, of a stack of convolutions (or poolings), in inputs.

    ``rf = 1 + sum_i (k_i - 1) * d_i * prod_{j < i} s_j``: layer ``i`` widens the field by
    ``(k_i - 1) * d_i`` of its own input steps, each of which spans ``prod_{j < i} s_j``
    inputs of the stack. This is the extent from the first to the last input that reaches one
    output, holes included (see :func:`check_gridding` for whether there are holes). Padding
    does not change it. Examples: three 3x3 convs give 7; 3x3 convs with dilations
    ``(1, 2, 4)`` give 15.

    Args:
        kernel_sizes: kernel size of each layer, first layer first, ints ``>= 1``.
        dilations: dilation of each layer, ints ``>= 1``, as many as ``kernel_sizes``.
        strides: stride of each layer, ints ``>= 1``, as many as ``kernel_sizes``; ``None``
            means all 1. The last layer's stride does not change the field.

    Returns:
        The receptive field, ``>= 1`` (1 for an empty stack).
    """
    where = "receptive_field"
    kernel_sizes = positive_ints(kernel_sizes, "kernel_sizes", where)
    dilations = positive_ints(dilations, "dilations", where)
    strides = (1,) * len(kernel_sizes) if strides is None else strides
    strides = positive_ints(strides, "strides", where)
    if not len(kernel_sizes) == len(dilations) == len(strides):
        raise ValueError(
            f"{where}: kernel_sizes, dilations and strides must have the same length, got "
            f"{len(kernel_sizes)}, {len(dilations)} and {len(strides)}"
        )
    field, jump = 1, 1
    for kernel_size, dilation, stride in zip(kernel_sizes, dilations, strides, strict=True):
        field += (kernel_size - 1) * dilation * jump
        jump *= stride
    return field


def check_gridding(rates: Sequence[int], kernel_size: int = 3) -> bool:
    """Whether a stack of stride-1 dilated convolutions is free of gridding (no holes).

    Layer ``i`` (first layer first) has ``kernel_size`` taps spaced ``rates[i]`` apart. One
    output of the stack sees the input offsets ``sum_i t_i * rates[i]`` for
    ``t_i in {0, ..., kernel_size - 1}`` (the Minkowski sum of the layers' taps). The stack
    "grids" (Yu & Koltun; Wang et al. 2018, "Understanding Convolution for Semantic
    Segmentation") when that set has holes: inputs between the first and the last one seen
    that no path reaches, in a regular checkerboard. This returns ``True`` when the set is a
    whole interval, computed exactly. The set, and so the answer, does not depend on the
    order of the layers.

    The paper's hybrid dilated convolution (HDC) rule is a closed form for the same question.
    With ``M_n = r_n`` and, going down,
    ``M_i = max(M_{i+1} - 2 r_i, M_{i+1} - 2 (M_{i+1} - r_i), r_i)`` (the largest distance
    between two neighbouring nonzero taps seen at layer ``i``), a stack is gridding-free when
    ``M_2 <= kernel_size``: the first layer, taken as dense, then fills every gap. Rates that
    share a common factor ``> 1`` always grid (every offset seen is a multiple of it). For
    example ``(1, 2, 5)`` has ``M_2 = 2`` and is free; ``(1, 2, 9)`` has ``M_2 = 5`` and grids;
    ``(2, 4, 8)`` grids (common factor 2, also ``M_2 = 4``).

    That rule is exact, by brute-force comparison, in the setting it was made for: 3x3 kernels,
    ``rates[0] == 1`` and non-decreasing rates. Outside it the rule and the hole test differ,
    and this function follows the hole test:

    * it ignores ``rates[0]``: ``(2, 3)`` passes the rule but its first layer has holes;
    * it depends on the order: ``(1, 5, 2)`` fails the rule, but is ``(1, 2, 5)`` reordered;
    * its ``2 r_i`` terms are for 3-tap kernels: with ``kernel_size=5``, ``(1, 1, 8)`` fails
      it, yet covers every offset from -20 to 20.

    Args:
        rates: dilation of each layer, a non-empty sequence of ints ``>= 1``.
        kernel_size: taps per layer along the axis, an int ``>= 1``. Default 3.

    Returns:
        ``True`` when every offset from the first to the last one seen is reached.
    """
    rates = positive_ints(rates, "rates", "check_gridding", allow_empty=False)
    if not is_int(kernel_size):
        raise TypeError(
            "check_gridding: kernel_size must be an int >= 1, got "
            f"{type(kernel_size).__name__} {kernel_size!r}"
        )
    if kernel_size < 1:
        raise ValueError(f"check_gridding: kernel_size must be an int >= 1, got {kernel_size}")
    kernel_size = operator.index(kernel_size)
    # Bit j of `covered` is set when offset j is seen; offset 0 always is.
    covered = 1
    for rate in rates:
        layer = 0
        for tap in range(kernel_size):
            layer |= covered << (tap * rate)
        covered = layer
    return covered & (covered + 1) == 0  # bits 0..m all set, none above
