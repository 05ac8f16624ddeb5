"""Worker: a tiny GPTModel trains under torchrun on CPU with megatron's DDP, optimizer, schedules and
dist_checkpointing, after cpu_compat.apply(). Prints one JSON line per rank."""
import json
import os
import sys
import tempfile

import torch


def main():
    tp, use_distopt = int(sys.argv[1]), sys.argv[2] == "1"
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from maskllm_megatron.megatron import cpu_compat

    cpu_compat.apply()
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(123)
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                            use_cpu_initialization=True, normalization="RMSNorm", gated_linear_unit=True,
                            add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=128,
                     max_sequence_length=32, position_embedding_type="rope")
    ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=use_distopt)
    model = DistributedDataParallel(cfg, ddp_cfg, model)
    cfg.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, use_distributed_optimizer=use_distopt,
                                                 clip_grad=1.0), [model])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 17), generator=gen)
    mask = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)[None, None]

    def forward_step(data_iterator, m):
        out = m(tokens[:, :-1], None, mask, labels=tokens[:, 1:])
        return out, lambda o: (o.float().mean(), {"lm": o.float().mean().detach()})

    losses = []
    for _ in range(3):
        model.zero_grad_buffer()
        opt.zero_grad()
        res = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=None, model=[model],
                                          num_microbatches=1, seq_length=16, micro_batch_size=2,
                                          forward_only=False)
        opt.step()
        losses.append(float(res[0]["lm"]))
    d = tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None
    obj = [d]
    torch.distributed.broadcast_object_list(obj)
    sd = model.module.sharded_state_dict(prefix="")
    dist_checkpointing.save(sd, obj[0])
    loaded = dist_checkpointing.load(model.module.sharded_state_dict(prefix=""), obj[0])
    same = all(torch.equal(loaded[k], v) for k, v in model.module.state_dict().items()
               if k in loaded and isinstance(loaded[k], torch.Tensor))
    results = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(results, {"rank": torch.distributed.get_rank(), "losses": losses,
                                                  "ckpt_same": same})
    if torch.distributed.get_rank() == 0:  # one writer: ranks printing at once interleave their lines
        for r in results:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
