"""Imaging's view of the safety core: the frame records and the MCU's notices it publishes
stay queued on imaging's socket until the acquisition takes them (no thread per record)."""

from __future__ import annotations

import time

import pytest
import zmq

from nirf.hal.laser import FrameTag, McuNotice
from nirf.services.common import ipc
from nirf.services.imaging.main import SafetyLink


@pytest.fixture
def link(tmp_path):
    ctx = zmq.Context()
    pub = ipc.Publisher(ctx, ipc.endpoint(tmp_path, "safety_pub"))
    link = SafetyLink(ctx, tmp_path)
    yield pub, link
    link.close()
    pub.close()
    ctx.destroy(linger=0)


def _frame(n: int) -> dict:
    return {"counter": n, "lit": n % 2 == 0, "mcu_time_us": 1000 * n, "host_time_ns": 10 ** 9 + n}


def _connected(pub, link) -> None:
    """Publish a record until the link sees one (a subscription takes a moment), then
    take everything queued."""
    deadline = time.monotonic() + 5.0
    while True:
        pub.publish("frame", _frame(0))
        if link.wait_input(0.02):
            break
        assert time.monotonic() < deadline, "the link never received a record"
    time.sleep(0.05)
    link.poll()


def test_records_and_notices_wait_on_the_socket_until_polled_in_order(link):
    pub, link = link
    _connected(pub, link)
    assert link.poll() == ([], [])  # nothing new
    for n in range(1, 6):
        pub.publish("frame", _frame(n))
    pub.publish("notice", {"kind": "CUT", "detail": ["5"]})
    assert link.wait_input(2.0)
    deadline = time.monotonic() + 2.0
    tags, notices = [], []
    while (len(tags) < 5 or not notices) and time.monotonic() < deadline:
        t, n = link.poll()
        tags += t
        notices += n
        time.sleep(0.01)
    assert tags == [FrameTag(n, n % 2 == 0, 1000 * n, 10 ** 9 + n) for n in range(1, 6)]
    assert notices == [McuNotice("CUT", ("5",))]
    assert link.poll() == ([], [])


def test_a_malformed_record_is_counted_and_skipped(link):
    pub, link = link
    _connected(pub, link)
    pub.publish("frame", {"counter": "seven", "lit": True, "mcu_time_us": 1, "host_time_ns": 2})
    pub.publish("frame", _frame(8))
    assert link.wait_input(2.0)
    deadline = time.monotonic() + 2.0
    tags = []
    while not tags and time.monotonic() < deadline:
        tags += link.poll()[0]
        time.sleep(0.01)
    assert tags == [FrameTag(8, True, 8000, 10 ** 9 + 8)]
    assert link.frames_dropped == 1


def test_waiting_for_input_times_out_when_nothing_comes(link):
    pub, link = link
    _connected(pub, link)
    start = time.monotonic()
    assert link.wait_input(0.1) is False
    assert 0.05 <= time.monotonic() - start < 2.0
