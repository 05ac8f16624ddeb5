"""maskllm-plot on a synthetic metrics.jsonl shaped like the driver's: a valid, non-trivial PNG, atomic
write, and clear errors for a missing file, an empty file and a corrupt record."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from maskllm_megatron.train.plot import PlotError, load_records, main, series

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_run(folder: Path, iters: int = 60) -> Path:
    """Records as maskllm-train writes them: iteration 0 (prior), log records, eval records."""
    recs = [{"iteration": 0, "prior_method": "sparsegpt", "valid/loss": 5.0, "valid/ppl": 148.4}]
    for it in range(5, iters + 1, 5):
        frac = it / iters
        recs.append({"iteration": it, "lm_loss": 4.5 - 1.2 * frac, "lr": 5e-4 * (1 - 0.9 * frac),
                     "temperature": 4.0 - 3.95 * frac, "scale": 100 + 400 * frac,
                     "mask/flip_rate": 0.02 * (1 - frac), "mask/max_prob": 0.5 + 0.4 * frac})
        if it % 20 == 0:
            recs.append({"iteration": it, "valid/loss": 4.2 - frac, "valid/ppl": 66.7 * (1 - 0.4 * frac)})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG file"
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND", "truncated PNG"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_valid_png(tmp_path):
    synthetic_run(tmp_path / "run")
    assert main([str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "training.png"
    width, height = png_size(out)
    assert width >= 800 and height >= 600
    assert out.stat().st_size > 30_000  # four panels with curves, not a blank canvas
    assert not list(out.parent.glob(".*tmp*")), "temporary file left behind"


def test_plot_console_script_form(tmp_path):
    path = synthetic_run(tmp_path / "run")
    out = tmp_path / "figs" / "r.png"
    proc = subprocess.run([sys.executable, "tools/plot_training.py", str(path), "--out", str(out), "--title", "t"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    png_size(out)


def test_series_keeps_last_value_and_sorts():
    recs = [{"iteration": 10, "lm_loss": 3.0}, {"iteration": 5, "lm_loss": 4.0}, {"iteration": 10, "lm_loss": 2.5},
            {"iteration": 15, "lm_loss": float("nan")}, {"iteration": 20}]
    assert series(recs, "lm_loss") == ([5, 10], [4.0, 2.5])


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "training.png").exists()


def test_empty_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("\n")
    assert main([str(tmp_path)]) == 2
    assert "no records" in capsys.readouterr().err
    assert not (tmp_path / "training.png").exists()


def test_corrupt_middle_line_fails_torn_last_line_is_skipped(tmp_path):
    path = synthetic_run(tmp_path)
    good = path.read_text()
    path.write_text(good + '{"iteration": 65, "lm_lo')  # killed mid-write
    assert len(load_records(path)) == len(good.splitlines())
    lines = good.splitlines()
    path.write_text("\n".join(lines[:3] + ["garbage"] + lines[3:]) + "\n")
    with pytest.raises(PlotError, match=r"metrics.jsonl:4"):
        load_records(path)


def test_records_without_plottable_keys(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "prior_method": "none"}) + "\n")
    assert main([str(tmp_path)]) == 2
    assert "nothing to plot" in capsys.readouterr().err


def test_a_distillation_run_plots_its_three_losses_and_the_kl(tmp_path):
    path = synthetic_run(tmp_path / "run")
    recs = [json.loads(l) for l in path.read_text().splitlines()]
    for r in recs:
        if "lm_loss" in r:
            r.update(kd_loss=0.5 * r["lm_loss"], loss=0.75 * r["lm_loss"])
        if "valid/ppl" in r:
            r["valid/kl_to_dense"] = r["valid/loss"] / 5
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    import matplotlib.pyplot as plt

    from maskllm_megatron.train import plot

    drawn = {}
    real_close = plt.close
    plt.close = lambda fig: drawn.setdefault("fig", fig)  # look at the figure before it is closed
    try:
        plot.plot_records(load_records(path), tmp_path / "kd.png")
    finally:
        plt.close = real_close
    ax_loss = drawn["fig"].axes[0]
    assert [l.get_label() for l in ax_loss.lines] == ["LM", "KD (T^2 KL to dense)", "total"]
    assert any("KL to dense" in ax.get_ylabel() for ax in drawn["fig"].axes)
    png_size(tmp_path / "kd.png")
    real_close(drawn["fig"])
