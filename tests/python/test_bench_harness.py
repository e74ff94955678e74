"""The benchmark harness (torch_ext/_bench): input sets rotated past a cache, so that a small
op is not timed at cache speed on a GPU, and the tour's kernel driver for Nsight Compute."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch

from torch_ext import _bench
from torch_ext._bench.registry import Case


def make_case(nbytes: int, backward: bool = False) -> tuple[Case, list]:
    """A case whose inputs are one float32 tensor of `nbytes` bytes; `made` records each input
    set make_inputs returns."""
    made = []

    def make_inputs():
        x = torch.randn(nbytes // 4, requires_grad=backward)
        made.append(x)
        return (x,)

    case = Case(
        family="test",
        op="double",
        label="double",
        device="cpu",
        shape=str(nbytes // 4),
        dtype="float32",
        layout="contiguous",
        backward=backward,
        make_inputs=make_inputs,
        ours=lambda x: x * 2,
        reference=lambda x: x + x,
    )
    return case, made


def test_no_cache_or_large_inputs_keep_one_set():
    case, made = make_case(4096)
    inputs = case.make_inputs()
    assert _bench.input_sets(case, inputs, cache_bytes=0) == [inputs]
    assert _bench.input_sets(case, inputs, cache_bytes=2048) == [inputs]  # 4 KiB >= 2 x 2 KiB
    assert len(made) == 1
    assert _bench.l2_bytes(torch.device("cpu")) == 0


def test_small_inputs_get_enough_sets_to_pass_twice_the_cache():
    case, made = make_case(4096)
    inputs = case.make_inputs()
    sets = _bench.input_sets(case, inputs, cache_bytes=10_000)  # 2 x 10 kB / 4 KiB -> 5 sets
    assert len(sets) == 5 and sets[0] is inputs
    assert len({id(s[0]) for s in sets}) == 5 and len(made) == 5
    capped = _bench.input_sets(case, inputs, cache_bytes=10**9)
    assert len(capped) == _bench.MAX_INPUT_SETS


def test_rotating_steps_visit_the_sets_in_turn():
    case, _ = make_case(16)
    sets = [case.make_inputs() for _ in range(3)]
    seen = []
    step = _bench.rotating_step_maker(case, sets)(lambda x: seen.append(x) or x * 2)
    for _ in range(7):
        step()
    order = [next(i for i, s in enumerate(sets) if s[0] is x) for x in seen]
    assert order == [0, 1, 2, 0, 1, 2, 0]


def test_rotating_backward_steps_write_each_sets_gradient():
    case, _ = make_case(16, backward=True)
    sets = [case.make_inputs() for _ in range(2)]
    step = _bench.rotating_step_maker(case, sets)(case.ours)
    step()
    step()
    for (x,) in sets:
        assert x.grad is not None and x.grad.shape == x.shape


def test_gpu_kernel_driver_lists_and_runs_the_registry_cases(capsys):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels", path)
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    assert driver.main(["--device", "cpu", "--quick", "--family", "spp", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    expected = [c for c in _bench.families(["spp"])[0].cases(torch.device("cpu"), True)]
    assert f"gpu_kernels: {len(expected)} cases run on cpu" in out
    assert all(case.label in out for case in expected)


def test_calls_longer_than_the_budget_get_one_warm_up_and_three_samples():
    """A function slower than the whole budget: one untimed call, one timed, then three samples
    (not min_samples); a fast one still gets the warm-up calls and min_samples asked for."""
    from torch_ext._bench.timing import TimingPlan, time_interleaved

    counts = {"slow": 0, "fast": 0}

    def slow():
        counts["slow"] += 1
        time.sleep(0.02)

    def fast():
        counts["fast"] += 1

    plan = TimingPlan(budget_s=0.01, warmup_calls=2, min_samples=5, max_samples=50)
    stats = time_interleaved({"slow": slow}, torch.device("cpu"), plan)
    assert counts["slow"] == 1 + 1 + 3 and stats["slow"].samples == 3
    assert stats["slow"].median_ms >= 20
    plan = TimingPlan(budget_s=1.0, warmup_calls=2, min_samples=5, max_samples=5)
    stats = time_interleaved({"fast": fast}, torch.device("cpu"), plan)
    assert stats["fast"].samples == 5
    calls = stats["fast"].calls_per_sample
    assert counts["fast"] == 2 + 1 + 5 * calls
