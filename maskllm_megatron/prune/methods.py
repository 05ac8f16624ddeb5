"""One-shot N:M pruning methods, used as MaskLLM priors: magnitude, Wanda, SparseGPT.

All functions take a weight ``W: [out, in]`` and prune along the input dimension (groups of ``M``
consecutive columns keep ``N``). Masks are returned as ``W``-shaped float32 {0,1} tensors.
Pure torch; input statistics come from ``calibration.InputStats``.
"""
from __future__ import annotations

import torch

from maskllm_megatron.masks.patterns import NMSpec, check_groupable, topn_mask
from maskllm_megatron.prune.calibration import InputStats


def _check_weight(W: torch.Tensor, spec: NMSpec) -> None:
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(W.shape)}")
    check_groupable(W.shape[1], spec)


def magnitude_mask(W: torch.Tensor, spec: NMSpec) -> torch.Tensor:
    """Keep the ``N`` largest ``|W|`` of each group of ``M``."""
    _check_weight(W, spec)
    return topn_mask(W.detach().float().abs(), spec)


def wanda_mask(W: torch.Tensor, act_sq_norm: torch.Tensor, spec: NMSpec) -> torch.Tensor:
    """Wanda: keep the ``N`` largest ``|W_ij| * ||X_j||`` of each group of ``M``.

    ``act_sq_norm`` is the per-input-channel ``||X_j||^2`` (any constant normalisation, e.g. Wanda's
    ``scaler_row``; it does not change the mask).
    """
    _check_weight(W, spec)
    if act_sq_norm.shape != (W.shape[1],):
        raise ValueError(f"act_sq_norm has shape {tuple(act_sq_norm.shape)}, expected ({W.shape[1]},) "
                         f"for a weight of shape {tuple(W.shape)}")
    score = W.detach().float().abs() * act_sq_norm.detach().float().sqrt().reshape(1, -1)
    return topn_mask(score, spec)


class HessianError(RuntimeError):
    """A calibration Hessian is not positive definite (message: which and the fix)."""


def damped_hessian(H: torch.Tensor, percdamp: float, dtype: torch.dtype = torch.float32,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H + percdamp * mean(diag H) * I, dead)`` in ``dtype``: SparseGPT's dampening, shared by the
    prior and the reconstruction. Inputs that are always zero (``dead``, diag 0) carry no information;
    their diagonal is set to 1 so that ``H`` stays invertible."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute in float32 or float64, not {dtype}")
    if percdamp < 0:
        raise ValueError(f"percdamp {percdamp} must be >= 0")
    H = H.detach().to(device=device if device is not None else H.device, dtype=dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    return H, dead


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, spec: NMSpec, blocksize: int = 128,
                    percdamp: float = 0.01, update_weights: bool = False,
                    dtype: torch.dtype = torch.float32,
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT N:M (Frantar & Alistarh 2023), following the reference ``fasterprune``.

    ``H`` is the layer's input Hessian ``2/n X^T X`` (any positive scale). Columns are swept left to
    right in blocks of ``blocksize``; at the start of every group of ``M`` columns the ``N`` weights
    with the largest ``w^2 / [Hinv]_jj^2`` (on the OBS-updated weights) are kept, and each pruned
    column's error is spread over the not-yet-visited columns via the Cholesky factor of ``H^-1``.
    With ``mask`` given (an N:M {0,1} mask of ``W``'s shape) no pattern is chosen: the sweep keeps
    that mask and only the OBS weight update runs (reconstruction under a fixed mask).

    Returns ``(mask, weight)``: with ``update_weights=False`` the weight is ``W`` unchanged (the
    mask-only prior MaskLLM uses); with ``True`` it is the OBS-updated weight, zero where masked, in
    ``W``'s dtype. Computation runs in ``dtype`` (float32 or float64) whatever ``W``'s dtype is.
    """
    _check_weight(W, spec)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected ({cols}, {cols}) for weight {tuple(W.shape)}")
    if blocksize <= 0 or blocksize % spec.m != 0:
        raise ValueError(f"blocksize {blocksize} must be a positive multiple of M={spec.m}")
    if mask is not None:
        _check_mask(mask, W, spec)
    if spec.n == spec.m:  # nothing to prune
        return torch.ones(rows, cols, dtype=torch.float32, device=W.device), W.clone()

    H, dead = damped_hessian(H, percdamp, dtype, W.device)
    Wf = W.detach().to(dtype).clone()
    Wf[:, dead] = 0
    not_definite = HessianError(f"SparseGPT: the dampened Hessian is not positive definite (percdamp={percdamp}); "
                                "use more calibration tokens or a larger percdamp")
    L, info = torch.linalg.cholesky_ex(H)
    if info != 0:
        raise not_definite
    # H^-1 = L^-T L^-1 (a triangular solve: torch.cholesky_inverse is much slower on CPU), then the
    # upper Cholesky factor of H^-1, whose rows drive the OBS updates.
    Linv = torch.linalg.solve_triangular(L, torch.eye(cols, dtype=dtype, device=W.device), upper=False)
    Hinv, info = torch.linalg.cholesky_ex(Linv.t() @ Linv, upper=True)
    if info != 0:
        raise not_definite

    keep = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wf[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        keep1 = keep[:, i1:i2]  # a view: filled in place
        d_all = torch.diag(Hinv1)

        for i in range(i2 - i1):
            if i % spec.m == 0:  # this group's pattern: chosen on the current (updated) weights, or given
                if mask is not None:
                    keep1[:, i:i + spec.m] = mask[:, i1 + i:i1 + i + spec.m].bool()
                else:
                    score = W1[:, i:i + spec.m] ** 2 / d_all[i:i + spec.m].reshape(1, -1) ** 2
                    keep1[:, i:i + spec.m] = topn_mask(score, spec).bool()
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err

        Wf[:, i1:i2] = Q1
        Wf[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    kept = keep.to(torch.float32)
    if not update_weights:
        return kept, W.clone()
    return kept, Wf.to(W.dtype)


def _check_mask(mask: torch.Tensor, W: torch.Tensor, spec: NMSpec) -> None:
    if tuple(mask.shape) != tuple(W.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, the weight {tuple(W.shape)}")
    kept = (mask != 0).reshape(W.shape[0], -1, spec.m).sum(-1)
    if not bool((kept == spec.n).all()):
        raise ValueError(f"the mask is not exact {spec}: every group of {spec.m} must keep exactly {spec.n}")


@torch.no_grad()
def masked_lstsq(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, spec: NMSpec, percdamp: float = 0.01,
                 dtype: torch.dtype = torch.float32, chunk_bytes: int = 256 * 2**20,
                 cross: torch.Tensor | None = None) -> torch.Tensor:
    """The exact layer-wise reconstruction under a fixed N:M mask: for every row, the kept weights that
    best reproduce the dense row's output on the calibration inputs,

        w_S = argmin ||X w_S - X w||^2 = (H_SS)^-1 (H w)_S,   zero off S,

    with ``H`` the input Hessian ``2/n X^T X`` dampened as SparseGPT dampens it (``damped_hessian``:
    ``percdamp`` also pulls the solution towards the dense weights where the inputs say little). With
    ``cross`` = ``2/n X^T X_dense`` (the same tokens' inputs in the dense model) the target is the dense
    model's output instead, ``min ||X w_S - X_dense w||^2``: ``w_S = (H_SS)^-1 (cross w)_S``, which also
    undoes the error the blocks before brought into ``X``.
    Rows are solved in batches (one Cholesky factor per row: each row keeps its own columns), at most
    ``chunk_bytes`` of row Hessians at a time. Returns the weight in ``W``'s dtype, exactly zero (+0.0)
    where the mask is unset. ``HessianError`` when a row's Hessian is not positive definite."""
    _check_weight(W, spec)
    _check_mask(mask, W, spec)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected ({cols}, {cols}) for weight {tuple(W.shape)}")
    Hd, _ = damped_hessian(H, percdamp, dtype, W.device)
    Wf = W.detach().to(dtype)
    keep = mask.to(device=W.device) != 0
    k = cols // spec.m * spec.n
    # the kept columns of every row, in order: [rows, k]
    cols_kept = torch.sort(torch.where(keep, torch.arange(cols, device=W.device), cols), dim=1).values[:, :k]
    if cross is None:
        rhs = Wf @ Hd  # (H w)_S per row (H is symmetric)
    else:  # (cross w)_S, dampened as H is: the ridge pulls towards the dense weights in both cases
        rhs = Wf @ cross.to(device=W.device, dtype=dtype).t() + (Hd - H.to(device=W.device, dtype=dtype)).diagonal() * Wf
    rhs = rhs.gather(1, cols_kept)
    out = torch.zeros(rows, cols, dtype=dtype, device=W.device)
    step = max(1, chunk_bytes // (k * k * Hd.element_size()))
    for r0 in range(0, rows, step):
        idx = cols_kept[r0:r0 + step]
        H_ss = Hd[idx[:, :, None], idx[:, None, :]]  # [chunk, k, k]
        L, info = torch.linalg.cholesky_ex(H_ss)
        if bool((info != 0).any()):
            raise HessianError(f"reconstruction: the dampened Hessian of row {r0 + int((info != 0).nonzero()[0])} "
                               f"is not positive definite (percdamp={percdamp}); use more calibration tokens or a "
                               "larger percdamp")
        sol = torch.cholesky_solve(rhs[r0:r0 + step].unsqueeze(-1), L).squeeze(-1)
        out[r0:r0 + step].scatter_(1, idx, sol)
    out = torch.where(keep, out, torch.zeros((), dtype=dtype, device=W.device))  # +0.0 where masked
    return out.to(W.dtype)


RECONSTRUCTIONS = ("lstsq", "obs")


def reconstruct_weight(W: torch.Tensor, stats: InputStats, mask: torch.Tensor, spec: NMSpec, method: str = "lstsq",
                       percdamp: float = 0.01, blocksize: int = 128) -> torch.Tensor:
    """The kept weights of ``W`` under ``mask`` updated to match the dense layer's output on ``stats``'
    inputs (with target statistics: the dense model's output): ``lstsq`` (exact per-row least squares,
    ``masked_lstsq``) or ``obs`` (SparseGPT's OBS sweep with the mask given; the layer's own output only)."""
    if method == "lstsq":
        return masked_lstsq(W, stats.hessian, mask, spec, percdamp=percdamp, cross=stats.cross)
    if method == "obs":
        if stats.cross is not None:
            raise ValueError("the OBS sweep matches the layer's own output: use method lstsq for the dense model's")
        return sparsegpt_prune(W, stats.hessian, spec, blocksize=blocksize, percdamp=percdamp, update_weights=True,
                               mask=mask)[1]
    raise ValueError(f"unknown reconstruction method {method!r}: use one of {', '.join(RECONSTRUCTIONS)}")


METHODS = ("magnitude", "wanda", "sparsegpt")


def oneshot_mask(method: str, W: torch.Tensor, stats: InputStats | None, spec: NMSpec, **opts) -> torch.Tensor:
    """The N:M prior mask of ``W`` by ``method`` (one of ``METHODS``).

    ``stats`` (an ``InputStats`` of this layer's inputs) is needed by ``wanda`` (its ``sq_norm``) and
    ``sparsegpt`` (its ``hessian``); ``opts`` go to ``sparsegpt_prune`` (``blocksize``, ``percdamp``,
    ``dtype``). The weight is never changed: use ``sparsegpt_prune`` directly for OBS weight updates.
    """
    method = str(method).lower()
    if method not in METHODS:
        raise ValueError(f"unknown one-shot method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "magnitude":
        if opts:
            raise TypeError(f"magnitude takes no options, got {sorted(opts)}")
        return magnitude_mask(W, spec)

    if stats is None:
        raise ValueError(f"{method} needs calibration statistics of the layer's inputs (InputStats), got None")
    if stats.in_features != W.shape[-1]:
        raise ValueError(f"statistics cover {stats.in_features} input features but the weight has {W.shape[-1]}")
    if stats.nsamples == 0:
        raise ValueError(f"{method} needs calibration statistics, but no tokens were recorded")
    if method == "wanda":
        if opts:
            raise TypeError(f"wanda takes no options, got {sorted(opts)}")
        return wanda_mask(W, stats.sq_norm, spec)

    if stats.hessian is None:
        raise ValueError("sparsegpt needs the input Hessian: collect InputStats(..., hessian=True)")
    if "update_weights" in opts:
        raise TypeError("oneshot_mask never updates weights; call sparsegpt_prune(..., update_weights=True)")
    mask, _ = sparsegpt_prune(W, stats.hessian, spec, **opts)
    return mask


@torch.no_grad()
def reconstruction_error(W: torch.Tensor, W_pruned: torch.Tensor, X_or_stats) -> float:
    """``||X W^T - X W_pruned^T||_F^2`` over calibration inputs.

    ``X_or_stats`` is either the inputs ``X: [..., in]`` or an ``InputStats`` with a Hessian, from
    which the same value is ``trace(D H D^T) * n / 2`` with ``D = W - W_pruned``.
    """
    if W.shape != W_pruned.shape:
        raise ValueError(f"weights differ in shape: {tuple(W.shape)} vs {tuple(W_pruned.shape)}")
    if isinstance(X_or_stats, InputStats):
        if X_or_stats.hessian is None:
            raise ValueError("reconstruction_error needs InputStats with a Hessian (or the inputs X)")
        H = X_or_stats.hessian.double()
        if X_or_stats.cross is not None:  # against the dense model's output: ||X Wp^T - X_dense W^T||^2
            Wd, Wp = W.double().to(H.device), W_pruned.double().to(H.device)
            G, T = X_or_stats.cross.double(), X_or_stats.target_hessian.double()
            value = ((Wp @ H) * Wp).sum() - 2 * ((Wp @ G) * Wd).sum() + ((Wd @ T) * Wd).sum()
            return float(value * X_or_stats.nsamples / 2)
        D = (W.double() - W_pruned.double()).to(H.device)
        return float(((D @ H) * D).sum() * X_or_stats.nsamples / 2)
    X = X_or_stats.detach().reshape(-1, W.shape[-1]).double()
    D = (W.double() - W_pruned.double()).to(X.device)
    return float(((X @ D.t()) ** 2).sum())
