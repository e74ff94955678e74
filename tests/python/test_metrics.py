"""torch_ext.confusion_matrix, torch_ext.segmentation_metrics and the streaming accumulation op
against independent references.

* Confusion matrices: NumPy ``bincount(K * target + pred)`` in int64 over the kept pixels, the
  scores argmaxed by NumPy in float64 (ties to the lowest class, the first NaN wins), computed
  from the logical values of the very tensors handed to the op (whatever their layout); and
  torchmetrics' ``multiclass_confusion_matrix``.
* Metrics: hand-computed fractions of small matrices, a NumPy float64 implementation of the
  definitions, and torchmetrics' ``multiclass_jaccard_index``.
* Label dtypes (mixed too), score dtypes, 0-3 spatial dims, K from 1 to 1000, contiguous /
  channels_last / transposed / sliced / expanded inputs, ignore_index in and out of range,
  empty inputs, ties, NaN and infinities, validation errors and their messages, argument
  errors, determinism, opcheck, torch.compile and fresh random cases every run.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import torch_ext
from torch_ext import metrics
from torch_ext.metrics import MetricsResult, confusion_matrix, segmentation_metrics

ops = torch.ops.torch_ext

INT64_MAX = 2**63 - 1
LABEL_DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64]
SCORE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
METRIC_FIELDS = MetricsResult._fields


def dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_id(shape) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


# ---------------------------------------------------------------- references


def reference_confmat(pred, target, num_classes, ignore_index=None) -> torch.Tensor:
    """int64 [K, K] (rows = target) by NumPy, over the pixels whose target is not ignore_index
    and whose target and predicted class are in [0, K): what the op must count with validate
    False, and with validate True when every value is in range."""
    k = num_classes
    t = target.detach().cpu().to(torch.int64).numpy().reshape(-1)
    if pred.is_floating_point():
        scores = pred.detach().cpu().to(torch.float64).numpy()  # exact for every score dtype
        assert scores.shape[1] == k
        # np.argmax: the first maximum, and the first NaN when there is one (as torch.argmax).
        p = np.argmax(scores, axis=1).astype(np.int64).reshape(-1)
    else:
        p = pred.detach().cpu().to(torch.int64).numpy().reshape(-1)
    assert p.shape == t.shape
    keep = (t >= 0) & (t < k) & (p >= 0) & (p < k)
    if ignore_index is not None:
        keep &= t != ignore_index
    counts = np.bincount(k * t[keep] + p[keep], minlength=k * k).astype(np.int64)
    return torch.from_numpy(counts.reshape(k, k))


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def reference_metrics(confmat) -> dict:
    """The documented definitions in NumPy float64 (rows = ground truth)."""
    cm = np.asarray(confmat.cpu() if isinstance(confmat, torch.Tensor) else confmat)
    cm = cm.astype(np.float64)
    diag, gt, pr, total = np.diag(cm), cm.sum(1), cm.sum(0), cm.sum()
    nan = float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.where(gt > 0, diag / gt, nan)
        union = gt + pr - diag
        iou = np.where(union > 0, diag / union, nan)
        dice = np.where(gt + pr > 0, 2 * diag / (gt + pr), nan)
        pa = diag.sum() / total if total > 0 else nan
        fw = float(np.sum((gt / total * iou)[gt > 0])) if total > 0 else nan
    return dict(
        pixel_accuracy=pa,
        mean_pixel_accuracy=_nanmean(accuracy),
        iou=iou,
        mean_iou=_nanmean(iou),
        fw_iou=fw,
        dice=dice,
        mean_dice=_nanmean(dice),
    )


# ---------------------------------------------------------------- inputs


def draw_labels(shape, num_classes, gen, dtype=torch.int64, ignore_index=None, fraction=0.15):
    """Labels uniform in [0, K), a `fraction` of them set to ignore_index."""
    labels = torch.randint(0, num_classes, shape, generator=gen)
    if ignore_index is not None:
        labels = labels.masked_fill(torch.rand(shape, generator=gen) < fraction, ignore_index)
    return labels.to(dtype)


def draw_scores(shape, gen, dtype=torch.float32, values="randn"):
    """ "randn"; "ties" (integers 0..2: most pixels have several maxima); "equal" (all zero)."""
    if values == "randn":
        scores = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif values == "ties":
        scores = torch.randint(0, 3, shape, generator=gen).double()
    elif values == "equal":
        scores = torch.zeros(shape, dtype=torch.float64)
    else:
        raise ValueError(values)
    return scores.to(dtype)


def gap_value(dtype):
    """What the gaps of a "sliced" input hold: out of range for labels (reading one would raise
    or miscount), a winning score for scores (reading one would change the argmax)."""
    return 1000.0 if dtype.is_floating_point else torch.iinfo(dtype).max


def with_layout(x: torch.Tensor, layout: str, strict: bool = True) -> torch.Tensor:
    """`x` (on its device) in a memory layout. The values are x's except for "expanded" (every
    batch item is the first one); references are always computed from the returned tensor.

    contiguous; channels_last (dim 1 innermost: torch.channels_last for 4-D,
    channels_last_3d for 5-D); transposed (the last two dims' strides swapped); sliced (every
    other element along dim 1 and the last dim of a wider tensor whose gaps hold gap_value);
    expanded (stride 0 along dim 0)."""
    if layout == "contiguous":
        y = x.contiguous()
    elif layout == "channels_last":
        if x.dim() == 4:
            y = x.contiguous(memory_format=torch.channels_last)
        elif x.dim() == 5:
            y = x.contiguous(memory_format=torch.channels_last_3d)
        else:
            order = [0, *range(2, x.dim()), 1]
            inverse = [order.index(d) for d in range(x.dim())]
            y = x.permute(order).contiguous().permute(inverse)
    elif layout == "transposed":
        y = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        dims = {min(1, x.dim() - 1), x.dim() - 1}
        wide_shape = [2 * s + 1 if d in dims else s for d, s in enumerate(x.shape)]
        wide = torch.full(wide_shape, gap_value(x.dtype), dtype=x.dtype, device=x.device)
        index = tuple(slice(1, None, 2) if d in dims else slice(None) for d in range(x.dim()))
        wide[index] = x
        y = wide[index]
    elif layout == "expanded":
        y = x[:1].expand(x.shape)
    else:
        raise ValueError(layout)
    assert y.shape == x.shape
    if layout == "expanded" and x.shape[0] == 1:
        strict = False
    if strict and layout in ("transposed", "sliced", "expanded") and y.numel() > 1:
        assert not y.is_contiguous(), layout
    return y


def check(pred, target, num_classes, ignore_index=None, validate=True, *, expect_counts=True):
    """The op against the NumPy reference; returns the op's matrix."""
    out = confusion_matrix(pred, target, num_classes, ignore_index, validate)
    ref = reference_confmat(pred, target, num_classes, ignore_index)
    assert out.dtype == torch.int64
    assert out.shape == (num_classes, num_classes)
    assert out.device == target.device
    diff = (out.cpu() - ref).abs()
    assert torch.equal(out.cpu(), ref), (
        f"{int((diff != 0).sum())} of {num_classes}x{num_classes} cells differ "
        f"(total {int(out.sum())} vs {int(ref.sum())}); pred {pred.dtype} {tuple(pred.shape)} "
        f"strides {pred.stride()}, target {target.dtype} {tuple(target.shape)} "
        f"strides {target.stride()}, ignore_index {ignore_index}"
    )
    if expect_counts:
        assert int(ref.sum()) > 0  # the case is meaningful
    return out


# ---------------------------------------------------------------- confusion_matrix: labels


@pytest.mark.parametrize("target_dtype", LABEL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("pred_dtype", LABEL_DTYPES, ids=dtype_id)
def test_labels_every_dtype_pair(device, pred_dtype, target_dtype, gen):
    """Every pair of label dtypes, mixed included; 255 is ignored in target."""
    pred = draw_labels((2, 13, 17), 19, gen, pred_dtype).to(device)
    target = draw_labels((2, 13, 17), 19, gen, target_dtype, ignore_index=255).to(device)
    check(pred, target, 19, 255)
    # Without ignore_index there must be no ignored pixel (255 would be out of range).
    target_clean = draw_labels((2, 13, 17), 19, gen, target_dtype).to(device)
    check(pred, target_clean, 19)


LABEL_SHAPES = [(37,), (2, 13, 17), (2, 3, 7, 9), (1, 2, 3, 4, 5)]
LABEL_LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced", "expanded"]


@pytest.mark.parametrize("num_classes", [1, 2, 19])
@pytest.mark.parametrize("layout", LABEL_LAYOUTS)
@pytest.mark.parametrize("shape", LABEL_SHAPES, ids=shape_id)
def test_labels_shapes_and_layouts(device, shape, layout, num_classes, gen):
    if layout == "channels_last" and len(shape) not in (4, 5):
        pytest.skip("channels_last needs 4-D or 5-D labels")
    if layout in ("transposed",) and len(shape) < 2:
        pytest.skip("transposed needs 2 dims")
    pred = with_layout(draw_labels(shape, num_classes, gen, torch.int32).to(device), layout)
    target = draw_labels(shape, num_classes, gen, torch.uint8, ignore_index=255)
    target.view(-1)[0] = 0  # "expanded" repeats the first batch item: not all ignored
    check(pred, with_layout(target.to(device), layout), num_classes, 255)


@pytest.mark.parametrize("target_layout", ["contiguous", "transposed", "sliced", "expanded"])
@pytest.mark.parametrize("pred_layout", ["contiguous", "transposed", "sliced", "expanded"])
def test_labels_mixed_layouts(device, pred_layout, target_layout, gen):
    pred = draw_labels((3, 11, 14), 7, gen, torch.int64).to(device)
    target = draw_labels((3, 11, 14), 7, gen, torch.int16, ignore_index=-1).to(device)
    check(with_layout(pred, pred_layout), with_layout(target, target_layout), 7, -1)


@pytest.mark.parametrize(
    "num_classes,dtype",
    [
        (150, torch.uint8),
        (150, torch.int64),
        (200, torch.uint8),  # K * K = 40000: no room in uint8 (or int16) arithmetic
        (200, torch.int16),
        (1000, torch.int16),
        (1000, torch.int32),
        (1000, torch.int64),
    ],
    ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else f"K{v}",
)
def test_labels_many_classes(device, num_classes, dtype, gen):
    shape = (2, 41, 53)
    pred = draw_labels(shape, num_classes, gen, dtype)
    target = draw_labels(shape, num_classes, gen, dtype)
    # The largest keys too: the last class against itself and against class 0.
    pred.view(-1)[:3] = torch.tensor([num_classes - 1, 0, num_classes - 1]).to(dtype)
    target.view(-1)[:3] = torch.tensor([num_classes - 1, num_classes - 1, 0]).to(dtype)
    out = check(pred.to(device), target.to(device), num_classes)
    assert out[num_classes - 1, num_classes - 1] >= 1 and out[num_classes - 1, 0] >= 1
    assert out[0, num_classes - 1] >= 1


def test_labels_uint8_no_overflow_in_one_cell(device):
    """Far more than 255 (and 65535) pixels in one cell."""
    pred = torch.full((3, 200, 150), 199, dtype=torch.uint8, device=device)
    target = torch.full((3, 200, 150), 198, dtype=torch.uint8, device=device)
    out = confusion_matrix(pred, target, 200)
    expected = torch.zeros(200, 200, dtype=torch.int64)
    expected[198, 199] = 3 * 200 * 150
    assert torch.equal(out.cpu(), expected)


def test_one_class(device, gen):
    pred = torch.zeros(2, 5, 6, dtype=torch.int64, device=device)
    target = draw_labels((2, 5, 6), 1, gen, torch.uint8, ignore_index=255).to(device)
    out = check(pred, target, 1, 255)
    assert int(out[0, 0]) == int((target.cpu() != 255).sum())
    scores = draw_scores((2, 1, 5, 6), gen).to(device)
    out = check(scores, target, 1, 255)
    assert int(out[0, 0]) == int((target.cpu() != 255).sum())


def test_hand_written_labels(device):
    """A matrix small enough to count by hand (rows = target, columns = pred)."""
    target = torch.tensor([0, 0, 1, 1, 1, 2, 2, 255, 0], device=device)
    pred = torch.tensor([0, 1, 1, 1, 2, 2, 0, 2, 2], device=device)
    expected = torch.tensor([[1, 1, 1], [0, 2, 1], [1, 0, 1]])
    assert torch.equal(confusion_matrix(pred, target, 3, 255).cpu(), expected)
    # ignore_index in range: class 0's pixels (rows) are skipped, not predictions of 0.
    expected0 = torch.tensor([[0, 0, 0], [0, 2, 1], [1, 0, 1]])
    target0 = target.masked_fill(target == 255, 1)  # the pixel counts as (1, 2) now
    expected0[1, 2] += 1
    assert torch.equal(confusion_matrix(pred, target0, 3, 0).cpu(), expected0)


# ---------------------------------------------------------------- confusion_matrix: scores


SCORE_SHAPES = [(29, 19), (2, 19, 23), (2, 19, 7, 9), (2, 19, 3, 4, 5)]


@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=["no-spatial", "1d", "2d", "3d"])
@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=dtype_id)
def test_scores_dtypes_and_ranks(device, dtype, shape, gen):
    scores = draw_scores(shape, gen, dtype).to(device)
    target_shape = (shape[0], *shape[2:])
    target = draw_labels(target_shape, 19, gen, torch.int64, ignore_index=255).to(device)
    check(scores, target, 19, 255)
    check(scores, target.to(torch.uint8), 19, 255)


@pytest.mark.parametrize("num_classes", [2, 150, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_scores_many_classes(device, dtype, num_classes, gen):
    scores = draw_scores((2, num_classes, 6, 7), gen, dtype).to(device)
    target = draw_labels((2, 6, 7), num_classes, gen, torch.int32).to(device)
    check(scores, target, num_classes)
    check(with_layout(scores, "channels_last"), target, num_classes)


SCORE_LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced", "expanded"]
TARGET_LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


@pytest.mark.parametrize("target_layout", TARGET_LAYOUTS)
@pytest.mark.parametrize("score_layout", SCORE_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_scores_layouts(device, dtype, score_layout, target_layout, gen):
    scores = with_layout(draw_scores((3, 19, 7, 9), gen, dtype).to(device), score_layout)
    target = draw_labels((3, 7, 9), 19, gen, torch.uint8, ignore_index=255).to(device)
    check(scores, with_layout(target, target_layout), 19, 255)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "expanded"])
@pytest.mark.parametrize("shape", [(29, 19), (2, 19, 23), (2, 19, 3, 4, 5)], ids=shape_id)
def test_scores_layouts_other_ranks(device, shape, layout, gen):
    scores = with_layout(draw_scores(shape, gen, torch.float64).to(device), layout)
    target_shape = (shape[0], *shape[2:])
    target = draw_labels(target_shape, 19, gen, torch.int64).to(device)
    check(scores, with_layout(target, "sliced"), 19)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "shape",
    [(2, 19, 1, 9), (2, 19, 9, 1), (1, 19, 1, 1), (2, 1, 5, 6), (3, 19, 1, 1)],
    ids=shape_id,
)
def test_scores_with_size_one_dims(device, shape, layout, gen):
    """Size-1 dims make a tensor contiguous in several memory formats at once."""
    scores = with_layout(draw_scores(shape, gen).to(device), layout)
    target = draw_labels((shape[0], *shape[2:]), shape[1], gen, torch.int64).to(device)
    check(scores, target, shape[1])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("values", ["ties", "equal"])
@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=dtype_id)
def test_scores_ties_go_to_the_lowest_class(device, dtype, values, layout, gen):
    scores = with_layout(draw_scores((2, 19, 9, 11), gen, dtype, values).to(device), layout)
    target = draw_labels((2, 9, 11), 19, gen, torch.int64).to(device)
    out = check(scores, target, 19)
    if values == "equal":  # every pixel predicted as class 0
        assert int(out[:, 0].sum()) == 2 * 9 * 11


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=dtype_id)
def test_scores_nan_and_infinities_like_argmax(device, dtype, layout, gen):
    """NaN wins (the first NaN of a pixel), +inf beats any number, -inf loses; a pixel of only
    -inf goes to class 0."""
    scores = draw_scores((2, 19, 8, 9), gen, torch.float64)
    noise = torch.rand(scores.shape, generator=gen)
    scores = scores.masked_fill(noise < 0.03, float("nan"))
    scores = scores.masked_fill((noise > 0.95), float("inf"))
    scores = scores.masked_fill((noise > 0.9) & (noise <= 0.95), float("-inf"))
    scores[0, :, 1, 2] = float("-inf")
    scores[1, :, 3, 4] = float("nan")
    scores[1, :, 5, 6] = float("inf")
    scores = with_layout(scores.to(dtype).to(device), layout)
    target = draw_labels((2, 8, 9), 19, gen, torch.int64).to(device)
    out = check(scores, target, 19)
    for index in [(0, 1, 2), (1, 3, 4), (1, 5, 6)]:  # pixels whose argmax is class 0
        assert out[int(target[index]), 0] >= 1
    # The reference agrees with torch.argmax on these pixels (NaN semantics as documented).
    argmax = torch.argmax(scores.cpu().double(), 1)
    assert torch.equal(argmax, torch.from_numpy(np.argmax(scores.cpu().double().numpy(), 1)))


def test_hand_written_scores(device):
    """[N=1, K=3, 2, 2] scores: argmax per pixel [[2, 0], [1, 0]] (the last one a tie 0/1)."""
    scores = torch.tensor(
        [[[[0.1, 0.9], [0.2, 0.5]], [[0.3, 0.1], [0.7, 0.5]], [[0.8, 0.2], [0.1, 0.4]]]],
        device=device,
    )
    target = torch.tensor([[[2, 1], [1, 0]]], device=device)
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    assert torch.equal(confusion_matrix(scores, target, 3).cpu(), expected)
    assert torch.equal(confusion_matrix(scores.double(), target.to(torch.uint8), 3).cpu(), expected)


# ---------------------------------------------------------------- ignore_index and empty inputs


@pytest.mark.parametrize("ignore_index", [None, 0, 4, 255, -1], ids=lambda v: f"ignore-{v}")
@pytest.mark.parametrize("kind", ["labels", "scores"])
def test_ignore_index(device, kind, ignore_index, gen):
    """In range (0, 4: that class's ground-truth pixels are skipped, its predictions still
    count in other rows), out of range (255, -1), or none."""
    k, shape = 6, (2, 10, 12)
    target = draw_labels(shape, k, gen, torch.int64, ignore_index=ignore_index, fraction=0.2)
    pred = draw_labels(shape, k, gen) if kind == "labels" else draw_scores((2, k, 10, 12), gen)
    out = check(pred.to(device), target.to(device), k, ignore_index)
    if ignore_index is not None and 0 <= ignore_index < k:
        assert int(out[ignore_index].sum()) == 0 and int(out[:, ignore_index].sum()) > 0
    if ignore_index is not None:
        assert int(out.sum()) == int((target != ignore_index).sum())


@pytest.mark.parametrize("target_dtype", LABEL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", ["labels", "scores"])
def test_all_pixels_ignored(device, kind, target_dtype, gen):
    target = torch.full((2, 5, 7), 255 if target_dtype == torch.uint8 else -1, dtype=target_dtype)
    ignore = int(target.view(-1)[0])
    pred = draw_labels((2, 5, 7), 4, gen) if kind == "labels" else draw_scores((2, 4, 5, 7), gen)
    out = confusion_matrix(pred.to(device), target.to(device), 4, ignore)
    assert out.dtype == torch.int64 and out.device == target.to(device).device
    assert torch.equal(out.cpu(), torch.zeros(4, 4, dtype=torch.int64))


@pytest.mark.parametrize(
    "pred_shape,target_shape",
    [
        ((0,), (0,)),
        ((0, 5, 6), (0, 5, 6)),
        ((2, 0, 6), (2, 0, 6)),
        ((0, 4), (0,)),  # scores, no spatial dim
        ((0, 4, 5, 6), (0, 5, 6)),
        ((2, 4, 0, 6), (2, 0, 6)),
    ],
    ids=["labels-0", "labels-N0", "labels-H0", "scores-N0-no-spatial", "scores-N0", "scores-H0"],
)
@pytest.mark.parametrize("num_classes", [1, 4])
def test_empty_inputs(device, pred_shape, target_shape, num_classes):
    if len(pred_shape) != len(target_shape):
        pred_shape = (pred_shape[0], num_classes, *pred_shape[2:])
        pred = torch.zeros(pred_shape, dtype=torch.float32, device=device)
    else:
        pred = torch.zeros(pred_shape, dtype=torch.int64, device=device)
    target = torch.zeros(target_shape, dtype=torch.uint8, device=device)
    for validate in (True, False):
        out = confusion_matrix(pred, target, num_classes, None, validate)
        assert out.dtype == torch.int64 and out.shape == (num_classes, num_classes)
        assert out.device == target.device
        assert torch.equal(out.cpu(), torch.zeros(num_classes, num_classes, dtype=torch.int64))


# ---------------------------------------------------------------- validation


def raises_naming(call, *fragments):
    with pytest.raises(RuntimeError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the message: {message}"
    return message


@pytest.mark.parametrize("bad", [77, -13, 5], ids=["above", "negative", "K"])
@pytest.mark.parametrize("where", ["target", "pred", "target-of-scores"])
def test_validate_names_the_value_and_where(device, where, bad, gen):
    k, shape, index = 5, (2, 4, 5), (1, 2, 3)
    target = draw_labels(shape, k, gen)
    pred = draw_labels(shape, k, gen)
    if where == "pred":
        pred[index], target[index] = bad, 1
    else:
        target[index] = bad
    if where == "target-of-scores":
        pred = draw_scores((2, k, 4, 5), gen)
    pred, target = pred.to(device), target.to(device)
    name = "pred" if where == "pred" else "target"
    for ignore_index in (None, 255, 0):
        raises_naming(
            lambda ii=ignore_index: confusion_matrix(pred, target, k, ii),
            name,
            str(bad),
            "[1, 2, 3]",
        )


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("where", ["target", "pred"])
def test_validate_every_label_dtype(device, where, dtype, gen):
    k, index = 19, (0, 6)
    target = draw_labels((3, 8), k, gen, dtype)
    pred = draw_labels((3, 8), k, gen, dtype)
    (target if where == "target" else pred)[index] = 100
    raises_naming(
        lambda: confusion_matrix(pred.to(device), target.to(device), k), where, "100", "[0, 6]"
    )


def test_validate_one_dimensional_location(device, gen):
    target = draw_labels((9,), 3, gen)
    target[6] = 42
    scores = draw_scores((9, 3), gen)
    raises_naming(
        lambda: confusion_matrix(scores.to(device), target.to(device), 3), "target", "42", "[6]"
    )


def test_validate_reports_the_first_bad_pixel(device, gen):
    """Of several bad pixels the first in row-major order is reported, target before pred at
    the same pixel (the smallest key pixel * 2 + (0 target, 1 pred))."""
    k, shape = 5, (2, 4, 5)
    target, pred = draw_labels(shape, k, gen), draw_labels(shape, k, gen)
    target[1, 0, 0], pred[0, 3, 4], target[1, 3, 3] = 88, 99, 66
    message = raises_naming(
        lambda: confusion_matrix(pred.to(device), target.to(device), k), "pred", "99", "[0, 3, 4]"
    )
    assert "88" not in message and "66" not in message, message
    pred[0, 1, 1], target[0, 1, 1] = 55, 44
    raises_naming(
        lambda: confusion_matrix(pred.to(device), target.to(device), k), "target", "44", "[0, 1, 1]"
    )


def _index_text(flat, shape):
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]"


@pytest.mark.parametrize("kind", ["labels", "scores"])
def test_validate_first_bad_pixel_of_a_large_input(device, kind, gen):
    """Large enough that threads / blocks split the pixels: the first bad pixel over all of
    them is reported, and report[0] counts every bad pixel."""
    k, shape = 7, (4, 96, 128)
    target = draw_labels(shape, k, gen, torch.int32, ignore_index=255)
    pred = draw_labels(shape, k, gen, torch.int16)
    if kind == "scores":
        pred = draw_scores((4, k, 96, 128), gen, torch.float16)
    flat_t = target.view(-1)
    for late in (47000, 30000):  # later bad pixels, in other threads' ranges
        flat_t[late] = 100
    flat_t[20000] = -9
    confmat, report = _fresh_state(k, device)
    ops._confusion_matrix_accumulate(confmat, report, pred.to(device), target.to(device), 255)
    assert report.tolist() == [3, 2 * 20000]
    assert torch.equal(confmat.cpu(), reference_confmat(pred, target, k, 255))
    raises_naming(
        lambda: confusion_matrix(pred.to(device), target.to(device), k, 255),
        "target",
        "-9",
        _index_text(20000, shape),
    )
    flat_t[20000] = 1
    raises_naming(
        lambda: confusion_matrix(pred.to(device), target.to(device), k, 255),
        "target",
        "100",
        _index_text(30000, shape),
    )
    if kind == "labels":
        pred.view(-1)[29999] = 7
        raises_naming(
            lambda: confusion_matrix(pred.to(device), target.to(device), k, 255),
            "pred",
            "7",
            _index_text(29999, shape),
        )


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_validate_location_is_the_logical_index(device, layout, gen):
    """The index reported is the tensor's own index, not a position in memory."""
    k = 6
    target = with_layout(draw_labels((2, 3, 5, 7), k, gen).to(device), layout)
    pred = with_layout(draw_labels((2, 3, 5, 7), k, gen).to(device), layout)
    target[1, 2, 3, 1] = 61
    raises_naming(lambda: confusion_matrix(pred, target, k), "target", "61", "[1, 2, 3, 1]")
    target[1, 2, 3, 1] = 0
    pred[0, 1, 4, 2] = -7
    raises_naming(lambda: confusion_matrix(pred, target, k), "pred", "-7", "[0, 1, 4, 2]")


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int64], ids=dtype_id)
def test_validate_allows_ignore_index_only(device, target_dtype, gen):
    """An out-of-range ignore_index is skipped, any other out-of-range value is not."""
    target = draw_labels((2, 6, 7), 4, gen, target_dtype, ignore_index=255)
    pred = draw_labels((2, 6, 7), 4, gen)
    check(pred.to(device), target.to(device), 4, 255)  # no error
    target[1, 5, 6] = 254
    raises_naming(
        lambda: confusion_matrix(pred.to(device), target.to(device), 4, 255),
        "target",
        "254",
        "[1, 5, 6]",
    )
    # Without ignore_index the 255s themselves are out of range.
    with pytest.raises(RuntimeError, match="target"):
        confusion_matrix(pred.to(device), target.to(device), 4)


@pytest.mark.parametrize("kind", ["labels", "scores"])
def test_validate_false_skips_bad_pixels(device, kind, gen):
    k, shape = 5, (3, 7, 8)
    target = draw_labels(shape, k, gen, ignore_index=255)
    bad = torch.rand(shape, generator=gen)
    target = target.masked_fill(bad < 0.05, 9).masked_fill((bad >= 0.05) & (bad < 0.1), -4)
    if kind == "labels":
        pred = draw_labels(shape, k, gen)
        pred = pred.masked_fill(bad > 0.95, 5).masked_fill((bad > 0.9) & (bad <= 0.95), -1)
    else:
        pred = draw_scores((3, k, 7, 8), gen)
    pred, target = pred.to(device), target.to(device)
    with pytest.raises(RuntimeError):
        confusion_matrix(pred, target, k, 255)
    out = check(pred, target, k, 255, validate=False)
    valid = (target.cpu() >= 0) & (target.cpu() < k)
    if kind == "labels":
        valid &= (pred.cpu() >= 0) & (pred.cpu() < k)
    assert int(out.sum()) == int(valid.sum()) < target.numel()


@pytest.mark.parametrize("where", ["target", "pred"])
def test_values_beyond_32_bits_are_out_of_range(device, where, gen):
    """int64 labels that wrap to a valid class in 32-bit (or 8/16-bit) arithmetic."""
    k = 5
    target, pred = draw_labels((2, 6, 7), k, gen), draw_labels((2, 6, 7), k, gen)
    holder = target if where == "target" else pred
    holder[0, 2, 3] = 2**32 + 1
    holder[1, 4, 5] = -(2**62) + 2
    holder[1, 5, 6] = 256 + 2
    pred, target = pred.to(device), target.to(device)
    raises_naming(lambda: confusion_matrix(pred, target, k), where, str(2**32 + 1), "[0, 2, 3]")
    out = check(pred, target, k, validate=False)
    assert int(out.sum()) == 2 * 6 * 7 - 3


def test_scores_requiring_grad(device, gen):
    """The matrix is not differentiable: scores that require grad are accepted, the result
    does not require grad."""
    scores = draw_scores((2, 6, 5, 7), gen).to(device).requires_grad_()
    target = draw_labels((2, 5, 7), 6, gen).to(device)
    out = check(scores, target, 6)
    assert not out.requires_grad
    with torch.no_grad():
        assert torch.equal(confusion_matrix(scores, target, 6), out)


def test_accumulate_rejects_bad_state(device, gen):
    """The op writes K * K counts into confmat (K = confmat.size(0)) and 2 values into
    report: wrong ones must be an error, never a write out of bounds."""
    k = 4
    pred = draw_labels((2, 5, 6), k, gen).to(device)
    target = draw_labels((2, 5, 6), k, gen).to(device)
    confmat, report = _fresh_state(k, device)
    bad_states = [
        (torch.zeros(k, k + 1, dtype=torch.int64, device=device), report),
        (torch.zeros(k * k, dtype=torch.int64, device=device), report),
        (torch.zeros(k, k, dtype=torch.int32, device=device), report),
        (confmat, torch.zeros(1, dtype=torch.int64, device=device)),
        (confmat, torch.zeros(2, dtype=torch.float64, device=device)),
    ]
    for bad_confmat, bad_report in bad_states:
        with pytest.raises(RuntimeError):
            ops._confusion_matrix_accumulate(bad_confmat, bad_report, pred, target, None)
    # A non-contiguous confmat: an error, or counted right (never a write past the view).
    wide = torch.zeros(k, 2 * k, dtype=torch.int64, device=device)
    try:
        ops._confusion_matrix_accumulate(wide[:, ::2], report, pred, target, None)
    except RuntimeError:
        assert int(wide.abs().sum()) == 0
    else:
        assert torch.equal(wide[:, ::2].cpu(), reference_confmat(pred, target, k))
        assert int(wide[:, 1::2].abs().sum()) == 0


# ---------------------------------------------------------------- argument errors


def _labels(shape, dtype=torch.int64):
    return lambda device: torch.zeros(shape, dtype=dtype, device=device)


def _scores(shape, dtype=torch.float32):
    return lambda device: torch.zeros(shape, dtype=dtype, device=device)


# (id, pred, target, num_classes, what the message must match)
BAD_ARGUMENTS = [
    ("num_classes-0", _labels((2, 3)), _labels((2, 3)), 0, "num_classes"),
    ("num_classes-negative", _labels((2, 3)), _labels((2, 3)), -3, "num_classes"),
    ("num_classes-2^32", _labels((2, 3)), _labels((2, 3)), 2**32, "num_classes.*64 bits"),
    ("num_classes-0-scores", _scores((2, 0, 3)), _labels((2, 3)), 0, "num_classes"),
    ("float-target", _labels((2, 3)), _scores((2, 3)), 4, "target"),
    ("float-target-scores", _scores((2, 4, 3)), _scores((2, 3)), 4, "target"),
    ("double-target", _labels((2, 3)), _scores((2, 3), torch.float64), 4, "target"),
    ("bool-target", _labels((2, 3)), _labels((2, 3), torch.bool), 4, "target"),
    ("bool-pred", _labels((2, 3), torch.bool), _labels((2, 3)), 4, "pred"),
    ("pred-shape", _labels((2, 4)), _labels((2, 3)), 4, "pred"),
    ("pred-rank", _labels((2, 3, 1)), _labels((2, 3)), 4, "pred"),
    ("pred-labels-extra-dim", _labels((2, 4, 3)), _labels((2, 3)), 4, "pred"),
    ("scores-classes", _scores((2, 5, 3)), _labels((2, 3)), 4, "pred|num_classes"),
    ("scores-classes-4d", _scores((2, 3, 6, 7)), _labels((2, 6, 7)), 4, "pred|num_classes"),
    ("scores-spatial", _scores((2, 4, 6, 8)), _labels((2, 6, 7)), 4, "pred"),
    ("scores-batch", _scores((3, 4, 6, 7)), _labels((2, 6, 7)), 4, "pred"),
    ("scores-rank", _scores((2, 4, 6, 7, 1)), _labels((2, 6, 7)), 4, "pred"),
]
BAD_IDS = [case[0] for case in BAD_ARGUMENTS]
BAD_CASES = [case[1:] for case in BAD_ARGUMENTS]


@pytest.mark.parametrize("validate", [True, False], ids=["validate", "no-validate"])
@pytest.mark.parametrize("pred,target,num_classes,match", BAD_CASES, ids=BAD_IDS)
def test_bad_arguments_name_the_argument(device, pred, target, num_classes, match, validate):
    with pytest.raises(RuntimeError, match=match):
        confusion_matrix(pred(device), target(device), num_classes, None, validate)


@pytest.mark.parametrize("pred,target,num_classes,match", BAD_CASES, ids=BAD_IDS)
def test_bad_arguments_are_caught_by_the_fake_kernels(pred, target, num_classes, match):
    """The Meta kernels (what torch.compile traces with) check the same things."""
    with pytest.raises(RuntimeError, match=match):
        confusion_matrix(pred("meta"), target("meta"), num_classes, None, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_inputs_on_different_devices_are_an_error():
    with pytest.raises(RuntimeError):
        confusion_matrix(
            torch.zeros(2, 3, dtype=torch.int64, device="cuda"),
            torch.zeros(2, 3, dtype=torch.int64),
            4,
        )


@pytest.mark.parametrize(
    "confmat",
    [
        torch.zeros(3, 4, dtype=torch.int64),
        torch.zeros(9, dtype=torch.int64),
        torch.zeros(2, 3, 3, dtype=torch.int64),
    ],
    ids=["not-square", "1-D", "3-D"],
)
def test_segmentation_metrics_rejects_a_non_matrix(device, confmat):
    with pytest.raises(RuntimeError, match="confmat|confusion"):
        segmentation_metrics(confmat.to(device))


# ---------------------------------------------------------------- determinism, meta, API


@pytest.mark.parametrize("num_classes", [19, 150, 300])
@pytest.mark.parametrize("kind", ["labels", "scores", "scores-channels-last"])
def test_deterministic(device, kind, num_classes, gen):
    """Large enough that the work is split among threads / blocks; K = 150 and 300 too (on the
    CPU, all threads then add to one matrix; on CUDA, 150 * 150 counts take more than 48 KiB of
    shared memory per block, and 300 * 300 more than any GPU gives a block: added to the result
    directly)."""
    k = num_classes
    target_dtype = torch.uint8 if k < 255 else torch.int16
    target = draw_labels((4, 96, 128), k, gen, target_dtype, ignore_index=255).to(device)
    if kind == "labels":
        pred = draw_labels((4, 96, 128), k, gen, torch.int32).to(device)
    else:
        pred = draw_scores((4, k, 96, 128), gen, torch.float16, "ties").to(device)
        if kind == "scores-channels-last":
            pred = pred.contiguous(memory_format=torch.channels_last)
    first = confusion_matrix(pred, target, k, 255)
    second = confusion_matrix(pred, target, k, 255)
    third = confusion_matrix(pred, target, k, 255, validate=False)
    assert torch.equal(first, second) and torch.equal(first, third)
    assert torch.equal(first.cpu(), reference_confmat(pred, target, k, 255))


def test_meta_output():
    pred = torch.empty(2, 7, 5, 6, device="meta")
    target = torch.empty(2, 5, 6, dtype=torch.uint8, device="meta")
    out = confusion_matrix(pred, target, 7, 255, False)
    assert out.shape == (7, 7) and out.dtype == torch.int64 and out.device.type == "meta"
    m = segmentation_metrics(torch.empty(7, 7, dtype=torch.int64, device="meta"))
    assert m.iou.shape == m.dice.shape == (7,) and m.mean_iou.shape == ()
    assert all(value.dtype == torch.float64 for value in m)


def test_python_api(device, gen):
    assert torch_ext.confusion_matrix is metrics.confusion_matrix
    assert torch_ext.segmentation_metrics is metrics.segmentation_metrics
    pred = draw_labels((2, 4, 5), 3, gen).to(device)
    target = draw_labels((2, 4, 5), 3, gen).to(device)
    expected = reference_confmat(pred, target, 3)
    assert torch.equal(confusion_matrix(pred, target, 3).cpu(), expected)  # the defaults
    assert torch.equal(ops.confusion_matrix(pred, target, 3).cpu(), expected)
    assert torch.equal(
        confusion_matrix(pred, target, num_classes=3, ignore_index=None, validate=True).cpu(),
        expected,
    )
    result = segmentation_metrics(expected.to(device))
    assert isinstance(result, MetricsResult)


# ---------------------------------------------------------------- segmentation_metrics

NAN = float("nan")


def assert_metrics(result, expected: dict, device, num_classes, where: str = ""):
    assert isinstance(result, MetricsResult)
    for name in METRIC_FIELDS:
        value = getattr(result, name)
        assert value.dtype == torch.float64, name
        assert value.device.type == torch.device(device).type, name
        want = torch.as_tensor(np.asarray(expected[name], dtype=np.float64))
        shape = (num_classes,) if name in ("iou", "dice") else ()
        assert value.shape == shape, name
        torch.testing.assert_close(
            value.cpu(),
            want,
            rtol=1e-12,
            atol=1e-15,
            equal_nan=True,
            msg=lambda m, name=name: f"{name} {where}: {m}",
        )


def test_metrics_hand_computed_3x3(device):
    # Rows = ground truth, columns = prediction.
    cm = torch.tensor(
        [
            [3, 1, 1],  # gt 0: 5 pixels
            [2, 4, 0],  # gt 1: 6
            [1, 0, 6],  # gt 2: 7
        ]
    )  # predicted: 6, 5, 7 times; total 18, trace 13
    expected = dict(
        pixel_accuracy=13 / 18,
        mean_pixel_accuracy=(3 / 5 + 4 / 6 + 6 / 7) / 3,
        iou=[3 / 8, 4 / 7, 6 / 8],  # diag / (gt + pred - diag)
        mean_iou=(3 / 8 + 4 / 7 + 6 / 8) / 3,
        fw_iou=(5 / 18) * (3 / 8) + (6 / 18) * (4 / 7) + (7 / 18) * (6 / 8),
        dice=[6 / 11, 8 / 11, 12 / 14],  # 2 diag / (gt + pred)
        mean_dice=(6 / 11 + 8 / 11 + 12 / 14) / 3,
    )
    assert_metrics(segmentation_metrics(cm.to(device)), expected, device, 3)


def test_metrics_hand_computed_absent_classes(device):
    """Class 2 is absent from ground truth and prediction: NaN, out of every mean. Class 3 is
    absent from ground truth but predicted: IoU 0 and Dice 0 (in the means), no accuracy."""
    # Rows = ground truth, columns = prediction.
    cm = torch.tensor(
        [
            [5, 1, 0, 2],  # gt 0: 8
            [0, 3, 0, 1],  # gt 1: 4
            [0, 0, 0, 0],  # gt 2: 0, predicted 0 times
            [0, 0, 0, 0],  # gt 3: 0, predicted 3 times
        ]
    )  # total 12, trace 8
    expected = dict(
        pixel_accuracy=8 / 12,
        mean_pixel_accuracy=(5 / 8 + 3 / 4) / 2,
        iou=[5 / 8, 3 / 5, NAN, 0.0],
        mean_iou=(5 / 8 + 3 / 5 + 0.0) / 3,
        fw_iou=(8 / 12) * (5 / 8) + (4 / 12) * (3 / 5),
        dice=[10 / 13, 6 / 8, NAN, 0.0],
        mean_dice=(10 / 13 + 6 / 8 + 0.0) / 3,
    )
    assert_metrics(segmentation_metrics(cm.to(device)), expected, device, 4)


def test_metrics_hand_computed_class_missed(device):
    """Class 1 is in the ground truth but never predicted: accuracy 0, IoU 0, Dice 0."""
    cm = torch.tensor([[4, 0], [3, 0]])
    expected = dict(
        pixel_accuracy=4 / 7,
        mean_pixel_accuracy=(1 + 0) / 2,
        iou=[4 / 7, 0.0],
        mean_iou=(4 / 7) / 2,
        fw_iou=(4 / 7) * (4 / 7),
        dice=[8 / 11, 0.0],
        mean_dice=(8 / 11) / 2,
    )
    assert_metrics(segmentation_metrics(cm.to(device)), expected, device, 2)


@pytest.mark.parametrize(
    "diag", [[4, 2, 7], [4, 0, 7], [5]], ids=["all-present", "one-absent", "K1"]
)
def test_metrics_perfect_prediction(device, diag):
    k = len(diag)
    per_class = [1.0 if d > 0 else NAN for d in diag]
    expected = dict(
        pixel_accuracy=1.0,
        mean_pixel_accuracy=1.0,
        iou=per_class,
        mean_iou=1.0,
        fw_iou=1.0,
        dice=per_class,
        mean_dice=1.0,
    )
    assert_metrics(
        segmentation_metrics(torch.diag(torch.tensor(diag)).to(device)), expected, device, k
    )


@pytest.mark.parametrize("num_classes", [1, 3])
def test_metrics_of_an_empty_matrix_are_nan(device, num_classes):
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    expected = dict(
        pixel_accuracy=NAN,
        mean_pixel_accuracy=NAN,
        iou=[NAN] * num_classes,
        mean_iou=NAN,
        fw_iou=NAN,
        dice=[NAN] * num_classes,
        mean_dice=NAN,
    )
    assert_metrics(segmentation_metrics(cm), expected, device, num_classes)


def test_metrics_large_counts(device):
    """Counts far beyond 2**32 (int64 sums, float64 ratios)."""
    big = 3 * 2**40
    cm = torch.tensor([[big, 1], [2, big + 5]])
    total = 2 * big + 8
    expected = dict(
        pixel_accuracy=(2 * big + 5) / total,
        mean_pixel_accuracy=(big / (big + 1) + (big + 5) / (big + 7)) / 2,
        iou=[big / (big + 3), (big + 5) / (big + 8)],
        mean_iou=(big / (big + 3) + (big + 5) / (big + 8)) / 2,
        fw_iou=(big + 1) / total * big / (big + 3) + (big + 7) / total * (big + 5) / (big + 8),
        dice=[2 * big / (2 * big + 3), 2 * (big + 5) / (2 * big + 13)],
        mean_dice=(2 * big / (2 * big + 3) + 2 * (big + 5) / (2 * big + 13)) / 2,
    )
    assert_metrics(segmentation_metrics(cm.to(device)), expected, device, 2)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("num_classes", [1, 2, 5, 19, 150])
def test_metrics_random_matrices(device, num_classes, layout, gen):
    """Against the NumPy definitions, with some classes absent from gt, pred or both."""
    cm = torch.randint(0, 50, (num_classes, num_classes), generator=gen)
    cm = cm * (torch.rand(cm.shape, generator=gen) < 0.6)
    if num_classes >= 5:
        cm[1, :] = 0  # absent from gt, predicted
        cm[:, 3] = 0  # absent from pred, in gt
        cm[4, :] = cm[:, 4] = 0  # absent from both
    cm = with_layout(cm.to(device), layout)
    assert_metrics(segmentation_metrics(cm), reference_metrics(cm), device, num_classes)


def test_metrics_of_a_confusion_matrix(device, gen):
    """The two ops together, as used."""
    pred = draw_labels((3, 20, 21), 6, gen).to(device)
    target = draw_labels((3, 20, 21), 6, gen, ignore_index=255).to(device)
    result = segmentation_metrics(confusion_matrix(pred, target, 6, 255))
    assert_metrics(result, reference_metrics(reference_confmat(pred, target, 6, 255)), device, 6)
    # Pixel accuracy as the plain fraction of kept pixels predicted right.
    keep = target != 255
    pa = (pred[keep] == target[keep]).double().mean()
    torch.testing.assert_close(result.pixel_accuracy, pa, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- torchmetrics


def _torchmetrics():
    return pytest.importorskip("torchmetrics.functional.classification")


@pytest.mark.parametrize("ignore_index", [None, 0, 255], ids=lambda v: f"ignore-{v}")
@pytest.mark.parametrize("kind", ["labels", "scores"])
def test_confusion_matrix_matches_torchmetrics(device, kind, ignore_index, gen):
    tmf = _torchmetrics()
    k = 6
    target = draw_labels((3, 14, 15), k, gen, ignore_index=ignore_index).to(device)
    if kind == "labels":
        pred = draw_labels((3, 14, 15), k, gen).to(device)
    else:
        pred = draw_scores((3, k, 14, 15), gen).to(device)
    ours = confusion_matrix(pred, target, k, ignore_index)
    # torchmetrics takes (preds, target) and also returns rows = target.
    theirs = tmf.multiclass_confusion_matrix(pred, target, num_classes=k, ignore_index=ignore_index)
    assert torch.equal(ours.cpu(), theirs.cpu().to(torch.int64))


@pytest.mark.parametrize("ignore_index", [None, 255], ids=lambda v: f"ignore-{v}")
@pytest.mark.parametrize("kind", ["labels", "scores"])
def test_iou_matches_torchmetrics_jaccard(device, kind, ignore_index, gen):
    """Where the definitions coincide: every class occurs in the target. (torchmetrics gives a
    class absent from both target and prediction 0 per class, where we give NaN; and an
    in-range ignore_index drops that class from its macro average, while ours keeps the class,
    predicted but absent from the ground truth, as IoU 0.)"""
    tmf = _torchmetrics()
    k = 5
    target = draw_labels((4, 16, 16), k, gen, ignore_index=ignore_index).to(device)
    assert all(bool((target == c).any()) for c in range(k))
    if kind == "labels":
        pred = draw_labels((4, 16, 16), k, gen).to(device)
    else:
        pred = draw_scores((4, k, 16, 16), gen).to(device)
    result = segmentation_metrics(confusion_matrix(pred, target, k, ignore_index))
    per_class = tmf.multiclass_jaccard_index(
        pred, target, num_classes=k, average=None, ignore_index=ignore_index
    )
    macro = tmf.multiclass_jaccard_index(
        pred, target, num_classes=k, average="macro", ignore_index=ignore_index
    )
    # torchmetrics computes in float32.
    torch.testing.assert_close(result.iou.cpu(), per_class.cpu().double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(result.mean_iou.cpu(), macro.cpu().double(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- streaming accumulation op


def _fresh_state(num_classes, device):
    confmat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    report = torch.tensor([0, INT64_MAX], dtype=torch.int64, device=device)
    return confmat, report


@pytest.mark.parametrize("kind", ["labels", "scores"])
def test_accumulate_two_batches_equal_the_concatenation(device, kind, gen):
    k = 7
    targets = [draw_labels((n, 9, 10), k, gen, torch.uint8, 255).to(device) for n in (2, 3)]
    if kind == "labels":
        preds = [draw_labels((n, 9, 10), k, gen, torch.int32).to(device) for n in (2, 3)]
    else:
        preds = [draw_scores((n, k, 9, 10), gen, torch.bfloat16).to(device) for n in (2, 3)]
    confmat, report = _fresh_state(k, device)
    for pred, target in zip(preds, targets, strict=True):
        ops._confusion_matrix_accumulate(confmat, report, pred, target, 255)
    expected = reference_confmat(torch.cat(preds), torch.cat(targets), k, 255)
    assert torch.equal(confmat.cpu(), expected)
    assert torch.equal(confmat, confusion_matrix(torch.cat(preds), torch.cat(targets), k, 255))
    assert report.tolist() == [0, INT64_MAX]
    # It adds to what the matrix holds.
    ops._confusion_matrix_accumulate(confmat, report, preds[0], targets[0], 255)
    expected += reference_confmat(preds[0], targets[0], k, 255)
    assert torch.equal(confmat.cpu(), expected)


def test_accumulate_counts_out_of_range_pixels(device, gen):
    k, shape = 4, (2, 5, 6)
    target = draw_labels(shape, k, gen, ignore_index=-1)
    pred = draw_labels(shape, k, gen)
    # Bad pixels (flat index): target 9 at 7, pred -2 at 12, target -5 at 40, pred 4 at 59.
    flat_t, flat_p = target.view(-1), pred.view(-1)
    flat_t[[7, 40]] = torch.tensor([9, -5])
    flat_p[[12, 59]] = torch.tensor([-2, 4])
    flat_t[[12, 59]] = 1
    pred, target = pred.to(device), target.to(device)
    confmat, report = _fresh_state(k, device)
    ops._confusion_matrix_accumulate(confmat, report, pred, target, -1)
    assert torch.equal(confmat.cpu(), reference_confmat(pred, target, k, -1))
    assert int(confmat.sum()) == int((target != -1).sum()) - 4
    assert report.tolist() == [4, 7 * 2 + 0]
    # A second batch whose bad pixels come later: the count adds up, the first key stays.
    target2 = target.clone()
    target2.view(-1)[7] = 0
    pred2 = pred.clone()
    pred2.view(-1)[12] = 0  # bad left: target at 40, pred at 59; plus a pred at 33
    pred2.view(-1)[33] = 17
    target2.view(-1)[33] = 2
    ops._confusion_matrix_accumulate(confmat, report, pred2, target2, -1)
    expected = reference_confmat(pred, target, k, -1) + reference_confmat(pred2, target2, k, -1)
    assert torch.equal(confmat.cpu(), expected)
    assert report.tolist() == [4 + 3, 7 * 2 + 0]


def test_accumulate_report_key_of_pred(device, gen):
    k, shape = 3, (2, 4, 5)
    target, pred = draw_labels(shape, k, gen), draw_labels(shape, k, gen)
    pred.view(-1)[13] = 3
    target.view(-1)[13] = 5  # both bad at 13: the target's key
    pred.view(-1)[9] = 8
    confmat, report = _fresh_state(k, device)
    ops._confusion_matrix_accumulate(confmat, report, pred.to(device), target.to(device), None)
    assert report.tolist() == [2, 9 * 2 + 1]
    assert torch.equal(confmat.cpu(), reference_confmat(pred, target, k))


# ---------------------------------------------------------------- opcheck


@pytest.mark.parametrize(
    "kind,ignore_index",
    [("labels", None), ("labels", 255), ("scores", 255), ("scores-channels-last", None)],
    ids=["labels", "labels-ignore", "scores-ignore", "scores-channels-last"],
)
def test_confusion_matrix_opcheck(device, kind, ignore_index, gen):
    k = 5
    target = draw_labels((2, 6, 7), k, gen, torch.uint8, ignore_index).to(device)
    if kind == "labels":
        pred = draw_labels((2, 6, 7), k, gen, torch.int32).to(device)
    else:
        pred = draw_scores((2, k, 6, 7), gen).to(device)
        if kind == "scores-channels-last":
            pred = pred.contiguous(memory_format=torch.channels_last)
    # validate=False: validation syncs with the host, which opcheck's tracing would not allow.
    torch.library.opcheck(ops.confusion_matrix.default, (pred, target, k, ignore_index, False))


def test_segmentation_metrics_opcheck(device, gen):
    cm = torch.randint(0, 20, (6, 6), generator=gen)
    cm[2] = 0
    torch.library.opcheck(ops.segmentation_metrics.default, (cm.to(device),))


def test_accumulate_opcheck(device, gen):
    k = 5
    confmat, report = _fresh_state(k, device)
    pred = draw_labels((2, 6, 7), k, gen).to(device)
    target = draw_labels((2, 6, 7), k, gen, ignore_index=255).to(device)
    torch.library.opcheck(
        ops._confusion_matrix_accumulate.default, (confmat, report, pred, target, 255)
    )


# ---------------------------------------------------------------- torch.compile


def confusion_and_metrics(pred, target):
    confmat = torch_ext.metrics.confusion_matrix(pred, target, 6, 255, validate=False)
    return confmat, segmentation_metrics(confmat)


@pytest.mark.parametrize("kind", ["labels", "scores"])
def test_compile_aot_eager(device, kind, gen):
    torch._dynamo.reset()
    compiled = torch.compile(confusion_and_metrics, backend="aot_eager", fullgraph=True)
    for n in (2, 3):
        target = draw_labels((n, 9, 11), 6, gen, torch.uint8, 255).to(device)
        if kind == "labels":
            pred = draw_labels((n, 9, 11), 6, gen).to(device)
        else:
            pred = draw_scores((n, 6, 9, 11), gen).to(device)
        confmat, result = compiled(pred, target)
        eager_confmat, eager_result = confusion_and_metrics(pred, target)
        assert torch.equal(confmat, eager_confmat)
        assert torch.equal(confmat.cpu(), reference_confmat(pred, target, 6, 255))
        for name in METRIC_FIELDS:
            torch.testing.assert_close(
                getattr(result, name), getattr(eager_result, name), rtol=0, atol=0, equal_nan=True
            )


def test_compile_aot_eager_dynamic_shapes(device, gen):
    torch._dynamo.reset()
    compiled = torch.compile(
        confusion_and_metrics, backend="aot_eager", fullgraph=True, dynamic=True
    )
    for shape in [(2, 9, 11), (3, 5, 7), (1, 13, 4)]:
        target = draw_labels(shape, 6, gen, torch.uint8, 255).to(device)
        for pred in (draw_labels(shape, 6, gen), draw_scores((shape[0], 6, *shape[1:]), gen)):
            pred = pred.to(device)
            confmat, result = compiled(pred, target)
            assert torch.equal(confmat.cpu(), reference_confmat(pred, target, 6, 255))
            expected = reference_metrics(confmat)
            torch.testing.assert_close(
                result.mean_iou.cpu(),
                torch.tensor(expected["mean_iou"], dtype=torch.float64),
                rtol=1e-12,
                atol=0,
            )


def validated_mean_iou(pred, target):
    confmat = torch_ext.metrics.confusion_matrix(pred, target, 5, None, validate=True)
    return segmentation_metrics(confmat).mean_iou * 2


def test_compile_with_validation(device, gen):
    """validate=True inside a compiled graph: the op is opaque to the tracer, so no graph
    break; the check still raises when the graph runs."""
    torch._dynamo.reset()
    compiled = torch.compile(validated_mean_iou, backend="aot_eager", fullgraph=True)
    pred = draw_labels((2, 6, 7), 5, gen).to(device)
    target = draw_labels((2, 6, 7), 5, gen)
    expected = reference_metrics(reference_confmat(pred, target, 5))["mean_iou"] * 2
    torch.testing.assert_close(
        compiled(pred, target.to(device)).cpu(),
        torch.tensor(expected, dtype=torch.float64),
        rtol=1e-12,
        atol=0,
    )
    target[1, 2, 3] = 8
    with pytest.raises(RuntimeError, match="target"):
        compiled(pred, target.to(device))


def test_compile_inductor(device, gen):
    torch._dynamo.reset()
    compiled = torch.compile(confusion_and_metrics, backend="inductor", fullgraph=True)
    target = draw_labels((2, 9, 11), 6, gen, torch.uint8, 255).to(device)
    pred = draw_scores((2, 6, 9, 11), gen).to(device)
    confmat, result = compiled(pred, target)
    ref = reference_confmat(pred, target, 6, 255)
    assert torch.equal(confmat.cpu(), ref)
    assert_metrics(result, reference_metrics(ref), device, 6)


# ---------------------------------------------------------------- fresh random cases


def test_fresh_random_cases(device):
    """New shapes, dtypes, K, layouts and ignore indices on every run (the seed is in the
    message)."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = torch.Generator().manual_seed(seed)

    def pick(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=rng))

    for case in range(16):
        k = [1, 2, 3, pick(4, 40), pick(41, 300)][pick(0, 4)]
        target_dtypes = [d for d in LABEL_DTYPES if torch.iinfo(d).max >= max(k, 255)]
        target_dtype = target_dtypes[pick(0, len(target_dtypes) - 1)]
        ignore_index = [None, 255, pick(0, k - 1)][pick(0, 2)]
        spatial = tuple(pick(1, 13) for _ in range(pick(0, 3)))
        n = pick(1, 4)
        kind = ["labels", "scores"][pick(0, 1)]
        layouts = ["contiguous", "transposed", "sliced"] if spatial else ["contiguous", "sliced"]
        target_layout = layouts[pick(0, len(layouts) - 1)]
        pred_layout = layouts[pick(0, len(layouts) - 1)]
        target = draw_labels((n, *spatial), k, rng, target_dtype, ignore_index).to(device)
        if kind == "labels":
            pred_dtypes = [d for d in LABEL_DTYPES if torch.iinfo(d).max >= k]
            pred_dtype = pred_dtypes[pick(0, len(pred_dtypes) - 1)]
            pred = draw_labels((n, *spatial), k, rng, pred_dtype).to(device)
        else:
            pred_dtype = SCORE_DTYPES[pick(0, 3)]
            pred = draw_scores((n, k, *spatial), rng, pred_dtype, ["randn", "ties"][pick(0, 1)])
            pred = pred.to(device)
            if len(spatial) in (2, 3) and pick(0, 1):
                pred_layout = "channels_last"
        pred = with_layout(pred, pred_layout, strict=False)
        target = with_layout(target, target_layout, strict=False)
        where = (
            f"seed {seed}, case {case}: K={k} {kind} {pred_dtype} {tuple(pred.shape)} "
            f"{pred_layout}, target {target_dtype} {target_layout}, ignore {ignore_index}"
        )
        out = confusion_matrix(pred, target, k, ignore_index)
        ref = reference_confmat(pred, target, k, ignore_index)
        assert torch.equal(out.cpu(), ref), where
        assert_metrics(segmentation_metrics(out), reference_metrics(ref), device, k, where)
