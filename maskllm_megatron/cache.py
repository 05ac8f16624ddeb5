"""The local cache folder and content keys: where built kernels, fetched assets and the demo's stages live.

Imports nothing of the project, so any layer may use it (``masks/`` for its compiled CPU kernel, ``data/``
for index digests, ``assets`` for downloads).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """``$MASKLLM_CACHE`` or ``~/.cache/maskllm_megatron`` (created)."""
    path = Path(os.environ.get("MASKLLM_CACHE") or Path.home() / ".cache" / "maskllm_megatron")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Exclusive inter-process lock on ``<cache>/.locks/<name>``."""
    lock_dir = cache_dir() / ".locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / name, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def file_digest(path: str | Path) -> str:
    """BLAKE2b (128-bit) of a file's bytes, read in blocks: a content key for caches."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
