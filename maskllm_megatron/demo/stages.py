"""The demo's stage cache (``Stages``: each stage runs once, keyed by its inputs' content and settings) and
its one way to run a command (``run_logged``: torchrun ranks or a plain process, logged, stopped cleanly)."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..checkpoint_folders import RunCheckpointError
from ..launch import die_with_parent, torchrun_command, usable_cpus
from ..run_folder import checkpoints_folder, newest_complete


def stage_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


#: a finished stage's wall time in seconds, in its folder
STAGE_WALL_FILE = ".stage_wall_s"


def stage_wall_s(folder: Path) -> float | None:
    """The wall time a finished stage took when it ran (None for one finished before it was recorded)."""
    path = folder / STAGE_WALL_FILE
    return float(path.read_text()) if path.is_file() else None


class Stages:
    """Runs stages once: ``<root>/<name>-<key>/`` exists only when the stage finished. ``walls`` lists the
    stages this process asked for, with the wall time each took when it ran."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.walls: list[tuple[str, float | None, bool]] = []  # (stage, its wall seconds, cached) in run order

    def run(self, number: int, name: str, key: str, fn, resumable: bool = False) -> Path:
        """``fn(work)`` fills ``<name>-<key>.partial/``, renamed when it returns. A ``resumable`` stage keeps
        an interrupted work folder (a training run resumes from its last checkpoint there); any other
        stage starts again from an empty one."""
        done = self.root / f"{name}-{key}"
        stamp = f"[demo {time.time() - self.t0:6.0f}s] {number}. {name}"
        if done.exists():
            print(f"{stamp}: cached ({done})", flush=True)
            self.walls.append((name, stage_wall_s(done), True))
            return done
        work = self.root / f"{name}-{key}.partial"
        if resumable and work.exists():
            print(f"{stamp}: resuming in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
            print(f"{stamp} ...", flush=True)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        try:
            fn(work)
        except (Interrupted, KeyboardInterrupt):
            raise SystemExit(f"demo stage {number} ({name}) interrupted; run the same command (`{rerun_command()}`) "
                             f"again: {_resume_hint(work, resumable)}") from None
        except Exception as e:
            raise SystemExit(f"demo stage {number} ({name}) failed: {e}\n  its work folder is {work}; fix the cause "
                             f"and run the same command (`{rerun_command()}`) again: "
                             f"{_resume_hint(work, resumable)}") from e
        (work / STAGE_WALL_FILE).write_text(str(time.time() - t0))  # this attempt's (a resumed run sums its own)
        os.replace(work, done)
        self.walls.append((name, stage_wall_s(done), False))
        print(f"[demo {time.time() - self.t0:6.0f}s] {number}. {name}: done", flush=True)
        return done


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped a stage; its processes have exited (a training run after saving)."""


def rerun_command() -> str:
    """The command that started this process, as the user can type it again (same flags: the stages'
    keys depend on them)."""
    args = sys.argv[1:]
    if Path(sys.argv[0]).resolve().parent == Path(__file__).resolve().parent:  # python -m maskllm_megatron.demo
        return "make demo" if not args else shlex.join(["python", "-m", "maskllm_megatron.demo", *args])
    return shlex.join(["python", sys.argv[0], *args])


def _resume_hint(work: Path, resumable: bool) -> str:
    """What the next run of the same command does with this stage's work folder."""
    if not resumable:
        return "finished stages are reused and this one starts again"
    try:
        resume = newest_complete(checkpoints_folder(work), verify=False)
    except RunCheckpointError as e:
        return f"finished stages are reused, but this one cannot resume: {e}"
    if resume is not None:
        return f"finished stages are reused and this one resumes from its checkpoint {resume.name}"
    return "finished stages are reused; this one saved no checkpoint yet, so it starts again"


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts each rank in a session of its own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def run_logged(cmd: list, log: Path, nproc: int = 0, append: bool = False) -> str:
    """Run a command (under torchrun with ``nproc`` processes if set), teeing output to ``log``
    (appended to it with ``append``).

    The command runs in its own session, so Ctrl-C reaches the demo alone; the demo then stops it with
    one SIGTERM, which torchrun passes to the ranks and the driver answers by saving a checkpoint and
    exiting (torchrun waits up to 10 minutes for that, not its default 30 s), and raises ``Interrupted``
    once it has exited. A second Ctrl-C kills it at once."""
    if nproc:
        cmd = torchrun_command(nproc, cmd)
    else:
        cmd = [sys.executable] + cmd
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, usable_cpus() // max(1, nproc))),
               TORCH_ELASTIC_SHUTDOWN_TIMEOUT="600")
    interrupted = False
    with open(log, "a" if append else "w", buffering=1) as f:  # line-buffered: the log can be followed
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True, preexec_fn=die_with_parent)
        lines = []

        def follow():
            for line in proc.stdout:
                f.write(line)
                lines.append(line)
                if line.startswith(("iter", "[maskllm]", "RESULT", "wrote", "verified", "error", "sparsity")):
                    print("    " + line.rstrip(), flush=True)

        try:
            follow()
        except KeyboardInterrupt:
            interrupted = True
            print("[demo] interrupted: stopping the stage (a training run saves a checkpoint first; "
                  "Ctrl-C again to kill it now) ...", flush=True)
            proc.send_signal(signal.SIGTERM)
            try:
                follow()
            except KeyboardInterrupt:
                _kill_tree(proc.pid)
        proc.wait()
    what = next((str(c) for c in cmd if str(c).startswith("maskllm_megatron.")), " ".join(map(str, cmd[:6])))
    if interrupted:
        raise Interrupted(f"{what} stopped (log: {log})")
    if proc.returncode:
        tail = "".join(l for l in lines[-15:] if "Warning" not in l and "warnings.warn" not in l)
        raise RuntimeError(f"{what} exited {proc.returncode} (log: {log}):\n{tail}")
    return "".join(lines)
