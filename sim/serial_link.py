"""Ways to put an emulator core on a serial line.

An emulator *core* is the byte-level model of a device (the MCU, the filter wheel). It has
no I/O of its own:

* ``feed(data: bytes)``: bytes arriving from the host;
* ``take_output() -> bytes``: bytes the device has sent since the last call;
* ``tick()``: let time-driven behaviour run (watchdogs, moves, frame triggers), reading the
  core's own clock.

:class:`PtyLink` runs a core behind a pseudo-terminal so that pyserial opens it like a real
port (the hardware process does this). :class:`LoopbackSerial` is a pyserial-like object
wired straight to a core in the caller's thread, so driver tests can run against the real
emulator with a manual clock and no threads.
"""

from __future__ import annotations

import logging
import os
import pty
import select
import threading
import tty
from pathlib import Path
from typing import Protocol

from nirf.hal.clock import Clock, SystemClock

log = logging.getLogger(__name__)


class EmulatorCore(Protocol):
    def feed(self, data: bytes) -> None: ...

    def take_output(self) -> bytes: ...

    def tick(self) -> None: ...

    # Optional: ``tick_interval_s()`` how soon the next tick is needed (an idle device needs
    # fewer), and ``on_output``, an attribute the link sets to a callable the core calls when
    # it queued output outside a tick (an interrupt), so the link sends it at once.


class PtyLink:
    """Serve an emulator core on a pseudo-terminal.

    ``stable_path``, when given, is kept as a symlink to the current pty, like the
    ``/dev/serial/by-id/...`` name a USB device keeps across re-enumeration. ``unplug``
    makes the port vanish (the host sees read/write errors and the symlink disappears);
    ``replug`` brings it back under a new pty behind the same stable path.
    """

    def __init__(self, core: EmulatorCore, name: str, stable_path: str | os.PathLike | None = None,
                 tick_s: float = 0.001):
        self.core = core
        self.name = name
        self.stable_path = Path(stable_path) if stable_path else None
        self.tick_s = tick_s
        self._lock = threading.Lock()
        self._master: int | None = None
        self._slave: int | None = None
        self.slave_path: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Woken at once when the core queues output between ticks (idle ticks can be long).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        if hasattr(core, "on_output"):
            core.on_output = self._wake

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or the link is gone)

    def _interval_s(self) -> float:
        interval = getattr(self.core, "tick_interval_s", None)
        return self.tick_s if interval is None else max(self.tick_s, float(interval()))

    @property
    def port(self) -> str:
        """The path a driver should open."""
        return str(self.stable_path) if self.stable_path else str(self.slave_path)

    def start(self) -> "PtyLink":
        self._open_pty()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"pty-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _open_pty(self) -> None:
        master, slave = pty.openpty()
        # Raw at once: until pyserial sets its own mode the line discipline would echo
        # and translate CR/LF.
        tty.setraw(slave)
        tty.setraw(master)
        with self._lock:
            self._master, self._slave = master, slave
            self.slave_path = os.ttyname(slave)
        if self.stable_path:
            tmp = self.stable_path.with_name(self.stable_path.name + ".new")
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            os.symlink(self.slave_path, tmp)
            os.replace(tmp, self.stable_path)
        log.info("%s emulator on %s", self.name, self.port)

    def _close_pty(self) -> None:
        with self._lock:
            fds = (self._master, self._slave)
            self._master = self._slave = None
        if self.stable_path:
            try:
                self.stable_path.unlink()
            except FileNotFoundError:
                pass
        for fd in fds:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def unplug(self) -> None:
        self._close_pty()

    def replug(self) -> None:
        self._open_pty()

    def stop(self) -> None:
        self._stop.set()
        self._wake()  # out of a long idle wait at once
        if self._thread:
            self._thread.join(timeout=2.0)
        self._close_pty()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            master = self._master
            if master is None:
                # unplugged: the device keeps running (its watchdog, its timers)
                self.core.tick()
                self.core.take_output()  # nobody listens
                self._stop.wait(self.tick_s)
                continue
            try:
                ready, _, _ = select.select([master, self._wake_r], [], [], self._interval_s())
                if self._wake_r in ready:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                if master in ready:
                    data = os.read(master, 4096)
                    if data:
                        self.core.feed(data)
            except OSError:
                # host closed its end, or we were unplugged meanwhile: keep serving
                self._stop.wait(self.tick_s)
            self.core.tick()
            out = self.core.take_output()
            if out and self._master is not None:
                try:
                    os.write(self._master, out)
                except OSError:
                    pass


class LoopbackSerial:
    """A pyserial-like port wired straight to an emulator core, in the caller's thread.

    Supports the subset of ``serial.Serial`` the drivers use: ``write``, ``read``,
    ``read_until``, ``in_waiting``, ``reset_input_buffer``, ``flush``, ``close``,
    ``is_open``, ``timeout``, ``port``. Reads that find no data advance the given clock in
    small steps (a :class:`~hal.clock.ManualClock` makes them instant) until ``timeout``.
    """

    STEP_S = 0.001

    def __init__(self, core: EmulatorCore, clock: Clock | None = None, timeout: float | None = 0.2,
                 port: str = "loopback"):
        self.core = core
        self.clock = clock or SystemClock()
        self.timeout = timeout
        self.port = port
        self.is_open = True
        self._buf = bytearray()
        self.written = bytearray()  # everything the host sent, for tests

    def _check_open(self) -> None:
        if not self.is_open:
            import serial  # only to raise the same error class pyserial would

            raise serial.SerialException("Attempting to use a port that is not open")

    def _pump(self) -> None:
        self.core.tick()
        self._buf += self.core.take_output()

    def write(self, data: bytes) -> int:
        self._check_open()
        data = bytes(data)
        self.written += data
        self.core.feed(data)
        return len(data)

    @property
    def in_waiting(self) -> int:
        self._check_open()
        self._pump()
        return len(self._buf)

    def _read_while(self, done) -> bytes:
        self._check_open()
        deadline = None if self.timeout is None else self.clock.monotonic() + self.timeout
        while True:
            self._pump()
            n = done(self._buf)
            if n:
                out = bytes(self._buf[:n])
                del self._buf[:n]
                return out
            if deadline is not None and self.clock.monotonic() >= deadline:
                out = bytes(self._buf)
                self._buf.clear()
                return out
            self.clock.sleep(self.STEP_S)

    def read(self, size: int = 1) -> bytes:
        if size <= 0:
            return b""
        return self._read_while(lambda b: size if len(b) >= size else 0)

    def read_until(self, expected: bytes = b"\n", size: int | None = None) -> bytes:
        def done(b: bytearray) -> int:
            i = b.find(expected)
            if i >= 0:
                n = i + len(expected)
                return min(n, size) if size else n
            if size and len(b) >= size:
                return size
            return 0

        return self._read_while(done)

    def reset_input_buffer(self) -> None:
        self._check_open()
        self._pump()
        self._buf.clear()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.is_open = False
