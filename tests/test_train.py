"""The mask-learning driver, launched as users launch it (torchrun -m maskllm_megatron.train), on a tiny
LLaMA-shaped model pre-trained on real text: learning at TP=2 and DP=2, exact resume after kill -9,
resume at another TP size, SIGTERM, NaN stop, PP=2."""
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from maskllm_megatron.launch import free_port
from tests.torchrun_util import torchrun

ROOT = Path(__file__).resolve().parents[1]


def write_config(tiny: Path, name: str, **sections) -> Path:
    cfg = {
        "model": {"checkpoint": str(tiny / "ckpt")},
        "parallel": {"tp": 2},
        "data": {"train": [str(tiny / "data" / "botchan_text_document")], "split": "90,10,0", "seq_length": 64,
                 "micro_batch_size": 4, "global_batch_size": 8, "cache_dir": str(tiny / "cache")},
        "optim": {"lr": 2e-4, "min_lr": 2e-5},  # the logits get x10 (mask_lr_mult): 2e-3 -> 2e-4
        "mask": {"fused_kernel": False},
        "prior": {"method": "sparsegpt", "calib_samples": 16},
        "run": {"out_dir": str(tiny / name), "train_iters": 12, "log_interval": 2, "eval_interval": 12,
                "eval_iters": 4, "save_interval": 6},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tiny / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(config: Path, nproc: int, *overrides: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), "-m", "maskllm_megatron.train", "--config", str(config), *overrides]


def records(out_dir: Path) -> list:
    return [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines() if l]


def history(out_dir: Path) -> list:
    import torch

    latest = (out_dir / "checkpoints" / "latest").read_text().strip()
    from maskllm_megatron.checkpoint_folders import read_extra

    return read_extra(out_dir / "checkpoints" / latest)["history"]


def valid_losses(out_dir: Path) -> list:
    return [r["valid/loss"] for r in records(out_dir) if "valid/loss" in r]


@pytest.fixture(scope="module")
def straight(tiny):
    """TP=2, 12 iterations straight: the reference for the resume tests. Its out_dir holds the metrics
    of an earlier attempt that died before its first checkpoint: a fresh start drops them."""
    config = write_config(tiny, "straight")
    stale = tiny / "straight" / "metrics.jsonl"
    stale.parent.mkdir()
    stale.write_text('{"iteration": 0, "valid/loss": 1.0}\n{"iteration": 3, "lm_loss": 1.0}\n')
    torchrun("-m", "maskllm_megatron.train", "--config", config, nproc=2)
    return tiny / "straight"


def test_tp2_loss_falls_and_hard_mask_validation_ends_below_the_prior(straight):
    losses = [h[1] for h in history(straight)]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    start, end = valid_losses(straight)
    assert end < start
    rec = [r for r in records(straight) if "lm_loss" in r][-1]
    for key in ("lr", "temperature", "scale", "tokens_per_s", "peak_memory_gb", "mask/max_prob", "mask/flip_rate",
                "mask/flip_rate/linear_fc1", "regularizer", "grad_norm"):
        assert key in rec, key
    assert all(0 < r["grad_norm"] < float("inf") for r in records(straight) if "lm_loss" in r)
    # the logged lr is the logits' and follows the cosine from optim.lr x mask_lr_mult to min_lr x mask_lr_mult
    for r in records(straight):
        if "lr" in r:
            cosine = 2e-4 + (2e-3 - 2e-4) * 0.5 * (1 + math.cos(math.pi * r["iteration"] / 12))
            assert r["lr"] == pytest.approx(cosine, rel=1e-9), r
    assert (straight / "tensorboard").is_dir()


def test_kill_9_and_resume_is_exact(tiny, straight):
    config = write_config(tiny, "killed")
    out = tiny / "killed"
    proc = subprocess.Popen(train_cmd(config, 2), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and latest.read_text().strip() == "iter_0000006"):
        assert proc.poll() is None and time.time() < deadline, "training ended before the first checkpoint"
        time.sleep(0.2)
    # torchrun starts every rank in a session of its own: kill the agent and the ranks themselves
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(procs) >= 3  # the agent and its two ranks
    for p in procs:
        p.kill()
    psutil.wait_procs(procs)
    proc.wait()
    assert latest.read_text().strip() == "iter_0000006"  # the ranks died before their next checkpoint
    log = torchrun("-m", "maskllm_megatron.train", "--config", config, nproc=2)
    assert "at iteration 6" in log  # really resumed, from the checkpoint the killed run left
    assert history(out) == history(straight)  # iteration, loss and data fingerprint of every step
    assert valid_losses(out) == valid_losses(straight)  # the hard-mask validations too
    compare = subprocess.run([sys.executable, "tests/scripts/compare_checkpoints.py",
                              str(straight / "checkpoints" / "iter_0000012"), str(out / "checkpoints" / "iter_0000012")],
                             cwd=ROOT, capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_torchrun_restart_after_one_ranks_death_resumes_exactly(tiny, straight):
    """torchrun --max-restarts 1, one of the two ranks SIGKILLed after the iteration-6 checkpoint: torchrun
    restarts the group (each attempt's process groups under their own store prefix: without it the new
    ranks read the dead attempt's addresses and waited forever), the driver resumes from iteration 6 by
    itself, and the run ends as the uninterrupted one: history, validations, hard masks and all tensors."""
    config = write_config(tiny, "restarted")
    out = tiny / "restarted"
    cmd = train_cmd(config, 2)
    cmd[cmd.index("--nproc-per-node"):cmd.index("--nproc-per-node")] = ["--max-restarts", "1"]
    log = tiny / "restarted.log"  # not a pipe: the killed rank's multiprocessing helpers outlive it, holding it open
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    rank1 = None
    try:
        latest = out / "checkpoints" / "latest"
        deadline = time.time() + 600
        while not (latest.exists() and latest.read_text().strip() == "iter_0000006"):
            assert proc.poll() is None and time.time() < deadline, "training ended before the first checkpoint"
            time.sleep(0.2)
        rank1 = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                     if p.environ().get("RANK") == "1" and "maskllm_megatron.train" in " ".join(p.cmdline()))
        rank1.kill()
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for group in (proc.pid, rank1.pid if rank1 is not None else None):  # the killed rank's orphaned
            with contextlib.suppress(ProcessLookupError, TypeError):     # multiprocessing helpers, in its group
                os.killpg(group, signal.SIGKILL)
    output = log.read_text()
    assert proc.returncode == 0, output[-6000:]
    assert "resumed from" in output and "at iteration 6" in output, output[-6000:]
    assert history(out) == history(straight)
    assert valid_losses(out) == valid_losses(straight)
    compare = subprocess.run([sys.executable, "tests/scripts/compare_checkpoints.py",
                              str(straight / "checkpoints" / "iter_0000012"), str(out / "checkpoints" / "iter_0000012")],
                             cwd=ROOT, capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_resume_at_another_tp_size(tiny, straight):
    """The TP=2 run's iteration-6 checkpoint resumed at TP=1 continues the same run: the same data
    (fingerprints), the same noise, losses equal up to the TP reduction order. A resume that changes
    what shapes the run (here train_iters, which the schedules anneal over) is refused in one line."""
    out = tiny / "tp1_continue"
    shutil.copytree(straight, out)
    (out / "checkpoints" / "latest").write_text("iter_0000006")
    shutil.rmtree(out / "checkpoints" / "iter_0000012")
    longer = write_config(tiny, "tp1_continue", parallel={"tp": 1}, run={"train_iters": 14})
    r = subprocess.run(train_cmd(longer, 1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "holds iteration 6 of a run this config differs from: run.train_iters 12 -> 14. " \
        "A resume continues that run" in r.stderr, r.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "iter_0000006"
    config = write_config(tiny, "tp1_continue", parallel={"tp": 1}, run={"eval_interval": 0})
    log = torchrun("-m", "maskllm_megatron.train", "--config", config, nproc=1)
    assert "resumed from" in log and "iteration 6" in log
    h, ref = history(out), history(straight)
    assert h[:6] == ref[:6] and [x[0] for x in h] == list(range(1, 13))
    assert [x[2] for x in h] == [x[2] for x in ref]  # the data fingerprint does not depend on the layout
    assert [x[1] for x in h[6:]] == pytest.approx([x[1] for x in ref[6:]], rel=1e-5)


def test_training_in_the_folder_of_a_prior_only_run_starts_its_schedules_afresh(tiny):
    """run.train_iters=0 saves the one-shot prior as iteration 0; the same out_dir with train_iters > 0
    learns from it with the full schedule (the prior-only run's scheduler, made for 0 iterations, is not
    carried over: it had held the lr at its minimum)."""
    config = write_config(tiny, "prior_then_learn", parallel={"tp": 1}, run={"train_iters": 0})
    torchrun("-m", "maskllm_megatron.train", "--config", config, nproc=1)
    config = write_config(tiny, "prior_then_learn", parallel={"tp": 1}, run={"train_iters": 4, "eval_interval": 0})
    log = torchrun("-m", "maskllm_megatron.train", "--config", config, nproc=1)
    assert "at iteration 0" in log
    lrs = [r["lr"] for r in records(tiny / "prior_then_learn") if "lr" in r]
    cosine = [2e-4 + (2e-3 - 2e-4) * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in (2, 4)]
    assert lrs == pytest.approx(cosine, rel=1e-9)


def test_transfer_from_a_learned_run_starts_from_fresh_logits_with_its_hard_masks_as_prior(tiny, straight):
    """prior.method=checkpoint on a learned TP=2 run, at TP=1: prior = the source's argmax patterns and
    logits = fresh init + prior shift (checked in plain torch), not the source's logits loaded in place."""
    source = straight / "checkpoints" / "iter_0000012"
    config = write_config(tiny, "transfer", parallel={"tp": 1}, prior={"method": "checkpoint", "checkpoint": str(source)},
                          mask={"init_std": 0.01, "prior_strength": 3.0}, run={"train_iters": 0, "seed": 1234})
    log = torchrun("-m", "maskllm_megatron.train", "--config", config, nproc=1)
    assert "prior checkpoint" in log
    check = subprocess.run([sys.executable, "tests/scripts/transfer_reference.py", str(source),
                            str(tiny / "transfer" / "checkpoints" / "iter_0000000"), "1234", "0.01", "3.0"],
                           cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr[-3000:]


def test_dp2_learns_and_overlapping_the_grad_reduction_changes_nothing(tiny):
    """DP=2 with the distributed optimizer, two micro-batches per rank: it learns, and reducing the
    gradients bucket by bucket during the backward (overlap_grad_reduce) gives the same losses. DP=1 with
    the same global batch (four micro-batches) is the same run: same data, same Gumbel noise (keyed by
    the micro-batch's place in the global batch), and the logged loss is the whole batch's at both."""
    logs = {}
    for name, nproc, extra in (("dp2", 2, {}), ("dp2_overlap", 2, {"overlap_grad_reduce": True, "bucket_size": 20000}),
                               ("dp1", 1, {})):
        config = write_config(tiny, name, parallel={"tp": 1, "distributed_optimizer": True, **extra},
                              data={"global_batch_size": 16})
        logs[name] = torchrun("-m", "maskllm_megatron.train", "--config", config, nproc=nproc)
    dp1, dp2 = history(tiny / "dp1"), history(tiny / "dp2")
    assert [x[2] for x in dp1] == [x[2] for x in dp2]
    assert [x[1] for x in dp2] == pytest.approx([x[1] for x in dp1], rel=1e-6)
    assert valid_losses(tiny / "dp2") == pytest.approx(valid_losses(tiny / "dp1"), rel=1e-6)
    start, end = valid_losses(tiny / "dp2")
    assert end < start
    assert "common state dict differs" not in logs["dp2"]  # megatron's benign note on every DP=2 save (#39)
    buckets = re.search(r"gradient reduction overlaps the backward: (\d+) buckets", logs["dp2_overlap"])
    assert buckets and int(buckets.group(1)) > 1 and "overlaps" not in logs["dp2"]
    plain, overlapped = ([h[1] for h in history(tiny / n)] for n in ("dp2", "dp2_overlap"))
    assert len(plain) == 12 and overlapped == pytest.approx(plain, rel=1e-5)
    norms = [[r["grad_norm"] for r in records(tiny / n) if "lm_loss" in r] for n in ("dp2", "dp2_overlap")]
    assert len(norms[0]) == 6 and norms[1] == pytest.approx(norms[0], rel=1e-4)


@pytest.mark.parametrize("override, message", [
    ("model.checkpoint={tiny}/nope", "does not exist: pass a checkpoint written by maskllm-convert hf-to-mcore"),
    ("model.checkpoint={tiny}/data", "has no model_config.json: pass a checkpoint written by maskllm-convert"),
    ("data.train=[{tiny}/data/botchan_text_document.bin]", "give the prefix without .bin/.idx, i.e. "),
    ("data.seq_length=256", "data.seq_length 256 exceeds the model's maximum sequence length 128"),
])
def test_driver_input_errors_are_one_line_and_it_runs_without_torchrun(tiny, override, message):
    """Launched plainly (no torchrun environment) the driver runs as one process; a path that is not what
    it should be ends in one ``maskllm-train:`` line naming the fix, not a traceback."""
    config = write_config(tiny, "bad_input", parallel={"tp": 1})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    proc = subprocess.run([sys.executable, "-m", "maskllm_megatron.train", "--config", str(config),
                           override.format(tiny=tiny)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(env, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("maskllm-train: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def test_malformed_config_and_nm_overrides_through_the_command(tmp_path):
    """The real command: a YAML syntax error is one line naming the file and the line; an N:M override
    is read as text (YAML 1.1 would read 1:4 as the base-60 number 64), so its own check speaks."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  checkpoint: /ckpt\n data: [\n")
    cases = [(["--config", str(bad)], f"maskllm-train: config file {bad} is not valid YAML at line 3"),
             (["model.checkpoint=/ckpt", "data.train=[/d/x_text_document]", "optim.lr=[1,"],
              "maskllm-train: override 'optim.lr=[1,' is not valid YAML"),
             (["model.checkpoint=/ckpt", "data.train=[/d/x_text_document]", "mask.nm=2:5"],
              "maskllm-train: prior.blocksize 128 must be a positive multiple of M=5")]  # 2:5, not 125
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "maskllm_megatron.train", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(message), proc.stderr
    from maskllm_megatron.run_config import TrainConfig

    for nm, n_m in (("1:4", (1, 4)), ("4:8", (4, 8))):
        cfg = TrainConfig.load(None, ("model.checkpoint=/data:ckpt", "data.train=[/d/x_text_document]", f"mask.nm={nm}"))
        spec = cfg.validate().mask_config().nm
        assert (spec.n, spec.m) == n_m and cfg.model.checkpoint == "/data:ckpt"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_saves_and_exits_cleanly(tiny, sig):
    name = f"stop_{sig.name}"
    config = write_config(tiny, name, parallel={"tp": 1},
                          run={"train_iters": 10000, "save_interval": 0, "eval_interval": 0, "log_interval": 1})
    out = tiny / name
    # The training process itself receives SIGTERM (as from Slurm's --signal or a preempting scheduler);
    # torchrun's own agent would report the signal in its exit code whatever its workers do.
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.Popen([sys.executable, "-m", "maskllm_megatron.train", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and any("lm_loss" in r for r in records(out))):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert f"{sig.name}: saved at iteration" in output
    it = len(history(out))
    assert 1 <= it < 10000 and (out / "checkpoints" / f"iter_{it:07d}" / "metadata.json").exists()


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_validate(example):
    from maskllm_megatron.run_config import TrainConfig

    cfg = TrainConfig.load(str(example)).validate()
    assert cfg.mask.nm == "2:4" and cfg.model.checkpoint and cfg.data.train
    # the preprocessing command in the header writes the dataset the config reads
    for prefix in re.findall(r"maskllm-preprocess .*--output-prefix (\S+)", example.read_text()):
        assert prefix in cfg.data.train, (prefix, cfg.data.train)
    # a prior checkpoint is the one a prior-only run writes (iteration 0); a refit's is the final checkpoint of
    # the mask-learning example it names
    if cfg.prior.method == "checkpoint" and not cfg.mask.refit:
        assert cfg.prior.checkpoint.endswith("/checkpoints/iter_0000000")
    if cfg.mask.refit:
        learners = [TrainConfig.load(str(p)) for p in (ROOT / "examples").glob("*.yaml") if p != example]
        assert any(cfg.prior.checkpoint == f"{c.run.out_dir}/checkpoints/iter_{c.run.train_iters:07d}"
                   and c.model.checkpoint == cfg.model.checkpoint for c in learners), cfg.prior.checkpoint


def test_overrides_read_numbers_as_yaml_1_1_writes_them():
    """PyYAML reads 1e-5 (no dot) as a string: scalars and schedule items become numbers all the same."""
    from maskllm_megatron.run_config import TrainConfig

    cfg = TrainConfig.load(None, ("model.checkpoint=/ckpt", "data.train=[/data/x_text_document]", "optim.lr=1e-4",
                                  "mask.regularizer=[1e-5,0]", "mask.temperature=[4,5e-2]")).validate()
    assert (cfg.optim.lr, cfg.mask.regularizer, cfg.mask.temperature) == (1e-4, (1e-5, 0.0), (4.0, 0.05))
    assert all(isinstance(x, float) for x in cfg.mask.regularizer + cfg.mask.temperature)


@pytest.mark.parametrize("raw, message", [
    ({"parallel": {"tpp": 2}}, "unknown key(s) ['tpp'] in parallel"),
    ({"parallel": {"tp": "x"}}, "parallel.tp: 'x' is not a valid int"),
    ({"parallel": {"bucket_size": -1}}, "parallel.bucket_size -1 must be >= 0"),
    ({"parallel": {"ep": 0}}, "parallel.ep must be >= 1"),
    ({"prior": {"method": "obs"}}, "prior.method 'obs': use magnitude"),
    ({"data": {"cache_dir": None}}, "data.cache_dir: None is not a valid str"),
    ({"prior": {"method": "magnitude", "update_weights": True}}, "prior.update_weights is SparseGPT's OBS weight update"),
    ({"prior": {"calib_samples": 0}}, "prior.calib_samples 0 must be >= 1: sparsegpt needs calibration text"),
    ({"prior": {"blocksize": 130}}, "prior.blocksize 130 must be a positive multiple of M=4"),
    ({"prior": {"percdamp": -0.1}}, "prior.percdamp -0.1 must be >= 0"),
    ({"data": {"train": ["/data/x_text_document"], "micro_batch_size": 0}}, "data.micro_batch_size 0 must be >= 1"),
    ({"optim": {"lr": 0.0}}, "optim.lr 0.0 must be > 0"),
    ({"optim": {"min_lr": 1e-3}}, "optim.min_lr 0.001 must be in [0, optim.lr=5e-05]"),
    ({"optim": {"adam_beta1": 1.0}}, "optim.adam_beta1 1.0 must be in [0, 1)"),
    ({"optim": {"clip_grad": -1.0}}, "optim.clip_grad -1.0 must be >= 0"),
    ({"optim": {"decay_style": "WSD"}}, "optim.decay_style 'WSD': use one of cosine, linear"),
    ({"optim": {"warmup_iters": 10}, "run": {"train_iters": 10}}, "optim.warmup_iters 10 must be below run.train_iters 10"),
    ({"mask": {"nm": "4:2"}}, "mask.nm: invalid N:M 4:2"),
    ({"mask": {"temperature": [4.0, 0.0]}}, "mask.temperature (4.0, 0.0) must stay positive"),
    ({"mask": {"logit_scale": [-1.0, 5e2]}}, "mask.logit_scale (-1.0, 500.0) must stay positive"),
    ({"mask": {"regularizer": [-1e-5, 0.0]}}, "mask.regularizer (-1e-05, 0.0) must be >= 0"),
    ({"mask": {"prior_strength": -1.0}}, "mask.prior_strength -1.0 must be >= 0"),
    ({"mask": {"regularizer": [1e-5]}}, "mask.regularizer: [1e-05] must be a list of 2 values [start, end]"),
    ({"mask": {"temperature": ["hot", 0.05]}}, "mask.temperature[0]: 'hot' is not a valid float"),
    ({"mask": {"init_std": 0.0}}, "mask.init_std 0 with a prior: the prior shifts the logits by"),
    ({"model": {"checkpoint": "/ckpt", "dtype": "fp16"}}, "model.dtype fp16: mask learning in fp16 needs loss scaling"),
    ({"model": {"checkpoint": "/ckpt", "dtype": "float32"}}, "model.dtype 'float32': use auto"),
    ({"distill": {"kd_weight": 1.5}}, "distill.kd_weight 1.5 must be in [0, 1]"),
    ({"distill": {"temperature": 0.0}}, "distill.temperature 0.0 must be > 0"),
    ({"prior": {"method": "none", "update_weights": True}}, "prior.update_weights needs a one-shot prior"),
    ({"distill": {"kd_weight": 0.5}, "prior": {"update_weights": True}},
     "distill.kd_weight > 0 with prior.update_weights and frozen weights"),
    ({"optim": {"mask_warmup_iters": 12}, "run": {"train_iters": 12}}, "optim.mask_warmup_iters 12 must be in"),
    ({"mask": {"refit": True, "train_weights": True}}, "mask.refit with mask.train_weights"),
    ({"mask": {"refit": True}, "prior": {"method": "none"}}, "mask.refit keeps the prior's mask fixed, and prior.method"),
])
def test_bad_config_is_one_line_naming_the_field(raw, message):
    from maskllm_megatron.run_config import ConfigError, TrainConfig

    base = {"model": {"checkpoint": "/ckpt"}, "data": {"train": ["/data/x_text_document"]}}
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**base, **raw}).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_resume_conflicts_name_what_may_not_change():
    from maskllm_megatron.run_config import TrainConfig

    base = {"model": {"checkpoint": "/ckpt"}, "data": {"train": ["/data/x_text_document"]}}
    saved = TrainConfig.from_dict(base).validate().to_dict()

    def conflict(iteration, **sections):
        raw = {**base, **{k: {**base.get(k, {}), **v} for k, v in sections.items()}}
        return TrainConfig.from_dict(raw).validate().resume_conflict(saved, iteration)

    assert conflict(5) is None
    assert conflict(5, parallel={"tp": 2, "pp": 2}, data={"micro_batch_size": 2}, run={"log_interval": 1}) is None
    message = conflict(5, optim={"lr": 1e-3}, mask={"temperature": [2.0, 0.05]})
    assert "iteration 5 of a run this config differs from: optim.lr 5e-05 -> 0.001 (and mask.temperature)." in message
    assert "\n" not in message and "prior.method=checkpoint" in message
    assert "parallel.distributed_optimizer True -> False" in conflict(5, parallel={"distributed_optimizer": False})
    # a prior-only checkpoint: the schedules may change, what made its logits may not
    assert conflict(0, run={"train_iters": 50}, optim={"lr": 1e-3}) is None
    assert "prior.method 'sparsegpt' -> 'wanda'" in conflict(0, prior={"method": "wanda"})
    # distillation shapes the run; a checkpoint saved before the setting existed ran without it
    assert "distill.kd_weight 0.0 -> 0.5" in conflict(5, distill={"kd_weight": 0.5})
    old = {k: v for k, v in saved.items() if k != "distill"}
    assert TrainConfig.from_dict(base).validate().resume_conflict(old, 5) is None


def test_zero_init_noise_is_fine_without_a_prior():
    from maskllm_megatron.run_config import TrainConfig

    TrainConfig.from_dict({"model": {"checkpoint": "/ckpt"}, "data": {"train": ["/data/x_text_document"]},
                           "mask": {"init_std": 0.0}, "prior": {"method": "none"}}).validate()


def test_tokens_per_second_counts_only_the_steps_not_evaluation_or_saving():
    """The logged speed is tokens over the seconds spent inside training steps: what happens between
    steps (evaluation, checkpoints, logging) is left out, as megatron's interval timer does."""
    from maskllm_megatron.train.metrics import StepThroughput

    now = [0.0]
    speed = StepThroughput(clock=lambda: now[0])
    for _ in range(2):
        with speed.step():
            now[0] += 4.0  # a 4-second step
        now[0] += 30.0  # an evaluation and a checkpoint between steps
    assert speed.report(2 * 1024) == pytest.approx(2048 / 8.0)
    with pytest.raises(RuntimeError):
        with speed.step():
            now[0] += 2.0
            raise RuntimeError("a failed step still counts its time")
    assert speed.report(1024) == pytest.approx(512.0)  # a new interval: only the 2 s since the report


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny):
    # A learning rate that overflows the logits at the first update: iteration 1 is fine and saved,
    # iteration 2 produces a NaN loss.
    config = write_config(tiny, "nan", parallel={"tp": 1}, optim={"lr": 1e36, "min_lr": 1e36},  # logits: 1e37
                          run={"save_interval": 1, "eval_interval": 0})
    proc = subprocess.run(train_cmd(config, 1), cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert "LM loss is nan at iteration 2" in proc.stderr
    ckpts = tiny / "nan" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000001"
    assert not (ckpts / "iter_0000002").exists()


def test_pipeline_parallel_2_runs(tiny):
    config = write_config(tiny, "pp2", parallel={"tp": 1, "pp": 2}, prior={"method": "magnitude"},
                          run={"train_iters": 3, "eval_interval": 3, "save_interval": 3, "log_interval": 1})
    torchrun("-m", "maskllm_megatron.train", "--config", config, nproc=2)
    h = history(tiny / "pp2")
    assert len(h) == 3 and all(x[1] == x[1] for x in h)  # finite losses
    assert len(valid_losses(tiny / "pp2")) == 2


def test_setup_parallel_after_a_conversion_in_the_same_process():
    """A process that converted a checkpoint (``init_parallel``) and then builds the driver's layout (as
    ``benchmarks/bench_model_step.py`` does on first use) gets the driver's layout, not megatron's
    "data parallel group is already initialized"."""
    code = """
from maskllm_megatron.megatron.parallel import init_parallel
from maskllm_megatron.run_config import TrainConfig
from maskllm_megatron.train.setup import setup_parallel
from megatron.core import parallel_state
init_parallel(1, 1)
env = setup_parallel(TrainConfig.from_dict({"model": {"checkpoint": "unused"}, "data": {"train": ["unused"]}}))
print("OK", env.dp_size, parallel_state.get_tensor_model_parallel_world_size())
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["OK", "1", "1"]


def test_calibration_takes_exactly_calib_samples(tiny):
    """prior.calib_samples is the number of samples calibrated on: a short last micro-batch, not a count
    rounded down to whole micro-batches; asking for more than the training split holds is refused."""
    import torch

    from maskllm_megatron.run_config import TrainConfig
    from maskllm_megatron.train.data import RunData

    cfg = TrainConfig.load(write_config(tiny, "calib", data={"cache_dir": ""}), ()).validate()
    data = RunData(cfg, 0, 1)
    batches = data.calibration_batches(10)  # micro-batches of 4
    assert [len(b["tokens"]) for b in batches] == [4, 4, 2]
    assert all(len(v) == 2 for v in batches[-1].values() if torch.is_tensor(v))
    more = torch.cat([b["tokens"] for b in data.calibration_batches(12)])
    assert torch.equal(torch.cat([b["tokens"] for b in batches]), more[:10])  # the first samples, in order
    with pytest.raises(ValueError, match="prior.calib_samples 1000000 is more than the .* training samples"):
        data.calibration_batches(10**6)


def _plain_driver(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The driver launched plainly (one process, no torchrun)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    return subprocess.run([sys.executable, "-m", "maskllm_megatron.train", "--config", str(config), *overrides],
                          cwd=ROOT, capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=300)


def test_resume_trusts_complete_checkpoints_not_the_latest_pointer(tiny):
    """An emptied or dangling ``latest`` resumes from the newest complete checkpoint (it used to restart at 0
    and rotate the run's checkpoints away); a half-deleted newest one is passed over for the one before it,
    and the resumed run is the uninterrupted one; a torn last metrics line is dropped; a folder of only
    incomplete checkpoints is refused in one line naming it."""
    import torch  # noqa: F401

    config = write_config(tiny, "pointer", parallel={"tp": 1}, prior={"method": "magnitude"},
                          run={"train_iters": 6, "save_interval": 2, "keep_last": 3, "eval_interval": 0, "log_interval": 1})
    out = tiny / "pointer"
    r = _plain_driver(config)
    assert r.returncode == 0
    assert "Warning" not in r.stderr and "warn(" not in r.stderr, r.stderr[-3000:]  # stderr holds our lines only
    ckpts = out / "checkpoints"
    straight, names = history(out), sorted(p.name for p in ckpts.glob("iter_*"))
    assert names == ["iter_0000002", "iter_0000004", "iter_0000006"]
    lines = (out / "metrics.jsonl").read_text()
    for pointer, why in (("", "is empty"), ("iter_0000099", "names 'iter_0000099'")):
        (ckpts / "latest").write_text(pointer)
        r = _plain_driver(config)
        assert r.returncode == 0 and f"{ckpts / 'latest'} {why}" in r.stdout and "resuming from iter_0000006" in r.stdout, r.stdout[-2000:]
        assert sorted(p.name for p in ckpts.glob("iter_*")) == names  # nothing rotated away
        assert (out / "metrics.jsonl").read_text() == lines  # nothing truncated
    # the newest checkpoint half deleted, and a torn metrics line: resume from iteration 4, exactly
    next(p for p in (ckpts / "iter_0000006").glob("*.distcp")).unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 7, "lm_lo')
    r = _plain_driver(config)
    assert r.returncode == 0 and "resumed from" in r.stdout and "iter_0000004" in r.stdout, r.stderr[-2000:]
    assert "dropping its incomplete last line" in r.stdout
    assert history(out) == straight
    assert all(l.strip().startswith("{") and l.strip().endswith("}") for l in (out / "metrics.jsonl").read_text().splitlines())
    # only incomplete checkpoints: refused, nothing deleted
    for p in ckpts.glob("iter_*"):
        (p / "metadata.json").unlink()
    r = _plain_driver(config)
    assert r.returncode == 2 and r.stderr.count("maskllm-train: ") == 1 and f"{ckpts} holds iter_0000006" in r.stderr
    assert "none is a complete checkpoint" in r.stderr and len(list(ckpts.glob("iter_*"))) == 3


def test_resume_refuses_inputs_remade_since_the_checkpoint_unless_allowed(tiny):
    config_dir = tiny / "remade"
    data = config_dir / "data"
    data.mkdir(parents=True)
    for suffix in (".bin", ".idx"):
        shutil.copy(tiny / "data" / f"botchan_text_document{suffix}", data / f"d{suffix}")
    config = write_config(tiny, "remade", parallel={"tp": 1}, prior={"method": "magnitude"},
                          data={"train": [str(data / "d")]},
                          run={"train_iters": 4, "save_interval": 2, "eval_interval": 0, "log_interval": 1})
    assert _plain_driver(config, "run.train_iters=4").returncode == 0
    (config_dir / "checkpoints" / "latest").write_text("iter_0000002")
    shutil.rmtree(config_dir / "checkpoints" / "iter_0000004")
    # the dataset made again at the same path, with other documents (the first ones dropped)
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    old = IndexedDataset(str(data / "d"))
    builder = IndexedDatasetBuilder(str(data / "new.bin"), dtype=old.index.dtype)
    for i in range(5, len(old)):
        builder.add_document(old[i], [old[i].size])
    builder.finalize(str(data / "new.idx"))
    del old
    for suffix in (".bin", ".idx"):
        os.replace(data / f"new{suffix}", data / f"d{suffix}")
    r = _plain_driver(config)
    assert r.returncode == 2 and "the dataset" in r.stderr and "changed since the run's last checkpoint" in r.stderr
    assert "run.allow_changed_inputs=true" in r.stderr and r.stderr.count("maskllm-train: ") == 1
    r = _plain_driver(config, "run.allow_changed_inputs=true")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]


def test_data_is_checked_against_its_index_and_the_vocabulary_before_training(tiny, tmp_path):
    """A truncated .bin and token ids beyond the model's vocabulary are refused in one line, before any
    step (megatron would fail iterations in, or silently zero the ids at TP=2)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    src = tiny / "data" / "botchan_text_document"
    cut = tmp_path / "cut"
    shutil.copy(f"{src}.idx", f"{cut}.idx")
    data = Path(f"{src}.bin").read_bytes()
    Path(f"{cut}.bin").write_bytes(data[: len(data) // 2])
    big = tmp_path / "big"
    builder = IndexedDatasetBuilder(f"{big}.bin", dtype=np.uint16)
    g = np.random.default_rng(0)
    for _ in range(40):
        doc = g.integers(0, 999, 200).astype(np.uint16)
        doc[7] = 4000  # the tiny model's vocabulary holds 1000
        builder.add_document(doc, [doc.size])
    builder.finalize(f"{big}.idx")
    for prefix, message in ((cut, "the .bin is truncated"), (big, "holds token id 4000, beyond the model's vocabulary of 1000")):
        config = write_config(tiny, f"data_check_{prefix.name}", parallel={"tp": 1}, prior={"method": "magnitude"},
                              data={"train": [str(prefix)], "cache_dir": str(tmp_path / "cache")})
        r = _plain_driver(config)
        assert r.returncode == 2 and r.stderr.count("maskllm-train: ") == 1 and message in r.stderr, r.stderr[-2000:]
        assert not (tiny / f"data_check_{prefix.name}" / "checkpoints").exists()


@pytest.mark.parametrize("fault", ["grad_norm", "logits"])
def test_a_non_finite_step_is_never_saved(tiny, fault):
    """An infinite gradient norm, or a NaN left in the logits by an update, stops the run before its next
    save; the newest kept checkpoint holds finite tensors only (read back here)."""
    from maskllm_megatron import checkpoint_folders as checkpointing

    from tests.torchrun_util import printed_result

    config = write_config(tiny, f"finite_{fault}", parallel={"tp": 1}, prior={"method": "magnitude"},
                          run={"train_iters": 5, "save_interval": 1, "keep_last": 5, "eval_interval": 0})
    r = printed_result(torchrun("tests/scripts/driver_guards_worker.py", "finite", config, fault, nproc=1))
    expect = "the gradient norm is inf at iteration 3" if fault == "grad_norm" else "non-finite mask logits at iteration 3"
    assert r["stopped"] and r["stopped"].startswith(expect), r
    ckpts = tiny / f"finite_{fault}" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000001", "iter_0000002"]
    assert r["kept"] == "iter_0000002" and r["tensors"] > 20 and r["finite"], r
    assert checkpointing.is_complete(ckpts / "iter_0000002")


def test_ranks_that_found_different_checkpoints_refuse_to_resume():
    from tests.torchrun_util import printed_result

    r = printed_result(torchrun("tests/scripts/driver_guards_worker.py", "agree", nproc=2))
    assert r["refused"] and "the ranks found different checkpoints to resume (iterations 4 to 6" in r["refused"]


def test_driver_defaults_are_the_librarys():
    """The driver's default config builds the library's default configs: its mask, prior and optim sections
    hold the library's own fields (``_Library``: type and default declared once, in the library), and the
    builders pass every one of them on, with the anneal over the whole run and the run's seed."""
    from maskllm_megatron import MaskConfig, PriorConfig, SparsifyConfig
    from maskllm_megatron.run_config import TrainConfig

    cfg = TrainConfig()
    assert cfg.mask_config() == MaskConfig(total_steps=cfg.run.train_iters, seed=cfg.run.seed)
    assert cfg.sparsify_config() == SparsifyConfig(mask=cfg.mask_config())
    assert cfg.prior_config() == PriorConfig()
    # a run checkpoint's saved config (JSON: lists for tuples) becomes the same SparsifyConfig again
    joint = TrainConfig.load(None, ("mask.train_weights=true", "mask.include=['*.mlp.*']", "optim.mask_lr_mult=4"))
    saved = json.loads(json.dumps(joint.to_dict()))
    assert TrainConfig.from_dict(saved).sparsify_config() == joint.sparsify_config()
