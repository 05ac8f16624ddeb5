"""The driver's view of the data: training iterations from a sample offset, fixed validation
iterations, and calibration batches for the one-shot prior (all from ``maskllm_megatron.data``)."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import torch

from ..data.datasets import DataConfig, build_datasets, check_prefix, first_samples, micro_batches, parse_blend
from ..data.tokenizer import load_tokenizer
from ..run_config import TrainConfig


def _model_batch(batch: dict) -> dict:
    """A micro-batch as the model takes it, on the GPU when there is one. ``attention_mask`` is None:
    the layers' causal mask type applies, so attention can run its causal kernels (SDPA's is_causal:
    flash attention on GPU, half the blocks skipped on CPU) instead of reading a [b, 1, s, s] mask."""
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    return dict(batch, attention_mask=None)


class RunData:
    """Datasets of one run on one data-parallel rank."""

    def __init__(self, cfg: TrainConfig, dp_rank: int, dp_size: int, vocab_size: int | None = None):
        d = cfg.data
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        prefixes, weights = parse_blend(d.train)
        self.tokenizer = load_tokenizer(Path(cfg.model.checkpoint) / "tokenizer")
        data_cfg = DataConfig(prefixes, weights, split=d.split, seq_length=d.seq_length, seed=cfg.run.seed,
                              cache_dir=d.cache_dir or None)
        for prefix in data_cfg.prefixes:  # before any training: a truncated .bin, ids beyond the vocabulary
            check_prefix(prefix, vocab_size if vocab_size is not None else self.tokenizer.vocab_size)
        evals = (cfg.run.train_iters // cfg.run.eval_interval + 1) if cfg.run.eval_interval else 0
        valid_samples = d.global_batch_size * cfg.run.eval_iters if evals else 0
        self.splits = build_datasets(data_cfg, self.tokenizer, cfg.train_samples(), valid_samples=valid_samples)
        if evals and self.splits.valid is None:
            raise ValueError(f"data.split {d.split!r} has no validation part but run.eval_interval is set: "
                             "give the split a validation share (e.g. 98,2,0) or set run.eval_interval=0")

    def train_iterations(self, consumed_samples: int, num_micro: int) -> Iterator[list[dict]]:
        """Lists of ``num_micro`` micro-batches (this rank's share of each global batch)."""
        it = micro_batches(self.splits.train, self.cfg.data.micro_batch_size, self.dp_rank, self.dp_size,
                           consumed_samples)
        while True:
            chunk = [_model_batch(b) for b in itertools.islice(it, num_micro)]
            if len(chunk) < num_micro:
                return
            yield chunk

    def valid_iterations(self, n: int) -> Iterator[list[dict]]:
        """The same ``n`` validation iterations every time (comparable hard-mask losses)."""
        num_micro = self.cfg.data.global_batch_size // (self.cfg.data.micro_batch_size * self.dp_size)
        it = micro_batches(self.splits.valid, self.cfg.data.micro_batch_size, self.dp_rank, self.dp_size, 0)
        for _ in range(n):
            chunk = [_model_batch(b) for b in itertools.islice(it, num_micro)]
            if len(chunk) < num_micro:
                return
            yield chunk

    def calibration_batches(self, num_samples: int) -> list[dict]:
        """The first ``num_samples`` training samples, as micro-batches (same on every rank); the last
        one is cut short when ``num_samples`` is not a multiple of the micro-batch size."""
        if num_samples > len(self.splits.train):
            raise ValueError(f"prior.calib_samples {num_samples} is more than the {len(self.splits.train)} training "
                             "samples: lower it or give more training text")
        batches = first_samples(self.splits.train, num_samples, self.cfg.data.micro_batch_size)
        return [_model_batch(b) for b in batches]


def build_data(cfg: TrainConfig, info, dp_rank: int, dp_size: int) -> RunData:
    return RunData(cfg, dp_rank, dp_size, vocab_size=info.model.vocab_size)
