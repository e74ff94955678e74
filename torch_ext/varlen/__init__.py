"""Variable-length sequences: remove padding once, run every layer on real tokens, pad back.

``unpad_input`` / ``pad_input`` / ``index_first_axis`` / ``index_put_first_axis`` follow
flash-attention 2.7's ``bert_padding`` contract; ``cu_seqlens_from_position_ids`` reads packed
rows; ``plan_packing`` and ``PackingCollator`` build packed batches; ``attention`` runs
attention over packed sequences without attending across them.

The ops are C++ (CPU and CUDA); the fake kernels of the two whose output size depends on the
data are registered on importing this package, so ``torch.compile(fullgraph=True,
dynamic=True)`` traces unpad -> layers -> pad without a graph break.

This package is the public face; each concern lives in a private module of its own:
``_fake`` (the fake kernels), ``_padding`` (the unpad / pad wrappers), ``_packing``
(``plan_packing``, ``PackingCollator``) and ``_attention`` (``attention``).
"""

from __future__ import annotations

from torch_ext.varlen import _fake  # noqa: F401  (registers the fake kernels)
from torch_ext.varlen._attention import attention
from torch_ext.varlen._packing import PackingCollator, plan_packing
from torch_ext.varlen._padding import (
    cu_seqlens_from_position_ids,
    index_first_axis,
    index_put_first_axis,
    pad_input,
    unpad_input,
)

__all__ = [
    "PackingCollator",
    "attention",
    "cu_seqlens_from_position_ids",
    "index_first_axis",
    "index_put_first_axis",
    "pad_input",
    "plan_packing",
    "unpad_input",
]
