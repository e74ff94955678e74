"""SegmentationMetrics: streaming accumulation on the device, compute, reset, out-of-range
reporting, and the distributed sync (two gloo processes).

The reference confusion matrix is NumPy's bincount over the concatenation of all batches,
independent of our ops; compute() must equal segmentation_metrics of that matrix.

This file is also the worker of the distributed test: ``python test_metrics_stream.py
--ddp-worker RANK WORLD INIT_FILE OUT DEVICE`` (see ``run_ddp_worker``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import distributed_workers
import numpy as np
import pytest
import torch

import torch_ext  # noqa: F401  (loads the op library)
from torch_ext._segmentation_stream import SegmentationMetrics
from torch_ext.metrics import MetricsResult, segmentation_metrics

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

K = 5
IGNORE = 255

# ---------------------------------------------------------------- data and references


def label_batch(shape, gen, dtype=torch.int64, ignore_fraction=0.1):
    """(pred, target) labels in [0, K), with ~ignore_fraction of the targets set to IGNORE."""
    target = torch.randint(0, K, shape, generator=gen)
    target[torch.rand(shape, generator=gen) < ignore_fraction] = IGNORE
    pred = torch.randint(0, K, shape, generator=gen)
    return pred.to(dtype), target.to(dtype)


def score_batch(shape, gen, dtype=torch.float32):
    """(scores [N, K, *S], target [N, *S]), with ~10% ignored targets."""
    _, target = label_batch(shape, gen, torch.int64)
    scores = torch.randn((shape[0], K, *shape[1:]), generator=gen).to(dtype)
    return scores, target


def batches(gen):
    """Batches of varied shapes, label dtypes, layouts, and scores as well as labels."""
    pred, target = label_batch((2, 7, 9), gen, torch.uint8)
    yield pred, target
    pred, target = label_batch((3, 4, 6), gen, torch.int32)
    yield pred.transpose(1, 2), target.transpose(1, 2)  # non-contiguous
    yield label_batch((1, 11), gen, torch.int64)
    yield score_batch((2, 5, 3), gen, torch.float32)
    scores, target = score_batch((1, 6, 4), gen, torch.float64)
    yield scores.contiguous(memory_format=torch.channels_last), target.to(torch.int16)


def numpy_confusion_matrix(pairs, num_classes=K, ignore_index=IGNORE) -> np.ndarray:
    """int64 [K, K] by np.bincount over every (pred, target) pair, concatenated."""
    preds, targets = [], []
    for pred, target in pairs:
        values = pred.detach().cpu()
        if values.is_floating_point():
            labels = np.argmax(values.double().numpy(), axis=1)
        else:
            labels = values.numpy().astype(np.int64)
        preds.append(labels.reshape(-1))
        targets.append(target.detach().cpu().numpy().astype(np.int64).reshape(-1))
    p, t = np.concatenate(preds), np.concatenate(targets)
    keep = t != ignore_index
    flat = num_classes * t[keep] + p[keep]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, -1)


def assert_results_equal(actual: MetricsResult, expected: MetricsResult) -> None:
    for name, a, e in zip(MetricsResult._fields, actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=name)


def moved(pairs, device):
    return [(pred.to(device), target.to(device)) for pred, target in pairs]


# ---------------------------------------------------------------- accumulation and compute


def test_update_equals_confusion_matrix_of_concatenation(device, gen):
    pairs = moved(list(batches(gen)), device)
    metric = SegmentationMetrics(K, IGNORE)
    for pred, target in pairs:
        metric.update(pred, target)
    expected = numpy_confusion_matrix(pairs)
    assert metric.device.type == torch.device(device).type  # taken from the first update
    assert metric.confusion_matrix.dtype == torch.int64
    np.testing.assert_array_equal(metric.confusion_matrix.cpu().numpy(), expected)
    # The one-shot op over the concatenated labels agrees.
    labels = [(p, t) for p, t in pairs if not p.is_floating_point()]
    cat_pred = torch.cat([p.reshape(-1).long() for p, _ in labels])
    cat_target = torch.cat([t.reshape(-1).long() for _, t in labels])
    np.testing.assert_array_equal(
        torch_ext.metrics.confusion_matrix(cat_pred, cat_target, K, IGNORE).cpu().numpy(),
        numpy_confusion_matrix(labels),
    )


def test_compute_equals_metrics_of_reference_matrix(device, gen):
    pairs = moved(list(batches(gen)), device)
    metric = SegmentationMetrics(K, IGNORE, device=device)
    for pred, target in pairs:
        metric.update(pred, target)
    expected = segmentation_metrics(torch.from_numpy(numpy_confusion_matrix(pairs)).to(device))
    result = metric.compute()
    assert_results_equal(result, expected)
    assert result.iou.device.type == torch.device(device).type
    # compute() changes nothing: a second one agrees, and updates may go on after it.
    assert_results_equal(metric.compute(), expected)
    more = moved([label_batch((2, 3, 3), gen)], device)
    metric.update(*more[0])
    assert_results_equal(
        metric.compute(),
        segmentation_metrics(torch.from_numpy(numpy_confusion_matrix(pairs + more)).to(device)),
    )


def test_sync_without_process_group_is_a_copy(device, gen):
    metric = SegmentationMetrics(K, IGNORE, device=device)
    metric.update(*moved([label_batch((2, 4, 4), gen)], device)[0])
    synced = metric.sync()
    torch.testing.assert_close(synced, metric.confusion_matrix, rtol=0, atol=0)
    synced.zero_()
    assert metric.confusion_matrix.sum() > 0  # neither sync() nor the property hand out state


def test_reset(device, gen):
    metric = SegmentationMetrics(K, IGNORE, device=device)
    metric.update(*moved([label_batch((2, 6, 6), gen)], device)[0])
    zeros = torch.zeros(3, dtype=torch.long, device=device)
    metric.update(zeros + 9, zeros)  # out of range: forgotten by reset() too
    metric.reset()
    assert metric.confusion_matrix.count_nonzero() == 0
    assert metric.device.type == torch.device(device).type
    pairs = moved([label_batch((3, 5, 2), gen)], device)
    metric.update(*pairs[0])
    np.testing.assert_array_equal(
        metric.confusion_matrix.cpu().numpy(), numpy_confusion_matrix(pairs)
    )
    metric.compute()


def test_empty_metric_is_nan(device):
    metric = SegmentationMetrics(K, device=device)
    result = metric.compute()
    assert metric.confusion_matrix.count_nonzero() == 0
    for value in result:
        assert value.isnan().all()


def test_empty_batches(device):
    metric = SegmentationMetrics(K, IGNORE, device=device)
    empty = torch.empty(0, 4, dtype=torch.long, device=device)
    metric.update(empty, empty)
    metric.update(torch.empty(0, K, 4, device=device), empty)
    assert metric.confusion_matrix.count_nonzero() == 0


# ---------------------------------------------------------------- out-of-range labels


def test_out_of_range_raises_at_compute_not_update(device, gen):
    pred0, target0 = label_batch((2, 3, 4), gen)  # 24 pixels
    target0 = target0.clone()
    target0[0, 1, 1] = K  # flat 5, in target: key 10
    target0[1, 2, 3] = -1  # flat 23, in target
    target0[0, 0, 0] = 0
    pred0[0, 0, 0] = IGNORE  # 255 in pred of a counted pixel is out of range too: flat 0 ...
    pred1, target1 = label_batch((1, 2, 5), gen)
    pred1 = pred1.clone()
    target1 = target1.clone()
    target1[0, 0, 3] = IGNORE
    pred1[0, 0, 3] = 99  # ... but a bad pred on an ignored pixel is not counted
    pairs = moved([(pred0, target0), (pred1, target1)], device)
    metric = SegmentationMetrics(K, IGNORE, device=device)
    for pred, target in pairs:
        metric.update(pred, target)  # no error here: update never reads the host
    with pytest.raises(ValueError, match=r"3 pixel\(s\).*flat index 0, in pred"):
        metric.compute()
    # The good pixels are counted, the bad ones left out.
    valid = []
    for pred, target in pairs:
        pred, target = pred.cpu(), target.cpu()
        keep = (pred >= 0) & (pred < K) & (target >= 0) & (target < K)
        valid.append((pred[keep], target[keep]))
    np.testing.assert_array_equal(
        metric.confusion_matrix.cpu().numpy(), numpy_confusion_matrix(valid)
    )
    with pytest.raises(ValueError, match=r"3 pixel\(s\)"):
        metric.compute()  # still raises: the report is not consumed
    metric.reset()
    metric.update(*pairs[1])
    metric.compute()


def test_out_of_range_in_target_is_named(device):
    metric = SegmentationMetrics(3, device=device)
    target = torch.tensor([[0, 1, 2, 3, 1, 7]], device=device)
    metric.update(torch.zeros_like(target), target)
    with pytest.raises(
        ValueError,
        match=r"2 pixel\(s\) had a label outside \[0, 3\).*flat index 3"
        r", in target",
    ):
        metric.compute()


# ---------------------------------------------------------------- arguments and devices


def test_argument_errors():
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(0)
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(2.5)
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationMetrics(3, ignore_index=1.0)
    metric = SegmentationMetrics(3)
    assert metric.device is None
    with pytest.raises(RuntimeError, match="target"):
        metric.update(torch.zeros(2, dtype=torch.long), torch.zeros(2))  # float target
    assert "num_classes=3" in repr(metric)


@CUDA_SKIP
def test_update_on_another_device_raises():
    metric = SegmentationMetrics(3, device="cuda")
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="pred must be on cuda"):
        metric.update(labels, labels)


@CUDA_SKIP
def test_update_does_not_synchronize(gen):
    pairs = moved(list(batches(gen)), "cuda")
    metric = SegmentationMetrics(K, IGNORE)  # allocation on the first update is sync-free too
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for pred, target in pairs:
            metric.update(pred, target)
        metric.reset()
        for pred, target in pairs:
            metric.update(pred, target)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    np.testing.assert_array_equal(
        metric.confusion_matrix.cpu().numpy(), numpy_confusion_matrix(pairs)
    )


# ---------------------------------------------------------------- distributed (two processes)

WORLD = 2
DDP_TIMEOUT_S = 60


def rank_shards(world: int):
    """Every rank's batches, drawn from one seed: the parent and each worker agree."""
    gen = torch.Generator().manual_seed(1234)
    shards = []
    for rank in range(world):
        pairs = [label_batch((2, 6 + rank, 5), gen), score_batch((1, 4, 3 + rank), gen)]
        if rank == 1:
            pairs.append(label_batch((3, 2, 2), gen, torch.int32))
        shards.append(pairs)
    return shards


def bad_shard(rank: int):
    """A batch with one out-of-range label: rank 0 in pred at flat 9, rank 1 in target at 4."""
    pred = torch.zeros(2, 8, dtype=torch.long)
    target = torch.ones(2, 8, dtype=torch.long)
    if rank == 0:
        pred[1, 1] = K
    else:
        target[0, 4] = -3
    return pred, target


def run_ddp_worker(rank: int, world: int, init_file: str, out: str, device: str) -> None:
    """One rank: updates with its shard, computes (twice), then meets out-of-range labels."""
    import torch.distributed as dist

    distributed_workers.init_process_group(rank, world, init_file, DDP_TIMEOUT_S // 2)
    try:
        metric = SegmentationMetrics(K, IGNORE, device=device)
        for pred, target in rank_shards(world)[rank]:
            metric.update(pred.to(device), target.to(device))
        local = metric.confusion_matrix
        first, second = metric.compute(), metric.compute()
        results = {
            "local": local.cpu(),
            "local_after": metric.confusion_matrix.cpu(),
            "synced": metric.sync().cpu(),
            "first": [t.cpu() for t in first],
            "second": [t.cpu() for t in second],
        }
        metric.update(*(t.to(device) for t in bad_shard(rank)))
        try:
            metric.compute()
            results["error"] = None
        except ValueError as error:
            results["error"] = str(error)
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def run_workers(tmp_path: Path, device: str) -> list[dict]:
    return distributed_workers.run_workers(__file__, tmp_path, WORLD, DDP_TIMEOUT_S, (device,))


def test_distributed_compute_equals_single_process(device, tmp_path):
    shards = rank_shards(WORLD)
    everything = [pair for shard in shards for pair in shard]
    expected_matrix = torch.from_numpy(numpy_confusion_matrix(everything))
    expected = segmentation_metrics(expected_matrix)
    results = run_workers(tmp_path, device)
    for rank, result in enumerate(results):
        np.testing.assert_array_equal(result["local"].numpy(), numpy_confusion_matrix(shards[rank]))
        torch.testing.assert_close(result["local_after"], result["local"], rtol=0, atol=0)
        torch.testing.assert_close(result["synced"], expected_matrix, rtol=0, atol=0)
        # On CUDA the metrics are computed there; the reference here is on the CPU.
        exact = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-12, atol=1e-12)
        for name, first, second, ref in zip(
            MetricsResult._fields, result["first"], result["second"], expected, strict=True
        ):
            torch.testing.assert_close(first, ref, equal_nan=True, msg=name, **exact)
            torch.testing.assert_close(second, first, rtol=0, atol=0, equal_nan=True, msg=name)
        # Both ranks raise for the bad labels of both: 2 pixels, the first at rank 1's flat 4.
        assert result["error"] is not None, f"rank {rank} did not raise"
        assert "2 pixel(s) (over all ranks)" in result["error"]
        assert "flat index 4, in target" in result["error"]


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--ddp-worker":
    _, _, rank_arg, world_arg, init_arg, out_arg, device_arg = sys.argv
    run_ddp_worker(int(rank_arg), int(world_arg), init_arg, out_arg, device_arg)
