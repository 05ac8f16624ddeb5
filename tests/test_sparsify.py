"""sparsify() on megatron-core GPTModel (GPT-3, LLaMA, Nemotron shapes) and checkpoints across TP sizes,
with real ranks (torchrun, gloo)."""

import torch

from tests.torchrun_util import printed_result, torchrun

WORKER = "tests/scripts/sparsify_worker.py"



def test_sparsify_masks_the_right_modules_freezes_weights_and_matches_hand_masked_model(tmp_path):
    """Also checks the SDPA core attention against megatron-core's own at TP=2, the learning rates the
    optimizer applies to logits and weights, and training through the controller ``sparsify`` returns."""
    r = printed_result(torchrun(WORKER, "check", 2, tmp_path, nproc=2))
    for family in ("gpt", "llama", "nemotron"):
        assert r[family]["masked"] == 8 and r[family]["eval_diff"] <= 1e-5
        # fused SDPA core attention == megatron-core's DotProductAttention (logits and all gradients, TP=2)
        assert r[f"{family}_attention_diff"] <= 1e-5, r
    assert r["optimizer"]["params"] == r["optimizer"]["grad_buffer"]
    # the logits really get lr x mask_lr_mult, and joint training moves weights and norms by lr (measured from
    # Adam's first step; asserted in the worker)
    assert set(r["applied_lr"]) == {"step0", "step10"}, r
    # a library user's loop through sparsify's controller alone == the same steps driven by hand, exactly
    c = r["controller"]
    assert c["losses"] == c["reference_losses"] and len(c["losses"]) == 3, c
    assert c["logits_moved_min"] > 0 and c["masks_2_4"] and c["masks_equal"], c
    # refused: a second sparsify, and a tied LM head (which leaves the model exactly as built)
    assert r["refusals"]["twice"].startswith("the model is already sparsified (2 masked layers)"), r
    assert r["refusals"]["tied"].startswith("output_layer has no weight of its own"), r


def test_checkpoint_round_trip_tp2_tp1_tp2_from_a_dense_start(tmp_path):
    losses = [printed_result(torchrun(WORKER, mode, tp, tmp_path, nproc=tp))["loss"]
              for mode, tp in (("save", 2), ("load1", 1), ("load2", 2))]
    assert abs(losses[0] - losses[1]) <= 1e-6 and losses[0] == losses[2]
    saved, tp1, tp2 = (torch.load(tmp_path / f"logits_{m}.pt") for m in ("save", "load1", "load2"))
    assert len(saved) == 8
    for key in saved:
        assert torch.equal(saved[key], tp1[key]) and torch.equal(saved[key], tp2[key]), key


def test_the_package_root_is_the_entry_point_and_importing_it_changes_nothing():
    """``from maskllm_megatron import sparsify, SparsifyConfig, MaskConfig`` works; importing the package alone
    loads neither torch nor megatron-core and leaves the warning filters as they were; the one import hook
    it adds (megatron's jit stays eager without CUDA, ``launch.eager_megatron_jit_on_cpu``) is its only
    change to the import system."""
    import subprocess
    import sys

    code = ("import sys, warnings; before = list(warnings.filters); finders = list(sys.meta_path); "
            "import maskllm_megatron; "
            "assert warnings.filters == before, 'warning filters changed'; "
            "added = [f for f in sys.meta_path if f not in finders]; "
            "assert [type(f).__name__ for f in added] == ['_EagerMegatronJitOnCpu'], added; "
            "assert 'torch' not in sys.modules and 'megatron.core' not in sys.modules, 'heavy imports'; "
            "from maskllm_megatron import sparsify, SparsifyConfig, MaskConfig, PriorConfig; "
            "from maskllm_megatron.megatron.sparsify import sparsify as s; assert sparsify is s; "
            "assert SparsifyConfig(mask=MaskConfig(nm='2:4')).mask.nm.n == 2; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import maskllm_megatron as m; m.nothing"], capture_output=True,
                       text=True, timeout=60)
    assert "has no attribute 'nothing'" in r.stderr
