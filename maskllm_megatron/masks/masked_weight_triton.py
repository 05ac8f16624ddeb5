"""The Triton kernels of the masked weight (GPU): the forward and backward that ``triton_kernel`` launches.

A program takes ``BLOCK_G`` consecutive groups of one row: their logits ``[BLOCK_G, C_PAD]`` (C patterns
padded to a power of two), their weights ``[BLOCK_G, M]``. Imported only when the kernels are used, so
that CPU runs do not import Triton; decorated at import, so ``TRITON_INTERPRET=1`` (the tests, on CPU)
must be set before.
"""
import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    """murmur3 fmix32 on uint32 (rng._mix32: the same bits)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _times_mask(x, mask):
    """``x * mask.to(x.dtype)`` as torch computes it: the product of the two values in fp32, rounded
    to x's dtype (written out because Triton's interpreter gets bf16 arithmetic wrong)."""
    return (x.to(tl.float32) * mask.to(x.dtype).to(tl.float32)).to(x.dtype)


@triton.jit
def _tile(groups, blocks_per_row, C: tl.constexpr, M: tl.constexpr, C_PAD: tl.constexpr,
          BLOCK_G: tl.constexpr):
    """This program's row, groups and offsets: logits ``[BLOCK_G, C_PAD]``, weights ``[BLOCK_G, M]``."""
    pid = tl.program_id(0)
    r = pid // blocks_per_row
    g = (pid % blocks_per_row) * BLOCK_G + tl.arange(0, BLOCK_G)
    k = tl.arange(0, C_PAD)
    j = tl.arange(0, M)
    flat = r.to(tl.int64) * groups + g  # the groups' flat index in [rows * groups]
    in_row = g < groups
    lmask = in_row[:, None] & (k[None, :] < C)
    wmask = in_row[:, None] & (j[None, :] < M)
    return r, g, k, j, flat[:, None] * C + k[None, :], lmask, flat[:, None] * M + j[None, :], wmask


@triton.jit
def forward_kernel(logits_ptr, weight_ptr, rh_ptr, ch_ptr, keep_ptr, coef_ptr, inv_tau_ptr, probs_ptr,
                   out_ptr, hard_ptr, groups, blocks_per_row, C: tl.constexpr, M: tl.constexpr,
                   C_PAD: tl.constexpr, BLOCK_G: tl.constexpr, HARD: tl.constexpr):
    r, g, k, j, loff, lmask, woff, wmask = _tile(groups, blocks_per_row, C, M, C_PAD, BLOCK_G)
    logit = tl.load(logits_ptr + loff, mask=lmask, other=0.0).to(tl.float32)
    # noise: rng.gumbel_from_hashes at (row r, logit column g * C + k)
    ch = tl.load(ch_ptr + g[:, None] * C + k[None, :], mask=lmask, other=0).to(tl.uint32, bitcast=True)
    rh = tl.load(rh_ptr + r).to(tl.uint32, bitcast=True)
    h = (_mix32(rh ^ ch) >> 9) & 0x7FFFFF
    u = (h.to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    z = logit * tl.load(coef_ptr) - tl.log(-tl.log(u)) * tl.load(inv_tau_ptr)
    z = tl.where(k[None, :] < C, z, float("-inf"))  # padding patterns get no mass
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    probs = e / tl.sum(e, axis=1)[:, None]
    tl.store(probs_ptr + loff, probs, mask=lmask)
    if HARD:  # the one-hot argmax (first maximum, as torch.argmax)
        sel = (k[None, :] == tl.argmax(probs, axis=1)[:, None]).to(tl.float32)
    else:
        sel = probs
    keep = tl.load(keep_ptr + k[:, None] * M + j[None, :])  # [C_PAD, M]
    mask = tl.sum(sel[:, :, None] * keep[None, :, :], axis=1)  # position j: the mass of patterns keeping j
    w = tl.load(weight_ptr + woff, mask=wmask, other=0.0)
    tl.store(out_ptr + woff, _times_mask(w, mask), mask=wmask)
    if HARD:
        tl.store(hard_ptr + woff, mask, mask=wmask)


@triton.jit
def backward_kernel(grad_out_ptr, weight_ptr, probs_ptr, hard_ptr, keep_ptr, coef_ptr, reg2_ptr,
                    grad_logits_ptr, grad_weight_ptr, groups, blocks_per_row, C: tl.constexpr,
                    M: tl.constexpr, C_PAD: tl.constexpr, BLOCK_G: tl.constexpr, HARD: tl.constexpr,
                    WEIGHT_GRAD: tl.constexpr):
    r, g, k, j, loff, lmask, woff, wmask = _tile(groups, blocks_per_row, C, M, C_PAD, BLOCK_G)
    probs = tl.load(probs_ptr + loff, mask=lmask, other=0.0)
    keep = tl.load(keep_ptr + k[:, None] * M + j[None, :])
    if HARD:
        mask = tl.load(hard_ptr + woff, mask=wmask, other=0.0)
    else:  # the soft mask, recomputed from the probabilities
        mask = tl.sum(probs[:, :, None] * keep[None, :, :], axis=1)
    grad_out = tl.load(grad_out_ptr + woff, mask=wmask, other=0.0)
    w = tl.load(weight_ptr + woff, mask=wmask, other=0.0).to(tl.float32)
    # d(loss)/d(mask) = g * W - 2 lambda W^2 mask (the regulariser's gradient folded in)
    grad_mask = grad_out.to(tl.float32) * w - tl.load(reg2_ptr) * (w * w * mask)
    if WEIGHT_GRAD:
        tl.store(grad_weight_ptr + woff, _times_mask(grad_out, mask), mask=wmask)
    grad_probs = tl.sum(grad_mask[:, None, :] * keep[None, :, :], axis=2)  # pattern k: its kept positions
    dot = tl.sum(probs * grad_probs, axis=1)
    grad_logits = probs * (grad_probs - dot[:, None]) * tl.load(coef_ptr)  # softmax backward
    tl.store(grad_logits_ptr + loff, grad_logits, mask=lmask)
