"""Distillation from the dense model: with frozen weights the teacher is the model itself, masking off.

``vocab_parallel_kl`` is ``T^2 * KL(softmax(t/T) || softmax(s/T))`` per token on logits sharded over the
vocabulary (tensor parallel), with the TP max / sum reductions megatron's vocab-parallel cross entropy
uses: the full vocabulary is never gathered. Its backward is the closed form ``T * (p_s - p_t)``, saved
in forward (one fp32 tensor the size of the student's logits shard, as megatron's cross entropy saves its
softmax); the teacher gets no gradient.

``paired_forward`` runs the teacher (no autograd, every masked layer dense) and the student on the same
micro-batch, at any pipeline layout: on a pipeline stage after the first, the tensor received from the
previous stage holds the student's and the teacher's hidden states side by side on the batch axis; each
half runs through this stage as itself, and the stage sends both halves on. So the teacher's logits exist
only on the last stage, one micro-batch at a time, and the pipeline carries twice the hidden states
(``pipeline_micro_batch_size``). The teacher half carries no gradient: its backward is zeros.
"""
from __future__ import annotations

from typing import Callable

import torch

from .sparsify import dense_forward


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature: float, group):
        tp = torch.distributed.get_world_size(group) if group is not None and torch.distributed.is_initialized() else 1

        def reduce(x, op):
            if tp > 1:
                torch.distributed.all_reduce(x, op=op, group=group)
            return x

        s = student.float() / temperature  # fresh fp32 tensors: the caller's logits stay as they are
        t = teacher.float() / temperature
        s -= reduce(s.max(dim=-1, keepdim=True).values, torch.distributed.ReduceOp.MAX)
        t -= reduce(t.max(dim=-1, keepdim=True).values, torch.distributed.ReduceOp.MAX)
        p_s, p_t = s.exp(), t.exp()
        sums = reduce(torch.stack([p_s.sum(-1), p_t.sum(-1)]), torch.distributed.ReduceOp.SUM)
        p_s /= sums[0].unsqueeze(-1)
        p_t /= sums[1].unsqueeze(-1)
        # KL = sum p_t (log p_t - log p_s) = sum p_t (t - s) - log sum_t + log sum_s  (sum p_t = 1)
        cross = reduce((p_t * (t - s)).sum(-1), torch.distributed.ReduceOp.SUM)
        kl = cross - sums[1].log() + sums[0].log()
        p_s -= p_t
        p_s *= temperature  # d(T^2 KL)/ds = T (p_s - p_t)
        ctx.save_for_backward(p_s)
        ctx.student_dtype = student.dtype
        return kl * temperature ** 2

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.unsqueeze(-1)).to(ctx.student_dtype), None, None, None


class _SequenceFirstGrad(torch.autograd.Function):
    """Identity on ``[b, s, V]`` logits whose backward hands on the gradient laid out as a contiguous
    ``[s, b, V]`` tensor (viewed as ``[b, s, V]``), the layout megatron's output layer produced them in.
    GPTModel returns ``logits.transpose(0, 1).contiguous()``; a gradient made in the ``[b, s, V]`` layout
    reaches the output layer's input-gradient matmul with its batch axis strided across the sequence,
    and torch then multiplies through an expanded ``bmm`` instead of one folded ``mm`` (measured: 5.2 s
    against 0.4 s for SmolLM2's 49k vocabulary at 1 x 512 tokens on one CPU thread). The forward returns
    a copy, which megatron's cross entropy may then modify in place (a view could not be)."""

    @staticmethod
    def forward(ctx, logits):
        return logits.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.transpose(0, 1).clone(memory_format=torch.contiguous_format).transpose(0, 1)


def sequence_first_grad(logits: torch.Tensor) -> torch.Tensor:
    """A copy of ``logits`` ([b, s, V], as GPTModel returns them) whose gradient leaves in ``[s, b, V]``
    layout (see ``_SequenceFirstGrad``). Apply it before a loss computed outside the model."""
    return _SequenceFirstGrad.apply(logits)


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                      group=None) -> torch.Tensor:
    """Per-token ``T^2 * KL(teacher_T || student_T)`` over the last (vocabulary) axis, the logits sharded
    over ``group`` (megatron's tensor-parallel group; None: unsharded). Differentiable w.r.t. the student.
    Padded vocabulary entries must carry the same logits in both (megatron's head gives both the same
    padding rows), so they add nothing."""
    if not temperature > 0:
        raise ValueError(f"temperature {temperature} must be positive")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), float(temperature), group)


def _gpt_model(model: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def paired_forward(model: torch.nn.Module, call: Callable[[torch.nn.Module], torch.Tensor]):
    """``(student_output, teacher_output)`` of this pipeline stage for one micro-batch (see the module
    doc). ``call(model)`` runs the model on the micro-batch. On the last stage both are logits; on
    others, hidden states, which the caller sends on as ``torch.cat([student, teacher], dim=1)``."""
    gpt = _gpt_model(model)
    received = gpt.decoder.input_tensor  # the schedule set it; None on the first stage
    if received is not None:
        half = received.shape[1] // 2
        gpt.set_input_tensor([received[:, half:]])
    with torch.no_grad(), dense_forward(model):
        teacher = call(model)
    if received is not None:
        gpt.set_input_tensor([received[:, :half]])
    student = call(model)
    return student, teacher
