"""Start a worker script once per rank on this machine, as torchrun would, and wait for all of them.

The test process sets only environment variables (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_*``), so it never
initialises a process group itself and Lightning in the workers does not launch processes of its own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    worker: Path, *args: str, world: int = 2, timeout: float, env: Mapping[str, str] | None = None
) -> list[str]:
    """Run ``python worker *args`` in ``world`` processes (cwd: the worker's folder); return each rank's output.

    ``env`` adds to this process's environment. Fails the test when a rank runs past ``timeout`` seconds (all are
    killed then) or exits non-zero (with the end of its output).
    """
    port = str(free_port())
    procs = []
    for rank in range(world):
        rank_env = {
            **os.environ,
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "PYTHONWARNINGS": "ignore",
            **(env or {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), *args],
                env=rank_env,
                cwd=worker.parent,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{worker.name} timed out after {timeout} s")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-5000:]}"
    return logs
