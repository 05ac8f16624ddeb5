"""Worker for tests/test_priors.py: one-shot priors on a tiny sparsified model (torchrun, gloo).

usage: priors_worker.py TP OUTDIR   -> OUTDIR/priors_tp{TP}.pt with every layer's GLOBAL prior mask
per method, plus checks that need no second run.
"""
import json
import sys
from pathlib import Path

import torch


def main():
    tp, out = int(sys.argv[1]), Path(sys.argv[2])
    from megatron.core import parallel_state

    from maskllm_megatron.masks import MaskConfig, NMSpec, is_valid_nm, topn_mask
    from maskllm_megatron.megatron import cpu_compat
    from maskllm_megatron.megatron.model_builder import gpt_forward
    from maskllm_megatron.megatron.priors import PriorConfig, compute_priors
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, masked_layers, sparsify

    sys.path.insert(0, str(Path(__file__).parent))
    from sparsify_worker import build, model_config

    cpu_compat.apply()
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 96, (2, 16), generator=g) for _ in range(3)]
    batches = [lambda m, t=t: gpt_forward(m, t) for t in calib]
    result, report = {}, {}
    for family in ("llama", "gpt"):
        for method, update in (("magnitude", False), ("wanda", False), ("sparsegpt", False), ("sparsegpt", True)):
            for spec in ((NMSpec(2, 4),) if (method, update) != ("magnitude", False) else (NMSpec(2, 4), NMSpec(1, 4))):
                model = build(model_config(family))
                sparsify(model, SparsifyConfig(mask=MaskConfig(nm=spec, total_steps=10)))
                dense_w = {l.mask_layer_id: l.weight.detach().clone() for l in masked_layers(model)}
                errors = compute_priors(model, batches, PriorConfig(method=method, update_weights=update))
                name = f"{family}/{method}{'+update' if update else ''}/{spec}"
                masks = {}
                for layer in masked_layers(model):
                    assert is_valid_nm(layer.prior_mask, spec) and layer.prior_mask.sum() * spec.m == layer.prior_mask.numel() * spec.n
                    if method == "magnitude":  # hand rule: keep the N largest |w| of every group
                        assert torch.equal(layer.prior_mask.float(), topn_mask(dense_w[layer.mask_layer_id].abs(), spec))
                    if not update:
                        assert torch.equal(layer.weight, dense_w[layer.mask_layer_id]), "weights changed"
                    else:
                        assert not torch.equal(layer.weight, dense_w[layer.mask_layer_id]), "no OBS update"
                    # the prior moved the logits: the hard mask now mostly equals the prior
                    agree = float((layer.hard_mask().bool() == layer.prior_mask).float().mean())
                    assert agree > 0.9, (name, layer.mask_layer_id, agree)
                    masks[layer.mask_layer_id] = layer.gather_global(layer.prior_mask.to(torch.uint8))
                    if update:
                        masks[layer.mask_layer_id + ".weight"] = layer.gather_global(layer.weight.detach())
                result[name] = masks
                report[name] = errors
    # Sequential pruning changes what deeper blocks see: block 1's SparseGPT masks differ from a
    # one-pass (dense inputs) calibration.
    seq = {}
    for sequential in (True, False):
        model = build(model_config("llama"))
        sparsify(model, SparsifyConfig(mask=MaskConfig(total_steps=10)))
        compute_priors(model, batches, PriorConfig(method="sparsegpt", sequential=sequential))
        seq[sequential] = {l.mask_layer_id: l.prior_mask.clone() for l in masked_layers(model)}
    first = [k for k in seq[True] if k.startswith("layers.0.")]
    later = [k for k in seq[True] if k.startswith("layers.1.")]
    assert all(torch.equal(seq[True][k], seq[False][k]) for k in first)
    assert any(not torch.equal(seq[True][k], seq[False][k]) for k in later)
    if tp == 1:
        dense_hook_reference(batches)
    if torch.distributed.get_rank() == 0:
        torch.save(result, out / f"priors_tp{tp}.pt")
        print("RESULT " + json.dumps(report))


@torch.no_grad()
def dense_hook_reference(batches):
    """Independent of compute_priors' own calibration: every masked linear's inputs captured by a hook on
    the dense model, the Wanda score and the Hessian 2/n X^T X formed from them directly (float64), and
    the masks computed from those must equal compute_priors' one-pass (sequential=False) priors."""
    from maskllm_megatron.masks import MaskConfig
    from maskllm_megatron.megatron.priors import PriorConfig, compute_priors
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, masked_layers, sparsify
    from maskllm_megatron.prune.methods import sparsegpt_prune, wanda_mask
    from sparsify_worker import build, model_config

    for family in ("llama", "gpt"):
        dense = build(model_config(family))
        sparsify(dense, SparsifyConfig(mask=MaskConfig(total_steps=10)))
        inputs = {layer.mask_layer_id: [] for layer in masked_layers(dense)}
        hooks = []
        for layer in masked_layers(dense):
            layer.set_mask_mode("dense")
            hooks.append(layer.register_forward_pre_hook(
                lambda _m, args, key=layer.mask_layer_id: inputs[key].append(args[0].reshape(-1, args[0].shape[-1]))))
        dense.eval()
        for forward in batches:
            forward(dense)
        for h in hooks:
            h.remove()
        for method in ("wanda", "sparsegpt"):
            model = build(model_config(family))
            sparsify(model, SparsifyConfig(mask=MaskConfig(total_steps=10)))
            compute_priors(model, batches, PriorConfig(method=method, sequential=False))
            for layer in masked_layers(model):
                X = torch.cat(inputs[layer.mask_layer_id]).double()
                W = layer.weight.detach()
                if method == "wanda":
                    expect = wanda_mask(W, (X * X).sum(0), layer.nm)
                else:
                    expect, _ = sparsegpt_prune(W, 2 / X.shape[0] * X.t() @ X, layer.nm, dtype=torch.float64)
                assert torch.equal(layer.prior_mask, expect.bool()), (family, method, layer.mask_layer_id)


if __name__ == "__main__":
    main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
