"""The SPP family: ``torch_ext.spp`` and ``torch_ext.sppf`` against their PyTorch compositions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import torch_ext
from torch_ext._bench.registry import Case, CheckResult, Family, compare, register

FAMILY = "spp"
LEVELS = (1, 2, 4)
KERNEL_SIZE = 5
REPEATS = 3

# Goal shapes (float32, CPU) and their quick stand-ins for smoke runs.
SPP_SHAPE = {False: (32, 256, 64, 64), True: (4, 64, 32, 32)}
SPPF_SHAPES = {False: [(8, 512, 20, 20), (8, 256, 40, 40)], True: [(2, 64, 20, 20)]}

# Max abs error allowed against the reference, scaled by the output's magnitude.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def spp_reference(x: torch.Tensor, levels=LEVELS, mode: str = "max") -> torch.Tensor:
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return torch.cat([pool(x, level).flatten(1) for level in levels], 1)


def sppf_reference(x: torch.Tensor, kernel_size: int = KERNEL_SIZE, repeats: int = REPEATS):
    maps = [x]
    for _ in range(repeats):
        maps.append(F.max_pool2d(maps[-1], kernel_size, 1, kernel_size // 2))
    return torch.cat(maps, 1)


@dataclass(frozen=True)
class OpUnderTest:
    """An op of the family with fixed arguments, beside its reference."""

    name: str
    ours: Callable[[torch.Tensor], torch.Tensor]
    reference: Callable[[torch.Tensor], torch.Tensor]
    output_bytes: Callable[[torch.Tensor], int]  # of the output, for an input x


def spp_output_bytes(x: torch.Tensor) -> int:
    return x.shape[0] * x.shape[1] * sum(level * level for level in LEVELS) * x.element_size()


def sppf_output_bytes(x: torch.Tensor) -> int:
    return (REPEATS + 1) * x.numel() * x.element_size()


def ops() -> list[OpUnderTest]:
    return [
        OpUnderTest(
            "spp max",
            lambda x: torch_ext.spp(x, LEVELS, "max"),
            lambda x: spp_reference(x, LEVELS, "max"),
            spp_output_bytes,
        ),
        OpUnderTest(
            "spp avg",
            lambda x: torch_ext.spp(x, LEVELS, "avg"),
            lambda x: spp_reference(x, LEVELS, "avg"),
            spp_output_bytes,
        ),
        OpUnderTest(
            "sppf",
            lambda x: torch_ext.sppf(x, KERNEL_SIZE, REPEATS),
            lambda x: sppf_reference(x, KERNEL_SIZE, REPEATS),
            sppf_output_bytes,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Checks


def check_inputs(quick: bool) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, channels_last) pairs: odd sizes, a map smaller than the finest grid, NHWC."""
    if quick:
        return [((2, 3, 13, 11), False), ((2, 5, 9, 7), True)]
    return [
        ((2, 3, 13, 11), False),
        ((1, 2, 3, 3), False),
        ((2, 5, 9, 7), True),
        ((3, 4, 16, 16), False),
    ]


def random_input(shape, channels_last: bool, dtype, device) -> torch.Tensor:
    x = torch.randn(shape, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def check_op(op: OpUnderTest, x: torch.Tensor, layout: str) -> list[CheckResult]:
    """Forward and input gradient of ``op`` against its reference at ``x``."""
    x_ref = x.detach().clone().requires_grad_()
    out, expected = op.ours(x), op.reference(x_ref)
    grad_output = torch.randn_like(expected)
    (grad,) = torch.autograd.grad(out, x, grad_output)
    (grad_expected,) = torch.autograd.grad(expected, x_ref, grad_output)
    described = f"{list(x.shape)} {layout}"
    scale = TOLERANCE[x.dtype]
    return [
        compare(
            out,
            expected,
            scale * max(1.0, expected.abs().max().item()),
            family=FAMILY,
            op=op.name,
            what="forward",
            inputs=described,
        ),
        compare(
            grad,
            grad_expected,
            scale * max(1.0, grad_expected.abs().max().item()),
            family=FAMILY,
            op=op.name,
            what="grad input",
            inputs=described,
        ),
    ]


def checks(device: torch.device, quick: bool) -> list[CheckResult]:
    torch.manual_seed(0)
    results = []
    for op in ops():
        for dtype in (torch.float64, torch.float32):
            for shape, channels_last in check_inputs(quick):
                x = random_input(shape, channels_last, dtype, device)
                layout = "channels_last" if channels_last else "contiguous"
                results += check_op(op, x, layout)
    return results


# ---------------------------------------------------------------------------------------------
# Benchmark cases


def least_traffic(x: torch.Tensor, output_bytes: int, backward: bool) -> tuple[int, int]:
    """(bytes read, bytes written) at the least: the forward reads x and writes the output; the
    backward also reads grad_output and writes grad_input (a lower bound: max pooling must also
    find its maxima again or read saved indices)."""
    x_bytes = x.numel() * x.element_size()
    if backward:
        return x_bytes + output_bytes, output_bytes + x_bytes
    return x_bytes, output_bytes


def make_case(op: OpUnderTest, shape, device, backward: bool, channels_last: bool) -> Case:
    direction = "fwd+bwd" if backward else "fwd"
    layout = "channels_last" if channels_last else "contiguous"

    def make_inputs() -> tuple[torch.Tensor]:
        x = torch.randn(shape, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x.requires_grad_(backward),)

    label = f"{op.name} {direction}" + (" NHWC" if channels_last else "")
    return Case(
        family=FAMILY,
        op=op.name,
        label=label,
        device=str(device),
        shape="x".join(map(str, shape)),
        dtype="float32",
        layout=layout,
        backward=backward,
        make_inputs=make_inputs,
        ours=op.ours,
        reference=op.reference,
        traffic=lambda inputs: least_traffic(inputs[0], op.output_bytes(inputs[0]), backward),
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    spp_max, spp_avg, sppf = ops()
    spp_shape, sppf_shapes = SPP_SHAPE[quick], SPPF_SHAPES[quick]
    result = [
        make_case(spp_max, spp_shape, device, backward=False, channels_last=False),
        make_case(spp_max, spp_shape, device, backward=True, channels_last=False),
        make_case(spp_avg, spp_shape, device, backward=False, channels_last=False),
    ]
    for shape in sppf_shapes:
        result.append(make_case(sppf, shape, device, backward=False, channels_last=False))
        result.append(make_case(sppf, shape, device, backward=True, channels_last=False))
    result.append(make_case(spp_max, spp_shape, device, backward=False, channels_last=True))
    result.append(make_case(sppf, sppf_shapes[-1], device, backward=False, channels_last=True))
    return result


register(Family(name=FAMILY, checks=checks, cases=cases))
