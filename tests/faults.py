"""Helpers for the fault-injection suite (tests/test_fault_injection.py).

They drive the whole simulated cart from the outside, the way a technician and a hostile
world would: an operator client on the bus, a probe on the simulated hardware's own
sockets that reports the TRUE laser output (not what the controller believes), the
processes' ids for freezing and killing, the audit log, and a record of every committed
capture so a later check can prove that no case record or frame file was lost or damaged.

Every wait here has a deadline; nothing loops without bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import signal
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import msgpack
import pytest
import zmq
import zmq.auth

from nirf.services.cli.client import CartClient

log = logging.getLogger(__name__)

# The long form: more repetitions and longer fault durations (make test runs the short one).
LONG = os.environ.get("NIRF_FAULTS_LONG", "") not in ("", "0")

# Module names the launcher runs its children under (what /proc/<pid>/cmdline shows).
HARDWARE = "nirf.sim.hardware"
CONTROLLER = "nirf.controller.main"  # the safety core: it owns the laser link
PROCESSING = "nirf.services.processing.main"

# Generous bounds: this machine is shared and noisy. The product targets are tighter
# (PRODUCT.md P4); the benchmarks measure those.
MARGIN_S = 0.5


def reps(short: int, long: int) -> int:
    """How many repetitions a scenario makes in the current form."""
    return long if LONG else short


def hold_s(short: float, long: float) -> float:
    """How long a fault is held in the current form."""
    return long if LONG else short


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


# ---------------------------------------------------------------------- the operator
class Operator:
    """An operator on the cart's bus: requests with timeouts, and the status, event and
    result telemetry with timeouts on every receive."""

    _names = itertools.count()

    def __init__(self, cart, topics=("status", "event", "result"), key_file: Path | None = None):
        self.ctx = zmq.Context()
        self.client = CartClient.from_state_dir(cart.state_dir, cart.control, cart.telemetry,
                                                key_file=key_file, context=self.ctx)
        self.client.subscribe(*topics)
        self.last_status: dict | None = None

    # -- requests
    def call(self, cmd: str, args: dict | None = None, timeout_s: float = 10.0) -> dict:
        """The whole reply map (``ok`` true or false)."""
        return self.client.request(cmd, args, timeout_s)

    def ok(self, cmd: str, args: dict | None = None, timeout_s: float = 10.0):
        """The result of a request that must succeed."""
        reply = self.call(cmd, args, timeout_s)
        assert reply.get("ok"), f"{cmd} {args or ''} failed: {reply}"
        return reply["result"]

    def error_code(self, cmd: str, args: dict | None = None, timeout_s: float = 10.0) -> tuple[str, str]:
        """``(code, message)`` of a request that must fail."""
        reply = self.call(cmd, args, timeout_s)
        assert not reply.get("ok"), f"{cmd} {args or ''} unexpectedly succeeded: {reply}"
        return reply["error"]["code"], reply["error"]["message"]

    # -- telemetry
    def wait(self, topic: str, predicate=lambda m: True, timeout_s: float = 10.0) -> dict:
        """The next ``topic`` message matching ``predicate``; AssertionError after the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {topic} message matching the condition within {timeout_s} s; "
                                     f"last status: {_brief(self.last_status)}")
            got = self.client.receive(remaining)
            if got is None:
                continue
            t, msg, _ = got
            if t == "status":
                self.last_status = msg
            if t == topic and predicate(msg):
                return msg

    def wait_state(self, state: str, timeout_s: float = 10.0, predicate=lambda m: True) -> dict:
        """The next status in ``state`` (and matching ``predicate``)."""
        return self.wait("status", lambda m: m["state"] == state and predicate(m), timeout_s)

    def drain(self, max_messages: int = 100_000) -> int:
        """Drop what telemetry is queued (bounded), so later waits see fresh messages."""
        n = 0
        while n < max_messages and self.client.receive(0) is not None:
            n += 1
        return n

    def close(self) -> None:
        self.client.close()
        self.ctx.destroy(linger=0)

    # -- common sequences
    def to_safe(self, timeout_s: float = 15.0) -> None:
        """Bring the cart back to SAFE with a healthy simulated world (between scenarios)."""
        self.ok("sim.set", {"interlock": "closed", "key": True,
                            "fault": {"camera_stall": False, "serial_corruption": 0.0, "mcu_overtemp": False,
                                      "wheel_stuck": False, "photodiode_gain": 1.0, "gate_leak": 0.0}})
        self.call("acquire.stop")
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            st = self.ok("status")
            if st["state"] == "SAFE" and not st["faults"]:
                return
            if st["state"] == "FAULT":
                last = self.call("fault.reset")
            else:
                last = self.call("disarm")
            if not last.get("ok"):
                time.sleep(0.2)  # a cause may take a moment to clear (link, temperature)
        raise AssertionError(f"the cart did not return to SAFE within {timeout_s} s: last reply {last}")

    def emit(self, power_mw: float = 50.0, fluorescence: bool = True, timeout_s: float = 10.0) -> None:
        """From SAFE: arm, wait the emission delay, laser on, and (optionally) start the
        fluorescence acquisition and wait for its first result."""
        self.ok("arm")
        self.wait_state("ARMED", timeout_s)
        self.ok("laser.on", {"power_mw": power_mw})
        self.wait_state("EMITTING", timeout_s, lambda m: m["laser"]["on"])
        if fluorescence:
            self.ok("acquire.start", {"mode": "fluorescence"})
            self.wait("result", timeout_s=timeout_s)


def _brief(status: dict | None) -> str:
    if not status:
        return "none"
    return f"state={status.get('state')} faults={[f['code'] for f in status.get('faults', [])]} " \
           f"laser={status.get('laser')}"


def fault_codes(status: dict) -> list[str]:
    return [f["code"] for f in status.get("faults", [])]


# ---------------------------------------------------------------------- the true laser output
class WorldProbe:
    """The simulated hardware's own view: its control socket (``get``, ``set``, ``unplug``,
    ``replug``) and a follower of its event stream that keeps every laser output change,
    so the history survives the hardware process's exit."""

    def __init__(self, runtime_dir: Path, timeout_s: float = 2.0):
        self.ctx = zmq.Context()
        self.ctl_endpoint = f"ipc://{Path(runtime_dir) / 'world.ctl'}"
        self.pub_endpoint = f"ipc://{Path(runtime_dir) / 'world.pub'}"
        self.timeout_s = timeout_s
        self._req: zmq.Socket | None = None
        self._lock = threading.Lock()
        self.laser_events: deque[tuple[int, float]] = deque(maxlen=200_000)
        self.values: dict = {}
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="world-probe", daemon=True)
        self._thread.start()
        self._subscribed.wait(2.0)

    # -- requests
    def request(self, req: dict, timeout_s: float | None = None) -> dict:
        """One request; TimeoutError when the hardware does not answer (the socket is then
        replaced: a REQ that lost its reply cannot send again)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self._req is None:
            self._req = self.ctx.socket(zmq.REQ)
            self._req.setsockopt(zmq.LINGER, 0)
            self._req.connect(self.ctl_endpoint)
        self._req.send(msgpack.packb(req, use_bin_type=True))
        if not self._req.poll(int(timeout_s * 1000)):
            self._req.close(linger=0)
            self._req = None
            raise TimeoutError(f"the simulated hardware did not answer {req.get('op')!r} within {timeout_s} s")
        reply = msgpack.unpackb(self._req.recv(), raw=False, strict_map_key=False)
        assert reply.get("ok"), f"the simulated hardware refused {req}: {reply}"
        return reply

    def get(self) -> dict:
        return self.request({"op": "get"})

    def output_mw(self) -> float:
        """The optical output right now, from the hardware itself."""
        return float(self.get()["values"]["laser_output_mw"])

    def set(self, changes: dict) -> dict:
        """``sim.set`` straight on the world, bypassing the controller (which may be busy)."""
        return self.request({"op": "set", "changes": changes})["values"]

    def unplug(self, port: str) -> None:
        self.request({"op": "unplug", "port": port})

    def replug(self, port: str) -> None:
        self.request({"op": "replug", "port": port})

    # -- the laser history
    def _follow(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        for topic in (b"laser", b"values"):
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.connect(self.pub_endpoint)
        self._subscribed.set()
        try:
            while not self._stop.is_set():
                if not sub.poll(50):
                    continue
                try:
                    topic, body = sub.recv_multipart()
                    msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
                except (ValueError, zmq.ZMQError):
                    continue
                with self._lock:
                    if topic == b"laser":
                        self.laser_events.append((int(msg["t_ns"]), float(msg["mw"])))
                    else:
                        self.values = msg
        finally:
            sub.close(linger=0)

    def events(self) -> list[tuple[int, float]]:
        """Every laser output change seen so far (merged with the hardware's own history
        when it still answers), sorted by time."""
        with self._lock:
            seen = set(self.laser_events)
        with contextlib.suppress(TimeoutError, AssertionError, zmq.ZMQError):
            seen.update((int(t), float(mw)) for t, mw in self.get()["laser"])
        return sorted(seen)

    def lit_after(self, t_ns: int) -> list[tuple[int, float]]:
        """Output changes to a non-zero power at or after ``t_ns``."""
        return [(t, mw) for t, mw in self.events() if t >= t_ns and mw > 0]

    def last_off_ns(self) -> int | None:
        """When the output last went to zero (None when it is lit now or never was)."""
        events = self.events()
        if not events or events[-1][1] > 0:
            return None
        for (t_prev, mw_prev), (t, mw) in zip(reversed(events[:-1]), reversed(events)):
            if mw_prev > 0:
                return t
        return events[0][0]

    def was_lit_between(self, t0_ns: int, t1_ns: int) -> bool:
        """True when the output was above zero at any time in [t0, t1]."""
        events = self.events()
        value = 0.0
        for t, mw in events:
            if t <= t0_ns:
                value = mw
        if value > 0:
            return True
        return any(t0_ns < t <= t1_ns and mw > 0 for t, mw in events)

    def wait_dark(self, timeout_s: float, what: str, quiet_s: float = 0.25) -> int:
        """Wait until the output has stayed at zero for ``quiet_s`` (longer than a pair's
        dark frame, so a modulated laser between two lit frames does not count); the time
        it went dark."""
        def dark_since():
            if self.output_mw() != 0.0:
                return None
            off = self.last_off_ns()
            if off is None or time.time_ns() - off < quiet_s * 1e9:
                return None
            return off

        return wait_until(dark_since, timeout_s + quiet_s, what)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        if self._req is not None:
            self._req.close(linger=0)
        self.ctx.destroy(linger=0)


# ---------------------------------------------------------------------- processes
def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces: split after the last one
    return int(stat.rsplit(")", 1)[1].split()[1])


def child_pid(cart, module: str) -> int:
    """The pid of the launcher's child running ``python -m <module>``."""
    launcher = cart.proc.pid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if _ppid(pid) != launcher:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in argv:
            return pid
    raise AssertionError(f"no child of the launcher (pid {launcher}) runs {module}")


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[int]:
    """SIGSTOP ``pid`` for the block; SIGCONT whatever happens (no process is left frozen)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------- the audit log
def read_audit(state_dir: Path) -> list[dict]:
    """Every record of ``<state_dir>/audit.jsonl``; a line that is not one JSON object with
    ``t_ns`` and ``kind`` fails the test (the log must never be corrupt)."""
    path = Path(state_dir) / "audit.jsonl"
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise AssertionError(f"audit.jsonl line {n} is not JSON ({err}): {line[:200]!r}") from err
        assert isinstance(rec, dict) and "t_ns" in rec and "kind" in rec, f"audit.jsonl line {n}: {rec!r}"
        records.append(rec)
    return records


def audit_since(state_dir: Path, t_ns: int, kind: str | None = None) -> list[dict]:
    """Audit records written at or after ``t_ns`` (of one ``kind`` when given)."""
    return [r for r in read_audit(state_dir) if r["t_ns"] >= t_ns and (kind is None or r["kind"] == kind)]


def wait_audit(state_dir: Path, t_ns: int, kind: str, predicate=lambda r: True, timeout_s: float = 5.0) -> dict:
    """The first audit record of ``kind`` since ``t_ns`` matching ``predicate`` (the log is
    written by the controller's status thread, a moment after the event)."""
    def find():
        return next((r for r in audit_since(state_dir, t_ns, kind) if predicate(r)), None)

    return wait_until(find, timeout_s, f"an audit record of kind {kind!r} matching the condition")


# ---------------------------------------------------------------------- committed study data
class StudyData:
    """Opens a case, captures, and remembers each committed capture's files (with their
    SHA-256) so :meth:`verify` can prove later that nothing was lost or damaged.

    While the clinical commands are not in the controller yet (``case.open`` or
    ``capture`` answer UNKNOWN_COMMAND), :meth:`verify` skips with that reason; it is
    called last in each scenario, so only the data-integrity part is skipped.
    """

    CASE_ID = "FI-0001"

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.unavailable: str | None = None
        self.case_open = False
        self.captures: dict[str, dict[Path, str]] = {}

    def _open_case(self, op: Operator) -> bool:
        if self.case_open:
            return True
        injected = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 24 * 3600))
        reply = op.call("case.open", {"case_id": self.CASE_ID, "histology": "DFSP", "arm": "icg_25mg",
                                      "injection_time": injected})
        if not reply["ok"]:
            code = reply["error"]["code"]
            if code == "UNKNOWN_COMMAND":
                self.unavailable = "case.open answers UNKNOWN_COMMAND (the clinical commands are not in yet)"
                return False
            if code != "WRONG_STATE":  # WRONG_STATE: our case is already open
                raise AssertionError(f"case.open failed: {reply}")
        self.case_open = True
        return True

    def capture(self, op: Operator, site: str = "tumor_bed", pairs: int = 2, timeout_s: float = 30.0) -> dict | None:
        """One capture while EMITTING with the fluorescence acquisition running; its files
        are hashed at once. None when the clinical commands are missing."""
        if self.unavailable or not self._open_case(op):
            return None
        reply = op.call("capture", {"site": site, "label": "fault-injection", "pairs": pairs}, timeout_s)
        if not reply["ok"] and reply["error"]["code"] == "UNKNOWN_COMMAND":
            self.unavailable = "capture answers UNKNOWN_COMMAND (the clinical commands are not in yet)"
            return None
        assert reply["ok"], f"capture before the fault failed: {reply}"
        return self.committed(reply["result"])

    def committed(self, result: dict) -> dict:
        """Remember a capture the cart reported as committed, hashing its files now."""
        self.captures[result["capture_id"]] = {p: _sha256(p) for p in self._paths(result.get("files"))}
        return result

    def _paths(self, files) -> list[Path]:
        items = files.values() if isinstance(files, dict) else (files or [])
        paths = []
        for item in items:
            if isinstance(item, dict):
                item = item.get("path") or item.get("file")
            if isinstance(item, (list, tuple)):
                paths += self._paths(list(item))
                continue
            if isinstance(item, str):
                p = Path(item)
                paths.append(p if p.is_absolute() else self.state_dir / p)
        return paths

    def verify(self) -> None:
        """Every committed capture is still in the case database and every one of its frame
        files is present, unchanged and readable. Skips while the commands are missing."""
        if self.unavailable:
            pytest.skip(f"data-integrity check skipped: {self.unavailable}")
        if not self.captures:
            pytest.skip("data-integrity check skipped: no capture was committed in this cart")
        from nirf.services.study.tiff import read_tiff

        for capture_id, files in self.captures.items():
            for path, digest in files.items():
                assert path.exists(), f"capture {capture_id}: frame file {path} is gone"
                assert _sha256(path) == digest, f"capture {capture_id}: frame file {path} changed"
                read_tiff(path)  # raises on a damaged file
        databases = [p for p in self.state_dir.rglob("*") if p.suffix in (".db", ".sqlite", ".sqlite3")]
        assert databases, f"captures were committed but no case database exists under {self.state_dir}"
        found: set[str] = set()
        for db in databases:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
            try:
                assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", f"{db} is corrupt"
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if "captures" in tables:
                    found |= {r[0] for r in conn.execute("SELECT capture_id FROM captures")}
            finally:
                conn.close()
        missing = set(self.captures) - found
        assert not missing, f"committed captures missing from the case database: {sorted(missing)}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------- hostile clients
def curve_socket(ctx: zmq.Context, kind: int, cart, key_file: Path, server_public: bytes | None = None) -> zmq.Socket:
    """A socket with CURVE keys from ``key_file`` (the cart's server key unless given)."""
    keys = Path(cart.state_dir) / "keys"
    if server_public is None:
        server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
    public, secret = zmq.auth.load_certificate(str(key_file))
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    return sock
