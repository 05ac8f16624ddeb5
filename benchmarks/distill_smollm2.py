"""Distillation against the LM loss at equal wall-clock on SmolLM2-135M (not in CI).

    python benchmarks/distill_smollm2.py --iters 38 --step-ratio 1.35 [--weights 0.33,0.67]
        [--temperatures 1,2] [--out benchmarks/distill_38] [the demo's recipe flags: --lr ...]

``--iters`` is the LM-loss run's length (the demo's 38, the 70-minute benchmark's 225); ``--step-ratio`` is
a distilling step's time over an LM step's, measured on an idle machine by ``bench_model_step.py
--variants mask_fused,mask_distill`` at the demo's shape. Each distilling run gets ``round(iters /
step_ratio)`` iterations: the same wall-clock budget. Every run learns from the demo's cached SparseGPT
prior with 2 data-parallel processes (``demo.learn_stage``, cached by its settings), and is scored on
held-out Wikipedia and held-out Shakespeare (512-token windows with BOS, 8,192 tokens); its learning wall
time and mean tokens/s are reported beside (those depend on what else the machine ran).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from maskllm_megatron import assets
from maskllm_megatron.cache import cache_dir
from maskllm_megatron.demo import (Stages, heldout_ppl, add_recipe_arguments, convert_stage, data_stage, final_checkpoint,
                                   learn_stage, learn_wall_s, prior_stage, recipe_from_args)
from maskllm_megatron.assets import wikipedia_split
from maskllm_megatron.train.metrics import read_records

TEXTS = {"wikipedia": ("--corpus", "wikipedia-heldout"), "shakespeare": ("--corpus", "shakespeare-heldout")}


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, required=True, help="iterations of the LM-loss run (the budget)")
    p.add_argument("--step-ratio", type=float, required=True,
                   help="a distilling step's time over an LM step's (bench_model_step.py's distill_over_mask)")
    p.add_argument("--weights", type=floats, default=[1 / 3, 2 / 3], help="kd_weight values (comma-separated)")
    p.add_argument("--temperatures", type=floats, default=[1.0, 2.0], help="temperatures (comma-separated)")
    add_recipe_arguments(p, skip=("kd_weight", "kd_temperature"))
    p.add_argument("--checkpoints", type=int, default=1,
                   help="evenly spaced checkpoints each run keeps (4 reuses the 70-minute quality run's LM stage)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/distill_out"))
    args = p.parse_args(argv)
    if not args.step_ratio >= 1:
        raise SystemExit(f"error: --step-ratio {args.step_ratio} must be >= 1 (a distilling step does more)")
    stages = Stages(cache_dir() / "demo")
    hf = assets.smollm2_hf_dir()
    ckpt = convert_stage(stages, hf)
    wiki = data_stage(stages, "wiki_train", [t for _, t in wikipedia_split()[0]], ckpt / "tokenizer")
    prior = prior_stage(stages, ckpt, wiki, "sparsegpt")
    base = recipe_from_args(args)
    kd_iters = max(1, round(args.iters / args.step_ratio))
    runs = {"lm": (base, args.iters)}
    for w in args.weights:
        for t in args.temperatures:
            runs[f"kd w={w:.2f} T={t:g}"] = (replace(base, kd_weight=w, kd_temperature=t), kd_iters)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (recipe, iters) in runs.items():
        run = learn_stage(stages, ckpt, wiki, prior, iters, recipe, name="maskllm" if name == "lm" else "kd",
                          checkpoints=args.checkpoints)
        records, _ = read_records(run / "metrics.jsonl")
        speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        row = {"run": name, "kd_weight": recipe.kd_weight, "temperature": recipe.kd_temperature, "iterations": iters,
               "tokens": iters * recipe.tokens_per_iteration, "learn_wall_s": round(learn_wall_s(run)),
               "mean_tokens_per_s": sum(speeds) / len(speeds) if speeds else None, "checkpoint": str(final_checkpoint(run))}
        for text, flags in TEXTS.items():
            row[f"{text}_ppl"] = heldout_ppl(["--ckpt", str(final_checkpoint(run))], run / f"ppl_{text}.log", flags)
        rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
    result = {"budget_lm_iters": args.iters, "step_ratio": args.step_ratio, "kd_iters": kd_iters, "rows": rows}
    tmp = out / "distill.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / "distill.json")
    print(f"| run | iterations | held-out Wikipedia PPL | held-out Shakespeare PPL | learn wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['iterations']} | {r['wikipedia_ppl']:.2f} | {r['shakespeare_ppl']:.2f} | "
              f"{r['learn_wall_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
