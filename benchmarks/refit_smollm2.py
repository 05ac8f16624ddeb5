"""Refit of a learned mask's kept weights end to end (``mask.refit``) on SmolLM2-135M: held-out perplexity
against the iterations spent (not in CI).

    python benchmarks/refit_smollm2.py --ckpt RUN/checkpoints/iter_XXXXXXX [--iters 40] [--checkpoints 2] \
        [--lr 2e-4] [--warmup 0] [--batch 1] [--seq-length 512] [--kd-weight 1.0] [--temperature 1.0] [--json benchmarks/results/refit_demo.json]

The demo's refit stage (``demo.refit_stage``: the driver on 2 data-parallel ranks, 2 x 512 tokens an
iteration of the run's own training data, ``--batch`` times that with gradient accumulation) keeps the
run's hard masks fixed (``prior.method=checkpoint``, ``mask.refit=true``) and trains the masked layers'
kept weights by distillation from the dense model (the original weights, kept as the teacher's copy),
Adam with a cosine decay to lr / 10, no weight decay. Each of ``--checkpoints`` evenly spaced checkpoints
is exported (``maskllm-export --format hf``, verified 2:4) and scored on held-out Wikipedia and
Shakespeare (512-token windows with BOS, 8,192 tokens) beside the plain export of the run's masks.
Stages live in the demo's cache (``demo.Stages``): a re-run with the same settings reuses them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from maskllm_megatron.cache import cache_dir
from maskllm_megatron.demo import DP, SEQ, Stages, WeightRefit, export_stage, heldout_ppl, refit_stage
from maskllm_megatron.run_folder import CHECKPOINTS_DIR, checkpoint_iteration, complete_checkpoints

TEXTS = {"wikipedia": ("--corpus", "wikipedia-heldout"), "shakespeare": ("--corpus", "shakespeare-heldout")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="a mask-learning run's checkpoint")
    p.add_argument("--iters", type=int, default=40, help=f"refit iterations ({DP} x --batch x --seq-length tokens each)")
    p.add_argument("--checkpoints", type=int, default=2, help="evenly spaced checkpoints to score")
    p.add_argument("--lr", type=float, default=WeightRefit.lr, help="Adam's peak learning rate for the kept weights")
    p.add_argument("--warmup", type=int, default=WeightRefit.warmup_iters,
                   help="iterations of linear lr warm-up from 0 (Adam's first steps move every weight by ~lr)")
    p.add_argument("--batch", type=int, default=WeightRefit.batch,
                   help=f"sequences a rank per iteration ({DP} x batch x --seq-length tokens an iteration)")
    p.add_argument("--seq-length", type=int, default=SEQ, help="tokens per training sequence (held-out windows stay "
                   f"{SEQ})")
    p.add_argument("--kd-weight", type=float, default=WeightRefit.kd_weight, help="distill.kd_weight (0: LM loss)")
    p.add_argument("--temperature", type=float, default=WeightRefit.temperature, help="distill.temperature")
    p.add_argument("--texts", default="wikipedia,shakespeare", help="held-out texts to score")
    p.add_argument("--json", type=Path, help="write the rows here too")
    args = p.parse_args(argv)
    texts = [t for t in args.texts.split(",") if t]
    stages = Stages(cache_dir() / "demo")
    ckpt = args.ckpt.absolute()

    def score(label: str, folder: Path, **extra) -> dict:
        row = {"weights": label, **extra}
        for text in texts:
            row[f"{text}_ppl"] = heldout_ppl(["--hf", str(folder)], folder.parent / f"ppl_{text}.log", TEXTS[text])
        print("ROW " + json.dumps(row), flush=True)
        return row

    rows = [score("original (the learned mask)", export_stage(stages, ckpt), iterations=0, tokens=0)]
    refit = WeightRefit(iters=args.iters, lr=args.lr, kd_weight=args.kd_weight, temperature=args.temperature,
                        batch=args.batch, warmup_iters=args.warmup, seq_length=args.seq_length)
    run = refit_stage(stages, ckpt, refit, args.checkpoints)
    wall = float((run / "refit_wall_s").read_text())
    for saved in reversed(complete_checkpoints(run / CHECKPOINTS_DIR)):
        iteration = checkpoint_iteration(saved.name)
        rows.append(score(f"refit, {iteration} iterations", export_stage(stages, saved), iterations=iteration,
                          tokens=iteration * DP * args.batch * args.seq_length))
    result = {"checkpoint": str(ckpt), "iters": args.iters, "batch": args.batch, "warmup": args.warmup,
              "lr": args.lr, "seq_length": args.seq_length, "kd_weight": args.kd_weight, "temperature": args.temperature,
              "refit_wall_s": round(wall, 1), "rows": rows}
    if args.json:
        tmp = args.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.json)
    print(f"refit: {args.iters} iterations in {wall:.0f} s (driver wall time, {DP} ranks)")
    print("| weights | tokens | " + " | ".join(f"held-out {t}" for t in texts) + " |")
    print("|---|---|" + "---|" * len(texts))
    for r in rows:
        print(f"| {r['weights']} | {r['tokens']:,} | " + " | ".join(f"{r[f'{t}_ppl']:.2f}" for t in texts) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
