"""The demo's stages, each a cached run of one of the package's commands: conversion, preprocessing, one-shot
priors, mask learning, the weight refit, export (with reconstruction) and held-out perplexity. The
benchmarks in ``benchmarks/`` build on these."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..cache import file_digest
from ..run_folder import CHECKPOINTS_DIR, checkpoint_name, resolve_run_checkpoint, saved_checkpoints, tell
from .recipe import DP, SEQ, LearnRecipe, Reconstruction, WeightRefit, train_config, write_yaml
from .stages import Stages, run_logged, stage_key

PRIORS = ("magnitude", "wanda", "sparsegpt")
# Part of every learning stage's cache key: a cached run made by a driver that computed something else for
# the same settings (the value names the change) is not reused.
LEARN_STAGE_FORMAT = "lr-applied"


def heldout_ppl(args: list, log: Path, text: tuple = ("--corpus", "wikipedia-heldout")) -> float:
    """Held-out perplexity (SEQ-token windows with BOS, first 8,192 tokens) of a model given by ``args``."""
    out = run_logged(["-m", "maskllm_megatron.eval.perplexity", *args, *text, "--seq-len",
                str(SEQ), "--bos", "--max-tokens", "8192", "--json"], log)
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    return float(json.loads(line[len("RESULT "):])["ppl"])


def folder_digest(folder: Path) -> str:
    """BLAKE2b of every file in ``folder`` (names and bytes): what a stage made from it depends on."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return stage_key([(str(path.relative_to(folder)), file_digest(path)) for path in files])


def convert_stage(stages: Stages, hf: Path) -> Path:
    """HF -> megatron-core checkpoint (TP=1, fp32), keyed by the HF folder's content (a model made again
    from another package version, or by another transformers, is converted again)."""
    return stages.run(2, "convert", stage_key(str(hf), folder_digest(hf), "tp1", "fp32"), lambda w: run_logged(
        ["-m", "maskllm_megatron.convert.cli", "hf-to-mcore", "--hf", str(hf), "--out", str(w / "ckpt"), "--tp", "1",
         "--dtype", "fp32"], w / "convert.log")) / "ckpt"


def data_stage(stages: Stages, name: str, docs: list[str], tokenizer: Path) -> Path:
    """Documents -> indexed dataset prefix (cached by the documents' content)."""
    def preprocess(w: Path):
        with open(w / "train.jsonl", "w") as f:
            for text in docs:
                f.write(json.dumps({"text": text}) + "\n")
        run_logged(["-m", "maskllm_megatron.data.preprocess", "--input", str(w / "train.jsonl"), "--tokenizer",
              str(tokenizer), "--output-prefix", str(w / name), "--workers", "2"], w / "preprocess.log")

    return stages.run(3, f"data-{name}", stage_key(name, hashlib.sha256("\x00".join(docs).encode()).hexdigest()),
                      preprocess) / name


def prior_stage(stages: Stages, ckpt: Path, prefix: Path, method: str, update_weights: bool = False,
                calib_samples: int = 32) -> Path:
    """A prior-only run: the one-shot masks (and SparseGPT's updated weights) saved as iteration 0."""
    name = f"prior-{method}{'-update' if update_weights else ''}"

    def prior(w: Path):
        cfg = train_config(ckpt, prefix, w, prior={"method": method, "calib_samples": calib_samples,
                                                    "update_weights": update_weights})
        run_logged(["-m", "maskllm_megatron.train", "--config", str(write_yaml(cfg, w / "prior.yaml"))],
             w / "prior.log", nproc=1)

    run = stages.run(4, name, stage_key(str(ckpt), str(prefix), method, update_weights, calib_samples), prior)
    return run / CHECKPOINTS_DIR / checkpoint_name(0)


def _learn_config(w: Path, ckpt: Path, prefix: Path, prior_ckpt: Path, iters: int, recipe: LearnRecipe,
                  checkpoints: int, evals: int) -> Path:
    """The driver config of a learning run in ``w`` (written there): ``recipe`` from ``prior_ckpt``'s masks
    (and its weights, with the recipe's ``update_weights``)."""
    every = max(5, iters // checkpoints)  # the driver also keeps the final checkpoint
    sections = recipe.driver_sections()
    prior = {"method": "checkpoint", "checkpoint": str(prior_ckpt), **sections.pop("prior", {})}
    cfg = train_config(ckpt, prefix, w, prior=prior, **sections,
                       run={"train_iters": iters, "log_interval": 5, "eval_interval": max(5, iters // evals),
                            "eval_iters": 1, "save_interval": every, "keep_last": checkpoints, "out_dir": str(w)})
    return write_yaml(cfg, w / "maskllm.yaml")


#: recipe fields added after learning stages were first cached, with the value every run had before: a
#: stage's key holds them only at another value, so a run made before they existed keeps its cached stage
_KEYED_UNLESS = {"temperature_start": 4.0, "temperature_end": 0.05, "scale_start": 1e2, "scale_end": 5e2,
                 "anneal_fraction": 1.0, "train_weights": False, "weight_lr": 0.0, "update_weights": False,
                 "seq_length": SEQ, "dtype": "fp32"}


def _recipe_settings(recipe: LearnRecipe) -> dict:
    """What shapes a learning run of ``recipe`` (its cache key): without distillation not the KD temperature
    (no teacher runs); the model's dtype as it resolves here."""
    unused = {"kd_weight", "kd_temperature"} if recipe.kd_weight == 0 else set()
    settings = asdict(recipe) | {"dtype": recipe.model_dtype}  # auto as it resolves on this machine
    unused |= {k for k, before in _KEYED_UNLESS.items() if settings[k] == before}
    return {k: v for k, v in settings.items() if k not in unused}


#: iterations of the timed probe that plans a learning run's length (``probe_stage``)
PROBE_ITERS = 6


#: hard-mask evaluations of a learning stage during the run (``learn_stage``'s ``evals``); one more at iteration 0
LEARN_EVALS = 4


@dataclass(frozen=True)
class SpeedPlan:
    """A wall-clock budget turned into iterations by a timed probe of the learning run on this machine.
    ``step_s``: one iteration's time (the probe's median after its first); ``eval_s``: one hard-mask
    evaluation's; ``fixed_s``: what a run costs besides its iterations and evaluations (start-up, the mask
    transfer, the final save), the probe's wall time less those."""

    step_s: float
    fixed_s: float
    eval_s: float = 0.0
    iters: int = PROBE_ITERS
    probe: str = ""  # the probe's cached stage folder (``forget_if_missed``)

    def iterations(self, minutes: float, evaluations: int = LEARN_EVALS + 1) -> int:
        """The iterations that fill ``minutes`` of a learning stage's wall time (at least 10)."""
        return max(10, int((minutes * 60 - self.fixed_s - evaluations * self.eval_s) / self.step_s))

    def minutes(self, iterations: int, evaluations: int = LEARN_EVALS + 1) -> float:
        return (self.fixed_s + evaluations * self.eval_s + iterations * self.step_s) / 60

    def forget_if_missed(self, iterations: int, took_s: float) -> str:
        """When a learning stage of ``iterations`` took more than ``PLAN_TOLERANCE`` away from this plan (the
        machine's load changed since the probe), delete the cached probe so that the next run probes again,
        and say so; else "" (the cache is per machine, not per load)."""
        planned = self.minutes(iterations) * 60
        if not took_s or abs(took_s / planned - 1) <= PLAN_TOLERANCE or not self.probe:
            return ""
        shutil.rmtree(self.probe, ignore_errors=True)
        return (f"mask learning took {took_s / 60:.1f} minutes against the {planned / 60:.1f} planned: this "
                "machine's speed changed since its probe, so the next demo probes again")


#: how far a learning stage may miss its planned wall time before its probe is measured again
PLAN_TOLERANCE = 0.15


def probe_stage(stages: Stages, ckpt: Path, prefix: Path, prior_ckpt: Path, recipe: LearnRecipe) -> SpeedPlan:
    """Run the learning stage's config for ``PROBE_ITERS`` iterations (same processes, batch, prior, one
    evaluation and the final save) and time it: the ``SpeedPlan`` of this machine. Cached per machine (its
    host name and CPUs are in the key), so the same command on the same machine plans the same run; the
    probe's checkpoint is deleted."""
    import os
    import platform

    iters = max(PROBE_ITERS, recipe.warmup_iters + 1)  # a run longer than its warm-up, as the driver requires

    def probe(w: Path):
        config = _learn_config(w, ckpt, prefix, prior_ckpt, iters, recipe, checkpoints=1, evals=1)
        t0 = time.time()
        run_logged(["-m", "maskllm_megatron.train", "--config", str(config), "run.log_interval=1"],
                   w / "train.log", nproc=DP)
        wall = time.time() - t0
        shutil.rmtree(w / "checkpoints", ignore_errors=True)
        (w / "probe.json").write_text(json.dumps(asdict(plan_from_probe(w / "metrics.jsonl", wall, recipe, iters))))

    machine = (platform.node(), platform.machine(), os.cpu_count(), platform.processor())
    done = stages.run(5, "probe", stage_key(str(prior_ckpt), str(prefix), _recipe_settings(recipe), iters,
                                            machine, LEARN_STAGE_FORMAT), probe)
    return replace(SpeedPlan(**json.loads((done / "probe.json").read_text())), probe=str(done))


def plan_from_probe(metrics: Path, wall_s: float, recipe: LearnRecipe, iters: int = PROBE_ITERS) -> SpeedPlan:
    """The plan of a probe of ``iters`` iterations that took ``wall_s`` and logged every iteration's speed
    (tokens per second of step time) to ``metrics``."""
    import statistics

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [recipe.tokens_per_iteration / r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    evals = [r["valid/seconds"] for r in records if "valid/seconds" in r]
    if len(steps) != iters:
        raise RuntimeError(f"the speed probe logged {len(steps)} of {iters} iterations ({metrics})")
    step_s = statistics.median(steps[1:])  # the first iteration also warms up
    eval_s = statistics.median(evals) if evals else 0.0
    return SpeedPlan(step_s=step_s, fixed_s=max(0.0, wall_s - sum(steps) - sum(evals)), eval_s=eval_s, iters=iters)


def learn_stage(stages: Stages, ckpt: Path, prefix: Path, prior_ckpt: Path, iters: int, recipe: LearnRecipe,
                name: str = "maskllm", checkpoints: int = 1, evals: int = LEARN_EVALS) -> Path:
    """MaskLLM mask learning (2 data-parallel processes) from ``prior_ckpt``'s masks; keeps
    ``checkpoints`` evenly spaced checkpoints and the final one (3 GB each) and runs ``evals`` hard-mask
    validations."""
    def learn(w: Path):
        config = _learn_config(w, ckpt, prefix, prior_ckpt, iters, recipe, checkpoints, evals)
        wall, t0 = w / "learn_wall_s", time.time()  # summed over the attempts a resumed run is made of
        if not saved_checkpoints(w / CHECKPOINTS_DIR):
            wall.unlink(missing_ok=True)  # nothing to resume: this attempt starts the run again
        try:
            run_logged(["-m", "maskllm_megatron.train", "--config", str(config)], w / "train.log", nproc=DP,
                       append=True)
        finally:
            wall.write_text(str(learn_wall_s(w) + time.time() - t0))
        reached = final_checkpoint(w).name
        if reached != checkpoint_name(iters):  # stopped early (SIGTERM saves and exits cleanly): not finished
            raise RuntimeError(f"the run stopped at {reached} of {iters} iterations")

    return stages.run(5, name, stage_key(str(prior_ckpt), str(prefix), iters, checkpoints, evals,
                                         _recipe_settings(recipe), LEARN_STAGE_FORMAT), learn, resumable=True)


def refit_stage(stages: Stages, ckpt: Path, refit: WeightRefit, checkpoints: int = 1) -> Path:
    """The refit run from ``ckpt``'s masks (2 data-parallel processes) with ``checkpoints`` evenly spaced
    checkpoints (the last one is the final); its folder holds ``refit_wall_s``."""
    from ..checkpoint_folders import read_extra

    config = read_extra(ckpt)["config"]
    base, prefix = Path(config["model"]["checkpoint"]), Path(config["data"]["train"][0])

    def run(w: Path):
        sections = refit.driver_sections()
        sections["run"].update(log_interval=5, eval_interval=0, save_interval=max(1, refit.iters // checkpoints),
                               keep_last=checkpoints)
        cfg = train_config(base, prefix, w, prior={"method": "checkpoint", "checkpoint": str(ckpt)}, **sections)
        t0 = time.time()
        run_logged(["-m", "maskllm_megatron.train", "--config", str(write_yaml(cfg, w / "refit.yaml"))],
             w / "train.log", nproc=DP)
        (w / "refit_wall_s").write_text(str(time.time() - t0))

    content = hashlib.sha256(extra_path_bytes(ckpt)).hexdigest()
    settings = {k: v for k, v in asdict(refit).items() if not (k == "seq_length" and v == SEQ)}  # keyed as before
    return stages.run(6, "refit", stage_key(str(ckpt), content, settings, checkpoints), run)


def extra_path_bytes(ckpt: Path) -> bytes:
    """A run checkpoint's extra state (its losses and config): what keys a stage to that checkpoint's content."""
    from ..checkpoint_folders import extra_path

    return extra_path(ckpt).read_bytes()


def learn_wall_s(run: Path) -> float:
    """Wall time a ``learn_stage`` run took, over all its attempts (0 before the first one ends)."""
    wall = run / "learn_wall_s"
    return float(wall.read_text()) if wall.exists() else 0.0


def final_checkpoint(run: Path) -> Path:
    """The checkpoint a finished run means (``run_folder``'s policy: the one the driver would resume from),
    as a path under ``run`` (the form the stages' cache keys hold)."""
    return run / CHECKPOINTS_DIR / resolve_run_checkpoint(run, say=tell).name


def copy_run_records(run: Path, out: Path, curves: str = "training_curves.png",
                     title: str = "MaskLLM mask learning: SmolLM2-135M, 2:4") -> None:
    """A learning run's ``metrics.jsonl`` and ``maskllm.yaml``, and a PNG of its curves, into a results
    folder: the folder then holds what its figures came from (the run itself stays in the cache)."""
    for name in ("metrics.jsonl", "maskllm.yaml"):
        shutil.copy(run / name, out / name)
    subprocess.run([sys.executable, "-m", "maskllm_megatron.train.plot", str(out / "metrics.jsonl"),
                    "--out", str(out / curves), "--title", title], check=False)  # no matplotlib: no PNG


def _export(stages: Stages, ckpt: Path, name: str, flags: list[str], *key) -> Path:
    """``maskllm-export --format hf`` of ``ckpt`` with ``flags`` as a stage whose folder holds ``hf/`` and
    ``seconds.json`` (the export's wall time). Keyed by the checkpoint's content too (its extra state: the
    run's losses): a learning stage run again at the same path, e.g. after its folder was deleted, must not
    reuse the export of the earlier run."""
    content = hashlib.sha256(extra_path_bytes(ckpt)).hexdigest()

    def export(w: Path):
        t0 = time.time()
        run_logged(["-m", "maskllm_megatron.export.cli", "--ckpt", str(ckpt), "--out", str(w / "hf"), "--format", "hf",
              *flags], w / f"{name}.log")
        (w / "seconds.json").write_text(json.dumps(time.time() - t0))

    return stages.run(6, name, stage_key(str(ckpt), content, *key), export)


def export_stage(stages: Stages, ckpt: Path, use_prior: bool = False) -> Path:
    """The learned 2:4 model (``use_prior``: a prior-only checkpoint's one-shot masks) as a verified Hugging
    Face folder."""
    prior = ["--use-prior"] if use_prior else []
    return _export(stages, ckpt, "export", prior, *prior) / "hf"  # key as before without use_prior: reused


def reconstruct_stage(stages: Stages, ckpt: Path, recon: Reconstruction, use_prior: bool = False) -> tuple[Path, float]:
    """The learned masks (``use_prior``: the prior's) with their kept weights refitted (``maskllm-export
    --reconstruct``) as a verified Hugging Face folder, and the seconds the export took (reconstruction
    included)."""
    flags = recon.flags() + (["--use-prior"] if use_prior else [])
    folder = _export(stages, ckpt, f"reconstruct-{recon.name}", flags, flags)
    return folder / "hf", float(json.loads((folder / "seconds.json").read_text()))
