"""Sequence parallelism and activation recomputation (parallel.sequence_parallel / parallel.recompute) on the
tiny LLaMA-shaped model with real ranks (gloo): they change where activations live, never the numbers."""
import json

import pytest

from tests.torchrun_util import torchrun

# the reduction order over tensor-parallel ranks is the only difference from TP=1 (measured: <= 2e-5)
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def layouts(tiny):
    """One launch (tests/scripts/layouts_worker.py): ten layouts, two training steps each, compared with
    their reference layout (TP=1 for the parallel ones, the same layout without recompute for the others);
    then the driver's train() saves a sequence-parallel run and resumes it without."""
    out = tiny / "layouts.json"
    torchrun("tests/scripts/layouts_worker.py", tiny, out, nproc=2)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", ["tp2", "tp2_sp"])
def test_tp2_with_and_without_sequence_parallel_equals_tp1(layouts, name):
    """Losses, the gradients of every layer's mask logits (gathered to the TP=1 layout) and the hard masks
    after the steps equal TP=1's; the SparseGPT prior sees the whole sequence under SP (a column layer's
    input is the rank's sequence shard there)."""
    r = layouts[name]
    assert r["logit_grads"] == 8 and r["logit_grads_nonzero"]
    assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-6)
    assert r["grad_max_rel"] < GRAD_RTOL and r["masks_equal"], r


def test_sequence_parallel_is_bit_identical_to_tp2_without_it(layouts):
    """At TP=2 a reduce-scatter sums the same two partial results as an all-reduce: nothing differs."""
    assert layouts["tp2_sp"]["losses"] == layouts["tp2"]["losses"]
    assert layouts["tp2_sp"]["grad_max_rel"] == layouts["tp2"]["grad_max_rel"]


@pytest.mark.parametrize("name", ["tp2_sp_full_uniform", "tp2_sp_full_block", "tp2_sp_selective", "pp2_full"])
def test_recompute_changes_neither_losses_nor_logit_gradients(layouts, name):
    """Full (uniform, block) and selective recompute give the losses and logit gradients of the same layout
    without it, exactly: every layer gets its gradient (frozen embeddings give megatron's re-entrant
    checkpoint no input that needs one), and at PP=2, where the 1F1B schedule runs the next micro-batch's
    forward before this one's backward, the recomputed layers resample this micro-batch's masks."""
    r = layouts[name]
    assert r["logit_grads"] == 8 and r["logit_grads_nonzero"]
    assert r["losses"] == r["ref_losses"] and r["grad_max_rel"] == 0.0 and r["masks_equal"], r


def test_joint_training_with_sequence_parallel_reduces_the_norm_gradients(layouts):
    """mask.train_weights trains the norms too. Under SP each TP rank's norm gradient covers its own tokens;
    the norms' ``sequence_parallel`` attribute has megatron's finalize_model_grads sum them over TP, so they
    equal TP=1's (without the attribute they are off by 83%)."""
    r = layouts["joint_tp2_sp"]
    assert r["norm_grad_min_abs_max"] > 1e-4  # the norms really train
    assert r["norm_grad_max_rel"] < GRAD_RTOL and r["grad_max_rel"] < GRAD_RTOL, r
    assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-5)


def test_layernorm_models_take_sequence_parallelism_with_their_biases(layouts):
    """A Nemotron-shaped model (LayerNorm with bias: LayerNorm1p as converted) at TP=2 with and without SP,
    trained jointly: the same loss and logit gradients, bit for bit; every norm weight and bias carries
    the attribute, so their gradients are summed over TP (to 1e-5; 80% off without it on the biases)."""
    r = layouts["layernorm_sp"]
    assert r["losses"][0] == r["losses"][1] and r["logit_grads_equal"]
    assert r["biases"] == 5 and r["attributes"] == [[False], [True]]
    assert r["norm_grads_nonzero"] and r["norm_grad_max_rel"] < 1e-5, r


def test_a_sequence_parallel_checkpoint_resumes_without_it_exactly(layouts):
    """The driver (train()) at TP=2 with SP and full recompute, saved at iteration 2, resumed with neither:
    neither setting is a key a resume must keep, and the resumed run logs the uninterrupted run's losses
    and gradient norms bit for bit."""
    straight, resumed = layouts["resume"]["sp_straight"], layouts["resume"]["sp_resumed"]
    assert [h[0] for h in straight["history"]] == [1, 2, 3]
    assert resumed["history"] == straight["history"]
    assert len(straight["grad_norms"]) == 3 and resumed["grad_norms"] == straight["grad_norms"]


@pytest.mark.parametrize("overrides, message", [
    (("parallel.sequence_parallel=true",), "parallel.sequence_parallel needs parallel.tp > 1"),
    (("parallel.tp=4", "parallel.sequence_parallel=true", "data.seq_length=130"),
     "splits data.seq_length 130 over tp=4 ranks: make it a multiple of 4"),
    (("parallel.recompute=yes",), "parallel.recompute 'yes': use none, full or selective"),
    (("parallel.recompute=full", "parallel.recompute_method=all"), "parallel.recompute_method 'all': use uniform"),
    (("parallel.recompute=full", "parallel.recompute_num_layers=0"), "recompute_num_layers 0 must be >= 1"),
    (("parallel.recompute=selective", "parallel.recompute_modules=[layernorm]"),
     "the local spec recomputes core_attn and mlp (layernorm needs Transformer Engine's checkpoint"),
])
def test_memory_options_are_refused_in_one_line(overrides, message):
    from maskllm_megatron.run_config import ConfigError, TrainConfig

    base = ("model.checkpoint=/ckpt", "data.train=[/d/x_text_document]")
    with pytest.raises(ConfigError) as e:
        TrainConfig.load(None, base + overrides).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_recompute_layer_count_is_checked_against_the_model():
    from maskllm_megatron.run_config import ConfigError, TrainConfig

    def cfg(*o):
        return TrainConfig.load(None, ("model.checkpoint=/c", "data.train=[/d/x]", "parallel.recompute=full", *o))

    cfg("parallel.recompute_num_layers=4").check_recompute_layers(32)
    cfg("parallel.pp=4", "parallel.recompute_method=block", "parallel.recompute_num_layers=8").check_recompute_layers(32)
    for o, message in ((("parallel.recompute_num_layers=3",), "uniform needs a divisor of 32"),
                       (("parallel.pp=4", "parallel.recompute_method=block", "parallel.recompute_num_layers=9"),
                        "a pipeline stage holds 8 layers")):
        with pytest.raises(ConfigError, match=message):
            cfg(*o).check_recompute_layers(32)


def test_recompute_lowers_the_measured_peak_by_what_the_memory_model_predicts(layouts):
    """The CPU allocator's peak over two training steps (benchmarks/memory_model.py's measurement: every
    allocation, so weights, logits, gradients, Adam and activations) at two sequence lengths, with and
    without full recompute: each within 5% of the memory model, and the saving within 5% of its prediction,
    growing with the sequence."""
    rows = {(r["layout"], r["seq"]): r for r in layouts["recompute_memory"]}
    savings = []
    for seq in (128, 256):
        plain, full = rows[("tp1", seq)], rows[("tp1_full", seq)]
        for r in (plain, full):
            assert abs(r["ratio"] - 1) < 0.05, r
        measured = plain["measured_peak"] - full["measured_peak"]
        predicted = plain["predicted_peak"] - full["predicted_peak"]
        assert measured > 0 and abs(measured / predicted - 1) < 0.05, (seq, measured, predicted)
        savings.append(measured)
    assert savings[1] > 1.5 * savings[0]


def test_the_memory_model_counts_what_trains_with_the_teachers_copy(layouts):
    """Joint training distilled from the dense model (the masked weights, biases and norms train: their fp32
    gradients and Adam state, and the teacher's copy of them) and a distilled refit (the masked weights train
    under fixed masks, the logits do not): the persistent state within 1% of the memory model, the peak within
    5% (the teacher's forward is not run: its logits are not modelled). The joint layout holds more than the
    refit by what the model says."""
    rows = {r["layout"]: r for r in layouts["recompute_memory"] if r["layout"] in ("tp1_joint_kd", "tp1_refit_kd")}
    assert len(rows) == 2
    for r in rows.values():
        assert abs(r["state_ratio"] - 1) < 0.01 and abs(r["ratio"] - 1) < 0.05, r
    joint, refit = rows["tp1_joint_kd"], rows["tp1_refit_kd"]
    measured = joint["measured_state"] - refit["measured_state"]
    predicted = joint["predicted_state"] - refit["predicted_state"]
    assert measured > 0 and abs(measured / predicted - 1) < 0.05, (measured, predicted)
