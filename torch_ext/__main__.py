"""The tour: ``python -m torch_ext [--quick] [--device cpu|cuda|all] [--out DIR]``.

For every registered op family, on CPU and (when available) CUDA: checks each op against its
PyTorch reference on random inputs, then times it against the eager and the compiled
composition. Prints a summary table, writes DIR/tour.json and a chart DIR/tour.png, and exits
non-zero when a check fails or an op raises.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from torch_ext import _bench
from torch_ext._bench.timing import TimingPlan

# The default run shows the goal shapes with few samples; --quick is a smoke run for CI.
PLANS = {
    False: TimingPlan(budget_s=1.0, warmup_calls=1, min_samples=5, max_samples=50),
    True: TimingPlan(budget_s=0.3, warmup_calls=1, min_samples=3, max_samples=30),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m torch_ext",
        description="The tour of torch_ext: each op family checked against its PyTorch reference "
        "and timed against its baselines (eager, torch.compile, peer libraries), on the CPU and "
        "on CUDA where a GPU is present.",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, short timings")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda", "all"],
        default="all",
        help="'all' (default): CPU, and CUDA when it works",
    )
    names = [family.name for family in _bench.families()]
    parser.add_argument(
        "--family",
        action="append",
        choices=names,
        help="only this family (repeatable; default: all of them)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("torch_ext_tour"),
        help="where tour.json and tour.png go (default ./torch_ext_tour)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile baselines (they take a while to compile)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)"
    )
    return parser.parse_args(argv)


def log(line: str) -> None:
    print(line, flush=True)


def check_summary(checks: list) -> dict[tuple[str, str, str], str]:
    """(device, family, op) -> 'pass 8/8, max err 1e-07' (or 'FAIL ...')."""
    grouped: dict[tuple[str, str, str], list] = {}
    for check in checks:
        grouped.setdefault((check.device, check.family, check.op), []).append(check)
    summary = {}
    for key, group in grouped.items():
        passed = sum(check.passed for check in group)
        worst = max(check.max_abs_error for check in group)
        verdict = "pass" if passed == len(group) else "FAIL"
        summary[key] = f"{verdict} {passed}/{len(group)}, max err {worst:.1e}"
    return summary


def tour_table(report: _bench.Report) -> str:
    """One row per case, with its op's checks; ops with checks but no case get a row too."""
    summary = check_summary(report.checks)
    headers = [
        "device",
        "family",
        "op",
        "checks",
        "case",
        "shape",
        "ours ms",
        "vs eager",
        "vs compiled",
        "bw frac",
    ]
    rows, timed = [], set()
    for r in report.cases:
        key = (r.case["device"], r.case["family"], r.case["op"])
        timed.add(key)
        ours = "ERROR " + r.error if r.error else f"{r.ours.median_ms:.2f}"
        rows.append(
            [
                *key,
                summary.get(key, "-"),
                r.case["label"],
                r.case["shape"],
                ours,
                _bench.fmt_ratio(r.speedup(r.eager)),
                _bench.fmt_ratio(r.speedup(r.compiled)),
                _bench.fmt_fraction(r.bandwidth_fraction()),
            ]
        )
    for key, verdict in summary.items():
        if key not in timed:
            rows.append([*key, verdict, "-", "-", "-", "-", "-", "-"])
    return _bench.markdown_table(headers, rows)


def save_chart(report: _bench.Report, path: Path) -> None:
    """Horizontal bars: speedup vs eager and vs compiled per case, log scale, 1x marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed; no chart (pip install matplotlib)")
        return
    timed = [r for r in report.cases if r.ours is not None]
    labels = [f"{r.case['device']} {r.case['label']} {r.case['shape']}" for r in timed]
    vs_eager = [r.speedup(r.eager) or 0.0 for r in timed]
    vs_compiled = [r.speedup(r.compiled) or 0.0 for r in timed]
    rows = range(len(timed))
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.45 * len(timed)))
    ax.barh([i - 0.2 for i in rows], vs_eager, height=0.4, label="vs eager")
    ax.barh([i + 0.2 for i in rows], vs_compiled, height=0.4, label="vs torch.compile")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(rows), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of torch_ext (baseline time / torch_ext time; > 1 is faster)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")


def failures(report: _bench.Report) -> list[str]:
    lines = [
        f"check failed: {c.device} {c.op} {c.what} {c.dtype} {c.inputs} "
        f"(error {c.max_abs_error:.3g} > {c.tolerance:.3g}) {c.note}"
        for c in report.failed_checks()
    ]
    lines += [
        f"case raised: {r.case['device']} {r.case['label']}: {r.error}"
        for r in report.cases
        if r.error
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    options = _bench.RunOptions(
        devices=_bench.available_devices(args.device, log),
        families=_bench.families(args.family),
        quick=args.quick,
        plan=PLANS[args.quick],
        compile_budget_s=0.0 if args.no_compile else 300.0,
    )
    log(
        f"torch_ext tour ({'quick' if args.quick else 'goal shapes'}): families "
        f"{[family.name for family in options.families]} on {[str(d) for d in options.devices]}"
    )
    report = _bench.run(options, log)
    args.out.mkdir(parents=True, exist_ok=True)
    data = report.to_json() | {"tour_seconds": time.perf_counter() - begin, "quick": args.quick}
    (args.out / "tour.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    save_chart(report, args.out / "tour.png")
    log(f"\n{_bench.machine_summary(report.machine)}\n\n{tour_table(report)}\n")
    problems = failures(report)
    for line in problems:
        log(line)
    log(
        f"tour took {time.perf_counter() - begin:.0f} s; "
        f"{'FAILED' if problems else 'all checks passed'}; results in {args.out}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
