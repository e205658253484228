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


def _mcu_on_a_pty():
    import serial

    from nirf.drivers.laser_mcu import McuLaser
    from nirf.hal.clock import SystemClock

    clock = SystemClock()
    world = World(clock)
    emu = McuEmulator(world, clock, full_scale_mw=500.0, heartbeat_timeout_ms=1000)
    link = PtyLink(emu, "mcu").start()
    laser = McuLaser(lambda: serial.Serial(link.port, 115200, timeout=0.05), timeout_s=0.5,
                     heartbeat_timeout_ms=1000)
    laser.connect()
    laser.poll()  # whatever the connect left
    return world, link, laser


def test_the_driver_sleeps_until_the_mcu_sends_something_on_its_own():
    # the safety core's frames thread blocks in wait_input instead of polling every 5 ms
    world, link, laser = _mcu_on_a_pty()
    try:
        t0 = time.monotonic()
        assert laser.wait_input(0.2) is False  # nothing came: the whole timeout slept
        assert time.monotonic() - t0 >= 0.19
        threading.Timer(0.1, world.set_inputs, args=({"interlock": "open"},)).start()
        t0 = time.monotonic()
        assert laser.wait_input(5.0) is True
        assert time.monotonic() - t0 < 2.0  # woken by the line, not the timeout
        time.sleep(0.05)
        _, notices = laser.poll()
        assert ("INPUT", ("ILK", "0")) in [(n.kind, n.detail) for n in notices]
    finally:
        laser.close()
        link.stop()


def test_a_notice_taken_in_by_a_command_still_wakes_the_waiting_thread():
    # the supervisor's status read took the notice in with its reply (and queued it): the
    # port has nothing left to read, so only the driver's own wake-up can end the wait
    world, link, laser = _mcu_on_a_pty()
    try:
        laser.wait_input(0.01)  # the wake-up exists once a thread has waited
        world.set_inputs({"key": False})
        time.sleep(0.1)  # the notice is in the port's buffer before the command's reply
        laser.status()
        t0 = time.monotonic()
        assert laser.wait_input(5.0) is True
        assert time.monotonic() - t0 < 2.0
        _, notices = laser.poll()
        assert ("INPUT", ("KEY", "0")) in [(n.kind, n.detail) for n in notices]
    finally:
        laser.close()
        link.stop()
