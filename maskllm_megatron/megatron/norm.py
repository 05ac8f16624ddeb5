"""The norm of our local layer spec: torch's LayerNorm / RMSNorm, accepting sequence parallelism.

megatron-core's ``WrappedTorchNorm`` (the local spec's norm without apex / Transformer Engine) asserts
``not config.sequence_parallel``. A norm acts on each token alone, so it runs unchanged on a sequence
shard: what sequence parallelism needs from it is only that a *trained* norm's gradient, which each
tensor-parallel rank now computes from its own tokens, is summed over the TP group. megatron does that
in ``finalize_model_grads`` for every parameter that carries ``sequence_parallel = True`` (as apex's
and Transformer Engine's norms set it). ``TorchNorm`` sets that attribute on its weight (and bias);
a frozen norm (mask-only training) has no gradient and needs nothing.

Nemotron's LayerNorm1p (``norm(x) * (1 + w) + b``) is a plain LayerNorm here: the converter stores
``w + 1`` (see ``model_builder``), so ``zero_centered_gamma`` is refused like ``WrappedTorchNorm`` does.
"""
from __future__ import annotations

import torch


class TorchNorm:
    """Builds ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` (``config.normalization``), with megatron's
    ``sequence_parallel`` attribute on its parameters. Same arguments as megatron's norms."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("zero-centred gamma (LayerNorm1p) is not built in: convert the checkpoint with "
                             "maskllm-convert, which stores w + 1 in a plain LayerNorm")
        if config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("persist_layer_norm / memory_efficient_layer_norm need apex: switch them off")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r}: use LayerNorm or RMSNorm")
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm
