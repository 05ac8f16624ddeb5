"""Data pipeline of the mask-learning driver: tokenizers, text -> indexed datasets
(``maskllm_megatron.data.preprocess``, the ``maskllm-preprocess`` command; not imported here, so that
``python -m`` runs it cleanly), and megatron-core GPT datasets (weighted blends, train/valid/test
split) with resumable data-parallel micro-batches."""
from maskllm_megatron.data.datasets import (DataConfig, DataConfigError, DataParallelSampler, DatasetSplits,
                                            build_datasets, micro_batches, parse_blend)
from maskllm_megatron.data.tokenizer import TextTokenizer, TokenizerError, load_tokenizer

__all__ = [
    "DataConfig", "DataConfigError", "DataParallelSampler", "DatasetSplits", "build_datasets", "micro_batches",
    "parse_blend", "TextTokenizer", "TokenizerError", "load_tokenizer",
]
