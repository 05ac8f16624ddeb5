"""The driver's ranks on their run folder (which checkpoint a run means is ``run_folder``'s policy): one
driver per ``run.out_dir`` (``hold``), every rank resuming the same checkpoint (``agree_on_resume``), and
the ranks reading its digests between them (``resume_checkpoint``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..checkpoint_folders import FolderError, hold_run_folder
from ..megatron.parallel import all_reduce_floats, init_process_group
from ..run_folder import Readers, checkpoint_iteration, checkpoints_folder, newest_complete
from ..run_config import ConfigError


def hold(out_dir: str | Path, timeout_minutes: Optional[float] = None) -> None:
    """Start torch.distributed (every wait on another rank bounded by ``timeout_minutes``), then rank 0 holds
    ``out_dir`` for the run's life (``checkpoint_folders.RunLock``); every rank stops with the holder's
    one line when another live driver has it. One rank is enough: every rank must see ``run.out_dir`` as
    the same folder (``agree_on_resume``), so it is on a shared filesystem."""
    init_process_group(timeout_minutes)
    refusal = None
    if torch.distributed.get_rank() == 0:
        try:
            hold_run_folder(out_dir)
        except FolderError as e:
            refusal = str(e)
    if all_reduce_floats([refusal is not None], op=torch.distributed.ReduceOp.MAX)[0]:
        raise FolderError(refusal or f"{Path(out_dir).absolute()} is in use by another maskllm-train (rank 0 names "
                                     "it): wait for that run to end or stop it, or set another run.out_dir")


def agree_on_resume(resume: Optional[Path]) -> None:
    """Every rank must resume the same iteration (a rank on another filesystem view would not)."""
    it = checkpoint_iteration(resume.name) if resume is not None else -1
    low = all_reduce_floats([it], op=torch.distributed.ReduceOp.MIN)[0]
    high = all_reduce_floats([it], op=torch.distributed.ReduceOp.MAX)[0]
    if low != high:
        raise ConfigError(f"the ranks found different checkpoints to resume (iterations {int(low)} to {int(high)}; "
                          f"-1: none): run.out_dir must be one folder that every rank sees the same")


def _any_rank(flag: bool) -> bool:
    return bool(all_reduce_floats([flag], op=torch.distributed.ReduceOp.MAX)[0])


def _say(line: str) -> None:
    print(f"[maskllm] {line}", flush=True)


def resume_checkpoint(out_dir: str | Path) -> Optional[Path]:
    """The checkpoint the run in ``out_dir`` resumes from (None: a fresh start): ``run_folder.newest_complete``,
    the policy export and eval follow too, with the ranks agreeing on it and sharing its digest reading."""
    readers = Readers(torch.distributed.get_rank(), torch.distributed.get_world_size(), _any_rank, agree_on_resume,
                      remember=False)
    return newest_complete(checkpoints_folder(out_dir), readers=readers, say=_say, verb="resuming from")
