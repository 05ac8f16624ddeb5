"""Share of N:M groups on which two mask files disagree, per projection type (not in CI).

Typical use: how far a learned mask moved from the one-shot prior it started from.

    maskllm-export --ckpt RUN/checkpoints/iter_N --out learned.safetensors --format masks
    maskllm-export --ckpt RUN/checkpoints/iter_N --out prior.safetensors --format masks --use-prior
    python benchmarks/mask_diff.py learned.safetensors prior.safetensors
"""
from __future__ import annotations

import argparse
import collections
import sys

from maskllm_megatron.export.formats import load_masks, module_name


def group_disagreement(a_path: str, b_path: str) -> dict[str, float]:
    """{projection type (e.g. q_proj): share of groups whose pattern differs, ..., "all": overall share}."""
    a, spec = load_masks(a_path)
    b, spec_b = load_masks(b_path)
    if spec != spec_b or a.keys() != b.keys():
        raise SystemExit(f"mask_diff: {a_path} and {b_path} mask different tensors or N:M patterns: "
                         "export both from the same model")
    groups, differ = collections.Counter(), collections.Counter()
    for name, mask in a.items():
        other = b[name]
        if mask.shape != other.shape:
            raise SystemExit(f"mask_diff: {name} is {tuple(mask.shape)} in one file and {tuple(other.shape)} "
                             "in the other: export both from the same model")
        kind = module_name(name).rsplit(".", 1)[-1]  # q_proj, ..., down_proj
        changed = (mask.reshape(mask.shape[0], -1, spec.m) != other.reshape(other.shape[0], -1, spec.m)).any(-1)
        groups[kind] += changed.numel()
        differ[kind] += int(changed.sum())
    shares = {kind: differ[kind] / groups[kind] for kind in groups}
    shares["all"] = sum(differ.values()) / sum(groups.values())
    return shares


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="mask file (maskllm-export --format masks)")
    p.add_argument("b", help="mask file of the same model")
    args = p.parse_args(argv)
    for kind, share in group_disagreement(args.a, args.b).items():
        print(f"{kind}: {100 * share:.2f}% of groups differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
