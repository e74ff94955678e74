"""Packed batches: ``plan_packing`` assigns sequences to packs, ``PackingCollator`` builds them."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch

from torch_ext._args import int_arg

__all__ = ["PackingCollator", "plan_packing"]

_ops = torch.ops.torch_ext


def plan_packing(
    lengths: torch.Tensor | Sequence[int],
    capacity: int,
    strategy: str = "ffd",
    truncate: bool = False,
) -> torch.Tensor:
    """Assigns sequences to packs of at most ``capacity`` tokens; returns int64 pack indices.

    ``strategy``: ``"ffd"`` (first-fit-decreasing: each sequence, longest first, goes into the
    lowest-numbered pack with room) or ``"bfd"`` (best-fit-decreasing: into the pack with the
    least room that still fits). Packs are numbered in the order they are opened. A sequence
    longer than ``capacity`` raises, unless ``truncate`` (then it counts as ``capacity``
    tokens). O(n log n): a million sequences plan in well under a second.
    """
    if not isinstance(lengths, torch.Tensor):
        values = list(lengths)
        for i, value in enumerate(values):
            try:
                if isinstance(value, bool):
                    raise TypeError
                values[i] = operator.index(value)  # ints, numpy integers, 0-d integer tensors
            except TypeError:
                raise TypeError(
                    f"plan_packing(): lengths must be integers, got {value!r} at position {i}"
                ) from None
        lengths = torch.tensor(values, dtype=torch.long)
    capacity = int_arg("plan_packing", "capacity", capacity)
    return _ops.plan_packing(lengths.cpu(), capacity, strategy, truncate)


class PackingCollator:
    """Packs tokenized examples into rows of ``capacity`` tokens (a ``DataLoader`` collate_fn).

    Each example is a mapping with ``"input_ids"`` (list of ints or 1-D tensor) and optionally
    ``"labels"``. Examples are assigned to rows by :func:`plan_packing`; a row holds whole
    sequences one after another and is padded at its end. Everything is computed on the CPU, in
    the data-loader worker.

    Returns a dict of tensors ``[P, capacity]``: ``input_ids``, ``labels`` (-100 at each
    sequence's first token, which must not be predicted from the sequence before it, and on
    padding), ``position_ids`` (restarting at 0 for every sequence; a row's padding tail is a
    segment of its own), ``attention_mask`` (1 real, 0 padding); plus ``cu_seqlens`` int32 over
    the flattened ``[P * capacity]`` tokens (every segment, padding tails included) and
    ``max_seqlen`` (int).
    """

    def __init__(self, capacity: int, pad_token_id: int = 0, strategy: str = "ffd") -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"PackingCollator: capacity must be an int >= 1, got {capacity!r}")
        if strategy not in ("ffd", "bfd"):
            raise ValueError(f"PackingCollator: strategy must be 'ffd' or 'bfd', got {strategy!r}")
        self.capacity = capacity
        self.pad_token_id = pad_token_id
        self.strategy = strategy

    def __call__(self, examples: Sequence[Mapping]) -> dict:
        ids = [
            torch.as_tensor(example["input_ids"], dtype=torch.long).flatten()
            for example in examples
        ]
        labels = [
            torch.as_tensor(example["labels"], dtype=torch.long).flatten()
            if "labels" in example
            else ids[i]
            for i, example in enumerate(examples)
        ]
        for i, (seq, lab) in enumerate(zip(ids, labels, strict=True)):
            if seq.numel() > self.capacity:
                raise ValueError(
                    f"PackingCollator: example {i} has {seq.numel()} tokens, more than "
                    f"capacity={self.capacity}"
                )
            if lab.shape != seq.shape:
                raise ValueError(
                    f"PackingCollator: example {i}'s labels {tuple(lab.shape)} must match its "
                    f"input_ids {tuple(seq.shape)}"
                )
        lengths = torch.tensor([seq.numel() for seq in ids], dtype=torch.long)
        packs = plan_packing(lengths, self.capacity, self.strategy).tolist()
        rows = max(packs, default=-1) + 1
        members: list[list[int]] = [[] for _ in range(rows)]
        for example, pack in enumerate(packs):
            members[pack].append(example)
        shape = (rows, self.capacity)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        out_labels = torch.full(shape, -100, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        starts: list[int] = []
        for row, examples_in_row in enumerate(members):
            offset = 0
            for example in examples_in_row:
                n = ids[example].numel()
                if n == 0:
                    continue
                starts.append(row * self.capacity + offset)
                input_ids[row, offset : offset + n] = ids[example]
                out_labels[row, offset : offset + n] = labels[example]
                out_labels[row, offset] = -100
                position_ids[row, offset : offset + n] = torch.arange(n)
                attention_mask[row, offset : offset + n] = 1
                offset += n
            if offset < self.capacity:  # the padding tail: a segment of its own
                starts.append(row * self.capacity + offset)
                position_ids[row, offset:] = torch.arange(self.capacity - offset)
        bounds = torch.tensor(starts + [rows * self.capacity], dtype=torch.int32)
        max_seqlen = int((bounds[1:] - bounds[:-1]).max()) if len(starts) else 0
        return {
            "input_ids": input_ids,
            "labels": out_labels,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "cu_seqlens": bounds,
            "max_seqlen": max_seqlen,
        }
