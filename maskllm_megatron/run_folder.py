"""A run's checkpoints folder, owned here alone: naming (``iter_NNNNNNN``), listing, which checkpoint a run
means (``newest_complete``), the ``latest`` pointer, rotation, and the one resolve policy
(``resolve_run_checkpoint``) that the trainer's resume, export, eval, verify, the demo and the benchmarks
all follow. Pure Python (the files themselves: ``checkpoint_folders``).

The policy: a run means its newest *complete* checkpoint whose files match their digests. The ``latest``
pointer is written after every save (for people and for Megatron-LM's habits) but never trusted: a pointer
emptied, dangling, or naming an older checkpoint (a copy or restore left it behind) is announced and passed
over. So a tool pointed at a run reads the checkpoint the trainer would resume from, never one it would
refuse; a tool pointed at an ``iter_*`` folder reads that one (and refuses it, naming the file, when its
digests fail).
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .checkpoint_folders import (LATEST_FILE, MEGATRON_METADATA, RunCheckpointError, digest_problem, extra_path,
                                 is_complete, whole_digest_problem)

CHECKPOINTS_DIR = "checkpoints"  # under run.out_dir: the run's iter_* folders and its latest pointer
_PREFIX = "iter_"


def checkpoint_name(iteration: int) -> str:
    """The folder (under ``<run.out_dir>/checkpoints``) of the checkpoint saved at ``iteration``."""
    return f"{_PREFIX}{iteration:07d}"


def checkpoint_iteration(name: str) -> Optional[int]:
    """The iteration of a ``checkpoint_name`` folder, None for any other name (e.g. one being written)."""
    digits = name[len(_PREFIX):]
    return int(digits) if name.startswith(_PREFIX) and digits.isdigit() else None


def checkpoints_folder(out_dir: str | Path) -> Path:
    """The checkpoints folder of the run whose ``run.out_dir`` is ``out_dir``."""
    return Path(out_dir).absolute() / CHECKPOINTS_DIR


def saved_checkpoints(root: str | Path) -> dict[int, Path]:
    """Every ``iter_*`` folder of the checkpoints folder ``root`` by iteration, oldest first, complete or
    not (a folder still being written has a hidden name and is not listed)."""
    root = Path(root)
    found = {checkpoint_iteration(p.name): p for p in root.glob(f"{_PREFIX}*") if p.is_dir()} if root.is_dir() else {}
    found.pop(None, None)
    return dict(sorted(found.items()))


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete (``checkpoint_folders.is_complete``) checkpoints of ``root``, newest first."""
    return [p for _, p in reversed(saved_checkpoints(root).items()) if is_complete(p)]


@dataclass(frozen=True)
class Readers:
    """The processes that choose a checkpoint together: one for a tool; the driver's ranks for a resume.
    Each checks its share of the digests (file i when i % world == rank); ``any_rank`` pools a yes/no
    over them; ``agree`` refuses a candidate the ranks do not all see (one shared folder). A tool
    ``remember``s a checkpoint that verified for the process (it reads the checkpoint next, and may open it
    again); the driver reads afresh."""

    rank: int = 0
    world: int = 1
    any_rank: Callable[[bool], bool] = bool
    agree: Callable[[Optional[Path]], None] = lambda candidate: None
    remember: bool = True


ONE_PROCESS = Readers()


def _digest_problem(ckpt: Path, readers: Readers) -> Optional[str]:
    if readers.remember and readers.world == 1:
        return whole_digest_problem(ckpt)
    return digest_problem(ckpt, readers.rank, readers.world)


_TOLD: set = set()


def tell(line: str) -> None:
    """A tool's ``say``: the line on stderr, once per process (a tool may resolve one run several times)."""
    if line not in _TOLD:
        _TOLD.add(line)
        print(f"[maskllm] {line}", file=sys.stderr, flush=True)


def newest_complete(root: str | Path, *, verify: bool = True, readers: Readers = ONE_PROCESS,
                    say: Optional[Callable[[str], None]] = None, verb: str = "reading") -> Optional[Path]:
    """The checkpoint the run in the checkpoints folder ``root`` means: its newest complete one, whatever
    ``latest`` says (a pointer that names another is announced on rank 0), and, with ``verify``, whose
    files match their digests, else the newest older complete one that does (each damaged file is said by
    the rank that read it, the fallback by rank 0). ``say`` gets these lines (None: silent), ``verb`` is
    what the caller does with the checkpoint ("resuming from").

    None when ``root`` holds no checkpoint folder (a fresh run). ``RunCheckpointError`` naming the folder
    when it holds checkpoint folders but none is complete, or none verifies: a fresh start there would
    rotate them away, and a tool would read what the trainer refuses."""
    root = Path(root).absolute()
    found = saved_checkpoints(root)
    if not found:
        readers.agree(None)
        return None
    complete = complete_checkpoints(root)
    if not complete:
        raise RunCheckpointError(f"{root} holds {', '.join(p.name for p in reversed(found.values()))} but none is a "
                                 "complete checkpoint: restore one, or move the folder away to start the run afresh")
    newest = complete[0]
    pointer = root / LATEST_FILE
    named = pointer.read_text().strip() if pointer.is_file() else ""
    if say is not None and readers.rank == 0 and named != newest.name:
        why = "is empty" if pointer.is_file() and not named else "is missing" if not pointer.is_file() else \
            f"names {named!r}, which is not the newest complete checkpoint"
        say(f"{pointer} {why}: {verb} {newest.name}")
    readers.agree(newest)
    if not verify:
        return newest
    for i, ckpt in enumerate(complete):
        problem = _digest_problem(ckpt, readers)
        if problem and say is not None:
            say(f"{problem}: not {verb} {ckpt.name}")
        if not readers.any_rank(problem is not None):
            if i and say is not None and readers.rank == 0:
                say(f"{verb} {ckpt.name}, the newest checkpoint that verifies")
            return ckpt
    raise RunCheckpointError(f"no checkpoint in {root} matches its digests ({', '.join(c.name for c in complete)}): "
                             "restore one from a copy, or move the folder away to start the run afresh")


def write_latest(root: str | Path, iteration: int) -> None:
    """Point ``latest`` at the checkpoint of ``iteration`` (call once it is complete), atomically."""
    tmp = Path(root) / f"{LATEST_FILE}.tmp"
    tmp.write_text(checkpoint_name(iteration))
    os.replace(tmp, Path(root) / LATEST_FILE)


def stale_checkpoints(iterations: list[int], save_interval: int, keep_last: int) -> list[int]:
    """The checkpoints (by iteration) to delete after a save. The ``keep_last`` newest scheduled ones
    (multiples of ``save_interval``; all of them when it is 0) stay, and the newest checkpoint always
    does; an off-schedule one (a SIGTERM save, a run's final save) is dropped once a newer one exists,
    so a preemption never rotates out a scheduled checkpoint."""
    if not iterations:
        return []
    newest = max(iterations)
    scheduled = sorted(i for i in iterations if not save_interval or i % save_interval == 0)
    stale = [i for i in iterations if i not in scheduled] + scheduled[: max(0, len(scheduled) - keep_last)]
    return sorted(i for i in stale if i != newest)


def rotate(root: str | Path, written: list[int], resumed_from: int, save_interval: int, keep_last: int) -> None:
    """Delete the ``stale_checkpoints`` of this run's own line only: those this process wrote
    (``written``) and those of the run it resumed, up to the one it resumed from; a folder of any other
    origin stays."""
    ours = {it: p for it, p in saved_checkpoints(root).items() if it in written or it <= resumed_from}
    for it in stale_checkpoints(list(ours), save_interval, keep_last):
        shutil.rmtree(ours[it], ignore_errors=True)


def _holds_run_files(folder: Path) -> bool:
    return (folder / MEGATRON_METADATA).is_file() and extra_path(folder) is not None


def resolve_run_checkpoint(path: str | Path, *, verify: bool = True,
                           say: Optional[Callable[[str], None]] = None) -> Path:
    """The checkpoint a tool reads for ``path``: ``path`` itself when it holds a run checkpoint's files (an
    ``iter_*`` folder; its digests are checked when it is read), else the ``newest_complete`` checkpoint
    (``verify``, ``say``: as there) of ``path`` as a run's checkpoints folder, or of its ``checkpoints/``:
    the one the trainer resumes from. ``RunCheckpointError`` (problem and fix) for anything else."""
    path = Path(path).absolute()
    if not path.exists():
        raise RunCheckpointError(f"{path} does not exist: pass OUT/checkpoints/iter_XXXXXXX of a maskllm-train run")
    if _holds_run_files(path):
        return path
    for root in (path, path / CHECKPOINTS_DIR):
        if saved_checkpoints(root) or (root / LATEST_FILE).is_file():
            ckpt = newest_complete(root, verify=verify, say=say)
            if ckpt is None:
                raise RunCheckpointError(f"{root} holds no checkpoint folder (its {LATEST_FILE!r} names one that "
                                         "does not exist): pass OUT/checkpoints/iter_XXXXXXX of a maskllm-train run")
            return ckpt
    raise RunCheckpointError(f"{path} is not a mask-learning checkpoint (no metadata.json + extra state, no "
                             f"iter_XXXXXXX checkpoints): pass OUT/checkpoints/iter_XXXXXXX of a maskllm-train run")


def is_run_checkpoint(path: str | Path) -> bool:
    """True for a run checkpoint, or a run (or its checkpoints folder) that has a complete one: what a tool
    that takes several folder kinds treats as a run (digests unread)."""
    try:
        resolve_run_checkpoint(path, verify=False)
    except RunCheckpointError:
        return False
    return True
