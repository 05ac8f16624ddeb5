"""Fixtures shared by several test modules."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name`` that ``build(folder)`` fills once per test session, however many pytest-xdist
    workers ask: the first builds it under a file lock in the session's shared temporary folder, the others
    wait for it and reuse it. Readers must not write into it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-<user>/pytest-<n>: the workers' common parent
    shared = root / "built-once"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The driver tests' inputs (tests/scripts/make_tiny_run.py): a tiny LLaMA-shaped checkpoint pre-trained
    on real text, its tokenizer and the text as an indexed dataset, built once and copied to this worker.
    Each test runs in a folder of its own name under it."""
    def make(folder: Path) -> None:
        subprocess.run([sys.executable, "tests/scripts/make_tiny_run.py", str(folder)], check=True, cwd=ROOT,
                       capture_output=True)

    d = tmp_path_factory.mktemp("tiny_run")
    shutil.copytree(built_once(tmp_path_factory, "tiny_run", make), d, dirs_exist_ok=True)
    return d


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raising KeyboardInterrupt, as in a terminal. A shell starts a background job (``make test &``)
    with SIGINT ignored, and Python keeps an ignored SIGINT: the Ctrl-C tests would then wait forever."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of a few MB: a tmpfs mounted by root (``mount -o remount,size=`` resizes it);
    skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="session")
def smollm2_mcore(tmp_path_factory) -> tuple[Path, Path, dict]:
    """SmolLM2-135M (HF folder) converted to megatron-core at TP=1 once per session by
    tests/scripts/convert_rss.py, with the conversion's memory it measured: (hf, ckpt, memory)."""
    from maskllm_megatron.assets import smollm2_hf_dir
    from tests.torchrun_util import printed_result

    hf = smollm2_hf_dir()

    def convert(folder: Path) -> None:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "convert_rss.py"), str(hf),
                               str(folder / "mcore")], capture_output=True, text=True, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        (folder / "memory.json").write_text(json.dumps(printed_result(proc.stdout)))

    folder = built_once(tmp_path_factory, "smollm2_mcore", convert)
    return hf, folder / "mcore", json.loads((folder / "memory.json").read_text())
