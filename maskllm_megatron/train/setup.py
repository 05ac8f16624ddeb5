"""A run, built once (``set_up``): the parallel layout, the sparsified model and its ``MaskController``,
the prior, the optimizer and its schedule, the data, the metrics log and the loop's state, resumed from the
run's checkpoint when it has one. The loop (``trainer``) and its step (``step``) take the ``Run``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..checkpoint_folders import DIST_FILES, MODEL_CONFIG_FILE, read_extra
from ..megatron.parallel import all_reduce_floats, init_parallel, init_process_group
from ..run_config import ConfigError, TrainConfig
from .metrics import MetricsLogger, host_rss_bytes, peak_memory_bytes
from .rank_guards import resume_checkpoint
from .step import Teacher

if TYPE_CHECKING:
    from ..megatron.sparsify import MaskController


# -- parallel state ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParallelEnv:
    """This process's place in the run's layout."""
    rank: int
    dp_rank: int
    dp_size: int
    last_stage: bool  # the last pipeline stage (it holds the losses)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def setup_parallel(cfg: TrainConfig) -> ParallelEnv:
    """torch.distributed and megatron-core's groups for the run's layout (after checking that the processes
    started fit it), seeded with ``run.seed``."""
    from megatron.core import parallel_state

    from ..megatron import cpu_compat

    cpu_compat.apply()
    init_process_group()  # torchrun's ranks, or one process when launched plainly
    cfg.validate(torch.distributed.get_world_size())
    init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, seed=cfg.run.seed, data_parallel=True)
    torch.manual_seed(cfg.run.seed)
    return ParallelEnv(torch.distributed.get_rank(), parallel_state.get_data_parallel_rank(),
                       parallel_state.get_data_parallel_world_size(), parallel_state.is_pipeline_last_stage())


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
        return transfer_masks(model, cfg.prior.checkpoint, weights=cfg.prior.update_weights)
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
def transfer_masks(model, ckpt_dir: str, weights: bool = False) -> dict:
    """Another run's masks as this run's prior (mask transfer to a new domain): the learned hard masks,
    or, for a prior-only run (saved at iteration 0), its one-shot prior masks; with ``weights`` the
    masked layers' weights too (``prior.update_weights``: e.g. a prior-only run's SparseGPT-updated ones).

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
    wanted = {f"{names[id(layer)]}{suffix}" for layer in layers}
    wanted |= {f"{names[id(layer)]}.weight" for layer in layers} if weights else set()
    sharded = {k: replace(v, data=torch.empty_like(v.data)) for k, v in model.sharded_state_dict().items()
               if k in wanted}
    loaded = load_sharded(sharded, ckpt_dir)
    for layer in layers:
        source = loaded[f"{names[id(layer)]}{suffix}"]
        mask = source.to(layer.weight.dtype) if use_prior else hard_mask(source, layer.nm, dtype=layer.weight.dtype)
        layer.set_prior(mask)
        if weights:
            layer.weight.copy_(loaded[f"{names[id(layer)]}.weight"])
    return {"prior_method": "checkpoint", "prior_checkpoint": ckpt_dir,
            "prior_source": "one-shot prior" if use_prior else "learned masks",
            **({"prior_weights": "from the checkpoint"} if weights else {})}


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


# -- inputs and memory ------------------------------------------------------------------------------
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


# -- the run --------------------------------------------------------------------------------------
@dataclass
class LoopState:
    """What the loop advances and a checkpoint saves (with model, optimizer and scheduler, the whole state:
    see ``trainer``)."""
    iteration: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)  # [iteration, lm loss, data fingerprint] per iteration
    inputs: dict = field(default_factory=dict)  # input_fingerprints() of the run's first start
    resumed_from: int = -1  # the iteration this process resumed (-1: a fresh start)
    written: list = field(default_factory=list)  # iterations this process saved

    def advance(self, lm_loss: Optional[float], fingerprint: float, samples: int) -> None:
        """One iteration done: ``samples`` more consumed, its loss and data fingerprint in the history."""
        self.iteration += 1
        self.consumed_samples += samples
        self.history.append([self.iteration, lm_loss, fingerprint])


@dataclass
class Run:
    """Everything the loop works with, built once by ``set_up``."""
    cfg: TrainConfig
    env: ParallelEnv
    model: torch.nn.Module  # this rank's stage of the sparsified GPTModel (``ddp.module``)
    masks: MaskController  # its masks' controller (what ``sparsify`` returned)
    ddp: Any  # megatron's DistributedDataParallel around ``model``
    optimizer: Any
    scheduler: Any
    data: Any  # ``data.RunData``: calibration, training and validation batches
    logger: MetricsLogger
    state: LoopState
    teacher: Optional[Teacher]  # distillation from the dense model (distill.kd_weight > 0)
    resume: Optional[Path]  # the checkpoint resumed from (None: a fresh start)
    prior_report: dict  # what the prior did (a fresh start's iteration-0 record)
    memory_estimate: Any  # the memory model's estimate (``train.memory``)
    rss_before_model: int  # the process's resident bytes before the model was built

    @property
    def num_micro(self) -> int:
        """Micro-batches per iteration on this data-parallel rank."""
        return self.cfg.data.global_batch_size // (self.cfg.data.micro_batch_size * self.env.dp_size)


def set_up(cfg: TrainConfig, data_factory=None) -> Run:
    """The run as configured, on this rank: a fresh start (the prior applied) or the resume of the run's
    newest checkpoint (``rank_guards.resume_checkpoint``), refused before anything is built when it would
    mix two runs. ``data_factory(cfg, info, dp_rank, dp_size)`` makes the data (default ``data.build_data``)."""
    from .data import build_data

    env = setup_parallel(cfg)
    resume = resume_checkpoint(cfg.run.out_dir)  # run_folder's policy: newest complete, digests verified
    saved = read_extra(resume) if resume is not None else None
    if saved is not None:  # before building anything: a resume that would mix two runs is refused
        conflict = cfg.resume_conflict(saved.get("config", {}), saved["iteration"])
        if conflict:
            raise ConfigError(conflict)
    before_model = host_rss_bytes()
    model, info, masks = build_model(cfg)
    estimate = memory_estimate(cfg, info.model)
    if env.is_rank0:
        print(f"[maskllm] memory model: {estimate.line()}"
              + (" (the teacher's logits not counted)" if cfg.distill.kd_weight > 0 else ""), flush=True)
    data = (data_factory or build_data)(cfg, info, env.dp_rank, env.dp_size)
    inputs = input_fingerprints(cfg)  # the inputs exist now: the model and data were read
    conflict = inputs_conflict(saved.get("inputs"), inputs, cfg) if saved is not None else None
    if conflict:
        raise ConfigError(conflict)
    # the teacher is the original model: copied before any step, resume load or prior weight update
    originals = (masks.masked_weights_copy() if cfg.distills_trained_weights() and cfg.prior.update_weights
                 and resume is None else None)
    prior_report = apply_prior(cfg, model, data) if resume is None else {}
    if cfg.mask.refit:  # before the optimizer: the weights learn, the logits do not (a resume loads both after)
        masks.fix_masks()
    if cfg.distills_trained_weights():
        masks.keep_teacher_copy(originals)
    ddp, optimizer, scheduler = build_optimizer(cfg, model, masks)
    if cfg.parallel.overlap_grad_reduce and env.is_rank0:
        buckets = sum(len(g.buckets) for g in ddp.bucket_groups)
        print(f"[maskllm] gradient reduction overlaps the backward: {buckets} buckets", flush=True)
    logger = MetricsLogger(cfg.run.out_dir, cfg.run.tensorboard, cfg.run.wandb_project, cfg.to_dict(),
                           enabled=env.is_rank0)
    teacher = Teacher(cfg.distill.kd_weight, cfg.distill.temperature) if cfg.distill.kd_weight > 0 else None
    run = Run(cfg, env, model, masks, ddp, optimizer, scheduler, data, logger, LoopState(inputs=inputs), teacher,
              resume, prior_report, estimate, before_model)
    if resume is not None:
        _load_resume(run)
    return run


def _load_resume(run: Run) -> None:
    """Load the run checkpoint ``run.resume`` (model, optimizer, scheduler) and the loop state it saved; the
    metrics log forgets what came after it."""
    from ..megatron.checkpointing import load_checkpoint

    extra = load_checkpoint(run.model, run.resume, run.optimizer)["extra"]
    if extra["iteration"] > 0:  # a prior-only checkpoint's scheduler was made for train_iters=0
        run.scheduler.load_state_dict(extra["scheduler"])
    run.state = LoopState(extra["iteration"], extra["consumed_samples"], extra["history"],
                          inputs=extra.get("inputs") or run.state.inputs, resumed_from=extra["iteration"])
    run.logger.truncate_after(run.state.iteration)
    if run.env.is_rank0:
        print(f"[maskllm] resumed from {run.resume} at iteration {run.state.iteration}", flush=True)
