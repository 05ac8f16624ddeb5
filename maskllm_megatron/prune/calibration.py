"""Streaming statistics of a linear layer's inputs, for the one-shot priors (Wanda, SparseGPT).

A linear ``y = x @ W.T`` with ``W: [out, in]`` sees activations ``x: [tokens, in]``. We keep

* ``nsamples``  - number of tokens seen (every leading dimension of ``x`` is flattened);
* ``sq_norm``   - ``[in]``, the sum over tokens of ``x_j ** 2`` (``||X_j||^2``). Wanda's ``scaler_row``
                  is ``sq_norm / n``. (Wanda's own code divides by the number of *sequences*; any
                  constant factor leaves every Wanda mask unchanged.)
* ``hessian``   - ``[in, in]``, ``H = 2/n * sum_t x_t x_t^T``, updated as SparseGPT does:
                  ``H *= n/(n+t); x *= sqrt(2/(n+t)); H += x x^T``. (SparseGPT counts sequences too;
                  SparseGPT is invariant to the scale of ``H``, and counting tokens makes
                  ``trace(D H D^T) * n/2 == ||X D^T||_F^2`` exact.)

Combining partial statistics (what the megatron glue must do)
-------------------------------------------------------------
* Different tokens (data parallel ranks, micro-batches, sequence-parallel shards of the *same*
  layer input): add ``nsamples``, add ``sq_norm``, token-weighted average of ``hessian``
  (``H = (n1 H1 + n2 H2) / (n1 + n2)``). As a collective: all-reduce ``nsamples``, ``sq_norm`` and
  ``hessian * nsamples``, then divide the last by the total ``nsamples``.
* Column-parallel layers (QKV, MLP in): every TP rank holds some output rows but sees the *full*
  input, so each rank's statistics already are the full ones. Do not merge them across TP ranks
  (that double-counts; harmless for the masks but wrong for ``nsamples``). With sequence parallel,
  hook the all-gathered input, or merge the per-rank sequence shards as "different tokens" above.
* Row-parallel layers (attention out, MLP out): rank ``r`` holds ``W[:, cols_r]`` and sees only
  ``x[:, cols_r]``. Its ``sq_norm`` and the diagonal block ``H[cols_r, cols_r]`` are exactly the full
  statistics restricted to its columns, so magnitude and Wanda
  masks computed on the shard equal the full-layer masks restricted to it (groups of M never straddle
  shards when the shard width is a multiple of M).
  SparseGPT is different: its OBS sweep walks *all* input columns of a row and propagates the error
  through the off-diagonal blocks ``H[cols_r, cols_s]``, which no single rank can build from its own
  slice. For a mask equal to the TP=1 mask, a Row-parallel layer must all-gather its input along the
  hidden dimension (same tokens on every rank) to accumulate the full ``H``, all-gather the ``W``
  shards into the full ``[out, in]`` weight, run ``sparsegpt_prune`` on the full weight (on every
  rank, or on one and broadcast), and keep its own column slice of the mask. Running SparseGPT on
  the local block alone is a *different* (block-diagonal-H) approximation, not the published method.
"""
from __future__ import annotations

import torch


class InputStats:
    """Streaming input statistics of one linear layer (see the module docstring)."""

    def __init__(self, in_features: int, hessian: bool = True, dtype: torch.dtype = torch.float32,
                 device=None, targets: bool = False):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulate in float32 or float64, not {dtype}")
        if targets and not hessian:
            raise ValueError("target statistics need the Hessian as well")
        self.in_features = int(in_features)
        self.nsamples = 0
        self.sq_norm = torch.zeros(self.in_features, dtype=dtype, device=device)
        square = lambda: torch.zeros(self.in_features, self.in_features, dtype=dtype, device=device)  # noqa: E731
        self.hessian = square() if hessian else None
        # with targets: the layer's inputs in the DENSE model beside its inputs here, for a reconstruction
        # that matches the dense model's outputs: cross = 2/n X^T X_dense, target_hessian = 2/n X_dense^T X_dense
        self.cross = square() if targets else None
        self.target_hessian = square() if targets else None

    @property
    def dtype(self) -> torch.dtype:
        return self.sq_norm.dtype

    @property
    def scaler_row(self) -> torch.Tensor:
        """Wanda's per-input-channel ``||X_j||^2 / n``."""
        if self.nsamples == 0:
            raise ValueError("no calibration tokens were added to these statistics")
        return self.sq_norm / self.nsamples

    @torch.no_grad()
    def add(self, x: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Accumulate a batch of layer inputs ``x: [..., in]`` (any leading shape: tokens), and with target
        statistics the same tokens' inputs ``target`` in the dense model."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, these statistics expect {self.in_features}")
        if (target is None) != (self.cross is None):
            raise ValueError("these statistics take a target with every input" if self.cross is not None
                             else "these statistics keep no targets: make them with targets=True")
        x = x.detach().reshape(-1, self.in_features).to(device=self.sq_norm.device, dtype=self.dtype)
        t = x.shape[0]
        if t == 0:
            return
        self.sq_norm += (x * x).sum(dim=0)
        if self.hessian is not None:
            n = self.nsamples
            scale = (2.0 / (n + t)) ** 0.5
            xs = x * scale
            for acc in (self.hessian, self.cross, self.target_hessian):
                if acc is not None:
                    acc *= n / (n + t)
            self.hessian += xs.t() @ xs
            if self.cross is not None:
                xt = target.detach().reshape(-1, self.in_features).to(xs) * scale
                if xt.shape != xs.shape:
                    raise ValueError(f"target has shape {tuple(target.shape)}, the input {tuple(x.shape)}")
                self.cross += xs.t() @ xt
                self.target_hessian += xt.t() @ xt
        self.nsamples += t

    def __repr__(self) -> str:
        return (f"InputStats(in_features={self.in_features}, nsamples={self.nsamples}, "
                f"hessian={self.hessian is not None}, dtype={self.dtype})")


def record_inputs(module: torch.nn.Module, stats: InputStats):
    """Forward pre-hook feeding ``module``'s first positional input into ``stats``; returns the handle.

    Call ``handle.remove()`` when calibration is done.
    """
    def hook(_module, args):
        stats.add(args[0])

    return module.register_forward_pre_hook(hook)
