"""Sparse export formats for Hugging Face-style state dicts.

- ``apply_mask_hf``: masked weights as +0.0 (select, never multiply).
- compressed-tensors ``sparse-24-bitmask`` (2:4 only), the layout the ``compressed-tensors`` library
  (0.12.x, ``Sparse24BitMaskTensor``) writes and vLLM / transformers read: per sparse linear
  ``<module>.compressed`` [out, in/2] (kept values, row-major), ``<module>.bitmask`` [out, ceil(in/8)]
  uint8 (``np.packbits(..., bitorder="little")`` along the input dim) and ``<module>.shape`` (int64
  [2, 1]), plus ``quantization_config`` in ``config.json``.
- N:M mask files: pattern indices of every group packed base-C(M,N) into fixed-width chunks
  (0.647 bits/weight for 2:4 against the 0.646 floor), in a safetensors container.
- The mask file MaskLLM published (``np.savez_compressed`` of ``np.packbits`` per ``<param>.mask``).

Masks are always given in the [out, in] layout (N:M groups along the last dim). GPT-2's ``Conv1D``
weights are stored [in, out]; ``hf_weight_is_transposed(config)`` says when.
"""
from __future__ import annotations

import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from maskllm_megatron.checkpoint_folders import MASK_FILE_FORMAT, publish, staging
from maskllm_megatron.convert.io import shard_plan, write_shard_index
from maskllm_megatron.masks.patterns import NMSpec, check_groupable, mask_to_patterns, patterns_to_mask

#: compressed-tensors release whose on-disk sparse-24-bitmask layout this module reproduces.
COMPRESSED_TENSORS_VERSION = "0.12.2"
SPARSE_24_FORMAT = "sparse-24-bitmask"
MASK_FILE_VERSION = "1"
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})
_BLOCK_WEIGHTS = 1 << 22  # weights per block when converting masks <-> pattern indices


class FormatError(ValueError):
    """A file or tensor that does not fit the format; the message names the problem and the fix."""


def hf_weight_is_transposed(config: Mapping) -> bool:
    """True when the architecture stores its linear weights [in, out] (HF ``Conv1D``: GPT-2)."""
    return config.get("model_type") in _CONV1D_MODEL_TYPES


def apply_mask_hf(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` where ``mask`` is set, +0.0 elsewhere; kept -0.0 also become +0.0 (no -0.0 at all)."""
    if mask.shape != weight.shape:
        raise FormatError(f"mask shape {list(mask.shape)} != weight shape {list(weight.shape)}: "
                          f"transpose the mask for [in, out] (Conv1D) weights")
    keep = mask.to(device=weight.device, dtype=torch.bool) & (weight != 0)
    return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)).contiguous()


def first_true(bad: torch.Tensor) -> tuple[int, int]:
    """(row, column) of the first True in a 2-D tensor."""
    i = int(bad.reshape(-1).to(torch.uint8).argmax())
    return divmod(i, bad.shape[-1])


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, with the permissions any new file gets here (the umask's): the
    library creates its files readable by their owner only, which other users of a cluster could not load."""
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ----------------------------------------------------------------------------- compressed-tensors

def compress_24_bitmask(weight: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """2:4 weight [out, in] -> ``{"compressed", "bitmask", "shape"}`` as compressed-tensors stores them.

    With ``mask``, stores ``apply_mask_hf(weight, mask)``. Groups with fewer than two non-zeros keep
    their lowest-index zeros, so every group has exactly two stored values (zeros come back +0.0).
    """
    if weight.dim() != 2:
        raise FormatError(f"sparse-24-bitmask needs a 2-D [out, in] weight, got shape {list(weight.shape)}: "
                          f"compress only linear weights")
    spec = NMSpec(2, 4)
    check_groupable(weight.shape[1], spec)
    w = (apply_mask_hf(weight, mask) if mask is not None else weight).cpu()
    groups = w.reshape(w.shape[0], -1, 4)
    nonzero = groups != 0
    count = nonzero.sum(-1)
    if bool((count > 2).any()):
        row, group = first_true(count > 2)
        raise FormatError(f"weight is not 2:4 at (row {row}, group {group}): {int(count[row, group])} non-zeros "
                          f"of 4; apply a 2:4 mask (apply_mask_hf) before compressing")
    # Rank positions: non-zeros first, then zeros, each by index; keep the first two.
    rank = (~nonzero).to(torch.int64) * 4 + torch.arange(4)
    keep_pos = rank.argsort(dim=-1)[..., :2]
    bytemask = torch.zeros_like(nonzero).scatter_(-1, keep_pos, True).reshape(w.shape)
    values = torch.where(w == 0, torch.zeros((), dtype=w.dtype), w)[bytemask]
    bitmask = torch.from_numpy(np.packbits(bytemask.numpy(), axis=-1, bitorder="little"))
    return {
        "compressed": values.reshape(w.shape[0], w.shape[1] // 2),
        "bitmask": bitmask,
        "shape": torch.tensor(list(w.shape), dtype=torch.int64).reshape(-1, 1),
    }


def decompress_24_bitmask(data: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of ``compress_24_bitmask`` (exact): the dense [out, in] weight."""
    try:
        values, bitmask, shape = data["compressed"], data["bitmask"], data["shape"]
    except KeyError as e:
        raise FormatError(f"sparse-24-bitmask entry lacks {e.args[0]!r}: the checkpoint is incomplete, "
                          f"re-export it") from None
    rows, cols = (int(s) for s in shape.reshape(-1).tolist())
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise FormatError(f"bitmask {bitmask.dtype} {list(bitmask.shape)} does not fit shape [{rows}, {cols}] "
                          f"(want uint8 [{rows}, {(cols + 7) // 8}]): re-export the checkpoint")
    keep = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, count=cols, bitorder="little").astype(bool))
    if int(keep.sum()) != values.numel():
        raise FormatError(f"bitmask sets {int(keep.sum())} positions but {values.numel()} values are stored: "
                          f"the checkpoint is corrupt, re-export it")
    dense = torch.zeros((rows, cols), dtype=values.dtype)
    dense[keep] = values.reshape(-1)
    return dense


def module_name(weight_name: str) -> str:
    """``a.b.q_proj.weight`` -> ``a.b.q_proj``."""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def global_sparsity(state_dict: Mapping[str, torch.Tensor]) -> float:
    """Fraction of zeros among all floating-point parameters (what llm-compressor records)."""
    zeros = total = 0
    for t in state_dict.values():
        if t.is_floating_point():
            zeros += int((t == 0).sum())
            total += t.numel()
    return zeros / total if total else 0.0


def sparsity_config_24(targets: Iterable[str], ignore: Iterable[str], sparsity: float) -> dict:
    """The ``quantization_config`` of a 2:4 sparse-only compressed-tensors model."""
    return {
        "quant_method": "compressed-tensors",
        "version": COMPRESSED_TENSORS_VERSION,
        "sparsity_config": {
            "format": SPARSE_24_FORMAT,
            "sparsity_structure": "2:4",
            "targets": sorted(targets),
            "ignore": sorted(ignore),
            "global_sparsity": sparsity,
            "registry_requires_subclass": False,
        },
        "transform_config": {},
    }


def save_compressed_tensors(folder: str | Path, state_dict: Mapping[str, torch.Tensor], config: Mapping,
                            targets: Iterable[str], max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a compressed-tensors sparse-24-bitmask HF folder (config.json + safetensors shards).

    ``state_dict`` holds the already-masked HF weights; ``targets`` are the weight names to compress
    (each must be 2:4 along its input dim). Other tensors are stored as they are. The folder is
    assembled under a temporary name and renamed, so it is complete or absent.
    """
    if hf_weight_is_transposed(config):
        raise FormatError(f"compressed-tensors stores [out, in] weights but {config.get('model_type')} keeps "
                          f"Conv1D weights [in, out]: export a plain HF folder instead")
    folder = Path(folder).absolute()
    if folder.exists():
        raise FormatError(f"output {folder} already exists: remove it or choose another folder")
    targets = set(targets)
    missing = sorted(targets - set(state_dict))
    if missing:
        raise FormatError(f"target {missing[0]!r} is not in the state dict: pass HF weight names as targets")
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if name in targets:
            for key, value in compress_24_bitmask(t).items():
                out[f"{module_name(name)}.{key}"] = value
        else:
            out[name] = t
    ignore = {module_name(n) for n, t in state_dict.items() if n.endswith(".weight") and t.dim() == 2} - {
        module_name(n) for n in targets}
    cfg = dict(config)
    cfg["quantization_config"] = sparsity_config_24({module_name(n) for n in targets}, ignore,
                                                    global_sparsity(state_dict))
    with staging(folder, f"tmp-{os.getpid()}", collective=False) as tmp:
        _write_shards(tmp, out, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        publish(tmp, folder, collective=False)
    return folder


def _write_shards(folder: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> None:
    """safetensors shards of at most ``max_shard_bytes`` plus an index when there are several (tensors of
    any dtypes; the converter's ``ShardWriter`` streams one dtype)."""
    sizes = [(name, t.numel() * t.element_size()) for name, t in tensors.items()]
    plan = shard_plan(sizes, max_shard_bytes)
    for fname, names in plan:
        _save_safetensors({name: tensors[name].contiguous() for name in names}, folder / fname, {"format": "pt"})
    write_shard_index(folder, plan, sum(nbytes for _, nbytes in sizes))


# ----------------------------------------------------------------------------- mask files

def nm_floor_bits(spec: NMSpec) -> float:
    """Information floor of an N:M mask in bits per weight: log2(C(M, N)) / M."""
    return math.log2(spec.num_patterns) / spec.m


def chunk_layout(num_patterns: int) -> tuple[int, int]:
    """(groups per chunk, bits per chunk) packing base-``num_patterns`` digits most tightly in <= 62 bits."""
    if num_patterns == 1:
        return 1, 0
    if num_patterns > 2**62:
        raise FormatError(f"{num_patterns} patterns per group do not fit 62 bits: use a smaller M")
    best = None
    k = 1
    while num_patterns**k <= 2**62:
        bits = (num_patterns**k - 1).bit_length()
        if best is None or bits * best[0] < best[1] * k:
            best = (k, bits)
        k += 1
    return best


def pack_pattern_indices(index: np.ndarray, num_patterns: int) -> np.ndarray:
    """Pattern indices (any int array, values < C) -> uint8 bytes: k digits per chunk, chunks of b bits."""
    k, bits = chunk_layout(num_patterns)
    flat = np.asarray(index, dtype=np.int64).reshape(-1)
    if bits == 0:
        return np.zeros(0, dtype=np.uint8)
    digits = np.zeros(-(-flat.size // k) * k, dtype=np.int64)
    digits[: flat.size] = flat
    digits = digits.reshape(-1, k)
    value = np.zeros(digits.shape[0], dtype=np.int64)
    for j in range(k - 1, -1, -1):  # Horner: digit 0 is the least significant
        value = value * num_patterns + digits[:, j]
    bit_planes = ((value[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(bit_planes.reshape(-1), bitorder="little")


def unpack_pattern_indices(data: np.ndarray, count: int, num_patterns: int) -> np.ndarray:
    """Inverse of ``pack_pattern_indices``: ``count`` int64 indices; raises on corrupt data."""
    k, bits = chunk_layout(num_patterns)
    if bits == 0:
        return np.zeros(count, dtype=np.int64)
    chunks = -(-count // k)
    if data.size != -(-chunks * bits // 8):
        raise FormatError(f"packed mask has {data.size} bytes, expected {-(-chunks * bits // 8)}: "
                          f"the mask file is truncated or corrupt, re-save it")
    bit_planes = np.unpackbits(data, count=chunks * bits, bitorder="little").reshape(chunks, bits)
    value = (bit_planes.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(-1)
    if bool((value >= num_patterns**k).any()):
        raise FormatError("packed mask holds an out-of-range chunk: the mask file is corrupt, re-save it")
    digits = np.empty((chunks, k), dtype=np.int64)
    for j in range(k):
        digits[:, j] = value % num_patterns
        value //= num_patterns
    return digits.reshape(-1)[:count]


def _rows_per_block(cols: int) -> int:
    return max(1, _BLOCK_WEIGHTS // max(cols, 1))


def save_masks(path: str | Path, masks: Mapping[str, torch.Tensor], spec: NMSpec) -> dict:
    """Save N:M masks ([.., out, in] layout, {0,1}) compactly; atomic. Returns size statistics.

    Each mask becomes its groups' pattern indices, packed ``chunk_layout`` digits per chunk.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    weights = 0
    for name, mask in masks.items():
        if mask.dim() < 1:
            raise FormatError(f"mask {name!r} is a scalar: pass [out, in] masks")
        check_groupable(mask.shape[-1], spec, what=f"mask {name!r}")
        rows = mask.reshape(-1, mask.shape[-1])
        step = _rows_per_block(rows.shape[1])
        try:
            index = torch.cat([torch.zeros(0, dtype=torch.int64)] + [
                mask_to_patterns(rows[i:i + step], spec).reshape(-1) for i in range(0, rows.shape[0], step)])
        except ValueError as e:
            raise FormatError(f"mask {name!r}: {e}") from None
        tensors[name] = torch.from_numpy(pack_pattern_indices(index.numpy(), spec.num_patterns))
        shapes[name] = list(mask.shape)
        weights += mask.numel()
    k, bits = chunk_layout(spec.num_patterns)
    meta = {"format": MASK_FILE_FORMAT, "version": MASK_FILE_VERSION, "nm": str(spec),
            "groups_per_chunk": str(k), "bits_per_chunk": str(bits), "shapes": json.dumps(shapes)}
    with staging(path, f"tmp-{os.getpid()}", collective=False) as tmp:
        _save_safetensors(tensors, tmp / path.name, meta)
        publish(tmp / path.name, path, collective=False)
    size = path.stat().st_size
    return {"path": str(path), "weights": weights, "bytes": size,
            "bits_per_weight": 8 * size / weights if weights else 0.0, "floor_bits_per_weight": nm_floor_bits(spec)}


def read_mask_file_header(path: str | Path) -> tuple[NMSpec, dict[str, list[int]]]:
    """(N:M, shapes by name) of a mask file written by ``save_masks``."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise FormatError(f"{path} is not a safetensors mask file ({e}): pass a file written by maskllm-export --format masks") from None
    if meta.get("format") != MASK_FILE_FORMAT:
        raise FormatError(f"{path} is not a {MASK_FILE_FORMAT} mask file: pass a file written by maskllm-export --format masks")
    if meta.get("version") != MASK_FILE_VERSION:
        raise FormatError(f"{path} is mask file version {meta.get('version')}, this code reads "
                          f"{MASK_FILE_VERSION}: upgrade maskllm-megatron")
    spec = NMSpec.parse(meta["nm"])
    if (str(chunk_layout(spec.num_patterns)[0]), str(chunk_layout(spec.num_patterns)[1])) != (
            meta.get("groups_per_chunk"), meta.get("bits_per_chunk")):
        raise FormatError(f"{path} uses an unknown chunk layout: re-save it with this version")
    return spec, json.loads(meta["shapes"])


def iter_mask_file(path: str | Path):
    """Yield ``(name, pattern indices [.., out, in / M])`` of a ``save_masks`` file, one at a time."""
    spec, shapes = read_mask_file_header(path)
    with safe_open(str(path), framework="pt") as f:
        for name, shape in shapes.items():
            shape = list(shape)
            groups = shape[:-1] + [shape[-1] // spec.m]
            index = unpack_pattern_indices(f.get_tensor(name).numpy(), math.prod(groups), spec.num_patterns)
            yield name, torch.from_numpy(index).reshape(groups)


def load_masks(path: str | Path) -> tuple[dict[str, torch.Tensor], NMSpec]:
    """Read a ``save_masks`` file: ({name: bool mask [.., out, in]}, N:M)."""
    spec, _ = read_mask_file_header(path)
    masks = {name: patterns_to_mask(index, spec, dtype=torch.bool) for name, index in iter_mask_file(path)}
    return masks, spec


def is_published_mask_file(path: str | Path) -> bool:
    """True for MaskLLM's published ``.npz`` (a zip of ``<param>.mask.npy`` packbits arrays)."""
    return zipfile.is_zipfile(path)


def iter_published_masks(path: str | Path):
    """Yield ``(param name, flat uint8 {0,1} bits)`` from MaskLLM's ``mask_compressed.npz`` layout
    (``np.packbits`` of the flattened mask in the parameter's own shape, big-endian bit order)."""
    with np.load(path) as npz:
        for key in npz.files:
            name = re.sub(r"\.mask$", "", key)
            yield name, np.unpackbits(npz[key])


def apply_mask_file(hf_state_dict: Mapping[str, torch.Tensor], mask_file: str | Path,
                    config: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Masked copy of ``hf_state_dict`` using a ``save_masks`` file or MaskLLM's published ``.npz``.

    Our masks are [out, in]; with a Conv1D ``config`` (GPT-2) they are transposed to the HF layout.
    Tensors without a mask are returned unchanged.
    """
    out = dict(hf_state_dict)

    def target(name: str) -> torch.Tensor:
        if name not in out:
            raise FormatError(f"mask file has a mask for {name!r}, which is not in the state dict: "
                              f"use the mask file of this model")
        return out[name]

    if is_published_mask_file(mask_file):
        for name, bits in iter_published_masks(mask_file):
            w = target(name)
            padded = -(-w.numel() // 8) * 8  # np.packbits pads the last byte with zero bits
            if bits.size != padded or bits[w.numel():].any():
                raise FormatError(f"mask for {name!r} holds {bits.size} bits, not the {w.numel()} of its weight "
                                  f"{list(w.shape)} (packed to {padded}): use the mask file of this model")
            out[name] = apply_mask_hf(w, torch.from_numpy(bits[: w.numel()].astype(bool)).reshape(w.shape))
        return out
    masks, _ = load_masks(mask_file)
    transposed = config is not None and hf_weight_is_transposed(config)
    for name, mask in masks.items():
        w = target(name)
        out[name] = apply_mask_hf(w, mask.t() if transposed else mask)
    return out
