"""The cases of the fuzz test (test_fuzz.py), and the worker process that runs them.

A case is one call of one op: with valid arguments (``OK``: the result must equal an independent
reference in plain PyTorch), invalid ones (``ERR``: a clean Python exception whose message names
the argument), or arguments where either is right (``ANY``: a clean error, or the reference's
result; ``SAFE``: garbage in, so a clean error or any result, only no crash and no blow-up).
Arguments are plain data (ints, lists, strings, ``T`` tensor specs), chosen by a seeded
``random.Random``, so every process builds the same table; tensors are built only when a case
runs, from a torch generator seeded by the case id.

``python fuzz_cases.py ID...`` runs cases in order in one process whose address space is capped
at 4 GiB above what importing torch takes, and writes one JSON line per finished case to stdout
(``{"id", "outcome", "detail"}``); anything else printed there goes to stderr. The parent
(test_fuzz.py) charges a dead or silent worker to the case after the last line.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import resource
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from dtype_tables import vendor_conv_available

import torch_ext

ops = torch.ops.torch_ext
OK, ERR, ANY, SAFE = "ok", "error", "any", "safe"
PASSING = ("ok", "clean-error")  # every other outcome is a failure
HEADROOM = 4 << 30  # bytes a worker may map beyond its size after import
I64_MAX, I64_MIN = 2**63 - 1, -(2**63)
CUDA = torch.cuda.is_available()

# ---------------------------------------------------------------------------------------------
# Tensor specs


DTYPES = {
    "f32": torch.float32, "f64": torch.float64, "f16": torch.float16, "bf16": torch.bfloat16,
    "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8,
    "u8": torch.uint8, "bool": torch.bool, "c64": torch.complex64,
}  # fmt: skip
FLOATS = ("f32", "f64", "f16", "bf16")


@dataclass(frozen=True)
class T:
    """A tensor to build. fill: "randn", "special" (randn with NaN, inf and -inf), "int:LO:HI",
    "ones", "zeros"; or data (nested lists). layout: "contiguous", "channels_last", "transposed"
    (last two dims), "sliced" (every other element of a wider last dim), "expanded" (stride 0 in
    dim 0), "expanded1" (dim 1), "overlapping" (as_strided, all strides 1). Value-preserving
    layouts keep data; expanded and overlapping draw their own values."""

    shape: tuple = ()
    dtype: str = "f32"
    layout: str = "contiguous"
    fill: str = "randn"
    data: Any = None
    device: str = "cpu"

    def __repr__(self) -> str:
        if self.data is not None:
            text = f"{self.dtype}{json.dumps(self.data).replace(' ', '')}"
        else:
            text = f"{self.dtype}[{','.join(fmt(s) for s in self.shape)}]"
        extras = [e for e in (self.layout, self.fill, self.device) if e not in DEFAULTS]
        return " ".join([text] + extras)


DEFAULTS = ("contiguous", "randn", "cpu")


def t(*shape, dtype="f32", layout="contiguous", fill="randn", device="cpu") -> T:
    return T(tuple(shape), dtype, layout, fill, None, device)


def data(values, dtype="i64", layout="contiguous", device="cpu") -> T:
    return T((), dtype, layout, "randn", values, device)


@dataclass(frozen=True)
class Derived:
    """An argument computed when the case runs from the arguments built before it."""

    text: str
    fn: Callable[[dict], Any]

    def __repr__(self) -> str:
        return self.text


def _values(shape, dtype, fill, gen, device):
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if fill.startswith("int:"):
        lo, hi = (int(v) for v in fill.split(":")[1:])
        values = torch.randint(lo, hi, shape, generator=gen)
    elif fill in ("ones", "zeros"):
        values = (torch.ones if fill == "ones" else torch.zeros)(shape)
    else:
        values = torch.randn(shape, generator=gen, dtype=torch.float64)
        if fill == "special" and values.numel():
            flat = values.view(-1)
            spots = torch.randint(0, flat.numel(), (max(3, flat.numel() // 6),), generator=gen)
            flat[spots[0::3]], flat[spots[1::3]], flat[spots[2::3]] = math.nan, math.inf, -math.inf
    if dtype == torch.complex64:
        values = torch.complex(values.double(), values.double())
    return values.to(dtype).to(device)


def build(spec, gen, built):
    if isinstance(spec, Derived):
        return spec.fn(built)
    if isinstance(spec, list):
        return [build(s, gen, built) for s in spec]
    if not isinstance(spec, T):
        return spec
    dtype = DTYPES[spec.dtype]
    if spec.data is not None:
        logical = torch.tensor(spec.data, dtype=dtype).to(spec.device)
    shape = list(spec.shape) if spec.data is None else list(logical.shape)
    if spec.layout == "overlapping":
        size = sum(max(n - 1, 0) for n in shape) + 1
        storage = _values([size], dtype, spec.fill, gen, spec.device)
        return storage.as_strided(shape, [1] * len(shape))
    if spec.layout.startswith("expanded"):
        dim = 1 if spec.layout == "expanded1" else 0
        one = shape[:dim] + [1] + shape[dim + 1 :]
        return _values(one, dtype, spec.fill, gen, spec.device).expand(shape)
    if spec.data is None:
        logical = _values(shape, dtype, spec.fill, gen, spec.device)
    if spec.layout == "channels_last":
        return logical.contiguous(memory_format=torch.channels_last)
    if spec.layout == "transposed":
        return logical.transpose(-1, -2).contiguous().transpose(-1, -2)
    if spec.layout == "sliced":
        wide = logical.new_zeros(shape[:-1] + [2 * shape[-1] + 1])
        wide[..., 1::2] = logical
        return wide[..., 1::2]
    assert spec.layout == "contiguous", spec.layout
    return logical


def fmt(value) -> str:
    """ints near powers of two as 2**p, tensors as their spec, the rest as repr."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, list | tuple):
            return "[" + ",".join(fmt(v) for v in value) + "]"
        return repr(value)
    if abs(value) >= 2**20:
        p = round(math.log2(abs(value)))
        for base in (2**p, 2**p - 1, 2**p + 1):
            for sign, text in ((1, ""), (-1, "-")):
                if value == sign * base:
                    off = base - 2**p
                    return f"{text}2**{p}" + ("" if off == 0 else f"{off:+d}")
    return repr(value)


# ---------------------------------------------------------------------------------------------
# Ops and cases


@dataclass(frozen=True)
class Op:
    op: str  # the dispatcher op it exercises ("spp", "dilated_conv2d.padding"), or a Python name
    name: str  # how it is called, for the case descriptions
    fn: Callable
    ref: Callable | None = None  # the same signature; the expected result, in plain PyTorch


@dataclass(frozen=True)
class Case:
    id: str
    op: Op
    expect: str
    args: dict
    match: str = ""  # ERR/ANY/SAFE: a regex the error message must contain (the argument)
    env: dict = field(default_factory=dict)  # environment variables while the op runs

    def describe(self) -> str:
        env = "".join(f"{k}={v} " for k, v in self.env.items())
        args = ", ".join(f"{k}={fmt(v)}" for k, v in self.args.items())
        return f"{env}{self.op.name}({args})"


CASES: dict[str, Case] = {}


def add(op: Op, expect: str, label: str, match: str = "", env=None, **args) -> None:
    assert expect == OK or match, "an error case must say what the message names"
    raw = op.name.startswith("torch.ops") and not op.op.startswith("_")
    case_id = f"{op.op}/{'raw-' if raw else ''}{label}".replace(" ", "_")
    base, n = case_id, 2
    while case_id in CASES:
        case_id, n = f"{base}-{n}", n + 1
    CASES[case_id] = Case(case_id, op, expect, args, match, env or {})


def mutations(op: Op, r, valid: Callable, bad: dict, match: dict | None = None) -> None:
    """ERR cases: each bad value of each argument, put into a random valid call; the message
    must name the argument (or match[argument])."""
    for name, values in bad.items():
        for value in values:
            add(op, ERR, f"{name}={fmt(value)}", match=(match or {}).get(name, name),
                **{**valid(r), name: value})


# ---------------------------------------------------------------------------------------------
# Running one case


TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
CLEAN_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError)
MEMORY = re.compile(r"can't allocate memory|bad_alloc|out of memory|not enough memory", re.I)
# A schema-mismatch dump ("Cast error details: ... PYBIND11 ...") and library internals.
INTERNALS = re.compile(r"INTERNAL ASSERT|PYBIND11|Cast error details|dnnl|onednn|mkldnn", re.I)


def build_args(case: Case) -> dict:
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    built: dict = {}
    for name, spec in case.args.items():
        built[name] = build(spec, gen, built)
    if case.id.endswith("@cuda"):
        built = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in built.items()}
    return built


def call(case: Case, fn: Callable, built: dict):
    saved = {k: os.environ.get(k) for k in case.env}
    os.environ.update(case.env)
    try:
        return fn(**{k: v for k, v in built.items() if not k.startswith("_")})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compare(got, want, path="result") -> str | None:
    """None when got equals want, else what differs."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{path} is {type(got).__name__}, expected a tensor"
        if got.shape != want.shape or got.dtype != want.dtype:
            return (
                f"{path} is {got.dtype} {list(got.shape)}, expected {want.dtype} {list(want.shape)}"
            )
        if "meta" in (got.device.type, want.device.type):
            return None
        try:
            torch.testing.assert_close(
                got.detach().cpu(), want.cpu(), equal_nan=True, **TOL.get(want.dtype, {})
            )
        except AssertionError as error:
            return f"{path} differs from the reference: " + " ".join(str(error).split())[:300]
        return None
    if isinstance(want, tuple | list):
        if not isinstance(got, tuple | list) or len(got) != len(want):
            return f"{path} is {short(got)}, expected {len(want)} values"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if (why := compare(g, w, f"{path}[{i}]")) is not None:
                return why
        return None
    if got == want and type(got) is type(want):
        return None
    return f"{path} is {got!r}, expected {want!r}"


def short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {str(value.dtype)[6:]} {list(value.shape)}"
    if isinstance(value, tuple | list):
        return "(" + ", ".join(short(v) for v in value) + ")"
    return repr(value)[:80]


def reference(case: Case):
    """The reference's result; for meta tensors, where the reference needs data, its result on
    zero-filled CPU tensors (only shapes and dtypes are compared then)."""
    built = build_args(case)
    try:
        return call(case, case.op.ref, built)
    except Exception:
        metas = [v for v in built.values() if isinstance(v, torch.Tensor) and v.is_meta]
        if not metas or sum(v.numel() for v in metas) > 10**6:
            raise
    zeros = {k: torch.zeros(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) and v.is_meta
             else v for k, v in built.items()}  # fmt: skip
    return call(case, case.op.ref, zeros)


def run_case(case: Case) -> dict:
    def record(outcome, detail=""):
        return {"id": case.id, "call": case.describe(), "outcome": outcome, "detail": detail}

    built = build_args(case)
    try:
        result = call(case, case.op.fn, built)
    except Exception as error:  # noqa: BLE001 - classifying every exception is the point
        text = f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"
        if isinstance(error, MemoryError) or MEMORY.search(str(error)):
            return record("memory", text)
        if not isinstance(error, CLEAN_ERRORS) or INTERNALS.search(str(error)):
            return record("unclear-error", text)
        if case.expect == OK:
            return record("raised", text)
        if not re.search(case.match, str(error), re.I):
            return record("unclear-error", f"does not name /{case.match}/: {text}")
        return record("clean-error", text)
    if case.expect == ERR:
        return record("accepted", f"returned {short(result)}")
    if case.expect == SAFE:
        return record("ok", f"returned {short(result)} (not checked: garbage in)")
    try:
        expected = reference(case)
    except Exception as error:  # noqa: BLE001
        return record("accepted", f"returned {short(result)}; the reference raises {error!r:.200}")
    why = compare(result, expected)
    return record("ok") if why is None else record("wrong", why)


# ---------------------------------------------------------------------------------------------
# References (float64, then the op's dtype)


def act(name, y):
    return {"none": y, None: y, "relu": F.relu(y), "silu": F.silu(y), "gelu": F.gelu(y)}[name]


def spp_ref(input, levels=(1, 2, 4), mode="max"):
    n, c = input.shape[:2]
    if input.numel() == 0:
        return input.new_zeros(n, c * sum(level * level for level in levels))
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return torch.cat([pool(input.double(), lv).flatten(1) for lv in levels], 1).to(input.dtype)


def spp_forward_ref(input, levels, mode, need_indices):
    long = input.new_empty(0, dtype=torch.long)
    if not (need_indices and mode == "max"):
        return spp_ref(input, levels, mode), long
    if input.numel() == 0:
        return spp_ref(input, levels, mode), long.new_empty(spp_ref(input, levels, mode).shape)
    pooled = [F.adaptive_max_pool2d(input.double(), lv, return_indices=True) for lv in levels]
    return (
        torch.cat([p.flatten(1) for p, _ in pooled], 1).to(input.dtype),
        torch.cat([i.flatten(1) for _, i in pooled], 1),
    )


def spp_backward_ref(grad_output, indices, input_size, levels, mode, memory_format):
    n, c, h, w = input_size
    if mode == "avg":
        z = torch.zeros(input_size, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(spp_ref(z, levels, "avg"), z, grad_output.double())
        return g.to(grad_output.dtype)
    grad = torch.zeros(n, c, h * w, dtype=torch.float64)
    start = 0
    for level in levels:
        stop = start + c * level * level
        grad.scatter_add_(
            2,
            indices[:, start:stop].reshape(n, c, -1),
            grad_output[:, start:stop].double().reshape(n, c, -1),
        )
        start = stop
    return grad.view(input_size).to(grad_output.dtype)


def sppf_ref(input, kernel_size=5, repeats=3):
    n, c, h, w = input.shape
    m = input.double()
    stages = [m]
    for _ in range(repeats):
        if m.numel() == 0:
            pass
        elif kernel_size // 2 >= max(h, w) - 1:  # every window covers the whole map
            m = m.amax((2, 3), keepdim=True).expand_as(m)
        else:
            m = F.max_pool2d(m, kernel_size, 1, kernel_size // 2)
        stages.append(m)
    return torch.cat(stages, 1).to(input.dtype)


def sppf_backward_ref(grad_output, output, kernel_size, repeats):
    c = output.shape[1] // (repeats + 1)
    x = output[:, :c].double().requires_grad_()
    (g,) = torch.autograd.grad(sppf_ref(x, kernel_size, repeats), x, grad_output.double())
    return g.to(output.dtype)


def conv_ref(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None):
    b = None if bias is None else bias.double()
    y = F.conv2d(input.double(), weight.double(), b, stride, padding, dilation, groups)
    return act(activation, y).to(input.dtype)


def pad4(x, p):  # [top, left, bottom, right]
    return F.pad(x, (p[1], p[3], p[0], p[2]))


def conv_forward_ref(input, weight, bias, stride, padding, dilation, groups, activation,
                     save_preact):  # fmt: skip
    pre = conv_ref(pad4(input.double(), padding), weight, bias, stride, 0, dilation, groups)
    keep = save_preact and activation in ("silu", "gelu")
    return act(activation, pre).to(input.dtype), (pre if keep else pre.new_empty(0)).to(input.dtype)


def conv_backward_ref(
    grad_output, input, weight, saved, stride, padding, dilation, groups, activation, output_mask
):
    x, w = input.double().requires_grad_(), weight.double().requires_grad_()
    b = torch.zeros(weight.shape[0], dtype=torch.float64, requires_grad=True)
    y = conv_ref(pad4(x, padding), w, b, stride, 0, dilation, groups, activation)
    grads = torch.autograd.grad(y, (x, w, b), grad_output.double())
    return tuple(
        g.to(input.dtype) if keep else input.new_empty(0)
        for g, keep in zip(grads, output_mask, strict=True)
    )


def route_ref(input, weight, padding, groups):
    """The documented rule: depthwise when groups == C_in, else GEMM; float32, bfloat16 and
    float16 dense convolutions with symmetric padding go to the vendor (oneDNN on the CPU, cuDNN
    on CUDA) where it has kernels for the dtype (TORCH_EXT_CONV_ROUTE=own|vendor forces a
    route)."""
    forced = os.environ.get("TORCH_EXT_CONV_ROUTE")
    depthwise = groups == input.shape[1] and groups > 1
    symmetric = padding[0] == padding[2] and padding[1] == padding[3]
    available = vendor_conv_available(input.device, input.dtype)
    halves_or_float = input.dtype in (torch.float32, torch.bfloat16, torch.float16)
    vendor = symmetric and input.dtype.is_floating_point and forced != "own"
    vendor = vendor and (forced == "vendor" or (halves_or_float and not depthwise and available))
    return "vendor" if vendor else "depthwise" if depthwise else "gemm"


def confusion_ref(pred, target, num_classes, ignore_index=None, validate=True):
    k = num_classes
    p = (pred.argmax(1) if pred.is_floating_point() else pred).long().flatten()
    tg = target.long().flatten()
    counted = tg != ignore_index if ignore_index is not None else torch.ones_like(tg, dtype=bool)
    good = counted & (tg >= 0) & (tg < k) & (p >= 0) & (p < k)
    if validate and (counted & ~good).any():
        raise ValueError("labels out of range")
    return torch.bincount(tg[good] * k + p[good], minlength=k * k).view(k, k)


def accumulate_ref(confmat, report, pred, target, ignore_index=None):
    counts = confusion_ref(pred, target, confmat.shape[0], ignore_index, validate=False)
    k = confmat.shape[0]
    p = (pred.argmax(1) if pred.is_floating_point() else pred).long().flatten()
    tg = target.long().flatten()
    counted = tg != ignore_index if ignore_index is not None else torch.ones_like(tg, dtype=bool)
    bad_target = counted & ((tg < 0) | (tg >= k))
    bad = bad_target | (counted & ((p < 0) | (p >= k)))
    keys = (2 * torch.arange(tg.numel()) + (~bad_target).long())[bad]
    first = min([int(report[1])] + keys.tolist())
    return confmat + counts, torch.tensor([int(report[0]) + int(bad.sum()), first])


def metrics_ref(confmat):
    cm = confmat.double()
    tp, gt, pr, total = cm.diagonal(), cm.sum(1), cm.sum(0), cm.sum()
    iou, dice = tp / (gt + pr - tp), 2 * tp / (gt + pr)
    fw = (gt / total * iou)[gt > 0].sum() if total > 0 else torch.tensor(math.nan).double()
    return (tp.sum() / total, (tp / gt).nanmean(), iou, iou.nanmean(), fw, dice, dice.nanmean())


def unpad_plan_ref(attention_mask, total_tokens=None, max_seqlen=None):
    """flash-attention's bert_padding.unpad_input; the longest row reported is max_seqlen when
    given, else S when total_tokens is given (no transfer), else the exact longest row."""
    real = attention_mask != 0
    seqlens = real.sum(1)
    if total_tokens is not None and total_tokens != int(seqlens.sum()):
        raise ValueError("wrong total_tokens")
    longest = int(seqlens.max()) if seqlens.numel() else 0
    if max_seqlen is not None:
        longest = max_seqlen
    elif total_tokens is not None:
        longest = real.shape[1]
    cu = F.pad(seqlens.cumsum(0), (1, 0)).int()
    return real.flatten().nonzero().flatten(), cu, longest, seqlens.int()


def unpad_ref(hidden, attention_mask, total_tokens=None, max_seqlen=None):
    indices, cu, longest, used = unpad_plan_ref(attention_mask, total_tokens, max_seqlen)
    return hidden.flatten(0, 1)[indices], indices, cu, longest, used


def index_put_ref(values, indices, first_axis_dim):
    out = values.new_zeros(first_axis_dim, *values.shape[1:])
    out[indices] = values
    return out


def pad_ref(hidden_unpad, indices, batch, seqlen):
    out = index_put_ref(hidden_unpad, indices, batch * seqlen)
    return out.view(batch, seqlen, *hidden_unpad.shape[1:])


def cu_seqlens_ref(position_ids):
    rows, seqlen = position_ids.shape
    start = position_ids == 0
    start[:, :1] = True
    bounds = start.flatten().nonzero().flatten().tolist() + [rows * seqlen]
    bounds = bounds if rows * seqlen else [0]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.tensor(bounds, dtype=torch.int32), max(lengths, default=0)


def plan_packing_ref(lengths, capacity, strategy="ffd", truncate=False):
    lengths = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
    if any(not isinstance(n, int) or n < 0 for n in lengths) or capacity < 1:
        raise ValueError("bad lengths or capacity")
    if any(n > capacity for n in lengths) and not truncate:
        raise ValueError("longer than capacity")
    lengths = [min(n, capacity) for n in lengths]
    rooms: list[int] = []
    packs = [0] * len(lengths)
    for seq in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b, room in enumerate(rooms) if room >= lengths[seq]]
        if fits and strategy == "bfd":
            fits = [min(fits, key=lambda b: (rooms[b], b))]
        if not fits:
            rooms.append(capacity)
            fits = [len(rooms) - 1]
        packs[seq] = fits[0]
        rooms[fits[0]] -= lengths[seq]
    return torch.tensor(packs, dtype=torch.long)


def attention_ref(q, k, v, cu_seqlens, max_seqlen, causal=True, scale=None):
    out = torch.zeros(q.shape, dtype=torch.float64)
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs = q[begin:end].double().transpose(0, 1)
        ks, vs = (x[begin:end].double().repeat_interleave(groups, 1).transpose(0, 1)
                  for x in (k, v))  # fmt: skip
        scores = qs @ ks.transpose(1, 2) * (scale if scale is not None else q.shape[2] ** -0.5)
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=bool).triu(1), -math.inf)
        out[begin:end] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out.to(q.dtype)


def grad_of(fn, wrt=("input",)):
    """(result, *gradients of result . grad_output with respect to wrt), by autograd."""

    def run(grad_output, **kw):
        leaves = {k: kw[k].detach().requires_grad_() for k in wrt}
        y = fn(**{**kw, **leaves})
        return torch.autograd.grad(y, [leaves[k] for k in wrt], grad_output)

    return run


def grad_ref(ref, wrt=("input",)):
    def run(grad_output, **kw):
        leaves = {k: kw[k].double().requires_grad_() for k in wrt}
        y = ref(**{**kw, **leaves})
        grads = torch.autograd.grad(y, [leaves[k] for k in wrt], grad_output.double())
        return tuple(g.to(kw[k].dtype) for g, k in zip(grads, wrt, strict=True))

    return run


def grad_grad(fn):
    """d/dv <d(fn(input) . v)/d input, w>: a second derivative, through double backward."""

    def run(v, w, **kw):
        x, v = kw.pop("input").detach().requires_grad_(), v.detach().requires_grad_()
        (g,) = torch.autograd.grad(fn(input=x, **kw), x, v, create_graph=True)
        return torch.autograd.grad((g * w).sum(), v)[0]

    return run


# ---------------------------------------------------------------------------------------------
# The ops


def _accumulate(confmat, report, pred, target, ignore_index=None):
    ops._confusion_matrix_accumulate(confmat, report, pred, target, ignore_index)
    return confmat, report


SPP = Op("spp", "torch_ext.spp", torch_ext.spp, spp_ref)
SPP_RAW = Op("spp", "torch.ops.torch_ext.spp", ops.spp, spp_ref)
SPP_FWD = Op("_spp_forward", "torch.ops.torch_ext._spp_forward", ops._spp_forward, spp_forward_ref)
SPP_BWD = Op("_spp_backward", "torch.ops.torch_ext._spp_backward", ops._spp_backward,
             spp_backward_ref)  # fmt: skip
SPPF = Op("sppf", "torch_ext.sppf", torch_ext.sppf, sppf_ref)
SPPF_BWD = Op("_sppf_backward", "torch.ops.torch_ext._sppf_backward", ops._sppf_backward,
              sppf_backward_ref)  # fmt: skip
CONV = Op("dilated_conv2d", "torch_ext.dilated_conv2d", torch_ext.dilated_conv2d, conv_ref)
CONV_PAD = Op("dilated_conv2d.padding", "torch_ext.dilated_conv2d", torch_ext.dilated_conv2d,
              conv_ref)  # fmt: skip
CONV_FWD = Op("_dilated_conv2d_forward", "torch.ops.torch_ext._dilated_conv2d_forward",
              ops._dilated_conv2d_forward, conv_forward_ref)  # fmt: skip
CONV_BWD = Op("_dilated_conv2d_backward", "torch.ops.torch_ext._dilated_conv2d_backward",
              ops._dilated_conv2d_backward, conv_backward_ref)  # fmt: skip
ROUTE = Op("_dilated_conv2d_route", "torch.ops.torch_ext._dilated_conv2d_route",
           ops._dilated_conv2d_route, route_ref)  # fmt: skip
CONFMAT = Op("confusion_matrix", "torch_ext.confusion_matrix", torch_ext.confusion_matrix,
             confusion_ref)  # fmt: skip
ACCUMULATE = Op("_confusion_matrix_accumulate", "torch.ops.torch_ext._confusion_matrix_accumulate",
                _accumulate, accumulate_ref)  # fmt: skip
METRICS = Op("segmentation_metrics", "torch_ext.segmentation_metrics",
             torch_ext.segmentation_metrics, metrics_ref)  # fmt: skip
UNPAD = Op("unpad_input", "torch_ext.unpad_input", torch_ext.unpad_input, unpad_ref)
UNPAD_PLAN = Op("_unpad_plan", "torch.ops.torch_ext._unpad_plan", ops._unpad_plan, unpad_plan_ref)
PAD = Op("pad_input", "torch_ext.pad_input", torch_ext.pad_input, pad_ref)
GATHER = Op("index_first_axis", "torch_ext.index_first_axis", torch_ext.index_first_axis,
            lambda input, indices: input[indices])  # fmt: skip
SCATTER = Op("index_put_first_axis", "torch_ext.index_put_first_axis",
             torch_ext.index_put_first_axis, index_put_ref)  # fmt: skip
CU_SEQLENS = Op("cu_seqlens_from_position_ids", "torch_ext.cu_seqlens_from_position_ids",
                torch_ext.cu_seqlens_from_position_ids, cu_seqlens_ref)  # fmt: skip
PACKING = Op("plan_packing", "torch_ext.plan_packing", torch_ext.plan_packing, plan_packing_ref)
PACKING_RAW = Op("plan_packing", "torch.ops.torch_ext.plan_packing", ops.plan_packing,
                 plan_packing_ref)  # fmt: skip
ATTENTION = Op("varlen.attention", "torch_ext.varlen.attention", torch_ext.varlen.attention,
               attention_ref)  # fmt: skip
CPU_CAPABILITY = Op("_cpu_capability", "torch.ops.torch_ext._cpu_capability",
                    lambda: ops._cpu_capability() in ("default", "avx2", "avx512", "avx512_bf16"),
                    lambda: True)  # fmt: skip


def grad_op(op: Op, wrt=("input",)) -> Op:
    return Op(op.op, f"grad of {op.name}", grad_of(op.fn, wrt), grad_ref(op.ref, wrt))


def grad_grad_op(op: Op) -> Op:
    return Op(op.op, f"double backward of {op.name}", grad_grad(op.fn), grad_grad(op.ref))


# ---------------------------------------------------------------------------------------------
# The table. Random valid calls, each argument's bad values put into random valid calls, and
# the edges by hand: sizes at the int32/int64 limits, stride-0 and overlapping tensors, empty
# tensors, NaN/inf, other devices (meta), and the reports of issue 14.

rng = random.Random(20240531)
LAYOUTS = ("contiguous", "contiguous", "channels_last", "transposed", "sliced", "expanded",
           "expanded1", "overlapping")  # fmt: skip
HUGE_PY = 2**63  # beyond int64: only the Python wrappers see it, and must refuse it clearly


def image(r, n=(1, 2, 3), c=(1, 2, 4), hw=(1, 9), dtypes=FLOATS, layouts=LAYOUTS, empty=0.15) -> T:
    """[N, C, H, W]; N or C is 0 with probability `empty`; NaN/inf in a quarter of them."""
    shape = [r.choice(n), r.choice(c), r.randint(*hw), r.randint(*hw)]
    if r.random() < empty:
        shape[r.randint(0, 1)] = 0
    fill = r.choice(("randn", "randn", "randn", "special"))
    return t(*shape, dtype=r.choice(dtypes), layout=r.choice(layouts), fill=fill)


# ---- spp, _spp_forward, _spp_backward


def spp_valid(r):
    levels = r.sample(range(1, 8), r.randint(1, 3)) + r.choice(([], [2]))
    return dict(input=image(r), levels=levels, mode=r.choice(("max", "avg")))


for _ in range(10):
    add(SPP, OK, "random", **spp_valid(rng))
for _ in range(3):
    add(SPP_RAW, OK, "random", **spp_valid(rng))
    add(SPP_FWD, OK, "random", **spp_valid(rng), need_indices=rng.random() < 0.7)
mutations(SPP, rng, spp_valid, {
    "levels": [[], [0], [-1], [2**31], [2**32], [2**32, 1], [3037000500], [2**62], [I64_MAX],
               [I64_MIN], [HUGE_PY]],
    "mode": ["min", "", "MAX"],
    "input": [t(2, 3, 4), t(1, 2, 3, 3, 1), t(1, 2, 3, 3, dtype="i32"), t(1, 1, 2, 2, dtype="bool"),
              t(1, 2, 0, 3), t(1, 2, 3, 0), t(1, 2, 3, 3, dtype="c64")],
}, match={"levels": "level"})  # fmt: skip
add(SPP, ERR, "levels-2**31-C2", match="level", input=t(1, 2, 3, 3), levels=[2**31])
add(SPP, OK, "level-beyond-map", input=t(2, 3, 3, 2, layout="overlapping"), levels=[7, 1])
add(SPP, OK, "nan-max", input=t(2, 3, 6, 5, fill="special"), levels=[1, 3], mode="max")
add(SPP, OK, "meta", input=t(2, 3, 5, 7, device="meta"), levels=[1, 2, 4])
add(SPP, OK, "meta-C-2**40", input=t(1, 2**40, 1, 1, device="meta"), levels=[1, 2, 4])
add(SPP, ERR, "meta-C-2**60-features-overflow", match="level|channels|features",
    input=t(1, 2**60, 1, 1, device="meta"), levels=[1, 2, 4])  # fmt: skip
add(SPP, ERR, "meta-levels-2**32", match="level", input=t(1, 2, 3, 3, device="meta"),
    levels=[2**32])  # fmt: skip
mutations(SPP_FWD, rng, lambda r: {**spp_valid(r), "need_indices": True},
          {"levels": [[2**32], [0]], "mode": ["none"]}, match={"levels": "level"})  # fmt: skip
add(SPP_FWD, OK, "meta", input=t(2, 3, 5, 7, device="meta"), levels=[1, 2], mode="max",
    need_indices=True)  # fmt: skip


def argmax_indices(levels):
    return Derived("argmax indices of _x",
                   lambda a: spp_forward_ref(a["_x"], levels, "max", True)[1])  # fmt: skip


def spp_backward_valid(r, x=None, levels=None, mode=None):
    x = x or image(r, n=(1, 2), c=(1, 3), dtypes=("f32", "f64"), empty=0)
    levels = levels or r.sample(range(1, 6), r.randint(1, 3))
    mode = mode or r.choice(("max", "avg"))
    features = x.shape[1] * sum(v * v for v in levels)
    return dict(
        _x=x, grad_output=t(x.shape[0], features, dtype=x.dtype, device=x.device),
        indices=argmax_indices(levels) if mode == "max" else data([], "i64"),
        input_size=list(x.shape), levels=levels, mode=mode,
        memory_format=r.choice((torch.contiguous_format, torch.channels_last)),
    )  # fmt: skip


for _ in range(6):
    add(SPP_BWD, OK, "random", **spp_backward_valid(rng))
x1 = t(1, 1, 2, 2)
add(SPP_BWD, ERR, "indices-10**9", match="indices", **{**spp_backward_valid(rng, x1, [1], "max"),
    "grad_output": data([[1.0]], "f32"), "indices": data([[10**9]])})  # fmt: skip
add(SPP_BWD, ERR, "indices-negative", match="indices", **{**spp_backward_valid(rng, x1, [1], "max"),
    "indices": data([[-1]])})  # fmt: skip
add(SPP_BWD, ERR, "indices-2**63-1", match="indices", **{**spp_backward_valid(rng, x1, [1], "max"),
    "indices": data([[I64_MAX]])})  # fmt: skip
mutations(SPP_BWD, rng, lambda r: spp_backward_valid(r, t(1, 2, 4, 4), [1, 2], "max"), {
    "indices": [t(1, 10, dtype="i32", fill="int:0:4"), t(1, 9, dtype="i64", fill="int:0:4")],
    "grad_output": [t(1, 9), t(1, 10, dtype="i64", fill="int:0:3"), t(1, 10, 1)],
    "input_size": [[1, 2, 4], [1, 2, -4, 4], [1, 2, 4, 4, 1], [1, 2, 2**62, 2**62],
                   [1, 2, I64_MIN, 4]],
    "levels": [[1, 3], [0], [2**32], [-1, 2]],
    "mode": ["median"],
}, match={"levels": "level|grad_output", "input_size": "input_size|input gradient"})  # fmt: skip
add(SPP_BWD, OK, "meta", **{**spp_backward_valid(rng, t(2, 3, 5, 5, device="meta"), [1, 2], "avg"),
    "indices": t(0, dtype="i64", device="meta")})  # fmt: skip
add(SPP_BWD, ERR, "meta-input_size-3", match="input_size",
    **{**spp_backward_valid(rng, t(2, 3, 5, 5, device="meta"), [1, 2], "avg"),
       "indices": t(0, dtype="i64", device="meta"), "input_size": [2, 3, 5]})  # fmt: skip
add(SPP_BWD, ERR, "meta-indices-i32", match="indices",
    **{**spp_backward_valid(rng, t(2, 3, 5, 5, device="meta"), [1, 2], "max"),
       "indices": t(2, 15, dtype="i32", device="meta")})  # fmt: skip
for mode in ("max", "avg"):
    for layout in ("channels_last", "expanded1", "overlapping"):
        x = t(2, 3, 7, 6, dtype="f64", layout=layout, fill=rng.choice(("randn", "special")))
        add(grad_op(SPP), OK, f"grad-{mode}-{layout}", input=x, levels=[1, 2, 3], mode=mode,
            grad_output=t(2, 42, dtype="f64"))  # fmt: skip
for mode in ("max", "avg"):
    add(grad_grad_op(SPP), ANY, f"double-backward-{mode}", match="double|create_graph|second",
        input=t(2, 3, 5, 5, dtype="f64"), levels=[1, 2], mode=mode, v=t(2, 15, dtype="f64"),
        w=t(2, 3, 5, 5, dtype="f64"))  # fmt: skip

# ---- sppf, _sppf_backward


def sppf_valid(r):
    return dict(input=image(r), kernel_size=r.choice((1, 3, 5, 7)), repeats=r.randint(1, 4))


for _ in range(10):
    add(SPPF, OK, "random", **sppf_valid(rng))
mutations(SPPF, rng, sppf_valid, {
    "kernel_size": [0, -1, -3, 2, 4, 2**62, I64_MIN, HUGE_PY],
    "repeats": [0, -1, I64_MIN, 2**61, 2**62, I64_MAX, HUGE_PY],
    "input": [t(4, 3, 3), t(1, 4, 3, 3, dtype="i64"), t(1, 4, 0, 3)],
})  # fmt: skip
add(SPPF, ERR, "issue14-repeats-2**62", match="repeats", input=t(1, 4, 3, 3), kernel_size=3,
    repeats=2**62)  # fmt: skip
add(SPPF, ERR, "issue14-repeats-2**63-1", match="repeats", input=t(1, 4, 3, 3), kernel_size=3,
    repeats=I64_MAX)  # fmt: skip
for k in (9, 2**31 + 1, 2**62 + 1, I64_MAX):  # windows wider than the map: the plane's maximum
    add(SPPF, ANY, f"kernel_size={fmt(k)}", match="kernel_size", input=t(2, 3, 4, 3),
        kernel_size=k, repeats=2)  # fmt: skip
add(SPPF, OK, "meta", input=t(2, 3, 5, 7, device="meta"), kernel_size=5, repeats=3)
add(SPPF, OK, "meta-2**40-elements", input=t(1, 2**20, 2**10, 2**10, device="meta"), kernel_size=5,
    repeats=3)  # fmt: skip
add(SPPF, ERR, "meta-repeats-2**62", match="repeats", input=t(1, 4, 3, 3, device="meta"),
    kernel_size=3, repeats=2**62)  # fmt: skip
add(SPPF, ERR, "meta-kernel_size--3", match="kernel_size", input=t(1, 4, 3, 3, device="meta"),
    kernel_size=-3, repeats=1)  # fmt: skip
for layout in ("channels_last", "expanded", "overlapping", "sliced"):
    add(grad_op(SPPF), OK, f"grad-{layout}", input=t(2, 3, 6, 7, dtype="f64", layout=layout),
        kernel_size=3, repeats=2, grad_output=t(2, 9, 6, 7, dtype="f64"))  # fmt: skip
add(grad_grad_op(SPPF), ANY, "double-backward", match="double|create_graph|second",
    input=t(1, 2, 5, 5, dtype="f64"), kernel_size=3, repeats=2, v=t(1, 6, 5, 5, dtype="f64"),
    w=t(1, 2, 5, 5, dtype="f64"))  # fmt: skip


def sppf_output(x: T, k, repeats):
    return Derived(f"sppf_ref(_x, {k}, {repeats})", lambda a: sppf_ref(a["_x"], k, repeats))


def sppf_backward_valid(r, x=None, k=None, repeats=None):
    layouts = ("contiguous", "channels_last")
    x = x or image(r, n=(1, 2), c=(1, 3), dtypes=("f32", "f64"), layouts=layouts, empty=0)
    k, repeats = k or r.choice((1, 3, 5)), repeats or r.randint(1, 3)
    n, c, h, w = x.shape
    return dict(_x=x, grad_output=t(n, c * (repeats + 1), h, w, dtype=x.dtype, device=x.device),
                output=sppf_output(x, k, repeats), kernel_size=k, repeats=repeats)  # fmt: skip


for _ in range(6):
    add(SPPF_BWD, OK, "random", **sppf_backward_valid(rng))
mutations(SPPF_BWD, rng, lambda r: sppf_backward_valid(r, t(1, 4, 3, 3), 3, 1), {
    "kernel_size": [-3, -1, 0, 2, I64_MIN],
    "repeats": [0, -1, 2, I64_MAX, I64_MIN],
    "grad_output": [t(1, 8, 3, 3, dtype="f64"), t(1, 8, 3, 4), t(1, 8, 3, 3, dtype="i32"),
                    t(8, 3, 3)],
    "output": [t(1, 7, 3, 3), t(1, 8, 3, 3, dtype="i32"), t(8, 3, 3)],
})  # fmt: skip
add(SPPF_BWD, SAFE, "output-not-from-sppf", match="output", **{
    **sppf_backward_valid(rng, t(2, 3, 5, 5), 3, 2), "output": t(2, 9, 5, 5, fill="special")})
add(SPPF_BWD, OK, "meta", **sppf_backward_valid(rng, t(2, 3, 5, 7, device="meta"), 5, 2))
add(SPPF_BWD, ERR, "meta-kernel_size--3", match="kernel_size",
    **{**sppf_backward_valid(rng, t(2, 3, 5, 7, device="meta"), 5, 2), "kernel_size": -3})
add(SPPF_BWD, ERR, "meta-grad_output-f64", match="grad_output",
    **{**sppf_backward_valid(rng, t(2, 3, 5, 7, device="meta"), 5, 2),
       "grad_output": t(2, 9, 5, 7, dtype="f64", device="meta")})  # fmt: skip

# ---- dilated_conv2d (both overloads), _dilated_conv2d_forward/_backward/_route

ACTIVATIONS = ("none", "relu", "silu", "gelu")
ROUTES = ({}, {}, {"TORCH_EXT_CONV_ROUTE": "own"}, {"TORCH_EXT_CONV_ROUTE": "vendor"})


def route(env):
    return env.get("TORCH_EXT_CONV_ROUTE", "auto")


def conv_geometry(r, dtypes=("f32", "f32", "f64", "f16", "bf16")):
    """(input, weight, bias, stride, dilation, groups) with a map large enough for no padding."""
    groups = r.choice((1, 1, 2, 3))
    cin = groups * r.choice((1, 2, 3))
    if r.random() < 0.3:  # depthwise, any channel multiplier
        groups, cin = cin, cin
    cout = groups * r.choice((1, 2))
    k = (r.choice((1, 2, 3, 5)), r.choice((1, 3)))
    dilation = [r.choice((1, 2, 3)), r.choice((1, 2))]
    stride = [r.choice((1, 2, 3)), r.choice((1, 2))]
    h, w = ((kk - 1) * d + 1 + r.randint(0, 5) for kk, d in zip(k, dilation, strict=True))
    dtype = r.choice(dtypes)
    x = t(r.choice((1, 2, 1, 2, 0)), cin, h, w, dtype=dtype, layout=r.choice(LAYOUTS),
          fill=r.choice(("randn", "randn", "special")))  # fmt: skip
    weight = t(cout, cin // groups, *k, dtype=dtype, layout=r.choice(("contiguous", "transposed")))
    bias = r.choice((None, t(cout, dtype=dtype)))
    return x, weight, bias, stride, dilation, groups


def conv_valid(r):
    x, weight, bias, stride, dilation, groups = conv_geometry(r)
    return dict(input=x, weight=weight, bias=bias, stride=stride, padding=[r.randint(0, 3),
                r.randint(0, 2)], dilation=dilation, groups=groups,
                activation=r.choice(ACTIVATIONS))  # fmt: skip


for _ in range(12):
    add(CONV, OK, "random", env=rng.choice(ROUTES), **conv_valid(rng))
for _ in range(4):
    args = conv_valid(rng)
    add(CONV_PAD, OK, "random", env=rng.choice(ROUTES), **{**args, "stride": 1,
        "padding": rng.choice(("same", "valid"))})  # fmt: skip
base = dict(input=t(2, 4, 9, 8), weight=t(6, 2, 3, 3), bias=t(6), stride=1, padding=1, dilation=1,
            groups=2, activation="relu")  # fmt: skip
conv_match = {"padding": "padding|output", "stride": "stride|output"}
for name, values in {
    "dilation": [0, -1, [1, 0], 2**62, 3074457345618258602, I64_MAX, I64_MIN, HUGE_PY],
    "stride": [0, -1, [1, 2, 3], I64_MIN, HUGE_PY],
    "padding": [-1, [0, -2], 2**31, 2**40, 2**62, I64_MAX, HUGE_PY],
    "groups": [0, -1, 3, 4, I64_MAX, I64_MIN],
    "weight": [t(6, 2, 3, 3, dtype="f64"), t(6, 2, 3), t(6, 2, 0, 3), t(6, 3, 3, 3),
               t(6, 2, 3, 3, device="meta")],
    "bias": [t(5), t(6, dtype="f64"), t(6, 1), t(6, device="meta")],
    "input": [t(2, 4, 9, 8, dtype="i32"), t(4, 9, 8), t(2, 4, 9, 8, dtype="c64")],
    "activation": ["tanh", "", "RELU"],
}.items():
    for value in values:
        add(CONV, ERR, f"{name}={fmt(value)}", match=conv_match.get(name, name),
            **{**base, name: value})  # fmt: skip
add(CONV, ERR, "issue14-dilation-overflow", match="dilation", input=t(1, 3, 5, 5),
    weight=t(3, 1, 7, 7, fill="ones"), bias=None, stride=1, padding=0,
    dilation=3074457345618258602, groups=3)  # fmt: skip
add(CONV, ERR, "map-smaller-than-kernel", match="kernel|dilation|padding",
    **{**base, "padding": 0, "dilation": 5})  # fmt: skip
add(CONV, OK, "activation-None", **{**base, "activation": None})
add(CONV, OK, "dilation-2**62-1x1-kernel", **{**base, "weight": t(6, 2, 1, 1), "padding": 0,
    "dilation": 2**62})  # fmt: skip
add(CONV, ANY, "stride-2**63-1", match="stride", **{**base, "stride": I64_MAX})
for env in ROUTES[1:]:
    for bias in (None, t(2)):
        add(CONV, ANY, f"C_in-0-{route(env)}-bias-{bias}", match="channels|input|weight", env=env,
            input=t(1, 0, 5, 5), weight=t(2, 0, 3, 3), bias=bias)  # fmt: skip
add(CONV, ANY, "meta-C_in-0", match="channels|input|weight", input=t(1, 0, 5, 5, device="meta"),
    weight=t(2, 0, 3, 3, device="meta"))  # fmt: skip
add(CONV, OK, "meta", input=t(2, 4, 9, 8, device="meta"), weight=t(6, 2, 3, 3, device="meta"),
    groups=2, dilation=2, padding=1)  # fmt: skip
add(CONV, OK, "meta-map-2**40", input=t(1, 1, 2**40, 2**20, device="meta"),
    weight=t(1, 1, 3, 3, device="meta"), stride=2)  # fmt: skip
add(CONV, ERR, "meta-dilation-overflow", match="dilation", input=t(1, 3, 5, 5, device="meta"),
    weight=t(3, 1, 7, 7, device="meta"), dilation=3074457345618258602, groups=3)  # fmt: skip
for name, value in {"stride": 2, "dilation": 2**62, "padding": "full"}.items():
    add(CONV_PAD, ERR, f"same-{name}={fmt(value)}", match=name,
        **{**base, "padding": "same", name: value})  # fmt: skip
for act_name in ACTIVATIONS:
    for env in ROUTES[1:]:
        add(grad_op(CONV, ("input", "weight", "bias")), OK, f"grad-{act_name}-{route(env)}",
            env=env, input=t(2, 4, 7, 6, dtype="f64", layout="channels_last"),
            weight=t(6, 2, 3, 2, dtype="f64"), bias=t(6, dtype="f64"), stride=[2, 1],
            padding=[1, 2], dilation=[1, 2], groups=2, activation=act_name,
            grad_output=t(2, 6, 4, 8, dtype="f64"))  # fmt: skip
for label, weight, groups in (("depthwise", t(4, 1, 3, 3, dtype="f64"), 4),
                              ("gemm", t(3, 4, 3, 3, dtype="f64"), 1)):  # fmt: skip
    add(grad_grad_op(CONV), ANY, f"double-backward-{label}", env={"TORCH_EXT_CONV_ROUTE":
        "own"}, match="double|create_graph|second", input=t(1, 4, 5, 5, dtype="f64"),
        weight=weight, groups=groups, v=t(1, weight.shape[0], 3, 3, dtype="f64"),
        w=t(1, 4, 5, 5, dtype="f64"))  # fmt: skip


def conv_forward_valid(r):
    x, weight, bias, stride, dilation, groups = conv_geometry(r)
    return dict(input=x, weight=weight, bias=bias, stride=stride,
                padding=[r.randint(0, 3) for _ in range(4)], dilation=dilation, groups=groups,
                activation=r.choice(ACTIVATIONS), save_preact=r.random() < 0.5)  # fmt: skip


for _ in range(6):
    add(CONV_FWD, OK, "random", env=rng.choice(ROUTES), **conv_forward_valid(rng))
fwd_base = dict(input=t(1, 2, 6, 6), weight=t(4, 2, 3, 3), bias=None, stride=[1, 1],
                padding=[0, 1, 2, 1], dilation=[1, 1], groups=1, activation="silu",
                save_preact=True)  # fmt: skip
for name, values in {
    "padding": [[1, 1, 1], [-1, 0, 0, 0], [2**62, 0, 2**62, 0], [0, I64_MAX, 0, 1]],
    "dilation": [[2**62, 1], [1, 3074457345618258602], [0, 1]],
    "stride": [[0, 1], [1, -1]],
    "groups": [0, 3],
    "activation": ["sigmoid"],
}.items():
    for value in values:
        add(CONV_FWD, ERR, f"{name}={fmt(value)}", match=conv_match.get(name, name),
            **{**fwd_base, name: value})  # fmt: skip
add(CONV_FWD, OK, "meta", **{**fwd_base, "input": t(1, 2, 6, 6, device="meta"),
    "weight": t(4, 2, 3, 3, device="meta")})  # fmt: skip
add(CONV_FWD, ERR, "meta-padding-overflow", match="padding|output", **{**fwd_base, "input": t(
    1, 2, 6, 6, device="meta"), "weight": t(4, 2, 3, 3, device="meta"),
    "padding": [2**62, 0, 2**62, 0]})  # fmt: skip


def conv_saved(activation):
    def fn(a):
        pre = conv_ref(pad4(a["input"], a["padding"]), a["weight"], None, a["stride"], 0,
                       a["dilation"], a["groups"])  # fmt: skip
        return act(activation, pre) if activation == "relu" else pre

    return Derived(f"{'output' if activation == 'relu' else 'pre-activation'} of the conv", fn)


def conv_backward_valid(r):
    x, weight, _, stride, dilation, groups = conv_geometry(r, dtypes=("f32", "f64"))
    padding = [r.randint(0, 2) for _ in range(4)]
    activation = r.choice(ACTIVATIONS)
    out_h = (x.shape[2] + padding[0] + padding[2] - dilation[0] * (weight.shape[2] - 1) - 1)
    out_w = (x.shape[3] + padding[1] + padding[3] - dilation[1] * (weight.shape[3] - 1) - 1)
    grad = t(x.shape[0], weight.shape[0], out_h // stride[0] + 1, out_w // stride[1] + 1,
             dtype=x.dtype)  # fmt: skip
    return dict(grad_output=grad, input=x, weight=weight, stride=stride, padding=padding,
                dilation=dilation, groups=groups, saved=conv_saved(activation),
                activation=activation,
                output_mask=[r.random() < 0.7, r.random() < 0.7, r.random() < 0.5])  # fmt: skip


for _ in range(6):
    add(CONV_BWD, OK, "random", env=rng.choice(ROUTES), **conv_backward_valid(rng))
bwd_base = dict(grad_output=t(1, 4, 4, 6), input=t(1, 2, 6, 6), weight=t(4, 2, 3, 3),
                stride=[1, 1], padding=[0, 1, 0, 1], dilation=[1, 1], groups=1,
                saved=t(1, 4, 4, 6), activation="relu", output_mask=[True, True, True])
for name, values in {
    "grad_output": [t(1, 4, 4, 5), t(1, 4, 4, 6, dtype="f64"), t(4, 4, 6)],
    "saved": [t(1, 4, 4, 5), t(0)],
    "dilation": [[2**62, 1], [1, 3074457345618258602]],
    "padding": [[0, 1, 0], [2**62, 0, 2**62, 0], [-1, 0, 0, 0]],
    "groups": [0, I64_MIN],
    "activation": ["swish"],
}.items():
    for value in values:
        add(CONV_BWD, ERR, f"{name}={fmt(value)}", match=conv_match.get(name, name),
            **{**bwd_base, name: value})  # fmt: skip
add(CONV_BWD, OK, "meta", **{k: T(v.shape, v.dtype, device="meta") if isinstance(v, T) else v
                             for k, v in bwd_base.items()})  # fmt: skip
add(CONV_BWD, ERR, "meta-grad_output-shape", match="grad_output",
    **{k: T(v.shape, v.dtype, device="meta") if isinstance(v, T) else v
       for k, v in {**bwd_base, "grad_output": t(1, 4, 5, 6)}.items()})  # fmt: skip

for _ in range(4):
    args = conv_forward_valid(rng)
    add(ROUTE, OK, "random", env=rng.choice(ROUTES), input=args["input"], weight=args["weight"],
        padding=args["padding"], groups=args["groups"])  # fmt: skip
for name, value in {"groups": 0, "padding": [1, 1, 1], "input": t(2, 4, 9)}.items():
    add(ROUTE, ERR, f"{name}={fmt(value)}", match=name, **{"input": t(2, 4, 9, 8),
        "weight": t(6, 2, 3, 3), "padding": [1, 1, 1, 1], "groups": 2, name: value})  # fmt: skip

# ---- confusion_matrix, _confusion_matrix_accumulate, segmentation_metrics


def labels_and_scores(r, k, in_range=True):
    """(pred, target): integer labels, or float scores [N, K, *S] against target [N, *S]."""
    n, spatial = r.choice((0, 1, 2, 3)), [r.randint(1, 5) for _ in range(r.randint(0, 2))]
    hi = k if in_range else k + 2
    lo = 0 if in_range else -2
    tdtype = r.choice(("u8", "i16", "i32", "i64")) if in_range else r.choice(("i16", "i32", "i64"))
    layouts = ("contiguous", "transposed", "sliced", "expanded") if spatial else ("contiguous",)
    target = t(n, *spatial, dtype=tdtype, fill=f"int:{lo}:{hi}", layout=r.choice(layouts))
    if r.random() < 0.5:
        pred = t(n, *spatial, dtype=r.choice(("u8", "i16", "i32", "i64")) if in_range else "i64",
                 fill=f"int:{lo}:{hi}", layout=r.choice(layouts))  # fmt: skip
    else:
        playouts = layouts + (("channels_last",) if len(spatial) == 2 else ())
        pred = t(n, k, *spatial, dtype=r.choice(FLOATS), layout=r.choice(playouts),
                 fill=r.choice(("randn", "special")))  # fmt: skip
    return pred, target


def confusion_valid(r):
    k = r.randint(1, 5)
    pred, target = labels_and_scores(r, k)
    return dict(pred=pred, target=target, num_classes=k,
                ignore_index=r.choice((None, 0, k - 1, 255, I64_MAX)), validate=True)


for _ in range(10):
    add(CONFMAT, OK, "random", **confusion_valid(rng))
for _ in range(3):
    k = rng.randint(1, 4)
    pred, target = labels_and_scores(rng, k, in_range=False)
    add(CONFMAT, OK, "random-out-of-range-unvalidated", pred=pred, target=target, num_classes=k,
        ignore_index=rng.choice((None, -1)), validate=False)  # fmt: skip
labels_base = dict(pred=data([[0, 1], [2, 1]]), target=data([[1, 1], [2, 0]]), num_classes=3)
scores_base = dict(pred=t(2, 3, 2), target=data([[1, 1], [2, 0]]), num_classes=3)
for base_name, base_args in (("labels", labels_base), ("scores", scores_base)):
    for name, values in {
        "num_classes": [0, -1, 2**31, 2**62, I64_MAX, I64_MIN, HUGE_PY]
                       + [2] * (base_name == "scores"),  # (the scores have 3 classes)
        "target": [t(2, 2, dtype="f32"), t(2, 2, dtype="bool", fill="int:0:2"),
                   data([[0, 3], [0, 0]]), data([[-1, 0], [0, 0]]), data([[0, 1]]),
                   data([0, 1, 0, 1])],
        "pred": [t(2, 2, dtype="i8", fill="int:0:2"), data([[0, 3], [1, 1]]), t(2, 4, 2),
                 t(2, 3, 3), data([[-2, 0], [0, 0]], "i32")],
    }.items():
        for value in values:
            add(CONFMAT, ERR, f"{base_name}-{name}={fmt(value)}", match=name,
                **{**base_args, name: value})  # fmt: skip
add(CONFMAT, ERR, "scores-without-class-dim", match="pred", pred=t(2, 3), target=data([[0, 1, 1],
    [1, 0, 1]]), num_classes=2)  # fmt: skip
add(CONFMAT, ERR, "device-mismatch", match="device", pred=t(6, dtype="i64", fill="int:0:2",
    device="meta"), target=t(6, dtype="i64", fill="int:0:2"), num_classes=2)  # fmt: skip
add(CONFMAT, OK, "ignore_index-int64-min", pred=t(4, 5, dtype="i64", fill="int:0:3"),
    target=t(4, 5, dtype="i64", fill="int:0:3"), num_classes=3, ignore_index=I64_MIN)  # fmt: skip
add(CONFMAT, OK, "scores-overlapping", pred=t(2, 3, 4, 4, layout="overlapping"),
    target=t(2, 4, 4, dtype="i64", fill="int:0:3", layout="expanded"), num_classes=3)  # fmt: skip
add(CONFMAT, OK, "meta", pred=t(2, 3, 4, 4, device="meta"), target=t(2, 4, 4, dtype="i64",
    device="meta"), num_classes=3)  # fmt: skip
add(CONFMAT, ERR, "meta-num_classes-0", match="num_classes", pred=t(2, 4, 4, dtype="i64",
    device="meta"), target=t(2, 4, 4, dtype="i64", device="meta"), num_classes=0)  # fmt: skip


def accumulate_valid(r, k=None):
    k = k or r.randint(1, 4)
    pred, target = labels_and_scores(r, k, in_range=r.random() < 0.5)
    report = r.choice((data([0, I64_MAX]), data([3, 40])))
    return dict(confmat=t(k, k, dtype="i64", fill="int:0:50"), report=report, pred=pred,
                target=target, ignore_index=r.choice((None, 1, -1)))  # fmt: skip


for _ in range(6):
    add(ACCUMULATE, OK, "random", **accumulate_valid(rng))
mutations(ACCUMULATE, rng, lambda r: accumulate_valid(r, 3), {
    "confmat": [t(3, 3, dtype="i32"), t(3, 3, dtype="i64", layout="transposed"),
                t(3, 3, dtype="i64", layout="overlapping"), t(3, 4, dtype="i64"),
                t(3, 3, dtype="i64", device="meta")],
    "report": [data([0, 0, 0]), data([0, 0], "i32"), t(2, dtype="i64", layout="sliced"),
               t(2, dtype="i64", layout="expanded")],
})  # fmt: skip
add(ACCUMULATE, ERR, "confmat-0x0", match="confmat|num_classes",
    **{**accumulate_valid(rng, 3), "confmat": t(0, 0, dtype="i64")})  # fmt: skip
add(ACCUMULATE, OK, "meta", confmat=t(3, 3, dtype="i64", device="meta"), report=t(2, dtype="i64",
    device="meta"), pred=t(2, 3, 4, device="meta"), target=t(2, 4, dtype="u8", device="meta"))

for _ in range(5):
    k = rng.randint(1, 5)
    add(METRICS, OK, "random", confmat=t(k, k, dtype=rng.choice(("i64", "i32", "f64")),
        fill=rng.choice(("int:0:40", "int:0:2", "zeros")),
        layout=rng.choice(("contiguous", "transposed", "sliced", "expanded"))))  # fmt: skip
for name, value in {"1-D": t(3, dtype="i64"), "3-D": t(2, 2, 2, dtype="i64"),
                    "not-square": t(3, 4, dtype="i64")}.items():  # fmt: skip
    add(METRICS, ERR, name, match="confmat|square", confmat=value)
add(METRICS, ANY, "empty-0x0", match="confmat|empty", confmat=t(0, 0, dtype="i64"))
add(METRICS, OK, "meta", confmat=t(4, 4, dtype="i64", device="meta"))

# ---- varlen: unpad_input, _unpad_plan, pad_input, index_first_axis, index_put_first_axis,
# cu_seqlens_from_position_ids, plan_packing, attention


def count(what):
    def fn(a):
        per_row = (a["attention_mask"] != 0).sum(1)
        return int(per_row.sum()) if what == "total" else int(per_row.max()) if len(per_row) else 0

    return Derived(f"{what} of the mask", fn)


def unpad_valid(r, hidden=True):
    b, s = r.choice((0, 1, 2, 3)), r.choice((0, 1, 4, 7))
    mask = t(b, s, dtype=r.choice(("bool", "u8", "i32", "i64")),
             fill=r.choice(("int:0:2", "ones", "zeros")),
             layout=r.choice(("contiguous", "transposed", "sliced")))  # fmt: skip
    args = dict(attention_mask=mask, total_tokens=r.choice((None, count("total"))),
                max_seqlen=r.choice((None, None, count("longest"))))  # fmt: skip
    if hidden:
        rest = r.choice(((), (3,), (2, 2)))
        layout = r.choice(("contiguous", "transposed", "sliced", "expanded", "overlapping"))
        args = dict(hidden=t(b, s, *rest, dtype=r.choice(FLOATS + ("i64",)), layout=layout), **args)
    return args


for _ in range(8):
    add(UNPAD, OK, "random", **unpad_valid(rng))
for _ in range(4):
    add(UNPAD_PLAN, OK, "random", **unpad_valid(rng, hidden=False))
unpad_bad = {
    "max_seqlen": [-5, -1, I64_MIN],
    "total_tokens": [-1, 10**6, I64_MAX, I64_MIN],
    "attention_mask": [t(2, 4, 1, dtype="bool"), t(2, 4, dtype="f32"), t(8, dtype="bool")],
}
fixed_mask = data([[1, 1, 0, 1], [0, 0, 1, 0]], "bool")
unpad_base = dict(hidden=t(2, 4, 3), attention_mask=fixed_mask)
for name, values in unpad_bad.items():
    for value in values:
        add(UNPAD, ERR, f"{name}={fmt(value)}", match=name, **{**unpad_base, name: value})
        add(UNPAD_PLAN, ERR, f"{name}={fmt(value)}", match=name,
            **{"attention_mask": fixed_mask, name: value})  # fmt: skip
add(UNPAD, ERR, "max_seqlen-below-longest-row", match="max_seqlen", **unpad_base, max_seqlen=2)
add(UNPAD, ANY, "max_seqlen-above-seqlen", match="max_seqlen", **unpad_base, max_seqlen=9)
add(UNPAD, ERR, "max_seqlen=2**63", match="max_seqlen", **unpad_base, max_seqlen=HUGE_PY)
for name, value in {"hidden": t(8), "attention_mask": data([[1, 1, 0]], "bool")}.items():
    add(UNPAD, ERR, f"{name}={fmt(value)}", match="hidden|attention_mask",
        **{**unpad_base, name: value})  # fmt: skip


def rows(r, n_rows, n, unique=False):
    """n random row indices below n_rows (unique ones when asked)."""
    return r.sample(range(n_rows), min(n, n_rows)) if unique else [
        r.randrange(n_rows) for _ in range(n if n_rows else 0)]  # fmt: skip


def pad_valid(r):
    b, s = r.randint(0, 3), r.randint(0, 5)
    nnz = r.randint(0, b * s)
    rest = r.choice(((), (3,), (2, 2)))
    return dict(hidden_unpad=t(nnz, *rest, dtype=r.choice(FLOATS + ("i32",)), fill="int:-5:5"),
                indices=data(sorted(rows(r, b * s, nnz, unique=True))), batch=b, seqlen=s)


for _ in range(4):
    add(PAD, OK, "random", **pad_valid(rng))
pad_base = dict(hidden_unpad=t(3, 2), indices=data([0, 4, 5]), batch=2, seqlen=3)
for name, values in {
    "indices": [data([0, 4, 6]), data([0, -1, 5]), data([0, I64_MAX, 5]), data([0, 4], "i64"),
                data([0, 4, 5], "i32"), data([[0, 4, 5]])],
    "batch": [-1, 2**62, I64_MIN],
    "seqlen": [-3, 2**62, I64_MAX],
    "hidden_unpad": [t()],
}.items():
    for value in values:
        add(PAD, ERR, f"{name}={fmt(value)}", match=name if name != "indices" else "indices|hidden",
            **{**pad_base, name: value})  # fmt: skip
add(PAD, SAFE, "duplicate-indices", match="indices|unique|duplicate",
    **{**pad_base, "indices": data([4, 4, 0])})  # fmt: skip
add(PAD, OK, "meta", **{**pad_base, "hidden_unpad": t(3, 2, device="meta"),
    "indices": t(3, dtype="i64", device="meta")})  # fmt: skip
add(grad_op(PAD, ("hidden_unpad",)), OK, "grad", hidden_unpad=t(3, 2, dtype="f64"),
    indices=data([5, 0, 2]), batch=2, seqlen=3, grad_output=t(2, 3, 2, dtype="f64"))


def gather_valid(r):
    n_rows, n = r.randint(1, 8), r.randint(0, 10)
    rest = r.choice(((), (3,), (2, 3)))
    return dict(input=t(n_rows, *rest, dtype=r.choice(FLOATS + ("i64", "bool")), fill="int:0:2",
                        layout=r.choice(("contiguous", "sliced", "expanded", "overlapping"))),
                indices=t(n, dtype="i64", fill=f"int:0:{n_rows}",
                          layout=r.choice(("contiguous", "sliced", "expanded"))))  # fmt: skip


for _ in range(8):
    add(GATHER, OK, "random", **gather_valid(rng))
mutations(GATHER, rng, gather_valid, {
    "indices": [data([-1]), data([0, 8]), data([I64_MAX]), data([I64_MIN]), data([0], "i32"),
                data([[0]]), data([0.0], "f32")],
    "input": [t()],
})  # fmt: skip
add(GATHER, ERR, "indices-on-meta", match="indices|device", input=t(4, 2),
    indices=t(2, dtype="i64", device="meta"))  # fmt: skip
add(GATHER, OK, "expanded-2**31-elements", input=t(2**21, 1024, layout="expanded"),
    indices=data([5, 2**21 - 1]))  # fmt: skip
add(GATHER, OK, "meta-2**31+1-indices", input=t(5, 3, device="meta"),
    indices=t(2**31 + 1, dtype="i64", device="meta"))  # fmt: skip
add(grad_op(GATHER), OK, "grad-duplicate-indices", input=t(4, 3, dtype="f64"),
    indices=data([1, 1, 3, 1]), grad_output=t(4, 3, dtype="f64"))  # fmt: skip


def scatter_valid(r):
    dim, rest = r.randint(0, 8), r.choice(((), (3,), (2, 2)))
    idx = rows(r, dim, r.randint(0, dim), unique=True)
    return dict(values=t(len(idx), *rest, dtype=r.choice(FLOATS + ("i64",)), fill="int:-3:3",
                layout=r.choice(("contiguous", "sliced"))), indices=data(idx),
                first_axis_dim=dim)  # fmt: skip


for _ in range(6):
    add(SCATTER, OK, "random", **scatter_valid(rng))
scatter_base = dict(values=t(2, 4), indices=data([3, 0]), first_axis_dim=5)
for name, values in {
    "first_axis_dim": [-1, 2**62, I64_MAX, I64_MIN],
    "indices": [data([3, 5]), data([-1, 0]), data([3]), data([3, 0], "i32")],
    "values": [t()],
}.items():
    for value in values:
        add(SCATTER, ERR, f"{name}={fmt(value)}", match=name if name != "indices" else
            "indices|values", **{**scatter_base, name: value})  # fmt: skip
add(SCATTER, SAFE, "duplicate-indices", match="indices|unique|duplicate",
    **{**scatter_base, "indices": data([1, 1])})  # fmt: skip
add(SCATTER, OK, "meta", values=t(2, 4, device="meta"), indices=t(2, dtype="i64", device="meta"),
    first_axis_dim=2**40)  # fmt: skip
add(grad_op(SCATTER, ("values",)), OK, "grad", values=t(3, 2, dtype="f64"), indices=data([4, 0, 2]),
    first_axis_dim=6, grad_output=t(6, 2, dtype="f64"))  # fmt: skip


def position_ids(r):
    """Packed rows: positions 0, 1, ... restarting at every sequence."""
    n_rows, seqlen = r.choice((0, 1, 2, 3)), r.choice((0, 1, 5, 9))
    if n_rows * seqlen == 0:
        return t(n_rows, seqlen, dtype="i64")
    table = []
    for _ in range(n_rows):
        row: list[int] = []
        while len(row) < seqlen:
            row += range(r.randint(1, 4))
        table.append(row[:seqlen])
    return data(table, r.choice(("i64", "i32", "i16", "u8")),
                layout=r.choice(("contiguous", "transposed", "sliced")))  # fmt: skip


for _ in range(6):
    add(CU_SEQLENS, OK, "random", position_ids=position_ids(rng))
for value in (t(2, 3), t(6, dtype="i64"), t(1, 2, 3, dtype="i64"), t(2, 3, dtype="bool")):
    add(CU_SEQLENS, ERR, f"position_ids={fmt(value)}", match="position_ids", position_ids=value)
add(CU_SEQLENS, ERR, "issue14-expanded-2**31-tokens", match="position_ids|tokens|int32|2\\^31",
    position_ids=t(1, 2**31, dtype="i64", fill="zeros", layout="expanded1"))  # fmt: skip
add(CU_SEQLENS, OK, "expanded-all-restarts", position_ids=t(3, 1000, dtype="i32", fill="zeros",
    layout="expanded1"))  # fmt: skip


def packing_valid(r):
    capacity = r.choice((1, 5, 16, I64_MAX))
    truncate = r.random() < 0.3
    hi = min(capacity + (3 if truncate else 1), 2**62)
    lengths = [r.randrange(hi) for _ in range(r.randint(0, 12))]
    return dict(lengths=lengths, capacity=capacity, strategy=r.choice(("ffd", "bfd")),
                truncate=truncate)  # fmt: skip


for _ in range(6):
    add(PACKING, OK, "random", **packing_valid(rng))
for _ in range(3):
    args = packing_valid(rng)
    dtype = "i64" if args["capacity"] > 100 else rng.choice(("i64", "i32", "i16"))
    add(PACKING_RAW, OK, "random", **{**args, "lengths": data(args["lengths"], dtype,
        layout=rng.choice(("contiguous", "sliced")))})  # fmt: skip
mutations(PACKING, rng, packing_valid, {
    "lengths": [[1.9, 2.9], [3, -1], [[1, 2]], ["a"], [I64_MIN]],
    "capacity": [0, -1, I64_MIN, HUGE_PY],
    "strategy": ["first-fit", ""],
})  # fmt: skip
add(PACKING, ERR, "longer-than-capacity", match="capacity|lengths", lengths=[3, 9], capacity=5)
add(PACKING_RAW, ERR, "lengths-f32", match="lengths", lengths=data([1.9, 2.9], "f32"), capacity=4)
add(PACKING_RAW, ERR, "lengths-bool", match="lengths", lengths=data([True], "bool"), capacity=4)
add(PACKING_RAW, OK, "meta", lengths=t(7, dtype="i64", device="meta"), capacity=4)
add(PACKING_RAW, ERR, "meta-capacity-0", match="capacity", lengths=t(7, dtype="i64",
    device="meta"), capacity=0)  # fmt: skip


def attention_valid(r):
    tokens, kv_heads, groups, dim = (r.randint(1, n) for n in (12, 2, 2, 8))
    cuts = sorted(r.sample(range(1, tokens), r.randint(0, min(3, tokens - 1))))
    dtype = r.choice(("f32", "f64"))
    return dict(q=t(tokens, kv_heads * groups, dim, dtype=dtype), k=t(tokens, kv_heads, dim,
                dtype=dtype), v=t(tokens, kv_heads, dim, dtype=dtype),
                cu_seqlens=data([0, *cuts, tokens], "i32"), max_seqlen=tokens,
                causal=r.random() < 0.7, scale=r.choice((None, 0.3)))  # fmt: skip


for _ in range(4):
    add(ATTENTION, OK, "random", **attention_valid(rng))
attention_base = dict(q=t(5, 2, 4), k=t(5, 1, 4), v=t(5, 1, 4), cu_seqlens=data([0, 2, 5], "i32"),
                      max_seqlen=3)  # fmt: skip
for bounds in ([0, 3, 2, 5], [0, 3, 9], [], [0, -1, 5]):
    add(ATTENTION, ERR, f"cu_seqlens={fmt(bounds)}", match="cu_seqlens",
        **{**attention_base, "cu_seqlens": data(bounds, "i32")})  # fmt: skip
add(ATTENTION, ERR, "cu_seqlens-i64", match="cu_seqlens", **{**attention_base,
    "cu_seqlens": data([0, 2, 5], "i64")})  # fmt: skip
for bounds in ([0, 2, 4], [1, 5], [0]):  # tokens outside every sequence: zeros, as documented
    add(ATTENTION, OK, f"cu_seqlens={fmt(bounds)}", **{**attention_base,
        "cu_seqlens": data(bounds, "i32"), "max_seqlen": 5})  # fmt: skip

add(CPU_CAPABILITY, OK, "in-the-documented-set")

# ---- CUDA: the random valid calls of the kernel ops again, on the GPU (references on the CPU)
if CUDA:
    for case in [c for c in CASES.values() if "/random" in c.id]:
        if all(not (isinstance(v, T) and v.device == "meta") for v in case.args.values()):
            CASES[case.id + "@cuda"] = Case(case.id + "@cuda", case.op, case.expect, case.args,
                                            case.match, case.env)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Cases that check the runner itself (test_fuzz.py); never part of the table


def _segfault():
    import ctypes

    ctypes.string_at(0)


HARNESS = {
    "_harness/ok": Op("_harness", "ok", lambda: 1, lambda: 1),
    "_harness/segfault": Op("_harness", "segfault", _segfault),
    "_harness/allocate-16GiB": Op("_harness", "alloc", lambda: torch.ones(2**32)),
    "_harness/hang": Op("_harness", "hang", lambda: __import__("time").sleep(3600)),
}


def find(case_id: str) -> Case:
    if case_id in HARNESS:
        return Case(case_id, HARNESS[case_id], OK, {})
    return CASES[case_id]


def cap_address_space() -> None:
    status = open("/proc/self/status").read()
    size = int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))


def main(ids: list[str]) -> None:
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what the ops or torch print goes to stderr, not into the results
    if not CUDA or not any(i.endswith("@cuda") for i in ids):
        cap_address_space()  # (CUDA maps far more address space than it uses)
    print(json.dumps({"ready": True}), file=results)
    for case_id in ids:
        print(json.dumps(run_case(find(case_id))), file=results)


if __name__ == "__main__":
    main(sys.argv[1:])
