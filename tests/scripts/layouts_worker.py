"""Worker for tests/test_memory_layouts.py (torchrun, 2 ranks, gloo): the driver's own pieces (setup_parallel,
build_model, build_optimizer, run_batches) take the same training steps at several layouts in one launch.

usage: layouts_worker.py TINY_DIR OUT_JSON

Each layout runs ``STEPS`` iterations from the tiny checkpoint (the driver's SparseGPT prior, magnitude at
PP=2; megatron's plain optimizer, so every rank holds the whole reduced gradient). Rank 0 writes, per layout: the losses, and per iteration
the gradient of every layer's mask logits and of every norm weight (joint layouts), in the global TP=1
layout, compared with the reference layout named in LAYOUTS: the largest difference relative to the
reference's largest magnitude, and whether the hard masks after the last step are identical. Then the
driver's ``train`` saves a run with sequence parallelism and resumes it without (``resume``), and peak memory
is measured with and without recompute against the memory model (``recompute_memory``).
"""
import json
import sys
from pathlib import Path

import torch

STEPS = 2
# name: (reference, overrides of the parallel / mask sections)
LAYOUTS = {
    "tp1": (None, {}),
    "tp2": ("tp1", {"tp": 2}),
    "tp2_sp": ("tp1", {"tp": 2, "sequence_parallel": True}),
    "tp2_sp_full_uniform": ("tp2_sp", {"tp": 2, "sequence_parallel": True, "recompute": "full"}),
    "tp2_sp_full_block": ("tp2_sp", {"tp": 2, "sequence_parallel": True, "recompute": "full",
                                     "recompute_method": "block", "recompute_num_layers": 1}),
    "tp2_sp_selective": ("tp2_sp", {"tp": 2, "sequence_parallel": True, "recompute": "selective",
                                    "recompute_modules": ["core_attn", "mlp"]}),
    "pp2": (None, {"pp": 2}),
    "pp2_full": ("pp2", {"pp": 2, "recompute": "full"}),
    "joint_tp1": (None, {"train_weights": True}),
    "joint_tp2_sp": ("joint_tp1", {"tp": 2, "sequence_parallel": True, "train_weights": True}),
}


def config(tiny: Path, overrides: dict, prior: str = ""):
    from maskllm_megatron.run_config import TrainConfig

    parallel = {"tp": 1, "distributed_optimizer": False, **{k: v for k, v in overrides.items() if k != "train_weights"}}
    return TrainConfig.from_dict({
        "model": {"checkpoint": str(tiny / "ckpt")},
        "parallel": parallel,
        "data": {"train": [str(tiny / "data" / "botchan_text_document")], "split": "90,10,0", "seq_length": 64,
                 "micro_batch_size": 4, "global_batch_size": 8, "cache_dir": str(tiny / "cache")},
        "optim": {"lr": 2e-3, "min_lr": 2e-4},
        "mask": {"fused_kernel": False, "train_weights": overrides.get("train_weights", False)},
        # SparseGPT calibrates on the layers' inputs (under SP a column layer's input is a sequence shard);
        # pipeline stages take the magnitude prior (calibration runs at PP=1)
        "prior": {"method": prior or ("magnitude" if overrides.get("pp", 1) > 1 else "sparsegpt"), "calib_samples": 8},
        "run": {"out_dir": str(tiny / "layouts_unused"), "train_iters": 4, "seed": 1234},
    })


def gathered(tensors: dict, group=None) -> dict:
    """{name: tensor} of every rank (pipeline stages hold different layers), on every rank."""
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, tensors)
    out = {}
    for part in parts:
        out.update(part)
    return out


def run(tiny: Path, overrides: dict) -> dict:
    from megatron.core import parallel_state

    from maskllm_megatron.megatron.sparsify import masked_layers
    from maskllm_megatron.train.data import build_data
    from maskllm_megatron.train.setup import apply_prior, build_model, build_optimizer, setup_parallel
    from maskllm_megatron.train.step import mean_loss, run_batches

    cfg = config(tiny, overrides)
    env = setup_parallel(cfg)
    model, info, masks = build_model(cfg)
    data = build_data(cfg, info, env.dp_rank, env.dp_size)
    apply_prior(cfg, model, data)
    ddp, optimizer, scheduler = build_optimizer(cfg, model, masks)
    num_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * env.dp_size)
    batches = data.train_iterations(0, num_micro)
    tp_first = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    losses, grads = [], []
    ddp.train()
    for it in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        results = run_batches(cfg, ddp, next(batches), num_micro, forward_only=False, sample_masks=lambda mb:
                              masks.step(it, mb * env.dp_size + env.dp_rank, 1.0 / num_micro))
        losses.append(mean_loss(results, parallel_state.get_data_parallel_group()))
        step = {}
        for layer in masked_layers(model):
            full = layer.gather_global(layer.mask_logits.main_grad.view_as(layer.mask_logits))
            if tp_first:
                step[f"{layer.mask_layer_id}.mask_logits"] = full
        if cfg.mask.train_weights:  # norms are replicated over TP: this rank's reduced gradient
            for name, p in model.named_parameters():
                if "layernorm" in name and tp_first:
                    step[_global_name(model, name)] = p.main_grad.detach().clone()
        grads.append(gathered(step))
        optimizer.step()
        scheduler.step(increment=1)
    masks = {}
    for layer in masked_layers(model):
        full = layer.gather_global(layer.hard_mask())
        if tp_first:
            masks[layer.mask_layer_id] = full
    return {"losses": losses, "grads": grads, "masks": gathered(masks)}


def _global_name(model, name: str) -> str:
    """A parameter name with the pipeline-local layer number replaced by the global one."""
    import re

    m = re.match(r"(.*?layers\.)(\d+)(\..*)", name)
    if not m:
        return name
    layer = model.decoder.layers[int(m.group(2))]
    return f"{m.group(1)}{layer.layer_number - 1}{m.group(3)}"


def compare(run_: dict, ref: dict) -> dict:
    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))

    grad_rel, names = 0.0, set()
    for mine, theirs in zip(run_["grads"], ref["grads"]):
        assert set(mine) == set(theirs), (sorted(mine), sorted(theirs))
        names |= set(mine)
        for k in mine:
            grad_rel = max(grad_rel, rel(mine[k], theirs[k]))
    norm_rel = max([rel(m[k], t[k]) for m, t in zip(run_["grads"], ref["grads"]) for k in m if "layernorm" in k],
                   default=None)
    norm_grads = [float(m[k].abs().max()) for m in run_["grads"] for k in m if "layernorm" in k]
    return {"losses": run_["losses"], "ref_losses": ref["losses"], "grad_max_rel": grad_rel,
            "norm_grad_max_rel": norm_rel, "norm_grad_min_abs_max": min(norm_grads, default=None),
            "logit_grads": sum(k.endswith("mask_logits") for k in names),
            "masks_equal": set(run_["masks"]) == set(ref["masks"]) and all(
                torch.equal(run_["masks"][k], ref["masks"][k]) for k in ref["masks"]),
            "logit_grads_nonzero": all(float(g.abs().max()) > 0 for step in run_["grads"] for k, g in step.items()
                                       if k.endswith("mask_logits"))}


def resume_without_sp(tiny: Path) -> dict:
    """The driver's train(): a TP=2 run with SP and full recompute saved at iteration 2 of 3, then the same
    run resumed from that checkpoint with neither (in this process: a launch costs seconds)."""
    import shutil

    from maskllm_megatron.checkpoint_folders import read_extra
    from maskllm_megatron.run_config import TrainConfig
    from maskllm_megatron.train.trainer import train

    def cfg(name, **parallel):
        c = config(tiny, {"tp": 2, **parallel}, prior="magnitude")  # no calibration: what is checked is the resume
        c.parallel.distributed_optimizer = True  # the driver's default
        c.run = TrainConfig.from_dict({"run": {"out_dir": str(tiny / name), "train_iters": 3, "save_interval": 2,
                                               "eval_interval": 0, "log_interval": 1, "tensorboard": False}}).run
        return c

    from maskllm_megatron.megatron.parallel import init_process_group

    init_process_group()
    resumed = tiny / "sp_resumed"
    if torch.distributed.get_rank() == 0:  # a fresh start (a folder left by an earlier launch would resume)
        for name in ("sp_straight", "sp_resumed"):
            shutil.rmtree(tiny / name, ignore_errors=True)
    torch.distributed.barrier()
    train(cfg("sp_straight", sequence_parallel=True, recompute="full"))
    if torch.distributed.get_rank() == 0:
        shutil.copytree(tiny / "sp_straight", resumed)
        (resumed / "checkpoints" / "latest").write_text("iter_0000002")
        shutil.rmtree(resumed / "checkpoints" / "iter_0000003")
    torch.distributed.barrier()
    train(cfg("sp_resumed"))
    return {name: {"history": read_extra(tiny / name / "checkpoints" / "iter_0000003")["history"],
                   "grad_norms": [json.loads(l)["grad_norm"] for l in (tiny / name / "metrics.jsonl").read_text().splitlines()
                                  if "grad_norm" in l]}
            for name in ("sp_straight", "sp_resumed")}


def recompute_memory() -> list:
    """benchmarks/memory_model.py's measurement (the CPU allocator's peak over two training steps of a small
    LLaMA-shaped model, TP=1 x DP=2) with and without full recompute at two sequence lengths, beside the
    memory model's estimates."""
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import memory_model

    args = argparse.Namespace(layers=2, hidden=128, ffn=352, heads=4, groups=2, vocab=1024, micro_batch=2,
                              microbatches=2, steps=2, seqs=[128, 256])
    rows = [(name, seq) for seq in args.seqs for name in ("tp1", "tp1_full")]
    rows += [(name, 128) for name in ("tp1_joint_kd", "tp1_refit_kd")]  # what trains, with the teacher's copy
    return [{k: r[k] for k in ("layout", "seq", "measured_peak", "ratio", "state_ratio", "measured_state")}
            | {"predicted_peak": r["predicted"]["peak"], "predicted_state": r["predicted"]["state"]}
            for name, seq in rows for r in [memory_model.measure(args, name, memory_model.LAYOUTS[name], seq)]]


def layernorm_sp() -> dict:
    """A Nemotron-shaped model (LayerNorm with bias, as LayerNorm1p is converted; squared ReLU; partial RoPE),
    built from the same seed at TP=2 with and without SP, trained jointly for one step: the loss, the mask
    logits' and every norm parameter's reduced gradient (weight and bias), and the norms' attributes."""
    from maskllm_megatron.megatron.model_builder import ModelConfig, build_gpt_model
    from maskllm_megatron.run_config import TrainConfig
    from maskllm_megatron.train.setup import build_optimizer, setup_parallel, sparsify_model
    from maskllm_megatron.train.step import mean_loss, run_batches

    mc = ModelConfig(family="nemotron", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=2, vocab_size=256, max_position_embeddings=64, normalization="LayerNorm",
                     activation="squared_relu", rotary_percent=0.5)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 33), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 32),
             "position_ids": torch.arange(32).expand(2, 32), "attention_mask": None}
    out = {}
    for sp in (False, True):
        cfg = TrainConfig.from_dict({"model": {"checkpoint": "unused"}, "data": {
            "train": ["unused"], "seq_length": 32, "micro_batch_size": 2, "global_batch_size": 2},
            "parallel": {"tp": 2, "sequence_parallel": sp, "distributed_optimizer": False},
            "mask": {"fused_kernel": False, "train_weights": True}, "prior": {"method": "none"}, "run": {"train_iters": 2}})
        setup_parallel(cfg)
        model = build_gpt_model(mc, mc.to_transformer_config(2, 1, "fp32", **cfg.recompute_overrides()))
        masks = sparsify_model(cfg, model)  # mask.fused_kernel false: the eager kernels
        ddp, _, _ = build_optimizer(cfg, model, masks)
        ddp.train()
        results = run_batches(cfg, ddp, [batch], 1, forward_only=False, sample_masks=lambda mb: masks.step(0, 0))
        norms = {n: p for n, p in model.named_parameters() if "layernorm" in n}
        out[sp] = {"loss": mean_loss(results), "norms": {n: p.main_grad.clone() for n, p in norms.items()},
                   "attributes": sorted({getattr(p, "sequence_parallel", None) for p in norms.values()}, key=str),
                   "biases": sum(n.endswith(".bias") for n in norms),
                   "logits": [layer.gather_global(layer.mask_logits.main_grad.view_as(layer.mask_logits))
                              for layer in masks.layers]}
    a, b = out[False], out[True]
    return {"losses": [a["loss"], b["loss"]], "biases": b["biases"], "attributes": [a["attributes"], b["attributes"]],
            "norm_grad_max_rel": max(float((a["norms"][n] - b["norms"][n]).abs().max() / a["norms"][n].abs().max())
                                     for n in a["norms"]),
            "norm_grads_nonzero": all(float(v.abs().max()) > 0 for v in b["norms"].values()),
            "logit_grads_equal": all(torch.equal(x, y) for x, y in zip(a["logits"], b["logits"]))}


def main():
    tiny, out = Path(sys.argv[1]), sys.argv[2]
    # first: cpu_compat's second gloo group for the distributed optimizer's buckets (DP=2 here) is created
    # while no earlier layout has re-made megatron's groups (made after them, its creation was seen to hang)
    report = {"recompute_memory": recompute_memory(), "layernorm_sp": layernorm_sp()}
    runs = {}
    for name, (ref, overrides) in LAYOUTS.items():
        runs[name] = run(tiny, overrides)
        if ref is not None:
            report[name] = compare(runs[name], runs[ref])
    report["resume"] = resume_without_sp(tiny)
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
