#!/usr/bin/env python
"""Hugging Face <-> megatron-core checkpoint conversion (same as the ``maskllm-convert`` command).

  python tools/convert_checkpoint.py hf-to-mcore --hf HF_DIR --out CKPT_DIR --tp 2 [--pp 1] [--dtype bf16]
  python tools/convert_checkpoint.py mcore-to-hf --ckpt CKPT_DIR --out HF_DIR

See ``maskllm_megatron/convert/cli.py`` for how ranks are launched.
"""
import sys

from maskllm_megatron.convert.cli import main

if __name__ == "__main__":  # required: saving a dist checkpoint starts a spawn-context process
    sys.exit(main())
