"""Threads named for the operating system as well as for Python.

Python keeps a thread's name inside the interpreter; ``top -H``, ``ps -L`` and the benchmark
read the name in ``/proc/<pid>/task/<tid>/comm``. The threads that matter for the cart's CPU
budget (the supervisor, the acquisition loop) carry an OS name of their own, so their share
can be measured apart from the rest of their process.
"""

from __future__ import annotations

import os
import select
import threading
import weakref
from typing import Any, Callable

OS_NAME_MAX = 15  # bytes Linux keeps of a thread's name


def name_os_thread(name: str) -> None:
    """Name the calling thread for the operating system (Linux; elsewhere nothing). At most
    OS_NAME_MAX bytes are kept."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name[:OS_NAME_MAX])
    except OSError:
        pass


def os_named(os_name: str, target: Callable[..., Any]) -> Callable[..., Any]:
    """``target`` wrapped so that the thread running it first takes ``os_name``."""
    def run(*args: Any, **kwargs: Any) -> Any:
        name_os_thread(os_name)
        return target(*args, **kwargs)
    run.__name__ = getattr(target, "__name__", "run")
    run.__doc__ = getattr(target, "__doc__", None)
    return run


class WakeSignal:
    """A flag another thread raises to wake a sleeping loop early: ``threading.Event``'s
    ``set``/``is_set``/``clear``/``wait``, on a pipe and one ``select`` per sleep.

    ``Event.wait`` with a timeout builds a condition and a lock for every call; a loop that
    sleeps fifty times a second pays for that in CPU. The pipe's descriptors are closed when
    the signal is collected.
    """

    def __init__(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._r, self._w = r, w
        self._flag = False
        self._written = False  # a byte may be in the pipe
        weakref.finalize(self, _close_fds, r, w)

    def set(self) -> None:
        self._flag = True
        self._written = True
        try:
            os.write(self._w, b"!")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already (or the signal is being collected)

    def is_set(self) -> bool:
        return self._flag

    def clear(self) -> None:
        self._flag = False
        self._drain()

    def fileno(self) -> int:
        """The read end of the pipe, for a caller that selects on it with other descriptors
        (it then calls :meth:`consume` when it is readable)."""
        return self._r

    def consume(self) -> None:
        """Take every pending wake-up byte out of the pipe (the flag stays as it is)."""
        self._drain(always=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until :meth:`set` or ``timeout`` seconds; return whether the flag is up. A
        wake-up whose flag was cleared meanwhile (the loop has handled it) is drained."""
        if self._flag:
            return True
        try:
            ready, _, _ = select.select([self._r], [], [], None if timeout is None else max(timeout, 0.0))
        except (OSError, ValueError):
            return self._flag
        if ready:
            self.consume()  # whatever _written says: a set() may be mid-way
        return self._flag

    def _drain(self, always: bool = False) -> None:
        if not (self._written or always):
            return
        self._written = False
        try:
            while os.read(self._r, 64):
                pass
        except (BlockingIOError, OSError):
            pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
