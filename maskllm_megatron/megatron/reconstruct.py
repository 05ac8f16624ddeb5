"""Reconstruction of the kept weights under fixed N:M masks, in place on a sparsified GPTModel.

MaskLLM learns the best mask for frozen weights; the kept weights can then be refitted so that every
masked linear reproduces its dense output on calibration inputs: ``min ||X W_dense^T - X W^T||`` over
the weights the mask keeps, the others exactly zero. Each layer keeps whatever mask it evaluates with
(the argmax of its learned logits, or its prior / a loaded mask with ``use_prior_mask``): the N:M
pattern never changes, only the values under it.

The walk is SparseGPT's (``priors.calibrate_blockwise``): block by block, each block's linears collect
their input Hessians on the outputs of the blocks already reconstructed, then are solved with
``prune.methods.reconstruct_weight`` (exact per-row least squares, or SparseGPT's OBS sweep with the
mask given) at full width, so TP=2 gives TP=1's weights. Calibrate at PP=1; the result loads anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..launch import all_reduce_floats
from ..prune.methods import RECONSTRUCTIONS, reconstruct_weight, reconstruction_error
from .priors import _solve_full_width, calibrate_blockwise
from .sparsify import masked_layers


TARGETS = ("layer", "dense")


@dataclass(frozen=True)
class ReconstructConfig:
    """How the kept weights are refitted: ``method`` lstsq (exact, one Cholesky solve per row) or obs
    (SparseGPT's sweep, ~20x cheaper, less exact); ``target`` what each layer is fitted to: ``layer``, the
    dense layer's output on this model's inputs (SparseGPT's objective), or ``dense``, the dense MODEL's
    output at that layer (its inputs come from the dense model, so the fit also undoes the error of the
    layers before; lstsq only); ``true_sequential`` solves a block's linears one by one, each on the
    inputs the ones before it give once solved; ``percdamp`` SparseGPT's dampening of the Hessian;
    ``blocksize`` the OBS sweep's column block."""

    method: str = "lstsq"
    percdamp: float = 0.01
    blocksize: int = 128
    target: str = "layer"
    true_sequential: bool = False
    sequential: bool = True  # each block calibrates on the outputs of the reconstructed blocks before it

    def __post_init__(self):
        if self.method not in RECONSTRUCTIONS:
            raise ValueError(f"unknown reconstruction method {self.method!r}: use one of {', '.join(RECONSTRUCTIONS)}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown reconstruction target {self.target!r}: use one of {', '.join(TARGETS)}")
        if self.target == "dense" and self.method != "lstsq":
            raise ValueError("target dense needs method lstsq (the OBS sweep fits the layer's own output)")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp {self.percdamp} must be >= 0 (SparseGPT's default: 0.01)")
        if self.blocksize < 1:
            raise ValueError(f"blocksize {self.blocksize} must be positive (SparseGPT's default: 128)")

    def to_dict(self) -> dict:
        return {"method": self.method, "percdamp": self.percdamp, "blocksize": self.blocksize,
                "target": self.target, "true_sequential": self.true_sequential, "sequential": self.sequential}


@torch.no_grad()
def reconstruct_weights(model: torch.nn.Module, batches: Iterable, cfg: ReconstructConfig) -> dict[str, tuple[float, float]]:
    """Refit every masked layer's kept weights under its current evaluation mask (see the module doc).

    ``batches`` are callables ``forward(model)``, one per calibration batch. Returns each layer's
    calibration error ``||X W_dense^T - X W^T||^2`` (whole layer, the same figure at any TP size) before
    (``W = W_dense * mask``) and after the refit, keyed by the layer's id; with ``target`` dense the
    error is against the dense model's output at that layer."""
    errors = {}

    def solve_block(block_layers, stats):
        for layer in block_layers:
            if stats[layer].nsamples == 0:
                raise ValueError(f"{layer.mask_layer_id}: no calibration tokens reached this layer: reconstruction "
                                 "needs calibration batches")
            mask = layer.eval_mask()

            def solve(w, layer_stats, rows_mask, spec=layer.nm):
                return rows_mask, reconstruct_weight(w, layer_stats, rows_mask, spec, cfg.method, cfg.percdamp,
                                                     cfg.blocksize)

            try:
                _, new_w, (before, after, rows_mask) = _solve_full_width(layer, stats[layer], solve, mask)
            except RuntimeError as e:  # a Hessian that is not positive definite: name the layer
                raise type(e)(f"{layer.mask_layer_id}: {e}") from None
            pair = [reconstruction_error(before, before * rows_mask.to(before.dtype), stats[layer]),
                    reconstruction_error(before, after, stats[layer])]
            errors[layer.mask_layer_id] = tuple(all_reduce_floats(pair, group=layer.tp_group))
            layer.weight.copy_(new_w)

    calibrate_blockwise(model, batches, True, solve_block, cfg.sequential, cfg.true_sequential,
                        dense_targets=cfg.target == "dense")
    for layer in masked_layers(model):
        layer._eval_mask_cache = None
    return errors
