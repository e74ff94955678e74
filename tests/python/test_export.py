"""torch.export on models using each op family: the exported program runs, matches eager, and
keeps the dimensions the ops allow dynamic (batch, and spatial sizes for the pooling ops)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

import torch_ext
from torch_ext.checkpoint import checkpoint_wrapper


class SppHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.sppf = torch_ext.nn.SPPF(5)
        self.spp = torch_ext.nn.SpatialPyramidPooling((1, 2, 4))
        self.fc = nn.Linear(8 * 4 * 21, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.spp(self.sppf(self.conv(x))))


class Metrics(nn.Module):
    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        confmat = torch_ext.confusion_matrix(scores, target, 4, ignore_index=255, validate=False)
        return (confmat, *torch_ext.segmentation_metrics(confmat))


def export_and_compare(model, args, dynamic_shapes, other_args):
    program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    for inputs in (args, other_args):  # the traced sizes and other ones
        expected = model(*inputs)
        got = program.module()(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        for e, g in zip(expected, got, strict=True):
            torch.testing.assert_close(g, e, equal_nan=True)
    return program


def test_export_spp_family_with_dynamic_batch_and_size():
    model = SppHead().eval()
    batch, height, width = Dim("batch", min=1, max=64), Dim("h", min=4, max=256), Dim("w")
    program = export_and_compare(
        model,
        (torch.randn(2, 3, 16, 12),),
        ({0: batch, 2: height, 3: width},),
        (torch.randn(5, 3, 9, 23),),
    )
    targets = {str(node.target) for node in program.graph.nodes}
    assert any("torch_ext.sppf" in t for t in targets), targets
    assert any("torch_ext.spp" in t or "torch_ext._spp_forward" in t for t in targets), targets


def test_export_metrics_family_with_dynamic_batch():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 4, 8, 8, generator=gen)
    target = torch.randint(0, 4, (2, 8, 8), generator=gen)
    other_scores = torch.randn(3, 4, 5, 7, generator=gen)
    other_target = torch.randint(0, 4, (3, 5, 7), generator=gen)
    batch, height, width = Dim("batch", min=1, max=64), Dim("h"), Dim("w")
    export_and_compare(
        Metrics(),
        (scores, target),
        ({0: batch, 2: height, 3: width}, {0: batch, 1: height, 2: width}),
        (other_scores, other_target),
    )


def test_export_checkpointed_model_in_inference():
    # Exported programs are inference graphs: the checkpoint wrapper just runs its module.
    model = nn.Sequential(checkpoint_wrapper(nn.Linear(6, 6)), nn.GELU(), nn.Linear(6, 2)).eval()
    batch = Dim("batch", min=1, max=64)
    with torch.no_grad():
        export_and_compare(model, (torch.randn(3, 6),), ({0: batch},), (torch.randn(7, 6),))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_export_spp_family_on_cuda():
    model = SppHead().eval().cuda()
    export_and_compare(
        model,
        (torch.randn(2, 3, 16, 12, device="cuda"),),
        ({0: Dim("batch", min=1, max=64)},),
        (torch.randn(4, 3, 16, 12, device="cuda"),),
    )


class DilatedNet(nn.Module):
    """A dilated stem with a fused activation, a depthwise dilated conv and an ASPP head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch_ext.nn.DilatedConv2d(3, 8, 3, padding=2, dilation=2, activation="relu")
        self.depthwise = torch_ext.nn.DilatedConv2d(8, 8, 5, padding="same", dilation=3, groups=8)
        self.aspp = torch_ext.nn.ASPP(8, 8, rates=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.depthwise(self.stem(x)))


def test_export_conv_family_with_dynamic_batch_and_size():
    torch.manual_seed(0)
    model = DilatedNet().eval()
    batch, height, width = Dim("batch", min=1, max=64), Dim("h", min=8, max=256), Dim("w")
    program = export_and_compare(
        model,
        (torch.randn(2, 3, 16, 12),),
        ({0: batch, 2: height, 3: width},),
        (torch.randn(3, 3, 21, 9),),
    )
    targets = {str(node.target) for node in program.graph.nodes}
    assert any("torch_ext.dilated_conv2d" in t for t in targets), targets


class UnpadMLP(nn.Module):
    """Remove padding once, an MLP on the real tokens, pad back: the varlen family."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens, indices, _, _, _ = torch_ext.unpad_input(hidden, mask)
        return torch_ext.pad_input(self.mlp(tokens), indices, hidden.shape[0], hidden.shape[1])


def test_export_varlen_family_with_dynamic_batch_and_length():
    gen = torch.Generator().manual_seed(0)
    model = UnpadMLP().eval()
    hidden, mask = torch.randn(3, 10, 6, generator=gen), torch.rand(3, 10, generator=gen) > 0.3
    other = torch.randn(5, 7, 6, generator=gen), torch.rand(5, 7, generator=gen) > 0.5
    batch, length = Dim("batch", min=2, max=64), Dim("length", min=2, max=4096)
    program = export_and_compare(
        model, (hidden, mask), ({0: batch, 1: length}, {0: batch, 1: length}), other
    )
    targets = {str(node.target) for node in program.graph.nodes}
    assert any("torch_ext.unpad_input" in t or "torch_ext._unpad_plan" in t for t in targets)
    assert any("torch_ext.pad_input" in t or "torch_ext.index_put" in t for t in targets)
    # Padded positions come out exactly zero from the exported program too.
    out = program.module()(*other)
    assert torch.equal(out[~other[1]], torch.zeros_like(out[~other[1]]))
