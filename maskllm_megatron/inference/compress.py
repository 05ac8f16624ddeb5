"""``compress(model)``: the N:M linears of a Hugging Face model loaded from our ``hf`` export, swapped in place.

The export's ``config.json`` carries a ``sparsity`` record (``maskllm-export --format hf``,
``maskllm-export apply-masks``): ``structure`` ("2:4") and ``targets``, the exact weight names it masked.
Each target must be an ``nn.Linear`` whose weight is N:M (checked group by group, not trusted).

- CPU, float32 or bfloat16: each becomes a ``CompressedNMLinear`` (linear.py).
- CUDA, float16 or bfloat16, 2:4: each weight whose shape ``torch.sparse.to_sparse_semi_structured``
  accepts becomes a semi-structured sparse parameter (cuSPARSELt / CUTLASS); the others stay dense and
  are listed in the report.

Anything else (a model without the record, a target that is missing, not a linear or not N:M, another
dtype or device) raises ``CompressError`` with one line naming the problem and the fix, before any layer
is changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from maskllm_megatron.masks.patterns import NMSpec

from .linear import SUPPORTED_DTYPES, CompressedNMLinear, CompressError, check_spec, compress_weight

CUDA_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class CompressReport:
    """What ``compress`` did."""

    spec: NMSpec
    device: str
    compressed: list[str] = field(default_factory=list)  # module names swapped (CPU) or made semi-structured (CUDA)
    left_dense: list[tuple[str, str]] = field(default_factory=list)  # (module, why): CUDA shapes torch refuses
    dense_bytes: int = 0  # the masked linears' weights and biases as they were
    compressed_bytes: int = 0  # ... as they are now (CPU: values, pattern indices, bias)

    def summary(self) -> str:
        text = (f"compressed {len(self.compressed)} {self.spec} linears on {self.device}: "
                f"{self.dense_bytes / 2**20:.1f} MiB -> {self.compressed_bytes / 2**20:.1f} MiB")
        if self.left_dense:
            text += f"; {len(self.left_dense)} left dense ({self.left_dense[0][0]}: {self.left_dense[0][1]})"
        return text


def sparsity_record(config) -> dict:
    """The export's ``sparsity`` record from a model config (object or dict); CompressError without one."""
    record = config.get("sparsity") if isinstance(config, dict) else getattr(config, "sparsity", None)
    if not isinstance(record, dict) or "structure" not in record or not record.get("targets"):
        raise CompressError("the model's config.json has no 'sparsity' record (structure and targets): compress "
                            "needs a model exported by maskllm-export --format hf or maskllm-export apply-masks")
    return record


def _module_of(model: nn.Module, weight_name: str) -> tuple[str, Optional[nn.Module]]:
    """``(module name in model, module or None)`` for ``weight_name`` (``...q_proj.weight``), also where the
    model is the base model (its names lack the ``base_model_prefix``)."""
    name = weight_name[:-len(".weight")] if weight_name.endswith(".weight") else weight_name
    modules = dict(model.named_modules())
    if name in modules:
        return name, modules[name]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(prefix + "."):
        return name[len(prefix) + 1:], modules.get(name[len(prefix) + 1:])
    return name, None


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def compress(model: nn.Module, record: Optional[dict] = None, isa: Optional[str] = None) -> CompressReport:
    """Swap the N:M linears named by the export's sparsity record (``record``: by default
    ``model.config.sparsity``) in place; returns a ``CompressReport``. ``isa`` forces the CPU kernel's
    instruction set ("AVX2" or "AVX512")."""
    record = record if record is not None else sparsity_record(getattr(model, "config", None) or {})
    try:
        spec = NMSpec.parse(record["structure"])
    except ValueError as e:
        raise CompressError(f"the sparsity record's structure: {e}") from None
    targets = []
    for weight_name in record["targets"]:
        name, module = _module_of(model, weight_name)
        if module is None:
            raise CompressError(f"{weight_name} (a target of the sparsity record) is not in this model: load the "
                                "model from the export the record belongs to")
        if isinstance(module, CompressedNMLinear):
            raise CompressError(f"{name} is compressed already: compress a model once")
        if type(module) is not nn.Linear:
            raise CompressError(f"{name} ({type(module).__name__}) is not an nn.Linear: compress runs nn.Linear "
                                "layers only (GPT-2's Conv1D is not supported); keep this model dense")
        targets.append((name, module))
    devices = {m.weight.device.type for _, m in targets}
    dtypes = {m.weight.dtype for _, m in targets}
    if devices - {"cpu", "cuda"} or len(devices) > 1:
        raise CompressError(f"the masked linears are on {sorted(devices)}: compress runs models wholly on the CPU "
                            "or on CUDA; move the model (model.to('cpu') or model.to('cuda'))")
    device = devices.pop() if devices else "cpu"
    allowed = SUPPORTED_DTYPES if device == "cpu" else CUDA_DTYPES
    bad = sorted(str(d) for d in dtypes - set(allowed))
    if bad:
        names = " or ".join(str(d).replace("torch.", "") for d in allowed)
        raise CompressError(f"the masked linears are {', '.join(bad)} on {device}: compress runs {names} there; "
                            f"load the model with torch_dtype=torch.{str(allowed[-1]).replace('torch.', '')}")
    if device == "cpu":
        check_spec(spec)
    elif (spec.n, spec.m) != (2, 4):
        raise CompressError(f"{spec} on CUDA: torch's semi-structured sparsity runs 2:4 only; "
                            "run this model on the CPU or dense")
    report = CompressReport(spec, device)
    # every weight checked before any module changes: a refusal leaves the model as it was
    packed = {}
    for name, module in targets:
        if device == "cpu":
            packed[name] = compress_weight(module.weight.data, spec, name)
        else:
            _check_on_gpu(module.weight.data, spec, name)
    for name, module in targets:
        report.dense_bytes += _bytes(module.weight, module.bias)
        if device == "cpu":
            values, idx = packed.pop(name)
            new = CompressedNMLinear(module.in_features, module.out_features, spec, values, idx, module.bias, isa)
            _replace(model, name, new)
            report.compressed_bytes += new.resident_bytes()
        else:
            why = _to_semi_structured(module, spec, name)
            if why is None:
                w = module.weight
                report.compressed_bytes += _bytes(*(getattr(w, a, None) for a in ("packed", "meta", "packed_t", "meta_t",
                                                                                   "compressed_swizzled_bitmask")),
                                                  module.bias)
            else:
                report.left_dense.append((name, why))
                report.compressed_bytes += _bytes(module.weight, module.bias)
                continue
        report.compressed.append(name)
    return report


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _check_on_gpu(weight: torch.Tensor, spec: NMSpec, name: str) -> None:
    """CompressError naming the first group of ``weight`` (on the GPU) with more than N non-zeros."""
    if weight.shape[1] % spec.m:
        compress_weight(weight[:1].float().cpu(), spec, name)  # raises: inputs not a multiple of M
    counts = (weight.reshape(weight.shape[0], -1, spec.m) != 0).sum(-1)
    if bool((counts > spec.n).any()):
        row = int((counts > spec.n).any(-1).nonzero()[0])
        try:
            compress_weight(weight[row:row + 1].float().cpu(), spec, name)
        except CompressError as e:
            raise CompressError(str(e).replace("row 0,", f"row {row},", 1)) from None


def _to_semi_structured(module: nn.Linear, spec: NMSpec, name: str) -> Optional[str]:
    """Make ``module.weight`` a semi-structured sparse parameter; the reason if torch refuses the shape."""
    from torch.sparse import to_sparse_semi_structured

    try:
        sparse = to_sparse_semi_structured(module.weight.data)
    except (RuntimeError, ValueError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    module.weight = nn.Parameter(sparse, requires_grad=False)
    return None
