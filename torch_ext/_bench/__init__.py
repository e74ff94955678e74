"""Checks and benchmarks of torch_ext's op families, shared by the tour (``python -m torch_ext``)
and ``benchmarks/run.py``.

Each family lives in ``torch_ext/_bench/by_family/<family>.py`` and registers itself on import
(see ``registry.py``); every module of that package is imported here, so adding a family adds
that file and nothing else.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import pkgutil
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

import torch_ext
from torch_ext._bench import by_family
from torch_ext._bench.registry import Case, CheckResult, Family, families
from torch_ext._bench.timing import (
    Stats,
    TimingPlan,
    forward_backward_step,
    forward_step,
    measure_copy_bandwidth,
    synchronize,
    time_interleaved,
)


def _load_families() -> None:
    """Imports every module of ``torch_ext._bench.by_family`` (each registers its family)."""
    for module in sorted(pkgutil.iter_modules(by_family.__path__), key=lambda m: m.name):
        importlib.import_module(f"{by_family.__name__}.{module.name}")


_load_families()

__all__ = [
    "CaseResult",
    "Report",
    "RunOptions",
    "available_devices",
    "bench_table",
    "families",
    "machine_summary",
    "markdown_table",
    "run",
]

Log = Callable[[str], None]

BANDWIDTH_CONVENTION = (
    "bytes read + bytes written, for the op and for the copy alike (a copy of S bytes moves 2*S);"
    " fractions are of the copy bandwidth dst.copy_(src) of a preallocated 256 MiB float32 tensor"
)


@dataclass
class CompileBudget:
    """Seconds that torch.compile of the baselines may take in one run, all cases together."""

    limit_s: float
    spent_s: float = 0.0

    def refusal(self) -> str | None:
        """Why no more baselines are compiled, or None while the budget allows."""
        if self.limit_s <= 0:
            return "compile disabled"
        if self.spent_s >= self.limit_s:
            return f"compile budget of {self.limit_s:.0f} s used up"
        return None


@dataclass
class CaseResult:
    """Timings of one case; speedups are baseline time / our time (> 1: torch_ext is faster)."""

    case: dict
    threads: int
    copy_gbps: float
    ours: Stats | None = None
    eager: Stats | None = None
    compiled: Stats | None = None
    compiled_note: str = ""
    read_bytes: int | None = None
    written_bytes: int | None = None
    error: str | None = None
    peer: Stats | None = None  # the case's peer library, where it has one
    peer_name: str = ""
    peer_note: str = ""
    input_sets: int = 1  # input sets the timed calls cycled through (GPU: past the L2)

    def speedup(self, baseline: Stats | None) -> float | None:
        if baseline is None or self.ours is None:
            return None
        return baseline.median_ms / self.ours.median_ms

    def bandwidth_fraction(self, read_only: bool = False) -> float | None:
        """Achieved (read [+ written]) bytes per second over the copy bandwidth."""
        if self.read_bytes is None or self.ours is None:
            return None
        moved = self.read_bytes if read_only else self.read_bytes + self.written_bytes
        return moved / (self.ours.median_ms * 1e-3) / (self.copy_gbps * 1e9)

    def to_json(self) -> dict:
        data = asdict(self)
        data["speedup_vs_eager"] = self.speedup(self.eager)
        data["speedup_vs_compiled"] = self.speedup(self.compiled)
        data["speedup_vs_peer"] = self.speedup(self.peer)
        data["bandwidth_fraction"] = self.bandwidth_fraction()
        data["read_bandwidth_fraction"] = self.bandwidth_fraction(read_only=True)
        return data


@dataclass
class Report:
    """Everything one run measured."""

    machine: dict
    checks: list[CheckResult] = field(default_factory=list)
    cases: list[CaseResult] = field(default_factory=list)

    def failed_checks(self) -> list[CheckResult]:
        return [check for check in self.checks if not check.passed]

    def to_json(self) -> dict:
        return {
            "machine": self.machine,
            "checks": [asdict(check) for check in self.checks],
            "cases": [case.to_json() for case in self.cases],
        }


# ---------------------------------------------------------------------------------------------
# Running


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _step_maker(case: Case, inputs: tuple) -> Callable:
    """fn -> a no-argument call of the case's pass (forward, or forward+backward) through fn."""
    if not case.backward:
        return lambda fn: forward_step(fn, inputs)
    with torch.no_grad():
        grad_output = torch.randn_like(case.ours(*inputs))
    return lambda fn: forward_backward_step(fn, inputs, grad_output)


# Input sets a GPU case cycles through: enough that they overflow the L2 twice over, at most this
# many (a small op's inputs would otherwise stay in the 50-60 MB L2 of an H100/H200 between calls
# and be timed at cache speed, which no model sees).
MAX_INPUT_SETS = 64


def l2_bytes(device: torch.device) -> int:
    """The device's last-level cache the inputs should not fit in: the L2 of a GPU; 0 on the CPU
    (its timings keep one input set, as the tour always has)."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))


def input_sets(case: Case, inputs: tuple, cache_bytes: int) -> list[tuple]:
    """``inputs`` and as many fresh sets from ``case.make_inputs`` as it takes for all of them
    to exceed twice ``cache_bytes`` (none when ``cache_bytes`` is 0 or one set already does)."""
    nbytes = sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))
    if cache_bytes <= 0 or nbytes == 0 or nbytes >= 2 * cache_bytes:
        return [inputs]
    count = min(MAX_INPUT_SETS, math.ceil(2 * cache_bytes / nbytes))
    return [inputs] + [case.make_inputs() for _ in range(count - 1)]


def rotating_step_maker(case: Case, sets: list[tuple]) -> Callable:
    """fn -> a no-argument call that runs the case's pass on the next input set in turn."""
    makers = [_step_maker(case, inputs) for inputs in sets]
    if len(makers) == 1:
        return makers[0]

    def make_step(fn: Callable) -> Callable[[], object]:
        steps = [make(fn) for make in makers]
        turn = itertools.count()
        return lambda: steps[next(turn) % len(steps)]()

    return make_step


def _compile_baseline(case: Case, make_step: Callable, budget: CompileBudget):
    """(the compiled baseline's step, already compiled and run once, or None; a note)."""
    if not case.compile_reference:
        return None, "n/a: not compiled for this case"
    refusal = budget.refusal()
    if refusal:
        return None, f"n/a: {refusal}"
    torch._dynamo.reset()  # each case compiles afresh, far from dynamo's recompile limit
    begin = time.perf_counter()
    try:
        step = make_step(torch.compile(case.reference, dynamic=False))
        step()
        synchronize(torch.device(case.device))
    except Exception as error:  # noqa: BLE001  (a baseline that fails to compile is a result)
        return None, f"n/a: {_one_line(error)}"
    finally:
        elapsed = time.perf_counter() - begin
        budget.spent_s += elapsed
    return step, f"compiled in {elapsed:.1f} s"


def _identity(case: Case) -> dict:
    keys = ("family", "op", "label", "device", "shape", "dtype", "layout", "direction")
    return {key: getattr(case, key) for key in keys}


def run_case(case: Case, copy_gbps: float, plan: TimingPlan, budget: CompileBudget) -> CaseResult:
    """Time our op, the eager and compiled compositions and the peer library, interleaved."""
    result = CaseResult(_identity(case), torch.get_num_threads(), copy_gbps)
    result.peer_name, result.peer_note = case.peer_name, case.peer_note
    torch.manual_seed(0)
    try:
        inputs = case.make_inputs()
        sets = input_sets(case, inputs, l2_bytes(torch.device(case.device)))
        result.input_sets = len(sets)
        make_step = rotating_step_maker(case, sets)
        steps = {"ours": make_step(case.ours), "eager": make_step(case.reference)}
        compiled_step, result.compiled_note = _compile_baseline(case, make_step, budget)
        if compiled_step is not None:
            steps["compiled"] = compiled_step
        if case.peer is not None:
            steps["peer"] = make_step(case.peer)
        stats = time_interleaved(steps, torch.device(case.device), plan)
        result.ours, result.eager = stats["ours"], stats["eager"]
        result.compiled, result.peer = stats.get("compiled"), stats.get("peer")
        if case.traffic is not None:
            result.read_bytes, result.written_bytes = case.traffic(inputs)
    except Exception as error:  # noqa: BLE001  (report the case as failed, run the others)
        result.error = _one_line(error)
    finally:
        torch._dynamo.reset()
    return result


def run_checks(family: Family, device: torch.device, quick: bool) -> list[CheckResult]:
    """The family's checks; an exception becomes one failed check instead of a crash."""
    try:
        return family.checks(device, quick)
    except Exception as error:  # noqa: BLE001  (one failed check instead of a crash)
        failure = CheckResult(
            family=family.name,
            op="(checks)",
            device=str(device),
            dtype="-",
            what="checks ran",
            inputs="-",
            max_abs_error=math.nan,
            tolerance=0.0,
            passed=False,
            note=_one_line(error),
        )
        return [failure]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torch_ext": torch_ext.build_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
        "bandwidth_convention": BANDWIDTH_CONVENTION,
        "devices": {},
    }


def machine_summary(machine: dict) -> str:
    """Markdown lines naming the machine, threads, load and each device's copy bandwidth."""
    lines = [
        (
            f"- CPU: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), "
            f"torch threads: {machine['threads']}, load average at start: "
            f"{machine['load_average_at_start'][0]:.2f}"
        ),
        (
            f"- torch {machine['torch']}, torch_ext {machine['torch_ext']['version']} "
            f"(backends {', '.join(machine['torch_ext']['backends'])}), "
            f"Python {machine['python']}"
        ),
    ]
    for device, info in machine["devices"].items():
        end = info.get("copy_bandwidth_at_end", {}).get("gbps", math.nan)
        lines.append(
            f"- {device} ({info['name']}): copy bandwidth {info['copy_bandwidth']['gbps']:.1f} GB/s"
            f" (again at the end: {end:.1f} GB/s)"
        )
    lines.append(f"- bandwidth convention: {machine['bandwidth_convention']}")
    lines.append(
        "- times: median ms over interleaved samples, [p10-p90]; speedup = baseline "
        "time / torch_ext time (> 1: torch_ext is faster)"
    )
    return "\n".join(lines)


def available_devices(requested: str, log: Log) -> list[torch.device]:
    """'cpu', 'cuda' or 'all' -> devices to run on; 'all' takes CUDA only where it works."""
    cuda_ready = torch.cuda.is_available() and "CUDA" in torch_ext.compiled_backends()
    if requested == "cuda" and not cuda_ready:
        raise SystemExit("CUDA requested, but torch sees no GPU or torch_ext has no CUDA kernels")
    if requested == "all" and not cuda_ready:
        log("note: CUDA skipped (no GPU visible to torch, or torch_ext built without CUDA)")
    devices = [torch.device("cpu")] if requested in ("cpu", "all") else []
    return devices + ([torch.device("cuda")] if requested != "cpu" and cuda_ready else [])


@dataclass(frozen=True)
class RunOptions:
    devices: list[torch.device]
    families: list[Family]
    quick: bool = False
    with_checks: bool = True
    plan: TimingPlan = field(default_factory=TimingPlan)
    compile_budget_s: float = 300.0


def _run_family(
    family: Family,
    device: torch.device,
    options: RunOptions,
    report: Report,
    budget: CompileBudget,
    log: Log,
) -> None:
    if options.with_checks:
        checks = run_checks(family, device, options.quick)
        report.checks += checks
        failed = [check for check in checks if not check.passed]
        worst = max((check.max_abs_error for check in checks), default=0.0)
        log(
            f"[{device}] {family.name}: {len(checks) - len(failed)}/{len(checks)} checks passed"
            f" (max abs error {worst:.2g})"
        )
        for check in failed:
            log(
                f"  FAILED {check.op} {check.what} {check.dtype} {check.inputs}: "
                f"error {check.max_abs_error:.3g} > {check.tolerance:.3g} {check.note}"
            )
    copy_gbps = report.machine["devices"][str(device)]["copy_bandwidth"]["gbps"]
    for case in family.cases(device, options.quick):
        log(f"[{device}] {family.name}: timing {case.label} {case.shape} ...")
        result = run_case(case, copy_gbps, options.plan, budget)
        report.cases.append(result)
        log("    " + describe_result(result))


def run(options: RunOptions, log: Log) -> Report:
    """Checks (optionally) and benchmark cases of the families, device by device."""
    report = Report(machine_info())
    load = report.machine["load_average_at_start"][0]
    if load > 0.5:
        log(f"note: load average {load:.2f} before starting; other work may disturb timings")
    budget = CompileBudget(options.compile_budget_s)
    for device in options.devices:
        log(f"[{device}] measuring copy bandwidth (dst.copy_(src), 256 MiB float32) ...")
        copy = measure_copy_bandwidth(device)
        report.machine["devices"][str(device)] = {
            "name": device_name(device),
            "copy_bandwidth": copy,
        }
        log(
            f"[{device}] copy bandwidth {copy['gbps']:.1f} GB/s (read+write), "
            f"{copy['threads']} threads"
        )
        for family in options.families:
            _run_family(family, device, options, report, budget, log)
        _remeasure_copy_bandwidth(device, report, log)
    return report


def _remeasure_copy_bandwidth(device: torch.device, report: Report, log: Log) -> None:
    """Measure the copy again after the cases; a drift means the run was disturbed."""
    info = report.machine["devices"][str(device)]
    end = measure_copy_bandwidth(device)
    info["copy_bandwidth_at_end"] = end
    start_gbps, end_gbps = info["copy_bandwidth"]["gbps"], end["gbps"]
    if not 0.8 <= end_gbps / start_gbps <= 1.25:
        log(
            f"note: [{device}] copy bandwidth moved from {start_gbps:.1f} to {end_gbps:.1f} GB/s"
            " during the run (fractions use the first); the machine was likely disturbed"
        )


# ---------------------------------------------------------------------------------------------
# Formatting


def fmt_ms(stats: Stats | None) -> str:
    if stats is None:
        return "n/a"
    return f"{stats.median_ms:.2f} [{stats.p10_ms:.2f}-{stats.p90_ms:.2f}]"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def fmt_fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def describe_result(result: CaseResult) -> str:
    if result.error:
        return f"ERROR {result.error}"
    compiled = fmt_ms(result.compiled) if result.compiled else result.compiled_note
    peer = ""
    if result.peer_name:
        peer_ms = fmt_ms(result.peer) if result.peer else result.peer_note or "n/a"
        peer = (
            f"; {result.peer_name} {peer_ms} ms, "
            f"vs {result.peer_name} {fmt_ratio(result.speedup(result.peer))}"
        )
    return (
        f"ours {fmt_ms(result.ours)} ms, eager {fmt_ms(result.eager)} ms, "
        f"compiled {compiled}; vs eager {fmt_ratio(result.speedup(result.eager))}, "
        f"vs compiled {fmt_ratio(result.speedup(result.compiled))}, "
        f"bandwidth {fmt_fraction(result.bandwidth_fraction())} of copy{peer}"
    )


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def bench_table(results: list[CaseResult]) -> str:
    """One row per case: median ms [p10-p90], speedups, bandwidth fractions; a peer library's
    time and speedup too when some case has a peer."""
    with_peer = any(r.peer_name for r in results)
    headers = [
        "case",
        "device",
        "shape",
        "dtype",
        "threads",
        "ours ms",
        "eager ms",
        "compiled ms",
        "vs eager",
        "vs compiled",
        "bw frac (r+w)",
        "read frac",
    ]
    if with_peer:
        headers += ["peer", "peer ms", "vs peer"]
    rows = []
    for r in results:
        compiled = fmt_ms(r.compiled) if r.compiled else (r.compiled_note or "n/a")
        peer = []
        if with_peer:
            peer_ms = fmt_ms(r.peer) if r.peer else (r.peer_note or "n/a")
            peer = [
                r.peer_name or "-",
                peer_ms if r.peer_name else "-",
                fmt_ratio(r.speedup(r.peer)),
            ]
        rows.append(
            [
                r.case["label"],
                r.case["device"],
                r.case["shape"],
                r.case["dtype"],
                str(r.threads),
                "ERROR " + r.error if r.error else fmt_ms(r.ours),
                fmt_ms(r.eager),
                compiled,
                fmt_ratio(r.speedup(r.eager)),
                fmt_ratio(r.speedup(r.compiled)),
                fmt_fraction(r.bandwidth_fraction()),
                fmt_fraction(r.bandwidth_fraction(read_only=True)),
                *peer,
            ]
        )
    return markdown_table(headers, rows)
