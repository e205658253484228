"""Tell systemd how a service is doing, over the ``$NOTIFY_SOCKET`` datagram socket.

The protocol is a few lines, so it is written here instead of pulling in a library (the
device lists every dependency): systemd hands a ``Type=notify`` service the address of a
Unix datagram socket in ``NOTIFY_SOCKET``; the service sends newline-separated
``KEY=VALUE`` assignments to it. ``READY=1`` ends start-up, ``WATCHDOG=1`` feeds the
watchdog (``WatchdogSec=``), ``STATUS=...`` is shown by ``systemctl status`` and
``STOPPING=1`` announces a clean stop.

Every function here is a no-op returning ``False`` when ``NOTIFY_SOCKET`` is not set (a
developer's shell, the tests, the launcher), and none of them raises when sending fails:
a broken notification socket must never stop the safety loop. Failures are logged.

The address is either a file-system path (``/run/systemd/notify``) or, when it starts with
``@``, a socket in the abstract namespace (the ``@`` stands for the leading NUL byte).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

from nirf.hal.clock import Clock, SystemClock

log = logging.getLogger(__name__)

#: Longest state text sent in one datagram; systemd's own limit is far higher, this only
#: keeps a runaway status string from flooding the journal.
MAX_MESSAGE_BYTES = 4096


def _address(raw: str) -> str | bytes | None:
    """The socket address for ``raw`` (``NOTIFY_SOCKET``), or None if it is not one we
    can use."""
    if raw.startswith("@") and len(raw) > 1:
        # abstract namespace: Python takes it as bytes with a leading NUL
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # systemd also knows vsock: addresses (for virtual machines); a cart never gets one
    return None


def notify(state: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET`` from ``env``.

    Returns True when the datagram was sent, False when there is no socket to send to or
    the send failed (logged, never raised)."""
    raw = env.get("NOTIFY_SOCKET", "")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; notification %r not sent",
                    raw, state.split("\n", 1)[0])
        return False
    payload = state.encode("utf-8", "replace")
    if len(payload) > MAX_MESSAGE_BYTES:
        log.warning("sd_notify message of %d bytes cut to the limit of %d bytes", len(payload), MAX_MESSAGE_BYTES)
        payload = payload[:MAX_MESSAGE_BYTES]
    try:
        # Never blocks: a receiver that does not read (a full queue) must not stall the loop
        # that feeds the watchdog (the supervisor's, the gateway's); the datagram is dropped.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.connect(address)
            sock.send(payload)
    except OSError as err:
        # systemd gone, socket removed, or a full receive queue: report and carry on
        log.warning("sd_notify to %s failed (%s): %r not delivered", raw, err, state.split("\n", 1)[0])
        return False
    return True


def ready(env: Mapping[str, str] = os.environ) -> bool:
    """Start-up is complete: devices connected and the safe state reached."""
    return notify("READY=1", env)


def watchdog(env: Mapping[str, str] = os.environ) -> bool:
    """Feed the service watchdog (``WatchdogSec=``). Send only while healthy."""
    return notify("WATCHDOG=1", env)


def status(text: str, env: Mapping[str, str] = os.environ) -> bool:
    """A one-line status for ``systemctl status`` (newlines are replaced by spaces)."""
    return notify("STATUS=" + " ".join(str(text).splitlines()), env)


def stopping(env: Mapping[str, str] = os.environ) -> bool:
    """The service is stopping on purpose."""
    return notify("STOPPING=1", env)


def watchdog_interval_s(env: Mapping[str, str] = os.environ) -> float | None:
    """The watchdog timeout systemd expects this process to honour, in seconds, or None
    when there is none.

    ``WATCHDOG_USEC`` carries the timeout in microseconds; when ``WATCHDOG_PID`` is set
    too, the watchdog is meant for that process only (not for a child that inherited the
    environment), so any other process gets None."""
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not a process id; ignoring the watchdog", pid)
            return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a whole number of microseconds; ignoring the watchdog", raw)
        return None
    if usec <= 0:
        return None
    return usec / 1e6


class WatchdogPinger:
    """Sends ``WATCHDOG=1`` at most once per half the watchdog interval.

    Call it from the loop whose health it vouches for (the supervisor's healthy-tick
    callback, a service's receive loop): when that loop stops or blocks, the pings stop
    and systemd restarts the service. Calling it more often than needed is cheap; it sends
    only when half the interval has passed since the last datagram. Without a watchdog
    (no ``WATCHDOG_USEC`` for this process, or no ``NOTIFY_SOCKET``) it does nothing.
    """

    def __init__(self, env: Mapping[str, str] = os.environ, clock: Clock | None = None,
                 interval_s: float | None = None):
        self._env = env
        self._clock = clock or SystemClock()
        timeout_s = interval_s if interval_s is not None else watchdog_interval_s(env)
        # Half the timeout: one lost or late datagram still leaves a margin (systemd's advice).
        self.period_s: float | None = None if timeout_s is None else timeout_s / 2.0
        self._last_sent: float | None = None
        self._lock = threading.Lock()
        self.sent = 0

    @property
    def enabled(self) -> bool:
        """True when there is a watchdog to feed and a socket to feed it through."""
        return self.period_s is not None and bool(self._env.get("NOTIFY_SOCKET"))

    def due(self) -> bool:
        """True when a call now would send (so a caller can skip an expensive health check)."""
        if not self.enabled:
            return False
        last = self._last_sent
        return last is None or self._clock.monotonic() - last >= self.period_s

    def __call__(self) -> bool:
        """Feed the watchdog if it is due; True when a datagram went out."""
        if not self.enabled:
            return False
        now = self._clock.monotonic()
        with self._lock:
            if self._last_sent is not None and now - self._last_sent < self.period_s:
                return False
            self._last_sent = now
        if watchdog(self._env):
            self.sent += 1
            return True
        return False
