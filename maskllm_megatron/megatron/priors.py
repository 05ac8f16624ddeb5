"""One-shot N:M priors (magnitude, Wanda, SparseGPT) computed in place on a sparsified GPTModel.

Calibration is sequential, block by block, as SparseGPT and Wanda do: the calibration batches run up
to the first transformer layer once; then each layer collects its linears' input statistics on the
current hidden states, gets its masks, and re-runs with those masks to produce the inputs of the next
layer. (The reference MaskLLM collects all Hessians from the dense model in one pass.)

What each method computes under tensor parallelism (the result equals the TP=1 result):

* Column-parallel (``linear_qkv``, ``linear_fc1``): the rank holds some output rows and sees the full
  input, so its statistics are the full ones. All three methods treat rows independently, so the
  local rows' masks are exactly the TP=1 masks of those rows.
* Row-parallel (``linear_proj``, ``linear_fc2``): the rank holds ``W[:, cols_r]`` and sees ``x[:, cols_r]``.
  Magnitude and Wanda are local to each group of M inputs, so the shard's own weights and input norms
  give the TP=1 result. SparseGPT sweeps all input columns of a row with the full Hessian, so the input
  is all-gathered along the hidden dimension to build the full ``H``, the weight shards are
  all-gathered, each rank prunes ``1/TP`` of the rows on the full width, and the rows are all-gathered
  again before every rank keeps its own column slice.

Pipeline parallel calibration is not supported (build the model at PP=1 for this step; the resulting
checkpoint loads at any PP). Every data-parallel rank runs the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ..launch import all_reduce_floats
from ..masks import NMSpec
from ..prune.calibration import InputStats
from ..prune.methods import METHODS, magnitude_mask, reconstruction_error, sparsegpt_prune, wanda_mask
from .layers import MaskedRowParallelLinear, _MaskedLinearMixin
from .sparsify import masked_layers


@dataclass(frozen=True)
class PriorConfig:
    """How to compute one-shot priors."""

    method: str = "sparsegpt"
    update_weights: bool = False  # SparseGPT's OBS weight update (MaskLLM's prior uses mask only)
    blocksize: int = 128
    percdamp: float = 0.01
    sequential: bool = True  # feed each block the outputs of the already-pruned blocks before it

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown prior method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.update_weights and self.method != "sparsegpt":
            raise ValueError("update_weights is SparseGPT's OBS update: use it with method='sparsegpt'")


class _Stop(Exception):
    pass


def _capture_first_layer_inputs(model, batches) -> list[dict]:
    """Run the embedding part of the model on every batch; return the first layer's call kwargs."""
    first = model.decoder.layers[0]
    captured = []

    def hook(_module, args, kwargs):
        captured.append(dict(kwargs, hidden_states=args[0] if args else kwargs["hidden_states"]))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for forward in batches:
            try:
                forward(model)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _tp_all_gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def _stats_hook(layer: _MaskedLinearMixin, stats: InputStats, gather_input: bool):
    def hook(_module, args):
        x = args[0]
        if gather_input:
            x = _tp_all_gather(x, -1, layer.tp_group)
        stats.add(x.detach())

    return layer.register_forward_pre_hook(hook)


def _layer_mask(layer: _MaskedLinearMixin, stats: InputStats,
                cfg: PriorConfig) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[float]]:
    """(local {0,1} mask, updated local weight or None, SparseGPT's reconstruction error of the rows this
    rank pruned or None) for one masked linear. The errors of a layer's TP ranks add up to its TP=1 error."""
    spec: NMSpec = layer.nm
    W = layer.weight.detach()
    if cfg.method == "magnitude":
        return magnitude_mask(W, spec), None, None
    if stats.nsamples == 0:
        raise ValueError(f"{layer.mask_layer_id}: no calibration tokens reached this layer: {cfg.method} needs "
                         "calibration batches (at least one sample)")
    if cfg.method == "wanda":
        return wanda_mask(W, stats.sq_norm, spec), None, None
    rank, size = layer._tp()
    if isinstance(layer, MaskedRowParallelLinear) and size > 1:
        full = layer.gather_global(W)  # [out, in]
        if full.shape[0] % size:
            raise ValueError(f"{layer.mask_layer_id}: SparseGPT splits the {full.shape[0]} output rows over TP={size} "
                             "ranks: compute this prior at a TP size that divides them (e.g. TP=1)")
        rows = full.shape[0] // size
        part = slice(rank * rows, (rank + 1) * rows)
        mask_rows, w_rows = sparsegpt_prune(full[part], stats.hessian, spec, blocksize=cfg.blocksize,
                                            percdamp=cfg.percdamp, update_weights=cfg.update_weights)
        error = reconstruction_error(full[part], w_rows.to(W.dtype) * mask_rows, stats)
        mask_full = _tp_all_gather(mask_rows, 0, layer.tp_group)
        cols = slice(rank * W.shape[1], (rank + 1) * W.shape[1])
        new_w = _tp_all_gather(w_rows.to(W.dtype), 0, layer.tp_group)[:, cols] if cfg.update_weights else None
        return mask_full[:, cols].contiguous(), new_w, error
    mask, new_w = sparsegpt_prune(W, stats.hessian, spec, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                                  update_weights=cfg.update_weights)
    new_w = new_w.to(W.dtype) if cfg.update_weights else None
    return mask, new_w, reconstruction_error(W, (W if new_w is None else new_w) * mask, stats)


@torch.no_grad()
def compute_priors(model: torch.nn.Module, batches: Iterable, cfg: PriorConfig,
                   strength: Optional[float] = None) -> dict[str, float]:
    """Compute and store the one-shot prior of every masked layer of a sparsified ``model``.

    ``batches`` is a list of callables ``forward(model)`` that run the model on one calibration batch
    (e.g. ``lambda m: gpt_forward(m, tokens)``). The masks become each layer's ``prior_mask`` and shift
    its logits with ``strength`` (default: the mask config's ``prior_strength``). With
    ``update_weights`` the weights get SparseGPT's OBS update. Returns, for SparseGPT, each layer's
    reconstruction error ``||X W^T - X (W*mask)^T||^2`` on its calibration inputs, for the whole layer
    (summed over tensor-parallel ranks: the same figure at any TP size).
    """
    layers = list(masked_layers(model))
    if not layers:
        raise ValueError("compute_priors needs a sparsified model: call sparsify(model, config) first")
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.masking_enabled = False  # dense until its block is pruned
        layer.use_prior_mask = False
    batches = list(batches)
    inputs = _capture_first_layer_inputs(model, batches)
    errors = {}
    try:
        for block in model.decoder.layers:
            block_layers = [m for m in block.modules() if isinstance(m, _MaskedLinearMixin)]
            stats = {}
            hooks = []
            for layer in block_layers:
                gather = (cfg.method == "sparsegpt" and isinstance(layer, MaskedRowParallelLinear)
                          and layer._tp()[1] > 1)
                width = layer.weight.shape[1] * (layer._tp()[1] if gather else 1)
                stats[layer] = InputStats(width, hessian=cfg.method == "sparsegpt", device=layer.weight.device)
                hooks.append(_stats_hook(layer, stats[layer], gather))
            outputs = [block(**kw)[0] for kw in inputs]
            for h in hooks:
                h.remove()
            for layer in block_layers:
                mask, new_w, error = _layer_mask(layer, stats[layer], cfg)
                if error is not None:
                    errors[layer.mask_layer_id] = all_reduce_floats([error], group=layer.tp_group)[0]
                if new_w is not None:
                    layer.weight.copy_(new_w)
                layer.set_prior(mask, strength)
                layer.masking_enabled = True
                layer.use_prior_mask = True
            if cfg.sequential:
                outputs = [block(**kw)[0] for kw in inputs]
            inputs = [dict(kw, hidden_states=out) for kw, out in zip(inputs, outputs)]
    finally:
        for layer in layers:
            layer.masking_enabled = True
            layer.use_prior_mask = False
        model.train(was_training)
    return errors
