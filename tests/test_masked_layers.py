"""Masked Column/Row parallel layers under real ranks (torchrun, gloo): TP=2 against plain torch,
TP=1 against TP=2, and dist_checkpointing across TP sizes."""
import pytest
import torch

from tests.torchrun_util import torchrun

WORKER = "tests/scripts/masked_layers_worker.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("masked_layers")
    # Each run checks forward/backward against plain torch on the gathered tensors (1e-5) itself.
    torchrun(WORKER, 2, d, d / "ckpt_tp2", "save", nproc=2)
    torchrun(WORKER, 1, d, d / "ckpt_tp2", "load", nproc=1)
    torchrun(WORKER, 1, d, d / "ckpt_tp1", "save", nproc=1)
    return {name: torch.load(d / f"{name}.pt") for name in ("tp2_save", "tp1_load", "tp1_save")}


def test_tp1_and_tp2_sample_identical_masks_and_logit_gradients(runs):
    tp1, tp2 = runs["tp1_save"], runs["tp2_save"]
    for key in ("Mc", "Mr", "Mg", "Lc", "Lr", "Lg"):
        assert torch.equal(tp1[key], tp2[key]), key
    for key in ("gc_local", "gr_local"):
        torch.testing.assert_close(tp1[key], tp2[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tp1["z"], tp2["z"], rtol=1e-5, atol=1e-5)


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_tp2(runs):
    for key in ("ckpt_Lc", "ckpt_Lr", "ckpt_Lg"):
        assert torch.equal(runs["tp2_save"][key], runs["tp1_load"][key]), key
    # The saved values are not the initial ones (the save perturbed them).
    assert not torch.equal(runs["tp2_save"]["ckpt_Lc"], runs["tp2_save"]["Lc"])


def test_bf16_model_has_bf16_logits_loading_an_fp32_checkpoint(runs):
    """In a bf16 model the logits are bf16 (fp32 master copies live in megatron's optimizer, sharded by
    the distributed optimizer); a checkpoint saved from fp32 logits loads into them, rounded."""
    load = runs["tp1_load"]
    assert load["bf16_logits"].dtype == torch.bfloat16
    assert torch.equal(load["bf16_logits"], load["ckpt_Lc"].to(torch.bfloat16))
    assert load["bf16_logits_grad_dtype"] == "torch.bfloat16" and load["bf16_logits_grad_finite"]
