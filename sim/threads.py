"""The simulator's threads, named for the operating system too.

Python's thread names stay inside the interpreter; ``top -H`` and the benchmark read the
name in ``/proc/<pid>/task/<tid>/comm``. Every thread that does only the simulator's work
inside a cart process (the camera stand-in's sensor, the followers of the simulated world)
carries a name starting with :data:`PREFIX`, so the benchmark can tell the simulator's CPU
from the work that would run on the Pi (``bench/framepath.py``). So do the background threads
of the zmq context the simulator's sockets use (:func:`sim_context`): a context's I/O thread
wakes for every message of its sockets, and the simulated world sends some 130 a second
while a stream runs.
"""

from __future__ import annotations

import os

import zmq

from nirf.hal.threads import OS_NAME_MAX, name_os_thread

__all__ = ["PREFIX", "name_os_thread", "sim_context", "name_context_threads"]

PREFIX = "nirf-sim-"
# libzmq names a context's threads "<tag>/ZMQbg/IO/0", "<tag>/ZMQbg/Reaper" when the context
# has a numeric THREAD_NAME_PREFIX; the simulator's contexts take this one, and
# name_context_threads() then gives those threads the simulator's prefix.
ZMQ_TAG = 51


def sim_context() -> zmq.Context:
    """A zmq context of the simulator's own (not shared with the cart's sockets). Its threads
    start with its first socket; call :func:`name_context_threads` after creating it."""
    ctx = zmq.Context()
    ctx.set(zmq.THREAD_NAME_PREFIX, ZMQ_TAG)
    return ctx


def name_context_threads() -> list[str]:
    """Rename this process's threads of the simulator's zmq contexts ("51/ZMQbg/IO/0" becomes
    "nirf-sim-zmqio0", the reaper "nirf-sim-zmqrp"); returns the new names (Linux; elsewhere
    nothing)."""
    tag = f"{ZMQ_TAG}/ZMQbg/"
    renamed = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return renamed
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
            if not comm.startswith(tag):
                continue
            rest = comm[len(tag):]
            new = (PREFIX + ("zmqio" + rest[3:] if rest.startswith("IO/") else "zmqrp"))[:OS_NAME_MAX]
            with open(f"/proc/self/task/{tid}/comm", "w") as f:
                f.write(new)
            renamed.append(new)
        except OSError:
            continue
    return renamed
