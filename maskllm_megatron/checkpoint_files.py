"""The files of a checkpoint folder that are read before (or without) megatron: pure Python and torch.

Nothing read from a checkpoint can run code: the driver's plain values (iteration, scheduler, history,
config) are JSON (``extra_state.json``; an older ``extra_state.pt`` is read with
``torch.load(weights_only=True)``), and torch's dist-checkpoint ``.metadata``, a pickle that every load
unpickles, is first read by an unpickler that admits only the dist-checkpoint metadata classes
(``check_metadata``): a checkpoint from a stranger that names anything else is refused.
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Optional

import torch


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model, or is damaged (message names the file or tensor and the fix)."""


class UnsafeCheckpoint(CheckpointMismatch):
    """A checkpoint file would run code when read (message names the file and what it references)."""


EXTRA_FILE = "extra_state.json"
LEGACY_EXTRA_FILE = "extra_state.pt"  # written before the JSON file; read without unpickling code


def extra_path(ckpt_dir: str | Path) -> Optional[Path]:
    """The checkpoint's extra-state file (JSON, or an older ``.pt``), None if it has none."""
    for name in (EXTRA_FILE, LEGACY_EXTRA_FILE):
        path = Path(ckpt_dir) / name
        if path.is_file():
            return path
    return None


def read_extra(ckpt_dir: str | Path) -> Optional[dict]:
    """The driver's plain values saved beside the tensors (None if there are none). A malformed file is a
    ``CheckpointMismatch`` naming it."""
    path = extra_path(ckpt_dir)
    if path is None:
        return None
    try:
        if path.name == EXTRA_FILE:
            extra = json.loads(path.read_text())
        else:
            extra = torch.load(path, weights_only=True)  # plain containers and numbers only
    except (ValueError, OSError, pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointMismatch(f"{path} cannot be read as a checkpoint's extra state ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else 'empty'}): the checkpoint is damaged; "
                                 "resume from another one") from None
    if not isinstance(extra, dict):
        raise CheckpointMismatch(f"{path} holds a {type(extra).__name__}, not a checkpoint's extra state")
    return extra


def write_extra(folder: Path, extra: dict) -> None:
    """Write the driver's plain values as the folder's ``extra_state.json``."""
    (folder / EXTRA_FILE).write_text(json.dumps(extra, allow_nan=True))


# torch.distributed.checkpoint's metadata pickle names these and nothing else (checked on its writers'
# output: megatron's torch_dist strategy, plain dcp.save, which records the checkpoint id as a path; a
# path object is inert data)
_METADATA_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner"}
_METADATA_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                   ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                   *((module, cls) for module in ("pathlib", "pathlib._local")
                     for cls in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = (module in _METADATA_MODULES and not name.startswith("__")) or (module, name) in _METADATA_NAMES
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise UnsafeCheckpoint(f"{module}.{name}")
        return super().find_class(module, name)


def check_metadata(ckpt_dir: str | Path) -> None:
    """Refuse a dist checkpoint whose ``.metadata`` pickle references anything but the dist-checkpoint
    metadata classes (a planted pickle would run code inside torch's reader). Call before every load."""
    path = Path(ckpt_dir) / ".metadata"
    if not path.is_file():
        raise CheckpointMismatch(f"{ckpt_dir} has no .metadata: it is not a complete dist checkpoint")
    try:
        _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"{path} references {e}, which a dist checkpoint's metadata never holds: refusing to "
                               "read a checkpoint that could run code (rewrite it with maskllm-train or "
                               "maskllm-convert)") from None
    except Exception as e:  # a truncated or foreign file
        raise CheckpointMismatch(f"{path} is not a dist checkpoint's metadata ({type(e).__name__}): the checkpoint "
                                 "is damaged; save or convert it again") from None


def read_metadata(ckpt_dir: str | Path):
    """torch's dist-checkpoint ``Metadata`` of ``ckpt_dir``, read by the restricted unpickler."""
    check_metadata(ckpt_dir)
    return _MetadataUnpickler(io.BytesIO((Path(ckpt_dir) / ".metadata").read_bytes())).load()


def is_complete(ckpt_dir: str | Path) -> bool:
    """True when ``ckpt_dir`` holds a whole checkpoint: megatron's ``metadata.json``, torch's ``.metadata``,
    the extra state, and every byte range of every data file the metadata names (a folder half deleted,
    or copied in part, is not complete)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file() or extra_path(ckpt_dir) is None:
        return False
    try:
        metadata = read_metadata(ckpt_dir)
        needed = {}
        for info in (getattr(metadata, "storage_data", None) or {}).values():
            path = getattr(info, "relative_path", None)
            if path is not None:
                needed[path] = max(needed.get(path, 0), int(info.offset) + int(info.length))
        for name, size in needed.items():
            f = ckpt_dir / name
            if not f.is_file() or f.stat().st_size < size:
                return False
        read_extra(ckpt_dir)
    except CheckpointMismatch:
        return False
    return True
