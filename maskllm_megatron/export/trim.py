"""Trim a mask-learning checkpoint to hard N:M masks and export it (``maskllm-export``).

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

Everything is assembled in a hidden ``.<name>.work`` folder next to the output, verified, then
renamed into place: the output is complete or absent.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

import torch

from maskllm_megatron.convert.checkpoint import TOKENIZER_DIR, CheckpointInfo, global_param_names
from maskllm_megatron.megatron.parallel import init_parallel
from maskllm_megatron.convert.io import ConversionError, check_output, copy_tokenizer, mark_output, read_json
from maskllm_megatron.convert.mapping import ARCHITECTURES
from maskllm_megatron.export.formats import (
    apply_mask_hf, global_sparsity, hf_weight_is_transposed, save_compressed_tensors, save_masks)
from maskllm_megatron.masks.patterns import NMSpec
from maskllm_megatron.train.run_checkpoint import RunCheckpoint, load_masked_model

if TYPE_CHECKING:
    from maskllm_megatron.export.reconstruct import ReconstructRequest

Format = Literal["mcore", "hf", "compressed-tensors", "masks"]
FORMATS: tuple[str, ...] = ("mcore", "hf", "compressed-tensors", "masks")
SPARSITY_FILE = "sparsity.json"
SPARSITY_FORMAT = "maskllm-megatron/sparsity-v1"


class ExportError(ConversionError):
    """The input or the request does not allow this export (message: problem and fix)."""


# ------------------------------------------------------------------------------------ trimming
@dataclass
class MaskedTensor:
    """One trimmed layer: its global mcore weight name and its local (shard) mask."""

    name: str  # e.g. decoder.layers.0.self_attention.linear_qkv.weight
    layer: torch.nn.Module
    mask: torch.Tensor  # bool, local shard layout


@torch.no_grad()
def trim_(model, use_prior: bool = False) -> list[MaskedTensor]:
    """Replace every masked weight by ``W`` where its mask (argmax, or prior) is set, +0.0 elsewhere,
    and store the mask as the layer's ``prior_mask`` (forward then uses ``W * mask``: unchanged)."""
    from maskllm_megatron.megatron.sparsify import MaskMode, masked_layers

    names = {id(p): n for n, p in global_param_names(model).items()}
    out = []
    for layer in masked_layers(model):
        mask = layer.prior_mask.bool() if use_prior else layer.hard_mask().bool()
        layer.weight.copy_(apply_mask_hf(layer.weight, mask))
        layer.prior_mask = mask
        layer.set_mask_mode(MaskMode.PRIOR)
        out.append(MaskedTensor(names[id(layer.weight)], layer, mask))
    return out


def hf_masks(run: RunCheckpoint, trimmed: list[MaskedTensor]) -> dict[str, torch.Tensor]:
    """Global masks under HF weight names, [out, in] (collective: every TP rank calls it; rank 0 gets
    the result, the others ``{}``)."""
    rules = _rules(run)
    transposed = hf_weight_is_transposed({"model_type": run.model_type})
    rank0 = _rank() == 0
    out = {}
    for t in trimmed:
        full = t.layer.gather_global(t.mask)
        if rank0:
            for name, m in zip(rules[t.name].hf, rules[t.name].to_hf(full)):
                out[name] = (m.t() if transposed else m).contiguous()
    return out


def save_trimmed_mcore(model, run: RunCheckpoint, trimmed: list[MaskedTensor], folder: Path, use_prior: bool,
                       reconstruction: Optional[dict] = None) -> None:
    """Write the trimmed model (no logits, masks as ``prior_mask``) as a converter-style folder;
    ``reconstruction`` (what ``--reconstruct`` did) goes into its sparsity record."""
    from megatron.core import dist_checkpointing, parallel_state

    sharded = {k: v for k, v in model.sharded_state_dict().items() if not k.endswith(".mask_logits")}
    if _rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(sharded, str(folder))
    _barrier()
    if _rank() == 0:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        CheckpointInfo(run.info.model, run.info.dtype, tp, 1, run.info.hf_config, str(run.path)).save(folder)
        copy_tokenizer(run.base / TOKENIZER_DIR, folder / TOKENIZER_DIR)
        record = {"format": SPARSITY_FORMAT, "structure": str(run.nm), "mask_source": _source(use_prior),
                  "mask_tensor": "prior_mask", "targets": [t.name for t in trimmed],
                  "source_checkpoint": str(run.path), "iteration": run.iteration,
                  **_weights_record(reconstruction, run)}
        (folder / SPARSITY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    _barrier()


def verify_mcore(run: RunCheckpoint, folder: Path):
    """Reload an exported mcore folder into a sparsified model at this layout and check every masked
    weight with the verifier's checks: at most N of M non-zeros, no -0.0, the stored mask exactly N of M
    and zero weights wherever it is unset. Returns a ``VerifyReport`` on rank 0 (None elsewhere)."""
    from maskllm_megatron.export.verify import VerifyReport
    from maskllm_megatron.megatron.checkpointing import load_checkpoint
    from maskllm_megatron.megatron.model_builder import build_gpt_model
    from maskllm_megatron.megatron.sparsify import masked_layers, sparsify
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tcfg = run.info.model.to_transformer_config(tp, 1, run.info.dtype, perform_initialization=False)
    model = build_gpt_model(run.info.model, tcfg)
    sparsify(model, run.sparsify_config())
    load_checkpoint(model, folder)
    names = {id(p): n for n, p in global_param_names(model).items()}
    report = VerifyReport("megatron-core checkpoint", run.nm) if _rank() == 0 else None
    for layer in masked_layers(model):
        name = names[id(layer.weight)]
        if layer.prior_mask is None:
            w = mask = None
        else:
            w, mask = layer.gather_global(layer.weight.detach()), layer.gather_global(layer.prior_mask)
        if report is None:
            continue
        if mask is None:
            report.failures.append(f"{name}: the export stores no mask (prior_mask)")
            report.failed += 1
            continue
        report.add_masked(name, w, mask)
    return report


# ------------------------------------------------------------------------------------ export
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
    if cfg.format == "compressed-tensors":
        if run.nm != NMSpec(2, 4):
            raise ExportError(f"compressed-tensors stores 2:4 only, the run learned {run.nm} masks: export "
                              f"--format hf, mcore or masks")
        if hf_weight_is_transposed({"model_type": run.model_type}):
            raise ExportError(f"compressed-tensors stores [out, in] weights but {run.model_type} keeps Conv1D "
                              f"weights [in, out]: export --format hf instead")
    return run


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
    work = out.with_name(f".{out.name}.work")
    rank0 = _rank() == 0
    if rank0:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    _barrier()
    try:
        model = load_masked_model(run, use_prior=cfg.use_prior)
        reconstruction = None
        if cfg.reconstruct is not None:  # under the masks trim_ applies: the prior's or the argmax
            from maskllm_megatron.export.reconstruct import reconstruct_model

            reconstruction = reconstruct_model(model, cfg.reconstruct, plan, run, work / "calib-cache")
        trimmed = trim_(model, cfg.use_prior)
        result = ExportResult(out, cfg.format, str(run.nm), _source(cfg.use_prior), targets=len(trimmed),
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
        _barrier()
        if rank0:
            if final.is_dir():
                mark_output(final, "maskllm-export")
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(final, out)
            result.files = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() \
                else [out.name]
            result.seconds = time.time() - t0
        _barrier()
    finally:
        if rank0:
            shutil.rmtree(work, ignore_errors=True)
    return result if rank0 else None


def _finish_mcore(run: RunCheckpoint, work: Path, result: ExportResult) -> Path:
    report = verify_mcore(run, work / "mcore")
    if report is not None:
        _accept(report, result)
        result.bytes, result.dense_bytes = _folder_bytes(work / "mcore"), _folder_bytes(run.base)
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
    if _rank() != 0:
        return work
    targets = json.loads((work / "mcore" / SPARSITY_FILE).read_text())["targets"]
    hf_names = [n for t in targets for n in _rules(run)[t].hf]
    config = json.loads((work / "hf" / "config.json").read_text())
    config["sparsity"] = {"structure": str(run.nm), "targets": hf_names, "mask_source": result.mask_source,
                          "source_checkpoint": str(run.path), **_weights_record(result.reconstruction, run)}
    (work / "hf" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    dense_bytes = _folder_bytes(work / "hf", "*.safetensors")
    if cfg.format == "hf":
        final = work / "hf"
        report = verify_path(final, run.nm, targets=_exact_names(hf_names))
    else:
        state = _read_safetensors(work / "hf")
        result.model_sparsity = global_sparsity(state)
        save_compressed_tensors(work / "ct", state, config, hf_names, cfg.max_shard_bytes)
        del state
        copy_tokenizer(work / "hf", work / "ct")
        final = work / "ct"
        report = verify_path(final, run.nm)
    _accept(report, result)
    if result.model_sparsity is None:
        result.model_sparsity = global_sparsity(_read_safetensors(final))
    result.bytes, result.dense_bytes = _folder_bytes(final, "*.safetensors"), dense_bytes
    return final


def _export_masks(run: RunCheckpoint, trimmed: list[MaskedTensor], work: Path, result: ExportResult) -> Path:
    from maskllm_megatron.export.verify import verify_path

    masks = hf_masks(run, trimmed)  # collective
    if _rank() != 0:
        return work
    path = work / "masks.safetensors"
    stats = save_masks(path, masks, run.nm)
    _accept(verify_path(path, run.nm), result)
    itemsize = torch.empty(0, dtype=_dtype(run)).element_size()
    result.bytes, result.dense_bytes = stats["bytes"], stats["weights"] * itemsize
    result.bits_per_weight, result.floor_bits_per_weight = stats["bits_per_weight"], stats["floor_bits_per_weight"]
    return path


# ------------------------------------------------------------------------------------ apply a mask file
def apply_masks(hf_dir: str | Path, mask_file: str | Path, out: str | Path, overwrite: bool = False,
                max_shard_bytes: int = 5 * 2**30) -> ExportResult:
    """Write ``out``: the dense HF model ``hf_dir`` with a mask file applied (``save_masks`` file or
    MaskLLM's published ``.npz``), a ``"sparsity"`` entry in config.json, verified."""
    from maskllm_megatron.export.verify import verify_mask_file, verify_path
    from maskllm_megatron.export.formats import _write_shards, apply_mask_file

    t0 = time.time()
    hf_dir, mask_file, out = Path(hf_dir).absolute(), Path(mask_file).absolute(), Path(out).absolute()
    check_output(out, overwrite, "maskllm-export", [hf_dir, mask_file])
    if not mask_file.is_file():
        raise ExportError(f"mask file {mask_file} does not exist: pass a maskllm-export --format masks file or "
                          f"a MaskLLM .npz")
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{hf_dir} is not a Hugging Face model folder (no config.json): pass the dense model "
                          "the masks apply to as --hf")
    config = read_json(hf_dir / "config.json")
    state = _read_safetensors(hf_dir)
    # Exactly N kept in every group of the file (the record below says so), before any weight is touched;
    # a published .npz carries no N:M, and MaskLLM publishes 2:4 only.
    file_report = verify_mask_file(mask_file)
    if not file_report.ok:
        raise ExportError(f"{mask_file.name} is not an exact {file_report.spec} mask file: "
                          f"{(file_report.failures or ['it holds no mask'])[0]}")
    spec = file_report.spec
    masked = apply_mask_file(state, mask_file, config)
    names = [n for n in masked if masked[n] is not state[n]]
    config["sparsity"] = {"structure": str(spec), "targets": names, "mask_source": "file",
                          "source_checkpoint": str(mask_file)}
    work = out.with_name(f".{out.name}.work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _write_shards(work, masked, max_shard_bytes)
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer(hf_dir, work)
        result = ExportResult(out, "hf", str(spec), "file", targets=len(names))
        _accept(verify_path(work, spec, targets=_exact_names(names)), result)
        result.model_sparsity = global_sparsity(masked)
        result.bytes, result.dense_bytes = _folder_bytes(work, "*.safetensors"), _folder_bytes(hf_dir, "*.safetensors")
        mark_output(work, "maskllm-export")
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.files, result.seconds = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")), time.time() - t0
    return result


# ------------------------------------------------------------------------------------ helpers
def _weights_record(reconstruction: Optional[dict], run: RunCheckpoint) -> dict:
    """The sparsity record's word on the kept weights: the originals, reconstructed at export and how,
    refit end to end by the run (``mask.refit``), or trained with the masks (``mask.train_weights``)."""
    if reconstruction is not None:
        return {"weights": "reconstructed", "reconstruction": reconstruction}
    mask, distill = run.config.get("mask", {}), run.config.get("distill", {})
    if mask.get("refit"):
        return {"weights": "refit", "refit": {"iterations": run.iteration, "kd_weight": distill.get("kd_weight", 0.0),
                                              "temperature": distill.get("temperature", 1.0)}}
    if mask.get("train_weights"):
        return {"weights": "trained with the masks", "iterations": run.iteration}
    return {"weights": "original"}


def _accept(report, result: ExportResult) -> None:
    """Fail the export (nothing is renamed into place) unless the verifier passed."""
    result.verify_summary = report.summary()
    if not report.ok:
        raise ExportError(f"verification failed, nothing written: {(report.failures or ['no tensor checked'])[0]}")
    result.masked_weights = report.weights
    result.sparsity = report.zeros / report.weights if report.weights else 0.0


def _rules(run: RunCheckpoint) -> dict:
    return {r.mcore: r for r in ARCHITECTURES[run.model_type].rules(run.info.model)}


def _exact_names(names: list[str]) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def _dtype(run: RunCheckpoint) -> torch.dtype:
    from maskllm_megatron.megatron.model_builder import DTYPES

    return DTYPES[run.info.dtype]


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise ExportError(f"{folder} holds no *.safetensors: pass a Hugging Face model folder")
    return state


def _folder_bytes(folder: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in Path(folder).glob(pattern) if p.is_file())


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _source(use_prior: bool) -> str:
    return "prior" if use_prior else "learned"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
