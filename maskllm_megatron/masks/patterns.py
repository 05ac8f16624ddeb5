"""N:M candidate patterns and the conversions between masks, patterns and groups.

A weight ``[rows, cols]`` is cut into groups of ``M`` consecutive weights along the input (last)
dimension. Each group keeps exactly ``N`` weights, chosen among the ``C(M, N)`` candidate patterns.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from math import comb

import torch


@dataclass(frozen=True)
class NMSpec:
    """An N:M sparsity structure: keep ``n`` of every ``m`` consecutive weights."""

    n: int = 2
    m: int = 4

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 < self.n <= self.m:
            raise ValueError(f"invalid N:M {self.n}:{self.m}: need integers with 0 < N <= M (e.g. 2:4)")

    @property
    def num_patterns(self) -> int:
        return comb(self.m, self.n)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def parse(cls, text: str) -> "NMSpec":
        """Parse ``"2:4"``."""
        try:
            n, m = (int(x) for x in str(text).split(":"))
        except ValueError:
            raise ValueError(f"invalid N:M {text!r}: write it as N:M, e.g. 2:4") from None
        return cls(n, m)


@lru_cache(maxsize=None)
def _patterns_cpu(n: int, m: int) -> torch.Tensor:
    rows = []
    for kept in itertools.combinations(range(m), n):
        row = [0.0] * m
        for k in kept:
            row[k] = 1.0
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def candidate_patterns(spec: NMSpec, dtype=torch.float32, device=None) -> torch.Tensor:
    """``[C(M,N), M]`` {0,1} patterns in lexicographic order of kept positions.

    For 2:4: 1100, 1010, 1001, 0110, 0101, 0011 (the order of the MaskLLM reference).
    """
    return _patterns_cpu(spec.n, spec.m).to(dtype=dtype, device=device)


def pattern_positions(spec: NMSpec) -> tuple[tuple[int, ...], ...]:
    """For every candidate pattern (``candidate_patterns`` order), the positions it keeps."""
    return tuple(itertools.combinations(range(spec.m), spec.n))


def position_patterns(spec: NMSpec) -> tuple[tuple[int, ...], ...]:
    """For every position 0..M-1 of a group, the candidate patterns that keep it."""
    return tuple(tuple(k for k, kept in enumerate(pattern_positions(spec)) if j in kept) for j in range(spec.m))


def check_groupable(cols: int, spec: NMSpec, what: str = "weight") -> int:
    """Number of groups along the input dimension; a clear error when ``cols % M != 0``."""
    if cols % spec.m != 0:
        raise ValueError(
            f"{what} has {cols} input columns, not a multiple of M={spec.m} for {spec} sparsity: "
            f"exclude this layer from sparsification or choose an M that divides {cols}"
        )
    return cols // spec.m


def to_groups(t: torch.Tensor, spec: NMSpec) -> torch.Tensor:
    """``[rows, cols]`` -> ``[rows, cols // M, M]`` (a view)."""
    check_groupable(t.shape[-1], spec)
    return t.reshape(*t.shape[:-1], t.shape[-1] // spec.m, spec.m)


def patterns_to_mask(pattern_index: torch.Tensor, spec: NMSpec, dtype=torch.float32) -> torch.Tensor:
    """Pattern indices ``[rows, groups]`` -> {0,1} mask ``[rows, groups * M]``."""
    pats = candidate_patterns(spec, dtype=dtype, device=pattern_index.device)
    mask = pats[pattern_index]
    return mask.reshape(*pattern_index.shape[:-1], pattern_index.shape[-1] * spec.m)


def mask_to_patterns(mask: torch.Tensor, spec: NMSpec) -> torch.Tensor:
    """{0,1} N:M mask ``[rows, cols]`` -> pattern indices ``[rows, cols // M]`` (int64).

    Raises when a group is not a valid N:M pattern.
    """
    groups = to_groups(mask, spec).to(torch.float32)
    pats = candidate_patterns(spec, device=mask.device)
    overlap = groups @ pats.t()  # [rows, G, C]; equals N exactly for the matching pattern
    best = overlap.argmax(dim=-1)
    valid = (groups.sum(-1) == spec.n) & (overlap.max(dim=-1).values == spec.n)
    if not bool(valid.all()):
        bad = (~valid).nonzero()[0].tolist()
        raise ValueError(f"mask is not {spec} at group {bad} (row, group): expected exactly {spec.n} ones of {spec.m}")
    return best


def topn_mask(scores: torch.Tensor, spec: NMSpec) -> torch.Tensor:
    """{0,1} N:M mask keeping the ``N`` largest scores of each group of ``M`` (ties: lower index)."""
    groups = to_groups(scores, spec)
    # A stable descending sort makes ties deterministic (lowest index wins).
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., : spec.n]
    mask = torch.zeros_like(groups, dtype=torch.float32)
    mask.scatter_(-1, order, 1.0)
    return mask.reshape(scores.shape)


def is_valid_nm(mask: torch.Tensor, spec: NMSpec) -> bool:
    """True when every group of ``M`` has at most ``N`` non-zeros."""
    return bool(((to_groups(mask, spec) != 0).sum(-1) <= spec.n).all())
