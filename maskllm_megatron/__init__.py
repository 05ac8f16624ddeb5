"""maskllm-megatron: learnable N:M semi-structured sparsity (MaskLLM) as a megatron-core plugin."""
import warnings as _warnings

import torch as _torch

if not _torch.cuda.is_available():
    # Without CUDA, megatron-core's import-time notes that Apex / Transformer Engine are missing (and
    # that it falls back to torch) are expected and say nothing: neither can run on a CPU. They came
    # before every tool's own output, a one-line error included. On a GPU machine they stay: there they
    # tell a user that the fast fused paths are off.
    _warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed",
                             category=UserWarning)
