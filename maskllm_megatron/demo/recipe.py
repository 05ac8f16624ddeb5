"""The demo's recipes: mask learning (``LearnRecipe``), the weight refit (``WeightRefit``) and export-time
reconstruction (``Reconstruction``), and the driver config they become (``train_config``)."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from ..export.reconstruct import ReconstructRequest
from ..launch import exit_user_error
from ..megatron.configs import ReconstructConfig
from ..run_config import ConfigError, TrainConfig

SEQ = 512  # tokens per sequence in every demo stage
DP = 2  # mask learning runs torchrun with this many data-parallel processes
_DRIVER = TrainConfig()  # the driver's defaults (the paper's recipe), which the demo's recipes keep unless they say


def _driver_default(key: str):
    """The driver's default of ``section.name``."""
    section, name = key.split(".")
    return getattr(getattr(_DRIVER, section), name)


MASK_LR_MULT = _driver_default("optim.mask_lr_mult")  # the logits' lr over the driver's base optim.lr


def native_bf16() -> bool:
    """Whether this machine multiplies bf16 natively: a GPU, or a CPU with AVX512-BF16 or AMX. There a bf16
    model learns masks faster than fp32 (2.3x the matmul speed on SmolLM2's shapes, AVX-512 VM) at the same
    held-out perplexity (benchmarks/RESULTS.md); elsewhere bf16 is emulated, slower than fp32."""
    import torch

    return torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _recipe_field(driver: str, help: str = "", default=MISSING, item: int | None = None, derived: bool = False):
    """A recipe field that sets the driver key ``driver`` (``item``: that end of a [start, end] schedule, the
    other end the driver's), its default the driver's unless the demo's ``default`` is given, and its flag's
    help text. A ``derived`` field's driver value is computed from it (its class's ``driver_sections``);
    the others are set as they are (``_direct_sections``)."""
    if default is MISSING:
        default = _driver_default(driver)
        default = default if item is None else default[item]
    return field(default=default, metadata={"driver": driver, "item": item, "derived": derived, "help": help})


def _direct_sections(recipe) -> dict:
    """The driver config sections that ``recipe``'s fields set as they are (not the ``derived`` ones)."""
    sections: dict = {}
    for f in fields(recipe):
        if f.metadata["derived"]:
            continue
        section, name = f.metadata["driver"].split(".")
        values, value = sections.setdefault(section, {}), getattr(recipe, f.name)
        if f.metadata["item"] is None:
            values[name] = value
        else:
            values.setdefault(name, list(_driver_default(f.metadata["driver"])))[f.metadata["item"]] = value
    return sections


@dataclass(frozen=True)
class LearnRecipe:
    """Mask-learning settings for a short CPU budget (the paper's recipe is for ~2B tokens).

    With a few dozen iterations, what limits learning is the number of optimizer steps, not tokens: one
    512-token sequence per data-parallel rank per iteration, and a logits learning rate high enough for
    logits to cross the prior's margin within the run. From the SparseGPT prior, 40 iterations at prior
    strength 4 (which keeps the prior's patterns at the start; 3, the paper's, lets the initial noise flip
    ~5% of the groups off them; 5 froze the masks): logits lr 2e-4 -> 96.4, 5e-4 -> 78.8, 1e-3 -> 65.7,
    2e-3 diverged. On an AVX-512 machine 1e-3 without warm-up left the stable range within 5 iterations;
    a 5-iteration linear warm-up makes it stable on both machine types. Annealing the temperature and scale
    over the first 70% of the run, then learning on nearly hard masks, gave 64.60 against 66.04 at 38
    iterations (-2.2%, Shakespeare -1.2%). benchmarks/RESULTS.md has the runs.
    """

    global_batch: int = _recipe_field("data.global_batch_size", "sequences per iteration, split over the {dp} "
                                      "data-parallel ranks", default=2)
    seq_length: int = _recipe_field("data.seq_length", "tokens per training sequence (held-out perplexity keeps "
                                    "{seq}-token windows)", default=SEQ)
    lr: float = _recipe_field("optim.lr", "the mask logits' learning rate (the driver's optim.lr x mask_lr_mult), "
                              "cosine to lr/10", default=1e-3, derived=True)
    prior_strength: float = _recipe_field("mask.prior_strength", "how far the prior's pattern starts ahead, in logit "
                                          "standard deviations", default=4.0)
    adam_eps: float = _recipe_field("optim.adam_eps", "Adam's epsilon")
    adam_beta2: float = _recipe_field("optim.adam_beta2", "Adam's beta2")
    clip_grad: float = _recipe_field("optim.clip_grad", "global gradient-norm clipping threshold, 0 turns clipping off")
    regularizer: float = _recipe_field("mask.regularizer", "sparse-weight regulariser coefficient at the start "
                                       "(decays to 0, the paper's)", item=0)
    warmup_iters: int = _recipe_field("optim.warmup_iters", "iterations of linear lr warm-up from 0 before the "
                                      "cosine decay", default=5)
    kd_weight: float = _recipe_field("distill.kd_weight", "weight of the distillation term (KL to the dense model) in "
                                     "the loss, the LM loss taking the rest; 0: the LM loss alone")
    kd_temperature: float = _recipe_field("distill.temperature", "softmax temperature of the distillation term")
    temperature_start: float = _recipe_field("mask.temperature", "Gumbel-softmax temperature at the start", item=0)
    temperature_end: float = _recipe_field("mask.temperature", "Gumbel-softmax temperature at the anneal's end", item=1)
    scale_start: float = _recipe_field("mask.logit_scale", "logit scale at the start", item=0)
    scale_end: float = _recipe_field("mask.logit_scale", "logit scale at the anneal's end", item=1)
    anneal_fraction: float = _recipe_field("mask.anneal_fraction", "share of the run the temperature, scale and "
                                           "regulariser anneal over, then held (1: the whole run)", default=0.7)
    train_weights: bool = _recipe_field("mask.train_weights", "train the masked weights, their biases and the norms "
                                        "with the masks (joint training; with --kd-weight distilled from a copy of "
                                        "the original model)")
    weight_lr: float = _recipe_field("optim.lr", "the trained weights' learning rate, cosine to a tenth (0: lr / "
                                     "{mult:g}); the logits keep --lr", default=0.0, derived=True)
    dtype: str = _recipe_field("model.dtype", "the model's dtype while learning: bf16, fp32, or auto: bf16 where this "
                               "machine multiplies bf16 natively (a GPU, a CPU with AVX512-BF16 or AMX), else fp32",
                               default="auto", derived=True)
    update_weights: bool = _recipe_field("prior.update_weights", "start from the prior's OBS-updated weights "
                                         "(SparseGPT's update; with --train-weights --kd-weight the teacher stays "
                                         "the original model)")

    def __post_init__(self):
        """Refuse what the driver would refuse, before any stage runs: the driver's own validation of the
        config ``learn_stage`` writes. Messages start with the recipe field (``recipe_from_args`` reads it)."""
        if not self.lr > 0:  # the driver sees lr / MASK_LR_MULT: say it in the recipe's own terms
            raise ValueError(f"lr {self.lr} must be positive")
        if self.weight_lr < 0:
            raise ValueError(f"weight_lr {self.weight_lr} must be >= 0 (0: lr / {MASK_LR_MULT:g})")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype {self.dtype!r}: use auto (bf16 where bf16 is native here), bf16 or fp32")
        self.check_run(None)

    def check_run(self, iterations: int | None) -> None:
        """The driver's validation of the config ``learn_stage`` writes for a run of ``iterations``
        (None: the recipe alone; the warm-up is then checked against the run's length later)."""
        sections = self.driver_sections()
        if iterations is not None:
            sections["run"] = {"train_iters": iterations}
        cfg = train_config(Path("checkpoint"), Path("data"), Path("run"), **sections)
        try:
            TrainConfig.from_dict(cfg).validate(world_size=DP)
        except ConfigError as e:
            key = str(e).split()[0].rstrip(":")
            name = next((f.name for f in fields(self) if f.metadata["driver"] == key), None)
            if name is None:  # a setting the recipe does not own: the demo's own config is wrong
                raise
            raise ValueError(f"{name} {getattr(self, name)}: the driver refuses it: {e}") from None

    def driver_sections(self) -> dict:
        """The driver config sections (``maskllm_megatron.run_config``) this recipe sets."""
        sections = _direct_sections(self)
        base_lr = self.weight_lr or self.lr / MASK_LR_MULT  # the driver's optim.lr: the weights'
        sections["optim"].update(lr=base_lr, min_lr=base_lr / 10)
        if self.weight_lr:
            sections["optim"]["mask_lr_mult"] = self.lr / self.weight_lr
        sections["data"]["micro_batch_size"] = max(1, self.global_batch // DP)
        sections["model"] = {"dtype": self.model_dtype}
        return sections

    @property
    def model_dtype(self) -> str:
        """``dtype`` with auto resolved on this machine (``native_bf16``)."""
        return self.dtype if self.dtype != "auto" else ("bf16" if native_bf16() else "fp32")

    def changed(self) -> dict:
        """The fields that differ from the demo's recipe."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch * self.seq_length


def add_recipe_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per ``LearnRecipe`` field (``--global-batch``, ``--lr``, ...), defaulting to the demo's;
    ``recipe_from_args`` reads them back. The demo and the quality benchmarks share this spelling."""
    for f in fields(LearnRecipe):
        if f.name in skip:
            continue
        text = f.metadata["help"].format(seq=SEQ, dp=DP, mult=MASK_LR_MULT)
        if isinstance(f.default, bool):
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=f.default, help=text)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                                help=text + f" (default {f.default:g})" if not isinstance(f.default, str)
                                else text + f" (default {f.default})")


def recipe_from_args(args: argparse.Namespace) -> LearnRecipe:
    """The recipe ``add_recipe_arguments``' flags describe (a skipped field keeps its default); a value
    the recipe refuses ends the command with a one-line error that names the flag (a user's error)."""
    try:
        return LearnRecipe(**{f.name: getattr(args, f.name) for f in fields(LearnRecipe) if hasattr(args, f.name)})
    except ValueError as e:
        name = str(e).split()[0]
        exit_user_error(f"error: --{name.replace('_', '-')}: {e}")


@dataclass(frozen=True)
class WeightRefit:
    """The kept weights refit end to end under a run's learned masks (``mask.refit``): Adam to ``lr``
    (after ``warmup_iters`` of linear warm-up; cosine to lr / 10, no weight decay) on ``kd_weight`` x the
    KL to the dense model (at ``temperature``) + the rest x the LM loss, ``iters`` iterations of DP x ``batch``
    x ``seq_length`` tokens of the run's own training data (``batch`` sequences a rank, accumulated one at a
    time)."""

    iters: int = _recipe_field("run.train_iters", default=20)
    lr: float = _recipe_field("optim.lr", default=2e-4, derived=True)
    kd_weight: float = _recipe_field("distill.kd_weight", default=1.0)
    temperature: float = _recipe_field("distill.temperature")
    batch: int = _recipe_field("data.global_batch_size", default=1, derived=True)
    warmup_iters: int = _recipe_field("optim.warmup_iters")
    seq_length: int = _recipe_field("data.seq_length", default=SEQ)

    def driver_sections(self) -> dict:
        """The driver config sections (``maskllm_megatron.run_config``) this refit sets."""
        sections = _direct_sections(self)
        sections["optim"].update(lr=self.lr, min_lr=self.lr / 10, weight_decay=0.0)
        sections["data"].update(micro_batch_size=1, global_batch_size=DP * self.batch)
        sections["mask"] = {"refit": True}
        return sections


_SOLVER = ReconstructConfig()  # the export's reconstruction defaults, which the demo keeps unless it says


@dataclass(frozen=True)
class Reconstruction:
    """A reconstruction of the learned masks' kept weights (``maskllm-export --reconstruct``) on calibration
    samples of the run's own training data (the prior's); the demo's method and target, the export's
    defaults otherwise."""

    method: str = "block"
    target: str = "dense"
    samples: int = ReconstructRequest.samples
    true_sequential: bool = _SOLVER.true_sequential
    epochs: int = _SOLVER.epochs  # method block
    lr: float = _SOLVER.lr  # method block

    @property
    def name(self) -> str:
        extra = f"-e{self.epochs}-lr{self.lr:g}" if self.method == "block" else ""
        return (f"{self.method}-{self.target}{'-ts' if self.true_sequential else ''}{extra}-{self.samples}")

    def flags(self) -> list[str]:
        """The ``maskllm-export`` flags of this reconstruction (every value spelled out: they key its stage)."""
        flags = ["--reconstruct", "--recon-method", self.method, "--recon-target", self.target,
                 "--calib-samples", str(self.samples)]
        if self.true_sequential:
            flags.append("--true-sequential")
        if self.method == "block":
            flags += ["--recon-epochs", str(self.epochs), "--recon-lr", f"{self.lr:g}"]
        return flags


#: the demo's mask-learning wall-clock budget (minutes), planned into iterations by a timed probe. At the
#: demo's ~12 minutes of learning, mask learning alone for all of it beat the 6 minutes of masks + a 20-iteration
#: refit (55.49 against 61.91, benchmarks/RESULTS.md "equal wall-clock"): the demo spends the refit's minutes here
DEMO_LEARN_MINUTES = 9.5
#: iterations of the demo's refit after mask learning (0: none; ``--refit-iters``)
DEMO_REFIT_ITERS = 0

RECONSTRUCTIONS = {"none": None, "obs": Reconstruction("obs", "layer"), "lstsq": Reconstruction("lstsq", "layer"),
                   "block": Reconstruction()}
DEMO_RECONSTRUCTION = "none"


def train_config(ckpt: Path, data_prefix: Path, out: Path, **sections) -> dict:
    """The demo's driver config: the driver's defaults (the paper's recipe) but for a CPU-sized run."""
    cfg = {
        "model": {"checkpoint": str(ckpt), "dtype": "fp32"},
        "data": {"train": [str(data_prefix)], "split": "98,2,0", "seq_length": SEQ, "micro_batch_size": 2,
                 "global_batch_size": 4, "cache_dir": str(out / "index_cache")},
        "prior": {"calib_samples": 32},
        "run": {"out_dir": str(out), "train_iters": 0, "log_interval": 5, "eval_interval": 0, "save_interval": 0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_yaml(cfg: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path
