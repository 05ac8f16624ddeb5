"""The C++ CPU kernels of the compressed N:M linear, a small library built on first use.

``csrc/nm_linear_cpu.cpp`` (plain intrinsics and std::thread helpers, no torch headers: it compiles in a
few seconds) is built by ``masks.cpu_kernel.build_library``, as the mask kernel is: with the C++ compiler
torch.compile uses (``$CXX`` or ``g++``), for the widest instruction set torch dispatches to on this CPU
(AVX-512 or AVX2, ``runnable_isas``), into ``<cache>/kernels/<hash>/``, keyed by the source, the flags,
the compiler and the torch version, written to a temporary name and renamed.

``MASKLLM_NM_ISA=AVX2`` forces the AVX2 build on an AVX-512 machine (tests compare both); the ``isa``
argument of the functions below does the same per call.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from maskllm_megatron.masks.cpu_kernel import COMMON_FLAGS, ISA_FLAGS, _compiler, build_library, runnable_isas

SOURCE = Path(__file__).with_name("csrc") / "nm_linear_cpu.cpp"


class KernelUnavailable(RuntimeError):
    """The CPU kernel cannot run here (not x86-64 with AVX2, no compiler, or the build failed)."""


def default_isa() -> Optional[str]:
    """``$MASKLLM_NM_ISA`` if set, else the widest build this CPU runs ("AVX512" or "AVX2"), else None."""
    isas = runnable_isas()
    forced = os.environ.get("MASKLLM_NM_ISA")
    if forced:
        if forced not in isas:
            runs = ", ".join(isas) or "neither AVX2 nor AVX512"
            raise KernelUnavailable(f"MASKLLM_NM_ISA={forced} but this CPU runs {runs}: unset it or pick one of those")
        return forced
    return isas[-1] if isas else None


def _build(cxx: str, isa: str) -> Path:
    """The kernel for ``isa`` (no torch headers: plain intrinsics and std::thread)."""
    try:
        return build_library(cxx, SOURCE, COMMON_FLAGS + ISA_FLAGS[isa] + ("-pthread",))
    except RuntimeError as e:
        raise KernelUnavailable(str(e)) from None


@lru_cache(maxsize=None)
def library(isa: Optional[str] = None) -> ctypes.CDLL:
    """The loaded kernel library for ``isa`` (default: ``default_isa()``); raises KernelUnavailable."""
    isa = isa or default_isa()
    if isa not in runnable_isas():
        raise KernelUnavailable(f"the compressed N:M CPU kernel needs an x86-64 CPU with AVX2 or AVX-512 that torch "
                                f"dispatches to (torch reports {torch.backends.cpu.get_cpu_capability()}): "
                                "run the model dense")
    cxx = _compiler()
    if cxx is None:
        raise KernelUnavailable("no C++ compiler ($CXX or g++) to build the compressed N:M CPU kernel: install g++")
    lib = ctypes.CDLL(str(_build(cxx, isa)))
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.maskllm_nm_layout_size.restype = i64
    if lib.maskllm_nm_layout_size() != ctypes.sizeof(Layout):
        raise KernelUnavailable(f"{SOURCE.name}'s Layout is {lib.maskllm_nm_layout_size()} bytes, kernel.py's "
                                f"{ctypes.sizeof(Layout)}: the two definitions differ")
    lib.maskllm_nm_linear.argtypes = lib.maskllm_nm_gemm.argtypes = lib.maskllm_nm_gemm_pairs.argtypes = \
        [ctypes.POINTER(Layout)] + [p] * 5 + [i64, i64, i32]
    lib.maskllm_nm_decompress.argtypes = [ctypes.POINTER(Layout)] + [p] * 3 + [i64, i64, i32]
    lib.maskllm_nm_linear.restype = lib.maskllm_nm_gemm.restype = lib.maskllm_nm_decompress.restype = None
    lib.maskllm_nm_gemm_pairs.restype = None
    lib.maskllm_nm_has_pairs.restype = i32
    lib.maskllm_nm_isa.restype = ctypes.c_char_p
    return lib


class Layout(ctypes.Structure):
    """One layer's shape and tables, as ``struct Layout`` in the C++ source."""

    _fields_ = [("in_features", ctypes.c_int64), ("idx_stride", ctypes.c_int64), ("n", ctypes.c_int32),
                ("m", ctypes.c_int32), ("groups_per_byte", ctypes.c_int32), ("bf16", ctypes.c_int32),
                ("byte_keep", ctypes.c_void_p), ("positions", ctypes.c_void_p)]


def built_isa(isa: Optional[str] = None) -> str:
    """The instruction set the loaded build was compiled for (what ``isa`` resolves to)."""
    return library(isa).maskllm_nm_isa().decode()


def has_pairs(isa: Optional[str] = None) -> bool:
    """Whether the bf16 2:4 pair GEMM runs here: the AVX-512 build on a CPU with AVX512-BF16 (cpuid, at run
    time); ``MASKLLM_NM_PAIRS=0`` turns it off (the forward then takes the tiled path)."""
    return os.environ.get("MASKLLM_NM_PAIRS", "1") != "0" and bool(library(isa).maskllm_nm_has_pairs())
