"""``CompressedNMLinear``: an N:M linear stored as its kept weights and each group's pattern, for CPU inference.

A dense ``[out, in]`` weight whose groups of M consecutive inputs hold at most N non-zeros becomes
``values [out, in/M*N]`` (the N kept weights of each group, in position order, in the weight's dtype)
and ``idx`` (each group's pattern index in ``masks/patterns.py`` order: two per byte where C(M, N) <= 16,
as for 2:4, else one per byte). fp32 2:4 then reads 8.5 B per group of 4 weights instead of 16.

Forward (``x`` in the weights' dtype, float32 or bfloat16, on the CPU):

- up to ``KERNEL_MAX_TOKENS[dtype]`` tokens (``PAIRS_KERNEL_MAX_TOKENS`` where the pair GEMM below runs;
  decoding, short prompts): the C++ decode kernel
  (``sparse_forward``) reads every weight once per block of 8 tokens, expanding the kept values of
  each 16 inputs into a dense register; it accumulates in fp32 and writes the weights' dtype;
- more tokens (prefill), fp32: the C++ sparse GEMM (``sparse_gemm``) multiplies only the kept weights,
  tokens in vector lanes;
- more tokens, bf16 2:4 on a CPU with AVX512-BF16 (``kernel.has_pairs``): the C++ pair GEMM
  (``pair_gemm``): each kept pair (w_a, w_b) is one ``vdpbf16ps`` lane, 16 output rows per vector, so a
  token costs one dot product per group of 4 inputs where the dense matmul takes two;
- more tokens, other bf16 (1:4, 4:8, no AVX512-BF16): a tile of output rows at a time (``TILE_BYTES``,
  16 MiB, in one scratch buffer for all layers) is decompressed and multiplied with ``torch.mm`` into
  its columns of the output (``tiled_forward``): torch's bf16 matmul uses the CPU's bf16 dot products
  where it has them, which beats the fp32 FMAs of the sparse GEMM. The dense weights are never held
  (at most one tile of one layer, at a time).

The rule is fixed (``path``), from ``benchmarks/bench_nm_linear.py paths`` on the 2-core AVX-512 VM
(benchmarks/RESULTS.md): the decode kernel against the tiled path and the sparse GEMM at SmolLM2's and
LLaMA-2 7B's shapes. All paths equal ``F.linear(x, to_dense(), bias)`` up to the order of the fp32
summation (and, in bf16, the one rounding of the output): ``tests/test_inference.py`` holds them to
``TOLERANCE``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import kernel
from maskllm_megatron.masks.patterns import NMSpec, pattern_positions

#: Token counts up to this take the decode kernel, by dtype (bench_nm_linear.py paths, 9-64 tokens). fp32: with
#: 2 threads the kernel beats the sparse GEMM (its 64-token panels mostly padding) and the tiled path up to 32
#: tokens at SmolLM2's and LLaMA-2 7B's shapes; single-thread CPU time agrees at SmolLM2's, while at LLaMA's
#: the tiled path wins from 24. bf16: the tiled path wins from 16-24 tokens (SmolLM2; LLaMA single-thread: 9).
KERNEL_MAX_TOKENS = {torch.float32: 32, torch.bfloat16: 16}
#: bf16 2:4 where the pair GEMM runs (``pairs``): the decode kernel up to this many tokens only. Idle,
#: 2 threads (1-64 tokens): the kernel wins at 1-4 tokens at SmolLM2's shapes and up to 6-8 at LLaMA-2 7B's
#: 4096 x 4096; the pair GEMM from 8-12 tokens at both (at 12: 0.95-1.09x dense against 2.6-3.0x).
PAIRS_KERNEL_MAX_TOKENS = 8
#: Layers with fewer weights run on the calling thread only (the C++ side has the same floor); larger ones
#: share their row blocks with the kernel's helper threads (torch.get_num_threads() in all).
PARALLEL_MIN_WEIGHTS = int(os.environ.get("MASKLLM_NM_PARALLEL_MIN", 2**16))
#: The prefill path's dense tile: this many bytes of output rows (at least TILE_MIN_ROWS rows), in one
#: scratch buffer that all layers share (not thread-safe: one forward at a time per process).
TILE_BYTES = 16 * 2**20
TILE_MIN_ROWS = 128
_scratch: dict = {}
#: ``(a, b)``: |y - ref| <= a * sum_k |w_k x_k| (+ |bias|) + b * |ref|, where ref is F.linear in fp32 on the
#: zero-filled dense weight (bf16 weights and inputs are exact in fp32): a bounds the fp32 summation in another
#: order (kernel: 16 or 8 lanes x 2 accumulators, then a tree), b the one rounding of a bf16 output (2^-8).
TOLERANCE = {torch.float32: (1e-5, 0.0), torch.bfloat16: (1e-5, 2.0 ** -8)}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


class CompressError(ValueError):
    """A layer or model that cannot be compressed; the message names the problem and the fix."""


@dataclass(frozen=True)
class _Tables:
    positions: torch.Tensor  # [C, N] uint8: the positions each pattern keeps
    byte_keep: torch.Tensor  # [256] int16 (uint16 bits): the keep bits of the groups of one index byte
    bits_to_pattern: torch.Tensor  # [2^M] int64: pattern index of a keep-bit set (-1: not exactly N)
    groups_per_byte: int


def check_spec(spec: NMSpec) -> None:
    """The N:M structures the kernel runs: M in 2, 4, 8 and 0 < N < M."""
    if spec.m not in (2, 4, 8) or not 0 < spec.n < spec.m:
        raise CompressError(f"{spec} is not supported by the compressed linear: it runs N:M with M = 2, 4 or 8 "
                            "and N < M (e.g. 2:4, 1:4, 4:8); keep this model dense")


@lru_cache(maxsize=None)
def tables(spec: NMSpec) -> _Tables:
    check_spec(spec)
    kept = pattern_positions(spec)
    bits = [sum(1 << j for j in k) for k in kept]
    gpb = 2 if len(kept) <= 16 else 1
    byte_keep = []
    for b in range(256):
        parts = (b & 15, b >> 4) if gpb == 2 else (b,)
        byte_keep.append(sum(bits[p] << (i * spec.m) if p < len(kept) else 0 for i, p in enumerate(parts)))
    bits_to_pattern = torch.full((1 << spec.m,), -1, dtype=torch.int64)
    bits_to_pattern[torch.tensor(bits)] = torch.arange(len(kept))
    return _Tables(torch.tensor(kept, dtype=torch.uint8), torch.tensor(byte_keep, dtype=torch.int32).to(torch.int16),
                   bits_to_pattern, gpb)


def compress_weight(weight: torch.Tensor, spec: NMSpec, name: str = "weight", block_rows: int = 512):
    """``(values, idx)`` of an N:M ``[out, in]`` weight; CompressError naming ``name`` when it is not N:M.

    Each group keeps its non-zeros; a group with fewer than N keeps the first zero positions besides."""
    t = tables(spec)
    rows, cols = weight.shape
    if cols % spec.m:
        raise CompressError(f"{name}: {cols} inputs are not a multiple of M={spec.m}, so it is not {spec}: "
                            "leave it out of the export's sparsity targets")
    groups = cols // spec.m
    values = torch.empty(rows, groups * spec.n, dtype=weight.dtype)
    pattern = torch.empty(rows, groups, dtype=torch.uint8)
    pow2 = 1 << torch.arange(spec.m)
    for r0 in range(0, rows, block_rows):
        w = weight[r0:r0 + block_rows].detach().reshape(-1, groups, spec.m)
        nz = w != 0
        count = nz.sum(-1)
        if bool((count > spec.n).any()):
            r, g = (count > spec.n).nonzero()[0].tolist()
            raise CompressError(f"{name} is not {spec}: row {r0 + r}, group {g} (inputs {g * spec.m}-"
                                f"{g * spec.m + spec.m - 1}) has {int(count[r, g])} non-zeros: compress a verified "
                                f"export (maskllm-verify) or leave this layer out of its sparsity targets")
        # keep the non-zeros, then the lowest zero positions: a stable descending sort of "is non-zero"
        order = torch.sort(nz.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :spec.n]
        keep_bits = (pow2[order]).sum(-1)
        pidx = t.bits_to_pattern[keep_bits]
        pos = t.positions.long()[pidx]  # [r, G, N] ascending
        values[r0:r0 + block_rows] = torch.gather(w, -1, pos).reshape(w.shape[0], -1)
        pattern[r0:r0 + block_rows] = pidx.to(torch.uint8)
    if t.groups_per_byte == 2:
        if groups % 2:
            pattern = torch.cat([pattern, torch.zeros(rows, 1, dtype=torch.uint8)], 1)
        idx = pattern[:, 0::2] | (pattern[:, 1::2] << 4)
    else:
        idx = pattern
    return values.contiguous(), idx.contiguous()


class CompressedNMLinear(nn.Module):
    """An inference-only N:M linear (see the module docstring); build it with ``from_linear``."""

    def __init__(self, in_features: int, out_features: int, spec: NMSpec, values: torch.Tensor, idx: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, isa: Optional[str] = None):
        super().__init__()
        self.in_features, self.out_features, self.spec, self.isa = in_features, out_features, spec, isa
        self._tables = tables(spec)
        self.register_buffer("values", values)
        self.register_buffer("idx", idx)
        self.register_buffer("bias", None if bias is None else bias.detach().to(values.dtype).contiguous())
        self._lib = kernel.library(isa)  # built (or loaded) now, not inside the first forward
        self.layout, self.pairs = self._layout(), self._pairs_here()

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: NMSpec, name: str = "linear", isa: Optional[str] = None):
        w = linear.weight
        if w.device.type != "cpu":
            raise CompressError(f"{name} is on {w.device}: the compressed linear runs on the CPU (on CUDA, compress() "
                                "uses torch's semi-structured sparsity); move the model to the CPU")
        if w.dtype not in SUPPORTED_DTYPES:
            raise CompressError(f"{name} is {w.dtype}: the compressed linear runs float32 and bfloat16; load the "
                                "model with torch_dtype=torch.float32 or torch.bfloat16")
        values, idx = compress_weight(w, spec, name)
        return cls(linear.in_features, linear.out_features, spec, values, idx, linear.bias, isa)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.spec}, "
                f"dtype={self.values.dtype}, bias={self.bias is not None}")

    def resident_bytes(self) -> int:
        """Bytes held: kept values, pattern indices and bias."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.idx, self.bias) if t is not None)

    def _layout(self) -> kernel.Layout:
        t = self._tables
        return kernel.Layout(self.in_features, self.idx.shape[1], self.spec.n, self.spec.m, t.groups_per_byte,
                             int(self.values.dtype == torch.bfloat16), t.byte_keep.data_ptr(), t.positions.data_ptr())

    def _apply(self, fn, *args, **kwargs):  # .to(dtype): the layout records the dtype
        out = super()._apply(fn, *args, **kwargs)
        self.layout, self.pairs = self._layout(), self._pairs_here()
        return out

    def decompress_rows(self, r0: int, r1: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows ``[r0, r1)`` of the zero-filled dense weight (into ``out[:r1 - r0]`` if given)."""
        if out is None:
            out = torch.empty(r1 - r0, self.in_features, dtype=self.values.dtype)
        b = self._buffers
        self._lib.maskllm_nm_decompress(self.layout, b["values"].data_ptr(), b["idx"].data_ptr(), out.data_ptr(),
                                        r0, r1, torch.get_num_threads())
        return out[:r1 - r0]

    def to_dense(self) -> torch.Tensor:
        """The whole zero-filled dense weight (tests, export); the forward never builds it."""
        return self.decompress_rows(0, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers
        if x.dtype != b["values"].dtype or not x.is_cpu:
            raise CompressError(f"input is {x.dtype} on {x.device}, the compressed linear holds "
                                f"{b['values'].dtype} on the CPU: pass inputs of the model's dtype")
        tokens = x.numel() // self.in_features
        path = self.path(tokens)
        if path == "kernel":
            y = self.sparse_forward(x, tokens)
        elif path == "gemm":
            y = self.sparse_gemm(x.reshape(tokens, self.in_features))
        elif path == "pairs":
            y = self.pair_gemm(x.reshape(tokens, self.in_features))
        else:
            y = self.tiled_forward(x.reshape(tokens, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    def path(self, tokens: int) -> str:
        """The forward's path for ``tokens`` (module docstring): "kernel", "gemm" (fp32), "pairs" (bf16 2:4
        with AVX512-BF16) or "tiled" (other bf16)."""
        dtype = self._buffers["values"].dtype
        if dtype == torch.float32:
            return "kernel" if tokens <= KERNEL_MAX_TOKENS[dtype] else "gemm"
        if tokens <= (PAIRS_KERNEL_MAX_TOKENS if self.pairs else KERNEL_MAX_TOKENS[dtype]):
            return "kernel"
        return "pairs" if self.pairs else "tiled"

    def sparse_forward(self, x: torch.Tensor, tokens: Optional[int] = None) -> torch.Tensor:
        """The C++ kernel: ``[tokens, out]`` from ``x`` (``[..., in]``; any token count, blocks of 8)."""
        if tokens is None:
            tokens = x.numel() // self.in_features
        x = x.contiguous()
        b = self._buffers
        values, bias = b["values"], b["bias"]
        y = torch.empty(tokens, self.out_features, dtype=values.dtype)
        self._lib.maskllm_nm_linear(self.layout, x.data_ptr(), values.data_ptr(), b["idx"].data_ptr(),
                                    None if bias is None else bias.data_ptr(), y.data_ptr(), tokens,
                                    self.out_features, self._threads())
        return y

    def _threads(self) -> int:
        return torch.get_num_threads() if self.out_features * self.in_features >= PARALLEL_MIN_WEIGHTS else 1

    def sparse_gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """The C++ sparse GEMM: ``[tokens, out]`` from ``[tokens, in]``, multiplying only the kept weights
        (x packed once into fp32 panels of 64 tokens, AVX2: 32; rows shared with the helper threads)."""
        return self._gemm(self._lib.maskllm_nm_gemm, x2)

    def pair_gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """bf16 2:4 where ``pairs``: the C++ pair GEMM, ``[tokens, out]`` from ``[tokens, in]``
        (AVX512-BF16 ``vdpbf16ps``, one per kept pair of 16 rows and token)."""
        if not self.pairs:
            raise CompressError(f"the pair GEMM runs bf16 2:4 on a CPU with AVX512-BF16 (AVX512 build, "
                                f"MASKLLM_NM_PAIRS not 0), not this {self.spec} {self.values.dtype} layer with "
                                f"the {kernel.built_isa(self.isa)} build: call the layer, it picks its path")
        return self._gemm(self._lib.maskllm_nm_gemm_pairs, x2)

    def _gemm(self, fn, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.contiguous()
        b = self._buffers
        values, bias = b["values"], b["bias"]
        y = torch.empty(x2.shape[0], self.out_features, dtype=values.dtype)
        fn(self.layout, x2.data_ptr(), values.data_ptr(), b["idx"].data_ptr(), None if bias is None else bias.data_ptr(),
           y.data_ptr(), x2.shape[0], self.out_features, self._threads())
        return y

    def _pairs_here(self) -> bool:
        """Whether ``pair_gemm`` runs this layer here (bf16 2:4, ``kernel.has_pairs``): decided when the layer
        is built or changes dtype (``self.pairs``), not per forward (``MASKLLM_NM_PAIRS`` is read then)."""
        return (self.values.dtype == torch.bfloat16 and (self.spec.n, self.spec.m) == (2, 4)
                and kernel.has_pairs(self.isa))

    def tile_rows(self) -> int:
        row_bytes = self.in_features * self.values.element_size()
        return min(self.out_features, max(TILE_MIN_ROWS, TILE_BYTES // row_bytes))

    def tiled_forward(self, x2: torch.Tensor, tile_rows: Optional[int] = None) -> torch.Tensor:
        """``[tokens, out]`` from ``[tokens, in]``: ``tile_rows`` output rows at a time decompressed into the
        shared scratch tile and multiplied straight into their columns of the output (``torch.mm``/``addmm``
        with a leading dimension)."""
        x2 = x2.contiguous()
        rows, dtype = self.out_features, self.values.dtype
        tile_rows = tile_rows or self.tile_rows()
        size = min(tile_rows, rows) * self.in_features
        scratch = _scratch.get(dtype)
        if scratch is None or scratch.numel() < size:
            scratch = _scratch[dtype] = torch.empty(size, dtype=dtype)
        tile = scratch[:size].view(-1, self.in_features)
        y = torch.empty(x2.shape[0], rows, dtype=dtype)
        bias = self._buffers["bias"]
        for r0 in range(0, rows, tile_rows):
            r1 = min(rows, r0 + tile_rows)
            w = self.decompress_rows(r0, r1, tile)
            if bias is None:
                torch.mm(x2, w.t(), out=y[:, r0:r1])
            else:
                torch.addmm(bias[r0:r1], x2, w.t(), out=y[:, r0:r1])
        return y


def reference(x: torch.Tensor, layer: CompressedNMLinear) -> torch.Tensor:
    """``F.linear`` on the zero-filled dense weight, in fp32 (the tests' reference)."""
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.to_dense().float(), bias)
