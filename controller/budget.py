"""The emission budget (PRODUCT S7a): on-time accumulates across `laser.on` commands.

Every stretch of time with emission permitted (state EMITTING, whatever the per-frame
gating) is recorded as an interval. At most ``limit_s`` (``laser.max_emission_s``) of it may
fall in any window of ``2 x limit_s``; once the limit has ended emission, a new turn-on
waits until at least :data:`FREE_BEFORE_RESTART_S` of budget is free again (half the
budget when the budget is under twice that, so a short test budget is usable again).

The intervals live on the wall clock (``clock.time_ns()``), not the monotonic one, because
they must survive a restart of the safety core: they are written to a small JSON file at
every start and stop of emission and about once a second while emitting, so a crash loses
at most that second (the MCU's own count covers it: the effective use is the larger of the
two). The file is written by a small writer thread, never by the supervisor itself: an
fsync on an SD card can take tens of milliseconds, which the heartbeat (S16) must not wait
for. A wall clock that went back is treated conservatively: an interval recorded "in the
future" counts as if it ended now.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from pathlib import Path

from nirf.hal.clock import Clock

log = logging.getLogger(__name__)

FREE_BEFORE_RESTART_S = 60.0
PERSIST_EVERY_S = 1.0
FILE_VERSION = 1


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems cannot sync a folder; the rename is still atomic
        pass


class EmissionBudget:
    """Accumulated emission time in a sliding window, persisted in ``path`` (None: memory
    only, for tests). Times are wall-clock seconds from ``clock.time_ns()``.

    Not thread-safe on its own account beyond a small lock; the cart calls it under its
    lock."""

    def __init__(self, limit_s: float, clock: Clock, path: Path | None = None):
        if not (isinstance(limit_s, (int, float)) and math.isfinite(limit_s) and limit_s > 0):
            raise ValueError(f"emission budget: limit_s {limit_s!r} must be a number above 0")
        self.limit_s = float(limit_s)
        self.window_s = 2.0 * self.limit_s
        self.clock = clock
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._intervals: list[list[float]] = []  # closed [start, end] wall seconds
        self._open_since: float | None = None
        self._exhausted = False  # the limit ended emission; cleared once enough is free
        self._last_persist = -math.inf
        self.load_problem: str | None = None
        # the writer thread's slot: the newest bytes to write (older ones are superseded)
        self._pending: bytes | None = None
        self._writing = False
        self._cond = threading.Condition()
        self._closed = False
        self._writer: threading.Thread | None = None
        self._load()
        if self.path is not None:
            self._writer = threading.Thread(target=self._write_loop, name="emission-budget-writer", daemon=True)
            self._writer.start()

    # ------------------------------------------------------------------ persistence
    def _now(self) -> float:
        return self.clock.time_ns() / 1e9

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            now = self._now()
            intervals = []
            for a, b in data["intervals"]:
                a, b = float(a), float(b)
                if not (math.isfinite(a) and math.isfinite(b)) or b < a:
                    raise ValueError(f"interval [{a}, {b}] is not a time span")
                intervals.append([min(a, now), min(b, now)])
            open_since = data.get("open_since")
            if open_since is not None:
                # the process died while emitting: that stretch counts up to the last save
                last = float(data.get("saved_at", open_since))
                intervals.append([min(float(open_since), now), min(max(last, float(open_since)), now)])
            self._intervals = intervals
            self._exhausted = bool(data.get("exhausted", False))
        except (OSError, ValueError, KeyError, TypeError) as err:
            # A damaged record must not give a fresh budget: count the whole limit as used
            # now, so emission waits a full window.
            self.load_problem = (f"emission budget file {self.path.name} cannot be read ({err}); "
                                 f"the whole budget counts as used")
            log.error("%s", self.load_problem)
            now = self._now()
            self._intervals = [[now - self.limit_s, now]]
            self._exhausted = True
        self._prune(self._now())

    def _save(self, now: float) -> None:
        """Hand the current record to the writer thread (never blocks on the disk)."""
        if self.path is None:
            return
        data = {"version": FILE_VERSION, "limit_s": self.limit_s, "intervals": self._intervals,
                "open_since": self._open_since, "saved_at": now, "exhausted": self._exhausted}
        self._last_persist = now
        with self._cond:
            self._pending = json.dumps(data).encode()
            self._cond.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                data, self._pending = self._pending, None
                self._writing = True
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(self.path, data)
            except OSError as err:
                # Not fatal: the MCU keeps its own count, which wins when larger.
                log.error("emission budget not saved to %s: %s", self.path, err)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until the newest record is on disk (False on timeout). Real time: it waits on
        the writer thread, not on the budget's clock."""
        if self._writer is None:
            return True
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._writing, timeout=timeout_s)

    def close(self) -> None:
        """Write what is pending and stop the writer thread."""
        if self._writer is None:
            return
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._writer.join(timeout=5.0)

    def _prune(self, now: float) -> None:
        start = now - self.window_s
        self._intervals = [iv for iv in self._intervals if iv[1] > start]

    # ------------------------------------------------------------------ recording
    def start(self) -> None:
        """Emission became permitted now."""
        with self._lock:
            if self._open_since is None:
                now = self._now()
                self._open_since = now
                self._save(now)

    def stop(self) -> None:
        """Emission stopped now."""
        with self._lock:
            if self._open_since is not None:
                now = self._now()
                self._intervals.append([self._open_since, max(now, self._open_since)])
                self._open_since = None
                self._prune(now)
                self._save(now)

    def tick(self) -> None:
        """Called from the supervisor: saves the running stretch about once a second."""
        with self._lock:
            now = self._now()
            if self._open_since is not None and now - self._last_persist >= PERSIST_EVERY_S:
                self._save(now)

    def mark_exhausted(self) -> None:
        """The limit ended emission: turn-on now waits for enough free budget."""
        with self._lock:
            self._exhausted = True
            self._save(self._now())

    @property
    def emitting(self) -> bool:
        return self._open_since is not None

    # ------------------------------------------------------------------ questions
    def _used_at(self, t: float, now: float) -> float:
        """Seconds used in the window ending at ``t`` (>= now), assuming no emission after
        ``now`` beyond what is recorded."""
        start = t - self.window_s
        total = 0.0
        spans = list(self._intervals)
        if self._open_since is not None:
            spans.append([self._open_since, now])
        for a, b in spans:
            total += max(0.0, min(b, t) - max(a, start))
        return total

    def used_s(self) -> float:
        """Emission seconds in the window ending now (the running stretch included)."""
        with self._lock:
            now = self._now()
            return self._used_at(now, now)

    def free_s(self, mcu_used_s: float = 0.0) -> float:
        """Budget left now, judged by the larger of this count and the MCU's."""
        return max(0.0, self.limit_s - max(self.used_s(), mcu_used_s))

    def need_before_restart_s(self) -> float:
        """Free budget a turn-on needs once the limit has ended emission."""
        return min(FREE_BEFORE_RESTART_S, self.limit_s / 2.0)

    def wait_s(self, need_free_s: float, mcu_used_s: float = 0.0, mcu_scale: float = 1.0) -> float:
        """Seconds from now until at least ``need_free_s`` of budget is free, if nothing more
        is emitted. The MCU's count (``mcu_used_s``, in this budget's terms) falls at most
        one MCU second per second, ``mcu_scale`` MCU seconds being one of ours, so its share
        of the wait is a lower bound from that."""
        with self._lock:
            now = self._now()
            target = self.limit_s - need_free_s
            mcu_wait = max(0.0, mcu_used_s - target) * mcu_scale
            if self._used_at(now, now) <= target:
                host_wait = 0.0
            else:
                lo, hi = now, now + self.window_s  # after a whole window everything has aged out
                for _ in range(60):
                    mid = (lo + hi) / 2.0
                    if self._used_at(mid, now) <= target:
                        hi = mid
                    else:
                        lo = mid
                host_wait = hi - now
        return max(host_wait, mcu_wait)

    def turn_on_refusal(self, mcu_used_s: float = 0.0, mcu_scale: float = 1.0) -> str | None:
        """Why a turn-on must wait now, or None. Once the limit has ended emission, a turn-on
        needs :meth:`need_before_restart_s` of free budget; otherwise any free budget will
        do (the supervisor ends emission when it runs out)."""
        free = self.free_s(mcu_used_s)
        need = self.need_before_restart_s() if self._exhausted else 1e-9
        if free >= need:
            if self._exhausted:
                with self._lock:
                    self._exhausted = False
                    self._save(self._now())
            return None
        wait = self.wait_s(need, mcu_used_s, mcu_scale)
        return (f"emission budget used: {self.limit_s - free:.1f} s of laser.max_emission_s "
                f"{self.limit_s:.0f} s in the last {self.window_s:.0f} s; wait {math.ceil(wait)} s "
                f"until {need:.0f} s of budget is free")

    def status(self, mcu_used_s: float = 0.0) -> dict:
        used = max(self.used_s(), mcu_used_s)
        return {"used_s": round(used, 2), "limit_s": self.limit_s, "window_s": self.window_s,
                "free_s": round(max(0.0, self.limit_s - used), 2), "exhausted": self._exhausted}
