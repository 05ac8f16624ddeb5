"""The library's configuration objects for the Megatron glue: which linears are masked and what trains
(``SparsifyConfig``), and how one-shot priors are computed (``PriorConfig``). The mask sampler's own
settings are ``masks.MaskConfig``. Each default and each check lives here once; the driver's config
sections (``train/config.py``) take their defaults from these and build them to validate.

No megatron-core import: a CLI can read and check a configuration without loading megatron.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ..masks import MaskConfig
from ..prune.methods import METHODS

#: The four linears of every transformer block (and every expert's fc1/fc2); the LM head and embeddings stay dense.
DEFAULT_TARGETS = ("*.linear_qkv", "*.linear_proj", "*.linear_fc1", "*.linear_fc2")


@dataclass(frozen=True)
class SparsifyConfig:
    """Which linears to mask and what trains.

    ``include`` / ``exclude`` are shell-style patterns on module names with GLOBAL layer numbers
    (``decoder.layers.3.mlp.linear_fc1`` is the fourth block on whichever pipeline stage holds it) and
    GLOBAL expert indices (``decoder.layers.0.mlp.experts.local_experts.5.linear_fc2`` is expert 5 on whichever
    expert-parallel rank holds it); e.g. ``include=("*.mlp.*",)`` sparsifies the MLP only,
    ``exclude=("*.self_attention.*",)`` likewise, ``exclude=("*.shared_experts.*",)`` keeps a shared expert dense.
    """

    mask: MaskConfig = field(default_factory=MaskConfig)
    include: tuple[str, ...] = DEFAULT_TARGETS
    exclude: tuple[str, ...] = ()
    # joint training: the masked layers' weights and biases and the norms train with the logits
    # (default: mask only; embeddings and the LM head stay frozen either way)
    train_weights: bool = False
    mask_lr_mult: float = 10.0  # the paper's x10 on the logits
    mask_weight_decay_mult: float = 1.0  # the logits get weight decay (0.1 in the paper's runs)

    def __post_init__(self):
        # each message starts with the field it refuses (the driver's config prefixes its section)
        if not self.include:
            raise ValueError("include is empty: name at least one module pattern, e.g. '*.linear_fc1'")
        if not self.mask_lr_mult > 0:
            raise ValueError(f"mask_lr_mult {self.mask_lr_mult} must be > 0")

    def selects(self, name: str) -> bool:
        return (any(fnmatch.fnmatchcase(name, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude))


@dataclass(frozen=True)
class PriorConfig:
    """How to compute one-shot priors (``megatron.priors.compute_priors``)."""

    method: str = "sparsegpt"  # one of prune.methods.METHODS
    update_weights: bool = False  # SparseGPT's OBS weight update (MaskLLM's prior uses the mask only)
    blocksize: int = 128  # SparseGPT's column block
    percdamp: float = 0.01  # SparseGPT's dampening: this fraction of the Hessian's mean diagonal
    sequential: bool = True  # feed each block the outputs of the already-pruned blocks before it

    def __post_init__(self):
        # each message starts with the field it refuses (the driver's config prefixes its section)
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not a one-shot method: use one of {', '.join(METHODS)}")
        if self.update_weights and self.method != "sparsegpt":
            raise ValueError(f"update_weights is SparseGPT's OBS weight update: use it with method sparsegpt, "
                             f"not {self.method}")
        if self.blocksize < 1:  # (a multiple of the N:M pattern's M, which the layers know: sparsegpt_prune checks)
            raise ValueError(f"blocksize {self.blocksize} must be >= 1 (SparseGPT's: 128)")
        if self.percdamp < 0:
            raise ValueError(f"percdamp {self.percdamp} must be >= 0 (SparseGPT's: 0.01)")
