"""Benchmark P4: how fast the cart's safety acts, measured against the physical truth.

Three measurements, each repeated, on a cart that streams fluorescence at full size and
60 fps while they run (the controller is at its busiest then, which is when a slow
safety path would show):

* **interlock open to FAULT published** (target under 100 ms): ``sim.set {"interlock":
  "open"}`` is sent from one client (a thread of its own, the time noted just before the
  send) while another client's telemetry subscriber waits for the first ``status`` in
  state FAULT or ``event`` of the trip, and notes when it arrives;
* **controller frozen to MCU output off** (target under ``heartbeat_timeout_ms`` +
  100 ms): the controller process is stopped with SIGSTOP; the hardware process's world
  bus (``laser`` messages: every change of the optical output with its time) says when the
  output went off for good: the last change to zero after which nothing lit follows. The
  controller is continued (SIGCONT) afterwards and the latched watchdog fault reset;
* **controller killed leaves the output off**: SIGKILL of the controller (the launcher
  frozen meanwhile, or it would take the simulated hardware down with it, which the real
  MCU would not do); the output must go off within the heartbeat timeout plus a margin and
  stay off. The cart is not usable afterwards, so this runs last.

And S16, before the others: **heartbeat gaps over 60 s idle** (SAFE, no stream), measured at
the sender: the supervisor notes the time of each heartbeat just before it goes out, and
``status`` → ``heartbeat`` reports the median and largest gap over the last 60 s (target:
median within 2 ms of ``heartbeat_interval_ms``, max at most the interval + 10 ms). The same
figure read right after the streaming benchmark (P3) shows the gaps under load.

These figures are reported, never asserted in tests: this machine is shared and noisy.

Run alone: ``python -m bench.safety_latency [--trips 10] [--freezes 5] [--idle 60]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field

import msgpack
import zmq

from bench.cartrun import BenchCart, arm_and_emit, to_safe

log = logging.getLogger(__name__)

TARGET_TRIP_MS = 100.0
FREEZE_MARGIN_MS = 100.0  # the target is heartbeat_timeout_ms + this
HEARTBEAT_MEDIAN_TOLERANCE_MS = 2.0  # S16: median gap within this of the interval ...
HEARTBEAT_MAX_EXTRA_MS = 10.0  # ... and the largest at most the interval + this
HEARTBEAT_IDLE_S = 60.0
KILL_MARGIN_MS = 1000.0  # the output must be off within heartbeat_timeout_ms + this ...
KILL_HOLD_S = 2.0  # ... and stay off at least this long
STREAM_BEFORE_S = 0.5  # let the stream settle before each trip, freeze or kill
POWER_MW = 50.0


class WorldWatch:
    """A subscriber to the hardware process's world bus (``laser`` and ``values``)."""

    def __init__(self, endpoint: str, timeout_s: float = 10.0):
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 100000)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"laser")
        self.sub.setsockopt(zmq.SUBSCRIBE, b"values")
        self.sub.connect(endpoint)
        # the slow joiner: wait for the first periodic message before relying on it
        if self.next_values(timeout_s) is None:
            self.close()
            raise TimeoutError(f"no message on the world bus {endpoint} within {timeout_s} s")

    def receive(self, timeout_s: float) -> tuple[str, dict] | None:
        """The next world message (kind, map), or None after the timeout."""
        if not self.sub.poll(max(0, int(timeout_s * 1000))):
            return None
        kind, data = self.sub.recv_multipart()
        return kind.decode(), msgpack.unpackb(data, raw=False, strict_map_key=False)

    def drain(self) -> None:
        """Forget what is queued."""
        while self.receive(0) is not None:
            pass

    def next_values(self, timeout_s: float) -> dict | None:
        """The next periodic ``values`` map (``laser_output_mw`` among them)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(left)
            if got is not None and got[0] == "values":
                return got[1]
        return None

    def laser_changes(self, duration_s: float) -> list[tuple[int, float]]:
        """Every output change (t_ns, mW) published during the next ``duration_s``."""
        changes = []
        deadline = time.monotonic() + duration_s
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(left)
            if got is not None and got[0] == "laser":
                changes.append((int(got[1]["t_ns"]), float(got[1]["mw"])))
        return changes

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def off_for_good_ns(changes: list[tuple[int, float]], after_ns: int) -> int | None:
    """When the output went to zero for the last time, after ``after_ns``, with nothing lit
    following; None when the last known output is not zero."""
    if not changes or changes[-1][1] != 0.0:
        return None
    t_off = changes[-1][0]
    for t, mw in reversed(changes):
        if mw != 0.0:
            break
        t_off = t
    return max(t_off, after_ns)


@dataclass
class SafetyStats:
    """The P4 measurements (ms) and what went wrong, if anything."""

    heartbeat_timeout_ms: int = 500
    heartbeat_idle: dict | None = None  # the status "heartbeat" map after HEARTBEAT_IDLE_S idle
    heartbeat_loaded: dict | None = None  # the same, read right after streaming (P3), if given
    trip_ms: list[float] = field(default_factory=list)
    freeze_ms: list[float] = field(default_factory=list)
    kill_off_ms: float | None = None
    kill_stayed_off: bool | None = None
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The figures as a plain map."""
        def med_max(v):
            return (round(statistics.median(v), 1), round(max(v), 1)) if v else (None, None)

        def hb(m):
            return None if not m else (m.get("median_gap_ms"), m.get("max_gap_ms"), m.get("gaps"))

        return {
            "heartbeat_idle_gap_ms_median_max_n": hb(self.heartbeat_idle),
            "heartbeat_loaded_gap_ms_median_max_n": hb(self.heartbeat_loaded),
            "interlock_to_fault_ms_median_max": med_max(self.trip_ms),
            "interlock_trips": len(self.trip_ms),
            "freeze_to_output_off_ms_median_max": med_max(self.freeze_ms),
            "freezes": len(self.freeze_ms),
            "kill_to_output_off_ms": None if self.kill_off_ms is None else round(self.kill_off_ms, 1),
            "kill_stayed_off": self.kill_stayed_off,
            "problems": list(self.problems),
        }


def _start_streaming(client) -> None:
    to_safe(client)
    arm_and_emit(client, POWER_MW)
    client.call("acquire.start", {"mode": "fluorescence"}, timeout_s=15.0)


def _drain(client) -> None:
    while client.receive(0) is not None:
        pass


def _is_fault(topic: str, msg: dict) -> bool:
    if topic == "status":
        return msg.get("state") == "FAULT"
    if topic == "event":
        return msg.get("kind") == "fault" or (msg.get("kind") == "state" and msg.get("to") == "FAULT")
    return False


def measure_trip(cart: BenchCart, watcher, sender, timeout_s: float = 5.0) -> float:
    """One interlock trip while streaming: ms from just before the ``sim.set`` send until a
    FAULT status or event arrives at ``watcher`` (a client subscribed to status and event)."""
    _start_streaming(sender)
    time.sleep(STREAM_BEFORE_S)  # let the stream run, as in use
    _drain(watcher)
    sent = {}
    errors = []

    def send():
        sent["t_ns"] = time.time_ns()
        try:
            sender.call("sim.set", {"interlock": "open"}, timeout_s=timeout_s)
        except Exception as err:  # reported by the caller
            errors.append(err)

    thread = threading.Thread(target=send, name="trip-sender", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        arrived_ns = None
        while (left := deadline - time.monotonic()) > 0:
            got = watcher.receive(left)
            if got is None:
                continue
            if _is_fault(got[0], got[1]):
                arrived_ns = time.time_ns()
                break
        thread.join(timeout_s)
        if errors:
            raise errors[0]
        if arrived_ns is None:
            raise TimeoutError(f"no FAULT on telemetry within {timeout_s} s of opening the interlock")
        return (arrived_ns - sent["t_ns"]) / 1e6
    finally:
        thread.join(timeout_s)
        sender.call("sim.set", {"interlock": "closed"}, timeout_s=timeout_s)


def measure_freeze(cart: BenchCart, client, world: WorldWatch) -> float:
    """One controller freeze while streaming: ms from SIGSTOP until the optical output went
    off for good (the world's own time of that change)."""
    _start_streaming(client)
    time.sleep(STREAM_BEFORE_S)
    pid = cart.pids().get("controller")
    if pid is None:
        raise RuntimeError("no controller process found")
    world.drain()
    t_stop_ns = time.time_ns()
    os.kill(pid, signal.SIGSTOP)
    try:
        changes = world.laser_changes(cart.heartbeat_timeout_ms / 1000.0 + 1.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    t_off = off_for_good_ns(changes, t_stop_ns)
    if t_off is None:
        raise RuntimeError(f"the output was still on {cart.heartbeat_timeout_ms + 1000} ms after the freeze")
    # the controller, continued, finds the MCU's latched watchdog fault; clear it for the next round
    client.wait_for("status", lambda m: m["state"] == "FAULT", timeout_s=5.0)
    to_safe(client)
    return (t_off - t_stop_ns) / 1e6


def measure_kill(cart: BenchCart, client, world: WorldWatch) -> tuple[float | None, bool]:
    """SIGKILL of the controller while streaming: (ms until the output went off, whether it
    then stayed off for ``KILL_HOLD_S``). Leaves the cart unusable."""
    _start_streaming(client)
    time.sleep(STREAM_BEFORE_S)
    pids = cart.pids()
    if "controller" not in pids:
        raise RuntimeError("no controller process found")
    # freeze the launcher: seeing a child die, it would stop the simulated hardware too
    os.kill(pids["launcher"], signal.SIGSTOP)
    world.drain()
    t_kill_ns = time.time_ns()
    os.kill(pids["controller"], signal.SIGKILL)
    window_s = (cart.heartbeat_timeout_ms + KILL_MARGIN_MS) / 1000.0
    changes = world.laser_changes(window_s)
    t_off = off_for_good_ns(changes, t_kill_ns)
    later = world.laser_changes(KILL_HOLD_S)
    values = world.next_values(2.0)
    stayed_off = (t_off is not None and all(mw == 0.0 for _, mw in later)
                  and values is not None and values.get("laser_output_mw") == 0.0)
    # the launcher stays frozen; BenchCart.stop() continues and ends the whole group
    return (None if t_off is None else (t_off - t_kill_ns) / 1e6), stayed_off


def measure_heartbeat_idle(client, idle_s: float = HEARTBEAT_IDLE_S) -> dict:
    """S16: the cart idle in SAFE for ``idle_s``, then the sender's own figures (the status
    ``heartbeat`` map: gaps over the last 60 s)."""
    to_safe(client)
    client.call("acquire.stop")
    time.sleep(idle_s)
    return dict(client.call("status")["heartbeat"])


def run_on(cart: BenchCart, *, trips: int = 10, freezes: int = 5, kill: bool = True,
           heartbeat_idle_s: float = HEARTBEAT_IDLE_S, heartbeat_loaded: dict | None = None) -> SafetyStats:
    """The S16 heartbeat figure (idle), then all P4 measurements on a running cart (with
    ``kill``, the cart is dead afterwards). ``heartbeat_loaded`` is a status ``heartbeat`` map
    read right after a streaming run, reported beside the idle one."""
    stats = SafetyStats(heartbeat_timeout_ms=cart.heartbeat_timeout_ms, heartbeat_loaded=heartbeat_loaded)
    watcher = cart.client()
    watcher.subscribe("status", "event")
    sender = cart.client()
    sender.subscribe("status")
    world = WorldWatch(cart.world_pub_endpoint())
    try:
        if heartbeat_idle_s > 0:
            try:
                stats.heartbeat_idle = measure_heartbeat_idle(sender, heartbeat_idle_s)
            except Exception as err:
                stats.problems.append(f"heartbeat: {err}")
                log.warning("heartbeat measurement failed: %s", err)
        for i in range(trips):
            try:
                stats.trip_ms.append(measure_trip(cart, watcher, sender))
            except Exception as err:
                stats.problems.append(f"interlock trip {i + 1}: {err}")
                log.warning("interlock trip %d failed: %s", i + 1, err)
        for i in range(freezes):
            try:
                stats.freeze_ms.append(measure_freeze(cart, sender, world))
            except Exception as err:
                stats.problems.append(f"freeze {i + 1}: {err}")
                log.warning("freeze %d failed: %s", i + 1, err)
        if kill:
            try:
                stats.kill_off_ms, stats.kill_stayed_off = measure_kill(cart, sender, world)
            except Exception as err:
                stats.problems.append(f"kill: {err}")
                log.warning("kill measurement failed: %s", err)
    finally:
        world.close()
    return stats


def verdicts(s: SafetyStats) -> list[tuple[str, str, str, bool]]:
    """(figure, measured, target, met) rows for the summary table."""
    rows = []
    hb = s.heartbeat_idle
    if hb and hb.get("median_gap_ms") is not None:
        interval = float(hb["interval_ms"])
        rows.append(("S16 heartbeat gap idle 60 s (median/max)",
                     f"{hb['median_gap_ms']:.1f}/{hb['max_gap_ms']:.1f} ms",
                     f"{interval:.0f}+-{HEARTBEAT_MEDIAN_TOLERANCE_MS:.0f}/<={interval + HEARTBEAT_MAX_EXTRA_MS:.0f} ms",
                     abs(hb["median_gap_ms"] - interval) <= HEARTBEAT_MEDIAN_TOLERANCE_MS
                     and hb["max_gap_ms"] <= interval + HEARTBEAT_MAX_EXTRA_MS))
    else:
        rows.append(("S16 heartbeat gap idle 60 s", "not measured", "", False))
    hl = s.heartbeat_loaded
    if hl and hl.get("max_gap_ms") is not None:
        half = s.heartbeat_timeout_ms / 2.0
        rows.append(("S16 heartbeat gap while streaming (median/max)",
                     f"{hl['median_gap_ms']:.1f}/{hl['max_gap_ms']:.1f} ms", f"max < {half:.0f} ms",
                     hl["max_gap_ms"] < half))
    if s.trip_ms:
        rows.append(("P4 interlock open to FAULT (median/max)",
                     f"{statistics.median(s.trip_ms):.0f}/{max(s.trip_ms):.0f} ms",
                     f"< {TARGET_TRIP_MS:.0f} ms", max(s.trip_ms) < TARGET_TRIP_MS))
    else:
        rows.append(("P4 interlock open to FAULT", "not measured", f"< {TARGET_TRIP_MS:.0f} ms", False))
    freeze_target = s.heartbeat_timeout_ms + FREEZE_MARGIN_MS
    if s.freeze_ms:
        rows.append(("P4 frozen host to output off (median/max)",
                     f"{statistics.median(s.freeze_ms):.0f}/{max(s.freeze_ms):.0f} ms",
                     f"< {freeze_target:.0f} ms", max(s.freeze_ms) < freeze_target))
    else:
        rows.append(("P4 frozen host to output off", "not measured", f"< {freeze_target:.0f} ms", False))
    kill_target = s.heartbeat_timeout_ms + KILL_MARGIN_MS
    if s.kill_stayed_off is None:
        rows.append(("P4 killed controller leaves output off", "not measured", "off, stays off", False))
    else:
        measured = ("never off" if s.kill_off_ms is None else
                    f"off {s.kill_off_ms:.0f} ms, {'stayed off' if s.kill_stayed_off else 'CAME BACK ON'}")
        rows.append(("P4 killed controller leaves output off", measured,
                     f"< {kill_target:.0f} ms, stays", bool(s.kill_stayed_off) and s.kill_off_ms is not None
                     and s.kill_off_ms < kill_target))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Start a cart, measure P4 and print the figures; exit status 0 (a benchmark reports)."""
    from bench.e2e import EXPOSURE_US, FPS, HEIGHT, WIDTH

    parser = argparse.ArgumentParser(description="P4: safety reaction times on the simulated cart")
    parser.add_argument("--trips", type=int, default=10)
    parser.add_argument("--freezes", type=int, default=5)
    parser.add_argument("--idle", type=float, default=HEARTBEAT_IDLE_S,
                        help="seconds idle for the heartbeat figure (0: skip it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cart = BenchCart(width=WIDTH, height=HEIGHT, fps=FPS, exposure_us=EXPOSURE_US)
    try:
        cart.start()
        s = run_on(cart, trips=max(0, args.trips), freezes=max(0, args.freezes), heartbeat_idle_s=max(0.0, args.idle))
    finally:
        cart.stop()
    for name, value in s.summary().items():
        print(f"  {name:36s} {value}")
    for name, measured, target, met in verdicts(s):
        print(f"  {name:42s} {measured:>28s}  target {target:18s} {'PASS' if met else 'MISS'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
