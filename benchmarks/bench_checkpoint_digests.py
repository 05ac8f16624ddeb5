"""What the checkpoint digests (#39) cost: a megatron-core dist-checkpoint save of SIZE MB of fp32 tensors
in one process (the driver's ``dist_checkpointing.save``), then each rank's ``write_digests`` (CRC-32 of the
files it wrote, read back right after the save) and a resume's ``digest_problem`` (all files checked).

    python benchmarks/bench_checkpoint_digests.py --mb 256 1024 --repeats 3 --dir /tmp/digest_bench

Prints one line per size: the median save time without digests, the digests' time, and their share.
The same-size hash rates of the candidates (one buffer in memory) come first.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import time
import zlib
from pathlib import Path


def hash_rates(mb: int = 256) -> str:
    data = os.urandom(mb << 20)
    rates = []
    for name, fn in (("crc32", lambda: zlib.crc32(data)), ("sha256", lambda: hashlib.sha256(data).digest()),
                     ("sha1", lambda: hashlib.sha1(data).digest()),
                     ("blake2b", lambda: hashlib.blake2b(data, digest_size=16).digest())):
        t0 = time.perf_counter()
        fn()
        rates.append(f"{name} {mb / 1024 / (time.perf_counter() - t0):.2f} GB/s")
    return "hash rates in memory: " + ", ".join(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/digest_bench"))
    args = ap.parse_args()

    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from maskllm_megatron.checkpoint_folders import digest_problem, tree_bytes, write_digests
    from maskllm_megatron.launch import quiet_known_warnings
    from maskllm_megatron.megatron import cpu_compat
    from maskllm_megatron.megatron.parallel import init_process_group, teardown

    quiet_known_warnings()
    cpu_compat.apply()
    init_process_group()
    print(hash_rates(), flush=True)
    g = torch.Generator().manual_seed(0)
    for mb in args.mb:
        n = (mb << 20) // 4 // 64  # 64 tensors of fp32
        sharded = {f"t{i}": ShardedTensor.from_rank_offsets(f"t{i}", torch.randn(n, generator=g), replica_id=0)
                   for i in range(64)}
        saves, digests, verifies = [], [], []
        for _ in range(args.repeats):
            folder = args.dir / f"ckpt_{mb}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            t0 = time.perf_counter()
            dist_checkpointing.save(sharded, str(folder))
            t1 = time.perf_counter()
            write_digests(folder, 0, 1)
            t2 = time.perf_counter()
            assert digest_problem(folder) is None
            t3 = time.perf_counter()
            saves.append(t1 - t0)
            digests.append(t2 - t1)
            verifies.append(t3 - t2)
        save, digest, verify = (statistics.median(x) for x in (saves, digests, verifies))
        print(f"{tree_bytes(folder) / 1e6:.0f} MB checkpoint: save {save:.2f} s without digests, digests +{digest:.2f} s "
              f"(+{100 * digest / save:.0f}%, {tree_bytes(folder) / 1e9 / digest:.2f} GB/s), resume's check "
              f"{verify:.2f} s (median of {args.repeats})", flush=True)
        shutil.rmtree(args.dir / f"ckpt_{mb}", ignore_errors=True)
    teardown()


if __name__ == "__main__":
    main()
