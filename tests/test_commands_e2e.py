"""Every command of the bus protocol, through the real CURVE sockets of the running simulated
cart: its result on success and its error codes on the paths that refuse.

The clinical commands (case.open, case.close, capture, pathology.set, report) go through
``clinical()``: a cart that does not know one raises ``NotImplementedYet``, which the
``not_implemented_yet`` mark turns into an expected failure for commands still being written."""

from __future__ import annotations

import datetime as dt
import time

import msgpack
import pytest
import zmq
import zmq.auth

from nirf.services.cli.client import CartClient
from tests.cartproc import start_cart

pytestmark = pytest.mark.e2e

WIDTH, HEIGHT = 728, 544
# The default phantom: a 200 nM disk of radius HEIGHT/6 at the centre over 50 nM.
SIGNAL_ROI = [WIDTH // 2 - 30, HEIGHT // 2 - 30, 60, 60]
BACKGROUND_ROI = [20, 20, 150, 150]
STATES = {"SAFE", "ARMING", "ARMED", "EMITTING", "FAULT"}


class NotImplementedYet(AssertionError):
    """The cart answered UNKNOWN_COMMAND for a command the protocol lists."""


# For commands still being written: mark their tests with this so that only an unknown
# command counts as an expected failure.
not_implemented_yet = pytest.mark.xfail(raises=NotImplementedYet, strict=False, reason="not implemented yet")


@pytest.fixture(scope="module")
def cart(tmp_path_factory):
    c = start_cart(tmp_path_factory.mktemp("commands"), width=WIDTH, height=HEIGHT)
    try:
        c.wait_for_keys()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def operator(cart):
    cl = CartClient.from_state_dir(cart.state_dir, cart.control, cart.telemetry, context=zmq.Context())
    cl.subscribe("status", "result", "event")
    try:
        # the cart is ready when it publishes its first status
        assert cl.wait_for("status", timeout_s=60) is not None, cart.log_text()
        yield cl
    finally:
        cl.close()
        cl.ctx.destroy(linger=0)


@pytest.fixture
def client(operator):
    """The module's operator client, with the cart back in SAFE, acquisition off, the default
    world, no open case, and no telemetry left over from the previous test."""
    cl = operator
    cl.call("sim.set", {"interlock": "closed", "key": True, "ambient_e_per_ms": 5.0,
                        "fault": {"camera_stall": False, "wheel_stuck": False, "mcu_overtemp": False}})
    cl.call("acquire.stop")
    _close_case_if_any(cl)
    state = cl.call("status")["state"]
    if state == "FAULT":
        cl.call("fault.reset")
    elif state != "SAFE":
        cl.call("disarm")
    while cl.receive(0) is not None:
        pass
    return cl


def _close_case_if_any(cl: CartClient) -> None:
    reply = cl.request("case.close")
    if not reply["ok"]:
        assert reply["error"]["code"] in ("NO_CASE", "UNKNOWN_COMMAND"), reply


def refused(cl: CartClient, cmd: str, args: dict | None = None) -> dict:
    """The error of a request that must be refused."""
    reply = cl.request(cmd, args)
    assert reply["ok"] is False, f"{cmd} {args} was accepted: {reply}"
    assert set(reply["error"]) >= {"code", "message"} and reply["error"]["message"], reply
    return reply["error"]


def clinical(cl: CartClient, cmd: str, args: dict | None = None) -> dict:
    """A request for a command that other work is adding: an unknown command is
    NotImplementedYet (an expected failure), anything else is returned as is."""
    reply = cl.request(cmd, args)
    if not reply["ok"] and reply["error"]["code"] == "UNKNOWN_COMMAND":
        raise NotImplementedYet(f"{cmd}: {reply['error']['message']}")
    return reply


def to_armed(cl: CartClient) -> None:
    result = cl.call("arm")
    assert result["state"] == "ARMING"
    assert cl.wait_for("status", lambda m: m["state"] == "ARMED", timeout_s=10) is not None


def to_emitting(cl: CartClient, power_mw: float = 50.0) -> dict:
    to_armed(cl)
    result = cl.call("laser.on", {"power_mw": power_mw})
    assert result["state"] == "EMITTING"
    st = cl.wait_for("status", lambda m: m["state"] == "EMITTING" and m["laser"]["on"], timeout_s=10)
    assert st is not None
    return st


# ---------------------------------------------------------------------- ping, status
def test_ping(client):
    first = client.call("ping")
    assert isinstance(first["version"], str) and first["version"]
    assert first["profile"] == "sim"
    assert isinstance(first["uptime_s"], float) and first["uptime_s"] >= 0
    second = client.call("ping")
    assert second["uptime_s"] >= first["uptime_s"]


def test_status_reply_has_the_protocol_shape(client):
    s = client.call("status")
    assert s["state"] in STATES
    assert isinstance(s["faults"], list)
    assert set(s["laser"]) >= {"on", "power_mw", "setpoint_mw", "temp_c"}
    assert s["interlock"] in ("open", "closed")
    for flag in ("key", "footswitch", "indicator"):
        assert isinstance(s[flag], bool), flag
    assert set(s["filter"]) >= {"position", "name", "moving"}
    assert set(s["camera"]) >= {"streaming", "fps", "exposure_us", "gain", "width", "height"}
    assert (s["camera"]["width"], s["camera"]["height"]) == (WIDTH, HEIGHT)
    assert s["acquisition"] in ("off", "fluorescence", "white", "dark")
    assert s["case"] is None or isinstance(s["case"], str)
    assert s["profile"] == "sim"


def test_status_telemetry_has_seq_and_time(client):
    a = client.wait_for("status", timeout_s=5)
    b = client.wait_for("status", timeout_s=5)
    assert b["seq"] > a["seq"]
    assert abs(b["t_ns"] - time.time_ns()) < 60e9
    assert b["state"] in STATES


# ---------------------------------------------------------------------- arm, disarm
def test_arm_goes_through_arming_to_armed(client):
    result = client.call("arm")
    assert result["state"] == "ARMING"
    arming = client.wait_for("status", lambda m: m["state"] == "ARMING", timeout_s=5)
    assert arming is not None and arming["indicator"] is True and arming["laser"]["on"] is False
    armed = client.wait_for("status", lambda m: m["state"] == "ARMED", timeout_s=10)
    assert armed is not None and armed["laser"]["on"] is False
    err = refused(client, "arm")
    assert err["code"] == "WRONG_STATE" and "ARMED" in err["message"]


def test_arm_is_inhibited_by_the_key_and_the_interlock(client):
    client.call("sim.set", {"key": False})
    client.wait_for("status", lambda m: m["key"] is False, timeout_s=5)
    err = refused(client, "arm")
    assert err["code"] == "KEY_OFF" and "key" in err["message"]
    # the interlock is checked first
    client.call("sim.set", {"interlock": "open"})
    client.wait_for("status", lambda m: m["interlock"] == "open", timeout_s=5)
    assert refused(client, "arm")["code"] == "INTERLOCK_OPEN"
    # inhibits only: still SAFE, no fault
    st = client.call("status")
    assert st["state"] == "SAFE" and st["faults"] == []


def test_arm_in_fault_is_fault_active(client):
    to_armed(client)
    client.call("sim.set", {"interlock": "open"})
    assert client.wait_for("status", lambda m: m["state"] == "FAULT", timeout_s=5) is not None
    client.call("sim.set", {"interlock": "closed"})
    client.wait_for("status", lambda m: m["interlock"] == "closed", timeout_s=5)
    assert refused(client, "arm")["code"] == "FAULT_ACTIVE"


def test_disarm_from_emitting_turns_the_laser_off(client):
    to_emitting(client)
    assert client.call("disarm")["state"] == "SAFE"
    st = client.wait_for("status", lambda m: m["state"] == "SAFE", timeout_s=5)
    assert st["laser"]["on"] is False and st["indicator"] is False
    assert refused(client, "disarm", {"now": True})["code"] == "INVALID_ARGUMENT"


# ---------------------------------------------------------------------- laser
def test_laser_on_needs_armed(client):
    err = refused(client, "laser.on", {"power_mw": 50})
    assert err["code"] == "WRONG_STATE" and "SAFE" in err["message"]


def test_laser_on_set_off(client):
    st = to_emitting(client, 50.0)
    assert st["laser"]["setpoint_mw"] == pytest.approx(50.0)
    assert client.call("laser.set", {"power_mw": 30.0})["setpoint_mw"] == pytest.approx(30.0)
    assert client.wait_for("status", lambda m: m["laser"]["setpoint_mw"] == pytest.approx(30.0),
                           timeout_s=5) is not None
    assert client.call("laser.off")["state"] == "ARMED"
    st = client.wait_for("status", lambda m: m["state"] == "ARMED", timeout_s=5)
    assert st["laser"]["on"] is False


def test_laser_power_limits_are_refused_not_clipped(client):
    to_armed(client)
    err = refused(client, "laser.on", {"power_mw": 10_000})
    assert err["code"] == "INVALID_ARGUMENT" and "10000" in err["message"]
    for bad in (-5, 0, "fifty", None, True, [50]):
        assert refused(client, "laser.on", {"power_mw": bad})["code"] == "INVALID_ARGUMENT", bad
    assert refused(client, "laser.on", {})["code"] == "INVALID_ARGUMENT"
    assert refused(client, "laser.on", {"power_mw": 50, "watts": 1})["code"] == "INVALID_ARGUMENT"
    assert client.call("status")["state"] == "ARMED"
    client.call("laser.on", {"power_mw": 50})
    assert refused(client, "laser.set", {"power_mw": 10_000})["code"] == "INVALID_ARGUMENT"
    st = client.call("status")
    assert st["state"] == "EMITTING" and st["laser"]["setpoint_mw"] == pytest.approx(50.0)


def test_laser_set_and_off_need_the_right_state(client):
    assert refused(client, "laser.set", {"power_mw": 20})["code"] == "WRONG_STATE"
    assert refused(client, "laser.off")["code"] == "WRONG_STATE"


# ---------------------------------------------------------------------- filter, camera
def test_filter_move_by_position_and_by_name(client):
    assert client.call("filter.move", {"position": 2}) == {"position": 2, "name": "open"}
    assert client.call("status")["filter"]["position"] == 2
    assert client.call("filter.move", {"name": "icg_emission"}) == {"position": 1, "name": "icg_emission"}
    assert client.call("status")["filter"] == {"position": 1, "name": "icg_emission", "moving": False}


@pytest.mark.parametrize("args", [{"position": 0}, {"position": 99}, {"position": 1.5}, {"position": "1"},
                                  {"name": "nope"}, {}, {"position": 1, "name": "open"}])
def test_filter_move_refuses_bad_targets(client, args):
    before = client.call("status")["filter"]["position"]
    assert refused(client, "filter.move", args)["code"] == "INVALID_ARGUMENT"
    assert client.call("status")["filter"]["position"] == before


def test_camera_set_applies_and_the_frame_rate_wins(client):
    cam0 = client.call("status")["camera"]
    try:
        applied = client.call("camera.set", {"exposure_us": 5000, "gain": 2.0, "fps": 20.0})
        assert applied == {"exposure_us": 5000, "gain": 2.0, "fps": 20.0}
        cam = client.call("status")["camera"]
        assert (cam["exposure_us"], cam["gain"]) == (5000, 2.0)
        # 100 ms does not fit a 30 fps frame: shortened, not refused
        applied = client.call("camera.set", {"exposure_us": 100_000, "fps": 30.0})
        assert applied["fps"] == 30.0 and 0 < applied["exposure_us"] < 1e6 / 30.0
    finally:
        client.call("camera.set", {"exposure_us": cam0["exposure_us"], "gain": cam0["gain"], "fps": 30.0})


@pytest.mark.parametrize("args", [{"exposure_us": 1}, {"exposure_us": 12.5}, {"gain": 100.0}, {"gain": "hi"},
                                  {"fps": 0}, {"fps": 1000}, {"shutter": 1}])
def test_camera_set_refuses_bad_values(client, args):
    assert refused(client, "camera.set", args)["code"] == "INVALID_ARGUMENT"


# ---------------------------------------------------------------------- acquisition, roi
@pytest.mark.parametrize("mode,position", [("white", 2), ("dark", 3)])
def test_acquire_start_moves_the_wheel_first_and_stop_ends_it(client, mode, position):
    result = client.call("acquire.start", {"mode": mode})
    assert result["mode"] == mode and result["filter"]["position"] == position
    st = client.wait_for("status", lambda m: m["acquisition"] == mode and m["camera"]["streaming"], timeout_s=5)
    assert st is not None and st["filter"]["position"] == position
    assert client.call("acquire.stop") == {"mode": "off"}
    assert client.wait_for("status", lambda m: m["acquisition"] == "off", timeout_s=5) is not None


def test_fluorescence_needs_emitting_then_gives_results(client):
    err = refused(client, "acquire.start", {"mode": "fluorescence"})
    assert err["code"] == "WRONG_STATE" and "EMITTING" in err["message"]
    assert refused(client, "acquire.start", {"mode": "sepia"})["code"] == "INVALID_ARGUMENT"
    to_emitting(client)
    client.call("roi.set", {"signal": SIGNAL_ROI, "background": BACKGROUND_ROI})
    assert client.call("acquire.start", {"mode": "fluorescence"})["filter"]["position"] == 1
    r = client.wait_for("result", lambda m: m["valid"], timeout_s=15)
    assert r is not None
    for field in ("frame_seq", "t_capture_ns", "t_done_ns", "intensity", "signal_mean", "background_mean",
                  "sbr", "cnr", "saturated_fraction", "valid", "flags", "positive", "threshold", "roi", "seq",
                  "t_ns"):
        assert field in r, field
    assert r["roi"]["signal"] == SIGNAL_ROI and r["sbr"] > 1.0
    client.call("acquire.stop")


def test_roi_set_boxes_and_auto(client):
    assert client.call("roi.set", {"signal": SIGNAL_ROI, "background": BACKGROUND_ROI})["roi"] == \
        {"signal": SIGNAL_ROI, "background": BACKGROUND_ROI}
    assert client.call("roi.set", {"auto": True})["roi"] == "auto"


@pytest.mark.parametrize("args", [
    {"signal": [0, 0, WIDTH + 1, 10], "background": BACKGROUND_ROI},
    {"signal": [0, 0, 10], "background": BACKGROUND_ROI},
    {"signal": SIGNAL_ROI},
    {"auto": "yes"},
    {"signal": ["a", 0, 10, 10], "background": BACKGROUND_ROI},
])
def test_roi_set_refuses_boxes_that_do_not_fit(client, args):
    assert refused(client, "roi.set", args)["code"] == "INVALID_ARGUMENT"


# ---------------------------------------------------------------------- faults, selftest, sim
def test_fault_reset_waits_for_the_cause_to_clear(client):
    assert client.call("fault.reset")["state"] == "SAFE"  # nothing to reset: a no-op
    to_emitting(client)
    client.call("sim.set", {"interlock": "open"})
    st = client.wait_for("status", lambda m: m["state"] == "FAULT", timeout_s=5)
    assert st["laser"]["on"] is False and any(f["code"] == "INTERLOCK_OPEN" for f in st["faults"])
    err = refused(client, "fault.reset")
    assert err["code"] == "FAULT_ACTIVE" and "interlock" in err["message"]
    assert refused(client, "disarm")["code"] == "WRONG_STATE"
    client.call("sim.set", {"interlock": "closed"})
    client.wait_for("status", lambda m: m["interlock"] == "closed", timeout_s=5)
    assert client.call("fault.reset")["state"] == "SAFE"
    assert client.wait_for("status", lambda m: m["state"] == "SAFE" and not m["faults"], timeout_s=5)


def test_selftest_reports_each_device(client):
    result = client.call("selftest", timeout_s=30)
    assert isinstance(result["ok"], bool)
    assert set(result["devices"]) >= {"laser-mcu", "filter-wheel", "camera", "gpio"}
    for name, device in result["devices"].items():
        assert isinstance(device["ok"], bool), name
    assert result["ok"] is True, result
    to_armed(client)
    assert refused(client, "selftest")["code"] == "WRONG_STATE"


def test_sim_set_changes_the_world_and_refuses_nonsense(client):
    values = client.call("sim.set", {"ambient_e_per_ms": 12.5})
    assert values["ambient_e_per_ms"] == 12.5
    st = client.wait_for("status", lambda m: m["sim"]["ambient_e_per_ms"] == 12.5, timeout_s=5)
    assert st is not None
    for bad in ({"interlock": "ajar"}, {"ambient_e_per_ms": -1}, {"gravity": 1}):
        assert refused(client, "sim.set", bad)["code"] == "INVALID_ARGUMENT", bad
    assert client.call("status")["sim"]["ambient_e_per_ms"] == 12.5


# ---------------------------------------------------------------------- the clinical commands
def _case_args(case_id: str, arm: str = "icg_0.25mg_per_kg", hours_ago: float = 24.0) -> dict:
    injected = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours_ago)
    args = {"case_id": case_id, "histology": "DFSP", "arm": arm,
            "injection_time": injected.isoformat(timespec="seconds")}
    if arm == "icg_0.25mg_per_kg":
        args["weight_kg"] = 80.0
    return args


def test_case_open_computes_the_dose_and_close_ends_it(client):
    reply = clinical(client, "case.open", _case_args("EE-0001"))
    assert reply["ok"], reply
    case = reply["result"]
    assert case["case_id"] == "EE-0001"
    assert case["dose_mg"] == pytest.approx(0.25 * 80.0)
    assert case["hours_since_injection"] == pytest.approx(24.0, abs=0.1)
    assert client.wait_for("status", lambda m: m["case"] == "EE-0001", timeout_s=5) is not None
    assert refused(client, "case.open", _case_args("EE-0002"))["code"] in ("WRONG_STATE", "BUSY")
    assert clinical(client, "case.close")["ok"]
    assert client.wait_for("status", lambda m: m["case"] is None, timeout_s=5) is not None


@pytest.mark.parametrize("bad", [
    {"histology": "melanoma"}, {"arm": "placebo"}, {"weight_kg": None}, {"weight_kg": -3},
    {"injection_time": "yesterday"}, {"case_id": ""},
])
def test_case_open_refuses_bad_arguments(client, bad):
    args = {**_case_args("EE-BAD"), **bad}
    args = {k: v for k, v in args.items() if v is not None}
    reply = clinical(client, "case.open", args)
    assert reply["ok"] is False and reply["error"]["code"] == "INVALID_ARGUMENT", reply
    assert client.call("status")["case"] is None


def test_capture_needs_an_open_case(client):
    reply = clinical(client, "capture", {"site": "tumor_bed", "label": "12 o'clock", "pairs": 1})
    assert reply["ok"] is False and reply["error"]["code"] == "NO_CASE", reply


def test_capture_pathology_and_report(client):
    reply = clinical(client, "case.open", _case_args("EE-0003", arm="icg_25mg"))
    assert reply["ok"], reply
    assert reply["result"]["dose_mg"] == pytest.approx(25.0)
    to_emitting(client)
    client.call("roi.set", {"signal": SIGNAL_ROI, "background": BACKGROUND_ROI})
    client.call("acquire.start", {"mode": "fluorescence"})
    reply = clinical(client, "capture", {"site": "tumor_bed", "label": "12 o'clock", "pairs": 2}, )
    assert reply["ok"], reply
    cap = reply["result"]
    assert set(cap) >= {"capture_id", "sbr", "intensity", "cnr", "positive", "threshold", "files"}
    assert cap["sbr"] == pytest.approx(4.0, rel=0.15) and cap["positive"] is True
    bad_site = clinical(client, "capture", {"site": "elbow", "label": "x", "pairs": 1})
    assert bad_site["ok"] is False and bad_site["error"]["code"] == "INVALID_ARGUMENT"
    client.call("acquire.stop")

    reply = clinical(client, "pathology.set", {"capture_id": cap["capture_id"], "margin_positive": True})
    assert reply["ok"], reply
    missing = clinical(client, "pathology.set", {"capture_id": "no-such-capture", "margin_positive": False})
    assert missing["ok"] is False and missing["error"]["code"] == "INVALID_ARGUMENT"

    reply = clinical(client, "report")
    assert reply["ok"], reply
    groups = reply["result"]["groups"]
    overall = [g for g in groups if g["histology"] == "all" and g["arm"] == "all"]
    assert len(overall) == 1
    assert overall[0]["counts"]["tp"] >= 1
    sens = overall[0]["metrics"]["sensitivity"]
    assert set(sens) >= {"k", "n", "value", "clopper_pearson", "wilson"} and 0.0 <= sens["value"] <= 1.0
    spec = overall[0]["metrics"]["specificity"]
    if spec["n"] == 0:
        assert spec["value"] is None and spec["clopper_pearson"] is None and spec["wilson"] is None
    filtered = clinical(client, "report", {"histology": "sSCC"})
    assert filtered["ok"] and all(g["histology"] in ("sSCC", "all") for g in filtered["result"]["groups"])
    assert clinical(client, "case.close")["ok"]
    reply = clinical(client, "capture", {"site": "tumor_bed", "label": "x", "pairs": 1})
    assert reply["ok"] is False and reply["error"]["code"] == "NO_CASE"


# ---------------------------------------------------------------------- the envelope itself
class Raw:
    """A client written from the protocol document alone: REQ or DEALER, CURVE, msgpack."""

    def __init__(self, cart, kind: int):
        self.ctx = zmq.Context()
        keys = cart.state_dir / "keys"
        server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
        public, secret = zmq.auth.load_certificate(str(keys / "local-operator.key_secret"))
        self.sock = self.ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.curve_serverkey = server_public
        self.sock.curve_publickey = public
        self.sock.curve_secretkey = secret
        self.sock.connect(cart.control)

    def recv(self, timeout_s: float = 5.0) -> list[bytes]:
        assert self.sock.poll(int(timeout_s * 1000)), "no reply"
        return self.sock.recv_multipart()

    def close(self):
        self.ctx.destroy(linger=0)


@pytest.fixture
def req(cart):
    r = Raw(cart, zmq.REQ)
    yield r
    r.close()


@pytest.fixture
def dealer(cart):
    r = Raw(cart, zmq.DEALER)
    yield r
    r.close()


def _req(raw: Raw, obj, packed: bytes | None = None) -> dict:
    raw.sock.send(packed if packed is not None else msgpack.packb(obj))
    frames = raw.recv()
    assert len(frames) == 1
    return msgpack.unpackb(frames[0])


def test_req_round_trip_echoes_the_id(req):
    reply = _req(req, {"id": "a" * 64, "cmd": "ping"})
    assert reply["id"] == "a" * 64 and reply["ok"] is True and "result" in reply
    reply = _req(req, {"id": "n", "cmd": "ping", "args": None})
    assert reply["ok"] is True


@pytest.mark.parametrize("body,echo", [
    ({"id": "a" * 65, "cmd": "ping"}, False),
    ({"cmd": "ping"}, False),
    ({"id": 7, "cmd": "ping"}, False),
    ({"id": "x", "cmd": 7}, True),
    ({"id": "x", "cmd": "ping", "args": [1]}, True),
    (["id", "cmd"], False),
    ("ping", False),
])
def test_malformed_requests_are_bad_request(req, body, echo):
    reply = _req(req, body)
    assert reply["ok"] is False and reply["error"]["code"] == "BAD_REQUEST", reply
    assert reply["id"] == ("x" if echo else None)


def test_bytes_that_are_not_msgpack_are_bad_request(req):
    reply = _req(req, None, packed=b"\xc1\xc1 not msgpack")
    assert reply == {"id": None, "ok": False, "error": reply["error"]} and reply["error"]["code"] == "BAD_REQUEST"


def test_unknown_command_and_nan(req):
    reply = _req(req, {"id": "u", "cmd": "laser.explode"})
    assert reply["error"]["code"] == "UNKNOWN_COMMAND" and "laser.on" in reply["error"]["message"]
    reply = _req(req, {"id": "n", "cmd": "laser.set", "args": {"power_mw": float("nan")}})
    assert reply["error"]["code"] == "INVALID_ARGUMENT"


def test_dealer_pipelines_requests_and_replies_come_in_order(dealer):
    ids = [f"d{i}" for i in range(5)]
    for i in ids:
        dealer.sock.send_multipart([b"", msgpack.packb({"id": i, "cmd": "ping"})])
    got = []
    for _ in ids:
        frames = dealer.recv()
        assert frames[0] == b"" and len(frames) == 2  # the empty delimiter comes back
        got.append(msgpack.unpackb(frames[1])["id"])
    assert got == ids


# ---------------------------------------------------------------------- argument types
@pytest.mark.parametrize("cmd,args", [("acquire.start", {"mode": ["white"]}), ("acquire.start", {"mode": {"a": 1}}),
                                      ("filter.move", {"name": ["open"]}), ("filter.move", {"name": {"a": 1}})])
def test_an_unhashable_argument_is_invalid_not_an_internal_error(client, cmd, args):
    err = refused(client, cmd, args)
    assert err["code"] == "INVALID_ARGUMENT", err
