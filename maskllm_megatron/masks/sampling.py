"""Logits -> masks: Gumbel-softmax sampling, the masked weight, hard masks, priors and statistics.

Shapes: a weight ``[rows, cols]`` has logits ``[rows, cols // M, C]`` (C = C(M, N) candidate patterns).

``masked_weight`` computes ``W * (softmax((logits * scale + gumbel) / tau) @ patterns)`` in one
autograd function. It never materialises per-group ``[1, C] @ [C, M]`` products: the {0,1} pattern
matrix is applied as sums of pattern probabilities (position j of a group keeps the probability mass of
the patterns that keep j; see ``mix_patterns``), which a compiled kernel fuses with the noise, the
softmax and the multiply into one pass over the logits. Only the pattern probabilities are kept for
backward, and the gradient of the sparse-weight regulariser ``-lambda * sum((W * mask)^2)`` is added
directly to the mask gradient, so that term reaches the logits and never the weight, and costs no
extra graph.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import cpu_kernel, triton_kernel
from .patterns import (NMSpec, candidate_patterns, check_groupable, pattern_positions, patterns_to_mask,
                       position_patterns)
from .rng import col_hash, gumbel_from_hashes, gumbel_grid, normal_grid, row_hash, stream_key


def logits_shape(weight_shape, spec: NMSpec) -> tuple[int, int, int]:
    rows, cols = weight_shape
    return rows, check_groupable(cols, spec), spec.num_patterns


def logit_columns(group_ids: torch.Tensor, spec: NMSpec) -> torch.Tensor:
    """Global flat column ids of the logits of the given global groups: ``group * C + k``."""
    c = spec.num_patterns
    return (group_ids.to(torch.int64)[:, None] * c + torch.arange(c, device=group_ids.device)).reshape(-1)


def gumbel_noise(key: int, row_ids: torch.Tensor, group_ids: torch.Tensor, spec: NMSpec) -> torch.Tensor:
    """``[len(row_ids), len(group_ids), C]`` Gumbel noise, a function of global positions only."""
    g = gumbel_grid(key, row_ids, logit_columns(group_ids, spec))
    return g.view(len(row_ids), len(group_ids), spec.num_patterns)


def init_logits(key: int, row_ids: torch.Tensor, group_ids: torch.Tensor, spec: NMSpec,
                std: float) -> torch.Tensor:
    """Initial logits N(0, std), a function of global positions only (identical at any TP)."""
    n = normal_grid(key, row_ids, logit_columns(group_ids, spec))
    return (n * std).view(len(row_ids), len(group_ids), spec.num_patterns)


def prior_overlap(prior_mask: torch.Tensor, spec: NMSpec) -> torch.Tensor:
    """``[rows, groups, C]``: how many positions pattern k and the prior mask both keep."""
    groups = prior_mask.to(torch.float32).reshape(prior_mask.shape[0], -1, spec.m)
    return groups @ candidate_patterns(spec, device=prior_mask.device).t()


def apply_prior(logits: torch.Tensor, prior_mask: torch.Tensor, spec: NMSpec, strength: float,
                std: Optional[float] = None) -> torch.Tensor:
    """MaskLLM prior: ``logits_k += (overlap_k - 1) * std(logits) * strength`` (returns a new tensor).

    Pass ``std`` computed over the whole (unsharded) layer to make the result layout-independent.
    For 2:4 the pattern equal to the prior gains ``std * strength``, disjoint ones lose as much.
    """
    if strength == 0:
        return logits.clone()
    if std is None:
        std = float(logits.float().std())
    if not std > 0:
        raise ValueError(f"the logits have standard deviation {std}, so the prior shift (a multiple of it) "
                         "would be 0 and the prior lost: initialise them with noise (init_std > 0)")
    shift = (prior_overlap(prior_mask, spec) - 1.0) * (std * strength)
    return logits + shift.to(logits.dtype)


def hard_mask(logits: torch.Tensor, spec: NMSpec, dtype=torch.float32) -> torch.Tensor:
    """The argmax pattern of every group as a {0,1} mask ``[rows, groups * M]``."""
    return patterns_to_mask(logits.argmax(dim=-1), spec, dtype=dtype)


def mix_patterns(probs: torch.Tensor, spec: NMSpec) -> torch.Tensor:
    """``probs [..., C] @ patterns [C, M]``: ``[..., M]``.

    Under torch.compile it is written as per-position sums, which fuse with the surrounding
    elementwise work into one pass; run eagerly, one matmul is faster than a dozen strided adds."""
    if torch.compiler.is_compiling():
        return torch.stack([_sum(probs[..., k] for k in ks) for ks in position_patterns(spec)], dim=-1)
    return probs @ candidate_patterns(spec, dtype=probs.dtype, device=probs.device)


def unmix_patterns(grad_mask: torch.Tensor, spec: NMSpec) -> torch.Tensor:
    """The transpose, ``grad_mask [..., M] @ patterns.T``: ``[..., C]`` (sums when compiled)."""
    if torch.compiler.is_compiling():
        return torch.stack([_sum(grad_mask[..., j] for j in js) for js in pattern_positions(spec)], dim=-1)
    return grad_mask @ candidate_patterns(spec, dtype=grad_mask.dtype, device=grad_mask.device).t()


def _sum(terms):
    terms = iter(terms)
    total = next(terms)
    for t in terms:
        total = total + t
    return total


def _sample_forward(weight, logits, rh, ch, coef, inv_tau, spec: NMSpec, hard: bool):
    """Noise + Gumbel-softmax + pattern mixture + multiply, in one pass (fusable by torch.compile).

    ``coef = scale / tau`` and ``inv_tau = 1 / tau`` are 0-d tensors so a compiled kernel is not
    recompiled when the schedules move.
    """
    rows, groups, c = logits.shape
    noise = gumbel_from_hashes(rh, ch).view(rows, groups, c)
    probs = torch.softmax(logits.float() * coef + noise * inv_tau, dim=-1)
    if hard:
        sel = torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)
    else:
        sel = probs
    mask = mix_patterns(sel, spec).view(rows, -1)
    # the soft mask is recomputed from the probabilities in backward: only the hard one is kept
    return weight * mask.to(weight.dtype), probs, (mask if hard else None)


def _sample_backward(grad_out, weight, probs, mask, coef, reg2, spec: NMSpec, need_weight_grad: bool):
    """Gradients of ``W * mask`` w.r.t. the logits (and W), with the regulariser term folded in.
    ``mask`` is the forward's hard mask, or None for the soft mask (recomputed here from ``probs``)."""
    rows, groups, c = probs.shape
    if mask is None:
        mask = mix_patterns(probs, spec).view(rows, -1)
    w = weight.float()
    grad_mask = grad_out.float() * w - reg2 * (w * w * mask)
    grad_probs = unmix_patterns(grad_mask.view(rows, groups, spec.m), spec)
    grad_logits = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True)) * coef
    grad_weight = grad_out * mask.to(grad_out.dtype) if need_weight_grad else None
    return grad_logits, grad_weight


_KERNELS = {}
_compile_failed = False


def _note_compile_failure(error: Exception) -> None:
    """torch.compile could not build the fused kernels here: warn once, and run eager from now on."""
    global _compile_failed
    if not _compile_failed:
        import warnings

        warnings.warn(f"maskllm: the torch.compile'd mask kernels failed to build ({type(error).__name__}: "
                      f"{str(error).splitlines()[0][:200] if str(error) else ''}); running the eager path (same "
                      "function, slower)", RuntimeWarning, stacklevel=3)
    _compile_failed = True


def _kernels(fused: bool):
    """(forward, backward) kernels: eager, or compiled by torch.compile (CPU C++ / GPU Triton)."""
    if fused not in _KERNELS:
        if fused:
            _KERNELS[fused] = (torch.compile(_sample_forward, dynamic=None),
                               torch.compile(_sample_backward, dynamic=None))
        else:
            _KERNELS[fused] = (_sample_forward, _sample_backward)
    return _KERNELS[fused]


def _one_pass_kernels(weight: torch.Tensor, logits: torch.Tensor, spec: NMSpec):
    """The hand-written one-pass kernels for this layer, or None (then the torch.compile'd ones run):
    the C++ CPU kernels (fp32 or bf16 2:4 on x86), or the Triton ones on CUDA when switched on
    (``MASKLLM_TRITON_KERNEL=1``). Both modules offer ``masked_weight_forward`` / ``_backward``."""
    for kernels in (cpu_kernel, triton_kernel):
        if kernels.supports(weight, logits, spec):
            return kernels
    return None


class _MaskedWeight(torch.autograd.Function):
    """``W * mask(logits, noise)``; saves only the pattern probabilities (and the hard mask)."""

    @staticmethod
    def forward(ctx, weight, logits, rh, ch, coef, inv_tau, reg2, spec, hard, fused):
        ctx.one_pass = _one_pass_kernels(weight, logits, spec) if fused is not False else None
        if fused is None:  # auto: the one-pass kernel, else torch.compile'd ones on CUDA, else eager
            fused = ctx.one_pass is not None or weight.is_cuda
        if fused and ctx.one_pass is None and _compile_failed:
            fused = False
        if ctx.one_pass is not None:
            out, probs, mask = ctx.one_pass.masked_weight_forward(weight, logits, rh, ch, coef, inv_tau, spec, hard)
        elif fused:
            try:
                out, probs, mask = _kernels(True)[0](weight, logits, rh, ch, coef, inv_tau, spec, hard)
            except Exception as e:  # no compiler / backend here: the eager path computes the same function
                _note_compile_failure(e)
                fused = False
        if ctx.one_pass is None and not fused:
            out, probs, mask = _kernels(False)[0](weight, logits, rh, ch, coef, inv_tau, spec, hard)
        ctx.save_for_backward(weight, probs, mask, coef, reg2)
        ctx.spec, ctx.fused = spec, fused
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, probs, mask, coef, reg2 = ctx.saved_tensors
        if ctx.one_pass is not None:
            grad_logits, grad_weight = ctx.one_pass.masked_weight_backward(
                grad_out, weight, probs, mask, coef, reg2, ctx.spec, ctx.needs_input_grad[0])
        else:
            _, backward_kernel = _kernels(ctx.fused)
            grad_logits, grad_weight = backward_kernel(grad_out, weight, probs, mask, coef, reg2, ctx.spec,
                                                       ctx.needs_input_grad[0])
        if not ctx.needs_input_grad[1]:
            grad_logits = None
        return grad_weight, grad_logits, None, None, None, None, None, None, None, None


def masked_weight(weight: torch.Tensor, logits: torch.Tensor, key: int, row_ids: torch.Tensor,
                  group_ids: torch.Tensor, spec: NMSpec, temperature: float, scale: float,
                  hard: bool = False, regularizer: float = 0.0, fused: bool | None = None) -> torch.Tensor:
    """Sampled masked weight ``W * (softmax((logits * scale + gumbel) / tau) @ patterns)``.

    The Gumbel noise is drawn from stream ``key`` at the GLOBAL rows ``row_ids`` and groups
    ``group_ids`` of this shard. ``hard=True`` uses the one-hot argmax sample in the forward and the
    soft gradient in the backward (straight-through). ``regularizer`` is lambda of the loss term
    ``-lambda * sum((W * mask)^2)``, already multiplied by whatever the LM loss is scaled with; its
    gradient goes to the logits only. ``fused`` picks the kernels (all compute the same function): True
    the fused ones, for fp32 or bf16 2:4 layers on x86 CPUs the one-pass C++ kernels of ``cpu_kernel``
    (faster logs, a few ULP off), on CUDA with ``MASKLLM_TRITON_KERNEL=1`` the one-pass Triton ones of
    ``triton_kernel``, else torch.compile'd ones; False the eager ones; None (the default) the fastest
    that runs here without compiling anything heavy: a one-pass kernel, else torch.compile'd on CUDA, else
    eager. A torch.compile that fails falls back to eager, once, with a warning.
    """
    dev = logits.device
    rh = row_hash(key, row_ids.to(dev))
    ch = col_hash(key, logit_columns(group_ids.to(dev), spec))
    f32 = dict(dtype=torch.float32, device=dev)
    coef = torch.tensor(scale / temperature, **f32)
    inv_tau = torch.tensor(1.0 / temperature, **f32)
    reg2 = torch.tensor(2.0 * regularizer, **f32)
    return _MaskedWeight.apply(weight, logits, rh, ch, coef, inv_tau, reg2, spec, bool(hard),
                               None if fused is None else bool(fused))


def soft_mask(logits: torch.Tensor, noise: torch.Tensor, spec: NMSpec, temperature: float,
              scale: float) -> torch.Tensor:
    """The sampled soft mask alone (plain autograd; for tests, statistics and the reference path)."""
    probs = torch.softmax((logits.float() * scale + noise) / temperature, dim=-1)
    mask = probs @ candidate_patterns(spec, device=logits.device)
    return mask.reshape(logits.shape[0], -1)


def noise_key(seed: int, layer_id: str, iteration: int, microbatch: int) -> int:
    """The Gumbel stream of one layer for one micro-batch of an iteration, numbered across the whole
    global batch (so the same data gets the same noise at any data-parallel size). The trailing 0 is a
    fixed part of every stream's key: saved runs resume, and recorded results reproduce, with it."""
    return stream_key("gumbel", seed, layer_id, iteration, microbatch, 0)


def init_key(seed: int, layer_id: str) -> int:
    return stream_key("init", seed, layer_id)
