"""Typed wrappers of the varlen ops that remove and restore padding.

``unpad_input`` / ``pad_input`` / ``index_first_axis`` / ``index_put_first_axis`` follow
flash-attention 2.7's ``bert_padding`` contract; ``cu_seqlens_from_position_ids`` reads packed
rows. The ops are C++ (CPU and CUDA).
"""

from __future__ import annotations

import torch

from torch_ext._args import int_arg, optional_int_arg

__all__ = [
    "cu_seqlens_from_position_ids",
    "index_first_axis",
    "index_put_first_axis",
    "pad_input",
    "unpad_input",
]

_ops = torch.ops.torch_ext


def unpad_input(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    total_tokens: int | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Removes padding: ``(hidden_unpad, indices, cu_seqlens, max_seqlen, seqused)``.

    Args:
        hidden: ``[B, S, ...]`` (any trailing dimensions, or none).
        attention_mask: ``[B, S]``, bool or 0/1 integers (nonzero marks a real token); left
            padding, right padding and holes all work.
        total_tokens: the number of real tokens, when the caller knows it (e.g. from the data
            loader): then no device-to-host transfer happens on CUDA (otherwise exactly one:
            the token count and the longest row together). It must be right; the CPU kernel
            checks it, the CUDA kernel cannot without a transfer.
        max_seqlen: a bound on the longest row to report; by default the exact longest row,
            or ``S`` when ``total_tokens`` is given.

    Returns:
        ``hidden_unpad [nnz, ...]`` (the real tokens in row-major order), ``indices`` int64
        ``[nnz]`` (their flat positions ``b * S + s``), ``cu_seqlens`` int32 ``[B + 1]``,
        ``max_seqlen`` (int), ``seqused`` int32 ``[B]`` (tokens per row); a fully padded row
        repeats its ``cu_seqlens`` entry. Differentiable with respect to ``hidden``.
    """
    total_tokens = optional_int_arg("unpad_input", "total_tokens", total_tokens)
    max_seqlen = optional_int_arg("unpad_input", "max_seqlen", max_seqlen)
    return _ops.unpad_input(hidden, attention_mask, total_tokens, max_seqlen)


def pad_input(
    hidden_unpad: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int
) -> torch.Tensor:
    """Puts tokens back: ``[nnz, ...]`` -> ``[batch, seqlen, ...]``, zeros at padded slots."""
    batch = int_arg("pad_input", "batch", batch)
    seqlen = int_arg("pad_input", "seqlen", seqlen)
    return _ops.pad_input(hidden_unpad, indices, batch, seqlen)


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``input[indices]`` along the first axis; the backward scatters into zeros."""
    return _ops.index_first_axis(input, indices)


def index_put_first_axis(
    values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int
) -> torch.Tensor:
    """``zeros([first_axis_dim, ...])`` with rows ``indices`` set to ``values`` (unique
    indices); the backward gathers."""
    first_axis_dim = int_arg("index_put_first_axis", "first_axis_dim", first_axis_dim)
    return _ops.index_put_first_axis(values, indices, first_axis_dim)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32, max_seqlen)`` of packed rows whose positions restart at 0.

    A sequence starts at every position id equal to 0 and at the start of every row;
    ``cu_seqlens`` indexes the flattened ``[rows * seqlen]`` tokens. Computed by a kernel of
    our own (a cumsum-and-pad formulation is what Inductor has miscompiled).
    """
    return _ops.cu_seqlens_from_position_ids(position_ids)
