"""The mask-learning driver: config -> parallel state -> model (+ prior) -> optimizer -> loop.

Each piece is a small function; ``train(cfg)`` wires them. Launch with torchrun:

    torchrun --nproc-per-node 8 -m maskllm_megatron.train --config run.yaml optim.lr=5e-5

Exact resume: the Gumbel noise is a function of (seed, layer, iteration, the micro-batch's index in
the global batch) and global positions, dropout is off, and the data order is a function of the seed and the number of
consumed samples, so model + optimizer + scheduler + iteration + consumed samples is the whole state.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint_folders import DIST_FILES, MODEL_CONFIG_FILE, read_extra
from ..megatron.parallel import all_reduce_floats, init_parallel, init_process_group
from ..run_folder import checkpoint_name, checkpoints_folder, newest_complete, rotate, write_latest
from .config import ConfigError, TrainConfig
from .rank_guards import resume_checkpoint
from .metrics import MaskWatcher, MetricsLogger, StepThroughput, host_rss_bytes, peak_memory_bytes


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (NaN/Inf loss); the message says where and what was kept."""


# -- parallel state ---------------------------------------------------------------------------------
def setup_parallel(cfg: TrainConfig) -> dict:
    """torch.distributed and megatron-core's groups for the run's layout (after checking that the processes
    started fit it), seeded with ``run.seed``."""
    from megatron.core import parallel_state

    from ..megatron import cpu_compat

    cpu_compat.apply()
    init_process_group()  # torchrun's ranks, or one process when launched plainly
    cfg.validate(torch.distributed.get_world_size())
    init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, seed=cfg.run.seed, data_parallel=True)
    torch.manual_seed(cfg.run.seed)
    return {"rank": torch.distributed.get_rank(), "dp_rank": parallel_state.get_data_parallel_rank(),
            "dp_size": parallel_state.get_data_parallel_world_size(),
            "last_stage": parallel_state.is_pipeline_last_stage()}


# -- model ------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig):
    """The converted checkpoint's GPTModel for this rank's stage, sparsified (with the driver's sampling
    kernel, ``mask.fused_kernel``), dense weights loaded: (model, checkpoint info, its ``MaskController``)."""
    from ..convert.checkpoint import CheckpointInfo
    from ..megatron.checkpointing import load_checkpoint
    from ..megatron.model_builder import build_gpt_model

    info = CheckpointInfo.load(cfg.model.checkpoint)
    if cfg.data.seq_length > info.model.max_position_embeddings:
        raise ConfigError(f"data.seq_length {cfg.data.seq_length} exceeds the model's maximum sequence length "
                          f"{info.model.max_position_embeddings} (max_position_embeddings): set data.seq_length "
                          f"<= {info.model.max_position_embeddings}")
    if info.model.is_moe and cfg.parallel.tp > 1 and not cfg.parallel.sequence_parallel:
        raise ConfigError(f"parallel.tp {cfg.parallel.tp} with a mixture-of-experts model: megatron-core trains MoE "
                          "layers at TP > 1 only with sequence parallelism; set parallel.sequence_parallel=true, "
                          "or use parallel.tp=1 and spread the experts with parallel.ep")
    cfg.check_recompute_layers(info.model.num_layers)
    par = cfg.parallel
    tcfg = info.model.to_transformer_config(par.tp, par.pp, model_dtype(cfg), ep=par.ep, perform_initialization=False,
                                            **cfg.recompute_overrides())
    model = build_gpt_model(info.model, tcfg)
    if torch.cuda.is_available():
        model.cuda()
    masks = sparsify_model(cfg, model)
    load_checkpoint(model, cfg.model.checkpoint)
    return model, info, masks


def sparsify_model(cfg: TrainConfig, model):
    """``sparsify`` as the driver does: the run's ``sparsify_config`` with the driver's sampling kernel
    (``mask.fused_kernel``; the library's default is the fastest that runs here). Returns the controller."""
    from ..megatron.sparsify import sparsify

    return sparsify(model, replace(cfg.sparsify_config(), fused_kernel=cfg.mask.fused_kernel))


def model_dtype(cfg: TrainConfig) -> str:
    """model.dtype with auto resolved: bf16 on GPU, fp32 on CPU."""
    return cfg.model.dtype if cfg.model.dtype != "auto" else ("bf16" if torch.cuda.is_available() else "fp32")


def apply_prior(cfg: TrainConfig, model, data) -> dict:
    """One-shot prior from calibration data, or the hard masks of an earlier run as the prior."""
    from ..megatron.priors import compute_priors
    from ..megatron.sparsify import masked_layers

    method = cfg.prior.method
    if method == "none":
        return {}
    if method == "checkpoint":
        return transfer_masks(model, cfg.prior.checkpoint)
    calibrated = method != "magnitude"  # magnitude needs no calibration data, so it works at any pipeline layout
    if calibrated and cfg.parallel.pp != 1:
        raise ValueError("one-shot priors are computed at PP=1: run the prior step with parallel.pp=1 "
                         "(or prior.method=checkpoint with a PP=1 prior run)")
    batches = ([partial(_calibration_forward, batch=b) for b in data.calibration_batches(cfg.prior.calib_samples)]
               if calibrated else [])
    unreached: list = []
    errors = compute_priors(model, batches, cfg.prior_config(), fallbacks=unreached)
    report = {"prior_method": method, "prior_layers": len(list(masked_layers(model))),
              "prior_reconstruction_error": sum(errors.values()) if errors else None}
    if calibrated and getattr(model.config, "num_moe_experts", None):  # experts no token reached: magnitude masks
        from megatron.core import parallel_state

        report["prior_magnitude_fallbacks"] = int(all_reduce_floats(
            [len(unreached)], group=parallel_state.get_expert_model_parallel_group())[0])
    return report


def _calibration_forward(model, batch):
    return model(batch["tokens"], batch["position_ids"], batch["attention_mask"])


@torch.no_grad()
def transfer_masks(model, ckpt_dir: str) -> dict:
    """Another run's masks as this run's prior (mask transfer to a new domain): the learned hard masks,
    or, for a prior-only run (saved at iteration 0), its one-shot prior masks.

    The saved tensors are loaded into fresh buffers, never into this model's own logits: this run
    starts from its own freshly initialised logits shifted towards the transferred masks (the
    MaskLLM prior), exactly as from a one-shot prior.
    """
    from ..masks import hard_mask
    from ..megatron.checkpointing import load_sharded, load_tensors_metadata
    from ..megatron.sparsify import masked_layers

    ckpt_dir = str(Path(ckpt_dir).absolute())
    extra = read_extra(ckpt_dir)
    iteration = extra["iteration"] if extra is not None else None
    saved = load_tensors_metadata(ckpt_dir)
    layers = list(masked_layers(model))
    use_prior = iteration == 0 and all(k.replace(".mask_logits", ".prior_mask") in saved
                                       for k in saved if k.endswith(".mask_logits"))
    suffix = ".prior_mask" if use_prior else ".mask_logits"
    if use_prior:
        for layer in layers:
            layer.prior_mask = torch.zeros_like(layer.weight, dtype=torch.bool)
    names = {id(m): n for n, m in model.named_modules()}
    # dist_checkpointing.load fills the tensors it is given in place: hand it copies of the layout.
    sharded = {k: replace(v, data=torch.empty_like(v.data)) for k, v in model.sharded_state_dict().items()
               if k.endswith(suffix)}
    loaded = load_sharded(sharded, ckpt_dir)
    for layer in layers:
        source = loaded[f"{names[id(layer)]}{suffix}"]
        mask = source.to(layer.weight.dtype) if use_prior else hard_mask(source, layer.nm, dtype=layer.weight.dtype)
        layer.set_prior(mask)
    return {"prior_method": "checkpoint", "prior_checkpoint": ckpt_dir,
            "prior_source": "one-shot prior" if use_prior else "learned masks"}


# -- optimizer --------------------------------------------------------------------------------------
def build_optimizer(cfg: TrainConfig, model, masks):
    """megatron's DDP wrapper, optimizer and lr schedule for ``model``; ``masks`` (its ``MaskController``)
    gives the logits their own group (None: a dense model, megatron's standard groups)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ..megatron.sparsify import GroupWarmupScheduler

    o = cfg.optim
    par = cfg.parallel
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=par.distributed_optimizer, grad_reduce_in_fp32=True,
        overlap_grad_reduce=par.overlap_grad_reduce, bucket_size=par.bucket_size or None), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    if par.overlap_grad_reduce:
        # as Megatron-LM's training loop: no reduction until the last micro-batch's backward, where each
        # bucket starts reducing once full; finalize_model_grads waits for them
        model.config.no_sync_func = ddp.no_sync
        model.config.grad_sync_func = ddp.start_grad_sync
    bf16 = model.config.bf16
    opt_cfg = OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                              adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                              clip_grad=o.clip_grad, bf16=bf16, params_dtype=model.config.params_dtype,
                              use_distributed_optimizer=cfg.parallel.distributed_optimizer)
    mask_warmup = o.mask_warmup_iters if o.mask_warmup_iters >= 0 else None
    optimizer = get_megatron_optimizer(opt_cfg, [ddp], config_overrides=None if masks is None else
                                       masks.optimizer_overrides(o.lr, o.min_lr, mask_warmup_steps=mask_warmup))
    scheduler = GroupWarmupScheduler(
        optimizer, init_lr=0.0 if o.warmup_iters else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters, lr_decay_steps=max(1, cfg.run.train_iters), lr_decay_style=o.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(1, cfg.run.train_iters), wd_incr_style="constant")
    return ddp, optimizer, scheduler


# -- checkpoints ------------------------------------------------------------------------------------
def input_fingerprints(cfg: TrainConfig) -> dict:
    """What the run reads, as content keys: the base checkpoint's metadata files and its data files' sizes,
    and each dataset prefix's ``.idx`` digest and ``.bin`` size. A resume compares them with the
    checkpoint's (``run.allow_changed_inputs`` accepts a change)."""
    from ..cache import file_digest
    from ..data.datasets import parse_blend

    base = Path(cfg.model.checkpoint)
    model = {name: file_digest(base / name) for name in (MODEL_CONFIG_FILE, *DIST_FILES)
             if (base / name).is_file()}
    model["data_bytes"] = sum(p.stat().st_size for p in base.glob("*.distcp"))
    data = {}
    for prefix in parse_blend(cfg.data.train)[0]:
        data[prefix] = {"idx": file_digest(f"{prefix}.idx"), "bin_bytes": Path(f"{prefix}.bin").stat().st_size}
    return {"model": model, "data": data}


def inputs_conflict(saved: Optional[dict], now: dict, cfg: TrainConfig) -> Optional[str]:
    """Why a resume must not go on with inputs re-made since the checkpoint (None if it may)."""
    if not saved or cfg.run.allow_changed_inputs:
        return None
    if saved.get("model") != now["model"]:
        what = f"the base checkpoint {cfg.model.checkpoint}"
    elif saved.get("data") != now["data"]:
        changed = sorted(set(saved.get("data", {})) ^ set(now["data"]) |
                         {k for k in now["data"] if saved.get("data", {}).get(k) != now["data"][k]})
        what = f"the dataset {changed[0]}"
    else:
        return None
    return (f"{what} changed since the run's last checkpoint was saved (its files differ): the run would go on "
            "with other inputs than it started with; restore them, or set run.allow_changed_inputs=true to "
            "go on anyway")


def save(cfg: TrainConfig, state: "LoopState", model, optimizer, scheduler, is_rank0: bool) -> Path:
    """Save the iteration's checkpoint, move ``latest`` to it and rotate. Rotation only ever deletes
    checkpoints of this run's own line: those this process wrote, and those of the run it resumed, up to
    the checkpoint it resumed from; a folder of any other origin stays."""
    from ..megatron.checkpointing import save_checkpoint

    _check_finite_logits(model, state.iteration)
    root = checkpoints_folder(cfg.run.out_dir)
    extra = {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
             "scheduler": scheduler.state_dict(), "history": state.history, "config": cfg.to_dict(),
             "inputs": state.inputs}
    # optimizer None: model + extra only
    path = save_checkpoint(model, root / checkpoint_name(state.iteration), optimizer, extra=extra)
    state.written.append(state.iteration)
    if is_rank0:
        write_latest(root, state.iteration)  # the pointer moves only after the checkpoint is complete
        rotate(root, state.written, state.resumed_from, cfg.run.save_interval, cfg.run.keep_last)
    torch.distributed.barrier()
    return path


def _check_finite_logits(model, iteration: int) -> None:
    """Refuse to save non-finite mask logits (a step whose update overflowed): the last good checkpoint
    stays the newest."""
    from ..megatron.sparsify import masked_layers

    bad = [layer.mask_layer_id for layer in masked_layers(model) if not bool(torch.isfinite(layer.mask_logits).all())]
    flag = all_reduce_floats([len(bad)], op=torch.distributed.ReduceOp.MAX)[0]
    if flag:
        raise TrainingStopped(f"non-finite mask logits at iteration {iteration}"
                              + (f" ({bad[0]})" if bad else "") + ": stopped without saving; lower optim.lr")


# -- the loop ---------------------------------------------------------------------------------------
@dataclass
class LoopState:
    iteration: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)  # [iteration, lm loss, data fingerprint] per iteration
    inputs: dict = field(default_factory=dict)  # input_fingerprints() of the run's first start
    resumed_from: int = -1  # the iteration this process resumed (-1: a fresh start)
    written: list = field(default_factory=list)  # iterations this process saved


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


def _mean_loss(results, dp_group=None, key: str = "lm loss") -> Optional[float]:
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


def evaluate(cfg, model, data) -> dict:
    """Validation with the HARD mask: LM loss, perplexity and the KL to the dense model (temperature 1),
    averaged over data-parallel ranks; and its wall time (``valid/seconds``, which the demo's speed probe
    plans with)."""
    from megatron.core import parallel_state

    started = time.perf_counter()
    model.eval()
    total = kl = 0.0
    n = 0
    with torch.no_grad():
        for batches in data.valid_iterations(cfg.run.eval_iters):
            results = run_batches(cfg, model, batches, len(batches), forward_only=True, teacher=Teacher())
            total += _mean_loss(results)
            kl += _mean_loss(results, key="kd loss")
            n += 1
    model.train()
    total, kl, n = all_reduce_floats([total, kl, n], group=parallel_state.get_data_parallel_group())
    loss = total / n
    return {"valid/loss": loss, "valid/ppl": math.exp(min(loss, 50.0)), "valid/kl_to_dense": kl / n,
            "valid/seconds": time.perf_counter() - started}


def train(cfg: TrainConfig, data_factory=None) -> dict:
    """Run (or resume) mask learning as configured; return the final metrics."""
    from megatron.core import parallel_state

    from .data import build_data

    env = setup_parallel(cfg)
    is_rank0 = env["rank"] == 0
    resume = resume_checkpoint(cfg.run.out_dir)  # run_folder's policy: newest complete, digests verified
    saved = read_extra(resume) if resume is not None else None
    if saved is not None:  # before building anything: a resume that would mix two runs is refused
        conflict = cfg.resume_conflict(saved.get("config", {}), saved["iteration"])
        if conflict:
            raise ConfigError(conflict)
    before_model = host_rss_bytes()
    model, info, masks = build_model(cfg)
    estimate = memory_estimate(cfg, info.model)
    if is_rank0:
        print(f"[maskllm] memory model: {estimate.line()}"
              + (" (the teacher's logits not counted)" if cfg.distill.kd_weight > 0 else ""), flush=True)
    data = (data_factory or build_data)(cfg, info, env["dp_rank"], env["dp_size"])
    inputs = input_fingerprints(cfg)  # the inputs exist now: the model and data were read
    conflict = inputs_conflict(saved.get("inputs"), inputs, cfg) if saved is not None else None
    if conflict:
        raise ConfigError(conflict)
    state = LoopState(inputs=inputs)  # a fresh run's; a resume reads its own
    prior_report = {}
    if resume is None:
        prior_report = apply_prior(cfg, model, data)
    if cfg.mask.refit:  # before the optimizer: the weights learn, the logits do not (a resume loads both after)
        masks.fix_masks()
    if cfg.distills_trained_weights():  # the teacher is the original model: copied before any step or resume load
        masks.keep_teacher_copy()
    ddp, optimizer, scheduler = build_optimizer(cfg, model, masks)
    if cfg.parallel.overlap_grad_reduce and is_rank0:
        buckets = sum(len(g.buckets) for g in ddp.bucket_groups)
        print(f"[maskllm] gradient reduction overlaps the backward: {buckets} buckets", flush=True)
    logger = MetricsLogger(cfg.run.out_dir, cfg.run.tensorboard, cfg.run.wandb_project, cfg.to_dict(), enabled=is_rank0)
    if resume is not None:
        state = _resume(resume, model, optimizer, scheduler, logger, inputs, is_rank0)
    else:
        _log_start(cfg, ddp, data, logger, prior_report)
    if cfg.run.train_iters == 0 and resume is None:  # a prior-only run: keep the one-shot masks
        path = save(cfg, state, ddp.module, None, scheduler, is_rank0)  # no optimizer state exists yet
        if is_rank0:
            print(f"[maskllm] prior-only run: saved {path}", flush=True)
        return {"iteration": 0, **prior_report}
    mcfg = cfg.mask_config()
    watcher = MaskWatcher(masks.layers)
    watcher.collect(mcfg.step_state(state.iteration))  # flip-rate baseline
    preemption = _Preemption()
    num_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * env["dp_size"])
    tokens_per_iter = cfg.data.global_batch_size * cfg.data.seq_length
    train_iter = data.train_iterations(state.consumed_samples, num_micro)
    # the logged lr is the logits' (a refit's: the weights')
    logged_group = masks.logits_group(optimizer) or optimizer.param_groups[0]
    throughput = StepThroughput()
    teacher = Teacher(cfg.distill.kd_weight, cfg.distill.temperature) if cfg.distill.kd_weight > 0 else None
    last = {}
    ddp.train()
    while state.iteration < cfg.run.train_iters:
        with throughput.step():
            loss, kd_loss, total_loss, grad_norm, fingerprint = _train_step(
                cfg, masks, ddp, optimizer, scheduler, next(train_iter), state.iteration, num_micro, env, teacher)
        state.iteration += 1
        state.consumed_samples += cfg.data.global_batch_size
        state.history.append([state.iteration, loss, fingerprint])
        if state.iteration % cfg.run.log_interval == 0 or state.iteration == cfg.run.train_iters:
            step = mcfg.step_state(state.iteration - 1)
            iters = cfg.run.log_interval if state.iteration % cfg.run.log_interval == 0 else \
                state.iteration % cfg.run.log_interval
            last = {"iteration": state.iteration, "lm_loss": loss, "lr": scheduler.get_lr(logged_group),
                    "temperature": step.temperature, "scale": step.scale, "reg_coef": mcfg.regularizer_schedule(step.iteration),
                    "tokens_per_s": throughput.report(tokens_per_iter * iters),
                    "peak_memory_gb": peak_memory_bytes() / 2**30, "consumed_samples": state.consumed_samples,
                    **watcher.collect(step)}
            if cfg.optim.clip_grad > 0 and grad_norm is not None:
                last["grad_norm"] = float(grad_norm)
            if teacher is not None:
                last.update(kd_loss=kd_loss, loss=total_loss)
            logger.log(last, console=_console_line(last, cfg.run.train_iters))
        if cfg.run.eval_interval and (state.iteration % cfg.run.eval_interval == 0 or state.iteration == cfg.run.train_iters):
            ev = evaluate(cfg, ddp, data)
            logger.log({"iteration": state.iteration, **ev},
                       console=f"iter {state.iteration:6d} | hard-mask valid loss {ev['valid/loss']:.4f} | ppl "
                               f"{ev['valid/ppl']:.2f} | KL to dense {ev['valid/kl_to_dense']:.4f}")
            last.update(ev)
        stop = preemption.agreed()
        if stop or (cfg.run.save_interval and state.iteration % cfg.run.save_interval == 0) \
                or state.iteration == cfg.run.train_iters:
            path = save(cfg, state, ddp.module, optimizer, scheduler, is_rank0)
            if is_rank0:
                print(f"[maskllm] saved {path}", flush=True)
        if stop:
            if is_rank0:
                print(f"[maskllm] {preemption.signal_name or 'stop requested'}: saved at iteration {state.iteration}; "
                      "exiting", flush=True)
            break
    if is_rank0 and state.iteration > max(state.resumed_from, 0):
        print(f"[maskllm] {peak_memory_line(estimate, before_model)}", flush=True)
    return {**last, "iteration": state.iteration, "history": state.history, "parallel": parallel_state.get_data_parallel_world_size()}


def _train_step(cfg: TrainConfig, masks, ddp, optimizer, scheduler, batches: list, it: int, num_micro: int,
                env: dict, teacher) -> tuple:
    """One optimizer step on this rank's micro-batches of iteration ``it``, masks sampled by ``masks`` (the
    run's ``MaskController``): ``(lm_loss, kd_loss, loss, grad_norm, data fingerprint)`` (the losses
    averaged over data-parallel ranks; kd_loss and loss None without distillation). A non-finite loss or
    gradient norm stops the run on every rank, unsaved."""
    from megatron.core import parallel_state

    dp_group = parallel_state.get_data_parallel_group()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    fingerprint = all_reduce_floats([sum(int(b["tokens"].sum()) for b in batches)], group=dp_group)[0]
    # micro-batch mb of DP rank r holds the global batch's micro-batch mb * dp_size + r (the sampler deals them
    # out in that order): keyed by that index, the noise does not depend on the DP size
    results = run_batches(cfg, ddp, batches, num_micro, forward_only=False, sample_masks=lambda mb:
                          masks.step(it, mb * env["dp_size"] + env["dp_rank"], 1.0 / num_micro), teacher=teacher)
    loss = _mean_loss(results, dp_group)
    kd_loss = total_loss = None
    if teacher is not None:
        kd_loss, total_loss = (_mean_loss(results, dp_group, key) for key in ("kd loss", "loss"))
    checked = total_loss if teacher is not None else loss
    nonfinite = checked is not None and not math.isfinite(checked)
    if all_reduce_floats([nonfinite], op=torch.distributed.ReduceOp.MAX)[0]:  # every rank stops together
        _stop(cfg, "the loss" if teacher is not None else "LM loss", checked, it + 1)
    _, grad_norm, _ = optimizer.step()  # the norm before clipping; megatron computes it only to clip
    scheduler.step(increment=1)
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        _stop(cfg, "the gradient norm", float(grad_norm), it + 1)
    return loss, kd_loss, total_loss, grad_norm, fingerprint


def _resume(resume: Path, model, optimizer, scheduler, logger, inputs: dict, is_rank0: bool) -> "LoopState":
    """Load a run checkpoint (model, optimizer, scheduler) and the loop state it saved; the metrics log
    forgets what came after it."""
    from ..megatron.checkpointing import load_checkpoint

    extra = load_checkpoint(model, resume, optimizer)["extra"]
    if extra["iteration"] > 0:  # a prior-only checkpoint's scheduler was made for train_iters=0
        scheduler.load_state_dict(extra["scheduler"])
    state = LoopState(extra["iteration"], extra["consumed_samples"], extra["history"],
                      inputs=extra.get("inputs") or inputs, resumed_from=extra["iteration"])
    logger.truncate_after(state.iteration)
    if is_rank0:
        print(f"[maskllm] resumed from {resume} at iteration {state.iteration}", flush=True)
    return state


def _log_start(cfg: TrainConfig, ddp, data, logger, prior_report: dict) -> None:
    """A fresh run's iteration-0 record: the prior's report and where its hard masks start (validation)."""
    logger.truncate_after(-1)  # no checkpoint: records of an earlier attempt in out_dir are stale
    record = {"iteration": 0, **{k: v for k, v in prior_report.items() if v is not None}}
    if cfg.run.eval_interval:
        record.update(evaluate(cfg, ddp, data))
    valid = f" | hard-mask valid loss {record['valid/loss']:.4f}" if "valid/loss" in record else ""
    logger.log(record, console=f"iter      0 | prior {prior_report.get('prior_method', 'none')}{valid}")


def _stop(cfg: TrainConfig, what: str, value: float, iteration: int) -> None:
    """Stop a run whose step went non-finite, before it saves, naming the checkpoint to go back to."""
    kept = newest_complete(checkpoints_folder(cfg.run.out_dir), verify=False)
    raise TrainingStopped(f"{what} is {value} at iteration {iteration}: stopped without saving; the last good "
                          f"checkpoint is {kept or 'none'}; lower optim.lr or check the data")


def _console_line(last: dict, train_iters: int) -> str:
    """The console line of a logged iteration, from its metrics record."""
    losses = (f"loss {last['loss']:.4f} (lm {last['lm_loss']:.4f}, kd {last['kd_loss']:.4f})" if "kd_loss" in last
              else f"loss {last['lm_loss']:.4f}")
    grad = f"grad norm {last['grad_norm']:.2e} | " if "grad_norm" in last else ""
    return (f"iter {last['iteration']:6d}/{train_iters} | {losses} | lr {last['lr']:.2e} | {grad}"
            f"tau {last['temperature']:.3f} | scale {last['scale']:.0f} | flip {last.get('mask/flip_rate', 0):.4f} | "
            f"maxp {last.get('mask/max_prob', 0):.3f} | {last['tokens_per_s']:.0f} tok/s | "
            f"{last['peak_memory_gb']:.2f} GB")


def memory_estimate(cfg: TrainConfig, model_config):
    """The memory model's per-GPU estimate for this run (``train.memory``)."""
    from .memory import Layout, estimate

    return estimate(model_config, Layout.from_config(cfg, torch.distributed.get_world_size(), model_dtype(cfg)))


def peak_memory_line(estimate, before_model: int) -> str:
    """The measured peak beside the estimate: on a GPU the allocator's peak (what the model counts); on the
    CPU the process's peak resident set, which also holds the runtime (its size before the model was built
    is given)."""
    from .memory import size

    where = "allocated on the GPU" if torch.cuda.is_available() else \
        f"process peak RSS, of which {size(before_model)} before the model was built"
    return f"peak memory {size(peak_memory_bytes())} measured ({where}); the memory model estimated {size(estimate.peak)}"
