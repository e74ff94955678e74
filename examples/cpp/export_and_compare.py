"""Exports a model containing torch_ext ops from Python, runs it with the C++ runner
(run_exported: AOTInductor and TorchScript) and compares the outputs with Python's; checks the
runner's errors; with --latency, times batch 1 at 512x512 in Python eager and in the runner.

    python export_and_compare.py --runner BUILD/run_exported --work DIR [--latency]

Needs torch_ext importable (installed, or PYTHONPATH=repo with TORCH_EXT_LIBRARY set). Exits
non-zero on any mismatch or unexpected runner behaviour.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import torch_ext


class SegNet(nn.Module):
    """Dilated stem, depthwise dilated block, ASPP head and an SPP-gated classifier."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = torch_ext.nn.DilatedConv2d(3, 16, 3, stride=2, padding=1, activation="relu")
        self.depthwise = torch_ext.nn.DilatedConv2d(
            16, 16, 3, padding=2, dilation=2, groups=16, activation="silu"
        )
        self.aspp = torch_ext.nn.ASPP(16, 16, rates=(2, 4, 6), dropout=0.0)
        self.classifier = torch_ext.nn.DilatedConv2d(16, classes, 1)
        self.gate = nn.Linear(16 * 21, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.depthwise(self.stem(x))
        gate = torch.sigmoid(self.gate(torch_ext.spp(features, (1, 2, 4))))
        scores = self.classifier(self.aspp(features)) * gate[:, :, None, None]
        return nn.functional.interpolate(scores, size=x.shape[-2:], mode="bilinear")


def run_runner(runner: Path, model: Path, x: torch.Tensor, work: Path, repeat: int = 0):
    inp, out = work / "input.pt", work / f"output-{model.stem}.pt"
    torch.save(x, inp)
    args = [str(runner), str(model), str(inp), str(out)]
    if repeat:
        args += ["--repeat", str(repeat)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    return done, (torch.load(out) if done.returncode == 0 else None)


def expect(condition: bool, message: str) -> None:
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {message}")


def export_all(model: nn.Module, x: torch.Tensor, work: Path, tag: str) -> dict[str, Path]:
    paths = {"torchscript": work / f"{tag}.ts", "aoti": work / f"{tag}.pt2"}
    with torch.no_grad():
        torch.jit.trace(model, x).save(str(paths["torchscript"]))
        program = torch.export.export(model, (x,))
        begin = time.perf_counter()
        torch._inductor.aoti_compile_and_package(program, package_path=str(paths["aoti"]))
    print(f"AOTInductor compile of {tag}: {time.perf_counter() - begin:.1f} s")
    return paths


def check_outputs(runner: Path, work: Path) -> None:
    torch.manual_seed(0)
    model = SegNet().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    for kind, path in export_all(model, x, work, "segnet").items():
        done, got = run_runner(runner, path, x, work)
        expect(done.returncode == 0, f"{kind} runner exits 0 ({done.stderr.strip()[-300:]})")
        error = (got - expected).abs().max().item()
        expect(error <= 1e-4, f"{kind} output matches Python (max abs error {error:.2e})")


class NeedsMissingOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.torch_ext_example_missing.twice(x) + 1


def check_errors(runner: Path, work: Path) -> None:
    x = torch.randn(2, 3)
    done, _ = run_runner(runner, work / "no-such-model.pt2", x, work)
    expect(
        done.returncode == 2 and "not found" in done.stderr,
        f"a missing model file is a clear error (status {done.returncode}: {done.stderr.strip()})",
    )
    # An op that exists in this Python process only: the C++ runner cannot know it.
    library = torch.library.Library("torch_ext_example_missing", "DEF")
    library.define("twice(Tensor x) -> Tensor")
    library.impl("twice", lambda t: t * 2, "CPU")
    path = work / "needs-missing-op.ts"
    torch.jit.trace(NeedsMissingOp(), x).save(str(path))
    done, _ = run_runner(runner, path, x, work)
    expect(
        done.returncode == 3 and "operator" in done.stderr and "twice" in done.stderr,
        f"a model needing an unknown op is a clear error (status {done.returncode}: "
        f"{done.stderr.strip()[:200]})",
    )


def latency(runner: Path, work: Path, repeat: int) -> dict:
    """Median latencies: Python eager (timed in blocks before, between and after the runner's
    runs, so that drifts of the machine hit both sides) and the C++ runner per format."""
    torch.manual_seed(0)
    model = SegNet().eval()
    x = torch.randn(1, 3, 512, 512)
    eager: list[float] = []

    def time_eager() -> None:
        with torch.no_grad():
            model(x)
            for _ in range(repeat):
                begin = time.perf_counter()
                model(x)
                eager.append((time.perf_counter() - begin) * 1e3)

    result: dict = {"threads": torch.get_num_threads()}
    for kind, path in export_all(model, x, work, "segnet512").items():
        time_eager()
        done, _ = run_runner(runner, path, x, work, repeat=repeat)
        expect(done.returncode == 0, f"{kind} runner at 512x512 ({done.stderr.strip()[-300:]})")
        line = next(line for line in done.stdout.splitlines() if line.startswith("latency_ms"))
        result[f"cpp_{kind}_ms"] = float(line.split()[1])
    time_eager()
    result["python_eager_ms"] = statistics.median(eager)
    for kind in ("torchscript", "aoti"):
        result[f"cpp_{kind}_vs_python"] = result[f"cpp_{kind}_ms"] / result["python_eager_ms"]
    print(json.dumps(result, indent=2))
    (work / "latency.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runner", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--latency", action="store_true", help="time batch 1 at 512x512")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    check_outputs(args.runner, args.work)
    check_errors(args.runner, args.work)
    if args.latency:
        latency(args.runner, args.work, args.repeat)


if __name__ == "__main__":
    main()
