"""The folder kinds and the atomic, rank-aware writes of ``checkpoint_folders``, and the checkpoint a run means
(``run_folder``) to the trainer and the tools alike (no megatron-core model needed)."""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest

from maskllm_megatron.checkpoint_folders import (OUTPUT_MARKER, FolderError, RunCheckpointError, atomic_dir,
                                                 is_dist_checkpoint, looks_like_run, partial_path, publish, staging,
                                                 write_digests, write_extra, written_by)
from maskllm_megatron.run_folder import (checkpoint_name, is_run_checkpoint, newest_complete, resolve_run_checkpoint,
                                         stale_checkpoints, write_latest)
from tests.torchrun_util import printed_result, torchrun

SCRIPTS = Path(__file__).parent / "scripts"


def _dist_folder(folder: Path, *extra: str) -> Path:
    folder.mkdir(parents=True)
    for name in ("metadata.json", ".metadata", *extra):
        (folder / name).write_text("{}")
    return folder


def complete_run_checkpoint(folder: Path, iteration: int) -> Path:
    """A small run checkpoint that ``is_complete``: a dist checkpoint of one tensor, megatron's
    ``metadata.json``, the extra state and rank 0's digests (no megatron needed)."""
    import torch
    from torch.distributed.checkpoint import FileSystemWriter, save

    folder.mkdir(parents=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        save({"w": torch.arange(64.0) + iteration}, storage_writer=FileSystemWriter(str(folder)), no_dist=True)
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    write_extra(folder, {"iteration": iteration})
    write_digests(folder, 0, 1)
    return folder.absolute()


def test_folder_kinds_are_told_apart_and_a_run_means_its_newest_complete_checkpoint(tmp_path):
    converted = _dist_folder(tmp_path / "converted", "model_config.json")
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    it3 = complete_run_checkpoint(ckpts / checkpoint_name(3), 3)
    write_latest(ckpts, 3)
    assert (ckpts / "latest").read_text() == "iter_0000003"
    assert is_dist_checkpoint(converted) and not looks_like_run(converted) and not is_run_checkpoint(converted)
    assert is_dist_checkpoint(it3) and looks_like_run(it3)
    assert resolve_run_checkpoint(it3) == it3
    assert resolve_run_checkpoint(run_dir) == it3 == resolve_run_checkpoint(ckpts)
    (ckpts / "latest").write_text("iter_0000009")  # dangling: not trusted
    assert is_run_checkpoint(run_dir) and resolve_run_checkpoint(run_dir) == it3
    half = _dist_folder(ckpts / "iter_0000005", "extra_state.json")  # newer, not complete: passed over
    assert resolve_run_checkpoint(run_dir) == it3
    assert resolve_run_checkpoint(half) == half.absolute()  # named itself: read as given (reading it fails)
    shutil.rmtree(it3)
    assert not is_run_checkpoint(run_dir) and looks_like_run(ckpts)
    with pytest.raises(RunCheckpointError, match=re.escape(f"{ckpts} holds iter_0000005 but none is a complete "
                                                           "checkpoint: restore one")):
        resolve_run_checkpoint(run_dir)
    shutil.rmtree(half)
    with pytest.raises(RunCheckpointError, match="holds no checkpoint folder .*: pass OUT/checkpoints/iter_XXXXXXX"):
        resolve_run_checkpoint(run_dir)
    with pytest.raises(RunCheckpointError, match="iter_0000009 does not exist: pass OUT/checkpoints/iter_XXXXXXX"):
        resolve_run_checkpoint(ckpts / "iter_0000009")
    with pytest.raises(RunCheckpointError, match="is not a mask-learning checkpoint"):
        resolve_run_checkpoint(converted)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_the_trainer_and_export_choose_one_checkpoint_whatever_latest_says(tmp_path, capsys, monkeypatch):
    """#40: the driver's resume (``rank_guards.resume_checkpoint``, in a one-process world) and export's
    reading of a run (``RunCheckpoint.open``) pick the same checkpoint through ``run_folder.newest_complete``:
    with ``latest`` naming an older complete checkpoint or none that exists, and the newest folder
    incomplete, both take the newest complete one and say so; when its bytes fail their digests, both take
    the newest older one that verifies."""
    from maskllm_megatron.megatron.parallel import init_process_group, teardown
    from maskllm_megatron.run_checkpoint import RunCheckpoint
    from maskllm_megatron.train.rank_guards import resume_checkpoint

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    it2, it4 = (complete_run_checkpoint(ckpts / checkpoint_name(i), i) for i in (2, 4))
    _dist_folder(ckpts / "iter_0000006", "extra_state.json")  # the newest: a save cut short

    def export_choice(folder: Path) -> Path:
        with pytest.raises(RunCheckpointError, match="extra state has no run config") as e:  # after choosing
            RunCheckpoint.open(folder)
        return Path(str(e.value).split("'s extra state")[0])

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    init_process_group()
    try:
        for named in ("iter_0000002", "iter_0000009"):  # an older complete checkpoint; none that exists
            (ckpts / "latest").write_text(named)
            assert resume_checkpoint(run) == export_choice(run) == export_choice(ckpts) == it4 == newest_complete(ckpts)
            out, err = capsys.readouterr()
            said = f"{ckpts / 'latest'} names {named!r}, which is not the newest complete checkpoint: "
            assert f"[maskllm] {said}resuming from iter_0000004" in out and f"[maskllm] {said}reading iter_0000004" in err
        copy = tmp_path / "copy"  # a fresh path: this process remembers the checkpoints that verified
        shutil.copytree(run, copy)
        damaged = sorted((copy / "checkpoints" / "iter_0000004").glob("*.distcp"))[0]
        _flip_byte(damaged)
        assert resume_checkpoint(copy) == export_choice(copy) == copy / "checkpoints" / "iter_0000002"
        out, err = capsys.readouterr()
        for said, verb in ((out, "resuming from"), (err, "reading")):
            assert f"{damaged} fails its digest" in said and f"not {verb} iter_0000004" in said, said
            assert f"[maskllm] {verb} iter_0000002, the newest checkpoint that verifies" in said, said
        shutil.rmtree(it2)
        shutil.rmtree(it4)
        for choose in (resume_checkpoint, RunCheckpoint.open):
            with pytest.raises(FolderError, match=re.escape(f"{ckpts} holds iter_0000006 but none is a complete")):
                choose(run)
    finally:
        teardown()


def test_checkpoint_rotation_keeps_scheduled_checkpoints_through_a_preemption():
    # every 80 iterations, keep 3: plain rotation
    assert stale_checkpoints([80, 160, 240, 320], 80, 3) == [80]
    # a SIGTERM save at 203 stays only while it is the newest, and never costs a scheduled checkpoint
    assert stale_checkpoints([80, 160, 203], 80, 3) == []
    assert stale_checkpoints([80, 160, 203, 240], 80, 3) == [203]
    # a run's final save (483) is kept on top of the keep_last scheduled ones
    assert stale_checkpoints([160, 240, 320, 400, 480, 483], 80, 3) == [160, 240]
    # no schedule: the keep_last newest
    assert stale_checkpoints([3, 7, 9], 0, 2) == [3]
    assert stale_checkpoints([], 80, 3) == []


def test_a_failed_rewrite_keeps_the_earlier_output_and_leaves_no_staging(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, tool="t") as tmp:
        (tmp / "a").write_text("1")
    assert written_by(out) == "t" and (out / OUTPUT_MARKER).is_file()
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_dir(out, overwrite=True, tool="t") as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "a"] and not partial_path(out).exists()
    with pytest.raises(FolderError, match="replaces only an earlier output of other"):
        with atomic_dir(out, overwrite=True, tool="other"):
            pass
    with atomic_dir(out, overwrite=True, tool="t") as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "b"]


def test_publish_moves_a_file_out_of_staging_over_an_earlier_one(tmp_path):
    target = tmp_path / "masks.safetensors"
    target.write_text("old")
    with staging(target, "tmp", collective=False) as tmp:
        (tmp / target.name).write_text(json.dumps({"new": True}))
        assert partial_path(target.absolute(), "tmp") == tmp
        publish(tmp / target.name, target, tool="ignored for files", collective=False)
    assert json.loads(target.read_text()) == {"new": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.safetensors"]


def test_ranks_write_one_folder_together(tmp_path):
    """Two gloo ranks: the folder appears with both ranks' parts (the slow rank's too), and a block that
    fails on every rank leaves the earlier folder and no staging."""
    out = printed_result(torchrun(str(SCRIPTS / "folders_worker.py"), str(tmp_path / "out"), timeout=120))
    for rank in out:
        assert rank["parts"] == [OUTPUT_MARKER, "part-0", "part-1"], rank
        assert rank["failed"] and rank["after_failure"] == [OUTPUT_MARKER, "part-0", "part-1"], rank
        assert not rank["staging_left"], rank
