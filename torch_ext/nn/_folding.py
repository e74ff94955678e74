"""BatchNorm folding: a DilatedConv2d -> BatchNorm2d (eval) -> ReLU block as one convolution."""

from __future__ import annotations

import sys

import torch
from torch import nn

from torch_ext.nn._dilated_conv import DilatedConv2d

__all__ = ["conv_bn_relu"]


def _is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a DTensor (without importing torch.distributed.tensor: no DTensor
    exists before something else has imported it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def conv_bn_relu(block: nn.Sequential, input: torch.Tensor) -> torch.Tensor:
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
