#!/usr/bin/env python
"""Plot a mask-learning run (same as the ``maskllm-plot`` command).

  python tools/plot_training.py RUN_DIR [--out training.png] [--title TITLE]

Reads RUN_DIR/metrics.jsonl; see ``maskllm_megatron/train/plot.py`` for the panels.
"""
import sys

from maskllm_megatron.train.plot import main

if __name__ == "__main__":
    sys.exit(main())
