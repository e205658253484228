"""How often a thread of this process has slept: a loop that sleeps on a short timer wakes
many times a second, one that waits for work does not."""

from __future__ import annotations

import os
import threading


def has_thread_stats(thread: threading.Thread) -> bool:
    return os.path.exists(f"/proc/self/task/{thread.native_id}/status")


def voluntary_switches(thread: threading.Thread) -> int:
    """The thread's voluntary context switches so far (each sleep counts one)."""
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    raise AssertionError("no switch count")
