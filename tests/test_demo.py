"""The demo's stage runner (caching by content, failure message) and its time budget arithmetic."""
import re
from pathlib import Path

import pytest
import yaml

from maskllm_megatron.demo import SEQ, LearnRecipe, Stages, stage_key as _key
from tests.test_checkpoint_folders import complete_run_checkpoint


def test_stage_runs_once_and_is_reused(tmp_path):
    stages = Stages(tmp_path)
    calls = []

    def work(w):
        calls.append(w)
        (w / "out.txt").write_text("done")

    key = _key("input", 1)
    first = stages.run(1, "thing", key, work)
    again = stages.run(1, "thing", key, work)
    assert first == again and (first / "out.txt").read_text() == "done" and len(calls) == 1
    assert calls[0].name.endswith(".partial")  # work happens in a temporary folder, renamed when complete
    other = stages.run(1, "thing", _key("input", 2), work)  # other inputs: another stage folder
    assert other != first and len(calls) == 2


def test_failed_stage_names_itself_and_how_to_resume(tmp_path, monkeypatch):
    from maskllm_megatron import demo

    monkeypatch.setattr("sys.argv", [demo.__file__])
    stages = Stages(tmp_path)

    def boom(w):
        raise RuntimeError("disk full")

    with pytest.raises(SystemExit) as e:
        stages.run(4, "prior-wanda", "abc", boom)
    msg = str(e.value)
    assert "stage 4 (prior-wanda) failed: disk full" in msg and "make demo" in msg
    assert not (tmp_path / "prior-wanda-abc").exists() and (tmp_path / "prior-wanda-abc.partial").exists()
    # the next attempt starts clean and completes
    assert stages.run(4, "prior-wanda", "abc", lambda w: None) == tmp_path / "prior-wanda-abc"
    # started with flags (which the stages' keys depend on): the hint repeats them
    monkeypatch.setattr("sys.argv", [demo.__file__, "--minutes", "60", "--out", "my results"])
    with pytest.raises(SystemExit) as e:
        stages.run(4, "prior-magnitude", "abc", boom)
    assert "run the same command (`python -m maskllm_megatron.demo --minutes 60 --out 'my results'`) again" \
        in str(e.value)


def test_resumable_stage_keeps_its_interrupted_work(tmp_path):
    """A training stage resumes from the checkpoints an interrupted attempt left in its work folder."""
    stages = Stages(tmp_path)
    seen = []

    def train(w):
        seen.append(sorted(p.name for p in w.iterdir()))
        (w / f"iter_{len(seen)}").write_text("checkpoint")
        if len(seen) == 1:
            raise RuntimeError("killed")

    with pytest.raises(SystemExit) as e:
        stages.run(5, "maskllm", "k", train, resumable=True)
    assert "this one saved no checkpoint yet, so it starts again" in str(e.value)
    complete_run_checkpoint(tmp_path / "maskllm-k.partial" / "checkpoints" / "iter_0000001", 1)
    with pytest.raises(SystemExit) as e:
        stages.run(5, "maskllm", "k", lambda w: 1 / 0, resumable=True)
    assert "this one resumes from its checkpoint iter_0000001" in str(e.value)
    done = stages.run(5, "maskllm", "k", train, resumable=True)
    assert seen == [[], ["checkpoints", "iter_1"]]  # the later attempt found the first one's work
    assert sorted(p.name for p in done.iterdir() if p.name != ".stage_wall_s") == ["checkpoints", "iter_1", "iter_2"]
    # a stage that is not resumable starts from an empty folder
    with pytest.raises(SystemExit):
        stages.run(4, "prior", "k", lambda w: ((w / "half").write_text("x"), 1 / 0))
    assert stages.run(4, "prior", "k", lambda w: seen.append(list(w.iterdir()))) and seen[-1] == []


SAVING_RANK = """
import os, shutil, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def save(signum, frame):  # as the driver does on SIGTERM: finish, save, exit cleanly; slower than 30 s
    time.sleep(float(sys.argv[2]))
    shutil.copytree(sys.argv[3], out / "checkpoints" / "iter_0000003")  # a complete checkpoint
    (out / "checkpoints" / "latest").write_text("iter_0000003")
    (out / "signals").write_text(f"{signal.Signals(signum).name} after {sys.argv[2]} s")
    print("[maskllm] SIGTERM: saved at iteration 3; exiting", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
print("iter      3/10 | ready", flush=True)
while True:
    time.sleep(0.1)
"""


def test_ctrl_c_stops_a_torchrun_stage_after_its_save_and_says_how_to_resume(tmp_path, ctrl_c_raises):
    """Ctrl-C in the demo: the stage's ranks (torchrun, its own session) get one SIGTERM through torchrun,
    which waits for their save even past its default 30 s; then the demo says the stage resumes from the
    checkpoint they saved."""
    import os
    import signal
    import threading
    import time

    from maskllm_megatron import demo

    script = tmp_path / "rank.py"
    script.write_text(SAVING_RANK)
    saved = complete_run_checkpoint(tmp_path / "saved", 3)
    stages = Stages(tmp_path)
    work = tmp_path / "maskllm-k.partial"

    def interrupt_when_ready():
        deadline = time.time() + 120
        while not ((work / "log").exists() and "ready" in (work / "log").read_text()) and time.time() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, to the demo process only

    threading.Thread(target=interrupt_when_ready, daemon=True).start()
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        stages.run(5, "maskllm", "k", lambda w: demo.run_logged([str(script), str(w), "32", str(saved)], w / "log",
                                                                nproc=1),
                   resumable=True)
    assert "stage 5 (maskllm) interrupted" in str(e.value)
    assert "resumes from its checkpoint iter_0000003" in str(e.value)
    assert (work / "signals").read_text() == "SIGTERM after 32 s"  # one signal, and the save was waited for
    assert time.time() - t0 >= 32 and "saved at iteration 3" in (work / "log").read_text()


def test_learn_stage_is_finished_only_at_its_last_iteration(tmp_path, monkeypatch):
    """A run that stopped early but cleanly (SIGTERM saves and exits 0) leaves the stage unfinished and
    resumable; the attempt that reaches the last iteration finishes it."""
    from maskllm_megatron import demo

    reached = iter([4, 10])

    def fake_run(cmd, log, nproc=0, append=False):  # the driver: saves a checkpoint and exits 0
        out = log.parent / "checkpoints"
        iteration = next(reached)
        complete_run_checkpoint(out / f"iter_{iteration:07d}", iteration)
        (out / "latest").write_text(f"iter_{iteration:07d}")
        return ""

    monkeypatch.setattr(demo.pipeline, "run_logged", fake_run)
    stages = Stages(tmp_path)
    recipe = LearnRecipe(lr=1e-3, adam_eps=1e-8, adam_beta2=0.999, clip_grad=0.0, regularizer=2e-5, warmup_iters=3)
    args = (stages, tmp_path / "ckpt", tmp_path / "data", tmp_path / "prior", 10, recipe)
    with pytest.raises(SystemExit) as e:
        demo.learn_stage(*args)
    assert "stopped at iter_0000004 of 10 iterations" in str(e.value)
    partial, = tmp_path.glob("maskllm-*.partial")
    cfg = yaml.safe_load((partial / "maskllm.yaml").read_text())  # the recipe reaches the driver
    from maskllm_megatron.run_config import TrainConfig

    optim = TrainConfig.from_dict(cfg).to_dict()["optim"]  # as the driver reads it (its defaults filled in)
    assert (optim["lr"] * optim["mask_lr_mult"], optim["adam_eps"], optim["adam_beta2"], optim["clip_grad"]) == \
        pytest.approx((1e-3, 1e-8, 0.999, 0.0))
    assert cfg["mask"]["regularizer"] == [2e-5, 0.0]
    assert optim["warmup_iters"] == 3
    run = demo.learn_stage(*args)
    assert demo.final_checkpoint(run).name == "iter_0000010" and not run.name.endswith(".partial")
    assert demo.learn_wall_s(run) > 0


def test_a_timed_probe_turns_minutes_into_iterations(tmp_path, monkeypatch):
    """The learning stage's length follows this machine's measured speed, not a constant: the probe runs the
    learning config for a few iterations (one evaluation, the final save), and the plan is its median step
    time after the first iteration plus its fixed cost (wall time less the steps). Cached per machine."""
    from maskllm_megatron import demo

    recipe = LearnRecipe(global_batch=2)
    assert recipe.tokens_per_iteration == 2 * SEQ
    tokens = recipe.tokens_per_iteration
    step_times = [20.0, 8.0, 8.5, 7.5, 8.0, 9.0]  # the first one warms up
    launches = []

    def fake_run(cmd, log, nproc=0, append=False):  # the driver: logs every iteration's speed, saves, exits 0
        launches.append(cmd)
        cfg = yaml.safe_load(open(cmd[cmd.index("--config") + 1]))
        assert cfg["run"]["train_iters"] == 6 and "run.log_interval=1" in cmd, cmd
        assert nproc == demo.DP, nproc
        (log.parent / "checkpoints" / "iter_0000006").mkdir(parents=True)
        with open(log.parent / "metrics.jsonl", "w") as f:
            f.write('{"iteration": 0, "valid/loss": 4.0, "valid/seconds": 3.0}\n')
            for i, t in enumerate(step_times, 1):
                f.write(f'{{"iteration": {i}, "tokens_per_s": {tokens / t}}}\n')
            f.write('{"iteration": 6, "valid/loss": 3.9, "valid/seconds": 3.0}\n')
        return ""

    monkeypatch.setattr(demo.pipeline, "run_logged", fake_run)
    stages = Stages(tmp_path)
    args = (stages, tmp_path / "ckpt", tmp_path / "data", tmp_path / "prior", recipe)
    plan = demo.probe_stage(*args)  # the fake driver takes no time: nothing besides the steps
    assert plan.step_s == pytest.approx(8.0) and plan.fixed_s == 0.0 and plan.eval_s == 3.0 and plan.iters == 6
    done, = tmp_path.glob("probe-*")
    # 30 s besides the steps and the two evaluations
    plan = demo.plan_from_probe(done / "metrics.jsonl", 30.0 + sum(step_times) + 2 * 3.0, recipe)
    assert plan.step_s == pytest.approx(8.0) and plan.fixed_s == pytest.approx(30.0) and plan.eval_s == 3.0
    assert plan.iterations(6) == int((6 * 60 - 30 - 5 * 3.0) / 8.0) == 39  # a learning stage evaluates 5 times
    assert plan.minutes(39) == pytest.approx((30 + 5 * 3.0 + 39 * 8) / 60)
    assert plan.iterations(0.5) == 10  # never fewer than 10
    assert not (done / "checkpoints").exists()  # the probe's checkpoint is not kept
    cached = demo.probe_stage(*args)
    assert cached.step_s == pytest.approx(8.0) and len(launches) == 1  # cached: the same plan
    # a learning stage within 15% of its plan keeps the probe; one that missed it (the load changed) makes the
    # next demo probe again
    planned = cached.minutes(39) * 60
    assert cached.forget_if_missed(39, 1.14 * planned) == "" and done.exists()
    assert "the next demo probes again" in cached.forget_if_missed(39, 0.8 * planned) and not done.exists()
    assert demo.probe_stage(*args).step_s == pytest.approx(8.0) and len(launches) == 2
    # a warm-up longer than the probe: the probe runs past it (the driver refuses a run within its warm-up)
    with pytest.raises(RuntimeError, match="logged 6 of 9 iterations"):
        demo.plan_from_probe(done / "metrics.jsonl", 100.0, recipe, iters=9)
    assert demo.SpeedPlan(2.0, 10.0).iterations(1) == 25


def test_stages_record_their_wall_time(tmp_path):
    stages = Stages(tmp_path)
    stages.run(1, "a", "k", lambda w: None)
    again = Stages(tmp_path)
    again.run(1, "a", "k", lambda w: None)
    (name, seconds, cached), = again.walls
    assert (name, cached) == ("a", True) and seconds is not None and 0 <= seconds < 5
    assert stages.walls[0][2] is False


def test_recipe_flags_build_the_recipe_they_name():
    """The demo's and the benchmarks' recipe flags: every LearnRecipe field, typed, defaulting to the demo's."""
    import argparse
    from maskllm_megatron import demo
    p = argparse.ArgumentParser()
    demo.add_recipe_arguments(p)
    assert demo.recipe_from_args(p.parse_args([])) == LearnRecipe()
    args = p.parse_args(["--lr", "1e-3", "--global-batch", "4", "--adam-eps", "1e-8", "--adam-beta2", "0.999",
                         "--clip-grad", "0", "--prior-strength", "3"])
    assert demo.recipe_from_args(args) == LearnRecipe(lr=1e-3, global_batch=4, adam_eps=1e-8, adam_beta2=0.999,
                                                      clip_grad=0.0, prior_strength=3.0)
    assert isinstance(args.global_batch, int)
    with pytest.raises(SystemExit):
        p.parse_args(["--global-batch", "2.5"])  # sequences are whole
    q = argparse.ArgumentParser()
    demo.add_recipe_arguments(q, skip=("kd_weight",))
    with pytest.raises(SystemExit):
        q.parse_args(["--kd-weight", "0.5"])
    assert demo.recipe_from_args(q.parse_args(["--lr", "2e-4"])) == LearnRecipe(lr=2e-4)
    # refused by the driver's own validation of the config learn_stage writes, before any stage runs
    for flags, message in ((["--global-batch", "3"], "--global-batch: global_batch 3: the driver refuses it: "
                                                      "data.global_batch_size 3 is not a multiple of micro_batch_size 1"
                                                      " x data-parallel size 2: make it 2, 4, ..."),
                           (["--global-batch", "0"], "--global-batch: global_batch 0: the driver refuses it: "
                                                      "data.global_batch_size 0 must be >= 1"),
                           (["--lr", "0"], "--lr: lr 0.0 must be positive"),
                           (["--lr", "-1"], "--lr: lr -1.0 must be positive"),  # not the driver's lr / 10
                           (["--clip-grad", "-1"], "--clip-grad: clip_grad -1.0: the driver refuses it: optim.clip_grad"),
                           (["--adam-beta2", "1"], "--adam-beta2: adam_beta2 1.0: the driver refuses it: "
                                                    "optim.adam_beta2 1.0 must be in [0, 1)"),
                           (["--regularizer", "-1"], "--regularizer: regularizer -1.0: the driver refuses it: "
                                                      "mask.regularizer (-1.0, 0.0) must be >= 0"),
                           (["--prior-strength", "-2"], "--prior-strength: prior_strength -2.0: the driver refuses"),
                           (["--warmup-iters", "-1"], "--warmup-iters: warmup_iters -1: the driver refuses it: "
                                                      "optim.warmup_iters -1 must be >= 0")):
        with pytest.raises(SystemExit, match=re.escape(message)) as e:
            demo.recipe_from_args(p.parse_args(flags))
        assert e.value.code == 2
    assert LearnRecipe(global_batch=6).driver_sections()["data"] == {"micro_batch_size": 3, "global_batch_size": 6,
                                                                     "seq_length": SEQ}
    # shorter training sequences: more optimizer steps for the same tokens (the held-out windows stay SEQ)
    short = demo.recipe_from_args(p.parse_args(["--seq-length", "256"]))
    assert short.driver_sections()["data"]["seq_length"] == 256 and short.tokens_per_iteration == 2 * 256
    with pytest.raises(SystemExit, match=re.escape("--seq-length: seq_length 0: the driver refuses it: "
                                                   "data.seq_length 0 must be >= 1")):
        demo.recipe_from_args(p.parse_args(["--seq-length", "0"]))
    # the model's dtype: bf16 or fp32 as asked; auto is bf16 only where this machine multiplies bf16 natively
    assert demo.recipe_from_args(p.parse_args(["--dtype", "bf16"])).driver_sections()["model"] == {"dtype": "bf16"}
    assert demo.recipe_from_args(p.parse_args(["--dtype", "fp32"])).model_dtype == "fp32"
    with pytest.raises(SystemExit, match=re.escape("--dtype: dtype 'fp16': use auto (bf16 where bf16 is native "
                                                   "here), bf16 or fp32")):
        demo.recipe_from_args(p.parse_args(["--dtype", "fp16"]))


def test_recipe_schedules_and_joint_training_reach_the_driver(tmp_path, monkeypatch):
    """The recipe's schedule and joint-training flags become the driver's keys; at their defaults the driver
    config is today's and a learning stage's cache key is unchanged."""
    import argparse

    from maskllm_megatron import demo
    from maskllm_megatron.demo import recipe as recipe_module
    from maskllm_megatron.demo.pipeline import _recipe_settings
    from maskllm_megatron.run_config import TrainConfig

    p = argparse.ArgumentParser()
    demo.add_recipe_arguments(p)
    recipe = demo.recipe_from_args(p.parse_args(["--train-weights", "--weight-lr", "2e-4", "--kd-weight", "0.5",
                                                 "--temperature-end", "0.5", "--scale-start", "50",
                                                 "--anneal-fraction", "0.5"]))
    paths = (Path("ckpt"), Path("data"), Path("run"))
    cfg = TrainConfig.from_dict(demo.train_config(*paths, **recipe.driver_sections(), run={"train_iters": 40}))
    assert cfg.mask.train_weights and cfg.distills_trained_weights()
    assert (cfg.optim.lr, cfg.optim.lr * cfg.optim.mask_lr_mult) == pytest.approx((2e-4, 1e-3))
    assert cfg.mask_config().temperature == (4.0, 0.5) and cfg.mask_config().logit_scale == (50.0, 500.0)
    assert cfg.mask_config().total_steps == 20  # the anneal ends half way, then holds
    default, driver = TrainConfig.from_dict(demo.train_config(*paths, **LearnRecipe().driver_sections())), TrainConfig()
    for key in ("temperature", "logit_scale", "train_weights"):
        assert getattr(default.mask, key) == getattr(driver.mask, key), key
    assert default.optim.mask_lr_mult == driver.optim.mask_lr_mult
    # a field added later is keyed only away from the value every run had before it existed
    assert set(_recipe_settings(LearnRecipe(anneal_fraction=1.0, dtype="fp32"))) == {
        "global_batch", "lr", "prior_strength", "adam_eps", "adam_beta2", "clip_grad", "regularizer", "warmup_iters"}
    assert _recipe_settings(LearnRecipe(seq_length=256))["seq_length"] == 256
    # the dtype is keyed as it resolves here, and only away from fp32 (every run before it existed)
    assert "dtype" not in _recipe_settings(LearnRecipe(dtype="fp32"))
    assert _recipe_settings(LearnRecipe(dtype="bf16"))["dtype"] == "bf16"
    for native, resolved in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(recipe_module, "native_bf16", lambda: native)
        assert LearnRecipe().model_dtype == resolved
        assert _recipe_settings(LearnRecipe()).get("dtype", "fp32") == resolved
        assert TrainConfig.from_dict(demo.train_config(*paths, **LearnRecipe().driver_sections())).model.dtype == resolved
    assert _recipe_settings(LearnRecipe())["anneal_fraction"] == 0.7  # the demo's recipe (benchmarks/RESULTS.md)
    assert _recipe_settings(recipe)["train_weights"] is True
    # --update-weights: the learning run takes the prior checkpoint's (OBS-updated) weights with its masks
    from maskllm_megatron.demo.pipeline import _learn_config
    updated = demo.recipe_from_args(p.parse_args(["--train-weights", "--kd-weight", "0.5", "--update-weights"]))
    prior = yaml.safe_load(_learn_config(tmp_path, *paths[:2], Path("prior"), 38, updated, 1, 4).read_text())["prior"]
    assert prior == {"method": "checkpoint", "checkpoint": "prior", "update_weights": True, "calib_samples": 32}
    assert _recipe_settings(updated)["update_weights"] and "update_weights" not in _recipe_settings(recipe)
    with pytest.raises(SystemExit, match="--anneal-fraction: anneal_fraction 0.0: the driver refuses it: "
                                         "mask.anneal_fraction 0.0 must be in"):
        demo.recipe_from_args(p.parse_args(["--anneal-fraction", "0"]))


def test_copy_run_records_fills_the_results_folder(tmp_path):
    """The demo's and quality benchmark's results folder gets the run's metrics, config and curves PNG."""
    from maskllm_megatron import demo
    from tests.test_plot import png_size, synthetic_run
    run, out = tmp_path / "run", tmp_path / "out"
    metrics = synthetic_run(run)
    (run / "maskllm.yaml").write_text("optim: {lr: 1.0e-4}\n")
    out.mkdir()
    demo.copy_run_records(run, out, "curves.png")
    assert (out / "metrics.jsonl").read_text() == metrics.read_text()
    assert (out / "maskllm.yaml").read_text() == "optim: {lr: 1.0e-4}\n"
    width, height = png_size(out / "curves.png")
    assert width > 500 and height > 300


def test_bad_arguments_are_refused_before_any_stage(tmp_path, monkeypatch):
    """Nothing is fetched, converted or created before every argument has been checked."""
    from maskllm_megatron import demo

    monkeypatch.setenv("MASKLLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "afile").write_text("x")
    for argv, message in ((["--minutes", "0"], "error: --minutes 0 must be positive"),
                          (["--minutes", "-5"], "error: --minutes -5 must be positive"),
                          (["--lr", "-1"], "error: --lr: lr -1.0 must be positive"),
                          (["--global-batch", "3"], "error: --global-batch: global_batch 3: the driver refuses it"),
                          (["--warmup-iters", "-2"], "error: --warmup-iters: warmup_iters -2: the driver refuses it"),
                          (["--refit-iters", "-1"], "error: --refit-iters -1 must be >= 0"),
                          (["--out", str(tmp_path / "afile")], "is a file: pass a folder for the results"),
                          (["--out", str(tmp_path / "afile" / "sub")], "cannot create the folder")):
        with pytest.raises(SystemExit, match=re.escape(message)) as e:
            demo.main(argv + ([] if "--out" in argv else ["--out", str(tmp_path / "out")]))
        assert e.value.code == 2  # a user's error, as for every tool (launch.USER_ERROR)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_export_stage_follows_the_checkpoint_content_not_only_its_path(tmp_path, monkeypatch):
    """A learning stage re-run at the same path (its folder deleted) gets a new export, not the old one."""
    from maskllm_megatron import demo

    exports = []
    monkeypatch.setattr(demo.pipeline, "run_logged", lambda cmd, log, **kw: exports.append(cmd) or "")
    stages = Stages(tmp_path / "stages")
    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000038"
    ckpt.mkdir(parents=True)
    (ckpt / "extra_state.json").write_bytes(b"history of the first run")
    first = demo.export_stage(stages, ckpt)
    assert demo.export_stage(stages, ckpt) == first and len(exports) == 1  # same content: cached
    (ckpt / "extra_state.json").write_bytes(b"history of a second run")
    assert demo.export_stage(stages, ckpt) != first and len(exports) == 2


def test_refit_stage_runs_a_driver_config_that_refits_the_runs_own_masks(tmp_path, monkeypatch):
    """The demo's refit: a config the driver accepts, that keeps the run's masks (prior.method=checkpoint on
    the run's checkpoint) on the run's base model and data, keyed by the checkpoint's content."""
    import json

    from maskllm_megatron import demo
    from maskllm_megatron.run_config import TrainConfig

    configs = []

    def fake_run(cmd, log, **kw):
        configs.append(TrainConfig.load(cmd[cmd.index("--config") + 1]))
        (log.parent / "checkpoints").mkdir()

    monkeypatch.setattr(demo.pipeline, "run_logged", fake_run)
    stages = Stages(tmp_path / "stages")
    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000038"
    ckpt.mkdir(parents=True)
    learned = {"model": {"checkpoint": "/base/ckpt"}, "data": {"train": ["/data/wiki_text_document"]}}
    (ckpt / "extra_state.json").write_text(json.dumps({"iteration": 38, "config": learned}))
    refit = demo.WeightRefit(iters=8)
    first = demo.refit_stage(stages, ckpt, refit)
    assert demo.refit_stage(stages, ckpt, refit) == first and len(configs) == 1
    cfg = configs[0].validate(world_size=demo.DP)
    assert cfg.mask.refit and cfg.prior.method == "checkpoint" and cfg.prior.checkpoint == str(ckpt)
    assert cfg.model.checkpoint == "/base/ckpt" and cfg.data.train == ["/data/wiki_text_document"]
    assert cfg.run.train_iters == 8 and cfg.distill.kd_weight == 1.0 and cfg.optim.weight_decay == 0.0
    assert (first / "refit_wall_s").is_file()
    (ckpt / "extra_state.json").write_text(json.dumps({"iteration": 38, "config": learned, "history": [1]}))
    assert demo.refit_stage(stages, ckpt, refit) != first and len(configs) == 2  # another run's checkpoint
    larger = demo.refit_stage(stages, ckpt, demo.WeightRefit(iters=8, batch=4))  # 4 sequences a rank, accumulated
    cfg = configs[2].validate(world_size=demo.DP)
    assert larger != first and cfg.data.micro_batch_size == 1 and cfg.data.global_batch_size == 4 * demo.DP
    assert configs[0].data.global_batch_size == demo.DP and configs[0].data.seq_length == SEQ
    shorter = demo.refit_stage(stages, ckpt, demo.WeightRefit(iters=8, seq_length=256))  # more steps, same tokens
    assert shorter != first and configs[3].data.seq_length == 256


def test_convert_stage_follows_the_model_folders_content(tmp_path, monkeypatch):
    """The model folder has a fixed path in the cache: a model made again (another package version or
    transformers) is converted again, the same one is not."""
    from maskllm_megatron import demo

    runs = []
    monkeypatch.setattr(demo.pipeline, "run_logged", lambda cmd, log, **kw: runs.append(cmd) or "")
    stages = Stages(tmp_path / "stages")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"weights made by one transformers")
    first = demo.convert_stage(stages, hf)
    assert demo.convert_stage(stages, hf) == first and len(runs) == 1
    (hf / "model.safetensors").write_bytes(b"weights made by another transformers")
    assert demo.convert_stage(stages, hf) != first and len(runs) == 2
