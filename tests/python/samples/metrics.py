"""Samples of the segmentation metric ops: confusion_matrix, its accumulate kernel and
segmentation_metrics."""

from __future__ import annotations

import torch

from . import Sample

K = 4
INT64_MAX = 2**63 - 1


def sample_inputs(device: str) -> dict[str, list[Sample]]:
    gen = torch.Generator().manual_seed(0)

    def labels(shape, dtype=torch.int64, ignore_index=None):
        t = torch.randint(0, K, shape, generator=gen)
        if ignore_index is not None:
            t = t.masked_fill(torch.rand(shape, generator=gen) < 0.2, ignore_index)
        return t.to(device=device, dtype=dtype)

    def scores(dtype=torch.float32, channels_last=False, requires_grad=False):
        t = torch.randn((2, K, 3, 5), generator=gen, dtype=torch.float64).to(device, dtype)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        # Non-differentiable: a score that requires grad must give a count that does not.
        return t.requires_grad_(requires_grad)

    def fresh_state():
        confmat = torch.zeros(K, K, dtype=torch.int64, device=device)
        report = torch.tensor([0, INT64_MAX], dtype=torch.int64, device=device)
        return confmat, report

    confmat = torch.randint(0, 20, (K, K), generator=gen)
    confmat[1] = 0  # a class absent from the target
    # validate=False throughout: validation reads the report on the host, which tracing cannot.
    return {
        "confusion_matrix": [
            Sample(
                (
                    labels((2, 3, 5), torch.int32),
                    labels((2, 3, 5), torch.uint8, 255),
                    K,
                    255,
                    False,
                ),
                label="labels-ignore",
            ),
            Sample(
                (scores(channels_last=True, requires_grad=True), labels((2, 3, 5)), K),
                {"validate": False},
                label="scores-channels_last-grad",
            ),
        ],
        "_confusion_matrix_accumulate": [
            Sample(
                (*fresh_state(), labels((2, 3, 5)), labels((2, 3, 5), ignore_index=255), 255),
                label="labels-ignore",
            ),
            Sample(
                (*fresh_state(), scores(torch.float64), labels((2, 3, 5), torch.uint8)),
                label="scores",
            ),
        ],
        "segmentation_metrics": [
            Sample((confmat.to(device),), label="int64"),
        ],
    }
