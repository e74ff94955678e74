"""Fake kernels of the varlen ops whose output size depends on the data.

``torch_ext::_unpad_plan`` (behind ``unpad_input``) and ``torch_ext::cu_seqlens_from_position_ids``
return tensors whose length only the data tells; their fake kernels give those lengths as
unbacked sizes, so ``torch.compile(fullgraph=True, dynamic=True)`` traces
unpad -> layers -> pad without a graph break. Importing this module registers them.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("torch_ext::_unpad_plan")
def _unpad_plan_fake(attention_mask, total_tokens=None, max_seqlen=None):
    torch._check(attention_mask.dim() == 2, lambda: "attention_mask must be 2-D [batch, seqlen]")
    batch, seqlen = attention_mask.shape
    if total_tokens is not None:
        torch._check(
            0 <= total_tokens <= min(batch * seqlen, 2**31 - 1),
            lambda: f"unpad_input(): total_tokens must be in [0, min(batch * seqlen, 2^31 - 1)], "
            f"got {total_tokens}",
        )
    if max_seqlen is not None:
        torch._check(
            0 <= max_seqlen <= seqlen,
            lambda: f"unpad_input(): max_seqlen must be in [0, seqlen = {seqlen}], got {max_seqlen}",
        )
    ctx = torch.library.get_ctx()
    nnz = total_tokens if total_tokens is not None else ctx.new_dynamic_size()
    if max_seqlen is not None:
        longest = max_seqlen
    elif total_tokens is not None:
        longest = seqlen
    else:
        longest = ctx.new_dynamic_size()
    indices = attention_mask.new_empty(nnz, dtype=torch.long)
    cu_seqlens = attention_mask.new_empty(batch + 1, dtype=torch.int32)
    seqused = attention_mask.new_empty(batch, dtype=torch.int32)
    return indices, cu_seqlens, longest, seqused


# cu_seqlens has at least one entry. Before torch 2.13, Inductor fails to lower a slice of a
# tensor whose unbacked length carries that lower bound (LoweringException: KeyError
# 'unbacked_bindings' on cu_seqlens[1:] - cu_seqlens[:-1]), so the bound is stated from 2.13 on.
_ENTRIES_BOUND = {"min": 1} if torch.__version__ >= (2, 13) else {}


@torch.library.register_fake("torch_ext::cu_seqlens_from_position_ids")
def _cu_seqlens_from_position_ids_fake(position_ids):
    torch._check(position_ids.dim() == 2, lambda: "position_ids must be 2-D [rows, seqlen]")
    torch._check(
        position_ids.shape[0] * position_ids.shape[1] <= 2**31 - 1,
        lambda: "cu_seqlens_from_position_ids(): more tokens than int32 cu_seqlens can index "
        "(2^31 - 1)",
    )
    ctx = torch.library.get_ctx()
    entries = ctx.new_dynamic_size(**_ENTRIES_BOUND)  # sequences + 1
    return position_ids.new_empty(entries, dtype=torch.int32), ctx.new_dynamic_size()
