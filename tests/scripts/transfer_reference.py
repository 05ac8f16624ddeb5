"""Check a transfer run (prior.method=checkpoint, saved at iteration 0) against its source run, in plain
torch: every masked layer's prior mask must be the source's hard mask (argmax pattern of each group), and
its logits must be this run's fresh initial logits shifted by the MaskLLM prior,
``(overlap_k - 1) * std(fresh) * strength``, not the source's learned logits.

usage: transfer_reference.py SOURCE_CKPT TRANSFER_CKPT SEED INIT_STD STRENGTH   (exit 0 when all match)
"""
import sys
import tempfile

import torch

from compare_checkpoints import flat  # this folder is sys.path[0] when run as a script


def main():
    source, transfer = sys.argv[1], sys.argv[2]
    seed, init_std, strength = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    from megatron.core import dist_checkpointing

    from maskllm_megatron.masks import NMSpec
    from maskllm_megatron.masks.sampling import init_key, init_logits

    torch.distributed.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    src, new = flat(dist_checkpointing.load_plain_tensors(source)), flat(dist_checkpointing.load_plain_tensors(transfer))
    keys = sorted(k for k in new if k.endswith(".mask_logits"))
    # 2:4 patterns in the library's logit order (lexicographic kept positions), written out by hand.
    patterns = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                            dtype=torch.float64)
    bad = []
    checked = 0
    for key in keys:  # "decoder.layers.<path>.mask_logits": layers stacked on the first axis
        path = key.removeprefix("decoder.layers.").removesuffix(".mask_logits")
        for layer, learned in enumerate(src[key].double()):
            rows, groups, _ = learned.shape
            expected_prior = patterns[learned.argmax(-1)].reshape(rows, groups * 4)
            prior = new[key.replace(".mask_logits", ".prior_mask")][layer].double()
            fresh = init_logits(init_key(seed, f"layers.{layer}.{path}"), torch.arange(rows), torch.arange(groups),
                                NMSpec(2, 4), init_std).double()
            overlap = expected_prior.reshape(rows, groups, 4) @ patterns.t()
            expected = fresh + (overlap - 1) * fresh.std() * strength
            err = (new[key][layer].double() - expected).abs().max().item()
            checked += 1
            if not torch.equal(prior, expected_prior) or err > 1e-5:
                bad.append(f"layers.{layer}.{path}: prior equal {torch.equal(prior, expected_prior)}, "
                           f"logits max err {err:.3g}")
    print(f"{checked} masked layers checked; {len(bad)} differ: {bad[:5]}")
    sys.exit(1 if bad or not keys else 0)


if __name__ == "__main__":
    main()
