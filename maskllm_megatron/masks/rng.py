"""Counter-based random numbers that depend only on *what* is sampled, never on the layout.

The Gumbel noise of a mask logit is a pure function of (seed, layer identity, iteration, micro-batch,
data-parallel rank, the logit's GLOBAL position in the unsharded weight). A tensor-parallel shard
computes the noise of its own rows/groups from their global indices, so a TP=1 run and a TP=2 run
sample identical masks, and a checkpoint resumed on another layout continues the same random stream.

The hash is a murmur3-style 32-bit finaliser evaluated on int32 tensors: multiplication wraps
modulo 2^32 (two's complement), and right shifts are made logical by masking the sign-extended bits,
so it runs anywhere torch runs, CPU or GPU. int32 rather than int64 because AVX2 has no 64-bit
multiply: the 2-D hash is the largest cost of drawing the noise.
"""
from __future__ import annotations

import hashlib
import math

import torch

_M32 = 0xFFFFFFFF
_C1 = 0x85EBCA6B - (1 << 32)  # murmur3 fmix32 constants as signed int32
_C2 = 0xC2B2AE35 - (1 << 32)


def stream_key(*parts) -> int:
    """A stable 32-bit key for a tuple of ints/strings (same on every process and machine)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on int32 tensors (the 32 bits of the unsigned value, two's complement)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * _C2
    return x ^ ((x >> 16) & 0xFFFF)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return torch.where(x >= (1 << 31), x - (1 << 32), x).to(torch.int32)


def row_hash(key: int, row_ids: torch.Tensor) -> torch.Tensor:
    """Per-row half of the (key, row, col) hash: 1-D int32, cheap."""
    return _mix32(_to_int32((row_ids.to(torch.int64) * 0x9E3779B1 + key) & _M32))


def col_hash(key: int, col_ids: torch.Tensor) -> torch.Tensor:
    """Per-column half of the (key, row, col) hash: 1-D int32, cheap."""
    return _mix32(_to_int32((col_ids.to(torch.int64) * 0x7FEB352D + (key ^ 0x5BD1E995)) & _M32))


def uniform_from_hashes(rh: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
    """Uniform float32 samples in the open interval (0, 1) for every (row, col) pair.

    23 bits of the combined hash: ``(h + 0.5) / 2^23`` is exact in float32 and never rounds to 1.
    """
    h = (_mix32(rh[:, None] ^ ch[None, :]) >> 9) & 0x7FFFFF
    return (h.to(torch.float32) + 0.5) * (1.0 / 8388608.0)


def gumbel_from_hashes(rh: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel samples ``-log(-log(u))`` for every (row, col) pair."""
    return -torch.log(-torch.log(uniform_from_hashes(rh, ch)))


def uniform_grid(key: int, row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """Uniform samples in (0, 1), one per (row, col) pair: ``[len(row_ids), len(col_ids)]``."""
    return uniform_from_hashes(row_hash(key, row_ids), col_hash(key, col_ids))


def gumbel_grid(key: int, row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel samples, one per (row, col) pair."""
    return gumbel_from_hashes(row_hash(key, row_ids), col_hash(key, col_ids))


def normal_grid(key: int, row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """Standard normal samples (Box-Muller on two independent uniform grids)."""
    u1 = uniform_grid(key, row_ids, col_ids)
    u2 = uniform_grid(key ^ 0x2545F491, row_ids, col_ids)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
