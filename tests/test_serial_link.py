"""The pseudo-terminal link that serves an emulator core to a driver (sim.serial_link): an
idle core is ticked less often, and output the core queues between ticks (an input
interrupt's notice) is still sent at once."""

from __future__ import annotations

import os
import select
import threading
import time

from nirf.hal.clock import ManualClock
from nirf.sim.mcu_emulator import IDLE_TICK_S, McuEmulator
from nirf.sim.serial_link import PtyLink
from nirf.sim.world import World


class SlowCore:
    """A core that asks for a tick only every 30 s, and queues output from another thread."""

    def __init__(self):
        self.on_output = None
        self.out = bytearray()
        self.lock = threading.Lock()
        self.ticks = 0

    def feed(self, data: bytes) -> None:
        pass

    def take_output(self) -> bytes:
        with self.lock:
            data, self.out = bytes(self.out), bytearray()
            return data

    def tick(self) -> None:
        self.ticks += 1

    def tick_interval_s(self) -> float:
        return 30.0

    def interrupt(self, text: bytes) -> None:
        with self.lock:
            self.out += text
        if self.on_output is not None:
            self.on_output()


def read_line(path: str, timeout_s: float) -> bytes:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        got = b""
        deadline = time.monotonic() + timeout_s
        while not got.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                return got
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                got += os.read(fd, 100)
        return got
    finally:
        os.close(fd)


def test_output_queued_between_ticks_goes_out_at_once():
    core = SlowCore()
    link = PtyLink(core, "slow").start()
    try:
        assert core.on_output is not None, "the link did not give the core its wake-up"
        time.sleep(0.05)
        threading.Timer(0.1, core.interrupt, args=(b"! IN ILK 0\n",)).start()
        # well before the core's next tick (30 s): only the wake-up can have sent it
        assert read_line(link.port, timeout_s=5.0) == b"! IN ILK 0\n"
    finally:
        link.stop()


def test_the_mcu_emulator_ticks_fast_only_while_something_runs_on_time():
    clock = ManualClock()
    emu = McuEmulator(World(clock), clock, full_scale_mw=500.0, heartbeat_timeout_ms=500)
    assert emu.tick_interval_s() == IDLE_TICK_S  # dark, no frames: the thermal model only
    emu.feed(b"")  # nothing to do
    emu._ft_running = True
    assert emu.tick_interval_s() == 0.001  # frames are triggered at exact times
    emu._ft_running = False
    emu._enabled = True
    assert emu.tick_interval_s() == 0.001  # watchdog, trips and budget while permitted
