"""Clocks. Code that waits or times out takes a clock, so tests can run minutes of
simulated time in milliseconds.

``monotonic()`` is for durations inside a process; ``time_ns()`` is the wall clock for
timestamps that cross processes (they go into messages).
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time_ns(self) -> int: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clocks of the machine."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time_ns(self) -> int:
        return time.time_ns()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class ManualClock:
    """A clock that moves only when told to. ``sleep`` advances it instantly, so code
    that polls with a timeout finishes at once in tests."""

    def __init__(self, start_s: float = 1000.0, wall_start_ns: int = 1_700_000_000_000_000_000):
        self._t = float(start_s)
        self._t0 = float(start_s)
        self._wall0 = int(wall_start_ns)
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self._t

    def time_ns(self) -> int:
        with self._lock:
            return self._wall0 + int(round((self._t - self._t0) * 1e9))

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        with self._lock:
            self._t += seconds

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.advance(seconds)
