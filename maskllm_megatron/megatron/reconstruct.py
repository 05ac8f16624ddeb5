"""Reconstruction of the kept weights under fixed N:M masks, in place on a sparsified GPTModel.

MaskLLM learns the best mask for frozen weights; the kept weights can then be refitted so that every
masked linear reproduces its dense output on calibration inputs: ``min ||X W_dense^T - X W^T||`` over
the weights the mask keeps, the others exactly zero. Each layer keeps whatever mask it evaluates with
(the argmax of its learned logits, or in the ``PRIOR`` mode its prior / a loaded mask): the N:M
pattern never changes, only the values under it.

The walk is SparseGPT's (``priors.calibrate_blockwise``): block by block, each block's linears collect
their input Hessians on the outputs of the blocks already reconstructed, then are solved with
``prune.methods.reconstruct_weight`` (exact per-row least squares, or SparseGPT's OBS sweep with the
mask given) at full width, so TP=2 gives TP=1's weights. Calibrate at PP=1; the result loads anywhere.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .parallel import all_reduce_floats
from ..prune.methods import reconstruct_weight, reconstruction_error
from .configs import ReconstructConfig
from .priors import _solve_full_width, calibrate_blockwise
from .layers import MaskMode
from .sparsify import masked_layers


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

    def fit(block, block_layers, inputs, targets):
        errors[_block_name(block_layers)] = fit_block(block_layers, lambda kw: block(**kw)[0], inputs, targets,
                                                      cfg.epochs, cfg.lr)

    calibrate_blockwise(model, batches, cfg.method != "block", solve_block, cfg.sequential, cfg.true_sequential,
                        dense_targets=cfg.target == "dense", fit_block=fit if cfg.method == "block" else None)
    for layer in masked_layers(model):
        layer._eval_mask_cache = None
    return errors


def _block_name(block_layers) -> str:
    """A block's key in the error report (``layers.<global number>``, from its first masked layer's id)."""
    import re

    lid = block_layers[0].mask_layer_id
    m = re.match(r"layers\.\d+", lid)
    return m.group(0) if m else lid


def token_relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per token (the last axis holds its features), ``||output - target||^2 / ||target||^2``.

    The loss of a block fit: what comes after a block sees each token's hidden state through an RMS or
    layer norm, so an error matters relative to that token's norm. A plain squared error would be ruled by
    the few tokens that carry massive activations (SmolLM2-135M: the first token's hidden state reaches a
    norm of ~23,000 in the middle layers, ~150-700 elsewhere), and a fit to them ruins the others."""
    output, target = output.float(), target.float()
    return ((output - target) ** 2).sum(-1) / (target ** 2).sum(-1).clamp_min(1e-12)


def fit_block(block_layers, run, inputs: list, targets: list, epochs: int, lr: float,
              loss=token_relative_error) -> tuple[float, float]:
    """Fit the kept weights of ``block_layers`` (the masked linears of one block, under their evaluation
    masks) so that ``run(inputs[b])`` reproduces ``targets[b]``: Adam on the mean of ``loss`` (per-element
    errors, e.g. per token), ``epochs`` passes over the batches in order, the learning rate cosine from
    ``lr`` to ``lr / 10``. The masked weights stay exactly +0.0 (their gradient is masked and the weights
    are re-masked after every step). Under tensor parallelism every rank computes the same loss (the
    block's output is replicated) and updates its own shard, so the result is TP=1's up to floating-point
    order. Returns the summed ``loss`` over the calibration batches before and after the fit (the whole
    block's, at any TP size)."""
    import math

    layers = list(block_layers)
    masks = [layer.eval_mask() != 0 for layer in layers]
    weights = [layer.weight for layer in layers]
    frozen = [w.requires_grad for w in weights]
    modes = [layer.mask_mode for layer in layers]
    zero = torch.zeros((), dtype=weights[0].dtype, device=weights[0].device)

    def sq_error() -> float:
        with torch.no_grad():
            return sum(float(loss(run(kw), t).sum()) for kw, t in zip(inputs, targets))

    try:
        for layer, w, keep in zip(layers, weights, masks):
            layer.set_mask_mode(MaskMode.DENSE)  # the (masked) weight itself forwards, and gets the gradient
            w.data = torch.where(keep, w.data, zero)
            w.requires_grad_(True)
        before = sq_error()
        optimizer = torch.optim.Adam(weights, lr=lr)
        total = epochs * len(inputs)
        step = 0
        for _ in range(epochs):
            for kw, target in zip(inputs, targets):
                for group in optimizer.param_groups:
                    group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
                with torch.enable_grad():
                    grads = torch.autograd.grad(loss(run(kw), target).mean(), weights)
                for w, g, keep in zip(weights, grads, masks):
                    w.grad = torch.where(keep, g, zero)
                optimizer.step()
                with torch.no_grad():
                    for w, keep in zip(weights, masks):
                        w.copy_(torch.where(keep, w, zero))
                step += 1
        after = sq_error()
    finally:
        for layer, w, req, mode in zip(layers, weights, frozen, modes):
            w.grad = None
            w.requires_grad_(req)
            layer.set_mask_mode(mode)
            layer._eval_mask_cache = None
    return before, after
