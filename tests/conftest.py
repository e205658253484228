"""Test-suite settings.

Under CI (``CI`` set) hypothesis runs derandomised: the same examples every run, so a
submission's result does not depend on chance. Developers' runs explore new examples each
time; a failure they find is kept in hypothesis's local database and replayed first.

An interrupted run leaves no process behind: every child a test starts through
``subprocess.Popen`` (simulated carts, the Orthanc PACS ...) is remembered, and at the end
of the session, at interpreter exit, and on SIGINT, SIGTERM or SIGHUP its whole process
group is killed (the children start sessions of their own, so a group is one cart with
everything it started).
"""

import atexit
import os
import signal
import subprocess
import threading
import time

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

_children: list[subprocess.Popen] = []
_children_lock = threading.Lock()
_original_init = subprocess.Popen.__init__


def _remembering_init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    with _children_lock:
        _children.append(self)


subprocess.Popen.__init__ = _remembering_init


def register_process_group(proc: subprocess.Popen) -> None:
    """Remember a child started some other way (already done for every Popen)."""
    with _children_lock:
        if proc not in _children:
            _children.append(proc)


def _signal_child(proc: subprocess.Popen, sig: int) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:  # a group of its own: all of it
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_children(grace_s: float = 0.0) -> int:
    """End every remembered child that still runs, with its process group when it leads
    one; returns how many were running. With ``grace_s`` they get SIGTERM first and that
    long to end (a pytest-xdist worker then ends the children it started itself), the rest
    SIGKILL."""
    with _children_lock:
        procs = list(_children)
        _children.clear()
    running = [p for p in procs if p.poll() is None]
    if grace_s > 0:
        for proc in running:
            _signal_child(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for proc in running:
        if proc.poll() is None:
            _signal_child(proc, signal.SIGKILL)
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
    return len(running)


def _on_signal(signum, frame):
    # a worker of a parallel run (pytest-xdist) is one of these children: SIGTERM first lets
    # it end the children it started itself before it goes
    kill_children(grace_s=3.0)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, _on_signal)
atexit.register(kill_children)


def pytest_sessionfinish(session, exitstatus):
    # Also reached after Ctrl-C (pytest turns SIGINT into KeyboardInterrupt and unwinds).
    kill_children()
