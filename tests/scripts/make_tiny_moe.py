"""Inputs of the MoE driver runs (tests/test_moe.py, benchmarks/gpu_moe_smoke.sh): a tiny random Qwen2-MoE
(vocab 1000, hidden 64, 2 layers, 4 experts of 32, top-2, softmax over all experts, a gated shared expert of 48)
with the botchan SentencePiece tokenizer, and botchan text as a megatron indexed dataset.

usage: make_tiny_moe.py OUTDIR
  OUTDIR/hf/                        config.json, model.safetensors, tokenizer.model
  OUTDIR/botchan_text_document      .bin/.idx
"""
import json
import shutil
import sys
from pathlib import Path

import torch


def make(work: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from maskllm_megatron import assets
    from maskllm_megatron.data.preprocess import PreprocessConfig, preprocess

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, intermediate_size=96)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(work / "hf")
    shutil.copy(assets.sentencepiece_test_model("bpe"), work / "hf" / "tokenizer.model")
    lines = [line for line in assets.botchan_text()[:40000].splitlines() if line.strip()]
    docs = [" ".join(lines[i:i + 12]) for i in range(0, len(lines), 12)]
    (work / "text.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess(PreprocessConfig(inputs=(work / "text.jsonl",), output_prefix=work / "botchan_text_document",
                                tokenizer=work / "hf" / "tokenizer.model"), progress=False)
    return work


if __name__ == "__main__":
    make(Path(sys.argv[1]))
