"""Probe each cpu_compat patch: the call fails before apply() and works after. Prints JSON."""
import json
import sys
import tempfile

import torch


def attempt(fn):
    try:
        fn()
        return "ok"
    except Exception as e:  # noqa: BLE001 - we report what megatron raises without the patch
        return f"{type(e).__name__}: {e}"[:200]


def probes():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import utils as tutils

    import megatron.core.optimizer.clip_grads as cg

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)

    def rng():
        tp_random.get_cuda_rng_tracker().reset()
        tp_random.get_cuda_rng_tracker().add("model-parallel-rng", 5)
        with tp_random.get_cuda_rng_tracker().fork():
            torch.randn(2)

    def torch_adam_step():
        from types import SimpleNamespace

        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        main = torch.nn.Parameter(torch.zeros(2))
        adam = torch.optim.Adam([main])
        main.grad = torch.ones(2)
        adam.step()  # torch's Adam state: step, exp_avg, exp_avg_sq
        fake = SimpleNamespace(model_param_group_index_map={"w": (0, 0)}, optimizer=adam,
                               config=SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False))
        src = {"param": torch.full((2,), 3.0), "exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2)}
        with torch.no_grad():
            DistributedOptimizer._set_main_param_and_optimizer_states(fake, "w", src)
        assert torch.equal(main.detach(), src["param"])

    def tied_embedding_copy():
        """The first-and-last stage of a tied model at PP=2 (a one-rank gloo world stands in for the
        embedding group): megatron copies the shared weight to CUDA, then all-reduces it."""
        from types import SimpleNamespace

        import torch.distributed as dist
        from megatron.core.models.common.language_module.language_module import LanguageModule

        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/store", rank=0, world_size=1)
        weight = torch.nn.Parameter(torch.arange(4.0))
        fake = SimpleNamespace(pre_process=True, post_process=True, share_embeddings_and_output_weights=True,
                               config=SimpleNamespace(pipeline_model_parallel_size=2, mtp_num_layers=0),
                               embedding=SimpleNamespace(word_embeddings=SimpleNamespace(weight=weight)),
                               output_layer=SimpleNamespace(weight=None), vp_stage=None, vp_size=None,
                               pp_group=dist.group.WORLD, embd_group=dist.group.WORLD)
        fake.shared_embedding_or_output_weight = lambda: weight
        fake._is_in_embd_group = lambda: LanguageModule._is_in_embd_group(fake)
        LanguageModule.setup_embeddings_and_output_layer(fake)
        assert torch.equal(weight.detach(), torch.arange(4.0))

    return {
        "torch_adam_step": torch_adam_step,
        "tied_embedding_copy": tied_embedding_copy,
        "rng": rng,
        "current_device": lambda: torch.zeros(1, device=torch.cuda.current_device()),
        "synchronize": lambda: torch.cuda.synchronize(),
        "cuda_factories": lambda: tutils.get_default_causal_mask(4),
        "cuda_type_names": lambda: cg.clip_grad_by_total_norm_fp32([p], 1.0, 3.0),
    }


def main():
    if sys.argv[1:] == ["fake-cuda"]:
        torch.cuda.is_available = lambda: True
        from maskllm_megatron.megatron import cpu_compat
        print(json.dumps({"applied": cpu_compat.apply()}))
        return
    from maskllm_megatron.megatron import cpu_compat
    before = {k: attempt(f) for k, f in probes().items()}
    applied = cpu_compat.apply()
    after = {k: attempt(f) for k, f in probes().items()}
    print(json.dumps({"applied": applied, "before": before, "after": after,
                      "patches": [p.name for p in cpu_compat.PATCHES]}))


if __name__ == "__main__":
    main()
