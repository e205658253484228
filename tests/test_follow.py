"""Followers of another process's publications: they sleep without a timer, and the
results follower is subscribed only while someone waits for results."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from nirf.services.common import ipc
from tests.threadstats import has_thread_stats, voluntary_switches
from nirf.services.common.follow import Follower, Results


@pytest.fixture
def pub(tmp_path):
    ctx = zmq.Context()
    address = ipc.endpoint(tmp_path, "test_pub")
    p = ipc.Publisher(ctx, address)
    yield ctx, address, p
    p.close()
    ctx.destroy(linger=0)


def _publish_until(p, topic, body, done, timeout_s=5.0):
    """Publish ``body`` every 5 ms until ``done()`` (a subscription takes a moment to reach
    the publisher)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "nothing arrived"
        p.publish(topic, body)
        time.sleep(0.005)


def test_a_follower_gets_nothing_until_it_subscribes_and_nothing_after_it_stops(pub):
    ctx, address, p = pub
    got = []
    f = Follower(ctx, address, ("result",), lambda t, b: got.append(b), name="t", subscribed=False)
    try:
        for i in range(20):
            p.publish("result", {"n": -1})
            time.sleep(0.005)
        assert got == []  # not subscribed: the publisher sent it nothing
        f.subscribe(True)
        _publish_until(p, "result", {"n": 1}, lambda: bool(got))
        assert got[-1] == {"n": 1}
        f.subscribe(False)
        time.sleep(0.1)  # the unsubscription reaches the publisher
        n = len(got)
        for i in range(20):
            p.publish("result", {"n": 2})
            time.sleep(0.005)
        assert len(got) == n
    finally:
        f.close()
    assert not f.alive()


def test_a_follower_sleeps_without_a_timer_and_closes_at_once(pub):
    ctx, address, p = pub
    f = Follower(ctx, address, ("state",), lambda t, b: None, name="t")
    try:
        if not has_thread_stats(f.thread):
            pytest.skip("no /proc here")
        time.sleep(0.05)
        before = voluntary_switches(f.thread)
        time.sleep(0.5)
        # a 100 ms poll timer would wake it five times here; a blocked poll, never
        assert voluntary_switches(f.thread) - before <= 1
    finally:
        start = time.monotonic()
        f.close()
    assert not f.alive()
    assert time.monotonic() - start < 0.5


def test_results_subscribe_while_a_wait_runs_and_not_otherwise(pub):
    ctx, address, p = pub
    r = Results(ctx, address, name="t-results")
    stop = threading.Event()

    def publisher():
        n = 0
        while not stop.is_set():
            n += 1
            p.publish("result", {"n": n, "valid": n % 2 == 0})
            time.sleep(0.005)

    t = threading.Thread(target=publisher, daemon=True)
    t.start()
    try:
        time.sleep(0.1)
        assert r.seen == 0  # nobody waits: nothing received
        got = r.wait_results(3, timeout_s=5.0)
        assert len(got) == 3 and all(x["valid"] for x in got)
        assert [x["n"] for x in got] == sorted(x["n"] for x in got)
        anything = r.wait_results(2, timeout_s=5.0, valid_only=False)
        assert len(anything) == 2 and anything[0]["n"] > got[-1]["n"]  # only results after the call
        time.sleep(0.1)  # the unsubscription reaches the publisher
        seen = r.seen
        time.sleep(0.1)
        assert r.seen == seen  # no waiter: no more results come in
    finally:
        stop.set()
        t.join(timeout=2)
        r.close()


def test_results_wait_times_out_with_what_came(pub):
    ctx, address, p = pub
    r = Results(ctx, address, name="t-results")
    try:
        start = time.monotonic()
        assert r.wait_results(1, timeout_s=0.2) == []
        assert 0.15 <= time.monotonic() - start < 2.0
    finally:
        r.close()
