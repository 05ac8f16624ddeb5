"""Spawn real ranks with torchrun (gloo on CPU) from a test and return what they printed."""
from __future__ import annotations

import json
import os
import subprocess

from maskllm_megatron.launch import torchrun_command


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 600, env: dict | None = None) -> str:
    """Run ``python -m torch.distributed.run --nproc-per-node nproc script args``; raise with the
    output when it fails; return stdout + stderr."""
    cmd = torchrun_command(nproc, [script, *args])
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    for attempt in range(3):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
        out = proc.stdout + proc.stderr
        # the port was free when chosen but taken (by the other test worker's ranks) before torchrun bound it
        if proc.returncode == 0 or "EADDRINUSE" not in out:
            break
        cmd = torchrun_command(nproc, [script, *args])
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed (exit {proc.returncode}):\n{out[-6000:]}")
    return out


def printed_result(output: str) -> dict:
    """The JSON a worker printed on its ``RESULT `` line."""
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
