"""What a cluster does to a long run (issue #39), on the tiny model of tests/test_train.py: a second driver
on a live run's folder, a lock left by kill -9, flipped bytes in a checkpoint, a full disk, a rank that
never arrives, torchrun's elastic restart after one rank's death, and the console of a save."""
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from maskllm_megatron.launch import USER_ERROR
from tests.test_train import ROOT, _plain_driver, write_config


def _tiny_run(tiny: Path, name: str, **run) -> Path:
    return write_config(tiny, name, parallel={"tp": 1}, prior={"method": "magnitude"},
                        run={"train_iters": 2, "save_interval": 2, "eval_interval": 0, "log_interval": 1, **run})


def _one_error(r: subprocess.CompletedProcess, status: int = USER_ERROR) -> str:
    """The driver's one error line, after checking its exit status (a user's error by default)."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("maskllm-train: ")]
    assert r.returncode == status and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


def test_a_second_driver_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tiny):
    config = _tiny_run(tiny, "locked")
    out = tiny / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom maskllm_megatron.checkpoint_folders import "
                               "hold_run_folder\nhold_run_folder(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(600)",
                               str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        error = _one_error(_plain_driver(config))
        assert f"{out} is in use by another maskllm-train (host {socket.gethostname()}, pid {holder.pid}, started " \
               in error and "set another run.out_dir" in error, error
        assert not (out / "checkpoints").exists()  # refused before anything was written
    finally:
        holder.kill()  # kill -9: the kernel drops its flock; its JSON stays behind
        holder.wait()
    assert json.loads((out / ".maskllm-run.lock").read_text())["pid"] == holder.pid
    r = _plain_driver(config)
    assert r.returncode == 0 and "saved" in r.stdout, r.stderr[-3000:]
    assert json.loads((out / ".maskllm-run.lock").read_text())["pid"] != holder.pid


def test_without_flock_the_lock_file_decides(tmp_path, monkeypatch):
    """A filesystem that refuses flock (some NFS / Lustre mounts): a holder on this host whose pid is gone
    is taken over; a live one, or one on another host, is refused in one line."""
    import fcntl

    from maskllm_megatron.checkpoint_folders import RUN_LOCK_FILE, RunFolderBusy, RunLock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock_file = tmp_path / RUN_LOCK_FILE
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for holder, refused in (({"host": socket.gethostname(), "pid": int(dead.stdout)}, None),
                            ({"host": socket.gethostname(), "pid": os.getppid()}, "is in use by another maskllm-train"),
                            ({"host": "node-17", "pid": 4242}, f"if it is dead, delete {lock_file}")):
        lock_file.write_text(json.dumps({**holder, "started": "2026-01-01 00:00:00 UTC"}))
        if refused is None:
            lock = RunLock(tmp_path).acquire()
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
            lock.release()
            assert not lock_file.exists()
        else:
            with pytest.raises(RunFolderBusy, match=refused) as e:
                RunLock(tmp_path).acquire()
            assert f"pid {holder['pid']}" in str(e.value) and "\n" not in str(e.value)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_named_by_verify_export_and_eval_and_resume_falls_back_to_a_checkpoint_that_verifies(
        tiny, capsys):
    """Each rank records its files' digests when it saves. A flipped byte (the size unchanged, so the old
    completeness check passed it) is one line naming the file in maskllm-verify, maskllm-export and
    maskllm-eval; the driver resumes from the newest checkpoint that verifies, says so, and ends with the
    uninterrupted run's history."""
    from maskllm_megatron.checkpoint_folders import read_extra
    from maskllm_megatron.eval.perplexity import main as eval_main
    from maskllm_megatron.export.cli import main as export_main
    from maskllm_megatron.export.verify import main as verify_main

    from tests.test_train import history

    config = _tiny_run(tiny, "digests", train_iters=4, keep_last=3)
    out = tiny / "digests"
    assert _plain_driver(config).returncode == 0
    straight = history(out)
    newest = out / "checkpoints" / "iter_0000004"
    manifest = json.loads((newest / "digests" / "rank_00000.json").read_text())
    assert {"metadata.json", ".metadata", "extra_state.json"} <= set(manifest["files"]) and manifest["world"] == 1
    assert verify_main([str(newest)]) == 0 and "match their crc32 digests" in capsys.readouterr().out
    damaged = sorted(newest.glob("*.distcp"))[0]
    _flip_byte(damaged)
    assert verify_main([str(out)]) == 1  # a run folder: its latest checkpoint
    assert f"FAIL {damaged} fails its digest (crc32 " in capsys.readouterr().out
    for main, args in ((export_main, ["--ckpt", newest, "--out", tiny / "digests_export", "--format", "masks"]),
                       (eval_main, ["--ckpt", newest, "--text-file", ROOT / "README.md"])):
        assert main(list(map(str, args))) != 0
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if str(damaged) in line]
        assert len(lines) == 1 and "fails its digest" in lines[0] and "Traceback" not in err, err[-3000:]
    r = _plain_driver(config)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[maskllm] {damaged} fails its digest" in r.stdout and "not resuming from iter_0000004" in r.stdout
    assert "resuming from iter_0000002, the newest checkpoint that verifies" in r.stdout, r.stdout[-3000:]
    assert history(out) == straight and read_extra(newest)["iteration"] == 4
    assert verify_main([str(newest)]) == 0  # saved again, whole


def test_a_full_disk_stops_before_the_save_in_one_line_and_a_rerun_with_space_resumes(tiny, small_disk):
    """4 MB hold one checkpoint of the tiny model (2.8 MB) and not two: the second save is refused before it
    writes anything, naming the folder, the space needed and free; ``latest`` stays on the first; once
    there is room the same command resumes it."""
    config = _tiny_run(tiny, "full", train_iters=3, save_interval=1, keep_last=5, out_dir=str(small_disk / "run"),
                       tensorboard=False)
    ckpts = small_disk / "run" / "checkpoints"
    error = _one_error(_plain_driver(config))
    assert error.startswith(f"maskllm-train: not enough disk space for a checkpoint in {ckpts}: about ") and \
        "needed (the size of iter_0000001 + 5%), " in error and " free; nothing was written" in error, error
    assert (ckpts / "latest").read_text() == "iter_0000001"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000001", "latest"]  # no partial folder
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    r = _plain_driver(config)
    assert r.returncode == 0 and "resumed from" in r.stdout and "at iteration 1" in r.stdout, r.stderr[-3000:]
    assert (ckpts / "latest").read_text() == "iter_0000003"


@pytest.mark.parametrize("writer", ["torch.save", "write"])
def test_a_write_that_fills_the_disk_is_one_line_and_leaves_nothing(small_disk, writer):
    """What export and convert write goes through ``atomic_dir``; a write that fills the disk anyway (plain
    ENOSPC, or torch.save's "unexpected pos", which names no disk) is one ``DiskFull`` line naming the
    output, and neither the output nor its partial folder is left."""
    import torch

    from maskllm_megatron.checkpoint_folders import DiskFull, atomic_dir

    out = small_disk / "export"
    with pytest.raises(DiskFull) as e:
        with atomic_dir(out, tool="maskllm-export", collective=False) as tmp:
            if writer == "torch.save":
                torch.save(torch.zeros(2 << 20), tmp / "big.pt")  # 8 MB
            else:
                (tmp / "big.bin").write_bytes(bytes(8 << 20))
    message = str(e.value)
    assert message.startswith(f"the disk filled up while writing {out} (") and "\n" not in message, message
    assert list(small_disk.iterdir()) == []


def test_a_rank_that_never_arrives_ends_the_run_in_one_line(tiny):
    """Rank 0 of a two-rank world whose rank 1 never starts: the rendezvous gives up after
    parallel.timeout_minutes (here 3 s) with one line and exit 1, instead of waiting forever."""
    from maskllm_megatron.launch import free_port

    config = _tiny_run(tiny, "never_arrives")
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    env.pop("LOCAL_RANK", None)
    r = subprocess.run([sys.executable, "-m", "maskllm_megatron.train", "--config", str(config),
                        "parallel.timeout_minutes=0.05"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    error = _one_error(r, status=1)  # not the user's input: the work failed
    assert "maskllm-train: rank 0: another rank did not arrive within parallel.timeout_minutes=0.05 (" in error, error


def test_a_stalled_rank_times_out_a_collective_on_megatrons_groups():
    """The timeout reaches every group (megatron's made them with its own 30-minute default, and
    cpu_compat's shadow groups torch's): an all-reduce on the data-parallel group that a stalled rank never
    joins fails after parallel.timeout_minutes (12 s here), and says so in one line."""
    from tests.torchrun_util import printed_result, torchrun

    r = printed_result(torchrun("tests/scripts/stalled_rank_worker.py", nproc=2))
    assert r["timeouts"] == {name: 12.0 for name in ("world", "dp", "tp", "pp", "mp", "shadow")}, r
    assert r["line"] and r["line"].startswith("rank 0: another rank did not arrive within parallel.timeout_minutes=0.2")
    assert 10 < r["waited"] < 18, r  # rank 1 stalls for 20 s


def test_quiet_saves_drop_only_megatrons_benign_records():
    """Every DP > 1 save printed megatron's "Rank 1 common state dict differs ... ('optimizer', 'param_state')"
    (rank 0's common state alone is saved) and a writer's error twice; the tools drop those two records,
    and any other difference in the common state still reaches the console."""
    import logging

    from maskllm_megatron.launch import quiet_known_warnings

    quiet_known_warnings()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    validation = logging.getLogger("megatron.core.dist_checkpointing.validation")
    writer = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    for logger in (validation, writer):
        logger.addHandler(handler)
    try:
        validation.warning("Rank 1 common state dict differs from rank 0 common state dict. Keys only on rank 0: [], "
                           "Keys only on 1: [('optimizer', 'param_state')], Mismatched keys: []")
        writer.error("Local process 1 encountered an error: [Errno 28] No space left on device")
        kept = ("Rank 1 common state dict differs from rank 0 common state dict. Keys only on rank 0: [], "
                "Keys only on 1: [('optimizer', 'param_state')], Mismatched keys: [('iteration',)]")
        validation.warning(kept)
    finally:
        for logger in (validation, writer):
            logger.removeHandler(handler)
    assert seen == [kept]


def test_convert_refuses_a_disk_without_room_before_writing(small_disk, tmp_path):
    """maskllm-convert hf-to-mcore checks for room for the checkpoint it is about to write (the model's
    size) and refuses in one line, writing nothing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(hf)
    subprocess.run(["mount", "-o", "remount,size=128k", str(small_disk)], check=True)
    r = subprocess.run([sys.executable, "-m", "maskllm_megatron.convert.cli", "hf-to-mcore", "--hf", str(hf), "--out",
                        str(small_disk / "mcore")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in r.stderr.splitlines() if "disk space" in line]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"not enough disk space for a checkpoint in {small_disk}: about " in lines[0]
    assert "needed (modelled from the model sizes), " in lines[0] and " free; nothing was written" in lines[0]
    assert list(small_disk.iterdir()) == []
