"""Worker for tests/test_masked_layers.py, run under torchrun at TP=1 or TP=2.

usage: masked_layers_worker.py TP OUTDIR CKPT_DIR {save,load}

Builds a Column -> Row pair and a gated (SwiGLU-style) Column layer from fixed GLOBAL weights, runs a
training-mode forward/backward with sampled soft masks and an eval forward with hard masks, and checks
everything against plain torch on the gathered tensors. Rank 0 writes the gathered results to OUTDIR so
the test can compare TP=1 with TP=2. ``save`` writes a dist checkpoint of the layers' logits (after a
perturbation) and reloads it; ``load`` loads a checkpoint written by another TP size.
"""
import json
import os
import sys

import torch


def gather(t, dim, group):
    if torch.distributed.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def main():
    tp, outdir, ckpt_dir, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.transformer import TransformerConfig

    from maskllm_megatron.masks import MaskConfig, gumbel_noise, hard_mask, noise_key, soft_mask
    from maskllm_megatron.megatron import cpu_compat
    from maskllm_megatron.megatron.layers import MaskedColumnParallelLinear, MaskedRowParallelLinear

    cpu_compat.apply()
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                            perform_initialization=False)
    mcfg = MaskConfig(total_steps=10, seed=7)
    h_in, h_mid, h_out = 16, 24, 16
    g = torch.Generator().manual_seed(0)
    Wc = torch.randn(h_mid, h_in, generator=g)
    bc = torch.randn(h_mid, generator=g)
    Wr = torch.randn(h_out, h_mid, generator=g)
    br = torch.randn(h_out, generator=g)
    Wg = torch.randn(32, h_in, generator=g)  # gated fc1: [gate (16); up (16)]
    x = torch.randn(5, 3, h_in, generator=g)  # [seq, batch, hidden]

    col = MaskedColumnParallelLinear(h_in, h_mid, config=cfg, init_method=torch.nn.init.zeros_, bias=True,
                                     gather_output=False, mask_config=mcfg, mask_layer_id="col")
    row = MaskedRowParallelLinear(h_mid, h_out, config=cfg, init_method=torch.nn.init.zeros_, bias=True,
                                  input_is_parallel=True, skip_bias_add=False, mask_config=mcfg, mask_layer_id="row")
    gated = MaskedColumnParallelLinear(h_in, 32, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                                       gather_output=False, mask_config=mcfg, mask_layer_id="fc1", gated_halves=True)
    assert col.fused_mask_kernel is None and row.fused_mask_kernel is None  # built with defaults: the fastest kernel
    with torch.no_grad():
        col.weight.copy_(Wc[col.global_row_ids()])
        col.bias.copy_(bc[col.global_row_ids()])
        cols = slice(rank * (h_mid // tp), (rank + 1) * (h_mid // tp))
        row.weight.copy_(Wr[:, cols])
        row.bias.copy_(br)
        gated.weight.copy_(Wg[gated.global_row_ids()])
    assert not col.weight.requires_grad and col.mask_logits.requires_grad

    # Logits, gathered to the global layout (gated: back to [gate_all; up_all] by global row ids).
    def global_logits(layer, dim):
        full = gather(layer.mask_logits.detach(), dim, group).clone()
        if layer.gated_halves:
            ids = gather(layer.global_row_ids(), 0, group)
            out = torch.empty_like(full)
            out[ids] = full
            return out
        return full

    step = mcfg.step_state(iteration=3, microbatch=1)
    for layer in (col, row, gated):
        layer.set_mask_step(step)
    xr = x.clone().requires_grad_(True)
    y, _ = col(xr)
    z, _ = row(y)
    yg, _ = gated(x)
    loss = (z * torch.linspace(-1, 1, z.numel()).view_as(z)).sum() + (yg ** 2).sum() * 0.01
    loss.backward()

    Lc, Lr, Lg = global_logits(col, 0), global_logits(row, 1), global_logits(gated, 0)
    # Plain-torch reference on the gathered tensors, with the same global noise.
    def ref_mask(L, layer_id, rows, groups):
        key = noise_key(mcfg.seed, layer_id, 3, 1)
        noise = gumbel_noise(key, torch.arange(rows), torch.arange(groups), mcfg.nm)
        return soft_mask(L, noise, mcfg.nm, step.temperature, step.scale)

    Lc_ref = Lc.clone().requires_grad_(True)
    Lr_ref = Lr.clone().requires_grad_(True)
    Lg_ref = Lg.clone().requires_grad_(True)
    Mc, Mr, Mg = ref_mask(Lc_ref, "col", h_mid, 4), ref_mask(Lr_ref, "row", h_out, 6), ref_mask(Lg_ref, "fc1", 32, 4)
    xr_ref = x.clone().requires_grad_(True)
    y_ref = xr_ref @ (Wc * Mc).t() + bc
    z_ref = y_ref @ (Wr * Mr).t() + br
    yg_ref = x @ (Wg * Mg).t()
    loss_ref = (z_ref * torch.linspace(-1, 1, z_ref.numel()).view_as(z_ref)).sum() + (yg_ref ** 2).sum() * 0.01
    # The sparse-weight regulariser: -lambda * sum((W * mask)^2), gradient to the logits only.
    assert step.regularizer > 0
    loss_ref = loss_ref - step.regularizer * sum(((W * M) ** 2).sum() for W, M in ((Wc, Mc), (Wr, Mr), (Wg, Mg)))
    loss_ref.backward()

    def close(a, b, what):
        err = float((a - b).abs().max())
        assert err <= 1e-5 * max(1.0, float(b.abs().max())), f"{what}: max abs diff {err} (max {float(b.abs().max())})"

    close(z, z_ref, "training output")
    close(xr.grad, xr_ref.grad, "input gradient")
    close(Lc, Lc, "")
    close(gather(col.mask_logits.grad, 0, group), Lc_ref.grad, "column logits gradient")
    close(gather(row.mask_logits.grad, 1, group), Lr_ref.grad, "row logits gradient")
    gated_grad = gather(gated.mask_logits.grad, 0, group)
    ids = gather(gated.global_row_ids(), 0, group)
    gg = torch.empty_like(gated_grad)
    gg[ids] = gated_grad
    close(gg, Lg_ref.grad, "gated logits gradient")

    # Eval: hard masks.
    for layer in (col, row, gated):
        layer.eval()
    with torch.no_grad():
        z_eval, _ = row(col(x)[0])
        Hc, Hr = hard_mask(Lc, mcfg.nm), hard_mask(Lr, mcfg.nm)
        z_eval_ref = (x @ (Wc * Hc).t() + bc) @ (Wr * Hr).t() + br
    close(z_eval, z_eval_ref, "eval output")
    assert torch.equal(gather(col.hard_mask(), 0, group), Hc)

    # megatron's optimizer writes the updated logits through its parameter buffer, which the logits'
    # version counter does not see (a write through .data does the same): the next training forward must
    # drop the cached eval weight, or validation would score stale masks.
    for layer in (col, row):
        layer.train()
        with torch.no_grad():
            layer.mask_logits.data.copy_(-layer.mask_logits.data)
    row(col(x)[0])  # a training forward
    for layer in (col, row):
        layer.eval()
    with torch.no_grad():
        z_eval2, _ = row(col(x)[0])
        z_eval2_ref = (x @ (Wc * hard_mask(-Lc, mcfg.nm)).t() + bc) @ (Wr * hard_mask(-Lr, mcfg.nm)).t() + br
        close(z_eval2, z_eval2_ref, "eval output after the logits changed behind the version counter")
        for layer in (col, row):
            layer.mask_logits.neg_()  # back to the logits above (an in-place write the cache does see)

    result = {"z": z.detach(), "Mc": Mc.detach(), "Mr": Mr.detach(), "Mg": Mg.detach(), "Lc": Lc, "Lr": Lr, "Lg": Lg,
              "gLc": Lc_ref.grad, "gLr": Lr_ref.grad, "gLg": Lg_ref.grad,
              "gc_local": gather(col.mask_logits.grad, 0, group), "gr_local": gather(row.mask_logits.grad, 1, group)}

    # Checkpoint: perturb the logits so the file holds non-initial values, then save / load.
    meta = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}

    def sharded():
        sd = {}
        for name, layer in (("col.", col), ("row.", row), ("fc1.", gated)):
            sd.update(layer.sharded_state_dict(prefix=name, metadata=meta))
        return sd

    with torch.no_grad():
        if mode == "save":
            for layer in (col, row, gated):
                layer.mask_logits.add_(torch.sin(torch.arange(layer.mask_logits.numel()).view_as(
                    layer.mask_logits).float() + rank))
            if torch.distributed.get_rank() == 0:
                os.makedirs(ckpt_dir, exist_ok=True)
            torch.distributed.barrier()
            dist_checkpointing.save(sharded(), ckpt_dir)
            saved = {"Lc": global_logits(col, 0), "Lr": global_logits(row, 1), "Lg": global_logits(gated, 0)}
            for layer in (col, row, gated):
                layer.mask_logits.zero_()
        loaded = dist_checkpointing.load(sharded(), ckpt_dir)
        col.load_state_dict({k[4:]: v for k, v in loaded.items() if k.startswith("col.")}, strict=False)
        row.load_state_dict({k[4:]: v for k, v in loaded.items() if k.startswith("row.")}, strict=False)
        gated.load_state_dict({k[4:]: v for k, v in loaded.items() if k.startswith("fc1.")}, strict=False)
        after = {"Lc": global_logits(col, 0), "Lr": global_logits(row, 1), "Lg": global_logits(gated, 0)}
        if mode == "save":
            for k in saved:
                assert torch.equal(saved[k], after[k]), f"{k} changed in a TP={tp} save/load"
        result.update({f"ckpt_{k}": v for k, v in after.items()})

    if mode == "load":
        # A bf16 model: bf16 logits (megatron's optimizer keeps the fp32 master copy); the fp32 checkpoint
        # loads into them (rounded to bf16), and a training step gives bf16 logit gradients.
        bcfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                                 perform_initialization=False, bf16=True, params_dtype=torch.bfloat16)
        bcol = MaskedColumnParallelLinear(h_in, h_mid, config=bcfg, init_method=torch.nn.init.zeros_, bias=True,
                                          gather_output=False, mask_config=mcfg, mask_layer_id="col")
        assert bcol.mask_logits.dtype == torch.bfloat16 == bcol.weight.dtype
        loaded = dist_checkpointing.load(bcol.sharded_state_dict(prefix="col.", metadata=meta), ckpt_dir)
        bcol.load_state_dict({k[4:]: v for k, v in loaded.items() if k.startswith("col.")}, strict=False)
        with torch.no_grad():
            bcol.weight.copy_(Wc[bcol.global_row_ids()])
            bcol.bias.copy_(bc[bcol.global_row_ids()])
        bcol.set_mask_step(step)
        yb, _ = bcol(x.to(torch.bfloat16))
        yb.float().sum().backward()
        result.update(bf16_logits=global_logits(bcol, 0), bf16_logits_grad_dtype=str(bcol.mask_logits.grad.dtype),
                      bf16_logits_grad_finite=bool(torch.isfinite(bcol.mask_logits.grad).all()))

    if torch.distributed.get_rank() == 0:
        torch.save(result, f"{outdir}/tp{tp}_{mode}.pt")
    print(json.dumps({"rank": torch.distributed.get_rank(), "ok": True}))


if __name__ == "__main__":
    main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
