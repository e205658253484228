"""Roles and admission (PRODUCT C1): observers read, operators change the cart, strangers get
nothing, and without the authenticator nobody connects at all.

The mechanism is proven in-process (a CommandServer on real sockets with the real key ring
and ZAP authenticator), then against the running simulated cart with its real handlers."""

from __future__ import annotations

import os
import stat
import time

import msgpack
import pytest
import zmq
import zmq.auth

from nirf.hal.errors import DeviceTimeout
from nirf.services.common import keys
from nirf.services.gateway.bus import READ_ONLY
from nirf.services.cli.client import CartClient
from tests.cartproc import start_cart
from tests.test_keys import Server, ask

# Every command of the protocol that changes something, with arguments that would be
# accepted from an operator in the state the e2e test puts the cart in (EMITTING).
STATE_CHANGING = {
    "arm": None,
    "disarm": None,
    "laser.on": {"power_mw": 20.0},
    "laser.set": {"power_mw": 20.0},
    "laser.off": None,
    "filter.move": {"name": "open"},
    "camera.set": {"gain": 2.0},
    "acquire.start": {"mode": "white"},
    "acquire.stop": None,
    "roi.set": {"auto": True},
    "capture": {"site": "tumor_bed", "label": "12 o'clock", "pairs": 1},
    "case.open": {"case_id": "R-001", "histology": "DFSP", "arm": "control",
                  "injection_time": "2026-01-01T08:00:00+00:00"},
    "case.close": None,
    "pathology.set": {"capture_id": "x", "margin_positive": True},
    "fault.reset": None,
    "selftest": None,
    "sim.set": {"interlock": "open"},
}


# ---------------------------------------------------------------------- in-process
@pytest.fixture
def server(tmp_path):
    calls: list[str] = []

    def recorder(name):
        def handler(args, caller):
            calls.append(name)
            return {"cmd": name, "role": caller.role}
        return handler

    names = set(STATE_CHANGING) | set(READ_ONLY)
    s = Server(tmp_path / "state", {n: recorder(n) for n in names})
    s.calls = calls
    public, secret = keys.create_keypair(tmp_path / "tech", "viewer")
    keys.authorise(s.state_dir, public, keys.OBSERVER)
    s.ring.reload()  # the test does not wait for the periodic check
    s.observer_secret = secret
    s.operator_secret = keys.keys_dir(s.state_dir) / "local-operator.key_secret"
    yield s
    s.close()


@pytest.mark.parametrize("cmd", sorted(STATE_CHANGING))
def test_an_observer_is_refused_every_state_changing_command(server, cmd):
    reply = ask(server, server.observer_secret, cmd, STATE_CHANGING[cmd])
    assert reply is not None, "an observer must get an answer"
    assert reply["ok"] is False and reply["error"]["code"] == "NOT_PERMITTED", reply
    assert "viewer" in reply["error"]["message"] and "observer" in reply["error"]["message"]
    assert server.calls == [], "the handler ran for an observer"


def test_an_observer_may_read(server):
    for cmd in sorted(READ_ONLY):
        reply = ask(server, server.observer_secret, cmd)
        assert reply["ok"], reply
        assert reply["result"] == {"cmd": cmd, "role": keys.OBSERVER}
    assert sorted(server.calls) == sorted(READ_ONLY)


def test_an_unknown_command_from_an_observer_is_not_permitted(server):
    """Observers learn nothing about which commands exist."""
    reply = ask(server, server.observer_secret, "no.such.command")
    assert reply["error"]["code"] == "NOT_PERMITTED"
    reply = ask(server, server.operator_secret, "no.such.command")
    assert reply["error"]["code"] == "UNKNOWN_COMMAND"


def test_an_operator_reaches_the_handlers(server):
    reply = ask(server, server.operator_secret, "disarm")
    assert reply["ok"] and reply["result"] == {"cmd": "disarm", "role": keys.OPERATOR}
    assert server.calls == ["disarm"]


def test_an_unknown_key_gets_no_answer(server, tmp_path):
    _, secret = keys.create_keypair(tmp_path / "elsewhere", "stranger")
    assert ask(server, secret, "ping", timeout_s=1.0) is None
    assert server.calls == []


def test_a_client_with_the_wrong_server_key_gets_no_answer(server, tmp_path):
    """A client that trusts another server's key never completes the handshake."""
    fake_server_public, _ = zmq.auth.load_certificate(str(keys.create_keypair(tmp_path / "fake", "srv")[0]))
    pub, sec = zmq.auth.load_certificate(str(server.operator_secret))
    sock = server.ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    keys.make_curve_client(sock, fake_server_public, pub, sec)
    sock.connect(server.endpoint)
    try:
        sock.send(msgpack.packb({"id": "x", "cmd": "ping"}))
        assert not sock.poll(1000)
    finally:
        sock.close(linger=0)
    assert server.calls == []


def test_with_the_authenticator_stopped_nobody_connects(server):
    # first, proof that both keys work while it runs
    assert ask(server, server.operator_secret)["ok"]
    assert ask(server, server.observer_secret)["ok"]
    before = list(server.calls)
    server.stop_authenticator()
    # ZAP_ENFORCE_DOMAIN: no authenticator answering means every handshake fails
    assert ask(server, server.operator_secret, timeout_s=1.0) is None
    assert ask(server, server.observer_secret, timeout_s=1.0) is None
    assert server.calls == before


def test_with_the_authenticator_stopped_no_telemetry_reaches_anyone(tmp_path):
    from nirf.services.gateway.bus import Telemetry
    from tests.cartproc import free_port

    keys.ensure_sim_keys(tmp_path)
    ctx = zmq.Context()
    auth = keys.start_authenticator(ctx, keys.KeyRing(tmp_path))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server_keys = keys.load_server_keys(tmp_path)
    pub = Telemetry(ctx, endpoint, server_keys)
    op_pub, op_sec = zmq.auth.load_certificate(str(keys.keys_dir(tmp_path) / "local-operator.key_secret"))

    def receives_within(timeout_s: float) -> bool:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        keys.make_curve_client(sub, server_keys[0], op_pub, op_sec)
        sub.setsockopt(zmq.SUBSCRIBE, b"status")
        sub.connect(endpoint)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                pub.publish("status", {"state": "SAFE"})
                if sub.poll(50):
                    return True
            return False
        finally:
            sub.close(linger=0)

    try:
        assert receives_within(5.0), "control: telemetry must reach a listed key"
        auth.stop()
        auth = None
        assert not receives_within(1.0)
    finally:
        if auth is not None:
            auth.stop()
        pub.close()
        ctx.destroy(linger=0)


# ---------------------------------------------------------------------- the running cart
WIDTH, HEIGHT = 728, 544


@pytest.fixture(scope="module")
def cart(tmp_path_factory):
    c = start_cart(tmp_path_factory.mktemp("roles"), width=WIDTH, height=HEIGHT)
    op = None
    try:
        c.wait_for_keys()
        op = CartClient.from_state_dir(c.state_dir, c.control, c.telemetry, context=zmq.Context())
        op.subscribe("status")
        assert op.wait_for("status", timeout_s=60) is not None, c.log_text()
        c.op = op
        yield c
    finally:
        if op is not None:
            op.close()
            op.ctx.destroy(linger=0)
        c.stop()


def _client(cart, secret) -> CartClient:
    return CartClient.from_state_dir(cart.state_dir, cart.control, cart.telemetry, key_file=secret,
                                     context=zmq.Context())


def _close(client: CartClient) -> None:
    client.close()
    client.ctx.destroy(linger=0)


def _answers(cart, secret, timeout_s: float = 0.5) -> bool:
    client = _client(cart, secret)
    try:
        client.request("ping", timeout_s=timeout_s)
        return True
    except DeviceTimeout:
        return False
    finally:
        _close(client)


def _wait_answers(cart, secret, want: bool, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if _answers(cart, secret) == want:
            return True
        time.sleep(0.05)  # between attempts only; bounded by the deadline
    return False


@pytest.fixture(scope="module")
def observer(cart, tmp_path_factory):
    """A technician's key created off the cart and authorised as an observer while it runs."""
    public, secret = keys.create_keypair(tmp_path_factory.mktemp("observer"), "night-shift")
    assert not _answers(cart, secret), "a key that is not listed yet was answered"
    listed = keys.authorise(cart.state_dir, public, keys.OBSERVER)
    t0 = time.monotonic()
    assert _wait_answers(cart, secret, True, within_s=10.0), "the newly authorised key never connected"
    connected_after_s = time.monotonic() - t0
    client = _client(cart, secret)
    yield {"client": client, "secret": secret, "listed": listed, "connected_after_s": connected_after_s}
    _close(client)


def _to_emitting(op: CartClient, power_mw: float = 50.0) -> dict:
    state = op.call("status")["state"]
    if state == "FAULT":
        op.call("fault.reset")
    elif state != "SAFE":
        op.call("disarm")
    op.call("arm")
    assert op.wait_for("status", lambda m: m["state"] == "ARMED", timeout_s=10) is not None
    op.call("laser.on", {"power_mw": power_mw})
    st = op.wait_for("status", lambda m: m["state"] == "EMITTING" and m["laser"]["on"], timeout_s=10)
    assert st is not None
    return st


@pytest.mark.e2e  # starts the simulated cart
def test_a_key_authorised_while_the_cart_runs_connects_within_seconds(observer):
    # the ring looks at its folders once a second; a few seconds is the promise
    assert observer["connected_after_s"] < 5.0


@pytest.mark.e2e  # starts the simulated cart
def test_an_observer_cannot_change_the_running_cart(cart, observer):
    op, obs = cart.op, observer["client"]
    _to_emitting(op, 50.0)
    before = op.call("status")
    for cmd, args in STATE_CHANGING.items():
        reply = obs.request(cmd, args)
        assert reply["ok"] is False, (cmd, reply)
        assert reply["error"]["code"] == "NOT_PERMITTED", (cmd, reply)
    after = op.call("status")
    try:
        assert after["state"] == "EMITTING" and after["laser"]["on"] is True
        assert after["laser"]["setpoint_mw"] == pytest.approx(50.0)
        for field in ("filter", "acquisition", "case", "roi", "interlock", "key"):
            assert after[field] == before[field], field
        assert (after["camera"]["exposure_us"], after["camera"]["gain"]) == \
               (before["camera"]["exposure_us"], before["camera"]["gain"])
        assert after["sim"]["interlock"] == "closed"
    finally:
        op.call("disarm")


@pytest.mark.e2e  # starts the simulated cart
def test_an_observer_reads_status_and_telemetry(cart, observer):
    obs = observer["client"]
    assert obs.call("ping")["profile"] == "sim"
    assert obs.call("status")["state"] in ("SAFE", "ARMING", "ARMED", "EMITTING", "FAULT")
    obs.subscribe("status")
    assert obs.wait_for("status", timeout_s=10) is not None


@pytest.mark.e2e  # starts the simulated cart
def test_an_unknown_key_gets_no_answer_and_no_telemetry(cart, tmp_path):
    _, secret = keys.create_keypair(tmp_path, "stranger")
    stranger = _client(cart, secret)
    try:
        with pytest.raises(DeviceTimeout):
            stranger.call("ping", timeout_s=1.5)
        stranger.subscribe("status")
        # the cart publishes status at 2 Hz or more: 1.5 s of silence means shut out
        assert stranger.receive(1.5) is None
    finally:
        _close(stranger)


@pytest.mark.e2e  # starts the simulated cart
def test_the_carts_secret_key_files_are_private(cart):
    secrets = list((cart.state_dir / "keys").rglob("*_secret"))
    assert secrets, "no secret key files found"
    for path in secrets:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
        assert path.parent == cart.state_dir / "keys", f"{path}: a secret key inside a role folder"


@pytest.mark.e2e  # starts the simulated cart
def test_a_removed_key_no_longer_connects(cart, observer):
    """Runs last in the module: it takes the observer's access away."""
    assert _answers(cart, observer["secret"], timeout_s=2.0)
    observer["listed"].unlink()
    assert _wait_answers(cart, observer["secret"], False, within_s=10.0)
    # the connection that was open before the removal is cut off as well
    with pytest.raises(DeviceTimeout):
        observer["client"].call("ping", timeout_s=1.5)
