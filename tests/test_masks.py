"""The pure-torch mask core: patterns, sampling, schedules, priors, the regulariser, the RNG."""
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskllm_megatron.masks import (Anneal, MaskConfig, NMSpec, apply_prior, candidate_patterns, gumbel_noise,
                                    hard_mask, init_logits, is_valid_nm, mask_to_patterns, masked_weight,
                                    patterns_to_mask, soft_mask, topn_mask)
from maskllm_megatron.masks import cpu_kernel, triton_kernel
from maskllm_megatron.masks.patterns import position_patterns
from maskllm_megatron.masks.rng import col_hash, gumbel_grid, normal_grid, row_hash, uniform_grid
from maskllm_megatron.masks.sampling import _sample_backward, _sample_forward, logit_columns


@pytest.mark.parametrize("n,m,count", [(2, 4, 6), (1, 4, 4), (4, 8, 70)])
def test_candidate_patterns(n, m, count):
    pats = candidate_patterns(NMSpec(n, m))
    assert pats.shape == (count, m)
    assert torch.all(pats.sum(1) == n)
    assert len({tuple(p.tolist()) for p in pats}) == count


def test_2_4_patterns_in_reference_order():
    expected = ["1100", "1010", "1001", "0110", "0101", "0011"]
    got = ["".join(str(int(v)) for v in row) for row in candidate_patterns(NMSpec(2, 4))]
    assert got == expected


def test_cols_not_multiple_of_m_is_a_clear_error():
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        topn_mask(torch.zeros(3, 10), NMSpec(2, 4))
    with pytest.raises(ValueError, match="N:M"):
        NMSpec(5, 4)
    with pytest.raises(ValueError, match="write it as N:M"):
        NMSpec.parse("2-4")


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_mask_pattern_round_trip_and_topn(n, m):
    spec = NMSpec(n, m)
    idx = torch.randint(0, spec.num_patterns, (5, 3))
    mask = patterns_to_mask(idx, spec)
    assert mask.shape == (5, 3 * m) and is_valid_nm(mask, spec)
    assert torch.equal(mask_to_patterns(mask, spec), idx)
    scores = torch.randn(4, 2 * m)
    top = topn_mask(scores, spec)
    assert torch.all(top.view(4, 2, m).sum(-1) == n)
    kept_min = torch.where(top.bool(), scores, torch.inf).view(4, 2, m).min(-1).values
    dropped_max = torch.where(top.bool(), -torch.inf, scores).view(4, 2, m).max(-1).values
    assert torch.all(kept_min >= dropped_max)


def test_invalid_mask_is_refused():
    with pytest.raises(ValueError, match="not 2:4"):
        mask_to_patterns(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), NMSpec(2, 4))


def test_hard_mask_is_argmax_pattern():
    spec = NMSpec(2, 4)
    logits = torch.randn(7, 5, 6)
    mask = hard_mask(logits, spec)
    assert torch.equal(mask, patterns_to_mask(logits.argmax(-1), spec))
    # hand case: the largest logit on pattern 0101 keeps positions 1 and 3
    one = torch.tensor([[[0.0, 0.1, 0.2, 0.3, 5.0, -1.0]]])
    assert hard_mask(one, spec).tolist() == [[0.0, 1.0, 0.0, 1.0]]


def test_expected_soft_mask_sums_to_n_and_annealed_samples_become_one_hot():
    spec = NMSpec(2, 4)
    logits = torch.randn(64, 32, 6) * 0.01
    rows, groups = torch.arange(64), torch.arange(32)
    noise = gumbel_noise(11, rows, groups, spec)
    warm = soft_mask(logits, noise, spec, temperature=4.0, scale=100.0)
    assert torch.allclose(warm.view(64, 32, 4).sum(-1), torch.full((64, 32), 2.0), atol=1e-5)
    cold = soft_mask(logits, noise, spec, temperature=0.05, scale=500.0)
    probs = torch.softmax((logits * 500.0 + noise) / 0.05, -1)
    assert probs.max(-1).values.mean() > 0.97  # annealed samples are (almost) one-hot
    assert float(((cold - cold.round()).abs() < 0.05).float().mean()) > 0.95
    warm_probs = torch.softmax((logits * 100.0 + noise) / 4.0, -1)
    assert warm_probs.max(-1).values.mean() < 0.6  # early samples are soft


def test_sampling_frequencies_follow_the_logits():
    """Gumbel-max with our counter-based noise picks pattern k with probability softmax(logits)_k."""
    spec = NMSpec(2, 4)
    logits = torch.tensor([2.0, 1.0, 0.0, 0.0, -1.0, 0.5]).expand(4000, 1, 6)
    noise = gumbel_noise(3, torch.arange(4000), torch.arange(1), spec)
    picks = torch.bincount((logits + noise).argmax(-1).flatten(), minlength=6).float() / 4000
    expected = torch.softmax(logits[0, 0], -1)
    assert torch.allclose(picks, expected, atol=0.03)


def test_rng_distributions_and_layout_independence():
    rows, cols = torch.arange(300), torch.arange(200)
    u = uniform_grid(5, rows, cols)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    g = gumbel_grid(5, rows, cols)
    assert abs(float(g.mean()) - 0.5772) < 0.02  # Euler-Mascheroni
    z = normal_grid(5, rows, cols)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    # a shard computes exactly the slice of the full grid from its global ids
    assert torch.equal(gumbel_grid(5, rows[100:200], cols[50:150]), g[100:200, 50:150])
    assert not torch.equal(gumbel_grid(6, rows, cols), g)


def test_rng_hash_is_murmur3_fmix32_bit_for_bit():
    """The int32 hash equals murmur3's fmix32 written with plain Python integers (hand reference)."""
    def fmix32(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & 0xFFFFFFFF
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & 0xFFFFFFFF
        return x ^ (x >> 16)

    key, rows, cols = 0xDEADBEEF, [0, 1, 7, 2**20 + 3], [0, 5, 2**31 + 11]
    u = uniform_grid(key, torch.tensor(rows), torch.tensor(cols))
    for i, r in enumerate(rows):
        rh = fmix32((r * 0x9E3779B1 + key) & 0xFFFFFFFF)
        for j, c in enumerate(cols):
            ch = fmix32((c * 0x7FEB352D + (key ^ 0x5BD1E995)) & 0xFFFFFFFF)
            expected = ((fmix32(rh ^ ch) >> 9) + 0.5) / 2**23
            assert float(u[i, j]) == expected, (r, c)


def test_init_logits_and_prior():
    spec = NMSpec(2, 4)
    logits = init_logits(9, torch.arange(50), torch.arange(40), spec, std=0.01)
    assert logits.shape == (50, 40, 6) and abs(float(logits.std()) - 0.01) < 0.001
    prior = topn_mask(torch.randn(50, 160), spec)
    out = apply_prior(logits, prior, spec, strength=3.0)
    std = float(logits.std())
    # hand formula: (overlap_k - 1) * std * strength; the prior's own pattern overlaps in 2 places
    pat = mask_to_patterns(prior, spec)
    gain = (out - logits).gather(-1, pat.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(gain, torch.full_like(gain, 3.0 * std), atol=1e-6)
    assert float((hard_mask(out, spec) == prior).float().mean()) > 0.95  # noise flips a few groups
    assert torch.equal(apply_prior(logits, prior, spec, strength=0.0), logits)
    # one hand-computed group: prior 1100, logits zero, std given
    g = apply_prior(torch.zeros(1, 1, 6), torch.tensor([[1.0, 1.0, 0.0, 0.0]]), spec, 2.0, std=0.5)
    assert g.flatten().tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    # logits without noise have no spread to scale the shift by: refused, not silently prior-less
    with pytest.raises(ValueError, match="standard deviation 0.0, so the prior shift"):
        apply_prior(torch.zeros(1, 1, 6), torch.tensor([[1.0, 1.0, 0.0, 0.0]]), spec, 2.0)


@pytest.mark.parametrize("hard", [False, True])
def test_masked_weight_matches_autograd_reference_with_regulariser(hard):
    spec = NMSpec(2, 4)
    torch.manual_seed(0)
    W = torch.randn(6, 16)
    L = torch.randn(6, 4, 6, requires_grad=True)
    rows, groups = torch.arange(6), torch.arange(4)
    from maskllm_megatron.masks import noise_key
    key = noise_key(1, "x", 0, 0)
    lam = 0.03
    grad_out = torch.randn(6, 16)
    out = masked_weight(W, L, key, rows, groups, spec, temperature=2.0, scale=3.0, hard=hard, regularizer=lam)
    (out * grad_out).sum().backward()
    # plain autograd reference: the soft mask, (straight-through when hard), loss - lam * sum((W*m)^2)
    L2 = L.detach().clone().requires_grad_(True)
    noise = gumbel_noise(key, rows, groups, spec)
    probs = torch.softmax((L2 * 3.0 + noise) / 2.0, -1)
    if hard:
        onehot = torch.nn.functional.one_hot(probs.argmax(-1), 6).float()
        probs = onehot - probs.detach() + probs
    m = (probs @ candidate_patterns(spec)).view(6, 16)
    ref = W * m
    ((ref * grad_out).sum() - lam * ((W * m) ** 2).sum()).backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(L.grad, L2.grad, rtol=1e-5, atol=1e-6)


def test_regulariser_gradient_reaches_only_the_logits_and_rewards_large_weights():
    spec = NMSpec(2, 4)
    W = torch.tensor([[4.0, 0.1, 3.0, 0.2]], requires_grad=True)
    L = torch.zeros(1, 1, 6, requires_grad=True)
    # a very high temperature makes every pattern equally likely (soft mask 0.5 everywhere), so the
    # regulariser's pull is proportional to the squared weights each pattern keeps
    out = masked_weight(W, L, 0, torch.arange(1), torch.arange(1), spec, 1e3, 1.0, regularizer=1.0)
    out.backward(torch.zeros_like(out))  # no LM gradient: only the regulariser acts
    # joint training: W's gradient is grad_out * mask = 0; the regulariser never reaches W
    assert torch.equal(W.grad, torch.zeros_like(W))
    # descending the gradient raises the logit of the pattern keeping the two largest weights (1010)
    assert int((-L.grad).argmax()) == 1


def test_fused_kernel_matches_eager():
    pytest.importorskip("torch._inductor")
    spec = NMSpec(2, 4)
    W = torch.randn(8, 32)
    L = torch.randn(8, 8, 6, requires_grad=True)
    grads = []
    outs = []
    for fused in (False, True):
        L.grad = None
        out = masked_weight(W, L, 42, torch.arange(8), torch.arange(8), spec, 1.5, 2.0, regularizer=0.1,
                            fused=fused)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append(L.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


needs_cpu_kernel = pytest.mark.skipif(
    not cpu_kernel.supports(torch.zeros(1), torch.zeros(1), NMSpec(2, 4)),
    reason="the C++ CPU mask kernel needs an x86-64 CPU with AVX2 and a C++ compiler")


@needs_cpu_kernel
@pytest.mark.parametrize("isa", cpu_kernel.runnable_isas())
@pytest.mark.parametrize("hard", [False, True])
def test_cpu_kernels_match_the_eager_forward_and_backward(hard, isa):
    """The one-pass C++ kernels (each instruction set this CPU has) against the eager ``_sample_forward``
    / ``_sample_backward`` (plain torch ops): 37 groups per row (full blocks of 8 or 16 lanes and a
    5-group tail), scaled logits so the softmax is peaked, the regulariser on, and the weight's gradient
    asked for."""
    spec = NMSpec(2, 4)
    assert cpu_kernel.vector_width(isa) == {"AVX2": 8, "AVX512": 16}[isa]
    rows, groups = 5, 37
    W = torch.randn(rows, groups * 4)
    L = torch.randn(rows, groups, 6) * 3
    rh, ch = row_hash(99, torch.arange(rows) + 40), col_hash(99, logit_columns(torch.arange(groups) + 7, spec))
    coef, inv_tau = torch.tensor(2.5), torch.tensor(1 / 0.7)
    out, probs, mask = _sample_forward(W, L, rh, ch, coef, inv_tau, spec, hard)
    c_out, c_probs, c_mask = cpu_kernel.masked_weight_forward(W, L, rh, ch, 2.5, 1 / 0.7, spec, hard, isa)
    torch.testing.assert_close(c_probs, probs, rtol=0, atol=2e-6)
    torch.testing.assert_close(c_out, out, rtol=1e-5, atol=2e-6)
    if hard:
        assert torch.equal(c_mask, mask) and torch.equal(c_mask.sum(-1), torch.full((rows,), groups * 2.0))
    else:
        assert c_mask is None
    grad_out, reg2 = torch.randn(rows, groups * 4), torch.tensor(0.3)
    g_logits, g_weight = _sample_backward(grad_out, W, probs, mask, coef, reg2, spec, True)
    c_logits, c_weight = cpu_kernel.masked_weight_backward(grad_out, W, probs, mask, 2.5, 0.3, spec, True, isa)
    # gradients up to ~5 from sums of ~6 products: fp32 summation order gives a few ULP (seen: 2.4e-6)
    torch.testing.assert_close(c_logits, g_logits, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(c_weight, g_weight, rtol=1e-6, atol=1e-7)
    c_logits2, no_weight = cpu_kernel.masked_weight_backward(grad_out, W, probs, mask, 2.5, 0.3, spec, False, isa)
    assert no_weight is None and torch.equal(c_logits2, c_logits)


def _mask_summed_in_pattern_order(probs: torch.Tensor, spec: NMSpec) -> torch.Tensor:
    """``probs @ patterns`` as ``[rows, groups * M]``, each position's sum taken left to right over the patterns
    keeping it in pattern order (the C++ kernel's order), so that fp32 results compare bit for bit."""
    return torch.stack([sum(probs[..., k] for k in ks) for ks in position_patterns(spec)], -1).flatten(1)


@needs_cpu_kernel
@pytest.mark.parametrize("isa", cpu_kernel.runnable_isas())
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("weight_dtype,logits_dtype", [(torch.bfloat16, torch.bfloat16),
                                                       (torch.float32, torch.bfloat16),
                                                       (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("rows,groups", [(5, 37), (3, 3)])
def test_cpu_kernels_on_bf16_match_the_eager_path(rows, groups, weight_dtype, logits_dtype, hard, isa):
    """A bf16 layer (weight, logits or both bf16; 37 groups: full blocks of 8 or 16 and a 5-group tail; 3: a
    tail only) through the C++ kernels against the eager ``_sample_forward`` / ``_sample_backward`` on the same
    tensors: the same output dtypes (W * mask and W's gradient in the weight's dtype, the rest fp32). The
    kernels compute in fp32 on the exact widening of bf16, so the probabilities and the hard mask are the fp32
    kernel's on the widened inputs bit for bit (the same noise), and what they round to bf16 is torch's
    rounding of their own fp32 mask bit for bit."""
    spec = NMSpec(2, 4)
    gen = torch.Generator().manual_seed(rows * 100 + groups)
    W = torch.randn(rows, groups * 4, generator=gen).to(weight_dtype)
    L = (torch.randn(rows, groups, 6, generator=gen) * 3).to(logits_dtype)
    rh, ch = row_hash(99, torch.arange(rows) + 40), col_hash(99, logit_columns(torch.arange(groups) + 7, spec))
    coef, inv_tau = torch.tensor(2.5), torch.tensor(1 / 0.7)
    out, probs, mask = _sample_forward(W, L, rh, ch, coef, inv_tau, spec, hard)
    c_out, c_probs, c_mask = cpu_kernel.masked_weight_forward(W, L, rh, ch, 2.5, 1 / 0.7, spec, hard, isa)
    assert (c_out.dtype, c_probs.dtype) == (out.dtype, probs.dtype) == (weight_dtype, torch.float32)
    f_out, f_probs, f_mask = cpu_kernel.masked_weight_forward(W.float(), L.float(), rh, ch, 2.5, 1 / 0.7, spec,
                                                              hard, isa)
    assert torch.equal(c_probs, f_probs)
    torch.testing.assert_close(c_probs, probs, rtol=0, atol=2e-6)  # as the fp32 kernel (exp, log: a few ULP)
    if hard:
        assert c_mask.dtype == mask.dtype == torch.float32 and torch.equal(c_mask, mask) and torch.equal(c_mask, f_mask)
        assert torch.equal(c_out, out)  # W * {0, 1}: exact
    else:
        assert c_mask is None
        own_mask = _mask_summed_in_pattern_order(c_probs, spec)
        assert torch.equal(c_out, W * own_mask.to(weight_dtype))
        # against the eager mask (a matmul, a few fp32 ULP away): where the two straddle a bf16 rounding
        # boundary, the rounded mask and so the product differ by one bf16 unit, at most 2^-7 of the value
        torch.testing.assert_close(c_out, out, rtol=2 ** -7, atol=0)
    grad_out = torch.randn(rows, groups * 4, generator=gen).to(weight_dtype)
    reg2 = torch.tensor(0.3)
    g_logits, g_weight = _sample_backward(grad_out, W, probs, mask, coef, reg2, spec, True)
    c_logits, c_weight = cpu_kernel.masked_weight_backward(grad_out, W, probs, mask, 2.5, 0.3, spec, True, isa)
    assert (c_logits.dtype, c_weight.dtype) == (g_logits.dtype, g_weight.dtype) == (torch.float32, weight_dtype)
    # fp32 arithmetic on the widened inputs: the fp32 kernel's bound (summation order, a few ULP)
    torch.testing.assert_close(c_logits, g_logits, rtol=1e-5, atol=5e-6)
    if hard:
        assert torch.equal(c_weight, g_weight)  # grad_out * {0, 1}: exact
    else:
        assert torch.equal(c_weight, grad_out * _mask_summed_in_pattern_order(probs, spec).to(weight_dtype))
        torch.testing.assert_close(c_weight, g_weight, rtol=2 ** -7, atol=0)  # the eager mask: as above
    c_logits2, no_weight = cpu_kernel.masked_weight_backward(grad_out, W, probs, mask, 2.5, 0.3, spec, False, isa)
    assert no_weight is None and torch.equal(c_logits2, c_logits)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_is_used_by_the_fused_path_and_keeps_gradients(dtype):
    """``masked_weight(fused=True)`` on an fp32 or bf16 2:4 CPU layer runs the C++ kernels; its output and the
    logits' gradient (in the logits' dtype, as autograd casts it) match the eager path (the noise is the same
    hash, bit for bit)."""
    spec = NMSpec(2, 4)
    W = torch.randn(6, 44).to(dtype)
    L = torch.randn(6, 11, 6).to(dtype).requires_grad_(True)
    calls = []

    def spy(real):
        def wrapped(*a, **k):
            calls.append(real.__name__)
            return real(*a, **k)
        return wrapped

    results = []
    for fused in (False, True):
        L.grad = None
        with pytest.MonkeyPatch.context() as mp:
            for name in ("masked_weight_forward", "masked_weight_backward"):
                mp.setattr(cpu_kernel, name, spy(getattr(cpu_kernel, name)))
            out = masked_weight(W, L, 5, torch.arange(6), torch.arange(11), spec, 0.8, 3.0, regularizer=0.05,
                                fused=fused)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
        results.append((out.detach(), L.grad.clone()))
    assert calls == ["masked_weight_forward", "masked_weight_backward"]
    assert results[1][0].dtype == dtype and results[1][1].dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)
    else:  # the fp32 values above (a few ULP apart), each rounded once to bf16: one bf16 unit (2^-7 relative)
        torch.testing.assert_close(results[1][0], results[0][0], rtol=2 ** -7, atol=0)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=2 ** -7, atol=1e-5)


@needs_cpu_kernel
def test_the_default_is_the_fastest_kernel_that_runs_here(monkeypatch):
    """``masked_weight`` without ``fused`` (as a masked layer built with its defaults calls it) takes the
    one-pass C++ kernel on an fp32 or bf16 2:4 CPU layer, and for a layer it cannot take (fp16 here) the eager
    path, never a CPU torch.compile; a torch.compile that fails falls back to eager with one warning."""
    from maskllm_megatron.masks import sampling

    spec = NMSpec(2, 4)
    calls = []
    monkeypatch.setattr(cpu_kernel, "masked_weight_forward",
                        lambda *a, real=cpu_kernel.masked_weight_forward, **k: calls.append("cpu") or real(*a, **k))
    compiled = sampling._kernels(True)
    monkeypatch.setitem(sampling._KERNELS, True, (lambda *a, **k: calls.append("compiled"), compiled[1]))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        W = torch.randn(4, 16, dtype=dtype)
        L = torch.randn(4, 4, 6, dtype=dtype, requires_grad=True)
        masked_weight(W, L, 3, torch.arange(4), torch.arange(4), spec, 1.0, 2.0).sum().backward()
    assert calls == ["cpu", "cpu"]
    # fused=True where no one-pass kernel runs is torch.compile: a failure to build falls back, once, warned
    monkeypatch.setattr(sampling, "_compile_failed", False)
    monkeypatch.setitem(sampling._KERNELS, True, (lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no cc")),
                                                   compiled[1]))
    W = torch.randn(4, 16, dtype=torch.float16)
    L = torch.randn(4, 4, 6, dtype=torch.float16, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="failed to build .*running the eager path"):
        out = masked_weight(W, L, 3, torch.arange(4), torch.arange(4), spec, 1.0, 2.0, fused=True)
    eager = masked_weight(W, L, 3, torch.arange(4), torch.arange(4), spec, 1.0, 2.0, fused=False)
    assert torch.equal(out, eager)


def test_cpu_kernel_falls_back_when_it_cannot_be_built(tmp_path, monkeypatch):
    """A compiler that fails: one warning, and the torch.compile path takes over (no crash)."""
    monkeypatch.setenv("MASKLLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # exists everywhere, always fails
    cpu_kernel._library.cache_clear()
    try:
        if platform.machine().lower() in ("x86_64", "amd64") and \
                torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            with pytest.warns(UserWarning, match="could not be built"):
                assert not cpu_kernel.supports(torch.zeros(1), torch.zeros(1), NMSpec(2, 4))
        monkeypatch.setenv("MASKLLM_CPU_KERNEL", "0")
        monkeypatch.delenv("CXX")
        cpu_kernel._library.cache_clear()
        assert not cpu_kernel.supports(torch.zeros(1), torch.zeros(1), NMSpec(2, 4))
    finally:
        cpu_kernel._library.cache_clear()


@pytest.mark.skipif(not triton_kernel.available(), reason="Triton is not installed (pip install triton)")
def test_triton_kernels_match_the_eager_forward_and_backward_interpreted():
    """The GPU Triton kernels run on CPU by Triton's interpreter (a fresh process: TRITON_INTERPRET must be
    set before they are decorated) against the eager ``_sample_forward`` / ``_sample_backward``: 2:4 soft
    and hard, fp32 and bf16, blocks with tails, 4:8 and 1:4 (padded pattern tiles), and the autograd
    wiring of ``masked_weight(fused=True)``. Numerics only: the interpreter says nothing of GPU speed."""
    script = Path(__file__).parent / "scripts" / "check_triton_kernel.py"
    root = str(Path(__file__).parents[1])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("ok 8"), res.stdout + res.stderr[-3000:]


@pytest.mark.skipif(not triton_kernel.available(), reason="Triton is not installed (pip install triton)")
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_ampere_and_hopper_without_spills(arch, tmp_path, monkeypatch):
    """What the interpreter cannot show: the kernels compile ahead of time, without a GPU, with the ptxas
    that Triton ships, for A100 (sm_80) and H100/H200 (sm_90), every variant the driver launches, bf16
    and fp32, and keep everything in registers (no local memory: nothing spills)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from maskllm_megatron.masks import masked_weight_triton as kernels

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    cuobjdump = Path(kernels.triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    sizes = {"C": 6, "M": 4, "C_PAD": 8, "BLOCK_G": triton_kernel.BLOCK}
    for dt in ("bf16", "fp32"):
        fwd = dict(logits_ptr=f"*{dt}", weight_ptr=f"*{dt}", rh_ptr="*i32", ch_ptr="*i32", keep_ptr="*fp32",
                   coef_ptr="*fp32", inv_tau_ptr="*fp32", probs_ptr="*fp32", out_ptr=f"*{dt}", hard_ptr="*fp32")
        bwd = dict(grad_out_ptr=f"*{dt}", weight_ptr=f"*{dt}", probs_ptr="*fp32", hard_ptr="*fp32", keep_ptr="*fp32",
                   coef_ptr="*fp32", reg2_ptr="*fp32", grad_logits_ptr="*fp32", grad_weight_ptr=f"*{dt}")
        variants = [(kernels.forward_kernel, fwd, dict(HARD=h)) for h in (False, True)]
        variants += [(kernels.backward_kernel, bwd, dict(HARD=h, WEIGHT_GRAD=w)) for h in (False, True)
                     for w in (False, True)]
        for fn, pointers, flags in variants:
            consts = {**sizes, **flags}
            sig = {**pointers, "groups": "i32", "blocks_per_row": "i32", **{name: "constexpr" for name in consts}}
            compiled = triton_compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                      target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
            cubin = tmp_path / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                   text=True, check=True).stdout
            assert " LOCAL:0 " in usage and " STACK:0 " in usage, (fn.__name__, dt, flags, usage)


def test_triton_kernels_are_off_unless_switched_on_and_on_cuda(monkeypatch):
    """Off by default until measured on a GPU; never for CPU tensors (the C++ kernels or torch.compile)."""
    w, logits, spec = torch.zeros(4, 8), torch.zeros(4, 2, 6), NMSpec(2, 4)
    monkeypatch.delenv("MASKLLM_TRITON_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_kernel.supports(w, logits, spec)
    monkeypatch.setenv("MASKLLM_TRITON_KERNEL", "1")
    assert not triton_kernel.supports(w, logits, spec)  # CPU tensors
    if triton_kernel.available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's CPU interpreter runs them on CPU tensors
        assert triton_kernel.supports(w, logits, spec)


def test_schedules():
    lin = Anneal(4.0, 0.05, 100)
    assert lin(0) == 4.0 and math.isclose(lin(50), 2.025) and math.isclose(lin(100), 0.05) and lin(500) == lin(100)
    exp = Anneal(1e2, 5e2, 10, "exp")
    assert math.isclose(exp(5), 1e2 * 5 ** 0.5)
    cos = Anneal(1.0, 0.0, 10, "cosine")
    assert math.isclose(cos(5), 0.5, abs_tol=1e-12)
    with pytest.raises(ValueError, match="unknown schedule"):
        Anneal(1, 2, 3, "step")
    cfg = MaskConfig(total_steps=10)
    s = cfg.step_state(5, grad_scale=0.5)
    assert math.isclose(s.temperature, (4 + 0.05) / 2) and math.isclose(s.scale, 300.0)
    assert math.isclose(s.regularizer, 0.5e-5 * 0.5)
    with pytest.raises(ValueError, match="temperature"):
        MaskConfig(temperature=(1.0, 0.0))
