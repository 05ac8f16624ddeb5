"""The folder kinds and the atomic, rank-aware writes of ``checkpoint_folders`` (no megatron needed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskllm_megatron.checkpoint_folders import (OUTPUT_MARKER, FolderError, RunCheckpointError, atomic_dir,
                                                 is_dist_checkpoint, is_run_checkpoint, looks_like_run, partial_path,
                                                 publish, resolve_run_checkpoint, staging, written_by)
from tests.torchrun_util import printed_result, torchrun

SCRIPTS = Path(__file__).parent / "scripts"


def _dist_folder(folder: Path, *extra: str) -> Path:
    folder.mkdir(parents=True)
    for name in ("metadata.json", ".metadata", *extra):
        (folder / name).write_text("{}")
    return folder


def test_folder_kinds_are_told_apart_and_a_run_is_found_through_its_latest_pointer(tmp_path):
    converted = _dist_folder(tmp_path / "converted", "model_config.json")
    run_dir = tmp_path / "run"
    it3 = _dist_folder(run_dir / "checkpoints" / "iter_0000003", "extra_state.json")
    (run_dir / "checkpoints" / "latest").write_text("iter_0000003\n")
    assert is_dist_checkpoint(converted) and not looks_like_run(converted) and not is_run_checkpoint(converted)
    assert is_dist_checkpoint(it3) and looks_like_run(it3)
    assert resolve_run_checkpoint(it3) == it3.absolute()
    assert resolve_run_checkpoint(run_dir) == it3.absolute() == resolve_run_checkpoint(run_dir / "checkpoints")
    (run_dir / "checkpoints" / "latest").write_text("iter_0000009")  # dangling
    assert not is_run_checkpoint(run_dir) and looks_like_run(run_dir / "checkpoints")
    with pytest.raises(RunCheckpointError, match="iter_0000009 does not exist: pass OUT/checkpoints/iter_XXXXXXX"):
        resolve_run_checkpoint(run_dir)
    with pytest.raises(RunCheckpointError, match="is not a mask-learning checkpoint"):
        resolve_run_checkpoint(converted)


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
