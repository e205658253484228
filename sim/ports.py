"""Free loopback TCP ports for a simulated cart that a test or the benchmark starts.

Asking the kernel for port 0 and closing the socket again is not enough when a cart needs
several ports at once: the kernel may hand out the same port to the next request (one CI run
gave the control and the telemetry endpoint the same number, and the gateway could not bind
the second), and a port it picked comes from the range the kernel also uses for the local end
of outgoing connections, so any process's connect may take it before the cart binds it.

:func:`free_ports` therefore picks at random *below* the kernel's ephemeral range (no
outgoing connection ever gets such a port), checks each by binding it, holds every socket
open until all ``n`` are chosen (so one call never returns a port twice), and never returns
a port it has returned before in this process.
"""

from __future__ import annotations

import errno
import random
import socket
from pathlib import Path

__all__ = ["free_port", "free_ports", "ephemeral_range"]

#: the lowest port handed out (below it: well-known and commonly configured services)
LOWEST = 20000
#: how many random candidates one call tries before it gives up
ATTEMPTS = 2000

_issued: set[int] = set()
_rng = random.SystemRandom()


def ephemeral_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default when unreadable)."""
    try:
        low, high = (int(v) for v in path.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int, *, host: str = "127.0.0.1", rng=None) -> list[int]:
    """``n`` distinct TCP ports on ``host`` that nothing is bound to now and that this
    process has not handed out before. Raises ``RuntimeError`` when none can be found."""
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    eph_low, _ = ephemeral_range()
    # below the ephemeral range when it leaves room there, else anywhere above LOWEST
    low, high = LOWEST, (eph_low if eph_low - LOWEST >= 1000 else 65536)
    pick = (rng or _rng).randrange
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(ATTEMPTS):
            if len(ports) == n:
                break
            port = pick(low, high)
            if port in _issued or port in ports:
                continue
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError as exc:
                s.close()
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            held.append(s)
            ports.append(port)
    finally:
        for s in held:
            s.close()
    if len(ports) < n:
        raise RuntimeError(f"found only {len(ports)} of {n} free ports in {low}-{high - 1} on {host}")
    _issued.update(ports)
    return ports


def free_port(*, host: str = "127.0.0.1") -> int:
    """One port as :func:`free_ports` chooses it."""
    return free_ports(1, host=host)[0]
