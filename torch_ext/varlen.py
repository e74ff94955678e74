"""Variable-length sequences: remove padding once, run every layer on real tokens, pad back.

``unpad_input`` / ``pad_input`` / ``index_first_axis`` / ``index_put_first_axis`` follow
flash-attention 2.7's ``bert_padding`` contract; ``cu_seqlens_from_position_ids`` reads packed
rows; ``plan_packing`` and ``PackingCollator`` build packed batches; ``attention`` runs
attention over packed sequences without attending across them.

The ops are C++ (CPU and CUDA); the fake kernels of the two whose output size depends on the
data are registered here, so ``torch.compile(fullgraph=True, dynamic=True)`` traces
unpad -> layers -> pad without a graph break.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from torch_ext._args import int_arg, optional_int_arg

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

_ops = torch.ops.torch_ext


# ---------------------------------------------------------------------------------------------
# Fake kernels of the data-dependent ops


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


# ---------------------------------------------------------------------------------------------
# Unpad and pad


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


def plan_packing(
    lengths: torch.Tensor | Sequence[int],
    capacity: int,
    strategy: str = "ffd",
    truncate: bool = False,
) -> torch.Tensor:
    """Assigns sequences to packs of at most ``capacity`` tokens; returns int64 pack indices.

    ``strategy``: ``"ffd"`` (first-fit-decreasing: each sequence, longest first, goes into the
    lowest-numbered pack with room) or ``"bfd"`` (best-fit-decreasing: into the pack with the
    least room that still fits). Packs are numbered in the order they are opened. A sequence
    longer than ``capacity`` raises, unless ``truncate`` (then it counts as ``capacity``
    tokens). O(n log n): a million sequences plan in well under a second.
    """
    if not isinstance(lengths, torch.Tensor):
        values = list(lengths)
        for i, value in enumerate(values):
            try:
                if isinstance(value, bool):
                    raise TypeError
                values[i] = operator.index(value)  # ints, numpy integers, 0-d integer tensors
            except TypeError:
                raise TypeError(
                    f"plan_packing(): lengths must be integers, got {value!r} at position {i}"
                ) from None
        lengths = torch.tensor(values, dtype=torch.long)
    capacity = int_arg("plan_packing", "capacity", capacity)
    return _ops.plan_packing(lengths.cpu(), capacity, strategy, truncate)


# ---------------------------------------------------------------------------------------------
# Packing collator


class PackingCollator:
    """Packs tokenized examples into rows of ``capacity`` tokens (a ``DataLoader`` collate_fn).

    Each example is a mapping with ``"input_ids"`` (list of ints or 1-D tensor) and optionally
    ``"labels"``. Examples are assigned to rows by :func:`plan_packing`; a row holds whole
    sequences one after another and is padded at its end. Everything is computed on the CPU, in
    the data-loader worker.

    Returns a dict of tensors ``[P, capacity]``: ``input_ids``, ``labels`` (-100 at each
    sequence's first token, which must not be predicted from the sequence before it, and on
    padding), ``position_ids`` (restarting at 0 for every sequence; a row's padding tail is a
    segment of its own), ``attention_mask`` (1 real, 0 padding); plus ``cu_seqlens`` int32 over
    the flattened ``[P * capacity]`` tokens (every segment, padding tails included) and
    ``max_seqlen`` (int).
    """

    def __init__(self, capacity: int, pad_token_id: int = 0, strategy: str = "ffd") -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"PackingCollator: capacity must be an int >= 1, got {capacity!r}")
        if strategy not in ("ffd", "bfd"):
            raise ValueError(f"PackingCollator: strategy must be 'ffd' or 'bfd', got {strategy!r}")
        self.capacity = capacity
        self.pad_token_id = pad_token_id
        self.strategy = strategy

    def __call__(self, examples: Sequence[Mapping]) -> dict:
        ids = [
            torch.as_tensor(example["input_ids"], dtype=torch.long).flatten()
            for example in examples
        ]
        labels = [
            torch.as_tensor(example["labels"], dtype=torch.long).flatten()
            if "labels" in example
            else ids[i]
            for i, example in enumerate(examples)
        ]
        for i, (seq, lab) in enumerate(zip(ids, labels, strict=True)):
            if seq.numel() > self.capacity:
                raise ValueError(
                    f"PackingCollator: example {i} has {seq.numel()} tokens, more than "
                    f"capacity={self.capacity}"
                )
            if lab.shape != seq.shape:
                raise ValueError(
                    f"PackingCollator: example {i}'s labels {tuple(lab.shape)} must match its "
                    f"input_ids {tuple(seq.shape)}"
                )
        lengths = torch.tensor([seq.numel() for seq in ids], dtype=torch.long)
        packs = plan_packing(lengths, self.capacity, self.strategy).tolist()
        rows = max(packs, default=-1) + 1
        members: list[list[int]] = [[] for _ in range(rows)]
        for example, pack in enumerate(packs):
            members[pack].append(example)
        shape = (rows, self.capacity)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        out_labels = torch.full(shape, -100, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        starts: list[int] = []
        for row, examples_in_row in enumerate(members):
            offset = 0
            for example in examples_in_row:
                n = ids[example].numel()
                if n == 0:
                    continue
                starts.append(row * self.capacity + offset)
                input_ids[row, offset : offset + n] = ids[example]
                out_labels[row, offset : offset + n] = labels[example]
                out_labels[row, offset] = -100
                position_ids[row, offset : offset + n] = torch.arange(n)
                attention_mask[row, offset : offset + n] = 1
                offset += n
            if offset < self.capacity:  # the padding tail: a segment of its own
                starts.append(row * self.capacity + offset)
                position_ids[row, offset:] = torch.arange(self.capacity - offset)
        bounds = torch.tensor(starts + [rows * self.capacity], dtype=torch.int32)
        max_seqlen = int((bounds[1:] - bounds[:-1]).max()) if len(starts) else 0
        return {
            "input_ids": input_ids,
            "labels": out_labels,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "cu_seqlens": bounds,
            "max_seqlen": max_seqlen,
        }


# ---------------------------------------------------------------------------------------------
# Attention over packed sequences


def _check_attention_args(q, k, v, cu_seqlens) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            "attention(): q, k, v must be [tokens, heads, head_dim], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            "attention(): k and v must be [tokens, kv_heads, head_dim] matching q's tokens and "
            f"head_dim, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"attention(): q's {q.shape[1]} heads must be a multiple of k/v's {k.shape[1]}"
        )
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            "attention(): cu_seqlens must be a 1-D int32 tensor of at least one entry, got "
            f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(
            f"attention(): cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}"
        )


def _cu_seqlens_valid(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """A 0-d bool tensor on cu_seqlens' device: starts at >= 0, never decreases, ends <= tokens."""
    steps = cu_seqlens[1:] >= cu_seqlens[:-1]
    return steps.all() & (cu_seqlens[0] >= 0) & (cu_seqlens[-1] <= tokens)


def _check_bounds(bounds: list[int], tokens: int, max_seqlen: int) -> None:
    if bounds[0] < 0 or bounds[-1] > tokens or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            "attention(): cu_seqlens must start at >= 0, never decrease and end at <= the "
            f"{tokens} tokens of q, got {bounds}"
        )
    longest = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
    if max_seqlen < longest:
        raise ValueError(
            f"attention(): max_seqlen={max_seqlen} is below the longest sequence of cu_seqlens "
            f"({longest} tokens)"
        )


def _flash_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    """PyTorch's own flash-attention varlen kernel (CUDA, float16/bfloat16), or None."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from flash_attn import flash_attn_varlen_func  # the peer library, when installed
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            causal=causal,
            softmax_scale=scale,
        )
    if k.shape[1] != q.shape[1]:  # aten's kernel wants equal heads: expand k/v (GQA)
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    try:
        out = torch.ops.aten._flash_attention_forward(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            0.0,
            causal,
            False,
            scale=scale,
        )
    except (RuntimeError, NotImplementedError):
        return None  # not built with flash attention, or an unsupported head size
    return out[0]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed sequences: tokens of sequence ``i`` (``cu_seqlens[i]`` to
    ``cu_seqlens[i + 1]``) attend only to tokens of the same sequence.

    ``q [T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` (grouped-query);
    returns ``[T, Hq, D]``. On CUDA with float16/bfloat16: flash-attention's varlen kernel
    (the ``flash_attn`` package when installed, else PyTorch's own); otherwise
    ``F.scaled_dot_product_attention`` per sequence (correct on every device and dtype).
    """
    _check_attention_args(q, k, v, cu_seqlens)
    if q.device.type == "cuda":  # checked on the device, without a transfer to the host
        torch._assert_async(
            _cu_seqlens_valid(cu_seqlens, q.shape[0]),
            "attention(): cu_seqlens must start at >= 0, never decrease and end at <= q's tokens",
        )
    fast = _flash_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    if fast is not None:
        return fast
    bounds = cu_seqlens.tolist()
    _check_bounds(bounds, q.shape[0], max_seqlen)

    def attend(qs, ks, vs, begin, end):
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)

    return _per_sequence(q, k, v, bounds, attend)


def _per_sequence(q, k, v, bounds: list[int], attend) -> torch.Tensor:
    """``[T, Hq, D]``: ``attend(qs, ks, vs, begin, end)`` on every sequence ``[begin, end)`` of
    ``bounds`` (cu_seqlens as a list), given ``[heads, length, D]`` slices with k/v heads repeated
    to q's (grouped-query); zeros for tokens outside every sequence."""
    groups = q.shape[1] // k.shape[1]
    outputs = [q.new_zeros(bounds[0], *q.shape[1:])]
    for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= begin:
            continue
        qs, ks, vs = (t[begin:end].transpose(0, 1) for t in (q, k, v))
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        outputs.append(attend(qs, ks, vs, begin, end).transpose(0, 1))
    outputs.append(q.new_zeros(q.shape[0] - bounds[-1], *q.shape[1:]))
    return torch.cat(outputs, 0)
