"""torch_ext.spp and torch_ext.sppf (and their modules) against plain PyTorch compositions.

Every check compares with an independent reference built from PyTorch's own pooling ops:
outputs and gradients (autograd through the reference), float32/float64 against float64,
float16/bfloat16 against float32, on odd shapes, empty batches, channels_last and
non-contiguous inputs, ties and NaNs; plus gradcheck, opcheck, torch.compile, autocast,
determinism, the nn modules, argument errors and every compiled CPU instruction set.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from dtype_tables import FLOATS, HALF_TOL, HALVES, REF_DTYPE
from layouts import layout_tensor

import torch_ext
from torch_ext.nn import SPPF, SpatialPyramidPooling

ops = torch.ops.torch_ext

# ---------------------------------------------------------------- references


def spp_reference(x: torch.Tensor, levels, mode: str) -> torch.Tensor:
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return torch.cat([pool(x, level).flatten(1) for level in levels], 1)


def sppf_reference(x: torch.Tensor, kernel_size: int, repeats: int) -> torch.Tensor:
    stages = [x]
    for _ in range(repeats):
        stages.append(F.max_pool2d(stages[-1], kernel_size, 1, kernel_size // 2))
    return torch.cat(stages, 1)


TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    **HALF_TOL,
}

# ---------------------------------------------------------------- inputs


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def draw(shape, gen, values: str = "randn") -> torch.Tensor:
    """float64 CPU data: "randn"; "ties" (integers 0..2: many equal maxima); "distinct" (a
    random permutation of 0..numel-1: no ties, so max pooling is differentiable everywhere)."""
    if values == "randn":
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    if values == "ties":
        return torch.randint(0, 3, shape, generator=gen).double()
    if values == "distinct":
        numel = torch.Size(shape).numel()
        return torch.randperm(numel, generator=gen).double().reshape(shape) - numel / 2
    raise ValueError(values)


def make_input(shape, layout, gen, values="randn", *, device="cpu", dtype=torch.float64):
    """(base, view): `base` is the leaf tensor, `view(base)` the [N, C, H, W] input of `shape`
    in `layout`: "contiguous", "channels_last", "transposed" (H and W strides swapped) or
    "sliced" (every other channel of a wider tensor, a column window)."""
    base, view = layout_tensor(
        shape, layout, lambda s: draw(s, gen, values), device=device, dtype=dtype
    )
    x = view(base)
    if layout == "channels_last":
        assert x.is_contiguous(memory_format=torch.channels_last)
    elif layout in ("transposed", "sliced") and x.numel() > 1:
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    return base, view


def run_both(op, reference, base, view, gen):
    """Forward and backward of op(view(leaf)) and of reference(view(leaf')) in the reference
    dtype, with the same grad_output. Returns (out, ref_out, grad, ref_grad)."""
    leaf = base.detach().clone().requires_grad_()
    out = op(view(leaf))
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grad_out = grad_out.to(device=out.device, dtype=out.dtype)
    out.backward(grad_out)

    ref_dtype = REF_DTYPE[base.dtype]
    ref_leaf = base.detach().to(ref_dtype).requires_grad_()
    ref_out = reference(view(ref_leaf))
    ref_out.backward(grad_out.to(ref_dtype))
    assert out.dtype == base.dtype and out.shape == ref_out.shape
    return out, ref_out, leaf.grad, ref_leaf.grad


def assert_forward(out, ref_out, exact: bool, equal_nan: bool = False):
    """Max pooling is exact in any precision: the output equals the reference cast to the
    output's dtype. Averages are compared with the dtype's tolerance."""
    if exact:
        torch.testing.assert_close(out, ref_out.to(out.dtype), rtol=0, atol=0, equal_nan=equal_nan)
    else:
        torch.testing.assert_close(
            out.to(ref_out.dtype), ref_out, equal_nan=equal_nan, **TOL[out.dtype]
        )


def assert_grad(grad, ref_grad):
    torch.testing.assert_close(grad.to(ref_grad.dtype), ref_grad, **TOL[grad.dtype])


def check_spp(base, view, levels, mode, gen, *, equal_nan=False):
    """spp forward (training and inference paths) and backward against the reference."""
    op = lambda t: torch_ext.spp(t, levels, mode)
    ref = lambda t: spp_reference(t, levels, mode)
    out, ref_out, grad, ref_grad = run_both(op, ref, base, view, gen)
    assert_forward(out, ref_out, exact=mode == "max", equal_nan=equal_nan)
    assert_grad(grad, ref_grad)
    # Without autograd the kernel skips the argmax bookkeeping: a separate code path.
    with torch.no_grad():
        assert_forward(op(view(base)), ref_out, exact=mode == "max", equal_nan=equal_nan)
    return grad


def check_sppf(base, view, kernel_size, repeats, gen, *, equal_nan=False):
    op = lambda t: torch_ext.sppf(t, kernel_size, repeats)
    ref = lambda t: sppf_reference(t, kernel_size, repeats)
    out, ref_out, grad, ref_grad = run_both(op, ref, base, view, gen)
    assert_forward(out, ref_out, exact=True, equal_nan=equal_nan)
    # The cascade in the input's own dtype must give exactly the same values too.
    torch.testing.assert_close(out, ref(view(base)), rtol=0, atol=0, equal_nan=equal_nan)
    assert_grad(grad, ref_grad)
    with torch.no_grad():
        assert_forward(op(view(base)), ref_out, exact=True, equal_nan=equal_nan)
    return out, grad


# ---------------------------------------------------------------- spp: values and gradients

SPP_SHAPES = [
    pytest.param((2, 3, 8, 8), id="2x3x8x8"),
    pytest.param((1, 5, 7, 9), id="odd-1x5x7x9"),
    pytest.param((2, 4, 3, 2), id="smaller-than-level-2x4x3x2"),
    pytest.param((1, 2, 1, 1), id="1x1-map"),
    pytest.param((3, 2, 13, 1), id="one-column-3x2x13x1"),
    pytest.param((2, 20, 11, 37), id="wide-2x20x11x37"),
    pytest.param((1, 300, 5, 6), id="300-channels"),
]
LEVELS = [
    pytest.param((1, 2, 4), id="L1-2-4"),
    pytest.param((3, 1, 6), id="L3-1-6"),
    pytest.param((2, 2, 1), id="L2-2-1"),
]


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("shape", SPP_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_matches_reference(device, mode, dtype, shape, levels, gen):
    base, view = make_input(shape, "contiguous", gen, device=device, dtype=dtype)
    check_spp(base, view, levels, mode, gen)


def test_fresh_random_shapes(device):
    """New shapes, levels, kernel sizes and values on every run (the seed is in the message)."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = torch.Generator().manual_seed(seed)

    def pick(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=rng))

    for case in range(12):
        shape = (pick(1, 3), pick(1, 40), pick(1, 33), pick(1, 33))
        layout = ["contiguous", "channels_last"][case % 2]
        where = f"seed {seed}, case {case}, shape {shape}, {layout}"
        values = ["randn", "ties"][pick(0, 1)]
        levels = tuple(pick(1, 7) for _ in range(pick(1, 4)))
        for mode in ("max", "avg"):
            x = make_input(shape, layout, rng, values, device=device)[0].requires_grad_()
            ref_x = x.detach().clone().requires_grad_()
            out, ref = torch_ext.spp(x, levels, mode), spp_reference(ref_x, levels, mode)
            grad = torch.randn(ref.shape, generator=rng, dtype=ref.dtype).to(device)
            out.backward(grad)
            ref.backward(grad)
            msg = f"spp {mode} levels={levels}: {where}"
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=msg)
            torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12, msg=msg)
        kernel_size, repeats = 2 * pick(0, 4) + 1, pick(1, 4)
        x = make_input(shape, layout, rng, values, device=device)[0].requires_grad_()
        ref_x = x.detach().clone().requires_grad_()
        out = torch_ext.sppf(x, kernel_size, repeats)
        ref = sppf_reference(ref_x, kernel_size, repeats)
        grad = torch.randn(ref.shape, generator=rng, dtype=ref.dtype).to(device)
        out.backward(grad)
        ref.backward(grad)
        msg = f"sppf k={kernel_size} repeats={repeats}: {where}"
        assert torch.equal(out, ref), msg
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12, msg=msg)


@pytest.mark.parametrize("shape", [(2, 20, 11, 37), (2, 3, 5, 3), (1, 300, 5, 6)], ids=shape_id)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_layouts(device, mode, dtype, layout, shape, gen):
    base, view = make_input(shape, layout, gen, device=device, dtype=dtype)
    grad = check_spp(base, view, (1, 2, 4), mode, gen)
    assert grad.stride() == base.stride()  # the gradient keeps the leaf's layout


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALVES, ids=dtype_id)
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_half_precision(device, mode, dtype, layout, gen):
    base, view = make_input((2, 20, 11, 37), layout, gen, device=device, dtype=dtype)
    check_spp(base, view, (3, 1, 6), mode, gen)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_empty_batch(device, mode, layout, gen):
    base, view = make_input((0, 3, 6, 5), layout, gen, device=device)
    out, ref_out, grad, ref_grad = run_both(
        lambda t: torch_ext.spp(t, (1, 2, 4), mode),
        lambda t: spp_reference(t, (1, 2, 4), mode),
        base,
        view,
        gen,
    )
    assert out.shape == ref_out.shape == (0, 3 * 21)
    assert grad.shape == ref_grad.shape == (0, 3, 6, 5)
    with torch.no_grad():
        assert torch_ext.spp(base, (1, 2, 4), mode).shape == (0, 3 * 21)


@pytest.mark.parametrize(
    "shape,levels",
    [((2, 20, 12, 37), (1, 2, 4)), ((1, 3, 5, 7), (3, 1, 6)), ((2, 17, 6, 6), (4, 2))],
    ids=["2x20x12x37-L1-2-4", "1x3x5x7-L3-1-6", "2x17x6x6-L4-2"],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
def test_spp_max_ties_route_gradients_like_pytorch(device, dtype, layout, shape, levels, gen):
    """Integer values 0..2 make most bins' maxima ties: each bin's gradient must go to the
    same element as PyTorch's (the first in row-major order); a wrong pick is an O(1) error."""
    base, view = make_input(shape, layout, gen, "ties", device=device, dtype=dtype)
    check_spp(base, view, levels, "max", gen)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_nan_propagates_like_pytorch(device, mode, dtype, layout, gen):
    base, view = make_input((2, 20, 9, 37), layout, gen, device=device, dtype=dtype)
    nan_mask = torch.rand(base.shape, generator=gen) < 0.02
    base = base.masked_fill(nan_mask.to(base.device), float("nan"))
    check_spp(base, view, (1, 2, 4), mode, gen, equal_nan=True)
    out = torch_ext.spp(base, (1, 2, 4), mode)
    assert out.isnan().any() and not out.isnan().all()  # the case is meaningful


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_infinities(device, mode, layout, gen):
    """+-inf values, and a plane of only -inf (whose maximum is -inf)."""
    base, view = make_input((2, 18, 7, 9), layout, gen, device=device)
    base = base.masked_fill((base > 1.5).to(base.device), float("inf"))
    base = base.masked_fill((base < -1.5).to(base.device), float("-inf"))
    base[1, 3] = float("-inf")
    check_spp(base, view, (1, 2, 4), mode, gen, equal_nan=True)


def test_spp_default_arguments(device, gen):
    x = draw((2, 3, 7, 6), gen).to(device)
    expected = spp_reference(x, (1, 2, 4), "max")
    torch.testing.assert_close(torch_ext.spp(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(ops.spp(x), expected, rtol=0, atol=0)


def test_spp_levels_accept_any_sequence(gen):
    x = draw((1, 2, 5, 5), gen)
    expected = spp_reference(x, (3, 1), "avg")
    torch.testing.assert_close(torch_ext.spp(x, [3, 1], "avg"), expected)
    torch.testing.assert_close(torch_ext.spp(x, range(3, 0, -2), "avg"), expected)


# ---------------------------------------------------------------- sppf: values and gradients


@pytest.mark.parametrize("repeats", [1, 2, 3, 4])
@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
def test_sppf_matches_cascade(device, kernel_size, repeats, gen):
    base, view = make_input((2, 3, 9, 11), "contiguous", gen, device=device)
    out, _ = check_sppf(base, view, kernel_size, repeats, gen)
    assert out.shape == (2, 3 * (repeats + 1), 9, 11)


SPPF_SHAPES = [
    pytest.param((1, 1, 1, 1), id="1x1-map"),
    pytest.param((2, 3, 2, 3), id="smaller-than-kernel-2x3x2x3"),
    pytest.param((1, 2, 6, 1), id="one-column-1x2x6x1"),
    pytest.param((1, 20, 13, 37), id="wide-1x20x13x37"),
    pytest.param((1, 300, 4, 5), id="300-channels"),
]


@pytest.mark.parametrize("kernel_size", [5, 7])
@pytest.mark.parametrize("shape", SPPF_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
def test_sppf_shapes(device, dtype, shape, kernel_size, gen):
    base, view = make_input(shape, "contiguous", gen, device=device, dtype=dtype)
    check_sppf(base, view, kernel_size, 3, gen)


# On CUDA, NCHW planes that fit in 48 KiB of shared memory take kernels that hold a plane per
# block (sppf: 6144 float32 elements forward, fewer backward and in float64; spp's forward
# stages planes up to 12288 float32 elements); larger planes take the tiled and per-element
# kernels; channels_last sppf holds groups of channels as planes, up to half the opt-in shared
# memory (113 KiB on H100/H200) for one channel. 100 x 150 takes the large-plane paths of both
# ops, in both dtypes and layouts.
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_planes_beyond_shared_memory(device, dtype, layout, gen):
    base, view = make_input((1, 2, 100, 150), layout, gen, "ties", device=device, dtype=dtype)
    check_sppf(base, view, 5, 3, gen)
    for mode in ("max", "avg"):
        check_spp(base, view, (1, 2, 4), mode, gen)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
def test_sppf_layouts(device, dtype, layout, gen):
    base, view = make_input((2, 20, 9, 37), layout, gen, device=device, dtype=dtype)
    out, grad = check_sppf(base, view, 5, 3, gen)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert grad.stride() == base.stride()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALVES, ids=dtype_id)
def test_sppf_half_precision(device, dtype, layout, gen):
    base, view = make_input((2, 20, 9, 37), layout, gen, device=device, dtype=dtype)
    check_sppf(base, view, 5, 3, gen)


def test_sppf_empty_batch(device, gen):
    base, view = make_input((0, 3, 6, 5), "contiguous", gen, device=device)
    out, ref_out, grad, ref_grad = run_both(
        lambda t: torch_ext.sppf(t, 5, 3), lambda t: sppf_reference(t, 5, 3), base, view, gen
    )
    assert out.shape == ref_out.shape == (0, 12, 6, 5)
    assert grad.shape == ref_grad.shape == (0, 3, 6, 5)


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
def test_sppf_ties_route_gradients_like_the_cascade(device, dtype, layout, kernel_size, gen):
    """Integer values 0..2: nearly every window has tied maxima, at every stage."""
    base, view = make_input((2, 18, 9, 37), layout, gen, "ties", device=device, dtype=dtype)
    check_sppf(base, view, kernel_size, 3, gen)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sppf_nan_propagates_like_the_cascade(device, layout, gen):
    base, view = make_input((2, 18, 9, 37), layout, gen, device=device)
    nan_mask = torch.rand(base.shape, generator=gen) < 0.01
    base = base.masked_fill(nan_mask.to(base.device), float("nan"))
    out, _ = check_sppf(base, view, 3, 2, gen, equal_nan=True)
    assert out.isnan().any() and not out.isnan().all()


def test_sppf_infinities(device, gen):
    base, view = make_input((2, 18, 7, 9), "contiguous", gen, device=device)
    base = base.masked_fill((base > 1.5).to(base.device), float("inf"))
    base = base.masked_fill((base < -1.5).to(base.device), float("-inf"))
    base[1, 3] = float("-inf")
    check_sppf(base, view, 5, 3, gen)


def test_sppf_default_arguments(device, gen):
    x = draw((2, 3, 7, 6), gen).to(device)
    expected = sppf_reference(x, 5, 3)
    torch.testing.assert_close(torch_ext.sppf(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(ops.sppf(x), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_gradcheck(device, mode, layout, gen):
    base, view = make_input((2, 3, 5, 7), layout, gen, "distinct", device=device)
    x = base.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: torch_ext.spp(view(t), (1, 2, 3), mode), (x,))


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sppf_gradcheck(device, layout, kernel_size, gen):
    base, view = make_input((1, 2, 6, 5), layout, gen, "distinct", device=device)
    x = base.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: torch_ext.sppf(view(t), kernel_size, 2), (x,))


# ---------------------------------------------------------------- opcheck


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_opcheck(device, mode, layout, requires_grad, gen):
    base, _ = make_input((2, 3, 7, 5), layout, gen, "distinct", device=device)
    x = base.requires_grad_(requires_grad)
    torch.library.opcheck(ops.spp.default, (x, [3, 1, 2], mode))


@pytest.mark.parametrize("need_indices", [False, True])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_forward_op_opcheck(device, mode, need_indices, gen):
    x = draw((2, 3, 7, 5), gen, "distinct").to(device)
    torch.library.opcheck(ops._spp_forward.default, (x, [1, 2, 4], mode, need_indices))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_backward_op_opcheck(device, mode, layout, gen):
    base, _ = make_input((2, 3, 7, 5), layout, gen, "distinct", device=device)
    _, indices = ops._spp_forward(base, [1, 2, 4], mode, True)
    grad_out = torch.randn(2, 3 * 21, generator=gen, dtype=torch.float64).to(device)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.library.opcheck(
        ops._spp_backward.default,
        (grad_out, indices, list(base.shape), [1, 2, 4], mode, memory_format),
    )


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sppf_opcheck(device, layout, requires_grad, gen):
    base, _ = make_input((2, 3, 7, 5), layout, gen, "distinct", device=device)
    x = base.requires_grad_(requires_grad)
    torch.library.opcheck(ops.sppf.default, (x, 3, 2))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sppf_backward_op_opcheck(device, layout, gen):
    base, _ = make_input((2, 3, 7, 5), layout, gen, "distinct", device=device)
    with torch.no_grad():
        output = torch_ext.sppf(base, 3, 2)
    grad_out = torch.randn(output.shape, generator=gen, dtype=torch.float64).to(device)
    torch.library.opcheck(ops._sppf_backward.default, (grad_out, output, 3, 2))


# ---------------------------------------------------------------- torch.compile


def pyramid_features(x):
    """A function using both ops, as a model would."""
    a = torch_ext.spp(x, (1, 2, 4), "max")
    b = torch_ext.spp(x.relu(), (3, 1), "avg")
    c = torch_ext.sppf(x, 3, 2)
    return torch.cat([a, b, c.amax((2, 3))], 1) * 2


def pyramid_features_reference(x):
    a = spp_reference(x, (1, 2, 4), "max")
    b = spp_reference(x.relu(), (3, 1), "avg")
    c = sppf_reference(x, 3, 2)
    return torch.cat([a, b, c.amax((2, 3))], 1) * 2


def check_compiled(compiled, x, gen):
    leaf = x.detach().clone().requires_grad_()
    out = compiled(leaf)
    ref_leaf = x.detach().clone().requires_grad_()
    ref_out = pyramid_features_reference(ref_leaf)
    torch.testing.assert_close(out, ref_out, **TOL[x.dtype])
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    out.backward(grad_out)
    ref_out.backward(grad_out)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, **TOL[x.dtype])


def test_compile_aot_eager_dynamic_shapes(device, gen):
    torch._dynamo.reset()
    compiled = torch.compile(pyramid_features, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape, layout in [((2, 3, 9, 7), "contiguous"), ((3, 4, 6, 11), "channels_last")]:
        base, view = make_input(shape, layout, gen, "distinct", device=device)
        check_compiled(compiled, view(base), gen)


def test_compile_inductor(device, gen):
    torch._dynamo.reset()
    compiled = torch.compile(pyramid_features, backend="inductor", fullgraph=True)
    x = draw((2, 3, 6, 5), gen, "distinct").to(device=device, dtype=torch.float32)
    check_compiled(compiled, x, gen)


# ---------------------------------------------------------------- autocast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_autocast_keeps_dtype_like_pytorch_pooling(device, dtype, gen):
    x = draw((2, 3, 8, 7), gen).to(device=device, dtype=dtype).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        cases = [
            (torch_ext.spp(x, (1, 2), "max"), F.adaptive_max_pool2d(x, 2)),
            (torch_ext.spp(x, (1, 2), "avg"), F.adaptive_avg_pool2d(x, 2)),
            (torch_ext.sppf(x, 5, 2), F.max_pool2d(x, 5, 1, 2)),
        ]
    for out, pooled in cases:
        assert out.dtype == pooled.dtype
    torch.testing.assert_close(cases[0][0], spp_reference(x, (1, 2), "max"), rtol=0, atol=0)
    torch.testing.assert_close(cases[2][0], sppf_reference(x, 5, 2), rtol=0, atol=0)
    sum(out.sum() for out, _ in cases).backward()
    assert x.grad is not None and x.grad.dtype == x.dtype


# ---------------------------------------------------------------- determinism

DETERMINISM_OPS = {
    "spp-max": lambda t: torch_ext.spp(t, (1, 2, 4, 3), "max"),
    "spp-avg": lambda t: torch_ext.spp(t, (1, 2, 4, 3), "avg"),
    "sppf": lambda t: torch_ext.sppf(t, 5, 3),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("op", list(DETERMINISM_OPS))
def test_forward_and_backward_are_deterministic(device, op, dtype, layout, gen):
    """Large enough that the work is split among threads; ties make gradients collide."""
    fn = DETERMINISM_OPS[op]
    base, _ = make_input((4, 24, 19, 23), layout, gen, "ties", device=device, dtype=dtype)
    base = base + torch.randn(base.shape, generator=gen).round(decimals=1).to(base)
    results = []
    for _ in range(2):
        leaf = base.detach().clone().requires_grad_()
        out = fn(leaf)
        out.backward(torch.ones_like(out) * 0.1 + out.detach())
        results.append((out.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spatial_pyramid_pooling_module(device, mode, gen):
    module = SpatialPyramidPooling((3, 1, 6), mode)
    base, view = make_input((2, 5, 9, 8), "contiguous", gen, device=device)
    out, ref_out, grad, ref_grad = run_both(
        module, lambda t: spp_reference(t, (3, 1, 6), mode), base, view, gen
    )
    assert out.shape[1] == module.output_features(5) == 5 * (9 + 1 + 36)
    assert_forward(out, ref_out, exact=mode == "max")
    assert_grad(grad, ref_grad)
    assert SpatialPyramidPooling().levels == (1, 2, 4) and SpatialPyramidPooling().mode == "max"


def test_sppf_module(device, gen):
    module = SPPF(3, 2)
    base, view = make_input((2, 5, 9, 8), "contiguous", gen, device=device)
    out, ref_out, grad, ref_grad = run_both(
        module, lambda t: sppf_reference(t, 3, 2), base, view, gen
    )
    assert_forward(out, ref_out, exact=True)
    assert_grad(grad, ref_grad)
    default = SPPF()
    assert (default.kernel_size, default.repeats) == (5, 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SpatialPyramidPooling(()),
        lambda: SpatialPyramidPooling((1, 0)),
        lambda: SpatialPyramidPooling((-2,)),
        lambda: SpatialPyramidPooling((1, 2), "min"),
        lambda: SPPF(4),
        lambda: SPPF(0),
        lambda: SPPF(-3),
        lambda: SPPF(5, 0),
    ],
    ids=[
        "no-levels",
        "level-0",
        "level-negative",
        "mode",
        "even-kernel",
        "kernel-0",
        "kernel-negative",
        "repeats-0",
    ],
)
def test_modules_reject_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


# ---------------------------------------------------------------- argument errors


F32, I64, I32, U8 = torch.float32, torch.int64, torch.int32, torch.uint8
GOOD = (2, 3, 6, 6)

# (id, input shape, input dtype, call(x), what the message must name)
BAD_ARGUMENTS = [
    ("rank-3", (3, 6, 6), F32, lambda x: torch_ext.spp(x), "input"),
    ("rank-5", (1, 2, 3, 6, 6), F32, lambda x: torch_ext.spp(x), "input"),
    ("no-levels", GOOD, F32, lambda x: torch_ext.spp(x, ()), "levels"),
    ("level-0", GOOD, F32, lambda x: torch_ext.spp(x, (1, 0)), "levels"),
    ("level-negative", GOOD, F32, lambda x: torch_ext.spp(x, (-1, 2)), "levels"),
    ("mode", GOOD, F32, lambda x: torch_ext.spp(x, (1,), "sum"), "mode"),
    ("int64", GOOD, I64, lambda x: torch_ext.spp(x), "input.*float32"),
    ("uint8", GOOD, U8, lambda x: torch_ext.spp(x), "input.*float32"),
    ("height-0", (2, 3, 0, 4), F32, lambda x: torch_ext.spp(x), "height"),
    ("width-0", (2, 3, 4, 0), F32, lambda x: torch_ext.spp(x), "width"),
    ("sppf-rank-3", (3, 6, 6), F32, lambda x: torch_ext.sppf(x), "input"),
    ("sppf-rank-5", (1, 2, 3, 6, 6), F32, lambda x: torch_ext.sppf(x), "input"),
    ("sppf-int32", GOOD, I32, lambda x: torch_ext.sppf(x), "input.*float32"),
    ("sppf-height-0", (2, 3, 0, 4), F32, lambda x: torch_ext.sppf(x), "height"),
    ("sppf-width-0", (2, 3, 4, 0), F32, lambda x: torch_ext.sppf(x), "width"),
    ("sppf-kernel-even", GOOD, F32, lambda x: torch_ext.sppf(x, 4), "kernel_size"),
    ("sppf-kernel-0", GOOD, F32, lambda x: torch_ext.sppf(x, 0), "kernel_size"),
    ("sppf-kernel-negative", GOOD, F32, lambda x: torch_ext.sppf(x, -3), "kernel_size"),
    ("sppf-repeats-0", GOOD, F32, lambda x: torch_ext.sppf(x, 5, 0), "repeats"),
    ("sppf-repeats-negative", GOOD, F32, lambda x: torch_ext.sppf(x, 5, -1), "repeats"),
    # sizes at the int64 edge: an error, never a wrapped (too small) output
    ("level-2^32", GOOD, F32, lambda x: torch_ext.spp(x, (2**32,)), "bins.*64 bits"),
    ("levels-2^32-and-1", GOOD, F32, lambda x: torch_ext.spp(x, (2**32, 1)), "bins.*64 bits"),
    ("level-2^31", GOOD, F32, lambda x: torch_ext.spp(x, (2**31,)), "features.*64 bits"),
    ("level-2^30", GOOD, F32, lambda x: torch_ext.spp(x, (2**30,)), "output.*64 bits"),
    ("sppf-repeats-2^62", GOOD, F32, lambda x: torch_ext.sppf(x, 3, 2**62), "repeats"),
    ("sppf-repeats-int64-max", GOOD, F32, lambda x: torch_ext.sppf(x, 3, 2**63 - 1), "repeats"),
]
BAD_IDS = [case[0] for case in BAD_ARGUMENTS]
BAD_CASES = [case[1:] for case in BAD_ARGUMENTS]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("shape,dtype,call,match", BAD_CASES, ids=BAD_IDS)
def test_bad_arguments_name_the_argument(device, shape, dtype, call, match, requires_grad):
    x = torch.zeros(shape, dtype=dtype, device=device)
    if requires_grad and x.is_floating_point():
        x.requires_grad_()  # through the autograd kernels
    with pytest.raises(RuntimeError, match=match):
        call(x)


@pytest.mark.parametrize("shape,dtype,call,match", BAD_CASES, ids=BAD_IDS)
def test_bad_arguments_are_caught_by_the_fake_kernels(shape, dtype, call, match):
    """The Meta kernels (what torch.compile traces with) check the same things."""
    with pytest.raises(RuntimeError, match=match):
        call(torch.zeros(shape, dtype=dtype, device="meta"))


def test_meta_kernels_give_the_output_shapes():
    x = torch.empty(2, 3, 7, 5, device="meta")
    assert torch_ext.spp(x, (3, 1, 2), "max").shape == (2, 3 * 14)
    assert torch_ext.spp(x.requires_grad_(), (3, 1, 2), "avg").shape == (2, 3 * 14)
    y = torch.empty(2, 3, 7, 5, device="meta").to(memory_format=torch.channels_last)
    out = torch_ext.sppf(y, 5, 2)
    assert out.shape == (2, 9, 7, 5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_sppf_kernel_larger_than_the_map_is_a_global_window(device, gen):
    """Windows reaching past the map on every side cover all of it, whatever their size."""
    x = draw((2, 3, 5, 4), gen).to(device)
    whole = sppf_reference(x, 9, 2)  # 2 * max(H, W) - 1
    for kernel_size in (11, 2**31 + 1, 2**62 + 1):
        torch.testing.assert_close(torch_ext.sppf(x, kernel_size, 2), whole, rtol=0, atol=0)


RAW_BACKWARD_ERRORS = [
    (
        "spp-indices-out-of-range",
        lambda: ops._spp_backward(
            torch.ones(1, 1), torch.tensor([[10**9]]), [1, 1, 2, 2], [1], "max",
            torch.contiguous_format,
        ),
        "indices must lie in",
    ),
    (
        "spp-indices-negative",
        lambda: ops._spp_backward(
            torch.ones(1, 1), torch.tensor([[-1]]), [1, 1, 2, 2], [1], "max",
            torch.contiguous_format,
        ),
        "indices must lie in",
    ),
    (
        "spp-input-size-negative",
        lambda: ops._spp_backward(
            torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long), [1, -1, 2, 2], [1], "max",
            torch.contiguous_format,
        ),
        "input_size",
    ),
    (
        "spp-memory-format",
        lambda: ops._spp_backward(
            torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long), [1, 1, 2, 2], [1], "max",
            torch.preserve_format,
        ),
        "memory_format",
    ),
    (
        "spp-grad-int",
        lambda: ops._spp_backward(
            torch.ones(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
            [1, 1, 2, 2], [1], "avg", torch.contiguous_format,
        ),
        "grad_output",
    ),
    (
        "sppf-kernel-negative",
        lambda: ops._sppf_backward(torch.ones(1, 4, 3, 3), torch.ones(1, 4, 3, 3), -3, 1),
        "kernel_size",
    ),
    (
        "sppf-grad-dtype",
        lambda: ops._sppf_backward(
            torch.ones(1, 4, 3, 3, dtype=torch.float64), torch.ones(1, 4, 3, 3), 3, 1
        ),
        "grad_output.*dtype",
    ),
    (
        "sppf-repeats-huge",
        lambda: ops._sppf_backward(torch.ones(1, 4, 3, 3), torch.ones(1, 4, 3, 3), 3, 2**63 - 1),
        "repeats",
    ),
]


@pytest.mark.parametrize(
    "call,match", [c[1:] for c in RAW_BACKWARD_ERRORS], ids=[c[0] for c in RAW_BACKWARD_ERRORS]
)
def test_raw_backward_ops_validate_their_arguments(call, match):
    """Users can call the private ops directly: they check what they are given."""
    with pytest.raises(RuntimeError, match=match):
        call()


DOUBLE_BACKWARD_OPS = {
    "spp-max": lambda x: torch_ext.spp(x, (1, 2), "max"),
    "spp-avg": lambda x: torch_ext.spp(x, (1, 2), "avg"),
    "sppf": lambda x: torch_ext.sppf(x, 3, 2),
}


@pytest.mark.parametrize("op", DOUBLE_BACKWARD_OPS.values(), ids=DOUBLE_BACKWARD_OPS.keys())
def test_double_backward_is_refused_not_zero(device, op, gen):
    """A gradient penalty differentiates the backward: a clear error, never zeros."""
    x = draw((2, 3, 5, 5), gen).to(device).requires_grad_()
    w = torch.randn(op(x).shape, generator=gen).to(device).requires_grad_()
    # The gradient with respect to x depends on w through the backward op, which has no
    # derivative of its own: refused where the graph would be built.
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad((op(x) * w).sum(), x, create_graph=True)


def test_sppf_backward_on_maps_wider_than_float_can_count(gen):
    """Column numbers above 2^24 are not exact in float lanes: the gradient must still land on
    the right column (compared with autograd through the cascade)."""
    width = 2**24 + 37
    x = torch.zeros(1, 1, 1, width)
    x[0, 0, 0, -5] = 1.0  # the maximum near the far end
    x.requires_grad_()
    grad_out = torch.zeros(1, 2, 1, width)
    grad_out[0, 1, 0, -3:] = torch.tensor([1.0, 2.0, 4.0])
    (ours,) = torch.autograd.grad(torch_ext.sppf(x, 5, 1), x, grad_out)
    (ref,) = torch.autograd.grad(sppf_reference(x, 5, 1), x, grad_out)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert ours[0, 0, 0, -5:].sum() == 7.0  # all of it near the far end


# ---------------------------------------------------------------- every compiled CPU copy

_CAPABILITY_CHECK = r"""
import torch, torch.nn.functional as F, torch_ext

def spp_ref(x, levels, mode):
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return torch.cat([pool(x, l).flatten(1) for l in levels], 1)

def sppf_ref(x, k, r):
    ms = [x]
    for _ in range(r):
        ms.append(F.max_pool2d(ms[-1], k, 1, k // 2))
    return torch.cat(ms, 1)

g = torch.Generator().manual_seed(7)
cases = [
    (torch.float32, torch.float64, 1e-5),
    (torch.float64, torch.float64, 1e-12),
    (torch.float16, torch.float32, 2e-3),
    (torch.bfloat16, torch.float32, 1.6e-2),
]
ops = {
    "spp-max": (lambda t: torch_ext.spp(t, (1, 2, 4, 3), "max"),
                lambda t: spp_ref(t, (1, 2, 4, 3), "max")),
    "spp-avg": (lambda t: torch_ext.spp(t, (1, 2, 4, 3), "avg"),
                lambda t: spp_ref(t, (1, 2, 4, 3), "avg")),
    "sppf": (lambda t: torch_ext.sppf(t, 5, 3), lambda t: sppf_ref(t, 5, 3)),
}
failures = []
for dtype, ref_dtype, tol in cases:
    for layout in (torch.contiguous_format, torch.channels_last):
        for values in ("randn", "ties"):
            shape = (2, 20, 11, 37)
            if values == "randn":
                data = torch.randn(shape, generator=g, dtype=torch.float64)
            else:
                data = torch.randint(0, 3, shape, generator=g).double()
            x = data.to(dtype).contiguous(memory_format=layout)
            for name, (op, ref) in ops.items():
                what = f"{name} {dtype} {layout} {values}"
                try:
                    leaf = x.detach().clone().requires_grad_()
                    out = op(leaf)
                    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
                    out.backward(go)
                    rleaf = x.detach().to(ref_dtype).requires_grad_()
                    rout = ref(rleaf)
                    rout.backward(go.to(ref_dtype))
                    torch.testing.assert_close(out.to(ref_dtype), rout, rtol=tol, atol=tol)
                    torch.testing.assert_close(
                        leaf.grad.to(ref_dtype), rleaf.grad, rtol=tol, atol=tol
                    )
                    with torch.no_grad():
                        torch.testing.assert_close(op(x).to(ref_dtype), rout, rtol=tol, atol=tol)
                except AssertionError as e:
                    failures.append(f"{what}: {e}")
if failures:
    raise SystemExit("\n\n".join(failures))
print("capability=" + torch_ext.cpu_capability())
print("ok")
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512", "avx512_bf16"])
def test_every_cpu_capability_copy(capability):
    """TORCH_EXT_CPU_CAPABILITY caps the kernel copy picked at first use; it is read once per
    process, hence a fresh interpreter per copy (an unsupported cap falls back to the best the
    CPU has, which is still a valid run)."""
    env = dict(os.environ, TORCH_EXT_CPU_CAPABILITY=capability)
    result = subprocess.run(
        [sys.executable, "-c", _CAPABILITY_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"capability {capability}:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip().endswith("ok")
    # The choice took effect: the copy in use is the one asked for, or the best this CPU has
    # when it lacks that one (read independently from the CPU's flags).
    assert used_capability(result.stdout) == expected_capability(capability), result.stdout


def cpu_supported_capability() -> str:
    flags = set()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


def expected_capability(asked: str) -> str:
    order = ["default", "avx2", "avx512", "avx512_bf16"]
    return order[min(order.index(asked), order.index(cpu_supported_capability()))]


def used_capability(stdout: str) -> str:
    return stdout.split("capability=")[1].split()[0]


def test_default_cpu_capability_is_avx2_at_most():
    """Without a request the AVX2 copy runs (AVX-512 is opt-in), or less on older CPUs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TORCH_EXT_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")
    }
    code = "import torch_ext; print('capability=' + torch_ext.cpu_capability())"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert used_capability(result.stdout) == expected_capability("avx2")
