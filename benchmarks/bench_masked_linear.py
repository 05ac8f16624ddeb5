"""Forward+backward time of one masked linear layer against a dense trainable layer and against the
reference MaskLLM formulation, all measured in this run; plus the persistent mask state per weight.

    python benchmarks/bench_masked_linear.py [--rows 2048 --cols 2048 --tokens 4096 --repeats 5 --dtype bf16]

Layers (TP=1, single-rank gloo group, megatron-core's own ColumnParallelLinear machinery):
  dense      ColumnParallelLinear with a trainable weight (the baseline);
  masked     MaskedColumnParallelLinear, frozen weight, soft Gumbel mask (our fused kernels: the C++
             CPU kernels where they run, else torch.compile);
  defaults   the same layer with no kernel flag set, as a user builds it (the fastest kernel that runs);
  compiled   the same with the torch.compile kernels (MASKLLM_CPU_KERNEL=0);
  eager      the same with the un-compiled kernel;
  reference  the published formulation: F.gumbel_softmax on [groups, 6], the batched
             [G,1,6] @ [1,6,4] product, W * mask, then the same linear function.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def init_single_rank():
    from megatron.core import parallel_state

    from maskllm_megatron.megatron import cpu_compat

    cpu_compat.apply()
    if not torch.distributed.is_initialized():
        store = tempfile.mktemp()
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)


def timed(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each callable; the variants run interleaved, the order rotating every round,
    so that drifts of the machine's speed hit them all alike."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(warmup + repeats):  # the warm-up rounds also compile the fused kernels
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="the layers' parameters and activations, as in a model of that dtype (default fp32)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    init_single_rank()
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from maskllm_megatron.masks import MaskConfig, candidate_patterns
    from maskllm_megatron.megatron.layers import MaskedColumnParallelLinear

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = TransformerConfig(num_layers=1, hidden_size=args.cols, num_attention_heads=8, use_cpu_initialization=True,
                            params_dtype=dtype, bf16=dtype == torch.bfloat16)
    init = torch.nn.init.normal_
    x = torch.randn(args.tokens, 1, args.cols).to(dtype)
    dense = ColumnParallelLinear(args.cols, args.rows, config=cfg, init_method=init, bias=False)
    masked = MaskedColumnParallelLinear(args.cols, args.rows, config=cfg, init_method=init, bias=False,
                                        mask_config=MaskConfig(), mask_layer_id="bench")
    masked.set_mask_step(MaskConfig().step_state(10))

    def step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            xr = x.detach().requires_grad_(True)
            out, _ = layer(xr)
            out.sum().backward()
        return run

    # The reference formulation, through the same megatron linear function.
    patterns = candidate_patterns(MaskConfig().nm, dtype=dtype)
    ref_logits = torch.nn.Parameter(masked.mask_logits.detach().clone())

    def reference():
        ref_logits.grad = None
        groups = ref_logits.view(-1, 6)
        soft = F.gumbel_softmax(groups * 100.0, tau=4.0, hard=False)
        mask = torch.bmm(soft.unsqueeze(1), patterns.expand(groups.shape[0], 6, 4)).view(args.rows, args.cols)
        w = masked.weight * mask
        xr = x.detach().requires_grad_(True)
        out = ColumnParallelLinear._forward_impl(dense, xr, w, bias=None, gradient_accumulation_fusion=False,
                                                 allreduce_dgrad=False, sequence_parallel=False,
                                                 grad_output_buffer=None, wgrad_deferral_limit=None,
                                                 tp_group=dense.tp_group)
        out.sum().backward()

    # The mask machinery alone (no matmuls): W -> masked W -> backward with a fixed upstream gradient.
    upstream = torch.randn(args.rows, args.cols).to(dtype)

    def use_kernel(mode: str) -> None:
        """``defaults`` (the layer as built: the fastest kernel that runs here), ``fused`` (fused kernels),
        ``compiled`` (torch.compile only) or ``eager``."""
        masked.fused_mask_kernel = None if mode == "defaults" else mode != "eager"
        os.environ["MASKLLM_CPU_KERNEL"] = "0" if mode == "compiled" else "1"

    def mask_only(mode: str):
        def go():
            use_kernel(mode)
            masked.mask_logits.grad = None
            masked.sampled_weight().backward(upstream)
        return go

    def reference_mask_only():
        ref_logits.grad = None
        groups = ref_logits.view(-1, 6)
        soft = F.gumbel_softmax(groups * 100.0, tau=4.0, hard=False)
        mask = torch.bmm(soft.unsqueeze(1), patterns.expand(groups.shape[0], 6, 4)).view(args.rows, args.cols)
        (masked.weight * mask).backward(upstream)

    results = {"rows": args.rows, "cols": args.cols, "tokens": args.tokens, "dtype": args.dtype,
               "threads": torch.get_num_threads()}

    def with_kernel(mode: str):
        run = step(masked)

        def go():
            use_kernel(mode)
            run()
        return go

    t = timed({"dense": step(dense), "masked": with_kernel("fused"), "defaults": with_kernel("defaults"),
               "compiled": with_kernel("compiled"), "eager": with_kernel("eager"), "reference": reference}, args.repeats)
    t_dense, t_masked, t_comp, t_eager, t_ref = t["dense"], t["masked"], t["compiled"], t["eager"], t["reference"]
    t_defaults = t["defaults"]
    m = timed({"ours": mask_only("fused"), "ours_compiled": mask_only("compiled"), "ours_eager": mask_only("eager"),
               "reference": reference_mask_only}, args.repeats)
    results.update(dense_s=t_dense, masked_s=t_masked, masked_compiled_s=t_comp, masked_eager_s=t_eager,
                   masked_defaults_s=t_defaults, defaults_over_dense=t_defaults / t_dense,
                   reference_s=t_ref, masked_over_dense=t_masked / t_dense, compiled_over_dense=t_comp / t_dense,
                   eager_over_dense=t_eager / t_dense,
                   reference_over_masked=t_ref / t_masked, mask_only_s=m,
                   mask_only_reference_over_ours=m["reference"] / m["ours"])

    # Persistent mask state per masked weight: fp32 logits + their gradient + Adam (exp_avg, exp_avg_sq). A bf16
    # model's (fp32 master copies in megatron's optimizer) is benchmarks/bench_memory.py's.
    per_weight = masked.mask_logits.numel() * 4 / masked.weight.numel()
    if args.dtype == "fp32":
        results.update(state_bytes_per_weight={"logits": per_weight, "grad": per_weight, "adam": 2 * per_weight,
                                               "total": 4 * per_weight, "reference_total": 24.0})
    print(f"layer {args.rows}x{args.cols} {args.dtype}, {args.tokens} tokens, {results['threads']} threads "
          f"(median of {args.repeats}, interleaved)")
    print(f"  dense trainable   {t_dense * 1e3:8.1f} ms")
    print(f"  masked (fused)    {t_masked * 1e3:8.1f} ms   masked / dense     = {t_masked / t_dense:.3f}  (target <= 1.15)")
    print(f"  masked (defaults) {t_defaults * 1e3:8.1f} ms   defaults / dense   = {t_defaults / t_dense:.3f}  "
          "(a layer as built, no kernel flag; target <= 1.15)")
    print(f"  masked (compiled) {t_comp * 1e3:8.1f} ms   compiled / dense   = {t_comp / t_dense:.3f}")
    print(f"  masked (eager)    {t_eager * 1e3:8.1f} ms   eager / dense      = {t_eager / t_dense:.3f}")
    print(f"  reference style   {t_ref * 1e3:8.1f} ms   reference / masked = {t_ref / t_masked:.3f}  (target >= 1.4)")
    print(f"  mask machinery alone (sample + W * mask, forward + backward, no matmul): ours {m['ours'] * 1e3:.1f} ms "
          f"(torch.compile {m['ours_compiled'] * 1e3:.1f} ms, eager {m['ours_eager'] * 1e3:.1f} ms), reference {m['reference'] * 1e3:.1f} ms: "
          f"reference / ours = {m['reference'] / m['ours']:.2f}")
    if args.dtype == "fp32":
        print(f"  mask state: {4 * per_weight:.1f} bytes per masked weight (logits {per_weight:.1f} + grad "
              f"{per_weight:.1f} + Adam {2 * per_weight:.1f}); reference 24.0")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return results


if __name__ == "__main__":
    ok = main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
    sys.exit(0 if ok else 1)
