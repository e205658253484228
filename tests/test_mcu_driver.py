"""The laser MCU driver against the MCU emulator: in-thread with a manual clock, and once
over a real pseudo-terminal with pyserial."""

from __future__ import annotations

import binascii
import threading
import time

import pytest
import serial

from nirf.drivers.laser_mcu import McuLaser
from nirf.hal.clock import ManualClock, SystemClock
from nirf.hal.errors import (
    DeviceDisconnected,
    DeviceError,
    DeviceRejected,
    DeviceTimeout,
    InvalidArgument,
    ProtocolError,
)
from nirf.hal.laser import LaserStatus
from nirf.sim.mcu_emulator import McuEmulator
from nirf.sim.serial_link import LoopbackSerial, PtyLink
from nirf.sim.world import World

FULL_SCALE_MW = 500.0


def raw_line(text: str) -> bytes:
    return f"{text}*{binascii.crc_hqx(text.encode(), 0xFFFF):04X}\n".encode()


def written_lines(port: LoopbackSerial) -> list[str]:
    return [ln for ln in bytes(port.written).decode("ascii").split("\n") if ln]


def command_of(ln: str) -> str:
    """'123 EN 0*ABCD' -> 'EN 0'"""
    return ln.rpartition("*")[0].partition(" ")[2]


class Rig:
    """World + emulator + loopback port + driver, all on one manual clock."""

    def __init__(self, **driver_kw):
        self.clock = ManualClock()
        self.world = World(self.clock)
        self.emu = McuEmulator(self.world, self.clock, full_scale_mw=FULL_SCALE_MW, duty_ceiling=0.8, seed=3)
        self.ports: list[LoopbackSerial] = []
        self.factory_errors: list[Exception] = []
        self.factory_calls = 0
        self.laser = McuLaser(self.factory, clock=self.clock, **driver_kw)

    def new_port(self) -> LoopbackSerial:
        port = LoopbackSerial(self.emu, self.clock, timeout=0.05)
        self.ports.append(port)
        return port

    def factory(self) -> LoopbackSerial:
        self.factory_calls += 1
        if self.factory_errors:
            raise self.factory_errors.pop(0)
        return self.new_port()

    @property
    def port(self) -> LoopbackSerial:
        return self.ports[-1]

    def enable_behind_the_drivers_back(self, duty: float = 0.2) -> None:
        """Another host (or a previous run) left the MCU emitting."""
        for i, cmd in enumerate((f"DUTY {duty} {duty * FULL_SCALE_MW:.1f}", f"EN 1 {duty * FULL_SCALE_MW:.1f}")):
            self.emu.feed(raw_line(f"{60000 + i} {cmd}"))
        self.emu.take_output()


@pytest.fixture
def rig():
    return Rig()


@pytest.fixture
def connected(rig):
    rig.laser.connect()
    return rig


def test_off_after_connect_even_if_left_enabled(rig):
    rig.enable_behind_the_drivers_back()
    assert rig.world.laser_output_mw() > 0
    rig.laser.connect()
    assert rig.world.laser_output_mw() == 0.0
    st = rig.laser.status()
    assert not st.output_on and st.duty == 0.0
    # the first commands on the link force the output off
    assert [command_of(ln) for ln in written_lines(rig.port)[:2]] == ["EN 0", "DUTY 0 0"]


def test_constructing_does_no_io(rig):
    assert rig.factory_calls == 0


def test_identity_status_and_emission(connected):
    laser, world = connected.laser, connected.world
    assert "model=NIRF-LMCU" in laser.identity()
    laser.set_duty(0.2, 100.0)
    laser.set_enabled(True, 100.0)
    laser.heartbeat()
    st = laser.status()
    assert isinstance(st, LaserStatus)
    assert st.output_on and st.duty == pytest.approx(0.2)
    assert st.duty_ceiling == pytest.approx(0.8)
    assert st.interlock_closed and st.key_on
    assert st.photodiode_mw == pytest.approx(0.2 * FULL_SCALE_MW, rel=0.05)
    assert st.faults == ()
    assert world.laser_output_mw() == pytest.approx(0.2 * FULL_SCALE_MW)
    laser.force_off()
    assert world.laser_output_mw() == 0.0
    assert laser.status().duty == 0.0


def test_heartbeat_and_status_in_one_exchange(connected):
    laser = connected.laser
    laser.set_duty(0.2, 100.0)
    laser.set_enabled(True, 100.0)
    before = len(written_lines(connected.port))
    st = laser.heartbeat_status()
    sent = [command_of(ln) for ln in written_lines(connected.port)[before:]]
    assert sent == ["HBST"]
    assert st.output_on and st.duty == pytest.approx(0.2) and st.interlock_closed and st.key_on
    assert st.photodiode_mw == pytest.approx(0.2 * FULL_SCALE_MW, rel=0.05)


def test_heartbeat_status_falls_back_to_hb_and_st_on_older_firmware(connected, caplog):
    laser, emu = connected.laser, connected.emu
    table = dict(emu._COMMANDS)
    del table["HBST"]
    emu._COMMANDS = table  # firmware 2.0: no HBST
    before = len(written_lines(connected.port))
    st = laser.heartbeat_status()
    st2 = laser.heartbeat_status()
    sent = [command_of(ln) for ln in written_lines(connected.port)[before:]]
    assert sent == ["HBST", "HB", "ST", "HB", "ST"]  # asked once, then separately
    assert st.faults == () and st2.faults == ()
    assert "does not know HBST" in caplog.text


def test_watchdog_timeout_set_at_connect():
    rig = Rig(heartbeat_timeout_ms=300)
    rig.laser.connect()
    assert any(command_of(ln) == "WDT 300" for ln in written_lines(rig.port))
    rig.laser.set_enabled(True, 0.0)
    rig.clock.advance(0.35)
    st = rig.laser.status()
    assert "WDOG" in st.faults and not st.output_on


def test_duty_above_ceiling_rejected_at_once(connected):
    laser = connected.laser
    laser.set_duty(0.3, 150.0)
    before = len(written_lines(connected.port))
    with pytest.raises(DeviceRejected) as info:
        laser.set_duty(0.9, 450.0)
    msg = str(info.value)
    assert "laser-mcu" in msg and "0.9" in msg and "0.8" in msg
    assert len(written_lines(connected.port)) == before + 1  # no retry of a refusal
    assert laser.status().duty == pytest.approx(0.3)


def test_enable_refused_names_the_cause(connected):
    connected.world.apply({"interlock": "open"})
    with pytest.raises(DeviceRejected, match="interlock"):
        connected.laser.set_enabled(True, 0.0)


def test_clear_faults_refused_then_accepted(connected):
    laser, world = connected.laser, connected.world
    laser.set_enabled(True, 0.0)
    world.apply({"key": False})
    _, notices = laser.poll()
    assert any(n.kind == "FAULT" and "KEY" in n.detail for n in notices)
    with pytest.raises(DeviceRejected, match="key off"):
        laser.clear_faults()
    world.apply({"key": True})
    laser.clear_faults()
    assert laser.status().faults == ()


def test_corrupted_replies_retried_then_protocol_error(connected):
    rig = connected
    rig.world.apply({"fault": {"serial_corruption": 1.0}})
    before = len(written_lines(rig.port))
    with pytest.raises(ProtocolError) as info:
        rig.laser.status()
    assert "laser-mcu" in str(info.value) and "ST" in str(info.value)
    sent = written_lines(rig.port)[before:]
    assert len(sent) == rig.laser.retries + 1
    assert len(set(sent)) == 1  # every retry is the identical line: same seq
    assert not isinstance(info.value, DeviceTimeout)


def test_garbage_from_the_port_gives_protocol_error(connected, mocker):
    # every read of the port brings garbage (the driver reads whole chunks)
    mocker.patch.object(connected.port, "read", return_value=b"#%&garbage\x00\n")
    mocker.patch.object(connected.port, "read_until", return_value=b"#%&garbage\x00\n")
    with pytest.raises(ProtocolError, match="laser-mcu"):
        connected.laser.heartbeat()
    assert connected.laser.corrupt_lines >= connected.laser.retries + 1


def test_silent_device_times_out_after_bounded_retries(connected, mocker):
    mocker.patch.object(connected.emu, "take_output", return_value=b"")
    before = len(written_lines(connected.port))
    t0 = connected.clock.monotonic()
    with pytest.raises(DeviceTimeout) as info:
        connected.laser.heartbeat()
    assert "laser-mcu" in str(info.value) and "HB" in str(info.value)
    assert len(written_lines(connected.port)) - before == connected.laser.retries + 1
    # each attempt waited its timeout (simulated time)
    waited = connected.clock.monotonic() - t0
    assert waited >= (connected.laser.retries + 1) * connected.laser.timeout_s


def test_retried_command_not_applied_twice(connected, mocker):
    rig = connected
    port = rig.port
    real_read = port.read
    damaged = []

    def flaky_read(*args, **kwargs):
        data = real_read(*args, **kwargs)
        if damaged:
            return data
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if b" OK" in line and not line.startswith(b"!"):
                damaged.append(line)
                lines[i] = line.replace(b"OK", b"0K", 1)  # one character changed
                return b"\n".join(lines)
        return data

    mocker.patch.object(port, "read", side_effect=flaky_read)
    before = len(written_lines(port))
    rig.laser.start_frames(30.0, 10_000, True)
    assert damaged, "the reply was not damaged: the test did not exercise a retry"
    sent = written_lines(port)[before:]
    assert len(sent) == 2 and sent[0] == sent[1]  # resent with the same sequence number
    assert sum(1 for c in rig.emu.executed if c.partition(" ")[2].startswith("FTON")) == 1
    assert rig.laser.resends == 1


def test_vanished_port_then_reconnect_forces_off(connected):
    rig = connected
    rig.laser.set_duty(0.2, 100.0)
    rig.laser.set_enabled(True, 100.0)
    assert rig.world.laser_output_mw() > 0
    old = rig.port
    old.close()  # the USB device went away
    with pytest.raises(DeviceDisconnected, match="laser-mcu"):
        rig.laser.heartbeat()
    rig.factory_errors.append(serial.SerialException("could not open port: no such file"))
    rig.laser.reconnect(attempts=3)
    assert rig.port is not old
    assert rig.factory_calls == 3  # connect, one failure, the fresh port
    assert [command_of(ln) for ln in written_lines(rig.port)[:2]] == ["EN 0", "DUTY 0 0"]
    assert rig.world.laser_output_mw() == 0.0
    assert not rig.laser.status().output_on


def test_automatic_reconnect_on_next_call(connected):
    rig = connected
    rig.laser.set_duty(0.2, 100.0)
    rig.laser.set_enabled(True, 100.0)
    rig.port.close()
    with pytest.raises(DeviceDisconnected):
        rig.laser.status()
    st = rig.laser.status()  # reconnects once by itself, forcing the output off first
    assert not st.output_on
    assert rig.world.laser_output_mw() == 0.0
    assert command_of(written_lines(rig.port)[0]) == "EN 0"


def test_reconnect_gives_up_after_bounded_attempts(connected):
    rig = connected
    rig.port.close()
    rig.factory_errors.extend(OSError(f"no device {i}") for i in range(10))
    calls_before = rig.factory_calls
    with pytest.raises(DeviceDisconnected, match="after 4 attempts"):
        rig.laser.reconnect(attempts=4)
    assert rig.factory_calls - calls_before == 4


def test_force_off_never_raises_on_a_dead_link(connected):
    rig = connected
    rig.port.close()
    rig.factory_errors.extend(OSError("gone") for _ in range(3))
    rig.laser.force_off()  # logs, does not raise


def test_commands_before_connect_raise_disconnected(rig):
    with pytest.raises(DeviceDisconnected, match="laser-mcu"):
        rig.laser.status()
    rig.laser.force_off()  # still never raises


def test_close_forces_off_and_closes(connected):
    rig = connected
    rig.laser.set_duty(0.1, 50.0)
    rig.laser.set_enabled(True, 50.0)
    rig.laser.close()
    assert rig.world.laser_output_mw() == 0.0
    assert not rig.port.is_open
    with pytest.raises(DeviceDisconnected):
        rig.laser.status()  # closed on purpose: no automatic reconnect


def test_frame_tags_from_poll(connected):
    rig = connected
    laser = rig.laser
    laser.set_duty(0.2, 100.0)
    laser.set_enabled(True, 100.0)
    laser.start_frames(50.0, 5_000, True)
    tags, notices = [], []
    for _ in range(10):
        rig.clock.advance(0.02)
        laser.heartbeat()
        got_tags, got_notices = laser.poll()
        tags += got_tags
        notices += got_notices
    assert len(tags) >= 9
    assert [t.counter for t in tags] == list(range(len(tags)))
    assert [t.lit for t in tags] == [t.counter % 2 == 0 for t in tags]
    period_us = 20_000
    assert all(b.mcu_time_us - a.mcu_time_us == period_us for a, b in zip(tags, tags[1:]))
    assert all(t.host_time_ns > 0 for t in tags)
    assert not any(n.kind == "FAULT" for n in notices)
    st = laser.status()
    assert st.frame_timing and st.modulation and st.frame_counter >= len(tags)
    laser.stop_frames()
    assert not laser.status().frame_timing


def test_corrupted_notices_are_counted_and_dropped(connected):
    rig = connected
    rig.laser.start_frames(50.0, 5_000, False)
    first, _ = rig.laser.poll()  # frame 0 came with the reply, before the corruption
    rig.world.apply({"fault": {"serial_corruption": 1.0}})
    corrupt_before = rig.laser.corrupt_lines
    rig.clock.advance(0.1)
    tags, _ = rig.laser.poll()
    assert len(first) == 1 and tags == []
    assert rig.laser.corrupt_lines - corrupt_before >= 4  # frames 1-5
    rig.world.apply({"fault": {"serial_corruption": 0.0}})
    rig.clock.advance(0.02)
    tags, _ = rig.laser.poll()
    assert tags and tags[0].counter >= 5  # the link carries on after the damage


def test_start_frames_validates_before_io(connected):
    before = len(written_lines(connected.port))
    with pytest.raises(InvalidArgument):
        connected.laser.start_frames(30.0, 40_000, True)  # exposure longer than the frame
    assert len(written_lines(connected.port)) == before


def test_constructor_validates():
    with pytest.raises(InvalidArgument):
        McuLaser(lambda: None, retries=-1)
    with pytest.raises(InvalidArgument):
        McuLaser(lambda: None, heartbeat_timeout_ms=5000)
    with pytest.raises(InvalidArgument):
        McuLaser(lambda: None, timeout_s=0)


def test_threads_share_the_driver(connected):
    laser = connected.laser
    errors: list[Exception] = []

    def worker(call):
        try:
            for _ in range(25):
                call()
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(c,)) for c in
               (laser.status, laser.heartbeat, lambda: laser.poll(), laser.status)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10.0)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert laser.stale_replies == 0


# -- a real pseudo-terminal and pyserial ---------------------------------------------------------

@pytest.fixture
def pty_rig():
    clock = SystemClock()
    world = World(clock)
    emu = McuEmulator(world, clock, full_scale_mw=FULL_SCALE_MW)
    link = PtyLink(emu, "mcu-test").start()
    laser = McuLaser(lambda: serial.Serial(link.port, 115200, timeout=0.05), clock=clock, timeout_s=0.5)
    yield world, emu, link, laser
    laser.close()
    link.stop()


def test_over_a_real_pty(pty_rig):
    world, emu, link, laser = pty_rig
    laser.connect()
    assert not emu.output_enabled
    assert "NIRF-LMCU" in laser.identity()
    laser.set_duty(0.1, 50.0)
    laser.set_enabled(True, 50.0)
    assert laser.status().output_on
    laser.start_frames(100.0, 2_000, True)
    tags = []
    deadline = time.monotonic() + 5.0
    while len(tags) < 6 and time.monotonic() < deadline:
        laser.heartbeat()
        tags += laser.poll()[0]
        time.sleep(0.01)
    assert len(tags) >= 6
    counters = [t.counter for t in tags]
    assert counters == list(range(counters[0], counters[0] + len(tags)))
    assert all(t.lit == (t.counter % 2 == 0) for t in tags)
    laser.stop_frames()
    laser.force_off()
    assert world.laser_output_mw() == 0.0
    assert not laser.status().output_on


# -- protocol 2: factory record, expected mW, counts, notices ------------------------------
def test_factory_record_read_at_connect_and_cached(rig):
    from nirf.sim.mcu_emulator import factory_for

    rig.emu = McuEmulator(rig.world, rig.clock, full_scale_mw=FULL_SCALE_MW, seed=3,
                          factory=factory_for(FULL_SCALE_MW, 200.0, 301.0))
    rig.laser.connect()
    fc = rig.laser.factory()
    assert fc == rig.emu.factory  # every field, read over the link
    assert fc.duty_ceiling == pytest.approx(0.44) and fc.optical_trip_mw == pytest.approx(220.0)
    assert fc.mw_at(fc.duty_ceiling) <= 220.0 and fc.duty_for(100.0) == pytest.approx(0.2)
    sent = [command_of(ln) for ln in written_lines(rig.port)]
    assert sent[:5] == ["EN 0", "DUTY 0 0", "ID", "WDT 500", "FAC"]
    assert sent[5:] == ["FACR 0", "FACR 1"]
    rig.laser.status()
    rig.laser.factory()
    assert [command_of(ln) for ln in written_lines(rig.port)][-1] == "ST"  # cached, not re-read


def test_blank_mcu_connects_but_has_no_factory_record(rig):
    rig.emu = McuEmulator(rig.world, rig.clock, full_scale_mw=FULL_SCALE_MW, seed=3, factory=None)
    rig.laser.connect()
    with pytest.raises(DeviceError, match="no factory record"):
        rig.laser.factory()
    with pytest.raises(DeviceRejected, match="no factory record"):
        rig.laser.set_enabled(True, 0.0)


def test_write_factory_needs_the_service_jumper(connected):
    from nirf.hal.laser import FactoryCalibration

    laser, world = connected.laser, connected.world
    before = laser.factory()
    new = FactoryCalibration.build(((0.0, 0.0), (0.5, 150.0), (1.0, 400.0)), 1.0, 200.0, 600.0)
    with pytest.raises(DeviceRejected, match="service jumper"):
        laser.write_factory(new)
    assert laser.read_factory() == before
    world.apply({"service_jumper": True})
    laser.write_factory(new)
    world.apply({"service_jumper": False})
    assert laser.factory() == new == connected.emu.factory
    # 220 mW lies on the 150 -> 400 mW segment at 0.5 + 0.5 x 70/250
    assert laser.factory().duty_ceiling == pytest.approx(0.64)
    with pytest.raises(InvalidArgument):
        laser.write_factory("not a record")


def test_every_on_and_set_line_carries_expected_mw(connected):
    laser = connected.laser
    laser.set_duty(0.1, 50.0)
    laser.set_enabled(True, 50.0)
    laser.set_enabled(False)
    sent = [command_of(ln) for ln in written_lines(connected.port)][-3:]
    assert sent == ["DUTY 0.100000 50.000", "EN 1 50.000", "EN 0"]
    for bad in (-1.0, float("nan"), 1e9, True):
        with pytest.raises(InvalidArgument, match="expected power"):
            laser.set_duty(0.1, bad)
    with pytest.raises(DeviceRejected, match="factory table"):
        laser.set_duty(0.4, 20.0)  # the version-1 lie: 20 mW claimed, 200 mW true


def test_status_carries_edge_counts_and_on_time(connected):
    laser, world, clock = connected.laser, connected.world, connected.clock
    laser.set_duty(0.1, 50.0)
    laser.set_enabled(True, 50.0)
    clock.advance(0.3)
    laser.heartbeat()
    world.set_inputs({"key": False})
    world.set_inputs({"key": True})
    world.set_inputs({"interlock": "open"})
    world.set_inputs({"interlock": "closed"})
    world.set_inputs({"interlock": "open"})
    world.set_inputs({"interlock": "closed"})
    st = laser.status()
    assert (st.key_offs, st.interlock_openings) == (1, 2)
    assert st.on_time_s == pytest.approx(0.3, abs=0.01)
    assert st.budget_s == connected.emu.factory.budget_s
    assert "KEY" in st.faults and not st.output_on
    _, notices = laser.poll()
    inputs = [n.detail for n in notices if n.kind == "INPUT"]
    assert inputs == [("KEY", "0"), ("KEY", "1"), ("ILK", "0"), ("ILK", "1"), ("ILK", "0"), ("ILK", "1")]


def test_cut_notice_for_a_lit_frame_turned_off_mid_exposure(connected):
    laser, clock = connected.laser, connected.clock
    laser.set_duty(0.1, 50.0)
    laser.start_frames(10.0, 50_000, modulate=True)
    laser.set_enabled(True, 50.0)
    clock.advance(0.21)  # frame 2 (lit) began at 0.2 s; its exposure runs to 0.25 s
    laser.heartbeat()
    laser.set_enabled(False)
    frames, notices = laser.poll()
    assert [n.detail for n in notices if n.kind == "CUT"] == [("2",)]
    assert [(f.counter, f.lit) for f in frames][:3] == [(0, False), (1, False), (2, True)]
