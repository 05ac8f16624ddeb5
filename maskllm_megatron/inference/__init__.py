"""Inference with N:M sparse weights: compressed linears that run faster than the zero-filled dense ones.

Pure torch and a small C++ CPU kernel; megatron-core is not imported. ``compress(model)`` swaps the N:M
linears of a Hugging Face model loaded from our ``hf`` export; ``maskllm-generate`` measures it.
"""
from .compress import CompressReport, compress, sparsity_record
from .linear import CompressedNMLinear, CompressError

__all__ = ["CompressError", "CompressReport", "CompressedNMLinear", "compress", "sparsity_record"]
