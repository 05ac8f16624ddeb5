"""Persistent mask-learning state per masked weight, measured on the real tensors of the sparsified
SmolLM2-135M at TP=1, DP=2, fp32 and bf16 models, with and without megatron's distributed optimizer;
then what each measured layout implies per GPU for LLaMA-2 7B at TP=8 (DP=1 and DP=8), against the
published 24 bytes/weight.

    torchrun --nproc-per-node 2 benchmarks/bench_memory.py [--ckpt DIR] [--json OUT.json]
    torchrun --nproc-per-node 4 benchmarks/bench_memory.py --moe [--json OUT.json]
    python benchmarks/bench_memory.py --plan [--json OUT.json]

``--moe``: a mixture-of-experts layout instead: a Qwen2-MoE-shaped model (random weights, 8 experts, top-2, a
gated shared expert) at EP=2 on the launched ranks (4 ranks: dense data-parallel 4, expert data-parallel 2),
bytes per masked EXPERT weight (megatron's expert-parallel buffers and the expert optimizer of the chain) and
per masked dense weight, each per GPU, then projected to EP=8 at expert data-parallel sizes 1 and 8.
``--plan``: per-GPU memory of the examples' cluster layouts (Mixtral 8x7B, Qwen3 8B) from the README's formula
with the measured bytes per masked weight (no ranks needed).

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

    from maskllm_megatron.train.setup import build_model, build_optimizer
    from maskllm_megatron.train.step import run_batches

    cfg = run_config(args.ckpt, 1, args.seq, parallel_state.get_data_parallel_world_size(),
                     distributed_optimizer, dtype)
    model, _, masks = build_model(cfg)
    ddp, optimizer, _ = build_optimizer(cfg, model, masks)
    masked = sum(layer.weight.numel() for layer in masks.layers)
    batch = text_batch(args.ckpt, 1, args.seq, parallel_state.get_data_parallel_rank())
    ddp.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    run_batches(cfg, ddp, [batch], 1, forward_only=False,
                sample_masks=lambda mb: masks.step(0, parallel_state.get_data_parallel_rank()))
    optimizer.step()
    local = measure_state(ddp, optimizer)
    local["masked_weights"] = masked
    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, local)
    del ddp, optimizer, model
    masks = None  # the controller holds the model too
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
    p.add_argument("--moe", action="store_true", help="measure a mixture-of-experts layout at EP=2 (see above)")
    p.add_argument("--moe-ckpt", default=str(Path("/tmp") / "maskllm_bench" / "moe-random"),
                   help="where --moe writes its random MoE checkpoint")
    p.add_argument("--plan", action="store_true", help="print the examples' per-GPU memory (no ranks)")
    args = p.parse_args(argv)
    if args.plan:
        return plan_main(args)
    if args.moe:
        if "RANK" not in os.environ:
            raise SystemExit("launch with torchrun --nproc-per-node 4 (EP=2 with an expert data-parallel size of 2)")
        return moe_main(args)
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun --nproc-per-node 2 (the measurement is at DP=2)")
    args.ckpt = args.ckpt.absolute()
    if not (args.ckpt / "model_config.json").is_file():
        raise SystemExit(f"{args.ckpt} has no converted checkpoint: run benchmarks/bench_model_step.py once "
                         "without torchrun (it converts the cached SmolLM2), or pass --ckpt")
    from maskllm_megatron.train.setup import setup_parallel

    cfg = run_config(args.ckpt, 1, args.seq, int(os.environ["WORLD_SIZE"]))
    env = setup_parallel(cfg)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or set(dtypes) - {"fp32", "bf16"}:
        p.error(f"--dtypes takes fp32 and/or bf16, got {args.dtypes!r}")
    measured = {(dtype, name): one_configuration(args, name == "distributed", dtype)
                for dtype in dtypes for name in ("plain", "distributed")}
    projected = project(measured)
    if env.rank == 0:
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




# ------------------------------------------------------------------------------------------- mixture of experts
def moe_model_config():
    from maskllm_megatron.megatron.model_builder import ModelConfig

    return ModelConfig(family="llama", num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                       num_query_groups=2, vocab_size=1000, max_position_embeddings=128, qkv_bias=True,
                       num_experts=8, moe_topk=2, moe_pre_softmax=True, shared_expert_size=512, shared_expert_gate=True)


def moe_config(ckpt: Path, seq: int, world: int, ep: int, distributed_optimizer: bool, dtype: str):
    from maskllm_megatron.run_config import TrainConfig

    return TrainConfig.from_dict({
        "model": {"checkpoint": str(ckpt), "dtype": dtype},
        "parallel": {"tp": 1, "ep": ep, "distributed_optimizer": distributed_optimizer},
        "data": {"train": ["unused"], "seq_length": seq, "micro_batch_size": 1, "global_batch_size": world},
        "optim": {"lr": 5e-5, "min_lr": 5e-6}, "prior": {"method": "magnitude"},
        "run": {"train_iters": 2000, "seed": 1234}})


def make_moe_checkpoint(ckpt: Path, cfg) -> None:
    """A random MoE checkpoint, written by every rank at the initialised layout (converter-style folder)."""
    from maskllm_megatron.convert.checkpoint import CheckpointInfo
    from maskllm_megatron.megatron.checkpointing import save_checkpoint
    from maskllm_megatron.megatron.model_builder import build_gpt_model

    mc = moe_model_config()
    model = build_gpt_model(mc)
    save_checkpoint(model, ckpt)
    if torch.distributed.get_rank() == 0:
        CheckpointInfo(mc, "fp32", 1, 1, ep=cfg.parallel.ep).save(ckpt)
    torch.distributed.barrier()


def moe_configuration(ckpt: Path, seq: int, ep: int, distributed_optimizer: bool, dtype: str) -> dict:
    """One step of the sparsified MoE; bytes per masked expert / dense weight per rank."""
    from megatron.core import parallel_state

    from maskllm_megatron.megatron.model_builder import is_expert_name
    from maskllm_megatron.train.setup import build_model, build_optimizer
    from maskllm_megatron.train.step import run_batches

    world = torch.distributed.get_world_size()
    cfg = moe_config(ckpt, seq, world, ep, distributed_optimizer, dtype)
    model, _, masks = build_model(cfg)
    ddp, optimizer, _ = build_optimizer(cfg, model, masks)
    layers = masks.layers
    expert_w = sum(layer.weight.numel() for layer in layers if is_expert_name(layer.mask_layer_id))
    dense_w = sum(layer.weight.numel() for layer in layers if not is_expert_name(layer.mask_layer_id))
    dp_rank = parallel_state.get_data_parallel_rank()
    g = torch.Generator().manual_seed(dp_rank)
    ids = torch.randint(0, 1000, (1, seq + 1), generator=g)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(1, seq),
             "position_ids": torch.arange(seq).unsqueeze(0), "attention_mask": None}
    ddp.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    run_batches(cfg, ddp, [batch], 1, forward_only=False, sample_masks=lambda mb: masks.step(0, dp_rank))
    optimizer.step()
    subs = _sub_optimizers(optimizer)
    expert_opt = [o for o in subs if any(grp.get("is_expert_parallel") for grp in o.optimizer.param_groups)]
    dense_opt = [o for o in subs if o not in expert_opt]

    def part(buffers, opts, trainable) -> dict:
        seen: set[int] = set()

        def count(tensors) -> int:
            total = 0
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    ptr, nbytes = _storage(t)
                    if ptr and ptr not in seen:
                        seen.add(ptr)
                        total += nbytes
            return total

        out = {"params": count([b.param_data for b in buffers] + trainable), "grads": count([b.grad_data for b in buffers]),
               "optimizer": count([v for o in opts for st in o.optimizer.state.values() for v in st.values()])}
        main = [p for o in opts for grp in o.optimizer.param_groups for p in grp["params"]]
        out["main"] = count(main + [p.grad for p in main])
        return out

    named = dict(ddp.module.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    local = {"expert": part(list(getattr(ddp, "expert_parallel_buffers", [])), expert_opt,
                            [p for n, p in trainable.items() if is_expert_name(n)]),
             "dense": part(list(ddp.buffers), dense_opt, [p for n, p in trainable.items() if not is_expert_name(n)]),
             "expert_weights": expert_w, "dense_weights": dense_w,
             "optimizers": [("expert" if o in expert_opt else "dense") + ":" + type(o).__name__ for o in subs]}
    ranks = [None] * world
    torch.distributed.all_gather_object(ranks, local)
    del ddp, optimizer, model, layers
    masks = None  # the controller holds the model too
    cats = ("params", "grads", "optimizer", "main")
    res = {"ep": ep, "world": world, "expert_dp": world // ep, "dense_dp": world, "optimizers": ranks[0]["optimizers"]}
    for kind in ("expert", "dense"):
        weights = ranks[0][f"{kind}_weights"]
        per_gpu = {c: max(r[kind][c] for r in ranks) / weights for c in cats}
        per_gpu["total"] = sum(per_gpu[c] for c in cats)
        res[kind] = {"masked_weights_per_gpu": weights, "per_gpu_bytes_per_weight": per_gpu}
    return res


def project_experts(measured: dict, expert_dp_sizes=(1, 8)) -> dict:
    """Bytes per masked expert weight per GPU at EP=8 for expert data-parallel sizes ``expert_dp_sizes``: the
    logits and the gradient buffer stay whole, the distributed optimizer's Adam state and master copies are split
    over the expert data-parallel group (as measured at expert DP = ``measured['expert_dp']``)."""
    rows = {}
    for name, res in measured.items():
        if "distributed" not in name:
            continue
        g = res["expert"]["per_gpu_bytes_per_weight"]
        sharded_whole = (g["optimizer"] + g["main"]) * res["expert_dp"]
        for d in expert_dp_sizes:
            rows[f"{name}, EP=8, expert DP={d} ({8 * d} GPUs at TP=PP=1)"] = g["params"] + g["grads"] + sharded_whole / d
    return rows


def moe_main(args) -> None:
    from maskllm_megatron.train.setup import setup_parallel

    world, ep = int(os.environ["WORLD_SIZE"]), 2
    ckpt = Path(args.moe_ckpt).absolute()
    cfg = moe_config(ckpt, args.seq, world, ep, True, "fp32")
    env = setup_parallel(cfg)
    make_moe_checkpoint(ckpt, cfg)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    measured = {f"{dtype} {name}": moe_configuration(ckpt, args.seq, ep, name == "distributed", dtype)
                for dtype in dtypes for name in ("plain", "distributed")}
    projected = project_experts(measured)
    if env.rank == 0:
        first = next(iter(measured.values()))
        print(f"MoE (Qwen2-MoE shape, 8 experts, top-2, shared expert) at EP={ep}, TP=1, {world} ranks: dense DP "
              f"{first['dense_dp']}, expert DP {first['expert_dp']}; {first['expert']['masked_weights_per_gpu'] / 1e6:.2f}M "
              f"masked expert weights per GPU, {first['dense']['masked_weights_per_gpu'] / 1e6:.2f}M dense; "
              f"optimizers {first['optimizers']}")
        for name, res in measured.items():
            for kind in ("expert", "dense"):
                g = res[kind]["per_gpu_bytes_per_weight"]
                print(f"  measured, {name:18s} per masked {kind:6s} weight per GPU {g['total']:6.2f} B (params "
                      f"{g['params']:.2f} grads {g['grads']:.2f} optimizer {g['optimizer']:.2f} main {g['main']:.2f})")
        for name, b in projected.items():
            print(f"  projected {name:62s} {b:6.2f} B per masked expert weight per GPU")
        if args.json:
            write_atomic(args.json, json.dumps({"measured": measured, "projected": projected}, indent=2))


# ------------------------------------------------------------------------------------------- cluster plans
def formula_bytes(dtype: str = "bf16", d: int = 1) -> float:
    """The README's mask-state formula per masked weight per GPU (measured: logits L, fp32 gradient buffer G,
    Adam A and fp32 master copy M, the last two split over the D ranks of the distributed optimizer)."""
    L, G, A, M = {"bf16": (3.0, 6.0, 12.0, 6.0), "fp32": (6.0, 6.0, 12.0, 0.0)}[dtype]
    return L + G + (A + M) / d


def plan(name: str, mc, tp: int, pp: int, ep: int, world: int, dtype: str = "bf16") -> dict:
    """Per-GPU persistent memory of mask learning for ``mc`` at a layout: the frozen weights (model dtype; norms,
    routers and, on the first / last stage, embeddings and head included), the mask state of the masked linears
    (every block's q/k/v/o and MLP or experts + shared expert; ``formula_bytes``), dense weights' optimizer split
    over DP = world / (tp * pp), experts' over expert DP = world / (ep * tp * pp)."""
    h, L, d = mc.hidden_size, mc.num_layers, mc.kv_channels
    attn = h * (mc.num_attention_heads * d + 2 * mc.num_query_groups * d) + mc.num_attention_heads * d * h
    mlp = 3 * h * mc.ffn_hidden_size
    shared = 3 * h * (mc.shared_expert_size or 0)
    experts = (mc.num_experts or 0) * mlp
    dense_masked = L / pp * (attn + (shared if mc.is_moe else mlp)) / tp
    expert_masked = L / pp * experts / ep / tp
    # embedding and untied head: both on the one stage at PP=1, else one of them on the first / last stage
    emb = mc.padded_vocab_size * h / tp * (2 if pp == 1 and not mc.tie_word_embeddings else 1)
    other = L / pp * (2 * h + (mc.num_experts or 0) * h)  # norms, router (replicated)
    itemsize = 2 if dtype == "bf16" else 4
    dp, edp = world // (tp * pp), world // (ep * tp * pp)
    out = {"model": name, "tp": tp, "pp": pp, "ep": ep, "gpus": world, "dp": dp, "expert_dp": edp,
           "masked_dense_per_gpu": dense_masked, "masked_expert_per_gpu": expert_masked,
           "weights_gb": (dense_masked + expert_masked + emb + other) * itemsize / 1e9,
           "dense_mask_state_gb": dense_masked * formula_bytes(dtype, dp) / 1e9,
           "expert_mask_state_gb": expert_masked * formula_bytes(dtype, edp) / 1e9}
    out["total_gb"] = out["weights_gb"] + out["dense_mask_state_gb"] + out["expert_mask_state_gb"]
    return out


def plans() -> list[dict]:
    from maskllm_megatron.convert.mapping import model_config_from_hf

    # the released config.json values (transformers 4.x style, as on the hub)
    mixtral = model_config_from_hf({
        "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_local_experts": 8, "num_experts_per_tok": 2,
        "sliding_window": None, "tie_word_embeddings": False})
    qwen3 = model_config_from_hf({
        "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False})
    return [plan("Mixtral 8x7B (examples/mixtral_8x7b.yaml)", mixtral, tp=1, pp=4, ep=8, world=64),
            plan("Qwen3 8B (examples/qwen3_8b.yaml)", qwen3, tp=8, pp=1, ep=1, world=64)]


def plan_main(args) -> None:
    rows = plans()
    print("per GPU, bf16 model, distributed optimizer; mask state per masked weight = 3 + 6 + 18 / D bytes")
    for r in rows:
        moe = r["masked_expert_per_gpu"] > 0
        print(f"  {r['model']}: TP={r['tp']} PP={r['pp']} EP={r['ep']} on {r['gpus']} GPUs (DP {r['dp']}"
              + (f", expert DP {r['expert_dp']}" if moe else "") + f"): masked weights {r['masked_dense_per_gpu'] / 1e9:.3f}e9"
              + (f" dense + {r['masked_expert_per_gpu'] / 1e9:.3f}e9 expert" if moe else "")
              + f"; weights {r['weights_gb']:.1f} GB, mask state {r['dense_mask_state_gb']:.1f} GB"
              + (f" dense + {r['expert_mask_state_gb']:.1f} GB experts" if moe else "")
              + f"; total {r['total_gb']:.1f} GB before activations")
    if args.json:
        write_atomic(args.json, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
