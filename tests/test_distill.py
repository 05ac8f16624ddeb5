"""Distillation from the dense model: the vocab-parallel KL against plain torch at TP=1 and TP=2 (values and
gradients), and the driver distilling at PP=1 and PP=2, resuming exactly and logging every loss."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.test_train import history, records, torchrun, write_config
from tests.torchrun_util import printed_result

WORKER = "tests/scripts/distill_worker.py"


def test_kl_and_its_gradient_equal_plain_torch():
    from maskllm_megatron.megatron.distill import vocab_parallel_kl

    g = torch.Generator().manual_seed(0)
    s = (4 * torch.randn(3, 7, 50, generator=g)).requires_grad_(True)
    t = 4 * torch.randn(3, 7, 50, generator=g)
    for temperature in (1.0, 2.5):
        s.grad = None
        kl = vocab_parallel_kl(s, t, temperature)
        kl.sum().backward()
        ref_s = s.detach().double().requires_grad_(True)
        ref = F.kl_div(F.log_softmax(ref_s / temperature, -1), F.log_softmax(t.double() / temperature, -1),
                       log_target=True, reduction="none").sum(-1) * temperature ** 2
        ref.sum().backward()
        torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=1e-5, atol=1e-6)
    assert float(vocab_parallel_kl(t, t).abs().max()) < 1e-5  # a model against itself
    with pytest.raises(ValueError, match="must be positive"):
        vocab_parallel_kl(s, t, 0.0)


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_parallel_kl_equals_the_gathered_computation(tp):
    """float32 shards against float64 on the gathered logits: 1e-5 of the largest value."""
    r = printed_result(torchrun(WORKER, nproc=tp))
    assert r["tp"] == tp
    assert r["kl_diff"] <= 1e-5 * r["kl_scale"], r
    assert r["grad_diff"] <= 1e-5 * r["grad_scale"], r
    assert r["ce_equal"], r  # the teacher path leaves the LM loss bit for bit as it was
    assert r["kl_masked"] > 1e-3 and abs(r["kl_self"]) < 1e-6, r
    # distillation while weights train: the teacher forwards the copy of the original trained parameters
    assert r["teacher_copied"] == r["trained_numel"] > 0, r
    assert {"linear_qkv", "linear_fc2", "input_layernorm"} <= set(r["trained_kinds"]), r
    assert "embedding" not in str(r["trained_kinds"]) and "output_layer" not in r["trained_kinds"], r
    assert r["teacher_is_original"] and r["moved_would_differ"] and r["moved_given_back"], r


def _resume_from_iteration_2(tiny, run: str, name: str, config):
    """A copy of the 4-iteration run ``run`` cut back to its iteration-2 checkpoint, resumed by the driver
    with ``config`` (whose out_dir is ``tiny / name``); the resumed run's folder."""
    out = tiny / name
    shutil.copytree(tiny / run, out)
    (out / "checkpoints" / "latest").write_text("iter_0000002")
    shutil.rmtree(out / "checkpoints" / "iter_0000004")
    log = torchrun("-m", "maskllm_megatron.train", "--config", config, nproc=1)
    assert "at iteration 2" in log, log[-3000:]
    return out


def _distill_config(tiny, name, **parallel):
    return write_config(tiny, name, parallel={"tp": 1, **parallel}, prior={"method": "magnitude"},
                        distill={"kd_weight": 0.5, "temperature": 2.0},
                        run={"train_iters": 4, "log_interval": 1, "eval_interval": 2, "eval_iters": 1,
                             "save_interval": 2})


def test_distillation_at_pp2_equals_pp1_and_resumes_exactly(tiny):
    for name, pp in (("kd_pp1", 1), ("kd_pp2", 2)):
        torchrun("-m", "maskllm_megatron.train", "--config", _distill_config(tiny, name, pp=pp), nproc=pp)
    pp1, pp2 = ([r for r in records(tiny / n) if "lm_loss" in r] for n in ("kd_pp1", "kd_pp2"))
    assert len(pp1) == 4
    for key in ("lm_loss", "kd_loss", "loss"):
        assert [r[key] for r in pp2] == pytest.approx([r[key] for r in pp1], rel=1e-5), key
    for r in pp1:
        assert r["loss"] == pytest.approx(0.5 * r["kd_loss"] + 0.5 * r["lm_loss"], rel=1e-6)
        assert r["kd_loss"] > 0
    valid = [[r["valid/kl_to_dense"] for r in records(tiny / n) if "valid/kl_to_dense" in r] for n in ("kd_pp1", "kd_pp2")]
    assert len(valid[0]) == 3 and valid[1] == pytest.approx(valid[0], rel=1e-5)
    # resumed from iteration 2 it continues the same run, bit for bit
    out = _resume_from_iteration_2(tiny, "kd_pp1", "kd_resumed", _distill_config(tiny, "kd_resumed"))
    assert history(out) == history(tiny / "kd_pp1")
    assert [r["loss"] for r in records(out) if "loss" in r] == [r["loss"] for r in pp1]


def test_the_gradient_of_logits_returned_by_the_model_leaves_in_the_heads_layout():
    """GPTModel returns [b, s, V] logits as a transpose of its head's [s, b, V] output; the gradient of a
    loss on them must reach the head as a plainly contiguous [s, b, V] tensor, whatever b (at b=1 the
    [b, s, V] gradient's transpose is 'contiguous' with a batch stride of s*V, which sends torch's
    matmul to an expanded bmm), and be the same numbers."""
    import torch

    from maskllm_megatron.megatron.distill import sequence_first_grad

    for b in (1, 3):
        head = torch.randn(7, b, 11, requires_grad=True)  # [s, b, V]
        seen = []
        head.register_hook(lambda g: seen.append(g))
        logits = head.transpose(0, 1).contiguous()  # what GPTModel returns
        weights = torch.randn(b, 7, 11)
        (sequence_first_grad(logits) * weights).sum().backward()
        g = seen[0]
        assert g.stride() == torch.empty(7, b, 11).stride(), (b, g.stride())
        torch.testing.assert_close(g, weights.transpose(0, 1), rtol=0, atol=0)


def _refit_config(tiny, name, tp):
    return write_config(tiny, name, parallel={"tp": tp}, prior={"method": "magnitude"},
                        mask={"refit": True, "fused_kernel": False}, distill={"kd_weight": 1.0, "temperature": 1.0},
                        optim={"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.0},
                        run={"train_iters": 4, "log_interval": 1, "eval_interval": 4, "eval_iters": 2,
                             "save_interval": 2})


def test_refit_trains_the_kept_weights_under_the_fixed_mask_from_the_dense_teacher(tiny, tmp_path):
    """mask.refit (#24): the prior's mask stays exactly as it was (here magnitude's, recomputed in plain torch
    from the dense weights), the kept weights learn by distillation from the original dense model (its KL
    falls), TP=2 gives TP=1's losses, and the export is that mask on the refit weights, recorded as such."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from maskllm_megatron.export.cli import main as export_main
    from maskllm_megatron.masks import NMSpec, topn_mask

    for name, tp in (("refit_tp2", 2), ("refit_tp1", 1)):
        torchrun("-m", "maskllm_megatron.train", "--config", _refit_config(tiny, name, tp), nproc=tp)
    tp2, tp1 = ([r for r in records(tiny / n) if "kd_loss" in r] for n in ("refit_tp2", "refit_tp1"))
    assert len(tp2) == 4 and [r["kd_loss"] for r in tp1] == pytest.approx([r["kd_loss"] for r in tp2], rel=1e-4)
    kl = [r["valid/kl_to_dense"] for r in records(tiny / "refit_tp2") if "valid/kl_to_dense" in r]
    assert len(kl) == 2 and kl[1] < 0.9 * kl[0], kl  # iteration 0 (the prior's mask, dense weights) and 4

    dense_hf, out = tmp_path / "dense_hf", tmp_path / "refit_hf"
    subprocess.run([sys.executable, "-m", "maskllm_megatron.convert.cli", "mcore-to-hf", "--ckpt", str(tiny / "ckpt"),
                    "--out", str(dense_hf)], check=True, capture_output=True)
    assert export_main(["--ckpt", str(tiny / "refit_tp2"), "--format", "hf", "--out", str(out)]) == 0
    dense, refit = load_file(dense_hf / "model.safetensors"), load_file(out / "model.safetensors")
    record = json.loads((out / "config.json").read_text())["sparsity"]
    assert record["weights"] == "refit" and record["refit"]["kd_weight"] == 1.0
    spec = NMSpec(2, 4)
    for name in record["targets"]:
        mask = topn_mask(dense[name].abs(), spec).bool()  # magnitude 2:4 of the dense weight
        assert torch.equal(refit[name] != 0, mask), name
        assert not torch.equal(refit[name], dense[name] * mask), name  # the kept weights moved
    untouched = [k for k in dense if k not in record["targets"]]
    assert untouched and all(torch.equal(dense[k], refit[k]) for k in untouched)  # norms, embeddings, head

    # resumed from iteration 2, the refit continues bit for bit: the mask and the refit weights come from the
    # checkpoint, the teacher is still the original dense model
    out = _resume_from_iteration_2(tiny, "refit_tp1", "refit_resumed", _refit_config(tiny, "refit_resumed", 1))
    assert [r["kd_loss"] for r in records(out) if "kd_loss" in r] == [r["kd_loss"] for r in tp1]
    assert history(out) == history(tiny / "refit_tp1")


def _joint_config(tiny, name, **parallel):
    return write_config(tiny, name, parallel={"tp": 1, **parallel}, prior={"method": "magnitude"},
                        mask={"train_weights": True, "fused_kernel": False},
                        distill={"kd_weight": 0.5, "temperature": 1.0},
                        optim={"lr": 1e-3, "min_lr": 1e-4, "mask_warmup_iters": 2},
                        run={"train_iters": 4, "log_interval": 1, "eval_interval": 4, "eval_iters": 1,
                             "save_interval": 2})


def test_joint_training_distils_from_the_original_model_at_any_layout_and_resumes_exactly(tiny, tmp_path):
    """mask.train_weights with distill.kd_weight > 0 (#37): masks and weights learn together from the dense
    model's logits. TP=2 and PP=2 give TP=1's losses; the logits warm up on their own schedule
    (optim.mask_warmup_iters) while the weights do not; a resume from iteration 2 continues bit for bit
    (the teacher is again the original model, not the checkpoint's trained weights); the export records
    the joint training."""
    import json

    from maskllm_megatron.export.cli import main as export_main

    for name, nproc, parallel in (("joint_tp1", 1, {}), ("joint_tp2", 2, {"tp": 2}), ("joint_pp2", 2, {"pp": 2})):
        torchrun("-m", "maskllm_megatron.train", "--config", _joint_config(tiny, name, **parallel), nproc=nproc)
    tp1, tp2, pp2 = ([r for r in records(tiny / n) if "kd_loss" in r] for n in ("joint_tp1", "joint_tp2", "joint_pp2"))
    assert len(tp1) == 4
    for key in ("lm_loss", "kd_loss", "loss"):
        assert [r[key] for r in tp2] == pytest.approx([r[key] for r in tp1], rel=1e-4), key
        assert [r[key] for r in pp2] == pytest.approx([r[key] for r in tp1], rel=1e-5), key
    assert tp1[-1]["kd_loss"] < tp1[0]["kd_loss"], tp1  # the student moves towards the teacher
    # the logits' lr (logged): 1e-2 peak, a 2-iteration warm-up from 0, then cosine to 1e-3 over iterations 2-4
    assert [r["lr"] for r in tp1] == pytest.approx([5e-3, 1e-2, 1e-3 + 0.5 * 9e-3, 1e-3], rel=1e-9)

    out = _resume_from_iteration_2(tiny, "joint_tp1", "joint_resumed", _joint_config(tiny, "joint_resumed"))
    assert [r["kd_loss"] for r in records(out) if "kd_loss" in r] == [r["kd_loss"] for r in tp1]
    assert history(out) == history(tiny / "joint_tp1")

    hf = tmp_path / "joint_hf"
    assert export_main(["--ckpt", str(tiny / "joint_tp2"), "--format", "hf", "--out", str(hf)]) == 0
    record = json.loads((hf / "config.json").read_text())["sparsity"]
    assert record["weights"] == "trained with the masks"
    assert record["joint"] == {"iterations": 4, "kd_weight": 0.5, "temperature": 1.0}


def test_weights_learn_from_sparsegpts_update_distilled_from_the_original_model(tiny, tmp_path):
    """prior.update_weights with weights that train (#37): the run starts from SparseGPT's OBS-updated weights,
    computed in the run or taken from a prior-only run's checkpoint (the same model either way), while the
    teacher stays the original dense model: under the prior's fixed mask the student's KL to it at iteration 0
    is far from 0 (a teacher copied after the update would be the student itself), and a refit from the
    updated weights starts closer to the dense model than one from the original weights."""
    import json

    from maskllm_megatron.export.cli import main as export_main

    torchrun("-m", "maskllm_megatron.train", "--config", write_config(
        tiny, "update_prior", parallel={"tp": 1}, prior={"update_weights": True}, run={"train_iters": 0}), nproc=1)
    prior = str(tiny / "update_prior" / "checkpoints" / "iter_0000000")
    steps = {"train_iters": 2, "log_interval": 1, "eval_interval": 2, "eval_iters": 2, "save_interval": 2}
    for name, prior_section, mask in (
            ("refit_updated", {"method": "checkpoint", "checkpoint": prior, "update_weights": True}, {"refit": True}),
            ("refit_original", {"method": "checkpoint", "checkpoint": prior}, {"refit": True}),
            ("joint_updated", {"update_weights": True, "calib_samples": 16}, {"train_weights": True,
                                                                             "prior_strength": 50.0})):
        torchrun("-m", "maskllm_megatron.train", "--config", write_config(
            tiny, name, parallel={"tp": 1}, prior=prior_section, mask={**mask, "fused_kernel": False},
            distill={"kd_weight": 1.0}, optim={"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.0}, run=steps),
            nproc=1)
    kl0 = {n: [r["valid/kl_to_dense"] for r in records(tiny / n) if "valid/kl_to_dense" in r][0]
           for n in ("refit_updated", "refit_original", "joint_updated")}
    assert 1e-3 < kl0["refit_updated"] < 0.9 * kl0["refit_original"], kl0
    # the joint run's hard masks at iteration 0 are the prior's (strength 50), on the weights it updated itself
    assert kl0["joint_updated"] == pytest.approx(kl0["refit_updated"], rel=1e-4), kl0

    hf = tmp_path / "joint_hf"
    assert export_main(["--ckpt", str(tiny / "joint_updated"), "--format", "hf", "--out", str(hf)]) == 0
    record = json.loads((hf / "config.json").read_text())["sparsity"]
    assert record["weights"] == "trained with the masks" and record["joint"]["start"] == "SparseGPT's OBS update"
