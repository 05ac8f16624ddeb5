"""N:M verifier for exported checkpoints and mask files (the ``maskllm-verify`` command).

Checks that every targeted weight keeps at most N non-zeros in each group of M consecutive weights
along its input dimension, and that no zero is a -0.0. Reads a Hugging Face folder (dense or masked
safetensors), a compressed-tensors ``sparse-24-bitmask`` folder, a megatron-core export (``--format
mcore``: each masked weight with its stored mask, read from the dist checkpoint without megatron), a
``save_masks`` mask file or MaskLLM's published ``.npz`` mask file; one tensor at a time.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from maskllm_megatron.checkpoint_folders import (DIGEST_ALGORITHM, SPARSITY_FILE, digest_problem, is_dist_checkpoint,
                                                read_digests, read_metadata)
from maskllm_megatron.convert.io import ConversionError, HFCheckpoint, read_json
from maskllm_megatron.export.formats import (
    SPARSE_24_FORMAT, FormatError, decompress_24_bitmask, first_true, hf_weight_is_transposed,
    is_published_mask_file, iter_mask_file, iter_published_masks, module_name, read_mask_file_header)
from maskllm_megatron.masks.patterns import NMSpec, patterns_to_mask
from maskllm_megatron.run_folder import is_run_checkpoint, resolve_run_checkpoint, tell

#: Linear weights of transformer blocks (LLaMA/Mistral/Qwen-style and GPT-2 names).
DEFAULT_TARGETS = (r"(^|\.)(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj"
                   r"|c_attn|c_proj|c_fc)\.weight$")
_COMPRESSED_KEYS = ("compressed", "bitmask", "shape")


@dataclass
class VerifyReport:
    """What was checked, skipped and found wrong."""

    kind: str
    spec: NMSpec
    checked: int = 0
    weights: int = 0
    zeros: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    untargeted: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    failed: int = 0

    def add(self, name: str, w: torch.Tensor, exact: bool = False,
            where: Callable[[int, int], str] | None = None) -> None:
        """Check one [out, in] tensor and count it."""
        self._count(w, check_weight(name, w, self.spec, exact, where))

    def add_masked(self, name: str, w: torch.Tensor, mask: torch.Tensor) -> None:
        """Check a weight stored with its boolean mask (megatron-core exports) and count it once: the
        weight as ``add`` does, the mask exactly N of M, and the weight zero wherever the mask is unset."""
        problems = check_weight(name, w, self.spec)
        problems += check_weight(name.removesuffix(".weight") + ".prior_mask", mask.to(torch.uint8), self.spec,
                                 exact=True)
        if bool((w[~mask] != 0).any()):
            problems.append(f"{name}: non-zero weights where the stored mask is unset")
        self._count(w, problems)

    def _count(self, w: torch.Tensor, problems: list[str]) -> None:
        self.failures += problems
        self.failed += bool(problems)
        self.checked += 1
        self.weights += w.numel()
        self.zeros += int((w == 0).sum())

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not self.failures

    def summary(self) -> str:
        sparsity = self.zeros / self.weights if self.weights else 0.0
        lines = [f"{self.kind}: {self.checked} tensors checked for {self.spec} ({self.weights:,} weights), "
                 f"sparsity {100 * sparsity:.2f}% (N:M implies >= {100 * (1 - self.spec.n / self.spec.m):.2f}%)"]
        for name, why in self.skipped:
            lines.append(f"  skipped {name}: {why}")
        if self.untargeted:
            lines.append(f"  not targeted (left dense): {len(self.untargeted)} 2-D weights, e.g. "
                         + ", ".join(self.untargeted[:4]))
        if self.checked == 0:
            lines.append("FAILED: no tensor was checked: pass --targets REGEX matching the sparse weights")
        elif self.failures:
            lines.append(f"FAILED: {self.failed} of {self.checked} tensors violate {self.spec} or hold -0.0")
        else:
            lines.append("OK")
        return "\n".join(lines)


def check_weight(name: str, w: torch.Tensor, spec: NMSpec, exact: bool = False,
                 where: Callable[[int, int], str] | None = None) -> list[str]:
    """Problems of one [out, in] tensor: first group with more than N non-zeros (exactly N when
    ``exact``, for masks) and first -0.0; ``where(row, group)`` words a position."""
    where = where or (lambda r, g: f"row {r}, group {g} (input columns {g * spec.m}..{g * spec.m + spec.m - 1})")
    problems = []
    count = (w.reshape(w.shape[0], -1, spec.m) != 0).sum(-1)
    bad = count != spec.n if exact else count > spec.n
    if bool(bad.any()):
        r, g = first_true(bad)
        problems.append(f"{name}: not {spec} at {where(r, g)}: {int(count[r, g])} non-zeros of {spec.m} "
                        f"({int(bad.sum())} bad groups)")
    if w.is_floating_point():
        neg_zero = (w == 0) & torch.signbit(w)
        if bool(neg_zero.any()):
            r, c = first_true(neg_zero)
            problems.append(f"{name}: -0.0 at {where(r, c // spec.m)}, column {c} ({int(neg_zero.sum())} in all); "
                            f"mask with apply_mask_hf (torch.where), not a multiply")
    return problems


def _matches(module: str, patterns: list[str], default: re.Pattern) -> bool:
    """compressed-tensors target semantics: exact module name, ``re:`` regex, or a class name
    (taken as the default linear-weight names)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], module):
                return True
        elif p == module or (p[:1].isupper() and "." not in p and default.search(module + ".weight")):
            return True
    return False


def _hf_weights(ckpt: HFCheckpoint) -> Iterator[tuple[str, Callable[[], torch.Tensor], bool]]:
    """(weight name, loader, is compressed) for every tensor; compressed triples come back dense."""
    names = sorted(ckpt.weight_map, key=ckpt.shard_order)
    modules = {n[: -len(".bitmask")] for n in names if n.endswith(".bitmask")}
    for n in names:
        mod, _, key = n.rpartition(".")
        if mod in modules and key in _COMPRESSED_KEYS:
            if key == "bitmask":
                yield f"{mod}.weight", (lambda m=mod: decompress_24_bitmask(
                    {k: ckpt.read(f"{m}.{k}") for k in _COMPRESSED_KEYS})), True
        else:
            yield n, (lambda n=n: ckpt.read(n)), False


def verify_hf_folder(folder: Path, spec: NMSpec | None = None, targets: str | None = None,
                     skip: str | None = None) -> VerifyReport:
    """Verify an HF or compressed-tensors folder (see the module docstring)."""
    ckpt = HFCheckpoint(folder)
    sparsity = (ckpt.config.get("quantization_config") or {}).get("sparsity_config") or {}
    # our exports (maskllm-export, apply-masks) record the structure and the exact tensors they masked
    record = ckpt.config.get("sparsity")
    record = record if isinstance(record, dict) and "structure" in record else {}
    named = set(record.get("targets") or ())
    if spec is None:
        structure = record.get("structure") or sparsity.get("sparsity_structure")
        spec = NMSpec.parse(structure) if structure and ":" in structure else NMSpec(2, 4)
    compressed = sparsity.get("format") == SPARSE_24_FORMAT
    report = VerifyReport("compressed-tensors sparse-24-bitmask folder" if compressed else "Hugging Face folder", spec)
    transposed = hf_weight_is_transposed(ckpt.config)
    default = re.compile(DEFAULT_TARGETS)
    target_re = re.compile(targets) if targets else None
    skip_re = re.compile(skip) if skip else None
    for name, load, is_compressed in _hf_weights(ckpt):
        module = module_name(name)
        if target_re is not None:
            targeted = bool(target_re.search(name))
        elif named:
            targeted = name in named
        elif sparsity:
            targeted = _matches(module, sparsity.get("targets") or ["Linear"], default)
        else:
            targeted = bool(default.search(name))
        if not (targeted or is_compressed):
            if name.endswith(".weight") and len(ckpt.shape(name)) == 2:
                report.untargeted.append(name)
            continue
        if skip_re is not None and skip_re.search(name):
            report.skipped.append((name, "matches --skip"))
            continue
        if target_re is None and not is_compressed and _matches(module, sparsity.get("ignore") or [], default):
            report.skipped.append((name, "in the config's sparsity ignore list"))
            continue
        w = load()
        if w.dim() != 2:
            report.skipped.append((name, f"{w.dim()}-D, not a linear weight"))
            continue
        if transposed and not is_compressed:
            w = w.t()
        if w.shape[1] % spec.m:
            report.skipped.append((name, f"input dim {w.shape[1]} is not a multiple of M={spec.m}"))
            continue
        report.add(name, w)
    return report


def _drop_packbits_padding(bits, m: int):
    """The published layout stores no shape: drop the whole all-zero groups that fit in the last
    byte's padding (at most 7 bits; a valid N:M group is never all zero)."""
    end = bits.size // m * m
    while end >= m and end - m >= bits.size - 7 and not bits[end - m:end].any():
        end -= m
    return bits[:end]


def verify_mask_file(path: Path, spec: NMSpec | None = None) -> VerifyReport:
    """Verify a ``save_masks`` file or a published MaskLLM ``.npz``: exactly N kept per group."""
    if is_published_mask_file(path):
        spec = spec or NMSpec(2, 4)
        report = VerifyReport("published MaskLLM mask file (.npz)", spec)
        for name, bits in iter_published_masks(path):
            flat = torch.from_numpy(_drop_packbits_padding(bits, spec.m)).reshape(1, -1)
            report.add(name, flat, exact=True,
                       where=lambda r, g: f"flat group {g} (weights {g * spec.m}..{g * spec.m + spec.m - 1})")
        return report
    file_spec, _ = read_mask_file_header(path)
    if spec is not None and spec != file_spec:
        raise FormatError(f"{path} holds {file_spec} masks, not {spec}: drop --nm or pass --nm {file_spec}")
    report = VerifyReport("maskllm mask file", file_spec)
    for name, index in iter_mask_file(path):
        mask = patterns_to_mask(index, file_spec, dtype=torch.uint8)
        report.add(name, mask.reshape(-1, mask.shape[-1]), exact=True)
    return report


def _layer_names(key: str, stacked: int) -> list[str]:
    """megatron-core stacks the blocks' tensors into one global ``decoder.layers.<module>`` tensor:
    the per-block names ``decoder.layers.<i>.<module>``."""
    if stacked == 1 and not key.startswith("decoder.layers."):
        return [key]
    head, sep, tail = key.partition("decoder.layers.")
    return [f"{head}{sep}{i}.{tail}" if sep else f"{key}[{i}]" for i in range(stacked)]


def verify_mcore_folder(folder: Path, spec: NMSpec | None = None, targets: str | None = None,
                        skip: str | None = None) -> VerifyReport:
    """Verify a megatron-core export (``maskllm-export --format mcore``): every weight stored with a
    ``prior_mask`` is checked with it (``VerifyReport.add_masked``). Reads the dist checkpoint with
    torch.distributed.checkpoint in this one process, one module's tensors at a time; no megatron."""
    from torch.distributed.checkpoint import FileSystemReader, load

    meta = read_metadata(folder).state_dict_metadata  # refuses a planted pickle before torch unpickles it
    record_file = folder / SPARSITY_FILE
    record = read_json(record_file) if record_file.is_file() else {}
    spec = spec or NMSpec.parse(record.get("structure", "2:4"))
    report = VerifyReport("megatron-core checkpoint", spec)
    mask_keys = sorted(k for k in meta if k.endswith(".prior_mask"))
    if any(k.endswith(".mask_logits") for k in meta):
        raise FormatError(f"{folder} is a mask-learning checkpoint (dense weights and logits): export it first, "
                          f"maskllm-export --ckpt {folder} --out OUT --format mcore, and verify OUT")
    if not mask_keys:
        raise FormatError(f"{folder} is a megatron-core checkpoint without masks (prior_mask): pass a folder "
                          "written by maskllm-export --format mcore")
    wanted, unwanted = re.compile(targets or ".*"), re.compile(skip) if skip else None
    for mask_key in mask_keys:
        key = mask_key.removesuffix(".prior_mask") + ".weight"
        if key not in meta:
            raise FormatError(f"{folder}: {mask_key} has no weight {key}: the checkpoint is incomplete")
        tensors = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in (key, mask_key)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            load(tensors, storage_reader=FileSystemReader(str(folder)), no_dist=True)
        w, mask = tensors[key], tensors[mask_key]
        stacked = w.reshape(-1, *w.shape[-2:]), mask.reshape(-1, *mask.shape[-2:])
        for name, wi, mi in zip(_layer_names(key, stacked[0].shape[0]), *stacked):
            if unwanted is not None and unwanted.search(name):
                report.skipped.append((name, "matches --skip"))
            elif wanted.search(name):
                report.add_masked(name, wi, mi)
    return report


def verify_path(path: str | Path, spec: NMSpec | None = None, targets: str | None = None,
                skip: str | None = None) -> VerifyReport:
    """Verify a model folder (HF, compressed-tensors, megatron-core export) or a mask file."""
    path = Path(path)
    if path.is_dir():
        if is_dist_checkpoint(path):
            return verify_mcore_folder(path, spec, targets, skip)
        if not (path / "config.json").is_file():
            raise FormatError(f"{path} is neither a Hugging Face / compressed-tensors folder (no config.json) nor a "
                              "megatron-core export (no metadata.json and .metadata): pass an exported folder")
        return verify_hf_folder(path, spec, targets, skip)
    if path.is_file():
        return verify_mask_file(path, spec)
    raise FormatError(f"{path} does not exist: pass an HF/compressed-tensors/megatron-core folder or a mask file")


def verify_run_checkpoint(path: str | Path) -> int:
    """A run checkpoint (or a run folder: the checkpoint ``run_folder`` says it means, before its digests
    are read, so that a damaged newest one is reported, not passed over): every file against the digests
    its rank recorded when it saved. Prints the result; 0 when all match, 1 on a damaged file. Its masks
    are not N:M yet (logits): those are checked on an export."""
    ckpt = resolve_run_checkpoint(path, verify=False, say=tell)
    files = read_digests(ckpt)
    if files is None:
        raise FormatError(f"{ckpt} has no digests (saved before maskllm-train recorded them): nothing to check; "
                          f"export it (maskllm-export --ckpt {ckpt} --out OUT) and verify OUT")
    problem = digest_problem(ckpt)
    if problem:
        print(f"FAIL {problem}")
        return 1
    print(f"run checkpoint {ckpt}: {len(files)} files, {sum(f['bytes'] for f in files.values()):,} bytes, match "
          f"their {DIGEST_ALGORITHM} digests (the masks are checked N:M on an export: maskllm-export --ckpt {ckpt})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from maskllm_megatron.launch import quiet_known_warnings, user_error

    quiet_known_warnings()
    parser = argparse.ArgumentParser(
        prog="maskllm-verify", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check that an exported checkpoint or mask file is valid N:M sparse along the input dim "
                    "(and holds no -0.0). Exit status 0 when valid, 1 on a violation, 2 on unreadable input.",
        epilog="examples:\n  maskllm-verify out/llama-2-7b-2of4-hf\n  maskllm-verify masks.safetensors --nm 2:4")
    parser.add_argument("path", help="HF folder, compressed-tensors folder, megatron-core export folder, or mask "
                                     "file (.safetensors / .npz); a run checkpoint: its files' digests")
    parser.add_argument("--nm", help="N:M to check, e.g. 2:4 (default: the structure that config.json's "
                                     "'sparsity' record (our exports) or sparsity_config names, else 2:4)")
    parser.add_argument("--targets", help="regex of weight names to check, overriding the config (default: the "
                                          "tensors our export's 'sparsity' record lists, else sparsity_config's "
                                          "targets less its ignore list, else the q/k/v/o/gate/up/down_proj "
                                          "and c_attn/c_proj/c_fc weights)")
    parser.add_argument("--skip", help="regex of weight names to leave unchecked (listed as skipped)")
    args = parser.parse_args(argv)
    try:
        if Path(args.path).is_dir() and is_run_checkpoint(args.path):
            return verify_run_checkpoint(args.path)
        spec = NMSpec.parse(args.nm) if args.nm else None
        report = verify_path(args.path, spec, args.targets, args.skip)
    except (FormatError, ConversionError, ValueError, re.error) as e:  # CheckpointMismatch is a ValueError
        return user_error(f"maskllm-verify: error: {e}")
    for line in report.failures:
        print(f"FAIL {line}")
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
