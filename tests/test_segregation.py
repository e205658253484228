"""One process, one job (PRODUCT section 3, S14, C6, C7, D4), through the running simulated
cart: long commands delay nobody, a late emission command expires, a damaged case store
leaves the laser controller working, killing or freezing a process either leaves every
laser rule in force (processing, study, display) or turns the laser off with SERVICE_LOST
(gateway, imaging), and malformed internal messages kill no thread.

Laser rules are judged on the simulated hardware's own record of the optical output
(tests/faults.py WorldProbe), never on what the cart says."""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import pytest
import zmq

from nirf.services.common import keys as keys_mod
from tests.cartproc import start_cart
from tests.faults import Operator, WorldProbe, alive, child_pid, fault_codes, frozen, kill, wait_until

pytestmark = pytest.mark.e2e

WIDTH, HEIGHT = 728, 544
SAFETY, IMAGING, GATEWAY = "nirf.controller.main", "nirf.services.imaging.main", "nirf.services.gateway.main"
STUDY, PROCESSING, DISPLAY = "nirf.services.study.main", "nirf.services.processing.main", "nirf.services.display.main"
ANSWER_S = 0.1  # S14: laser.off, disarm, status and ping within 100 ms


@pytest.fixture(scope="module")
def cart(tmp_path_factory):
    c = start_cart(tmp_path_factory.mktemp("segregation"), width=WIDTH, height=HEIGHT)
    try:
        c.wait_for_keys()
        yield c
    finally:
        c.stop()


def answers(o: Operator, cmd: str = "ping", timeout_s: float = 0.5) -> bool:
    """True when ``cmd`` is answered in time (a key the cart does not know gets silence)."""
    from nirf.hal.errors import DeviceTimeout

    try:
        return bool(o.call(cmd, timeout_s=timeout_s).get("ok"))
    except DeviceTimeout:
        return False


def second_operator(cart, name: str = "second-operator") -> Path:
    """Another person's operator key, listed under keys/operators/ (picked up within 2 s)."""
    folder = cart.state_dir / "people"
    public, secret = keys_mod.create_keypair(folder, name)
    keys_mod.authorise(cart.state_dir, public, keys_mod.OPERATOR)
    return secret


@pytest.fixture(scope="module")
def op(cart):
    o = Operator(cart)
    assert o.wait("status", timeout_s=60) is not None, cart.log_text()
    yield o
    o.close()


@pytest.fixture(scope="module")
def other(cart, op):
    secret = second_operator(cart)
    o = Operator(cart, key_file=secret)
    wait_until(lambda: answers(o, timeout_s=1.0), 10.0, "the second operator's key to work")
    yield o
    o.close()


@pytest.fixture(scope="module")
def world(cart, op):
    w = WorldProbe(cart.runtime_dir)
    yield w
    w.close()


def lit_mw(world: WorldProbe, window_s: float = 0.25) -> float:
    """The highest true optical output over the last ``window_s`` (while fluorescence runs the
    MCU gates the laser per frame, so the output at one instant may be a dark frame's 0)."""
    now = time.time_ns()
    t0 = now - int(window_s * 1e9)
    value = peak = 0.0
    for t, mw in world.events():
        if t <= t0:
            value = mw
        elif t <= now:
            peak = max(peak, mw)
    return max(value, peak)


def timed(o: Operator, cmd: str, args=None) -> tuple[float, dict]:
    t0 = time.perf_counter()
    reply = o.call(cmd, args, timeout_s=5.0)
    return time.perf_counter() - t0, reply


def latencies(o: Operator, cmds: list[str], n: int, running: threading.Event) -> dict[str, list[float]]:
    """``n`` round trips of each command while ``running`` is set."""
    out: dict[str, list[float]] = {c: [] for c in cmds}
    for _ in range(n):
        for c in cmds:
            dt, reply = timed(o, c)
            assert "ok" in reply, reply
            out[c].append(dt)
    assert running.is_set(), "the long command ended before the measurements did; make it longer"
    return out


def run_long(o: Operator, cmd: str, args: dict, box: dict) -> threading.Thread:
    running = threading.Event()
    box["running"] = running

    def go():
        running.set()
        box["reply"] = o.call(cmd, args, timeout_s=120.0)
        running.clear()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    running.wait(2.0)
    time.sleep(0.2)  # let it reach its owner
    return t


def report(name: str, lat: dict[str, list[float]]) -> None:
    for c, v in lat.items():
        print(f"{name}: {c} median {statistics.median(v) * 1000:.1f} ms, worst {max(v) * 1000:.1f} ms over {len(v)}")


def to_emitting(op: Operator) -> None:
    op.to_safe()
    op.drain()  # statuses queued from before (an old ARMED would be taken for the new one)
    op.emit(50.0, fluorescence=True)


def test_safety_commands_are_answered_during_a_capture_a_qc_run_and_a_selftest(cart, op, other):
    # selftest (SAFE): disarm and laser.off from another operator and from the sender's second socket
    op.to_safe()
    sender2 = Operator(cart)
    try:
        box: dict = {}
        t = run_long(op, "selftest", {}, box)
        lat = latencies(other, ["disarm", "laser.off", "status", "ping"], 50, box["running"])
        busy = other.call("capture", {"site": "tumor_bed", "pairs": 4})
        lat2 = latencies(sender2, ["disarm", "status"], 10, box["running"])
        t.join(120)
        report("selftest", lat)
        report("selftest (sender's second socket)", lat2)
        assert box["reply"]["ok"], box["reply"]
        assert busy["error"]["code"] == "BUSY" and "selftest" in busy["error"]["message"]
        for v in list(lat.values()) + list(lat2.values()):
            assert statistics.median(v) < ANSWER_S

        # a 32-pair capture (EMITTING): status and ping from the other operator, then laser.off
        to_emitting(op)
        op.ok("case.open", {"case_id": "SEG-0001", "histology": "DFSP", "arm": "icg_25mg",
                            "injection_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 86400))})
        box = {}
        t = run_long(op, "capture", {"site": "tumor_bed", "label": "12 o'clock", "pairs": 32}, box)
        lat = latencies(other, ["status", "ping"], 50, box["running"])
        busy = other.call("qc.run", {})
        t.join(120)
        report("capture", lat)
        assert box["reply"]["ok"], box["reply"]
        assert busy["error"]["code"] == "BUSY"
        for v in lat.values():
            assert statistics.median(v) < ANSWER_S
        op.ok("case.close")

        # a QC baseline (EMITTING, long): laser.off from the other operator is answered at once
        box = {}
        t = run_long(op, "qc.baseline", {"results": 60}, box)
        lat = latencies(other, ["status", "ping"], 20, box["running"])
        dt, reply = timed(other, "laser.off")
        t.join(120)
        report("qc.baseline", lat)
        print(f"qc.baseline: laser.off {dt * 1000:.1f} ms")
        assert reply["ok"] and dt < ANSWER_S * 5, (dt, reply)
        for v in lat.values():
            assert statistics.median(v) < ANSWER_S
    finally:
        sender2.close()


def test_an_emission_command_that_cannot_start_within_a_second_expires(cart, op):
    op.to_safe()
    pid = child_pid(cart, SAFETY)
    box: dict = {}
    with frozen(pid):
        t = threading.Thread(target=lambda: box.setdefault("reply", op.call("arm", timeout_s=10.0)), daemon=True)
        t.start()
        time.sleep(1.5)
    t.join(10)
    assert box["reply"]["ok"] is False and box["reply"]["error"]["code"] == "EXPIRED", box["reply"]
    # never acted on later
    time.sleep(1.0)
    assert op.call("status")["result"]["state"] in ("SAFE", "FAULT")
    assert op.call("status")["result"]["state"] != "ARMING"


def test_malformed_internal_messages_kill_no_thread(cart, op, world):
    ctx = zmq.Context()
    rd = cart.runtime_dir
    garbage = [b"", b"\xc1", b"\x93\x01\x02\x03", b"not msgpack at all", b"\x80", b"\x81\xa2id\x01"]
    try:
        for name, kind in (("safety", zmq.DEALER), ("imaging", zmq.DEALER), ("study", zmq.DEALER),
                           ("safety_in", zmq.PUSH), ("results", zmq.PUSH), ("record_ack", zmq.PUSH)):
            s = ctx.socket(kind)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.connect(f"ipc://{rd / (name + '.ipc')}")
            for i in range(10_000):
                g = garbage[i % len(garbage)]
                s.send_multipart([g, g] if kind == zmq.PUSH and i % 2 else [g])
            s.close(linger=2000)
        time.sleep(1.0)
        status = op.call("status")["result"]
        assert all(p["age_ms"] is not None and p["age_ms"] < 1000 for p in status["processes"].values()), status
        to_emitting(op)
        assert op.wait("result", timeout_s=10) is not None
        assert lit_mw(world) > 0
    finally:
        ctx.destroy(linger=0)
        op.to_safe()


def wait_restarted(cart, module: str, old_pid: int, timeout_s: float = 20.0) -> int:
    def new_pid():
        try:
            pid = child_pid(cart, module)
        except AssertionError:
            return None
        return pid if pid != old_pid else None

    return wait_until(new_pid, timeout_s, f"the launcher to restart {module}")


@pytest.mark.parametrize("module", [PROCESSING, STUDY, DISPLAY])
def test_killing_or_freezing_a_service_leaves_the_laser_rules_in_force(cart, op, world, module):
    to_emitting(op)
    for i in range(10):
        pid = child_pid(cart, module)
        if i % 2:
            with frozen(pid):
                time.sleep(0.7)
                dt, reply = timed(op, "status")
                assert reply["ok"] and reply["result"]["state"] == "EMITTING", reply
                assert lit_mw(world) > 0
        else:
            kill(pid)
            dt, reply = timed(op, "status")
            assert reply["ok"] and reply["result"]["state"] == "EMITTING", reply
            wait_restarted(cart, module, pid)
        assert lit_mw(world) == pytest.approx(50.0, rel=0.05)
    dt, reply = timed(op, "disarm")
    assert reply["ok"], reply
    world.wait_dark(2.0, "the laser after disarm")


@pytest.mark.parametrize("module", [GATEWAY, IMAGING])
def test_killing_or_freezing_the_gateway_or_imaging_turns_the_laser_off(cart, op, world, module):
    for how in ("kill", "freeze"):
        to_emitting(op)
        pid = child_pid(cart, module)
        t0 = time.time_ns()
        if how == "kill":
            kill(pid)
            dark_ns = world.wait_dark(3.0, f"the laser after {module} was killed")
        else:
            with frozen(pid):
                dark_ns = world.wait_dark(3.0, f"the laser while {module} is frozen")
        print(f"{module} {how}: laser off after {(dark_ns - t0) / 1e6:.0f} ms")
        assert (dark_ns - t0) / 1e9 < 0.6 + 0.3  # 500 ms of silence, one tick, this busy machine
        if how == "kill":
            wait_restarted(cart, module, pid)
        status = wait_until(lambda: answers(op, "status", 1.0) and op.call("status")["result"], 20.0,
                            "commands to be served again")
        assert status["state"] == "FAULT" and "SERVICE_LOST" in fault_codes(status), status
        assert not world.was_lit_between(dark_ns + 1, time.time_ns())
        wait_until(lambda: answers(op, "fault.reset", 2.0), 20.0, "fault.reset after the restart")


def test_a_second_recorder_refuses_to_start(cart, op):
    import subprocess
    import sys

    env = dict(os.environ, NIRF_STATE_DIR=str(cart.state_dir), NIRF_RUNTIME_DIR=str(cart.runtime_dir))
    p = subprocess.run([sys.executable, "-m", "nirf.services.study.recorder", "--config", str(cart.config_path)],
                       env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stderr
    assert "another recorder" in p.stderr
    assert alive(child_pid(cart, "nirf.services.study.recorder"))


def test_keys_added_work_and_revoked_keys_lose_telemetry_within_2_s(cart, op):
    secret = second_operator(cart, "temp-technician")
    t0 = time.monotonic()
    probe = Operator(cart, key_file=secret, topics=())
    try:
        wait_until(lambda: answers(probe), 5.0, "a new key to work")
    finally:
        probe.close()
    print(f"new key answered after {time.monotonic() - t0:.2f} s")
    assert time.monotonic() - t0 < 2.5
    # a client that starts now gets telemetry too
    o = Operator(cart, key_file=secret, topics=("status",))
    try:
        assert o.wait("status", timeout_s=5) is not None
        (cart.state_dir / "keys" / "operators" / "temp-technician.key").unlink()
        t1 = time.monotonic()
        o.drain()
        last = t1
        while time.monotonic() - t1 < 4.0:
            m = o.client.receive(0.1)
            if m is not None:
                last = time.monotonic()
        print(f"revoked key's last telemetry {last - t1:.2f} s after the revocation")
        assert last - t1 < 2.0
        assert not answers(o, timeout_s=1.0)
    finally:
        o.close()


def test_a_damaged_case_store_leaves_the_laser_controller_working(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "study.db").write_bytes(os.urandom(8192))
    c = start_cart(tmp_path, width=WIDTH, height=HEIGHT)
    try:
        c.wait_for_keys()
        o = Operator(c)
        w = WorldProbe(c.runtime_dir)
        try:
            status = o.wait("status", timeout_s=60)
            assert status["state"] == "SAFE", status
            status = wait_until(lambda: (s := o.call("status")["result"])["study"]["ok"] is False and s, 10.0,
                                "the study process to report the damaged store")
            assert "study.db" in status["study"]["error"], status
            o.emit(50.0, fluorescence=True)
            assert lit_mw(w) == pytest.approx(50.0, rel=0.05)
            code, message = o.error_code("capture", {"site": "tumor_bed", "pairs": 2})
            assert code == "DEVICE_ERROR" and "case store" in message, message
            code, message = o.error_code("case.open", {"case_id": "AB-0001", "histology": "DFSP", "arm": "control"})
            assert "case store" in message
        finally:
            o.close()
            w.close()
    finally:
        c.stop()


def test_with_the_audit_log_unwritable_state_changes_are_refused_but_disarm_and_laser_off_are_not(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "audit.jsonl").symlink_to("/dev/full")  # every write fails: No space left on device
    c = start_cart(tmp_path, width=WIDTH, height=HEIGHT)
    try:
        c.wait_for_keys()
        o = Operator(c)
        try:
            status = o.wait("status", timeout_s=60)
            assert status["audit"]["ok"] is False and "space" in status["audit"]["error"], status["audit"]
            for cmd, args in (("arm", None), ("filter.move", {"position": 2}), ("acquire.stop", None)):
                code, message = o.error_code(cmd, args)
                assert code == "AUDIT_UNAVAILABLE" and "audit" in message, (cmd, code, message)
            assert o.call("disarm")["ok"] is True
            reply = o.call("laser.off")
            assert reply.get("error", {}).get("code") != "AUDIT_UNAVAILABLE", reply  # reaches the safety core
            assert o.call("status")["ok"] and o.call("ping")["ok"]
        finally:
            o.close()
    finally:
        c.stop()


def test_two_thousand_idle_connections_leave_the_display_answering(cart, op):
    import resource
    import socket
    import tomllib
    import urllib.request

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2_000 + 200
    if soft < want:
        if hard < want:
            pytest.skip(f"this machine allows {hard} open files per process; the test needs {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    port = tomllib.loads(cart.config_path.read_text())["display"]["port"]
    url = f"http://127.0.0.1:{port}/"
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
    idle = []
    try:
        for _ in range(2_000):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            idle.append(s)
        t0 = time.monotonic()
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        dt = time.monotonic() - t0
        print(f"page answered in {dt * 1000:.0f} ms with 2,000 idle connections open")
        assert dt < 1.0
        req = urllib.request.Request(url, headers={"Host": "evil.example:80"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 421
    finally:
        for s in idle:
            s.close()
