"""Quality benchmark: the demo's pipeline on SmolLM2-135M with a longer budget (not in CI).

    python benchmarks/quality_smollm2.py [--minutes 150] [--transfer-minutes 15] [--out benchmarks/quality_out]
        [--lr 1e-3] [--warmup-iters 5] [--global-batch 2] [--prior-strength 4] [--clip-grad 1] ...  (the demo's recipe flags)

Reports held-out perplexity (whole Wikipedia articles never trained on, and held-out Shakespeare plays:
out of domain) of dense, magnitude, Wanda, SparseGPT (mask only and with OBS weight update) and MaskLLM;
the tokens and wall time used; the share of SparseGPT's gap to dense that MaskLLM closes,
gap_closed = (PPL_sparsegpt - PPL_maskllm) / (PPL_sparsegpt - PPL_dense); a curve of held-out
perplexity against tokens seen (from the run's evenly spaced checkpoints); and mask transfer: a mask
learned on Wikipedia refined on Shakespeare for a short budget, against learning on Shakespeare from the
one-shot SparseGPT prior with the same budget, both scored on held-out Shakespeare.
The Wikipedia run's metrics.jsonl, config and curves.png are copied next to quality.json. Stages are cached
like the demo's (a re-run reuses them); an interrupted learning run resumes from its last
checkpoint when the same command is run again (the reported learning wall time sums the attempts).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
import os
import sys
import time
from pathlib import Path

from maskllm_megatron import assets
from maskllm_megatron.cache import cache_dir
from maskllm_megatron.demo import (Stages, heldout_ppl, add_recipe_arguments, convert_stage, copy_run_records, data_stage,
                                   final_checkpoint, learn_stage, learn_wall_s, prior_stage, probe_stage,
                                   recipe_from_args)
from maskllm_megatron.assets import shakespeare_split, wikipedia_split
from maskllm_megatron.run_folder import CHECKPOINTS_DIR, checkpoint_iteration, complete_checkpoints


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=150.0, help="Wikipedia mask-learning budget (wall-clock minutes, planned by a timed probe)")
    p.add_argument("--transfer-minutes", type=float, default=15.0, help="budget of each Shakespeare run")
    add_recipe_arguments(p)  # --lr, --global-batch, ...: the demo's recipe by default
    p.add_argument("--checkpoints", type=int, default=6, help="points on the PPL-vs-tokens curve")
    p.add_argument("--out", type=Path, default=Path("benchmarks/quality_out"))
    args = p.parse_args(argv)
    t0 = time.time()
    stages = Stages(cache_dir() / "demo")
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)

    hf = assets.smollm2_hf_dir()
    ckpt = convert_stage(stages, hf)
    wiki_train, _ = wikipedia_split()
    wiki = data_stage(stages, "wiki_train", [t for _, t in wiki_train], ckpt / "tokenizer")
    plays_train, _ = shakespeare_split()
    shakes = data_stage(stages, "shakespeare_train", plays_train, ckpt / "tokenizer")
    texts = {"wikipedia": ("--corpus", "wikipedia-heldout"), "shakespeare": ("--corpus", "shakespeare-heldout")}

    priors = {m: prior_stage(stages, ckpt, wiki, m) for m in ("magnitude", "wanda", "sparsegpt")}
    priors["sparsegpt+update"] = prior_stage(stages, ckpt, wiki, "sparsegpt", update_weights=True)
    recipe = recipe_from_args(args)
    tokens_per_iter = recipe.tokens_per_iteration
    plan = probe_stage(stages, ckpt, wiki, priors["sparsegpt"], recipe)  # this machine's speed
    iters = plan.iterations(args.minutes)
    run = learn_stage(stages, ckpt, wiki, priors["sparsegpt"], iters, recipe, checkpoints=args.checkpoints)
    learn_wall = learn_wall_s(run)  # the run's own wall time, also when cached or resumed

    copy_run_records(run, out, "curves.png")
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    table = {}
    for name, text in texts.items():
        row = {"dense": heldout_ppl(["--hf", str(hf)], logs / f"dense_{name}.log", text)}
        for method, prior in priors.items():
            row[method] = heldout_ppl(["--ckpt", str(prior), "--use-prior"], logs / f"{method}_{name}.log", text)
        row["maskllm"] = heldout_ppl(["--ckpt", str(final_checkpoint(run))], logs / f"maskllm_{name}.log", text)
        row["gap_closed"] = (row["sparsegpt"] - row["maskllm"]) / (row["sparsegpt"] - row["dense"])
        table[name] = row

    curve = []
    for c in reversed(complete_checkpoints(run / CHECKPOINTS_DIR)):
        it = checkpoint_iteration(c.name)
        curve.append({"iteration": it, "tokens": it * tokens_per_iter,
                      "ppl": heldout_ppl(["--ckpt", str(c)], logs / f"curve_{it}.log", texts["wikipedia"])})

    # The run's own hard-mask validation (the training blend's validation split) at every evaluation.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    valid_curve = [{"iteration": r["iteration"], "tokens": r["iteration"] * tokens_per_iter, "valid_ppl": r["valid/ppl"]}
                   for r in records if "valid/ppl" in r]

    # Mask transfer to Shakespeare: refine the Wikipedia-learned mask vs learn from the one-shot prior.
    t_iters = plan.iterations(args.transfer_minutes)
    refined = learn_stage(stages, ckpt, shakes, final_checkpoint(run), t_iters, recipe, name="transfer-refine")
    scratch = learn_stage(stages, ckpt, shakes, priors["sparsegpt"], t_iters, recipe, name="transfer-scratch")
    transfer = {
        "iterations": t_iters, "tokens": t_iters * tokens_per_iter,
        "wikipedia_mask_no_refinement": table["shakespeare"]["maskllm"],
        "refined_from_wikipedia_mask": heldout_ppl(["--ckpt", str(final_checkpoint(refined))], logs / "refine.log",
                                            texts["shakespeare"]),
        "from_sparsegpt_prior": heldout_ppl(["--ckpt", str(final_checkpoint(scratch))], logs / "scratch.log",
                                     texts["shakespeare"]),
    }
    result = {"recipe": asdict(recipe), "iterations": iters, "tokens": iters * tokens_per_iter, "learn_wall_s": learn_wall,
              "total_wall_s": time.time() - t0, "table": table, "curve": curve, "valid_curve": valid_curve, "transfer": transfer}
    tmp = out / "quality.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / "quality.json")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
