"""The memory model (maskllm_megatron/train/memory.py) against peak memory measured on the CPU.

    torchrun --nproc-per-node 2 benchmarks/memory_model.py [--layouts a,b,...] [--seqs 512] [--json OUT]
    python benchmarks/memory_model.py --layouts tp1,tp1_full ...      (one process: TP=PP=1 layouts only)

A small LLaMA-shaped model (random weights, ``--hidden`` etc.) is built, sparsified and given a magnitude
prior exactly as the driver does (``build_gpt_model`` with the layout's TransformerConfig, ``sparsify``,
``build_optimizer``: megatron's DDP and distributed optimizer), then takes ``--steps`` training steps
(``run_batches``, the driver's schedule call, and the optimizer step) on random tokens. Peak memory is
what the CPU allocator handed out, the CPU counterpart of ``torch.cuda.max_memory_allocated``: every
allocation and free of the process from before the model is built (torch.profiler's memory events,
summed in time order), so weights, logits, gradients, optimizer state and activations are all counted
and nothing else is. Per layout it prints the measured peak of the most loaded rank, the model's
estimate and their ratio, and the same for the persistent state (after the first step: Adam's state
exists) and the bytes that stayed counted from the first step to the second (blocks that gloo's threads freed,
which the profiler does not see until their address is reused; 0 at TP=1): the measurement's uncertainty.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

# name: parallel-section overrides (world size 2: TP=1 and PP=1 layouts run data-parallel)
LAYOUTS = {
    "tp1": {},
    "tp1_full": {"recompute": "full"},
    "tp1_selective": {"recompute": "selective", "recompute_modules": ["core_attn", "mlp"]},
    "tp2": {"tp": 2},
    "tp2_sp": {"tp": 2, "sequence_parallel": True},
    "tp2_full": {"tp": 2, "recompute": "full"},
    "tp2_sp_full": {"tp": 2, "sequence_parallel": True, "recompute": "full"},
    "tp2_sp_block": {"tp": 2, "sequence_parallel": True, "recompute": "full", "recompute_method": "block",
                     "recompute_num_layers": 2},
    "tp2_sp_selective": {"tp": 2, "sequence_parallel": True, "recompute": "selective",
                         "recompute_modules": ["core_attn", "mlp"]},
    "pp2": {"pp": 2},
    "pp2_full": {"pp": 2, "recompute": "full"},
    # what trains (mask-section keys): joint training, and with distillation the teacher's copy of the trained
    # weights (the teacher's forward is not run: its logits are not modelled); a refit distilled likewise
    "tp1_joint": {"mask": {"train_weights": True}},
    "tp1_joint_kd": {"mask": {"train_weights": True}, "distill": {"kd_weight": 0.5}},
    "tp1_refit_kd": {"mask": {"refit": True}, "distill": {"kd_weight": 1.0}},
}


def model_config(args):
    from maskllm_megatron.megatron.model_builder import ModelConfig

    return ModelConfig(family="llama", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                       num_attention_heads=args.heads, num_query_groups=args.groups, vocab_size=args.vocab,
                       max_position_embeddings=max(args.seqs))


def train_config(args, overrides: dict, seq: int):
    from maskllm_megatron.run_config import TrainConfig

    return TrainConfig.from_dict({
        "model": {"checkpoint": "unused"}, "data": {"train": ["unused"], "seq_length": seq,
                                                    "micro_batch_size": args.micro_batch,
                                                    "global_batch_size": args.micro_batch * args.microbatches},
        "parallel": {"distributed_optimizer": True, **{k: v for k, v in overrides.items() if k not in ("mask", "distill")}},
        "prior": {"method": "magnitude"}, "mask": {"fused_kernel": True, **overrides.get("mask", {})},
        "distill": overrides.get("distill", {}), "run": {"train_iters": 100}})


class AllocatorPeak:
    """Peak bytes the CPU allocator handed out while active (torch.profiler memory events)."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile, record_function

        self._record = record_function
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()
        return self

    def mark(self, name: str):
        """A named instant whose allocated level ``levels()`` reports."""
        with self._record(f"mark::{name}"):
            pass

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        events = self.prof.profiler.kineto_results.events()
        marks = sorted((e.start_ns(), e.name()[6:]) for e in events if e.name().startswith("mark::"))
        # Every allocation and free, by address. gloo runs collectives on its own threads, which sometimes drop
        # the last reference to a tensor a collective used; the profiler sees only this thread's frees, so
        # an allocation at an address still counted live frees the block that was there (seen at TP=2:
        # without this the state grew by the collectives' outputs every step).
        allocations = []

        def walk(nodes):
            for node in nodes:
                extra = node.extra_fields
                if type(extra).__name__ == "_ExtraFields_Allocation" and extra.device.type == "cpu":
                    allocations.append((node.start_time_ns, extra.alloc_size, extra.ptr))
                walk(node.children)

        walk(self.prof.profiler.kineto_results.experimental_event_tree())
        allocations.sort(key=lambda a: a[0])
        live, level, self.peak, self.levels, i = {}, 0, 0, {}, 0
        self.missed = 0  # bytes freed elsewhere, found when their address was reused
        for when, size, ptr in allocations:
            while i < len(marks) and marks[i][0] <= when:
                self.levels[marks[i][1]] = level
                i += 1
            if size > 0:
                if ptr in live:
                    level -= live[ptr]
                    self.missed += live[ptr]
                live[ptr] = size
                level += size
            elif ptr in live:
                level -= live.pop(ptr)
            self.peak = max(self.peak, level)
        for _, name in marks[i:]:
            self.levels[name] = level
        self.end = level
        if os.environ.get("MEMORY_MODEL_TRACE"):  # the allocations up to the peak, with their operators
            ops = sorted((e.start_ns(), e.end_ns(), e.name()) for e in events if e.name() != "[memory]")
            level, rows = 0, []
            for when, size, ptr in allocations:
                level += size
                rows.append((when, size, level))
            k = max(range(len(rows)), key=lambda j: rows[j][2])
            for when, size, lv in rows[max(0, k - 40):k + 1]:
                if abs(size) > 2**16:
                    inner = [n for st, en, n in ops if st <= when <= en and not n.startswith("autograd::engine")]
                    print(f"   {size / 2**20:+8.3f} -> {lv / 2**20:8.2f}  {' > '.join(inner[-3:])}")
        return False


class CollectiveTensorsFreedHere:
    """gloo runs every collective on a worker thread, which sometimes drops the last reference to a tensor the
    collective used (seen: row-parallel outputs at TP=2); the profiler records only this thread's frees, so
    such blocks would stay counted. While active, the tensors of the latest collective are also referenced
    here until the next collective starts (by then gloo has let go of them), so this thread frees them.
    That keeps them alive for at most the gap between two collectives."""

    NAMES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "reduce_scatter",
             "_all_gather_base", "_reduce_scatter_base", "broadcast", "all_to_all_single")
    ALIASES = ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers",
               "megatron.core.tensor_parallel.utils", "megatron.core.utils")

    def __enter__(self):
        import importlib

        dist = torch.distributed
        self.held, self.saved = [], []
        wrapped = {}
        for name in self.NAMES:
            real = getattr(dist, name, None)
            if real is not None:
                wrapped[real] = self._wrap(real)
                self.saved.append((dist, name, real))
                setattr(dist, name, wrapped[real])
        for module_name in self.ALIASES:  # megatron's dist_all_gather_func / dist_reduce_scatter_func aliases
            module = importlib.import_module(module_name)
            for attr in ("dist_all_gather_func", "dist_reduce_scatter_func"):
                real = getattr(module, attr, None)
                if real in wrapped:
                    self.saved.append((module, attr, real))
                    setattr(module, attr, wrapped[real])
        return self

    def _wrap(self, real):
        def collective(*args, **kwargs):
            self.held = []  # the previous collective's tensors: gloo is done with them
            self.held = [a for a in list(args) + list(kwargs.values()) if isinstance(a, (torch.Tensor, list))]
            return real(*args, **kwargs)

        return collective

    def __exit__(self, *exc):
        for owner, name, real in reversed(self.saved):
            setattr(owner, name, real)
        self.held = []
        return False


def measure(args, name: str, overrides: dict, seq: int) -> dict:
    from megatron.core import parallel_state

    from maskllm_megatron.megatron.model_builder import build_gpt_model
    from maskllm_megatron.prune.methods import magnitude_mask
    from maskllm_megatron.train.memory import Layout, estimate
    from maskllm_megatron.train.setup import build_optimizer, setup_parallel, sparsify_model
    from maskllm_megatron.train.step import run_batches

    cfg = train_config(args, overrides, seq)
    env = setup_parallel(cfg)
    mc = model_config(args)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    mb, num_micro = args.micro_batch, cfg.data.global_batch_size // (args.micro_batch * env.dp_size)
    tokens = torch.randint(0, mc.vocab_size, (num_micro, mb, seq + 1), generator=g)
    batches = [{"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(), "loss_mask": torch.ones(mb, seq),
                "position_ids": torch.arange(seq).expand(mb, seq), "attention_mask": None} for t in tokens]
    from maskllm_megatron.train import step

    loss_func = step._loss_func

    def marked_loss(*a, **k):  # the level when the forward has ended (the last stage's loss)
        peak.mark("forward_end")
        return loss_func(*a, **k)

    step._loss_func = marked_loss
    with CollectiveTensorsFreedHere(), AllocatorPeak() as peak:
        tcfg = mc.to_transformer_config(cfg.parallel.tp, cfg.parallel.pp, "fp32", **cfg.recompute_overrides())
        model = build_gpt_model(mc, tcfg)
        masks = sparsify_model(cfg, model)
        for layer in masks.layers:
            layer.set_prior(magnitude_mask(layer.weight.detach(), layer.nm))
        if cfg.mask.refit:
            masks.fix_masks()
        if cfg.distills_trained_weights():
            masks.keep_teacher_copy()
        peak.mark("model_built")
        ddp, optimizer, _ = build_optimizer(cfg, model, masks)
        peak.mark("optimizer_built")
        ddp.train()
        for it in range(args.steps):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            run_batches(cfg, ddp, batches, num_micro, forward_only=False,
                        sample_masks=lambda m: masks.step(it, m * env.dp_size + env.dp_rank, 1.0))
            optimizer.step()
            peak.mark(f"after_step_{it}")
        del ddp, optimizer, model
        masks = None  # the controller holds the model too
    layout = Layout.from_config(cfg, torch.distributed.get_world_size(), "fp32")
    est = estimate(mc, layout)
    step._loss_func = loss_func
    local = {"peak": peak.peak, "state": peak.levels["after_step_0"], "stage": parallel_state.get_pipeline_model_parallel_rank(),
             "forward_end": peak.levels.get("forward_end"), "levels": peak.levels}
    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, local)
    top = max(ranks, key=lambda r: r["peak"])
    # what stayed counted from the first step to the second: blocks gloo's threads freed unseen (0 at TP=1)
    drift = max(abs(r["levels"][f"after_step_{args.steps - 1}"] - r["levels"]["after_step_0"]) for r in ranks)
    return {"layout": name, "seq": seq, "overrides": overrides, "measured_peak": top["peak"], "drift": drift,
            "measured_state": top["state"], "measured_stage": top["stage"], "ranks": ranks,
            "predicted": est.as_dict(), "ratio": top["peak"] / est.peak, "state_ratio": top["state"] / est.state,
            # the step's own memory (peak above the persistent state), free of what the state over-counts
            "step_ratio": (top["peak"] - top["state"]) / (est.peak - est.state)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    p.add_argument("--seqs", default="512", help="sequence lengths, comma-separated")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=2, help="micro-batches per iteration (global batch / mb)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", help="write the results here (rank 0)")
    p.add_argument("--verbose", action="store_true", help="also the level when the forward ends, and the terms")
    args = p.parse_args(argv)
    args.seqs = [int(s) for s in args.seqs.split(",")]
    names = [n for n in args.layouts.split(",") if n]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        p.error(f"unknown layouts {unknown}: use {', '.join(LAYOUTS)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    results = []
    for name in names:
        for seq in args.seqs:
            r = measure(args, name, LAYOUTS[name], seq)
            results.append(r)
            if torch.distributed.get_rank() == 0:
                pr = r["predicted"]
                print(f"{name:17s} seq {seq:5d}: peak measured {r['measured_peak'] / 2**20:6.1f} MiB, predicted "
                      f"{pr['peak'] / 2**20:6.1f} MiB, ratio {r['ratio']:.3f} | state {r['measured_state'] / 2**20:5.1f} "
                      f"vs {pr['state'] / 2**20:5.1f} MiB ({r['state_ratio']:.3f}) | step (peak - state) ratio "
                      f"{r['step_ratio']:.3f} | stage {r['measured_stage']} (model: {pr['stage']}) | unseen frees "
                      f"{r['drift'] / 2**20:.1f} MiB", flush=True)
                if args.verbose:
                    fe = r["ranks"][0]["forward_end"]
                    d = pr["detail"]
                    print(f"    forward end {fe / 2**20 if fe else float('nan'):.1f} MiB; predicted: activations "
                          f"{pr['activations'] / 2**20:.1f} (sampling {pr['mask_sampling'] / 2**20:.1f}), loss "
                          f"{d['loss'] / 2**20:.1f}, first backward {d['first_backward'] / 2**20:.1f} (rebuilt "
                          f"{d['rebuilt'] / 2**20:.1f})", flush=True)
    if torch.distributed.get_rank() == 0 and args.json:
        Path(args.json).write_text(json.dumps({"world_size": world, "args": {k: v for k, v in vars(args).items()},
                                               "results": results}, indent=1))


if __name__ == "__main__":
    rc = main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
    sys.exit(rc)
