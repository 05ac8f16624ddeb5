"""Worker (one process, TP=1): real SmolLM2-135M weights, converted at TP=1 (BASE: tests/conftest.py's
``smollm2_mcore``) -> sparsify with the magnitude 2:4 prior -> run checkpoint -> ``--use-prior`` exports (mask
file, HF folder) and megatron-core perplexities.

    python tests/scripts/export_smollm2.py BASE WORKDIR MAX_TOKENS
Prints one line ``RESULT {...}``.
"""
import json
import sys
import time
from pathlib import Path

WINDOW = dict(seq_len=128, bos=True)


def main():
    from maskllm_megatron.convert.checkpoint import CheckpointInfo
    from maskllm_megatron.megatron.parallel import init_parallel
    from maskllm_megatron.assets import corpus_text
    from maskllm_megatron.eval.perplexity import EvalRequest, mcore_perplexity
    from maskllm_megatron.export.pipeline import ExportConfig, export
    from maskllm_megatron.masks import MaskConfig
    from maskllm_megatron.megatron.checkpointing import load_checkpoint, save_checkpoint
    from maskllm_megatron.megatron.model_builder import build_gpt_model
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, masked_layers, sparsify
    from maskllm_megatron.prune.methods import magnitude_mask

    base, work, max_tokens = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    times = {}
    init_parallel(1, 1)
    t = time.time()
    info = CheckpointInfo.load(base)
    cfg = SparsifyConfig(mask=MaskConfig(nm="2:4"))
    model = build_gpt_model(info.model, info.model.to_transformer_config(1, 1, "fp32", perform_initialization=False))
    sparsify(model, cfg)
    load_checkpoint(model, base)
    for layer in masked_layers(model):
        layer.set_prior(magnitude_mask(layer.weight.detach(), layer.nm))
    run_cfg = {"model": {"checkpoint": str(base)},
               "mask": {"nm": "2:4", "include": list(cfg.include), "exclude": list(cfg.exclude)}}
    save_checkpoint(model, work / "run" / "iter_0000000", extra={"iteration": 0, "config": run_cfg})
    del model
    times["run_checkpoint"] = time.time() - t
    results = {}
    for fmt, name in [("masks", "magnitude.masks"), ("hf", "magnitude_hf")]:
        t = time.time()
        r = export(ExportConfig(work / "run" / "iter_0000000", work / name, fmt, use_prior=True))
        times[f"export_{fmt}"] = time.time() - t
        results[fmt] = {"bytes": r.bytes, "dense_bytes": r.dense_bytes, "bits_per_weight": r.bits_per_weight,
                        "floor": r.floor_bits_per_weight, "weights": r.masked_weights, "summary": r.summary()}
    req = EvalRequest(corpus_text("wikipedia-heldout"), max_tokens=max_tokens, **WINDOW)
    t = time.time()
    ppl = {"dense": mcore_perplexity(base, req).ppl,
           "magnitude": mcore_perplexity(work / "run" / "iter_0000000", req, use_prior=True).ppl}
    times["ppl"] = time.time() - t
    print("RESULT " + json.dumps({"results": results, "ppl_mcore": ppl, "times": times}), flush=True)


if __name__ == "__main__":
    main()
