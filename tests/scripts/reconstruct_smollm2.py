"""Worker (plain process, TP=1): on real SmolLM2-135M weights, reconstructing SparseGPT's own 2:4 mask with
the OBS sweep (``megatron.reconstruct``) gives SparseGPT-with-update's weights and perplexity.

Both runs see the same calibration windows and the same block-by-block walk; the only difference is that
the reconstruction is handed the mask instead of choosing it. Perplexity is measured on held-out windows
(the next part of the same Wikipedia text). Prints one JSON line ``RESULT {...}``.

    python tests/scripts/reconstruct_smollm2.py CKPT_DIR HF_DIR CALIB_WINDOWS EVAL_WINDOWS SEQ_LEN
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from convert_smollm2 import wiki_windows  # noqa: E402


def main():
    from maskllm_megatron.convert.checkpoint import load_mcore_model
    from maskllm_megatron.megatron.parallel import init_parallel
    from maskllm_megatron.megatron.model_builder import gpt_forward
    from maskllm_megatron.megatron.priors import PriorConfig, compute_priors
    from maskllm_megatron.megatron.reconstruct import ReconstructConfig, reconstruct_weights
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, masked_layers, sparsify

    ckpt, hf_dir = Path(sys.argv[1]), Path(sys.argv[2])
    n_calib, n_eval, seq_len = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    tokens = wiki_windows(hf_dir, n_calib + n_eval, seq_len)
    calib, held_out = tokens[:n_calib], tokens[n_calib:]
    batches = [lambda m, t=t: gpt_forward(m, t[None]) for t in calib]
    init_parallel(1, 1)
    model, _ = load_mcore_model(ckpt)
    model.eval()
    sparsify(model, SparsifyConfig())
    layers = list(masked_layers(model))
    original = {l: l.weight.detach().clone() for l in layers}

    def ppl() -> float:
        with torch.no_grad():
            return gpt_forward(model, held_out[:, :-1], labels=held_out[:, 1:]).float().mean().exp().item()

    with torch.no_grad():
        compute_priors(model, batches, PriorConfig(method="sparsegpt", update_weights=True))
        for l in layers:
            l.set_mask_mode("prior")
        updated = {l: l.weight.detach().clone() for l in layers}
        ppl_sparsegpt = ppl()
        for l in layers:  # SparseGPT's mask on the ORIGINAL weights: what the reconstruction starts from
            l.weight.copy_(original[l])
        ppl_mask_only = ppl()
        reconstruct_weights(model, batches, ReconstructConfig(method="obs"))
        for l in layers:
            l.set_mask_mode("prior")
        ppl_reconstructed = ppl()
        rel = max(((l.weight - updated[l]).norm() / updated[l].norm()).item() for l in layers)
        zeros_kept = all(bool((l.weight[l.prior_mask == 0] == 0).all()) for l in layers)
    print("RESULT " + json.dumps({"ppl_sparsegpt_update": ppl_sparsegpt, "ppl_mask_only": ppl_mask_only,
                                  "ppl_reconstructed": ppl_reconstructed, "max_rel_weight_diff": rel,
                                  "zeros_kept": zeros_kept, "layers": len(layers)}), flush=True)


if __name__ == "__main__":
    main()
