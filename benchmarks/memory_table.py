"""The README's memory table: the memory model (maskllm_megatron/train/memory.py) for the examples' configs.

    python benchmarks/memory_table.py [--json OUT]

Each row is an example config (examples/*.yaml, read by the driver's own parser) on the number of GPUs
given here (the data-parallel size is not in the config), in bf16, with the architecture from the public
Hugging Face config.json values below (converted by maskllm_megatron.convert.mapping); some rows switch
one option off to show what it saves. "Fits" means the estimate is at most 90% of the GPU's memory: the
model does not count the CUDA context, NCCL's buffers or allocator fragmentation.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HF = {  # config.json values that shape memory
    "LLaMA-2 7B": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5),
    "LLaMA-3 8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "Nemotron-4 15B": dict(model_type="nemotron", hidden_size=6144, intermediate_size=24576, num_hidden_layers=32,
                           num_attention_heads=48, num_key_value_heads=8, vocab_size=256000,
                           max_position_embeddings=4096, norm_eps=1e-5, partial_rotary_factor=0.5),
    "LLaMA-2 70B": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                        max_position_embeddings=4096, rms_norm_eps=1e-5),
}
# (model, example, GPUs, overrides, what the row shows)
ROWS = (
    ("LLaMA-2 7B", "llama2_7b.yaml", 64, (), ""),
    ("LLaMA-2 7B", "llama2_7b.yaml", 64, ("parallel.sequence_parallel=false",), "no SP"),
    ("LLaMA-3 8B", "llama3_8b.yaml", 64, (), ""),
    ("Nemotron-4 15B", "nemotron4_15b.yaml", 64, (), ""),
    ("LLaMA-2 70B", "llama2_70b.yaml", 64, (), ""),
    ("LLaMA-2 70B", "llama2_70b.yaml", 64, ("parallel.recompute=none",), "no recompute"),
)
GPUS_GB = (80, 141)
HEADROOM = 0.9


def rows() -> list[dict]:
    from maskllm_megatron.convert.mapping import model_config_from_hf
    from maskllm_megatron.run_config import TrainConfig
    from maskllm_megatron.train.memory import Layout, estimate

    out = []
    for model, example, gpus, overrides, note in ROWS:
        cfg = TrainConfig.load(ROOT / "examples" / example, overrides).validate(gpus)
        mc = model_config_from_hf(HF[model])
        cfg.check_recompute_layers(mc.num_layers)
        layout = Layout.from_config(cfg, gpus, "bf16")
        est = estimate(mc, layout)
        p = cfg.parallel
        recompute = {"none": "-", "full": f"full ({p.recompute_method}, {p.recompute_num_layers})",
                     "selective": f"selective ({', '.join(p.recompute_modules)})"}[p.recompute]
        out.append({"model": model, "example": example, "note": note, "gpus": gpus,
                    "layout": f"TP{p.tp} PP{p.pp} DP{layout.dp}", "sp": p.sequence_parallel, "recompute": recompute,
                    "micro_batches": layout.num_microbatches, "estimate": est.as_dict(),
                    "fits": {g: est.peak <= HEADROOM * g * 1e9 for g in GPUS_GB}})
    return out


def markdown(table: list[dict]) -> str:
    g = lambda x: f"{x / 1e9:.1f}"  # noqa: E731
    lines = ["| example | layout | weights | logits + prior | grads | Adam | activations (sampling) | GPU | 80 / 141 GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        e = r["estimate"]
        layout = r["layout"].replace(" PP1", "") + (" SP" if r["sp"] else "") + \
            ("" if r["recompute"] == "-" else f" {r['recompute'].split(' ')[0]}")
        name = r["model"] + (f", {r['note']}" if r["note"] else "")
        fits = " / ".join("yes" if r["fits"][gb] else "no" for gb in GPUS_GB)
        lines.append(f"| {name} | {layout} | {g(e['weights'])} | {g(e['mask_logits'] + e['prior_masks'])} | "
                     f"{g(e['gradients'])} | {g(e['optimizer'])} | {g(e['activations'] + e['transient'])} "
                     f"({g(e['mask_sampling'])}) | **{g(e['peak'])}** | {fits} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    table = rows()
    print(markdown(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
