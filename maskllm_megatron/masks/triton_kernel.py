"""Hand-written Triton kernels of the masked weight for CUDA GPUs: each direction ONE pass over the logits.

On an H200 the torch.compile'd ``_sample_forward`` / ``_sample_backward`` (sampling.py) made a masked
layer ~2x a dense one (benchmarks/RESULTS.md, "GPU"): ~1.5 ms per 16.8M weights where reading and
writing the bytes takes ~0.15 ms. These kernels do what the C++ CPU kernels do (csrc/), in Triton: a
program takes ``BLOCK`` consecutive groups of one row, loads their ``[BLOCK, C]`` logits (padded to a
power of two), draws the counter-based noise of rng.py bit for bit, takes the softmax over the patterns
in registers, mixes the patterns into the ``[BLOCK, M]`` mask with the {0,1} keep table and multiplies
it into the weight; the backward recomputes the soft mask from the saved probabilities and reduces
back onto the patterns the same way. Scalars (``scale / tau``, ``1 / tau``, ``2 lambda``) are read
from device tensors, so nothing synchronises with the host.

Not yet measured on a GPU, so off by default: ``MASKLLM_TRITON_KERNEL=1`` turns it on for CUDA layers
(``benchmarks/gpu_smoke.py`` times it against the compiled path). The tests run it on CPU through
Triton's interpreter (``TRITON_INTERPRET=1``) against the eager path. The kernels themselves are in
``masked_weight_triton.py``, imported on first use (CPU runs never import Triton).
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

from .patterns import NMSpec, candidate_patterns

BLOCK = 128  # groups per program: [128, C_PAD] logits and [128, M] weights in registers


@lru_cache(maxsize=None)
def available() -> bool:
    """Whether Triton is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def supports(weight: torch.Tensor, logits: torch.Tensor, spec: NMSpec) -> bool:
    """Whether these kernels run this layer: switched on (``MASKLLM_TRITON_KERNEL=1``), CUDA tensors
    (or any, under Triton's CPU interpreter, ``TRITON_INTERPRET=1``: how the tests run them), Triton
    importable, M a power of two (Triton's index ranges)."""
    on_device = (weight.is_cuda and logits.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1"
    return (os.environ.get("MASKLLM_TRITON_KERNEL", "0") == "1" and on_device and available()
            and spec.m & (spec.m - 1) == 0)


@lru_cache(maxsize=None)
def _keep_table(spec: NMSpec, device: torch.device) -> torch.Tensor:
    """``[C_PAD, M]`` float32 on ``device``: 1 where pattern k keeps position j; padding rows 0."""
    keep = candidate_patterns(spec)
    pad = torch.zeros(_padded(spec.num_patterns), spec.m)
    pad[:spec.num_patterns] = keep
    return pad.to(device)


def _scalar(x, device) -> torch.Tensor:
    """A 0-d float32 tensor on ``device`` (the kernels load their scalars from memory)."""
    return torch.as_tensor(x, dtype=torch.float32).to(device).reshape(())


def _padded(c: int) -> int:
    """The next power of two (Triton's index ranges): 6 -> 8."""
    return 1 << (c - 1).bit_length()


def _launch(rows: int, groups: int, spec: NMSpec, block: int):
    """(grid, blocks per row, the kernels' compile-time sizes): one program per ``block`` groups of a row."""
    blocks_per_row = -(-groups // block)
    meta = dict(C=spec.num_patterns, M=spec.m, C_PAD=_padded(spec.num_patterns), BLOCK_G=block)
    return (rows * blocks_per_row,), blocks_per_row, meta


def masked_weight_forward(weight: torch.Tensor, logits: torch.Tensor, row_hash: torch.Tensor,
                          col_hash: torch.Tensor, coef, inv_tau, spec: NMSpec, hard: bool, block: int = BLOCK):
    """``(W * mask, probs, hard mask or None)`` as ``sampling._sample_forward`` returns them.

    ``coef`` / ``inv_tau``: floats or 0-d tensors; ``block``: groups per program (tests vary it)."""
    from .masked_weight_triton import forward_kernel

    rows, groups, _ = logits.shape
    weight, logits = weight.contiguous(), logits.detach().contiguous()
    probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    out = torch.empty_like(weight)
    mask = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if hard else None
    grid, blocks_per_row, meta = _launch(rows, groups, spec, block)
    dev = logits.device
    forward_kernel[grid](logits, weight, row_hash.contiguous(), col_hash.contiguous(), _keep_table(spec, dev),
                         _scalar(coef, dev), _scalar(inv_tau, dev), probs, out, mask if hard else out, groups,
                         blocks_per_row, HARD=hard, **meta)
    return out, probs, mask


def masked_weight_backward(grad_out: torch.Tensor, weight: torch.Tensor, probs: torch.Tensor, mask, coef, reg2,
                           spec: NMSpec, need_weight_grad: bool, block: int = BLOCK):
    """``(grad_logits, grad_weight or None)`` as ``sampling._sample_backward`` returns them."""
    from .masked_weight_triton import backward_kernel

    rows, groups, _ = probs.shape
    grad_out, weight, probs = grad_out.contiguous(), weight.contiguous(), probs.contiguous()
    grad_logits = torch.empty_like(probs)
    grad_weight = torch.empty_like(grad_out) if need_weight_grad else None
    grid, blocks_per_row, meta = _launch(rows, groups, spec, block)
    dev = probs.device
    backward_kernel[grid](grad_out, weight, probs, mask.contiguous() if mask is not None else probs,
                          _keep_table(spec, dev), _scalar(coef, dev), _scalar(reg2, dev), grad_logits,
                          grad_weight if need_weight_grad else grad_logits, groups, blocks_per_row,
                          HARD=mask is not None, WEIGHT_GRAD=need_weight_grad, **meta)
    return grad_logits, grad_weight
