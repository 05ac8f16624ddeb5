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


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, spec: NMSpec, blocksize: int = 128,
                    percdamp: float = 0.01, update_weights: bool = False,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT N:M (Frantar & Alistarh 2023), following the reference ``fasterprune``.

    ``H`` is the layer's input Hessian ``2/n X^T X`` (any positive scale). Columns are swept left to
    right in blocks of ``blocksize``; at the start of every group of ``M`` columns the ``N`` weights
    with the largest ``w^2 / [Hinv]_jj^2`` (on the OBS-updated weights) are kept, and each pruned
    column's error is spread over the not-yet-visited columns via the Cholesky factor of ``H^-1``.

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
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute in float32 or float64, not {dtype}")
    if spec.n == spec.m:  # nothing to prune
        return torch.ones(rows, cols, dtype=torch.float32, device=W.device), W.clone()

    Wf = W.detach().to(dtype).clone()
    H = H.detach().to(device=W.device, dtype=dtype).clone()

    # Inputs that are always zero carry no information: keep H invertible and zero those weights.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wf[:, dead] = 0

    idx = torch.arange(cols, device=W.device)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    not_definite = RuntimeError(f"SparseGPT: the dampened Hessian is not positive definite (percdamp={percdamp}); "
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
            if i % spec.m == 0:  # choose this group's pattern on the current (updated) weights
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

    mask = keep.to(torch.float32)
    if not update_weights:
        return mask, W.clone()
    return mask, Wf.to(W.dtype)


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
        D = (W.double() - W_pruned.double()).to(H.device)
        return float(((D @ H) * D).sum() * X_or_stats.nsamples / 2)
    X = X_or_stats.detach().reshape(-1, W.shape[-1]).double()
    D = (W.double() - W_pruned.double()).to(X.device)
    return float(((X @ D.t()) ** 2).sum())
