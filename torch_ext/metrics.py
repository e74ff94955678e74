"""Segmentation metrics: a fused confusion matrix, PA / MPA / IoU / MIoU / FWIoU / Dice, and a
streaming, distributed accumulator.

``confusion_matrix`` and ``segmentation_metrics`` are ops of the C++ library
(``torch.ops.torch_ext.*``); ``SegmentationMetrics`` accumulates on the device.

The public face of the metrics; the op wrappers live in ``torch_ext._segmentation_ops``, the
accumulator in ``torch_ext._segmentation_stream``.
"""

from __future__ import annotations

from torch_ext._segmentation_ops import MetricsResult, confusion_matrix, segmentation_metrics
from torch_ext._segmentation_stream import SegmentationMetrics

__all__ = ["confusion_matrix", "segmentation_metrics", "MetricsResult", "SegmentationMetrics"]
