"""Megatron's in-place bucket collectives on gloo: its own coalesced reduce-scatter / all-gather against
cpu_compat's gloo_bucket_collectives (one all-reduce per bucket on a second group), same buckets, same run.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/bench_gloo_buckets.py [--mb 320] [--buckets 2]

The distributed optimizer calls the reduce-scatter for the gradients and the all-gather for the
parameters once per iteration each; SmolLM2-135M's mask logits are 159M fp32 = 637 MB (2 x ~320 MB).
Prints the median of ``--repeats`` calls of each and checks that both paths give the same bytes.
"""
import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed import _coalescing_manager


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=320.0, help="size of each fp32 bucket in MB")
    p.add_argument("--buckets", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    import megatron.core.distributed.param_and_grad_buffer as pgb

    paths = {"megatron": (pgb.dist_reduce_scatter_func, pgb.dist_all_gather_func)}
    from maskllm_megatron.megatron import cpu_compat

    cpu_compat.apply()
    paths["all_reduce"] = (pgb.dist_reduce_scatter_func, pgb.dist_all_gather_func)
    rank, world = dist.get_rank(), dist.get_world_size()
    n = int(args.mb * 1e6 / 4) // world * world
    torch.manual_seed(rank)
    buckets = [torch.randn(n) for _ in range(args.buckets)]
    original = [b.clone() for b in buckets]
    shards = [b.view(world, -1)[rank] for b in buckets]

    def call(kind: str, path: str) -> float:
        for b, o in zip(buckets, original):
            b.copy_(o)
        rs, ag = paths[path]
        dist.barrier()
        t0 = time.perf_counter()
        with _coalescing_manager(None, async_ops=False):
            for b, s in zip(buckets, shards):
                rs(s, b, op=dist.ReduceOp.SUM, group=None, async_op=False) if kind == "reduce_scatter" \
                    else ag(b, s, group=None, async_op=False)
        return time.perf_counter() - t0

    results = {}
    for kind in ("reduce_scatter", "all_gather"):
        times = {path: [] for path in paths}
        for r in range(args.repeats + 1):
            for path in (paths if r % 2 else reversed(list(paths))):
                t = call(kind, path)
                if r:
                    times[path].append(t)
        outputs = {}
        for path in paths:
            call(kind, path)
            outputs[path] = [(s if kind == "reduce_scatter" else b).clone() for b, s in zip(buckets, shards)]
        same = all(torch.equal(x.view(torch.int32), y.view(torch.int32))
                   for x, y in zip(outputs["megatron"], outputs["all_reduce"]))
        results[kind] = ({path: statistics.median(ts) for path, ts in times.items()}, same)
    if rank == 0:
        print(f"{args.buckets} x {n * 4 / 1e6:.0f} MB fp32 buckets, {world} ranks, gloo, median of {args.repeats}")
        for kind, (med, same) in results.items():
            print(f"  {kind:15s} megatron {med['megatron']:.3f} s   all_reduce path {med['all_reduce']:.3f} s   "
                  f"ratio {med['megatron'] / med['all_reduce']:.2f}   bit-identical: {same}")
    return 0


if __name__ == "__main__":
    rc = main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
    raise SystemExit(rc)
