"""launch.relaunch: a tool's re-launch under torchrun stops its ranks and cleans up on Ctrl-C / SIGTERM."""
from __future__ import annotations

import os
import signal
import threading
import time

RANK = """
import os, signal, sys, time
from pathlib import Path
out = Path(os.environ["RELAUNCH_TEST_DIR"])
def stop(signum, frame):  # as exit_cleanly_on_sigterm: remove partial output, exit
    (out / f"rank{os.environ['RANK']}.stopped").write_text(signal.Signals(signum).name)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
(out / "work").mkdir(exist_ok=True)
(out / f"rank{os.environ['RANK']}.ready").write_text(str(os.getpid()))
while True:
    time.sleep(0.1)
"""


def test_ctrl_c_reaches_the_ranks_once_and_removes_the_partial_output(tmp_path, monkeypatch, ctrl_c_raises):
    import psutil

    from maskllm_megatron.launch import relaunch

    (tmp_path / "relaunch_rank.py").write_text(RANK)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("RELAUNCH_TEST_DIR", str(tmp_path))
    pids = []

    def interrupt_when_ready():
        deadline = time.time() + 120
        while len(list(tmp_path.glob("rank*.ready"))) < 2 and time.time() < deadline:
            time.sleep(0.2)
        pids.extend(int(p.read_text()) for p in tmp_path.glob("rank*.ready"))
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, to this process only

    threading.Thread(target=interrupt_when_ready, daemon=True).start()
    rc = relaunch("relaunch_rank", [], 2, cleanup=tmp_path / "work")
    assert rc != 0 and len(pids) == 2
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.stopped")) == ["SIGTERM", "SIGTERM"]
    assert not (tmp_path / "work").exists()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handlers are back
