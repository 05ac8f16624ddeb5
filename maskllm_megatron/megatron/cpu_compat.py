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

One speed-up rides along (``SPEEDUPS``; nothing fails without it):
- ``single_rank_buffer_collectives``: with one data-parallel rank, the distributed optimizer's in-place
  reduce-scatter of each gradient bucket and all-gather of each parameter bucket are identities, but
  gloo still copies the whole bucket onto itself (3 copies of the 159M-logit buffer, ~2 s of a 24 s
  SmolLM2 step on one thread). They are skipped when the group has one rank and output and input are
  the same memory.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

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
)

SPEEDUPS = (
    Patch("single_rank_buffer_collectives", "self-copies of whole buckets by one-rank gloo collectives"),
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


def _with_cuda_type_names(fn: Callable) -> Callable:
    """Run ``fn`` with ``Tensor.type()`` (no argument) reporting CUDA names for CPU tensors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.type

        def cuda_named_type(self, dtype=None, non_blocking=False, **kw):
            if dtype is None and not kw:
                name = original(self)
                return _CUDA_TYPE_NAMES.get(name, name)
            return original(self, dtype, non_blocking, **kw)

        torch.Tensor.type = cuda_named_type
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = original

    wrapper.__maskllm_cpu_patched__ = True
    return wrapper


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


def _skip_single_rank(collective: Callable) -> Callable:
    """``collective(output, input, ...)`` that does nothing when it is an identity: a one-rank group and
    ``output`` and ``input`` the same memory (megatron's in-place bucket reduce-scatter / all-gather)."""

    @functools.wraps(collective)
    def wrapper(output, input, *args, group=None, async_op=False, **kwargs):
        if (torch.distributed.get_world_size(group) == 1 and output.data_ptr() == input.data_ptr()
                and output.numel() == input.numel() and output.dtype == input.dtype):
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
    # speed-up: single_rank_buffer_collectives
    buffers = importlib.import_module("megatron.core.distributed.param_and_grad_buffer")
    for name in ("dist_reduce_scatter_func", "dist_all_gather_func"):
        _patch_qualified(buffers, name, _skip_single_rank)
    _applied = True
    return True
