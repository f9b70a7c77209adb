"""Start N ranks of a worker script as separate processes (the env a launcher would set), with a timeout.

``from tests.helpers import ranks``; not collected by pytest (no ``test_`` prefix).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: List[str], world_size: int, log_dir: Path, timeout_s: float = 120.0,
           plain: bool = False) -> None:
    """Run ``world_size`` ranks; raise with the ranks' log tails when one fails or time runs out.

    ``plain`` starts one process with no launcher variables at all (``python script``), so the
    trainer has to create its own process group.
    """
    if plain and world_size != 1:
        raise ValueError("a plain launch is a single process")
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        if not plain:
            env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(log_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=str(ROOT)))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if any(c != 0 for c in codes):
        tails = "\n".join(
            f"--- rank {r} (exit {c}) ---\n" + (log_dir / f"rank{r}.log").read_text()[-3000:]
            for r, c in enumerate(codes)
        )
        raise RuntimeError(f"distributed worker failed or timed out after {timeout_s} s:\n{tails}")
