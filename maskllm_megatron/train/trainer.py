"""The mask-learning driver: ``train(cfg)`` sets the run up once, then loops. Launch with torchrun:

    torchrun --nproc-per-node 8 -m maskllm_megatron.train --config run.yaml optim.lr=5e-5

Its parts: ``setup.set_up`` builds the ``Run`` (parallel layout, sparsified model and its ``MaskController``,
prior, optimizer, data, metrics log, loop state, resume); ``loop`` runs it: ``step.train_step`` each
iteration, then ``log_step``, ``log_evaluation`` (``step.evaluate``) and ``save`` on their intervals, and a
save and stop on SIGTERM / SIGINT. A prior-only run (``run.train_iters`` 0) saves its one-shot masks
(``save(prior_only=True)``).

Exact resume: the Gumbel noise is a function of (seed, layer, iteration, the micro-batch's index in
the global batch) and global positions, dropout is off, and the data order is a function of the seed and the number of
consumed samples, so model + optimizer + scheduler + iteration + consumed samples is the whole state.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from ..megatron.parallel import all_reduce_floats
from ..run_folder import checkpoint_name, checkpoints_folder, rotate, write_latest
from ..run_config import TrainConfig
from .metrics import MaskWatcher, StepThroughput, peak_memory_bytes
from .setup import Run, peak_memory_line, set_up
from .step import StepResult, TrainingStopped, evaluate, train_step


def train(cfg: TrainConfig, data_factory=None) -> dict:
    """Run (or resume) mask learning as configured; return the final metrics. ``data_factory``: see
    ``setup.set_up``."""
    run = set_up(cfg, data_factory)
    if run.resume is None:
        log_start(run)
    if cfg.run.train_iters == 0 and run.resume is None:  # a prior-only run: keep the one-shot masks
        path = save(run, prior_only=True)
        if run.env.is_rank0:
            print(f"[maskllm] prior-only run: saved {path}", flush=True)
        return {"iteration": 0, **run.prior_report}
    return loop(run)


@dataclass
class Meters:
    """What a logged iteration reads besides its step: the masks' flip rates and the steps' throughput."""
    watcher: MaskWatcher
    throughput: StepThroughput


def loop(run: Run) -> dict:
    """Train from ``run.state`` to ``run.train_iters``: a step each iteration; logging, evaluation and saving
    on their intervals and at the end; a SIGTERM / SIGINT saves at the end of its iteration and stops.
    Returns the last logged metrics with the iteration reached and the loss history."""
    cfg, state = run.cfg, run.state
    meters = Meters(MaskWatcher(run.masks.layers), StepThroughput())
    meters.watcher.collect(run.masks.config.mask.step_state(state.iteration))  # flip-rate baseline
    preemption = _Preemption()
    batches = run.data.train_iterations(state.consumed_samples, run.num_micro)
    last = {}
    run.ddp.train()
    while state.iteration < cfg.run.train_iters:
        with meters.throughput.step():
            result = train_step(run, next(batches))
        state.advance(result.lm_loss, result.fingerprint, cfg.data.global_batch_size)
        if state.iteration % cfg.run.log_interval == 0 or state.iteration == cfg.run.train_iters:
            last = log_step(run, result, meters)
        if cfg.run.eval_interval and (state.iteration % cfg.run.eval_interval == 0 or state.iteration == cfg.run.train_iters):
            last.update(log_evaluation(run))
        stop = preemption.agreed()
        if stop or (cfg.run.save_interval and state.iteration % cfg.run.save_interval == 0) \
                or state.iteration == cfg.run.train_iters:
            path = save(run)
            if run.env.is_rank0:
                print(f"[maskllm] saved {path}", flush=True)
        if stop:
            if run.env.is_rank0:
                print(f"[maskllm] {preemption.signal_name or 'stop requested'}: saved at iteration {state.iteration}; "
                      "exiting", flush=True)
            break
    if run.env.is_rank0 and state.iteration > max(state.resumed_from, 0):
        print(f"[maskllm] {peak_memory_line(run.memory_estimate, run.rss_before_model)}", flush=True)
    return {**last, "iteration": state.iteration, "history": state.history, "parallel": run.env.dp_size}


# -- log ----------------------------------------------------------------------------------------------
def log_start(run: Run) -> None:
    """A fresh run's iteration-0 record: the prior's report and where its hard masks start (validation)."""
    run.logger.truncate_after(-1)  # no checkpoint: records of an earlier attempt in out_dir are stale
    record = {"iteration": 0, **{k: v for k, v in run.prior_report.items() if v is not None}}
    if run.cfg.run.eval_interval:
        record.update(evaluate(run))
    valid = f" | hard-mask valid loss {record['valid/loss']:.4f}" if "valid/loss" in record else ""
    run.logger.log(record, console=f"iter      0 | prior {run.prior_report.get('prior_method', 'none')}{valid}")


def log_step(run: Run, result: StepResult, meters: Meters) -> dict:
    """The record of the iteration just stepped (``run.state.iteration``), logged: losses, learning rate (the
    logits'; a refit's: the weights'), mask schedules, throughput since the last record, memory, mask
    statistics."""
    cfg, state, mask = run.cfg, run.state, run.masks.config.mask
    step = mask.step_state(state.iteration - 1)
    iters = cfg.run.log_interval if state.iteration % cfg.run.log_interval == 0 else state.iteration % cfg.run.log_interval
    lr_group = run.masks.logits_group(run.optimizer) or run.optimizer.param_groups[0]
    record = {"iteration": state.iteration, "lm_loss": result.lm_loss, "lr": run.scheduler.get_lr(lr_group),
              "temperature": step.temperature, "scale": step.scale, "reg_coef": mask.regularizer_schedule(step.iteration),
              "tokens_per_s": meters.throughput.report(cfg.data.global_batch_size * cfg.data.seq_length * iters),
              "peak_memory_gb": peak_memory_bytes() / 2**30, "consumed_samples": state.consumed_samples,
              **meters.watcher.collect(step)}
    if cfg.optim.clip_grad > 0 and result.grad_norm is not None:
        record["grad_norm"] = float(result.grad_norm)
    if run.teacher is not None:
        record.update(kd_loss=result.kd_loss, loss=result.loss)
    run.logger.log(record, console=_console_line(record, cfg.run.train_iters))
    return record


def log_evaluation(run: Run) -> dict:
    """The hard-mask validation at ``run.state.iteration`` (``step.evaluate``), logged."""
    ev = evaluate(run)
    run.logger.log({"iteration": run.state.iteration, **ev},
                   console=f"iter {run.state.iteration:6d} | hard-mask valid loss {ev['valid/loss']:.4f} | ppl "
                           f"{ev['valid/ppl']:.2f} | KL to dense {ev['valid/kl_to_dense']:.4f}")
    return ev


def _console_line(last: dict, train_iters: int) -> str:
    """The console line of a logged iteration, from its metrics record."""
    losses = (f"loss {last['loss']:.4f} (lm {last['lm_loss']:.4f}, kd {last['kd_loss']:.4f})" if "kd_loss" in last
              else f"loss {last['lm_loss']:.4f}")
    grad = f"grad norm {last['grad_norm']:.2e} | " if "grad_norm" in last else ""
    return (f"iter {last['iteration']:6d}/{train_iters} | {losses} | lr {last['lr']:.2e} | {grad}"
            f"tau {last['temperature']:.3f} | scale {last['scale']:.0f} | flip {last.get('mask/flip_rate', 0):.4f} | "
            f"maxp {last.get('mask/max_prob', 0):.3f} | {last['tokens_per_s']:.0f} tok/s | "
            f"{last['peak_memory_gb']:.2f} GB")


# -- save ---------------------------------------------------------------------------------------------
def save(run: Run, prior_only: bool = False) -> Path:
    """Save the iteration's checkpoint (model, optimizer, scheduler, loop state), move ``latest`` to it and
    rotate (``run_folder.rotate``: only this run's own line). ``prior_only``: a prior-only run's checkpoint
    at iteration 0, the model and the loop state without optimizer state (none exists before a step)."""
    from ..megatron.checkpointing import save_checkpoint

    cfg, state = run.cfg, run.state
    _check_finite_logits(run)
    root = checkpoints_folder(cfg.run.out_dir)
    extra = {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
             "scheduler": run.scheduler.state_dict(), "history": state.history, "config": cfg.to_dict(),
             "inputs": state.inputs}
    path = save_checkpoint(run.model, root / checkpoint_name(state.iteration), None if prior_only else run.optimizer,
                           extra=extra)
    state.written.append(state.iteration)
    if run.env.is_rank0:
        write_latest(root, state.iteration)  # the pointer moves only after the checkpoint is complete
        rotate(root, state.written, state.resumed_from, cfg.run.save_interval, cfg.run.keep_last)
    torch.distributed.barrier()
    return path


def _check_finite_logits(run: Run) -> None:
    """Refuse to save non-finite mask logits (a step whose update overflowed): the last good checkpoint
    stays the newest."""
    bad = [layer.mask_layer_id for layer in run.masks.layers if not bool(torch.isfinite(layer.mask_logits).all())]
    flag = all_reduce_floats([len(bad)], op=torch.distributed.ReduceOp.MAX)[0]
    if flag:
        raise TrainingStopped(f"non-finite mask logits at iteration {run.state.iteration}"
                              + (f" ({bad[0]})" if bad else "") + ": stopped without saving; lower optim.lr")


class _Preemption:
    """SIGTERM (cluster preemption) or SIGINT (Ctrl-C, which torchrun passes to its ranks) sets a flag;
    the loop saves and exits at the end of the iteration. A second SIGINT interrupts at once."""

    def __init__(self):
        self.flag = False
        self.signal_name = ""
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.flag:
            raise KeyboardInterrupt
        self.flag = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        return bool(all_reduce_floats([self.flag], op=torch.distributed.ReduceOp.MAX)[0])
