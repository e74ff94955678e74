"""Samples of the variable-length sequence ops: unpad / pad, the first-axis gather and scatter,
cu_seqlens from position ids and the packing planner."""

from __future__ import annotations

import torch

from . import Sample

DATA_DEPENDENT = {
    "unpad_input": "the token count (hidden_unpad, indices) and max_seqlen when not given",
    "_unpad_plan": "the token count (indices) and max_seqlen when not given",
    "cu_seqlens_from_position_ids": "the number of sequences (cu_seqlens) and max_seqlen",
}


def sample_inputs(device: str) -> dict[str, list[Sample]]:
    gen = torch.Generator().manual_seed(0)

    def draw(shape, dtype=torch.float64, requires_grad=False):
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    # Rows with holes, a full row and an empty one; 3 x 5 slots, 9 real tokens.
    mask = torch.tensor(
        [[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool, device=device
    )
    total = int(mask.sum())
    indices = mask.flatten().nonzero().flatten()
    int_mask = mask.to(torch.int32)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]], device=device)
    return {
        "unpad_input": [
            Sample((draw((3, 5, 4), requires_grad=True), mask), label="f64"),
            Sample(
                (draw((3, 5, 2, 3), torch.float32, requires_grad=True), int_mask, total),
                label="f32-total",
            ),
        ],
        "_unpad_plan": [
            Sample((mask,), label="bool"),
            Sample((int_mask, total, 5), label="int-total-max"),
        ],
        "pad_input": [
            Sample((draw((total, 4), requires_grad=True), indices, 3, 5), label="f64"),
            Sample(
                (draw((total, 2, 3), torch.float32, requires_grad=True), indices, 3, 5), label="f32"
            ),
        ],
        "index_first_axis": [
            Sample((draw((15, 4), requires_grad=True), indices), label="f64"),
            Sample((draw((15, 2, 3), torch.float32, requires_grad=True), indices), label="f32"),
        ],
        "index_put_first_axis": [
            Sample((draw((total, 4), requires_grad=True), indices, 15), label="f64"),
            Sample(
                (draw((total, 2, 3), torch.float32, requires_grad=True), indices, 15), label="f32"
            ),
        ],
        "cu_seqlens_from_position_ids": [
            Sample((position_ids,), label="int64"),
            Sample((position_ids.to(torch.int32)[:1],), label="int32-one-row"),
        ],
        "plan_packing": [
            Sample((torch.tensor([5, 3, 8, 1, 4], device=device), 8), label="ffd"),
            Sample(
                (torch.tensor([5, 3, 9, 1, 4], dtype=torch.int32, device=device), 8, "bfd", True),
                label="bfd-truncate-int32",
            ),
        ],
    }
