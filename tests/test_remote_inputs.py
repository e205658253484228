"""The controller process's mirror of the world (sim.remote.RemoteWorldView) turns every
``inputs`` edge message into a listener call, so the RPi.GPIO stand-in fires a callback for
both edges of a 1 ms pulse (PRODUCT S3a), and a periodic snapshot that is older than an edge
never makes or undoes one."""

from __future__ import annotations

import threading

from nirf.sim.remote import RemoteWorldView

CLOSED = {"key": True, "interlock_closed": True, "footswitch": False}


def mirror(start=CLOSED, t_ns=0):
    """A RemoteWorldView without its sockets: only the input bookkeeping is under test."""
    view = object.__new__(RemoteWorldView)
    view._lock = threading.Lock()
    view._inputs = dict(start)
    view._last_edge_ns = t_ns
    view._snapshot_candidate = None
    view._input_listeners = []
    seen = []
    view.add_input_listener(lambda inputs: seen.append(dict(inputs)))
    return view, seen


def test_both_edges_of_a_pulse_reach_the_listeners_in_order():
    view, seen = mirror()
    view._on("inputs", dict(CLOSED, interlock_closed=False, t_ns=1_000_000))
    view._on("inputs", dict(CLOSED, t_ns=2_000_000))  # 1 ms later
    assert [s["interlock_closed"] for s in seen] == [False, True]
    assert "t_ns" not in seen[0]


def test_a_stale_snapshot_between_the_edges_changes_nothing():
    view, seen = mirror()
    view._on("inputs", dict(CLOSED, interlock_closed=False, t_ns=10))
    view._on("inputs", dict(CLOSED))  # read before the edge, sent after it
    assert view.inputs()["interlock_closed"] is False and len(seen) == 1
    view._on("inputs", dict(CLOSED, t_ns=20))
    assert [s["interlock_closed"] for s in seen] == [False, True]


def test_two_agreeing_snapshots_resynchronise_a_mirror_that_lost_an_edge():
    view, seen = mirror()
    lost = dict(CLOSED, key=False)
    view._on("inputs", lost)
    assert seen == []
    view._on("inputs", lost)
    assert seen == [lost] and view.inputs()["key"] is False


def test_an_edge_older_than_the_last_applied_is_dropped():
    view, seen = mirror(t_ns=100)
    view._on("inputs", dict(CLOSED, interlock_closed=False, t_ns=50))
    assert seen == [] and view.inputs()["interlock_closed"] is True
