"""Fault injection over the whole running simulated cart (hardware, controller and
processing in their own processes).

Each scenario injects one fault and checks four things: the TRUE laser output (from the
simulated hardware itself, not from the controller), the published state, what the audit
log says, and that no committed case record or frame file is lost or damaged (that last
part skips while the clinical commands are not in the controller yet).

The short form runs in ``make test``. The long form (``NIRF_FAULTS_LONG=1``) repeats the
scenarios and holds the faults longer; see docs/fault-injection.md.

Scenarios that kill a process get a cart of their own; the others share one. Killing a
child makes the launcher stop the whole cart, as it should, so those scenarios freeze the
launcher for a moment first: the rest of the cart then lives on the way it would under
systemd, and we can watch the MCU's watchdog turn the light off before releasing the
launcher and checking that it tears the cart down in order.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq

from nirf import config as config_mod
from tests import faults as fi
from tests.cartproc import ROOT, start_cart, wait_for_file

pytestmark = pytest.mark.e2e

WIDTH, HEIGHT = 728, 544
# Short moves time out quickly so the stuck-wheel scenario stays fast.
EXTRA = "[filter_wheel]\nmove_timeout_s = 1.0\n"
POWER_MW = 50.0


def _boot(tmp) -> tuple:
    cart = start_cart(tmp, width=WIDTH, height=HEIGHT, extra=EXTRA)
    try:
        cart.wait_for_keys()
        op = fi.Operator(cart)
        op.wait("status", timeout_s=60)
        assert wait_for_file(cart.runtime_dir / "hardware.json", 10)
        probe = fi.WorldProbe(cart.runtime_dir)
    except BaseException:
        cart.stop()
        raise
    cfg = config_mod.load(str(cart.config_path))
    return cart, op, probe, cfg


def _shutdown(cart, op, probe) -> None:
    # never leave a frozen launcher behind: it could not stop its children
    try:
        os.kill(cart.proc.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    op.close()
    probe.close()
    cart.stop()
    shutil.rmtree(cart.runtime_dir, ignore_errors=True)


class Rig:
    """One running cart with its operator, hardware probe, config and study data."""

    def __init__(self, cart, op, probe, cfg):
        self.cart, self.op, self.probe, self.cfg = cart, op, probe, cfg
        self.data = fi.StudyData(cart.state_dir)
        self.heartbeat_s = cfg.safety.heartbeat_timeout_ms / 1000.0
        self.stall_s = cfg.safety.camera_stall_s

    def pid(self, module: str) -> int:
        return fi.child_pid(self.cart, module)

    def audit_since(self, t_ns: int, kind: str | None = None) -> list[dict]:
        return fi.audit_since(self.cart.state_dir, t_ns, kind)

    def wait_audit(self, t_ns: int, kind: str, predicate=lambda r: True, timeout_s: float = 5.0) -> dict:
        return fi.wait_audit(self.cart.state_dir, t_ns, kind, predicate, timeout_s)

    def assert_dark_since(self, t_ns: int, what: str) -> None:
        """The hardware's output is zero now and was never lit after ``t_ns``."""
        assert self.probe.output_mw() == 0.0, f"{what}: the laser is emitting"
        lit = self.probe.lit_after(t_ns)
        assert not lit, f"{what}: the laser was lit again after it went dark: {lit[:3]}"

    def assert_lit_recently(self, window_s: float = 0.5) -> None:
        """The hardware emitted during the last ``window_s`` (pairs modulate it, so the
        instantaneous output alternates between lit and dark frames)."""
        now = time.time_ns()
        assert self.probe.was_lit_between(now - int(window_s * 1e9), now), \
            f"the laser was dark for the last {window_s} s although it should be emitting"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    cart, op, probe, cfg = _boot(tmp_path_factory.mktemp("faults"))
    rig = Rig(cart, op, probe, cfg)
    try:
        yield rig
    finally:
        _shutdown(cart, op, probe)


@pytest.fixture
def rig(shared):
    """The shared cart, back in SAFE with a healthy world before each scenario."""
    shared.op.to_safe()
    shared.op.drain()
    yield shared


@pytest.fixture(scope="module")
def wheel_cart(tmp_path_factory):
    """A cart for the wheel-port scenarios: an unplugged wheel stays disconnected (see the
    xfail below), which would break every later scenario on the shared cart."""
    cart, op, probe, cfg = _boot(tmp_path_factory.mktemp("wheel"))
    try:
        yield Rig(cart, op, probe, cfg)
    finally:
        _shutdown(cart, op, probe)


@pytest.fixture
def wheel_rig(wheel_cart):
    wheel_cart.op.to_safe()
    wheel_cart.op.drain()
    yield wheel_cart


@pytest.fixture
def own_rig(tmp_path):
    """A cart of its own, for a scenario that kills one of its processes."""
    cart, op, probe, cfg = _boot(tmp_path)
    rig = Rig(cart, op, probe, cfg)
    try:
        yield rig
    finally:
        _shutdown(cart, op, probe)


def _fault_event(rig: Rig, codes: set[str], timeout_s: float) -> dict:
    return rig.op.wait("event", lambda m: m.get("kind") == "fault" and m.get("code") in codes, timeout_s)


# ====================================================================== serial line
@pytest.mark.parametrize("rate", [0.02] + ([0.05, 0.1] if fi.LONG else []))
def test_low_rate_serial_corruption_is_retried_or_faults_safely(rig, rate):
    rig.op.emit(POWER_MW)
    rig.data.capture(rig.op)
    t0 = time.time_ns()
    rig.op.ok("sim.set", {"fault": {"serial_corruption": rate}})
    time.sleep(fi.hold_s(1.5, 10.0))  # the fault has to act for a while; there is no event to wait for
    status = rig.op.ok("status")
    if status["state"] == "FAULT":
        # too many damaged lines in a row: the bounded retries gave up, safely
        assert "SERIAL_LINK" in fi.fault_codes(status), status["faults"]
        rig.probe.wait_dark(rig.heartbeat_s + fi.MARGIN_S + 1.0, "the output after a serial-link fault")
        rig.wait_audit(t0, "fault", lambda r: r["code"] == "SERIAL_LINK")
    else:
        # the driver's retries absorbed the damage: still emitting, and truly lit
        assert status["state"] == "EMITTING" and status["laser"]["on"], status
        rig.assert_lit_recently()
    record = rig.wait_audit(t0, "sim.set")
    assert record["args"]["fault"]["serial_corruption"] == rate
    rig.op.ok("sim.set", {"fault": {"serial_corruption": 0.0}})
    rig.data.verify()


def test_heavy_serial_corruption_faults_and_the_laser_goes_off(rig):
    rig.op.emit(POWER_MW)
    rig.data.capture(rig.op)
    t0 = time.time_ns()
    rig.op.ok("sim.set", {"fault": {"serial_corruption": 1.0}})
    status = rig.op.wait_state("FAULT", timeout_s=10)
    assert "SERIAL_LINK" in fi.fault_codes(status), status["faults"]
    assert status["laser"]["on"] is False
    off_ns = rig.probe.wait_dark(rig.heartbeat_s + fi.MARGIN_S + 1.0, "the output after the serial-link fault")
    time.sleep(fi.hold_s(0.5, 5.0))
    rig.assert_dark_since(off_ns, "while the serial line stays corrupted")
    # the cause persists: the reset is refused and names it
    code, message = rig.op.error_code("fault.reset")
    assert code == "FAULT_ACTIVE", message
    rig.wait_audit(t0, "fault", lambda r: r["code"] == "SERIAL_LINK")
    rig.wait_audit(t0, "state", lambda r: r["to"] == "FAULT")
    # a clean line again: the controller reconnects and the reset goes through
    rig.op.ok("sim.set", {"fault": {"serial_corruption": 0.0}})
    rig.op.to_safe()
    rig.data.verify()


# ====================================================================== unplugged ports
def test_unplugged_mcu_port_turns_the_laser_off_and_replug_recovers(rig):
    for _ in range(fi.reps(1, 3)):
        rig.op.emit(POWER_MW)
        rig.data.capture(rig.op)
        rig.op.drain()
        t0 = time.time_ns()
        rig.probe.unplug("mcu")
        try:
            status = rig.op.wait_state("FAULT", timeout_s=10)
            assert "SERIAL_LINK" in fi.fault_codes(status), status["faults"]
            # no heartbeat reaches the MCU: its watchdog turns the output off
            off_ns = rig.probe.wait_dark(rig.heartbeat_s + fi.MARGIN_S + 1.0, "the output after the unplug")
            assert off_ns - t0 <= (rig.heartbeat_s + fi.MARGIN_S) * 1e9, \
                f"output off {(off_ns - t0) / 1e9:.3f} s after the unplug (watchdog {rig.heartbeat_s} s)"
            time.sleep(fi.hold_s(0.5, 3.0))
            rig.assert_dark_since(off_ns, "while the MCU is unplugged")
            code, message = rig.op.error_code("fault.reset")
            assert code == "FAULT_ACTIVE" and "link" in message, message
        finally:
            rig.probe.replug("mcu")
        # the controller reconnects on its own; then the fault can be reset
        rig.op.to_safe(timeout_s=15)
        status = rig.op.wait_state("SAFE", timeout_s=5)
        assert not status["faults"] and status["laser"]["temp_c"] is not None
        rig.wait_audit(t0, "fault", lambda r: r["code"] == "SERIAL_LINK")
        rig.wait_audit(t0, "info", lambda r: "restored" in r.get("message", ""))
        rig.wait_audit(t0, "command", lambda r: r["cmd"] == "fault.reset" and r["ok"])
    # and it can arm again over the restored link
    rig.op.ok("arm")
    rig.op.wait_state("ARMING", timeout_s=5)
    rig.op.ok("disarm")
    rig.data.verify()


def test_unplugged_wheel_port_is_reported_and_leaves_the_laser_alone(wheel_rig):
    wheel_rig.op.emit(POWER_MW)
    wheel_rig.data.capture(wheel_rig.op)
    wheel_rig.probe.unplug("wheel")
    try:
        code, message = wheel_rig.op.error_code("filter.move", {"position": 2})
        assert code in ("DEVICE_ERROR", "TIMEOUT") and "wheel" in message, message
        # a wheel problem does not touch the laser
        status = wheel_rig.op.ok("status")
        assert status["state"] == "EMITTING" and status["laser"]["on"] and not status["faults"], status
        wheel_rig.assert_lit_recently()
    finally:
        wheel_rig.probe.replug("wheel")
    wheel_rig.data.verify()


def test_replugged_wheel_port_is_used_again(wheel_rig):
    wheel_rig.probe.unplug("wheel")
    try:
        code, message = wheel_rig.op.error_code("filter.move", {"position": 2})
        assert "wheel" in message, message
    finally:
        wheel_rig.probe.replug("wheel")

    def moved():
        reply = wheel_rig.op.call("filter.move", {"position": 1})
        return reply["ok"] and reply["result"]["position"] == 1

    fi.wait_until(moved, 5, "filter.move to work again after the wheel's port came back", poll_s=0.3)


# ====================================================================== devices
def test_camera_stall_while_emitting_faults_and_the_camera_recovers(rig):
    rig.op.emit(POWER_MW)
    rig.data.capture(rig.op)
    rig.op.drain()
    t0 = time.time_ns()
    rig.op.ok("sim.set", {"fault": {"camera_stall": True}})
    event = _fault_event(rig, {"CAMERA_STALL"}, timeout_s=rig.stall_s + 5)
    assert event["t_ns"] - t0 <= (rig.stall_s + 1.5) * 1e9, \
        f"CAMERA_STALL {(event['t_ns'] - t0) / 1e9:.2f} s after the stall (limit {rig.stall_s} s)"
    status = rig.op.wait_state("FAULT", timeout_s=5)
    assert status["laser"]["on"] is False
    off_ns = rig.probe.wait_dark(2.0, "the output after the camera stall")
    time.sleep(fi.hold_s(0.3, 3.0))
    rig.assert_dark_since(off_ns, "after the camera stall")
    rig.wait_audit(t0, "fault", lambda r: r["code"] == "CAMERA_STALL")
    # the camera comes back (the controller restarts it): a new session produces results
    rig.op.ok("sim.set", {"fault": {"camera_stall": False}})
    rig.op.to_safe()
    rig.op.emit(POWER_MW)
    result = rig.op.wait("result", timeout_s=10)
    assert result["frame_seq"] is not None
    rig.data.verify()


def test_stuck_wheel_is_reported_and_the_laser_state_is_unchanged(rig):
    rig.op.emit(POWER_MW)
    rig.data.capture(rig.op)
    t0 = time.time_ns()
    rig.op.ok("sim.set", {"fault": {"wheel_stuck": True}})
    code, message = rig.op.error_code("filter.move", {"position": 3}, timeout_s=15)
    assert code in ("TIMEOUT", "DEVICE_ERROR") and "wheel" in message, message
    code, message = rig.op.error_code("acquire.start", {"mode": "dark"}, timeout_s=15)
    assert code in ("TIMEOUT", "DEVICE_ERROR") and "wheel" in message, message
    status = rig.op.ok("status")
    assert status["state"] == "EMITTING" and status["laser"]["on"] and not status["faults"], status
    rig.assert_lit_recently()
    failed = [r for r in rig.audit_since(t0, "command") if r["cmd"] in ("filter.move", "acquire.start")]
    assert failed and not any(r["ok"] for r in failed), failed
    assert not rig.audit_since(t0, "fault"), "a stuck wheel must not latch a laser fault"
    rig.op.ok("sim.set", {"fault": {"wheel_stuck": False}})

    def moved():
        reply = rig.op.call("filter.move", {"position": 1}, timeout_s=15)
        return reply["ok"] and reply["result"]["position"] == 1

    fi.wait_until(moved, 15, "the unstuck wheel to reach position 1", poll_s=0.3)
    rig.data.verify()


def test_overheated_laser_faults_and_the_laser_goes_off(rig):
    rig.op.emit(POWER_MW)
    rig.data.capture(rig.op)
    rig.op.drain()
    t0 = time.time_ns()
    rig.op.ok("sim.set", {"fault": {"mcu_overtemp": True}})
    status = rig.op.wait_state("FAULT", timeout_s=5)
    codes = set(fi.fault_codes(status))
    assert codes & {"OVER_TEMP", "MCU_OTEMP"}, codes
    assert status["laser"]["on"] is False
    off_ns = rig.probe.wait_dark(2.0, "the output after the over-temperature")
    time.sleep(fi.hold_s(0.3, 3.0))
    rig.assert_dark_since(off_ns, "while the laser is too hot")
    code, message = rig.op.error_code("fault.reset")
    assert code == "FAULT_ACTIVE", message
    rig.wait_audit(t0, "fault", lambda r: r["code"] in ("OVER_TEMP", "MCU_OTEMP"))
    rig.op.ok("sim.set", {"fault": {"mcu_overtemp": False}})
    rig.op.to_safe()
    rig.data.verify()


def test_interlock_opened_mid_capture_faults_at_once(rig):
    rig.op.emit(POWER_MW)
    rig.data.capture(rig.op)
    # a capture in progress when the loop opens (from a second operator: the first one
    # watches); with no clinical commands yet this thread only records that
    in_flight: dict = {}

    def long_capture():
        second = fi.Operator(rig.cart, topics=())
        try:
            in_flight["reply"] = second.call("capture", {"site": "specimen_cross_section", "label": "interrupted",
                                                         "pairs": 60}, timeout_s=30)
        except Exception as err:  # reported below, in the test's thread
            in_flight["error"] = err
        finally:
            second.close()

    worker = threading.Thread(target=long_capture, daemon=True)
    worker.start()
    time.sleep(0.3)  # let the capture begin
    rig.op.drain()
    t0 = time.time_ns()
    rig.probe.set({"interlock": "open"})  # the physical loop, straight on the world
    event = _fault_event(rig, {"INTERLOCK_OPEN"}, timeout_s=5)
    assert event["t_ns"] - t0 < 1e9, f"FAULT published {(event['t_ns'] - t0) / 1e9:.3f} s after the interlock opened"
    status = rig.op.wait_state("FAULT", timeout_s=5)
    assert status["laser"]["on"] is False and status["interlock"] == "open"
    # the loop is in series with the laser enable: the light stops at once
    off_ns = rig.probe.wait_dark(1.0, "the output after the interlock opened")
    assert off_ns - t0 < 1e9
    worker.join(timeout=35)
    assert not worker.is_alive(), "the interrupted capture never answered"
    assert "error" not in in_flight, f"the interrupted capture failed: {in_flight.get('error')!r}"
    reply = in_flight["reply"]
    if reply["ok"]:
        # finished before the trip: then it is committed data like any other
        rig.data.committed(reply["result"])
    else:
        assert reply["error"]["code"] != "", reply
    rig.wait_audit(t0, "input", lambda r: r["name"] == "interlock" and r["value"] is False)
    rig.wait_audit(t0, "fault", lambda r: r["code"] == "INTERLOCK_OPEN")
    rig.wait_audit(t0, "state", lambda r: r["to"] == "FAULT")
    time.sleep(fi.hold_s(0.3, 3.0))
    rig.assert_dark_since(off_ns, "while the interlock is open")
    code, message = rig.op.error_code("fault.reset")
    assert code == "FAULT_ACTIVE" and "interlock" in message, message
    rig.op.to_safe()
    rig.data.verify()


# ====================================================================== frozen processes
def test_frozen_controller_lets_the_mcu_watchdog_turn_the_laser_off(rig):
    for _ in range(fi.reps(1, 3)):
        rig.op.emit(POWER_MW)
        rig.data.capture(rig.op)
        pid = rig.pid(fi.CONTROLLER)
        with fi.frozen(pid):
            t0 = time.time_ns()
            off_ns = rig.probe.wait_dark(rig.heartbeat_s + fi.MARGIN_S + 2.0, "the output with the controller frozen")
            assert off_ns - t0 <= (rig.heartbeat_s + fi.MARGIN_S) * 1e9, \
                f"output off {(off_ns - t0) / 1e9:.3f} s after the freeze (watchdog {rig.heartbeat_s} s)"
            time.sleep(fi.hold_s(0.5, 5.0))
            rig.assert_dark_since(off_ns, "while the controller is frozen")
        rig.op.drain()
        status = rig.op.wait_state("FAULT", timeout_s=10, predicate=lambda m: "MCU_WDOG" in fi.fault_codes(m))
        assert status["laser"]["on"] is False
        time.sleep(0.5)
        rig.assert_dark_since(off_ns, "after the controller woke up")
        rig.wait_audit(t0, "fault", lambda r: r["code"] == "MCU_WDOG")
        rig.op.to_safe()
    rig.data.verify()


def test_frozen_processing_leaves_the_laser_alone(rig):
    rig.op.emit(POWER_MW)
    rig.data.capture(rig.op)
    t0 = time.time_ns()
    with fi.frozen(rig.pid(fi.PROCESSING)):
        time.sleep(0.5)  # results already on their way may still arrive
        rig.op.drain()
        hold = fi.hold_s(1.5, 6.0)
        with pytest.raises(AssertionError):
            rig.op.wait("result", timeout_s=hold)
        assert rig.op.ok("ping")["profile"] == "sim"
        status = rig.op.ok("status")
        assert status["state"] == "EMITTING" and status["laser"]["on"] and not status["faults"], status
        rig.assert_lit_recently()
    # it catches up once thawed
    rig.op.wait("result", timeout_s=10)
    assert not rig.audit_since(t0, "fault"), "a frozen processing service must not trip the laser"
    rig.data.verify()


def test_frozen_hardware_faults_and_the_laser_is_off_after(rig):
    rig.op.emit(POWER_MW)
    rig.data.capture(rig.op)
    rig.op.drain()
    t0 = time.time_ns()
    with fi.frozen(rig.pid(fi.HARDWARE)):
        status = rig.op.wait_state("FAULT", timeout_s=10)
        assert "SERIAL_LINK" in fi.fault_codes(status), status["faults"]
        assert status["laser"]["on"] is False
        assert rig.op.ok("ping", timeout_s=10)["profile"] == "sim"
        time.sleep(fi.hold_s(0.5, 3.0))
        thawed_ns = time.time_ns()
    # the MCU wakes up to an overdue heartbeat (or the controller's "off"): light off
    off_ns = rig.probe.wait_dark(rig.heartbeat_s + fi.MARGIN_S + 2.0, "the output after the hardware thawed")
    assert off_ns - thawed_ns <= (rig.heartbeat_s + fi.MARGIN_S) * 1e9
    time.sleep(0.5)
    rig.assert_dark_since(off_ns, "after the hardware thawed")
    rig.wait_audit(t0, "state", lambda r: r["to"] == "FAULT")
    rig.wait_audit(t0, "fault")
    rig.op.to_safe(timeout_s=20)
    rig.data.verify()


def test_a_lost_hardware_link_is_published_and_audited_as_serial_link(rig):
    rig.op.emit(POWER_MW, fluorescence=False)
    rig.op.drain()
    t0 = time.time_ns()
    try:
        with fi.frozen(rig.pid(fi.HARDWARE)):
            _fault_event(rig, {"SERIAL_LINK"}, timeout_s=4)
        rig.wait_audit(t0, "fault", lambda r: r["code"] == "SERIAL_LINK", timeout_s=2)
    finally:
        rig.op.to_safe(timeout_s=20)


# ====================================================================== the bus under abuse
def test_slow_subscribers_do_not_slow_the_controller(rig):
    rig.op.emit(POWER_MW)
    ctx = zmq.Context()
    key = rig.cart.state_dir / "keys" / "local-operator.key_secret"
    slow = []
    try:
        for _ in range(fi.reps(3, 8)):
            s = fi.curve_socket(ctx, zmq.SUB, rig.cart, key)
            s.setsockopt(zmq.RCVHWM, 1)
            s.setsockopt(zmq.RCVBUF, 4096)
            s.setsockopt(zmq.SUBSCRIBE, b"")  # everything, previews included, and never read
            s.connect(rig.cart.telemetry)
            slow.append(s)
        time.sleep(0.5)  # let their queues fill
        rig.op.drain()
        window_s = fi.hold_s(2.0, 15.0)
        t_end = time.monotonic() + window_s
        statuses = results = 0
        while time.monotonic() < t_end:
            got = rig.op.client.receive(max(0.0, t_end - time.monotonic()))
            if got is None:
                continue
            statuses += got[0] == "status"
            results += got[0] == "result"
        assert statuses >= math.floor(2 * window_s) - 1, f"{statuses} status messages in {window_s} s (>= 2 Hz)"
        assert results > 0, "results stopped while slow subscribers were connected"
        assert rig.op.ok("ping")["profile"] == "sim"
        status = rig.op.ok("status")
        assert status["state"] == "EMITTING" and status["laser"]["on"], status
        rig.assert_lit_recently()
    finally:
        for s in slow:
            s.close(linger=0)
        ctx.destroy(linger=0)


def _garbage(rng: random.Random) -> list[bytes]:
    """Frames no valid client sends, and commands that must be refused without effect."""
    deep: object = 1
    for _ in range(200):
        deep = [deep]
    out = [
        b"", b"\xc1", b"\xff" * 17, bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300))),
        msgpack.packb([1, 2, 3]), msgpack.packb("ping"), msgpack.packb(None),
        msgpack.packb({"id": 5, "cmd": "ping"}), msgpack.packb({"id": "x" * 65, "cmd": "ping"}),
        msgpack.packb({"id": "a", "cmd": 7}), msgpack.packb({"id": "a", "cmd": "ping", "args": [1]}),
        msgpack.packb({"id": "a", "cmd": "no.such.command"}),
        msgpack.packb({"id": "a", "cmd": "laser.set", "args": {"power_mw": float("nan")}}),
        msgpack.packb({"id": "a", "cmd": "laser.set", "args": {"power_mw": float("inf")}}),
        msgpack.packb({"id": "a", "cmd": "laser.set", "args": {"power_mw": 1e9}}),
        msgpack.packb({"id": "a", "cmd": "laser.set", "args": {"power_mw": "lots"}}),
        msgpack.packb({"id": "a", "cmd": "filter.move", "args": {"position": 99}}),
        msgpack.packb({"id": "a", "cmd": "camera.set", "args": {"fps": -1}}),
        msgpack.packb({"id": "a", "cmd": "sim.set", "args": {"fault": {"serial_corruption": 7}}}),
        msgpack.packb({"id": "a", "cmd": "roi.set", "args": {"signal": "everything"}}),
        msgpack.packb({"id": "a", "cmd": "status", "args": {"deep": deep}}),
        msgpack.packb({"id": "a", "cmd": "ping", "args": {str(i): i for i in range(300)}}),
    ]
    for _ in range(8):  # random maps that look almost like requests
        out.append(msgpack.packb({"id": f"r{rng.randrange(1000)}",
                                  "cmd": rng.choice(["ping", "pong", "laser.onn", "", "\u00e9t\u00e9"]),
                                  "args": {rng.choice(["x", "power_mw", "mode"]): rng.choice([None, -1, "?", [], {}])}}))
    return out


def _read_only(payload: bytes) -> bool:
    """True for a well-formed ``ping`` or ``status`` request (which may succeed)."""
    try:
        req = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError):
        return False
    return isinstance(req, dict) and req.get("cmd") in ("ping", "status")


# What a refusal may say; anything else (a success, a crash code) would be a fault.
REFUSALS = {"BAD_REQUEST", "INVALID_ARGUMENT", "UNKNOWN_COMMAND", "WRONG_STATE"}


def test_garbage_and_oversized_messages_from_many_clients_change_nothing(rig):
    rig.op.emit(POWER_MW)
    before = rig.op.ok("status")
    t0 = time.time_ns()
    key = rig.cart.state_dir / "keys" / "local-operator.key_secret"
    ctx = zmq.Context()
    problems: list[str] = []
    answered = itertools.count()

    def sender(seed: int) -> None:
        rng = random.Random(seed)
        sock = fi.curve_socket(ctx, zmq.DEALER, rig.cart, key)
        sock.connect(rig.cart.control)
        try:
            for _ in range(fi.reps(1, 5)):
                for payload in _garbage(rng):
                    sock.send_multipart([b"", payload])
                    if not sock.poll(5000):
                        problems.append(f"no answer to {payload[:40]!r}")
                        continue
                    frames = sock.recv_multipart()
                    reply = msgpack.unpackb(frames[-1], raw=False)
                    next(answered)
                    if not isinstance(reply, dict):
                        problems.append(f"{payload[:40]!r} got {reply!r}")
                    elif reply.get("ok") is not False:
                        if _read_only(payload):  # ping and status ignore stray arguments: harmless
                            continue
                        problems.append(f"{payload[:40]!r} was accepted: {reply!r}")
                    elif reply["error"]["code"] not in REFUSALS:
                        problems.append(f"{payload[:40]!r} got {reply!r}")
        finally:
            sock.close(linger=0)

    def oversized(seed: int) -> None:
        sock = fi.curve_socket(ctx, zmq.DEALER, rig.cart, key)
        sock.connect(rig.cart.control)
        try:
            big = msgpack.packb({"id": f"big{seed}", "cmd": "ping", "args": {"pad": "x" * (70 * 1024)}})
            sock.send_multipart([b"", big])
            if sock.poll(1500):
                problems.append(f"an oversized message was answered: {sock.recv_multipart()[-1][:80]!r}")
        finally:
            sock.close(linger=0)

    threads = [threading.Thread(target=sender, args=(i,), daemon=True) for i in range(fi.reps(4, 8))]
    threads += [threading.Thread(target=oversized, args=(100 + i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    # the cart keeps answering a normal client during the flood
    assert rig.op.ok("ping")["profile"] == "sim"
    for t in threads:
        t.join(timeout=120)
    ctx.destroy(linger=0)
    assert not any(t.is_alive() for t in threads), "a hostile client is still waiting"
    assert not problems, problems[:5]
    assert next(answered) > 0
    after = rig.op.ok("status")
    for field in ("state", "faults", "interlock", "key", "acquisition"):
        assert after[field] == before[field], (field, before[field], after[field])
    assert after["laser"]["on"] and after["laser"]["setpoint_mw"] == before["laser"]["setpoint_mw"]
    assert after["sim"]["fault"] == before["sim"]["fault"]
    rig.assert_lit_recently()
    assert not rig.audit_since(t0, "state"), "hostile input changed the state"
    assert not [r for r in rig.audit_since(t0, "command") if r["ok"] and r["cmd"] != "status"]
    rig.data.verify()


def test_unknown_keys_get_no_answer(rig, tmp_path):
    from nirf.services.common.keys import create_keypair

    rig.op.emit(POWER_MW, fluorescence=False)
    t0 = time.time_ns()
    ctx = zmq.Context()
    problems: list[str] = []

    def stranger(n: int) -> None:
        _, secret = create_keypair(tmp_path, f"stranger{n}")
        req = fi.curve_socket(ctx, zmq.REQ, rig.cart, secret)
        sub = fi.curve_socket(ctx, zmq.SUB, rig.cart, secret)
        try:
            req.connect(rig.cart.control)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(rig.cart.telemetry)
            req.send(msgpack.packb({"id": f"s{n}", "cmd": "disarm"}))
            if req.poll(1000):
                problems.append(f"stranger {n} got a reply")
            if sub.poll(1000):
                problems.append(f"stranger {n} got telemetry")
        finally:
            req.close(linger=0)
            sub.close(linger=0)

    def wrong_server_key() -> None:
        from nirf.services.common.keys import create_keypair as mk

        fake_pub, _ = mk(tmp_path, "fake-server")
        import zmq.auth as za

        fake, _ = za.load_certificate(str(fake_pub))
        req = fi.curve_socket(ctx, zmq.REQ, rig.cart, rig.cart.state_dir / "keys" / "local-operator.key_secret",
                              server_public=fake)
        try:
            req.connect(rig.cart.control)
            req.send(msgpack.packb({"id": "w", "cmd": "disarm"}))
            if req.poll(1500):
                problems.append("a client expecting another server key got a reply")
        finally:
            req.close(linger=0)

    threads = [threading.Thread(target=stranger, args=(i,), daemon=True) for i in range(fi.reps(3, 8))]
    threads.append(threading.Thread(target=wrong_server_key, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    ctx.destroy(linger=0)
    assert not problems, problems
    status = rig.op.ok("status")
    assert status["state"] == "EMITTING" and status["laser"]["on"], status
    rig.assert_lit_recently()
    strangers = [r for r in rig.audit_since(t0, "command") if r.get("client") != "local-operator"]
    assert not strangers, strangers
    assert not rig.audit_since(t0, "state")
    rig.data.verify()


# ====================================================================== killed processes
def _release_launcher_and_wait(rig: Rig) -> int:
    """Let the frozen launcher notice the dead hardware process: it must stop the whole
    cart (a dead service is restarted instead; the simulated hardware cannot be)."""
    os.kill(rig.cart.proc.pid, signal.SIGCONT)
    try:
        code = rig.cart.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the launcher did not stop the cart after a child died")
    return code


def test_killed_controller_leaves_the_laser_off_and_a_restart_starts_safe(own_rig):
    rig = own_rig
    rig.op.emit(POWER_MW)
    rig.data.capture(rig.op)
    replacement = None
    with fi.frozen(rig.cart.proc.pid):  # the launcher; systemd would restart the controller instead
        t0 = time.time_ns()
        fi.kill(rig.pid(fi.CONTROLLER))
        off_ns = rig.probe.wait_dark(rig.heartbeat_s + fi.MARGIN_S + 2.0, "the output after the controller died")
        assert off_ns - t0 <= (rig.heartbeat_s + fi.MARGIN_S) * 1e9, \
            f"output off {(off_ns - t0) / 1e9:.3f} s after the kill (watchdog {rig.heartbeat_s} s)"
        time.sleep(fi.hold_s(0.5, 3.0))
        rig.assert_dark_since(off_ns, "with the controller dead")
        fi.read_audit(rig.cart.state_dir)  # a kill mid-write must not leave a torn log
        # S12: a restarted controller starts SAFE (or reports the MCU's latched watchdog
        # fault) and never turns the light back on by itself
        env = dict(os.environ, NIRF_STATE_DIR=str(rig.cart.state_dir), NIRF_RUNTIME_DIR=str(rig.cart.runtime_dir),
                   PYTHONUNBUFFERED="1")
        replacement = subprocess.Popen(
            [sys.executable, "-m", fi.CONTROLLER, "--config", str(rig.cart.config_path)], cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True)
        try:
            op2 = fi.Operator(rig.cart)
            try:
                first = op2.wait("status", timeout_s=30)
                assert first["state"] in ("SAFE", "FAULT") and first["laser"]["on"] is False, first
                if first["state"] == "FAULT":
                    # SERVICE_LOST: the gateway's word while no safety core reports yet
                    assert set(fi.fault_codes(first)) <= {"MCU_WDOG", "SERIAL_LINK", "SERVICE_LOST"}, first["faults"]
                op2.to_safe()
                rig.assert_dark_since(off_ns, "after the controller restarted")
                starts = rig.audit_since(t0, "start")
                assert starts, "the restarted controller did not write its start record"
            finally:
                op2.close()
        finally:
            replacement.terminate()
            try:
                replacement.wait(timeout=15)
            except subprocess.TimeoutExpired:
                replacement.kill()
                replacement.wait(timeout=5)
    # released, the launcher restarts the safety core as systemd would: it starts SAFE or in
    # FAULT, never with light
    os.kill(rig.cart.proc.pid, signal.SIGCONT)
    rig.op.drain()  # statuses from before the kill
    time.sleep(0.5)
    rig.op.drain()
    status = rig.op.wait("status", lambda m: m["processes"]["safety"]["age_ms"] is not None
                         and m["processes"]["safety"]["age_ms"] < 500, timeout_s=30)
    assert status["state"] in ("SAFE", "FAULT"), status
    rig.assert_dark_since(off_ns, "after the launcher restarted the controller")
    rig.data.verify()


def test_killed_processing_leaves_the_laser_alone_and_is_restarted(own_rig):
    rig = own_rig
    rig.op.emit(POWER_MW)
    rig.data.capture(rig.op)
    t0 = time.time_ns()
    with fi.frozen(rig.cart.proc.pid):  # the launcher: no restart while we look
        fi.kill(rig.pid(fi.PROCESSING))
        time.sleep(0.5)
        rig.op.drain()
        with pytest.raises(AssertionError):
            rig.op.wait("result", timeout_s=fi.hold_s(1.5, 5.0))
        assert rig.op.ok("ping")["profile"] == "sim"
        status = rig.op.ok("status")
        assert status["state"] == "EMITTING" and status["laser"]["on"] and not status["faults"], status
        rig.assert_lit_recently()
        assert not rig.audit_since(t0, "fault")
    # the launcher (systemd on the cart) restarts processing; results come back, light unchanged
    rig.op.wait("result", timeout_s=30)
    rig.assert_lit_recently()
    assert not rig.audit_since(t0, "fault")
    # and a stop stops it all in order: the last output the hardware published was zero
    rig.cart.stop()
    events = list(rig.probe.laser_events)
    assert events and events[-1][1] == 0.0, events[-3:]
    records = fi.read_audit(rig.cart.state_dir)
    assert records[-1]["kind"] == "stop", records[-3:]
    rig.data.verify()


def test_killed_hardware_faults_the_controller_which_keeps_answering(own_rig):
    rig = own_rig
    rig.op.emit(POWER_MW)
    rig.data.capture(rig.op)
    rig.op.drain()
    t0 = time.time_ns()
    with fi.frozen(rig.cart.proc.pid):
        fi.kill(rig.pid(fi.HARDWARE))
        # as udev removes a vanished device's stable name; otherwise the controller could
        # reopen a pseudo-terminal number the system has handed to someone else meanwhile
        for name in ("mcu.tty", "wheel.tty"):
            (rig.cart.runtime_dir / name).unlink(missing_ok=True)
        status = rig.op.wait_state("FAULT", timeout_s=10)
        assert "SERIAL_LINK" in fi.fault_codes(status), status["faults"]
        assert status["laser"]["on"] is False
        assert rig.op.ok("ping", timeout_s=10)["profile"] == "sim"
        code, _ = rig.op.error_code("arm", timeout_s=10)
        assert code in ("FAULT_ACTIVE", "INTERLOCK_OPEN", "KEY_OFF"), code
        code, message = rig.op.error_code("fault.reset", timeout_s=10)
        assert code == "FAULT_ACTIVE", message
        rig.wait_audit(t0, "state", lambda r: r["to"] == "FAULT")
        rig.wait_audit(t0, "fault")
    assert _release_launcher_and_wait(rig) != 0
    rig.data.verify()
