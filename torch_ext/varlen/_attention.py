"""Attention over packed sequences: flash-attention's varlen kernel where it applies, else
``F.scaled_dot_product_attention`` per sequence; and the checks of ``cu_seqlens``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention"]


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
