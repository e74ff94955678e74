"""The metrics family: ``torch_ext.metrics.confusion_matrix`` (and the metrics of a matrix, and
the streaming ``SegmentationMetrics``) against NumPy references, and timed against the classic
``torch.bincount`` composition (FCN's ``fast_hist``), eager and compiled, and torchmetrics.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from torch_ext._bench.registry import Case, CheckResult, Family, compare, register
from torch_ext._segmentation_stream import SegmentationMetrics
from torch_ext.metrics import MetricsResult, confusion_matrix, segmentation_metrics

FAMILY = "metrics"
IGNORE_INDEX = 255
IGNORED_FRACTION = 0.05  # of target pixels set to IGNORE_INDEX
AGREEMENT = 0.7  # fraction of pixels whose prediction equals the ground truth

# Benchmark shapes (goal, quick): labels [N, H, W]; scores [N, K, H, W].
CPU_LABELS = {False: (4, 512, 1024), True: (2, 64, 128)}
CPU_SCORES = {False: (2, 19, 512, 1024), True: (1, 19, 64, 128)}
CUDA_LABELS = {False: (8, 1024, 2048), True: (2, 256, 512)}
CUDA_SCORES = {False: (4, 19, 512, 1024), True: (1, 19, 128, 256)}
CUDA_CLASSES = (19, 150)  # Cityscapes, ADE20K

# ---------------------------------------------------------------------------------------------
# Baselines


def bincount_confusion(pred, target, num_classes: int, ignore_index: int | None):
    """The composition users write, FCN's ``fast_hist(label.flatten(), pred.flatten(), n)``:
    flatten, mask, bincount. (Flattening first matters: a boolean mask of several dims indexes
    through one index tensor per dim: 2-4x slower here on 4x512x1024.)"""
    pred, target = pred.reshape(-1), target.reshape(-1)
    if ignore_index is not None:
        mask = target != ignore_index
        pred, target = pred[mask], target[mask]
    bins = torch.bincount(num_classes * target + pred, minlength=num_classes * num_classes)
    return bins.reshape(num_classes, num_classes)


def labels_baseline(num_classes: int) -> Callable:
    return lambda pred, target: bincount_confusion(pred, target, num_classes, IGNORE_INDEX)


def scores_baseline(num_classes: int) -> Callable:
    return lambda scores, target: bincount_confusion(
        scores.argmax(1), target, num_classes, IGNORE_INDEX
    )


def ours(num_classes: int) -> Callable:
    return lambda pred, target: confusion_matrix(pred, target, num_classes, IGNORE_INDEX, True)


def torchmetrics_peer(num_classes: int) -> tuple[Callable | None, str]:
    """torchmetrics' functional confusion matrix, or (None, why not).

    Called as users call it, with its defaults: ``validate_args=True`` checks the label range
    (with ``torch.unique`` passes and host syncs), as ours does. Its unchecked path
    (``validate_args=False``) is the mask + bincount composition, timed as "eager" here.
    """
    try:
        from torchmetrics.functional.classification import multiclass_confusion_matrix
    except ImportError:
        return None, "n/a: torchmetrics is not installed"

    def peer(pred, target):
        return multiclass_confusion_matrix(pred, target, num_classes, ignore_index=IGNORE_INDEX)

    return peer, ""


# ---------------------------------------------------------------------------------------------
# Inputs


def random_labels(shape, num_classes: int, device, ignored_fraction=IGNORED_FRACTION):
    """(pred, target) int64: pred agrees with target on ~AGREEMENT of the pixels, and
    ~ignored_fraction of the targets are IGNORE_INDEX (their pred stays a class)."""
    target = torch.randint(0, num_classes, shape, device=device)
    noise = torch.randint(0, num_classes, shape, device=device)
    pred = torch.where(torch.rand(shape, device=device) < AGREEMENT, target, noise)
    target[torch.rand(shape, device=device) < ignored_fraction] = IGNORE_INDEX
    return pred, target


def random_scores(shape, device, dtype=torch.float32):
    """(scores [N, K, ...], target [N, ...]): scores favour the target class (where it is one)."""
    n, k, *spatial = shape
    _, target = random_labels((n, *spatial), k, device)
    scores = torch.randn(shape, device=device)
    favoured = target.clamp(max=k - 1).unsqueeze(1)
    scores.scatter_add_(1, favoured, torch.full_like(favoured, 1.0, dtype=scores.dtype))
    return scores.to(dtype), target


def numpy_confusion(pred, target, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """The reference: NumPy's argmax (for scores) and bincount, in int64."""
    values = pred.detach().cpu()
    if values.is_floating_point():
        labels = np.argmax(values.float().numpy(), axis=1)  # half types are exact in float32
    else:
        labels = values.numpy().astype(np.int64)
    p = labels.reshape(-1)
    t = target.detach().cpu().numpy().astype(np.int64).reshape(-1)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    bins = np.bincount(num_classes * t + p, minlength=num_classes * num_classes)
    return bins.reshape(num_classes, num_classes)


def numpy_metrics(confmat: np.ndarray) -> list[np.ndarray]:
    """PA, MPA, IoU, MIoU, FWIoU, Dice, mean Dice in float64, as MetricsResult documents."""
    cm = confmat.astype(np.float64)
    diag, gt, pred, total = np.diag(cm), cm.sum(1), cm.sum(0), cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN
        iou = diag / (gt + pred - diag)
        dice = 2 * diag / (gt + pred)
        fw_iou = (gt[gt > 0] / total * iou[gt > 0]).sum() if total > 0 else np.nan
        values = [
            diag.sum() / total,
            np.nanmean(diag / gt),
            iou,
            np.nanmean(iou),
            fw_iou,
            dice,
            np.nanmean(dice),
        ]
    return [np.asarray(v, dtype=np.float64) for v in values]


# ---------------------------------------------------------------------------------------------
# Checks


def _label_inputs(quick: bool):
    """(label dtype, shape, transposed, num_classes, ignore_index)."""
    inputs = [
        (torch.int64, (2, 13, 11), False, 19, IGNORE_INDEX),
        (torch.uint8, (2, 13, 11), False, 19, IGNORE_INDEX),
        (torch.int32, (3, 9, 7), True, 5, None),
    ]
    if not quick:
        inputs += [
            (torch.int16, (1, 1), False, 1, None),
            (torch.int32, (4, 17, 33), False, 150, IGNORE_INDEX),
            (torch.int64, (3, 0, 5), False, 19, IGNORE_INDEX),
            (torch.uint8, (5, 31), True, 150, IGNORE_INDEX),
        ]
    return inputs


def _score_inputs(quick: bool):
    """(score dtype, shape [N, K, ...], channels_last)."""
    inputs = [(torch.float32, (2, 19, 13, 11), False), (torch.float16, (2, 19, 13, 11), True)]
    if not quick:
        inputs += [
            (torch.float64, (3, 5, 7), False),
            (torch.bfloat16, (2, 19, 9, 10), False),
            (torch.float32, (2, 7, 9, 10), True),
        ]
    return inputs


def check_labels(device, quick: bool) -> list[CheckResult]:
    results = []
    for dtype, shape, transposed, k, ignore in _label_inputs(quick):
        pred, target = random_labels(shape, k, device, 0.1 if ignore is not None else 0.0)
        pred, target = pred.to(dtype), target.to(dtype)
        if transposed:
            pred, target = pred.transpose(0, -1), target.transpose(0, -1)
        expected = torch.from_numpy(numpy_confusion(pred, target, k, ignore)).to(device)
        layout = "transposed" if transposed else "contiguous"
        results.append(
            compare(
                confusion_matrix(pred, target, k, ignore),
                expected,
                0.0,
                family=FAMILY,
                op="confusion_matrix labels",
                what=f"counts, {str(dtype).removeprefix('torch.')} labels",
                inputs=f"{list(pred.shape)} {layout} K={k} ignore_index={ignore}",
            )
        )
    return results


def check_scores(device, quick: bool) -> list[CheckResult]:
    results = []
    for dtype, shape, channels_last in _score_inputs(quick):
        scores, target = random_scores(shape, device, dtype)
        scores[0, shape[1] // 2, 0] = float("nan")  # NaN wins the argmax, as torch.argmax
        if channels_last:
            scores = scores.contiguous(memory_format=torch.channels_last)
        k = shape[1]
        expected = torch.from_numpy(numpy_confusion(scores, target, k, IGNORE_INDEX)).to(device)
        layout = "channels_last" if channels_last else "contiguous"
        results.append(
            compare(
                confusion_matrix(scores, target, k, IGNORE_INDEX),
                expected,
                0.0,
                family=FAMILY,
                op="confusion_matrix scores",
                what=f"counts, {str(dtype).removeprefix('torch.')} scores",
                inputs=f"{list(shape)} {layout} ignore_index={IGNORE_INDEX}",
            )
        )
    return results


def _metric_matrices(device) -> list[tuple[str, torch.Tensor]]:
    k = 6
    counts = torch.randint(0, 1000, (k, k), device=device)
    counts[1, :] = 0  # class 1: predicted, never in the ground truth
    counts[2, :] = 0  # class 2: absent from both
    counts[:, 2] = 0
    return [
        ("random K=6, classes absent", counts),
        ("diagonal K=4", torch.diag(torch.tensor([5, 0, 7, 1], device=device))),
        ("empty K=3", torch.zeros(3, 3, dtype=torch.int64, device=device)),
    ]


def check_metrics(device) -> list[CheckResult]:
    results = []
    for described, confmat in _metric_matrices(device):
        actual = segmentation_metrics(confmat)
        expected = numpy_metrics(confmat.cpu().numpy())
        for name, value, ref in zip(MetricsResult._fields, actual, expected, strict=True):
            ref = torch.from_numpy(ref).to(device)
            both_nan = value.isnan() & ref.isnan()  # NaN where both are: equal
            results.append(
                compare(
                    value.masked_fill(both_nan, 0.0),
                    ref.masked_fill(both_nan, 0.0),
                    1e-12,
                    family=FAMILY,
                    op="segmentation_metrics",
                    what=name,
                    inputs=described,
                )
            )
    return results


def check_stream(device) -> CheckResult:
    """SegmentationMetrics over batches of several kinds against NumPy on their concatenation."""
    k = 19
    batches = [random_labels((2, 17, 9), k, device), random_scores((1, k, 5, 6), device)]
    pred, target = random_labels((3, 4, 4), k, device)
    batches.append((pred.to(torch.uint8), target.to(torch.uint8)))
    metric = SegmentationMetrics(k, IGNORE_INDEX, device=device)
    expected = np.zeros((k, k), dtype=np.int64)
    for pred, target in batches:
        metric.update(pred, target)
        expected += numpy_confusion(pred, target, k, IGNORE_INDEX)
    metric.compute()  # raises if a label were reported out of range
    return compare(
        metric.confusion_matrix,
        torch.from_numpy(expected).to(device),
        0.0,
        family=FAMILY,
        op="SegmentationMetrics",
        what="accumulated counts",
        inputs="3 batches: int64 labels, float32 scores, uint8 labels",
    )


def checks(device: torch.device, quick: bool) -> list[CheckResult]:
    torch.manual_seed(0)
    return [
        *check_labels(device, quick),
        *check_scores(device, quick),
        *check_metrics(device),
        check_stream(device),
    ]


# ---------------------------------------------------------------------------------------------
# Benchmark cases


def least_traffic(inputs, num_classes: int) -> tuple[int, int]:
    """(bytes read, bytes written) at the least: pred (labels or scores) and target are read
    once; the int64 [K, K] matrix is written (negligible, but counted)."""
    pred, target = inputs
    read = pred.numel() * pred.element_size() + target.numel() * target.element_size()
    return read, num_classes * num_classes * 8


def make_case(op: str, kind: str, shape, num_classes: int, device) -> Case:
    """A labels case (shape [N, H, W], int64) or a scores case (shape [N, K, H, W], float32)."""
    peer, peer_note = torchmetrics_peer(num_classes)
    if kind == "labels":

        def make_inputs():
            return random_labels(shape, num_classes, device)

        reference, dtype = labels_baseline(num_classes), "int64"
    else:

        def make_inputs():
            return random_scores(shape, device)

        reference, dtype = scores_baseline(num_classes), "float32+int64"

    return Case(
        family=FAMILY,
        op=op,
        label=f"{op} K={num_classes}",
        device=str(device),
        shape="x".join(map(str, shape)),
        dtype=dtype,
        layout="contiguous",
        backward=False,
        make_inputs=make_inputs,
        ours=ours(num_classes),
        reference=reference,
        traffic=lambda inputs: least_traffic(inputs, num_classes),
        peer=peer,
        peer_name="torchmetrics",
        peer_note=peer_note,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        result = [
            make_case("confusion_matrix labels", "labels", CUDA_LABELS[quick], k, device)
            for k in CUDA_CLASSES
        ]
        return result + [
            make_case("confusion_matrix scores", "scores", CUDA_SCORES[quick], 19, device)
        ]
    return [
        make_case("confusion_matrix labels", "labels", CPU_LABELS[quick], 19, device),
        make_case("confusion_matrix scores", "scores", CPU_SCORES[quick], 19, device),
    ]


register(Family(name=FAMILY, checks=checks, cases=cases))
