"""The Triton mask kernels (masks/triton_kernel.py) on CPU through Triton's interpreter, against the
eager ``_sample_forward`` / ``_sample_backward`` (plain torch ops). Run by tests/test_masks.py in a
fresh process, because ``TRITON_INTERPRET`` must be set before the kernels are decorated.

    TRITON_INTERPRET=1 python tests/scripts/check_triton_kernel.py      # prints "ok <cases>"
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 (the kernels run on CPU only interpreted)"

import torch  # noqa: E402

from maskllm_megatron.masks import triton_kernel  # noqa: E402
from maskllm_megatron.masks.patterns import NMSpec  # noqa: E402
from maskllm_megatron.masks.rng import col_hash, row_hash  # noqa: E402
from maskllm_megatron.masks.sampling import _sample_backward, _sample_forward, logit_columns  # noqa: E402


def check(spec: NMSpec, hard: bool, dtype: torch.dtype, rows: int, groups: int, block: int) -> None:
    torch.manual_seed(0)
    c = spec.num_patterns
    W = torch.randn(rows, groups * spec.m).to(dtype)
    L = (torch.randn(rows, groups, c) * 3).to(dtype)
    rh, ch = row_hash(99, torch.arange(rows) + 40), col_hash(99, logit_columns(torch.arange(groups) + 7, spec))
    coef, inv_tau, reg2 = torch.tensor(2.5), torch.tensor(1 / 0.7), torch.tensor(0.3)
    out, probs, mask = _sample_forward(W, L, rh, ch, coef, inv_tau, spec, hard)
    t_out, t_probs, t_mask = triton_kernel.masked_weight_forward(W, L, rh, ch, coef, inv_tau, spec, hard, block)
    assert t_out.dtype == out.dtype and t_probs.dtype == torch.float32
    torch.testing.assert_close(t_probs, probs, rtol=0, atol=2e-6)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(t_out, out, **tol)
    if hard:
        assert torch.equal(t_mask, mask) and torch.equal(t_mask.sum(-1), torch.full((rows,), groups * float(spec.n)))
    else:
        assert t_mask is None
    grad_out = torch.randn(rows, groups * spec.m).to(dtype)
    g_logits, g_weight = _sample_backward(grad_out, W, probs, mask, coef, reg2, spec, True)
    t_logits, t_weight = triton_kernel.masked_weight_backward(grad_out, W, probs, mask, coef, reg2, spec, True, block)
    assert t_logits.dtype == torch.float32 and t_weight.dtype == dtype
    torch.testing.assert_close(t_logits, g_logits, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(t_weight, g_weight, **tol)
    t_logits2, no_weight = triton_kernel.masked_weight_backward(grad_out, W, probs, mask, 2.5, 0.3, spec, False,
                                                                block)
    assert no_weight is None and torch.equal(t_logits2, t_logits)


def check_autograd_wiring() -> None:
    """``masked_weight(fused=True)`` routed to these kernels (as on CUDA with MASKLLM_TRITON_KERNEL=1):
    bf16 weight and logits, the 0-d scalar tensors passed through, the logits' gradient in their dtype."""
    from maskllm_megatron.masks import cpu_kernel, sampling

    spec = NMSpec(2, 4)
    W = torch.randn(6, 44).bfloat16()
    L = torch.randn(6, 11, 6).bfloat16().requires_grad_(True)
    calls = []
    real_fwd, real_bwd = triton_kernel.masked_weight_forward, triton_kernel.masked_weight_backward
    cpu_kernel.supports = lambda *a: False
    triton_kernel.supports = lambda *a: True
    triton_kernel.masked_weight_forward = lambda *a, **k: (calls.append("fwd"), real_fwd(*a, **k))[1]
    triton_kernel.masked_weight_backward = lambda *a, **k: (calls.append("bwd"), real_bwd(*a, **k))[1]
    results = []
    for fused in (False, True):
        L.grad = None
        out = sampling.masked_weight(W, L, 5, torch.arange(6), torch.arange(11), spec, 0.8, 3.0, regularizer=0.05,
                                     fused=fused)
        out.float().backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        results.append((out.detach(), L.grad.clone()))
    assert calls == ["fwd", "bwd"], calls
    assert results[1][1].dtype == torch.bfloat16
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-2, atol=1e-3)


cases = [(NMSpec(2, 4), hard, dtype, 3, 37, 16) for hard in (False, True) for dtype in (torch.float32, torch.bfloat16)]
cases += [(NMSpec(2, 4), False, torch.float32, 2, 200, triton_kernel.BLOCK),  # the default block, one tail
          (NMSpec(4, 8), True, torch.float32, 2, 5, 4), (NMSpec(1, 4), False, torch.float32, 2, 9, 8)]
for case in cases:
    check(*case)
check_autograd_wiring()
print("ok", len(cases) + 1)
sys.exit(0)
