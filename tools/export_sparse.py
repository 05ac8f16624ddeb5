#!/usr/bin/env python
"""Export a mask-learning checkpoint as a sparse model (same as the ``maskllm-export`` command).

  python tools/export_sparse.py --ckpt RUN/checkpoints/iter_0000200 --out OUT --format {mcore,hf,compressed-tensors,masks} [--tp N] [--use-prior]
  python tools/export_sparse.py apply-masks --hf HF_DIR --masks MASK_FILE --out OUT

See ``maskllm_megatron/export/cli.py`` for how ranks are launched.
"""
import sys

from maskllm_megatron.export.cli import main

if __name__ == "__main__":  # required: saving a dist checkpoint starts a spawn-context process
    sys.exit(main())
