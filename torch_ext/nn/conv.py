"""Dilated (atrous) convolution modules, DeepLabv3's ASPP, and receptive-field arithmetic."""

from __future__ import annotations

import operator
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["ASPP", "DilatedConv2d", "check_gridding", "receptive_field"]

_ACTIVATIONS = ("none", "relu", "silu", "gelu")


def _check_activation(activation, where: str) -> str:
    if activation is None:  # as users write "no activation"
        return "none"
    if not isinstance(activation, str):
        raise TypeError(
            f"{where}: activation must be None or a str, one of {_ACTIVATIONS}, got "
            f"{type(activation).__name__} {activation!r}"
        )
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{where}: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return activation


def _is_int(value) -> bool:
    """An int, or an integer type that converts losslessly (numpy, 0-d tensors); not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _positive_ints(values, name: str, where: str, allow_empty: bool = True) -> tuple[int, ...]:
    """``values`` as a tuple of ints ``>= 1``, or a clear error naming ``name``."""
    if not isinstance(values, Sequence) or isinstance(values, str | bytes):
        raise TypeError(
            f"{where}: {name} must be a sequence of ints >= 1, got {type(values).__name__} "
            f"{values!r}"
        )
    if not allow_empty and len(values) == 0:
        raise ValueError(f"{where}: {name} must not be empty, got {values!r}")
    for index, value in enumerate(values):
        if not _is_int(value):
            raise TypeError(
                f"{where}: {name} must be a sequence of ints >= 1, got {name}[{index}] = "
                f"{value!r} ({type(value).__name__})"
            )
        if value < 1:
            raise ValueError(
                f"{where}: {name} must be a sequence of ints >= 1, got {name}[{index}] = {value}"
            )
    return tuple(operator.index(value) for value in values)


class DilatedConv2d(nn.Conv2d):
    """A drop-in ``nn.Conv2d`` computed by :func:`torch_ext.dilated_conv2d`.

    Same constructor arguments, parameters, state_dict keys (``weight``, ``bias``) and
    initialization as ``nn.Conv2d``, so state dicts load in both directions; the output equals
    ``nn.Conv2d``'s, followed by ``activation`` when one is given (fused into the op, applied
    after the bias). ``padding_mode`` other than ``"zeros"`` pads with ``F.pad`` first, as
    ``nn.Conv2d`` does, and then convolves with padding 0.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: as in ``nn.Conv2d`` (``padding`` may be an int, a pair,
            ``"same"`` or ``"valid"``).
        activation: keyword only; ``"none"`` (default), ``"relu"``, ``"silu"`` or ``"gelu"``
            (the exact erf form, like ``F.gelu``'s default).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        activation: str = "none",
    ) -> None:
        activation = _check_activation(activation, "DilatedConv2d")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.activation = activation

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, activation: str = "none") -> DilatedConv2d:
        """A ``DilatedConv2d`` with ``conv``'s configuration and its very parameters.

        The new module holds the same ``Parameter`` objects as ``conv`` (not copies): an
        optimizer step, ``load_state_dict`` or in-place change through either is seen by both.
        Its training mode is ``conv``'s. Forward hooks of ``conv`` are not carried over, nor is
        the activation of a ``conv`` that is itself a ``DilatedConv2d``: ``activation`` is the
        new module's.

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d`` (subclasses are accepted).
            ValueError: ``conv`` has parametrizations (``torch.nn.utils.parametrize``): its
                ``weight`` is computed, not a parameter that could be shared.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(
                f"DilatedConv2d.from_conv: conv must be an nn.Conv2d, got {type(conv).__name__}"
            )
        if parametrize.is_parametrized(conv):
            raise ValueError(
                "DilatedConv2d.from_conv: conv has parametrizations on "
                f"{sorted(conv.parametrizations.keys())}; its parameters can not be shared "
                "(remove them with torch.nn.utils.parametrize.remove_parametrizations first)"
            )
        activation = _check_activation(activation, "DilatedConv2d.from_conv")
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",  # no allocation nor initialization: the parameters are replaced
            dtype=conv.weight.dtype,
            activation=activation,
        )
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        new.train(conv.training)
        return new

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        from torch_ext.conv import dilated_conv2d  # the op's wrapper, loaded with the library

        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        return dilated_conv2d(
            input,
            weight,
            bias,
            stride=self.stride,
            padding=padding,
            dilation=self.dilation,
            groups=self.groups,
            activation=self.activation,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation != "none":
            text += f", activation={self.activation!r}"
        return text


class ASPPPooling(nn.Sequential):
    """ASPP's image-pooling branch: global average pool, 1x1 conv, BN, ReLU, upsample.

    The ``[N, out_channels, 1, 1]`` result is upsampled bilinearly (``align_corners=False``)
    back to the input's height and width, i.e. broadcast to every position.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            DilatedConv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        size = input.shape[-2:]
        output = input
        for module in self:
            output = module(output)
        return F.interpolate(output, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLabv3's atrous spatial pyramid pooling: ``[N, C_in, H, W] -> [N, C_out, H, W]``.

    Parallel branches, each ``conv(bias=False) -> BatchNorm2d -> ReLU`` with ``out_channels``
    channels: a 1x1 conv; one 3x3 conv of dilation ``r`` and padding ``r`` per rate; and the
    image-pooling branch (:class:`ASPPPooling`). Their outputs are concatenated and projected
    by ``1x1 conv -> BatchNorm2d -> ReLU -> Dropout(dropout)``. Every conv is a
    :class:`DilatedConv2d`.

    Modules and state_dict keys follow ``torchvision.models.segmentation.deeplabv3.ASPP``
    (``convs.0`` the 1x1 branch, ``convs.1..len(rates)`` the dilated ones, ``convs.<last>``
    the pooling branch, ``project``), so its state dicts load here and back.

    Args:
        in_channels: channels of the input, ``>= 1``.
        out_channels: channels of every branch and of the output, ``>= 1`` (DeepLabv3: 256).
        rates: dilation rates of the 3x3 branches, a non-empty sequence of ints ``>= 1``.
            Default ``(6, 12, 18)`` (DeepLabv3 at output stride 16; ``(12, 24, 36)`` at 8).
        dropout: probability of the projection's dropout, in ``[0, 1]``. Default 0.5.

    In training mode the pooling branch's BatchNorm sees one value per channel and sample,
    so a batch needs at least two samples (as in torchvision).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: Sequence[int] = (6, 12, 18),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not _is_int(value):
                raise TypeError(
                    f"ASPP: {name} must be an int >= 1, got {type(value).__name__} {value!r}"
                )
            if value < 1:
                raise ValueError(f"ASPP: {name} must be an int >= 1, got {value}")
        rates = _positive_ints(rates, "rates", "ASPP", allow_empty=False)
        if isinstance(dropout, bool) or not isinstance(dropout, int | float):
            raise TypeError(
                f"ASPP: dropout must be a float in [0, 1], got {type(dropout).__name__} {dropout!r}"
            )
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"ASPP: dropout must be a float in [0, 1], got {dropout!r}")
        in_channels, out_channels = operator.index(in_channels), operator.index(out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rates = rates
        branches: list[nn.Module] = [
            nn.Sequential(
                DilatedConv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            )
        ]
        for rate in rates:
            branches.append(
                nn.Sequential(
                    DilatedConv2d(
                        in_channels, out_channels, 3, padding=rate, dilation=rate, bias=False
                    ),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(),
                )
            )
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            DilatedConv2d(len(branches) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Dropout(float(dropout)),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.project(torch.cat([branch(input) for branch in self.convs], dim=1))
        # Inference: each conv -> BatchNorm -> ReLU is one op, the BatchNorm folded into the
        # conv's weight and bias and the ReLU fused into its epilogue (same result, two fewer
        # passes over every branch's output).
        branches = [_conv_bn_relu(branch, input) for branch in self.convs[:-1]]
        merged = torch.cat([*branches, self.convs[-1](input)], dim=1)
        return self.project[3](_conv_bn_relu(self.project, merged))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, rates={self.rates}"
        )


def _is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a DTensor (without importing torch.distributed.tensor: no DTensor
    exists before something else has imported it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _conv_bn_relu(block: nn.Sequential, input: torch.Tensor) -> torch.Tensor:
    """``block[2](block[1](block[0](input)))`` for a DilatedConv2d -> BatchNorm2d (running
    statistics, eval) -> ReLU block, as one convolution with the BatchNorm folded in and the
    ReLU fused; any other block runs as it is.

    The folding reads the conv's and the BatchNorm's parameters without calling the modules, so
    it is skipped when one is a DTensor: a module that is an FSDP2 unit of its own
    (``fully_shard(conv)``) holds its parameters sharded until its own forward gathers them.
    """
    conv, bn, relu = block[0], block[1], block[2]
    foldable = (
        isinstance(conv, DilatedConv2d)
        and conv.padding_mode == "zeros"
        and conv.activation == "none"
        and isinstance(bn, nn.BatchNorm2d)
        and not bn.training
        and bn.running_mean is not None
        and isinstance(relu, nn.ReLU)
        and not any(_is_dtensor(p) for p in (conv.weight, conv.bias, bn.weight, bn.bias))
    )
    if not foldable:
        return relu(bn(conv(input)))
    from torch_ext.conv import dilated_conv2d

    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return dilated_conv2d(
        input,
        conv.weight * scale[:, None, None, None],
        shift,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        activation="relu",
    )


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
    kernel_sizes = _positive_ints(kernel_sizes, "kernel_sizes", where)
    dilations = _positive_ints(dilations, "dilations", where)
    strides = (1,) * len(kernel_sizes) if strides is None else strides
    strides = _positive_ints(strides, "strides", where)
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
    rates = _positive_ints(rates, "rates", "check_gridding", allow_empty=False)
    if not _is_int(kernel_size):
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
