"""hal.threads: the OS names of threads and the pipe-based wake-up the supervisor sleeps on."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

import pytest

from nirf.hal.threads import WakeSignal, name_os_thread, os_named

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in /proc")


def _comm(native_id: int) -> str:
    with open(f"/proc/self/task/{native_id}/comm") as f:
        return f.read().strip()


@linux_only
def test_os_named_gives_the_thread_its_name_and_returns_the_targets_result():
    seen = {}

    def work(a, b=0):
        seen["comm"] = _comm(threading.get_native_id())
        seen["result"] = a + b

    t = threading.Thread(target=os_named("nirf-test-name", work), args=(2,), kwargs={"b": 3})
    t.start()
    t.join(5)
    assert seen == {"comm": "nirf-test-name", "result": 5}


@linux_only
def test_a_long_name_is_cut_to_what_linux_keeps():
    seen = {}

    def work():
        name_os_thread("a-name-much-longer-than-fifteen")
        seen["comm"] = _comm(threading.get_native_id())

    t = threading.Thread(target=work)
    t.start()
    t.join(5)
    assert seen["comm"] == "a-name-much-lon"


def test_wait_times_out_without_a_set():
    w = WakeSignal()
    t0 = time.monotonic()
    assert w.wait(0.05) is False
    assert time.monotonic() - t0 >= 0.04  # it slept; it did not return at once


def test_a_set_from_another_thread_wakes_the_waiter():
    w = WakeSignal()
    timer = threading.Timer(0.05, w.set)
    timer.start()
    try:
        assert w.wait(5.0) is True
        assert w.is_set()
    finally:
        timer.cancel()


def test_a_set_before_the_wait_returns_at_once_and_clear_lowers_the_flag():
    w = WakeSignal()
    w.set()
    assert w.wait(5.0) is True
    w.clear()
    assert not w.is_set()
    t0 = time.monotonic()
    assert w.wait(0.05) is False  # the byte of the earlier set was drained: no early wake
    assert time.monotonic() - t0 >= 0.04


def test_a_stray_wake_byte_after_clear_is_drained_and_does_not_spin():
    # A set() racing a clear() can leave a byte in the pipe with the flag down: the next wait
    # may return early once, the one after must sleep again.
    w = WakeSignal()
    w.set()
    w.clear()
    os.write(w._w, b"!")  # the racing set()'s byte, written after the clear
    assert w.wait(1.0) is False
    t0 = time.monotonic()
    assert w.wait(0.05) is False
    assert time.monotonic() - t0 >= 0.04


def test_many_sets_do_not_block_the_setter():
    w = WakeSignal()
    for _ in range(100_000):  # more than a pipe holds: later writes are dropped, never block
        w.set()
    assert w.wait(0) is True
    w.clear()
    assert w.wait(0) is False


def test_the_pipe_is_closed_when_the_signal_is_collected():
    w = WakeSignal()
    r, wr = w._r, w._w
    os.fstat(r)
    del w
    gc.collect()
    for fd in (r, wr):
        with pytest.raises(OSError):
            os.fstat(fd)
