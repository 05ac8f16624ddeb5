"""The run configuration: one typed, validated object; YAML files and ``key=value`` overrides parse
into it. Defaults are the MaskLLM paper's recipe for LLaMA-2 7B (README lists them)."""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .masks.config import MaskConfig
from .megatron.configs import PriorConfig, SparsifyConfig
from .prune.methods import METHODS

#: prior.method: a one-shot method, none (logits from noise only), or checkpoint (an earlier run's masks)
PRIOR_SOURCES = METHODS + ("none", "checkpoint")

# megatron's OptimizerParamScheduler styles that need no further settings ("WSD" needs its own decay steps)
DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")


class ConfigError(ValueError):
    """A bad configuration value (message names the key and the fix)."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers: ``2:4`` and ``1:30`` are text, not 124 and
    90 (a colon in a config value is an N:M, a path or a time, never a sexagesimal number)."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml(text: str, where: str):
    """Parse YAML with ``_ConfigLoader``; a syntax error is one ``ConfigError`` line naming ``where``."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}; fix the syntax") from None


class _Library:
    """A driver field that is a library config's own (``temperature = _Library(MaskConfig)``: the driver key
    ``mask.temperature`` is ``MaskConfig.temperature``). ``_section`` gives it the library's type and default,
    and ``TrainConfig._library`` passes it to the library config it builds, so each such setting, its type
    and its default are declared once: in the library (the MaskLLM paper's recipe)."""

    def __init__(self, config_class: type):
        self.config_class = config_class


#: the types the YAML reader gives a field (``_coerce``); a library field of another type is held as its text
_YAML_TYPES = (bool, int, float, str, tuple, list)


def _section(cls):
    """``dataclass(cls)`` with its ``_Library`` fields typed and defaulted as their library declares them,
    in the order of the class body (the order of the saved config). A library type that YAML has no form
    for (``NMSpec``) is held as its text, which the library config parses."""
    own = dict(cls.__dict__.get("__annotations__", {}))
    annotations = {}
    for name, value in list(vars(cls).items()):
        if isinstance(value, _Library):
            library = {f.name: f for f in dataclasses.fields(value.config_class)}[name]
            hint = typing.get_type_hints(value.config_class)[name]
            default = library.default if library.default is not dataclasses.MISSING else library.default_factory()
            if (typing.get_origin(hint) or hint) not in _YAML_TYPES:
                hint, default = str, str(default)
            annotations[name] = hint
            setattr(cls, name, field(default=default, metadata={"library": value.config_class}))
        elif name in own:
            annotations[name] = own.pop(name)
    if own:
        raise TypeError(f"{cls.__name__}: give {sorted(own)} a default (a section's fields keep the body's order)")
    cls.__annotations__ = annotations
    return dataclass(cls)


@dataclass
class ModelSection:
    checkpoint: str = ""  # megatron-core checkpoint written by maskllm-convert hf-to-mcore
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or bf16 / fp32 (fp16 would need loss scaling)


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallel (mixture-of-experts models): each of ep ranks holds num_experts / ep experts
    distributed_optimizer: bool = True
    # Reduce each gradient bucket as soon as the backward pass has filled it, overlapping data-parallel
    # communication with the rest of the backward (megatron DDP); worth it on GPU clusters.
    overlap_grad_reduce: bool = False
    bucket_size: int = 0  # gradient bucket size in elements; 0: megatron's default
    # minutes a rank waits for the others (start-up, each collective) before the run ends with an error
    timeout_minutes: float = 30.0
    # Split the norms' and residuals' activations over the tensor-parallel ranks along the sequence
    # (megatron's sequence parallelism); needs tp > 1 and data.seq_length a multiple of tp.
    sequence_parallel: bool = False
    # Activation recomputation (megatron's): none; full (whole layers: recompute_method uniform, chunks
    # of recompute_num_layers layers, or block, the first recompute_num_layers layers of each pipeline
    # stage); selective (the recompute_modules of every layer: core_attn, mlp).
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    recompute_modules: tuple[str, ...] = ("core_attn",)


@dataclass
class DataSection:
    train: list = field(default_factory=list)  # [prefix] or [weight, prefix, weight, prefix, ...]
    split: str = "99,1,0"  # train, validation, test shares of every prefix's documents
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 256
    cache_dir: str = ""


@_section
class OptimSection:
    """Adam + megatron's lr schedule. ``lr``/``min_lr`` are the base rates (weights, when they train);
    the mask logits learn at ``lr x mask_lr_mult`` decaying to ``min_lr x mask_lr_mult`` (the paper's 5e-4),
    with their own warm-up when ``mask_warmup_iters`` is set."""
    lr: float = 5e-5
    min_lr: float = 5e-6
    warmup_iters: int = 0
    decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-5
    clip_grad: float = 1.0
    mask_lr_mult = _Library(SparsifyConfig)
    # the logits' own linear warm-up, from 0 (-1: warmup_iters, the schedule the weights follow); both decay
    # as decay_style to the end of the run
    mask_warmup_iters: int = -1


@_section
class MaskSection:
    """The mask sampler (``masks.MaskConfig``: nm, temperature, logit_scale, hard, init_std, prior_strength,
    regularizer) and what is masked and trains (``megatron.configs.SparsifyConfig``: include, exclude,
    train_weights): their fields, types and defaults are the library's (``_Library``);
    ``TrainConfig.mask_config`` / ``sparsify_config`` build and validate them."""
    nm = _Library(MaskConfig)
    temperature = _Library(MaskConfig)
    logit_scale = _Library(MaskConfig)
    # the temperature, logit scale and regulariser anneal over this fraction of run.train_iters, then hold their
    # end values (1: over the whole run, the paper's)
    anneal_fraction: float = 1.0
    hard = _Library(MaskConfig)
    init_std = _Library(MaskConfig)
    prior_strength = _Library(MaskConfig)
    regularizer = _Library(MaskConfig)
    include = _Library(SparsifyConfig)
    exclude = _Library(SparsifyConfig)
    train_weights = _Library(SparsifyConfig)
    # refit: fix the mask to the prior's (prior.method=checkpoint: a mask-learning run's) and train the masked
    # layers' kept weights end to end instead of the logits (with distill.kd_weight > 0: from the dense model)
    refit: bool = False
    fused_kernel: bool = True


@_section
class PriorSection:
    """Where the logits' prior comes from: a one-shot method (``megatron.configs.PriorConfig``: method,
    update_weights, blocksize, percdamp, the library's fields; ``TrainConfig.prior_config`` builds it),
    ``none`` or ``checkpoint`` (``method`` is one of PRIOR_SOURCES)."""
    method = _Library(PriorConfig)
    checkpoint: str = ""  # with method=checkpoint: take the hard masks of an earlier run as the prior
    calib_samples: int = 128
    # SparseGPT's OBS update of the kept weights; with method=checkpoint, that checkpoint's masked weights. A
    # teacher (distillation while weights train) stays the original model
    update_weights = _Library(PriorConfig)
    blocksize = _Library(PriorConfig)
    percdamp = _Library(PriorConfig)


@dataclass
class DistillSection:
    """Distillation from the dense model: the same frozen weights with masking off are the teacher, run
    without autograd on each micro-batch. The loss is ``kd_weight * T^2 * KL(teacher_T || student_T) +
    (1 - kd_weight) * LM``; ``kd_weight`` 0 is the paper's recipe (no teacher pass)."""
    kd_weight: float = 0.0
    temperature: float = 1.0


@dataclass
class RunSection:
    out_dir: str = "runs/maskllm"
    train_iters: int = 2000  # 0: a prior-only run (one-shot masks saved as iteration 0)
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    save_interval: int = 200
    keep_last: int = 2  # scheduled checkpoints kept; a newer preemption or final save is kept on top
    tensorboard: bool = True
    wandb_project: str = ""
    allow_changed_inputs: bool = False  # resume although the base checkpoint or a dataset was re-made since


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    mask: MaskSection = field(default_factory=MaskSection)
    prior: PriorSection = field(default_factory=PriorSection)
    distill: DistillSection = field(default_factory=DistillSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self, world_size: Optional[int] = None) -> "TrainConfig":
        d, p = self.data, self.parallel
        if not self.model.checkpoint:
            raise ConfigError("model.checkpoint is empty: point it at a folder written by maskllm-convert hf-to-mcore")
        if not d.train:
            raise ConfigError("data.train is empty: give an indexed dataset prefix (maskllm-preprocess output)")
        for name in ("tp", "pp", "ep"):
            if getattr(p, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1")
        if p.bucket_size < 0:
            raise ConfigError(f"parallel.bucket_size {p.bucket_size} must be >= 0 (0: megatron's default)")
        if not p.timeout_minutes > 0:
            raise ConfigError(f"parallel.timeout_minutes {p.timeout_minutes} must be > 0 (default 30)")
        self._validate_memory_options()
        self._validate_ranges()
        if world_size is not None:
            if world_size % (p.tp * p.pp * p.ep):
                raise ConfigError(f"world size {world_size} is not a multiple of tp*pp*ep={p.tp * p.pp * p.ep}: "
                                  "change --nproc-per-node or parallel.tp/pp/ep")
            dp = world_size // (p.tp * p.pp)
            if d.global_batch_size % (d.micro_batch_size * dp):
                raise ConfigError(f"data.global_batch_size {d.global_batch_size} is not a multiple of "
                                  f"micro_batch_size {d.micro_batch_size} x data-parallel size {dp}: "
                                  f"make it {d.micro_batch_size * dp}, {2 * d.micro_batch_size * dp}, ...")
        if self.prior.method not in PRIOR_SOURCES:
            raise ConfigError(f"prior.method {self.prior.method!r}: use {', '.join(PRIOR_SOURCES)}")
        if self.prior.method in METHODS:
            self.prior_config()  # the one-shot method's own checks, as ConfigError
        elif self.prior.update_weights and self.prior.method != "checkpoint":
            raise ConfigError(f"prior.update_weights needs a one-shot prior (SparseGPT's OBS update) or a checkpoint "
                              f"(its masked weights), not prior.method={self.prior.method}")
        if self.prior.method in ("wanda", "sparsegpt") and self.prior.calib_samples < 1:
            raise ConfigError(f"prior.calib_samples {self.prior.calib_samples} must be >= 1: {self.prior.method} "
                              "needs calibration text (the recipe uses 128 samples)")
        if self.prior.method == "checkpoint" and not self.prior.checkpoint:
            raise ConfigError("prior.method=checkpoint needs prior.checkpoint (an earlier run's checkpoint folder)")
        if self.run.train_iters < 0 or self.run.log_interval < 1:
            raise ConfigError("run.train_iters must be >= 0 (0: compute the prior, save it and stop) and "
                              "run.log_interval >= 1")
        return self

    def _validate_memory_options(self) -> None:
        """Sequence parallelism and activation recomputation (parallel.*): what megatron would refuse
        with an assertion, or silently ignore, is one line here."""
        p = self.parallel
        if p.sequence_parallel and p.tp == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1 (it splits the sequence over the "
                              "tensor-parallel ranks): set it false at tp=1")
        if p.sequence_parallel and self.data.seq_length % p.tp:
            raise ConfigError(f"parallel.sequence_parallel splits data.seq_length {self.data.seq_length} over "
                              f"tp={p.tp} ranks: make it a multiple of {p.tp}")
        if p.recompute not in RECOMPUTE:
            raise ConfigError(f"parallel.recompute {p.recompute!r}: use none, full or selective")
        if p.recompute == "full":
            if p.recompute_method not in ("uniform", "block"):
                raise ConfigError(f"parallel.recompute_method {p.recompute_method!r}: use uniform (chunks of "
                                  "recompute_num_layers layers) or block (the first recompute_num_layers of a stage)")
            if p.recompute_num_layers < 1:
                raise ConfigError(f"parallel.recompute_num_layers {p.recompute_num_layers} must be >= 1")
        if p.recompute == "selective":
            modules = tuple(p.recompute_modules)
            unknown = sorted(set(modules) - set(SELECTIVE_MODULES))
            if not modules or unknown:
                raise ConfigError(f"parallel.recompute_modules {list(modules)}: the local spec recomputes "
                                  f"{' and '.join(SELECTIVE_MODULES)} (layernorm needs Transformer Engine's "
                                  "checkpoint; MoE and MLA modules are not built here)")

    def check_recompute_layers(self, num_layers: int) -> None:
        """parallel.recompute_num_layers against the model's ``num_layers`` (known once the checkpoint is read)."""
        p = self.parallel
        per_stage = num_layers // p.pp
        if p.recompute == "full" and (p.recompute_num_layers > per_stage or (
                p.recompute_method == "uniform" and per_stage % p.recompute_num_layers)):
            raise ConfigError(f"parallel.recompute_num_layers {p.recompute_num_layers}: a pipeline stage holds "
                              f"{per_stage} layers; recompute_method=uniform needs a divisor of {per_stage}, "
                              f"block at most {per_stage}")

    def recompute_overrides(self) -> dict:
        """megatron ``TransformerConfig`` fields of parallel.sequence_parallel and parallel.recompute."""
        p = self.parallel
        out = {"sequence_parallel": p.sequence_parallel}
        if p.recompute == "full":
            out.update(recompute_granularity="full", recompute_method=p.recompute_method,
                       recompute_num_layers=p.recompute_num_layers)
        elif p.recompute == "selective":
            out.update(recompute_granularity="selective", recompute_modules=list(p.recompute_modules))
        return out

    def _validate_ranges(self) -> None:
        """Values megatron or the mask sampler would only refuse (or silently misuse) after the ranks start."""
        d, o = self.data, self.optim
        if self.model.dtype == "fp16":
            raise ConfigError("model.dtype fp16: mask learning in fp16 needs loss scaling, which this driver does "
                              "not do (the recipe trains in bf16); use bf16, or fp32 where bf16 is slow")
        if self.model.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"model.dtype {self.model.dtype!r}: use auto (bf16 on GPU, fp32 on CPU), bf16 or fp32")
        for name in ("seq_length", "micro_batch_size", "global_batch_size"):
            if getattr(d, name) < 1:
                raise ConfigError(f"data.{name} {getattr(d, name)} must be >= 1")
        for name in ("lr", "adam_eps"):
            if not getattr(o, name) > 0:
                raise ConfigError(f"optim.{name} {getattr(o, name)} must be > 0")
        if not 0 <= o.min_lr <= o.lr:
            raise ConfigError(f"optim.min_lr {o.min_lr} must be in [0, optim.lr={o.lr}]: it is where lr decays to")
        for name in ("weight_decay", "clip_grad", "warmup_iters"):
            if getattr(o, name) < 0:
                raise ConfigError(f"optim.{name} {getattr(o, name)} must be >= 0 (0 turns it off)")
        if 0 < self.run.train_iters <= o.warmup_iters:
            raise ConfigError(f"optim.warmup_iters {o.warmup_iters} must be below run.train_iters "
                              f"{self.run.train_iters}: the lr has to decay after the warm-up")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(o, name) < 1:
                raise ConfigError(f"optim.{name} {getattr(o, name)} must be in [0, 1)")
        if o.decay_style not in DECAY_STYLES:
            raise ConfigError(f"optim.decay_style {o.decay_style!r}: use one of {', '.join(DECAY_STYLES)}")
        m = self.mask_config().nm.m  # the mask sampler's own checks, as ConfigError
        self.sparsify_config()
        if self.prior.blocksize % m:
            raise ConfigError(f"prior.blocksize {self.prior.blocksize} must be a positive multiple of M={m} "
                              "(SparseGPT's column blocks hold whole groups)")
        k = self.distill
        if not 0 <= k.kd_weight <= 1:
            raise ConfigError(f"distill.kd_weight {k.kd_weight} must be in [0, 1]: the loss is kd_weight x KL + "
                              "(1 - kd_weight) x LM (0: no distillation)")
        if not k.temperature > 0:
            raise ConfigError(f"distill.temperature {k.temperature} must be > 0 (1: the plain softmax)")
        if k.kd_weight > 0 and self.prior.update_weights and not self.distills_trained_weights():
            raise ConfigError("distill.kd_weight > 0 with prior.update_weights and frozen weights: the teacher (the "
                              "frozen weights unmasked) would be the updated model, not the dense one; set "
                              "mask.train_weights=true (the teacher is then a copy of the original weights) or "
                              "prior.update_weights=false")
        if self.mask.refit and self.mask.train_weights:
            raise ConfigError("mask.refit with mask.train_weights: refit trains the kept weights under a fixed mask, "
                              "joint training learns the mask with the weights; set one of them")
        if self.mask.refit and self.prior.method == "none":
            raise ConfigError("mask.refit keeps the prior's mask fixed, and prior.method is none: set prior.method="
                              "checkpoint and prior.checkpoint=<a mask-learning run's checkpoint> (or a one-shot method)")
        if not -1 <= self.optim.mask_warmup_iters < max(self.run.train_iters, 1):
            raise ConfigError(f"optim.mask_warmup_iters {self.optim.mask_warmup_iters} must be in [0, run.train_iters="
                              f"{self.run.train_iters}), or -1 (the logits warm up as optim.warmup_iters says)")
        if self.prior.method != "none" and self.mask.prior_strength > 0 and self.mask.init_std == 0 \
                and not self.mask.refit:
            raise ConfigError("mask.init_std 0 with a prior: the prior shifts the logits by (overlap - 1) x "
                              "std(initial logits) x mask.prior_strength, which is 0 when they all start at 0; "
                              "set mask.init_std > 0 (the recipe's 0.01) or prior.method=none")

    def distills_trained_weights(self) -> bool:
        """Whether the run distils from the dense model while weights train (``mask.train_weights`` or
        ``mask.refit`` with ``distill.kd_weight`` > 0): the teacher is then a copy of the original weights."""
        return self.distill.kd_weight > 0 and (self.mask.train_weights or self.mask.refit)

    def train_samples(self) -> int:
        """Training samples the run's dataset is built for (its sample order depends on it): the whole
        run's, and at least the prior's calibration samples (a prior-only run still needs them)."""
        d = self.data
        return max(self.run.train_iters * d.global_batch_size, self.prior.calib_samples, d.global_batch_size)

    def mask_config(self) -> MaskConfig:
        """The mask sampler's configuration: schedules anneal over the run. A value it refuses is a
        ConfigError naming the ``mask.`` key."""
        from .masks.patterns import NMSpec

        m = self.mask
        try:
            nm = NMSpec.parse(m.nm)
        except ValueError as e:
            raise ConfigError(f"mask.nm: {e}") from None
        if not 0 < m.anneal_fraction <= 1:
            raise ConfigError(f"mask.anneal_fraction {m.anneal_fraction} must be in (0, 1]: the share of run.train_iters "
                              "the schedules anneal over (1: the whole run)")
        steps = max(1, round(self.run.train_iters * m.anneal_fraction))
        return self._library(MaskConfig, "mask", nm=nm, total_steps=steps, seed=self.run.seed)

    def sparsify_config(self) -> SparsifyConfig:
        """What ``sparsify`` masks and trains (``mask.include``/``exclude``/``train_weights``, and the
        logits' ``optim.mask_lr_mult``). A run checkpoint's saved config becomes one here too
        (``TrainConfig.from_dict(saved).sparsify_config()``)."""
        return self._library(SparsifyConfig, "mask", mask=self.mask_config())

    def prior_config(self) -> PriorConfig:
        """The one-shot prior's configuration (prior.method one of ``prune.methods.METHODS``)."""
        return self._library(PriorConfig, "prior")

    def _library(self, config_class: type, section: str, **derived):
        """``config_class`` (a library config) from the driver fields that are its own (``_Library``, in
        whichever section) and the values the driver ``derived``; its ValueError (which starts with the field
        it refuses) becomes a ConfigError naming the driver key (``section.field`` for a derived one)."""
        values, where = {}, {}
        for name in (f.name for f in dataclasses.fields(self)):
            held = getattr(self, name)
            for f in dataclasses.fields(held):
                if f.metadata.get("library") is config_class:
                    value = getattr(held, f.name)
                    values[f.name], where[f.name] = tuple(value) if isinstance(value, list) else value, name
        try:
            return config_class(**{**values, **derived})
        except ValueError as e:
            raise ConfigError(f"{where.get(str(e).split()[0], section)}.{e}") from None

    def resume_conflict(self, saved: dict, iteration: int) -> Optional[str]:
        """Why this config cannot resume a run saved at ``iteration`` with config ``saved`` (None if it can).

        A resume continues one run: what shapes its trajectory (schedules over ``train_iters``, the
        optimizer and its state layout, the data and its order, mask sampling) must stay as saved. The
        parallel layout (sequence parallelism and recomputation included: neither changes the math), the
        micro-batch size, the cadence of logging, evaluation and saving, and the mask kernel may change. A prior-only checkpoint (iteration 0) has learned nothing: only what made
        its logits (the prior, the mask layout) must match, and the schedules start afresh.
        """
        keys = RESUME_KEEPS_PRIOR if iteration == 0 else RESUME_KEEPS
        now = self.to_dict()
        defaults = TrainConfig().to_dict()  # what a run saved before a setting existed ran with
        changed = []
        for key in keys:
            section, name = key.split(".")
            if name == "*":
                names = sorted(set(now[section]) | set(saved.get(section, {})))
            else:
                names = [name]
            for n in names:
                old = _plain(saved.get(section, {}).get(n, defaults.get(section, {}).get(n)))
                new = _plain(now[section].get(n))
                if old != new:
                    changed.append(f"{section}.{n} {old!r} -> {new!r}")
        if not changed:
            return None
        more = f" (and {', '.join(c.split(' ')[0] for c in changed[1:])})" if len(changed) > 1 else ""
        return (f"{Path(self.run.out_dir)} holds iteration {iteration} of a run this config differs from: "
                f"{changed[0]}{more}. A resume continues that run: restore the value, or learn in a new "
                f"run.out_dir (prior.method=checkpoint with prior.checkpoint=<its checkpoint> starts from its masks)")

    # -- parsing ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        return _build(cls, raw or {}, "")

    @classmethod
    def load(cls, path: Optional[str] = None, overrides: tuple = ()) -> "TrainConfig":
        """YAML file (optional) plus ``section.key=value`` overrides (values parsed as YAML)."""
        raw = {}
        if path:
            p = Path(path)
            if not p.exists():
                raise ConfigError(f"config file {path} does not exist")
            try:
                raw = _yaml(p.read_text(), f"config file {path}") or {}
            except UnicodeDecodeError:
                raise ConfigError(f"config file {path} is not text: pass a YAML file") from None
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
            key, value = item.split("=", 1)
            node = raw
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {item!r}: {part} is not a section")
            # a text field takes the text as written (a path, an N:M); any other as YAML (numbers, lists, booleans)
            node[parts[-1]] = value if _field_type(cls, parts) is str else _yaml(value, f"override {item!r}")
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RECOMPUTE = ("none", "full", "selective")
#: megatron's selective recompute modules that the local spec has (a dense GPT: no MoE, no MLA)
SELECTIVE_MODULES = ("core_attn", "mlp")

#: Keys a resume must keep (``section.*``: the whole section); see ``TrainConfig.resume_conflict``.
RESUME_KEEPS = ("run.train_iters", "run.seed", "data.train", "data.split", "data.seq_length",
                "data.global_batch_size", "optim.*", "mask.nm", "mask.temperature", "mask.logit_scale",
                "mask.anneal_fraction", "mask.hard",
                "mask.init_std", "mask.prior_strength", "mask.regularizer", "mask.include", "mask.exclude",
                "mask.train_weights", "mask.refit", "parallel.distributed_optimizer", "distill.*")
#: ... and those that a prior-only checkpoint's logits were made with.
RESUME_KEEPS_PRIOR = ("run.seed", "mask.nm", "mask.init_std", "mask.prior_strength", "mask.include", "mask.exclude",
                      "prior.*")


def _field_type(cls, parts: list[str]):
    """The declared type of the config field at ``section.key`` (None for an unknown key: from_dict names it)."""
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def _plain(value):
    """Tuples as lists, so a value read back from a checkpoint compares equal to the same config."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where or 'config'}: valid keys are {sorted(names)}")
    kwargs = {}
    for key, value in raw.items():
        hint = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _coerce(hint, value, path)
    return cls(**kwargs)


def _coerce(hint, value: Any, path: str):
    origin = typing.get_origin(hint) or hint
    try:
        if origin is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if origin in (int, float, str):
            if origin is int and isinstance(value, float) and not value.is_integer():
                raise TypeError
            if value is None:  # YAML null / ~ : str(None) would be the path "None"
                raise TypeError
            return origin(value)
        if origin in (tuple, list):
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            args = typing.get_args(hint)
            if args and args[-1] is Ellipsis:  # tuple[str, ...]: any length, one type
                args = (args[0],) * len(items)
            elif args and len(args) != len(items):  # tuple[float, float]: (start, end) of a schedule
                raise ConfigError(f"{path}: {value!r} must be a list of {len(args)} values"
                                  + (" [start, end] (annealed over the run)" if args == (float, float) else ""))
            # YAML reads 1e-5 (no dot) as a string; typed items are converted as scalars are
            return origin(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, items))) if args \
                else origin(items)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: {value!r} is not a valid {getattr(origin, '__name__', origin)}") from None
    return value
