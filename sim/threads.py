"""The simulator's threads, named for the operating system too.

Python's thread names stay inside the interpreter; ``top -H`` and the benchmark read the
name in ``/proc/<pid>/task/<tid>/comm``. Every thread that does only the simulator's work
inside a cart process (the camera stand-in's sensor, the followers of the simulated world)
carries a name starting with :data:`PREFIX`, so the benchmark can tell the simulator's CPU
from the work that would run on the Pi (``bench/framepath.py``).
"""

from __future__ import annotations

from nirf.hal.threads import name_os_thread

__all__ = ["PREFIX", "name_os_thread"]

PREFIX = "nirf-sim-"
