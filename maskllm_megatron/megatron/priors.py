"""One-shot N:M priors (magnitude, Wanda, SparseGPT) computed in place on a sparsified GPTModel.

Calibration is sequential, block by block, as SparseGPT and Wanda do: the calibration batches run up
to the first transformer layer once; then each layer collects its linears' input statistics on the
current hidden states, gets its masks, and re-runs with those masks to produce the inputs of the next
layer. (The reference MaskLLM collects all Hessians from the dense model in one pass.)

What each method computes under tensor parallelism (the result equals the TP=1 result):

* Column-parallel (``linear_qkv``, ``linear_fc1``): the rank holds some output rows and sees the full
  input (under sequence parallelism its sequence shard, gathered for the statistics as the layer gathers
  it), so its statistics are the full ones. All three methods treat rows independently, so the
  local rows' masks are exactly the TP=1 masks of those rows.
* Row-parallel (``linear_proj``, ``linear_fc2``): the rank holds ``W[:, cols_r]`` and sees ``x[:, cols_r]``.
  Magnitude and Wanda are local to each group of M inputs, so the shard's own weights and input norms
  give the TP=1 result. SparseGPT sweeps all input columns of a row with the full Hessian, so the input
  is all-gathered along the hidden dimension to build the full ``H``, the weight shards are
  all-gathered, each rank prunes ``1/TP`` of the rows on the full width, and the rows are all-gathered
  again before every rank keeps its own column slice.

Pipeline parallel calibration is not supported (build the model at PP=1 for this step; the resulting
checkpoint loads at any PP). Every data-parallel rank runs the same batches. Under expert parallelism the
dispatcher gathers the (identical) tokens of the EP ranks, so each routed expert's statistics hold every
routed token EP times: the same averages, hence the same masks (SparseGPT's summed error is EP times larger).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch

from .parallel import all_reduce_floats
from ..masks import NMSpec
from ..prune.calibration import InputStats
from ..prune.methods import magnitude_mask, oneshot_mask, reconstruction_error, sparsegpt_prune
from .configs import PriorConfig  # noqa: F401 (compute_priors' config, importable from here too)
from .layers import MaskedRowParallelLinear, MaskMode, _MaskedLinearMixin
from .sparsify import dense_forward, masked_layers


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


def _input_hook(layer: _MaskedLinearMixin, gather_input: bool, sink):
    """A forward pre-hook handing ``sink`` the layer's input (all-gathered over TP along the hidden
    dimension when asked). Under sequence parallelism a column-parallel layer is handed its rank's
    sequence shard, which it all-gathers itself: the hook gathers the whole sequence too."""
    def hook(_module, args):
        x = args[0]
        if getattr(layer, "sequence_parallel", False) and layer.partition_dim == 0:
            x = _tp_all_gather(x, 0, layer.tp_group)
        if gather_input:
            x = _tp_all_gather(x, -1, layer.tp_group)
        sink(x.detach())

    return layer.register_forward_pre_hook(hook)


@contextlib.contextmanager
def _original_weights(originals: dict):
    """The block's layers forward with the weights they had before it was solved (the dense model)."""
    current = {layer: layer.weight.data for layer in originals}
    for layer, weight in originals.items():
        layer.weight.data = weight
    try:
        yield
    finally:
        for layer, weight in current.items():
            layer.weight.data = weight


def _solve_full_width(layer: _MaskedLinearMixin, stats: InputStats, solve, mask: Optional[torch.Tensor] = None):
    """Run ``solve(W_rows, stats, mask_rows) -> (mask_rows, weight_rows)`` on this shard's rows at the
    layer's FULL input width (``mask``: the local shard of a given mask, or None), and return this
    shard's ``(mask, weight, rows)``, ``rows`` = (the rows solved here before, after, their mask), full
    width, from which the caller measures the layer's error (summed over TP: the whole layer's).

    Column-parallel layers (and TP=1) hold full rows: ``solve`` sees the local weight and mask. A
    row-parallel shard holds a column slice of every row, which an OBS sweep or a least-squares solve
    cannot work on alone: the weight (and mask) are all-gathered, each rank solves ``1/TP`` of the rows
    on the full width with the full Hessian (the hook gathered the inputs), the rows are all-gathered
    again and every rank keeps its own column slice. Either way the result equals TP=1's."""
    W = layer.weight.detach()
    rank, size = layer._tp()
    if not (isinstance(layer, MaskedRowParallelLinear) and size > 1):
        new_mask, new_w = solve(W, stats, mask)
        new_w = new_w.to(W.dtype)
        return new_mask, new_w, (W, new_w, new_mask)
    full = layer.gather_global(W)  # [out, in]
    if full.shape[0] % size:
        raise ValueError(f"{layer.mask_layer_id}: the {full.shape[0]} output rows do not split over TP={size} "
                         "ranks for the full-width solve: calibrate at a TP size that divides them (e.g. TP=1)")
    rows = full.shape[0] // size
    part = slice(rank * rows, (rank + 1) * rows)
    mask_rows = layer.gather_global(mask)[part] if mask is not None else None
    mask_rows, w_rows = solve(full[part], stats, mask_rows)
    w_rows = w_rows.to(W.dtype)
    cols = slice(rank * W.shape[1], (rank + 1) * W.shape[1])
    new_mask = _tp_all_gather(mask_rows, 0, layer.tp_group)[:, cols].contiguous()
    new_w = _tp_all_gather(w_rows, 0, layer.tp_group)[:, cols].contiguous()
    return new_mask, new_w, (full[part], w_rows, mask_rows)


def _layer_mask(layer: _MaskedLinearMixin, stats: InputStats,
                cfg: PriorConfig) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[float]]:
    """(local {0,1} mask, updated local weight or None, SparseGPT's reconstruction error of the rows this
    rank pruned or None) for one masked linear. The errors of a layer's TP ranks add up to its TP=1 error.
    A routed expert that no calibration token reached gets the magnitude mask (``unreached_expert``)."""
    spec: NMSpec = layer.nm
    W = layer.weight.detach()
    if stats.nsamples == 0:  # (magnitude never calibrates: compute_priors sets it without this walk)
        if not unreached_expert(layer):
            raise ValueError(f"{layer.mask_layer_id}: no calibration tokens reached this layer: {cfg.method} needs "
                             "calibration batches (at least one sample)")
        return magnitude_mask(W, spec), None, None
    if cfg.method != "sparsegpt":  # local to each group of M inputs: the shard's own weights and statistics
        return oneshot_mask(cfg.method, W, stats, spec), None, None

    def solve(w, layer_stats, _mask):
        return sparsegpt_prune(w, layer_stats.hessian, spec, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                               update_weights=cfg.update_weights)

    mask, new_w, (before, after, rows_mask) = _solve_full_width(layer, stats, solve)
    error = reconstruction_error(before, after * rows_mask.to(after.dtype), stats)
    return mask, (new_w if cfg.update_weights else None), error


def unreached_expert(layer: _MaskedLinearMixin) -> bool:
    """Whether ``layer`` is in a routed expert (its calibration inputs are the tokens routed to it, possibly none)."""
    from .model_builder import is_expert_name

    return is_expert_name(layer.mask_layer_id)


def calibrate_blockwise(model: torch.nn.Module, batches: Iterable, needs_hessian: bool, solve_block,
                        sequential: bool = True, true_sequential: bool = False, dense_targets: bool = False,
                        fit_block=None) -> None:
    """The calibration walk shared by the priors and the reconstruction, block by block as SparseGPT does.

    The calibration batches (callables ``forward(model)``) run up to the first transformer block once.
    Then for each block: its masked linears run dense on the block's inputs and collect their input
    statistics (with ``needs_hessian`` the Hessian, for which row-parallel shards all-gather their
    inputs); ``solve_block(layers, stats)`` sets their masks / weights and their mode; with
    ``sequential`` the block runs again as solved to make the next block's inputs (else the dense
    outputs are passed on). Every masked layer forwards dense (``MaskMode.DENSE``) until it is solved; it
    is back in its own mode when ``solve_block`` (or ``fit_block``) sees it, so its ``eval_mask`` is
    the mask it evaluates with, and ``solve_block`` may set another (the priors: ``PRIOR``).

    ``true_sequential`` solves the block's linears one at a time in order (GPTQ's "true sequential"):
    each collects its statistics with the linears before it already solved. ``dense_targets`` also runs
    the DENSE model (original weights, no masks) beside it and gives each layer's statistics that
    model's inputs as targets (``InputStats(targets=True)``). The model ends in its training mode with
    the masks ``solve_block`` set.

    ``fit_block(block, layers, inputs, targets)``, given instead of ``solve_block``, fits a whole block at
    once: ``inputs`` are the block's call kwargs per batch (this model's hidden states), ``targets`` the
    dense block's outputs per batch, on the dense model's hidden states with ``dense_targets``, else on
    ``inputs``. No statistics are collected then."""
    layers = list(masked_layers(model))
    if not layers:
        raise ValueError("calibration needs a sparsified model: call sparsify(model, config) first")
    was_training = model.training
    model.eval()
    modes = {layer: layer.mask_mode for layer in layers}
    for layer in layers:
        layer.set_mask_mode(MaskMode.DENSE)  # dense until solved
    batches = list(batches)
    inputs = _capture_first_layer_inputs(model, batches)
    dense_inputs = list(inputs) if dense_targets else None
    try:
        for block in model.decoder.layers:
            block_layers = [m for m in block.modules() if isinstance(m, _MaskedLinearMixin)]
            originals = ({layer: layer.weight.detach().clone() for layer in block_layers}
                         if dense_targets and fit_block is None else {})
            groups = [[layer] for layer in block_layers] if true_sequential else [block_layers]
            outputs = None
            if fit_block is not None:  # every layer of the block is still dense: its outputs are the targets
                with dense_forward(block):
                    outputs = [block(**kw)[0] for kw in (dense_inputs if dense_targets else inputs)]
                for layer in block_layers:
                    layer.set_mask_mode(modes[layer])
                fit_block(block, block_layers, inputs, outputs)
                groups = []
            for group in groups:
                stats, gather = {}, {}
                for layer in group:
                    gather[layer] = needs_hessian and isinstance(layer, MaskedRowParallelLinear) and layer._tp()[1] > 1
                    width = layer.weight.shape[1] * (layer._tp()[1] if gather[layer] else 1)
                    stats[layer] = InputStats(width, hessian=needs_hessian, device=layer.weight.device,
                                              targets=dense_targets)
                outputs = []
                for b, kw in enumerate(inputs):
                    targets = {}
                    if dense_targets:  # this batch's inputs of the group's layers in the dense model
                        hooks = [_input_hook(l, gather[l], lambda x, l=l: targets.__setitem__(l, x)) for l in group]
                        with _original_weights(originals), dense_forward(block):
                            block(**dense_inputs[b])
                        for h in hooks:
                            h.remove()
                    hooks = [_input_hook(l, gather[l], lambda x, l=l: stats[l].add(x, targets.get(l))) for l in group]
                    outputs.append(block(**kw)[0])
                    for h in hooks:
                        h.remove()
                for layer in group:
                    layer.set_mask_mode(modes[layer])
                solve_block(group, stats)
            if dense_targets:
                if fit_block is not None:  # the targets were the dense outputs
                    dense_out = outputs
                else:
                    with _original_weights(originals), dense_forward(block):
                        dense_out = [block(**kw)[0] for kw in dense_inputs]
                dense_inputs = [dict(kw, hidden_states=out) for kw, out in zip(dense_inputs, dense_out)]
            if sequential:
                outputs = [block(**kw)[0] for kw in inputs]
            inputs = [dict(kw, hidden_states=out) for kw, out in zip(inputs, outputs)]
    finally:
        for layer in layers:
            if layer.mask_mode is MaskMode.DENSE:  # not reached: the walk stopped on an error
                layer.set_mask_mode(modes[layer])
        model.train(was_training)


@torch.no_grad()
def compute_priors(model: torch.nn.Module, batches: Iterable, cfg: PriorConfig,
                   strength: Optional[float] = None, fallbacks: Optional[list] = None) -> dict[str, float]:
    """Compute and store the one-shot prior of every masked layer of a sparsified ``model``.

    ``batches`` is a list of callables ``forward(model)`` that run the model on one calibration batch
    (e.g. ``lambda m: gpt_forward(m, tokens)``). The masks become each layer's ``prior_mask`` and shift
    its logits with ``strength`` (default: the mask config's ``prior_strength``). With
    ``update_weights`` the weights get SparseGPT's OBS update. Returns, for SparseGPT, each layer's
    reconstruction error ``||X W^T - X (W*mask)^T||^2`` on its calibration inputs, for the whole layer
    (summed over tensor-parallel ranks: the same figure at any TP size).

    Mixture of experts: each routed expert calibrates on the tokens the router sends it (the expert's
    linears see exactly those); an expert no calibration token reached gets the magnitude mask, which is
    printed, and its layer ids are appended to ``fallbacks`` when a list is given.
    """
    errors = {}
    layers = list(masked_layers(model))
    for layer in layers:
        layer.set_mask_mode(MaskMode.LEARN)
    if cfg.method == "magnitude":  # the weights alone: no calibration walk, any pipeline layout
        for layer in layers:
            layer.set_prior(oneshot_mask("magnitude", layer.weight.detach(), None, layer.nm), strength)
        return errors
    unreached = []

    def solve_block(block_layers, stats):
        for layer in block_layers:
            if stats[layer].nsamples == 0 and unreached_expert(layer):
                unreached.append(layer.mask_layer_id)
            mask, new_w, error = _layer_mask(layer, stats[layer], cfg)
            if error is not None:
                errors[layer.mask_layer_id] = all_reduce_floats([error], group=layer.tp_group)[0]
            if new_w is not None:
                layer.weight.copy_(new_w)
            layer.set_prior(mask, strength)
            layer.set_mask_mode(MaskMode.PRIOR)  # the next blocks see this block pruned

    try:
        calibrate_blockwise(model, batches, cfg.method == "sparsegpt", solve_block, cfg.sequential)
    finally:
        for layer in layers:
            layer.set_mask_mode(MaskMode.LEARN)
    if unreached:
        print(f"[maskllm] {cfg.method} prior: no calibration token was routed to {len(unreached)} expert linear(s) "
              f"on this rank; they get the magnitude mask: {', '.join(unreached)}", flush=True)
    if fallbacks is not None:
        fallbacks.extend(unreached)
    return errors
