"""DeepLabv3's atrous spatial pyramid pooling: ``ASPP`` and its image-pooling branch."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torch_ext.nn._args import is_int, positive_ints
from torch_ext.nn._dilated_conv import DilatedConv2d
from torch_ext.nn._folding import conv_bn_relu

__all__ = ["ASPP", "ASPPPooling"]


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
            if not is_int(value):
                raise TypeError(
                    f"ASPP: {name} must be an int >= 1, got {type(value).__name__} {value!r}"
                )
            if value < 1:
                raise ValueError(f"ASPP: {name} must be an int >= 1, got {value}")
        rates = positive_ints(rates, "rates", "ASPP", allow_empty=False)
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
        branches = [conv_bn_relu(branch, input) for branch in self.convs[:-1]]
        merged = torch.cat([*branches, self.convs[-1](input)], dim=1)
        return self.project[3](conv_bn_relu(self.project, merged))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, rates={self.rates}"
        )
