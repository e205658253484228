"""The internal request server: it sleeps until a request comes, and ends at once when told,
whatever its backstop timers are."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from nirf.services.common import ipc
from tests.threadstats import has_thread_stats, voluntary_switches


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A server with one quick and one long command, its serving thread with a backstop of
    a minute, and its worker's of a minute too: only a wake-up can end them promptly."""
    monkeypatch.setattr(ipc, "WORKER_POLL_S", 60.0)
    ctx = zmq.Context()
    address = ipc.endpoint(tmp_path, "srv")
    server = ipc.InternalServer(ctx, address, {"echo": lambda args, caller: args, "slow": lambda args, caller: "done"},
                                long_commands={"slow"}, name="t")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), kwargs={"poll_ms": 60_000}, daemon=True)
    thread.start()
    client = ipc.InternalClient(ctx, address, name="t-client")
    yield server, stop, thread, client
    stop.set()
    server.wake()
    thread.join(timeout=5.0)
    client.close()
    server.close()
    ctx.destroy(linger=0)


def test_requests_are_answered_quick_and_long(served):
    server, stop, thread, client = served
    assert client.call("echo", {"x": 1}, timeout_s=5.0) == {"x": 1}
    assert client.call("slow", timeout_s=5.0) == "done"  # through the worker and the reply pipe
    with pytest.raises(ipc.RemoteError) as err:
        client.call("nope", timeout_s=5.0)
    assert err.value.code == "UNKNOWN_COMMAND"


def test_stop_and_wake_end_the_serving_thread_before_its_backstop(served):
    server, stop, thread, client = served
    assert client.call("echo", {}, timeout_s=5.0) == {}
    stop.set()
    server.wake()
    thread.join(timeout=5.0)  # the backstop is a minute: only the wake-up ends it in time
    assert not thread.is_alive()


def test_close_ends_the_worker_before_its_backstop(served):
    server, stop, thread, client = served
    assert client.call("slow", timeout_s=5.0) == "done"
    server.close()
    assert not server.worker_alive()  # close() waits at most 1 s; the worker's timer is a minute


def test_an_idle_server_sleeps_without_a_short_timer(tmp_path):
    ctx = zmq.Context()
    address = ipc.endpoint(tmp_path, "idle")
    server = ipc.InternalServer(ctx, address, {}, name="idle")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)  # the default backstop
    thread.start()
    try:
        if not has_thread_stats(thread):
            pytest.skip("no /proc here")
        time.sleep(0.1)
        before = voluntary_switches(thread)
        time.sleep(1.0)
        woke = voluntary_switches(thread) - before
        # its backstop is SERVE_POLL_MS: about four wake-ups in a second (a 50 ms timer made 20)
        assert woke <= 1000 / ipc.SERVE_POLL_MS + 2
        assert ipc.SERVE_POLL_MS >= 200
    finally:
        stop.set()
        server.wake()
        thread.join(timeout=5.0)
        server.close()
        ctx.destroy(linger=0)
    assert not thread.is_alive()
