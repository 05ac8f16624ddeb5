"""Worker (torchrun, nproc = TP): for each HF folder under WORKDIR/hf, convert HF -> mcore at TP,
load the checkpoint, compare its logits with transformers', export mcore -> HF and compare every
tensor with the original. With PP=1 as third argument, also convert at TP=1 x PP=2 (nproc must be 2)
and check the logits of that checkpoint loaded back at TP=2. Prints one JSON line per model (rank 0).

    python -m torch.distributed.run --nproc-per-node 2 tests/scripts/convert_parity.py WORKDIR 2 [PPMODEL]
"""
import json
import sys
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


def compare_tensors(a_dir: Path, b_dir: Path) -> dict:
    """Every tensor of a_dir's safetensors equal, bit for bit, in b_dir."""
    from maskllm_megatron.convert.io import HFCheckpoint

    a, b = HFCheckpoint(a_dir), HFCheckpoint(b_dir)
    out = {"missing": sorted(set(a.weight_map) - set(b.weight_map)),
           "extra": sorted(set(b.weight_map) - set(a.weight_map)), "different": {}}
    for name in sorted(set(a.weight_map) & set(b.weight_map)):
        x, y = a.read(name), b.read(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            diff = (x.float() - y.float()).abs().max().item() if x.shape == y.shape else None
            out["different"][name] = diff
    return out


def main():
    import torch.distributed as dist

    from maskllm_megatron.convert.checkpoint import init_parallel
    from maskllm_megatron.convert.hf_to_mcore import hf_to_mcore
    from maskllm_megatron.convert.mcore_to_hf import mcore_to_hf

    work, tp = Path(sys.argv[1]), int(sys.argv[2])
    pp_model = sys.argv[3] if len(sys.argv) > 3 else None
    init_parallel(tp, 1)
    rank = dist.get_rank()
    for hf in sorted((work / "hf").iterdir()):
        cfg = json.loads((hf / "config.json").read_text())
        tokens = torch.randint(0, cfg["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
        ckpt = hf_to_mcore(hf, work / f"mcore-tp{tp}-{hf.name}", tp=tp, show_progress=False)
        got = mcore_logits(ckpt, tokens)
        back = mcore_to_hf(ckpt, work / f"back-tp{tp}-{hf.name}", show_progress=False)
        result = {"model": hf.name, "tp": tp}
        if pp_model == hf.name:
            init_parallel(1, 2)
            ckpt_pp = hf_to_mcore(hf, work / f"mcore-pp2-{hf.name}", tp=1, pp=2, show_progress=False)
            init_parallel(tp, 1)
            result["pp2_max_abs_diff"] = (mcore_logits(ckpt_pp, tokens) - got).abs().max().item()
        if rank == 0:
            ref = hf_logits(hf, tokens)
            result["shape"] = [list(got.shape), list(ref.shape)]
            result["max_abs_diff"] = (got - ref).abs().max().item()
            result["logit_scale"] = ref.abs().max().item()
            result["roundtrip"] = compare_tensors(hf, back)
            print("RESULT " + json.dumps(result), flush=True)
        dist.barrier()


if __name__ == "__main__":
    main()
