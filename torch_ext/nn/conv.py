"""Dilated (atrous) convolution modules, DeepLabv3's ASPP, and receptive-field arithmetic.

The public face of ``torch_ext.nn``'s convolution modules; each concern lives in a private module
of its own: ``_dilated_conv`` (``DilatedConv2d``), ``_aspp`` (``ASPP``, ``ASPPPooling``),
``_folding`` (the BatchNorm folding of ASPP's inference), ``_receptive_field``
(``receptive_field``, ``check_gridding``) and ``_args`` (the argument checks they share).
"""

from __future__ import annotations

from torch_ext.nn._aspp import ASPP, ASPPPooling  # noqa: F401  (ASPPPooling: unlisted, as before)
from torch_ext.nn._dilated_conv import DilatedConv2d
from torch_ext.nn._receptive_field import check_gridding, receptive_field

__all__ = ["ASPP", "DilatedConv2d", "check_gridding", "receptive_field"]
