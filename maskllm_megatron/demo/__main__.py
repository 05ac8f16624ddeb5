"""``python -m maskllm_megatron.demo``."""
import sys

from .cli import main

sys.exit(main())
