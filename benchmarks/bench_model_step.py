"""Whole-model training-step time: mask learning (frozen weights) over a dense training step (every
weight trainable) of the same SmolLM2-135M model and batch, in one run. Mask variants: ``mask_fused``
(the default fused kernels: the C++ CPU kernels where they run), ``mask_compiled`` (the torch.compile
kernels, ``MASKLLM_CPU_KERNEL=0``), ``mask_eager`` (plain torch ops) and ``mask_distill`` (the fused
kernels with distillation from the dense model: the teacher pass and the KL, ``distill.kd_weight`` 0.5) and
``mask_joint`` (joint training: the masked weights train too, distilled from a kept copy of the original
weights, ``mask.train_weights``; a second model with its own optimizer). ``hf_dense`` (DP=1 only) is a
reference outside megatron: the same dense step in plain PyTorch on the Hugging Face model (transformers'
LlamaForCausalLM with SDPA attention, AdamW with the same settings and clipping): what megatron-core costs
on CPU.

    python benchmarks/bench_model_step.py                                   # TP=1, DP=1
    torchrun --nproc-per-node 2 benchmarks/bench_model_step.py              # TP=1, DP=2
    options: --ckpt DIR (converted checkpoint; made from the cached SmolLM2 if missing)
             --variants dense,mask_fused,mask_compiled,mask_eager,mask_distill,mask_joint,hf_dense (dense always)
             --micro-batch 2 --seq 256 --repeats 5 --settle 1 --json OUT.json
             --profile OUT.txt (after timing: torch.profiler tables of one dense and one mask step, rank 0)

Each step is what the driver runs (``maskllm_megatron.train.step``): ``zero_grad_buffer``, megatron's
forward/backward schedule (``run_batches``), the megatron optimizer's step (Adam, clipping, DDP
gradient all-reduce) and the scheduler, built by the driver's ``build_model`` / ``build_optimizer``.
The variants run interleaved (the order rotates every round), each timed step right after ``--settle``
untimed steps of its own kind (as in a run, where every step is the same kind), and the medians are
compared; the page faults each step took are reported with its time.
TP=2 is impossible for SmolLM2 (9 heads, 3 query groups): only TP=1 is measured, at DP=1 or DP=2.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("dense", "mask_fused", "mask_compiled", "mask_eager", "mask_distill", "mask_joint", "hf_dense")


def ensure_checkpoint(ckpt: Path) -> Path:
    """``ckpt`` if it holds a converted checkpoint, else convert the cached SmolLM2 into it (rank 0)."""
    if (ckpt / "model_config.json").is_file():
        return ckpt
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"{ckpt} has no converted checkpoint: run once without torchrun to create it")
    from maskllm_megatron.assets import smollm2_hf_dir
    from maskllm_megatron.convert.hf_to_mcore import hf_to_mcore

    return hf_to_mcore(smollm2_hf_dir(), ckpt, show_progress=False)


def run_config(ckpt: Path, micro_batch: int, seq: int, dp: int, distributed_optimizer: bool = False,
               dtype: str = "fp32"):
    """A driver config for this benchmark (data.train is required by validation but never read)."""
    from maskllm_megatron.run_config import TrainConfig

    return TrainConfig.from_dict({
        "model": {"checkpoint": str(ckpt), "dtype": dtype},
        "parallel": {"tp": 1, "distributed_optimizer": distributed_optimizer},
        "data": {"train": ["unused"], "seq_length": seq, "micro_batch_size": micro_batch,
                 "global_batch_size": micro_batch * dp},
        "optim": {"lr": 5e-5, "min_lr": 5e-6},  # the logits get x10 (mask_lr_mult): the paper's 5e-4
        "prior": {"method": "magnitude"},
        "run": {"train_iters": 2000, "seed": 1234},
    })


def text_batch(ckpt: Path, micro_batch: int, seq: int, dp_rank: int) -> dict:
    """One micro-batch of real Wikipedia text (different rows on every DP rank), in the driver's format."""
    from maskllm_megatron.assets import wikipedia_articles
    from maskllm_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt / "tokenizer")
    text = "\n\n".join(t for _, t in wikipedia_articles()[:8])
    need = (dp_rank + 1) * micro_batch * (seq + 1)
    ids = torch.tensor(tok.encode(text)[:need], dtype=torch.long)
    if ids.numel() < need:
        raise SystemExit(f"not enough text for {micro_batch} x {seq} tokens per rank")
    rows = ids[dp_rank * micro_batch * (seq + 1):].view(micro_batch, seq + 1)
    return {"tokens": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous(),
            "loss_mask": torch.ones(micro_batch, seq), "position_ids": torch.arange(seq).expand(micro_batch, seq),
            "attention_mask": None}  # causal, as the driver passes it


def dense_model(cfg, info):
    """The same GPTModel, not sparsified, every parameter trainable, weights from the checkpoint."""
    from maskllm_megatron.megatron.checkpointing import load_checkpoint
    from maskllm_megatron.megatron.model_builder import build_gpt_model

    tcfg = info.model.to_transformer_config(1, 1, cfg.model.dtype, perform_initialization=False)
    model = build_gpt_model(info.model, tcfg)
    load_checkpoint(model, cfg.model.checkpoint)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def hf_dense_step(cfg, batch):
    """The dense step in plain PyTorch: the Hugging Face SmolLM2 (the weights the checkpoint was converted
    from), the same tokens and labels, mean next-token loss, backward, clipping and AdamW as the driver's
    optimizer is set (megatron's Adam applies weight decay decoupled, as AdamW)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from maskllm_megatron.assets import smollm2_hf_dir

    o = cfg.optim
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_hf_dir()), dtype=torch.float32,
                                                 attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                  weight_decay=o.weight_decay)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
        F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).backward()
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        optimizer.step()
        return time.perf_counter() - t0

    return step


def joint_model(cfg):
    """The joint-training model (``mask.train_weights``, distilled at ``kd_weight`` 0.5 from the kept copy of
    the original weights), built as the driver builds it: its (cfg, ddp, optimizer, scheduler, masks)."""
    from dataclasses import replace

    from maskllm_megatron.train.setup import apply_prior, build_model, build_optimizer

    joint = replace(cfg, mask=replace(cfg.mask, train_weights=True), distill=replace(cfg.distill, kd_weight=0.5))
    model, _, masks = build_model(joint)
    apply_prior(joint, model, None)
    masks.keep_teacher_copy()
    ddp, optimizer, scheduler = build_optimizer(joint, model, masks)
    ddp.train()
    return joint, ddp, optimizer, scheduler, masks


def make_step(cfg, ddp, optimizer, scheduler, batch, dp_rank: int, masks=None, teacher=None):
    """A closure running one full training iteration, as the driver's loop does: the masked model's with its
    ``MaskController`` ``masks`` (None: the dense model's); with a ``teacher``: the driver's distillation."""
    from maskllm_megatron.train.step import run_batches

    state = {"it": 100}

    def step() -> float:
        """Runs one iteration; returns the seconds spent in the optimizer step."""
        it = state["it"]
        state["it"] += 1
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        sample = (lambda mb: masks.step(it, dp_rank, 1.0)) if masks is not None else None
        run_batches(cfg, ddp, [batch], 1, forward_only=False, sample_masks=sample, teacher=teacher)
        t0 = time.perf_counter()
        optimizer.step()
        scheduler.step(increment=1)
        return time.perf_counter() - t0

    return step


def minor_faults() -> int:
    """Page faults this process has taken so far (first touches of memory the allocator took from the OS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(step) -> tuple[float, float, int]:
    """Seconds of one step and of its optimizer part, on the slowest rank, and the most page faults a
    rank took in it."""
    torch.distributed.barrier()
    faults = minor_faults()
    t0 = time.perf_counter()
    t_opt = step()
    t = torch.tensor([time.perf_counter() - t0, t_opt, minor_faults() - faults], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t[0]), float(t[1]), int(t[2])


def profile_step(step, rows: int = 30) -> str:
    """torch.profiler's table (ops by self CPU time) of one call of ``step`` (every rank runs it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=Path(tempfile.gettempdir()) / "maskllm_bench" / "smollm2-tp1")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--also-seq", type=int, default=0,
                   help="also time each mask variant on sequences of this many tokens (named variant@N), "
                        "interleaved with the rest: the step-time ratio of two sequence lengths under one load")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="the models' dtype (default fp32)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (the fused kernel compiles here)")
    p.add_argument("--settle", type=int, default=1,
                   help="untimed steps of the same variant before each timed one (default 1): a run repeats one "
                        "kind of step, and the allocator then reuses the memory the previous step freed; right "
                        "after a step of the other kind it takes fresh pages from the OS instead (page faults, "
                        "~10 us each on a VM). 0 times every step straight after the other variant's"),
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="megatron's distributed optimizer (as the demo runs), for both steps")
    p.add_argument("--skip-eager", action="store_true", help="leave out mask_eager (long sequences)")
    p.add_argument("--json", help="also write the results to this file (rank 0)")
    p.add_argument("--profile", help="after timing, write torch.profiler tables of one step of each variant "
                                     "(self CPU time per op, rank 0) to this file")
    p.add_argument("--profile-rows", type=int, default=30, help="rows of each profile table (default 30)")
    args = p.parse_args(argv)
    asked = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(asked) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    variants = tuple(v for v in VARIANTS if (v in asked or v == "dense") and not (args.skip_eager and v == "mask_eager"))

    if "hf_dense" in variants and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("hf_dense is a one-process reference: leave it out under torchrun, or run without torchrun")
    ckpt = ensure_checkpoint(args.ckpt.absolute())
    if "RANK" not in os.environ:  # a plain launch: a one-process world
        from maskllm_megatron.launch import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    from maskllm_megatron.train.setup import apply_prior, build_model, build_optimizer, setup_parallel

    world = int(os.environ["WORLD_SIZE"])
    cfg = run_config(ckpt, args.micro_batch, args.seq, world, args.distributed_optimizer, args.dtype)
    env = setup_parallel(cfg)
    rank0 = env.rank == 0
    batch = text_batch(ckpt, args.micro_batch, args.seq, env.dp_rank)

    model, info, masks = build_model(cfg)  # sparsified, frozen weights, dense weights loaded
    apply_prior(cfg, model, None)  # magnitude prior: realistic logits (no calibration data needed)
    n_masked = sum(layer.weight.numel() for layer in masks.layers)
    m_ddp, m_opt, m_sched = build_optimizer(cfg, model, masks)
    d_model = dense_model(cfg, info)
    d_ddp, d_opt, d_sched = build_optimizer(cfg, d_model, None)
    m_ddp.train()
    d_ddp.train()
    mask_step = make_step(cfg, m_ddp, m_opt, m_sched, batch, env.dp_rank, masks)
    from maskllm_megatron.train.step import Teacher

    teacher = Teacher(kd_weight=0.5, temperature=1.0)  # the distilled variants' (the demo's joint recipe)
    steps = {"dense": make_step(cfg, d_ddp, d_opt, d_sched, batch, env.dp_rank),
             "mask_fused": mask_step, "mask_compiled": mask_step, "mask_eager": mask_step,
             "mask_distill": make_step(cfg, m_ddp, m_opt, m_sched, batch, env.dp_rank, masks,
                                       teacher=teacher)}
    if "hf_dense" in variants:
        steps["hf_dense"] = hf_dense_step(cfg, batch)
    if "mask_joint" in variants:
        j_cfg, j_ddp, j_opt, j_sched, j_masks = joint_model(cfg)
        steps["mask_joint"] = make_step(j_cfg, j_ddp, j_opt, j_sched, batch, env.dp_rank, j_masks,
                                        teacher=teacher)
    if args.also_seq:  # the same models on shorter (or longer) sequences
        from dataclasses import replace

        short_cfg = replace(cfg, data=replace(cfg.data, seq_length=args.also_seq))
        short = text_batch(ckpt, args.micro_batch, args.also_seq, env.dp_rank)
        extra = {"mask_fused": lambda: make_step(short_cfg, m_ddp, m_opt, m_sched, short, env.dp_rank, masks),
                 "mask_distill": lambda: make_step(short_cfg, m_ddp, m_opt, m_sched, short, env.dp_rank, masks,
                                                   teacher=teacher),
                 "mask_joint": lambda: make_step(replace(j_cfg, data=short_cfg.data), j_ddp, j_opt, j_sched, short,
                                                 env.dp_rank, j_masks, teacher=teacher)}
        for name in [v for v in variants if v in extra]:
            steps[f"{name}@{args.also_seq}"] = extra[name]()
        variants += tuple(f"{v}@{args.also_seq}" for v in variants if v in extra)

    def run(name: str, settle: int = 0) -> tuple[float, float, int]:
        masks.set_fused_kernel(name != "mask_eager")  # the joint model's masks keep the default (fused)
        os.environ["MASKLLM_CPU_KERNEL"] = "0" if name == "mask_compiled" else "1"
        for _ in range(settle):
            steps[name]()
        return timed(steps[name])

    times = {v: [] for v in variants}
    opt_times = {v: [] for v in variants}
    faults = {v: [] for v in variants}
    for r in range(args.warmup + args.repeats):
        k = r % len(variants)
        order = variants[k:] + variants[:k]  # rotate: no variant always runs first
        for name in order:
            t, t_opt, n_faults = run(name, args.settle)
            if r >= args.warmup:
                times[name].append(t)
                opt_times[name].append(t_opt)
                faults[name].append(n_faults)
        if rank0:
            print(f"round {r + 1}/{args.warmup + args.repeats}" + (" (warm-up)" if r < args.warmup else "")
                  + "".join(f"  {n} {times[n][-1] * 1e3:.0f} ms" for n in variants if r >= args.warmup), flush=True)

    if args.profile:
        tables = {name: profile_step(lambda: run(name), args.profile_rows) for name in variants}
        if rank0:
            write_atomic(args.profile, "".join(f"== {n} step (rank 0, {args.micro_batch} x {args.seq} tokens, "
                                               f"DP={env.dp_size})\n{t}\n" for n, t in tables.items()))

    med = {v: statistics.median(ts) for v, ts in times.items()}
    per_round = {v: statistics.median(a / b for a, b in zip(times[v], times["dense"])) for v in variants[1:]}
    results = {
        "model": "SmolLM2-135M", "tp": 1, "dp": env.dp_size, "distributed_optimizer": args.distributed_optimizer,
        "micro_batch": args.micro_batch, "seq": args.seq, "settle_steps": args.settle,
        "tokens_per_step": args.micro_batch * args.seq * env.dp_size, "threads_per_rank": torch.get_num_threads(),
        "masked_weights": n_masked, "repeats": args.repeats, "median_s": med, "all_s": times,
        "optimizer_step_median_s": {v: statistics.median(ts) for v, ts in opt_times.items()},
        "page_faults_median": {v: statistics.median(n) for v, n in faults.items()},
        "over_dense": {v: med[v] / med["dense"] for v in variants[1:]},
        "median_round_ratio": per_round}
    if rank0:
        print(f"SmolLM2-135M step, TP=1 DP={env.dp_size}, {args.micro_batch} x {args.seq} tokens per rank, "
              f"{torch.get_num_threads()} threads per rank, median of {args.repeats}")
        for v in variants:
            print(f"  {v:13s} {med[v] * 1e3:8.0f} ms   / dense = {med[v] / med['dense']:.3f}   (optimizer step "
                  f"{results['optimizer_step_median_s'][v] * 1e3:.0f} ms, "
                  f"{results['page_faults_median'][v]:.0f} page faults per rank)")
        if "mask_fused" in variants:
            ratio = results["over_dense"]["mask_fused"]
            print(f"  target: mask_fused / dense <= 1.2 -> {'met' if ratio <= 1.2 else 'NOT met'} ({ratio:.3f}; "
                  f"median of the per-round ratios {per_round['mask_fused']:.3f})")
        if "mask_fused" in variants and "mask_distill" in variants:
            rounds = statistics.median(a / b for a, b in zip(times["mask_distill"], times["mask_fused"]))
            results["distill_over_mask"] = med["mask_distill"] / med["mask_fused"]
            print(f"  distillation: mask_distill / mask_fused = {results['distill_over_mask']:.3f} (median of the "
                  f"per-round ratios {rounds:.3f}): the teacher pass and the KL; at equal wall-clock a "
                  f"distilling run gets 1/{results['distill_over_mask']:.3f} of the iterations")
        if "mask_fused" in variants and "mask_joint" in variants:
            results["joint_over_mask"] = med["mask_joint"] / med["mask_fused"]
            print(f"  joint training: mask_joint / mask_fused = {results['joint_over_mask']:.3f}")
        for v in (v for v in variants if "@" in v):
            base = v.split("@")[0]
            rounds = statistics.median(a / b for a, b in zip(times[v], times[base]))
            results.setdefault("over_base_seq", {})[v] = med[v] / med[base]
            print(f"  {v} / {base} ({args.seq} tokens) = {med[v] / med[base]:.3f} (median of the per-round ratios "
                  f"{rounds:.3f})")
        if args.json:
            write_atomic(args.json, json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
