"""Benchmarks of torch_ext's ops against the PyTorch compositions, eager and compiled.

    python benchmarks/run.py [--device cpu|cuda|all] [--family spp] [--quick] [--out DIR]

Prints a markdown table and writes DIR/bench.json and DIR/bench.md (default
benchmarks/results). Progress goes to stderr. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from torch_ext import _bench
from torch_ext._bench.timing import TimingPlan

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda", "all"],
        default="all",
        help="where to run; 'all' adds CUDA when it works (default)",
    )
    parser.add_argument(
        "--family", action="append", help="a family to run (repeatable); default: all registered"
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, short budgets")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timing per case (default 3, quick 0.5)",
    )
    parser.add_argument(
        "--compile-budget",
        type=float,
        default=600.0,
        help="seconds torch.compile of baselines may take in all (0: skip)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)"
    )
    return parser.parse_args(argv)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def write_results(report: _bench.Report, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    markdown = (
        f"# torch_ext benchmarks\n\n{_bench.machine_summary(report.machine)}\n\n"
        f"{_bench.bench_table(report.cases)}\n"
    )
    (out / "bench.md").write_text(markdown)
    return markdown


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 3.0)
    options = _bench.RunOptions(
        devices=_bench.available_devices(args.device, log),
        families=_bench.families(args.family),
        quick=args.quick,
        with_checks=False,
        plan=TimingPlan(budget_s=budget, min_samples=5 if args.quick else 10),
        compile_budget_s=args.compile_budget,
    )
    report = _bench.run(options, log)
    print(write_results(report, args.out), flush=True)
    log(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}")
    return 1 if any(case.error for case in report.cases) else 0


if __name__ == "__main__":
    sys.exit(main())
