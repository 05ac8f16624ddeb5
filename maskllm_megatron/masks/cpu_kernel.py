"""The fused CPU kernels of the 2:4 masked weight, a small C++ library built on first use.

``_sample_forward`` / ``_sample_backward`` (sampling.py) compiled by torch.compile make four or five
passes over memory on CPU and reduce the 6-wide softmax in scalar code; ``csrc/masked_weight_cpu.cpp``
does each in one vectorised pass (see benchmarks/RESULTS.md for the speed). It is used
for 2:4 layers with fp32 or bf16 weights and logits on x86-64 CPUs with AVX2 when the fused kernel is on;
everything else (GPU, other N:M, fp16, no compiler) takes the torch.compile path, which computes the same
function. bf16 inputs are computed in fp32 and give the outputs in the dtypes ``_sample_forward`` /
``_sample_backward`` give them: W * mask and W's gradient in the weight's dtype (rounded to nearest even,
as ``.to(torch.bfloat16)``), the probabilities, the hard mask and the logits' gradient in fp32.

The one source builds for the widest instruction set torch itself dispatches to on this CPU
(``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` can lower): AVX-512 (16
groups per vector) or AVX2 (8). The noise is the same bits in both, and the results agree to rounding.

The library is compiled with the C++ compiler torch.compile uses (``$CXX`` or ``g++``) against this
torch's headers (ATen's vector types), into ``<cache>/kernels/<hash>/`` (``$MASKLLM_CACHE``,
see ``maskllm_megatron.assets``), keyed by the source, the flags, the compiler and the torch version;
it is written to a temporary name and renamed, so concurrent ranks never load a half-written file.
``MASKLLM_CPU_KERNEL=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from .patterns import NMSpec, candidate_patterns

SOURCE = Path(__file__).with_name("csrc") / "masked_weight_cpu.cpp"
COMMON_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp")
ISA_FLAGS = {  # the flags torch builds its own kernels of each capability with
    "AVX2": ("-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"),
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"),
}


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++"))


def runnable_isas() -> tuple[str, ...]:
    """The builds this CPU can run, narrowest first: ("AVX2", "AVX512"), ("AVX2",), or () where the
    machine is not x86-64 or torch dispatches to neither."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    return {"AVX512": ("AVX2", "AVX512"), "AVX2": ("AVX2",)}.get(torch.backends.cpu.get_cpu_capability(), ())


def best_isa() -> Optional[str]:
    """The instruction set the kernel builds for here ("AVX512" or "AVX2"), or None (see runnable_isas)."""
    isas = runnable_isas()
    return isas[-1] if isas else None


def build_library(cxx: str, source: Path, flags: tuple[str, ...], before: tuple[str, ...] = (),
                  after: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` into a shared library with ``cxx`` (``cxx *flags *before source -o lib *after``),
    once per source, flags, compiler and torch, into ``<cache>/kernels/<hash>/<stem>.so``, written to a
    temporary name and renamed (concurrent ranks never load a half-written file); the library's path. A
    failed build raises RuntimeError with the compiler's last words. The CPU kernels of ``masks`` and of
    ``inference`` are built by this."""
    from ..cache import cache_dir

    torch_dir = Path(torch.__file__).parent
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(repr((source.read_bytes(), flags, version, torch.__version__, str(torch_dir))).encode())
    out = cache_dir() / "kernels" / key.hexdigest()[:16] / f"{source.stem}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    cmd = [cxx, *flags, *before, str(source), "-o", str(tmp), *after, f"-Wl,-rpath,{torch_dir / 'lib'}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def _build(cxx: str, isa: str) -> Path:
    """The mask kernel for ``isa``, built against this torch's headers (ATen's vector types)."""
    torch_lib = Path(torch.__file__).parent
    return build_library(cxx, SOURCE, COMMON_FLAGS + ISA_FLAGS[isa], before=(f"-I{torch_lib / 'include'}",),
                         after=(f"-L{torch_lib / 'lib'}", "-ltorch_cpu", "-lc10"))


@lru_cache(maxsize=None)
def _library(isa: Optional[str] = None) -> Optional[ctypes.CDLL]:
    """The loaded kernel library for ``isa`` (default: ``best_isa()``), or None where it cannot run here
    (the caller falls back)."""
    isa = isa or best_isa()
    if isa not in runnable_isas():
        return None
    cxx = _compiler()
    if cxx is None:
        warnings.warn("maskllm: no C++ compiler ($CXX or g++) for the fused CPU mask kernel; "
                      "using the torch.compile kernel (slower on CPU)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cxx, isa)))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"maskllm: the fused CPU mask kernel could not be built ({e}); using the torch.compile "
                      "kernel (slower on CPU); set MASKLLM_CPU_KERNEL=0 to skip the attempt")
        return None
    scalars = [ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int]
    lib.maskllm_masked_weight_fwd_2_4.argtypes = [ctypes.c_void_p] * 8 + scalars + [ctypes.c_int] * 2
    lib.maskllm_masked_weight_bwd_2_4.argtypes = [ctypes.c_void_p] * 7 + scalars + [ctypes.c_int]
    lib.maskllm_masked_weight_fwd_2_4.restype = lib.maskllm_masked_weight_bwd_2_4.restype = None
    return lib


def vector_width(isa: Optional[str] = None) -> int:
    """Groups per vector in the ``isa`` build (8 for AVX2, 16 for AVX-512): the kernels' block size."""
    return _library(isa).maskllm_vector_width()


DTYPES = (torch.float32, torch.bfloat16)  # of the weight and of the logits, each


def supports(weight: torch.Tensor, logits: torch.Tensor, spec: NMSpec) -> bool:
    """Whether this kernel runs this layer: CPU, weight and logits each fp32 or bf16, 2:4, not switched
    off (``MASKLLM_CPU_KERNEL=0``), and it builds here."""
    return (os.environ.get("MASKLLM_CPU_KERNEL", "1") != "0" and weight.device.type == "cpu"
            and logits.device.type == "cpu" and weight.dtype in DTYPES and logits.dtype in DTYPES
            and (spec.n, spec.m) == (2, 4) and _library() is not None)


@lru_cache(maxsize=None)
def _keep_table(spec: NMSpec) -> torch.Tensor:
    """``[C, M]`` uint8: 1 where pattern k keeps position j (the candidate patterns, as bytes)."""
    return candidate_patterns(spec, dtype=torch.uint8).contiguous()


def masked_weight_forward(weight: torch.Tensor, logits: torch.Tensor, row_hash: torch.Tensor,
                          col_hash: torch.Tensor, coef: float | torch.Tensor, inv_tau: float | torch.Tensor,
                          spec: NMSpec, hard: bool, isa: Optional[str] = None):
    """``(W * mask, probs, hard mask or None)`` as ``sampling._sample_forward`` returns them (W * mask in
    the weight's dtype, the others fp32).

    ``col_hash`` is the 1-D per-logit-column hash (``group * C + k`` order), as in sampling.py; the
    scalars are floats or 0-d CPU tensors. ``isa`` picks a build other than ``best_isa()`` (tests compare
    them)."""
    rows, groups, c = logits.shape
    weight, logits = weight.contiguous(), logits.detach().contiguous()
    col_hash_pm = col_hash.view(groups, c).t().contiguous()  # pattern-major: one vector load per pattern
    row_hash = row_hash.contiguous()
    keep = _keep_table(spec)
    probs = torch.empty(logits.shape, dtype=torch.float32)
    out = torch.empty_like(weight)
    mask = torch.empty(weight.shape, dtype=torch.float32) if hard else None
    _library(isa).maskllm_masked_weight_fwd_2_4(
        logits.data_ptr(), weight.data_ptr(), row_hash.data_ptr(), col_hash_pm.data_ptr(), keep.data_ptr(),
        probs.data_ptr(), out.data_ptr(), mask.data_ptr() if hard else None, rows, groups, float(coef),
        float(inv_tau), torch.get_num_threads(), weight.dtype == torch.bfloat16, logits.dtype == torch.bfloat16)
    return out, probs, mask


def masked_weight_backward(grad_out: torch.Tensor, weight: torch.Tensor, probs: torch.Tensor,
                           mask: Optional[torch.Tensor], coef: float | torch.Tensor, reg2: float | torch.Tensor,
                           spec: NMSpec, need_weight_grad: bool, isa: Optional[str] = None):
    """``(grad_logits, grad_weight or None)`` as ``sampling._sample_backward`` returns them (fp32, and the
    weight's dtype: autograd hands ``grad_out`` in it)."""
    rows, groups, _ = probs.shape
    # contiguous copies are bound to names: the pointers below must outlive the call
    grad_out, weight, probs = grad_out.to(weight.dtype).contiguous(), weight.contiguous(), probs.contiguous()
    mask = mask.contiguous() if mask is not None else None
    grad_logits = torch.empty_like(probs)
    grad_weight = torch.empty_like(weight) if need_weight_grad else None
    _library(isa).maskllm_masked_weight_bwd_2_4(
        grad_out.data_ptr(), weight.data_ptr(), probs.data_ptr(),
        mask.data_ptr() if mask is not None else None, _keep_table(spec).data_ptr(), grad_logits.data_ptr(),
        grad_weight.data_ptr() if need_weight_grad else None, rows, groups, float(coef), float(reg2),
        torch.get_num_threads(), weight.dtype == torch.bfloat16)
    return grad_logits, grad_weight
