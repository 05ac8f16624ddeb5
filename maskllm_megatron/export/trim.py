"""Trim a sparsified model to hard N:M masks, and the trimmed megatron-core checkpoint it writes.

``trim_`` takes every masked layer's argmax mask (or its prior mask: one-shot baselines) and writes ``W``
where the mask is set and +0.0 elsewhere (a select, never a multiply: no -0.0). ``save_trimmed_mcore``
writes the trimmed model as a converter-style checkpoint folder (dist checkpoint + ``model_config.json`` +
``tokenizer/``) without logits or optimizer state; each masked layer keeps its boolean mask as its
``prior_mask`` tensor, and ``sparsity.json`` records the structure. The converter's dense loader
(``load_mcore_model``) reads it at any TP; ``load_checkpoint`` into a sparsified model gets the masks.
``verify_mcore`` reloads it and checks every masked weight. ``export.pipeline`` builds the formats on it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from maskllm_megatron.checkpoint_folders import SPARSITY_FILE, TOKENIZER_DIR, atomic_dir, is_rank0
from maskllm_megatron.convert.checkpoint import CheckpointInfo, global_param_names
from maskllm_megatron.convert.io import copy_tokenizer
from maskllm_megatron.convert.mapping import ARCHITECTURES
from maskllm_megatron.export.formats import apply_mask_hf, hf_weight_is_transposed
from maskllm_megatron.run_checkpoint import RunCheckpoint, build_sparsified

SPARSITY_FORMAT = "maskllm-megatron/sparsity-v1"


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
    rules = hf_rules(run)
    transposed = hf_weight_is_transposed({"model_type": run.model_type})
    rank0 = is_rank0()
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
    with atomic_dir(folder, tool="maskllm-export") as tmp:
        dist_checkpointing.save(sharded, str(tmp))
        if is_rank0():
            tp = parallel_state.get_tensor_model_parallel_world_size()
            CheckpointInfo(run.info.model, run.info.dtype, tp, 1, run.info.hf_config, str(run.path)).save(tmp)
            copy_tokenizer(run.base / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
            record = {"format": SPARSITY_FORMAT, "structure": str(run.nm), "mask_source": mask_source_name(use_prior),
                      "mask_tensor": "prior_mask", "targets": [t.name for t in trimmed],
                      "source_checkpoint": str(run.path), "iteration": run.iteration,
                      **weights_record(reconstruction, run)}
            (tmp / SPARSITY_FILE).write_text(json.dumps(record, indent=2) + "\n")


def verify_mcore(run: RunCheckpoint, folder: Path):
    """Reload an exported mcore folder into a sparsified model at this layout and check every masked
    weight with the verifier's checks: at most N of M non-zeros, no -0.0, the stored mask exactly N of M
    and zero weights wherever it is unset. Returns a ``VerifyReport`` on rank 0 (None elsewhere)."""
    from maskllm_megatron.export.verify import VerifyReport
    from maskllm_megatron.megatron.sparsify import masked_layers

    model, _ = build_sparsified(run, folder)
    names = {id(p): n for n, p in global_param_names(model).items()}
    report = VerifyReport("megatron-core checkpoint", run.nm) if is_rank0() else None
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


def weights_record(reconstruction: Optional[dict], run: RunCheckpoint) -> dict:
    """The sparsity record's word on the kept weights: the originals, reconstructed at export and how,
    refit end to end by the run (``mask.refit``), or trained with the masks (``mask.train_weights``), and
    where the training started when a prior updated them (``prior.update_weights``)."""
    if reconstruction is not None:
        return {"weights": "reconstructed", "reconstruction": reconstruction}
    mask, distill, prior = (run.config.get(k, {}) for k in ("mask", "distill", "prior"))
    start = None  # the prior's weight update (prior.update_weights): where the kept weights started
    if prior.get("update_weights"):
        start = ("SparseGPT's OBS update" if prior.get("method") == "sparsegpt"
                 else f"the weights of {prior.get('checkpoint')}")
    training = {"iterations": run.iteration, "kd_weight": distill.get("kd_weight", 0.0),
                "temperature": distill.get("temperature", 1.0), **({"start": start} if start else {})}
    if mask.get("refit"):
        return {"weights": "refit", "refit": training}
    if mask.get("train_weights"):
        return {"weights": "trained with the masks", "joint": training}
    return {"weights": start or "original"}


def hf_rules(run: RunCheckpoint) -> dict:
    return {r.mcore: r for r in ARCHITECTURES[run.model_type].rules(run.info.model)}


def mask_source_name(use_prior: bool) -> str:
    return "prior" if use_prior else "learned"
