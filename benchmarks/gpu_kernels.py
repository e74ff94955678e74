"""Runs each benchmark case's op once, at the benchmark's sizes: the program that Nsight Compute
profiles in scripts/gpu_check.sh (``ncu ... python benchmarks/gpu_kernels.py``), so that every
kernel of ours is measured on the inputs the benchmarks time.

    python benchmarks/gpu_kernels.py [--device cuda] [--family spp ...] [--quick] [--list]

The cases come from the tour's registry (``torch_ext/_bench``): nothing is listed twice. A case
with ``backward`` runs forward and backward. Cases are run once each after one warm-up call, so
a profiler that skips the warm-up launches sees one launch per kernel and case
(``--warmup 0`` to run each case once only). On the CPU (``--device cpu``) it is a quick check of
the driver itself.
"""

from __future__ import annotations

import argparse
import sys

import torch

from torch_ext import _bench
from torch_ext._bench.timing import forward_backward_step, forward_step, synchronize

# Cases whose op is a whole model (many ATen kernels, few of ours) are left to the benchmarks.
SKIPPED_OPS = {"apply_rmpad", "apply_checkpointing", "checkpoint_wrapper"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--family", action="append", help="a family (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="the quick tour's small shapes")
    parser.add_argument("--warmup", type=int, default=1, help="calls before the measured one")
    parser.add_argument("--list", action="store_true", help="print the cases, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    ran = 0
    for family in _bench.families(args.family):
        if family.name == "checkpoint":
            continue
        for case in family.cases(device, args.quick):
            if case.op in SKIPPED_OPS:
                continue
            print(f"{family.name}: {case.op}: {case.label} {case.shape} {case.dtype}", flush=True)
            if args.list:
                continue
            inputs = case.make_inputs()
            if case.backward:
                with torch.no_grad():
                    grad_output = torch.randn_like(case.ours(*inputs))
                step = forward_backward_step(case.ours, inputs, grad_output)
            else:
                step = forward_step(case.ours, inputs)
            for _ in range(args.warmup + 1):
                step()
            synchronize(device)
            ran += 1
    print(f"gpu_kernels: {ran} cases run on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
