"""torch_ext.varlen (unpad / pad, the index ops, packing, varlen attention) against independent
references.

* unpad_input: flash-attention 2.7's ``bert_padding.unpad_input`` contract, written here with
  Python loops over the mask (flat positions b * S + s of the real tokens in row-major order,
  int32 cu_seqlens = [0, running count per row], the longest row, int32 tokens per row) on right
  padding, left padding, holes, fully padded rows, all padding, no padding, B = 1, S = 1, empty
  batches, 0 / 1 / 2 trailing dims, non-contiguous (transposed, sliced, expanded) hidden states
  and masks, bool and integer masks (any nonzero value is a real token), the float types and
  int64 hidden states, inputs large enough for the threaded paths; the total_tokens path (and
  its check on the CPU) against the default one; the round trip pad_input(unpad_input(x)) ==
  x masked.
* index_first_axis / index_put_first_axis / pad_input: against plain indexing and zeros + index
  assignment, unsorted indices, empty indices, many rows; exact gradients (each one's backward
  is the other), exactly zero gradient at the padded slots; gradcheck and gradgradcheck in
  float64.
* cu_seqlens_from_position_ids: against a loop that starts a sequence at every 0 and at every
  row start; empty and non-contiguous position ids.
* plan_packing: exact assignments against a pure-Python first-fit-decreasing and
  best-fit-decreasing (stable sort by length, ties by index; FFD: lowest-numbered pack with
  room; BFD: least room left that still fits, ties to the lowest number); truncation; a million
  random lengths (capacity, pack numbering, the any-fit property).
* PackingCollator: every example exactly once, contiguous, in the pack the plan gives it; labels
  (-100 at each sequence's first token and the padding), position ids, attention mask, and
  cu_seqlens / max_seqlen equal to what cu_seqlens_from_position_ids makes of the position ids.
* attention: a per-sequence explicit softmax in float64 (checked against
  F.scaled_dot_product_attention), causal and not, GQA, empty sequences, custom scale, outputs
  and the gradients of q, k and v, gradcheck, no attention across sequences, the half types.
* opcheck on every op (each test utility its own case); torch.compile(fullgraph=True,
  dynamic=True) of unpad -> Linear + GELU -> pad with and without total_tokens (outputs and
  gradients against eager), of cu_seqlens_from_position_ids and of the data-dependent
  max_seqlen; a CUDA check that the total_tokens path never synchronizes; every bad argument
  naming the argument, on the CPU, CUDA and the Meta / fake kernels.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from dtype_tables import HALVES

import torch_ext
from torch_ext import varlen

ops = torch.ops.torch_ext

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64]
OPCHECK_UTILS = [
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
]


def dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- references


def unpad_reference(hidden, mask):
    """flash-attention's unpad_input, with loops: (hidden_unpad, indices, cu_seqlens,
    max_seqlen, seqused) on the CPU."""
    batch, seqlen = mask.shape
    rows = mask.cpu().tolist()
    indices = [b * seqlen + s for b in range(batch) for s in range(seqlen) if rows[b][s] != 0]
    seqlens = [sum(1 for m in row if m != 0) for row in rows]
    cu = [0]
    for n in seqlens:
        cu.append(cu[-1] + n)
    indices = torch.tensor(indices, dtype=torch.int64)
    flat = hidden.detach().cpu().reshape(batch * seqlen, *hidden.shape[2:])
    return (
        flat[indices],
        indices,
        torch.tensor(cu, dtype=torch.int32),
        max(seqlens, default=0),
        torch.tensor(seqlens, dtype=torch.int32),
    )


def masked_reference(hidden, mask):
    """hidden with the padded slots zeroed: what pad_input(unpad_input(hidden)) gives back."""
    keep = (mask.cpu() != 0).reshape(*mask.shape, *([1] * (hidden.dim() - 2)))
    return torch.where(keep, hidden.detach().cpu(), torch.zeros((), dtype=hidden.dtype))


def cu_seqlens_reference(position_ids):
    """A sequence starts at every 0 and at the start of every row; (cu_seqlens, max_seqlen)."""
    rows, seqlen = position_ids.shape
    flat = position_ids.cpu().reshape(-1).tolist()
    starts = [t for t in range(rows * seqlen) if flat[t] == 0 or t % seqlen == 0]
    cu = [*starts, rows * seqlen]
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    return torch.tensor(cu, dtype=torch.int32), max(lengths, default=0)


def plan_reference(lengths, capacity, strategy, truncate=False):
    """First-fit-decreasing / best-fit-decreasing, O(n * packs): the pack of every sequence."""
    lengths = [min(n, capacity) if truncate else n for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    room: list[int] = []
    packs = [-1] * len(lengths)
    for i in order:
        need = lengths[i]
        chosen = None
        for p, left in enumerate(room):
            if left < need:
                continue
            if strategy == "ffd":
                chosen = p
                break
            if chosen is None or left < room[chosen]:  # "bfd": strictly less keeps the lowest
                chosen = p
        if chosen is None:
            room.append(capacity)
            chosen = len(room) - 1
        room[chosen] -= need
        packs[i] = chosen
    return packs


def attention_reference(q, k, v, cu_seqlens, causal=True, scale=None):
    """Every sequence on its own, explicit softmax (in the dtype of q: pass float64)."""
    total, heads_q, dim = q.shape
    group = heads_q // k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    cu = [int(c) for c in cu_seqlens]
    pieces = []
    for start, end in zip(cu[:-1], cu[1:], strict=True):
        n = end - start
        if n == 0:
            continue
        qi = q[start:end].transpose(0, 1)  # [Hq, n, D]
        ki = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vi = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qi @ ki.transpose(1, 2)) * scale
        if causal:
            future = torch.ones(n, n, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        pieces.append((weights @ vi).transpose(0, 1))
    return torch.cat(pieces) if pieces else q.new_zeros((0, heads_q, dim))


# ---------------------------------------------------------------- inputs

MASK_KINDS = ["right", "left", "holes", "padded-rows", "all-padded", "no-padding"]


def make_mask(kind, batch, seqlen, gen):
    """A bool [batch, seqlen] mask; right / left padding have a full row first and an empty row
    last (batch >= 3)."""
    lengths = torch.randint(0, seqlen + 1, (batch,), generator=gen)
    if batch >= 3:
        lengths[0], lengths[-1] = seqlen, 0
    positions = torch.arange(seqlen)
    if kind == "right":
        return positions < lengths[:, None]
    if kind == "left":
        return positions >= (seqlen - lengths)[:, None]
    if kind == "holes":
        return torch.rand((batch, seqlen), generator=gen) < 0.6
    if kind == "padded-rows":  # holes, and every other row entirely padding
        mask = torch.rand((batch, seqlen), generator=gen) < 0.7
        mask[1::2] = False
        return mask
    if kind == "all-padded":
        return torch.zeros((batch, seqlen), dtype=torch.bool)
    if kind == "no-padding":
        return torch.ones((batch, seqlen), dtype=torch.bool)
    raise ValueError(kind)


def draw(shape, gen, dtype=torch.float64):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


HIDDEN_LAYOUTS = ["contiguous", "transposed", "sliced", "trailing-transposed", "expanded"]


def make_hidden(batch, seqlen, trailing, layout, gen, *, dtype=torch.float64, device="cpu"):
    """hidden [batch, seqlen, *trailing] in `layout`: "transposed" (batch and seqlen swapped),
    "sliced" (every other position of a longer sequence, a window of the last dim),
    "trailing-transposed" (the last two dims swapped) or "expanded" (stride 0 over seqlen)."""
    shape = (batch, seqlen, *trailing)
    if layout == "contiguous":
        hidden = draw(shape, gen, dtype).to(device)
    elif layout == "transposed":
        hidden = draw((seqlen, batch, *trailing), gen, dtype).to(device).transpose(0, 1)
    elif layout == "sliced":
        wider = (*trailing[:-1], trailing[-1] + 3) if trailing else ()
        base = draw((batch, 2 * seqlen, *wider), gen, dtype).to(device)[:, ::2]
        hidden = base[..., 1 : trailing[-1] + 1] if trailing else base
    elif layout == "trailing-transposed":
        swapped = (*trailing[:-2], trailing[-1], trailing[-2])
        hidden = draw((batch, seqlen, *swapped), gen, dtype).to(device).transpose(-1, -2)
    elif layout == "expanded":
        hidden = draw((batch, 1, *trailing), gen, dtype).to(device).expand(shape)
    else:
        raise ValueError(layout)
    assert hidden.shape == shape
    return hidden


def unique_indices(count, size, gen, device="cpu"):
    """`count` distinct indices in [0, size), in random (unsorted) order."""
    return torch.randperm(size, generator=gen)[:count].to(device)


def check_unpad(result, hidden, mask, *, max_seqlen=None, what=""):
    """The five outputs of unpad_input against unpad_reference (exact: it only moves values)."""
    hidden_unpad, indices, cu_seqlens, got_max, seqused = result
    ref_hidden, ref_indices, ref_cu, ref_max, ref_seqused = unpad_reference(hidden, mask)
    where = f"{what} mask {tuple(mask.shape)} {mask.dtype} hidden {tuple(hidden.shape)}"
    assert indices.dtype == torch.int64, where
    assert cu_seqlens.dtype == torch.int32 and seqused.dtype == torch.int32, where
    assert hidden_unpad.dtype == hidden.dtype, where
    for t in (hidden_unpad, indices, cu_seqlens, seqused):
        assert t.device == hidden.device, where
    assert torch.equal(indices.cpu(), ref_indices), f"{where}: indices"
    assert torch.equal(cu_seqlens.cpu(), ref_cu), f"{where}: cu_seqlens"
    assert torch.equal(seqused.cpu(), ref_seqused), f"{where}: seqused"
    assert hidden_unpad.shape == ref_hidden.shape, where
    assert torch.equal(hidden_unpad.detach().cpu(), ref_hidden), f"{where}: hidden_unpad"
    assert type(got_max) is int, f"{where}: max_seqlen is a {type(got_max)}"
    expected_max = ref_max if max_seqlen is None else max_seqlen
    assert got_max == expected_max, f"{where}: max_seqlen {got_max} != {expected_max}"


# ---------------------------------------------------------------- the package


def test_exports():
    for name in (
        "unpad_input",
        "pad_input",
        "index_first_axis",
        "index_put_first_axis",
        "cu_seqlens_from_position_ids",
        "plan_packing",
        "PackingCollator",
        "attention",
    ):
        assert name in varlen.__all__, name
    for name in ("unpad_input", "pad_input", "index_first_axis", "index_put_first_axis"):
        assert getattr(torch_ext, name) is getattr(varlen, name), name


# ---------------------------------------------------------------- unpad_input / pad_input

SHAPES = [(3, 7), (1, 5), (4, 1), (1, 1), (5, 16)]
TRAILING = [(), (4,), (2, 3)]


@pytest.mark.parametrize("trailing", TRAILING, ids=["rank0", "rank1", "rank2"])
@pytest.mark.parametrize("batch,seqlen", SHAPES, ids=[f"B{b}S{s}" for b, s in SHAPES])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_unpad_matches_reference(device, kind, batch, seqlen, trailing, gen):
    mask = make_mask(kind, batch, seqlen, gen).to(device)
    hidden = make_hidden(batch, seqlen, trailing, "contiguous", gen, device=device)
    check_unpad(varlen.unpad_input(hidden, mask), hidden, mask, what=kind)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=dtype_id)
def test_unpad_mask_and_hidden_dtypes(device, mask_dtype, dtype, gen):
    mask = make_mask("holes", 4, 9, gen).to(device=device, dtype=mask_dtype)
    hidden = make_hidden(4, 9, (3,), "contiguous", gen, dtype=dtype, device=device)
    check_unpad(varlen.unpad_input(hidden, mask), hidden, mask)


@pytest.mark.parametrize(
    "mask_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64], ids=dtype_id
)
def test_integer_masks_any_nonzero_is_a_real_token(device, mask_dtype, gen):
    """attention_mask values other than 0 / 1 (2, 7, 255 or -1) all mark real tokens."""
    values = torch.tensor([0, 1, 2, 7, 255] if mask_dtype == torch.uint8 else [0, 1, 2, -1, 7])
    mask = values[torch.randint(0, 5, (3, 8), generator=gen)].to(device=device, dtype=mask_dtype)
    hidden = make_hidden(3, 8, (2,), "contiguous", gen, device=device)
    check_unpad(varlen.unpad_input(hidden, mask), hidden, mask)


@pytest.mark.parametrize("layout", HIDDEN_LAYOUTS)
@pytest.mark.parametrize("trailing", [(), (5,), (3, 4)], ids=["rank0", "rank1", "rank2"])
def test_unpad_non_contiguous(device, layout, trailing, gen):
    if layout == "trailing-transposed" and len(trailing) < 2:
        pytest.skip("needs two trailing dims")
    hidden = make_hidden(4, 6, trailing, layout, gen, device=device)
    mask = make_mask("holes", 4, 6, gen).to(device)
    check_unpad(varlen.unpad_input(hidden, mask), hidden, mask, what=layout)
    hidden_unpad, indices, *_ = varlen.unpad_input(hidden, mask)
    restored = varlen.pad_input(hidden_unpad, indices, 4, 6)
    assert torch.equal(restored.cpu(), masked_reference(hidden, mask)), layout


def unpad_indices(mask):
    """The reference indices of `mask`, on its device."""
    return unpad_reference(mask, mask)[1].to(mask.device)


@pytest.mark.parametrize("mask_layout", ["transposed", "sliced"])
def test_unpad_non_contiguous_mask(device, mask_layout, gen):
    if mask_layout == "transposed":
        mask = make_mask("holes", 7, 5, gen).to(device).t()
    else:
        mask = make_mask("holes", 5, 15, gen).to(device=device, dtype=torch.int32)[:, 1::2]
    assert not mask.is_contiguous()
    hidden = make_hidden(5, 7, (3,), "contiguous", gen, device=device)
    check_unpad(varlen.unpad_input(hidden, mask), hidden, mask, what=mask_layout)


@pytest.mark.parametrize(
    "dtype,width", [(torch.float32, 1030), (torch.bfloat16, 1024)], ids=["f32-4120B", "bf16-2KiB"]
)
def test_unpad_pad_wide_rows(device, dtype, width, gen):
    """Rows of at least 128 copy units (8-byte units of a 4120-byte row, 16-byte units of a
    2 KiB one): the CUDA row copies take a block per row."""
    batch, seqlen = 6, 33
    mask = make_mask("holes", batch, seqlen, gen).to(device)
    hidden = make_hidden(batch, seqlen, (width,), "contiguous", gen, dtype=dtype, device=device)
    result = varlen.unpad_input(hidden, mask)
    check_unpad(result, hidden, mask, what=str(dtype))
    restored = varlen.pad_input(result[0], result[1], batch, seqlen)
    assert torch.equal(restored.cpu(), masked_reference(hidden, mask))


@pytest.mark.parametrize("kind", ["right", "left", "holes", "padded-rows"])
def test_unpad_large(device, kind, gen):
    """Enough rows (67 x 300, 20,100 slots) for the kernels to split the work over threads."""
    batch, seqlen = 67, 300
    mask = make_mask(kind, batch, seqlen, gen).to(device=device, dtype=torch.int32)
    hidden = make_hidden(batch, seqlen, (4,), "contiguous", gen, dtype=torch.float32, device=device)
    result = varlen.unpad_input(hidden, mask)
    check_unpad(result, hidden, mask, what=kind)
    restored = varlen.pad_input(result[0], result[1], batch, seqlen)
    assert torch.equal(restored.cpu(), masked_reference(hidden, mask)), kind
    fast = varlen.unpad_input(hidden, mask, int(mask.count_nonzero()))
    check_unpad(fast, hidden, mask, max_seqlen=seqlen, what=kind)


def test_unpad_integer_hidden(device, gen):
    """Token ids [B, S] (int64, no trailing dims) unpad like hidden states."""
    input_ids = torch.randint(0, 50000, (3, 10), generator=gen).to(device)
    mask = make_mask("right", 3, 10, gen).to(device)
    check_unpad(varlen.unpad_input(input_ids, mask), input_ids, mask)
    restored = varlen.pad_input(varlen.unpad_input(input_ids, mask)[0], unpad_indices(mask), 3, 10)
    assert torch.equal(restored.cpu(), masked_reference(input_ids, mask))


@pytest.mark.parametrize("batch,seqlen", [(0, 5), (3, 0), (0, 0)])
def test_unpad_empty(device, batch, seqlen, gen):
    """No tokens at all: nnz 0, cu_seqlens all zeros (B + 1 of them), max_seqlen 0."""
    mask = torch.ones((batch, seqlen), dtype=torch.bool, device=device)
    hidden = draw((batch, seqlen, 3), gen).to(device)
    result = varlen.unpad_input(hidden, mask)
    check_unpad(result, hidden, mask)
    assert result[0].shape == (0, 3)
    assert varlen.pad_input(result[0], result[1], batch, seqlen).shape == (batch, seqlen, 3)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_round_trip(device, kind, dtype, gen):
    """pad_input(unpad_input(x)) is x with zeros at the padded slots."""
    mask = make_mask(kind, 5, 8, gen).to(device)
    hidden = make_hidden(5, 8, (2, 3), "contiguous", gen, dtype=dtype, device=device)
    hidden_unpad, indices, *_ = varlen.unpad_input(hidden, mask)
    restored = varlen.pad_input(hidden_unpad, indices, 5, 8)
    assert restored.dtype == dtype and restored.device == hidden.device
    assert torch.equal(restored.cpu(), masked_reference(hidden, mask)), kind


@pytest.mark.parametrize("trailing", [(), (3,), (2, 2)], ids=["rank0", "rank1", "rank2"])
def test_pad_input_unsorted_indices(device, trailing, gen):
    """pad_input puts row i of hidden_unpad at flat position indices[i], whatever the order."""
    batch, seqlen, nnz = 3, 5, 9
    indices = unique_indices(nnz, batch * seqlen, gen, device)
    values = draw((nnz, *trailing), gen).to(device)
    expected = torch.zeros((batch * seqlen, *trailing), dtype=torch.float64)
    expected[indices.cpu()] = values.cpu()
    got = varlen.pad_input(values, indices, batch, seqlen)
    assert torch.equal(got.cpu(), expected.reshape(batch, seqlen, *trailing))


@pytest.mark.parametrize("kind", ["right", "left", "holes", "padded-rows", "all-padded"])
def test_total_tokens_path(device, kind, gen):
    """With total_tokens the outputs are the same, max_seqlen is S, or max_seqlen if given."""
    batch, seqlen = 4, 9
    mask = make_mask(kind, batch, seqlen, gen).to(device)
    hidden = make_hidden(batch, seqlen, (3,), "contiguous", gen, device=device)
    total = int(mask.count_nonzero())
    default = varlen.unpad_input(hidden, mask)
    fast = varlen.unpad_input(hidden, mask, total_tokens=total)
    check_unpad(fast, hidden, mask, max_seqlen=seqlen, what=kind)
    for a, b in zip(default[:3] + default[4:], fast[:3] + fast[4:], strict=True):
        assert torch.equal(a, b), kind
    # A bound given is reported as given (it must hold: the CPU kernel checks that it does).
    longest = int(mask.sum(1).max())
    given = varlen.unpad_input(hidden, mask, total_tokens=total, max_seqlen=longest)
    check_unpad(given, hidden, mask, max_seqlen=longest, what=kind)
    loose = min(longest + 1, seqlen)
    by_position = varlen.unpad_input(hidden, mask, total, loose)
    check_unpad(by_position, hidden, mask, max_seqlen=loose, what=kind)
    restored = varlen.pad_input(fast[0], fast[1], batch, seqlen)
    assert torch.equal(restored.cpu(), masked_reference(hidden, mask)), kind


@pytest.mark.parametrize("wrong", [-1, 1, 1000])
def test_wrong_total_tokens_is_caught_on_cpu(wrong, gen):
    mask = make_mask("holes", 3, 6, gen)
    hidden = draw((3, 6, 2), gen)
    total = int(mask.count_nonzero())
    assert total > 0
    with pytest.raises(RuntimeError, match="total_tokens"):
        varlen.unpad_input(hidden, mask, total_tokens=total + wrong)
    with pytest.raises(RuntimeError, match="total_tokens"):
        ops._unpad_plan(mask, total + wrong)


def test_unpad_plan_op(device, gen):
    """The raw _unpad_plan op: the index half of unpad_input."""
    mask = make_mask("holes", 4, 7, gen).to(device)
    _, ref_indices, ref_cu, ref_max, ref_seqused = unpad_reference(mask, mask)
    for args, expected_max in [((mask,), ref_max), ((mask, int(mask.sum())), 7)]:
        indices, cu, max_seqlen, seqused = ops._unpad_plan(*args)
        assert torch.equal(indices.cpu(), ref_indices)
        assert torch.equal(cu.cpu(), ref_cu) and cu.dtype == torch.int32
        assert torch.equal(seqused.cpu(), ref_seqused) and seqused.dtype == torch.int32
        assert max_seqlen == expected_max


# ---------------------------------------------------------------- index_first_axis / put

INDEX_DTYPES = [*FLOAT_DTYPES, torch.int64]


@pytest.mark.parametrize("dtype", INDEX_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("trailing", [(), (5,), (2, 3)], ids=["rank0", "rank1", "rank2"])
@pytest.mark.parametrize("count", [0, 1, 7, 12])
def test_index_first_axis(device, count, trailing, dtype, gen):
    x = draw((12, *trailing), gen).mul(100).to(dtype).to(device)
    indices = unique_indices(count, 12, gen, device)
    got = varlen.index_first_axis(x, indices)
    assert got.shape == (count, *trailing) and got.dtype == dtype
    assert torch.equal(got.cpu(), x.cpu()[indices.cpu()])


@pytest.mark.parametrize("dtype", INDEX_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("trailing", [(), (5,), (2, 3)], ids=["rank0", "rank1", "rank2"])
@pytest.mark.parametrize("count", [0, 1, 7, 12])
def test_index_put_first_axis(device, count, trailing, dtype, gen):
    values = draw((count, *trailing), gen).mul(100).to(dtype).to(device)
    indices = unique_indices(count, 12, gen, device)
    expected = torch.zeros((12, *trailing), dtype=dtype)
    expected[indices.cpu()] = values.cpu()
    got = varlen.index_put_first_axis(values, indices, 12)
    assert got.shape == (12, *trailing) and got.dtype == dtype
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("trailing", [(), (3,), (300,)], ids=["rank0", "rank1", "wide"])
def test_index_ops_large(device, trailing, gen):
    """Many rows (and wide rows): the threaded copies."""
    rows = 20000 if trailing != (300,) else 1000
    x = draw((rows, *trailing), gen, torch.float32).to(device)
    indices = unique_indices(rows * 3 // 4, rows, gen, device)
    assert torch.equal(varlen.index_first_axis(x, indices).cpu(), x.cpu()[indices.cpu()])
    values = x[: indices.numel()]
    expected = torch.zeros_like(x.cpu())
    expected[indices.cpu()] = values.cpu()
    assert torch.equal(varlen.index_put_first_axis(values, indices, rows).cpu(), expected)


def test_index_ops_non_contiguous(device, gen):
    base = draw((10, 4, 6), gen).to(device)
    indices = unique_indices(6, 10, gen, device)
    for x in (base.transpose(1, 2), base[:, ::2, 1:5], base[:, :1].expand(10, 3, 6)):
        assert torch.equal(varlen.index_first_axis(x, indices).cpu(), x.cpu()[indices.cpu()])
        values = x[:6]
        expected = torch.zeros(x.shape, dtype=x.dtype)
        expected[indices.cpu()] = values.cpu()
        assert torch.equal(varlen.index_put_first_axis(values, indices, 10).cpu(), expected)
    strided = torch.arange(20, device=device)[::2]  # non-contiguous indices
    x = draw((20, 3), gen).to(device)
    assert torch.equal(varlen.index_first_axis(x, strided).cpu(), x.cpu()[strided.cpu()])


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_index_ops_gradients_are_exact(device, dtype, gen):
    """Each backward is the other op: scattered / gathered gradients, zero elsewhere."""
    x = draw((9, 2, 3), gen, dtype).to(device).requires_grad_()
    indices = unique_indices(5, 9, gen, device)
    grad = draw((5, 2, 3), gen, dtype).to(device)
    varlen.index_first_axis(x, indices).backward(grad)
    expected = torch.zeros((9, 2, 3), dtype=dtype)
    expected[indices.cpu()] = grad.cpu()
    assert torch.equal(x.grad.cpu(), expected)

    values = draw((5, 2, 3), gen, dtype).to(device).requires_grad_()
    grad = draw((9, 2, 3), gen, dtype).to(device)
    varlen.index_put_first_axis(values, indices, 9).backward(grad)
    assert torch.equal(values.grad.cpu(), grad.cpu()[indices.cpu()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("kind", ["right", "left", "holes", "padded-rows", "all-padded"])
def test_padded_slots_get_zero_gradient(device, kind, dtype, gen):
    batch, seqlen = 4, 7
    mask = make_mask(kind, batch, seqlen, gen).to(device)
    grad = make_hidden(batch, seqlen, (3,), "contiguous", gen, dtype=dtype, device=device)

    hidden = make_hidden(batch, seqlen, (3,), "contiguous", gen, dtype=dtype, device=device)
    hidden.requires_grad_()
    hidden_unpad, indices, *_ = varlen.unpad_input(hidden, mask)
    varlen.pad_input(hidden_unpad * 1, indices, batch, seqlen).backward(grad)
    assert torch.equal(hidden.grad.cpu(), masked_reference(grad, mask)), kind

    # unpad alone: the gradient of hidden_unpad lands on the real slots, zero elsewhere
    hidden.grad = None
    hidden_unpad, indices, *_ = varlen.unpad_input(hidden, mask)
    grad_unpad = grad.reshape(batch * seqlen, 3)[indices]
    hidden_unpad.backward(grad_unpad)
    assert torch.equal(hidden.grad.cpu(), masked_reference(grad, mask)), kind

    # pad alone: hidden_unpad's gradient is the padded gradient gathered at the real slots
    leaf = hidden_unpad.detach().requires_grad_()
    varlen.pad_input(leaf, indices, batch, seqlen).backward(grad)
    assert torch.equal(leaf.grad.cpu(), grad.reshape(-1, 3).cpu()[indices.cpu()]), kind


@pytest.mark.parametrize("trailing", [(), (3,), (2, 2)], ids=["rank0", "rank1", "rank2"])
def test_gradcheck_unpad_pad(device, trailing, gen):
    mask = make_mask("holes", 3, 5, gen).to(device)
    mask[1] = False  # a fully padded row
    hidden = make_hidden(3, 5, trailing, "contiguous", gen, device=device).requires_grad_()
    indices = unpad_indices(mask)

    def round_trip(x):
        h, idx, *_ = varlen.unpad_input(x, mask)
        return varlen.pad_input(h * h, idx, 3, 5)

    assert torch.autograd.gradcheck(round_trip, (hidden,))
    assert torch.autograd.gradgradcheck(round_trip, (hidden,))
    assert torch.autograd.gradcheck(lambda x: varlen.unpad_input(x, mask)[0], (hidden,))
    assert torch.autograd.gradcheck(
        lambda x: varlen.unpad_input(x, mask, int(mask.sum()))[0], (hidden,)
    )
    values = draw((indices.numel(), *trailing), gen).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: varlen.pad_input(v, indices, 3, 5), (values,))


def test_gradcheck_index_ops(device, gen):
    x = draw((8, 3), gen).to(device).requires_grad_()
    values = draw((5, 3), gen).to(device).requires_grad_()
    indices = unique_indices(5, 8, gen, device)
    gather = lambda x: varlen.index_first_axis(x, indices)
    scatter = lambda v: varlen.index_put_first_axis(v, indices, 8)
    assert torch.autograd.gradcheck(gather, (x,))
    assert torch.autograd.gradgradcheck(gather, (x,))
    assert torch.autograd.gradcheck(scatter, (values,))
    assert torch.autograd.gradgradcheck(scatter, (values,))


# ---------------------------------------------------------------- opcheck


def opcheck_cases(device, gen):
    """(id, op, args) of every op; float64 inputs that require grad, data on `device`."""
    mask = make_mask("holes", 3, 6, gen).to(device)
    mask[2] = False
    hidden = draw((3, 6, 4), gen).to(device).requires_grad_()
    total = int(mask.count_nonzero())
    indices = unpad_indices(mask)
    values = draw((total, 4), gen).to(device).requires_grad_()
    x = draw((18, 4), gen).to(device).requires_grad_()
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]], device=device)
    return [
        ("index_first_axis", ops.index_first_axis.default, (x, indices)),
        ("index_put_first_axis", ops.index_put_first_axis.default, (values, indices, 18)),
        ("unpad_plan", ops._unpad_plan.default, (mask,)),
        ("unpad_plan-total", ops._unpad_plan.default, (mask, total)),
        ("unpad_plan-total-max", ops._unpad_plan.default, (mask, total, 6)),
        ("unpad_input", ops.unpad_input.default, (hidden, mask)),
        ("unpad_input-total", ops.unpad_input.default, (hidden, mask, total)),
        ("pad_input", ops.pad_input.default, (values, indices, 3, 6)),
        ("cu_seqlens", ops.cu_seqlens_from_position_ids.default, (position_ids,)),
        (
            "plan_packing",
            ops.plan_packing.default,
            (torch.tensor([5, 3, 8, 1, 4]), 8, "bfd", False),
        ),
    ]


OPCHECK_IDS = [
    "index_first_axis",
    "index_put_first_axis",
    "unpad_plan",
    "unpad_plan-total",
    "unpad_plan-total-max",
    "unpad_input",
    "unpad_input-total",
    "pad_input",
    "cu_seqlens",
    "plan_packing",
]


@pytest.mark.parametrize("test_util", OPCHECK_UTILS)
@pytest.mark.parametrize("case", OPCHECK_IDS)
def test_opcheck(device, case, test_util, gen):
    if case == "plan_packing" and device != "cpu":
        pytest.skip("plan_packing runs on the CPU")
    _, op, args = next(c for c in opcheck_cases(device, gen) if c[0] == case)
    torch.library.opcheck(op, args, test_utils=test_util)


# ---------------------------------------------------------------- torch.compile


def unpad_layer_pad(hidden, mask, weight, bias, total_tokens=None):
    """unpad -> Linear + GELU on [nnz, H] -> pad; also returns cu_seqlens."""
    batch, seqlen = mask.shape
    hidden_unpad, indices, cu_seqlens, _, _ = varlen.unpad_input(hidden, mask, total_tokens)
    out = F.gelu(F.linear(hidden_unpad, weight, bias))
    return varlen.pad_input(out, indices, batch, seqlen), cu_seqlens


@pytest.mark.parametrize(
    "backend,with_total",
    [("aot_eager", False), ("aot_eager", True), ("inductor", False), ("inductor", True)],
)
def test_compile(device, backend, with_total, gen):
    torch._dynamo.reset()
    compiled = torch.compile(unpad_layer_pad, backend=backend, fullgraph=True, dynamic=True)
    weight = draw((6, 5), gen, torch.float32).mul(0.4).to(device)
    bias = draw((6,), gen, torch.float32).to(device)
    for (batch, seqlen), kind in [((3, 7), "holes"), ((4, 9), "right"), ((2, 5), "padded-rows")]:
        mask = make_mask(kind, batch, seqlen, gen).to(device)
        hidden = draw((batch, seqlen, 5), gen, torch.float32).to(device)
        total = int(mask.count_nonzero()) if with_total else None
        runs = []
        for fn in (compiled, unpad_layer_pad):
            leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
            out, cu_seqlens = fn(leaves[0], mask, leaves[1], leaves[2], total)
            out.backward(torch.ones_like(out) + out.detach())
            runs.append((out, cu_seqlens, [leaf.grad for leaf in leaves]))
        (out, cu, grads), (eager_out, eager_cu, eager_grads) = runs
        where = f"{backend} total={with_total} {kind} {(batch, seqlen)}"
        assert int(cu[0]) == 0, where
        assert cu.dtype == torch.int32, where
        assert torch.equal(cu.cpu(), unpad_reference(mask, mask)[2]), where
        assert torch.equal(cu, eager_cu), where
        torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5, msg=where)
        padded = ~mask.cpu()
        assert (out.detach().cpu()[padded] == 0).all(), where
        for name, got, expected in zip(
            ("hidden", "weight", "bias"), grads, eager_grads, strict=True
        ):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{where} {name}")
        assert (grads[0].cpu()[padded] == 0).all(), where


def packed_layer(hidden, position_ids, weight):
    """cu_seqlens from position ids, a layer, and an allocation sized by max_seqlen."""
    cu_seqlens, max_seqlen = varlen.cu_seqlens_from_position_ids(position_ids)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return F.gelu(hidden @ weight), lengths, hidden.new_zeros(max_seqlen) + 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_position_ids(device, backend, gen):
    torch._dynamo.reset()
    compiled = torch.compile(packed_layer, backend=backend, fullgraph=True, dynamic=True)
    weight = draw((4, 4), gen, torch.float32).to(device)
    for rows in ([[0, 1, 2, 0, 1, 0]], [[0, 1, 0, 1, 2, 3, 4], [5, 0, 1, 2, 0, 0, 1]]):
        position_ids = torch.tensor(rows, device=device)
        hidden = draw((*position_ids.shape, 4), gen, torch.float32).to(device)
        got = compiled(hidden, position_ids, weight)
        expected = packed_layer(hidden, position_ids, weight)
        ref_cu, ref_max = cu_seqlens_reference(position_ids)
        torch.testing.assert_close(got[0], expected[0])
        assert torch.equal(got[1].cpu(), (ref_cu[1:] - ref_cu[:-1]).to(got[1].dtype)), rows
        assert got[2].shape == (ref_max,), rows


def unpad_max_seqlen(hidden, mask, total_tokens=None, max_seqlen=None):
    """unpad, returning max_seqlen (a data-dependent int without total_tokens)."""
    hidden_unpad, _, cu_seqlens, longest, seqused = varlen.unpad_input(
        hidden, mask, total_tokens, max_seqlen
    )
    return hidden_unpad * 2, cu_seqlens, longest, seqused


@pytest.mark.parametrize("with_total,with_max", [(False, False), (True, False), (True, True)])
def test_compile_returns_max_seqlen(device, with_total, with_max, gen):
    torch._dynamo.reset()
    compiled = torch.compile(unpad_max_seqlen, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch, seqlen in [(3, 7), (4, 10)]:
        mask = make_mask("holes", batch, seqlen, gen).to(device)
        hidden = draw((batch, seqlen, 3), gen, torch.float32).to(device)
        total = int(mask.count_nonzero()) if with_total else None
        bound = seqlen - 1 if with_max else None
        got = compiled(hidden, mask, total, bound)
        expected = unpad_max_seqlen(hidden, mask, total, bound)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert torch.equal(got[3], expected[3])
        assert int(got[2]) == expected[2], (with_total, with_max, batch, seqlen)


# ---------------------------------------------------------------- CUDA: no sync


@CUDA_SKIP
def test_total_tokens_path_does_not_synchronize(gen):
    """With total_tokens, unpad -> pad (and their backward) never waits for the GPU."""
    batch, seqlen = 4, 33
    mask_cpu = make_mask("holes", batch, seqlen, gen)
    total = int(mask_cpu.count_nonzero())
    mask = mask_cpu.cuda()
    hidden = draw((batch, seqlen, 8), gen, torch.float32).cuda().requires_grad_()
    grad = draw((batch, seqlen, 8), gen, torch.float32).cuda()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hidden_unpad, indices, cu_seqlens, max_seqlen, seqused = varlen.unpad_input(
            hidden, mask, total_tokens=total
        )
        out = varlen.pad_input(hidden_unpad * 2, indices, batch, seqlen)
        out.backward(grad)
        again = varlen.unpad_input(hidden.detach(), mask, total_tokens=total, max_seqlen=20)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert max_seqlen == seqlen and again[3] == 20
    check_unpad(
        (hidden_unpad, indices, cu_seqlens, max_seqlen, seqused), hidden, mask, max_seqlen=seqlen
    )
    assert torch.equal(out.detach().cpu(), 2 * masked_reference(hidden, mask))
    assert torch.equal(hidden.grad.cpu(), 2 * masked_reference(grad, mask))


# ---------------------------------------------------------------- cu_seqlens_from_position_ids

POSITION_CASES = {
    "one-packed-row": [[0, 1, 2, 0, 1, 0, 1, 2, 3]],
    "rows": [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 0, 1]],
    "row-continues": [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]],
    "single-tokens": [[0, 0, 0, 0, 0]],
    "one-sequence": [[0, 1, 2, 3, 4, 5, 6]],
    "seqlen-1": [[0], [0], [3]],
    "ends-with-0": [[0, 1, 2, 0], [0, 1, 0, 0]],
}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=dtype_id)
@pytest.mark.parametrize("case", list(POSITION_CASES))
def test_cu_seqlens_from_position_ids(device, case, dtype):
    position_ids = torch.tensor(POSITION_CASES[case], dtype=dtype, device=device)
    cu_seqlens, max_seqlen = varlen.cu_seqlens_from_position_ids(position_ids)
    ref_cu, ref_max = cu_seqlens_reference(position_ids)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.device == position_ids.device
    assert torch.equal(cu_seqlens.cpu(), ref_cu), case
    assert type(max_seqlen) is int and max_seqlen == ref_max, case


def test_cu_seqlens_from_random_packed_rows(device, gen):
    """Rows made of random sequences, each row cut at random (sequences continue across rows)."""
    lengths = torch.randint(1, 12, (40,), generator=gen).tolist()
    flat = torch.cat([torch.arange(n) for n in lengths])
    for rows in (1, 2, 5):
        seqlen = flat.numel() // rows
        position_ids = flat[: rows * seqlen].reshape(rows, seqlen).to(device)
        cu_seqlens, max_seqlen = varlen.cu_seqlens_from_position_ids(position_ids)
        ref_cu, ref_max = cu_seqlens_reference(position_ids)
        assert torch.equal(cu_seqlens.cpu(), ref_cu) and max_seqlen == ref_max, rows
    transposed = flat[:60].reshape(6, 10).t().contiguous().t()  # non-contiguous [6, 10]
    cu_seqlens, max_seqlen = varlen.cu_seqlens_from_position_ids(transposed.to(device))
    ref_cu, ref_max = cu_seqlens_reference(transposed)
    assert torch.equal(cu_seqlens.cpu(), ref_cu) and max_seqlen == ref_max


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0)])
def test_cu_seqlens_from_empty_position_ids(device, shape):
    """No tokens: cu_seqlens = [0], max_seqlen 0."""
    position_ids = torch.zeros(shape, dtype=torch.int64, device=device)
    cu_seqlens, max_seqlen = varlen.cu_seqlens_from_position_ids(position_ids)
    assert cu_seqlens.tolist() == [0] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 0


# ---------------------------------------------------------------- plan_packing


def test_plan_reference_by_hand():
    """The reference itself on a case worked by hand, where FFD and BFD differ: sorted
    8, 7, 5, 4, 1 into packs of 10; FFD puts the 1 into pack 0 (2 left), BFD into pack 2
    (1 left)."""
    lengths = [5, 8, 1, 7, 4]
    assert plan_reference(lengths, 10, "ffd") == [2, 0, 0, 1, 2]
    assert plan_reference(lengths, 10, "bfd") == [2, 0, 2, 1, 2]
    for strategy in ("ffd", "bfd"):
        got = varlen.plan_packing(torch.tensor(lengths), 10, strategy)
        assert got.dtype == torch.int64
        assert got.tolist() == plan_reference(lengths, 10, strategy), strategy


def random_lengths(case, gen):
    """(lengths, capacity) for the named random case."""
    n = int(torch.randint(1, 300, (), generator=gen))
    capacity = int(torch.randint(1, 80, (), generator=gen))
    if case == "uniform":
        return torch.randint(1, capacity + 1, (n,), generator=gen), capacity
    if case == "small":  # many sequences per pack
        return torch.randint(1, max(2, capacity // 6), (n,), generator=gen), capacity
    if case == "ties":  # few distinct lengths
        choices = torch.tensor([capacity, max(1, capacity // 2), max(1, capacity // 3), 1])
        return choices[torch.randint(0, 4, (n,), generator=gen)], capacity
    if case == "with-zeros":
        return torch.randint(0, capacity + 1, (n,), generator=gen), capacity
    if case == "large":
        return torch.randint(1, 400, (2000,), generator=gen), 512
    raise ValueError(case)


@pytest.mark.parametrize("strategy", ["ffd", "bfd"])
@pytest.mark.parametrize("case", ["uniform", "small", "ties", "with-zeros", "large"])
def test_plan_packing_matches_reference(case, strategy, gen):
    for _ in range(1 if case == "large" else 8):
        lengths, capacity = random_lengths(case, gen)
        got = varlen.plan_packing(lengths, capacity, strategy)
        assert got.dtype == torch.int64 and got.shape == lengths.shape
        expected = plan_reference(lengths.tolist(), capacity, strategy)
        assert got.tolist() == expected, f"{case} capacity={capacity} lengths={lengths.tolist()}"


@pytest.mark.parametrize("strategy", ["ffd", "bfd"])
def test_plan_packing_length_types(strategy, gen):
    lengths = torch.randint(1, 20, (30,), generator=gen)
    expected = plan_reference(lengths.tolist(), 24, strategy)
    for given in (lengths, lengths.to(torch.int32), lengths.tolist()):
        assert varlen.plan_packing(given, 24, strategy).tolist() == expected
    strided = torch.stack([lengths, lengths], 1)[:, 0]  # non-contiguous
    assert varlen.plan_packing(strided, 24, strategy).tolist() == expected
    assert varlen.plan_packing(lengths, 24, strategy=strategy).tolist() == expected
    assert varlen.plan_packing(torch.tensor([], dtype=torch.int64), 5, strategy).numel() == 0
    assert varlen.plan_packing([], 5, strategy).numel() == 0


def test_plan_packing_default_is_ffd(gen):
    lengths = torch.tensor([5, 8, 1, 7, 4])
    assert varlen.plan_packing(lengths, 10).tolist() == plan_reference(lengths.tolist(), 10, "ffd")


@pytest.mark.parametrize("strategy", ["ffd", "bfd"])
def test_plan_packing_truncate(strategy, gen):
    lengths = torch.randint(1, 60, (50,), generator=gen)
    capacity = 32
    assert int(lengths.max()) > capacity
    with pytest.raises((ValueError, RuntimeError), match="capacity"):
        varlen.plan_packing(lengths, capacity, strategy)
    got = varlen.plan_packing(lengths, capacity, strategy, truncate=True)
    assert got.tolist() == plan_reference(lengths.tolist(), capacity, strategy, truncate=True)
    got = varlen.plan_packing(lengths.tolist(), capacity, strategy, True)
    assert got.tolist() == plan_reference(lengths.tolist(), capacity, strategy, truncate=True)


@pytest.mark.parametrize("strategy", ["ffd", "bfd"])
def test_plan_packing_a_million_sequences(strategy):
    """1,000,000 random lengths (about 125,000 packs): every pack used and within capacity,
    packs numbered in the order they open, and at most one pack at most half full (true of
    any fit-decreasing plan). A quadratic planner would take hours here; a good one well under
    a second."""
    gen = torch.Generator().manual_seed(7)
    capacity = 8192
    lengths = torch.randint(1, 2049, (1_000_000,), generator=gen)
    packs = varlen.plan_packing(lengths, capacity, strategy)
    assert packs.dtype == torch.int64 and packs.shape == lengths.shape
    assert int(packs.min()) == 0
    count = int(packs.max()) + 1
    assert (torch.bincount(packs, minlength=count) > 0).all()
    load = torch.zeros(count, dtype=torch.int64).index_add_(0, packs, lengths)
    assert int(load.max()) <= capacity
    assert count >= math.ceil(int(lengths.sum()) / capacity)
    assert int((2 * load <= capacity).sum()) <= 1
    order = torch.sort(-lengths, stable=True).indices
    opened = packs[order]
    running = torch.cummax(opened, 0).values
    assert int(opened[0]) == 0
    assert (opened[1:] <= running[:-1] + 1).all(), "packs not numbered in the order they open"


# ---------------------------------------------------------------- PackingCollator


def make_examples(gen, count, capacity, *, labels_every=3):
    """Examples with random token ids; input_ids alternate list / tensor, every labels_every-th
    has labels (alternating list / tensor)."""
    examples = []
    for i in range(count):
        n = int(torch.randint(1, capacity + 1, (), generator=gen))
        ids = torch.randint(1, 1000, (n,), generator=gen)
        example = {"input_ids": ids if i % 2 else ids.tolist()}
        if i % labels_every == 0:
            labels = torch.randint(0, 1000, (n,), generator=gen)
            example["labels"] = labels.tolist() if i % 2 else labels
        examples.append(example)
    return examples


def as_list(values):
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def check_batch(batch, examples, capacity, pad_token_id, strategy):
    lengths = [len(as_list(e["input_ids"])) for e in examples]
    plan = plan_reference(lengths, capacity, strategy)
    packs = max(plan) + 1
    for key in ("input_ids", "labels", "position_ids", "attention_mask"):
        assert batch[key].shape == (packs, capacity), key
        assert not batch[key].is_floating_point(), key
    assert batch["input_ids"].dtype == torch.int64
    assert batch["cu_seqlens"].dtype == torch.int32
    input_ids = batch["input_ids"].tolist()
    labels = batch["labels"].tolist()
    positions = batch["position_ids"].tolist()
    attention_mask = batch["attention_mask"].tolist()

    # The expected contents of every pack: (input_ids, labels) of its examples, any order.
    wanted = [Counter() for _ in range(packs)]
    for example, pack in zip(examples, plan, strict=True):
        ids = as_list(example["input_ids"])
        target = as_list(example.get("labels", ids))
        wanted[pack][(tuple(ids), tuple([-100, *target[1:]]))] += 1

    for p in range(packs):
        found = Counter()
        real = sum(lengths[i] for i in range(len(examples)) if plan[i] == p)
        assert attention_mask[p] == [1] * real + [0] * (capacity - real), f"pack {p}: mask"
        # real tokens first: segments restart at position 0
        start = 0
        while start < real:
            end = start + 1
            while end < real and positions[p][end] != 0:
                end += 1
            assert positions[p][start:end] == list(range(end - start)), f"pack {p}: positions"
            found[(tuple(input_ids[p][start:end]), tuple(labels[p][start:end]))] += 1
            start = end
        assert found == wanted[p], f"pack {p}: sequences"
        tail = capacity - real
        assert input_ids[p][real:] == [pad_token_id] * tail, f"pack {p}: padding ids"
        assert labels[p][real:] == [-100] * tail, f"pack {p}: padding labels"
        assert positions[p][real:] == list(range(tail)), f"pack {p}: padding positions"

    ref_cu, ref_max = cu_seqlens_reference(batch["position_ids"])
    assert torch.equal(batch["cu_seqlens"].cpu(), ref_cu)
    assert int(batch["cu_seqlens"][-1]) == packs * capacity
    assert type(batch["max_seqlen"]) is int and batch["max_seqlen"] == ref_max


@pytest.mark.parametrize("strategy", ["ffd", "bfd"])
@pytest.mark.parametrize("capacity,count", [(16, 20), (64, 37), (5, 9), (128, 1)])
def test_packing_collator(capacity, count, strategy, gen):
    examples = make_examples(gen, count, capacity)
    collator = varlen.PackingCollator(capacity, strategy=strategy)
    check_batch(collator(examples), examples, capacity, 0, strategy)


def test_packing_collator_pad_token_and_full_packs(gen):
    """A pad_token_id; packs filled exactly have no padding segment."""
    examples = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [1, 2]}, {"input_ids": [3, 4]}]
    examples += [{"input_ids": [9, 9, 9], "labels": [1, 2, 3]}]
    collator = varlen.PackingCollator(4, pad_token_id=7)
    batch = collator(examples)
    check_batch(batch, examples, 4, 7, "ffd")
    # packs: [5 6 7 8] | [9 9 9] pad | [1 2] [3 4] (in either order)
    assert batch["cu_seqlens"].tolist() == [0, 4, 7, 8, 10, 12]
    assert batch["max_seqlen"] == 4
    assert batch["input_ids"][1, 3] == 7
    assert varlen.PackingCollator(4)(examples)["input_ids"][1, 3] == 0


def test_packing_collator_rejects_long_examples():
    collator = varlen.PackingCollator(4)
    with pytest.raises((ValueError, RuntimeError), match="capacity"):
        collator([{"input_ids": [1, 2]}, {"input_ids": [1, 2, 3, 4, 5]}])


# ---------------------------------------------------------------- attention

ATTENTION_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=2e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def make_attention(seqlens, heads_q, heads_kv, dim, gen, *, dtype=torch.float64, device="cpu"):
    """(q, k, v, cu_seqlens int32, max_seqlen): sequences of `seqlens` (zeros allowed)."""
    cu = [0]
    for n in seqlens:
        cu.append(cu[-1] + n)
    total = cu[-1]
    q, k, v = (draw((total, h, dim), gen, dtype).to(device) for h in (heads_q, heads_kv, heads_kv))
    return q, k, v, torch.tensor(cu, dtype=torch.int32, device=device), max(seqlens, default=0)


def check_attention(q, k, v, cu_seqlens, max_seqlen, gen, *, causal, scale=None, what=""):
    """Output and the gradients of q, k and v against attention_reference in float64."""
    dtype = q.dtype
    tol = ATTENTION_TOL[dtype]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = varlen.attention(*leaves, cu_seqlens, max_seqlen, causal=causal, scale=scale)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_leaves, cu_seqlens.cpu(), causal=causal, scale=scale)
    where = f"{what} causal={causal} scale={scale} {dtype_id(dtype)} cu={cu_seqlens.tolist()}"
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device, where
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **tol, msg=where)
    grad = draw(out.shape, gen, dtype).to(q.device)
    out.backward(grad)
    ref.backward(grad.cpu().double())
    for name, leaf, ref_leaf in zip("qkv", leaves, ref_leaves, strict=True):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, f"{where} grad {name}"
        got = leaf.grad.cpu().double()
        torch.testing.assert_close(got, ref_leaf.grad, **tol, msg=f"{where} grad {name}")


def test_attention_reference_matches_sdpa(gen):
    q, k, v, cu, _ = make_attention([5, 0, 3, 7], 4, 2, 6, gen)
    for causal in (False, True):
        ref = attention_reference(q, k, v, cu, causal=causal, scale=0.3)
        for i in range(len(cu) - 1):
            a, b = int(cu[i]), int(cu[i + 1])
            if a == b:
                continue
            qi, ki, vi = (t[a:b].transpose(0, 1) for t in (q, k, v))
            sdpa = F.scaled_dot_product_attention(
                qi, ki, vi, is_causal=causal, scale=0.3, enable_gqa=True
            )
            torch.testing.assert_close(ref[a:b], sdpa.transpose(0, 1), rtol=1e-12, atol=1e-12)


ATTENTION_CASES = [
    ("one", [6], 2, 2, 8),
    ("mha", [3, 5, 1, 4], 2, 2, 8),
    ("gqa", [4, 0, 7, 2, 0], 4, 2, 5),
    ("mqa", [0, 3, 9, 0], 3, 1, 4),
    ("long", [70, 1, 130], 4, 1, 64),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "seqlens,heads_q,heads_kv,dim",
    [c[1:] for c in ATTENTION_CASES],
    ids=[c[0] for c in ATTENTION_CASES],
)
def test_attention(device, seqlens, heads_q, heads_kv, dim, causal, dtype, gen):
    inputs = make_attention(seqlens, heads_q, heads_kv, dim, gen, dtype=dtype, device=device)
    check_attention(*inputs, gen, causal=causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_scale_and_loose_max_seqlen(device, causal, gen):
    """A custom scale; max_seqlen larger than the longest sequence changes nothing."""
    q, k, v, cu, max_seqlen = make_attention([3, 6, 0, 2], 4, 2, 8, gen, device=device)
    check_attention(q, k, v, cu, max_seqlen, gen, causal=causal, scale=0.2)
    exact = varlen.attention(q, k, v, cu, max_seqlen, causal=causal)
    loose = varlen.attention(q, k, v, cu, max_seqlen + 9, causal=causal)
    torch.testing.assert_close(loose, exact, rtol=1e-12, atol=1e-12)
    default = varlen.attention(q, k, v, cu, max_seqlen, causal=causal, scale=8**-0.5)
    torch.testing.assert_close(default, exact, rtol=1e-12, atol=1e-12)


def test_attention_default_is_causal(device, gen):
    q, k, v, cu, max_seqlen = make_attention([4, 5], 2, 1, 4, gen, device=device)
    assert torch.equal(
        varlen.attention(q, k, v, cu, max_seqlen),
        varlen.attention(q, k, v, cu, max_seqlen, causal=True),
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_stays_within_sequences(device, causal, gen):
    """Changing one sequence's q, k, v leaves every other sequence's output exactly as is."""
    q, k, v, cu, max_seqlen = make_attention([4, 6, 3], 2, 2, 8, gen, device=device)
    before = varlen.attention(q, k, v, cu, max_seqlen, causal=causal)
    a, b = int(cu[1]), int(cu[2])
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[a:b] = draw(t[a:b].shape, gen).to(device) * 5
    after = varlen.attention(q2, k2, v2, cu, max_seqlen, causal=causal)
    assert torch.equal(after[:a], before[:a]) and torch.equal(after[b:], before[b:])
    assert not torch.equal(after[a:b], before[a:b])


@pytest.mark.parametrize("dtype", HALVES, ids=dtype_id)
def test_attention_half_types(device, dtype, gen):
    inputs = make_attention([5, 0, 9, 3], 4, 2, 16, gen, dtype=dtype, device=device)
    check_attention(*inputs, gen, causal=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_gradcheck(device, causal, gen):
    q, k, v, cu, max_seqlen = make_attention([3, 0, 2, 1], 2, 1, 3, gen, device=device)
    fn = lambda q, k, v: varlen.attention(q, k, v, cu, max_seqlen, causal=causal)
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, k, v)))


# ---------------------------------------------------------------- bad arguments


def bad_calls(device):
    """(id, call, match): each must raise, naming the argument."""
    x = torch.ones(3, 5, 2, device=device)
    mask = torch.ones(3, 5, dtype=torch.bool, device=device)
    indices = torch.tensor([0, 2, 4], device=device)
    q = torch.ones(6, 2, 4, device=device)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    return [
        ("mask-batch", lambda: varlen.unpad_input(x, mask[:2]), "attention_mask"),
        ("mask-seqlen", lambda: varlen.unpad_input(x, mask[:, :4]), "attention_mask"),
        ("mask-3d", lambda: varlen.unpad_input(x, mask[..., None]), "attention_mask"),
        ("mask-1d", lambda: varlen.unpad_input(x, mask[0]), "attention_mask"),
        ("mask-float", lambda: varlen.unpad_input(x, mask.float()), "attention_mask"),
        ("plan-mask-1d", lambda: ops._unpad_plan(mask[0]), "attention_mask"),
        ("hidden-1d", lambda: varlen.unpad_input(x[0, :, 0], mask[:1]), "hidden"),
        ("hidden-0d", lambda: varlen.unpad_input(x[0, 0, 0], mask[:1, :1]), "hidden"),
        ("gather-int32", lambda: varlen.index_first_axis(x, indices.int()), "indices"),
        ("gather-2d", lambda: varlen.index_first_axis(x, indices[None]), "indices"),
        ("scatter-int32", lambda: varlen.index_put_first_axis(x, indices.int(), 9), "indices"),
        ("pad-int32", lambda: varlen.pad_input(x, indices.int(), 3, 5), "indices"),
        ("gather-0d", lambda: varlen.index_first_axis(x[0, 0, 0], indices), "input"),
        ("scatter-count", lambda: varlen.index_put_first_axis(x, indices[:2], 9), "indices"),
        ("scatter-dim", lambda: varlen.index_put_first_axis(x, indices, -1), "first_axis_dim"),
        ("pad-count", lambda: varlen.pad_input(x[0], indices[:2], 3, 5), "indices"),
        (
            "attention-cu-int64",
            lambda: varlen.attention(q, q, q, cu.long(), 4),
            "cu_seqlens",  # a Python-level check: ValueError
        ),
        (
            "attention-heads",
            lambda: varlen.attention(q, torch.ones(6, 3, 4, device=device), q, cu, 4),
            "head",
        ),
        ("unpad-max-seqlen-negative", lambda: varlen.unpad_input(x, mask, max_seqlen=-5), "max_seqlen"),
        ("unpad-max-seqlen-past-seqlen", lambda: varlen.unpad_input(x, mask, max_seqlen=6), "max_seqlen"),
        ("unpad-total-negative", lambda: varlen.unpad_input(x, mask, total_tokens=-1), "total_tokens"),
        ("unpad-total-past-slots", lambda: varlen.unpad_input(x, mask, total_tokens=16), "total_tokens"),
        ("attention-cu-empty", lambda: varlen.attention(q, q, q, cu[:0], 4), "cu_seqlens"),
        (
            "position-ids-past-int32",
            lambda: varlen.cu_seqlens_from_position_ids(
                torch.zeros(1, 1, dtype=torch.long, device=device).expand(1, 2**31)
            ),
            "2\\^31 - 1",
        ),
        ("position-ids-1d", lambda: varlen.cu_seqlens_from_position_ids(cu.long()), "position_ids"),
        (
            "position-ids-3d",
            lambda: varlen.cu_seqlens_from_position_ids(torch.zeros(1, 2, 3, device=device)),
            "position_ids",
        ),
    ]


BAD_IDS = [case[0] for case in bad_calls("cpu")]


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_arguments_name_the_argument(device, case):
    _, call, match = next(c for c in bad_calls(device) if c[0] == case)
    # The ops' checks raise RuntimeError; attention (Python) checks its arguments: ValueError.
    error = ValueError if case.startswith("attention") else RuntimeError
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_arguments_are_caught_by_the_meta_kernels(case):
    """The Meta / fake kernels (what torch.compile traces with) check the same things."""
    _, call, match = next(c for c in bad_calls("meta") if c[0] == case)
    error = ValueError if case.startswith("attention") else RuntimeError
    with pytest.raises(error, match=match):
        call()


@CUDA_SKIP
@pytest.mark.parametrize("op", ["gather", "scatter", "pad"])
def test_indices_on_another_device(op):
    x = torch.ones(6, 2, device="cuda")
    indices = torch.tensor([0, 2])
    call = {
        "gather": lambda: varlen.index_first_axis(x, indices),
        "scatter": lambda: varlen.index_put_first_axis(x[:2], indices, 6),
        "pad": lambda: varlen.pad_input(x[:2], indices, 2, 3),
    }[op]
    with pytest.raises(RuntimeError, match="indices"):
        call()


OUT_OF_RANGE = {
    "gather": lambda x: varlen.index_first_axis(x, torch.arange(5) + 3),  # 3 .. 7 of 6 rows
    "gather-one-past": lambda x: varlen.index_first_axis(x, torch.tensor([0, 6])),
    "gather-huge": lambda x: varlen.index_first_axis(x, torch.tensor([2**40])),
    "scatter": lambda x: varlen.index_put_first_axis(x[:2], torch.tensor([1, 4]), 4),
    "pad": lambda x: varlen.pad_input(x[:2], torch.tensor([0, 4]), 2, 2),  # 2 * 2 slots
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_out_of_range_indices_on_cpu(case):
    with pytest.raises(RuntimeError, match="indices"):
        OUT_OF_RANGE[case](torch.ones(6, 2))


def test_unpad_max_seqlen_below_the_longest_row_is_refused_on_cpu():
    """A bound below the real longest row would make attention kernels skip tokens; the CPU
    kernel knows the rows and refuses it (a device kernel cannot check it without a sync)."""
    x = torch.ones(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(RuntimeError, match="max_seqlen=2 is below the longest row"):
        varlen.unpad_input(x, mask, max_seqlen=2)
    assert varlen.unpad_input(x, mask, max_seqlen=3)[3] == 3
    assert varlen.unpad_input(x, mask, max_seqlen=5)[3] == 5  # a loose bound is a bound


MALFORMED_CU_SEQLENS = {
    "decreasing": ([0, 3, 2, 4], 4),
    "past-the-tokens": ([0, 9], 9),
    "negative-start": ([-1, 4], 5),
    "max-seqlen-too-small": ([0, 3, 4], 2),
}


@pytest.mark.parametrize("case", list(MALFORMED_CU_SEQLENS))
def test_attention_refuses_malformed_cu_seqlens(case, gen):
    bounds, max_seqlen = MALFORMED_CU_SEQLENS[case]
    q = torch.randn(4, 2, 8, generator=gen)
    cu = torch.tensor(bounds, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens|max_seqlen"):
        varlen.attention(q, q, q, cu, max_seqlen)


def test_index_first_axis_repeated_indices_sum_their_gradients(device, gen):
    """As for input[indices]: a row gathered twice gets both gradients."""
    x = torch.randn(4, 3, generator=gen).to(device).requires_grad_()
    indices = torch.tensor([1, 3, 1, 1], device=device)
    grad_out = torch.randn(4, 3, generator=gen).to(device)
    (ours,) = torch.autograd.grad(varlen.index_first_axis(x, indices), x, grad_out)
    (ref,) = torch.autograd.grad(x[indices], x, grad_out)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours[1], grad_out[[0, 2, 3]].sum(0))


def test_index_first_axis_reads_rows_in_place():
    """An expanded (stride-0) or sliced first axis is read where it lies: gathering two rows
    of a 2^40-row expansion would need 4 PiB if the input were made contiguous first."""
    row = torch.arange(6.0).view(1, 2, 3)
    expanded = row.expand(2**40, 2, 3)
    out = varlen.index_first_axis(expanded, torch.tensor([5, 2**40 - 1]))
    torch.testing.assert_close(out, row.expand(2, 2, 3))
    base = torch.randn(10, 4)
    sliced = base[::3]  # rows 0, 3, 6, 9: contiguous rows at a stride of 12 elements
    torch.testing.assert_close(varlen.index_first_axis(sliced, torch.tensor([3, 0])), base[[9, 0]])
    column = base[:, 1]  # a 1-D input at stride 4
    torch.testing.assert_close(varlen.index_first_axis(column, torch.tensor([2, 2])), base[[2, 2], 1])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: varlen.plan_packing([1.9, 2.9], 2), "integers.*1.9"),
        (lambda: varlen.plan_packing([3, True], 4), "integers.*True"),
        (lambda: varlen.plan_packing([3, 1], 0), "capacity"),
        (lambda: varlen.plan_packing([3, 1], -5), "capacity"),
        (lambda: varlen.plan_packing([3, 1], 4, "wfd"), "strategy"),
        (lambda: varlen.plan_packing([3, 1], 4, "FFD"), "strategy"),
        (lambda: varlen.plan_packing([3, 9], 4), "capacity"),
        (lambda: varlen.plan_packing([3, -1], 4), "length"),
        (lambda: varlen.PackingCollator(0), "capacity"),
        (lambda: varlen.PackingCollator(8, strategy="nf"), "strategy"),
    ],
    ids=[
        "float-lengths",
        "bool-length",
        "capacity-0",
        "capacity-negative",
        "strategy-unknown",
        "strategy-uppercase",
        "too-long",
        "negative-length",
        "collator-capacity-0",
        "collator-strategy",
    ],
)
def test_bad_packing_arguments(call, match):
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        call()
