"""Worker for tests/test_moe.py (torchrun, gloo): masks on the experts of a tiny Qwen2-MoE-shaped model
(4 experts, top-2, softmax over all experts, a gated shared expert).

usage: moe_worker.py masks WORKDIR [HF CKPT [RUN_YAML]]   (nproc 2)
  0. with HF and CKPT: convert the HF folder at TP=1 x EP=2 to CKPT (the driver test's model)
  1. EP=1 (2 data-parallel ranks): sparsify; initial logits, a sampled masked weight per layer and the hard-mask
     logits; save a checkpoint.
  2. EP=2: sparsify (initial logits must equal EP=1's under the global expert index), load the EP=1 checkpoint
     (same samples, same logits); include/exclude patterns on experts; magnitude priors; save at EP=2.
  3. EP=1: load the EP=2 checkpoint: the same logits, tensor for tensor, and the same output.
  3b. TP=2 (expert TP 2) loads it too: the same global logits, samples and output.
  4. Wanda and SparseGPT priors on ONE calibration token (top-2 of 4 experts: two experts per layer are reached,
     two are not), against a hand computation for layer 0 from the router weight; at EP=1 and at EP=2.
  5. with RUN_YAML: the driver's command (``maskllm-train --config RUN_YAML``, its main() in these processes, which
     saves a process launch), e.g. mask learning on CKPT at EP=2.
usage: moe_worker.py export RUN_CKPT OUT [OTHER_CKPT]   (nproc 1)
  maskllm-export --format hf of the run checkpoint to OUT (verified), then the run's masked megatron model
  (argmax masks) vs transformers on OUT, and how many rows of the experts' masks moved off the prior; with
  OTHER_CKPT, which tensors (model and optimizer) differ between it and RUN_CKPT.
Prints one line ``RESULT {...}`` (rank 0).
"""
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch

from compare_checkpoints import differing_tensors  # this folder is the script's own: on sys.path


def model_config():
    from maskllm_megatron.megatron.model_builder import ModelConfig

    return ModelConfig(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=32, num_attention_heads=4,
                       num_query_groups=2, vocab_size=256, max_position_embeddings=64, qkv_bias=True,
                       num_experts=4, moe_topk=2, moe_pre_softmax=True, shared_expert_size=48, shared_expert_gate=True)


def init(ep: int, tp: int = 1) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(5)
    torch.manual_seed(5)


def build(**patterns):
    from maskllm_megatron.masks import MaskConfig
    from maskllm_megatron.megatron.model_builder import build_gpt_model
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, sparsify

    model = build_gpt_model(model_config(), parallel_output=False)
    masks = sparsify(model, SparsifyConfig(mask=MaskConfig(nm="2:4", total_steps=10), **patterns))
    return model, masks


def tokens(n: int = 16):
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(3))


def logits_of(model, toks=None):
    from maskllm_megatron.megatron.model_builder import gpt_forward

    with torch.no_grad():
        return gpt_forward(model.eval(), tokens() if toks is None else toks)


def per_layer(model, fn) -> dict:
    from maskllm_megatron.megatron.sparsify import masked_layers

    return {layer.mask_layer_id: fn(layer) for layer in masked_layers(model)}


def all_layers(local: dict) -> dict:
    """Union of every rank's per-layer dict (expert parallel ranks hold different experts)."""
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, local)
    out = {}
    for p in parts:
        out.update(p)
    return out


def sampled(model, masks) -> dict:
    masks.step(3, 1)
    with torch.no_grad():
        return per_layer(model, lambda layer: layer.gather_global(layer.sampled_weight()))


def prior_on_one_token(model, unreached: list, method: str):
    from maskllm_megatron.megatron.model_builder import gpt_forward
    from maskllm_megatron.megatron.priors import PriorConfig, compute_priors

    captured = []
    hook = model.decoder.layers[0].mlp.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        compute_priors(model, [lambda m: gpt_forward(m, tokens(1)[:1])], PriorConfig(method=method),
                       fallbacks=unreached)
    hook.remove()
    return captured[0], out.getvalue()


def hand_prior_layer0(model, x: torch.Tensor, method: str) -> dict:
    """Layer 0's expert prior masks computed by hand from its MoE input x: the router's top-2 (softmax over all 4
    in fp32), Wanda / SparseGPT on each reached expert's inputs (fc1: x; fc2: silu(gate) * up * routing weight),
    magnitude on the others."""
    import torch.nn.functional as F

    from maskllm_megatron.masks.patterns import NMSpec
    from maskllm_megatron.prune.methods import magnitude_mask, sparsegpt_prune, wanda_mask

    def solve(w, inp):
        if method == "wanda":
            return wanda_mask(w, (inp * inp).sum(0), spec)
        return sparsegpt_prune(w, 2 * inp.t() @ inp / inp.shape[0], spec)[0]

    spec = NMSpec(2, 4)
    moe = model.decoder.layers[0].mlp
    x = x.reshape(-1, x.shape[-1]).float()
    scores = torch.softmax(x @ moe.router.weight.float().t(), dim=-1)
    reached = sorted(set(torch.topk(scores, 2, dim=-1).indices.flatten().tolist()))
    out = {"reached": reached}
    offset = moe.local_expert_indices[0]
    for i, expert in enumerate(moe.experts.local_experts):
        e = offset + i
        w1, w2 = expert.linear_fc1.weight.detach(), expert.linear_fc2.weight.detach()
        if e in reached:
            gate, up = (x @ w1.t()).chunk(2, dim=-1)
            h = F.silu(gate) * up * scores[:, e:e + 1]
            masks = (solve(w1, x), solve(w2, h))
        else:
            masks = (magnitude_mask(w1, spec), magnitude_mask(w2, spec))
        out[f"layers.0.mlp.experts.local_experts.{e}.linear_fc1"] = masks[0].bool()
        out[f"layers.0.mlp.experts.local_experts.{e}.linear_fc2"] = masks[1].bool()
    return out


def check_prior(model, method: str) -> dict:
    unreached = []
    x, printed = prior_on_one_token(model, unreached, method)
    hand = hand_prior_layer0(model, x, method)
    priors = per_layer(model, lambda layer: layer.prior_mask.clone())
    checked = {k: bool(torch.equal(priors[k], v)) for k, v in hand.items() if k != "reached"}
    return {"reached": hand["reached"], "hand_equal": all(checked.values()), "hand_checked": len(checked),
            "unreached": sorted(all_layers({k: 1 for k in unreached})), "printed": "magnitude mask" in printed,
            "priors": priors}


def masks(work: Path, convert: list) -> dict:
    import torch.distributed as dist

    from maskllm_megatron.megatron import cpu_compat
    from maskllm_megatron.megatron.checkpointing import load_checkpoint, save_checkpoint
    from maskllm_megatron.prune.methods import magnitude_mask

    cpu_compat.apply()
    dist.init_process_group("gloo")
    r = {}
    if convert:
        from maskllm_megatron.convert.hf_to_mcore import hf_to_mcore

        with contextlib.redirect_stdout(io.StringIO()):
            hf_to_mcore(convert[0], convert[1], tp=1, ep=2, show_progress=False)
    # 1. EP=1
    init(1)
    model, masks = build()
    names1 = masks.names
    init1 = per_layer(model, lambda layer: layer.gather_global(layer.mask_logits.detach()))
    samples1 = sampled(model, masks)
    out1 = logits_of(model)
    save_checkpoint(model, work / "ep1")
    # 2. EP=2
    init(2)
    model, masks = build()
    all2 = all_layers({n: 1 for n in masks.names})
    r["names_equal"] = sorted(all2) == sorted(names1)
    r["masked_layers"] = len(names1)
    r["local_experts_per_rank"] = len(model.decoder.layers[0].mlp.experts.local_experts)
    init2 = per_layer(model, lambda layer: layer.gather_global(layer.mask_logits.detach()))
    r["init_logits_equal"] = all(torch.equal(v, init1[k]) for k, v in init2.items())
    r["mask_logits_allreduce"] = sorted({str(getattr(layer.mask_logits, "allreduce", True)) + ":" + k.split(".")[3]
                                         for k, layer in per_layer(model, lambda layer: layer).items()})
    load_checkpoint(model, work / "ep1")
    samples2 = sampled(model, masks)
    r["experts_compared"] = len([k for k in samples2 if "local_experts" in k])
    r["samples_equal"] = all(torch.equal(v, samples1[k]) for k, v in samples2.items())
    r["ep2_vs_ep1_logits"] = (logits_of(model) - out1).abs().max().item()
    # include / exclude address experts by their global index, and the shared expert
    _, only3 = build(include=("*.local_experts.3.*",))
    _, no_shared = build(exclude=("*.shared_experts.*", "*.self_attention.*"))
    r["include_expert3"] = sorted(all_layers({n: 1 for n in only3.names}))
    r["exclude_shared_and_attention"] = sorted(all_layers({n: 1 for n in no_shared.names}))
    with torch.no_grad():
        for layer in per_layer(model, lambda layer: layer).values():
            layer.set_prior(magnitude_mask(layer.weight, layer.nm))
    out2 = logits_of(model)
    logits2 = all_layers(per_layer(model, lambda layer: layer.mask_logits.detach().clone()))
    save_checkpoint(model, work / "ep2")
    r["changed_by_prior"] = (out2 - out1).abs().max().item()
    # 3. EP=1 loads the EP=2 checkpoint
    init(1)
    model, masks = build()
    load_checkpoint(model, work / "ep2")
    loaded = per_layer(model, lambda layer: layer.mask_logits.detach())
    r["ep2_ckpt_logits_equal"] = sorted(loaded) == sorted(logits2) and all(torch.equal(v, logits2[k])
                                                                           for k, v in loaded.items())
    r["ep2_ckpt_at_ep1_output"] = (logits_of(model) - out2).abs().max().item()
    samples3 = sampled(model, masks)
    # 3b. expert tensor parallel: TP=2 (experts' TP = 2), EP=1 loads the EP=2 checkpoint; logits sharded with the
    # weight's rows / input groups, the same global logits, samples and output (evaluation: megatron trains MoE at
    # TP > 1 only with sequence parallelism)
    init(1, tp=2)
    model, masks = build()
    load_checkpoint(model, work / "ep2")
    fc2 = model.decoder.layers[0].mlp.experts.local_experts[0].linear_fc2
    r["expert_tp2_local_logits_shape"] = list(fc2.mask_logits.shape)
    r["expert_tp2_logits_equal"] = all(torch.equal(v, logits2[k]) for k, v in per_layer(
        model, lambda layer: layer.gather_global(layer.mask_logits.detach())).items())
    r["expert_tp2_samples_equal"] = all(torch.equal(v, samples3[k]) for k, v in sampled(model, masks).items())
    r["expert_tp2_output"] = (logits_of(model) - out2).abs().max().item()
    # 4. priors on one token, by hand; at EP=1 and EP=2
    for method in ("wanda", "sparsegpt"):
        init(1)
        model, _ = build()
        load_checkpoint(model, work / "ep2")
        p1 = check_prior(model, method)
        init(2)
        model, _ = build()
        load_checkpoint(model, work / "ep2")
        p2 = check_prior(model, method)
        r[f"{method}_ep1"] = {k: v for k, v in p1.items() if k != "priors"}
        r[f"{method}_ep2"] = {k: v for k, v in p2.items() if k != "priors"}
        r[f"{method}_ep2_equal_ep1"] = all(torch.equal(v, p1["priors"][k]) for k, v in p2["priors"].items())
    return r


def export_and_check(run_ckpt: Path, out: Path, other: list) -> dict:
    from transformers import AutoModelForCausalLM

    from maskllm_megatron.megatron.parallel import init_parallel
    from maskllm_megatron.export.pipeline import ExportConfig, export
    from maskllm_megatron.run_checkpoint import RunCheckpoint, load_masked_model
    from maskllm_megatron.megatron.sparsify import masked_layers

    result = export(ExportConfig(run_ckpt, out, "hf"))
    init_parallel(1, 1)
    run = RunCheckpoint.open(run_ckpt)
    model = load_masked_model(run, parallel_output=False)
    toks = torch.randint(0, run.info.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(9))
    device = next(model.parameters()).device  # the GPU when there is one
    ours = logits_of(model, toks.to(device))[..., : run.info.model.vocab_size].float().cpu()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(toks).logits
    layers = list(masked_layers(model))
    experts = [layer for layer in layers if "local_experts" in layer.mask_layer_id]
    moved = sum(int((layer.hard_mask().bool() != layer.prior_mask).any(-1).sum()) for layer in experts)
    cfg = json.loads((out / "config.json").read_text())
    return {"max_abs_diff": (ours - theirs).abs().max().item(), "scale": theirs.abs().max().item(),
            "masked": len(layers), "expert_layers": len(experts), "expert_rows_moved_off_prior": moved,
            "hf_class": type(hf).__name__, "sparsity_targets": len(cfg["sparsity"]["targets"]),
            "verify": result.verify_summary, "checkpoints": differing_tensors(run_ckpt, other[0]) if other else None}


def main():
    mode = sys.argv[1]
    if mode == "masks":
        r = masks(Path(sys.argv[2]), [Path(a) for a in sys.argv[3:5]])
        if len(sys.argv) > 5:
            from maskllm_megatron.train.__main__ import main as train_main

            r["train_exit_status"] = train_main(["--config", sys.argv[5]])
    else:
        r = export_and_check(Path(sys.argv[2]), Path(sys.argv[3]), [Path(a) for a in sys.argv[4:5]])
    if int(os.environ.get("RANK", "0")) == 0:  # (the driver's main destroys the process group when it ends)
        print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
