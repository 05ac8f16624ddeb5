"""Worker (plain process, TP=1): logits and perplexity of a converted SmolLM2-135M checkpoint against
transformers on real Wikipedia text. Prints one JSON line ``RESULT {...}``.

    python tests/scripts/convert_smollm2.py CKPT_DIR HF_DIR WINDOWS SEQ_LEN
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def wiki_windows(hf_dir: Path, windows: int, seq_len: int) -> torch.Tensor:
    """``windows`` rows of BOS + seq_len - 1 tokens of the gensim Wikipedia excerpt."""
    from transformers import AutoTokenizer

    from maskllm_megatron.assets import wikipedia_articles

    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = "\n\n".join(t for _, t in wikipedia_articles()[:5])
    ids = tok(text, add_special_tokens=False)["input_ids"][: windows * (seq_len - 1)]
    rows = torch.tensor(ids).view(windows, seq_len - 1)
    return torch.cat([torch.full((windows, 1), tok.bos_token_id), rows], dim=1)


def main():
    from transformers import AutoModelForCausalLM

    from maskllm_megatron.convert.checkpoint import load_mcore_model

    from maskllm_megatron.megatron.parallel import init_parallel
    from maskllm_megatron.megatron.model_builder import gpt_forward

    ckpt, hf_dir, windows, seq_len = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    tokens = wiki_windows(hf_dir, windows, seq_len)
    init_parallel(1, 1)
    model, info = load_mcore_model(ckpt, parallel_output=False)
    with torch.no_grad():
        logits = gpt_forward(model, tokens)[..., : info.model.vocab_size]
        # megatron-core's own loss path (vocab-parallel cross entropy) for the perplexity
        losses = gpt_forward(model, tokens[:, :-1], labels=tokens[:, 1:])
        del model
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        ref = hf(tokens).logits
    ref_nll = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), tokens[:, 1:].reshape(-1))
    print("RESULT " + json.dumps({
        "tokens": tokens.numel(), "max_abs_diff": (logits - ref).abs().max().item(),
        "logit_scale": ref.abs().max().item(), "ppl_mcore": losses.float().mean().exp().item(),
        "ppl_hf": ref_nll.exp().item()}), flush=True)


if __name__ == "__main__":
    main()
