"""Dilated (atrous) convolution with a fused activation: ``torch_ext.dilated_conv2d``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torch_ext._args import int_arg

__all__ = ["dilated_conv2d", "conv_route"]

_IntOrPair = int | Sequence[int]


def _pair(name: str, value: _IntOrPair) -> list[int]:
    if isinstance(value, int):
        value = int_arg("dilated_conv2d", name, value)
        return [value, value]
    values = list(value)
    if len(values) not in (1, 2) or not all(isinstance(v, int) for v in values):
        raise TypeError(f"dilated_conv2d(): {name} must be an int or a pair of ints, got {value!r}")
    return [int_arg("dilated_conv2d", name, values[0]), int_arg("dilated_conv2d", name, values[-1])]


def dilated_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: _IntOrPair = 1,
    padding: _IntOrPair | str = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
    activation: str | None = "none",
) -> torch.Tensor:
    """2-D convolution with ``torch.nn.functional.conv2d``'s semantics and a fused activation.

    Equals ``act(F.conv2d(input, weight, bias, stride, padding, dilation, groups))`` where
    ``act`` is the identity (``"none"``), ``F.relu``, ``F.silu`` or ``F.gelu`` (erf form), with
    the bias and the activation applied in the convolution's own pass over the output.

    Routes (see ``conv_route``): depthwise convolutions (``groups == C_in``, any channel
    multiplier) run a direct kernel; the others im2col tiles and a GEMM. Dense float32,
    bfloat16 and float16 convolutions with symmetric padding go to PyTorch's own convolution
    where it has kernels for the dtype (cuDNN; oneDNN on the CPU, for the half types only where
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` / ``_fp16_supported()``), which is faster
    there; ``TORCH_EXT_CONV_ROUTE=own`` or ``=vendor`` forces a route. Correctness does not depend
    on the route.

    Args:
        input: ``[N, C_in, H, W]``, float32/float64/float16/bfloat16, contiguous or
            channels_last (the output follows), CPU or CUDA.
        weight: ``[C_out, C_in / groups, kH, kW]`` of the input's dtype and device.
        bias: ``[C_out]`` or None.
        stride, dilation: int or pair, each ``>= 1``.
        padding: int or pair ``>= 0``, or ``"valid"`` (none) or ``"same"`` (stride 1 only; an
            odd total padding puts the extra row/column at the bottom/right, like PyTorch).
        groups: ``>= 1``, dividing ``C_in`` and ``C_out``.
        activation: ``"none"`` (or None), ``"relu"``, ``"silu"`` or ``"gelu"``.

    Returns:
        ``[N, C_out, H_out, W_out]`` of the input's dtype. Differentiable with respect to input,
        weight and bias; half types accumulate in float32.
    """
    ops = torch.ops.torch_ext
    if activation is None:
        activation = "none"
    groups = int_arg("dilated_conv2d", "groups", groups)
    if isinstance(padding, str):
        return ops.dilated_conv2d.padding(
            input,
            weight,
            bias,
            _pair("stride", stride),
            padding,
            _pair("dilation", dilation),
            groups,
            activation,
        )
    return ops.dilated_conv2d(
        input,
        weight,
        bias,
        _pair("stride", stride),
        _pair("padding", padding),
        _pair("dilation", dilation),
        groups,
        activation,
    )


def conv_route(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding: _IntOrPair | str = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
) -> str:
    """Which kernel ``dilated_conv2d`` runs for these arguments on ``input``'s device.

    ``"depthwise"`` (direct kernel), ``"gemm"`` (im2col tiles + GEMM) or ``"vendor"`` (PyTorch's
    own convolution: oneDNN on the CPU, cuDNN on CUDA). Asked of the library, so it reflects the
    rule in force (including ``TORCH_EXT_CONV_ROUTE``).
    """
    if isinstance(padding, str):
        if padding == "valid":
            pad4 = [0, 0, 0, 0]
        else:
            d = _pair("dilation", dilation)
            totals = [d[a] * (weight.shape[2 + a] - 1) for a in range(2)]
            pad4 = [
                totals[0] // 2,
                totals[1] // 2,
                totals[0] - totals[0] // 2,
                totals[1] - totals[1] // 2,
            ]
    else:
        p = _pair("padding", padding)
        pad4 = [p[0], p[1], p[0], p[1]]
    return torch.ops.torch_ext._dilated_conv2d_route(input, weight, pad4, groups)


@torch.library.register_fake("torch_ext::_dilated_conv2d_route")
def _conv_route_fake(input, weight, padding, groups):
    """The route under FakeTensor (torch.compile, export): asked of the real kernel of the fake
    tensors' device, on stand-ins of one element expanded to their sizes (the rule reads sizes,
    dtypes and the device, never values). Symbolic sizes have no route to report."""
    sizes = [*input.shape, *weight.shape]
    if not all(isinstance(size, int) for size in sizes):
        raise RuntimeError(
            "conv_route(): the route of symbolic sizes is unknown; ask conv_route outside the "
            f"compiled region, got input {tuple(input.shape)} and weight {tuple(weight.shape)}"
        )
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        stand_ins = [
            torch.empty(1, dtype=t.dtype, device=t.device).expand(t.shape) for t in (input, weight)
        ]
        return torch.ops.torch_ext._dilated_conv2d_route(*stand_ins, padding, groups)
