"""Run megatron-core 0.16.x on a machine without CUDA (gloo backend).

megatron-core assumes CUDA in a handful of places. ``apply()`` patches exactly those, and only when
``torch.cuda.is_available()`` is False; on a GPU machine it does nothing. Each patch is listed in
``PATCHES`` with what it fixes, and ``tests/test_cpu_compat.py`` shows each one failing without it.

The patches:
1. ``rng``: the model-parallel RNG tracker saves/restores CUDA generator state
   (``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``, ``torch.cuda.manual_seed``,
   ``torch.cuda.get_rng_state``). They are redirected to the CPU generator.
2. ``current_device``: ``torch.cuda.current_device()`` is used as a ``device=`` argument (GPTModel
   building, ``gather_output``, buffers). It returns ``"cpu"``.
3. ``synchronize``: ``torch.cuda.synchronize()`` (checkpoint saving, schedules) becomes a no-op.
4. ``cuda_factories``: modules that create tensors with a hard-coded ``device="cuda"`` see a ``torch``
   whose factory functions map that device to the CPU (``CUDA_MODULES`` lists them).
5. ``cuda_type_names``: the optimizers and gradient clipping assert ``param.type() ==
   'torch.cuda.FloatTensor'``; inside those functions only, CPU tensors report CUDA type names.
6. ``torch_adam_step``: without apex / Transformer Engine the distributed optimizer runs torch's Adam,
   whose state holds a ``step`` tensor that the reshardable checkpoint loader does not provide
   (``KeyError: 'step'``); the loader keeps the current ``step`` (restored from the param groups).
7. ``tied_embedding_copy``: with tied embeddings at PP>1, ``LanguageModule.setup_embeddings_and_output_layer``
   moves the last stage's copy of the embedding to CUDA (``weight.data.cuda()``) before all-reducing it
   from the first stage; inside that function ``Tensor.cuda()`` returns the tensor itself.

Sequence parallelism needs no patch: megatron's SP mappings and linear layers call
``reduce_scatter_tensor`` / ``all_gather_into_tensor`` (synchronous and asynchronous, fp32 / bf16 / fp16),
which gloo has in torch 2.13 (checked before adding one; the driver's SP tests run on them at TP=2).

One speed-up rides along (``SPEEDUPS``; nothing fails without it):
- ``gloo_bucket_collectives``: megatron's distributed optimizer reduce-scatters each gradient bucket into
  this rank's shard of it and all-gathers each parameter bucket from it, in place, inside a coalescing
  manager. On gloo those calls are slow: with one rank they still copy the whole bucket onto itself
  (a profile of a one-rank SmolLM2 step showed three copies of the 159M-logit buffer), and at DP=2 the
  coalesced reduce-scatter / all-gather take 2.2x / 2.6x as long as one plain all-reduce of each bucket
  (``benchmarks/bench_gloo_buckets.py``, 2 x 320 MB). With one rank they are skipped (they
  are identities); with more, a synchronous call runs as one all-reduce of the bucket on a second gloo
  group of the same ranks (outside the coalescing manager): summed gradients, of which this rank's shard
  is what the reduce-scatter gives; for the gather, the other shards are set to -0.0 first, and x + -0.0
  is x exactly. Asynchronous calls (overlap_grad_reduce) keep megatron's path.
"""
from __future__ import annotations

import datetime
import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from .parallel import timeout_minutes

# Modules that create tensors with device="cuda" (or call torch.cuda.*) on paths we use.
CUDA_MODULES = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
)

# (module, qualified function) pairs that compare ``tensor.type()`` with CUDA type names.
CUDA_TYPE_CHECKS = (
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),  # imported by name there
)


@dataclass(frozen=True)
class Patch:
    name: str
    fixes: str


PATCHES = (
    Patch("rng", "model_parallel_cuda_manual_seed and the RNG tracker use CUDA generator state"),
    Patch("current_device", "torch.cuda.current_device() used as a device argument"),
    Patch("synchronize", "torch.cuda.synchronize() in checkpoint saving and schedules"),
    Patch("cuda_factories", 'tensors created with device="cuda" in CUDA_MODULES'),
    Patch("cuda_type_names", "type() == 'torch.cuda.FloatTensor' assertions in optimizers and clipping"),
    Patch("torch_adam_step", "KeyError 'step' loading a fully reshardable distributed-optimizer checkpoint"),
    Patch("tied_embedding_copy", "weight.data.cuda() setting up tied embeddings at PP>1"),
)

SPEEDUPS = (
    Patch("gloo_bucket_collectives", "slow in-place bucket reduce-scatter / all-gather on gloo"),
)

_applied = False


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    return device


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


class _CpuCuda:
    """Stands in for ``torch.cuda`` inside patched modules."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args, **kwargs):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "empty_like", "zeros_like",
              "ones_like", "full_like", "rand", "randn", "triu", "tril", "as_tensor")


class _CpuTorch:
    """Stands in for the ``torch`` module inside patched modules: same attributes, except that
    tensor factories map ``device="cuda"`` to the CPU and ``torch.cuda`` is ``_CpuCuda``."""

    def __init__(self):
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_get_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, *args, **kwargs):
    torch.set_rng_state(new_state)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _with_tensor_method(name: str, replacement: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
    """A wrapper maker: the wrapped ``fn`` runs with ``torch.Tensor.<name>`` replaced by
    ``replacement(original)``, restored afterwards."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, replacement(original))
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(torch.Tensor, name, original)

        wrapper.__maskllm_cpu_patched__ = True
        return wrapper

    return wrap


def _cuda_named_type(original: Callable) -> Callable:
    """``Tensor.type()`` (no argument) reporting CUDA names for CPU tensors."""

    def cuda_named_type(self, dtype=None, non_blocking=False, **kw):
        if dtype is None and not kw:
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kw)

    return cuda_named_type


_with_cuda_type_names = _with_tensor_method("type", _cuda_named_type)
_with_tensor_cuda_as_identity = _with_tensor_method("cuda", lambda original: lambda self, *a, **kw: self)


def _patch_qualified(module, qualname: str, wrap: Callable) -> None:
    owner_path, _, attr = qualname.rpartition(".")
    owner = module
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part)
    raw = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    if isinstance(raw, staticmethod):
        fn = raw.__func__
        if not getattr(fn, "__maskllm_cpu_patched__", False):
            setattr(owner, attr, staticmethod(wrap(fn)))
    elif not getattr(raw, "__maskllm_cpu_patched__", False):
        setattr(owner, attr, wrap(raw))


def _keep_adam_step(fn: Callable) -> Callable:
    """Wrap ``DistributedOptimizer._set_main_param_and_optimizer_states`` to keep torch Adam's step."""

    @functools.wraps(fn)
    def wrapper(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state.get(main_param, {}).get("step")
            if step is not None:
                tensors = dict(tensors, step=step.clone())
        return fn(self, model_param, tensors)

    wrapper.__maskllm_cpu_patched__ = True
    return wrapper


_SHADOW_GROUPS: dict = {}


def drop_shadow_groups() -> None:
    """Forget the shadow groups (``parallel.teardown`` destroys them with the rest)."""
    _SHADOW_GROUPS.clear()


def _shadow_group(group):
    """A second gloo group with ``group``'s ranks (made once, by its members), whose collectives run at
    once even while a coalescing manager is open on ``group``."""
    dist = torch.distributed
    ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
    if ranks not in _SHADOW_GROUPS:
        _SHADOW_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True,
                                                timeout=datetime.timedelta(minutes=timeout_minutes()))
    return _SHADOW_GROUPS[ranks]


def _own_shard(shard: torch.Tensor, full: torch.Tensor, group) -> bool:
    """Whether ``shard`` is this rank's equal slice of the contiguous ``full`` (megatron's bucket views)."""
    dist = torch.distributed
    world = dist.get_world_size(group)
    return (full.is_contiguous() and shard.is_contiguous() and shard.dtype == full.dtype
            and shard.numel() * world == full.numel()
            and shard.data_ptr() == full.data_ptr() + dist.get_rank(group) * shard.numel() * shard.element_size())


def _fast_reduce_scatter(collective: Callable) -> Callable:
    """megatron's ``dist_reduce_scatter_func(shard, bucket, op=, group=, async_op=)``, see SPEEDUPS."""

    @functools.wraps(collective)
    def wrapper(output, input, *args, group=None, async_op=False, **kwargs):
        dist = torch.distributed
        op = kwargs.get("op", args[0] if args else dist.ReduceOp.SUM)
        if _own_shard(output, input, group):
            if dist.get_world_size(group) == 1:
                return None
            if not async_op and op == dist.ReduceOp.SUM and dist.get_backend(group) == "gloo":
                dist.all_reduce(input, group=_shadow_group(group))
                return None
        return collective(output, input, *args, group=group, async_op=async_op, **kwargs)

    wrapper.__maskllm_cpu_patched__ = True
    return wrapper


def _fast_all_gather(collective: Callable) -> Callable:
    """megatron's ``dist_all_gather_func(bucket, shard, group=, async_op=)``, see SPEEDUPS."""

    @functools.wraps(collective)
    def wrapper(output, input, *args, group=None, async_op=False, **kwargs):
        dist = torch.distributed
        if _own_shard(input, output, group) and not args and not kwargs:
            world = dist.get_world_size(group)
            if world == 1:
                return None
            if not async_op and output.is_floating_point() and dist.get_backend(group) == "gloo":
                shards = output.view(world, -1)
                for i in range(world):
                    if i != dist.get_rank(group):
                        shards[i].fill_(-0.0)  # x + -0.0 == x for every x, signed zeros included
                dist.all_reduce(output, group=_shadow_group(group))
                return None
        return collective(output, input, *args, group=group, async_op=async_op, **kwargs)

    wrapper.__maskllm_cpu_patched__ = True
    return wrapper


def needed() -> bool:
    """True when CUDA is absent, i.e. when ``apply()`` patches anything."""
    return not torch.cuda.is_available()


def apply() -> bool:
    """Apply all CPU patches once; return True when patches are in force. No-op with CUDA."""
    global _applied
    if not needed():
        return False
    if _applied:
        return True
    # 1. rng
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    # 2./3. current_device and synchronize, for every caller
    torch.cuda.current_device = _CpuCuda.current_device
    torch.cuda.synchronize = _CpuCuda.synchronize
    # 4. cuda_factories
    cpu_torch = _CpuTorch()
    for name in CUDA_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = cpu_torch
    # 5. cuda_type_names
    for name, qualname in CUDA_TYPE_CHECKS:
        _patch_qualified(importlib.import_module(name), qualname, _with_cuda_type_names)
    # 6. torch_adam_step
    _patch_qualified(importlib.import_module("megatron.core.optimizer.distrib_optimizer"),
                     "DistributedOptimizer._set_main_param_and_optimizer_states", _keep_adam_step)
    # 7. tied_embedding_copy
    _patch_qualified(importlib.import_module("megatron.core.models.common.language_module.language_module"),
                     "LanguageModule.setup_embeddings_and_output_layer", _with_tensor_cuda_as_identity)
    # speed-up: gloo_bucket_collectives
    buffers = importlib.import_module("megatron.core.distributed.param_and_grad_buffer")
    _patch_qualified(buffers, "dist_reduce_scatter_func", _fast_reduce_scatter)
    _patch_qualified(buffers, "dist_all_gather_func", _fast_all_gather)
    _applied = True
    return True
