"""The driver's guards on its run folder, each called once from ``trainer.train`` (the file logic is in
``checkpoint_folders``): one driver per ``run.out_dir`` (``hold``), a resume only from a checkpoint whose
bytes verify (``verified_resume``), and a save only where there is room for it (``check_room``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..checkpoint_folders import FolderError, complete_checkpoints, digest_problem, hold_run_folder
from ..megatron.parallel import all_reduce_floats, init_process_group


def hold(out_dir: str | Path, timeout_minutes: Optional[float] = None) -> None:
    """Start torch.distributed (every wait on another rank bounded by ``timeout_minutes``), then rank 0 holds
    ``out_dir`` for the run's life (``checkpoint_folders.RunLock``); every rank stops with the holder's
    one line when another live driver has it. One rank is enough: every rank must see ``run.out_dir`` as
    the same folder (``trainer.agree_on_resume``), so it is on a shared filesystem."""
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


def verified_resume(resume: Optional[Path]) -> Optional[Path]:
    """``resume`` (the newest complete checkpoint, which every rank agreed on) when its files match their
    digests, else the newest older complete one that does, saying so; the ranks share the reading. A
    damaged file is one line naming it; ``FolderError`` when no checkpoint of the run verifies."""
    if resume is None:
        return None
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    candidates = complete_checkpoints(resume.parent)
    candidates = candidates[candidates.index(resume):] if resume in candidates else [resume]
    for i, ckpt in enumerate(candidates):
        problem = digest_problem(ckpt, rank, world)
        if problem:
            print(f"[maskllm] {problem}: not resuming from {ckpt.name}", flush=True)
        if not all_reduce_floats([problem is not None], op=torch.distributed.ReduceOp.MAX)[0]:
            if i and rank == 0:
                print(f"[maskllm] resuming from {ckpt.name}, the newest checkpoint that verifies", flush=True)
            return ckpt
    raise FolderError(f"no checkpoint in {resume.parent} matches its digests ({', '.join(c.name for c in candidates)}): "
                      "restore one from a copy, or move the folder away to start the run afresh")
