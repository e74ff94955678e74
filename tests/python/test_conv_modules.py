"""torch_ext.nn's dilated convolution modules and helpers, and torch_ext.patch.swap_convs.

Every check compares with an independent reference: DilatedConv2d with nn.Conv2d holding the
same state dict (outputs and gradients, padding modes, groups, "same" padding, fused
activations against F.relu/F.silu/F.gelu); ASPP with a torchvision-like ASPP written here from
plain nn.Conv2d; receptive_field with hand-checked stacks and the impulse response of F.conv2d;
check_gridding with the support of composed dilated kernels (brute force) and with the closed
form of the HDC rule where that rule applies; swap_convs on a small segmentation-style model
(same outputs and gradients, shared parameters, undo restores the very objects).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_ext.nn import ASPP, DilatedConv2d, check_gridding, receptive_field
from torch_ext.patch import SwapConvsHandle, swap_convs, undo_swap_convs

TIGHT = dict(rtol=1e-10, atol=1e-10)  # float64 against float64
ACTIVATIONS = {"none": lambda t: t, "relu": F.relu, "silu": F.silu, "gelu": F.gelu}

# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def seeded(seed: int):
    """torch's global RNG seeded inside, restored on exit (module initialization)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def run(module: nn.Module, x: torch.Tensor, grad_out_seed: int = 7, dropout_seed: int = 3):
    """(output, input grad, {parameter name: grad}) of module(x) backpropagating a fixed
    random grad_output; dropout (if any) draws from a fixed seed."""
    module.zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(dropout_seed)
        out = module(leaf)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad_out.to(device=out.device, dtype=out.dtype))
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    return out.detach(), leaf.grad, grads


def assert_same_run(module, reference, x, **tol):
    """Outputs, input gradients and parameter gradients (by name) of module and reference."""
    tol = tol or TIGHT
    out, grad, param_grads = run(module, x)
    ref_out, ref_grad, ref_param_grads = run(reference, x)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    assert param_grads.keys() == ref_param_grads.keys()
    for name, value in param_grads.items():
        torch.testing.assert_close(value, ref_param_grads[name], msg=f"grad of {name}", **tol)


def assert_same_state(module, reference, **tol):
    """Parameters and buffers (BatchNorm running statistics) equal, by name."""
    state, ref_state = module.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys()
    for name, value in state.items():
        torch.testing.assert_close(value, ref_state[name], msg=name, **(tol or TIGHT))


def randn(shape, gen, device="cpu", dtype=torch.float64):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- DilatedConv2d

# (constructor arguments, input [N, C, H, W])
CONV_CASES = {
    "dilation2": (dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2),
                  (2, 4, 11, 13)),
    "rect-stride-dilation": (dict(in_channels=3, out_channels=5, kernel_size=(3, 5),
                                  stride=(2, 1), padding=(3, 1), dilation=(3, 1)), (2, 3, 13, 9)),
    "groups2-no-bias": (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1,
                             dilation=2, groups=2, bias=False), (1, 4, 9, 10)),
    "depthwise-same": (dict(in_channels=4, out_channels=4, kernel_size=3, padding="same",
                            dilation=3, groups=4), (2, 4, 10, 7)),
    "same-even-kernel": (dict(in_channels=3, out_channels=2, kernel_size=(4, 2),
                              padding="same", dilation=(1, 3)), (2, 3, 9, 8)),
    "valid": (dict(in_channels=3, out_channels=4, kernel_size=3, padding="valid", dilation=2),
              (2, 3, 11, 12)),
    "stride2-padding0": (dict(in_channels=2, out_channels=3, kernel_size=3, stride=2,
                              dilation=2), (1, 2, 12, 11)),
    "reflect": (dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, dilation=2,
                     padding_mode="reflect"), (2, 3, 9, 11)),
    "circular": (dict(in_channels=3, out_channels=4, kernel_size=3, padding=(1, 3),
                      dilation=(1, 3), padding_mode="circular"), (2, 3, 8, 9)),
    # total padding 3 along H: the extra row goes to the bottom, as in nn.Conv2d
    "replicate-same-even": (dict(in_channels=2, out_channels=3, kernel_size=4, padding="same",
                                 dilation=(1, 2), padding_mode="replicate"), (2, 2, 9, 10)),
    "reflect-stride2-groups": (dict(in_channels=4, out_channels=4, kernel_size=3, stride=2,
                                    padding=3, dilation=3, groups=2, padding_mode="reflect"),
                               (2, 4, 11, 12)),
}  # fmt: skip


def make_pair(kwargs, device="cpu", dtype=torch.float64, activation="none", seed=0):
    """(DilatedConv2d, nn.Conv2d) with equal configuration and equal parameter values."""
    with seeded(seed):
        conv = nn.Conv2d(**kwargs, device=device, dtype=dtype)
    dilated = DilatedConv2d(**kwargs, device=device, dtype=dtype, activation=activation)
    dilated.load_state_dict(conv.state_dict())
    return dilated, conv


@pytest.mark.parametrize("case", CONV_CASES)
def test_dilated_conv2d_matches_conv2d(device, case, gen):
    kwargs, shape = CONV_CASES[case]
    dilated, conv = make_pair(kwargs, device)
    x = randn(shape, gen, device)
    assert_same_run(dilated, conv, x)
    with torch.no_grad():
        torch.testing.assert_close(dilated(x), conv(x), **TIGHT)


@pytest.mark.parametrize("case", ["dilation2", "depthwise-same", "reflect"])
def test_dilated_conv2d_channels_last_and_float32(device, case, gen):
    kwargs, shape = CONV_CASES[case]
    x = randn(shape, gen, device).contiguous(memory_format=torch.channels_last)
    dilated, conv = make_pair(kwargs, device)
    assert_same_run(dilated, conv, x)
    dilated, conv = make_pair(kwargs, device, dtype=torch.float32)
    x32 = x.float()
    assert dilated(x32).dtype == torch.float32
    assert_same_run(dilated, conv, x32, rtol=1e-5, atol=1e-5)


class ConvThen(nn.Module):
    """nn.Conv2d followed by a functional activation: the unfused reference."""

    def __init__(self, conv: nn.Conv2d, activation: str):
        super().__init__()
        self.conv, self.function = conv, ACTIVATIONS[activation]

    def forward(self, x):
        return self.function(self.conv(x))


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("case", ["dilation2", "groups2-no-bias", "reflect"])
def test_activation_matches_functional(device, case, activation, gen):
    kwargs, shape = CONV_CASES[case]
    dilated, conv = make_pair(kwargs, device, activation=activation)
    x = randn(shape, gen, device)
    out, grad, grads = run(dilated, x)
    ref_out, ref_grad, ref_grads = run(ConvThen(conv, activation), x)
    torch.testing.assert_close(out, ref_out, **TIGHT)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)
    assert {"conv." + name for name in grads} == ref_grads.keys()
    for name, value in grads.items():
        torch.testing.assert_close(value, ref_grads["conv." + name], msg=name, **TIGHT)
    if activation == "relu":  # the activation did act
        assert (out >= 0).all() and (out == 0).any()
    else:
        assert (out < 0).any()


def test_state_dict_loads_both_ways(gen):
    kwargs = CONV_CASES["groups2-no-bias"][0] | dict(bias=True)
    with seeded(1):
        conv = nn.Conv2d(**kwargs, dtype=torch.float64)
        dilated = DilatedConv2d(**kwargs, dtype=torch.float64, activation="relu")
    assert dilated.state_dict().keys() == conv.state_dict().keys() == {"weight", "bias"}
    assert [n for n, _ in dilated.named_parameters()] == [n for n, _ in conv.named_parameters()]
    fresh = nn.Conv2d(**kwargs, dtype=torch.float64)
    fresh.load_state_dict(dilated.state_dict())  # strict
    assert_same_state(fresh, dilated, rtol=0, atol=0)
    dilated.load_state_dict(conv.state_dict())
    assert_same_state(dilated, conv, rtol=0, atol=0)
    dilated.activation = "none"
    x = randn((2, 4, 7, 6), gen)
    torch.testing.assert_close(dilated(x), conv(x), **TIGHT)


def test_same_default_initialization_as_conv2d():
    kwargs = dict(in_channels=3, out_channels=4, kernel_size=3, dilation=2)
    with seeded(5):
        conv = nn.Conv2d(**kwargs)
    with seeded(5):
        dilated = DilatedConv2d(**kwargs, activation="silu")
    assert_same_state(dilated, conv, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_from_conv_shares_parameters(device, bias, gen):
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(1, 2),
                  padding=(2, 1), dilation=(2, 1), groups=2, bias=bias,
                  padding_mode="circular")  # fmt: skip
    conv = nn.Conv2d(**kwargs, device=device, dtype=torch.float64).eval()
    dilated = DilatedConv2d.from_conv(conv, activation="gelu")
    assert type(dilated) is DilatedConv2d and dilated.activation == "gelu"
    assert dilated.weight is conv.weight
    assert (dilated.bias is conv.bias) if bias else dilated.bias is None
    assert not dilated.training
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode", "_reversed_padding_repeated_twice"):  # fmt: skip
        assert getattr(dilated, name) == getattr(conv, name), name
    assert dilated.weight.device == conv.weight.device and dilated.weight.dtype == torch.float64
    x = randn((2, 4, 9, 8), gen, device)
    torch.testing.assert_close(dilated(x), F.gelu(conv(x)), **TIGHT)
    with torch.no_grad():
        conv.weight.mul_(2)  # an update through one is seen by the other
    torch.testing.assert_close(dilated(x), F.gelu(conv(x)), **TIGHT)
    assert DilatedConv2d.from_conv(conv.train()).training
    assert DilatedConv2d.from_conv(dilated).weight is conv.weight  # a DilatedConv2d is a conv


def test_from_conv_rejects():
    with pytest.raises(TypeError, match="from_conv: conv must be an nn.Conv2d, got Linear"):
        DilatedConv2d.from_conv(nn.Linear(2, 2))
    conv = nn.Conv2d(2, 2, 3)
    nn.utils.parametrizations.weight_norm(conv)
    with pytest.raises(ValueError, match="from_conv: conv has parametrizations on \\['weight'\\]"):
        DilatedConv2d.from_conv(conv)
    with pytest.raises(ValueError, match="activation must be one of"):
        DilatedConv2d.from_conv(nn.Conv2d(2, 2, 3), activation="tanh")


def test_extra_repr():
    plain = DilatedConv2d(3, 4, 3, padding=2, dilation=2)
    assert "activation" not in repr(plain)
    assert repr(plain).removeprefix("Dilated") == repr(nn.Conv2d(3, 4, 3, padding=2, dilation=2))
    fused = DilatedConv2d(3, 4, 3, dilation=2, activation="relu")
    assert repr(fused).endswith("dilation=(2, 2), activation='relu')")


def test_dilated_conv2d_bad_arguments():
    with pytest.raises(ValueError, match=r"activation must be one of .*'gelu'\), got 'tanh'"):
        DilatedConv2d(3, 4, 3, activation="tanh")
    with pytest.raises(TypeError, match="activation must be None or a str.*got int 1"):
        DilatedConv2d(3, 4, 3, activation=1)
    with pytest.raises(TypeError, match="positional"):  # activation is keyword only
        DilatedConv2d(3, 4, 3, 1, 0, 1, 1, True, "zeros", None, None, "relu")
    # nn.Conv2d's own checks still apply.
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        DilatedConv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode"):
        DilatedConv2d(3, 4, 3, padding_mode="mirror")


# ---------------------------------------------------------------- ASPP


class ReferenceASPP(nn.Module):
    """DeepLabv3's ASPP as in torchvision, from plain nn.Conv2d; same state_dict keys.

    The pooling branch is written as a mean and a broadcast (bilinear upsampling of a 1x1 map
    is a broadcast); index 0 of it is a placeholder for torchvision's AdaptiveAvgPool2d.
    """

    def __init__(self, in_channels, out_channels, rates, dropout=0.5):
        super().__init__()

        def branch(conv):
            return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU())

        branches = [branch(nn.Conv2d(in_channels, out_channels, 1, bias=False))]
        for rate in rates:
            branches.append(
                branch(
                    nn.Conv2d(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=False)
                )
            )
        pool_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        pool = nn.Sequential(nn.Identity(), *branch(pool_conv))
        self.convs = nn.ModuleList(branches + [pool])
        self.project = nn.Sequential(
            *branch(nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False)),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        *convs, pool = self.convs
        pooled = pool[1:](x.mean((2, 3), keepdim=True)).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([conv(x) for conv in convs] + [pooled], 1))


def make_aspps(in_channels, out_channels, rates, dropout, device, seed=0):
    """(ASPP, ReferenceASPP) in float64 with equal, non-trivial state (BN statistics too)."""
    with seeded(seed):
        aspp = ASPP(in_channels, out_channels, rates, dropout)
        aspp = aspp.to(device=device, dtype=torch.float64)
        for module in aspp.modules():
            if isinstance(module, nn.BatchNorm2d):  # not the identity of a fresh BatchNorm
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    reference = ReferenceASPP(in_channels, out_channels, rates, dropout)
    reference = reference.to(device=device, dtype=torch.float64)
    reference.load_state_dict(aspp.state_dict())  # strict: same keys and shapes
    return aspp, reference


ASPP_CASES = [
    pytest.param(3, 4, (1, 2, 3), (2, 3, 13, 11), id="rates1-2-3-13x11"),
    pytest.param(5, 3, (6, 12, 18), (2, 5, 9, 7), id="default-rates-9x7"),
    pytest.param(2, 2, (2,), (3, 2, 5, 6), id="one-rate-5x6"),
    pytest.param(3, 2, (1, 4), (2, 3, 1, 1), id="1x1-map"),
]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("in_channels, out_channels, rates, shape", ASPP_CASES)
def test_aspp_matches_reference(device, in_channels, out_channels, rates, shape, mode, gen):
    aspp, reference = make_aspps(in_channels, out_channels, rates, 0.5, device)
    aspp.train(mode == "train")
    reference.train(mode == "train")
    x = randn(shape, gen, device)
    assert_same_run(aspp, reference, x)  # train: the same dropout mask (same seed and shape)
    assert_same_state(aspp, reference)  # train: the same updated BatchNorm statistics
    out = aspp(x)
    assert out.shape == (shape[0], out_channels, *shape[2:])
    if mode == "eval":
        torch.testing.assert_close(out, reference(x), **TIGHT)


def test_aspp_structure_and_state_dict_both_ways(gen):
    aspp, reference = make_aspps(4, 3, (1, 2), 0.0, "cpu")
    assert aspp.state_dict().keys() == reference.state_dict().keys()
    assert [n for n, _ in aspp.named_parameters()] == [n for n, _ in reference.named_parameters()]
    keys = aspp.state_dict().keys()
    expected = ["convs.0.0.weight", "convs.1.0.weight", "convs.2.1.running_var"]
    expected += ["convs.3.1.weight", "convs.3.2.bias", "project.0.weight", "project.1.weight"]
    assert set(expected) <= keys
    assert aspp.convs[3][1].weight.shape == (3, 4, 1, 1)  # the pooling branch's conv
    assert aspp.project[0].weight.shape == (3, 4 * 3, 1, 1)
    assert aspp.project[3].p == 0.0
    convs = [m for m in aspp.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5 and all(type(m) is DilatedConv2d and m.bias is None for m in convs)
    assert [c.dilation for c in convs[1:3]] == [(1, 1), (2, 2)]
    assert [c.padding for c in convs[1:3]] == [(1, 1), (2, 2)]
    # Reference state into ASPP: equal outputs in eval mode.
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1)
    aspp.load_state_dict(reference.state_dict())
    x = randn((2, 4, 7, 5), gen)
    torch.testing.assert_close(aspp.eval()(x), reference.eval()(x), **TIGHT)
    assert ASPP(4, 3).rates == (6, 12, 18) and ASPP(4, 3).project[3].p == 0.5
    assert "rates=(6, 12, 18)" in repr(ASPP(4, 3))


def test_aspp_bad_arguments():
    with pytest.raises(ValueError, match="ASPP: rates must not be empty, got \\(\\)"):
        ASPP(3, 4, ())
    with pytest.raises(ValueError, match=r"ASPP: rates must be a sequence of ints >= 1, got "
                                         r"rates\[1\] = 0"):  # fmt: skip
        ASPP(3, 4, (6, 0))
    with pytest.raises(TypeError, match=r"rates\[0\] = 1.5 \(float\)"):
        ASPP(3, 4, (1.5,))
    with pytest.raises(TypeError, match="ASPP: rates must be a sequence of ints >= 1, got int 6"):
        ASPP(3, 4, 6)
    with pytest.raises(ValueError, match="ASPP: in_channels must be an int >= 1, got 0"):
        ASPP(0, 4)
    with pytest.raises(TypeError, match="ASPP: out_channels must be an int >= 1, got str '4'"):
        ASPP(3, "4")
    with pytest.raises(ValueError, match=r"ASPP: dropout must be a float in \[0, 1\], got 1.5"):
        ASPP(3, 4, dropout=1.5)
    with pytest.raises(TypeError, match="ASPP: dropout must be a float"):
        ASPP(3, 4, dropout=None)


# ---------------------------------------------------------------- receptive_field


def impulse_receptive_field(kernel_sizes, dilations, strides) -> int:
    """Inputs reaching output 0 of a stack of F.conv2d with all-ones weights: the span from
    the first to the last input whose gradient is nonzero."""
    width = 1 + sum((k - 1) * d for k, d in zip(kernel_sizes, dilations, strict=True)) * (
        math.prod(strides)
    )  # enough for one output
    x = torch.ones(1, 1, 1, width, dtype=torch.float64, requires_grad=True)
    y = x
    for k, d, s in zip(kernel_sizes, dilations, strides, strict=True):
        y = F.conv2d(y, torch.ones(1, 1, 1, k, dtype=torch.float64), stride=(1, s),
                     dilation=(1, d))  # fmt: skip
    y[0, 0, 0, 0].backward()
    reached = x.grad[0, 0, 0].nonzero().flatten()
    assert reached[0] == 0
    return int(reached[-1]) + 1


@pytest.mark.parametrize(
    "kernel_sizes, dilations, strides, expected",
    [
        ((3, 3, 3), (1, 1, 1), None, 7),
        ((3, 3, 3), (1, 2, 4), None, 15),
        ((3, 3, 3), (1, 2, 5), None, 17),
        ((3, 3, 3), (1, 1, 1), (2, 2, 1), 15),  # 1 + 2 + 2 * 2 + 2 * 4
        ((7, 3, 3), (1, 1, 1), (2, 2, 1), 19),  # ResNet stem (conv 7/2, pool 3/2), one 3x3
        ((3, 3), (2, 2), (1, 2), 9),  # the last stride does not count
        ((1, 1), (5, 7), None, 1),
        ((5,), (3,), (4,), 13),
        ((), (), None, 1),
    ],
)
def test_receptive_field_hand_checked(kernel_sizes, dilations, strides, expected):
    assert receptive_field(kernel_sizes, dilations, strides) == expected
    strides = strides or (1,) * len(kernel_sizes)
    if kernel_sizes:
        assert impulse_receptive_field(kernel_sizes, dilations, strides) == expected


def test_receptive_field_against_impulse_response():
    rng = random.Random(11)
    for _ in range(60):
        layers = rng.randint(1, 4)
        kernel_sizes = [rng.randint(1, 5) for _ in range(layers)]
        dilations = [rng.randint(1, 4) for _ in range(layers)]
        strides = [rng.randint(1, 3) for _ in range(layers)]
        expected = impulse_receptive_field(kernel_sizes, dilations, strides)
        assert receptive_field(kernel_sizes, dilations, strides) == expected, (
            kernel_sizes, dilations, strides
        )  # fmt: skip


def test_receptive_field_bad_arguments():
    with pytest.raises(ValueError, match="must have the same length, got 3, 2 and 3"):
        receptive_field((3, 3, 3), (1, 2))
    with pytest.raises(ValueError, match="must have the same length, got 2, 2 and 1"):
        receptive_field((3, 3), (1, 2), (2,))
    with pytest.raises(ValueError, match=r"kernel_sizes must be a sequence of ints >= 1, got "
                                         r"kernel_sizes\[1\] = 0"):  # fmt: skip
        receptive_field((3, 0), (1, 1))
    with pytest.raises(ValueError, match=r"strides\[0\] = -1"):
        receptive_field((3,), (1,), (-1,))
    with pytest.raises(TypeError, match=r"dilations\[0\] = 2.0 \(float\)"):
        receptive_field((3,), (2.0,))
    with pytest.raises(TypeError, match=r"dilations\[0\] = True \(bool\)"):
        receptive_field((3,), (True,))
    with pytest.raises(TypeError, match="kernel_sizes must be a sequence of ints >= 1, got int 3"):
        receptive_field(3, (1,))


# ---------------------------------------------------------------- check_gridding


def covered_offsets(rates, kernel_size: int) -> torch.Tensor:
    """Brute force: the kernel of the stack of dilated convs with all-ones taps, composed with
    F.conv1d (full convolution of the kernel so far with the next layer's dilated taps).
    Entry j counts the paths from input offset j to the output; 0 is a hole."""
    kernel = torch.ones(1, 1, 1, dtype=torch.float64)
    taps = torch.ones(1, 1, kernel_size, dtype=torch.float64)
    for rate in rates:
        kernel = F.conv1d(kernel, taps, dilation=rate, padding=(kernel_size - 1) * rate)
    return kernel.flatten()


def brute_force_gridding_free(rates, kernel_size: int = 3) -> bool:
    return bool((covered_offsets(rates, kernel_size) > 0).all())


def hdc_rule(rates, kernel_size: int = 3) -> bool:
    """The closed form of Wang et al. 2018 (HDC): M_n = r_n,
    M_i = max(M_{i+1} - 2 r_i, M_{i+1} - 2 (M_{i+1} - r_i), r_i), free when M_2 <= K and the
    rates have no common factor > 1. (A single layer: free when its rate is 1.)"""
    if len(rates) == 1:
        return rates[0] == 1 or kernel_size == 1
    m = rates[-1]
    for r in reversed(rates[1:-1]):
        m = max(m - 2 * r, m - 2 * (m - r), r)
    return m <= kernel_size and math.gcd(*rates) == 1


def test_check_gridding_required_cases():
    assert check_gridding((1, 2, 5)) is True
    assert check_gridding((1, 2, 9)) is False
    assert check_gridding((2, 4, 8)) is False
    for rates in [(1, 2, 5), (1, 2, 9), (2, 4, 8)]:
        assert hdc_rule(rates) == brute_force_gridding_free(rates) == check_gridding(rates)
    # (1, 2, 9): offsets 4 and 5 (and -4, -5 around the centre) are unreachable.
    holes = (covered_offsets((1, 2, 9), 3) == 0).nonzero().flatten() - 12
    assert holes.tolist() == [-5, -4, 4, 5]
    assert covered_offsets((1, 2, 5), 3).numel() == receptive_field((3, 3, 3), (1, 2, 5))


def test_check_gridding_against_brute_force():
    rng = random.Random(2018)
    cases = [(r,) for r in range(1, 5)] + list(itertools.product(range(1, 7), repeat=3))
    cases += [tuple(rng.randint(1, 24) for _ in range(rng.randint(1, 5))) for _ in range(300)]
    for rates in cases:
        for kernel_size in (1, 2, 3, 5):
            expected = brute_force_gridding_free(rates, kernel_size)
            assert check_gridding(rates, kernel_size) is expected, (rates, kernel_size)
            assert check_gridding(rates[::-1], kernel_size) is expected  # order-independent


def test_hdc_rule_is_exact_in_its_setting():
    """3x3 kernels, first rate 1, non-decreasing rates: the closed form equals brute force."""
    for layers in (2, 3, 4):
        for tail in itertools.combinations_with_replacement(range(1, 13), layers - 1):
            rates = (1, *tail)
            expected = brute_force_gridding_free(rates)
            assert hdc_rule(rates) == expected == check_gridding(rates), rates


@pytest.mark.parametrize(
    "rates, kernel_size, free",
    [
        ((2, 3), 3, False),  # the rule ignores r_1: the first layer's own holes
        ((3, 2), 3, False),  # M_2 = 2 <= 3, yet offset 1 is not reached
        ((1, 5, 2), 3, True),  # the rule depends on the order; (1, 2, 5) reordered
        ((1, 3, 1), 3, True),
        ((1, 1, 8), 5, True),  # the rule's 2 r_i assume 3 taps: -20..20 all covered
        ((1, 2, 5), 2, False),  # ... and 2 taps: 0..8 minus 4
    ],
)
def test_hdc_rule_disagreements_follow_brute_force(rates, kernel_size, free):
    assert hdc_rule(rates, kernel_size) is not free
    assert brute_force_gridding_free(rates, kernel_size) is free
    assert check_gridding(rates, kernel_size) is free


def test_check_gridding_bad_arguments():
    with pytest.raises(ValueError, match="check_gridding: rates must not be empty"):
        check_gridding(())
    with pytest.raises(ValueError, match=r"rates must be a sequence of ints >= 1, got "
                                         r"rates\[2\] = 0"):  # fmt: skip
        check_gridding((1, 2, 0))
    with pytest.raises(TypeError, match=r"rates\[0\] = 1.0 \(float\)"):
        check_gridding((1.0, 2))
    with pytest.raises(ValueError, match="check_gridding: kernel_size must be an int >= 1, got 0"):
        check_gridding((1, 2), kernel_size=0)
    with pytest.raises(TypeError, match="kernel_size must be an int >= 1, got float 3.0"):
        check_gridding((1, 2), kernel_size=3.0)


# ---------------------------------------------------------------- swap_convs


class SubConv(nn.Conv2d):
    """A subclass: swap_convs leaves it alone (it may override forward)."""


class TinySegNet(nn.Module):
    """Segmentation-style: a stem, dilated and depthwise convs, an ASPP of nn.Conv2d, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=2, dilation=2),  # body.0: dilated
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=4, dilation=4, groups=8, bias=False),  # body.3: both
            nn.Conv2d(8, 8, 3, padding=1, groups=8),  # body.4: depthwise only
            # body.5: dilated along H only, reflect padding
            nn.Conv2d(8, 8, (3, 1), padding=(3, 0), dilation=(3, 1), padding_mode="reflect"),
            SubConv(8, 8, 3, padding=2, dilation=2),  # body.6: a subclass
            nn.ReLU(),
        )
        self.aspp = ReferenceASPP(8, 4, rates=(1, 2, 3))  # rate 1: not dilated
        self.head = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        return self.head(self.aspp(self.body(self.stem(x))))


DILATED_PATHS = ["body.0", "body.3", "body.5", "aspp.convs.2.0", "aspp.convs.3.0"]


def make_segnet(device="cpu"):
    with seeded(3):
        return TinySegNet().to(device=device, dtype=torch.float64)


@pytest.mark.parametrize("depthwise", [False, True])
def test_swap_convs_same_outputs_gradients_and_parameters(device, depthwise, gen):
    model = make_segnet(device)
    reference = copy.deepcopy(model)  # the model as it was, to compare with
    params_before = list(model.named_parameters())
    modules_before = list(model.named_modules())
    handle = swap_convs(model, depthwise=depthwise)
    expected = DILATED_PATHS[:2] + ["body.4"] + DILATED_PATHS[2:] if depthwise else DILATED_PATHS
    assert handle.swapped == expected and handle.active
    assert isinstance(handle, SwapConvsHandle) and "active" in repr(handle)
    swapped = dict(model.named_modules())
    for path, original, replacement in zip(
        expected, handle.originals, handle.replacements, strict=True
    ):
        assert swapped[path] is replacement and type(replacement) is DilatedConv2d
        assert dict(modules_before)[path] is original and type(original) is nn.Conv2d
        assert replacement.weight is original.weight and replacement.bias is original.bias
    assert type(model.body[6]) is SubConv and type(model.aspp.convs[1][0]) is nn.Conv2d
    assert (type(model.body[4]) is DilatedConv2d) is depthwise
    # The very same parameter objects, under the same names, in the same order.
    params_after = list(model.named_parameters())
    assert [n for n, _ in params_after] == [n for n, _ in params_before]
    assert all(a is b for (_, a), (_, b) in zip(params_after, params_before, strict=True))
    assert model.state_dict().keys() == reference.state_dict().keys()

    x = randn((2, 3, 11, 9), gen, device)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        reference.train(mode == "train")
        assert_same_run(model, reference, x)
        assert_same_state(model, reference)  # BatchNorm statistics updated alike

    handle.undo()
    assert not handle.active and "undone" in repr(handle)
    modules_after = list(model.named_modules())
    assert [n for n, _ in modules_after] == [n for n, _ in modules_before]
    assert all(a is b for (_, a), (_, b) in zip(modules_after, modules_before, strict=True))
    assert_same_run(model, reference, x)
    handle.undo()  # a second undo changes nothing
    assert all(a is b for (_, a), (_, b) in zip(model.named_modules(), modules_before, strict=True))


def test_swap_convs_keeps_training_mode_and_optimizer_updates(gen):
    model = make_segnet()
    model.body.eval()
    handle = swap_convs(model)
    assert not model.body[0].training and not model.body[5].training
    assert model.aspp.convs[2][0].training
    weight = model.body[0].weight
    before = weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with seeded(0):  # the dropout of the ASPP
        model(randn((2, 3, 6, 7), gen)).square().mean().backward()
    optimizer.step()
    handle.undo()
    # The restored conv holds the stepped parameter: it is the same object.
    assert model.body[0].weight is weight and not torch.equal(weight, before)


def test_undo_swap_convs_and_context_manager():
    model = make_segnet()
    originals = [model.get_submodule(path) for path in DILATED_PATHS]
    swap_convs(model)
    hand_made = DilatedConv2d(4, 5, 1)
    model.head = hand_made  # not made by swap_convs: stays
    assert undo_swap_convs(model) == DILATED_PATHS
    assert all(model.get_submodule(p) is o for p, o in zip(DILATED_PATHS, originals, strict=True))
    assert model.head is hand_made
    with pytest.raises(ValueError, match="TinySegNet has no DilatedConv2d made by swap_convs"):
        undo_swap_convs(model)
    with swap_convs(model) as handle:
        assert handle.active and type(model.body[0]) is DilatedConv2d
    assert not handle.active
    assert all(model.get_submodule(p) is o for p, o in zip(DILATED_PATHS, originals, strict=True))
    # The record of the original survives a deepcopy, parameters still shared inside the copy.
    swap_convs(model)
    twin = copy.deepcopy(model)
    weight = twin.body[0].weight
    assert undo_swap_convs(twin) == DILATED_PATHS
    assert type(twin.body[0]) is nn.Conv2d and twin.body[0] is not originals[0]
    assert twin.body[0].weight is weight


def test_swap_convs_shared_conv_and_refused_undo():
    shared = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ModuleList([shared]))
    handle = swap_convs(model)
    assert handle.swapped == ["0"]  # listed once, replaced in every slot
    assert model[0] is model[2] is model[3][0] is handle.replacements[0]
    model[2] = nn.Identity()
    with pytest.raises(RuntimeError, match="'2' no longer holds the DilatedConv2d.*Identity"):
        handle.undo()
    assert model[0] is handle.replacements[0]  # nothing was restored
    model[2] = handle.replacements[0]
    handle.undo()
    assert model[0] is model[2] is model[3][0] is shared


def test_swap_convs_nothing_matches_and_bad_arguments():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match=r"no dilated \(dilation > 1\) nn.Conv2d in Sequential"):
        swap_convs(plain)
    assert type(swap_convs(plain, depthwise=True).replacements[0]) is DilatedConv2d
    model = make_segnet()
    swap_convs(model)
    with pytest.raises(ValueError, match="no dilated"):  # already swapped
        swap_convs(model)
    with pytest.raises(ValueError, match="dilated and depthwise are both False"):
        swap_convs(plain, dilated=False)
    with pytest.raises(ValueError, match="the model itself is a dilated .*from_conv"):
        swap_convs(nn.Conv2d(3, 3, 3, dilation=2))
    with pytest.raises(TypeError, match="swap_convs: model must be an nn.Module, got dict"):
        swap_convs({})
    with pytest.raises(TypeError, match="swap_convs: depthwise must be a bool, got 1"):
        swap_convs(plain, depthwise=1)
