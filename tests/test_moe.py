"""Masks on the experts of mixture-of-experts models (tiny Qwen2-MoE shape: 4 experts, top-2, a gated shared
expert), with real ranks (torchrun, gloo):

- sparsify masks every expert's and the shared expert's linear_fc1/fc2; patterns address experts by their global
  index; the logits are initialised and sampled by global expert index, so EP=1 and EP=2 sample the same masks;
  a checkpoint saved at EP=2 loads at EP=1, and at expert TP=2, with the same logits and output
  (tests/scripts/moe_worker.py);
- Wanda and SparseGPT calibrate each expert on the tokens routed to it (checked by hand from the router weight),
  an expert no calibration token reached falls back to magnitude and says so;
- the driver learns masks at EP=2, resumes exactly, and the export loads in transformers with the masked
  model's logits and passes maskllm-verify."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.torchrun_util import printed_result, torchrun

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "scripts" / "moe_worker.py")


@pytest.fixture(scope="module")
def moe_inputs(tmp_path_factory) -> Path:
    """A tiny random Qwen2-MoE with the botchan SentencePiece tokenizer (converted by ``masks_result``); botchan
    text as an indexed dataset (tests/scripts/make_tiny_moe.py)."""
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    from make_tiny_moe import make

    return make(tmp_path_factory.mktemp("moe_run"))


def _config(work: Path, name: str) -> Path:
    cfg = {
        "model": {"checkpoint": str(work / "ckpt")},
        "parallel": {"tp": 1, "ep": 2},
        "data": {"train": [str(work / "botchan_text_document")], "split": "90,10,0", "seq_length": 32,
                 "micro_batch_size": 2, "global_batch_size": 8, "cache_dir": str(work / "cache")},
        "optim": {"lr": 2e-4, "min_lr": 2e-5},
        "mask": {"fused_kernel": False},
        "prior": {"method": "wanda", "calib_samples": 4},
        "run": {"out_dir": str(work / name), "train_iters": 4, "log_interval": 1, "eval_interval": 4,
                "eval_iters": 1, "save_interval": 2, "tensorboard": False},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def masks_result(tmp_path_factory, moe_inputs) -> dict:
    """One launch of 2 ranks: the worker converts the driver's model at TP=1 x EP=2, runs its mask checks, then
    the driver's command on it: EP=2 x DP=2, 4 iterations with a Wanda prior, saved at 2 and 4 ("straight")."""
    log = torchrun(WORKER, "masks", str(tmp_path_factory.mktemp("moe_masks")), str(moe_inputs / "hf"),
                   str(moe_inputs / "ckpt"), str(_config(moe_inputs, "straight")), nproc=2)
    return dict(printed_result(log), log=log)


def test_every_expert_and_the_shared_expert_are_masked_and_patterns_address_experts(masks_result):
    r = masks_result
    # per layer: linear_qkv, linear_proj, 4 experts x 2, shared expert x 2 = 12; the router is no parallel linear
    assert r["masked_layers"] == 24 and r["names_equal"] and r["local_experts_per_rank"] == 2
    assert r["include_expert3"] == [f"decoder.layers.{i}.mlp.experts.local_experts.3.linear_fc{j}"
                                    for i in (0, 1) for j in (1, 2)]  # held by rank 1 only: rank 0 masks nothing
    assert r["exclude_shared_and_attention"] == [f"decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc{j}"
                                                 for i in (0, 1) for e in range(4) for j in (1, 2)]
    # under EP the expert logits are reduced over the expert-data-parallel group, like their weights
    assert r["mask_logits_allreduce"] == ["False:experts", "True:linear_proj", "True:linear_qkv", "True:shared_experts"]


def test_ep1_and_ep2_sample_the_same_masks_and_checkpoints_cross_load(masks_result):
    r = masks_result
    assert r["init_logits_equal"]  # initial logits keyed by the global expert index
    assert r["experts_compared"] == 8 and r["samples_equal"]  # the same Gumbel samples for every expert
    assert r["ep2_vs_ep1_logits"] <= 1e-5  # EP=1 checkpoint at EP=2: the same hard-mask output
    assert r["changed_by_prior"] > 0.05  # new logits saved at EP=2 ...
    assert r["ep2_ckpt_logits_equal"] and r["ep2_ckpt_at_ep1_output"] <= 1e-5  # ... load at EP=1, tensor for tensor
    # expert tensor parallel (TP=2: each expert's fc2 holds half its input groups): the same logits, samples, output
    assert r["expert_tp2_local_logits_shape"] == [64, 32 // 4 // 2, 6]
    assert r["expert_tp2_logits_equal"] and r["expert_tp2_samples_equal"] and r["expert_tp2_output"] <= 1e-5


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_priors_calibrate_each_expert_on_its_routed_tokens_and_fall_back_to_magnitude(masks_result, method):
    """One calibration token: the router picks 2 of the 4 experts per layer; the other two get the magnitude mask,
    and the prior says so. Layer 0's 8 expert masks equal a hand computation from the router weight (EP=2: rank
    0's 4); EP=2 computes the same priors as EP=1."""
    for ep in (1, 2):
        p = masks_result[f"{method}_ep{ep}"]
        assert len(p["reached"]) == 2 and p["hand_equal"] and p["hand_checked"] == 8 // ep, p
        unreached0 = sorted({int(n.split(".")[5]) for n in p["unreached"] if n.startswith("layers.0.")})
        assert unreached0 == sorted(set(range(4)) - set(p["reached"]))
        assert len(p["unreached"]) == 8 and p["printed"]  # 2 experts x 2 linears x 2 layers, reported
    assert masks_result[f"{method}_ep2_equal_ep1"]


# ------------------------------------------------------------------------------------------------ the driver
def _history(out: Path) -> list:
    from maskllm_megatron.checkpoint_folders import read_extra

    return read_extra(out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip())["history"]


@pytest.fixture(scope="module")
def moe_run(moe_inputs, masks_result) -> dict:
    """The straight run (``masks_result``) resumed from its iteration-2 checkpoint in a copy of its folder, by the
    driver's command in fresh processes."""
    work = moe_inputs
    assert masks_result["train_exit_status"] == 0
    log = masks_result["log"]
    resumed = work / "resumed"
    shutil.copytree(work / "straight", resumed)
    shutil.rmtree(resumed / "checkpoints" / "iter_0000004")
    (resumed / "checkpoints" / "latest").write_text("iter_0000002")
    config = _config(work, "resumed")
    resume_log = torchrun("-m", "maskllm_megatron.train", "--config", str(config), nproc=2)
    return {"work": work, "log": log, "resume_log": resume_log}


@pytest.fixture(scope="module")
def exported(moe_run, tmp_path_factory) -> dict:
    """One process: the straight run's last checkpoint exported to HF and checked against transformers, and
    compared tensor for tensor with the resumed run's."""
    ckpt = moe_run["work"] / "straight" / "checkpoints" / "iter_0000004"
    out = tmp_path_factory.mktemp("moe_export") / "hf"
    r = printed_result(torchrun(WORKER, "export", str(ckpt), str(out),
                                str(moe_run["work"] / "resumed" / "checkpoints" / "iter_0000004"), nproc=1))
    return dict(r, out=out)


def test_driver_learns_expert_masks_at_ep2_and_resumes_exactly(moe_run, exported):
    work = moe_run["work"]
    straight = _history(work / "straight")
    assert [h[0] for h in straight] == [1, 2, 3, 4] and all(0 < h[1] < 20 for h in straight)
    assert "wanda" in moe_run["log"] and "prior_magnitude_fallbacks" in (work / "straight" / "metrics.jsonl").read_text()
    assert "resumed from" in moe_run["resume_log"] and "at iteration 2" in moe_run["resume_log"]
    assert _history(work / "resumed") == straight  # iteration, loss and data fingerprint of every step
    # every tensor of the final checkpoints, model and both chained optimizers (dense and expert-parallel)
    compared = exported["checkpoints"]
    assert compared["differ"] == [] and compared["compared"] == 44, compared


def test_export_loads_in_transformers_with_the_masked_logits_and_verifies(exported, capsys):
    """The run learned (expert masks moved off the Wanda prior); its HF export (loaded at EP=1 from the EP=2
    checkpoint) is verified, loads as Qwen2MoeForCausalLM with the masked megatron model's logits, and passes
    maskllm-verify."""
    check, out = exported, exported["out"]
    assert check["verify"].endswith("OK") and "38 tensors checked for 2:4" in check["verify"], check
    assert check["expert_rows_moved_off_prior"] > 0
    assert check["hf_class"] == "Qwen2MoeForCausalLM" and check["expert_layers"] == 16 and check["masked"] == 24
    assert check["sparsity_targets"] == 2 * (3 + 4 * 3 + 3 + 1)  # q,k,v; o; 4 experts x gate,up,down; shared x 3
    assert check["scale"] > 0.1 and check["max_abs_diff"] <= 1e-4, check
    from maskllm_megatron.export.verify import main as maskllm_verify  # the maskllm-verify command, in-process

    capsys.readouterr()
    assert maskllm_verify([str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


def test_moe_training_at_tp2_is_refused_in_one_line(tmp_path):
    """megatron-core trains MoE layers at TP > 1 only with sequence parallelism: the driver says so before it
    builds anything."""
    from maskllm_megatron.convert.checkpoint import CheckpointInfo
    from maskllm_megatron.megatron.model_builder import ModelConfig
    from maskllm_megatron.run_config import ConfigError, TrainConfig
    from maskllm_megatron.train.setup import build_model

    CheckpointInfo(ModelConfig(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=32, num_attention_heads=4,
                               vocab_size=256, max_position_embeddings=64, num_experts=4)).save(tmp_path)
    cfg = TrainConfig.from_dict({"model": {"checkpoint": str(tmp_path)}, "parallel": {"tp": 2, "ep": 1},
                                 "data": {"train": ["x"], "seq_length": 32}})
    with pytest.raises(ConfigError, match=r"^parallel.tp 2 with a mixture-of-experts model: .* use parallel.tp=1"):
        build_model(cfg)


def test_joint_training_distilled_from_the_dense_model_at_ep2_equals_ep1(moe_run):
    """mask.train_weights with distill.kd_weight > 0 (#37) on the MoE: the experts' weights train with their masks
    and the teacher is a copy of the original experts on their own expert-parallel ranks; EP=2 gives EP=1's
    losses (both at DP=2) and the KL to the dense model, the whole loss here, falls."""
    from tests.test_train import records

    work, losses = moe_run["work"], {}
    for ep in (2, 1):
        config = _config(work, f"joint_ep{ep}")
        cfg = yaml.safe_load(config.read_text())
        cfg["parallel"]["ep"], cfg["prior"] = ep, {"method": "magnitude"}
        cfg["mask"].update(train_weights=True)
        cfg["distill"] = {"kd_weight": 1.0, "temperature": 1.0}
        cfg["optim"].update(lr=1e-3, min_lr=1e-4)
        cfg["run"].update(train_iters=3, save_interval=0, eval_interval=0)
        config.write_text(yaml.safe_dump(cfg))
        torchrun("-m", "maskllm_megatron.train", "--config", str(config), nproc=2)
        steps = [r for r in records(work / f"joint_ep{ep}") if "kd_loss" in r]
        losses[ep] = {key: [r[key] for r in steps] for key in ("lm_loss", "kd_loss")}
    for key in ("lm_loss", "kd_loss"):
        two, one = losses[2][key], losses[1][key]
        # the first step (masks from the prior, original weights, the teacher) to float precision; after it,
        # the all-to-all's other summation order (differences ~1e-7 in the small KL) grows through Adam
        assert len(two) == 3 and two[0] == pytest.approx(one[0], rel=2e-4), (key, losses)
        assert two[1:] == pytest.approx(one[1:], rel=2e-2), (key, losses)
    assert losses[2]["kd_loss"][-1] < losses[2]["kd_loss"][0], losses  # the student moves towards the teacher
