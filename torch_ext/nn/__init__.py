"""Modules built on torch_ext's ops."""

from torch_ext.nn.conv import ASPP, DilatedConv2d, check_gridding, receptive_field
from torch_ext.nn.spp import SPPF, SpatialPyramidPooling

__all__ = [
    "ASPP",
    "SPPF",
    "DilatedConv2d",
    "SpatialPyramidPooling",
    "check_gridding",
    "receptive_field",
]
