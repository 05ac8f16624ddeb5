"""Masked tensor-parallel linear layers: megatron-core's Column/RowParallelLinear plus N:M mask logits.

Sharding (same axis as the weight):

==========================  ==================  =====================  =========================
layer                       weight (local)      mask_logits (local)    partition axis
==========================  ==================  =====================  =========================
MaskedColumnParallelLinear  [out / tp, in]      [out / tp, in/M, C]    0 (output rows)
MaskedRowParallelLinear     [out, in / tp]      [out, in/(M tp), C]    1 (input groups)
==========================  ==================  =====================  =========================

The forward keeps megatron's own machinery: the parent's ``forward`` runs unchanged (input copy /
all-reduce / sequence parallel / gather) and only the weight handed to the parent's linear function is
replaced by the sampled masked weight (training) or ``W * hard_mask`` (eval). Gradient accumulation
fusion is switched off for the masked weight only: it is a fresh tensor whose gradient flows by autograd
to the logits (and to ``W`` when trained jointly).

A routed expert's linears (megatron's ``SequentialMLP``) are sharded over the expert-tensor-parallel group
(their ``tp_group``) and live on one expert-parallel rank; ``SequentialMLP.sharded_state_dict`` adds the
global expert axis to every tensor its experts declare, logits included, so a checkpoint saved at EP=2 loads
at EP=1.

Noise and initial logits are drawn from counter-based streams at GLOBAL positions (see
``maskllm_megatron.masks.rng``), so TP=1 and TP=2 sample identical masks. For a gated MLP's fused
``linear_fc1`` ([gate; up] rows) set ``gated_halves=True``: the global row of a local row is then
looked up in the gate or the up half, and checkpoints re-lay the logits like megatron re-lays the weight.
"""
from __future__ import annotations

import enum
import itertools
from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_rank, get_pg_size

from ..masks import (MaskConfig, MaskStep, apply_prior, hard_mask, init_key, init_logits, mask_to_patterns, masked_weight,
                     noise_key)
from ..masks.patterns import NMSpec

_layer_counter = itertools.count()


class MaskMode(enum.Enum):
    """What a masked layer multiplies into its weight; the layer's ``mask_mode``, one at a time.

    ``LEARN`` (the default): in training a soft mask sampled from the logits, differentiable in them; in
    evaluation the argmax (hard) mask. ``PRIOR``: the stored prior mask, in training and evaluation (a
    one-shot mask's evaluation, the calibration of the blocks after a solved one, an export). ``FIXED``
    (a refit, ``fix_mask``): the fixed mask, differentiable in the weight only. ``DENSE``: no mask, the
    weight itself (the teacher's forward, ``sparsify.dense_forward``, which puts back the original weights
    where they train)."""

    LEARN = "learn"
    PRIOR = "prior"
    FIXED = "fixed"
    DENSE = "dense"


class _MaskedLinearMixin:
    """Shared logic of the two masked layers. ``partition_dim`` is the weight's TP axis."""

    partition_dim: int

    def _init_mask(self, mask_config: MaskConfig, layer_id: Optional[str], gated_halves: bool) -> None:
        if not isinstance(mask_config, MaskConfig):
            raise TypeError(f"mask_config must be a MaskConfig, got {type(mask_config).__name__}")
        self.mask_config = mask_config
        self.mask_layer_id = layer_id if layer_id is not None else f"masked_linear_{next(_layer_counter)}"
        self.gated_halves = gated_halves
        self.mask_step = MaskStep(seed=mask_config.seed)
        self.mask_mode = MaskMode.LEARN
        self.fused_mask_kernel = None  # auto: the fastest kernel that runs here (masks.sampling.masked_weight)
        self._eval_mask_cache = None
        spec = mask_config.nm
        rows, cols = self.weight.shape
        if cols % spec.m:
            tp = get_pg_size(self.tp_group)
            raise ValueError(
                f"{type(self).__name__} {self.mask_layer_id}: local input size {cols} (tensor-parallel size "
                f"{tp}) is not a multiple of M={spec.m} for {spec} sparsity: choose a TP size that keeps "
                f"in_features / TP divisible by {spec.m}, or leave this layer dense")
        if gated_halves and rows % 2:
            raise ValueError(f"{self.mask_layer_id}: gated_halves needs an even number of local rows, got {rows}")
        with torch.no_grad():
            logits = init_logits(init_key(mask_config.seed, self.mask_layer_id), self.global_row_ids(),
                                 self.global_group_ids(), spec, mask_config.init_std)
        # In the model's parameter dtype, like every other parameter: in a bf16 model the logits are bf16
        # and megatron's optimizer keeps their fp32 master copy, which the distributed optimizer shards
        # over data-parallel ranks (the memory layout measured in benchmarks/RESULTS.md).
        self.mask_logits = torch.nn.Parameter(logits.to(self.weight.device, self.config.params_dtype))
        set_tensor_model_parallel_attributes(self.mask_logits, True, self.partition_dim, 1)
        # A routed expert's weight under expert parallelism is not all-reduced over the whole data-parallel group
        # (other EP ranks hold other experts) but over the expert-data-parallel one: megatron's DDP and optimizer
        # read this attribute, so the logits follow their weight.
        if hasattr(self.weight, "allreduce"):
            self.mask_logits.allreduce = self.weight.allreduce
        # the global positions that key the noise, kept on the logits' device (no copy per forward)
        self.register_buffer("noise_row_ids", self.global_row_ids().to(self.weight.device), persistent=False)
        self.register_buffer("noise_group_ids", self.global_group_ids().to(self.weight.device), persistent=False)
        self.register_buffer("prior_mask", None, persistent=True)
        self.freeze_weight(True)  # mask-only; what else trains is sparsify's (train_weights) or a refit's

    # -- layout -------------------------------------------------------------------------------
    @property
    def nm(self) -> NMSpec:
        return self.mask_config.nm

    def _tp(self) -> tuple[int, int]:
        return get_pg_rank(self.tp_group), get_pg_size(self.tp_group)

    def global_row_ids(self) -> torch.Tensor:
        """Global (unsharded, megatron TP=1 layout) output row of every local row."""
        return self._global_rows_of(*self._tp())

    def _global_rows_of(self, rank: int, size: int) -> torch.Tensor:
        rows = self.weight.shape[0]
        local = torch.arange(rows)
        if self.partition_dim != 0 or size == 1:
            return local
        if not self.gated_halves:
            return rank * rows + local
        half = rows // 2  # local rows are [gate_rank; up_rank]; globally [gate_all; up_all]
        in_up = local >= half
        return torch.where(in_up, half * size + rank * half + (local - half), rank * half + local)

    def global_group_ids(self) -> torch.Tensor:
        """Global group index (along the input dimension) of every local group."""
        rank, size = self._tp()
        groups = self.weight.shape[1] // self.nm.m
        local = torch.arange(groups)
        return rank * groups + local if self.partition_dim == 1 else local

    def gather_global(self, local: torch.Tensor) -> torch.Tensor:
        """All-gather a per-shard tensor laid out like the weight (weight, mask, logits) into the
        global TP=1 layout (gated ``linear_fc1`` rows put back as [gate_all; up_all])."""
        rank, size = self._tp()
        if size == 1:
            return local.clone()
        parts = [torch.empty_like(local) for _ in range(size)]
        torch.distributed.all_gather(parts, local.contiguous(), group=self.tp_group)
        full = torch.cat(parts, self.partition_dim)
        if self.gated_halves:
            ids = torch.cat([self._global_rows_of(r, size) for r in range(size)])
            out = torch.empty_like(full)
            out[ids] = full
            full = out
        return full

    # -- masks --------------------------------------------------------------------------------
    def freeze_weight(self, frozen: bool = True) -> None:
        """Mask-only training (frozen) or joint training of weight and mask."""
        self.weight.requires_grad_(not frozen)

    def set_mask_step(self, step: MaskStep) -> None:
        """Sampling state for the next forward: iteration, micro-batch, schedules."""
        self.mask_step = step

    def hard_mask(self) -> torch.Tensor:
        """{0,1} mask of the local weight shard: the argmax pattern of every group."""
        return hard_mask(self.mask_logits.detach(), self.nm, dtype=self.weight.dtype)

    def sampled_weight(self) -> torch.Tensor:
        """``W * mask`` sampled for the current ``mask_step`` (differentiable w.r.t. the logits)."""
        s = self.mask_step
        key = noise_key(s.seed, self.mask_layer_id, s.iteration, s.microbatch)
        return masked_weight(self.weight, self.mask_logits, key, self.noise_row_ids, self.noise_group_ids,
                             self.nm, s.temperature, s.scale, hard=s.hard, regularizer=s.regularizer,
                             fused=self.fused_mask_kernel)

    def set_mask_mode(self, mode: MaskMode) -> None:
        """Switch what the forward multiplies into the weight (see ``MaskMode``); ``PRIOR`` needs a stored
        prior mask. ``FIXED`` is entered by ``fix_mask``, which also changes what learns."""
        mode = MaskMode(mode)
        if mode is MaskMode.PRIOR and self.prior_mask is None:
            raise RuntimeError(f"{self.mask_layer_id}: no prior mask is stored (set_prior) to forward with")
        self.mask_mode = mode

    def eval_weight(self) -> torch.Tensor:
        """``W * eval_mask()``, cached until the logits, the prior or the weight change: in-place writes (a
        checkpoint load) bump the version in the stamp, and a training forward drops the cache, because
        megatron's optimizer writes the updated logits through its parameter buffer, which leaves
        ``mask_logits._version`` as it was."""
        prior = self.mask_mode is MaskMode.PRIOR
        source = self._stored_prior() if prior else self.mask_logits
        stamp = (prior, source._version, source.data_ptr(), self.weight._version, self.weight.data_ptr())
        if self._eval_mask_cache is None or self._eval_mask_cache[0] != stamp:
            with torch.no_grad():
                self._eval_mask_cache = (stamp, self.weight * self.eval_mask())
        return self._eval_mask_cache[1]

    def eval_mask(self) -> torch.Tensor:
        """The {0,1} mask an evaluation forward applies (local shard, the weight's dtype): the prior mask in
        the ``PRIOR`` mode, else the argmax of the logits (in a refit: the fixed mask)."""
        if self.mask_mode is MaskMode.PRIOR:
            return self._stored_prior().to(self.weight.dtype)
        return self.hard_mask()

    def _stored_prior(self) -> torch.Tensor:
        if self.prior_mask is None:
            raise RuntimeError(f"{self.mask_layer_id}: mask mode {self.mask_mode.value} needs a prior mask and none "
                               "is stored (set_prior, or a checkpoint that holds one)")
        return self.prior_mask

    def fix_mask(self) -> None:
        """Refit: fix the mask to the prior mask (``set_prior``: a one-shot mask, or another run's learned
        one), and train the kept weights instead of the logits (the ``FIXED`` mode).

        The logits become the one-hot of each group's prior pattern, so their argmax, which every tool
        reading a checkpoint takes as the mask (the export included), is the prior exactly; they stop
        learning. The weight learns through ``W * mask``: pruned weights get no gradient. A teacher for
        distillation is a copy of the dense weight (``MaskController.keep_teacher_copy``).

        On a resume no prior is stored yet: call this on the dense model before the optimizer is built, and
        the refit checkpoint loaded afterwards brings the prior mask, the one-hot logits and the refit
        weights."""
        if self.prior_mask is not None:
            with torch.no_grad():
                patterns = mask_to_patterns(self.prior_mask, self.nm)
                self.mask_logits.copy_(torch.nn.functional.one_hot(patterns, self.mask_logits.shape[-1]))
        self.mask_logits.requires_grad_(False)
        self.freeze_weight(False)
        self.mask_mode = MaskMode.FIXED

    def _forward_impl(self, input, weight, *args, **kwargs):
        mode = self.mask_mode
        if weight is self.weight and mode is not MaskMode.DENSE:
            if self.training:
                self._eval_mask_cache = None  # the step after this forward changes the logits (or the weight)
            if self.training and mode is MaskMode.LEARN:
                weight = self.sampled_weight()
            elif self.training and mode is MaskMode.FIXED:  # the prior mask is the logits' argmax: no argmax here
                weight = self.weight * self._stored_prior().to(self.weight.dtype)
            else:
                weight = self.eval_weight()
            kwargs["gradient_accumulation_fusion"] = False
        return super()._forward_impl(input, weight, *args, **kwargs)

    @torch.no_grad()
    def set_prior(self, prior_mask: torch.Tensor, strength: Optional[float] = None) -> None:
        """Store a {0,1} prior mask of the local shard and shift the logits towards it.

        ``std(logits)`` is taken over the whole layer (all TP shards), so the result does not depend
        on the layout. ``strength`` defaults to the config's ``prior_strength``.
        """
        if tuple(prior_mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"{self.mask_layer_id}: prior mask shape {tuple(prior_mask.shape)} does not match "
                             f"the local weight shard {tuple(self.weight.shape)}")
        strength = self.mask_config.prior_strength if strength is None else strength
        std = self.global_logits_std()
        self.mask_logits.copy_(apply_prior(self.mask_logits, prior_mask, self.nm, strength, std=std))
        self.prior_mask = prior_mask.to(torch.bool)

    def global_logits_std(self) -> float:
        """Standard deviation of the logits over the whole (unsharded) layer."""
        x = self.mask_logits.detach().double()
        stats = torch.stack([x.sum(), (x * x).sum(), x.new_tensor(float(x.numel()))])  # on x's device (NCCL)
        if self._tp()[1] > 1:
            torch.distributed.all_reduce(stats, group=self.tp_group)
        total, total_sq, n = stats.tolist()
        return float(((total_sq - total * total / n) / (n - 1)) ** 0.5)

    # -- checkpointing ------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A plain ``load_state_dict`` of a state dict that carries a prior mask into a layer that has none
        yet (a freshly sparsified model): make room for it, as the sharded checkpoint load does."""
        key = prefix + "prior_mask"
        if self.prior_mask is None and key in state_dict:
            self.prior_mask = torch.zeros(state_dict[key].shape, dtype=torch.bool, device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The parent's layout plus ``mask_logits`` / ``prior_mask`` sharded on the weight's axis."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        own = {"mask_logits": self.mask_logits}
        if self.prior_mask is not None:
            own["prior_mask"] = self.prior_mask
        own_sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, {k: self.partition_dim for k in own}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if self.gated_halves:
            singleton = (metadata or {}).get("singleton_local_shards", False)
            own_sharded = {k: apply_swiglu_sharded_factory(v, sharded_offsets, singleton)
                           for k, v in own_sharded.items()}
        sharded.update(own_sharded)
        return sharded


class MaskedColumnParallelLinear(_MaskedLinearMixin, ColumnParallelLinear):
    """``ColumnParallelLinear`` whose weight is multiplied by a learned N:M mask.

    Takes ColumnParallelLinear's arguments plus ``mask_config`` (and optionally ``mask_layer_id``, the
    stable name that keys its random streams, and ``gated_halves`` for a fused SwiGLU ``linear_fc1``).
    """

    partition_dim = 0

    def __init__(self, input_size, output_size, *, mask_config: MaskConfig, mask_layer_id: Optional[str] = None,
                 gated_halves: bool = False, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        if self.weight is None:
            raise ValueError("MaskedColumnParallelLinear needs its own weight (skip_weight_param_allocation=False)")
        self._init_mask(mask_config, mask_layer_id, gated_halves)


class MaskedRowParallelLinear(_MaskedLinearMixin, RowParallelLinear):
    """``RowParallelLinear`` whose weight is multiplied by a learned N:M mask.

    Groups of M run along the input dimension, which this layer shards: each rank's local input size
    must be a multiple of M.
    """

    partition_dim = 1

    def __init__(self, input_size, output_size, *, mask_config: MaskConfig, mask_layer_id: Optional[str] = None,
                 **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self._init_mask(mask_config, mask_layer_id, gated_halves=False)
