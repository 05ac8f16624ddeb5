"""Training/validation datasets from weighted blends of indexed datasets, and resumable micro-batches.

Datasets are megatron-core's own: ``BlendedMegatronDatasetBuilder`` builds a ``GPTDataset`` per
prefix and split (documents shuffled by ``seed``, cut into ``seq_length + 1`` token windows) and, for
several prefixes, a ``BlendedDataset`` that interleaves them in proportion to the weights. Sample
``i`` of a split is a pure function of the data, the config and ``i``, so training resumes exactly by
starting the sampler at ``consumed_samples``.

Micro-batch layout (megatron's pretraining sampler): the global sample stream is cut into steps of
``micro_batch_size * dp_size`` consecutive samples; data-parallel rank ``r`` takes samples
``[r * mbs, (r + 1) * mbs)`` of every step. A global batch is ``num_micro_batches`` such steps, so
``global_batch = micro_batch_size * num_micro_batches * dp_size`` and the ranks partition it.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from maskllm_megatron.cache import file_digest
from maskllm_megatron.data.tokenizer import TextTokenizer


class DataConfigError(ValueError):
    """An invalid data configuration (the message names the field or the missing file)."""


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how to cut it; validated on construction.

    ``prefixes`` are indexed-dataset paths without ``.bin``/``.idx``; ``weights`` (one per prefix,
    positive, normalised) are required when there are several. ``split`` is "train,valid,test"
    proportions of every prefix's documents, e.g. "98,2,0". ``cache_dir`` holds megatron's index
    files (None: megatron writes them under ``PREFIX/cache/``). ``create_attention_mask`` adds megatron's
    [1, s, s] boolean causal mask (True = masked out) to each sample; it costs s*s bytes per sample.
    """

    prefixes: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    split: str = "98,2,0"
    seq_length: int = 2048
    seed: int = 1234
    cache_dir: str | None = None
    create_attention_mask: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.prefixes, (str, Path)):
            raise DataConfigError("prefixes must be a list of paths, not one string")
        object.__setattr__(self, "prefixes", tuple(str(p) for p in self.prefixes))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", str(self.cache_dir))
        if not self.prefixes:
            raise DataConfigError("prefixes: no dataset given")
        for prefix in self.prefixes:
            if prefix.endswith((".bin", ".idx")) and Path(prefix).is_file():
                raise DataConfigError(f"dataset {prefix}: give the prefix without .bin/.idx, "
                                      f"i.e. {prefix[:-4]}")
            missing = [p for p in (prefix + ".bin", prefix + ".idx") if not Path(p).is_file()]
            if missing:
                raise DataConfigError(f"dataset {prefix}: missing {' and '.join(missing)} "
                                      "(write it with maskllm-preprocess)")
        if self.weights is None and len(self.prefixes) > 1:
            raise DataConfigError(f"weights: required to blend {len(self.prefixes)} prefixes")
        if self.weights is not None:
            if len(self.weights) != len(self.prefixes):
                raise DataConfigError(f"weights: {len(self.weights)} given for {len(self.prefixes)} prefixes")
            if not all(math.isfinite(w) and w > 0 for w in self.weights):
                raise DataConfigError(f"weights: must be positive numbers, got {list(self.weights)}")
        self.split_fractions()  # validates
        if self.seq_length < 1:
            raise DataConfigError(f"seq_length: must be >= 1, got {self.seq_length}")
        if self.seed < 0:
            raise DataConfigError(f"seed: must be >= 0, got {self.seed}")

    def split_fractions(self) -> tuple[float, float, float]:
        """``split`` as normalised (train, valid, test) fractions."""
        parts = [p.strip() for p in self.split.split(",")]
        if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
            raise DataConfigError(f"split: expected up to three non-negative numbers like '98,2,0', got {self.split!r}")
        values = [float(p) for p in parts] + [0.0] * (3 - len(parts))
        if values[0] <= 0:
            raise DataConfigError(f"split: the train part must be positive, got {self.split!r}")
        total = sum(values)
        return values[0] / total, values[1] / total, values[2] / total


def parse_blend(items: Sequence[str | float]) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
    """Megatron's ``--data-path`` form: ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]``."""
    items = [str(i) for i in items]
    if len(items) == 1:
        return (items[0],), None
    if len(items) % 2:
        raise DataConfigError(f"blend: expected 'weight prefix' pairs, got {items}")
    try:
        weights = tuple(float(w) for w in items[0::2])
    except ValueError:
        raise DataConfigError(f"blend: expected 'weight prefix' pairs, got {items}") from None
    return tuple(items[1::2]), weights


class MegatronTokenizerAdapter:
    """The few tokenizer attributes megatron's GPTDataset reads: ``eod``, ``vocab_size`` and
    ``unique_identifiers`` (part of the index-cache key). It has no ``pad``: megatron then uses -1,
    an id no document contains, so no real token is ever masked as padding.

    megatron keys its cached sample indices by the dataset's path, not its contents, so a prefix
    preprocessed again (more documents, ``--add-bos``) would be read through the old indices: stale
    samples, or an IndexError. ``data`` (a digest of each prefix's ``.idx``, which holds every
    document's length, all the indices depend on) goes into the key so that a changed dataset gets
    fresh indices."""

    def __init__(self, eod: int, vocab_size: int, data: dict[str, str] | None = None):
        self.eod, self.vocab_size = int(eod), int(vocab_size)
        self.unique_identifiers = {"class": type(self).__name__, "eod": self.eod, "vocab_size": self.vocab_size,
                                   "data": dict(data or {})}


@dataclass
class DatasetSplits:
    """Top-level datasets (``GPTDataset`` or ``BlendedDataset``); None where the split's part or the
    requested number of samples is 0."""

    train: Any
    valid: Any | None
    test: Any | None


def gpt_dataset_config(config: DataConfig, tokenizer: TextTokenizer):
    """The megatron-core ``GPTDatasetConfig`` for ``config`` (no position/mask resets, no EOD loss mask)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_length,
        blend=(list(config.prefixes), list(config.weights) if len(config.prefixes) > 1 else None),
        split=config.split,
        path_to_cache=config.cache_dir,
        tokenizer=MegatronTokenizerAdapter(tokenizer.eos_id, tokenizer.vocab_size,
                                           {prefix: file_digest(f"{prefix}.idx") for prefix in config.prefixes}),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=config.create_attention_mask,
        mmap_bin_files=True,
    )


def build_datasets(config: DataConfig, tokenizer: TextTokenizer, train_samples: int,
                   valid_samples: int = 0, test_samples: int = 0) -> DatasetSplits:
    """Build the splits with at least ``*_samples`` samples each (more epochs if needed).

    Call on every rank. With a ``cache_dir`` and several ranks, rank 0 writes the index files first
    and the others read them, so ``torch.distributed`` must be initialised (gloo on CPU).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    if train_samples < 1 or valid_samples < 0 or test_samples < 0:
        raise DataConfigError(f"sample counts: need train >= 1, valid/test >= 0; got "
                              f"{train_samples}, {valid_samples}, {test_samples}")
    if config.cache_dir is not None and not torch.distributed.is_initialized():
        raise DataConfigError("cache_dir: megatron's dataset cache needs torch.distributed initialised "
                              "(init_process_group('gloo') on CPU), or leave cache_dir unset")
    sizes = [train_samples, valid_samples, test_samples]
    gpt_config = gpt_dataset_config(config, tokenizer)
    # Splits nobody asked samples of are not built (megatron would build one epoch of them).
    gpt_config.split_matrix = [r if n > 0 else None for r, n in zip(gpt_config.split_matrix, sizes)]
    _check_documents(config, gpt_config.split_matrix)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, gpt_config)
    return DatasetSplits(*builder.build())


def check_prefix(prefix: str, vocab_size: int) -> None:
    """Refuse, in one line, a dataset the model cannot read right: a ``.bin`` shorter than its ``.idx``
    says (truncated: it would fail iterations in, on every resume), or token ids at or beyond the model's
    vocabulary (a vocab-parallel embedding silently zeroes them). The largest id comes from the
    ``PREFIX.tokens.json`` maskllm-preprocess writes, or, for a dataset made elsewhere, from one pass over
    the ``.bin``."""
    import json

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    problem = _index_problem(Path(f"{prefix}.idx"))
    if problem:  # megatron's reader would assert, or read past the end of the file
        raise DataConfigError(f"dataset {prefix}: {prefix}.idx cannot be read ({problem}): re-run maskllm-preprocess")
    index = IndexedDataset(prefix).index
    if len(index.sequence_lengths):
        expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    else:
        expected = 0
    actual = Path(f"{prefix}.bin").stat().st_size
    if actual < expected:
        raise DataConfigError(f"dataset {prefix}: {prefix}.bin has {actual:,} bytes but its .idx describes {expected:,}: "
                              "the .bin is truncated (a copy or a write that did not finish); re-run maskllm-preprocess")
    largest = None
    record = Path(f"{prefix}.tokens.json")
    if record.is_file():
        try:
            rec = json.loads(record.read_text())
            if rec.get("idx_digest") == file_digest(f"{prefix}.idx"):
                largest = rec.get("max_token_id")
        except ValueError:
            pass  # a damaged record: read the tokens themselves
    if largest is None and expected:
        tokens = np.memmap(f"{prefix}.bin", dtype=index.dtype, mode="r", shape=(expected // index.dtype_size,))
        largest = int(tokens.max())
        del tokens
    if largest is not None and largest >= vocab_size:
        raise DataConfigError(f"dataset {prefix} holds token id {largest}, beyond the model's vocabulary of {vocab_size}: "
                              "it was tokenised with another tokenizer; preprocess it with the model's own "
                              "(its checkpoint's tokenizer/)")


def _index_problem(path: Path) -> str | None:
    """What is wrong with an indexed dataset's ``.idx`` (megatron's ``MMIDIDX`` format, version 1), or None:
    its header, and a size that holds every sequence length, pointer and document index it announces."""
    import struct

    data = path.read_bytes()[:34]
    if len(data) < 34 or data[:9] != b"MMIDIDX\x00\x00":
        return "not megatron's MMIDIDX index, or cut short in its header"
    version, _, sequences, documents = struct.unpack("<QBQQ", data[9:34])
    if version != 1:
        return f"index version {version}, this reader knows 1"
    need = 34 + sequences * (4 + 8) + documents * 8
    size = path.stat().st_size
    if size < need:
        return f"{size:,} bytes where its {sequences:,} sequences and {documents:,} documents need {need:,}: truncated"
    return None


def split_token_count(config: DataConfig, split: int = 0) -> int:
    """Tokens in the documents of one split (0 train, 1 validation, 2 test) over every prefix: what the
    split holds before megatron repeats it in further epochs."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(config.split))[split]
    total = 0
    for prefix in config.prefixes:
        index = IndexedDataset(prefix)  # keep it alive: sequence_lengths views its memory map
        lengths = index.sequence_lengths
        beg, end = (int(round(b * len(lengths))) for b in bounds)  # megatron's own rounding
        total += int(lengths[beg:end].sum())
    return total


def _check_documents(config: DataConfig, split_matrix: list[tuple[float, float] | None]) -> None:
    """Every built split of every prefix must hold tokens (megatron loops forever on an empty one)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in config.prefixes:
        index = IndexedDataset(prefix)  # keep it alive: sequence_lengths views its memory map
        lengths = index.sequence_lengths
        for name, bounds in zip(("train", "valid", "test"), split_matrix):
            if bounds is None:
                continue
            beg, end = (int(round(b * len(lengths))) for b in bounds)  # megatron's own rounding
            if int(lengths[beg:end].sum()) == 0:
                raise DataConfigError(f"dataset {prefix}: the {name} part of split {config.split!r} holds no "
                                      f"tokens ({len(lengths)} documents in all); use more data or another split")


@dataclass(frozen=True)
class DataParallelSampler:
    """Index lists of one rank's micro-batches, from ``consumed_samples`` (global) to the end.

    Only whole steps of ``micro_batch_size * dp_size`` samples are used.
    """

    num_samples: int
    micro_batch_size: int
    dp_rank: int = 0
    dp_size: int = 1
    consumed_samples: int = 0

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.dp_size < 1:
            raise ValueError(f"micro_batch_size and dp_size must be >= 1, got {self.micro_batch_size}, {self.dp_size}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} is not in [0, {self.dp_size})")
        if self.consumed_samples % self.step or not 0 <= self.consumed_samples <= self.num_samples:
            raise ValueError(f"consumed_samples {self.consumed_samples} must be a multiple of micro_batch_size * "
                             f"dp_size = {self.step} within the dataset's {self.num_samples} samples")

    @property
    def step(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return (self.num_samples - self.consumed_samples) // self.step

    def __iter__(self) -> Iterator[list[int]]:
        first = self.dp_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.consumed_samples + len(self) * self.step, self.step):
            yield list(range(start + first, start + first + self.micro_batch_size))


def micro_batches(dataset: Any, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                  consumed_samples: int = 0, num_workers: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches from global sample ``consumed_samples`` on.

    Each batch is megatron's GPTDataset sample stacked: ``tokens``, ``labels`` [b, s] int64,
    ``loss_mask`` [b, s] float, ``position_ids`` [b, s] int64, ``attention_mask`` [b, 1, s, s] bool
    (only with ``create_attention_mask``) and ``dataset_id`` [b] (which prefix, for blends only).
    """
    sampler = DataParallelSampler(len(dataset), micro_batch_size, dp_rank, dp_size, consumed_samples)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         persistent_workers=num_workers > 0)
    return iter(loader)


def first_samples(dataset: Any, num_samples: int, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The first ``num_samples`` samples of ``dataset`` as micro-batches (the last one cut short when
    ``num_samples`` is not a multiple of ``micro_batch_size``): what one-shot priors and reconstruction
    calibrate on."""
    if num_samples < 1:
        raise DataConfigError(f"calibration samples: need at least 1, got {num_samples}")
    if len(dataset) < num_samples:
        raise DataConfigError(f"calibration asks for {num_samples} samples but the data holds {len(dataset)}: "
                              "lower the sample count or give more text")
    batches = list(itertools.islice(micro_batches(dataset, micro_batch_size), -(-num_samples // micro_batch_size)))
    if num_samples % micro_batch_size:
        batches[-1] = {k: v[: num_samples % micro_batch_size] for k, v in batches[-1].items()}
    return batches


def text_windows(ids: Sequence[int], seq_length: int, num_samples: int, micro_batch_size: int) -> list[torch.Tensor]:
    """The first ``num_samples`` non-overlapping ``seq_length``-token windows of a token stream, as
    ``tokens`` micro-batches [b, seq_length] (calibration on plain text)."""
    if num_samples < 1 or seq_length < 1:
        raise DataConfigError(f"calibration windows: need samples >= 1 and a sequence length >= 1, got "
                              f"{num_samples} and {seq_length}")
    need = num_samples * seq_length
    if len(ids) < need:
        raise DataConfigError(f"the calibration text has {len(ids):,} tokens, fewer than {num_samples} samples x "
                              f"{seq_length} tokens = {need:,}: give more text or fewer samples")
    tokens = torch.as_tensor(list(ids[:need]), dtype=torch.long).reshape(num_samples, seq_length)
    return list(tokens.split(micro_batch_size))
