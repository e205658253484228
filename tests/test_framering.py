"""The shared-memory frame ring: every slot's lifetime (held in imaging, leased to processing),
no frame overwritten while in use, nothing leaked, and a reader that refuses what is not
(or no longer) the frame a message names."""

from __future__ import annotations

import gc
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nirf.hal.clock import ManualClock
from nirf.services.common import framering
from nirf.services.common.framering import FrameRing, RingAllocator, RingMiss, RingReader, slot_of

H, W = 24, 40


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def ring(tmp_path, clock):
    r = FrameRing(tmp_path / "frames.ring", H * W * 2, slots=6, clock=clock)
    yield r
    r.close()


def _frame(ring: FrameRing, value: int) -> np.ndarray:
    a = ring.allocate(H, W)
    assert a is not None
    a[...] = value
    return a


def _done(ring: FrameRing, seq: int, instance: str = "p1") -> None:
    ring.on_report(framering.report("done", ring.token_hex, instance, seq=seq))


def test_a_slot_is_given_out_again_only_when_no_view_of_it_is_left(ring):
    kept = _frame(ring, 7)
    view = kept[3:5, 2:9]  # a partial view keeps the slot too
    kept_slot = slot_of(kept).slot
    del kept
    gc.collect()
    for i in range(40):  # many more frames than slots: all go through the other five
        a = _frame(ring, 100 + i)
        assert slot_of(a).slot != kept_slot
        del a
    assert (view == 7).all()  # never overwritten while in use
    del view
    gc.collect()
    given = {slot_of(_frame(ring, 1)).slot for _ in range(12)}
    assert kept_slot in given


def test_a_leased_slot_waits_for_processing_and_every_earlier_pair_goes_with_a_later_done(ring):
    pairs = []
    for i in range(3):
        on, off = _frame(ring, 10 + i), _frame(ring, 20 + i)
        how, part = ring.lease_pair(on, off)
        assert how == "ring" and part["seq"] == i + 1
        pairs.append(part)
    del on, off
    gc.collect()
    assert ring.busy() == {"slots": 6, "held": 0, "leased": 6, "free": 0}
    assert ring.allocate(H, W) is None  # every slot leased: the caller uses an ordinary array
    assert ring.stats["full"] == 1
    _done(ring, 2)  # processing done with pair 2: pair 1 was handled or never arrived
    assert ring.busy()["leased"] == 2
    reader = RingReader(ring.path)
    on, off = reader.views(pairs[2])
    assert (on == 12).all() and (off == 22).all()
    _done(ring, 3)
    assert ring.busy()["free"] == 6


def test_no_more_than_the_limit_of_pairs_is_leased(tmp_path, clock):
    ring = FrameRing(tmp_path / "r.ring", H * W * 2, slots=12, clock=clock)
    try:
        hows = []
        for _ in range(framering.MAX_PAIRS_IN_FLIGHT + 2):
            hows.append(ring.lease_pair(_frame(ring, 1), _frame(ring, 2))[0])
        assert hows == ["ring"] * framering.MAX_PAIRS_IN_FLIGHT + ["held_back"] * 2
        assert ring.stats["pairs_held_back"] == 2
        gc.collect()
        assert ring.busy()["free"] == 12 - 2 * framering.MAX_PAIRS_IN_FLIGHT  # held-back frames are free
    finally:
        ring.close()


def test_an_idle_report_ends_only_the_leases_of_pairs_sent_before_it(ring, clock):
    ring.lease_pair(_frame(ring, 1), _frame(ring, 2))
    clock.advance(1.0)
    since = clock.monotonic()
    clock.advance(0.01)  # this pair was sent after processing last received anything ...
    ring.lease_pair(_frame(ring, 3), _frame(ring, 4))
    gc.collect()
    ring.on_report(framering.report("idle", ring.token_hex, "p1", since=since))
    # ... so it may still be on its way: only the older pair's slots are free again
    assert ring.busy()["leased"] == 2 and ring.stats["released_idle"] == 2


def test_a_new_processing_process_ends_the_old_ones_leases(ring):
    _done(ring, 0, "p1")
    ring.lease_pair(_frame(ring, 1), _frame(ring, 2))
    gc.collect()
    _done(ring, 0, "p1")  # the same process, nothing done yet: the lease stays
    assert ring.busy()["leased"] == 2
    ring.on_report(framering.report("idle", None, "p2", since=0.0))  # restarted: the old one is gone
    assert ring.busy()["leased"] == 0 and ring.stats["released_restart"] == 2


@pytest.mark.parametrize("msg", [None, 3, {"kind": "done"}, {"kind": "done", "instance": 5, "seq": 9},
                                 {"kind": "done", "instance": "p", "token": "ff" * 16, "seq": 9},
                                 {"kind": "nonsense", "instance": "p", "token": None}])
def test_malformed_or_foreign_reports_free_nothing(ring, msg):
    ring.lease_pair(_frame(ring, 1), _frame(ring, 2))
    gc.collect()
    ring.on_report(msg)
    assert ring.busy()["leased"] == 2 and ring.stats["reports_bad"] == 1


def test_the_reader_refuses_a_slot_written_again_another_ring_and_bad_references(ring, tmp_path):
    on, off = _frame(ring, 5), _frame(ring, 6)
    _, part = ring.lease_pair(on, off)
    reader = RingReader(ring.path)
    a, b = reader.views(part)
    assert not a.flags.writeable and (a == 5).all() and (b == 6).all()
    with pytest.raises(RingMiss, match="gone"):
        reader.views(dict(part, token="00" * 16))
    for bad in (dict(part, on=[99, 1, H, W]), dict(part, on=[0, 1, H * 100, W]), dict(part, on="x"),
                dict(part, on=[0, True, H, W]), {"token": part["token"]}):
        with pytest.raises(RingMiss):
            reader.views(bad)
    # a lifetime bug (here: imaging ignoring the lease) shows: the generation moved on
    ring._lease = [None] * ring.slots
    del on, off, a, b
    gc.collect()
    for _ in range(ring.slots):
        _frame(ring, 9)
    assert not reader.current(part)
    with pytest.raises(RingMiss, match="written again"):
        reader.views(part)


def test_a_restarted_imaging_makes_a_new_ring_the_reader_follows(tmp_path, clock):
    path = tmp_path / "frames.ring"
    first = FrameRing(path, H * W * 2, slots=2, clock=clock)
    _, p1 = first.lease_pair(_frame(first, 1), _frame(first, 2))
    reader = RingReader(path)
    assert (reader.views(p1)[0] == 1).all()
    second = FrameRing(path, H * W * 2, slots=2, clock=clock)  # same path, new token
    _, p2 = second.lease_pair(_frame(second, 3), _frame(second, 4))
    assert (reader.views(p2)[1] == 4).all()
    with pytest.raises(RingMiss):
        reader.views(p1)
    first.close()  # not its file any more: the new ring stays
    assert path.exists()
    second.close()
    assert not path.exists()


def test_the_allocator_grows_the_ring_for_larger_frames_and_drains_reports_first(tmp_path, clock):
    drained = []
    alloc = RingAllocator(tmp_path / "frames.ring", slots=4, clock=clock, drain=lambda: drained.append(1))
    small = alloc(H, W)
    token = alloc.ring.token_hex
    big = alloc(H * 4, W * 4)
    assert big is not None and big.shape == (H * 4, W * 4) and alloc.ring.token_hex != token
    small[...] = 3  # the old ring's mapping lives while its frames do
    assert (small == 3).all() and len(drained) == 2
    alloc.close()


def test_without_room_for_a_ring_frames_are_ordinary_arrays(tmp_path, clock, caplog):
    alloc = RingAllocator(tmp_path / "missing-folder" / "frames.ring", clock=clock)
    assert alloc(H, W) is None and alloc(H, W) is None
    assert sum("unavailable" in r.message for r in caplog.records) == 1  # said once


def test_another_process_reads_the_frame_in_place(ring):
    on, off = _frame(ring, 0), _frame(ring, 0)
    on[...] = np.arange(H * W, dtype=np.uint16).reshape(H, W)
    off[...] = 5
    _, part = ring.lease_pair(on, off)
    code = ("import sys, json; from nirf.services.common.framering import RingReader;"
            f"a, b = RingReader(sys.argv[1]).views(json.loads(sys.argv[2]));"
            "print(int(a.sum()), int(b.sum()), a.shape)")
    import json

    out = subprocess.run([sys.executable, "-c", code, str(ring.path), json.dumps(part)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == [str(int(on.sum())), str(5 * H * W)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["frame", "pair", "drop", "done", "idle", "hold", "release"]), max_size=120))
def test_any_sequence_keeps_in_use_frames_intact_and_leaks_no_slot(tmp_path_factory, ops):
    clock = ManualClock()
    ring = FrameRing(tmp_path_factory.mktemp("ring") / "frames.ring", H * W * 2, slots=8, clock=clock)
    try:
        held: list[tuple[np.ndarray, int]] = []  # frames someone in imaging still holds
        leased: list[tuple[dict, int, int, float]] = []  # pairs processing has not finished
        pending: list[np.ndarray] = []
        reader = RingReader(ring.path)
        value = 0
        for op in ops:
            clock.advance(0.01)
            value = (value + 1) % 60000
            if op == "frame":
                a = ring.allocate(H, W)
                if a is not None:
                    a[...] = value
                    pending.append(a)
            elif op == "pair" and len(pending) >= 2:
                on, off = pending.pop(0), pending.pop(0)
                how, part = ring.lease_pair(on, off)
                if how == "ring":
                    leased.append((part, int(on[0, 0]), int(off[0, 0]), clock.monotonic()))
            elif op == "drop" and pending:
                pending.pop(0)
            elif op == "hold" and pending:
                a = pending.pop(0)
                held.append((a, int(a[0, 0])))
            elif op == "release" and held:
                held.pop(0)
            elif op == "done" and leased:
                part, v_on, v_off, _ = leased.pop(0)
                a, b = reader.views(part)  # processing reads it: still the frame it was sent
                assert (a == v_on).all() and (b == v_off).all()
                del a, b
                _done(ring, part["seq"])
            elif op == "idle":
                since = clock.monotonic() - 0.5
                ring.on_report(framering.report("idle", ring.token_hex, "p1", since=since))
                # pairs sent before that count as lost on the way; the later ones stay leased
                leased = [x for x in leased if x[3] >= since - framering.DELIVERY_MARGIN_S]
            gc.collect()
            for a, v in held:
                assert (a == v).all()  # nothing held was overwritten
            for part, v_on, v_off, _ in leased:
                a, b = reader.views(part)  # a leased frame is never written again
                assert (a == v_on).all() and (b == v_off).all()
                del a, b
        held.clear()
        pending.clear()
        leased.clear()
        a = b = on = off = None  # noqa: F841 (the loop's last views)
        ring.on_report(framering.report("idle", ring.token_hex, "p1", since=clock.monotonic() + 1.0))
        gc.collect()
        assert ring.busy()["free"] == ring.slots  # nothing leaked
    finally:
        ring.close()
