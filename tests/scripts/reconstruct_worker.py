"""Worker for tests/test_reconstruct.py: reconstruction under fixed random N:M masks on a tiny sparsified
model (torchrun, gloo).

usage: reconstruct_worker.py TP OUTDIR -> OUTDIR/reconstruct_tp{TP}.pt (every layer's GLOBAL reconstructed
weight, per method) and a RESULT line with every layer's calibration error before and after.
At TP=1 it also checks the least-squares weights against a plain-torch least-squares solve on the dense
model's hooked layer inputs (one-pass calibration, no dampening).
"""
import json
import sys
from pathlib import Path

import torch


def main():
    tp, out = int(sys.argv[1]), Path(sys.argv[2])
    from maskllm_megatron.megatron.parallel import init_parallel
    from maskllm_megatron.masks import MaskConfig
    from maskllm_megatron.megatron.reconstruct import ReconstructConfig, reconstruct_weights
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, masked_layers, sparsify

    sys.path.insert(0, str(Path(__file__).parent))
    from sparsify_worker import build, model_config

    init_parallel(tp)
    batches = calibration()
    result, report = {}, {}
    variants = {"lstsq": ReconstructConfig(method="lstsq"), "obs": ReconstructConfig(method="obs"),
                "dense": ReconstructConfig(method="lstsq", target="dense", true_sequential=True),
                "block": ReconstructConfig(method="block", target="dense", epochs=2, lr=1e-3)}
    for family in ("llama", "gpt"):
        for method, recon in variants.items():
            model = build(model_config(family, max_position_embeddings=64))
            # no prior: the argmax of the initial N(0, 0.01) logits is a random N:M mask, the same at any TP
            sparsify(model, SparsifyConfig(mask=MaskConfig(total_steps=10)))
            masks = {l.mask_layer_id: l.eval_mask().clone() for l in masked_layers(model)}
            dense = {l.mask_layer_id: l.weight.detach().clone() for l in masked_layers(model)}
            errors = reconstruct_weights(model, batches, recon)
            weights = {}
            for layer in masked_layers(model):
                lid = layer.mask_layer_id
                assert torch.equal(layer.eval_mask(), masks[lid]), "the mask changed"
                w = layer.weight.detach()
                assert torch.equal(w == 0, masks[lid] == 0) or bool((w[masks[lid] == 0] == 0).all()), lid
                assert not bool(torch.signbit(w[masks[lid] == 0]).any()), f"{lid}: -0.0 under the mask"
                assert not torch.equal(w, dense[lid] * masks[lid]), f"{lid}: nothing was refitted"
                weights[lid] = layer.gather_global(w)
            result[f"{family}/{method}"] = weights
            report[f"{family}/{method}"] = errors
    sparsegpt_equivalence(batches)
    if tp == 1:
        lstsq_reference(batches)
    if torch.distributed.get_rank() == 0:
        torch.save(result, out / f"reconstruct_tp{tp}.pt")
        print("RESULT " + json.dumps(report))


def calibration():
    from maskllm_megatron.megatron.model_builder import gpt_forward

    g = torch.Generator().manual_seed(3)
    tokens = [torch.randint(0, 96, (2, 64), generator=g) for _ in range(4)]  # 512 tokens > every input width
    return [lambda m, t=t: gpt_forward(m, t) for t in tokens]


@torch.no_grad()
def sparsegpt_equivalence(batches):
    """#24 at the model level: the OBS reconstruction handed SparseGPT's own N:M masks on the original
    weights gives SparseGPT-with-update's weights (the same block-by-block walk on the same calibration),
    with the masked weights exactly +0.0; the same on each TP rank's shard."""
    from maskllm_megatron.masks import MaskConfig
    from maskllm_megatron.megatron.priors import PriorConfig, compute_priors
    from maskllm_megatron.megatron.reconstruct import ReconstructConfig, reconstruct_weights
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, masked_layers, sparsify
    from sparsify_worker import build, model_config

    for family in ("llama", "gpt"):
        model = build(model_config(family, max_position_embeddings=64))
        model.eval()
        sparsify(model, SparsifyConfig(mask=MaskConfig(total_steps=10)))
        layers = list(masked_layers(model))
        original = {l: l.weight.detach().clone() for l in layers}
        compute_priors(model, batches, PriorConfig(method="sparsegpt", update_weights=True))
        updated = {l: l.weight.detach().clone() for l in layers}
        for l in layers:
            l.set_mask_mode("prior")
            l.weight.copy_(original[l])  # SparseGPT's mask on the ORIGINAL weights
        reconstruct_weights(model, batches, ReconstructConfig(method="obs"))
        for l in layers:
            w, keep = l.weight.detach(), l.prior_mask.bool()
            assert not torch.equal(updated[l], original[l] * keep), (family, l.mask_layer_id, "no update")
            rel = float((w - updated[l]).norm() / updated[l].norm())
            assert rel < 1e-5, (family, l.mask_layer_id, rel)
            assert bool((w[~keep] == 0).all()) and not bool(torch.signbit(w[~keep]).any()), (family, l.mask_layer_id)


@torch.no_grad()
def lstsq_reference(batches):
    """One-pass reconstruction (every block calibrated on the dense model's inputs), no dampening: each
    row's kept weights must equal ``torch.linalg.lstsq`` on that layer's hooked dense inputs (float64)."""
    from maskllm_megatron.masks import MaskConfig
    from maskllm_megatron.megatron.reconstruct import ReconstructConfig, reconstruct_weights
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, masked_layers, sparsify
    from sparsify_worker import build, model_config

    for family in ("llama", "gpt"):
        model = build(model_config(family, max_position_embeddings=64))
        sparsify(model, SparsifyConfig(mask=MaskConfig(total_steps=10)))
        inputs = {layer.mask_layer_id: [] for layer in masked_layers(model)}
        hooks = []
        for layer in masked_layers(model):
            layer.set_mask_mode("dense")
            hooks.append(layer.register_forward_pre_hook(
                lambda _m, args, key=layer.mask_layer_id: inputs[key].append(args[0].reshape(-1, args[0].shape[-1]))))
        model.eval()
        for forward in batches:
            forward(model)
        for h in hooks:
            h.remove()
        for layer in masked_layers(model):
            layer.set_mask_mode("learn")
        dense = {l.mask_layer_id: l.weight.detach().double() for l in masked_layers(model)}
        reconstruct_weights(model, batches, ReconstructConfig(method="lstsq", percdamp=0.0, sequential=False))
        for layer in masked_layers(model):
            X = torch.cat(inputs[layer.mask_layer_id]).double()
            W, mask = dense[layer.mask_layer_id], layer.eval_mask().bool()
            expect = torch.zeros_like(W)
            for r in range(W.shape[0]):
                keep = mask[r]
                expect[r, keep] = torch.linalg.lstsq(X[:, keep], X @ W[r]).solution
            got = layer.weight.detach().double()
            # float32 Cholesky on H = 2/n X^T X against float64 least squares on X itself
            err_got, err_ref = (float(((X @ (W - w).t()) ** 2).sum()) for w in (got, expect))
            assert abs(err_got - err_ref) <= 1e-4 * err_ref, (family, layer.mask_layer_id, err_got, err_ref)
            # and the refitted layer's outputs are the reference's (its weights may differ where X is nearly
            # rank-deficient: the outputs, which is what the solve fixes, do not)
            out_diff = float((X @ (got - expect).t()).norm() / (X @ expect.t()).norm())
            assert out_diff <= 1e-3, (family, layer.mask_layer_id, out_diff)


if __name__ == "__main__":
    main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
