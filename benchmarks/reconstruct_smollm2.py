"""Reconstruction of a learned mask's kept weights on SmolLM2-135M: held-out perplexity and cost (not in CI).

    python benchmarks/reconstruct_smollm2.py --ckpt RUN/checkpoints/iter_XXXXXXX \
        [--variants block,lstsq,lstsq-dense-ts,obs] [--samples 128] [--sweep 16,32,64] [--use-prior] \
        [--json benchmarks/results/reconstruct_demo.json]

Each variant exports the checkpoint with ``maskllm-export --format hf --reconstruct`` (calibration samples
of the run's own training data), as a stage of the demo's cache (``demo.reconstruct_stage``, keyed by the
checkpoint's content and the flags: a re-run reuses it), then scores it on held-out Wikipedia and held-out
Shakespeare (512-token windows with BOS, 8,192 tokens) beside the plain export of the same masks. The
export's wall time (reconstruction included) is reported: it depends on what else the machine ran.
``--sweep`` repeats the first variant at other calibration-sample counts (where the gain saturates).
``--use-prior`` takes a prior-only checkpoint's one-shot masks (e.g. the demo's SparseGPT prior stage).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from maskllm_megatron.cache import cache_dir
from maskllm_megatron.demo import Reconstruction, Stages, export_stage, heldout_ppl, reconstruct_stage

TEXTS = {"wikipedia": ("--corpus", "wikipedia-heldout"), "shakespeare": ("--corpus", "shakespeare-heldout")}
VARIANTS = {
    "block": Reconstruction("block", "dense"),  # each block's kept weights fitted to the dense model's hidden states
    "block-layer": Reconstruction("block", "layer"),  # ... to the dense block's output on this model's inputs
    "lstsq": Reconstruction("lstsq", "layer"),  # each linear's exact least squares against its dense output (SparseGPT's)
    "lstsq-dense-ts": Reconstruction("lstsq", "dense", true_sequential=True),  # ... against the dense model's, one by one
    "obs": Reconstruction("obs", "layer"),  # SparseGPT's OBS sweep under the given mask
}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="a mask-learning run's checkpoint")
    p.add_argument("--variants", default="block", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (512 tokens each)")
    p.add_argument("--epochs", type=int, default=Reconstruction.epochs, help="block variants: passes per block")
    p.add_argument("--lr", type=float, default=Reconstruction.lr, help="block variants: Adam's learning rate")
    p.add_argument("--sweep", type=ints, default=[], help="more calibration-sample counts for the first variant")
    p.add_argument("--use-prior", action="store_true", help="the checkpoint's prior masks (a prior-only run)")
    p.add_argument("--texts", default="wikipedia,shakespeare", help="held-out texts to score")
    p.add_argument("--json", type=Path, help="write the rows here too")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant {unknown[0]!r}: use {', '.join(VARIANTS)}")
    texts = [t for t in args.texts.split(",") if t]
    stages = Stages(cache_dir() / "demo")
    ckpt = args.ckpt.absolute()

    def score(label: str, folder: Path, seconds: float | None) -> dict:
        row = {"variant": label, "export_seconds": None if seconds is None else round(seconds, 1)}
        for text in texts:
            row[f"{text}_ppl"] = heldout_ppl(["--hf", str(folder)], folder.parent / f"ppl_{text}.log", TEXTS[text])
        print("ROW " + json.dumps(row), flush=True)
        return row

    masks = "prior" if args.use_prior else "learned"
    rows = [score(f"{masks} mask, original weights", export_stage(stages, ckpt, args.use_prior), None)]
    runs = [(name, replace(VARIANTS[name], samples=args.samples)) for name in names]
    runs += [(names[0], replace(VARIANTS[names[0]], samples=n)) for n in args.sweep]
    for name, recon in runs:
        if recon.method == "block":
            recon = replace(recon, epochs=args.epochs, lr=args.lr)
        folder, seconds = reconstruct_stage(stages, ckpt, recon, args.use_prior)
        rows.append(dict(score(f"+ {name} ({recon.samples} samples)", folder, seconds), flags=recon.flags()))
    if args.json:
        tmp = args.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"checkpoint": str(ckpt), "masks": masks, "rows": rows}, indent=2))
        os.replace(tmp, args.json)
    print("| weights | " + " | ".join(f"held-out {t}" for t in texts) + " | export s |")
    print("|---|" + "---|" * (len(texts) + 1))
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{r[f'{t}_ppl']:.2f}" for t in texts)
              + f" | {r['export_seconds'] if r['export_seconds'] is not None else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
