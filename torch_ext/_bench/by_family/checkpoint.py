"""The checkpointing family: a checkpointed MLP (``torch_ext.checkpoint.checkpoint_wrapper``)
against the same MLP run plainly. Checkpointing trades time for memory, so "ours" is expected
to be slower; the memory side is measured by benchmarks/checkpoint_mlp.py (C++ and Python)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from torch_ext._bench.registry import Case, CheckResult, Family, compare, register
from torch_ext.checkpoint import checkpoint_wrapper

FAMILY = "checkpoint"
# (blocks, width, batch): the tour's size and its quick stand-in.
SIZES = {False: (8, 512, 64), True: (4, 64, 8)}


def make_mlp(blocks: int, width: int, device: torch.device, dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(blocks)]
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def checkpointed(model: nn.Sequential, policy: str) -> nn.Sequential:
    twin = copy.deepcopy(model)
    for i, block in enumerate(twin):
        twin[i] = checkpoint_wrapper(block, policy=policy)
    return twin


def checks(device: torch.device, quick: bool) -> list[CheckResult]:
    blocks, width, batch = SIZES[True]
    results = []
    for policy in ("full", "selective"):
        plain = make_mlp(blocks, width, device, torch.float64)
        ours = checkpointed(plain, policy)
        x = torch.randn(batch, width, device=device, dtype=torch.float64)
        grads = []
        for model in (ours, plain):
            leaf = x.clone().requires_grad_()
            model(leaf).square().sum().backward()
            grads.append([leaf.grad] + [p.grad for p in model.parameters()])
        shape = f"{blocks} blocks, {batch}x{width}"
        for k, (got, want) in enumerate(zip(*grads, strict=True)):
            what = "grad input" if k == 0 else f"grad parameter {k - 1}"
            results.append(
                compare(got, want, 1e-10, family=FAMILY, op=f"checkpoint_wrapper {policy}",
                        what=what, inputs=shape)
            )  # fmt: skip
    return results


def cases(device: torch.device, quick: bool) -> list[Case]:
    blocks, width, batch = SIZES[quick]
    plain = make_mlp(blocks, width, device, torch.float32)
    result = []
    for policy in ("full", "selective"):
        ours = checkpointed(plain, policy)
        result.append(
            Case(
                family=FAMILY,
                op=f"checkpoint_wrapper {policy}",
                label=f"checkpointed MLP ({policy}) fwd+bwd",
                device=str(device),
                shape=f"{blocks} blocks, {batch}x{width}",
                dtype="float32",
                layout="contiguous",
                backward=True,
                make_inputs=lambda: (torch.randn(batch, width, device=device, requires_grad=True),),
                ours=ours,
                reference=plain,
            )
        )
    return result


register(Family(FAMILY, checks, cases))
