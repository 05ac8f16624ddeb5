"""Spawn real ranks with torchrun (gloo on CPU) from a test and return what they printed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from maskllm_megatron.launch import free_port


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 600, env: dict | None = None) -> str:
    """Run ``python -m torch.distributed.run --nproc-per-node nproc script args``; raise with the
    output when it fails; return stdout + stderr."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), script, *map(str, args),
    ]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    for attempt in range(3):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
        out = proc.stdout + proc.stderr
        # the port was free when chosen but taken (by the other test worker's ranks) before torchrun bound it
        if proc.returncode == 0 or "EADDRINUSE" not in out:
            break
        cmd[cmd.index("--master-port") + 1] = str(free_port())
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed (exit {proc.returncode}):\n{out[-6000:]}")
    return out


def printed_result(output: str) -> dict:
    """The JSON a worker printed on its ``RESULT `` line."""
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
