"""``DilatedConv2d``: a drop-in ``nn.Conv2d`` computed by ``torch_ext.dilated_conv2d``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from torch_ext.nn._args import check_activation

__all__ = ["DilatedConv2d"]


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
        activation = check_activation(activation, "DilatedConv2d")
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
        activation = check_activation(activation, "DilatedConv2d.from_conv")
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
