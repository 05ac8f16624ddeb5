"""``python -m maskllm_megatron.demo`` (``make demo``): the arguments, the seven stages and the report."""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from .. import assets
from ..cache import cache_dir
from ..launch import exit_user_error, quiet_known_warnings
from . import __doc__ as DEMO_DOC
from .pipeline import (PRIORS, PROBE_ITERS, convert_stage, copy_run_records, data_stage, export_stage,
                       final_checkpoint, heldout_ppl, learn_stage, learn_wall_s, prior_stage, probe_stage,
                       reconstruct_stage, refit_stage)
from .recipe import (DEMO_LEARN_MINUTES, DEMO_RECONSTRUCTION, DEMO_REFIT_ITERS, DP, RECONSTRUCTIONS, SEQ, LearnRecipe, WeightRefit, add_recipe_arguments,
                     recipe_from_args)
from .stages import Stages, raise_keyboard_interrupt, rerun_command, run_logged, stage_key


def main(argv=None) -> int:
    quiet_known_warnings()
    p = argparse.ArgumentParser(description=DEMO_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=DEMO_LEARN_MINUTES,
                   help="wall-clock minutes of the mask-learning stage (start-up, evaluations and save included), "
                        f"turned into iterations (at least 10) by a timed probe of {PROBE_ITERS} iterations of the "
                        "same run on this machine, cached per machine; the iteration count is printed and recorded. "
                        f"Default {DEMO_LEARN_MINUTES:g}: the whole demo in about 20 minutes on 2 CPU cores; raise it "
                        "for a longer, better run")
    add_recipe_arguments(p)
    p.add_argument("--reconstruct", choices=list(RECONSTRUCTIONS), default=DEMO_RECONSTRUCTION,
                   help="also reconstruct the kept weights layer by layer at export (maskllm-export --reconstruct) and add "
                        "that row with its cost in seconds: block (each block fitted to the dense model's hidden "
                        "states), lstsq (each linear's exact least squares), obs (SparseGPT's sweep), or none "
                        f"(default {DEMO_RECONSTRUCTION}; benchmarks/RESULTS.md, Reconstruction and refit)")
    p.add_argument("--refit-iters", type=int, default=DEMO_REFIT_ITERS,
                   help="then refit the kept weights under the learned masks end to end (mask.refit, distilled "
                        f"from the dense model) for this many iterations of {DP} x {SEQ} tokens and add that row "
                        f"(default {DEMO_REFIT_ITERS}: at the demo's budget, more mask learning beats a refit; "
                        f"{WeightRefit.iters} takes about 4.5 minutes)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="where the results go (default demo_out)")
    args = p.parse_args(argv)
    if not args.minutes > 0:
        exit_user_error(f"error: --minutes {args.minutes:g} must be positive (e.g. 12)")
    if args.refit_iters < 0:
        exit_user_error(f"error: --refit-iters {args.refit_iters} must be >= 0 (0: no refit)")
    recipe = recipe_from_args(args)  # every setting checked before any work (the run's length: once planned)
    out = args.out.absolute()
    if out.exists() and not out.is_dir():
        exit_user_error(f"error: --out {out} is a file: pass a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        exit_user_error(f"error: --out {out}: cannot create the folder ({e.strerror})")
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # `kill` and schedulers stop it as Ctrl-C does
    try:
        return _demo(recipe, args.minutes, out, args.reconstruct, args.refit_iters)
    except KeyboardInterrupt:  # outside a stage (e.g. fetching the model)
        raise SystemExit(f"demo interrupted; run the same command (`{rerun_command()}`) again: finished stages "
                         "are reused") from None


def _demo(recipe: LearnRecipe, minutes: float, out: Path, reconstruct: str = "none", refit_iters: int = 0) -> int:
    """The seven stages and the results (``main`` has checked the arguments)."""
    from ..assets import wikipedia_split

    stages = Stages(cache_dir() / "demo")

    # 1. real model and text
    hf = assets.smollm2_hf_dir()
    print(f"[demo] 1. model: SmolLM2-135M at {hf}", flush=True)

    ckpt = convert_stage(stages, hf)
    train_articles, heldout = wikipedia_split()
    prefix = data_stage(stages, "wiki_train", [text for _, text in train_articles], ckpt / "tokenizer")
    prior_ckpts = {method: prior_stage(stages, ckpt, prefix, method) for method in PRIORS}
    plan = probe_stage(stages, ckpt, prefix, prior_ckpts["sparsegpt"], recipe)
    iters = plan.iterations(minutes)
    try:
        recipe.check_run(iters)  # e.g. a warm-up as long as the run
    except ValueError as e:
        exit_user_error(f"error: --{str(e).split()[0].replace('_', '-')}: {e} (--minutes {minutes:g} plans "
                        f"{iters} iterations on this machine)")
    print(f"[demo] mask learning: {minutes:g} minutes plan {iters} iterations on this machine ({plan.step_s:.1f} s "
          f"an iteration, {plan.fixed_s:.0f} s of start-up, evaluation and saving, measured by the probe)", flush=True)
    run = learn_stage(stages, ckpt, prefix, prior_ckpts["sparsegpt"], iters, recipe)
    missed = plan.forget_if_missed(iters, learn_wall_s(run))
    if missed:
        print(f"[demo] {missed}", flush=True)
    exported = export_stage(stages, final_checkpoint(run))
    recon = RECONSTRUCTIONS[reconstruct]
    reconstructed = reconstruct_stage(stages, final_checkpoint(run), recon) if recon is not None else None
    refit = WeightRefit(iters=refit_iters)
    refit_run = refit_stage(stages, final_checkpoint(run), refit) if refit_iters else None
    refit_hf = export_stage(stages, final_checkpoint(refit_run)) if refit_run is not None else None

    # 7. held-out perplexity
    def evaluate(w: Path):
        rows = [("dense", heldout_ppl(["--hf", str(hf)], w / "dense.log"))]
        for method in PRIORS:
            rows.append((method, heldout_ppl(["--ckpt", str(prior_ckpts[method]), "--use-prior"], w / f"{method}.log")))
        rows.append(("MaskLLM", heldout_ppl(["--hf", str(exported)], w / "maskllm.log")))
        if reconstructed is not None:
            folder, seconds = reconstructed
            rows.append((f"MaskLLM + {reconstruct} reconstruction ({seconds:.0f} s)",
                         heldout_ppl(["--hf", str(folder)], w / f"reconstruct-{recon.name}.log")))
        if refit_hf is not None:
            seconds = float((refit_run / "refit_wall_s").read_text())
            rows.append((f"MaskLLM + refit (weights updated), {refit.iters} iterations ({seconds:.0f} s)",
                         heldout_ppl(["--hf", str(refit_hf)], w / "refit.log")))
        (w / "table.json").write_text(json.dumps(rows))

    results = stages.run(7, "evaluate", stage_key(str(exported), [str(r) for r in prior_ckpts.values()], SEQ,
                                             *([str(reconstructed[0])] if reconstructed else []),
                                             *([str(refit_hf)] if refit_hf else [])), evaluate)
    rows = json.loads((results / "table.json").read_text())
    speed = decode_speed(stages, exported)
    tokens = iters * recipe.tokens_per_iteration
    lines = ["| model | held-out PPL |", "|---|---|"] + [f"| {n} | {v:.2f} |" for n, v in rows]
    md = (f"# MaskLLM demo: SmolLM2-135M, 2:4, held-out Wikipedia\n\n"
          f"Held-out articles never seen in training or calibration; {SEQ}-token windows with BOS, 8,192 tokens.\n"
          f"MaskLLM (frozen weights, the paper's method): {iters} iterations x {recipe.global_batch} x {recipe.seq_length} "
          f"tokens = {tokens:,} tokens from the "
          f"SparseGPT prior (strength {recipe.prior_strength:g}, logits lr {recipe.lr:g}, warmed up over "
          f"{recipe.warmup_iters} iterations, schedules annealed over {recipe.anneal_fraction:.0%} of the run, "
          f"{recipe.model_dtype} model).\n\n"
          + "\n".join(lines) + "\n")
    md += (f"\nDecode, MaskLLM export, batch 1, {speed['new_tokens']} greedy tokens, {speed['dtype']}, {speed['threads']} "
           f"threads: dense {speed['dense_tokens_per_s']:.1f} tokens/s, 2:4 compressed (maskllm-generate) "
           f"{speed['compressed_tokens_per_s']:.1f} tokens/s ({speed['speedup']:.2f}x, same tokens: "
           f"{'yes' if speed['tokens_identical'] else 'no'}).\n")
    md += ("\n| stage | wall time |\n|---|---|\n" + "\n".join(
        f"| {name} | {_duration(seconds)}{' (cached)' if cached else ''} |" for name, seconds, cached in stages.walls)
        + f"\n\nMask learning was planned at {minutes:g} minutes ({iters} iterations) and took "
        f"{learn_wall_s(run) / 60:.1f}.\n")
    ppl = dict((n, v) for n, v in rows)
    md += (f"\nMaskLLM vs the SparseGPT prior it started from: perplexity "
           f"{100 * (ppl['MaskLLM'] / ppl['sparsegpt'] - 1):+.1f}%.\n")
    if refit_hf is not None:
        md += (f"MaskLLM + refit: the learned masks kept exactly, the kept weights trained {refit.iters} iterations x "
               f"{DP} x {SEQ} tokens by distillation from the dense model (mask.refit, lr {refit.lr:g}).\n")
    for stale in ("perplexity.png", "training_curves.png"):  # an earlier run's figures must not pass for these
        (out / stale).unlink(missing_ok=True)
    tmp = out / ".results.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, out / "results.md")
    written = [out / "results.md"]
    try:
        _bar_chart([(n, v) for n, v in rows], out / "perplexity.png")
    except ImportError:
        print("[demo] matplotlib is not installed: no PNG figures (pip install matplotlib)", flush=True)
    copy_run_records(run, out)
    written += [out / name for name in ("perplexity.png", "training_curves.png") if (out / name).exists()]
    print("\n" + md)
    print(f"[demo] wrote {', '.join(map(str, written))}; exported 2:4 model: {exported}; "
          f"{(time.time() - stages.t0) / 60:.1f} minutes")
    return 0


def _duration(seconds) -> str:
    return "not recorded" if seconds is None else f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def decode_speed(stages: Stages, exported: Path) -> dict:
    """8. decode tokens/s of the export, dense with its zeros against its compressed 2:4 linears (cheap:
    32 new tokens, batch 1, the medians of 2 alternating runs each), by ``maskllm-generate`` in its own
    process (its OpenMP setting, ``inference.cli``)."""
    def run(w: Path):
        run_logged(["-m", "maskllm_megatron.inference.cli", "--hf", str(exported), "--new-tokens", "32", "--repeats",
                    "2", "--json", str(w / "speed.json")], w / "generate.log")

    return json.loads((stages.run(8, "decode-speed", stage_key(str(exported), 32, "passive"), run)
                       / "speed.json").read_text())


def _bar_chart(table: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, values = zip(*table)
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, values, color=["#777777", "#d62728", "#ff7f0e", "#bcbd22", "#2ca02c", "#1f77b4"][: len(names)])
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M, 2:4 sparsity, held-out Wikipedia")
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
