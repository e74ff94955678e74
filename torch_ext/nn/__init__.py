"""Modules built on torch_ext's ops."""

from torch_ext.nn.spp import SPPF, SpatialPyramidPooling

__all__ = ["SPPF", "SpatialPyramidPooling"]
