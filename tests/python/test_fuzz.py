"""Fuzz test: every op, raw and public, on random valid and invalid arguments, gives the correct
result or a clean error; never a crash, a wrong answer, an unclear error or a memory blow-up.

The cases are in fuzz_cases.py (a table; see its docstring). They run in worker processes,
``python fuzz_cases.py ID...``, a batch per worker, one JSON line back per finished case. When a
worker dies or goes silent, the case after its last line is charged with it: run again first in
a fresh worker, it is a crash (or hang) either way, and the detail says whether it also dies
alone or only after the cases before it. Workers run in parallel, one per core (at most two).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fuzz_cases import CASES, ERR, PASSING

WORKER = Path(__file__).with_name("fuzz_cases.py")
CASE_TIMEOUT_S = 15.0  # per case; the first also waits for the worker's imports (READY_TIMEOUT_S)
READY_TIMEOUT_S = 90.0
EXPECTED = {
    "ok": "the reference's result",
    "error": "a clean error naming the argument",
    "any": "the reference's result or a clean error",
    "safe": "any result or a clean error (no crash, no blow-up)",
}


def death_of(proc: subprocess.Popen) -> str:
    code = proc.returncode
    if code is not None and code < 0:
        return f"worker killed by {signal.Signals(-code).name}"
    return f"worker exited with code {code}"


def run_worker(ids: list[str], timeout: float) -> tuple[list[dict], str | None]:
    """Runs ids in order in one worker: (the records it finished, None or how it ended early)."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), *ids], stdout=subprocess.PIPE, stderr=stderr
        )
        records: list[dict] = []
        buffer, ready = b"", False
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while len(records) < len(ids):
                wait = deadline - time.monotonic()
                if wait <= 0 or not select.select([proc.stdout], [], [], wait)[0]:
                    proc.kill()
                    proc.wait()
                    return records, f"no result within {timeout:.0f} s (hang)"
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:  # the worker died
                    proc.wait()
                    stderr.seek(0)
                    tail = stderr.read().decode(errors="replace").strip()[-400:]
                    if not ready:
                        raise RuntimeError(f"fuzz worker failed to start: {tail}")
                    return records, f"{death_of(proc)}; stderr ends: {tail[-200:]!r}"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    record = json.loads(line)
                    ready = True
                    if "id" in record:
                        records.append(record)
                    deadline = time.monotonic() + timeout
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
        return records, None


def run_shard(ids: list[str], timeout: float) -> dict[str, dict]:
    results: dict[str, dict] = {}
    todo = list(ids)
    suspects: dict[str, str] = {}  # case -> how its worker ended when it ran after others
    while todo:
        records, death = run_worker(todo, timeout)
        for record in records:
            results[record["id"]] = record
        todo = todo[len(records) :]
        if not todo:
            break
        case_id = todo[0]
        if records and case_id not in suspects:  # maybe a victim of an earlier case: run it
            after = ", ".join(r["id"] for r in records[-3:])  # again, first in a fresh worker
            suspects[case_id] = f"{death}, after {after}"
            continue
        todo.pop(0)
        before = f"; earlier: {suspects.pop(case_id)}" if case_id in suspects else ""
        outcome = "hang" if "(hang)" in death else "crash"
        results[case_id] = {"id": case_id, "outcome": outcome, "detail": death + before}
    for case_id, death in suspects.items():  # died after other cases only, not alone
        alone = results[case_id]
        results[case_id] = {
            "id": case_id,
            "outcome": "crash",
            "detail": f"{death}; alone in a fresh worker: {alone['outcome']} {alone['detail']} "
            "(an earlier case may have corrupted memory)",
        }
    return results


def run_cases(ids: list[str], timeout: float = CASE_TIMEOUT_S, jobs: int | None = None) -> dict:
    jobs = jobs or max(1, min(2, os.cpu_count() or 1))
    cuda = [i for i in ids if i.endswith("@cuda")]
    cpu = [i for i in ids if not i.endswith("@cuda")]
    shards = [s for s in [cpu[j::jobs] for j in range(jobs)] + [cuda] if s]
    results: dict[str, dict] = {}
    with ThreadPoolExecutor(len(shards)) as pool:
        for shard_results in pool.map(lambda shard: run_shard(shard, timeout), shards):
            results.update(shard_results)
    return results


@pytest.fixture(scope="module")
def outcomes() -> dict[str, dict]:
    return run_cases(list(CASES))


@pytest.mark.parametrize("case_id", list(CASES))
def test_correct_result_or_clean_error(case_id, outcomes):
    case, record = CASES[case_id], outcomes[case_id]
    # The worker built its table from the same seed: it ran the very call described here.
    assert record.get("call", case.describe()) == case.describe(), record
    assert record["outcome"] in PASSING, (
        f"{case.describe()}\n  expected {EXPECTED[case.expect]}\n"
        f"  got {record['outcome']}: {record['detail']}"
    )


def test_every_op_has_valid_and_invalid_cases():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("torch_ext::")]
    missing = []
    for name in sorted(names):
        op = name.removeprefix("torch_ext::")
        packet, _, overload = op.partition(".")
        schema = getattr(getattr(torch.ops.torch_ext, packet), overload or "default")._schema
        kinds = {c.expect for c in CASES.values() if c.op.op == op}
        if "ok" not in kinds:
            missing.append(f"{op}: no valid case")
        if schema.arguments and ERR not in kinds:
            missing.append(f"{op}: no invalid case")
    assert len(names) >= 21, names
    assert not missing, missing


def test_the_runner_reports_crashes_blowups_and_hangs():
    ids = ["_harness/ok", "_harness/allocate-16GiB", "_harness/segfault", "_harness/hang"]
    results = run_cases(ids, timeout=3.0, jobs=1)
    assert {i: results[i]["outcome"] for i in ids} == {
        "_harness/ok": "ok",
        "_harness/allocate-16GiB": "memory",
        "_harness/segfault": "crash",
        "_harness/hang": "hang",
    }, results
    # SIGABRT under AddressSanitizer (scripts/sanitize.sh), which reports the fault and aborts.
    assert any(s in results["_harness/segfault"]["detail"] for s in ("SIGSEGV", "SIGABRT"))
