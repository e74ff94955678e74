"""4-D test inputs in a given memory layout, shared by the op tests."""

from __future__ import annotations

from collections.abc import Callable

import torch


def layout_tensor(
    shape,
    layout: str,
    draw: Callable[[tuple], torch.Tensor],
    *,
    device="cpu",
    dtype=torch.float64,
):
    """(base, view): the leaf `base` and `view(base)`, the 4-D tensor of `shape` in `layout`:
    "contiguous", "channels_last", "transposed" (dims 2 and 3 swapped: neither layout) or
    "sliced" (every other channel of a wider tensor, a column window). `draw(shape)` makes
    the values (a CPU tensor), which are then moved to `device` and `dtype`."""
    a, b, h, w = shape
    if layout == "contiguous":
        base, view = draw(tuple(shape)), lambda t: t
    elif layout == "channels_last":
        base, view = draw(tuple(shape)), lambda t: t
    elif layout == "transposed":
        base, view = draw((a, b, w, h)), lambda t: t.transpose(2, 3)
    elif layout == "sliced":
        base = draw((a, 2 * b, h, w + 3))
        view = lambda t: t[:, ::2, :, 1 : w + 1]
    else:
        raise ValueError(layout)
    base = base.to(device=device, dtype=dtype)
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    assert view(base).shape == torch.Size(shape)
    return base, view
