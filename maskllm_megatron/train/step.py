"""One iteration of a run: megatron's pipeline schedule over the micro-batches (``run_batches``) with the
masks sampled by the run's ``MaskController``, the losses (LM, and the KL to the dense teacher), the optimizer
step (``train_step``), and the hard-mask validation (``evaluate``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Optional

import torch

from ..megatron.parallel import all_reduce_floats
from ..run_folder import checkpoints_folder, newest_complete

if TYPE_CHECKING:
    from .setup import Run


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (NaN/Inf loss); the message says where and what was kept."""


def _loss_func(loss_mask, output_tensor):
    losses = output_tensor.float()
    loss = (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


@dataclass(frozen=True)
class Teacher:
    """The dense model as teacher of a forward pass: ``kd_weight`` of the distillation term in the loss
    (0: the LM loss alone is optimised, the KL only measured) at ``temperature``."""
    kd_weight: float = 0.0
    temperature: float = 1.0


def _distill_loss_func(loss_mask, labels, teacher_logits, teacher: Teacher, output_tensor):
    """``kd_weight * T^2 KL(teacher_T || student_T) + (1 - kd_weight) * LM`` averaged over the loss mask;
    the LM term is megatron's vocab-parallel cross entropy, as the model computes it from labels."""
    from megatron.core import parallel_state, tensor_parallel

    from ..megatron.distill import sequence_first_grad, vocab_parallel_kl

    output_tensor = sequence_first_grad(output_tensor)
    kl = vocab_parallel_kl(output_tensor, teacher_logits, teacher.temperature,
                           parallel_state.get_tensor_model_parallel_group())
    ce = tensor_parallel.vocab_parallel_cross_entropy(output_tensor, labels)  # works in place on the logits
    tokens = loss_mask.sum().clamp(min=1)
    lm = (ce.float() * loss_mask).sum() / tokens
    kd = (kl * loss_mask).sum() / tokens
    loss = teacher.kd_weight * kd + (1 - teacher.kd_weight) * lm if teacher.kd_weight else lm
    return loss, {"lm loss": lm.detach().clone(), "kd loss": kd.detach().clone(), "loss": loss.detach().clone()}


def run_batches(cfg, model, batches, num_microbatches, forward_only, sample_masks=None,
                teacher: Optional[Teacher] = None):
    """One pass of megatron's pipeline schedule over ``num_microbatches`` micro-batches. ``sample_masks``
    is called with each micro-batch's index on this rank before its forward (``MaskController.step``);
    with a ``teacher`` the dense model runs beside the student on every micro-batch
    (``megatron.distill.paired_forward``: the pipeline then carries both models' hidden states)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..megatron.distill import paired_forward

    counter = iter(range(num_microbatches))

    def forward_step(data_iterator, m):
        batch = next(data_iterator)
        mb = next(counter)
        if sample_masks is not None:
            sample_masks(mb)
        if teacher is None:
            out = m(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
            return out, partial(_loss_func, batch["loss_mask"])
        student, dense = paired_forward(m, lambda mm: mm(batch["tokens"], batch["position_ids"], batch["attention_mask"]))
        if not parallel_state.is_pipeline_last_stage():
            return torch.cat([student, dense], dim=1), None  # hidden states [s, b, h]: both halves go on
        return student, partial(_distill_loss_func, batch["loss_mask"], batch["labels"], dense, teacher)

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=num_microbatches, seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.data.micro_batch_size * (2 if teacher is not None else 1), forward_only=forward_only)


def mean_loss(results, dp_group=None, key: str = "lm loss") -> Optional[float]:
    """Average of a logged loss (``key``) over the micro-batches of the last pipeline stage, and over the
    data-parallel ranks when ``dp_group`` is given (the whole batch's loss, as DP=1 logs it); the same
    on every rank (None if no stage has it)."""
    from megatron.core import parallel_state

    local = [0.0, 0.0]
    if parallel_state.is_pipeline_last_stage() and results:
        vals = torch.stack([r[key].double() for r in results])
        local = [float(vals.sum()), float(len(results))]
    total, n = all_reduce_floats(local, group=parallel_state.get_pipeline_model_parallel_group())
    if dp_group is not None:
        total, n = all_reduce_floats([total, n], group=dp_group)
    return total / n if n else None


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's outcome: the losses averaged over data-parallel ranks (``kd_loss`` and ``loss``
    None without distillation), the gradient norm before clipping (None when megatron did not compute it)
    and the data's fingerprint (the sum of its token ids over the global batch)."""
    lm_loss: Optional[float]
    kd_loss: Optional[float]
    loss: Optional[float]
    grad_norm: Optional[float]
    fingerprint: float


def train_step(run: Run, batches: list) -> StepResult:
    """One optimizer step on this rank's micro-batches of the run's next iteration (``run.state.iteration``),
    masks sampled by ``run.masks``. A non-finite loss or gradient norm stops the run on every rank, unsaved."""
    from megatron.core import parallel_state

    it, env, num_micro, teacher = run.state.iteration, run.env, run.num_micro, run.teacher
    dp_group = parallel_state.get_data_parallel_group()
    run.ddp.zero_grad_buffer()
    run.optimizer.zero_grad()
    fingerprint = all_reduce_floats([sum(int(b["tokens"].sum()) for b in batches)], group=dp_group)[0]
    # micro-batch mb of DP rank r holds the global batch's micro-batch mb * dp_size + r (the sampler deals them
    # out in that order): keyed by that index, the noise does not depend on the DP size
    results = run_batches(run.cfg, run.ddp, batches, num_micro, forward_only=False, sample_masks=lambda mb:
                          run.masks.step(it, mb * env.dp_size + env.dp_rank, 1.0 / num_micro), teacher=teacher)
    loss = mean_loss(results, dp_group)
    kd_loss = total_loss = None
    if teacher is not None:
        kd_loss, total_loss = (mean_loss(results, dp_group, key) for key in ("kd loss", "loss"))
    checked = total_loss if teacher is not None else loss
    nonfinite = checked is not None and not math.isfinite(checked)
    if all_reduce_floats([nonfinite], op=torch.distributed.ReduceOp.MAX)[0]:  # every rank stops together
        _stop(run, "the loss" if teacher is not None else "LM loss", checked)
    _, grad_norm, _ = run.optimizer.step()  # the norm before clipping; megatron computes it only to clip
    run.scheduler.step(increment=1)
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        _stop(run, "the gradient norm", float(grad_norm))
    return StepResult(loss, kd_loss, total_loss, grad_norm, fingerprint)


def _stop(run: Run, what: str, value: float) -> None:
    """Stop a run whose step went non-finite, before it saves, naming the checkpoint to go back to."""
    kept = newest_complete(checkpoints_folder(run.cfg.run.out_dir), verify=False)
    raise TrainingStopped(f"{what} is {value} at iteration {run.state.iteration + 1}: stopped without saving; the "
                          f"last good checkpoint is {kept or 'none'}; lower optim.lr or check the data")


def evaluate(run: Run) -> dict:
    """Validation with the HARD mask: LM loss, perplexity and the KL to the dense model (temperature 1),
    averaged over data-parallel ranks; and its wall time (``valid/seconds``, which the demo's speed probe
    plans with)."""
    from megatron.core import parallel_state

    cfg, model = run.cfg, run.ddp
    started = time.perf_counter()
    model.eval()
    total = kl = 0.0
    n = 0
    with torch.no_grad():
        for batches in run.data.valid_iterations(cfg.run.eval_iters):
            results = run_batches(cfg, model, batches, len(batches), forward_only=True, teacher=Teacher())
            total += mean_loss(results)
            kl += mean_loss(results, key="kd loss")
            n += 1
    model.train()
    total, kl, n = all_reduce_floats([total, kl, n], group=parallel_state.get_data_parallel_group())
    loss = total / n
    return {"valid/loss": loss, "valid/ppl": math.exp(min(loss, 50.0)), "valid/kl_to_dense": kl / n,
            "valid/seconds": time.perf_counter() - started}
