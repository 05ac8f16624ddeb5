"""Build the inputs of a driver test: a tiny LLaMA-shaped checkpoint pre-trained (dense) on real text,
its SentencePiece tokenizer, and the text as a megatron indexed dataset.

usage: make_tiny_run.py OUTDIR [--nan]
  OUTDIR/ckpt/                      megatron-core checkpoint + model_config.json + tokenizer/
  OUTDIR/data/botchan_text_document  .bin/.idx
With --nan the checkpoint's final norm weight is NaN (for the NaN-stop test).
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch


def main():
    out = Path(sys.argv[1])
    nan = "--nan" in sys.argv
    from megatron.core import parallel_state

    from maskllm_megatron import assets
    from maskllm_megatron.convert.checkpoint import CheckpointInfo
    from maskllm_megatron.data.preprocess import PreprocessConfig, preprocess
    from maskllm_megatron.data.tokenizer import load_tokenizer
    from maskllm_megatron.megatron import cpu_compat
    from maskllm_megatron.megatron.checkpointing import save_checkpoint
    from maskllm_megatron.megatron.model_builder import ModelConfig, build_gpt_model, gpt_forward

    cpu_compat.apply()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    sp_model = assets.sentencepiece_test_model("bpe")
    text = assets.botchan_text()
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    # many short documents (12 lines each), as in real corpora
    lines = [l for l in text.splitlines() if l.strip()]
    docs = [" ".join(lines[i:i + 12]) for i in range(0, len(lines), 12)]
    (data_dir / "botchan.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess(PreprocessConfig(inputs=(data_dir / "botchan.jsonl",), output_prefix=data_dir / "botchan_text_document",
                                tokenizer=sp_model), progress=False)
    tok = load_tokenizer(sp_model)
    mc = ModelConfig(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=2, vocab_size=tok.vocab_size, max_position_embeddings=128,
                     make_vocab_size_divisible_by=64)
    model = build_gpt_model(mc)
    ids = torch.tensor(tok.encode(text[:60000]))
    seq = 64
    windows = ids[: (len(ids) // (seq + 1)) * (seq + 1)].view(-1, seq + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(150):  # a dense warm start so that pruning hurts and masks have something to keep
        batch = windows[torch.randint(0, len(windows), (8,), generator=g)]
        loss = gpt_forward(model, batch[:, :-1], batch[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"dense warm-start loss {float(loss):.3f}")
    if nan:
        with torch.no_grad():
            model.decoder.final_layernorm.weight.fill_(float("nan"))
    ckpt = out / "ckpt"
    save_checkpoint(model, ckpt)
    CheckpointInfo(model=mc, dtype="fp32").save(ckpt)
    (ckpt / "tokenizer").mkdir(exist_ok=True)
    shutil.copy(sp_model, ckpt / "tokenizer" / "tokenizer.model")


if __name__ == "__main__":
    main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
