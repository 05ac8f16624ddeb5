"""Process launching shared by the command-line tools: free ports, torchrun re-launch, SIGTERM, and
small all-reduces of Python numbers on the device the backend needs.

A tool given ``--tp N`` (N > 1) and launched plainly checks its request, then re-launches itself
under ``torchrun --nproc-per-node N`` (``relaunch``); launched under torchrun it uses the given ranks.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_device():
    """Where a small tensor for a collective must live: the current GPU under NCCL (which cannot reduce
    CPU tensors), else the CPU (gloo)."""
    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_floats(values, op=None, group=None) -> list[float]:
    """All-reduce a few numbers across ranks (sum unless ``op``) in float64; returns them as floats."""
    import torch

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM if op is None else op, group=group)
    return t.tolist()


def init_process_group() -> None:
    """torch.distributed from torchrun's environment, or a one-process world when launched plainly;
    NCCL on the LOCAL_RANK's GPU where CUDA is available, else gloo. No-op when already initialised."""
    import torch

    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def under_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets LOCAL_RANK)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def relaunch(module: str, argv: list[str], nproc: int, cleanup: Path | None = None) -> int:
    """Run ``python -m module argv`` under torchrun with ``nproc`` local ranks (threads split evenly
    unless OMP_NUM_THREADS is set); remove ``cleanup`` when it fails. Returns the exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", module, *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"launching {nproc} ranks: torchrun -m {module} ...", file=sys.stderr)
    rc = subprocess.call(cmd, env=env)
    if rc != 0 and cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    return rc


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (torchrun stopping the other ranks when one fails) into SystemExit, so that
    ``finally`` blocks remove partial outputs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
