"""Worker for tests/test_sparsify.py (torchrun, gloo).

usage: sparsify_worker.py MODE TP OUTDIR
  check       sparsify tiny GPT-3 / LLaMA / Nemotron models; masked modules, frozen weights, optimizer
              groups, eval parity with W * hard_mask applied by hand; a few training steps through the
              returned controller alone, against the same steps driven by hand
  save        (TP=2) dense checkpoint -> sparsified model (dense start) -> prior + changed logits ->
              sparse checkpoint
  load1       (TP=1) load the TP=2 checkpoint, same loss; save again; wrong N:M / config is refused
  load2       (TP=2) load the TP=1 checkpoint: identical logits and loss
"""
import json
import sys
from pathlib import Path

import torch

FAMILIES = {
    "gpt": dict(family="gpt", position_embedding="learned_absolute", normalization="LayerNorm",
                activation="gelu_tanh", qkv_bias=True, proj_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama": dict(family="llama", num_query_groups=2, tie_word_embeddings=False),
    "nemotron": dict(family="nemotron", num_query_groups=2, normalization="LayerNorm", activation="squared_relu",
                     rotary_percent=0.5),
}


def model_config(family, **over):
    from maskllm_megatron.megatron.model_builder import ModelConfig

    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=96,
                max_position_embeddings=32, make_vocab_size_divisible_by=32)
    base.update(FAMILIES[family])
    base.update(over)
    return ModelConfig(**base)


def build(mc, seed=5, attention="sdpa"):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from maskllm_megatron.megatron.model_builder import build_gpt_model

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return build_gpt_model(mc, attention=attention)


def attention_parity(mc) -> float:
    """Largest difference, forward logits and every parameter's gradient, between the fused SDPA core
    attention and megatron-core's own DotProductAttention on the same weights and tokens."""
    from maskllm_megatron.megatron.attention import SDPAttention
    from maskllm_megatron.megatron.model_builder import gpt_forward

    fused, local = build(mc, attention="sdpa"), build(mc, attention="local")
    assert any(isinstance(m, SDPAttention) for m in fused.modules())
    assert not any(isinstance(m, SDPAttention) for m in local.modules())
    t = tokens()
    worst = 0.0
    outs = []
    for model in (fused, local):
        model.train()
        logits = gpt_forward(model, t[:, :-1])
        (logits.float().square().mean() + gpt_forward(model, t[:, :-1], t[:, 1:]).mean()).backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = outs
    worst = float((la - lb).abs().max())
    for n in ga:
        worst = max(worst, float((ga[n] - gb[n]).abs().max()))
    return worst


def tokens():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 96, (2, 17), generator=g)


def loss_of(model):
    from maskllm_megatron.megatron.model_builder import gpt_forward

    t = tokens()
    with torch.no_grad():
        return float(gpt_forward(model.eval(), t[:, :-1], t[:, 1:]).mean())


def global_logits(model):
    from maskllm_megatron.megatron.sparsify import masked_layers

    return {layer.mask_layer_id: layer.gather_global(layer.mask_logits.detach()) for layer in masked_layers(model)}


def check(out):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from maskllm_megatron.masks import MaskConfig
    from maskllm_megatron.megatron.layers import _MaskedLinearMixin
    from maskllm_megatron.megatron.model_builder import gpt_forward
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, sparsify

    report = {}
    for family in FAMILIES:
        mc = model_config(family)
        report[f"{family}_attention_diff"] = attention_parity(mc)
        model = build(mc)
        dense = build(mc)
        cfg = SparsifyConfig(mask=MaskConfig(total_steps=10))
        masks = sparsify(model, cfg)
        names = masks.names
        kinds = sorted({n.rsplit(".", 1)[1] for n in names})
        assert kinds == ["linear_fc1", "linear_fc2", "linear_proj", "linear_qkv"], kinds
        assert len(names) == 4 * mc.num_layers
        masked_ids = {id(m) for m in model.modules() if isinstance(m, _MaskedLinearMixin)}
        for name, m in model.named_modules():
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and id(m) not in masked_ids:
                assert name == "output_layer", f"{family}: {name} left dense"
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(n.endswith("mask_logits") for n in trainable), trainable
        # Eval parity: masked model == dense model with W * hard_mask applied by hand.
        with torch.no_grad():
            sd = {k: v for k, v in model.state_dict().items() if "mask_logits" not in k and "prior_mask" not in k}
            dense.load_state_dict(sd)
            for (name, m), (_, d) in zip(model.named_modules(), dense.named_modules()):
                if isinstance(m, _MaskedLinearMixin):
                    d.weight.mul_(m.hard_mask())
        t = tokens()[:, :-1]
        with torch.no_grad():
            a = gpt_forward(model.eval(), t)
            b = gpt_forward(dense.eval(), t)
        diff = float((a - b).abs().max())
        assert diff <= 1e-5, f"{family}: eval logits differ from W * hard_mask by {diff}"
        # Frozen weights get no gradient; logits do.
        model.train()
        masks.step(1)
        gpt_forward(model, t, tokens()[:, 1:]).mean().backward()
        for n, p in model.named_parameters():
            if n.endswith("mask_logits"):
                assert p.grad is not None and float(p.grad.abs().sum()) > 0, n
            else:
                assert p.grad is None, f"{family}: frozen {n} got a gradient"
        report[family] = {"masked": len(names), "eval_diff": diff}

    # Optimizer: DDP allocates gradient buffers for logits only; logits get the lr / wd multipliers.
    mc = model_config("llama")
    model = build(mc)
    cfg = SparsifyConfig(mask=MaskConfig(total_steps=10), mask_lr_mult=10.0)
    masks = sparsify(model, cfg)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    buffered = sum(b.numel for b in ddp.buffers) if hasattr(ddp, "buffers") else None
    logit_numel = sum(p.numel() for n, p in model.named_parameters() if n.endswith("mask_logits"))
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, weight_decay=0.1), [ddp],
                                 config_overrides=masks.optimizer_overrides(lr=1e-3))
    groups = opt.param_groups
    in_opt = sum(p.numel() for g in groups for p in g["params"])
    assert in_opt == logit_numel, (in_opt, logit_numel)
    assert all(g["lr_mult"] == 10.0 for g in groups if g["params"]), [g["lr_mult"] for g in groups]
    report["optimizer"] = {"params": in_opt, "grad_buffer": buffered}
    if buffered is not None:
        assert buffered == logit_numel, (buffered, logit_numel)
    report["applied_lr"] = applied_learning_rates(mc)
    report["controller"] = controller_training(mc)

    # include / exclude: MLP only, attention only.
    model = build(mc)
    names = sparsify(model, SparsifyConfig(include=("*.mlp.*",))).names
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == ["linear_fc1", "linear_fc2"]
    model = build(mc)
    names = sparsify(model, SparsifyConfig(exclude=("*.mlp.*",))).names
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == ["linear_proj", "linear_qkv"]
    report["refusals"] = refusals(mc)
    return report


def refusals(mc):
    """Patterns match global layer numbers (as on a later pipeline stage); a refused conversion leaves the
    model exactly as built; a second sparsify and a tied LM head are refused with one clear line."""
    from maskllm_megatron.megatron.layers import _MaskedLinearMixin
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, sparsify

    # A pipeline stage holding global layers 4 and 5 (megatron's layer_number is global and 1-based)
    model = build(mc)
    for local, layer in enumerate(model.decoder.layers):
        layer.layer_number = 5 + local
    names = sparsify(model, SparsifyConfig(include=("decoder.layers.4.mlp.*",))).names
    assert names == ["decoder.layers.4.mlp.linear_fc1", "decoder.layers.4.mlp.linear_fc2"], names
    assert isinstance(model.decoder.layers[0].mlp.linear_fc1, _MaskedLinearMixin)
    assert not isinstance(model.decoder.layers[1].mlp.linear_fc1, _MaskedLinearMixin)
    assert model.decoder.layers[0].mlp.linear_fc1.mask_layer_id == "layers.4.mlp.linear_fc1"  # 0-based key
    messages = {}
    try:
        sparsify(model, SparsifyConfig())
    except ValueError as e:
        messages["twice"] = str(e)

    # The tied LM head is refused after every block's linears were converted: all of it is undone.
    model = build(model_config("gpt"))  # tie_word_embeddings: output_layer uses the embedding's weight
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        sparsify(model, SparsifyConfig(include=("*.linear_qkv", "*.linear_fc2", "output_layer")))
    except ValueError as e:
        messages["tied"] = str(e)
    assert not any(isinstance(m, _MaskedLinearMixin) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v for k, v in before.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    loss_of(model)  # still the dense model it was: runs without any mask attribute
    assert len(sparsify(model, SparsifyConfig()).names) == 4 * model.config.num_layers  # and can be sparsified after all
    assert all("\n" not in m for m in messages.values()), messages
    return messages


def applied_learning_rates(mc):
    """The rates the optimizer really applies, measured by how far parameters move: Adam's first step
    moves every parameter whose gradient is well above eps by exactly its lr, so with weights trained
    too the largest weight change must be lr and the largest logit change lr x mask_lr_mult, at the
    start and at the end of megatron's cosine schedule."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from maskllm_megatron.masks import MaskConfig
    from maskllm_megatron.megatron.model_builder import gpt_forward
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, sparsify

    lr, min_lr, steps = 1e-3, 1e-4, 10
    out = {}
    for at_step in (0, steps):
        model = build(mc)
        cfg = SparsifyConfig(mask=MaskConfig(total_steps=steps), train_weights=True, mask_lr_mult=10.0)
        masks = sparsify(model, cfg)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        opt = get_megatron_optimizer(OptimizerConfig(lr=lr, min_lr=min_lr, weight_decay=0.0, clip_grad=0.0), [ddp],
                                     config_overrides=masks.optimizer_overrides(lr=lr, min_lr=min_lr))
        sched = OptimizerParamScheduler(opt, init_lr=lr, max_lr=lr, min_lr=min_lr, lr_warmup_steps=0,
                                        lr_decay_steps=steps, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                        wd_incr_steps=steps, wd_incr_style="constant")
        sched.step(increment=at_step)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.train()
        masks.step(at_step)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        gpt_forward(ddp, tokens()[:, :-1], tokens()[:, 1:]).mean().backward()
        ddp.finish_grad_sync()
        opt.step()
        moved = {"logits": 0.0, "weights": 0.0, "norms": 0.0}
        for n, p in model.named_parameters():
            if n in before:
                kind = "logits" if n.endswith("mask_logits") else "weights" if p.dim() == 2 else "norms"
                moved[kind] = max(moved[kind], float((p.detach() - before[n]).abs().max()))
        want = lr if at_step == 0 else min_lr
        # joint training trains the norms too; their weights are ~1, where fp32 resolves a change of 1e-4
        # only to ~1e-3 of it
        for kind, expected, tol in (("weights", want, 1e-4), ("logits", 10 * want, 1e-4), ("norms", want, 2e-3)):
            assert 0.95 * expected <= moved[kind] <= (1 + tol) * expected, \
                f"step {at_step}: the largest {kind} change is {moved[kind]:.3e}, the lr is {expected:.1e}"
        out[f"step{at_step}"] = moved
    return out


def controller_training(mc, steps: int = 3, micro_batches: int = 2) -> dict:
    """A library user's loop: build, ``sparsify``, and train through the returned controller alone (its
    optimizer groups, one ``step`` per micro-batch). The reference drives the same steps by hand: every
    masked layer's sampling state set from ``MaskConfig.step_state``, the logits' group spelled out. Their
    losses must be equal, the logits must have moved and the hard masks must be 2:4."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, ParamGroupOverride, ParamKey, get_megatron_optimizer

    from maskllm_megatron.masks import MaskConfig, is_valid_nm
    from maskllm_megatron.megatron.model_builder import gpt_forward
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, sparsify

    lr = 1e-2
    cfg = SparsifyConfig(mask=MaskConfig(nm="2:4", total_steps=steps))
    g = torch.Generator().manual_seed(4)
    data = torch.randint(0, mc.vocab_size, (steps, micro_batches, 2, 17), generator=g)

    def train(by_hand: bool) -> dict:
        model = build(mc)
        masks = sparsify(model, cfg)
        start = {layer.mask_layer_id: layer.mask_logits.detach().clone() for layer in masks.layers}
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        overrides = masks.optimizer_overrides(lr)
        if by_hand:  # the logits' group as megatron's optimizer takes it; megatron's own for the rest
            overrides = {ParamKey(name="*mask_logits"): ParamGroupOverride(
                lr=lr * cfg.mask_lr_mult, max_lr=lr * cfg.mask_lr_mult, min_lr=0.0, lr_mult=cfg.mask_lr_mult,
                wd_mult=cfg.mask_weight_decay_mult)}
        opt = get_megatron_optimizer(OptimizerConfig(lr=lr, weight_decay=0.1), [ddp], config_overrides=overrides)
        model.train()
        losses = []
        for it in range(steps):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            total = 0.0
            for mb in range(micro_batches):
                if by_hand:
                    for layer in masks.layers:
                        layer.set_mask_step(cfg.mask.step_state(it, mb, 1.0 / micro_batches))
                else:
                    masks.step(it, mb, grad_scale=1.0 / micro_batches)
                loss = gpt_forward(ddp, data[it, mb, :, :-1], data[it, mb, :, 1:]).mean() / micro_batches
                loss.backward()
                total += float(loss)
            ddp.finish_grad_sync()
            opt.step()
            losses.append(total)
        return {"losses": losses, "masks": {layer.mask_layer_id: layer.hard_mask() for layer in masks.layers},
                "moved": min(float((layer.mask_logits.detach() - start[layer.mask_layer_id]).abs().max())
                             for layer in masks.layers)}

    mine, reference = train(by_hand=False), train(by_hand=True)
    return {"losses": mine["losses"], "reference_losses": reference["losses"], "logits_moved_min": mine["moved"],
            "masks_2_4": all(is_valid_nm(m, cfg.mask.nm) for m in mine["masks"].values()),
            "masks_equal": all(torch.equal(m, reference["masks"][k]) for k, m in mine["masks"].items())}


def ckpt(mode, out):
    from maskllm_megatron.masks import MaskConfig, NMSpec, topn_mask
    from maskllm_megatron.megatron.checkpointing import CheckpointMismatch, load_checkpoint, save_checkpoint
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, masked_layers, sparsify

    mc = model_config("llama")
    cfg = SparsifyConfig(mask=MaskConfig(total_steps=10))
    report = {}
    if mode == "save":
        dense = build(mc, seed=11)
        save_checkpoint(dense, out / "dense")
        model = build(mc, seed=99)  # different weights: the load must bring the dense ones
        sparsify(model, cfg)
        res = load_checkpoint(model, out / "dense")
        assert res["absent_masks"] and all(k.endswith("mask_logits") for k in res["absent_masks"])
        assert torch.equal(model.decoder.layers[0].mlp.linear_fc2.weight, dense.decoder.layers[0].mlp.linear_fc2.weight)
        for layer in masked_layers(model):
            layer.set_prior(topn_mask(layer.weight.abs(), NMSpec(2, 4)))
            with torch.no_grad():
                layer.mask_logits.add_(0.5 * torch.cos(layer.mask_logits * 100))
        save_checkpoint(model, out / "sparse_tp2")
        import multiprocessing  # the writers reported through an inherited queue: no Manager process lives on
        assert not multiprocessing.active_children(), multiprocessing.active_children()
        report = {"loss": loss_of(model)}
    elif mode == "load1":
        model = build(mc, seed=99)
        sparsify(model, cfg)
        load_checkpoint(model, out / "sparse_tp2")
        assert all(layer.prior_mask is not None for layer in masked_layers(model))
        report = {"loss": loss_of(model)}
        # A plain torch state dict (prior masks included) loads into a freshly sparsified model too.
        plain = build(mc, seed=7)
        sparsify(plain, cfg)
        plain.load_state_dict(model.state_dict())
        assert all(torch.equal(a.prior_mask, b.prior_mask) for a, b in zip(masked_layers(plain), masked_layers(model)))
        assert loss_of(plain) == report["loss"]
        save_checkpoint(model, out / "sparse_tp1")
        # A model with another N:M, or another architecture, is refused with the tensor named.
        for bad_cfg, bad_mc, expect in ((SparsifyConfig(mask=MaskConfig(nm=NMSpec(1, 4))), mc, "N:M"),
                                        (cfg, model_config("llama", ffn_hidden_size=192), "linear_fc1")):
            bad = build(bad_mc)
            sparsify(bad, bad_cfg)
            try:
                load_checkpoint(bad, out / "sparse_tp1")
            except CheckpointMismatch as e:
                assert expect in str(e) and "\n" not in str(e), str(e)
            else:
                raise AssertionError(f"mismatched checkpoint loaded ({expect})")
    elif mode == "load2":
        model = build(mc, seed=99)
        sparsify(model, cfg)
        load_checkpoint(model, out / "sparse_tp1")
        report = {"loss": loss_of(model)}
    logits = global_logits(model)
    if torch.distributed.get_rank() == 0:
        torch.save(logits, out / f"logits_{mode}.pt")
    return report


def main():
    mode, tp, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    from megatron.core import parallel_state

    from maskllm_megatron.megatron import cpu_compat

    cpu_compat.apply()
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    report = check(out) if mode == "check" else ckpt(mode, out)
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
