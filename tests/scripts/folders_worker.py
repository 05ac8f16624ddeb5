"""Ranks write one output folder together with ``checkpoint_folders.atomic_dir`` (gloo; no megatron):
every rank's part is in the folder once it appears, and a block that fails on every rank leaves the
earlier output as it was and no staging folder. Prints ``RESULT {json}`` on rank 0."""
import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

from maskllm_megatron.checkpoint_folders import atomic_dir, partial_path


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with atomic_dir(out, tool="test") as tmp:
        if rank == 1:
            time.sleep(1.0)  # the slow rank: the folder must not appear before its part is written
        (tmp / f"part-{rank}").write_text(str(rank))
    seen_after_write = sorted(p.name for p in out.iterdir())
    failed = False
    try:
        with atomic_dir(out, overwrite=True, tool="test") as tmp:
            (tmp / f"new-{rank}").write_text("x")
            dist.barrier()  # every rank has written its part when the failure comes (a rank that fails
            raise RuntimeError("killed mid-write")  # first deletes the staging under a slower one's feet)
    except RuntimeError:
        failed = True
    dist.barrier()
    result = {"rank": rank, "parts": seen_after_write, "failed": failed,
              "after_failure": sorted(p.name for p in out.iterdir()), "staging_left": partial_path(out).exists()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        print("RESULT " + json.dumps(gathered), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]).absolute())
