"""The FW102C driver against the wheel emulator (LoopbackSerial + ManualClock), against
scripted and failing ports, and once over a real pseudo-terminal with pyserial."""

from __future__ import annotations

import threading

import pytest
import serial

from nirf.drivers.fw102c import READ_POLL_S, Fw102cWheel
from nirf.hal.clock import ManualClock, SystemClock
from nirf.hal.errors import (
    DeviceDisconnected,
    DeviceRejected,
    DeviceTimeout,
    InvalidArgument,
    ProtocolError,
    WheelStuck,
)
from nirf.sim.fw102c_emulator import IDN, Fw102cEmulator
from nirf.sim.serial_link import LoopbackSerial, PtyLink
from nirf.sim.world import World

STEP_S = 0.3


class Rig:
    """A world, the wheel emulator on a loopback port, and a driver on that port."""

    def __init__(self, positions: int = 6, start: int = 1, **emulator_kwargs):
        self.clock = ManualClock()
        self.world = World(self.clock)
        self.world.set_filter(start, moving=False)
        self.emulator = Fw102cEmulator(self.world, self.clock, positions=positions, step_s=STEP_S,
                                       **emulator_kwargs)
        self.ports: list[LoopbackSerial] = []
        self.wheel = Fw102cWheel(self.open_port, clock=self.clock, timeout_s=1.0, move_timeout_s=5.0)

    def open_port(self) -> LoopbackSerial:
        port = LoopbackSerial(self.emulator, self.clock, timeout=0.05, port="loopback-fw102c")
        self.ports.append(port)
        return port

    @property
    def port(self) -> LoopbackSerial:
        return self.ports[-1]


class ScriptedCore:
    """A wheel that answers each known line with a fixed value (or an error line) and
    echoes everything, to produce answers the emulator never gives."""

    def __init__(self, answers: dict[bytes, bytes | None]):
        self.answers = answers
        self._in = bytearray()
        self._out = bytearray()

    def feed(self, data: bytes) -> None:
        self._in += data
        while b"\r" in self._in:
            line, _, rest = bytes(self._in).partition(b"\r")
            self._in = bytearray(rest)
            answer = self.answers.get(line, b"Command error CMD_NOT_DEFINED")
            self._out += line + b"\r" + (answer + b"\r" if answer is not None else b"") + b">"

    def take_output(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def tick(self) -> None:
        pass


class SilentCore:
    """A port with nothing behind it."""

    def feed(self, data: bytes) -> None:
        pass

    def take_output(self) -> bytes:
        return b""

    def tick(self) -> None:
        pass


HEALTHY = {b"*idn?": IDN.encode(), b"pcount?": b"6", b"pos?": b"1", b"speed?": b"0"}


def scripted_wheel(answers: dict[bytes, bytes | None]) -> tuple[Fw102cWheel, ManualClock]:
    clock = ManualClock()
    core = ScriptedCore(answers)
    return Fw102cWheel(lambda: LoopbackSerial(core, clock, timeout=0.05), clock=clock), clock


@pytest.fixture
def rig() -> Rig:
    r = Rig()
    r.wheel.connect()
    yield r
    r.wheel.close()


# -- connect, identity, count ------------------------------------------------------------------

def test_connect_reads_identity_count_and_position(rig):
    assert "FW102C" in rig.wheel.identity()
    assert rig.wheel.position_count() == rig.emulator.pcount
    assert rig.wheel.position() == rig.world.filter_position
    assert rig.wheel.last_known_position == rig.world.filter_position


def test_a_twelve_position_wheel_reports_twelve():
    r = Rig(positions=12, start=9)
    r.wheel.connect()
    assert r.wheel.position_count() == 12
    assert r.wheel.position() == 9


def test_connect_makes_a_blocking_port_poll():
    clock = ManualClock()
    emulator = Fw102cEmulator(World(clock), clock)
    port = LoopbackSerial(emulator, clock, timeout=None)
    wheel = Fw102cWheel(lambda: port, clock=clock)
    wheel.connect()
    assert port.timeout == READ_POLL_S


def test_another_device_on_the_port_is_refused():
    wheel, _ = scripted_wheel({**HEALTHY, b"*idn?": b"ACME LASER 2.0"})
    with pytest.raises(ProtocolError, match="ACME LASER"):
        wheel.connect()
    assert not wheel.connected


def test_garbled_value_is_a_protocol_error():
    wheel, _ = scripted_wheel({**HEALTHY, b"pcount?": b"six"})
    with pytest.raises(ProtocolError, match="pcount"):
        wheel.connect()


def test_calls_before_connect_raise_disconnected():
    r = Rig()
    with pytest.raises(DeviceDisconnected, match="filter-wheel"):
        r.wheel.position()
    with pytest.raises(DeviceDisconnected):
        r.wheel.move(2)


# -- moves -------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [2, 3, 4, 5, 6, 1])
def test_move_reaches_and_verifies_the_position(rig, target):
    t0 = rig.clock.monotonic()
    assert rig.wheel.move(target) == target
    assert rig.world.filter_position == target and not rig.world.filter_moving
    assert rig.wheel.last_known_position == target
    sent = bytes(rig.port.written)
    command = f"pos={target}\r".encode()
    assert command in sent
    # the position was checked after the move command
    assert b"pos?\r" in sent[sent.rindex(command):]
    steps = min(abs(target - 1), 6 - abs(target - 1))
    assert rig.clock.monotonic() - t0 >= steps * STEP_S


def test_a_sequence_of_moves_follows_the_world(rig):
    for target in (3, 1, 6, 2, 2, 5):
        rig.wheel.move(target)
        assert rig.world.filter_position == target
        assert rig.wheel.position() == target


@pytest.mark.parametrize("bad", [0, 7, -1, True, 2.0, "2", None])
def test_invalid_positions_never_reach_the_wheel(rig, bad):
    before = bytes(rig.port.written)
    with pytest.raises(InvalidArgument):
        rig.wheel.move(bad)
    assert bytes(rig.port.written) == before
    assert rig.world.filter_position == 1


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True])
def test_invalid_move_timeouts_are_refused(rig, bad):
    with pytest.raises(InvalidArgument, match="timeout"):
        rig.wheel.move(2, timeout_s=bad)


def test_constructor_rejects_bad_timeouts():
    with pytest.raises(InvalidArgument, match="timeout_s"):
        Fw102cWheel(lambda: None, timeout_s=0)
    with pytest.raises(InvalidArgument, match="move_timeout_s"):
        Fw102cWheel(lambda: None, move_timeout_s=float("nan"))


def test_speed_setting_round_trips(rig):
    rig.wheel.set_high_speed(True)
    assert rig.wheel.high_speed() is True
    assert rig.emulator.speed == 1
    rig.wheel.set_high_speed(False)
    assert rig.wheel.high_speed() is False


# -- stuck wheel ---------------------------------------------------------------------------------

def test_stuck_wheel_raises_wheel_stuck_naming_wheel_and_positions(rig):
    rig.wheel.move(2)
    rig.world.faults["wheel_stuck"] = True
    with pytest.raises(WheelStuck) as info:
        rig.wheel.move(5)
    err = info.value
    assert isinstance(err, DeviceTimeout)
    assert err.device == "filter-wheel"
    message = str(err)
    assert "filter-wheel" in message
    assert "requested position 5" in message
    assert "last known position 2" in message
    assert rig.world.filter_position == 2
    assert rig.wheel.last_known_position == 2


def test_silent_stuck_wheel_raises_wheel_stuck_and_the_driver_recovers():
    r = Rig(stall_give_up_s=None)
    r.wheel.connect()
    r.world.faults["wheel_stuck"] = True
    with pytest.raises(WheelStuck, match="requested position 3.*last known position 1"):
        r.wheel.move(3, timeout_s=2.0)
    # freed, the wheel finishes the old move and sends its late prompt; the driver must
    # not take that prompt for the answer to its next question
    r.world.faults["wheel_stuck"] = False
    assert r.wheel.position() == 3
    assert r.wheel.move(1) == 1
    assert r.world.filter_position == 1


def test_move_timeout_defaults_to_the_constructor_value():
    r = Rig(stall_give_up_s=None)
    r.wheel = Fw102cWheel(r.open_port, clock=r.clock, move_timeout_s=1.5)
    r.wheel.connect()
    r.world.faults["wheel_stuck"] = True
    with pytest.raises(WheelStuck, match="within 1.5 s"):
        r.wheel.move(4)


# -- silent device, vendor errors, vanished port ---------------------------------------------

def test_silent_device_raises_device_timeout():
    clock = ManualClock()
    wheel = Fw102cWheel(lambda: LoopbackSerial(SilentCore(), clock, timeout=0.05), clock=clock,
                        timeout_s=0.5)
    with pytest.raises(DeviceTimeout) as info:
        wheel.connect()
    assert not isinstance(info.value, WheelStuck)
    assert "filter-wheel" in str(info.value) and "*idn?" in str(info.value)
    assert not wheel.connected


def test_wheel_that_falls_silent_raises_device_timeout(rig, mocker):
    mocker.patch.object(rig.emulator, "take_output", return_value=b"")
    with pytest.raises(DeviceTimeout, match="pos\\?"):
        rig.wheel.position()


def test_port_returning_at_once_does_not_spin_forever(mocker):
    # A port whose reads return immediately with nothing: the driver's own clock must
    # still reach the deadline.
    clock = ManualClock()
    calls = []

    def read_until(*_args):
        calls.append(1)
        if len(calls) > 1000:  # fail instead of hanging if the driver spins
            raise AssertionError("the driver kept polling past its deadline")
        return b""

    port = mocker.Mock()
    port.timeout = 0.05
    port.read_until.side_effect = read_until
    wheel = Fw102cWheel(lambda: port, clock=clock, timeout_s=0.3)
    with pytest.raises(DeviceTimeout):
        wheel.connect()
    assert len(calls) < 100


def test_argument_refused_by_the_wheel_becomes_invalid_argument():
    r = Rig(positions=12)
    r.wheel.connect()
    # someone reconfigured the wheel to 6 slots behind the driver's back
    r.emulator.pcount = 6
    with pytest.raises(InvalidArgument, match="pos=9") as info:
        r.wheel.move(9)
    assert "filter-wheel" in str(info.value) and "1-12" in str(info.value)
    assert r.world.filter_position == 1


def test_unknown_command_becomes_device_rejected():
    wheel, _ = scripted_wheel(HEALTHY)  # this firmware knows no speed=
    wheel.connect()
    with pytest.raises(DeviceRejected, match="speed=1.*CMD_NOT_DEFINED"):
        wheel.set_high_speed(True)


def test_vendor_error_on_a_move_is_not_taken_for_success():
    wheel, _ = scripted_wheel({**HEALTHY, b"pos=2": b"Command error CMD_ARG_INVALID"})
    wheel.connect()
    with pytest.raises(InvalidArgument, match="pos=2"):
        wheel.move(2)


def test_vanished_port_raises_disconnected_and_connect_recovers(rig):
    rig.port.close()  # the USB device went away under the driver
    with pytest.raises(DeviceDisconnected, match="filter-wheel.*loopback-fw102c"):
        rig.wheel.position()
    assert not rig.wheel.connected
    with pytest.raises(DeviceDisconnected):
        rig.wheel.position()
    rig.wheel.connect()  # the factory opens the port anew
    assert rig.wheel.move(3) == 3


def test_serial_failure_mid_command_is_translated(rig, mocker):
    mocker.patch.object(rig.port, "read_until",
                        side_effect=serial.SerialException("device reports readiness to read but "
                                                           "returned no data"))
    with pytest.raises(DeviceDisconnected) as info:
        rig.wheel.move(4)
    assert isinstance(info.value.__cause__, serial.SerialException)
    assert "filter-wheel" in str(info.value)


def test_port_that_cannot_be_opened_raises_disconnected():
    def factory():
        raise serial.SerialException("could not open port /dev/ttyUSB9: No such file")

    wheel = Fw102cWheel(factory, clock=ManualClock())
    with pytest.raises(DeviceDisconnected, match="filter-wheel.*ttyUSB9"):
        wheel.connect()


# -- threads ---------------------------------------------------------------------------------------

def test_concurrent_callers_are_serialised(rig):
    errors: list[BaseException] = []
    results: list[int] = []

    def worker(target: int) -> None:
        try:
            for _ in range(3):
                results.append(rig.wheel.move(target))
                results.append(rig.wheel.position())
        except BaseException as err:  # collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (2, 4, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20.0)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(results) == 18
    assert rig.world.filter_position == rig.wheel.position()


# -- a real pseudo-terminal ----------------------------------------------------------------------

def test_driver_over_a_pty_with_pyserial():
    clock = SystemClock()
    world = World(clock)
    link = PtyLink(Fw102cEmulator(world, clock, step_s=0.02), "fw102c").start()
    wheel = Fw102cWheel(lambda: serial.Serial(link.port, 115200, timeout=0.05), clock=clock,
                        timeout_s=1.0, move_timeout_s=3.0)
    try:
        wheel.connect()
        assert "FW102C" in wheel.identity()
        assert wheel.position_count() == 6
        assert wheel.move(4) == 4
        assert world.filter_position == 4 and not world.filter_moving
        assert wheel.position() == 4
    finally:
        wheel.close()
        link.stop()
