"""Typed wrappers of the segmentation-metric ops: the fused confusion matrix and the metrics
(PA / MPA / IoU / MIoU / FWIoU / Dice) of a confusion matrix.

``confusion_matrix`` and ``segmentation_metrics`` are ops of the C++ library
(``torch.ops.torch_ext.*``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from torch_ext._args import int_arg, optional_int_arg

__all__ = ["MetricsResult", "confusion_matrix", "segmentation_metrics"]


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """The int64 ``[K, K]`` confusion matrix, rows = ground truth, columns = prediction.

    Args:
        pred: integer labels of ``target``'s shape, or float scores with the class dimension at
            dim 1 (``[N, K, ...]`` against ``target`` ``[N, ...]``), argmaxed inside the kernel
            (ties go to the lowest class and NaN wins, as ``torch.argmax``; the argmax is never
            materialized). Labels: uint8, int16, int32 or int64; scores: float32, float64,
            float16 or bfloat16; any number of spatial dims, any strides.
        target: integer labels (uint8, int16, int32 or int64).
        num_classes: K >= 1.
        ignore_index: pixels whose target equals it are skipped.
        validate: any other value outside ``[0, K)`` in target or pred raises an error naming
            the value and where it was found (on CUDA one device-to-host copy); ``False`` skips
            the check, and such pixels, with no synchronization.

    Counts are exact int64 and deterministic on every backend.
    """
    num_classes = int_arg("confusion_matrix", "num_classes", num_classes)
    ignore_index = optional_int_arg("confusion_matrix", "ignore_index", ignore_index)
    return torch.ops.torch_ext.confusion_matrix(pred, target, num_classes, ignore_index, validate)


class MetricsResult(NamedTuple):
    """Metrics of a confusion matrix, float64 tensors on its device."""

    pixel_accuracy: torch.Tensor  # [] sum(diag) / sum(all)
    mean_pixel_accuracy: torch.Tensor  # [] nan-mean over classes of diag / gt
    iou: torch.Tensor  # [K] diag / (gt + pred - diag)
    mean_iou: torch.Tensor  # [] nan-mean of iou
    fw_iou: torch.Tensor  # [] sum over classes present in gt of (gt / total) * iou
    dice: torch.Tensor  # [K] 2 diag / (gt + pred)
    mean_dice: torch.Tensor  # [] nan-mean of dice


def segmentation_metrics(confmat: torch.Tensor) -> MetricsResult:
    """PA, MPA, per-class IoU, MIoU, FWIoU, per-class Dice and mean Dice of ``confmat``.

    Definitions as in FCN, mmsegmentation and the Cityscapes scripts (rows = ground truth): a
    class absent from both ground truth and prediction is NaN per class and left out of every
    mean; a class absent from the ground truth but predicted has IoU 0 and Dice 0, and no
    accuracy (left out of MPA). With an empty matrix every metric is NaN.
    """
    return MetricsResult(*torch.ops.torch_ext.segmentation_metrics(confmat))
