"""Samples of the dilated convolution ops: dilated_conv2d (both overloads) and its kernels."""

from __future__ import annotations

import torch

from . import Sample

ops = torch.ops.torch_ext

OPCHECK_SKIPS = {
    "_dilated_conv2d_route": {
        "test_aot_dispatch_dynamic": "returns a str: the sub-test compares the eager and the "
        "AOTAutograd outputs with torch.testing.assert_close, which cannot compare strings",
    },
}


def sample_inputs(device: str) -> dict[str, list[Sample]]:
    gen = torch.Generator().manual_seed(0)

    def tensor(shape, dtype=torch.float64, channels_last=False, requires_grad=False):
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(requires_grad)

    def conv(x_shape, cout, kernel, groups, dtype=torch.float64, channels_last=False, grad=False):
        """(input, weight, bias) of a convolution; weights scaled by 1 / sqrt(fan_in)."""
        cin = x_shape[1]
        fan_in = cin // groups * kernel[0] * kernel[1]
        x = tensor(x_shape, dtype, channels_last, grad)
        with torch.no_grad():
            w = (tensor((cout, cin // groups, *kernel), dtype) * fan_in**-0.5).requires_grad_(grad)
        b = tensor((cout,), dtype, requires_grad=grad)
        return x, w, b

    dense = conv((2, 3, 6, 5), 4, (3, 2), 1, grad=True)
    depthwise_cl = conv((1, 3, 5, 5), 6, (3, 3), 3, torch.float32, channels_last=True, grad=True)
    grouped = conv((2, 4, 6, 5), 2, (2, 3), 2)
    dense_raw = conv((2, 3, 6, 5), 4, (3, 2), 1)

    stride, pad4, dilation = [1, 2], [2, 0, 1, 1], [1, 2]
    with torch.no_grad():
        out, preact = ops._dilated_conv2d_forward(
            *dense_raw, stride, pad4, dilation, 1, "silu", True
        )
        relu_out, _ = ops._dilated_conv2d_forward(*grouped, [1, 1], pad4, [2, 1], 2, "relu", False)

    def like(t, channels_last=False):
        return tensor(t.shape, t.dtype, channels_last)

    return {
        "dilated_conv2d": [
            Sample((*dense, [2, 1], [1, 2], [1, 2], 1, "silu"), label="dense-silu-f64"),
            Sample(
                (depthwise_cl[0], depthwise_cl[1], None, [1, 1], [1, 0], [2, 1], 3, "relu"),
                label="depthwise-relu-f32-channels_last",
            ),
        ],
        "dilated_conv2d.padding": [
            Sample((*dense, [1, 1], "same", [2, 1], 1, "gelu"), label="same-gelu-f64"),
            Sample(
                (*depthwise_cl,),
                {"padding": "valid", "groups": 3},
                label="valid-depthwise-f32-channels_last",
            ),
        ],
        "_dilated_conv2d_forward": [
            Sample((*dense_raw, stride, pad4, dilation, 1, "silu", True), label="silu-preact"),
            Sample((*grouped, [1, 1], pad4, [2, 1], 2, "relu", False), label="grouped-relu"),
        ],
        "_dilated_conv2d_backward": [
            Sample(
                (
                    like(out),
                    dense_raw[0],
                    dense_raw[1],
                    preact,
                    stride,
                    pad4,
                    dilation,
                    1,
                    "silu",
                    [True, True, True],
                ),
                label="silu-all",
            ),
            Sample(
                (
                    like(relu_out),
                    grouped[0],
                    grouped[1],
                    relu_out,
                    [1, 1],
                    pad4,
                    [2, 1],
                    2,
                    "relu",
                    [True, False, True],
                ),
                label="grouped-relu-no-weight",
            ),
        ],
        "_dilated_conv2d_route": [
            Sample((dense_raw[0], dense_raw[1], [0, 0, 0, 0], 1), label="dense"),
            Sample(
                (depthwise_cl[0].detach(), depthwise_cl[1].detach(), [1, 1, 1, 1], 3),
                label="depthwise",
            ),
        ],
    }
