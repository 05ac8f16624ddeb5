"""Persistent mask-learning state per masked weight, measured on the real tensors of the sparsified
SmolLM2-135M at TP=1, DP=2, fp32 and bf16 models, with and without megatron's distributed optimizer;
then what each measured layout implies per GPU for LLaMA-2 7B at TP=8 (DP=1 and DP=8), against the
published 24 bytes/weight.

    torchrun --nproc-per-node 2 benchmarks/bench_memory.py [--ckpt DIR] [--json OUT.json]

Measured per rank after one real training step (the driver's build_model / build_optimizer /
run_batches / optimizer.step, so Adam's state exists), each storage counted once:
  params      the trainable parameters' storage (mask logits; DDP's param buffer with the distributed
              optimizer), frozen weights excluded (they are the model, not mask state);
  grads       DDP gradient buffers (grad_data);
  optimizer   every tensor in the torch optimizer's ``state`` (exp_avg, exp_avg_sq, step);
  main        optimizer parameters and their ``.grad`` that share no storage with the above (fp32
              master copies; none for an fp32 model).
The mask logits are in the model's parameter dtype (bf16 logits with an fp32 master copy in a bf16
model). Only the "bf16 gradient reduction" rows are DERIVED (the driver reduces gradients in fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model_step import run_config, text_batch, write_atomic  # noqa: E402

REFERENCE_BYTES = 24.0  # published: fp32 logits (6 per 4 weights) + their grad + Adam (2 states)
LLAMA2_7B_LINEAR_WEIGHTS = 6.5e9
LLAMA2_TP = 8


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _sub_optimizers(optimizer):
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def measure_state(ddp, optimizer) -> dict:
    """Bytes of each persistent-state category on this rank (every storage counted once)."""
    seen: set[int] = set()

    def count(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr, nbytes = _storage(t)
            if ptr and ptr not in seen:
                seen.add(ptr)
                total += nbytes
        return total

    buffers = list(ddp.buffers) + list(getattr(ddp, "expert_parallel_buffers", []))
    trainable = [p for p in ddp.module.parameters() if p.requires_grad]
    out = {"params": count([b.param_data for b in buffers] + trainable),
           "grads": count([b.grad_data for b in buffers])}
    subs = _sub_optimizers(optimizer)
    out["optimizer"] = count([v for o in subs for st in o.optimizer.state.values() for v in st.values()])
    main = [p for o in subs for g in o.optimizer.param_groups for p in g["params"]]
    out["main"] = count(main + [p.grad for p in main])
    out["trainable_names"] = sorted({n.rsplit(".", 1)[-1] for n, p in ddp.module.named_parameters() if p.requires_grad})
    out["optimizer_class"] = sorted({type(o).__name__ for o in subs})
    return out


def one_configuration(args, distributed_optimizer: bool, dtype: str) -> dict:
    """Build the sparsified model + optimizer, take one step, measure this rank."""
    from megatron.core import parallel_state

    from maskllm_megatron.megatron.sparsify import masked_layers
    from maskllm_megatron.train.trainer import build_model, build_optimizer, run_batches

    cfg = run_config(args.ckpt, 1, args.seq, parallel_state.get_data_parallel_world_size(),
                     distributed_optimizer, dtype)
    model, _ = build_model(cfg)
    ddp, optimizer, _ = build_optimizer(cfg, model)
    masked = sum(layer.weight.numel() for layer in masked_layers(model))
    batch = text_batch(args.ckpt, 1, args.seq, parallel_state.get_data_parallel_rank())
    mcfg = cfg.mask_config()
    ddp.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    run_batches(cfg, ddp, [batch], 1, forward_only=False,
                step_of_microbatch=lambda mb: mcfg.step_state(0, parallel_state.get_data_parallel_rank()))
    optimizer.step()
    local = measure_state(ddp, optimizer)
    local["masked_weights"] = masked
    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, local)
    del ddp, optimizer, model
    return summarize(ranks)


def summarize(ranks: list[dict]) -> dict:
    """Bytes per masked weight: per GPU (the largest rank) and summed over ranks."""
    cats = ("params", "grads", "optimizer", "main")
    masked = ranks[0]["masked_weights"]  # TP=1: every rank holds every masked weight
    per_gpu = {c: max(r[c] for r in ranks) / masked for c in cats}
    summed = {c: sum(r[c] for r in ranks) / masked for c in cats}
    per_gpu["total"] = sum(per_gpu[c] for c in cats)
    summed["total"] = sum(summed[c] for c in cats)
    return {"dp": len(ranks), "masked_weights": masked, "per_gpu_bytes_per_weight": per_gpu,
            "summed_over_ranks_bytes_per_weight": summed, "raw_bytes_per_rank": ranks}


def project(measured: dict, dp_sizes=(1, 8)) -> dict:
    """Per-GPU bytes/weight at other DP sizes from the layouts measured at DP=2. ``measured`` maps
    ``(dtype, "plain" | "distributed")`` to ``summarize`` results. With the distributed optimizer the
    optimizer state and master copies are split over DP ranks; logits and the gradient buffer are not
    (checked at DP=2 against the plain optimizer: only the optimizer state and master copies shrink)."""
    rows = {}
    for dtype in sorted({d for d, _ in measured}):
        plain = measured[(dtype, "plain")]["per_gpu_bytes_per_weight"]
        d_gpu = measured[(dtype, "distributed")]["per_gpu_bytes_per_weight"]
        d_sum = measured[(dtype, "distributed")]["summed_over_ranks_bytes_per_weight"]
        sharded = d_sum["optimizer"] + d_sum["main"]
        for d in dp_sizes:
            rows[f"{dtype} DP={d} no distributed optimizer"] = plain["total"]
            rows[f"{dtype} DP={d} distributed optimizer"] = d_gpu["params"] + d_gpu["grads"] + sharded / d
            if dtype == "bf16":  # the driver reduces gradients in fp32; bf16 reduction halves that buffer
                rows[f"bf16 DP={d} distributed optimizer, bf16 gradient reduction [derived]"] = \
                    d_gpu["params"] + d_gpu["grads"] / 2 + sharded / d
    per_gpu_weights = LLAMA2_7B_LINEAR_WEIGHTS / LLAMA2_TP
    return {name: {"bytes_per_weight": b, "llama2_7b_tp8_gb_per_gpu": b * per_gpu_weights / 1e9,
                   "vs_reference": b / REFERENCE_BYTES, "meets_half_reference": b <= REFERENCE_BYTES / 2}
            for name, b in rows.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=Path("/tmp") / "maskllm_bench" / "smollm2-tp1")
    p.add_argument("--seq", type=int, default=32, help="tokens of the one measured step")
    p.add_argument("--dtypes", default="fp32,bf16", help="model dtypes to measure (comma-separated: fp32,bf16)")
    p.add_argument("--json", help="also write the results to this file (rank 0)")
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun --nproc-per-node 2 (the measurement is at DP=2)")
    args.ckpt = args.ckpt.absolute()
    if not (args.ckpt / "model_config.json").is_file():
        raise SystemExit(f"{args.ckpt} has no converted checkpoint: run benchmarks/bench_model_step.py once "
                         "without torchrun (it converts the cached SmolLM2), or pass --ckpt")
    from maskllm_megatron.train.trainer import setup_parallel

    cfg = run_config(args.ckpt, 1, args.seq, int(os.environ["WORLD_SIZE"]))
    env = setup_parallel(cfg)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or set(dtypes) - {"fp32", "bf16"}:
        p.error(f"--dtypes takes fp32 and/or bf16, got {args.dtypes!r}")
    measured = {(dtype, name): one_configuration(args, name == "distributed", dtype)
                for dtype in dtypes for name in ("plain", "distributed")}
    projected = project(measured)
    if env["rank"] == 0:
        first = next(iter(measured.values()))
        print(f"SmolLM2-135M sparsified (2:4), TP=1 DP={first['dp']}, "
              f"{first['masked_weights'] / 1e6:.1f}M masked weights; bytes per masked weight")
        for (dtype, name), res in measured.items():
            g, s = res["per_gpu_bytes_per_weight"], res["summed_over_ranks_bytes_per_weight"]
            print(f"  measured, {dtype} model, {name:11s} optimizer: per GPU {g['total']:5.2f} (params {g['params']:.2f} grads "
                  f"{g['grads']:.2f} optimizer {g['optimizer']:.2f} main {g['main']:.2f}); summed over ranks "
                  f"{s['total']:.2f}; trains {res['raw_bytes_per_rank'][0]['trainable_names']}")
        print(f"LLaMA-2 7B at TP={LLAMA2_TP} ({LLAMA2_7B_LINEAR_WEIGHTS / LLAMA2_TP / 1e9:.3f}e9 masked weights per GPU), "
              f"reference {REFERENCE_BYTES:.0f} B/weight = {REFERENCE_BYTES * LLAMA2_7B_LINEAR_WEIGHTS / LLAMA2_TP / 1e9:.1f} GB:")
        for name, r in projected.items():
            print(f"  {name:66s} {r['bytes_per_weight']:6.2f} B/weight  {r['llama2_7b_tp8_gb_per_gpu']:5.1f} GB/GPU  "
                  f"{'<= half of reference' if r['meets_half_reference'] else ''}")
        if args.json:
            write_atomic(args.json, json.dumps({"measured": {f"{d} {n}": r for (d, n), r in measured.items()},
                                                "projected": projected}, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
