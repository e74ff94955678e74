"""Timing and bandwidth measurement: interleaved, warm, robust statistics.

Every measurement here follows the same rules (see DESIGN.md, Benchmarks):

- the op and its baselines are timed in one process, interleaved (A, B, C, A, B, C, ...) with the
  order rotated every round, so that drifts in clock speed or in the other load on the machine
  reach all of them alike;
- each function is warmed up before any sample counts;
- each sample times one call, or a small fixed batch of calls for a function too fast to time
  alone; the result is the per-call median over samples, with the 10th and 90th percentiles;
- on CUDA, timed regions are bracketed by synchronizations and timed with CUDA events.

Bandwidth convention: bytes read plus bytes written, for the op and for the copy alike. Copying
S bytes reads S and writes S, so the copy bandwidth is ``2 * S / time``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

COPY_BANDWIDTH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Stats:
    """Per-call time of one function, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    samples: int
    calls_per_sample: int


@dataclass(frozen=True)
class TimingPlan:
    """How long to spend on one set of interleaved functions."""

    budget_s: float = 2.0
    warmup_calls: int = 2  # untimed calls per function before the first sample
    min_samples: int = 5
    max_samples: int = 200
    min_sample_s: float = 1e-3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds for ``calls`` back-to-back calls of ``fn``, all work finished."""
    synchronize(device)
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - begin


def _warm_up(
    fns: Mapping[str, Callable[[], object]], device: torch.device, calls: int, budget_s: float
) -> dict:
    """Call each function ``calls`` times untimed (once when a call outlasts the budget), then
    once timed; return those seconds."""
    timed = {}
    for name, fn in fns.items():
        for _ in range(calls):
            if time_calls(fn, 1, device) > budget_s:
                break
        timed[name] = time_calls(fn, 1, device)
    return timed


def _summarize(per_call_s: list[float], calls_per_sample: int) -> Stats:
    ms = [t * 1e3 for t in per_call_s]
    if len(ms) >= 2:
        deciles = statistics.quantiles(ms, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    else:
        p10 = p90 = ms[0]
    return Stats(statistics.median(ms), p10, p90, len(ms), calls_per_sample)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], device: torch.device, plan: TimingPlan = TimingPlan()
) -> dict[str, Stats]:
    """Time several functions against each other, interleaved; per-call statistics by name."""
    first_call_s = _warm_up(fns, device, plan.warmup_calls, plan.budget_s)
    # Fast functions get a batch of calls per sample, so that a sample outlasts timer noise.
    calls = {
        name: min(100, max(1, math.ceil(plan.min_sample_s / max(seconds, 1e-7))))
        for name, seconds in first_call_s.items()
    }
    round_s = max(sum(first_call_s[name] * calls[name] for name in fns), 1e-6)
    # At least min_samples rounds; three (a median still) when one round outlasts the budget, as
    # for a baseline that falls back to a slow kernel on this machine.
    fewest = plan.min_samples if round_s <= plan.budget_s else min(plan.min_samples, 3)
    rounds = int(min(plan.max_samples, max(fewest, plan.budget_s // round_s)))
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_calls(fns[name], calls[name], device) / calls[name])
    return {name: _summarize(samples[name], calls[name]) for name in names}


def forward_step(fn: Callable[..., torch.Tensor], inputs: tuple) -> Callable[[], object]:
    """A call of ``fn(*inputs)`` without autograd recording."""

    def step() -> object:
        with torch.no_grad():
            return fn(*inputs)

    return step


def forward_backward_step(
    fn: Callable[..., torch.Tensor], inputs: tuple, grad_output: torch.Tensor
) -> Callable[[], object]:
    """Forward and backward of ``fn(*inputs)`` with a fixed grad_output.

    Gradients go to the inputs that require grad; they are reset to None before each call, so
    that every call writes them anew instead of accumulating into the last ones.
    """
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step() -> object:
        for leaf in leaves:
            leaf.grad = None
        fn(*inputs).backward(grad_output)
        return leaves[0].grad

    return step


def measure_copy_bandwidth(device: torch.device, nbytes: int = COPY_BANDWIDTH_BYTES) -> dict:
    """The machine's copy bandwidth: ``dst.copy_(src)`` into a preallocated float32 tensor.

    Counts read plus written bytes (``2 * nbytes`` per copy). A preallocated destination keeps
    page faults out of the time (``clone()`` pays them and reads several times lower).
    """
    src = torch.rand(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    plan = TimingPlan(budget_s=1.0, warmup_calls=2, min_samples=5, max_samples=20)
    stats = time_interleaved({"copy": lambda: dst.copy_(src)}, device, plan)["copy"]
    moved = 2 * src.numel() * src.element_size()
    return {
        "bytes_per_copy_read_plus_written": moved,
        "median_ms": stats.median_ms,
        "p10_ms": stats.p10_ms,
        "p90_ms": stats.p90_ms,
        "gbps": moved / (stats.median_ms * 1e-3) / 1e9,
        "threads": torch.get_num_threads(),
    }
