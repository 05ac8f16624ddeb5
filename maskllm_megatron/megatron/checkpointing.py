"""Save and load (sparsified) megatron-core models with ``dist_checkpointing``.

Every tensor is stored in its global layout (the layers' ``sharded_state_dict`` says how each shard
sits in it), so a checkpoint written at one TP/PP layout loads at another. Loading a dense checkpoint
(no mask logits) into a sparsified model is the normal start: the logits keep their initial (or prior)
values. Anything else missing or mis-shaped is an error naming the tensor, both shapes and the fix.

Saves are atomic (``checkpoint_folders.staging`` / ``publish``): the checkpoint is written to a hidden
``.<dir>.partial`` and renamed when every rank is done, so a crash during a save never leaves a folder
that looks complete.

Each rank records the digests of the files it wrote (``checkpoint_folders.write_digests``), which resume,
export and eval check before they read them.

Every load first passes ``checkpoint_folders.check_metadata`` (nothing read from a checkpoint can run
code); the driver's plain values are JSON (``checkpoint_folders.write_extra`` / ``read_extra``).
"""
from __future__ import annotations

import queue
import re
from pathlib import Path
from typing import Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from .layers import _MaskedLinearMixin

MASK_SUFFIXES = (".mask_logits", ".prior_mask")
# Optimizer state in the global model layout, so a run resumes at another TP / DP size; gathered over
# the gloo data-parallel group (works on CPU, and keeps GPU memory free during the save).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "distrib_optim_fully_reshardable_mem_efficient": True}


from ..checkpoint_folders import (CheckpointMismatch, DiskFull, barrier, check_metadata, free_bytes, is_rank0, publish,
                                  read_extra, room_message, staging, tree_bytes, write_digests, write_extra)
from ..run_folder import complete_checkpoints


def load_tensors_metadata(ckpt_dir: str | Path) -> dict:
    """megatron's ``load_tensors_metadata`` after ``check_metadata``."""
    check_metadata(ckpt_dir)
    return dist_checkpointing.load_tensors_metadata(str(ckpt_dir))


def load_sharded(sharded: dict, ckpt_dir: str | Path) -> dict:
    """megatron's ``dist_checkpointing.load`` after ``check_metadata``."""
    check_metadata(ckpt_dir)
    return dist_checkpointing.load(sharded, str(ckpt_dir))


def _global_shape(value) -> Optional[tuple]:
    if isinstance(value, ShardedTensor):
        return tuple(value.global_shape)
    if isinstance(value, ShardedTensorFactory):
        built = value.build_fn(value.key, value.data, value.replica_id, value.flattened_range)
        return tuple(built[0].global_shape) if built else None
    return None


def _tensor_entries(sharded: dict) -> dict:
    return {k: v for k, v in sharded.items() if isinstance(v, (ShardedTensor, ShardedTensorFactory))}


def save_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path, optimizer=None, extra: Optional[dict] = None) -> Path:
    """Write model (and optimizer) state to ``ckpt_dir`` atomically. ``extra`` is a small dict of plain,
    JSON-serialisable values (iteration, scheduler, data position) stored by rank 0 beside the tensors."""
    sharded = model.sharded_state_dict()
    if optimizer is not None:
        sharded = {"model": sharded, "optimizer": optimizer.sharded_state_dict(sharded, metadata=OPTIMIZER_METADATA)}
    needed = check_room_for_checkpoint(model, ckpt_dir, optimizer)
    _writers_report_without_a_manager()
    with staging(ckpt_dir, needed=needed) as partial:
        dist_checkpointing.save(sharded, str(partial))
        if extra is not None and is_rank0():
            write_extra(partial, extra)
        barrier()  # every file written: each rank records the digests of its own
        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        write_digests(partial, rank, world)
        return publish(partial, ckpt_dir)


def _writers_report_without_a_manager() -> None:
    """megatron's checkpoint writer hands its results over through a queue that megatron makes, at a
    process's first save, with a ``multiprocessing`` Manager: a server process started by *spawn*, which
    imports this process's main module afresh (torch and all: 2 s of CPU per rank) and is joined at exit.
    ``save_checkpoint`` saves synchronously, so the writer puts its results in, and megatron takes them
    out, in this process (its forked per-bucket writers report through a queue of their own): a plain
    in-process queue does the same without that process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def checkpoint_bytes(model: torch.nn.Module, optimizer=None) -> int:
    """A model of a checkpoint's size, for the first save of a run: the model's tensors once (summed over
    the model-parallel ranks; data-parallel replicas hold copies) and, with an optimizer, 12 bytes per
    trainable parameter: megatron's optimizer state holds an fp32 copy of it and Adam's two fp32 moments
    (the tiny test model's first checkpoint: 2.66 MB modelled, 2.81 MB written, the rest indexes)."""
    from megatron.core import parallel_state

    from .parallel import all_reduce_floats

    local = sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    group = parallel_state.get_model_parallel_group() if parallel_state.model_parallel_is_initialized() else None
    if torch.distributed.is_initialized():
        local, trainable = all_reduce_floats([local, trainable], group=group)
    return int(local + (12 * trainable if optimizer is not None else 0))


def check_room_for_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path, optimizer=None) -> int:
    """Refuse, on every rank and before anything is written, a save whose filesystem lacks room for it
    (``checkpoint_folders.DiskFull``: one line naming the folder, the space needed and free). The size is
    the newest complete checkpoint's beside ``ckpt_dir`` plus 5% (the extra state grows with the run's
    history), or ``checkpoint_bytes``'s model before the first. Returns the bytes needed."""
    from .parallel import all_reduce_floats

    done = complete_checkpoints(Path(ckpt_dir).absolute().parent)
    if done:
        needed, basis = int(tree_bytes(done[0]) * 1.05), f"the size of {done[0].name} + 5%"
    else:
        needed = checkpoint_bytes(model, optimizer)
        basis = "modelled from the model" + (" and optimizer" if optimizer is not None else "") + " sizes"
    free = free_bytes(ckpt_dir) if is_rank0() else 0
    if torch.distributed.is_initialized():
        free = int(all_reduce_floats([free])[0])  # rank 0's: every rank sees one shared folder
    if free < needed:
        raise DiskFull(room_message(ckpt_dir, needed, free, "a checkpoint", basis))
    return needed


def _prepare_prior_buffers(model: torch.nn.Module, model_sharded: dict, saved: dict) -> bool:
    """Allocate ``prior_mask`` buffers for layers whose prior is in the checkpoint; True if any was
    added (``model_sharded`` then lacks them and must be rebuilt)."""
    by_tensor = {}
    for value in _tensor_entries(model_sharded).values():
        if value.key.endswith(".mask_logits"):
            by_tensor[value.data.data_ptr()] = value.key[: -len(".mask_logits")]
    added = False
    for module in model.modules():
        if isinstance(module, _MaskedLinearMixin) and module.prior_mask is None:
            prefix = by_tensor.get(module.mask_logits.data_ptr())
            if prefix is not None and f"{prefix}.prior_mask" in saved:
                module.prior_mask = torch.zeros_like(module.weight, dtype=torch.bool)
                added = True
    return added


def check_compatible(model_sharded: dict, saved: dict, ckpt_dir) -> list[str]:
    """Raise ``CheckpointMismatch`` for a missing or mis-shaped tensor; return the mask tensors the
    checkpoint does not have (a dense checkpoint: they keep their initial values). Lookups use each
    entry's global checkpoint key; the returned names are ``model_sharded``'s own keys."""
    absent = []
    for name, value in _tensor_entries(model_sharded).items():
        key = value.key
        expected = _global_shape(value)
        if key not in saved:
            if key.endswith(MASK_SUFFIXES):
                absent.append(name)
                continue
            raise CheckpointMismatch(
                f"checkpoint {ckpt_dir} has no tensor {key} (model expects global shape {expected}): it was "
                "written for another architecture or config; convert it again for this model")
        found = tuple(saved[key].global_shape)
        if expected is not None and found != expected:
            if key.endswith(".mask_logits") and found[:2] != expected[:2]:
                hint = "the N:M group size M differs (cols / M): learn with the checkpoint's N:M"
            elif key.endswith(".mask_logits"):
                hint = (f"the checkpoint has {found[-1]} patterns per group, the model {expected[-1]}: "
                        "the N:M differs; use the checkpoint's N:M")
            else:
                hint = "the model config differs (sizes, heads, vocab padding): build the model from the checkpoint's config"
            raise CheckpointMismatch(f"tensor {key}: checkpoint {ckpt_dir} has global shape {found}, model expects "
                                     f"{expected}; {hint}")
    return absent


def _materialize_optimizer_state(optimizer) -> None:
    """The distributed optimizer can describe (and load into) its Adam state only once the state exists:
    create it with megatron's dummy step (the load then overwrites both parameters and state)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor again. Without apex or Transformer Engine,
    megatron-core 0.16.1's ``DistributedOptimizer.load_state_dict`` assigns ONE step tensor to every
    parameter's state; torch's Adam increments ``step`` in place per parameter, so the first step after a
    resume counted 5, 6, ..., 12 for the eight parameters of a group instead of 5 for each, and every
    resumed run drifted from the uninterrupted one (tests/test_train.py::test_kill_9_and_resume_is_exact)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        seen = set()
        for state in getattr(opt, "optimizer", opt).state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(state["step"]))


def _is_optimizer_key(key: str) -> bool:
    """An optimizer-state tensor's key: ``optimizer.*``, or ``chained_<i>.optimizer.*`` when megatron chains
    several optimizers (a mixture-of-experts model's expert-parallel parameters get their own)."""
    return key.startswith("optimizer.") or re.match(r"chained_\d+\.optimizer\.", key) is not None


def load_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path, optimizer=None) -> dict:
    """Load ``ckpt_dir`` into ``model`` (and ``optimizer``) at this rank's layout.

    Returns ``{"absent_masks": [...], "extra": {...} or None, "optimizer_loaded": bool}``.
    """
    ckpt_dir = Path(ckpt_dir).absolute()
    if not (ckpt_dir / "metadata.json").exists():
        raise CheckpointMismatch(f"{ckpt_dir} is not a complete dist_checkpointing checkpoint (no metadata.json): "
                                 "point at a checkpoint folder, not a partial or parent one")
    saved = load_tensors_metadata(ckpt_dir)
    if optimizer is not None and not any(_is_optimizer_key(k) for k in saved):
        optimizer = None  # saved without optimizer state (e.g. a prior-only run): the optimizer starts fresh
    model_sharded = model.sharded_state_dict()
    if _prepare_prior_buffers(model, model_sharded, saved):
        model_sharded = model.sharded_state_dict()
    absent = check_compatible(model_sharded, saved, ckpt_dir)
    for key in absent:
        model_sharded.pop(key)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
        request = {"model": model_sharded,
                   "optimizer": optimizer.sharded_state_dict(model_sharded, is_loading=True, metadata=OPTIMIZER_METADATA)}
        state = load_sharded(request, ckpt_dir)
        model_state, optimizer_state = state["model"], state["optimizer"]
    else:
        model_state, optimizer_state = load_sharded(model_sharded, ckpt_dir), None
    result = model.load_state_dict(model_state, strict=False)
    unexpected = [k for k in result.missing_keys if not k.endswith(MASK_SUFFIXES) and not k.endswith("_extra_state")]
    if unexpected:
        raise CheckpointMismatch(f"checkpoint {ckpt_dir} left model tensors unset: {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
        _unshare_adam_steps(optimizer)
    extra = read_extra(ckpt_dir)
    return {"absent_masks": absent, "extra": extra, "optimizer_loaded": optimizer is not None}
