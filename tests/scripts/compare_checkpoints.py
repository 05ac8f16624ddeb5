"""Exit 0 when two dist checkpoints hold identical tensors (model and optimizer), else list the
differences. usage: compare_checkpoints.py CKPT_A CKPT_B [--only SUBSTRING]"""
import sys
import tempfile

import torch


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def differing_tensors(a, b, only: str = "") -> dict:
    """The tensors (model and optimizer state) of two dist checkpoints, those whose name contains ``only``,
    that are not bit-identical (a torch.distributed group must exist)."""
    from megatron.core import dist_checkpointing

    ta, tb = flat(dist_checkpointing.load_plain_tensors(str(a))), flat(dist_checkpointing.load_plain_tensors(str(b)))
    keys = sorted(k for k in set(ta) | set(tb) if only in k)
    return {"compared": len(keys), "differ": [k for k in keys if k not in ta or k not in tb or not torch.equal(ta[k], tb[k])]}


def main():
    a, b = sys.argv[1], sys.argv[2]
    only = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--only" else ""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    r = differing_tensors(a, b, only)
    bad = r["differ"]
    print(f"{r['compared']} tensors compared, {len(bad)} differ: {bad[:10]}")
    sys.exit(1 if bad or not r["compared"] else 0)


if __name__ == "__main__":
    main()
