"""torch_ext.dilated_conv2d (and its raw ops) against torch.nn.functional.conv2d.

The reference is F.conv2d followed by the activation (F.relu, F.silu, F.gelu), computed in
float64 (float32 for the half types, from the same rounded values), with autograd through it
for the gradients of input, weight and bias. Covered: kernels 1..7 per axis, strides 1..3,
dilations 1..6 per axis, int / pair / "same" (even kernels: asymmetric) / "valid" padding and
asymmetric 4-sided padding through the internal op, groups 1, grouped and depthwise (channel
multiplier 1 and 2: the direct kernel; everything else goes through im2col + GEMM), batches
0..4, maps as small as the dilated kernel, with and without bias, every activation; a seeded
random sweep, gradcheck, opcheck, torch.compile, channels_last and non-contiguous inputs, the
half types, autocast, determinism, the Meta kernels, every compiled CPU instruction set and
every bad argument.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from dtype_tables import HALF_TOL, HALVES, REF_DTYPE, vendor_conv_available
from layouts import layout_tensor

import torch_ext

ops = torch.ops.torch_ext

# F.conv2d (the reference) warns that "same" with an even kernel copies the input.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

# ---------------------------------------------------------------- references

ACTIVATIONS = {
    "none": lambda t: t,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,  # the exact erf form
}


def conv_reference(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, activation="none"):
    """What dilated_conv2d must compute: F.conv2d, then the activation."""
    return ACTIVATIONS[activation](F.conv2d(x, w, b, stride, padding, dilation, groups))


# Absolute tolerances are relative to the largest magnitude of the reference (at least 1):
# weight gradients sum over N * oh * ow products and grow with the map.
TOL = {
    torch.float64: dict(rtol=1e-11, atol=1e-11),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    **HALF_TOL,
}
ACTIVATION_NAMES = list(ACTIVATIONS)


def dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(params=["auto", "own"])
def route(request, monkeypatch) -> str:
    """On the CPU, float32 dense convolutions with symmetric padding may go to PyTorch's own
    convolution ("vendor"); "own" forces the library's kernels (TORCH_EXT_CONV_ROUTE, read at
    every call), so that they are tested in float32 too."""
    if request.param == "own":
        monkeypatch.setenv("TORCH_EXT_CONV_ROUTE", "own")
    return request.param


def assert_close(actual, expected, dtype, what: str = ""):
    """actual (any device, `dtype`) against the CPU reference, with TOL[dtype] scaled."""
    expected = expected.detach()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    tol = TOL[dtype]
    torch.testing.assert_close(
        actual.detach().cpu().to(expected.dtype),
        expected,
        rtol=tol["rtol"],
        atol=tol["atol"] * scale,
        msg=(lambda m: f"{what}\n{m}") if what else None,
    )


# ---------------------------------------------------------------- inputs


def draw(shape, gen, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def make_tensor(shape, layout, gen, *, device="cpu", dtype=torch.float64, scale=1.0):
    """(base, view): the leaf `base` and `view(base)`, the 4-D tensor of `shape` in `layout`
    (see layouts.layout_tensor)."""
    return layout_tensor(shape, layout, lambda s: draw(s, gen, scale), device=device, dtype=dtype)


def make_conv(
    x_shape,
    cout,
    kernel,
    groups,
    gen,
    *,
    bias=True,
    device="cpu",
    dtype=torch.float64,
    x_layout="contiguous",
    w_layout="contiguous",
):
    """((x_base, x_view), (w_base, w_view), bias): weights scaled by 1 / sqrt(fan_in), so the
    outputs are O(1) whatever the kernel."""
    c = x_shape[1]
    w_shape = (cout, c // groups, *kernel)
    fan_in = (c // groups) * kernel[0] * kernel[1]
    x = make_tensor(x_shape, x_layout, gen, device=device, dtype=dtype)
    w = make_tensor(w_shape, w_layout, gen, device=device, dtype=dtype, scale=fan_in**-0.5)
    b = draw((cout,), gen, 0.5).to(device=device, dtype=dtype) if bias else None
    return x, w, b


def make_depthwise_nhwc(x_shape, kernel, gen, *, device="cpu", dtype=torch.float64):
    """make_conv for a depthwise convolution with multiplier 1 on a channels_last input."""
    channels = x_shape[1]
    return make_conv(
        x_shape,
        channels,
        kernel,
        channels,
        gen,
        device=device,
        dtype=dtype,
        x_layout="channels_last",
    )


def check_conv(tensors, conv: dict, activation: str, gen, *, requires=(True, True, True), what=""):
    """Forward, the gradients of every input that requires grad, and the no-grad forward of
    torch_ext.dilated_conv2d against conv_reference (on the CPU, in REF_DTYPE).

    `tensors` as make_conv returns them; `conv` the stride/padding/dilation/groups keywords,
    passed unchanged to both. Returns (output, grads) of the op."""
    (x_base, x_view), (w_base, w_view), b = tensors
    dtype, device = x_base.dtype, x_base.device
    ref_dtype = REF_DTYPE[dtype]
    bases = (x_base, w_base, b)
    views = (x_view, w_view, lambda t: t)
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(r)
        for t, r in zip(bases, requires, strict=True)
    ]
    ref_leaves = [
        None if t is None else t.detach().cpu().to(ref_dtype).requires_grad_(r)
        for t, r in zip(bases, requires, strict=True)
    ]
    args = [None if t is None else v(t) for t, v in zip(leaves, views, strict=True)]
    ref_args = [None if t is None else v(t) for t, v in zip(ref_leaves, views, strict=True)]

    out = torch_ext.dilated_conv2d(*args, activation=activation, **conv)
    ref = conv_reference(*ref_args, activation=activation, **conv)
    where = f"{what} conv={conv} activation={activation} dtype={dtype_id(dtype)}"
    assert out.shape == ref.shape, f"{where}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == dtype and out.device == device, where
    assert_close(out, ref, dtype, f"{where}: output")

    grads = [None, None, None]
    if any(leaf is not None and leaf.requires_grad for leaf in leaves):
        grad_out = draw(out.shape, gen).to(dtype)  # the same (rounded) values for both
        out.backward(grad_out.to(device))
        ref.backward(grad_out.to(ref_dtype))
        for i, name in enumerate(("input", "weight", "bias")):
            leaf = leaves[i]
            if leaf is None:
                continue
            if not leaf.requires_grad:
                assert leaf.grad is None, f"{where}: grad of {name} not asked for"
                continue
            assert leaf.grad is not None, f"{where}: no grad of {name}"
            assert leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape, where
            assert_close(leaf.grad, ref_leaves[i].grad, dtype, f"{where}: grad of {name}")
            grads[i] = leaf.grad

    with torch.no_grad():
        plain = [None if t is None else v(t) for t, v in zip(bases, views, strict=True)]
        again = torch_ext.dilated_conv2d(*plain, activation=activation, **conv)
    assert_close(again, ref, dtype, f"{where}: output without autograd")
    return out, grads


def conv_id(case: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in case.items())


# ---------------------------------------------------------------- targeted cases

# (id, x shape, C_out, kernel, stride, padding, dilation, groups). Dense: groups 1; grouped:
# 1 < groups < C_in; depthwise: groups == C_in (C_out = C_in or 2 C_in).
CASES = [
    ("dense-k1", (2, 3, 5, 4), 4, (1, 1), 1, 0, 1, 1),
    ("dense-k3-pad1", (2, 3, 8, 7), 5, (3, 3), 1, 1, 1, 1),
    ("dense-k7x2-s3x1-pad-pair", (1, 4, 13, 9), 3, (7, 2), (3, 1), (2, 0), 1, 1),
    ("dense-k2x5-s1x3-d4x1", (3, 2, 11, 14), 4, (2, 5), (1, 3), (1, 2), (4, 1), 1),
    ("dense-k3x3-d6-out1x1", (2, 3, 13, 13), 2, (3, 3), 1, 0, 6, 1),
    ("dense-k7-d6-out1x1", (1, 2, 37, 37), 3, (7, 7), 2, 0, 6, 1),
    ("dense-k5x4-d2x3-same", (2, 3, 9, 10), 4, (5, 4), 1, "same", (2, 3), 1),
    ("dense-k2-same-even", (2, 3, 6, 5), 2, (2, 2), 1, "same", 1, 1),
    ("dense-k4x6-d3x5-same", (1, 2, 7, 6), 3, (4, 6), 1, "same", (3, 5), 1),
    ("dense-k3x6-valid-s2", (4, 3, 8, 11), 2, (3, 6), 2, "valid", 1, 1),
    ("dense-1x1-map-pad", (2, 3, 1, 1), 2, (3, 3), 1, 1, 1, 1),
    ("dense-tall-k1x3-s2", (2, 3, 17, 3), 3, (1, 3), 2, (0, 1), (1, 1), 1),
    ("dense-c1", (2, 1, 6, 7), 3, (3, 2), 1, 1, (2, 1), 1),
    ("grouped-g2-k3-s2-d2", (2, 4, 10, 9), 6, (3, 3), 2, 2, 2, 2),
    ("grouped-g4-k5x2-same", (1, 8, 7, 9), 8, (5, 2), 1, "same", (1, 3), 4),
    ("grouped-g2-k6x1-s3-pad-pair", (3, 6, 14, 5), 4, (6, 1), 3, (2, 1), (1, 1), 2),
    ("grouped-g4-out1x1", (2, 12, 5, 11), 4, (3, 6), 1, 0, (2, 2), 4),
    ("depthwise-m1-k3", (2, 4, 7, 8), 4, (3, 3), 1, 1, 1, 4),
    ("depthwise-m1-k5x7-s2x3-d3x2", (1, 3, 19, 16), 3, (5, 7), (2, 3), (1, 3), (3, 2), 3),
    ("depthwise-m2-k3-d2-same", (2, 3, 7, 6), 6, (3, 3), 1, "same", 2, 3),
    ("depthwise-m2-k4x2-same-even", (2, 5, 8, 5), 10, (4, 2), 1, "same", (1, 2), 5),
    ("depthwise-m2-k7-s3-valid", (3, 2, 10, 12), 4, (7, 7), 3, "valid", 1, 2),
    ("depthwise-m1-k6x3-d5x1-out1x1", (1, 2, 26, 3), 2, (6, 3), 1, 0, (5, 1), 2),
    ("depthwise-m2-1x1-map", (4, 2, 1, 1), 4, (1, 1), 1, 0, 1, 2),
]
CASE_IDS = [case[0] for case in CASES]
CASE_ARGS = [case[1:] for case in CASES]


def conv_kwargs(stride, padding, dilation, groups) -> dict:
    return dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize(
    "x_shape,cout,kernel,stride,padding,dilation,groups", CASE_ARGS, ids=CASE_IDS
)
def test_matches_conv2d_float64(
    device, x_shape, cout, kernel, stride, padding, dilation, groups, activation, bias, gen
):
    tensors = make_conv(x_shape, cout, kernel, groups, gen, bias=bias, device=device)
    check_conv(tensors, conv_kwargs(stride, padding, dilation, groups), activation, gen)


@pytest.mark.parametrize(
    "x_shape,cout,kernel,stride,padding,dilation,groups", CASE_ARGS, ids=CASE_IDS
)
def test_float32_matches_float64_reference(
    device, route, x_shape, cout, kernel, stride, padding, dilation, groups, gen
):
    tensors = make_conv(x_shape, cout, kernel, groups, gen, device=device, dtype=torch.float32)
    check_conv(tensors, conv_kwargs(stride, padding, dilation, groups), "gelu", gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize(
    "x_shape,cout,kernel,stride,padding,dilation,groups", CASE_ARGS, ids=CASE_IDS
)
def test_cases_cover_both_routes(
    device, monkeypatch, x_shape, cout, kernel, stride, padding, dilation, groups, dtype
):
    """The cases named depthwise-* run the direct kernel, all others im2col + GEMM."""
    monkeypatch.setenv("TORCH_EXT_CONV_ROUTE", "own")
    x = torch.empty(x_shape, device=device, dtype=dtype)
    w = torch.empty(cout, x_shape[1] // groups, *kernel, device=device, dtype=dtype)
    expected = "depthwise" if groups == x_shape[1] and groups > 1 else "gemm"
    assert torch_ext.conv.conv_route(x, w, padding, dilation, groups) == expected


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=dtype_id
)
def test_default_routes(device, monkeypatch, dtype):
    """Unforced, dense float32/bfloat16/float16 convolutions with symmetric padding go to the
    vendor where it has kernels for the dtype (cuDNN on CUDA; oneDNN on the CPU, the half types
    only where PyTorch says this CPU has oneDNN kernels for them); float64, depthwise and
    four-sided padding stay ours."""
    monkeypatch.delenv("TORCH_EXT_CONV_ROUTE", raising=False)
    available = vendor_conv_available(device, dtype)
    x = torch.empty(2, 8, 9, 9, device=device, dtype=dtype)
    dense = torch.empty(4, 8, 3, 3, device=device, dtype=dtype)
    depthwise = torch.empty(8, 1, 3, 3, device=device, dtype=dtype)
    vendor = available and dtype != torch.float64
    assert torch_ext.conv.conv_route(x, dense, 2, 2, 1) == ("vendor" if vendor else "gemm")
    assert torch_ext.conv.conv_route(x, dense, "same", 2, 1) == ("vendor" if vendor else "gemm")  # symmetric
    assert torch_ext.conv.conv_route(x, depthwise, 2, 2, 8) == "depthwise"
    even = torch.empty(4, 8, 2, 2, device=device, dtype=dtype)  # "same": one more at the end
    assert torch_ext.conv.conv_route(x, even, "same", 1, 1) == "gemm"
    monkeypatch.setenv("TORCH_EXT_CONV_ROUTE", "own")
    assert torch_ext.conv.conv_route(x, dense, 2, 2, 1) == "gemm"


ROUTES = ["dense", "grouped", "depthwise-m1", "depthwise-m2"]


def random_config(rng: torch.Generator, route: str, tiny_map: bool) -> dict:
    def pick(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=rng))

    kernel = (pick(1, 7), pick(1, 7))
    stride = (pick(1, 3), pick(1, 3))
    dilation = (pick(1, 6), pick(1, 6))
    if route == "dense":
        groups, c, cout = 1, pick(1, 5), pick(1, 5)
    elif route == "grouped":
        groups = (2, 4)[pick(0, 1)]
        c, cout = groups * pick(2, 3), groups * pick(1, 3)
    else:
        c = pick(2, 6)
        groups, cout = c, c * (2 if route == "depthwise-m2" else 1)
    kind = pick(0, 3)
    if kind == 0:
        padding = pick(0, 3)
        pads = (padding, padding)
    elif kind == 1:
        padding = (pick(0, 3), pick(0, 3))
        pads = padding
    elif kind == 2:
        padding, stride, pads = "same", (1, 1), None
    else:
        padding, pads = "valid", (0, 0)
    size = []
    for axis in range(2):
        if pads is None:  # "same": any size
            size.append(pick(1, 9))
            continue
        smallest = max(1, dilation[axis] * (kernel[axis] - 1) + 1 - 2 * pads[axis])
        size.append(smallest + (0 if tiny_map else pick(0, 6)))
    return dict(
        x_shape=(pick(1, 4), c, *size),
        cout=cout,
        kernel=kernel,
        conv=conv_kwargs(stride, padding, dilation, groups),
    )


def check_random_case(rng: torch.Generator, route: str, device: str, where: str):
    """One random configuration of `route` (see random_config), with a random activation, bias
    or none, contiguous or channels_last input, and a map as small as the kernel one time in
    four; forward and the three gradients in float64."""

    def pick(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=rng))

    cfg = random_config(rng, route, tiny_map=pick(0, 3) == 0)
    activation = ACTIVATION_NAMES[pick(0, 3)]
    bias = pick(0, 2) != 0
    layout = ("contiguous", "channels_last")[pick(0, 1)]
    tensors = make_conv(
        cfg["x_shape"],
        cfg["cout"],
        cfg["kernel"],
        cfg["conv"]["groups"],
        rng,
        bias=bias,
        device=device,
        x_layout=layout,
    )
    what = (
        f"{where}: {route}, input {cfg['x_shape']} {layout}, C_out {cfg['cout']}, "
        f"kernel {cfg['kernel']}, bias {bias}"
    )
    check_conv(tensors, cfg["conv"], activation, rng, what=what)


@pytest.mark.parametrize("route", ROUTES)
def test_random_configurations(device, route, gen):
    """60 seeded random configurations (15 per route): kernel 1..7, stride 1..3, dilation 1..6
    per axis, int / pair / "same" / "valid" padding, batch 1..4, every activation, with and
    without bias, contiguous and channels_last, maps as small as the kernel."""
    for case in range(15):
        check_random_case(gen, route, device, f"case {case}")


def test_fresh_random_configurations(device):
    """New configurations and values on every run (the seed is in the message)."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = torch.Generator().manual_seed(seed)
    for case in range(16):
        check_random_case(rng, ROUTES[case % 4], device, f"seed {seed}, case {case}")


# ---------------------------------------------------------------- layouts, dtypes, empty


LAYOUT_CASES = [
    # (id, x shape, C_out, kernel, conv keywords)
    ("dense", (2, 6, 9, 11), 4, (3, 2), conv_kwargs((2, 1), (1, 2), (1, 3), 1)),
    ("grouped", (2, 6, 9, 11), 4, (3, 3), conv_kwargs(1, "same", 2, 2)),
    ("depthwise-m2", (2, 6, 9, 11), 12, (5, 4), conv_kwargs(1, "same", (1, 2), 6)),
]
LAYOUT_IDS = [case[0] for case in LAYOUT_CASES]
LAYOUT_ARGS = [case[1:] for case in LAYOUT_CASES]


@pytest.mark.parametrize(
    "x_layout,w_layout",
    [
        ("channels_last", "contiguous"),
        ("channels_last", "channels_last"),
        ("transposed", "contiguous"),
        ("sliced", "transposed"),
        ("contiguous", "sliced"),
    ],
)
@pytest.mark.parametrize(
    "dtype,route",
    [(torch.float64, "auto"), (torch.float32, "auto"), (torch.float32, "own")],
    ids=["float64", "float32", "float32-own"],
    indirect=["route"],
)
@pytest.mark.parametrize("x_shape,cout,kernel,conv", LAYOUT_ARGS, ids=LAYOUT_IDS)
def test_layouts(device, x_shape, cout, kernel, conv, dtype, route, x_layout, w_layout, gen):
    tensors = make_conv(
        x_shape,
        cout,
        kernel,
        conv["groups"],
        gen,
        device=device,
        dtype=dtype,
        x_layout=x_layout,
        w_layout=w_layout,
    )
    (x_base, x_view), _, _ = tensors
    assert not x_view(x_base).is_contiguous() or x_layout == "contiguous"
    out, _ = check_conv(tensors, conv, "silu", gen)
    if x_layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    elif x_layout == "contiguous":
        assert out.is_contiguous()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALVES, ids=dtype_id)
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("x_shape,cout,kernel,conv", LAYOUT_ARGS, ids=LAYOUT_IDS)
def test_half_precision(device, x_shape, cout, kernel, conv, activation, dtype, layout, gen):
    """Against float32 on the same rounded values (the kernels accumulate in float32)."""
    tensors = make_conv(
        x_shape, cout, kernel, conv["groups"], gen, device=device, dtype=dtype, x_layout=layout
    )
    out, _ = check_conv(tensors, conv, activation, gen)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


# Kernels: the CPU NHWC backward computes the input gradient as the forward on flipped taps
# where the stride is 1 and the paddings lie within the kernel's reach, through the NCHW kernel
# otherwise (strides, paddings past the reach); its weight gradient unrolls widths 3, 5 and 7.
NHWC_KERNEL_CASES = [
    ("k3-d2", (3, 3), conv_kwargs(1, 2, 2, None)),
    ("k5x3-s2x1-d3x2", (5, 3), conv_kwargs((2, 1), (1, 4), (3, 2), None)),
    ("k2x4-same-even", (2, 4), conv_kwargs(1, "same", (2, 1), None)),
    ("k7-same", (7, 7), conv_kwargs(1, "same", 1, None)),
    ("k5-d2-pad-4-2", (5, 5), conv_kwargs(1, (4, 2), 2, None)),
    ("k3x5-d1x3-same", (3, 5), conv_kwargs(1, "same", (1, 3), None)),
    ("k1-pad-past-reach", (1, 1), conv_kwargs(1, 2, 1, None)),
    ("k3-top-pad-past-reach", (3, 3), conv_kwargs(1, (3, 1), 1, None)),
]


# Channel counts around the NHWC kernel's vector widths and channel blocks (4, 8 or 16 lanes;
# blocks of 2 vectors, then single vectors): a part vector, whole vectors, several blocks with a
# ragged last one.
@pytest.mark.parametrize("channels", [3, 8, 37, 64, 150])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, *HALVES], ids=lambda d: str(d).removeprefix("torch.")
)
@pytest.mark.parametrize(
    "kernel,conv",
    [case[1:] for case in NHWC_KERNEL_CASES],
    ids=[case[0] for case in NHWC_KERNEL_CASES],
)
def test_depthwise_channels_last_widths(device, channels, dtype, kernel, conv, gen):
    """Depthwise on channels_last input (multiplier 1), computed in NHWC: forward, the saved
    pre-activation (gelu's backward reads it) and every gradient, and the output and the input
    gradient stay channels_last; widths that are no multiple of the kernel's pixel group (4 or 8)
    leave pixels that go one at a time."""
    conv = {**conv, "groups": channels}
    tensors = make_depthwise_nhwc((2, channels, 13, 11), kernel, gen, device=device, dtype=dtype)
    out, grads = check_conv(tensors, conv, "gelu", gen)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_depthwise_weight_gradient_ignores_thread_count(layout, gen):
    """CPU: the depthwise weight gradient is summed in an order the shape alone fixes, the same
    bits with one thread as with several (NHWC: runs of (image, band) units summed in order;
    NCHW: a channel per thread). CUDA has its own bit-for-bit test above."""
    device = "cpu"
    tensors = make_conv(
        (5, 24, 33, 31), 24, (3, 3), 24, gen, device=device, dtype=torch.float32, x_layout=layout
    )
    (x_base, x_view), (w_base, w_view), b = tensors
    grad_out = draw((5, 24, 33, 31), gen).to(torch.float32)
    conv = conv_kwargs(1, "same", 2, 24)
    threads = torch.get_num_threads()
    grads = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            w = w_base.detach().clone().requires_grad_()
            out = torch_ext.dilated_conv2d(x_view(x_base), w_view(w), b, **conv)
            out.backward(grad_out)
            grads.append(w.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


# The CPU's bfloat16 NHWC forward with the epilogue kept in registers (relu or none; the other
# tests of this layout mostly use gelu): the unrolled widths 3, 5, 7, dilations, strides, part
# blocks of channels.
@pytest.mark.parametrize("channels", [37, 64])
@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize(
    "kernel,conv",
    [
        ((3, 3), conv_kwargs(1, 2, 2, None)),
        ((5, 5), conv_kwargs(1, "same", (1, 3), None)),
        ((7, 7), conv_kwargs((2, 1), 3, 1, None)),
        ((3, 5), conv_kwargs((1, 2), (1, 0), (2, 1), None)),
    ],
    ids=["k3-d2", "k5-d1x3-same", "k7-s2x1", "k3x5-s1x2-valid-width"],
)
def test_depthwise_channels_last_bfloat16_forward(device, channels, activation, kernel, conv, gen):
    conv = {**conv, "groups": channels}
    tensors = make_depthwise_nhwc(
        (2, channels, 13, 17), kernel, gen, device=device, dtype=torch.bfloat16
    )
    out, _ = check_conv(tensors, conv, activation, gen, requires=(False, False, False))
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("width", [12, 40])
def test_depthwise_channels_last_bfloat16_infinities(device, width):
    """An infinite input reaches exactly the outputs whose taps cover it (inf or nan, as in
    F.conv2d): no nan from a zero-padded tap or a lane past the channels times inf (a kernel
    that paired or padded taps with zero weights would produce one). Width 40: the CPU sweeps
    most of each row in runs of pixels two columns apart (see the next test)."""
    channels = 32
    x = torch.randn(1, channels, 9, width, generator=torch.Generator().manual_seed(3))
    x[0, :, 4, 5] = float("inf")
    x[0, ::3, 2, 9] = float("-inf")
    w = torch.randn(channels, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last).to(device)
    wb = w.to(torch.bfloat16).to(device)
    out = torch_ext.dilated_conv2d(xb, wb, None, 1, 2, 2, channels)
    ref = F.conv2d(xb.float().cpu(), wb.float().cpu(), None, 1, 2, 2, channels)
    assert torch.equal(out.float().cpu().isnan(), ref.isnan())
    assert torch.equal(out.float().cpu().isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(out.float().cpu()[finite], ref[finite], rtol=2e-2, atol=5e-2)


# The CPU NHWC forward sweeps the rows of stride-1 convolutions in runs of 8 pixels (AVX-512; 4
# on AVX2) `dilation` columns apart, so that each ring column loaded serves every tap that reads
# it, and the rest of a row a block of neighbouring pixels at a time; the bfloat16 channel blocks
# of 2 vectors take their lanes in pairs (even channels in one float vector, odd ones in the
# other, weights and bias in the same order, interleaved again when stored; where the CPU has
# AVX512_BF16, kernel rows in pairs by its dot product instead, a row left over paired with zero,
# the lanes unpacked from the two rows and put back when stored). Widths with two or
# more runs and a rest, every unrolled kernel width and a wider one, dilations 1-3; the forward,
# gelu's saved pre-activation (stored in pairs too) and every gradient (the input gradient is
# that forward on the flipped taps). The CPU forward's input rings in both layouts
# (TORCH_EXT_CONV_RINGS; by default by pixels only where the output streams and k <= 3; set, it
# also keeps these shapes on the rings where the AVX-512 or AVX2 tiles would take them).
@pytest.mark.parametrize("rings", ["blocks", "pixels"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALVES], ids=dtype_id)
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("kernel", [3, 5, 7, 9])
def test_depthwise_channels_last_pixel_runs(
    device, dtype, dilation, kernel, rings, gen, monkeypatch
):
    monkeypatch.setenv("TORCH_EXT_CONV_RINGS", rings)
    channels = 80  # AVX-512: blocks of 32, 32 and 16 lanes; AVX2: five blocks of 16
    width = 2 * 8 * dilation + 5
    tensors = make_depthwise_nhwc(
        (1, channels, 4, width), (kernel, kernel), gen, device=device, dtype=dtype
    )
    out, _ = check_conv(tensors, conv_kwargs(1, "same", dilation, channels), "gelu", gen)
    assert out.is_contiguous(memory_format=torch.channels_last)


# The CPU NHWC forward at stride 1 (and 2, test_depthwise_channels_last_stride2) with a square
# kernel of width 3, 5 or 7 runs register tiles on AVX-512 and AVX2 (on AVX-512: two or three
# output rows a dilation apart by three to six columns a dilation apart by a vector of 16
# channels; AVX2: smaller tiles of 8 channels; half types widened
# as they load and rounded as they store), reading the map through a table of pointers with a
# zero pixel for the padding; with multiplier 1 the input gradient is that forward on the
# flipped taps. Heights and widths that leave partial
# tiles both ways, two images (the next image's rows prefetched), channel counts below one
# vector, exactly one, and with a part vector past whole ones (loaded and stored masked);
# activations with the sums stored from the registers (none, relu) and through the epilogue
# with gelu's saved pre-activation; "same" padding and one smaller than the kernel's reach. On
# other CPUs the rings serve the same cases.
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("channels", [5, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, *HALVES], ids=dtype_id)
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_depthwise_channels_last_tiles(
    device, kernel, dilation, dtype, channels, activation, gen
):
    height, width = 2 * 4 * dilation + 3, 2 * 4 * dilation + 5
    tensors = make_depthwise_nhwc(
        (2, channels, height, width), (kernel, kernel), gen, device=device, dtype=dtype
    )
    for padding in ("same", (dilation, 1)):
        conv = conv_kwargs(1, padding, dilation, channels)
        out, grads = check_conv(tensors, conv, activation, gen)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, *HALVES], ids=dtype_id)
@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("shape", [(1, 20, 2, 3), (2, 20, 1, 2), (1, 20, 4, 1)], ids=str)
def test_depthwise_channels_last_tiles_small_maps(device, shape, kernel, dtype, gen):
    """channels_last maps smaller than the kernel's reach through the CPU NHWC tiles: most taps
    of every tile fall into the padding (the zero pixel); "same" padding at dilation 2 and a
    padding past the reach (every output of the first rows and columns sees only padding)."""
    tensors = make_depthwise_nhwc(shape, (kernel, kernel), gen, device=device, dtype=dtype)
    for padding in ("same", kernel + 2):
        out, _ = check_conv(tensors, conv_kwargs(1, padding, 2, shape[1]), "gelu", gen)
        assert out.is_contiguous(memory_format=torch.channels_last)


# The CPU NHWC forward at stride 2 (both ways) with a square kernel of width 3, 5 or 7 runs the
# same register tiles on AVX-512 (two output rows a dilation apart by four columns, two for
# width 7; output row r reads input row 2 r + i under kernel row i) and AVX2 (but width 7), the
# rings elsewhere and
# where TORCH_EXT_CONV_RINGS is set: both paths. Odd and even heights and widths (partial tiles
# both ways, the last input row or column read by no tap), a part vector of channels past whole
# ones, paddings symmetric, smaller than the kernel's reach and none, the register epilogue
# (relu, none) and gelu's through the stack; the input gradient (strided: through the NCHW
# kernel) and the weight gradient against the reference too.
@pytest.mark.parametrize("path", ["tiles", "rings"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALVES], ids=dtype_id)
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_depthwise_channels_last_stride2(device, kernel, dilation, dtype, path, gen, monkeypatch):
    if path == "rings":
        monkeypatch.setenv("TORCH_EXT_CONV_RINGS", "blocks")
    else:
        monkeypatch.delenv("TORCH_EXT_CONV_RINGS", raising=False)
    channels = 40
    height, width = 4 * 4 * dilation + 5, 4 * 4 * dilation + 10
    tensors = make_depthwise_nhwc(
        (2, channels, height, width), (kernel, kernel), gen, device=device, dtype=dtype
    )
    reach = dilation * (kernel - 1) // 2
    for padding, activation in ((reach, "relu"), ((dilation, 1), "gelu"), (0, "none")):
        conv = conv_kwargs(2, padding, dilation, channels)
        out, grads = check_conv(tensors, conv, activation, gen)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


# The CPU NCHW depthwise forward at stride 1 with a square kernel of width 3, 5 or 7 runs
# register tiles: four output rows a dilation apart by 2 vectors of columns, or 4 on AVX-512
# where the map is wider than 32 columns; with multiplier 1 the input gradient is that forward
# on the flipped taps. Heights and widths that leave partial tiles (rows past the map summed
# from the zero slack below the padded plane and not stored, columns past it masked), dilations
# 1-3, channel multipliers 1 and 2, padding other than "same"; the forward, gelu's saved
# pre-activation and the gradients against the reference. The weight gradient of float maps with
# kernels 3, 5, 7 wide at stride 1 along the width sums each plane in vector registers, kernel
# rows three at a time for width 3 (the rest of kh one at a time): also at stride 2 down the
# rows. The half types' bias gradient is left
# out: it sums a thousand and more values of gelu's derivative at the rounded pre-activation, an
# error that grows with the square root of the count and, over only three channels, crossed the
# tolerance in about one case in a hundred (never the input or weight gradient, in 1296 cases).
@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize("width", [20, 37, 70])
@pytest.mark.parametrize("dtype", [torch.float32, *HALVES], ids=dtype_id)
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_depthwise_nchw_tiles(device, dtype, dilation, kernel, width, multiplier, gen):
    channels = 3
    height = 2 * 4 * dilation + 3
    tensors = make_conv(
        (2, channels, height, width), multiplier * channels, (kernel, kernel), channels, gen,
        device=device, dtype=dtype,
    )
    requires = (True, True, dtype == torch.float32)
    for stride, padding in ((1, "same"), (1, (dilation, 1)), ((2, 1), (dilation, 1))):
        conv = conv_kwargs(stride, padding, dilation, channels)
        out, _ = check_conv(tensors, conv, "gelu", gen, requires=requires)
        assert out.is_contiguous()


# The CPU NCHW weight gradient's plane sums for kernel widths 3, 5, 7 take kernel rows three at
# a time for width 3 and the rest one at a time: heights that leave a remainder, a single row,
# strides down the rows. At stride 2 along the width, the forward and the weight gradient read
# the padded rows split into even and odd columns (odd and even padded widths). Against the
# reference.
@pytest.mark.parametrize(
    "stride", [1, (2, 1), (1, 2), 2], ids=["stride1", "stride2x1", "stride1x2", "stride2"]
)
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("kernel", [(5, 3), (2, 3), (4, 7), (1, 5), (3, 5)], ids=str)
def test_depthwise_nchw_weight_gradient_kernel_shapes(device, kernel, stride, dilation, gen):
    tensors = make_conv((2, 4, 19, 45), 4, kernel, 4, gen, device=device, dtype=torch.float32)
    check_conv(tensors, conv_kwargs(stride, (2, 1), dilation, 4), "none", gen)


# Four-sided paddings through the CPU tiles (float32, stride 1; NCHW, and NHWC on AVX-512),
# channels_last maps through the NHWC kernels on any CPU: some past the kernel's
# reach (output rows and columns that see only padding), some smaller than "same" (the output
# smaller than the input); the forward op's output and pre-activation, and the backward op's
# gradients (multiplier 1: the input gradient is the tiles' forward on the flipped taps with the
# paddings mirrored where they lie within the reach), against F.conv2d of the padded map.
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("padding4", [(0, 0, 0, 0), (2, 0, 1, 3), (5, 1, 0, 6), (1, 4, 6, 2)],
                         ids=lambda p: "pad" + "-".join(map(str, p)))
@pytest.mark.parametrize("kernel,dilation", [(3, 2), (5, 1)], ids=["k3d2", "k5d1"])
def test_depthwise_tiles_four_sided_padding(device, kernel, dilation, padding4, layout, gen):
    (x, _), (w, _), b = make_conv(
        (2, 3, 11, 37), 3, (kernel, kernel), 3, gen, device=device, dtype=torch.float32,
        x_layout=layout,
    )
    top, left, bottom, right = padding4
    refs = [t.detach().cpu().double().requires_grad_() for t in (x, w, b)]
    preact_ref = F.conv2d(F.pad(refs[0], (left, right, top, bottom)), refs[1], refs[2], 1, 0,
                          dilation, 3)
    out, preact = ops._dilated_conv2d_forward(
        x, w, b, [1, 1], list(padding4), [dilation] * 2, 3, "gelu", True
    )
    assert_close(preact, preact_ref, torch.float32)
    assert_close(out, F.gelu(preact_ref), torch.float32)
    grad = draw(preact_ref.shape, gen)
    preact_ref.backward(grad)
    grads = ops._dilated_conv2d_backward(
        grad.float().to(device), x, w, preact, [1, 1], list(padding4), [dilation] * 2, 3, "none",
        [True, True, True],
    )
    for got, ref in zip(grads, refs, strict=True):
        assert_close(got, ref.grad, torch.float32)


def test_depthwise_input_without_rows_but_padding(device, gen):
    """A map of height 0 padded into a non-empty output: the forward sees only padding (the
    bias), the input gradient is empty, the weight gradient zero, the bias gradient the sum of
    grad_output (the CPU's input gradient by the flipped forward must not take this case).
    F.conv2d refuses such a map; the reference pads it explicitly."""
    (x, _), (w, _), b = make_conv((1, 4, 0, 8), 4, (3, 3), 4, gen, device=device,
                                  dtype=torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    refs = [t.detach().cpu().double().requires_grad_() for t in (x, w, b)]
    out = torch_ext.dilated_conv2d(*leaves, 1, 2, 1, 4)
    ref = F.conv2d(F.pad(refs[0], (2, 2, 2, 2)), refs[1], refs[2], 1, 0, 1, 4)
    assert out.shape == ref.shape == (1, 4, 2, 10)
    assert_close(out, ref, torch.float32)
    grad = draw(ref.shape, gen)
    out.backward(grad.float().to(device))
    ref.backward(grad)
    for leaf, r in zip(leaves, refs, strict=True):
        assert leaf.grad.shape == r.shape
        assert_close(leaf.grad, r.grad, torch.float32)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("channels", [128, 132], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALVES], ids=dtype_id)
def test_depthwise_channels_last_large_outputs(
    device, dtype, channels, activation, gen, one_thread
):
    """Outputs past the CPU NHWC forward's streaming threshold (1 MiB per thread, one thread
    here): written with non-temporal stores where C keeps every vector aligned (128 channels),
    with plain stores otherwise (132); relu's epilogue in registers, gelu's with the saved
    pre-activation (its backward reads it; streamed by the rings, plain stores from the AVX-512
    tiles' epilogue). Against the reference: the forward, and gelu's gradients (relu's would
    flip wherever an output lies within rounding of 0)."""
    tensors = make_depthwise_nhwc((1, channels, 64, 64), (3, 3), gen, device=device, dtype=dtype)
    grads = (activation == "gelu",) * 3
    out, _ = check_conv(tensors, conv_kwargs(1, 2, 2, channels), activation, gen, requires=grads)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("width", [64, 62], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_depthwise_nchw_large_outputs(device, dtype, width, gen, one_thread):
    """NCHW outputs past the CPU tiles' streaming threshold (1 MiB per thread, one thread here):
    non-temporal stores where the rows keep every vector aligned (64 columns), plain stores
    otherwise (62); gelu's pre-activation streamed too; the forward and the gradients."""
    tensors = make_conv((1, 128, 64, width), 128, (3, 3), 128, gen, device=device, dtype=dtype)
    grads = (True, True, dtype == torch.float32)
    out, _ = check_conv(tensors, conv_kwargs(1, 2, 2, 128), "gelu", gen, requires=grads)
    assert out.is_contiguous()


@pytest.mark.parametrize("rings", ["blocks", "pixels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_depthwise_channels_last_channel_groups(device, dtype, rings, gen, monkeypatch):
    """A map so wide that the CPU NHWC kernels' row rings of all 260 channels exceed their
    budget (set to 1 MiB here, TORCH_EXT_CONV_RING_BYTES; by default four L2 caches, 1-8 MiB)
    several times over: the channel blocks go in several groups (the last one smaller, one block
    a single vector, partly past C), each filling its own rings, the forward's by blocks or by
    pixels (TORCH_EXT_CONV_RINGS, which keeps the forward on the rings where the register tiles
    would take it); the forward and every gradient against the reference."""
    monkeypatch.setenv("TORCH_EXT_CONV_RING_BYTES", str(1 << 20))
    monkeypatch.setenv("TORCH_EXT_CONV_RINGS", rings)
    tensors = make_depthwise_nhwc((1, 260, 7, 1200), (3, 3), gen, device=device, dtype=dtype)
    out, _ = check_conv(tensors, conv_kwargs(1, "same", 2, 260), "silu", gen)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel", [(3, 3), (5, 5)], ids=["k3", "k5"])
def test_depthwise_large_maps_repeat_bit_for_bit(device, kernel, layout, gen):
    """Enough output positions per channel that the CUDA weight gradient splits them over
    several blocks and adds the splits in order (the NHWC one too): every gradient against the
    reference, and a second run equal bit for bit (no float atomics anywhere)."""
    tensors = make_conv(
        (2, 4, 96, 96), 4, kernel, 4, gen, device=device, dtype=torch.float32, x_layout=layout
    )
    conv = conv_kwargs(1, "same", 2, 4)
    check_conv(tensors, conv, "silu", gen)
    (x_base, x_view), (w_base, w_view), b = tensors
    grad_out = draw((2, 4, 96, 96), gen).to(device=device, dtype=torch.float32)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x_base, w_base, b)]
        out = torch_ext.dilated_conv2d(
            x_view(leaves[0]), w_view(leaves[1]), leaves[2], activation="silu", **conv
        )
        out.backward(grad_out)
        runs.append([out.detach()] + [leaf.grad for leaf in leaves])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", HALVES, ids=dtype_id)
@pytest.mark.parametrize(
    "x_shape,cout,kernel,conv",
    [
        ((2, 48, 20, 20), 8, (3, 3), conv_kwargs(1, 1, 1, 1)),
        ((2, 8, 32, 32), 16, (3, 3), conv_kwargs(1, "same", 2, 8)),
    ],
    ids=["dense-432-term-sums", "depthwise-2048-term-sums"],
)
def test_half_precision_long_reductions(device, x_shape, cout, kernel, conv, dtype, gen):
    """Sums of hundreds to thousands of products (output, weight gradient): accumulating in the
    half type itself would miss the tolerance by far."""
    tensors = make_conv(x_shape, cout, kernel, conv["groups"], gen, device=device, dtype=dtype)
    check_conv(tensors, conv, "silu", gen)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("x_shape,cout,kernel,conv", LAYOUT_ARGS, ids=LAYOUT_IDS)
def test_empty_batch(device, x_shape, cout, kernel, conv, layout, gen):
    shape = (0, *x_shape[1:])
    tensors = make_conv(shape, cout, kernel, conv["groups"], gen, device=device, x_layout=layout)
    out, (grad_x, grad_w, grad_b) = check_conv(tensors, conv, "relu", gen)
    assert out.shape[0] == 0 and grad_x.shape == shape
    assert torch.count_nonzero(grad_w) == 0 and torch.count_nonzero(grad_b) == 0


@pytest.mark.parametrize(
    "requires",
    [
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (True, True, False),
        (False, True, True),
    ],
    ids=["input", "weight", "bias", "input-weight", "weight-bias"],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "x_shape,cout,kernel,conv",
    LAYOUT_ARGS + [((2, 6, 9, 11), 6, (3, 3), conv_kwargs(1, "same", 2, 6))],
    ids=LAYOUT_IDS + ["depthwise-m1"],
)
def test_some_inputs_require_grad(device, x_shape, cout, kernel, conv, requires, layout, gen):
    """Each gradient alone (the backward's output_mask), through each route and layout (the
    weight gradient's kernel also sums the bias gradient when both are asked for)."""
    tensors = make_conv(x_shape, cout, kernel, conv["groups"], gen, device=device, x_layout=layout)
    check_conv(tensors, conv, "gelu", gen, requires=requires)


def test_relu_where_the_window_is_all_padding(device, gen):
    """Without bias, outputs whose window lies entirely in the padding are exactly 0 before
    the relu: their gradient is 0, as F.relu's (and the other outputs' are not)."""
    for groups, cout in [(1, 3), (2, 4)]:
        tensors = make_conv((2, 2, 4, 5), cout, (1, 2), groups, gen, bias=False, device=device)
        check_conv(tensors, conv_kwargs(1, (2, 3), 1, groups), "relu", gen)


def test_default_arguments_and_raw_ops(device, gen):
    x = draw((2, 4, 7, 6), gen).to(device)
    w = draw((6, 2, 3, 2), gen).to(device)
    b = draw((6,), gen).to(device)
    ref = lambda **kw: conv_reference(x.cpu(), w.cpu(), **kw)
    dense = draw((5, 4, 3, 2), gen).to(device)
    assert_close(torch_ext.dilated_conv2d(x, dense), F.conv2d(x.cpu(), dense.cpu()), torch.float64)
    expected = ref(b=b.cpu(), stride=2, padding=1, dilation=2, groups=2, activation="silu")
    # ints and pairs, keywords and positions, the wrapper and both raw overloads
    for out in [
        torch_ext.dilated_conv2d(x, w, b, 2, 1, 2, 2, "silu"),
        torch_ext.dilated_conv2d(
            x, w, b, stride=(2, 2), padding=(1, 1), dilation=(2, 2), groups=2, activation="silu"
        ),
        ops.dilated_conv2d(x, w, b, [2, 2], [1, 1], [2, 2], 2, "silu"),
        ops.dilated_conv2d.default(x, w, b, [2, 2], [1, 1], [2, 2], 2, "silu"),
    ]:
        assert_close(out, expected, torch.float64)
    expected = ref(b=b.cpu(), padding="same", dilation=(1, 3), groups=2, activation="gelu")
    for out in [
        torch_ext.dilated_conv2d(
            x, w, b, padding="same", dilation=(1, 3), groups=2, activation="gelu"
        ),
        ops.dilated_conv2d.padding(x, w, b, [1, 1], "same", [1, 3], 2, "gelu"),
    ]:
        assert_close(out, expected, torch.float64)
    assert_close(
        ops.dilated_conv2d.padding(x, w, None, [1, 2], "valid", [1, 1], 2, "none"),
        ref(stride=(1, 2), groups=2),
        torch.float64,
    )


# ---------------------------------------------------------------- the internal forward op

# (top, left, bottom, right): padding no public overload can express.
PADDINGS_4 = [(0, 0, 0, 0), (2, 0, 1, 3), (0, 3, 2, 0), (1, 1, 4, 2)]


@pytest.mark.parametrize("padding4", PADDINGS_4, ids=lambda p: "pad" + "-".join(map(str, p)))
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("route", ["dense", "grouped", "depthwise-m2"])
def test_forward_op_with_four_sided_padding(device, route, activation, padding4, gen):
    groups, cout = {"dense": (1, 5), "grouped": (2, 4), "depthwise-m2": (4, 8)}[route]
    (x, _), (w, _), b = make_conv((2, 4, 7, 9), cout, (3, 4), groups, gen, device=device)
    top, left, bottom, right = padding4
    stride, dilation = [2, 1], [1, 2]
    x_ref, w_ref, b_ref = x.cpu(), w.cpu(), b.cpu()
    preact_ref = F.conv2d(
        F.pad(x_ref, (left, right, top, bottom)), w_ref, b_ref, stride, 0, dilation, groups
    )
    for save_preact in (False, True):
        out, preact = ops._dilated_conv2d_forward(
            x, w, b, stride, list(padding4), dilation, groups, activation, save_preact
        )
        assert_close(out, ACTIVATIONS[activation](preact_ref), torch.float64)
        if save_preact and activation in ("silu", "gelu"):
            assert_close(preact, preact_ref, torch.float64)
        else:
            assert preact.numel() == 0


# ---------------------------------------------------------------- gradcheck

GRADCHECK_CASES = [
    ("dense", (2, 3, 6, 5), 2, (3, 2), conv_kwargs((2, 1), (1, 2), (1, 2), 1)),
    ("grouped", (1, 4, 6, 7), 4, (2, 3), conv_kwargs(1, "valid", (2, 1), 2)),
    ("depthwise-m1", (2, 3, 5, 6), 3, (3, 3), conv_kwargs((1, 2), 1, 2, 3)),
    ("depthwise-m2", (1, 2, 6, 5), 4, (4, 3), conv_kwargs(1, "same", (1, 2), 2)),
]


@pytest.mark.parametrize(
    "activation,layout",
    [
        ("none", "channels_last"),
        ("relu", "contiguous"),
        ("silu", "channels_last"),
        ("gelu", "contiguous"),
    ],
)
@pytest.mark.parametrize(
    "x_shape,cout,kernel,conv",
    [c[1:] for c in GRADCHECK_CASES],
    ids=[c[0] for c in GRADCHECK_CASES],
)
def test_gradcheck(device, x_shape, cout, kernel, conv, activation, layout, gen):
    """Random inputs keep the pre-activations away from relu's kink (padding windows get the
    bias, which is nonzero)."""
    (x, _), (w, _), b = make_conv(
        x_shape, cout, kernel, conv["groups"], gen, device=device, x_layout=layout
    )
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    fn = lambda x, w, b: torch_ext.dilated_conv2d(x, w, b, activation=activation, **conv)
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_without_bias(device, gen):
    (x, _), (w, _), _ = make_conv((1, 2, 5, 4), 4, (2, 3), 2, gen, bias=False, device=device)
    fn = lambda x, w: torch_ext.dilated_conv2d(x, w, None, 1, "same", (2, 1), 2, "silu")
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()))


# ---------------------------------------------------------------- opcheck

OPCHECK_CASES = [
    ("dense", (2, 3, 7, 6), 4, (3, 2), 1),
    ("grouped", (2, 4, 7, 6), 2, (2, 3), 2),
    ("depthwise-m2", (2, 3, 7, 6), 6, (3, 3), 3),
    ("depthwise-m1", (2, 3, 7, 6), 3, (3, 3), 3),  # channels_last: the NHWC kernels
]
OPCHECK_IDS = [case[0] for case in OPCHECK_CASES]
OPCHECK_ARGS = [case[1:] for case in OPCHECK_CASES]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("x_shape,cout,kernel,groups", OPCHECK_ARGS, ids=OPCHECK_IDS)
def test_opcheck(device, x_shape, cout, kernel, groups, requires_grad, gen):
    (x, _), (w, _), b = make_conv(
        x_shape, cout, kernel, groups, gen, device=device, x_layout="channels_last"
    )
    x, w, b = (t.requires_grad_(requires_grad) for t in (x, w, b))
    torch.library.opcheck(
        ops.dilated_conv2d.default, (x, w, b, [2, 1], [1, 2], [1, 2], groups, "silu")
    )
    torch.library.opcheck(
        ops.dilated_conv2d.default, (x, w, None, [1, 1], [0, 0], [2, 1], groups, "relu")
    )
    torch.library.opcheck(
        ops.dilated_conv2d.padding, (x, w, b, [1, 1], "same", [2, 1], groups, "gelu")
    )
    torch.library.opcheck(
        ops.dilated_conv2d.padding, (x, w, None, [2, 3], "valid", [1, 1], groups, "none")
    )


@pytest.mark.parametrize("save_preact", [False, True])
@pytest.mark.parametrize("x_shape,cout,kernel,groups", OPCHECK_ARGS, ids=OPCHECK_IDS)
def test_forward_op_opcheck(device, x_shape, cout, kernel, groups, save_preact, gen):
    (x, _), (w, _), b = make_conv(x_shape, cout, kernel, groups, gen, device=device)
    for activation in ("relu", "gelu"):
        torch.library.opcheck(
            ops._dilated_conv2d_forward.default,
            (x, w, b, [1, 2], [2, 0, 1, 3], [1, 2], groups, activation, save_preact),
        )


# ---------------------------------------------------------------- torch.compile


def conv_net(x, w1, b1, w2, w3, conv=torch_ext.dilated_conv2d):
    """Dense, depthwise (multiplier 2, even kernel, "same") and grouped convolutions."""
    y = conv(x, w1, b1, stride=(2, 1), padding=(1, 2), dilation=(1, 2), activation="silu")
    y = conv(y, w2, None, padding="same", dilation=(2, 1), groups=4, activation="gelu")
    y = conv(y, w3, None, stride=1, padding="valid", groups=2, activation="relu")
    return y * 2 + 1


def conv_net_reference(x, w1, b1, w2, w3):
    return conv_net(x, w1, b1, w2, w3, conv=conv_reference)


@pytest.mark.parametrize(
    "backend,dynamic", [("aot_eager", True), ("inductor", False), ("inductor", True)]
)
def test_compile(device, monkeypatch, backend, dynamic, gen):
    monkeypatch.setenv("TORCH_EXT_CONV_ROUTE", "own")  # the library's kernels, also for float32
    torch._dynamo.reset()
    compiled = torch.compile(conv_net, backend=backend, fullgraph=True, dynamic=dynamic)
    params = [
        draw((4, 3, 3, 3), gen, 0.3),
        draw((4,), gen),
        draw((8, 1, 2, 3), gen, 0.4),
        draw((6, 4, 1, 2), gen, 0.35),
    ]
    for shape, layout in [((2, 3, 11, 9), "contiguous"), ((3, 3, 14, 12), "channels_last")]:
        x, _ = make_tensor(shape, layout, gen)
        inputs = [t.to(device=device, dtype=torch.float32) for t in (x, *params)]
        if layout == "channels_last":
            inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
        runs = []
        for fn in (compiled, conv_net):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            out = fn(*leaves)
            out.backward(torch.ones_like(out) + out.detach())
            runs.append([out, *(leaf.grad for leaf in leaves)])
        ref_leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
        ref = conv_net_reference(*ref_leaves)
        ref.backward(torch.ones_like(ref) + ref.detach().float().double())
        refs = [ref, *(leaf.grad for leaf in ref_leaves)]
        names = ["output", "grad x", "grad w1", "grad b1", "grad w2", "grad w3"]
        for name, got, eager, expected in zip(names, runs[0], runs[1], refs, strict=True):
            what = f"{backend} dynamic={dynamic} {shape} {layout}: {name}"
            assert_close(got, eager.double().cpu(), torch.float32, what + " vs eager")
            assert_close(got, expected, torch.float32, what + " vs reference")


# ---------------------------------------------------------------- autocast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("padding", [1, "same"])
@pytest.mark.parametrize("groups", [1, 4], ids=["dense", "depthwise"])
def test_autocast_like_conv2d(device, groups, padding, dtype, gen):
    """Under autocast the op casts like aten::conv2d (float32 -> bfloat16, float64 stays)."""
    (x, _), (w, _), b = make_conv((2, 4, 8, 7), 4, (3, 3), groups, gen, device=device, dtype=dtype)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    with torch.autocast(device, dtype=torch.bfloat16):
        out = torch_ext.dilated_conv2d(x, w, b, padding=padding, groups=groups, activation="silu")
        expected = F.silu(F.conv2d(x, w, b, padding=padding, groups=groups))
    assert out.dtype == expected.dtype
    assert_close(out, expected.detach().cpu().double(), out.dtype)
    out.float().sum().backward()
    for t in (x, w, b):
        assert t.grad is not None and t.grad.dtype == dtype


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize(
    "cout,kernel,conv",
    [(16, (3, 3), conv_kwargs(1, 1, 1, 1)), (32, (5, 3), conv_kwargs(1, "same", 2, 16))],
    ids=["dense", "depthwise-m2"],
)
def test_deterministic_on_cpu(monkeypatch, cout, kernel, conv, dtype, layout, gen):
    """Large enough for the work to be split among threads: two runs are bitwise equal."""
    monkeypatch.setenv("TORCH_EXT_CONV_ROUTE", "own")
    (x, _), (w, _), b = make_conv(
        (4, 16, 24, 24), cout, kernel, conv["groups"], gen, dtype=dtype, x_layout=layout
    )
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        out = torch_ext.dilated_conv2d(*leaves, activation="gelu", **conv)
        out.backward(out.detach() * 0.5 + 0.1)
        runs.append([out.detach(), *(leaf.grad for leaf in leaves)])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


# ---------------------------------------------------------------- Meta kernels


@pytest.mark.parametrize(
    "x_shape,cout,kernel,stride,padding,dilation,groups", CASE_ARGS, ids=CASE_IDS
)
def test_meta_shapes(x_shape, cout, kernel, stride, padding, dilation, groups):
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.empty(x_shape, device="meta").contiguous(memory_format=memory_format)
        w = torch.empty(cout, x_shape[1] // groups, *kernel, device="meta")
        conv = conv_kwargs(stride, padding, dilation, groups)
        out = torch_ext.dilated_conv2d(x.requires_grad_(), w, None, activation="silu", **conv)
        assert out.shape == F.conv2d(x, w, None, **conv).shape
        if memory_format == torch.channels_last and x_shape[1] > 1:
            assert out.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- every compiled CPU copy

_CAPABILITY_CHECK = r"""
import torch, torch.nn.functional as F, torch_ext

g = torch.Generator().manual_seed(11)
acts = {"none": lambda t: t, "relu": F.relu, "silu": F.silu, "gelu": F.gelu}
cases = [  # x shape, C_out, kernel, stride, padding, dilation, groups
    ((2, 6, 13, 17), 8, (3, 5), (2, 1), (1, 2), (2, 1), 1),
    ((2, 6, 13, 17), 6, (4, 3), 1, "same", (1, 3), 3),
    ((2, 6, 13, 17), 12, (3, 3), (1, 2), 2, 2, 6),
    ((1, 5, 9, 21), 5, (5, 7), 1, "same", 1, 5),
    ((2, 4, 19, 37), 8, (3, 3), 1, "same", 2, 4),  # NCHW: the forward's register tiles
    ((1, 3, 11, 70), 3, (7, 7), 1, (3, 1), 1, 3),
]
tols = {torch.float64: 1e-11, torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
for dtype, tol in tols.items():
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else torch.float64
    for layout in (torch.contiguous_format, torch.channels_last):
        for i, (shape, cout, k, s, p, d, groups) in enumerate(cases):
            act = list(acts)[i % len(acts)]
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            w = torch.randn(cout, shape[1] // groups, *k, generator=g, dtype=torch.float64) * 0.3
            b = torch.randn(cout, generator=g, dtype=torch.float64)
            ts = [t.to(dtype) for t in (x, w, b)]
            ts[0] = ts[0].contiguous(memory_format=layout)
            leaves = [t.clone().requires_grad_() for t in ts]
            refs = [t.to(ref_dtype).requires_grad_() for t in ts]
            out = torch_ext.dilated_conv2d(*leaves, s, p, d, groups, act)
            ref = acts[act](F.conv2d(*refs, s, p, d, groups))
            go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
            out.backward(go)
            ref.backward(go.to(ref_dtype))
            for a, e in zip([out] + [t.grad for t in leaves], [ref] + [t.grad for t in refs]):
                scale = max(1.0, e.abs().max().item())
                torch.testing.assert_close(a.to(ref_dtype), e.detach(), rtol=tol,
                                           atol=tol * scale,
                                           msg=lambda m: f"{dtype} {layout} case {i}: {m}")
# NHWC depthwise outputs past the streaming threshold (1 MiB per thread): non-temporal stores.
torch.set_num_threads(1)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)):
    x = torch.randn(1, 128, 64, 64, generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(128, 1, 5, 5, generator=g) * 0.3).to(dtype)
    b = torch.randn(128, generator=g).to(dtype)
    out = torch_ext.dilated_conv2d(x, w, b, 1, 2, 1, 128, "relu")
    ref = F.relu(F.conv2d(x.float(), w.float(), b.float(), 1, 2, 1, 128))
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
# NHWC depthwise bfloat16 with whole channel blocks (lanes in pairs) and stride-1 rows in runs of
# pixels `dilation` apart (4 or 8 of them, by the copy), the rest one block at a time; gelu.
for d in (1, 3):
    x = torch.randn(1, 48, 5, 16 * d + 5, generator=g).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(48, 1, 3, 3, generator=g) * 0.3).bfloat16().requires_grad_()
    b = torch.randn(48, generator=g).bfloat16().requires_grad_()
    out = torch_ext.dilated_conv2d(x, w, b, 1, d, d, 48, "gelu")
    refs = [t.detach().float().requires_grad_() for t in (x, w, b)]
    ref = F.gelu(F.conv2d(*refs, 1, d, d, 48))
    go = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(go)
    ref.backward(go.float())
    for a, e in zip([out, x.grad, w.grad, b.grad], [ref] + [t.grad for t in refs]):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a.float(), e.detach(), rtol=1.6e-2, atol=1.6e-2 * scale)
# bfloat16 depthwise outputs and input gradients rounded bit for bit: integer maps and
# taps keep every float sum exact in any order, so each result must be the exact sum rounded
# once to nearest even (sums past 256 often fall on ties). By the CPU's conversion in the
# avx512_bf16 copy, in software in the others. NHWC (the tiles in the AVX-512 copies, the rings'
# whole channel blocks with lanes in pairs in the AVX2 one): 88 channels (whole vectors and a
# partial one), and a map past the streaming threshold; NCHW:
# the forward's register tiles, partial and past the streaming threshold.
for shape, layout in (((2, 88, 9, 23), torch.channels_last),
                      ((1, 128, 64, 64), torch.channels_last),
                      ((2, 3, 9, 23), torch.contiguous_format),
                      ((1, 128, 64, 64), torch.contiguous_format)):
    C = shape[1]
    x = torch.randint(-256, 257, shape, generator=g).bfloat16()
    x = x.contiguous(memory_format=layout).requires_grad_()
    w = torch.randint(-15, 16, (C, 1, 3, 3), generator=g).bfloat16()
    b = torch.randint(-256, 257, (C,), generator=g).bfloat16()
    out = torch_ext.dilated_conv2d(x, w, b, 1, 2, 2, C)
    xd = x.detach().double().requires_grad_()
    ref = F.conv2d(xd, w.double(), b.double(), 1, 2, 2, C)
    go = torch.randint(-8, 9, out.shape, generator=g).bfloat16()
    out.backward(go)
    ref.backward(go.double())
    assert torch.equal(out, ref.bfloat16()), (shape, (out.double() - ref).abs().max())
    assert torch.equal(x.grad, xd.grad.bfloat16()), (shape, (x.grad.double() - xd.grad).abs().max())
# NHWC depthwise in register tiles (the AVX-512 and AVX2 copies; the rings in the default one):
# strides 1 and 2, kernels 3, 5, 7, dilations 1 and 2, 21 channels (whole vectors and a part
# one), partial tiles; gelu (the pre-activation stored too, through the tiles' epilogue) and relu
# (stored from the registers); the input gradient (at stride 1 the forward on flipped taps)
# against float64.
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)):
    for k in (3, 5, 7):
        for s in (1, 2):
            for d in (1, 2):
                x = torch.randn(2, 21, 4 * d + 9, 4 * d + 12, generator=g).to(dtype)
                x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
                w = (torch.randn(21, 1, k, k, generator=g) * 0.3).to(dtype)
                b = torch.randn(21, generator=g).to(dtype)
                p = d * (k - 1) // 2
                act = "gelu" if d == 1 else "relu"
                out = torch_ext.dilated_conv2d(x, w, b, s, p, d, 21, act)
                xd = x.detach().double().requires_grad_()
                ref = acts[act](F.conv2d(xd, w.double(), b.double(), s, p, d, 21))
                go = torch.randn(out.shape, generator=g).to(dtype)
                out.backward(go)
                ref.backward(go.double())
                for a, e in ((out, ref), (x.grad, xd.grad)):
                    torch.testing.assert_close(
                        a.double(), e.detach(), rtol=tol, atol=tol * max(1.0, e.abs().max().item()),
                        msg=lambda m: f"NHWC tiles {dtype} k{k} s{s} d{d}: {m}")
print("capability=" + torch_ext.cpu_capability())
print("ok")
"""


@pytest.mark.parametrize(
    "capability,tile_bytes",
    [("default", None), ("avx2", None), ("avx512", None), ("avx512_bf16", None), ("avx2", 2048)],
    ids=["default", "avx2", "avx512", "avx512-bf16", "avx2-tiny-tiles"],
)
def test_every_cpu_capability_copy(capability, tile_bytes):
    """The CPU loops (depthwise, im2col/col2im, epilogue) are compiled once per instruction
    set; each copy in a fresh interpreter (the choice is read once per process). With tiny
    im2col tiles (TORCH_EXT_CONV_TILE_BYTES, also read once) every map spans several tiles of
    64 columns, the last one partial."""
    env = dict(os.environ, TORCH_EXT_CPU_CAPABILITY=capability, TORCH_EXT_CONV_ROUTE="own")
    if tile_bytes is not None:
        env["TORCH_EXT_CONV_TILE_BYTES"] = str(tile_bytes)
    result = subprocess.run(
        [sys.executable, "-c", _CAPABILITY_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"capability {capability}:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------- argument errors

F32, F64, I64 = torch.float32, torch.float64, torch.int64
X, W, B = (2, 4, 7, 7), (6, 4, 3, 3), (6,)


def bad(name, match, x=X, w=W, b=B, dtypes=(F32, F32, F32), **kwargs):
    return pytest.param(x, w, b, dtypes, kwargs, match, id=name)


BAD_ARGUMENTS = [
    bad("input-3d", "input", x=(4, 7, 7)),
    bad("input-5d", "input", x=(1, 2, 4, 7, 7)),
    bad("weight-3d", "weight", w=(6, 4, 3)),
    bad("weight-5d", "weight", w=(6, 4, 3, 3, 1)),
    bad("input-int64", "input", dtypes=(I64, I64, I64)),
    bad("channels", "channels", x=(2, 5, 7, 7)),
    bad("channels-grouped", "channels", w=(6, 4, 3, 3), groups=2),
    bad(
        "groups-not-dividing-input",
        "channels|groups",
        x=(2, 6, 7, 7),
        w=(4, 1, 3, 3),
        b=(4,),
        groups=4,
    ),
    bad("groups-not-dividing-output", "groups", w=(5, 2, 3, 3), b=(5,), groups=2),
    bad("groups-0", "groups", groups=0),
    bad("groups-negative", "groups", groups=-2),
    bad("stride-0", "stride", stride=0),
    bad("stride-pair-0", "stride", stride=(1, 0)),
    bad("stride-negative", "stride", stride=-1),
    bad("dilation-0", "dilation", dilation=0),
    bad("dilation-pair-0", "dilation", dilation=(2, 0)),
    bad("dilation-negative", "dilation", dilation=-3),
    bad("padding-negative", "padding", padding=-1),
    bad("padding-pair-negative", "padding", padding=(0, -2)),
    bad("kernel-taller-than-input", "height", x=(2, 4, 3, 9), w=(6, 4, 5, 3)),
    bad("kernel-wider-than-padded-input", "width", x=(2, 4, 9, 3), w=(6, 4, 3, 7), padding=1),
    bad("dilated-kernel-taller", "height", dilation=(4, 1)),
    bad("dilated-kernel-wider-valid", "width", dilation=(1, 4), padding="valid"),
    bad("bias-length", "bias", b=(5,)),
    bad("bias-2d", "bias", b=(6, 1)),
    bad("bias-0d", "bias", b=()),
    bad("weight-dtype", "weight.*dtype|dtype.*weight", dtypes=(F32, F64, F32)),
    bad("bias-dtype", "bias.*dtype|dtype.*bias", dtypes=(F32, F32, F64)),
    bad("activation-unknown", "activation", activation="tanh"),
    bad("activation-uppercase", "activation", activation="ReLU"),
    bad("activation-empty", "activation", activation=""),
    bad("same-with-stride", "same.*stride|stride.*same", padding="same", stride=2),
    bad("same-with-stride-pair", "same.*stride|stride.*same", padding="same", stride=(1, 2)),
    bad("padding-string-unknown", "padding", padding="full"),
    bad("padding-string-case", "padding", padding="SAME"),
    # sizes at the int64 edge: an error, never a wrapped size or a crash
    bad("no-input-channels", "at least one channel", x=(2, 0, 7, 7), w=(6, 0, 3, 3)),
    bad("dilation-overflow", "dilated kernel.*64 bits", dilation=2**62),
    bad("dilation-pair-overflow", "dilated kernel.*64 bits", dilation=(1, 2**62)),
    bad("padding-overflow", "padding.*64 bits", padding=(2**62, 2**62)),
    bad("padding-huge", "output.*64 bits", padding=2**40),
    bad("same-dilation-overflow", "same.*64 bits", padding="same", dilation=2**62),
    bad("groups-overflow", "groups.*64 bits", groups=2**62, w=(6, 4, 3, 3)),
]


def make_bad(x_shape, w_shape, b_shape, dtypes, device, requires_grad=False):
    tensors = [
        torch.ones(s, dtype=d, device=device)
        for s, d in zip((x_shape, w_shape, b_shape), dtypes, strict=True)
    ]
    if requires_grad:
        for t in tensors:
            if t.is_floating_point():
                t.requires_grad_()
    return tensors


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("x_shape,w_shape,b_shape,dtypes,kwargs,match", BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(
    device, x_shape, w_shape, b_shape, dtypes, kwargs, match, requires_grad
):
    x, w, b = make_bad(x_shape, w_shape, b_shape, dtypes, device, requires_grad)
    with pytest.raises(RuntimeError, match=match):
        torch_ext.dilated_conv2d(x, w, b, **kwargs)


@pytest.mark.parametrize("x_shape,w_shape,b_shape,dtypes,kwargs,match", BAD_ARGUMENTS)
def test_bad_arguments_are_caught_by_the_meta_kernels(
    x_shape, w_shape, b_shape, dtypes, kwargs, match
):
    """The Meta kernels (what torch.compile traces with) check the same things."""
    x, w, b = make_bad(x_shape, w_shape, b_shape, dtypes, "meta")
    with pytest.raises(RuntimeError, match=match):
        torch_ext.dilated_conv2d(x, w, b, **kwargs)


@pytest.mark.parametrize("bad_padding", [[-1, 0, 0, 0], [0, 0, 0, -2]])
def test_forward_op_rejects_negative_padding(device, bad_padding):
    x, w, b = make_bad(X, W, B, (F32, F32, F32), device)
    with pytest.raises(RuntimeError, match="padding"):
        ops._dilated_conv2d_forward(x, w, b, [1, 1], bad_padding, [1, 1], 1, "none", False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("moved", ["weight", "bias", "input"])
def test_devices_differ(moved):
    tensors = dict(
        zip(("input", "weight", "bias"), make_bad(X, W, B, (F32, F32, F32), "cuda"), strict=True)
    )
    tensors[moved] = tensors[moved].cpu()
    with pytest.raises(RuntimeError, match="device"):
        torch_ext.dilated_conv2d(tensors["input"], tensors["weight"], tensors["bias"])


def test_activation_none_means_no_activation(device, gen):
    x = torch.randn(2, 4, 7, 7, generator=gen).to(device)
    w = torch.randn(6, 4, 3, 3, generator=gen).to(device)
    out = torch_ext.dilated_conv2d(x, w, None, padding=2, dilation=2, activation=None)
    expected = torch_ext.dilated_conv2d(x, w, None, padding=2, dilation=2, activation="none")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("groups", [1, 4], ids=["dense", "depthwise"])
def test_double_backward_is_refused_not_wrong(device, route, groups, gen):
    """A backward with create_graph=True (gradient penalty) through the convolution: a clear
    error on every route, never zeros or an unrelated error from inside a kernel."""
    x = torch.randn(2, 4, 7, 7, generator=gen).to(device).requires_grad_()
    w = torch.randn(4, 4 // groups, 3, 3, generator=gen).to(device).requires_grad_()
    out = torch_ext.dilated_conv2d(x, w, None, padding=2, dilation=2, groups=groups)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


def test_raw_ops_refuse_inputs_that_require_grad(gen):
    """The private forward has no derivative: called directly on a tensor that requires grad
    it refuses, rather than returning a result autograd would treat as a constant."""
    x = torch.randn(1, 2, 5, 5, generator=gen).requires_grad_()
    w = torch.randn(2, 2, 3, 3, generator=gen)
    with pytest.raises(RuntimeError, match="not differentiable.*input requires grad"):
        ops._dilated_conv2d_forward(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, "none", False)
    with torch.no_grad():
        out, _ = ops._dilated_conv2d_forward(
            x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, "none", False
        )
    torch.testing.assert_close(out, F.conv2d(x.detach(), w, None, 1, 1))
