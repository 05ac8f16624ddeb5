"""maskllm-megatron: learnable N:M semi-structured sparsity (MaskLLM) as a megatron-core plugin.

The one entry point for converting a model; it returns the controller that trains it
(``megatron.sparsify.MaskController``: the per-micro-batch step, mask modes, optimizer groups)::

    from maskllm_megatron import sparsify, SparsifyConfig, MaskConfig
    masks = sparsify(gpt_model, SparsifyConfig(mask=MaskConfig(nm="2:4", total_steps=2000)))
    ...  # optimizer with config_overrides=masks.optimizer_overrides(lr); masks.step(it, mb) per micro-batch

The names load on first use, so importing the package imports neither megatron-core nor torch. Its one
global effect: on a machine without CUDA, megatron-core's ``jit_fuser`` stays eager (``launch.
eager_megatron_jit_on_cpu``: no inductor C++ compile, 2.2 s less import per process); warning filters
and everything else are left alone.
"""
from importlib import import_module

from .launch import eager_megatron_jit_on_cpu

eager_megatron_jit_on_cpu()

_EXPORTS = {
    "sparsify": "maskllm_megatron.megatron.sparsify",
    "MaskController": "maskllm_megatron.megatron.sparsify",
    "SparsifyConfig": "maskllm_megatron.megatron.configs",
    "masked_layers": "maskllm_megatron.megatron.sparsify",
    "MaskMode": "maskllm_megatron.megatron.layers",
    "MaskConfig": "maskllm_megatron.masks",
    "PriorConfig": "maskllm_megatron.megatron.configs",
    "compute_priors": "maskllm_megatron.megatron.priors",
    "ReconstructConfig": "maskllm_megatron.megatron.configs",
    "reconstruct_weights": "maskllm_megatron.megatron.reconstruct",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'maskllm_megatron' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
