"""Starting two CPU processes with torchrun, as the data-parallel equivalence tests do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: What a parent torchrun (or a test run under one) may have set; each launch starts clean.
_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")


def torchrun(
    args: list[str], timeout: float = 240, threads: int | None = 1
) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`` from the repository
    root, each process with ``threads`` intra-op threads (None: the inherited setting)."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
