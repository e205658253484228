"""The simulator's threads, named for the operating system too.

Python's thread names stay inside the interpreter; ``top -H`` and the benchmark read the
name in ``/proc/<pid>/task/<tid>/comm``. Every thread that does only the simulator's work
inside a cart process (the camera stand-in's sensor, the followers of the simulated world)
carries a name starting with :data:`PREFIX`, so the benchmark can tell the simulator's CPU
from the work that would run on the Pi (``bench/framepath.py``).
"""

from __future__ import annotations

import threading

PREFIX = "nirf-sim-"


def name_os_thread(name: str) -> None:
    """Name the calling thread for the operating system (Linux; elsewhere nothing). At most
    15 bytes are kept."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass
