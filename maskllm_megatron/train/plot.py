"""``maskllm-plot``: one PNG of a mask-learning run from its ``metrics.jsonl``.

Panels: training LM loss (with distillation also the KD term and the total); hard-mask validation
perplexity (the iteration-0 point is the argmax of the initial logits: the prior moved by the initial
noise) with the KL to the dense model on a twin axis; flip rate of the argmax patterns; Gumbel
temperature with the logit scale on a twin axis.

    maskllm-plot runs/smollm2            # writes runs/smollm2/training.png
    maskllm-plot runs/smollm2/metrics.jsonl --out report.png --title "SmolLM2 2:4"
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional


class PlotError(ValueError):
    """The metrics file is missing, unreadable or holds nothing to plot (message says which)."""


def metrics_path(run: str | Path) -> Path:
    """``run`` itself if it is a file, else ``run/metrics.jsonl``."""
    p = Path(run)
    return p / "metrics.jsonl" if p.is_dir() else p


def load_records(path: str | Path) -> list[dict]:
    """The JSON records of ``path``. A torn last line (a run killed mid-write) is skipped; a bad line
    anywhere else is an error."""
    from .metrics import MetricsError, read_records

    path = Path(path)
    if not path.is_file():
        raise PlotError(f"{path} does not exist: pass a run folder (run.out_dir) or its metrics.jsonl")
    try:
        records, torn = read_records(path)
    except MetricsError as e:
        raise PlotError(str(e)) from None
    if torn:
        print(f"maskllm-plot: skipping the incomplete last line of {path}", file=sys.stderr)
    if not records:
        raise PlotError(f"{path} holds no records yet: wait for the first log interval of the run")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of ``key``, sorted by iteration; a repeated iteration keeps its last value."""
    by_iter = {}
    for rec in records:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_iter[int(rec["iteration"])] = float(v)
    xs = sorted(by_iter)
    return xs, [by_iter[x] for x in xs]


def plot_records(records: list[dict], out: str | Path, title: Optional[str] = None) -> Path:
    """Draw the four panels and write ``out`` atomically (PNG). Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    loss = series(records, "lm_loss")
    ppl = series(records, "valid/ppl")
    flips = series(records, "mask/flip_rate")
    temp = series(records, "temperature")
    scale = series(records, "scale")
    if not any(xs for xs, _ in (loss, ppl, flips, temp)):
        raise PlotError("the records hold none of lm_loss, valid/ppl, mask/flip_rate, temperature: nothing to plot")

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    (ax_loss, ax_ppl), (ax_flip, ax_temp) = axes
    _line(ax_loss, loss, "training LM loss (soft mask)", "loss", "tab:blue")
    kd, total = series(records, "kd_loss"), series(records, "loss")
    if kd[0]:  # a distillation run: its KD term and the loss it optimises
        ax_loss.set_title("training losses (soft mask)", fontsize=10)
        ax_loss.lines[0].set_label("LM")
        ax_loss.plot(*kd, color="tab:cyan", label="KD (T^2 KL to dense)")
        ax_loss.plot(*total, color="black", linestyle="--", label="total")
        ax_loss.legend(loc="upper right")
    kl = series(records, "valid/kl_to_dense")
    _line(ax_ppl, ppl, "validation perplexity (hard mask)", "perplexity", "tab:green", marker="o")
    if ppl[0] and ppl[0][0] == 0:
        ax_ppl.scatter([0], [ppl[1][0]], color="tab:red", zorder=3,
                       label=f"start (argmax of initial logits) {ppl[1][0]:.1f}")
        ax_ppl.legend(loc="upper right")
    if ppl[1] and max(ppl[1]) / max(min(ppl[1]), 1e-9) > 20:
        ax_ppl.set_yscale("log")
    if kl[0]:
        twin_kl = ax_ppl.twinx()
        twin_kl.plot(*kl, color="tab:brown", linestyle=":", marker="x", markersize=3)
        twin_kl.set_ylabel("KL to dense (nats/token)", color="tab:brown")
    _line(ax_flip, flips, "mask flip rate (groups changed per log interval)", "flip rate", "tab:purple")
    ax_flip.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    _line(ax_temp, temp, "Gumbel temperature / logit scale", "temperature", "tab:orange")
    if scale[0]:
        twin = ax_temp.twinx()
        twin.plot(*scale, color="tab:gray", linestyle="--")
        twin.set_ylabel("logit scale", color="tab:gray")
    if title:
        fig.suptitle(title)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def _line(ax, xy, title: str, ylabel: str, color: str, marker: Optional[str] = None) -> None:
    xs, ys = xy
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if xs:
        ax.plot(xs, ys, color=color, marker=marker, markersize=3)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def main(argv: Optional[list[str]] = None) -> int:
    from ..launch import quiet_known_warnings, user_error

    quiet_known_warnings()
    p = argparse.ArgumentParser(prog="maskllm-plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (run.out_dir) or its metrics.jsonl")
    p.add_argument("--out", help="PNG to write (default: training.png next to metrics.jsonl)")
    p.add_argument("--title", help="figure title (default: the run folder's name)")
    args = p.parse_args(argv)
    path = metrics_path(args.run)
    out = Path(args.out) if args.out else path.parent / "training.png"
    try:
        records = load_records(path)
        plot_records(records, out, args.title or path.parent.absolute().name)
    except PlotError as e:
        return user_error(f"maskllm-plot: {e}")
    print(f"maskllm-plot: wrote {out} ({len(records)} records from {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
