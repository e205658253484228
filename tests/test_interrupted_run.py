"""An interrupted test run leaves no process behind (tests/conftest.py): a pytest run
whose test has started children (one in a session of its own with a grandchild, one
plain) is stopped with SIGINT or SIGTERM, and every one of them is gone afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

INNER = '''
import subprocess, sys, time
from pathlib import Path

def test_hangs(tmp_path):
    group = subprocess.Popen(["bash", "-c", "sleep 600 & echo $! > {out}.grandchild; wait"],
                             start_new_session=True)
    plain = subprocess.Popen(["sleep", "600"])
    Path("{out}.children").write_text(f"{{group.pid}} {{plain.pid}}")
    time.sleep(600)
'''


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its exit status is left


def wait_for(path: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    pytest.fail(f"{path} never appeared")


@pytest.mark.slow  # starts a pytest run of its own
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to see processes")
@pytest.mark.parametrize("workers", [0, 2])  # 2: a parallel run (pytest-xdist), as make test does
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_leaves_no_process(tmp_path, sig, workers):
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    out = tmp_path / "pids"
    (tmp_path / "test_inner.py").write_text(INNER.format(out=out))
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    parallel = ["-n", str(workers)] if workers else []
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *parallel, str(tmp_path)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        children = [int(p) for p in wait_for(Path(f"{out}.children"), 60).split()]
        grandchild = int(wait_for(Path(f"{out}.grandchild"), 30))
        everyone = [*children, grandchild]
        assert all(alive(p) for p in everyone)
        os.kill(proc.pid, sig)  # to pytest itself, as Ctrl-C or a CI timeout would
        proc.wait(60)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in everyone) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in everyone if alive(p)] == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
