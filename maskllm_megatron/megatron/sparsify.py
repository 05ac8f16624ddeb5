"""``sparsify(model, config)``: turn a built megatron-core GPTModel into a mask-learning model.

Every selected Column/RowParallelLinear becomes its masked subclass IN PLACE (the module's class is
swapped and mask logits are added; weights, biases, hooks and sharding stay as they are, so nothing is
re-allocated). By default the four linears of every transformer block are masked (``linear_qkv``,
``linear_proj``, ``linear_fc1``, ``linear_fc2``); the LM head and embeddings stay dense. Then every
weight is frozen (mask-only training) unless ``train_weights`` is set (joint training: the masked
layers' weights and biases and the norms train too).

Each masked layer is keyed by a layout-independent name (``layers.<global index>.<path>``, with the GLOBAL
expert index for a routed expert: ``layers.0.mlp.experts.local_experts.<e>.linear_fc1``) that seeds its random
streams, so pipeline, tensor and expert-parallel layouts do not change what is sampled. In a mixture-of-experts
model the default patterns mask every expert's and the shared expert's ``linear_fc1`` / ``linear_fc2``; the
router (not a parallel linear), embeddings and norms stay dense. ``*.experts.*`` addresses the routed experts,
``*.shared_experts.*`` the shared one, ``*.local_experts.3.*`` expert 3.

``sparsify`` returns a ``MaskController``, the one object a training loop talks to (as ModelOpt's users
build, sparsify, then train)::

    masks = sparsify(model, SparsifyConfig(mask=MaskConfig(total_steps=2000)))
    optimizer = get_megatron_optimizer(opt_config, [ddp], config_overrides=masks.optimizer_overrides(lr))
    for it in range(2000):
        for mb, batch in enumerate(micro_batches):
            masks.step(it, mb, grad_scale=1 / len(micro_batches))  # this micro-batch's Gumbel noise
            loss_of(ddp(batch)).backward()
        optimizer.step()
"""
from __future__ import annotations

import contextlib
import weakref
from functools import partial
from typing import Iterator, Optional

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from ..masks import MaskStep
from .configs import SparsifyConfig  # noqa: F401 (sparsify's config, importable from here too)
from .model_builder import global_module_names
from .layers import MaskedColumnParallelLinear, MaskedRowParallelLinear, MaskMode, _MaskedLinearMixin

NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm)  # what the layer spec's norms are (``norm.TorchNorm``)
def sparsify(model: torch.nn.Module, config: SparsifyConfig) -> "MaskController":
    """Mask the selected linears of ``model`` in place; freeze what does not train. Returns the
    ``MaskController`` that trains it (the masked modules' global names are its ``names``). Call once,
    before wrapping the model in DDP / building the optimizer. A refused conversion leaves the model as it
    was."""
    already = sum(1 for _ in masked_layers(model))
    if already:
        raise ValueError(f"the model is already sparsified ({already} masked layers): call sparsify once, on the "
                         "model as built")
    gated = bool(getattr(getattr(model, "config", None), "gated_linear_unit", False))
    full, relative = global_module_names(model)
    full_names = {id(module): full[local] for local, module in model.named_modules()}
    layer_ids = {id(module): relative[local] for local, module in model.named_modules()}
    converted = []  # (module, its class, its attributes) to put back if a later layer is refused
    try:
        for _, module in list(model.named_modules()):
            name = full_names[id(module)]
            if not config.selects(name):
                continue
            if isinstance(module, ColumnParallelLinear):
                masked_class = MaskedColumnParallelLinear
            elif isinstance(module, RowParallelLinear):
                masked_class = MaskedRowParallelLinear
            elif type(module).__name__.startswith("TE"):
                raise NotImplementedError(
                    f"{name} is a Transformer Engine layer ({type(module).__name__}); build the model with the "
                    "local spec (get_gpt_layer_local_spec) to sparsify it")
            else:
                continue
            if module.weight is None:
                raise ValueError(f"{name} has no weight of its own (an output layer tied to the embedding): "
                                 "exclude it, or untie the embeddings to mask the LM head")
            converted.append((module, type(module), dict(module.__dict__), dict(module._parameters),
                              dict(module._buffers), set(module._non_persistent_buffers_set),
                              module.weight.requires_grad))
            module.__class__ = masked_class
            module._init_mask(config.mask, layer_ids[id(module)],
                              gated_halves=gated and masked_class is MaskedColumnParallelLinear
                              and name.endswith("linear_fc1"))
    except BaseException:
        for module, cls, attrs, params, buffers, non_persistent, weight_trains in converted:
            module.__class__ = cls
            module.weight.requires_grad_(weight_trains)
            module.__dict__.clear()
            module.__dict__.update(attrs)
            module._parameters, module._buffers = params, buffers
            module._non_persistent_buffers_set = non_persistent
        raise
    if not converted and not _selects_an_expert_elsewhere(model, config, full_names):
        raise ValueError(f"sparsify matched no Column/RowParallelLinear with include={config.include} "
                         f"exclude={config.exclude}: check the module names (model.named_modules())")
    for param_name, param in model.named_parameters():
        param.requires_grad_(param_name.endswith("mask_logits"))
    if config.train_weights:
        for module in model.modules():
            if isinstance(module, _MaskedLinearMixin):
                module.freeze_weight(False)
                if module.bias is not None:
                    module.bias.requires_grad_(True)
            elif isinstance(module, NORMS):
                module.requires_grad_(True)
    return MaskController(model, config, [full_names[id(module)] for module, *_ in converted])


def _selects_an_expert_elsewhere(model: torch.nn.Module, config: SparsifyConfig, full_names: dict) -> bool:
    """Whether the patterns select a routed expert held by another expert-parallel rank (then this rank
    legitimately masks nothing, e.g. ``include=("*.local_experts.3.*",)`` on the rank holding experts 0, 1)."""
    from .model_builder import _LOCAL_EXPERT

    experts = getattr(getattr(model, "config", None), "num_moe_experts", None) or 0
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            name = full_names[id(module)]
            if _LOCAL_EXPERT.search(name) and any(
                    config.selects(_LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{e}", name)) for e in range(experts)):
                return True
    return False


def masked_layers(model: torch.nn.Module) -> Iterator[_MaskedLinearMixin]:
    for module in model.modules():
        if isinstance(module, _MaskedLinearMixin):
            yield module


@contextlib.contextmanager
def dense_forward(model: torch.nn.Module):
    """Inside the block ``model`` is the dense model: every masked layer forwards with its weight unmasked,
    and every parameter with a teacher copy (``keep_teacher_copy``: weights that train) forwards with that
    copy, the original. For the teacher's forward (under ``no_grad``) and a calibration's dense model."""
    layers = list(masked_layers(model))
    before = [layer.mask_mode for layer in layers]
    kept = [p for p in model.parameters() if getattr(p, "teacher_copy", None) is not None]
    for layer in layers:
        layer.set_mask_mode(MaskMode.DENSE)
    for p in kept:  # swap storage, not Parameters: the optimizer, DDP's buffers and hooks keep their objects
        p.data, p.teacher_copy = p.teacher_copy, p.data
    try:
        yield
    finally:
        for p in kept:
            p.data, p.teacher_copy = p.teacher_copy, p.data
        for layer, mode in zip(layers, before):
            layer.set_mask_mode(mode)


class MaskController:
    """What ``sparsify`` returns: it owns what a training loop needs of the masked layers.

    - the per-micro-batch sampling state: ``step`` before each micro-batch's forward. Under activation
      recomputation the model's output then carries that state into its backward (``_StepOnBackward``);
    - the mask modes: ``fix_masks`` (a refit), ``set_mode``, ``dense`` (the teacher's forward);
    - the optimizer's groups: ``optimizer_overrides`` for megatron's optimizer, ``logits_group`` to find them;
    - the teacher's copy of the weights that train (``keep_teacher_copy``);
    - the sampling kernel: ``config.fused_kernel``, changed by ``set_fused_kernel``.

    ``names`` are the masked modules' global names, ``layers`` the masked layers (this rank's)."""

    def __init__(self, model: torch.nn.Module, config: SparsifyConfig, names: list[str]):
        self.model, self.config, self.names = model, config, names
        self.layers = list(masked_layers(model))
        self.current: Optional[MaskStep] = None  # the state the last ``step`` handed out
        self.set_fused_kernel(config.fused_kernel)
        # held weakly: the model keeps no controller alive (no reference cycle keeps a deleted model's memory)
        model.register_forward_hook(partial(_forward_hook, weakref.WeakMethod(self._carry_step)))

    def step(self, iteration: int, microbatch: int = 0, grad_scale: float = 1.0) -> MaskStep:
        """Hand every masked layer the sampling state of the next micro-batch: ``microbatch`` numbers the
        micro-batches of the whole global batch (over data-parallel ranks, so the noise does not depend on
        the layout), ``grad_scale`` is what the loss is multiplied by before backward (``MaskConfig.step_state``)."""
        self.current = self.config.mask.step_state(iteration, microbatch, grad_scale)
        self._hand_out(self.current)
        return self.current

    def _hand_out(self, step: MaskStep) -> None:
        for layer in self.layers:
            layer.set_mask_step(step)

    def _carry_step(self, module, args, output):
        """The model's forward hook: with activation recomputation, a training output whose backward starts
        by handing out its micro-batch's state again. Recomputation re-runs a layer's forward inside the
        backward, and with pipeline parallelism the 1F1B schedule runs later micro-batches' forwards (which
        set their own states) before an earlier one's backward: without this the recomputed layers would
        sample another micro-batch's mask. A micro-batch's backward begins at its output."""
        recompute = getattr(getattr(module, "config", None), "recompute_granularity", None) is not None
        if not recompute or self.current is None or not torch.is_grad_enabled() or not torch.is_tensor(output):
            return None
        return _StepOnBackward.apply(output, self, self.current)

    def fix_masks(self) -> int:
        """Refit: every masked layer keeps its prior mask fixed and trains its kept weights instead of its
        logits (``fix_mask``). Call before the optimizer is built. Returns the number of layers."""
        for layer in self.layers:
            layer.fix_mask()
        return len(self.layers)

    def set_mode(self, mode: MaskMode) -> None:
        """Every masked layer forwards in ``mode`` (``MaskMode``; ``PRIOR``: the stored prior masks)."""
        for layer in self.layers:
            layer.set_mask_mode(mode)

    def dense(self):
        """A block in which the model is the dense model (``dense_forward``): the teacher's forward."""
        return dense_forward(self.model)

    @torch.no_grad()
    def masked_weights_copy(self) -> dict:
        """A copy of every masked layer's weight by parameter name: the original dense weights, kept before a
        prior changes them (SparseGPT's OBS update) for ``keep_teacher_copy``."""
        names = {id(param): name for name, param in self.model.named_parameters()}
        return {names[id(layer.weight)]: layer.weight.detach().clone() for layer in self.layers}

    @torch.no_grad()
    def keep_teacher_copy(self, originals: Optional[dict] = None) -> int:
        """Distillation while weights train (``train_weights``, or a refit): keep a copy of every parameter that
        trains, the mask logits aside, as it is now, the original dense model, for the teacher's forward
        (``dense``); ``originals`` (``masked_weights_copy`` taken before a prior updated the weights) stand in
        for the parameters they name. Call after what trains is set and before the first step (on a resume:
        before the checkpoint is loaded). Costs one more copy of the trained parameters. Returns their
        element count."""
        originals = originals or {}
        copied = 0
        for name, param in self.model.named_parameters():
            if param.requires_grad and not name.endswith("mask_logits"):
                param.teacher_copy = originals[name] if name in originals else param.detach().clone()
                copied += param.numel()
        return copied

    def set_fused_kernel(self, fused: Optional[bool]) -> None:
        """The sampling kernels of every masked layer (``SparsifyConfig.fused_kernel``)."""
        for layer in self.layers:
            layer.fused_mask_kernel = fused

    def optimizer_overrides(self, lr: float, min_lr: float = 0.0, mask_warmup_steps: Optional[int] = None) -> dict:
        """megatron-core ``config_overrides`` for ``get_megatron_optimizer``: the logits' learning rate and
        weight-decay multiplier, plus megatron's standard no weight decay on biases and 1-D params.

        ``lr`` / ``min_lr`` are the optimizer's (``OptimizerConfig.lr`` / ``min_lr``); the logits get
        ``mask_lr_mult`` times both. megatron-core >= 0.16 keeps ``lr_mult`` in a param group only as a
        group identifier (its ``OptimizerParamScheduler`` never multiplies by it), so the multiplied rates
        are set as the group's own ``max_lr`` / ``min_lr``, which the scheduler does read, and as its
        initial ``lr`` for an optimizer stepped without a scheduler. ``lr_mult`` stays in the group: it is
        what tells the logits' group apart when a checkpoint's optimizer state is matched to groups.
        ``mask_warmup_steps`` gives the logits a linear warm-up of their own (the group's ``warmup_steps``, which
        ``GroupWarmupScheduler`` reads); None: the scheduler's warm-up, as every group.
        """
        from megatron.core.optimizer import ParamGroupOverride, ParamKey
        from megatron.core.optimizer.optimizer_config import ParamPredicate

        mult = self.config.mask_lr_mult
        one_d = ParamPredicate(name="param_len_1", fn=lambda p: len(p.shape) == 1)
        return {
            ParamKey(name="*.bias", predicate=one_d): ParamGroupOverride(wd_mult=0.0),
            ParamKey(name="*mask_logits"): ParamGroupOverride(
                lr=lr * mult, max_lr=lr * mult, min_lr=min_lr * mult, lr_mult=mult,
                wd_mult=self.config.mask_weight_decay_mult,
                **({} if mask_warmup_steps is None else {"warmup_steps": mask_warmup_steps})),
        }

    def logits_group(self, optimizer) -> Optional[dict]:
        """The optimizer param group of the mask logits (made by ``optimizer_overrides``): the one that
        carries their ``lr_mult``. Present on every rank, possibly empty (distributed optimizer); None when the
        logits do not learn (a refit, ``fix_masks``)."""
        return next((g for g in optimizer.param_groups if g.get("lr_mult") == self.config.mask_lr_mult), None)


def _forward_hook(carry_step: weakref.WeakMethod, module, args, output):
    carry = carry_step()
    return None if carry is None else carry(module, args, output)


class _StepOnBackward(torch.autograd.Function):
    """Identity whose backward hands the masked layers the sampling state of the micro-batch whose output it
    is (``MaskController._carry_step``)."""

    @staticmethod
    def forward(ctx, output, controller, step):
        ctx.controller, ctx.step = controller, step
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.controller._hand_out(ctx.step)
        return grad, None, None


class GroupWarmupScheduler(OptimizerParamScheduler):
    """megatron's lr schedule, where a param group carrying ``warmup_steps`` (the logits' group, from
    ``MaskController.optimizer_overrides(mask_warmup_steps=...)``) warms up from 0 over its own steps, then decays to the
    same end as every group."""

    def get_lr(self, param_group: dict) -> float:
        warmup = param_group.get("warmup_steps")
        if warmup is None:
            return super().get_lr(param_group)
        shared = self.lr_warmup_steps, self.init_lr
        self.lr_warmup_steps, self.init_lr = warmup, 0.0
        try:
            return super().get_lr(param_group)
        finally:
            self.lr_warmup_steps, self.init_lr = shared
