"""Worker for tests/test_distill.py (torchrun, gloo): the vocab-parallel KL on logits sharded over the TP
ranks against plain torch on the gathered logits, and the driver's validation loss through the teacher
path against the plain LM path.

usage: distill_worker.py -> RESULT {"kl_diff", "grad_diff", "ce_equal", ...}
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def main():
    from megatron.core import parallel_state

    from maskllm_megatron.megatron import cpu_compat
    from maskllm_megatron.megatron.distill import vocab_parallel_kl

    cpu_compat.apply()
    torch.distributed.init_process_group("gloo")
    tp = torch.distributed.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    rank, group = torch.distributed.get_rank(), parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator().manual_seed(0)
    vocab, temperature = 96, 2.0
    student_full = (3 * torch.randn(2, 5, vocab, generator=g, dtype=torch.float64)).float()
    teacher_full = (3 * torch.randn(2, 5, vocab, generator=g, dtype=torch.float64)).float()
    upstream = torch.rand(2, 5, generator=g)
    shard = slice(rank * vocab // tp, (rank + 1) * vocab // tp)
    student = student_full[..., shard].clone().requires_grad_(True)
    kl = vocab_parallel_kl(student, teacher_full[..., shard], temperature, group)
    (kl * upstream).sum().backward()
    # the reference: plain torch on the gathered logits, its gradient by autograd (float64)
    ref_student = student_full.double().requires_grad_(True)
    log_s = F.log_softmax(ref_student / temperature, -1)
    log_t = F.log_softmax(teacher_full.double() / temperature, -1)
    ref = temperature ** 2 * (log_t.exp() * (log_t - log_s)).sum(-1)
    (ref * upstream.double()).sum().backward()
    result = {"tp": tp, "kl_diff": float((kl.double() - ref).abs().max()), "kl_scale": float(ref.abs().max()),
              "grad_diff": float((student.grad.double() - ref_student.grad[..., shard]).abs().max()),
              "grad_scale": float(ref_student.grad.abs().max())}
    result.update(validation_paths(tp))
    result.update(teacher_copy())
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


@torch.no_grad()
def validation_paths(tp):
    """The driver's hard-mask validation LM loss through the teacher path equals, bit for bit, the plain
    path's (the model's own labels= cross entropy); the KL of a model to itself is 0."""
    from types import SimpleNamespace

    from maskllm_megatron.masks import MaskConfig
    from maskllm_megatron.megatron.sparsify import dense_forward
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, sparsify
    from maskllm_megatron.train.step import Teacher, mean_loss, run_batches

    sys.path.insert(0, str(Path(__file__).parent))
    from sparsify_worker import build, model_config

    model = build(model_config("llama"))
    sparsify(model, SparsifyConfig(mask=MaskConfig(total_steps=10)))
    model.eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (2, 17), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16),
             "position_ids": torch.arange(16).expand(2, 16), "attention_mask": None}
    cfg = SimpleNamespace(data=SimpleNamespace(seq_length=16, micro_batch_size=2))
    plain = mean_loss(run_batches(cfg, model, [batch, batch], 2, forward_only=True))
    paired = run_batches(cfg, model, [batch, batch], 2, forward_only=True, teacher=Teacher())
    with dense_forward(model):
        dense = run_batches(cfg, model, [batch], 1, forward_only=True, teacher=Teacher())
    return {"ce_equal": plain == mean_loss(paired), "kl_masked": mean_loss(paired, key="kd loss"),
            "kl_self": mean_loss(dense, key="kd loss")}


@torch.no_grad()
def teacher_copy():
    """Distillation while weights train: ``keep_teacher_copy`` copies every trained parameter (masked weights,
    their biases, norms; not the logits, the embeddings or the head), and ``dense()`` then forwards the
    model as it was when copied, although every trained parameter has moved since, and gives the moved
    parameters back after the block."""
    from maskllm_megatron.masks import MaskConfig
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, sparsify

    sys.path.insert(0, str(Path(__file__).parent))
    from sparsify_worker import build, model_config

    model = build(model_config("llama"))
    masks = sparsify(model, SparsifyConfig(mask=MaskConfig(total_steps=10), train_weights=True))
    model.eval()
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    position_ids = torch.arange(16).expand(2, 16)
    with masks.dense():
        original = model(tokens, position_ids, None)
    trained = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("mask_logits")]
    copied = masks.keep_teacher_copy()
    g = torch.Generator().manual_seed(3)
    for p in trained:
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    moved = [p.detach().clone() for p in trained]
    with masks.dense():
        teacher = model(tokens, position_ids, None)
    copies = [p.teacher_copy for p in trained]
    for p in trained:
        p.teacher_copy = None
    with masks.dense():  # what the teacher would be without the copy: the moved weights, unmasked
        moved_dense = model(tokens, position_ids, None)
    for p, c in zip(trained, copies):
        p.teacher_copy = c
    return {"teacher_copied": copied, "trained_numel": sum(p.numel() for p in trained),
            "trained_kinds": sorted({n.rsplit(".", 2)[-2] for n, p in model.named_parameters()
                                     if getattr(p, "teacher_copy", None) is not None}),
            "teacher_is_original": torch.equal(teacher, original),
            "moved_would_differ": not torch.allclose(moved_dense, original),
            "moved_given_back": all(torch.equal(p, m) for p, m in zip(trained, moved))}


if __name__ == "__main__":
    main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
