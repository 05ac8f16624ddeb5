"""Reconstruction of the kept weights under fixed N:M masks: the pure-torch solvers against a hand-made
least-squares case, and the sequential block-wise refit on tiny models at TP=1 and TP=2 (gloo)."""
import pytest
import torch

from maskllm_megatron.masks import NMSpec, topn_mask
from maskllm_megatron.prune.calibration import InputStats
from maskllm_megatron.prune.methods import (HessianError, masked_lstsq, reconstruct_weight, reconstruction_error,
                                            sparsegpt_prune)
from tests.torchrun_util import printed_result, torchrun

WORKER = "tests/scripts/reconstruct_worker.py"
SPEC = NMSpec(2, 4)


def _problem(rows=12, cols=32, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g,
                                                                                 dtype=torch.float64)
    W = torch.randn(rows, cols, generator=g)
    mask = topn_mask(torch.rand(rows, cols, generator=g), SPEC)
    return X, W, mask, (2 / tokens) * X.t() @ X


def _stats(X, target=None):
    stats = InputStats(X.shape[1], targets=target is not None)
    stats.add(X.float(), None if target is None else target.float())
    return stats


def test_masked_lstsq_is_the_least_squares_solution_under_the_mask():
    X, W, mask, H = _problem()
    got = masked_lstsq(W, H, mask, SPEC, percdamp=0.0, dtype=torch.float64)
    expect = torch.zeros(W.shape, dtype=torch.float64)
    for r in range(W.shape[0]):  # each row: least squares over its kept columns only
        keep = mask[r].bool()
        expect[r, keep] = torch.linalg.lstsq(X[:, keep], X @ W[r].double()).solution
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert not torch.signbit(got[mask == 0]).any()  # +0.0, never -0.0
    before, after = reconstruction_error(W, W * mask, X), reconstruction_error(W, got, X)
    assert after < 0.7 * before
    # chunking over rows changes nothing
    torch.testing.assert_close(masked_lstsq(W, H, mask, SPEC, percdamp=0.0, dtype=torch.float64, chunk_bytes=1), got)


def test_obs_with_sparsegpts_own_mask_is_sparsegpts_update():
    X, W, _, H = _problem(seed=1)
    stats = _stats(X)
    mask, updated = sparsegpt_prune(W, stats.hessian, SPEC, blocksize=16, update_weights=True)
    assert torch.equal(reconstruct_weight(W, stats, mask, SPEC, "obs", blocksize=16), updated)
    # the exact solve is at least as good as the sweep under the same mask
    exact = reconstruct_weight(W, stats, mask, SPEC, "lstsq")
    assert reconstruction_error(W, exact, X) <= reconstruction_error(W, updated, X) * (1 + 1e-4)


def test_dampening_pulls_towards_the_dense_weights_and_refuses_bad_input():
    X, W, mask, H = _problem(seed=2)
    near = masked_lstsq(W, H, mask, SPEC, percdamp=1e4)  # the Hessian is all dampening: w_S -> W_S
    torch.testing.assert_close(near, W * mask, rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="not exact 2:4"):
        masked_lstsq(W, H, torch.ones_like(W), SPEC)
    with pytest.raises(HessianError, match="not positive definite"):
        masked_lstsq(W, -H, mask, SPEC, percdamp=0.0)
    with pytest.raises(ValueError, match="unknown reconstruction method"):
        reconstruct_weight(W, _stats(X), mask, SPEC, "adam")


def test_the_dense_target_is_least_squares_against_the_dense_models_output():
    """With the dense model's inputs as targets: min ||X w_S - X_dense w||, checked against lstsq, and the
    error reported against that target."""
    X, W, mask, _ = _problem(seed=3)
    g = torch.Generator().manual_seed(4)
    X_dense = X + 0.3 * torch.randn(X.shape, generator=g, dtype=torch.float64)  # the dense model's inputs
    stats = _stats(X, X_dense)
    got = reconstruct_weight(W, stats, mask, SPEC, "lstsq", percdamp=0.0)
    expect = torch.zeros(W.shape, dtype=torch.float64)
    for r in range(W.shape[0]):
        keep = mask[r].bool()
        expect[r, keep] = torch.linalg.lstsq(X[:, keep], X_dense @ W[r].double()).solution
    out = lambda w: X @ w.double().t()  # noqa: E731
    target = X_dense @ W.double().t()
    assert float((out(got) - out(expect)).norm() / out(expect).norm()) < 1e-4
    err = float(((out(got) - target) ** 2).sum())
    assert reconstruction_error(W, got, stats) == pytest.approx(err, rel=1e-3)
    # it beats fitting the layer's own output when judged by the dense model's
    own = reconstruct_weight(W, _stats(X), mask, SPEC, "lstsq", percdamp=0.0)
    assert err < float(((out(own) - target) ** 2).sum())
    with pytest.raises(ValueError, match="use method lstsq"):
        reconstruct_weight(W, stats, mask, SPEC, "obs")


def test_reconstruction_lowers_every_layers_error_and_tp2_equals_tp1(tmp_path):
    """Every method lowers every layer's calibration error, TP=2 gives TP=1's weights, and (the worker's
    ``sparsegpt_equivalence``) OBS handed SparseGPT's own masks reproduces SparseGPT-with-update's weights."""
    errors = [printed_result(torchrun(WORKER, tp, tmp_path, nproc=tp)) for tp in (1, 2)]
    tp1, tp2 = (torch.load(tmp_path / f"reconstruct_tp{tp}.pt") for tp in (1, 2))
    assert set(errors[0]) == {f"{f}/{m}" for f in ("llama", "gpt") for m in ("lstsq", "obs", "dense", "block")}
    for name, per_layer in errors[0].items():
        # 2 blocks x qkv, proj, fc1, fc2; the block fit reports per block
        assert len(per_layer) == (2 if name.endswith("block") else 8), name
        for layer, (before, after) in per_layer.items():
            assert after < before, (name, layer, before, after)
            # the whole layer's error at either TP size (fp32 solves in another order: 1e-4)
            b2, a2 = errors[1][name][layer]
            assert b2 == pytest.approx(before, rel=1e-4) and a2 == pytest.approx(after, rel=1e-3), (name, layer)
        if name.endswith("lstsq"):  # exact beats the sweep on the layers' total
            obs = errors[0][name.replace("lstsq", "obs")]
            assert sum(a for _, a in per_layer.values()) < sum(a for _, a in obs.values())
    for name in tp1:
        for layer in tp1[name]:
            torch.testing.assert_close(tp1[name][layer], tp2[name][layer], rtol=1e-4, atol=1e-5)


class _FakeMaskedLinear(torch.nn.Module):
    """The parts of a masked layer ``fit_block`` uses: a weight, its evaluation mask, its mask mode."""

    def __init__(self, weight, mask):
        super().__init__()
        from maskllm_megatron.megatron.layers import MaskMode

        self.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        self.mask = mask
        self.mask_mode = MaskMode.LEARN
        self._eval_mask_cache = None

    def set_mask_mode(self, mode):
        self.mask_mode = mode

    def eval_mask(self):
        return self.mask

    def forward(self, x):
        from maskllm_megatron.megatron.layers import MaskMode

        w = self.weight if self.mask_mode is MaskMode.DENSE else self.weight * self.mask
        return x @ w.t()


def test_the_block_fit_converges_to_the_least_squares_solution():
    """On one linear layer the block fit's problem is a least-squares one: Adam reaches the closed-form
    solution's error (within 0.1%) and keeps the masked weights at +0.0. With a plain squared error that
    is masked_lstsq on X; with the default per-token relative error, masked_lstsq on X's rows scaled by
    1 / ||target row|| (a weighted least squares)."""
    from maskllm_megatron.megatron.reconstruct import fit_block, token_relative_error

    X, W, mask, _ = _problem(rows=8, cols=16, tokens=512, seed=5)
    X = (X / X.std()).float()
    for name, loss in (("squared", lambda o, t: (o - t) ** 2), ("relative", token_relative_error)):
        if name == "relative":
            X[0] *= 30  # one token with a massive activation: it must not rule the relative fit
        weights = (1 / ((X @ W.t()).double() ** 2).sum(-1) if name == "relative"
                   else torch.ones(512, dtype=torch.float64))
        layer = _FakeMaskedLinear(W, mask)
        inputs = [X[i:i + 64] for i in range(0, 512, 64)]
        before, after = fit_block([layer], layer, inputs, [x @ W.t() for x in inputs], epochs=150, lr=3e-2,
                                  loss=loss)
        Xw = X.double() * weights.sqrt()[:, None]  # the weighted problem's rows
        best = masked_lstsq(W, (2 / 512) * Xw.t() @ Xw, mask, SPEC, percdamp=0.0, dtype=torch.float64)
        err = lambda w: float(((Xw @ (w.double() - W.double()).t()) ** 2).sum())  # noqa: E731
        err_best, err_fit = err(best), err(layer.weight.detach())
        assert before == pytest.approx(err(W * mask), rel=1e-4), name
        assert after == pytest.approx(err_fit, rel=1e-3), name
        assert err_best <= err_fit <= 1.001 * err_best, (name, err_best, err_fit, before)
        assert torch.equal(layer.weight[mask == 0], torch.zeros(int((mask == 0).sum())))
        assert not torch.signbit(layer.weight[mask == 0]).any()
        assert not layer.weight.requires_grad and layer.mask_mode.value == "learn"  # its mode, as it was
