"""``SegmentationMetrics``: a streaming, distributed accumulator of the confusion matrix.

``update`` adds a batch's counts on the device with no host synchronization (out-of-range labels
are counted and located on the device too); ``compute`` reads one small report on the host, raises
if any label was out of range, and returns the metrics of everything accumulated, summed over the
processes of the metric's ``process_group`` (by default the default ``torch.distributed`` group,
when one is initialized).
"""

from __future__ import annotations

import torch

from torch_ext._segmentation_ops import MetricsResult, segmentation_metrics

__all__ = ["SegmentationMetrics"]

# The report's "no bad pixel seen" key: larger than any real key, the identity of MIN.
_NO_KEY = 2**63 - 1


def _distributed_world(process_group=None) -> int:
    """The number of processes in ``process_group`` (None: the default group), or 1 where
    torch.distributed is not in use and no group was given."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError(
                "SegmentationMetrics: a process_group was given but torch.distributed is not "
                "initialized (any more)"
            )
        return 1
    world = dist.get_world_size(process_group)
    if world < 1:  # torch's answer for a group this process is not part of
        raise ValueError(
            f"SegmentationMetrics: this process (global rank {dist.get_rank()}) is not a member "
            "of process_group; only the group's members may sync or compute over it"
        )
    return world


def _check_process_group(process_group) -> None:
    if process_group is None:
        return
    dist = torch.distributed
    if dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        return
    if dist.is_available() and process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            "SegmentationMetrics: this process is not a member of process_group "
            "(torch.distributed.new_group returned GroupMember.NON_GROUP_MEMBER here); only the "
            "group's members may sync or compute over it"
        )
    hint = ""
    if type(process_group).__name__ == "DeviceMesh":
        hint = ' (for a DeviceMesh, pass the group of one of its dimensions: mesh.get_group("dp"))'
    raise TypeError(
        "SegmentationMetrics: process_group must be None or a torch.distributed ProcessGroup, "
        f"got {type(process_group).__name__}{hint}"
    )


class SegmentationMetrics:
    """Accumulates the confusion matrix of a segmentation over batches (and processes).

    Example::

        metric = SegmentationMetrics(num_classes=19, ignore_index=255, device="cuda")
        for image, target in loader:
            metric.update(model(image), target)  # scores [N, K, H, W] or labels [N, H, W]
        result = metric.compute()  # MetricsResult: mean_iou, iou, ...; all ranks alike
        metric.reset()

    Under a 2-D device mesh (data parallel x tensor/context parallel, say), where the ranks of
    a "tp" group see the same batch, sync over the data-parallel group only, so that every
    sample counts once: ``SegmentationMetrics(19, 255, device="cuda",
    process_group=mesh.get_group("dp"))``.

    Args:
        num_classes: K >= 1; labels are in ``[0, K)``.
        ignore_index: pixels whose target equals it are skipped.
        device: where the state lives; every ``update`` must bring tensors on it. ``None``: the
            device of the first ``update``'s target. In a distributed run where some rank may see
            no batch at all, pass it, so that every rank joins ``compute``'s collectives on a
            device its backend supports (CPU for gloo, CUDA for NCCL).
        process_group: the ``torch.distributed`` group whose processes ``sync`` and ``compute``
            sum over (their collectives run on it; every member must call them, other
            processes must not). ``None`` (default): the default group when
            ``torch.distributed`` is initialized, else no sync. A ``DeviceMesh`` dimension's
            group is ``mesh.get_group("dp")``.

    State: an int64 ``[K, K]`` matrix (rows = ground truth, columns = prediction) and an int64
    ``[2]`` report (the number of out-of-range pixels, and the smallest key
    ``2 * flat_pixel_index + (1 if the bad value was in pred else 0)`` among them).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        device: torch.device | str | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
        _check_process_group(process_group)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.process_group = process_group
        self._confmat: torch.Tensor | None = None
        self._report: torch.Tensor | None = None
        if device is not None:
            self._allocate(torch.device(device))

    # -----------------------------------------------------------------------------------------
    # State

    def _allocate(self, device: torch.device) -> None:
        k = self.num_classes
        self._confmat = torch.zeros(k, k, dtype=torch.int64, device=device)
        self._report = torch.empty(2, dtype=torch.int64, device=device)
        self._clear_report()

    def _clear_report(self) -> None:
        # Two fills on the device: torch.tensor([...], device=...) would copy from the host.
        self._report.fill_(_NO_KEY)
        self._report[0] = 0

    def _state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(matrix, report), allocated on the CPU if no device is known yet."""
        if self._confmat is None:
            self._allocate(torch.device("cpu"))
        return self._confmat, self._report

    @property
    def device(self) -> torch.device | None:
        """Where the state lives; None until the first ``update`` when none was given."""
        return None if self._confmat is None else self._confmat.device

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """A copy of this process's accumulated int64 ``[K, K]`` matrix (not summed over ranks;
        ``sync()`` returns that one). Pixels with out-of-range labels are not in it."""
        return self._state()[0].clone()

    # -----------------------------------------------------------------------------------------
    # Accumulation

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds the counts of a batch, on the device, with no host synchronization.

        Args:
            pred: integer labels of ``target``'s shape, or float scores ``[N, K, ...]`` (argmaxed
                over dim 1 in the kernel), as :func:`torch_ext.metrics.confusion_matrix` takes.
            target: integer labels ``[N, ...]``.

        A pixel whose target or pred is outside ``[0, K)`` (target equal to ``ignore_index``
        aside) is skipped and recorded; ``compute`` raises for it.
        """
        if self._confmat is None:
            self._allocate(target.device)
        for name, tensor in (("pred", pred), ("target", target)):
            if tensor.device != self._confmat.device:
                raise ValueError(
                    f"SegmentationMetrics.update: {name} must be on {self._confmat.device} "
                    f"(the metric's device), got {tensor.device}"
                )
        torch.ops.torch_ext._confusion_matrix_accumulate(
            self._confmat, self._report, pred, target, self.ignore_index
        )

    def reset(self) -> None:
        """Zeroes the matrix and clears the report (on the device; the device stays)."""
        if self._confmat is not None:
            self._confmat.zero_()
            self._clear_report()

    # -----------------------------------------------------------------------------------------
    # Results

    def _synced_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(matrix, report) summed over the metric's process group, in new tensors; the local
        ones when torch.distributed is not initialized or the group has one process."""
        confmat, report = self._state()
        if _distributed_world(self.process_group) == 1:
            return confmat, report
        dist = torch.distributed
        k2 = self.num_classes * self.num_classes
        # One SUM for the matrix and the count, one MIN for the key.
        summed = torch.cat([confmat.reshape(-1), report[:1]])
        first_key = report[1:].clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.process_group)
        dist.all_reduce(first_key, op=dist.ReduceOp.MIN, group=self.process_group)
        synced_confmat = summed[:k2].reshape(self.num_classes, self.num_classes)
        return synced_confmat, torch.cat([summed[k2:], first_key])

    def sync(self) -> torch.Tensor:
        """The int64 ``[K, K]`` matrix summed over the processes of the metric's process group
        (``process_group``; by default the default group).

        A collective: in a distributed run every rank must call it (``compute`` does). The sums
        go into new tensors; this process's state is unchanged, so syncing (or computing) again
        does not count anything twice. Without an initialized process group (or with one
        process in the group) it returns a copy of the local matrix.
        """
        confmat, _ = self._synced_state()
        return confmat.clone() if confmat is self._confmat else confmat

    def compute(self) -> MetricsResult:
        """The metrics of everything accumulated, over the processes of the metric's process
        group when distributed (``process_group``; by default all of them).

        A collective in a distributed run (see ``sync``), then one host read of the report:
        raises ValueError if any pixel had a label outside ``[0, K)``. The state is unchanged:
        ``update`` may go on after it, and computing twice gives the same result.
        """
        confmat, report = self._synced_state()
        bad_pixels, first_key = report.tolist()
        if bad_pixels:
            raise ValueError(self._out_of_range_message(bad_pixels, first_key))
        return segmentation_metrics(confmat)

    def _out_of_range_message(self, bad_pixels: int, first_key: int) -> str:
        where = "pred" if first_key % 2 else "target"
        ranks = ""
        if _distributed_world(self.process_group) > 1:
            ranks = " (over all ranks)" if self.process_group is None else " (over process_group)"
        aside = ""
        if self.ignore_index is not None:
            aside = f" (target pixels equal to ignore_index {self.ignore_index} aside)"
        return (
            f"SegmentationMetrics: {bad_pixels} pixel(s){ranks} had a label outside "
            f"[0, {self.num_classes}){aside}; they were left out of the matrix. The first of "
            f"them (lowest flat pixel index within its batch) is at flat index "
            f"{first_key // 2}, in {where}"
        )

    def __repr__(self) -> str:
        return (
            f"SegmentationMetrics(num_classes={self.num_classes}, "
            f"ignore_index={self.ignore_index}, device={self.device})"
        )
