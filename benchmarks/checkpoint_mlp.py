"""Gradient checkpointing benchmark: C++ torch_ext::checkpoint vs Python torch.utils.checkpoint.

    python benchmarks/checkpoint_mlp.py [--cpp-binary build-bench/benchmarks/cpp/checkpoint_mlp]
        [--steps 30] [--warmup 3] [--threads 2] [--blocks 32] [--width 1024] [--batch 64]
        [--no-build] [--out benchmarks/results/checkpoint_mlp.json]

The model: ``blocks`` residual blocks x + tanh(g) * sigmoid(g), g = GELU(Linear(width, width)(x)),
float32, CPU, batch ``batch``; one training step = zero the grads in place, forward, MSE loss,
backward.
Modes: plain; every block checkpointed in C++ (``torch_ext::checkpoint`` with
``options.parameters``, and ``torch_ext::nn::Checkpoint``: benchmarks/cpp/checkpoint_mlp.cpp);
every block checkpointed in Python (``torch_ext.checkpoint.checkpoint_wrapper``, non-reentrant
``torch.utils.checkpoint``).

Peak memory (bytes alive above the level before the forward, so parameters and their
preallocated gradients are excluded; activations, saved tensors, recomputation and transient
gradient buffers count):
  - C++: a counting CPU allocator installed with ``c10::SetCPUAllocator``;
  - Python: torch has no CPU allocator statistics, so the CPU allocator's own allocation and
    free events are recorded with ``torch.profiler.profile(profile_memory=True)`` over one step
    and summed in time order; the peak of that running sum is the peak. The same measurement
    of the plain model is compared with the C++ counter's plain figure as a cross-check.
Step time: median over interleaved steps (order rotated each round) in each process, measured
without the profiler. C++ and Python times come from different processes run one after the
other, so the ratio of each checkpointed mode to its own process's plain run is shown too.

A benchmark: nothing is asserted. The goals are printed with met / missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


class Block(nn.Module):
    """x + tanh(g) * sigmoid(g), g = GELU(Linear(width, width)(x)): BlockImpl in the C++ file.

    The residual keeps activations at unit scale (without it they decay into float32 denormals
    over 32 blocks and every step becomes several times slower)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        g = torch.nn.functional.gelu(self.linear(x))
        return x + torch.tanh(g) * torch.sigmoid(g)


def build_models(blocks: int, width: int):
    from torch_ext.checkpoint import checkpoint_wrapper

    torch.manual_seed(0)
    layers = [Block(width) for _ in range(blocks)]
    plain = nn.Sequential(*layers)
    ckpt = nn.Sequential(*[checkpoint_wrapper(layer) for layer in layers])  # same parameters
    return plain, ckpt


def train_step(model, data, target, params):
    for p in params:
        if p.grad is not None:
            p.grad.zero_()  # in place: the grads stay allocated (set_to_none would free them)
    loss = torch.nn.functional.mse_loss(model(data), target)
    loss.backward()


def profiled_peak(model, data, target, params) -> int:
    """Peak bytes alive above the level at the start of the forward, from profiler memory events."""
    from torch.profiler import ProfilerActivity, profile

    for p in params:
        if p.grad is not None:
            p.grad.zero_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = torch.nn.functional.mse_loss(model(data), target)
        loss.backward()
        del loss
    # CPU only here (the model lives on the CPU); each event is one allocation (+) or free (-).
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    alive = peak = 0
    for e in events:
        alive += e.nbytes()
        peak = max(peak, alive)
    return peak


def run_python(args) -> dict:
    torch.set_num_threads(args.threads)
    plain, ckpt = build_models(args.blocks, args.width)
    params = list(plain.parameters())
    torch.manual_seed(1)
    data = torch.randn(args.batch, args.width)
    target = torch.randn(args.batch, args.width)
    modes = {"plain": plain, "python_checkpoint": ckpt}
    for _ in range(max(1, args.warmup)):  # the first step allocates the grads
        for model in modes.values():
            train_step(model, data, target, params)
    grads = {}
    for name, model in modes.items():
        train_step(model, data, target, params)
        grads[name] = [p.grad.clone() for p in params]
    peaks = {name: profiled_peak(model, data, target, params) for name, model in modes.items()}
    times = {name: [] for name in modes}
    names = list(modes)
    for s in range(args.steps):
        for k in range(len(names)):
            name = names[(k + s) % len(names)]
            t0 = time.perf_counter()
            train_step(modes[name], data, target, params)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name in names:
        diff = max(
            (a - b).abs().max().item() for a, b in zip(grads[name], grads["plain"], strict=True)
        )
        ms = times[name]
        q = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
        out[name] = {
            "peak_bytes": peaks[name],
            "step_ms_median": statistics.median(ms),
            "step_ms_p10": q[0],
            "step_ms_p90": q[-1],
            "max_abs_grad_diff_vs_plain": diff,
            "step_ms": ms,
        }
    return {"threads": torch.get_num_threads(), "modes": out}


def find_build_dir(binary: Path) -> Path | None:
    for parent in binary.parents:
        if (parent / "build.ninja").exists():
            return parent
    return None


def run_cpp(args) -> tuple[dict | None, str]:
    binary = Path(args.cpp_binary)
    if not binary.is_absolute():
        binary = ROOT / binary
    build_dir = find_build_dir(binary)
    if not args.no_build and build_dir is not None:
        r = subprocess.run(
            ["ninja", "-C", str(build_dir), "-j1", "checkpoint_mlp"], capture_output=True, text=True
        )
        if r.returncode != 0:
            return None, f"build failed in {build_dir}:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
    if not binary.exists():
        return None, (
            f"{binary} not found: configure with -DTORCH_EXT_BUILD_BENCHMARKS=ON and "
            "build the checkpoint_mlp target (see the module docstring)"
        )
    json_path = ROOT / "benchmarks" / "results" / ".checkpoint_mlp_cpp.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(binary),
        "--blocks",
        str(args.blocks),
        "--width",
        str(args.width),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--json",
        str(json_path),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}"
    result = json.loads(json_path.read_text())
    json_path.unlink()
    return result, r.stdout


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpp-binary", default="build-bench/benchmarks/cpp/checkpoint_mlp")
    ap.add_argument("--no-build", action="store_true", help="do not run ninja for the binary")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/checkpoint_mlp.json")
    args = ap.parse_args()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.time()
    cpp, cpp_log = run_cpp(args)
    print(cpp_log.rstrip())
    py = run_python(args)
    act = args.batch * args.width * 4

    MB = 1e6
    plain_cpp = cpp["modes"]["plain"] if cpp else None
    plain_py = py["modes"]["plain"]
    rows = []  # name, peak bytes, peak ratio, ms, ms ratio (to own process's plain)

    def add(name, m, plain):
        rows.append(
            (
                name,
                m["peak_bytes"],
                m["peak_bytes"] / plain["peak_bytes"],
                m["step_ms_median"],
                m["step_ms_median"] / plain["step_ms_median"],
                m["step_ms_p10"],
                m["step_ms_p90"],
                m["max_abs_grad_diff_vs_plain"],
            )
        )

    if cpp:
        add("plain (C++)", plain_cpp, plain_cpp)
        add("C++ torch_ext::checkpoint", cpp["modes"]["cpp_checkpoint"], plain_cpp)
        add("C++ torch_ext::nn::Checkpoint", cpp["modes"]["cpp_nn_checkpoint"], plain_cpp)
    add("plain (Python)", plain_py, plain_py)
    add("Python checkpoint_wrapper", py["modes"]["python_checkpoint"], plain_py)

    print()
    print(
        f"{args.blocks} blocks x [x + tanh*sigmoid(GELU(Linear({args.width},{args.width})(x)))], "
        f"batch {args.batch}, float32, CPU, {py['threads']} threads, {args.steps} interleaved "
        f"steps per mode (+{args.warmup} warm-up); load average at start "
        f"{fmt(load, '.2f')}; one activation = {act / MB:.3f} MB"
    )
    print()
    print(
        "| mode | peak MB | peak / plain | step ms (median) | [p10, p90] | step / plain "
        "| max abs grad diff vs plain |"
    )
    print("|---|---:|---:|---:|---|---:|---:|")
    for name, peak, pr, ms, tr, p10, p90, diff in rows:
        print(
            f"| {name} | {peak / MB:.2f} | {pr:.3f} | {ms:.1f} | [{p10:.1f}, {p90:.1f}] "
            f"| {tr:.3f} | {diff:.2g} |"
        )
    print()
    print(
        "peak: bytes alive above the level before the forward (params and preallocated grads "
        "excluded). C++: counting CPU allocator (c10::SetCPUAllocator). Python: CPU "
        "allocator events from torch.profiler(profile_memory=True), summed in time order. "
        "step / plain: against the plain run of the same process."
    )

    goals = []
    if cpp:
        c = cpp["modes"]["cpp_checkpoint"]
        pm = c["peak_bytes"] / plain_cpp["peak_bytes"]
        tm = c["step_ms_median"] / plain_cpp["step_ms_median"]
        goals.append(("C++ checkpointed peak <= 1/3 of plain", pm <= 1 / 3, f"{pm:.3f}"))
        goals.append(("C++ checkpointed step time <= 1.4x plain", tm <= 1.4, f"{tm:.3f}x"))
        p = py["modes"]["python_checkpoint"]
        saving_cpp = plain_cpp["peak_bytes"] - c["peak_bytes"]
        saving_py = plain_py["peak_bytes"] - p["peak_bytes"]
        rel = abs(saving_py - saving_cpp) / saving_cpp
        goals.append(
            (
                "Python saving (plain - ckpt) within 10% of C++'s",
                rel <= 0.10,
                f"C++ {saving_cpp / MB:.2f} MB, Python {saving_py / MB:.2f} MB, "
                f"diff {rel * 100:.1f}%",
            )
        )
        tr = p["step_ms_median"] / c["step_ms_median"]
        rr = (p["step_ms_median"] / plain_py["step_ms_median"]) / tm
        goals.append(
            (
                "Python ckpt step time within 1.1x of C++ ckpt (absolute)",
                1 / 1.1 <= tr <= 1.1,
                f"Python / C++ = {tr:.3f}",
            )
        )
        goals.append(
            (
                "... same, each normalized by its own process's plain run",
                1 / 1.1 <= rr <= 1.1,
                f"{rr:.3f}",
            )
        )
        goals.append(
            (
                "cross-check: plain peak, Python profiler vs C++ counter",
                abs(plain_py["peak_bytes"] / plain_cpp["peak_bytes"] - 1) <= 0.05,
                f"{plain_py['peak_bytes'] / MB:.2f} vs {plain_cpp['peak_bytes'] / MB:.2f} MB",
            )
        )
    print()
    for text, ok, value in goals:
        print(f"- {'MET   ' if ok else 'MISSED'} {text}: {value}")

    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "config": vars(args),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "loadavg_at_start": load,
                "wall_s": time.time() - t0,
                "cpp": cpp,
                "cpp_error": None if cpp else cpp_log,
                "python": py,
                "goals": [{"goal": t, "met": ok, "value": v} for t, ok, v in goals],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
