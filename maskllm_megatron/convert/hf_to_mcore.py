"""Hugging Face folder -> megatron-core dist checkpoint, one rank per TP x PP shard.

Every rank builds its shard of the GPTModel (no initialisation), streams the HF tensors it needs one
at a time, shard file by shard file, puts its tensor-parallel part into its parameters and joins the
collective ``dist_checkpointing.save``. Nothing is held twice: the model shards of all ranks together
are one copy of the model; besides them a rank holds one global tensor at a time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from maskllm_megatron.convert.checkpoint import CheckpointInfo, global_param_names, tp_rank_and_size
from maskllm_megatron.checkpoint_folders import TOKENIZER_DIR, atomic_dir, check_output
from maskllm_megatron.convert.io import ConversionError, HFCheckpoint, copy_tokenizer, progress
from maskllm_megatron.megatron.parallel import init_parallel
from maskllm_megatron.convert.mapping import TensorRule, architecture_for, model_config_from_hf
from maskllm_megatron.megatron.model_builder import DTYPES, ModelConfig, ModelConfigError


@dataclass
class Plan:
    """A checked conversion: the input, its ModelConfig and the rules that map it."""

    hf: HFCheckpoint
    model: ModelConfig
    rules: dict[str, TensorRule]
    unused: list[str]


def plan(hf_dir: str | Path, tp: int = 1, pp: int = 1, dtype: str = "fp32", ep: int = 1) -> Plan:
    """Read and check everything that can be checked without megatron: the config, the shards'
    headers, every tensor's presence and shape, and that ``tp``/``pp`` can shard the model."""
    if dtype not in DTYPES:
        raise ConversionError(f"unknown --dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    hf = HFCheckpoint(hf_dir)
    arch = architecture_for(hf.config)
    if arch.hf_prefix:
        hf.add_prefix_aliases(arch.hf_prefix)
    mc = model_config_from_hf(hf.config)
    try:
        mc.validate_parallel(tp, pp, ep)
    except ModelConfigError as e:
        raise ConversionError(str(e)) from None
    rules = {r.mcore: r for r in arch.rules(mc)}
    used = set()
    for r in rules.values():
        for name, shape in zip(r.hf, r.hf_shapes):
            if name not in hf:
                raise ConversionError(
                    f"tensor {name!r} is missing from {hf.folder}: the checkpoint is incomplete or does not "
                    f"match config.json ({hf.config.get('model_type')})")
            if tuple(hf.shape(name)) != shape:
                raise ConversionError(
                    f"tensor {name!r} has shape {list(hf.shape(name))} but config.json implies {list(shape)}: "
                    "the weights do not match config.json")
            used.add(name)
    used = {hf.aliases.get(n, n) for n in used}
    unused = sorted(k for k in hf.weight_map if k not in used and not k.endswith(("rotary_emb.inv_freq",
                                                                                  "attn.bias", "attn.masked_bias")))
    return Plan(hf, mc, rules, unused)


def hf_to_mcore(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1, dtype: str = "fp32",
                overwrite: bool = False, show_progress: bool = True, ep: int = 1) -> Path:
    """Convert on every rank of a ``tp * pp * ep`` world (a one-process world is made when launched plainly);
    with expert parallelism each rank reads only its own experts.

    Writes ``out`` atomically (assembled in a hidden ``.partial`` folder, then renamed); returns it.
    """
    out = Path(out).absolute()
    p = plan(hf_dir, tp, pp, dtype, ep)  # before megatron's import warnings, so bad input reads as one line
    check_output(out, overwrite, "maskllm-convert", [hf_dir])

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from maskllm_megatron.megatron.model_builder import build_gpt_model
    from maskllm_megatron.megatron.checkpointing import check_room_for_checkpoint

    init_parallel(tp, pp, ep)
    rank = dist.get_rank()
    say = print if rank == 0 and show_progress else (lambda *a, **k: None)
    if rank == 0 and p.unused:
        say(f"note: ignoring {len(p.unused)} tensors the mapping does not use: {', '.join(p.unused[:5])}"
            + (" ..." if len(p.unused) > 5 else ""))

    t0 = time.time()
    config = p.model.to_transformer_config(tp, pp, dtype, ep=ep, perform_initialization=False)
    model = build_gpt_model(p.model, config)
    params = global_param_names(model)
    missing = sorted(set(params) - set(p.rules))
    if missing:
        raise ConversionError(f"no mapping for megatron-core parameters {missing[:3]}: report this as a bug")
    order = sorted(params, key=lambda n: p.hf.shard_order(p.rules[n].hf[0]) if p.rules[n].hf else ("", 0))
    with torch.no_grad():
        for i, name in enumerate(order, 1):
            rule, param = p.rules[name], params[name]
            full = rule.to_mcore([p.hf.read(n) for n in rule.hf])
            if tuple(full.shape) != rule.mcore_shape:
                raise ConversionError(f"{name}: built shape {list(full.shape)} != {list(rule.mcore_shape)} (bug)")
            param.copy_(rule.layout.shard(full, *tp_rank_and_size(name)).to(param.dtype))
            del full
            if show_progress and rank == 0:
                progress(i, len(order), f"rank 0 loading {p.hf.folder.name}")

    needed = check_room_for_checkpoint(model, out)  # before anything is written: one line naming the space
    with atomic_dir(out, overwrite, "maskllm-convert", [hf_dir], needed=needed) as tmp:
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
        dist.barrier()
        if rank == 0:
            CheckpointInfo(p.model, dtype, tp, pp, p.hf.config, str(p.hf.folder), ep).save(tmp)
            copy_tokenizer(p.hf.folder, tmp / TOKENIZER_DIR)
    say(f"wrote megatron-core checkpoint {out} (tp={tp} pp={pp}{f' ep={ep}' if ep > 1 else ''} {dtype}, {p.model.num_parameters() / 1e6:.1f}M "
        f"parameters) in {time.time() - t0:.1f}s")
    return out
