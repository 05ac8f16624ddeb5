"""Worker for tests/test_train.py's guards (torchrun, gloo).

usage: driver_guards_worker.py finite CONFIG (grad_norm|logits)  one process: train(); at iteration 3 the
           optimizer step reports an infinite gradient norm, or leaves a NaN in a layer's logits
       driver_guards_worker.py agree                              two ranks that found different checkpoints
Prints ``RESULT {...}``.
"""
import json
import sys
from pathlib import Path

import torch


def finite(config: str, fault: str) -> dict:
    from maskllm_megatron.run_folder import checkpoints_folder, newest_complete
    from maskllm_megatron.train import setup, trainer
    from maskllm_megatron.run_config import TrainConfig

    real_build = setup.build_optimizer

    class Faulty:
        def __init__(self, optimizer, model):
            self._optimizer, self._model, self.steps = optimizer, model, 0

        def __getattr__(self, name):
            return getattr(self._optimizer, name)

        def step(self):
            ok, norm, zeros = self._optimizer.step()
            self.steps += 1
            if self.steps == 3:
                if fault == "grad_norm":
                    norm = float("inf")
                else:
                    from maskllm_megatron.megatron.sparsify import masked_layers

                    layer = next(masked_layers(self._model))
                    layer.mask_logits.data[0, 0, 0] = float("nan")
            return ok, norm, zeros

    def build(cfg, model, masks):
        ddp, optimizer, scheduler = real_build(cfg, model, masks)
        return ddp, Faulty(optimizer, model), scheduler

    setup.build_optimizer = build
    cfg = TrainConfig.load(config, ())
    try:
        trainer.train(cfg)
        return {"stopped": None}
    except trainer.TrainingStopped as e:
        stopped = str(e)
    # the newest checkpoint kept, read back tensor by tensor
    from megatron.core import dist_checkpointing

    kept = newest_complete(checkpoints_folder(cfg.run.out_dir))
    tensors = dist_checkpointing.load_plain_tensors(str(kept))
    floats = [t for t in tensors.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return {"stopped": stopped, "kept": kept.name, "tensors": len(floats),
            "finite": all(bool(t.isfinite().all()) for t in floats)}


def agree() -> dict:
    from maskllm_megatron.megatron.parallel import init_process_group
    from maskllm_megatron.run_config import ConfigError
    from maskllm_megatron.train.rank_guards import agree_on_resume

    init_process_group()
    rank = torch.distributed.get_rank()
    agree_on_resume(Path("iter_0000004"))  # the same on both ranks: fine
    try:
        agree_on_resume(Path(f"iter_000000{4 + 2 * rank}"))
        return {"refused": None}
    except ConfigError as e:
        return {"refused": str(e)}


if __name__ == "__main__":
    result = finite(sys.argv[2], sys.argv[3]) if sys.argv[1] == "finite" else agree()
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
