"""megatron-core checkpoint -> Hugging Face folder (safetensors shards + index, config.json, tokenizer).

Runs on a world of ``tp`` processes (one process, TP=1, when launched plainly): the checkpoint is
loaded at that layout whatever layout it was saved with. Tensors are gathered one at a time to rank 0,
mapped to HF names and layouts and written into size-capped shards; rank 0 holds its model shard,
one gathered tensor at a time, which is written to disk at once.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from maskllm_megatron.convert.checkpoint import CheckpointInfo, global_param_names, tp_group_of
from maskllm_megatron.megatron.parallel import init_parallel
from maskllm_megatron.checkpoint_folders import TOKENIZER_DIR, atomic_dir, check_output
from maskllm_megatron.convert.io import ShardWriter, copy_tokenizer, progress
from maskllm_megatron.convert.mapping import ARCHITECTURES, hf_config_from_model_config, model_type_of
from maskllm_megatron.megatron.model_builder import DTYPES


def mcore_to_hf(ckpt_dir: str | Path, out: str | Path, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
                show_progress: bool = True) -> Path:
    """Export ``ckpt_dir`` to the Hugging Face folder ``out`` (written atomically); return ``out``."""
    import torch
    import torch.distributed as dist

    from maskllm_megatron.convert.checkpoint import load_mcore_model

    ckpt_dir, out = Path(ckpt_dir).absolute(), Path(out).absolute()
    info = CheckpointInfo.load(ckpt_dir)
    check_output(out, overwrite, "maskllm-convert", [ckpt_dir])
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    init_parallel(tp=world, pp=1)
    rank = dist.get_rank()
    t0 = time.time()
    model, info = load_mcore_model(ckpt_dir)
    params = global_param_names(model)
    model_type = model_type_of(info.model, info.hf_config)
    rules = [r for r in ARCHITECTURES[model_type].rules(info.model) if r.export]
    hf_config = hf_config_from_model_config(info.model, info.hf_config, info.dtype)
    dtype = DTYPES[info.dtype]

    def write(folder: Path) -> None:
        entries = [(name, shape) for r in rules for name, shape in zip(r.hf, r.hf_shapes)]
        writer = ShardWriter(folder, entries, dtype, max_shard_bytes) if rank == 0 else None
        with torch.no_grad():
            for i, rule in enumerate(rules, 1):
                local = params[rule.mcore].detach()
                parts = [torch.empty_like(local) for _ in range(world)]
                dist.all_gather(parts, local.contiguous(), group=tp_group_of(rule.mcore))
                tensors = rule.to_hf(rule.layout.unshard(parts))
                del parts
                if writer is not None:
                    for name, t in zip(rule.hf, tensors):
                        # to the checkpoint's dtype: megatron keeps norms in fp32 in bf16 models
                        writer.write(name, t.to(device="cpu", dtype=dtype))
                    if show_progress:
                        progress(i, len(rules), f"writing {out.name}")
        if writer is not None:
            names = writer.close()
            (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            if (ckpt_dir / TOKENIZER_DIR).is_dir():
                copy_tokenizer(ckpt_dir / TOKENIZER_DIR, folder)
            print(f"wrote Hugging Face model {out} ({len(names)} safetensors file(s), "
                  f"{writer.total_bytes / 2**20:.1f} MiB) in {time.time() - t0:.1f}s")

    with atomic_dir(out, overwrite=overwrite, inputs=[ckpt_dir]) as tmp:  # every rank gathers, rank 0 writes
        write(tmp)
    return out
