"""``make demo``: the whole MaskLLM pipeline on a real model on this CPU, end to end.

    python -m maskllm_megatron.demo [--minutes 12] [--out demo_out]

Stages (each cached by the content of its inputs and settings under ``<cache>/demo``; a re-run reuses
finished stages, and a failed stage says how to resume):
  1. the real SmolLM2-135M model (Llama architecture) and the real Wikipedia excerpt, by package name;
  2. HF -> megatron-core conversion (TP=1: SmolLM2's 9 heads / 3 KV groups do not split over 2 ranks);
  3. preprocessing: the training articles into an indexed dataset; whole held-out articles kept apart;
  4. one-shot 2:4 priors: magnitude, Wanda, SparseGPT (mask only), calibrated on training articles;
  5. MaskLLM mask learning, torchrun with 2 processes (data parallel), frozen weights, from the best
     prior, for a time budget (--minutes, turned into iterations at a planning speed);
  6. export of the learned 2:4 model to a Hugging Face folder, verified; then the kept weights refit under
     the learned masks (``mask.refit``, distilled from the dense model; --refit-iters, 0: none), exported;
  7. held-out perplexity of dense, each prior, MaskLLM and MaskLLM + refit: a Markdown table, a PNG bar
     chart and the training curves.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import assets
from .cache import cache_dir, file_digest
from .launch import die_with_parent, free_port, usable_cpus
from .train.config import ConfigError, OptimSection, TrainConfig, checkpoint_name

SEQ = 512
PRIORS = ("magnitude", "wanda", "sparsegpt")
MASK_LR_MULT = OptimSection.mask_lr_mult  # the logits' lr over the driver's base optim.lr (its default)
DP = 2  # mask learning runs torchrun with this many data-parallel processes
# Part of every learning stage's cache key: a cached run made by a driver that computed something else for
# the same settings (the value names the change) is not reused.
LEARN_STAGE_FORMAT = "lr-applied"


def _recipe_field(default, driver: str | None, help: str):
    """A ``LearnRecipe`` field: its default, the driver config key it sets (for error messages) and its
    flag's help text."""
    return field(default=default, metadata={"driver": driver, "help": help})


@dataclass(frozen=True)
class LearnRecipe:
    """Mask-learning settings for a short CPU budget (the paper's recipe is for ~2B tokens).

    With a few dozen iterations, what limits learning is the number of optimizer steps, not tokens: one
    512-token sequence per data-parallel rank per iteration, and a logits learning rate high enough for
    logits to cross the prior's margin within the run. From the SparseGPT prior, 40 iterations at prior
    strength 4 (which keeps the prior's patterns at the start; 3, the paper's, lets the initial noise flip
    ~5% of the groups off them; 5 froze the masks): logits lr 2e-4 -> 96.4, 5e-4 -> 78.8, 1e-3 -> 65.7,
    2e-3 diverged. On an AVX-512 machine 1e-3 without warm-up left the stable range within 5 iterations;
    a 5-iteration linear warm-up makes it stable on both machine types. benchmarks/RESULTS.md has the runs.
    """

    global_batch: int = _recipe_field(2, "data.global_batch_size",
                                      "sequences of {seq} tokens per iteration, split over the {dp} data-parallel ranks")
    lr: float = _recipe_field(1e-3, "optim.lr", "the mask logits' learning rate (the driver's optim.lr x "
                              "mask_lr_mult), cosine to lr/10")
    prior_strength: float = _recipe_field(4.0, "mask.prior_strength",
                                          "how far the prior's pattern starts ahead, in logit standard deviations")
    adam_eps: float = _recipe_field(1e-5, "optim.adam_eps", "Adam's epsilon")  # the driver's default
    adam_beta2: float = _recipe_field(0.95, "optim.adam_beta2", "Adam's beta2")
    clip_grad: float = _recipe_field(1.0, "optim.clip_grad", "global gradient-norm clipping threshold, 0 turns "
                                     "clipping off")
    regularizer: float = _recipe_field(1e-5, "mask.regularizer", "sparse-weight regulariser coefficient at the "
                                       "start (decays to 0, the paper's)")
    warmup_iters: int = _recipe_field(5, "optim.warmup_iters", "iterations of linear lr warm-up from 0 before the "
                                      "cosine decay")
    kd_weight: float = _recipe_field(0.0, "distill.kd_weight", "weight of the distillation term (KL to the dense "
                                     "model) in the loss, the LM loss taking the rest; 0: the LM loss alone")
    kd_temperature: float = _recipe_field(1.0, "distill.temperature", "softmax temperature of the distillation term")
    # measured here at DP=2; only the demo uses it
    tokens_per_second: float = _recipe_field(55.0, None, "expected mask-learning speed, to turn a time budget "
                                             "into iterations")

    def __post_init__(self):
        """Refuse what the driver would refuse, before any stage runs: the driver's own validation of the
        config ``learn_stage`` writes. Messages start with the recipe field (``recipe_from_args`` reads it)."""
        if not self.tokens_per_second > 0:
            raise ValueError(f"tokens_per_second {self.tokens_per_second} must be positive")
        if not self.lr > 0:  # the driver sees lr / MASK_LR_MULT: say it in the recipe's own terms
            raise ValueError(f"lr {self.lr} must be positive")
        self.check_run(None)

    def check_run(self, iterations: int | None) -> None:
        """The driver's validation of the config ``learn_stage`` writes for a run of ``iterations``
        (None: the recipe alone; the warm-up is then checked against the run's length later)."""
        sections = self.driver_sections()
        if iterations is not None:
            sections["run"] = {"train_iters": iterations}
        cfg = _train_config(Path("checkpoint"), Path("data"), Path("run"), **sections)
        try:
            TrainConfig.from_dict(cfg).validate(world_size=DP)
        except ConfigError as e:
            key = str(e).split()[0].rstrip(":")
            name = next((f.name for f in fields(self) if f.metadata["driver"] == key), None)
            if name is None:  # a setting the recipe does not own: the demo's own config is wrong
                raise
            raise ValueError(f"{name} {getattr(self, name)}: the driver refuses it: {e}") from None

    def driver_sections(self) -> dict:
        """The driver config sections (``maskllm_megatron.train.config``) this recipe sets."""
        return {"data": {"micro_batch_size": max(1, self.global_batch // DP), "global_batch_size": self.global_batch},
                "optim": {"lr": self.lr / MASK_LR_MULT, "min_lr": self.lr / MASK_LR_MULT / 10,
                          "adam_eps": self.adam_eps, "adam_beta2": self.adam_beta2, "clip_grad": self.clip_grad,
                          "warmup_iters": self.warmup_iters},
                "mask": {"prior_strength": self.prior_strength, "regularizer": [self.regularizer, 0.0]},
                "distill": {"kd_weight": self.kd_weight, "temperature": self.kd_temperature}}

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch * SEQ

    def iterations(self, minutes: float) -> int:
        return max(10, int(minutes * 60 * self.tokens_per_second / self.tokens_per_iteration))


def add_recipe_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per ``LearnRecipe`` field (``--global-batch``, ``--lr``, ...), defaulting to the demo's;
    ``recipe_from_args`` reads them back. The demo and the quality benchmarks share this spelling."""
    for f in fields(LearnRecipe):
        if f.name not in skip:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                                help=f.metadata["help"].format(seq=SEQ, dp=DP) + f" (default {f.default:g})")


def recipe_from_args(args: argparse.Namespace) -> LearnRecipe:
    """The recipe ``add_recipe_arguments``' flags describe (a skipped field keeps its default); a value
    the recipe refuses exits with a one-line error that names the flag."""
    try:
        return LearnRecipe(**{f.name: getattr(args, f.name) for f in fields(LearnRecipe) if hasattr(args, f.name)})
    except ValueError as e:
        name = str(e).split()[0]
        raise SystemExit(f"error: --{name.replace('_', '-')}: {e}") from None


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Stages:
    """Runs stages once: ``<root>/<name>-<key>/`` exists only when the stage finished."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()

    def run(self, number: int, name: str, key: str, fn, resumable: bool = False) -> Path:
        """``fn(work)`` fills ``<name>-<key>.partial/``, renamed when it returns. A ``resumable`` stage keeps
        an interrupted work folder (a training run resumes from its last checkpoint there); any other
        stage starts again from an empty one."""
        done = self.root / f"{name}-{key}"
        stamp = f"[demo {time.time() - self.t0:6.0f}s] {number}. {name}"
        if done.exists():
            print(f"{stamp}: cached ({done})", flush=True)
            return done
        work = self.root / f"{name}-{key}.partial"
        if resumable and work.exists():
            print(f"{stamp}: resuming in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
            print(f"{stamp} ...", flush=True)
        work.mkdir(parents=True, exist_ok=True)
        try:
            fn(work)
        except (Interrupted, KeyboardInterrupt):
            raise SystemExit(f"demo stage {number} ({name}) interrupted; run the same command (`{rerun_command()}`) "
                             f"again: {_resume_hint(work, resumable)}") from None
        except Exception as e:
            raise SystemExit(f"demo stage {number} ({name}) failed: {e}\n  its work folder is {work}; fix the cause "
                             f"and run the same command (`{rerun_command()}`) again: "
                             f"{_resume_hint(work, resumable)}") from e
        os.replace(work, done)
        print(f"[demo {time.time() - self.t0:6.0f}s] {number}. {name}: done", flush=True)
        return done


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped a stage; its processes have exited (a training run after saving)."""


def rerun_command() -> str:
    """The command that started this process, as the user can type it again (same flags: the stages'
    keys depend on them)."""
    args = sys.argv[1:]
    if Path(sys.argv[0]).resolve() == Path(__file__).resolve():
        return "make demo" if not args else shlex.join(["python", "-m", "maskllm_megatron.demo", *args])
    return shlex.join(["python", sys.argv[0], *args])


def _resume_hint(work: Path, resumable: bool) -> str:
    """What the next run of the same command does with this stage's work folder."""
    if not resumable:
        return "finished stages are reused and this one starts again"
    latest = work / "checkpoints" / "latest"
    if latest.is_file():
        return f"finished stages are reused and this one resumes from its checkpoint {latest.read_text().strip()}"
    return "finished stages are reused; this one saved no checkpoint yet, so it starts again"


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts each rank in a session of its own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _run(cmd: list, log: Path, nproc: int = 0, append: bool = False) -> str:
    """Run a command (under torchrun with ``nproc`` processes if set), teeing output to ``log``
    (appended to it with ``append``).

    The command runs in its own session, so Ctrl-C reaches the demo alone; the demo then stops it with
    one SIGTERM, which torchrun passes to the ranks and the driver answers by saving a checkpoint and
    exiting (torchrun waits up to 10 minutes for that, not its default 30 s), and raises ``Interrupted``
    once it has exited. A second Ctrl-C kills it at once."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port())] + cmd
    else:
        cmd = [sys.executable] + cmd
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, usable_cpus() // max(1, nproc))),
               TORCH_ELASTIC_SHUTDOWN_TIMEOUT="600")
    interrupted = False
    with open(log, "a" if append else "w", buffering=1) as f:  # line-buffered: the log can be followed
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True, preexec_fn=die_with_parent)
        lines = []

        def follow():
            for line in proc.stdout:
                f.write(line)
                lines.append(line)
                if line.startswith(("iter", "[maskllm]", "RESULT", "wrote", "verified", "error", "sparsity")):
                    print("    " + line.rstrip(), flush=True)

        try:
            follow()
        except KeyboardInterrupt:
            interrupted = True
            print("[demo] interrupted: stopping the stage (a training run saves a checkpoint first; "
                  "Ctrl-C again to kill it now) ...", flush=True)
            proc.send_signal(signal.SIGTERM)
            try:
                follow()
            except KeyboardInterrupt:
                _kill_tree(proc.pid)
        proc.wait()
    what = next((str(c) for c in cmd if str(c).startswith("maskllm_megatron.")), " ".join(map(str, cmd[:6])))
    if interrupted:
        raise Interrupted(f"{what} stopped (log: {log})")
    if proc.returncode:
        tail = "".join(l for l in lines[-15:] if "Warning" not in l and "warnings.warn" not in l)
        raise RuntimeError(f"{what} exited {proc.returncode} (log: {log}):\n{tail}")
    return "".join(lines)


def _train_config(ckpt: Path, data_prefix: Path, out: Path, **sections) -> dict:
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


def _write_yaml(cfg: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def heldout_ppl(args: list, log: Path, text: tuple = ("--corpus", "wikipedia-heldout")) -> float:
    """Held-out perplexity (SEQ-token windows with BOS, first 8,192 tokens) of a model given by ``args``."""
    out = _run(["-m", "maskllm_megatron.eval.perplexity", *args, *text, "--seq-len",
                str(SEQ), "--bos", "--max-tokens", "8192", "--json"], log)
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    return float(json.loads(line[len("RESULT "):])["ppl"])


def _bar_chart(table: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, values = zip(*table)
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, values, color=["#777777", "#d62728", "#ff7f0e", "#bcbd22", "#2ca02c", "#1f77b4"][: len(names)])
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M, 2:4 sparsity, held-out Wikipedia")
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def folder_digest(folder: Path) -> str:
    """BLAKE2b of every file in ``folder`` (names and bytes): what a stage made from it depends on."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return _key([(str(path.relative_to(folder)), file_digest(path)) for path in files])


def convert_stage(stages: Stages, hf: Path) -> Path:
    """HF -> megatron-core checkpoint (TP=1, fp32), keyed by the HF folder's content (a model made again
    from another package version, or by another transformers, is converted again)."""
    return stages.run(2, "convert", _key(str(hf), folder_digest(hf), "tp1", "fp32"), lambda w: _run(
        ["-m", "maskllm_megatron.convert.cli", "hf-to-mcore", "--hf", str(hf), "--out", str(w / "ckpt"), "--tp", "1",
         "--dtype", "fp32"], w / "convert.log")) / "ckpt"


def data_stage(stages: Stages, name: str, docs: list[str], tokenizer: Path) -> Path:
    """Documents -> indexed dataset prefix (cached by the documents' content)."""
    def preprocess(w: Path):
        with open(w / "train.jsonl", "w") as f:
            for text in docs:
                f.write(json.dumps({"text": text}) + "\n")
        _run(["-m", "maskllm_megatron.data.preprocess", "--input", str(w / "train.jsonl"), "--tokenizer",
              str(tokenizer), "--output-prefix", str(w / name), "--workers", "2"], w / "preprocess.log")

    return stages.run(3, f"data-{name}", _key(name, hashlib.sha256("\x00".join(docs).encode()).hexdigest()),
                      preprocess) / name


def prior_stage(stages: Stages, ckpt: Path, prefix: Path, method: str, update_weights: bool = False,
                calib_samples: int = 32) -> Path:
    """A prior-only run: the one-shot masks (and SparseGPT's updated weights) saved as iteration 0."""
    name = f"prior-{method}{'-update' if update_weights else ''}"

    def prior(w: Path):
        cfg = _train_config(ckpt, prefix, w, prior={"method": method, "calib_samples": calib_samples,
                                                    "update_weights": update_weights})
        _run(["-m", "maskllm_megatron.train", "--config", str(_write_yaml(cfg, w / "prior.yaml"))],
             w / "prior.log", nproc=1)

    run = stages.run(4, name, _key(str(ckpt), str(prefix), method, update_weights, calib_samples), prior)
    return run / "checkpoints" / checkpoint_name(0)


def learn_stage(stages: Stages, ckpt: Path, prefix: Path, prior_ckpt: Path, iters: int, recipe: LearnRecipe,
                name: str = "maskllm", checkpoints: int = 1, evals: int = 4) -> Path:
    """MaskLLM mask learning (2 data-parallel processes) from ``prior_ckpt``'s masks; keeps
    ``checkpoints`` evenly spaced checkpoints and the final one (3 GB each) and runs ``evals`` hard-mask
    validations."""
    def learn(w: Path):
        every = max(5, iters // checkpoints)  # the driver also keeps the final checkpoint
        cfg = _train_config(ckpt, prefix, w, prior={"method": "checkpoint", "checkpoint": str(prior_ckpt)},
                            **recipe.driver_sections(),
                            run={"train_iters": iters, "log_interval": 5, "eval_interval": max(5, iters // evals),
                                 "eval_iters": 1, "save_interval": every, "keep_last": checkpoints, "out_dir": str(w)})
        wall, t0 = w / "learn_wall_s", time.time()  # summed over the attempts a resumed run is made of
        if not (w / "checkpoints" / "latest").exists():
            wall.unlink(missing_ok=True)  # nothing to resume: this attempt starts the run again
        try:
            _run(["-m", "maskllm_megatron.train", "--config", str(_write_yaml(cfg, w / "maskllm.yaml"))],
                 w / "train.log", nproc=DP, append=True)
        finally:
            wall.write_text(str(learn_wall_s(w) + time.time() - t0))
        reached = final_checkpoint(w).name
        if reached != checkpoint_name(iters):  # stopped early (SIGTERM saves and exits cleanly): not finished
            raise RuntimeError(f"the run stopped at {reached} of {iters} iterations")

    # what shapes the run: not the planning speed (it only sets iters, keyed), nor, without distillation,
    # its temperature (no teacher runs)
    unused = {"tokens_per_second"} | ({"kd_weight", "kd_temperature"} if recipe.kd_weight == 0 else set())
    settings = {k: v for k, v in asdict(recipe).items() if k not in unused}
    return stages.run(5, name, _key(str(prior_ckpt), str(prefix), iters, checkpoints, evals, settings,
                                    LEARN_STAGE_FORMAT), learn,
                      resumable=True)


@dataclass(frozen=True)
class WeightRefit:
    """The kept weights refit end to end under a run's learned masks (``mask.refit``): Adam from ``lr``
    (cosine to lr / 10, no weight decay) on ``kd_weight`` x the KL to the dense model (temperature 1) +
    the rest x the LM loss, ``iters`` iterations of DP x SEQ tokens of the run's own training data."""

    iters: int = 20
    lr: float = 2e-4
    kd_weight: float = 1.0
    temperature: float = 1.0


def refit_stage(stages: Stages, ckpt: Path, refit: WeightRefit, checkpoints: int = 1) -> Path:
    """The refit run from ``ckpt``'s masks (2 data-parallel processes) with ``checkpoints`` evenly spaced
    checkpoints (the last one is the final); its folder holds ``refit_wall_s``."""
    from .checkpoint_files import read_extra

    config = read_extra(ckpt)["config"]
    base, prefix = Path(config["model"]["checkpoint"]), Path(config["data"]["train"][0])

    def run(w: Path):
        cfg = _train_config(base, prefix, w, prior={"method": "checkpoint", "checkpoint": str(ckpt)},
                            data={"micro_batch_size": 1, "global_batch_size": DP},
                            optim={"lr": refit.lr, "min_lr": refit.lr / 10, "weight_decay": 0.0},
                            mask={"refit": True}, distill={"kd_weight": refit.kd_weight,
                                                           "temperature": refit.temperature},
                            run={"train_iters": refit.iters, "log_interval": 5, "eval_interval": 0,
                                 "save_interval": max(1, refit.iters // checkpoints), "keep_last": checkpoints})
        t0 = time.time()
        _run(["-m", "maskllm_megatron.train", "--config", str(_write_yaml(cfg, w / "refit.yaml"))],
             w / "train.log", nproc=DP)
        (w / "refit_wall_s").write_text(str(time.time() - t0))

    content = hashlib.sha256(extra_path_bytes(ckpt)).hexdigest()
    return stages.run(6, "refit", _key(str(ckpt), content, asdict(refit), checkpoints), run)


def extra_path_bytes(ckpt: Path) -> bytes:
    """A run checkpoint's extra state (its losses and config): what keys a stage to that checkpoint's content."""
    from .checkpoint_files import extra_path

    return extra_path(ckpt).read_bytes()


def learn_wall_s(run: Path) -> float:
    """Wall time a ``learn_stage`` run took, over all its attempts (0 before the first one ends)."""
    wall = run / "learn_wall_s"
    return float(wall.read_text()) if wall.exists() else 0.0


def final_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def copy_run_records(run: Path, out: Path, curves: str = "training_curves.png",
                     title: str = "MaskLLM mask learning: SmolLM2-135M, 2:4") -> None:
    """A learning run's ``metrics.jsonl`` and ``maskllm.yaml``, and a PNG of its curves, into a results
    folder: the folder then holds what its figures came from (the run itself stays in the cache)."""
    for name in ("metrics.jsonl", "maskllm.yaml"):
        shutil.copy(run / name, out / name)
    subprocess.run([sys.executable, "-m", "maskllm_megatron.train.plot", str(out / "metrics.jsonl"),
                    "--out", str(out / curves), "--title", title], check=False)  # no matplotlib: no PNG


@dataclass(frozen=True)
class Reconstruction:
    """A reconstruction of the learned masks' kept weights (``maskllm-export --reconstruct``) on calibration
    samples of the run's own training data (the prior's)."""

    method: str = "block"
    target: str = "dense"
    samples: int = 128
    true_sequential: bool = False
    epochs: int = 2  # method block
    lr: float = 1e-4  # method block

    @property
    def name(self) -> str:
        extra = f"-e{self.epochs}-lr{self.lr:g}" if self.method == "block" else ""
        return (f"{self.method}-{self.target}{'-ts' if self.true_sequential else ''}{extra}-{self.samples}")

    def flags(self) -> list[str]:
        flags = ["--reconstruct", "--recon-method", self.method, "--recon-target", self.target,
                 "--calib-samples", str(self.samples)]
        if self.true_sequential:
            flags.append("--true-sequential")
        if self.method == "block":
            flags += ["--recon-epochs", str(self.epochs), "--recon-lr", f"{self.lr:g}"]
        return flags


RECONSTRUCTIONS = {"none": None, "obs": Reconstruction("obs", "layer"), "lstsq": Reconstruction("lstsq", "layer"), "block": Reconstruction()}
DEMO_RECONSTRUCTION = "none"


def _export(stages: Stages, ckpt: Path, name: str, flags: list[str], *key) -> Path:
    """``maskllm-export --format hf`` of ``ckpt`` with ``flags`` as a stage whose folder holds ``hf/`` and
    ``seconds.json`` (the export's wall time). Keyed by the checkpoint's content too (its extra state: the
    run's losses): a learning stage run again at the same path, e.g. after its folder was deleted, must not
    reuse the export of the earlier run."""
    content = hashlib.sha256(extra_path_bytes(ckpt)).hexdigest()

    def export(w: Path):
        t0 = time.time()
        _run(["-m", "maskllm_megatron.export.cli", "--ckpt", str(ckpt), "--out", str(w / "hf"), "--format", "hf",
              *flags], w / f"{name}.log")
        (w / "seconds.json").write_text(json.dumps(time.time() - t0))

    return stages.run(6, name, _key(str(ckpt), content, *key), export)


def export_stage(stages: Stages, ckpt: Path) -> Path:
    """The learned 2:4 model as a verified Hugging Face folder."""
    return _export(stages, ckpt, "export", []) / "hf"


def reconstruct_stage(stages: Stages, ckpt: Path, recon: Reconstruction) -> tuple[Path, float]:
    """The learned masks with their kept weights refitted (``maskllm-export --reconstruct``) as a verified
    Hugging Face folder, and the seconds the export took (reconstruction included)."""
    folder = _export(stages, ckpt, f"reconstruct-{recon.name}", recon.flags(), recon.flags())
    return folder / "hf", float(json.loads((folder / "seconds.json").read_text()))


def main(argv=None) -> int:
    from .launch import quiet_known_warnings

    quiet_known_warnings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=12.0,
                   help="mask-learning budget in minutes, turned into iterations at --tokens-per-second (at least "
                        "10 iterations). Default 12: 38 iterations, which learn in 6-10 minutes on 2 CPU cores "
                        "(the planning speed is conservative), the whole demo in 18-26 with the refit; raise it "
                        "for a longer, better run")
    add_recipe_arguments(p)
    p.add_argument("--reconstruct", choices=list(RECONSTRUCTIONS), default=DEMO_RECONSTRUCTION,
                   help="also reconstruct the kept weights layer by layer at export (maskllm-export --reconstruct) and add "
                        "that row with its cost in seconds: block (each block fitted to the dense model's hidden "
                        "states), lstsq (each linear's exact least squares), obs (SparseGPT's sweep), or none "
                        f"(default {DEMO_RECONSTRUCTION}; benchmarks/RESULTS.md, Reconstruction and refit)")
    p.add_argument("--refit-iters", type=int, default=WeightRefit.iters,
                   help="then refit the kept weights under the learned masks end to end (mask.refit, distilled "
                        f"from the dense model) for this many iterations of {DP} x {SEQ} tokens and add that row "
                        f"(default {WeightRefit.iters}, 0: no refit)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="where the results go (default demo_out)")
    args = p.parse_args(argv)
    if not args.minutes > 0:
        raise SystemExit(f"error: --minutes {args.minutes:g} must be positive (e.g. 12)")
    if args.refit_iters < 0:
        raise SystemExit(f"error: --refit-iters {args.refit_iters} must be >= 0 (0: no refit)")
    recipe = recipe_from_args(args)  # every setting checked before any work
    iters = recipe.iterations(args.minutes)
    try:
        recipe.check_run(iters)  # e.g. a warm-up as long as the run
    except ValueError as e:
        raise SystemExit(f"error: --{str(e).split()[0].replace('_', '-')}: {e} (--minutes {args.minutes:g} gives "
                         f"{iters} iterations)") from None
    out = args.out.absolute()
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file: pass a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot create the folder ({e.strerror})") from None
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` and schedulers stop it as Ctrl-C does
    try:
        return _demo(recipe, iters, out, args.reconstruct, args.refit_iters)
    except KeyboardInterrupt:  # outside a stage (e.g. fetching the model)
        raise SystemExit(f"demo interrupted; run the same command (`{rerun_command()}`) again: finished stages "
                         "are reused") from None


def _demo(recipe: LearnRecipe, iters: int, out: Path, reconstruct: str = "none", refit_iters: int = 0) -> int:
    """The seven stages and the results (``main`` has checked the arguments)."""
    from .eval.perplexity import wikipedia_split

    stages = Stages(cache_dir() / "demo")

    # 1. real model and text
    hf = assets.smollm2_hf_dir()
    print(f"[demo] 1. model: SmolLM2-135M at {hf}", flush=True)

    ckpt = convert_stage(stages, hf)
    train_articles, heldout = wikipedia_split()
    prefix = data_stage(stages, "wiki_train", [text for _, text in train_articles], ckpt / "tokenizer")
    prior_ckpts = {method: prior_stage(stages, ckpt, prefix, method) for method in PRIORS}
    run = learn_stage(stages, ckpt, prefix, prior_ckpts["sparsegpt"], iters, recipe)
    exported = export_stage(stages, final_checkpoint(run))
    recon = RECONSTRUCTIONS[reconstruct]
    reconstructed = reconstruct_stage(stages, final_checkpoint(run), recon) if recon is not None else None
    refit = WeightRefit(iters=refit_iters)
    refit_run = refit_stage(stages, final_checkpoint(run), refit) if refit_iters else None
    refit_hf = export_stage(stages, final_checkpoint(refit_run)) if refit_run is not None else None

    # 7. held-out perplexity
    def evaluate(w: Path):
        rows = [("dense", heldout_ppl(["--hf", str(hf)], w / "dense.log"))]
        for method in PRIORS:
            rows.append((method, heldout_ppl(["--ckpt", str(prior_ckpts[method]), "--use-prior"], w / f"{method}.log")))
        rows.append(("MaskLLM", heldout_ppl(["--hf", str(exported)], w / "maskllm.log")))
        if reconstructed is not None:
            folder, seconds = reconstructed
            rows.append((f"MaskLLM + {reconstruct} reconstruction ({seconds:.0f} s)",
                         heldout_ppl(["--hf", str(folder)], w / f"reconstruct-{recon.name}.log")))
        if refit_hf is not None:
            seconds = float((refit_run / "refit_wall_s").read_text())
            rows.append((f"MaskLLM + refit, {refit.iters} iterations ({seconds:.0f} s)",
                         heldout_ppl(["--hf", str(refit_hf)], w / "refit.log")))
        (w / "table.json").write_text(json.dumps(rows))

    results = stages.run(7, "evaluate", _key(str(exported), [str(r) for r in prior_ckpts.values()], SEQ,
                                             *([str(reconstructed[0])] if reconstructed else []),
                                             *([str(refit_hf)] if refit_hf else [])), evaluate)
    rows = json.loads((results / "table.json").read_text())
    tokens = iters * recipe.tokens_per_iteration
    lines = ["| model | held-out PPL |", "|---|---|"] + [f"| {n} | {v:.2f} |" for n, v in rows]
    md = (f"# MaskLLM demo: SmolLM2-135M, 2:4, held-out Wikipedia\n\n"
          f"Held-out articles never seen in training or calibration; {SEQ}-token windows with BOS, 8,192 tokens.\n"
          f"MaskLLM: {iters} iterations x {recipe.global_batch} x {SEQ} tokens = {tokens:,} tokens from the "
          f"SparseGPT prior (strength {recipe.prior_strength:g}, logits lr {recipe.lr:g}, warmed up over {recipe.warmup_iters} iterations).\n\n"
          + "\n".join(lines) + "\n")
    ppl = dict((n, v) for n, v in rows)
    md += (f"\nMaskLLM vs the SparseGPT prior it started from: perplexity "
           f"{100 * (ppl['MaskLLM'] / ppl['sparsegpt'] - 1):+.1f}%.\n")
    if refit_hf is not None:
        md += (f"MaskLLM + refit: the learned masks kept exactly, the kept weights trained {refit.iters} iterations x "
               f"{DP} x {SEQ} tokens by distillation from the dense model (mask.refit, lr {refit.lr:g}).\n")
    for stale in ("perplexity.png", "training_curves.png"):  # an earlier run's figures must not pass for these
        (out / stale).unlink(missing_ok=True)
    tmp = out / ".results.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, out / "results.md")
    written = [out / "results.md"]
    try:
        _bar_chart([(n, v) for n, v in rows], out / "perplexity.png")
    except ImportError:
        print("[demo] matplotlib is not installed: no PNG figures (pip install matplotlib)", flush=True)
    copy_run_records(run, out)
    written += [out / name for name in ("perplexity.png", "training_curves.png") if (out / name).exists()]
    print("\n" + md)
    print(f"[demo] wrote {', '.join(map(str, written))}; exported 2:4 model: {exported}; "
          f"{(time.time() - stages.t0) / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
