"""The RPi.GPIO stand-in (sim.gpio_standin) and the GPIO driver (drivers.gpio), run against
the simulated world."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from nirf.drivers.gpio import GpioSafetyIO, import_rpi_gpio
from nirf.hal.clock import ManualClock
from nirf.hal.errors import DeviceError
from nirf.sim.gpio_standin import GpioStandIn
from nirf.sim.world import World
from nirf.sim.worldview import LocalWorldView

PINS = {"key": 17, "interlock": 27, "footswitch": 22, "indicator": 23, "white_light": 24}
WAIT_S = 2.0  # upper bound for anything that happens on another thread
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def world(clock):
    return World(clock)


@pytest.fixture
def gpio(world, clock):
    standin = GpioStandIn(LocalWorldView(world), PINS, clock=clock)
    yield standin
    standin.close()


@pytest.fixture
def io(gpio, clock):
    driver = GpioSafetyIO(gpio, PINS, clock=clock)
    yield driver
    driver.close()


class Recorder:
    """Collects callback arguments and lets a test wait for the n-th one."""

    def __init__(self):
        self.calls: list = []
        self._cond = threading.Condition()

    def __call__(self, *args):
        with self._cond:
            self.calls.append(args if len(args) > 1 else args[0])
            self._cond.notify_all()

    def wait_for(self, count: int, timeout_s: float = WAIT_S) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.calls) >= count, timeout=timeout_s)


# -- the stand-in: API misuse ---------------------------------------------------------------


def test_setup_before_setmode_is_a_runtime_error(gpio):
    with pytest.raises(RuntimeError, match="setmode"):
        gpio.setup(PINS["key"], gpio.IN)


def test_setmode_twice_with_different_modes_is_a_value_error(gpio):
    gpio.setmode(gpio.BCM)
    gpio.setmode(gpio.BCM)  # the same mode again is fine
    with pytest.raises(ValueError, match="different mode"):
        gpio.setmode(gpio.BOARD)
    assert gpio.getmode() == gpio.BCM


def test_getmode_is_none_before_setmode_and_invalid_mode_is_refused(gpio):
    assert gpio.getmode() is None
    with pytest.raises(ValueError):
        gpio.setmode(99)


def test_input_on_a_channel_not_set_up_is_a_runtime_error(gpio):
    gpio.setmode(gpio.BCM)
    with pytest.raises(RuntimeError, match="setup"):
        gpio.input(PINS["key"])


def test_output_on_an_input_or_unset_channel_is_a_runtime_error(gpio):
    gpio.setmode(gpio.BCM)
    gpio.setup(PINS["key"], gpio.IN, pull_up_down=gpio.PUD_UP)
    with pytest.raises(RuntimeError, match="OUTPUT"):
        gpio.output(PINS["key"], gpio.HIGH)
    with pytest.raises(RuntimeError, match="OUTPUT"):
        gpio.output(5, gpio.HIGH)


@pytest.mark.parametrize("kwargs", [
    {"channel": 99, "direction": GpioStandIn.IN},
    {"channel": 5, "direction": 7},
    {"channel": 5, "direction": GpioStandIn.OUT, "pull_up_down": GpioStandIn.PUD_UP},
    {"channel": 5, "direction": GpioStandIn.IN, "initial": GpioStandIn.HIGH},
    {"channel": 5, "direction": GpioStandIn.IN, "pull_up_down": 3},
])
def test_bad_setup_arguments_are_value_errors(gpio, kwargs):
    gpio.setmode(gpio.BCM)
    with pytest.raises(ValueError):
        gpio.setup(**kwargs)


def test_event_detection_misuse(gpio):
    gpio.setmode(gpio.BCM)
    gpio.setup(PINS["indicator"], gpio.OUT)
    gpio.setup(PINS["key"], gpio.IN, pull_up_down=gpio.PUD_UP)
    with pytest.raises(RuntimeError, match="input"):
        gpio.add_event_detect(PINS["indicator"], gpio.BOTH)
    with pytest.raises(ValueError, match="edge"):
        gpio.add_event_detect(PINS["key"], 5)
    with pytest.raises(ValueError, match="Bouncetime"):
        gpio.add_event_detect(PINS["key"], gpio.BOTH, bouncetime=0)
    with pytest.raises(TypeError):
        gpio.add_event_detect(PINS["key"], gpio.BOTH, callback=42)
    with pytest.raises(RuntimeError, match="add_event_detect first"):
        gpio.add_event_callback(PINS["key"], lambda ch: None)
    gpio.add_event_detect(PINS["key"], gpio.BOTH)
    with pytest.raises(RuntimeError, match="Conflicting"):
        gpio.add_event_detect(PINS["key"], gpio.FALLING)


def test_pwm_misuse(gpio):
    gpio.setmode(gpio.BCM)
    gpio.setup(PINS["key"], gpio.IN)
    with pytest.raises(RuntimeError, match="output"):
        gpio.PWM(PINS["key"], 100)
    gpio.setup(PINS["indicator"], gpio.OUT)
    with pytest.raises(ValueError, match="frequency"):
        gpio.PWM(PINS["indicator"], 0)
    pwm = gpio.PWM(PINS["indicator"], 100)
    with pytest.raises(RuntimeError, match="already exists"):
        gpio.PWM(PINS["indicator"], 50)
    with pytest.raises(ValueError, match="dutycycle"):
        pwm.start(101)


def test_unknown_pin_name_is_refused(world):
    with pytest.raises(ValueError, match="laser"):
        GpioStandIn(LocalWorldView(world), {"laser": 5})


# -- the stand-in: wiring -------------------------------------------------------------------


@pytest.mark.parametrize("name, asserted_change, released_change", [
    ("key", {"key": True}, {"key": False}),
    ("interlock", {"interlock": "closed"}, {"interlock": "open"}),
    ("footswitch", {"footswitch": True}, {"footswitch": False}),
])
def test_inputs_follow_the_world_active_low(gpio, world, name, asserted_change, released_change):
    gpio.setmode(gpio.BCM)
    gpio.setup(PINS[name], gpio.IN, pull_up_down=gpio.PUD_UP)
    world.apply(asserted_change)
    assert gpio.input(PINS[name]) == gpio.LOW
    world.apply(released_change)
    assert gpio.input(PINS[name]) == gpio.HIGH


def test_inputs_follow_the_world_active_high(world, clock):
    gpio = GpioStandIn(LocalWorldView(world), PINS, active_low_inputs=False, clock=clock)
    gpio.setmode(gpio.BCM)
    gpio.setup(PINS["key"], gpio.IN, pull_up_down=gpio.PUD_DOWN)
    world.apply({"key": True})
    assert gpio.input(PINS["key"]) == gpio.HIGH
    world.apply({"key": False})
    assert gpio.input(PINS["key"]) == gpio.LOW


def test_open_contact_without_pull_up_does_not_read_as_released(gpio, world):
    # Active-low wiring needs the pull-up: without it an open key contact floats.
    gpio.setmode(gpio.BCM)
    gpio.setup(PINS["key"], gpio.IN, pull_up_down=gpio.PUD_OFF)
    world.apply({"key": False})
    assert gpio.input(PINS["key"]) == gpio.LOW


def test_board_numbering_maps_to_the_same_wiring(gpio, world):
    gpio.setmode(gpio.BOARD)
    board_key = 11  # header pin 11 is BCM 17
    gpio.setup(board_key, gpio.IN, pull_up_down=gpio.PUD_UP)
    world.apply({"key": False})
    assert gpio.input(board_key) == gpio.HIGH
    with pytest.raises(ValueError):
        gpio.setup(1, gpio.IN)  # header pin 1 is 3.3 V, not a GPIO


@pytest.mark.parametrize("name", ["indicator", "white_light"])
def test_outputs_drive_the_world_and_are_recorded_with_time(gpio, world, clock, name):
    gpio.setmode(gpio.BCM)
    gpio.setup(PINS[name], gpio.OUT, initial=gpio.LOW)
    assert getattr(world, name) is False
    t_on = clock.monotonic() + 1.5
    clock.advance(1.5)
    gpio.output(PINS[name], gpio.HIGH)
    assert getattr(world, name) is True
    assert gpio.input(PINS[name]) == gpio.HIGH  # an output reads back its level
    clock.advance(0.25)
    gpio.output(PINS[name], gpio.HIGH)  # no change, nothing recorded
    gpio.output(PINS[name], gpio.LOW)
    assert getattr(world, name) is False
    changes = gpio.output_changes(name)
    assert [c.level for c in changes] == [gpio.LOW, gpio.HIGH, gpio.LOW]
    assert changes[1].t_s == pytest.approx(t_on)
    assert changes[2].t_s == pytest.approx(t_on + 0.25)
    assert all(c.name == name for c in changes)


def test_pwm_lights_the_indicator_while_running(gpio, world):
    gpio.setmode(gpio.BCM)
    gpio.setup(PINS["indicator"], gpio.OUT)
    pwm = gpio.PWM(PINS["indicator"], 2.0)
    pwm.start(50)
    assert world.indicator is True
    pwm.ChangeDutyCycle(0)
    assert world.indicator is False
    pwm.ChangeDutyCycle(25)
    assert world.indicator is True and pwm.duty_cycle_pct == 25
    pwm.stop()
    assert world.indicator is False


def test_cleanup_of_one_channel_keeps_the_others(gpio, world):
    gpio.setmode(gpio.BCM)
    gpio.setup([PINS["indicator"], PINS["white_light"]], gpio.OUT, initial=gpio.HIGH)
    assert world.indicator and world.white_light
    gpio.cleanup(PINS["indicator"])
    assert world.indicator is False  # the released line lets the load go off
    assert world.white_light is True
    assert gpio.getmode() == gpio.BCM
    with pytest.raises(RuntimeError):
        gpio.input(PINS["indicator"])
    gpio.output(PINS["white_light"], gpio.LOW)
    gpio.cleanup()
    assert gpio.getmode() is None


# -- the stand-in: edges --------------------------------------------------------------------


def test_edge_callback_fires_on_a_world_change(gpio, world):
    gpio.setmode(gpio.BCM)
    pin = PINS["interlock"]
    gpio.setup(pin, gpio.IN, pull_up_down=gpio.PUD_UP)
    rec = Recorder()
    gpio.add_event_detect(pin, gpio.BOTH, callback=rec)
    world.apply({"interlock": "open"})
    assert rec.wait_for(1)
    assert rec.calls == [pin]
    assert gpio.event_detected(pin) is True
    assert gpio.event_detected(pin) is False  # reported once


def test_edge_type_is_respected(gpio, world):
    gpio.setmode(gpio.BCM)
    pin = PINS["interlock"]
    gpio.setup(pin, gpio.IN, pull_up_down=gpio.PUD_UP)
    rec = Recorder()
    gpio.add_event_detect(pin, gpio.FALLING, callback=rec)
    world.apply({"interlock": "open"})  # LOW -> HIGH: rising, not watched
    world.apply({"interlock": "closed"})  # HIGH -> LOW: falling
    assert rec.wait_for(1)
    assert gpio.wait_idle(WAIT_S)
    assert rec.calls == [pin]  # callbacks run in order, so the rising one would be first


def test_no_callback_when_the_level_does_not_change(gpio, world):
    gpio.setmode(gpio.BCM)
    gpio.setup([PINS["key"], PINS["interlock"]], gpio.IN, pull_up_down=gpio.PUD_UP)
    rec = Recorder()
    gpio.add_event_detect(PINS["key"], gpio.BOTH, callback=rec)
    gpio.add_event_detect(PINS["interlock"], gpio.BOTH, callback=rec)
    world.apply({"ambient_e_per_ms": 7.0})
    world.apply({"key": True})  # already on: no edge
    world.apply({"interlock": "open"})
    assert rec.wait_for(1)
    assert gpio.wait_idle(WAIT_S)
    assert rec.calls == [PINS["interlock"]]


def test_board_mode_callbacks_get_board_numbers(gpio, world):
    gpio.setmode(gpio.BOARD)
    gpio.setup(11, gpio.IN, pull_up_down=gpio.PUD_UP)
    rec = Recorder()
    gpio.add_event_detect(11, gpio.BOTH, callback=rec)
    world.apply({"key": False})
    assert rec.wait_for(1)
    assert rec.calls == [11]


def test_bouncetime_drops_edges_inside_the_window(gpio, clock):
    gpio.setmode(gpio.BCM)
    pin = PINS["footswitch"]
    gpio.setup(pin, gpio.IN, pull_up_down=gpio.PUD_UP)
    rec = Recorder()
    gpio.add_event_detect(pin, gpio.BOTH, callback=rec, bouncetime=50)
    gpio.bounce("footswitch", glitches=3)  # six edges at one instant
    assert gpio.wait_idle(WAIT_S)
    assert len(rec.calls) == 1
    clock.advance(0.051)
    gpio.bounce("footswitch")
    assert rec.wait_for(2)
    assert gpio.wait_idle(WAIT_S)
    assert len(rec.calls) == 2


def test_a_failing_callback_does_not_stop_the_callback_thread(gpio, world):
    gpio.setmode(gpio.BCM)
    pin = PINS["key"]
    gpio.setup(pin, gpio.IN, pull_up_down=gpio.PUD_UP)

    def broken(channel):
        raise RuntimeError("boom")

    rec = Recorder()
    gpio.add_event_detect(pin, gpio.BOTH, callback=broken)
    gpio.add_event_callback(pin, rec)
    world.apply({"key": False})
    world.apply({"key": True})
    assert rec.wait_for(2)
    assert rec.calls == [pin, pin]


# -- the driver ------------------------------------------------------------------------------


def test_outputs_start_off(world, gpio, clock):
    world.set_output("indicator", True)
    world.set_output("white_light", True)
    io = GpioSafetyIO(gpio, PINS, clock=clock)
    try:
        assert world.indicator is False
        assert world.white_light is False
        assert io.emission_indicator() is False
        for name in ("indicator", "white_light"):
            assert [c.level for c in gpio.output_changes(name)] == [gpio.LOW]
    finally:
        io.close()


def test_driver_sets_bcm_pull_ups_and_both_edges(io, gpio, world):
    assert gpio.getmode() == gpio.BCM
    for name in ("key", "interlock", "footswitch"):
        assert gpio.has_event_detect(PINS[name])
    # With pull-ups, an open contact reads as released.
    world.apply({"key": False, "interlock": "open", "footswitch": False})
    assert io.key_on() is False and io.interlock_closed() is False and io.footswitch_pressed() is False


@pytest.mark.parametrize("change, read, expected", [
    ({"key": False}, "key_on", False),
    ({"key": True}, "key_on", True),
    ({"interlock": "open"}, "interlock_closed", False),
    ({"interlock": "closed"}, "interlock_closed", True),
    ({"footswitch": True}, "footswitch_pressed", True),
    ({"footswitch": False}, "footswitch_pressed", False),
])
def test_driver_reads_follow_the_world(io, world, change, read, expected):
    world.apply(change)
    assert getattr(io, read)() is expected


def test_driver_reads_with_active_high_wiring(world, clock):
    gpio = GpioStandIn(LocalWorldView(world), PINS, active_low_inputs=False, clock=clock)
    io = GpioSafetyIO(gpio, PINS, active_low_inputs=False, clock=clock)
    try:
        world.apply({"interlock": "open", "footswitch": True})
        assert io.interlock_closed() is False
        assert io.footswitch_pressed() is True
        assert io.key_on() is True
    finally:
        io.close()
        gpio.close()


@pytest.mark.parametrize("name", ["indicator", "white_light"])
def test_driver_outputs_drive_the_world(io, world, name):
    setter = io.set_emission_indicator if name == "indicator" else io.set_white_light
    setter(True)
    assert getattr(world, name) is True
    setter(False)
    assert getattr(world, name) is False


def test_emission_indicator_reads_back(io):
    io.set_emission_indicator(True)
    assert io.emission_indicator() is True
    io.set_emission_indicator(False)
    assert io.emission_indicator() is False


def test_listener_gets_interlock_open_then_closed(io, world):
    rec = Recorder()
    io.add_listener(rec)
    world.apply({"interlock": "open"})
    assert rec.wait_for(1)
    world.apply({"interlock": "closed"})
    assert rec.wait_for(2)
    assert rec.calls == [("interlock", False), ("interlock", True)]


def test_listener_gets_key_and_footswitch(io, world, gpio):
    rec = Recorder()
    io.add_listener(rec)
    world.apply({"footswitch": True})
    assert rec.wait_for(1)
    world.apply({"key": False})
    assert rec.wait_for(2)
    assert rec.calls == [("footswitch", True), ("key", False)]


class ScheduledClock(ManualClock):
    """A manual clock on which world changes can be scheduled: they happen while the code
    under test sleeps through their time (the line changes during the driver's debounce
    wait, as it would on the cart)."""

    def __init__(self):
        super().__init__()
        self._due: list[tuple[float, object]] = []
        self._due_lock = threading.Lock()

    def at(self, t_s: float, fn) -> None:
        with self._due_lock:
            self._due.append((t_s, fn))
            self._due.sort(key=lambda x: x[0])

    def sleep(self, seconds):
        end = self.monotonic() + max(seconds, 0.0)
        while True:
            with self._due_lock:
                fn = None
                if self._due and self._due[0][0] <= end:
                    t, fn = self._due.pop(0)
            if fn is None:
                break
            if t > self.monotonic():
                self.advance(t - self.monotonic())
            fn()
        if end > self.monotonic():
            self.advance(end - self.monotonic())


@pytest.fixture
def sched():
    clock = ScheduledClock()
    world = World(clock)
    gpio = GpioStandIn(LocalWorldView(world), PINS, clock=clock)
    io = GpioSafetyIO(gpio, PINS, clock=clock)  # debounce_ms 20, the default
    yield clock, world, gpio, io
    io.close()
    gpio.close()


def test_every_interlock_glitch_is_reported_as_an_opening(io, gpio, world, clock):
    # S3a: a bounce of the interlock is an opening each time (no debounce on the opening
    # edge); each glitch is one opening and one return, not two openings
    rec = Recorder()
    io.add_listener(rec)
    gpio.bounce("interlock", glitches=2)
    assert gpio.wait_idle(WAIT_S)
    assert rec.calls == [("interlock", False), ("interlock", True)] * 2
    clock.advance(1.0)
    world.apply({"interlock": "open"})
    assert gpio.wait_idle(WAIT_S)
    assert rec.calls[-1] == ("interlock", False) and len(rec.calls) == 5


@pytest.mark.parametrize("name,change,restore", [("interlock", {"interlock": "open"}, {"interlock": "closed"}),
                                                 ("key", {"key": False}, {"key": True})])
def test_a_pulse_over_before_the_callback_runs_is_still_an_opening(io, gpio, world, name, change, restore):
    rec = Recorder()
    io.add_listener(rec)
    world.apply(change)
    world.apply(restore)  # both edges queued; the line reads closed when the callback runs
    assert gpio.wait_idle(WAIT_S)
    assert rec.calls == [(name, False), (name, True)]


@pytest.mark.parametrize("ms", [1, 2, 5, 10])
@pytest.mark.parametrize("name,change,restore", [("interlock", {"interlock": "open"}, {"interlock": "closed"}),
                                                 ("key", {"key": False}, {"key": True})])
def test_short_openings_are_reported_at_once_and_the_return_after_the_debounce(sched, ms, name, change, restore):
    clock, world, gpio, io = sched
    seen = []
    io.add_listener(lambda n, v: seen.append((n, v, clock.monotonic())))
    t0 = clock.monotonic()
    world.apply(change)
    clock.at(t0 + ms / 1000.0, lambda: world.apply(restore))
    assert gpio.wait_idle(WAIT_S)
    clock.sleep(0.1)
    assert gpio.wait_idle(WAIT_S)
    assert [(n, v) for n, v, _ in seen] == [(name, False), (name, True)]
    assert seen[0][2] == t0  # the opening: no wait at all
    assert seen[1][2] - t0 >= 0.020  # the return: after the software debounce


def test_the_driver_asks_the_library_for_no_bouncetime(io, gpio):
    # rpi-lgpio reports an edge only after the line is stable for bouncetime and RPi.GPIO
    # drops edges within it: either would lose a 1 ms opening
    for name in ("key", "interlock", "footswitch"):
        assert gpio.event_bouncetime(PINS[name]) is None


@pytest.mark.parametrize("ms,ends_emission", [(1, False), (2, False), (5, False), (20, True), (50, True)])
def test_a_foot_switch_release_of_20_ms_is_reported_shorter_is_bounce(sched, ms, ends_emission):
    clock, world, gpio, io = sched
    world.apply({"footswitch": True})
    assert gpio.wait_idle(WAIT_S)
    rec = Recorder()
    io.add_listener(rec)
    t0 = clock.monotonic()
    world.apply({"footswitch": False})
    clock.at(t0 + ms / 1000.0, lambda: world.apply({"footswitch": True}))
    assert gpio.wait_idle(WAIT_S)
    clock.sleep(0.1)  # the rest of the schedule, should no callback have slept through it
    assert gpio.wait_idle(WAIT_S)
    expected = [("footswitch", False), ("footswitch", True)] if ends_emission else []
    assert rec.calls == expected


def test_a_real_opening_after_a_reported_pulse_is_not_swallowed(sched):
    clock, world, gpio, io = sched
    rec = Recorder()
    io.add_listener(rec)
    t0 = clock.monotonic()
    world.apply({"interlock": "open"})
    clock.at(t0 + 0.001, lambda: world.apply({"interlock": "closed"}))
    clock.at(t0 + 0.030, lambda: world.apply({"interlock": "open"}))  # a second opening, lasting
    assert gpio.wait_idle(WAIT_S)
    clock.sleep(0.1)
    assert gpio.wait_idle(WAIT_S)
    assert rec.calls == [("interlock", False), ("interlock", True), ("interlock", False)]
    assert io.interlock_closed() is False


def test_a_failing_listener_does_not_silence_the_others(io, world):
    def broken(name, value):
        raise ValueError("listener bug")

    rec = Recorder()
    io.add_listener(broken)
    io.add_listener(rec)
    world.apply({"interlock": "open"})
    assert rec.wait_for(1)
    assert rec.calls == [("interlock", False)]


def test_module_runtime_error_on_read_becomes_device_error_naming_the_pin(io, gpio, mocker):
    cause = RuntimeError("You must setup() the GPIO channel first")
    mocker.patch.object(gpio, "input", side_effect=cause)
    with pytest.raises(DeviceError) as info:
        io.interlock_closed()
    assert info.value.device == "gpio"
    assert "interlock" in str(info.value) and str(PINS["interlock"]) in str(info.value)
    assert info.value.__cause__ is cause


def test_module_runtime_error_on_write_becomes_device_error_naming_the_pin(io, gpio, mocker):
    mocker.patch.object(gpio, "output", side_effect=RuntimeError("The GPIO channel has not been set up as an OUTPUT"))
    with pytest.raises(DeviceError, match=rf"white_light pin \(BCM {PINS['white_light']}\)"):
        io.set_white_light(True)


def test_setup_failure_becomes_device_error_and_releases_the_pins_taken(gpio, clock, mocker):
    real_setup = gpio.setup

    def setup(channel, direction, **kwargs):
        if channel == PINS["interlock"]:
            raise RuntimeError("Failed to claim the line")
        return real_setup(channel, direction, **kwargs)

    mocker.patch.object(gpio, "setup", side_effect=setup)
    with pytest.raises(DeviceError, match=rf"interlock pin \(BCM {PINS['interlock']}\)"):
        GpioSafetyIO(gpio, PINS, clock=clock)
    assert not any(gpio.is_setup(pin) for pin in PINS.values())


def test_bad_constructor_arguments_are_refused(gpio):
    with pytest.raises(ValueError, match="footswitch"):
        GpioSafetyIO(gpio, {k: v for k, v in PINS.items() if k != "footswitch"})
    with pytest.raises(ValueError, match="debounce_ms"):
        GpioSafetyIO(gpio, PINS, debounce_ms=-1)
    assert gpio.getmode() is None  # nothing touched


def test_close_turns_outputs_off_and_releases_only_its_channels(gpio, world, clock):
    gpio.setmode(gpio.BCM)
    other = 5
    gpio.setup(other, gpio.OUT, initial=gpio.HIGH)
    io = GpioSafetyIO(gpio, PINS, clock=clock)
    io.set_emission_indicator(True)
    io.set_white_light(True)
    io.close()
    assert world.indicator is False and world.white_light is False
    assert not any(gpio.is_setup(pin) for pin in PINS.values())
    assert gpio.is_setup(other) and gpio.input(other) == gpio.HIGH
    assert gpio.getmode() == gpio.BCM
    io.close()  # a second close does nothing
    with pytest.raises(DeviceError, match="closed"):
        io.key_on()


def test_driver_runs_with_the_system_clock(world):
    # The default clock: the debounce wait is real (20 ms), the listener still hears.
    gpio = GpioStandIn(LocalWorldView(world), PINS)
    io = GpioSafetyIO(gpio, PINS)
    try:
        rec = Recorder()
        io.add_listener(rec)
        world.apply({"key": False})
        assert rec.wait_for(1)
        assert rec.calls == [("key", False)]
    finally:
        io.close()
        gpio.close()


# -- loading the real module ---------------------------------------------------------------


def test_importing_the_driver_does_not_import_rpi_gpio():
    code = ("import sys, nirf.drivers.gpio\n"
            "bad = [m for m in sys.modules if m == 'RPi' or m.startswith('RPi.')]\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_missing_rpi_gpio_becomes_device_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "RPi", None)  # makes the import fail here as off a Pi
    with pytest.raises(DeviceError, match="rpi-lgpio") as info:
        import_rpi_gpio()
    assert isinstance(info.value.__cause__, ImportError)


def test_rpi_gpio_refusing_to_run_becomes_device_error(mocker):
    mocker.patch("nirf.drivers.gpio.importlib.import_module",
                 side_effect=RuntimeError("This module can only be run on a Raspberry Pi!"))
    with pytest.raises(DeviceError, match="Raspberry Pi") as info:
        import_rpi_gpio()
    assert info.value.device == "gpio"


# -- lgpio's notification FIFO (rpi-lgpio on a Pi 4 and a Pi 5) ---------------------------

# A stand-in for rpi-lgpio's RPi.GPIO that does at import what lgpio does (lg's
# PY_LGPIO/lgpio_extra.py and lgNotify.c): make the FIFO .lgd-nfy0 in $LG_WD (changing
# into it) or the working directory, ignoring a failure to make it, then open it by its
# relative name.
LGPIO_STANDIN = '''
import os
workdir = os.environ.get("LG_WD") or os.getcwd()
try:
    os.chdir(workdir)
except OSError:
    pass
try:
    os.mkfifo(os.path.join(workdir, ".lgd-nfy0"), 0o664)
except OSError:
    pass
_fifo = os.open(".lgd-nfy0", os.O_RDONLY | os.O_NONBLOCK)
def setmode(mode):
    pass
'''


def _run_import(tmp_path, cwd, env_extra):
    pkg = tmp_path / "site" / "RPi"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "GPIO.py").write_text(LGPIO_STANDIN)
    code = ("import sys\n"
            f"sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from nirf.drivers.gpio import import_rpi_gpio\n"
            "from nirf.hal.errors import DeviceError\n"
            "try:\n"
            "    import_rpi_gpio()\n"
            "    print('imported')\n"
            "except DeviceError as err:\n"
            "    print('DeviceError:', err)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LG_WD", "RUNTIME_DIRECTORY")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_lgpio_fifo_failure_becomes_a_clear_device_error(tmp_path):
    """As under ProtectSystem=strict in /: the FIFO cannot be made, the import raises
    FileNotFoundError; the driver says what to do instead of a traceback."""
    missing = tmp_path / "no-such-dir"
    result = _run_import(tmp_path, tmp_path, {"LG_WD": str(missing)})
    assert result.returncode == 0, result.stderr
    assert "DeviceError" in result.stdout
    assert "FileNotFoundError" in result.stdout and "LG_WD" in result.stdout
    assert "Traceback" not in result.stderr


def test_runtime_directory_becomes_lg_wd(tmp_path):
    runtime = tmp_path / "run-nirf"
    runtime.mkdir()
    result = _run_import(tmp_path, tmp_path, {"RUNTIME_DIRECTORY": str(runtime)})
    assert result.stdout.strip() == "imported", result.stdout + result.stderr
    assert (runtime / ".lgd-nfy0").exists()
    assert not (tmp_path / ".lgd-nfy0").exists()


def test_every_import_failure_is_translated():
    for exc in (FileNotFoundError(2, "No such file or directory", ".lgd-nfy0"),
                PermissionError(13, "Permission denied"), SystemError("bad C extension")):
        def importer(name, exc=exc):
            raise exc
        with pytest.raises(DeviceError) as info:
            import_rpi_gpio(importer=importer, environ={"LG_WD": "/x"}, getcwd=lambda: "/")
        assert info.value.device == "gpio" and info.value.__cause__ is exc
        assert type(exc).__name__ in str(info.value)


def test_lg_wd_given_is_kept():
    env = {"LG_WD": "/given", "RUNTIME_DIRECTORY": "/run/nirf"}
    import_rpi_gpio(importer=lambda name: sys, environ=env)
    assert env["LG_WD"] == "/given"
    env = {"RUNTIME_DIRECTORY": "/run/nirf:/run/other"}
    import_rpi_gpio(importer=lambda name: sys, environ=env)
    assert env["LG_WD"] == "/run/nirf"
