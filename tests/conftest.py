"""Fixtures shared by several test modules."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The driver tests' inputs (tests/scripts/make_tiny_run.py): a tiny LLaMA-shaped checkpoint pre-trained
    on real text, its tokenizer and the text as an indexed dataset. Each test runs in a folder of its own
    name under it."""
    d = tmp_path_factory.mktemp("tiny_run")
    subprocess.run([sys.executable, "tests/scripts/make_tiny_run.py", str(d)], check=True, cwd=ROOT,
                   capture_output=True)
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
