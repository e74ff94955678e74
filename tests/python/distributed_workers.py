"""Runs a test file's own worker entry point in several processes, for tests with a process
group (gloo on CPU): bounded in time, every process killed on the way out."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch


def run_workers(
    script: str, tmp_path: Path, world: int, timeout_s: float, extra_args: tuple[str, ...] = ()
) -> list:
    """Starts ``python script --ddp-worker RANK WORLD INIT_FILE OUT_FILE *extra_args`` for every
    rank (a ``file://`` rendezvous in tmp_path), waits at most timeout_s for all of them, and
    returns what each saved to its OUT_FILE with torch.save."""
    env = dict(os.environ)
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no dependence on the host name resolving
    init_file = tmp_path / "init"
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(world)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                script,
                "--ddp-worker",
                str(rank),
                str(world),
                str(init_file),
                str(outs[rank]),
                *extra_args,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(world)
    ]
    logs = []
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed workers did not finish within {timeout_s} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{logs[rank][-3000:]}"
    return [torch.load(out) for out in outs]


def init_process_group(rank: int, world: int, init_file: str, timeout_s: float) -> None:
    """A worker's gloo process group through the run's ``file://`` rendezvous."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
