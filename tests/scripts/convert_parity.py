"""Worker (torchrun, nproc = TP): for each HF folder under WORKDIR/hf, convert HF -> mcore at TP,
load the checkpoint, compare its logits with transformers', export mcore -> HF and compare every
tensor with the original. ``--pp-model NAME`` (repeatable) also converts that model at TP=1 x PP=2 (nproc must be
2) and checks the logits of that checkpoint loaded back at TP=2; ``--bf16-model NAME`` also converts
that model with --dtype bf16 and exports it back; ``--ep-model NAME`` (repeatable, nproc 2) also converts that
MoE model at TP=1 x EP=2 (each rank reads its two experts) and checks its logits at EP=2, and the logits of the
TP-sized checkpoint loaded at EP=2. Prints one JSON line per model (rank 0).

    python -m torch.distributed.run --nproc-per-node 2 tests/scripts/convert_parity.py WORKDIR 2 [--pp-model NAME]
"""
import argparse
import json
from pathlib import Path

import torch


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def mcore_logits(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    from maskllm_megatron.convert.checkpoint import load_mcore_model
    from maskllm_megatron.megatron.model_builder import gpt_forward

    model, info = load_mcore_model(ckpt, parallel_output=False)
    with torch.no_grad():
        return gpt_forward(model, tokens)[..., : info.model.vocab_size]


def compare_tensors(a_dir: Path, b_dir: Path, cast_a: torch.dtype | None = None) -> dict:
    """Every tensor of a_dir's safetensors (cast to ``cast_a``) equal, bit for bit, in b_dir."""
    from maskllm_megatron.convert.io import HFCheckpoint

    a, b = HFCheckpoint(a_dir), HFCheckpoint(b_dir)
    out = {"missing": sorted(set(a.weight_map) - set(b.weight_map)),
           "extra": sorted(set(b.weight_map) - set(a.weight_map)), "different": {}}
    for name in sorted(set(a.weight_map) & set(b.weight_map)):
        x, y = a.read(name), b.read(name)
        x = x if cast_a is None else x.to(cast_a)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            diff = (x.float() - y.float()).abs().max().item() if x.shape == y.shape else None
            out["different"][name] = diff
    return out


def main():
    import torch.distributed as dist

    from maskllm_megatron.megatron.parallel import init_parallel
    from maskllm_megatron.convert.hf_to_mcore import hf_to_mcore
    from maskllm_megatron.convert.mcore_to_hf import mcore_to_hf

    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("tp", type=int)
    ap.add_argument("--pp-model", action="append", default=[])
    ap.add_argument("--bf16-model")
    ap.add_argument("--ep-model", action="append", default=[])
    args = ap.parse_args()
    work, tp, pp_model = args.work, args.tp, args.pp_model
    init_parallel(tp, 1)
    rank = dist.get_rank()
    for hf in sorted((work / "hf").iterdir()):
        cfg = json.loads((hf / "config.json").read_text())
        tokens = torch.randint(0, cfg["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
        ckpt = hf_to_mcore(hf, work / f"mcore-tp{tp}-{hf.name}", tp=tp, show_progress=False)
        got = mcore_logits(ckpt, tokens)
        back = mcore_to_hf(ckpt, work / f"back-tp{tp}-{hf.name}", show_progress=False)
        result = {"model": hf.name, "tp": tp}
        if hf.name in pp_model:
            init_parallel(1, 2)
            ckpt_pp = hf_to_mcore(hf, work / f"mcore-pp2-{hf.name}", tp=1, pp=2, show_progress=False)
            init_parallel(tp, 1)
            result["pp2_max_abs_diff"] = (mcore_logits(ckpt_pp, tokens) - got).abs().max().item()
        if hf.name in args.ep_model:
            init_parallel(1, 1, 2)
            ckpt_ep = hf_to_mcore(hf, work / f"mcore-ep2-{hf.name}", tp=1, ep=2, show_progress=False)
            ep_logits = mcore_logits(ckpt_ep, tokens)
            result["ep2_vs_tp_max_abs_diff"] = (ep_logits - got).abs().max().item()
            result["tp_ckpt_at_ep2_max_abs_diff"] = (mcore_logits(ckpt, tokens) - got).abs().max().item()
            init_parallel(tp, 1)
            result["ep2_ckpt_at_tp_max_abs_diff"] = (mcore_logits(ckpt_ep, tokens) - got).abs().max().item()
        if args.bf16_model == hf.name:
            ckpt_bf16 = hf_to_mcore(hf, work / f"mcore-bf16-tp{tp}-{hf.name}", tp=tp, dtype="bf16", show_progress=False)
            result["bf16_max_abs_diff"] = (mcore_logits(ckpt_bf16, tokens) - got).abs().max().item()
            back_bf16 = mcore_to_hf(ckpt_bf16, work / f"back-bf16-tp{tp}-{hf.name}", show_progress=False)
            if rank == 0:
                result["bf16_roundtrip"] = compare_tensors(hf, back_bf16, cast_a=torch.bfloat16)
        if rank == 0:
            ref = hf_logits(hf, tokens)
            result["shape"] = [list(got.shape), list(ref.shape)]
            result["max_abs_diff"] = (got - ref).abs().max().item()
            if hf.name in args.ep_model:
                result["ep2_max_abs_diff"] = (ep_logits - ref).abs().max().item()
            result["logit_scale"] = ref.abs().max().item()
            result["roundtrip"] = compare_tensors(hf, back)
            result["export_max_abs_diff"] = (hf_logits(back, tokens) - ref).abs().max().item()
            print("RESULT " + json.dumps(result), flush=True)
        dist.barrier()


if __name__ == "__main__":
    main()
