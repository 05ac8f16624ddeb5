"""Process launching shared by the command-line tools: free ports, torchrun re-launch, SIGTERM, the exit
status of a user's error, and small all-reduces of Python numbers on the device the backend needs.

A tool given ``--tp N`` (N > 1) and launched plainly checks its request, then re-launches itself
under ``torchrun --nproc-per-node N`` (``relaunch``); launched under torchrun it uses the given ranks.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import NoReturn


#: The exit status of every maskllm-* command when what the user gave must change (a flag, a path, a config
#: value, a folder): argparse's own for a bad flag, so one number means "fix the input". 1 is left for work
#: that failed (maskllm-verify's violation, a run stopped by a non-finite loss, a rank that died).
USER_ERROR = 2


def user_error(message: str) -> int:
    """Print ``message`` (one line: the problem and its fix) to stderr; returns USER_ERROR, for ``main`` to return."""
    print(message, file=sys.stderr, flush=True)
    return USER_ERROR


class UserExit(SystemExit):
    """A user's error ending a command from below its ``main`` (``exit_user_error``): exit status USER_ERROR,
    ``str()`` the message (already on stderr: the interpreter prints nothing for a numeric status)."""

    def __init__(self, message: str):
        super().__init__(USER_ERROR)
        self.message = message

    def __str__(self) -> str:
        return self.message


def exit_user_error(message: str) -> NoReturn:
    """End the command as argparse does on a bad flag: ``message`` on stderr, exit status USER_ERROR."""
    user_error(message)
    raise UserExit(message)


# Library warnings that every run prints and that say nothing to our users; a tool's stderr should hold its
# own lines (a one-line error above all). (message regex, category); filtered by the tools, not on import.
KNOWN_WARNINGS = (
    (r"full scope is deprecated", UserWarning),  # megatron-core's TransformerConfig default
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),  # torch DCP
    (r"`load_state_dict` is deprecated and will be removed", FutureWarning),  # megatron's torch_dist loader
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor", UserWarning),  # megatron's optimizer
    (r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning),  # DCP in one process
    (r"TypedStorage is deprecated", UserWarning),
)
# Without CUDA, megatron-core's notes that Apex / Transformer Engine are missing are expected: neither can
# run on a CPU. On a GPU machine they stay: there they tell a user that the fast fused paths are off.
CPU_ONLY_WARNINGS = ((r"(Transformer Engine and )?Apex (is|are) not installed", UserWarning),)


class _QuietMegatronLogs:
    """A logging filter for two megatron-core records that every affected save prints and that tell our user
    nothing: the optimizer's ``param_state`` in the common state dict of ranks other than 0 (megatron saves
    rank 0's common state only; any other difference still shows), and a checkpoint writer's error, which
    the exception it raises carries (a full disk then reads as our one line)."""

    _BENIGN = re.compile(r"Rank \d+ common state dict differs from rank 0 common state dict\. Keys only on rank 0: "
                         r"\[\], Keys only on \d+: \[\('optimizer', 'param_state'\)\], Mismatched keys: \[\]$")

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not (self._BENIGN.match(message) or re.match(r"Local process \d+ encountered an error: ", message))


QUIET_LOGGERS = ("megatron.core.dist_checkpointing.validation",
                 "megatron.core.dist_checkpointing.strategies.filesystem_async")


def quiet_known_warnings() -> None:
    """Silence ``KNOWN_WARNINGS`` (and ``CPU_ONLY_WARNINGS`` without CUDA) and megatron's records that
    ``_QuietMegatronLogs`` drops in this process: called first by every command-line tool, never by
    importing the package."""
    import warnings

    rules = KNOWN_WARNINGS
    try:
        import torch

        if not torch.cuda.is_available():
            rules = rules + CPU_ONLY_WARNINGS
    except ImportError:
        pass
    for message, category in rules:
        warnings.filterwarnings("ignore", message=message, category=category)
    import logging

    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietMegatronLogs) for f in logger.filters):
            logger.addFilter(_QuietMegatronLogs())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets LOCAL_RANK)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: a container's or a scheduler's share), not the host's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def die_with_parent() -> None:
    """In a child, before exec: SIGTERM when its parent dies (Linux), so a killed tool leaves no ranks."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def torchrun_command(nproc: int, args: list) -> list[str]:
    """The one torchrun command line of this package (the CLIs' re-launch, the demo's stages, the tests):
    ``python -m torch.distributed.run`` with ``nproc`` local ranks on a loopback port free a moment ago,
    running ``args`` (``-m module ...``, or a script and its arguments)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), *map(str, args)]


def relaunch(module: str, argv: list[str], nproc: int, cleanup: Path | None = None) -> int:
    """Run ``python -m module argv`` under torchrun with ``nproc`` local ranks (threads split evenly
    unless OMP_NUM_THREADS is set); remove ``cleanup`` when it fails. Returns the exit status.

    torchrun runs in a session of its own: Ctrl-C or SIGTERM to this process is passed on to it as one
    SIGTERM, which it gives the ranks (they remove their partial outputs and exit); this process waits
    for them, so nothing is left running, and then removes ``cleanup``."""
    cmd = torchrun_command(nproc, ["-m", module, *argv])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nproc)))
    print(f"launching {nproc} ranks: torchrun -m {module} ...", file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    stop = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: proc.send_signal(signal.SIGTERM)) for s in stop}
    rc = None
    try:
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if rc is None:  # the wait itself failed: leave no ranks behind
            proc.kill()
            proc.wait()
        if rc != 0 and cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
    return rc


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (torchrun stopping the other ranks when one fails) into SystemExit, so that
    ``finally`` blocks remove partial outputs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


class _EagerMegatronJitOnCpu(importlib.abc.MetaPathFinder):
    """Makes megatron-core's ``jit_fuser`` a no-op, as its own ``disable_jit_fuser()`` does, when
    ``megatron.core.jit`` is first imported on a machine without CUDA. There it is ``torch.compile``: each
    decorated function (GPT-2's GeLU, Nemotron's squared ReLU, the MoE experts' GLU, ...) would be compiled
    to C++ by inductor at its first call, and decorating them imports torch._dynamo and inductor, 2.2 s of
    CPU in every process that imports megatron (more than half of its import). The functions are the
    same maths run eagerly. With CUDA nothing changes."""

    def find_spec(self, name, path, target=None):
        if name != "megatron.core.jit":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                import torch

                if not torch.cuda.is_available():
                    module.disable_jit_fuser()

            spec.loader.exec_module = exec_module
        return spec


def eager_megatron_jit_on_cpu() -> None:
    """Install ``_EagerMegatronJitOnCpu`` unless megatron-core is imported already (then it is too late,
    and nothing changes)."""
    if "megatron.core.jit" not in sys.modules and not any(isinstance(f, _EagerMegatronJitOnCpu) for f in sys.meta_path):
        sys.meta_path.insert(0, _EagerMegatronJitOnCpu())
