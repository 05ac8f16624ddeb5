"""``maskllm-export apply-masks``: a dense Hugging Face model with a mask file applied, verified."""
from __future__ import annotations

import json
import time
from pathlib import Path

from maskllm_megatron.checkpoint_folders import atomic_dir, check_output
from maskllm_megatron.convert.io import copy_tokenizer, read_json
from maskllm_megatron.export.formats import global_sparsity
from maskllm_megatron.export.pipeline import (ExportError, ExportResult, accept_report, exact_names, folder_bytes,
                                              read_safetensors)


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
    state = read_safetensors(hf_dir)
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
    with atomic_dir(out, overwrite, "maskllm-export", [hf_dir, mask_file]) as work:
        _write_shards(work, masked, max_shard_bytes)
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer(hf_dir, work)
        result = ExportResult(out, "hf", str(spec), "file", targets=len(names))
        accept_report(verify_path(work, spec, targets=exact_names(names)), result)
        result.model_sparsity = global_sparsity(masked)
        result.bytes, result.dense_bytes = folder_bytes(work, "*.safetensors"), folder_bytes(hf_dir, "*.safetensors")
    result.files, result.seconds = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")), time.time() - t0
    return result


