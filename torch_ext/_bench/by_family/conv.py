"""The dilated-convolution family: ``torch_ext.dilated_conv2d`` and ``torch_ext.nn.ASPP`` against
``F.conv2d`` and the same ASPP built on ``nn.Conv2d``.

Each case's label names the route the op took for that shape (``depthwise``, ``gemm``,
``vendor``; see ``torch_ext.conv.conv_route``). Dense cases are timed on the default route and,
separately, forced onto our own im2col+GEMM path (``TORCH_EXT_CONV_ROUTE=own``), so both figures
are visible.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import torch_ext
from torch_ext._bench.registry import Case, CheckResult, Family, compare, register
from torch_ext.conv import conv_route

FAMILY = "conv"

# Goal shapes (issue: CPU float32, 2 threads) and quick stand-ins.
DEPTHWISE = {
    False: [((8, 256, 64, 64), k, d) for k in (3, 5, 7) for d in (2, 3)],
    True: [((2, 32, 32, 32), 3, 2)],
}
DENSE = {
    False: [((4, 256, 64, 64), 256, d) for d in (6, 12, 18)],
    True: [((2, 32, 32, 32), 32, 6)],
}
ASPP_SHAPE = {False: ((4, 256, 64, 64), 256), True: ((2, 32, 32, 32), 32)}
LAYOUT_DTYPE_DEPTHWISE = {
    False: [((8, 256, 64, 64), 3, 2), ((8, 256, 64, 64), 5, 2), ((8, 256, 64, 64), 7, 3)],
    True: [((2, 32, 32, 32), 3, 2)],
}
OTHER_LAYOUTS_AND_DTYPES = [
    (torch.float32, "channels_last"),
    (torch.bfloat16, "contiguous"),
    (torch.bfloat16, "channels_last"),
]

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda t: t,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
}


@contextlib.contextmanager
def forced_route(route: str | None) -> Iterator[None]:
    """Sets TORCH_EXT_CONV_ROUTE for the duration (the library reads it on every call)."""
    if route is None:
        yield
        return
    old = os.environ.get("TORCH_EXT_CONV_ROUTE")
    os.environ["TORCH_EXT_CONV_ROUTE"] = route
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCH_EXT_CONV_ROUTE"]
        else:
            os.environ["TORCH_EXT_CONV_ROUTE"] = old


# ---------------------------------------------------------------------------------------------
# Checks

# (input shape, out channels, kernel, stride, padding, dilation, groups, activation)
CHECK_CONFIGS = [
    ((2, 8, 17, 13), 8, (3, 3), 1, 2, 2, 8, "relu"),  # depthwise
    ((2, 4, 15, 15), 8, (5, 3), (2, 1), (4, 2), (2, 3), 4, "silu"),  # depthwise, multiplier 2
    ((2, 6, 16, 12), 10, (3, 3), 1, 6, 6, 1, "none"),  # dense, ASPP-like
    ((1, 6, 11, 9), 4, (3, 2), 2, "valid", (1, 2), 2, "gelu"),  # grouped, strided
    ((2, 5, 10, 10), 7, (4, 4), 1, "same", 2, 1, "relu"),  # even kernel: asymmetric "same"
]


def check_config(config, dtype, device, route: str | None) -> list[CheckResult]:
    shape, cout, kernel, stride, padding, dilation, groups, act = config
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(cout, shape[1] // groups, *kernel, dtype=dtype, device=device)
    w.requires_grad_()
    b = torch.randn(cout, dtype=dtype, device=device, requires_grad=True)
    with forced_route(route):
        out = torch_ext.dilated_conv2d(x, w, b, stride, padding, dilation, groups, act)
        used = conv_route(x, w, padding, dilation, groups)
    expected = ACTIVATIONS[act](F.conv2d(x, w, b, stride, padding, dilation, groups))
    grad_output = torch.randn_like(expected)
    with forced_route(route):
        grads = torch.autograd.grad(out, (x, w, b), grad_output)
    expected_grads = torch.autograd.grad(expected, (x, w, b), grad_output)
    described = f"{list(shape)} k{kernel} s{stride} p{padding} d{dilation} g{groups} {act}"
    op = f"dilated_conv2d [{used}]"
    results = []
    for what, actual, reference in zip(
        ("forward", "grad input", "grad weight", "grad bias"),
        (out, *grads),
        (expected, *expected_grads),
        strict=True,
    ):
        tol = TOLERANCE[dtype] * max(1.0, reference.abs().max().item())
        results.append(
            compare(actual, reference, tol, family=FAMILY, op=op, what=what, inputs=described)
        )
    return results


def checks(device: torch.device, quick: bool) -> list[CheckResult]:
    torch.manual_seed(0)
    results = []
    configs = CHECK_CONFIGS[:3] if quick else CHECK_CONFIGS
    for dtype in (torch.float64, torch.float32):
        for config in configs:
            results += check_config(config, dtype, device, None)
        # float32 dense shapes take the vendor route on the CPU; check our GEMM path as well.
        results += check_config(configs[2], dtype, device, "own")
    return results


# ---------------------------------------------------------------------------------------------
# Benchmark cases


def conv_case(
    shape,
    cout: int,
    k: int,
    d: int,
    groups: int,
    device,
    backward: bool,
    route: str | None,
    dtype: torch.dtype = torch.float32,
    layout: str = "contiguous",
) -> Case:
    pad = d * (k - 1) // 2
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def make_inputs() -> tuple[torch.Tensor, ...]:
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        w = torch.randn(cout, shape[1] // groups, k, k, device=device, dtype=dtype) * 0.05
        b = torch.randn(cout, device=device, dtype=dtype)
        return x.requires_grad_(backward), w.requires_grad_(backward), b.requires_grad_(backward)

    def ours(x, w, b):
        with forced_route(route):
            return torch_ext.dilated_conv2d(x, w, b, 1, pad, d, groups)

    def reference(x, w, b):
        return F.conv2d(x, w, b, 1, pad, d, groups)

    probe_x = torch.empty(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    probe_w = torch.empty(cout, shape[1] // groups, k, k, device=device, dtype=dtype)
    with forced_route(route):
        used = conv_route(probe_x, probe_w, pad, d, groups)
    kind = "depthwise" if groups == shape[1] else "dense"
    direction = "fwd+bwd" if backward else "fwd"
    # The table has no dtype or layout column: other dtypes and channels_last say so here.
    variant = "" if dtype == torch.float32 else f" {str(dtype).removeprefix('torch.')}"
    variant += " NHWC" if layout == "channels_last" else ""
    label = f"{kind} k{k} d{d} {direction}{variant} [{used}]"

    def traffic(inputs) -> tuple[int, int]:
        x = inputs[0]
        out_bytes = x.shape[0] * cout * x.shape[2] * x.shape[3] * x.element_size()
        x_bytes = x.numel() * x.element_size()
        if backward:  # read x, grad_output (twice: input and weight grads); write out, grad_input
            return x_bytes + 2 * out_bytes, out_bytes + x_bytes
        return x_bytes, out_bytes

    return Case(
        family=FAMILY,
        op="dilated_conv2d",
        label=label,
        device=str(device),
        shape="x".join(map(str, shape)) + f"->{cout}",
        dtype=str(dtype).removeprefix("torch."),
        layout=layout,
        backward=backward,
        make_inputs=make_inputs,
        ours=ours,
        reference=reference,
        traffic=traffic if kind == "depthwise" else None,
    )


def torch_conv_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose DilatedConv2d layers are plain nn.Conv2d (same parameters)."""
    twin = copy.deepcopy(module)
    for name, child in list(twin.named_modules()):
        if isinstance(child, torch_ext.nn.DilatedConv2d):
            conv = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                child.stride,
                child.padding,
                child.dilation,
                child.groups,
                child.bias is not None,
                child.padding_mode,
                device=child.weight.device,
            )
            conv.load_state_dict(child.state_dict())
            parent_name, _, attr = name.rpartition(".")
            parent = twin.get_submodule(parent_name) if parent_name else twin
            setattr(parent, attr, conv)
    return twin


def aspp_case(shape, cout: int, device, backward: bool) -> Case:
    torch.manual_seed(0)
    aspp = torch_ext.nn.ASPP(shape[1], cout).to(device).train(backward)
    twin = torch_conv_twin(aspp).train(backward)

    def make_inputs() -> tuple[torch.Tensor]:
        return (torch.randn(shape, device=device, requires_grad=backward),)

    direction = "fwd+bwd (train)" if backward else "fwd (eval)"
    return Case(
        family=FAMILY,
        op="ASPP",
        label=f"ASPP rates 6,12,18 {direction}",
        device=str(device),
        shape="x".join(map(str, shape)) + f"->{cout}",
        dtype="float32",
        layout="contiguous",
        backward=backward,
        make_inputs=make_inputs,
        ours=aspp,
        reference=twin,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    result = []
    for backward in (False, True):
        for shape, k, d in DEPTHWISE[quick]:
            result.append(conv_case(shape, shape[1], k, d, shape[1], device, backward, None))
    for backward in (False, True):
        for shape, cout, d in DENSE[quick]:
            result.append(conv_case(shape, cout, 3, d, 1, device, backward, None))
            if device.type == "cpu" or quick:
                result.append(conv_case(shape, cout, 3, d, 1, device, backward, "own"))
    # The other layouts and dtypes users run, forward: depthwise channels_last (float32 and
    # bfloat16; fwd+bwd too) and bfloat16 NCHW, dense bfloat16 (both routes).
    for shape, k, d in LAYOUT_DTYPE_DEPTHWISE[quick]:
        for dtype, layout in OTHER_LAYOUTS_AND_DTYPES:
            for backward in (False, True) if layout == "channels_last" else (False,):
                c = shape[1]
                result.append(conv_case(shape, c, k, d, c, device, backward, None, dtype, layout))
    for shape, cout, d in DENSE[quick][:1]:
        result.append(conv_case(shape, cout, 3, d, 1, device, False, None, torch.bfloat16))
        # Our GEMM too, unless it is already the default (bfloat16 where oneDNN has no kernels).
        if not result[-1].label.endswith("[gemm]"):
            result.append(conv_case(shape, cout, 3, d, 1, device, False, "own", torch.bfloat16))
    shape, cout = ASPP_SHAPE[quick]
    result += [aspp_case(shape, cout, device, False), aspp_case(shape, cout, device, True)]
    return result


register(Family(name=FAMILY, checks=checks, cases=cases))
