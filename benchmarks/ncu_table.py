"""The short table of an Nsight Compute run over our kernels (scripts/gpu_check.sh): one row per
kernel, with its launches, median duration, SM and DRAM throughput (% of peak), achieved
occupancy and registers per thread.

    python benchmarks/ncu_table.py OUT/ncu.csv [--json OUT/ncu.json]

The input is ``ncu --csv --page raw --metrics <METRICS> --log-file OUT/ncu.csv``: a header row
(ID, ..., Kernel Name, ..., one column per metric), possibly a row of units, then one row per
profiled launch; any other line (``==PROF==`` messages) is ignored.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import statistics
import sys
from pathlib import Path

# The metrics gpu_check.sh asks ncu for, and their column in the table.
METRICS = {
    "gpu__time_duration.sum": "duration us",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM %",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM %",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy %",
    "launch__registers_per_thread": "registers",
}
NAME_COLUMNS = ("Kernel Name", "Function Name", "Name")
TO_MICROSECONDS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3,
                   "ms": 1e3, "second": 1e6, "s": 1e6}  # fmt: skip


def short_name(name: str) -> str:
    """A demangled kernel name without namespaces and parameter list, templates kept:
    ``torch_ext::spp_impl::(anonymous namespace)::spp_kernel<float>(...)`` -> ``spp_kernel<float>``.
    """
    name = name.strip()
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
            break
    name = name[:cut]
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    head, bracket, tail = name.partition("<")
    return head.rsplit("::", 1)[-1] + bracket + tail


def number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_rows(text: str) -> list[dict[str, float | str]]:
    """The launches: {"kernel": short name, <metric>: value in the table's unit}."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    if not lines:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    header = rows[0]
    name_column = next((header.index(c) for c in NAME_COLUMNS if c in header), None)
    if name_column is None:
        raise ValueError(f"no kernel name column in the ncu header: {header}")
    units: dict[str, str] = {}
    body = rows[1:]
    if body and not body[0][name_column].strip():  # the units row
        units = dict(zip(header, body[0], strict=False))
        body = body[1:]
    launches = []
    for row in body:
        values = dict(zip(header, row, strict=False))
        launch: dict[str, float | str] = {"kernel": short_name(values[header[name_column]])}
        for metric, column in METRICS.items():
            value = number(values.get(metric, ""))
            if value is None:
                continue
            if metric == "gpu__time_duration.sum":
                value *= TO_MICROSECONDS.get(units.get(metric, "nsecond"), 1e-3)
            launch[column] = value
        launches.append(launch)
    return launches


def summarize(launches: list[dict]) -> list[dict]:
    """One row per kernel (first-launch order): launches and the median of each metric."""
    kernels: dict[str, list[dict]] = {}
    for launch in launches:
        kernels.setdefault(launch["kernel"], []).append(launch)
    table = []
    for kernel, runs in kernels.items():
        row: dict[str, float | str | int] = {"kernel": kernel, "launches": len(runs)}
        for column in METRICS.values():
            values = [r[column] for r in runs if column in r]
            if values:
                row[column] = statistics.median(values)
        table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    columns = ["kernel", "launches", *METRICS.values()]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = []
        for column in columns:
            value = row.get(column, "-")
            if isinstance(value, float):
                value = f"{value:.1f}" if column != "registers" else f"{value:.0f}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    table = summarize(read_rows(args.csv.read_text(errors="replace")))
    if not table:
        print(f"ncu_table: no profiled launches in {args.csv}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
