"""Samples of the spatial pyramid pooling ops: spp, sppf and their private kernels."""

from __future__ import annotations

import torch

from . import Sample

ops = torch.ops.torch_ext


def _distinct(shape, gen, *, dtype, device, channels_last=False):
    """A permutation of 0..numel-1 (no ties: max pooling is differentiable everywhere)."""
    numel = torch.Size(shape).numel()
    x = (torch.randperm(numel, generator=gen).double().reshape(shape) - numel / 2).to(
        device=device, dtype=dtype
    )
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def sample_inputs(device: str) -> dict[str, list[Sample]]:
    gen = torch.Generator().manual_seed(0)

    def x(dtype=torch.float64, channels_last=False, requires_grad=False):
        t = _distinct((2, 3, 5, 4), gen, dtype=dtype, device=device, channels_last=channels_last)
        return t.requires_grad_(requires_grad)

    levels = [1, 2, 3]
    bins = sum(level * level for level in levels)
    with torch.no_grad():
        base = x()
        _, indices = ops._spp_forward(base, levels, "max", True)
        base_cl = x(channels_last=True)
        sppf_out = ops.sppf(base, 3, 2)
        sppf_out_cl = ops.sppf(base_cl, 3, 2)

    def grad(shape, channels_last=False):
        g = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
        return g.contiguous(memory_format=torch.channels_last) if channels_last else g

    return {
        "spp": [
            Sample((x(requires_grad=True), levels, "max"), label="max-f64"),
            Sample(
                (x(torch.float32, channels_last=True, requires_grad=True), [2, 1]),
                {"mode": "avg"},
                label="avg-f32-channels_last",
            ),
        ],
        "_spp_forward": [
            Sample((x(), levels, "max", True), label="max-indices"),
            Sample((x(torch.float32, channels_last=True), levels, "avg", False), label="avg-f32"),
        ],
        "_spp_backward": [
            Sample(
                (
                    grad((2, 3 * bins)),
                    indices,
                    list(base.shape),
                    levels,
                    "max",
                    torch.contiguous_format,
                ),
                label="max",
            ),
            Sample(
                (
                    grad((2, 3 * bins)),
                    torch.empty(0, dtype=torch.long, device=device),
                    list(base.shape),
                    levels,
                    "avg",
                    torch.channels_last,
                ),
                label="avg-channels_last",
            ),
        ],
        "sppf": [
            Sample((x(requires_grad=True), 3, 2), label="f64"),
            Sample(
                (x(torch.float32, channels_last=True, requires_grad=True),),
                {"kernel_size": 3, "repeats": 1},
                label="f32-channels_last",
            ),
        ],
        "_sppf_backward": [
            Sample((grad(sppf_out.shape), sppf_out, 3, 2), label="f64"),
            Sample(
                (grad(sppf_out_cl.shape, channels_last=True), sppf_out_cl, 3, 2),
                label="channels_last",
            ),
        ],
    }
