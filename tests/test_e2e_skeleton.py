"""The walking skeleton end to end: the whole simulated cart in its processes, driven by a
client written from the protocol alone (raw pyzmq + msgpack, keys from the state folder)."""

from __future__ import annotations

import itertools
import statistics
import time

import msgpack
import pytest
import zmq
import zmq.auth

from tests.cartproc import start_cart

pytestmark = pytest.mark.e2e

WIDTH, HEIGHT = 728, 544
# The default phantom: a 200 nM disk of radius HEIGHT/6 at the centre over 50 nM.
SIGNAL_ROI = [WIDTH // 2 - 30, HEIGHT // 2 - 30, 60, 60]
BACKGROUND_ROI = [20, 20, 150, 150]
_ids = itertools.count()


class RawClient:
    """What a technician would write from the protocol document: REQ + SUB, CURVE keys."""

    def __init__(self, cart, key_file=None):
        self.ctx = zmq.Context()
        keys = cart.state_dir / "keys"
        server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
        public, secret = zmq.auth.load_certificate(str(key_file or keys / "local-operator.key_secret"))
        self._curve = (server_public, public, secret)
        self.control = cart.control
        self.req = self._new_req()
        self.sub = self.ctx.socket(zmq.SUB)
        self._set_curve(self.sub)
        self.sub.setsockopt(zmq.LINGER, 0)
        for topic in (b"status", b"result", b"event"):
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(cart.telemetry)

    def _set_curve(self, sock):
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._curve

    def _new_req(self):
        req = self.ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        self._set_curve(req)
        req.connect(self.control)
        return req

    def call(self, cmd, args=None, timeout_s=10.0):
        msg = {"id": f"t{next(_ids)}", "cmd": cmd}
        if args is not None:
            msg["args"] = args
        self.req.send(msgpack.packb(msg))
        if not self.req.poll(int(timeout_s * 1000)):
            self.req.close(linger=0)
            self.req = self._new_req()
            raise TimeoutError(f"no reply to {cmd}")
        reply = msgpack.unpackb(self.req.recv())
        assert reply["id"] == msg["id"]
        return reply

    def ok(self, cmd, args=None, timeout_s=10.0):
        reply = self.call(cmd, args, timeout_s)
        assert reply["ok"], reply
        return reply["result"]

    def wait(self, topic, pred=lambda m: True, timeout_s=10.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sub.poll(int(max(0.0, deadline - time.monotonic()) * 1000) + 1):
                t, body, *_ = self.sub.recv_multipart()
                m = msgpack.unpackb(body)
                if t.decode() == topic and pred(m):
                    return m
        raise AssertionError(f"no {topic} message matching the condition within {timeout_s} s")

    def close(self):
        self.ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def cart(tmp_path_factory):
    c = start_cart(tmp_path_factory.mktemp("skeleton"), width=WIDTH, height=HEIGHT)
    client = None
    try:
        c.wait_for_keys()
        client = RawClient(c)
        # the cart is ready when it publishes its first status
        client.wait("status", timeout_s=60)
        yield c
    finally:
        if client:
            client.close()
        c.stop()


@pytest.fixture
def client(cart):
    cl = RawClient(cart)
    cl.wait("status", timeout_s=10)
    # every test starts from SAFE with the default world
    cl.ok("sim.set", {"interlock": "closed", "key": True, "ambient_e_per_ms": 5.0})
    cl.ok("acquire.stop")
    st = cl.ok("status")
    if st["state"] == "FAULT":
        cl.ok("fault.reset")
    elif st["state"] != "SAFE":
        cl.ok("disarm")
    yield cl
    cl.close()


def test_ping_answers_with_version_and_profile(client):
    r = client.ok("ping")
    assert r["profile"] == "sim"
    assert isinstance(r["version"], str) and r["uptime_s"] >= 0


def test_status_carries_the_protocol_fields(client):
    s = client.wait("status")
    for key in ("state", "faults", "laser", "interlock", "key", "footswitch", "indicator", "filter",
                "camera", "acquisition", "case", "profile", "seq", "t_ns", "sim"):
        assert key in s, key
    assert s["state"] == "SAFE" and s["laser"]["on"] is False


def test_arm_emit_acquire_interlock_trip_and_reset(client):
    client.ok("arm")
    client.wait("status", lambda m: m["state"] == "ARMING" and m["indicator"])
    client.wait("status", lambda m: m["state"] == "ARMED", timeout_s=5)
    client.ok("laser.on", {"power_mw": 50})
    client.wait("status", lambda m: m["state"] == "EMITTING" and m["laser"]["on"], timeout_s=5)
    client.ok("acquire.start", {"mode": "fluorescence"})
    r = client.wait("result", timeout_s=15)
    assert "sbr" in r and "intensity" in r and r["frame_seq"] is not None

    client.ok("sim.set", {"interlock": "open"})
    s = client.wait("status", lambda m: m["state"] == "FAULT", timeout_s=5)
    assert s["laser"]["on"] is False
    assert any(f["code"] == "INTERLOCK_OPEN" for f in s["faults"])
    refused = client.call("fault.reset")
    assert not refused["ok"] and refused["error"]["code"] == "FAULT_ACTIVE"
    assert "interlock" in refused["error"]["message"]

    client.ok("sim.set", {"interlock": "closed"})
    client.wait("status", lambda m: m["interlock"] == "closed")
    assert client.ok("fault.reset")["state"] == "SAFE"
    client.wait("status", lambda m: m["state"] == "SAFE" and not m["faults"])


def _mean_sbr(client, n=10):
    client.ok("acquire.start", {"mode": "fluorescence"})
    first = client.wait("result", lambda m: m["valid"], timeout_s=15)
    values = []
    while len(values) < n:
        r = client.wait("result", lambda m: m["frame_seq"] > first["frame_seq"], timeout_s=10)
        if r["valid"]:
            values.append(r["sbr"])
    return statistics.mean(values)


@pytest.mark.parametrize("ambient", [5.0, 50.0])
def test_sbr_of_the_default_phantom_is_four(client, ambient):
    client.ok("sim.set", {"ambient_e_per_ms": ambient})
    client.ok("roi.set", {"signal": SIGNAL_ROI, "background": BACKGROUND_ROI})
    client.ok("arm")
    client.wait("status", lambda m: m["state"] == "ARMED", timeout_s=5)
    client.ok("laser.on", {"power_mw": 50})
    sbr = _mean_sbr(client)
    client.ok("acquire.stop")
    client.ok("disarm")
    assert sbr == pytest.approx(4.0, rel=0.05)


def test_pairs_reach_processing_through_shared_memory_and_every_slot_comes_back(client):
    # the frame path of the running cart: the driver writes each frame once into the ring,
    # processing reads it there; when the stream stops, no slot stays held or leased
    client.ok("roi.set", {"signal": SIGNAL_ROI, "background": BACKGROUND_ROI})
    client.ok("arm")
    client.wait("status", lambda m: m["state"] == "ARMED", timeout_s=5)
    client.ok("laser.on", {"power_mw": 50})
    client.ok("acquire.start", {"mode": "fluorescence"})
    first = client.wait("result", lambda m: m["valid"], timeout_s=15)
    last = first
    while last["frame_seq"] < first["frame_seq"] + 40:
        last = client.wait("result", lambda m: m["frame_seq"] > last["frame_seq"], timeout_s=10)
    assert last["valid"] and last["pairs_dropped_ring"] == 0
    client.ok("acquire.stop")
    client.ok("disarm")
    s = client.wait("status", lambda m: m["acquisition"] == "off" and m["pairs"]["ring"] is not None
                    and m["pairs"]["ring"]["free"] == m["pairs"]["ring"]["slots"], timeout_s=5)
    assert s["pairs"]["in_shared_memory"] >= 20 and s["pairs"]["with_pixels"] == 0
    assert s["pairs"]["in_shared_memory"] >= s["pairs"]["sent"] - s["pairs"]["held_back"] - 1


def test_an_unlisted_key_gets_no_answer(cart, tmp_path):
    from nirf.services.common.keys import create_keypair

    _, secret = create_keypair(tmp_path, "stranger")
    stranger = RawClient(cart, key_file=secret)
    try:
        with pytest.raises(TimeoutError):
            stranger.call("ping", timeout_s=2.0)
    finally:
        stranger.close()


def test_selftest_reports_each_device(client):
    r = client.ok("selftest", timeout_s=30)
    assert set(r["devices"]) == {"laser-mcu", "filter-wheel", "camera", "gpio"}
    for name, d in r["devices"].items():
        assert d["ok"], (name, d)
    assert abs(r["devices"]["camera"]["dark_mean"] - 16) < 8
    assert r["ok"] is True
    # and it refuses to run while armed
    client.ok("arm")
    refused = client.call("selftest")
    assert refused["error"]["code"] == "WRONG_STATE"
    client.ok("disarm")


def test_audit_log_records_commands_and_state_changes(client, cart):
    client.ok("arm")
    client.wait("status", lambda m: m["state"] == "ARMING")
    client.ok("disarm")
    client.wait("status", lambda m: m["state"] == "SAFE")
    import json

    lines = [json.loads(x) for x in (cart.state_dir / "audit.jsonl").read_text().splitlines()]
    commands = [x for x in lines if x["kind"] == "command"]
    assert any(x["cmd"] == "arm" and x["client"] == "local-operator" and x["ok"] for x in commands)
    states = [x for x in lines if x["kind"] == "state"]
    assert any(x["to"] == "ARMING" for x in states) and any(x["to"] == "SAFE" for x in states)
    assert all("t_ns" in x for x in lines)
