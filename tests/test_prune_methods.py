"""One-shot N:M priors: hand-checked tiny cases, statistics bookkeeping, and a real SmolLM2 layer."""
import pytest
import torch

from maskllm_megatron.masks.patterns import NMSpec, to_groups
from maskllm_megatron.prune.calibration import InputStats, record_inputs
from maskllm_megatron.prune.methods import (
    magnitude_mask, oneshot_mask, reconstruction_error, sparsegpt_prune, wanda_mask)

SPECS = [NMSpec(2, 4), NMSpec(1, 4), NMSpec(4, 8)]

# A 2x8 weight and per-channel ||X_j||^2 with the masks worked out by hand below.
W_HAND = torch.tensor([[1.0, -3.0, 2.0, 0.5, 4.0, -1.0, 0.1, 2.5],
                       [-2.0, 1.0, 0.3, 5.0, -0.2, 0.4, 3.0, -1.5]])
ACT_SQ = torch.tensor([1.0, 1 / 16, 1.0, 64.0, 1 / 16, 4.0, 100.0, 1.0])  # sqrt: 1 .25 1 8 .25 2 10 1


def exact_nm(mask, spec):
    """Every group holds exactly N ones and the rest zeros."""
    g = to_groups(mask, spec)
    return bool(((g == 0) | (g == 1)).all() and (g.sum(-1) == spec.n).all())


def correlated_inputs(tokens, cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols ** 0.5 + torch.eye(cols)
    scale = torch.rand(cols, generator=gen) * 3 + 0.1  # channels of very different magnitude
    return (torch.randn(tokens, cols, generator=gen) @ mix) * scale


# ---- magnitude and Wanda, by hand ---------------------------------------------------------------

def test_magnitude_by_hand():
    # 2:4 row 0: |1 3 2 .5| keeps 3,2; |4 1 .1 2.5| keeps 4,2.5. Row 1: |2 1 .3 5| keeps 2,5; |.2 .4 3 1.5| keeps 3,1.5.
    assert magnitude_mask(W_HAND, NMSpec(2, 4)).tolist() == [[0, 1, 1, 0, 1, 0, 0, 1], [1, 0, 0, 1, 0, 0, 1, 1]]
    assert magnitude_mask(W_HAND, NMSpec(1, 4)).tolist() == [[0, 1, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 1, 0]]
    # 4:8 row 0 keeps 4, 3, 2.5, 2; row 1 keeps 5, 3, 2, 1.5.
    assert magnitude_mask(W_HAND, NMSpec(4, 8)).tolist() == [[0, 1, 1, 0, 1, 0, 0, 1], [1, 0, 0, 1, 0, 0, 1, 1]]


def test_wanda_by_hand():
    # Scores |W| * sqrt(ACT_SQ): row 0 [1 .75 2 4 | 1 2 1 2.5], row 1 [2 .25 .3 40 | .05 .8 30 1.5].
    assert wanda_mask(W_HAND, ACT_SQ, NMSpec(2, 4)).tolist() == [[0, 0, 1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 0, 0, 1, 1]]
    assert wanda_mask(W_HAND, ACT_SQ, NMSpec(1, 4)).tolist() == [[0, 0, 0, 1, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0, 1, 0]]
    # A constant factor on the statistics (Wanda's per-sequence vs our per-token mean) changes nothing.
    assert torch.equal(wanda_mask(W_HAND, 7 * ACT_SQ, NMSpec(2, 4)), wanda_mask(W_HAND, ACT_SQ, NMSpec(2, 4)))


def test_wanda_uses_stats_from_inputs():
    X = torch.tensor([[1.0, 0.25, -1.0, 8.0, 0.25, 2.0, -10.0, 1.0]])  # ||X_j||^2 == ACT_SQ
    stats = InputStats(8)
    stats.add(X)
    assert torch.allclose(stats.sq_norm, ACT_SQ)
    assert torch.equal(oneshot_mask("wanda", W_HAND, stats, NMSpec(2, 4)), wanda_mask(W_HAND, ACT_SQ, NMSpec(2, 4)))


# ---- SparseGPT ----------------------------------------------------------------------------------

def test_sparsegpt_obs_step_by_hand():
    # One row, 1:2, H = [[1, .9], [.9, 4]], no dampening. Scores w_j^2 / [chol(H^-1)]_jj^2 are
    # w0^2 det/H11 = 2.25 * 3.19/4 = 1.794 and w1^2 H11 = 4, so w1 is kept (magnitude keeps w0),
    # and OBS moves w0's error onto it: w1 + w0 * H01 / H11 = 1 + 1.5 * .9 / 4 = 1.3375.
    W = torch.tensor([[1.5, 1.0]])
    H = torch.tensor([[1.0, 0.9], [0.9, 4.0]])
    spec = NMSpec(1, 2)
    mask, W_same = sparsegpt_prune(W, H, spec, blocksize=2, percdamp=0.0)
    assert mask.tolist() == [[0.0, 1.0]] and torch.equal(W_same, W)
    assert magnitude_mask(W, spec).tolist() == [[1.0, 0.0]]
    mask_u, W_upd = sparsegpt_prune(W, H, spec, blocksize=2, percdamp=0.0, update_weights=True)
    assert torch.equal(mask_u, mask)
    assert torch.allclose(W_upd, torch.tensor([[0.0, 1.3375]]), atol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_sparsegpt_identity_hessian_is_magnitude(spec):
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    H = torch.eye(64) * 3.0
    mask, W_out = sparsegpt_prune(W, H, spec, blocksize=16)
    assert torch.equal(mask, magnitude_mask(W, spec))
    assert torch.equal(W_out, W)
    # Without correlations there is nothing to propagate: the update is just W * mask.
    _, W_upd = sparsegpt_prune(W, H, spec, blocksize=16, update_weights=True)
    assert torch.allclose(W_upd, W * mask)


def test_sparsegpt_diagonal_hessian_is_wanda():
    # With uncorrelated inputs, [chol(H^-1)]_jj^2 = 1 / (H_jj + damp): the SparseGPT score is Wanda's.
    spec = NMSpec(2, 4)
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    diag = torch.rand(32, generator=torch.Generator().manual_seed(3)) * 10 + 0.1
    damp = 0.01 * diag.mean()
    mask, _ = sparsegpt_prune(W, torch.diag(diag), spec, blocksize=8)
    assert torch.equal(mask, wanda_mask(W, diag + damp, spec))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_sparsegpt_valid_and_update_helps(spec):
    X = correlated_inputs(512, 64)
    stats = InputStats(64)
    stats.add(X)
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    mask, W_same = sparsegpt_prune(W, stats.hessian, spec, blocksize=16)
    mask_u, W_upd = sparsegpt_prune(W, stats.hessian, spec, blocksize=16, update_weights=True)
    assert exact_nm(mask, spec) and torch.equal(mask, mask_u) and torch.equal(W_same, W)
    assert torch.all(W_upd[mask == 0] == 0)
    err_mask = reconstruction_error(W, W * mask, X)
    err_upd = reconstruction_error(W, W_upd, X)
    assert err_upd < 0.9 * err_mask
    # The same quantity from the Hessian: trace(D H D^T) * n / 2.
    assert reconstruction_error(W, W_upd, stats) == pytest.approx(err_upd, rel=1e-4)


def test_sparsegpt_blocking_does_not_change_the_result():
    # The lazy block update is an exact reordering of the column-by-column OBS sweep.
    X = correlated_inputs(256, 32, seed=5)
    H = 2 / 256 * X.t().double() @ X.double()
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(6))
    m1, w1 = sparsegpt_prune(W, H, NMSpec(2, 4), blocksize=4, update_weights=True, dtype=torch.float64)
    m2, w2 = sparsegpt_prune(W, H, NMSpec(2, 4), blocksize=32, update_weights=True, dtype=torch.float64)
    assert torch.equal(m1, m2) and torch.allclose(w1, w2, atol=1e-5)


def test_sparsegpt_dead_inputs_and_dtypes():
    X = correlated_inputs(128, 16, seed=7)
    X[:, 5] = 0  # an input channel that never fires
    stats = InputStats(16)
    stats.add(X)
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    mask, W_upd = sparsegpt_prune(W, stats.hessian, NMSpec(2, 4), blocksize=8, update_weights=True)
    assert mask.dtype == torch.float32 and mask.shape == W.shape and exact_nm(mask, NMSpec(2, 4))
    assert W_upd.dtype == torch.bfloat16 and torch.all(W_upd[:, 5] == 0)
    assert torch.isfinite(W_upd.float()).all()


def test_dampening_makes_a_rank_deficient_hessian_usable():
    X = correlated_inputs(6, 16, seed=14)  # 6 tokens, 16 channels: H has rank 6
    stats = InputStats(16, dtype=torch.float64)
    stats.add(X)
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(15))
    with pytest.raises(RuntimeError, match="not positive definite"):
        sparsegpt_prune(W, stats.hessian, NMSpec(2, 4), blocksize=8, percdamp=0.0, dtype=torch.float64)
    mask, W_upd = sparsegpt_prune(W, stats.hessian, NMSpec(2, 4), blocksize=8, update_weights=True)
    assert exact_nm(mask, NMSpec(2, 4)) and torch.isfinite(W_upd).all()


def test_dense_spec_keeps_everything():
    W = torch.randn(3, 8)
    mask, W_out = sparsegpt_prune(W, torch.eye(8), NMSpec(4, 4), blocksize=4, update_weights=True)
    assert torch.equal(mask, torch.ones_like(W)) and torch.equal(W_out, W)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_dispatcher_masks_are_exact_nm(spec):
    X = correlated_inputs(256, 64, seed=9)
    stats = InputStats(64)
    stats.add(X)
    W = torch.randn(12, 64, generator=torch.Generator().manual_seed(10))
    for method in ("magnitude", "wanda", "sparsegpt", "SparseGPT"):
        mask = oneshot_mask(method, W, stats, spec, **({"blocksize": 32} if method.lower() == "sparsegpt" else {}))
        assert mask.shape == W.shape and exact_nm(mask, spec), method


def test_clear_errors():
    W = torch.randn(4, 8)
    stats = InputStats(8)
    stats.add(torch.randn(10, 8))
    spec = NMSpec(2, 4)
    with pytest.raises(ValueError, match="unknown one-shot method 'obs'.*magnitude, wanda, sparsegpt"):
        oneshot_mask("obs", W, stats, spec)
    with pytest.raises(ValueError, match="wanda needs calibration statistics"):
        oneshot_mask("wanda", W, None, spec)
    with pytest.raises(ValueError, match="no tokens were recorded"):
        oneshot_mask("wanda", W, InputStats(8), spec)
    no_h = InputStats(8, hessian=False)
    no_h.add(torch.randn(10, 8))
    with pytest.raises(ValueError, match="sparsegpt needs the input Hessian"):
        oneshot_mask("sparsegpt", W, no_h, spec)
    with pytest.raises(ValueError, match="statistics cover 8 input features but the weight has 12"):
        oneshot_mask("wanda", torch.randn(4, 12), stats, spec)
    with pytest.raises(TypeError, match="sparsegpt_prune"):
        oneshot_mask("sparsegpt", W, stats, spec, update_weights=True)
    with pytest.raises(TypeError, match="magnitude takes no options"):
        oneshot_mask("magnitude", W, None, spec, blocksize=4)
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        magnitude_mask(torch.randn(4, 10), spec)
    with pytest.raises(ValueError, match="blocksize 6 must be a positive multiple of M=4"):
        sparsegpt_prune(W, stats.hessian, spec, blocksize=6)
    with pytest.raises(ValueError, match=r"act_sq_norm has shape \(4,\)"):
        wanda_mask(W, torch.ones(4), spec)
    with pytest.raises(RuntimeError, match="not positive definite"):
        sparsegpt_prune(W, -torch.eye(8), spec, blocksize=8)
    with pytest.raises(ValueError, match="input has 6 features"):
        stats.add(torch.randn(3, 6))


# ---- calibration statistics -----------------------------------------------------------------------

def test_streaming_statistics_equal_the_whole_batch():
    X = correlated_inputs(300, 16, seed=11).reshape(3, 100, 16)  # [batch, seq, in]
    full = InputStats(16, dtype=torch.float64)
    full.add(X)
    Xf = X.reshape(-1, 16).double()
    assert full.nsamples == 300
    assert torch.allclose(full.hessian, 2 / 300 * Xf.t() @ Xf)
    assert torch.allclose(full.scaler_row, (Xf ** 2).sum(0) / 300)
    streamed = InputStats(16, dtype=torch.float64)  # batches of different sizes
    for chunk in Xf.split(70):
        streamed.add(chunk)
    assert streamed.nsamples == 300 and torch.allclose(streamed.hessian, full.hessian)
    assert torch.allclose(streamed.sq_norm, full.sq_norm)


def test_row_parallel_shards_give_the_full_magnitude_and_wanda_masks():
    X = correlated_inputs(200, 32, seed=12)
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(13))
    full = InputStats(32)
    full.add(X)
    spec = NMSpec(2, 4)
    for method in ("magnitude", "wanda"):
        whole = oneshot_mask(method, W, full, spec)
        shards = []
        for c in range(0, 32, 8):  # a Row-parallel shard sees input columns [c, c + 8) only
            shard = InputStats(8)
            shard.add(X[:, c:c + 8])
            shards.append(oneshot_mask(method, W[:, c:c + 8], shard, spec))
        assert torch.equal(torch.cat(shards, dim=1), whole), method


def test_record_inputs_hook():
    lin = torch.nn.Linear(8, 4)
    stats = InputStats(8)
    handle = record_inputs(lin, stats)
    x = torch.randn(2, 5, 8)
    lin(x)
    handle.remove()
    lin(x)  # no longer recorded
    assert stats.nsamples == 10 and torch.allclose(stats.sq_norm, (x.reshape(-1, 8) ** 2).sum(0))


# ---- a real layer of SmolLM2-135M on real text -------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_layer_inputs():
    """Weights of block 5's linears and their inputs over 1,024 tokens of real English text."""
    transformers = pytest.importorskip("transformers")
    from maskllm_megatron import assets

    model_dir = assets.smollm2_hf_dir()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(assets.botchan_text()[:20000], return_tensors="pt").input_ids[0][:1024]
    assert ids.numel() == 1024
    model.model.layers = model.model.layers[:6]  # only block 5's inputs are needed: skip the rest and the head
    block = model.model.layers[5]
    linears = {"o_proj": block.self_attn.o_proj, "down_proj": block.mlp.down_proj}
    inputs = {name: [] for name in linears}
    hooks = [lin.register_forward_pre_hook(lambda _m, args, name=name: inputs[name].append(args[0].detach()))
             for name, lin in linears.items()]
    with torch.no_grad():
        for seq in ids.reshape(4, 256):
            model.model(seq[None])
    for h in hooks:
        h.remove()
    return {name: (lin.weight.detach().clone(), torch.cat(inputs[name]).reshape(-1, lin.in_features))
            for name, lin in linears.items()}


@pytest.mark.parametrize("name", ["o_proj", "down_proj"])
def test_real_layer_error_ordering(smollm2_layer_inputs, name):
    W, X = smollm2_layer_inputs[name]
    spec = NMSpec(2, 4)
    stats = InputStats(W.shape[1])
    stats.add(X)
    err = {m: reconstruction_error(W, W * oneshot_mask(m, W, stats, spec), X) for m in ("magnitude", "wanda", "sparsegpt")}
    _, W_upd = sparsegpt_prune(W, stats.hessian, spec, update_weights=True)
    err["sparsegpt+update"] = reconstruction_error(W, W_upd, X)
    print(name, {k: f"{v:.4g}" for k, v in err.items()})
    assert err["sparsegpt+update"] < err["wanda"] < err["magnitude"]
    assert err["sparsegpt"] < err["magnitude"]
