"""Hugging Face <-> megatron-core checkpoint conversion.

- ``mapping``: per-architecture tensor names and layouts (LLaMA, Qwen2, GPT-2, Nemotron), written once;
- ``io``: streaming safetensors reading/writing, atomic output folders;
- ``hf_to_mcore`` / ``mcore_to_hf``: the two directions; ``checkpoint``: the checkpoint folder layout,
  process-group set-up and ``load_mcore_model``; ``cli``: the ``maskllm-convert`` command.
"""
