"""sd_notify over a real Unix datagram socket: the helpers, the rate-limited watchdog, the
supervisor loop feeding it only while it runs, and the whole simulated cart announcing
READY=1 only after the safe state, then WATCHDOG=1 until the controller is frozen."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import zmq

from nirf.hal.clock import ManualClock, SystemClock
from nirf.services.common import sdnotify
from tests.cartproc import start_cart
from tests.safety_rig import Rig

RECEIVE_TIMEOUT_S = 5.0
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifyListener:
    """What systemd holds: a datagram socket that remembers who sent each message."""

    def __init__(self, address: str | bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # the kernel attaches the sender's pid to each datagram, as systemd asks it to
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)

    def receive(self, timeout_s: float = RECEIVE_TIMEOUT_S) -> tuple[str, int | None] | None:
        """(text, sender pid), or None after the timeout."""
        self.sock.settimeout(max(timeout_s, 0.001))
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(8192, socket.CMSG_SPACE(_CRED.size))
        except (socket.timeout, BlockingIOError):
            return None
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CRED.unpack(payload[:_CRED.size])[0]
        return data.decode(), pid

    def drain(self) -> list[tuple[str, int | None]]:
        """Everything already queued, without waiting."""
        got = []
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data, ancillary, _f, _a = self.sock.recvmsg(8192, socket.CMSG_SPACE(_CRED.size))
                except BlockingIOError:
                    return got
                pid = None
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                        pid = _CRED.unpack(payload[:_CRED.size])[0]
                got.append((data.decode(), pid))
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir():
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="nirf-n-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def path_listener(short_dir):
    path = short_dir / "notify"
    listener = NotifyListener(str(path))
    yield listener, {"NOTIFY_SOCKET": str(path)}
    listener.close()


@pytest.fixture
def abstract_listener():
    name = f"nirf-test-{uuid.uuid4().hex}"
    listener = NotifyListener(b"\0" + name.encode())
    yield listener, {"NOTIFY_SOCKET": "@" + name}
    listener.close()


# ---------------------------------------------------------------------- the helpers
def test_without_notify_socket_nothing_is_sent():
    assert sdnotify.notify("READY=1", {}) is False
    assert sdnotify.ready({}) is False
    assert sdnotify.watchdog({"WATCHDOG_USEC": "1000000"}) is False


@pytest.mark.parametrize("listener_fixture", ["path_listener", "abstract_listener"])
def test_each_helper_sends_its_assignment(request, listener_fixture):
    listener, env = request.getfixturevalue(listener_fixture)
    sent = [
        (sdnotify.ready, "READY=1"),
        (sdnotify.watchdog, "WATCHDOG=1"),
        (sdnotify.stopping, "STOPPING=1"),
    ]
    for helper, expected in sent:
        assert helper(env) is True
        got = listener.receive()
        assert got is not None, f"{expected} did not arrive"
        assert got[0] == expected
        assert got[1] == os.getpid()


def test_status_is_one_line(path_listener):
    listener, env = path_listener
    assert sdnotify.status("state SAFE\nlaser off", env) is True
    text, _pid = listener.receive()
    assert text.startswith("STATUS=")
    assert "\n" not in text
    assert "SAFE" in text and "laser off" in text


def test_send_failure_is_logged_not_raised(short_dir, caplog):
    env = {"NOTIFY_SOCKET": str(short_dir / "nobody-listens-here")}
    with caplog.at_level(logging.WARNING, logger="nirf.services.common.sdnotify"):
        assert sdnotify.ready(env) is False
    assert any("READY=1" in r.getMessage() and "nobody-listens-here" in r.getMessage() for r in caplog.records)


def test_unusable_address_is_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="nirf.services.common.sdnotify"):
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "relative/path"}) is False
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "@"}) is False
    assert sum("NOTIFY_SOCKET" in r.getMessage() for r in caplog.records) == 2


def test_oversized_message_is_cut_to_the_limit(path_listener):
    listener, env = path_listener
    assert sdnotify.status("x" * (sdnotify.MAX_MESSAGE_BYTES * 2), env) is True
    text, _ = listener.receive()
    assert len(text.encode()) == sdnotify.MAX_MESSAGE_BYTES


# ---------------------------------------------------------------------- the watchdog interval
@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "3000000"}, 3.0),
    ({"WATCHDOG_USEC": "250000"}, 0.25),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "three seconds"}, None),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "not-a-pid"}, None),
])
def test_watchdog_interval_from_environment(env, expected):
    assert sdnotify.watchdog_interval_s(env) == expected


def test_watchdog_interval_is_for_the_named_process_only():
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert sdnotify.watchdog_interval_s(mine) == 2.0
    assert sdnotify.watchdog_interval_s(other) is None


# ---------------------------------------------------------------------- the rate-limited pinger
def test_pinger_sends_at_most_once_per_half_interval(path_listener):
    listener, env = path_listener
    clock = ManualClock()
    pinger = sdnotify.WatchdogPinger(dict(env, WATCHDOG_USEC="1000000"), clock=clock)
    assert pinger.enabled and pinger.period_s == 0.5
    assert pinger() is True  # the first call always feeds
    for _ in range(4):  # 0.4 s of calls: still inside the half interval
        clock.advance(0.1)
        assert pinger() is False
    clock.advance(0.1)
    assert pinger() is True
    received = listener.drain()
    assert [text for text, _ in received] == ["WATCHDOG=1", "WATCHDOG=1"]
    assert pinger.sent == 2


def test_pinger_without_watchdog_or_socket_does_nothing(path_listener):
    listener, env = path_listener
    no_watchdog = sdnotify.WatchdogPinger(env, clock=ManualClock())
    no_socket = sdnotify.WatchdogPinger({"WATCHDOG_USEC": "1000000"}, clock=ManualClock())
    assert not no_watchdog.enabled and not no_socket.enabled
    assert no_watchdog() is False and no_socket() is False
    assert listener.drain() == []


# ---------------------------------------------------------------------- the supervisor loop
def test_supervisor_feeds_watchdog_only_while_its_loop_runs(path_listener):
    """The real Cart's supervisor loop feeds the watchdog from its healthy ticks; when a
    device read hangs inside a tick, the pings stop."""
    listener, env = path_listener
    rig = Rig()
    rig.cart.clock = SystemClock()  # the loop paces itself in real time here
    interval_s = 0.2
    pinger = sdnotify.WatchdogPinger(env, clock=SystemClock(), interval_s=interval_s)
    hang = threading.Event()
    entered = threading.Event()
    release = threading.Event()
    real_key_on = rig.io.key_on

    def key_on():
        if hang.is_set():
            entered.set()
            release.wait(10.0)  # bounded, so a broken test cannot hang the run
        return real_key_on()

    rig.io.key_on = key_on
    stop = threading.Event()
    loop = threading.Thread(target=rig.cart.run, args=(stop,), kwargs={"on_healthy_tick": pinger}, daemon=True)
    loop.start()
    try:
        pings = 0
        deadline = time.monotonic() + 10.0
        while pings < 3 and time.monotonic() < deadline:
            got = listener.receive(deadline - time.monotonic())
            if got and got[0] == "WATCHDOG=1":
                pings += 1
        assert pings == 3, "the healthy supervisor loop did not feed the watchdog"

        hang.set()
        assert entered.wait(5.0), "the supervisor loop never reached the hanging read"
        listener.drain()  # sent before the read hung
        # nothing for several watchdog periods while the loop is stuck
        late = listener.receive(interval_s * 4)
        assert late is None, f"watchdog fed while the supervisor loop was blocked: {late}"
    finally:
        release.set()
        stop.set()
        loop.join(5.0)
    assert not loop.is_alive()


# ---------------------------------------------------------------------- the whole cart
def _wait_stopped(pid: int, timeout_s: float) -> bool:
    """Wait until the kernel reports the process stopped (state T in /proc/<pid>/stat)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return True
        time.sleep(0.01)
    return False


@pytest.mark.e2e
def test_cart_ready_after_safe_then_watchdog_until_frozen(tmp_path, monkeypatch, short_dir):
    listener = NotifyListener(str(short_dir / "notify"))
    watchdog_s = 0.4
    # The launcher hands its environment to every process it starts, as systemd would to
    # the service; the pid on each datagram tells the controller from the others.
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", str(int(watchdog_s * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cart = start_cart(tmp_path)
    ctx = zmq.Context()
    client = None
    controller_pid = None
    frozen = False
    try:
        deadline = time.monotonic() + 60.0
        while controller_pid is None and time.monotonic() < deadline:
            m = re.search(r"started safety \(pid (\d+)\)", cart.log_text())
            if m:
                controller_pid = int(m.group(1))
            else:
                time.sleep(0.05)
        assert controller_pid is not None, cart.log_text()

        # READY=1 from the controller: by then start-up has finished (devices connected, SAFE)
        ready_seen = False
        while not ready_seen and time.monotonic() < deadline:
            got = listener.receive(deadline - time.monotonic())
            if got and got[1] == controller_pid and got[0] == "READY=1":
                ready_seen = True
                log_at_ready = cart.log_text()
        assert ready_seen, "no READY=1 from the controller\n" + cart.log_text()
        assert "safety core ready" in log_at_ready, "READY=1 came before the safety core finished starting"
        from nirf.services.cli.client import CartClient

        client = CartClient.from_state_dir(cart.state_dir, cart.control, cart.telemetry, context=ctx)
        # the cart is ready when it publishes its first status (PROTOCOL): every process up
        client.subscribe("status")
        assert client.wait_for("status", timeout_s=30.0) is not None, cart.log_text()
        status = client.call("status", timeout_s=10.0)
        # the gateway, which writes the audit log, has started by the time it answers
        kinds = [json.loads(line)["kind"] for line in (cart.state_dir / "audit.jsonl").read_text().splitlines()
                 if line.strip()]
        assert "start" in kinds
        assert status["state"] == "SAFE"
        assert not status["laser"]["on"]

        # then the supervisor keeps feeding the watchdog
        pings = 0
        deadline = time.monotonic() + 10.0
        while pings < 3 and time.monotonic() < deadline:
            got = listener.receive(deadline - time.monotonic())
            if got and got[1] == controller_pid:
                assert got[0] != "READY=1", "READY=1 sent twice"
                pings += got[0] == "WATCHDOG=1"
        assert pings == 3, "the controller stopped feeding the watchdog"

        # freeze the controller: no more pings from it
        os.kill(controller_pid, signal.SIGSTOP)
        frozen = True
        assert _wait_stopped(controller_pid, 5.0), "the controller did not stop"
        listener.drain()  # sent before it stopped
        quiet_until = time.monotonic() + watchdog_s * 3
        while time.monotonic() < quiet_until:
            got = listener.receive(quiet_until - time.monotonic())
            assert not (got and got[1] == controller_pid), f"frozen controller sent {got}"

        # and they come back when it runs again (the test above was not vacuous)
        os.kill(controller_pid, signal.SIGCONT)
        frozen = False
        deadline = time.monotonic() + 10.0
        resumed = False
        while not resumed and time.monotonic() < deadline:
            got = listener.receive(deadline - time.monotonic())
            resumed = bool(got and got[1] == controller_pid and got[0] == "WATCHDOG=1")
        assert resumed, "no WATCHDOG=1 after the controller resumed"
    finally:
        if frozen and controller_pid is not None:
            os.kill(controller_pid, signal.SIGCONT)
        if client is not None:
            client.close()
        ctx.destroy(linger=0)
        cart.stop()
        listener.close()


def test_a_receiver_that_does_not_read_never_blocks_the_sender(short_dir):
    """A full notify queue (systemd busy, a test that stopped reading) drops the datagram:
    the loop that feeds the watchdog (the supervisor, the gateway) must never stall on it."""
    import threading

    from nirf.services.common import sdnotify

    path = str(short_dir / "full")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    try:
        env = {"NOTIFY_SOCKET": path}
        done = threading.Event()
        results = []

        def flood():
            for _ in range(5000):  # far more than a datagram queue holds
                results.append(sdnotify.notify("WATCHDOG=1", env))
            done.set()

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        assert done.wait(10.0), "notify blocked on a full queue"
        assert results[0] is True and results[-1] is False  # the queue filled; later ones dropped
    finally:
        listener.close()
