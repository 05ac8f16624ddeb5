#!/usr/bin/env python
"""JSONL / text -> megatron-core indexed dataset (same as the ``maskllm-preprocess`` command).

  python tools/preprocess_data.py --input corpus.jsonl --tokenizer TOKENIZER --output-prefix data/corpus

See ``maskllm_megatron/data/preprocess.py`` for the options, resuming and the output layout.
"""
import sys

from maskllm_megatron.data.preprocess import main

if __name__ == "__main__":  # required: --workers starts a process pool
    sys.exit(main())
