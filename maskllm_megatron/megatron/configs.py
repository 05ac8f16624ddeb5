"""The library's configuration objects for the Megatron glue: which linears are masked and what trains
(``SparsifyConfig``), how one-shot priors are computed (``PriorConfig``) and how kept weights are refitted
under fixed masks (``ReconstructConfig``); the mask sampler's own settings are ``masks.MaskConfig``. Each
default and each check lives here once: the driver's config sections (``run_config.py``) and the
export's options take their defaults from these and build them to validate.

No megatron-core import: a CLI can read and check a configuration without loading megatron.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Optional

from ..masks import MaskConfig
from ..prune.methods import METHODS, RECONSTRUCTIONS

#: The four linears of every transformer block (and every expert's fc1/fc2); the LM head and embeddings stay dense.
DEFAULT_TARGETS = ("*.linear_qkv", "*.linear_proj", "*.linear_fc1", "*.linear_fc2")


@dataclass(frozen=True)
class SparsifyConfig:
    """Which linears to mask, what trains, and the kernel that samples the masks.

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
    # the sampling kernels (all compute the same function): True fused (one-pass C++ / Triton, else
    # torch.compile'd), False eager, None the fastest that runs here (``masks.sampling.masked_weight``)
    fused_kernel: Optional[bool] = None

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


#: what ``ReconstructConfig.target`` fits each layer to, and how (``method``)
RECONSTRUCT_TARGETS = ("layer", "dense")
RECONSTRUCT_METHODS = (*RECONSTRUCTIONS, "block")


@dataclass(frozen=True)
class ReconstructConfig:
    """How the kept weights are refitted: ``method`` lstsq (exact, one Cholesky solve per row) or obs
    (SparseGPT's sweep, ~20x cheaper, less exact); ``target`` what each layer is fitted to: ``layer``, the
    dense layer's output on this model's inputs (SparseGPT's objective), or ``dense``, the dense MODEL's
    output at that layer (its inputs come from the dense model, so the fit also undoes the error of the
    layers before; lstsq only); ``true_sequential`` solves a block's linears one by one, each on the
    inputs the ones before it give once solved; ``percdamp`` SparseGPT's dampening of the Hessian;
    ``blocksize`` the OBS sweep's column block."""

    method: str = "lstsq"
    percdamp: float = 0.01
    blocksize: int = 128
    target: str = "layer"
    true_sequential: bool = False
    sequential: bool = True  # each block calibrates on the outputs of the reconstructed blocks before it
    epochs: int = 2  # block: passes over the calibration batches per block
    lr: float = 1e-4  # block: Adam's learning rate (cosine to a tenth over the block's steps)

    def __post_init__(self):
        if self.method not in RECONSTRUCT_METHODS:
            raise ValueError(f"unknown reconstruction method {self.method!r}: use one of {', '.join(RECONSTRUCT_METHODS)}")
        if self.target not in RECONSTRUCT_TARGETS:
            raise ValueError(f"unknown reconstruction target {self.target!r}: use one of {', '.join(RECONSTRUCT_TARGETS)}")
        if self.target == "dense" and self.method == "obs":
            raise ValueError("target dense needs method lstsq or block (the OBS sweep fits the layer's own output)")
        if self.method == "block" and self.true_sequential:
            raise ValueError("true_sequential solves linears one by one; method block fits a block's linears together")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp {self.percdamp} must be >= 0 (SparseGPT's default: 0.01)")
        if self.blocksize < 1:
            raise ValueError(f"blocksize {self.blocksize} must be positive (SparseGPT's default: 128)")
        if self.epochs < 1:
            raise ValueError(f"epochs {self.epochs} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr {self.lr} must be positive (e.g. 1e-4)")

    def to_dict(self) -> dict:
        d = {"method": self.method, "percdamp": self.percdamp, "blocksize": self.blocksize,
             "target": self.target, "true_sequential": self.true_sequential, "sequential": self.sequential}
        if self.method == "block":
            d.update(epochs=self.epochs, lr=self.lr)
        return d
