"""Short-budget mask-learning runs on SmolLM2-135M from the demo's cached SparseGPT prior: how the
logits learning rate, prior strength and iteration count change held-out perplexity (not in CI).

    python benchmarks/learn_budget.py --iters 40 | --minutes 6  [any demo recipe flag: --lr 2e-4
        --prior-strength 4 --global-batch 2 --adam-eps 1e-5 --temperature-end 0.5 --anneal-fraction 0.7
        --train-weights --weight-lr 2e-4 --kd-weight 0.5 --update-weights ...] [--checkpoints 1]
        [--after <an earlier run>/checkpoints/iter_NNNNNNN]

Needs the demo's stages 1-4 (run `make demo` once). Learns with 2 data-parallel processes exactly like
the demo's stage 5 (``demo.learn_stage``, cached under the demo's cache by its settings), then prints
the hard-mask held-out Wikipedia and Shakespeare perplexities (512-token windows with BOS, 8,192 tokens)
and the wall time of the learning run; with ``--checkpoints K``, also the perplexity at each of K evenly spaced
checkpoints (a curve of perplexity against tokens; each checkpoint takes 3 GB of disk).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from maskllm_megatron.cache import cache_dir
from maskllm_megatron.demo import (Stages, add_recipe_arguments, final_checkpoint, heldout_ppl, learn_stage, learn_wall_s,
                                   prior_stage, probe_stage, recipe_from_args)
from maskllm_megatron.run_folder import CHECKPOINTS_DIR, checkpoint_iteration, complete_checkpoints


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--iters", type=int, help="iterations of the run")
    length.add_argument("--minutes", type=float, help="wall-clock minutes of the learning run, planned into iterations "
                        "by the demo's timed probe of this recipe (equal wall-clock comparisons: a slower recipe "
                        "gets fewer iterations)")
    add_recipe_arguments(p)
    p.add_argument("--checkpoints", type=int, default=1, help="evenly spaced checkpoints to score (a curve)")
    p.add_argument("--after", type=Path, help="start from this learning run's checkpoint instead of the SparseGPT "
                   "prior: its learned hard masks are the prior (a second phase, e.g. joint training after a "
                   "mask-only run; with --update-weights its weights too)")
    args = p.parse_args(argv)
    stages = Stages(cache_dir() / "demo")
    found = {name: [p for p in sorted(stages.root.glob(pattern)) if ".partial" not in str(p)] for name, pattern in (
        ("converted model", "convert-*/ckpt"), ("training data", "data-wiki_train-*/wiki_train.bin"),
        ("SparseGPT prior", "prior-sparsegpt-[0-9a-f]*/checkpoints/iter_0000000"))}  # not -update-
    for name, paths in found.items():
        if len(paths) != 1:
            raise SystemExit(f"error: expected one cached {name} under {stages.root}, found {len(paths)}: "
                             "run `make demo` once first")
    ckpt, data, prior = (found[k][0] for k in found)
    recipe = recipe_from_args(args)
    if args.after is not None:
        if not (args.after / "metadata.json").is_file():
            raise SystemExit(f"error: --after {args.after} is not a run checkpoint (no metadata.json): give "
                             "<run>/checkpoints/iter_NNNNNNN")
        prior = args.after.resolve()
    elif recipe.update_weights:  # SparseGPT's prior with its OBS-updated weights (a prior stage of its own)
        prior = prior_stage(stages, ckpt, data.with_suffix(""), "sparsegpt", update_weights=True)
    plan = None
    if args.minutes is not None:
        plan = probe_stage(stages, ckpt, data.with_suffix(""), prior, recipe)
        args.iters = plan.iterations(args.minutes)
    changed = {k: v for k, v in recipe.changed().items() if k not in ("lr", "prior_strength", "global_batch", "dtype")}
    if recipe.model_dtype != "fp32":  # named as it resolves here (fp32 runs keep the names they had)
        changed["dtype"] = recipe.model_dtype
    name = f"budget-{args.iters}-{args.lr:g}-{args.prior_strength:g}-{args.global_batch}" + "".join(
        f"-{k}" if isinstance(v, bool) else f"-{k}{v}" if isinstance(v, str) else f"-{k}{v:g}"
        for k, v in changed.items()) + (
        f"-after-{args.after.parent.parent.name.rsplit('-', 1)[-1]}-{checkpoint_iteration(args.after.name)}"
        if args.after is not None else "")
    run = learn_stage(stages, ckpt, data.with_suffix(""), prior, args.iters, recipe, name=name,
                      checkpoints=args.checkpoints)
    ppl = heldout_ppl(["--ckpt", str(final_checkpoint(run))], run / "ppl.log")
    shakespeare = heldout_ppl(["--ckpt", str(final_checkpoint(run))], run / "ppl_shakespeare.log",
                              ("--corpus", "shakespeare-heldout"))
    curve = []
    for c in list(reversed(complete_checkpoints(run / CHECKPOINTS_DIR)))[:-1] if args.checkpoints > 1 else []:
        it = checkpoint_iteration(c.name)
        curve.append({"iteration": it, "tokens": it * recipe.tokens_per_iteration,
                      "heldout_ppl": heldout_ppl(["--ckpt", str(c)], run / f"ppl_{it}.log")})
    result = {"iters": args.iters, "minutes": args.minutes, "plan": None if plan is None else asdict(plan), "tokens": args.iters * recipe.tokens_per_iteration, "recipe": vars(args),
              "learn_wall_s": round(learn_wall_s(run)), "heldout_ppl": ppl,
              "heldout_shakespeare_ppl": shakespeare, "curve": curve}
    print("RESULT " + json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
