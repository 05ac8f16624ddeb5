"""Export a mask-learning checkpoint with its hard N:M masks (``maskllm-export``).

A run checkpoint (``OUT/checkpoints/iter_XXXXXXX``, any TP/PP) holds the frozen weights, the mask
logits (+ prior masks) and optimizer state; its extra state (``extra_state.json``) names the converted checkpoint it
started from and the N:M / include / exclude settings. Export loads it at this world's TP (PP=1)
without the optimizer, takes every masked layer's argmax mask (or its prior mask: one-shot baselines),
writes ``W`` where the mask is set and +0.0 elsewhere (a select, never a multiply: no -0.0), and writes:

- ``mcore``: a converter-style checkpoint folder (dist checkpoint + ``model_config.json`` +
  ``tokenizer/``) without logits or optimizer state; each masked layer keeps its boolean mask as its
  ``prior_mask`` tensor, and ``sparsity.json`` records the structure. The converter's dense loader
  (``load_mcore_model``) reads it at any TP; ``load_checkpoint`` into a sparsified model gets the masks.
- ``hf``: the converter's mcore -> HF path run on that trimmed checkpoint, plus a ``"sparsity"`` entry
  in ``config.json``.
- ``compressed-tensors``: the HF weights as ``sparse-24-bitmask`` (2:4 only; not GPT-2's Conv1D).
- ``masks``: a ``save_masks`` file under the HF weight names ([out, in] layout).

Everything is assembled in a hidden ``.<name>.work`` folder next to the output (``checkpoint_folders.staging``;
it also holds the calibration cache), verified, then renamed into place: the output is complete or absent.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

import torch

from maskllm_megatron.checkpoint_folders import SPARSITY_FILE, check_output, check_room, is_rank0, publish, staging
from maskllm_megatron.convert.io import ConversionError, copy_tokenizer
from maskllm_megatron.export.formats import global_sparsity, hf_weight_is_transposed, save_compressed_tensors, save_masks
from maskllm_megatron.export.trim import (MaskedTensor, hf_masks, hf_rules, mask_source_name, save_trimmed_mcore, trim_,
                                          verify_mcore, weights_record)
from maskllm_megatron.masks.patterns import NMSpec
from maskllm_megatron.megatron.parallel import init_parallel
from maskllm_megatron.run_checkpoint import RunCheckpoint, load_masked_model

if TYPE_CHECKING:
    from maskllm_megatron.export.reconstruct import ReconstructRequest

Format = Literal["mcore", "hf", "compressed-tensors", "masks"]
FORMATS: tuple[str, ...] = ("mcore", "hf", "compressed-tensors", "masks")


class ExportError(ConversionError):
    """The input or the request does not allow this export (message: problem and fix)."""


@dataclass(frozen=True)
class ExportConfig:
    """One ``maskllm-export`` request."""

    ckpt: Path
    out: Path
    format: Format
    use_prior: bool = False
    base: Optional[Path] = None  # converted checkpoint, when the run's model.checkpoint path moved
    overwrite: bool = False
    max_shard_bytes: int = 5 * 2**30
    reconstruct: Optional["ReconstructRequest"] = None  # refit the kept weights on calibration data

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ExportError(f"unknown format {self.format!r}: use one of {', '.join(FORMATS)}")
        if self.reconstruct is not None and self.format == "masks":
            raise ExportError("--reconstruct changes weights, and a masks file holds none: export --format hf, "
                              "mcore or compressed-tensors")


@dataclass
class ExportResult:
    """What was written and what it costs (filled on rank 0)."""

    out: Path
    format: str
    structure: str
    mask_source: str
    targets: int = 0
    sparsity: float = 0.0  # zeros among the masked weights
    model_sparsity: Optional[float] = None  # zeros among all floating-point HF parameters
    bytes: int = 0
    dense_bytes: int = 0
    masked_weights: int = 0
    bits_per_weight: Optional[float] = None
    floor_bits_per_weight: Optional[float] = None
    verify_summary: str = ""
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    reconstruction: Optional[dict] = None  # what --reconstruct did (the sparsity record's "reconstruction")

    def summary(self) -> str:
        lines = [f"wrote {self.format} export {self.out} ({', '.join(self.files[:4])}"
                 + (" ..." if len(self.files) > 4 else "") + f") in {self.seconds:.1f}s",
                 f"  {self.structure} {self.mask_source} masks on {self.targets} masked layers, "
                 f"{self.masked_weights:,} weights, sparsity {100 * self.sparsity:.2f}% of the masked weights"
                 + (f", {100 * self.model_sparsity:.2f}% of all parameters" if self.model_sparsity is not None else ""),
                 f"  size {_mib(self.bytes)} vs dense {_mib(self.dense_bytes)} "
                 f"({100 * self.bytes / max(self.dense_bytes, 1):.1f}%)"]
        if self.reconstruction is not None:
            r = self.reconstruction
            how = r['method'] + (", dense target" if r.get("target") == "dense" else "") + \
                (", true sequential" if r.get("true_sequential") else "")
            lines.append(f"  reconstructed ({how}, percdamp {r['percdamp']:g}) on {r['calib_samples']} x "
                         f"{r['calib_seq_len']} tokens of {r['calib_source']} in {r['seconds']:.1f}s: masked layers' "
                         f"calibration error {r['error_before']:.4g} -> {r['error_after']:.4g} "
                         f"({100 * (r['error_after'] / max(r['error_before'], 1e-30) - 1):+.1f}%)")
        if self.bits_per_weight is not None:
            lines.append(f"  {self.bits_per_weight:.4f} bits/weight (floor log2(C)/M = {self.floor_bits_per_weight:.4f}, "
                         f"{100 * (self.bits_per_weight / self.floor_bits_per_weight - 1):+.2f}%)")
        lines.append("  verify: " + self.verify_summary.replace("\n", "\n  verify: "))
        return "\n".join(lines)


def check_request(cfg: ExportConfig) -> RunCheckpoint:
    """Every check that needs no model: fail before loading anything. (The calibration of ``--reconstruct``
    is checked by ``plan_calibration``, which ``export`` calls.)"""
    run = RunCheckpoint.open(cfg.ckpt, cfg.base)
    check_output(cfg.out, cfg.overwrite, "maskllm-export", [run.path, run.base])
    run.check_mask_source(cfg.use_prior, "export")
    if cfg.format == "compressed-tensors":
        if run.nm != NMSpec(2, 4):
            raise ExportError(f"compressed-tensors stores 2:4 only, the run learned {run.nm} masks: export "
                              f"--format hf, mcore or masks")
        if hf_weight_is_transposed({"model_type": run.model_type}):
            raise ExportError(f"compressed-tensors stores [out, in] weights but {run.model_type} keeps Conv1D "
                              f"weights [in, out]: export --format hf instead")
    needed, basis = export_bytes(run, cfg.format)
    check_room(cfg.out, needed, f"the {cfg.format} export", basis)  # before anything is loaded or written
    return run


#: What the work folder holds at its fullest, in units of the dense checkpoint's size: the trimmed mcore
#: copy, then the HF conversion beside it, then the compressed copy beside both; a mask file is at most
#: 1 bit a 16-bit weight (it stores about 0.65).
WORK_COPIES = {"masks": 1 / 16, "mcore": 1.0, "hf": 2.0, "compressed-tensors": 3.0}


def export_bytes(run: RunCheckpoint, fmt: str) -> tuple[int, str]:
    """The bytes an export in ``fmt`` writes before it is renamed into place (``check_room`` refuses the
    export before anything is loaded when they do not fit), and how they were judged."""
    copies = WORK_COPIES[fmt]
    return int(folder_bytes(run.base) * copies), f"{copies:g} x the dense checkpoint {run.base.name}"


def export(cfg: ExportConfig) -> Optional[ExportResult]:
    """Run one export on every rank of a TP-sized world (one process when launched plainly).
    Returns the ``ExportResult`` on rank 0, None on the other ranks."""
    import torch.distributed as dist

    t0 = time.time()
    run = check_request(cfg)
    plan = None
    if cfg.reconstruct is not None:  # the calibration source exists, fits the model and holds enough tokens
        from maskllm_megatron.export.reconstruct import plan_calibration

        plan = plan_calibration(cfg.reconstruct, run)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    run.info.model.validate_parallel(world, 1)
    init_parallel(tp=world, pp=1)
    out = cfg.out.absolute()
    with staging(out, "work", needed=export_bytes(run, cfg.format)[0]) as work:
        model = load_masked_model(run, use_prior=cfg.use_prior)
        reconstruction = None
        if cfg.reconstruct is not None:  # under the masks trim_ applies: the prior's or the argmax
            from maskllm_megatron.export.reconstruct import reconstruct_model

            reconstruction = reconstruct_model(model, cfg.reconstruct, plan, run, work / "calib-cache")
        trimmed = trim_(model, cfg.use_prior)
        result = ExportResult(out, cfg.format, str(run.nm), mask_source_name(cfg.use_prior), targets=len(trimmed),
                              reconstruction=reconstruction)
        if cfg.format == "masks":
            final = _export_masks(run, trimmed, work, result)
        else:
            save_trimmed_mcore(model, run, trimmed, work / "mcore", cfg.use_prior, reconstruction)
            del model, trimmed
            if cfg.format == "mcore":
                final = _finish_mcore(run, work, result)
            else:
                final = _export_hf(run, cfg, work, result)
        publish(final, out, "maskllm-export")
    if not is_rank0():
        return None
    result.files = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else [out.name]
    result.seconds = time.time() - t0
    return result


def _finish_mcore(run: RunCheckpoint, work: Path, result: ExportResult) -> Path:
    report = verify_mcore(run, work / "mcore")
    if report is not None:
        accept_report(report, result)
        result.bytes, result.dense_bytes = folder_bytes(work / "mcore"), folder_bytes(run.base)
        record = json.loads((work / "mcore" / SPARSITY_FILE).read_text())
        record["sparsity"] = result.sparsity
        (work / "mcore" / SPARSITY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return work / "mcore"


def _export_hf(run: RunCheckpoint, cfg: ExportConfig, work: Path, result: ExportResult) -> Path:
    """hf / compressed-tensors: the converter's mcore -> HF on the trimmed checkpoint, then on rank 0
    the sparsity record (or compression) and the verifier."""
    from maskllm_megatron.convert.mcore_to_hf import mcore_to_hf
    from maskllm_megatron.export.verify import verify_path

    with contextlib.redirect_stdout(io.StringIO()):  # the converter announces its (temporary) folder
        mcore_to_hf(work / "mcore", work / "hf", cfg.max_shard_bytes, show_progress=False)
    if not is_rank0():
        return work
    targets = json.loads((work / "mcore" / SPARSITY_FILE).read_text())["targets"]
    hf_names = [n for t in targets for n in hf_rules(run)[t].hf]
    config = json.loads((work / "hf" / "config.json").read_text())
    config["sparsity"] = {"structure": str(run.nm), "targets": hf_names, "mask_source": result.mask_source,
                          "source_checkpoint": str(run.path), **weights_record(result.reconstruction, run)}
    (work / "hf" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    dense_bytes = folder_bytes(work / "hf", "*.safetensors")
    if cfg.format == "hf":
        final = work / "hf"
        report = verify_path(final, run.nm, targets=exact_names(hf_names))
    else:
        state = read_safetensors(work / "hf")
        result.model_sparsity = global_sparsity(state)
        save_compressed_tensors(work / "ct", state, config, hf_names, cfg.max_shard_bytes)
        del state
        copy_tokenizer(work / "hf", work / "ct")
        final = work / "ct"
        report = verify_path(final, run.nm)
    accept_report(report, result)
    if result.model_sparsity is None:
        result.model_sparsity = global_sparsity(read_safetensors(final))
    result.bytes, result.dense_bytes = folder_bytes(final, "*.safetensors"), dense_bytes
    return final


def _export_masks(run: RunCheckpoint, trimmed: list[MaskedTensor], work: Path, result: ExportResult) -> Path:
    from maskllm_megatron.export.verify import verify_path

    masks = hf_masks(run, trimmed)  # collective
    if not is_rank0():
        return work
    path = work / "masks.safetensors"
    stats = save_masks(path, masks, run.nm)
    accept_report(verify_path(path, run.nm), result)
    itemsize = torch.empty(0, dtype=_dtype(run)).element_size()
    result.bytes, result.dense_bytes = stats["bytes"], stats["weights"] * itemsize
    result.bits_per_weight, result.floor_bits_per_weight = stats["bits_per_weight"], stats["floor_bits_per_weight"]
    return path


def accept_report(report, result: ExportResult) -> None:
    """Fail the export (nothing is renamed into place) unless the verifier passed."""
    result.verify_summary = report.summary()
    if not report.ok:
        raise ExportError(f"verification failed, nothing written: {(report.failures or ['no tensor checked'])[0]}")
    result.masked_weights = report.weights
    result.sparsity = report.zeros / report.weights if report.weights else 0.0



def exact_names(names: list[str]) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"



def _dtype(run: RunCheckpoint) -> torch.dtype:
    from maskllm_megatron.megatron.model_builder import DTYPES

    return DTYPES[run.info.dtype]



def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise ExportError(f"{folder} holds no *.safetensors: pass a Hugging Face model folder")
    return state



def folder_bytes(folder: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in Path(folder).glob(pattern) if p.is_file())



def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
