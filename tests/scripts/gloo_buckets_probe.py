"""Worker (torchrun, gloo): megatron's in-place bucket reduce-scatter / all-gather inside a coalescing
manager, natively and through cpu_compat's gloo_bucket_collectives, on the same inputs. Rank 0 prints one JSON
line per rank: whether the results are bit-identical and which calls took the fast path."""
import json

import torch
import torch.distributed as dist
from torch.distributed import _coalescing_manager


def main():
    dist.init_process_group("gloo")
    import megatron.core.distributed.param_and_grad_buffer as pgb

    native = {"rs": pgb.dist_reduce_scatter_func, "ag": pgb.dist_all_gather_func}
    from maskllm_megatron.megatron import cpu_compat

    cpu_compat.apply()
    fast = {"rs": pgb.dist_reduce_scatter_func, "ag": pgb.dist_all_gather_func}
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    buckets = [torch.randn(4096 * world), torch.randn(1000 * world)]
    buckets[0][:8] = -0.0  # signed zeros survive the gather
    buckets[1][8:16] = float("inf")
    shard = [b.view(world, -1)[rank] for b in buckets]
    original = [b.clone() for b in buckets]

    def run(kind, f, async_op=False):
        for b, o in zip(buckets, original):
            b.copy_(o)
        with _coalescing_manager(None, async_ops=async_op) as cm:
            for b, s in zip(buckets, shard):
                if kind == "rs":
                    f(s, b, op=dist.ReduceOp.SUM, group=None, async_op=async_op)
                else:
                    f(b, s, group=None, async_op=async_op)
        if async_op:
            cm.wait()
        return [(s if kind == "rs" else b).clone() for b, s in zip(buckets, shard)]

    calls = []
    real_all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append("all_reduce"), real_all_reduce(*a, **k))[1]
    same = {}
    for kind in ("rs", "ag"):
        want = run(kind, native[kind])
        got = run(kind, fast[kind])
        same[kind] = all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(want, got))
    fast_calls = len(calls)
    same["rs_async"] = all(torch.equal(x, y) for x, y in zip(run("rs", native["rs"]), run("rs", fast["rs"], True)))
    dist.all_reduce = real_all_reduce
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "same": same, "fast_calls": fast_calls,
                                  "async_fast_calls": len(calls) - fast_calls})
    if rank == 0:  # one writer: ranks printing at once interleave their lines
        for row in rows:
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
