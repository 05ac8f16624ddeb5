"""Export-time reconstruction: refit the kept weights of a trimmed model on calibration data.

``maskllm-export --reconstruct`` loads the run's model with its hard (or prior) masks, refits every masked
layer's kept weights to its dense output on calibration samples (``megatron.reconstruct``), then writes
the format as usual; the export's sparsity record says how the weights were reconstructed.

Calibration samples come from, in this order: ``--calib-text`` (plain text, cut into non-overlapping
windows), ``--calib-data`` (indexed dataset prefixes, megatron's blend form, every document in the
train part), or the run's own training data (the same first samples the run's one-shot prior was
calibrated on, when the counts agree).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from maskllm_megatron.convert.io import ConversionError
from maskllm_megatron.megatron.configs import ReconstructConfig


class ReconstructError(ConversionError):
    """Reconstruction cannot run as asked (message: problem and fix)."""


@dataclass(frozen=True)
class ReconstructRequest:
    """``maskllm-export --reconstruct``: the solver (``ReconstructConfig``) and its calibration samples."""

    solver: ReconstructConfig = field(default_factory=ReconstructConfig)
    samples: int = 128
    seq_len: Optional[int] = None  # None: the run's data.seq_length
    data: tuple[str, ...] = ()  # indexed dataset prefix(es); empty with no text: the run's data.train
    text_file: Optional[Path] = None
    micro_batch_size: int = 1

    def __post_init__(self):
        if self.samples < 1:
            raise ReconstructError(f"--calib-samples {self.samples} must be >= 1 (e.g. 128)")
        if self.seq_len is not None and self.seq_len < 1:
            raise ReconstructError(f"--calib-seq-len {self.seq_len} must be >= 1")
        if self.micro_batch_size < 1:
            raise ReconstructError(f"--calib-batch-size {self.micro_batch_size} must be >= 1")
        if self.data and self.text_file is not None:
            raise ReconstructError("--calib-data and --calib-text exclude each other: pass one calibration source")
        if self.text_file is not None and not Path(self.text_file).is_file():
            raise ReconstructError(f"--calib-text {self.text_file} does not exist: pass a plain-text file")


@dataclass
class CalibrationPlan:
    """Where the calibration samples come from, checked before any model loads: ``windows`` (token
    micro-batches cut from text) or ``data`` (an indexed dataset whose train part holds enough tokens)."""

    seq_len: int
    source: str
    windows: Optional[list] = None
    data: Optional[object] = None  # DataConfig
    total_samples: int = 0  # samples the dataset is built for (the run's own order for the run's data)


def plan_calibration(req: ReconstructRequest, run) -> CalibrationPlan:
    """Check the calibration source (it exists, fits the model and holds ``samples x seq_len`` tokens)
    without loading a model; ``ReconstructError`` names the problem."""
    from maskllm_megatron.data.datasets import (DataConfig, DataConfigError, parse_blend, split_token_count,
                                                text_windows)
    from maskllm_megatron.data.tokenizer import load_tokenizer

    run_cfg = run.train_config()
    seq_len = req.seq_len or run_cfg.data.seq_length
    if seq_len > run.info.model.max_position_embeddings:
        raise ReconstructError(f"--calib-seq-len {seq_len} exceeds the model's maximum sequence length "
                               f"{run.info.model.max_position_embeddings}: lower it")
    try:
        if req.text_file is not None:
            ids = load_tokenizer(run.base / "tokenizer").encode(Path(req.text_file).read_text(encoding="utf-8"))
            return CalibrationPlan(seq_len, f"text {Path(req.text_file).absolute()}",
                                   windows=text_windows(ids, seq_len, req.samples, req.micro_batch_size))
        if req.data:
            blend, split, source = req.data, "100,0,0", f"indexed dataset {' '.join(req.data)}"
            total = req.samples
        else:
            blend, split = run_cfg.data.train, run_cfg.data.split
            source = f"the run's training data {' '.join(blend)}"
            if not blend:
                raise ReconstructError("--reconstruct needs calibration data and the run names none: pass "
                                       "--calib-data PREFIX or --calib-text FILE")
            # the run's own sample order (it depends on how many samples the dataset is built for)
            total = max(run_cfg.train_samples(), req.samples)
        prefixes, weights = parse_blend(blend)
        data_cfg = DataConfig(prefixes, weights, split=split, seq_length=seq_len, seed=run_cfg.run.seed)
        have = split_token_count(data_cfg)
    except DataConfigError as e:
        hint = "" if req.data or req.text_file else " (the run's data.train; pass --calib-data PREFIX or --calib-text FILE)"
        raise ReconstructError(f"calibration data{hint}: {e}") from None
    if have < req.samples * seq_len:
        raise ReconstructError(f"the calibration data ({source}) holds {have:,} training tokens, fewer than "
                               f"--calib-samples {req.samples} x {seq_len} tokens: give more data or lower "
                               "--calib-samples")
    return CalibrationPlan(seq_len, source, data=data_cfg, total_samples=total)


def calibration_tokens(req: ReconstructRequest, plan: CalibrationPlan, run, cache_dir: Path) -> list[torch.Tensor]:
    """The token micro-batches [b, s] of ``plan``. ``cache_dir``: megatron's index files for an indexed
    dataset (a folder of the export's own work, the same path on every rank)."""
    from dataclasses import replace

    from maskllm_megatron.data.datasets import DataConfigError, build_datasets, first_samples
    from maskllm_megatron.data.tokenizer import load_tokenizer

    if plan.windows is not None:
        return plan.windows
    try:
        splits = build_datasets(replace(plan.data, cache_dir=str(cache_dir)), load_tokenizer(run.base / "tokenizer"),
                                plan.total_samples)
        batches = first_samples(splits.train, req.samples, req.micro_batch_size)
    except DataConfigError as e:
        raise ReconstructError(f"calibration data: {e}") from None
    return [b["tokens"] for b in batches]


def reconstruct_model(model, req: ReconstructRequest, plan: CalibrationPlan, run, cache_dir: Path) -> dict:
    """Refit ``model``'s kept weights (collective: every TP rank calls it) and return the record the
    export writes: method, damping, calibration, and the masked layers' summed error before and after."""
    from maskllm_megatron.megatron.model_builder import gpt_forward
    from maskllm_megatron.megatron.reconstruct import reconstruct_weights
    from maskllm_megatron.prune.methods import HessianError

    t0 = time.time()
    batches = calibration_tokens(req, plan, run, cache_dir)
    device = next(model.parameters()).device
    forwards = [lambda m, t=t.to(device): gpt_forward(m, t) for t in batches]
    try:
        errors = reconstruct_weights(model, forwards, req.solver)
    except HessianError as e:
        raise ReconstructError(f"reconstruction failed, nothing written: {e}") from None
    before = sum(b for b, _ in errors.values())
    after = sum(a for _, a in errors.values())
    return {**req.solver.to_dict(), "calib_samples": req.samples, "calib_seq_len": plan.seq_len,
            "calib_source": plan.source, "layers": len(errors), "error_before": before, "error_after": after,
            "seconds": round(time.time() - t0, 1)}
