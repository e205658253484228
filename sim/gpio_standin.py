"""A stand-in for the RPi.GPIO module, wired to the simulated world.

:class:`GpioStandIn` offers the part of the RPi.GPIO API the cart uses (``setmode``,
``setup``, ``input``, ``output``, edge detection with callbacks, ``cleanup``, ``PWM``) and
raises the same exception types for the same misuse, so :mod:`nirf.drivers.gpio` runs unchanged
against it. It is an object rather than a module so that each test gets a fresh one.

Wiring (BCM numbers come from the ``pins`` map):

* Inputs ``key``, ``interlock`` and ``footswitch`` read the world's switches. A switch
  contact that is *closed* drives the line; an *open* contact leaves the line to the pin's
  pull resistor. With the default active-low wiring the contact goes to ground, so with
  the pull-up enabled:

  ========================  ==========  ==========
  world state               contact     level read
  ========================  ==========  ==========
  key on                    closed      LOW
  key off                   open        HIGH
  interlock closed          closed      LOW
  interlock open            open        HIGH
  foot switch pressed       closed      LOW
  foot switch released      open        HIGH
  ========================  ==========  ==========

  With ``active_low_inputs=False`` the contact goes to 3.3 V instead (closed reads HIGH
  and the pull-down holds an open contact LOW). An open contact on a pin without the
  matching pull resistor floats; the stand-in reads a floating line as LOW, so a driver
  that forgets the pull-up sees "key on" whatever the key does, as it could on the cart.
* Outputs ``indicator`` and ``white_light`` drive the world's outputs; HIGH is on. When a
  channel is cleaned up the line is released and the world output goes off (the loads'
  driver transistors have pull-downs).
* Edges: the stand-in listens to the world's input changes and calls the callbacks of
  channels with edge detection from its own thread, one callback at a time, as RPi.GPIO's
  own callback thread does. Every edge is queued, so each edge of a pulse of any length
  (the world publishes both edges of a ``sim.set pulse``) gets its callback, even when the
  line is back at its old level by the time the callback runs: like RPi.GPIO and
  rpi-lgpio, the callback gets the channel only, never the level. ``bouncetime`` behaves
  like RPi.GPIO's: an edge within ``bouncetime`` ms of the last reported edge on that
  channel is dropped (rpi-lgpio instead reports an edge only once the line has been stable
  that long; either way short pulses are lost, which is why the driver sets none).

For tests it records every output change with its time (:meth:`output_changes`), can make
an input line bounce (:meth:`bounce`) and can wait until its callback thread is idle
(:meth:`wait_idle`).
"""

from __future__ import annotations

import logging
import queue
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from nirf.hal.clock import Clock, SystemClock
from nirf.sim.worldview import WorldView

log = logging.getLogger(__name__)

# The names the stand-in can wire, and for inputs the world's key for each.
INPUT_WORLD_KEYS = {"key": "key", "interlock": "interlock_closed", "footswitch": "footswitch"}
OUTPUT_NAMES = ("indicator", "white_light")
PIN_NAMES = tuple(INPUT_WORLD_KEYS) + OUTPUT_NAMES

# BCM numbers a Pi accepts (RPi.GPIO checks the same range).
BCM_CHANNELS = range(0, 54)

# The 40-pin header: physical pin -> BCM number (B+ and later boards).
BOARD_TO_BCM = {
    3: 2, 5: 3, 7: 4, 8: 14, 10: 15, 11: 17, 12: 18, 13: 27, 15: 22, 16: 23, 18: 24,
    19: 10, 21: 9, 22: 25, 23: 11, 24: 8, 26: 7, 29: 5, 31: 6, 32: 12, 33: 13, 35: 19,
    36: 16, 37: 26, 38: 20, 40: 21,
}
BCM_TO_BOARD = {bcm: board for board, bcm in BOARD_TO_BCM.items()}

# How long the callback thread blocks on its queue before checking whether it should
# stop (close() also wakes it at once with _WAKE).
_DISPATCH_POLL_S = 0.2
_WAKE = -1


@dataclass(frozen=True)
class OutputChange:
    """One recorded change of an output line.

    ``level`` is 1 (HIGH) or 0 (LOW), or None when the line was released (cleaned up).
    ``t_s`` is the stand-in clock's ``monotonic()`` at the change.
    """

    t_s: float
    channel: int  # BCM number
    name: str | None  # the wired name ("indicator", ...), None for an unwired pin
    level: int | None


@dataclass
class _Channel:
    direction: int
    pull: int
    level: int  # latched level for outputs


@dataclass
class _Detect:
    edge: int
    bouncetime_ms: int | None
    callbacks: list[Callable[[int], Any]] = field(default_factory=list)
    detected: bool = False
    last_edge_s: float | None = None
    level: int = 0  # last level seen, to find edges


class _PwmBase:
    """Software PWM on an output channel (RPi.GPIO's ``PWM`` class).

    The world sees the line as on while the PWM runs with a duty above zero (a dimmed
    indicator is still lit)."""

    _gpio: "GpioStandIn"

    def __init__(self, channel: int, frequency: float):
        gpio = self._gpio
        with gpio._lock:
            bcm = gpio._to_bcm(channel)
            ch = gpio._channels.get(bcm)
            if ch is None or ch.direction != gpio.OUT:
                raise RuntimeError("You must setup() the GPIO channel as an output first")
            if bcm in gpio._pwms:
                raise RuntimeError("A PWM object already exists for this GPIO channel")
            self._bcm = bcm
            self._frequency_hz = _check_frequency(frequency)
            self._duty_pct = 0.0
            self._running = False
            gpio._pwms[bcm] = self

    @property
    def frequency_hz(self) -> float:
        """The PWM frequency (a stand-in extra for tests)."""
        return self._frequency_hz

    @property
    def duty_cycle_pct(self) -> float:
        """The duty cycle in percent (a stand-in extra for tests)."""
        return self._duty_pct

    @property
    def running(self) -> bool:
        """True between start() and stop() (a stand-in extra for tests)."""
        return self._running

    def start(self, dutycycle: float) -> None:
        """Start the PWM at ``dutycycle`` percent (0-100)."""
        duty = _check_duty(dutycycle)
        with self._gpio._lock:
            self._duty_pct = duty
            self._running = True
            self._apply()

    def ChangeDutyCycle(self, dutycycle: float) -> None:  # noqa: N802 (RPi.GPIO's name)
        """Change the duty cycle, in percent (0-100)."""
        duty = _check_duty(dutycycle)
        with self._gpio._lock:
            self._duty_pct = duty
            if self._running:
                self._apply()

    def ChangeFrequency(self, frequency: float) -> None:  # noqa: N802 (RPi.GPIO's name)
        """Change the frequency, in Hz (> 0)."""
        freq = _check_frequency(frequency)
        with self._gpio._lock:
            self._frequency_hz = freq

    def stop(self) -> None:
        """Stop the PWM; the line goes LOW."""
        gpio = self._gpio
        with gpio._lock:
            self._running = False
            ch = gpio._channels.get(self._bcm)
            if ch is not None and ch.direction == gpio.OUT:
                gpio._drive(self._bcm, gpio.LOW)
            if gpio._pwms.get(self._bcm) is self:
                del gpio._pwms[self._bcm]

    def _apply(self) -> None:
        gpio = self._gpio
        if self._bcm in gpio._channels:
            gpio._drive(self._bcm, gpio.HIGH if self._duty_pct > 0 else gpio.LOW)


def _check_duty(dutycycle: float) -> float:
    duty = float(dutycycle)
    if not 0.0 <= duty <= 100.0:
        raise ValueError("dutycycle must have a value from 0.0 to 100.0")
    return duty


def _check_frequency(frequency: float) -> float:
    freq = float(frequency)
    if not freq > 0.0:
        raise ValueError("frequency must be greater than 0.0")
    return freq


class GpioStandIn:
    """An RPi.GPIO look-alike whose pins are wired to the simulated world.

    ``pins`` maps any of ``"key"``, ``"interlock"``, ``"footswitch"``, ``"indicator"`` and
    ``"white_light"`` to BCM numbers; other channels can be set up too and behave as
    unconnected pins. ``active_low_inputs`` selects how the switches are wired (see the
    module docstring). ``clock`` times the recorded output changes and ``bouncetime``.
    """

    # RPi.GPIO's constants, with its values.
    BOARD = 10
    BCM = 11
    OUT = 0
    IN = 1
    LOW = 0
    HIGH = 1
    PUD_OFF = 20
    PUD_DOWN = 21
    PUD_UP = 22
    RISING = 31
    FALLING = 32
    BOTH = 33
    VERSION = "0.7.1"  # the RPi.GPIO version whose behaviour this follows

    def __init__(
        self,
        world_view: WorldView,
        pins: dict[str, int],
        *,
        active_low_inputs: bool = True,
        clock: Clock | None = None,
    ):
        unknown = sorted(set(pins) - set(PIN_NAMES))
        if unknown:
            raise ValueError(f"gpio stand-in: unknown pin name {unknown[0]!r}; known names are "
                             f"{', '.join(PIN_NAMES)}")
        for name, bcm in pins.items():
            if isinstance(bcm, bool) or not isinstance(bcm, int) or bcm not in BCM_CHANNELS:
                raise ValueError(f"gpio stand-in: pin {name!r} = {bcm!r}: expected a BCM number "
                                 f"0 to {BCM_CHANNELS[-1]}")
        if len(set(pins.values())) != len(pins):
            raise ValueError(f"gpio stand-in: two names share one BCM pin in {pins!r}")
        self._world = world_view
        self._pins = dict(pins)
        self._names = {bcm: name for name, bcm in pins.items()}
        self._active_low = bool(active_low_inputs)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._lock = threading.RLock()
        self._mode: int | None = None
        self._warnings = True
        self._channels: dict[int, _Channel] = {}
        self._detects: dict[int, _Detect] = {}
        self._pwms: dict[int, _PwmBase] = {}
        self._history: list[OutputChange] = []
        # Callback thread state: the queue holds BCM numbers of edges to report.
        self._events: queue.Queue[int] = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        # RPi.GPIO's PWM is a class; bind one to this instance so GPIO.PWM(ch, f) works.
        self.PWM = type("PWM", (_PwmBase,), {"_gpio": self, "__doc__": _PwmBase.__doc__})
        world_view.add_input_listener(self._on_world_inputs)

    # -- numbering ---------------------------------------------------------------------
    def setmode(self, mode: int) -> None:
        """Choose BOARD or BCM numbering; a different mode once set is a ValueError."""
        with self._lock:
            if self._mode is not None and mode != self._mode:
                raise ValueError("A different mode has already been set!")
            if mode not in (self.BOARD, self.BCM):
                raise ValueError("An invalid mode was passed to setmode()")
            self._mode = mode

    def getmode(self) -> int | None:
        """The numbering mode, or None before setmode()."""
        with self._lock:
            return self._mode

    def setwarnings(self, flag: bool) -> None:
        """Turn the module's warnings on or off."""
        with self._lock:
            self._warnings = bool(flag)

    def _to_bcm(self, channel: int) -> int:
        if self._mode is None:
            raise RuntimeError("Please set pin numbering mode using GPIO.setmode(GPIO.BOARD) "
                               "or GPIO.setmode(GPIO.BCM)")
        if isinstance(channel, bool) or not isinstance(channel, int):
            raise ValueError("Channel must be an integer or list/tuple of integers")
        if self._mode == self.BCM:
            if channel not in BCM_CHANNELS:
                raise ValueError("The channel sent is invalid on a Raspberry Pi")
            return channel
        try:
            return BOARD_TO_BCM[channel]
        except KeyError:
            raise ValueError("The channel sent is invalid on a Raspberry Pi") from None

    def _from_bcm(self, bcm: int) -> int:
        return BCM_TO_BOARD[bcm] if self._mode == self.BOARD else bcm

    @staticmethod
    def _as_list(channels: int | Iterable[int]) -> list[int]:
        if isinstance(channels, (list, tuple)):
            return list(channels)
        return [channels]  # type: ignore[list-item]

    # -- setup -------------------------------------------------------------------------
    def setup(self, channel: int | Iterable[int], direction: int, pull_up_down: int = PUD_OFF,
              initial: int | None = None) -> None:
        """Set up a channel (or a list of them) as IN (with an optional pull resistor) or
        OUT (with an optional initial level)."""
        if direction == self.OUT:
            if pull_up_down != self.PUD_OFF:
                raise ValueError("pull_up_down parameter is not valid for outputs")
        elif direction == self.IN:
            if initial is not None:
                raise ValueError("initial parameter is not valid for inputs")
            if pull_up_down not in (self.PUD_OFF, self.PUD_DOWN, self.PUD_UP):
                raise ValueError("Invalid value for pull_up_down - should be either PUD_OFF, "
                                 "PUD_UP or PUD_DOWN")
        else:
            raise ValueError("An invalid direction was passed to setup()")
        with self._lock:
            bcms = [self._to_bcm(c) for c in self._as_list(channel)]
            for bcm in bcms:
                old = self._channels.get(bcm)
                if direction == self.OUT:
                    # Like the real module, an output loses its edge detection.
                    self._detects.pop(bcm, None)
                    if initial is not None:
                        level = self.HIGH if initial else self.LOW
                    else:
                        level = old.level if old is not None and old.direction == self.OUT else self.LOW
                    self._channels[bcm] = _Channel(self.OUT, self.PUD_OFF, level)
                    self._record(bcm, level)
                    self._set_world_output(bcm, level)
                else:
                    if old is not None and old.direction == self.OUT:
                        self._release(bcm)
                    self._channels[bcm] = _Channel(self.IN, pull_up_down, self.LOW)
                    detect = self._detects.get(bcm)
                    if detect is not None:
                        detect.level = self._input_level(bcm, self._world.inputs())

    def cleanup(self, channel: int | Iterable[int] | None = None) -> None:
        """Return channels (all by default) to unconfigured inputs, dropping their edge
        detection and PWM. Cleaning up everything also forgets the numbering mode."""
        with self._lock:
            if channel is None:
                bcms = list(self._channels)
            else:
                bcms = [self._to_bcm(c) for c in self._as_list(channel)]
            if not self._channels and self._warnings:
                warnings.warn("No channels have been set up yet - nothing to clean up!  Try "
                              "cleaning up at the end of your program instead!", RuntimeWarning,
                              stacklevel=2)
            for bcm in bcms:
                self._detects.pop(bcm, None)
                pwm = self._pwms.pop(bcm, None)
                if pwm is not None:
                    pwm._running = False
                ch = self._channels.pop(bcm, None)
                if ch is not None and ch.direction == self.OUT:
                    self._release(bcm)
            if channel is None:
                self._mode = None

    # -- levels ------------------------------------------------------------------------
    def input(self, channel: int) -> int:
        """The channel's level (HIGH or LOW); for an output, the level it drives."""
        inputs = self._world.inputs()  # outside our lock: the view may be remote
        with self._lock:
            bcm = self._to_bcm(channel)
            ch = self._channels.get(bcm)
            if ch is None:
                raise RuntimeError("You must setup() the GPIO channel first")
            if ch.direction == self.OUT:
                return ch.level
            return self._input_level(bcm, inputs)

    def output(self, channel: int | Iterable[int], value: int | Iterable[int]) -> None:
        """Drive an output channel (or a list) HIGH or LOW."""
        with self._lock:
            bcms = [self._to_bcm(c) for c in self._as_list(channel)]
            values = self._as_list(value)  # type: ignore[arg-type]
            if len(values) == 1 and len(bcms) > 1:
                values = values * len(bcms)
            if len(values) != len(bcms):
                raise RuntimeError("Number of channels != number of values")
            for bcm in bcms:
                ch = self._channels.get(bcm)
                if ch is None or ch.direction != self.OUT:
                    raise RuntimeError("The GPIO channel has not been set up as an OUTPUT")
            for bcm, v in zip(bcms, values):
                self._drive(bcm, self.HIGH if v else self.LOW)

    def _input_level(self, bcm: int, inputs: dict) -> int:
        """The electrical level of an input line given the world's inputs."""
        ch = self._channels.get(bcm)
        pull = ch.pull if ch is not None else self.PUD_OFF
        name = self._names.get(bcm)
        if name in INPUT_WORLD_KEYS and inputs.get(INPUT_WORLD_KEYS[name]):
            # A closed contact drives the line to its rail.
            return self.LOW if self._active_low else self.HIGH
        # An open contact leaves the line to the pull resistor; floating reads LOW.
        return self.HIGH if pull == self.PUD_UP else self.LOW

    def _drive(self, bcm: int, level: int) -> None:
        ch = self._channels[bcm]
        if ch.level == level:
            return
        ch.level = level
        self._record(bcm, level)
        self._set_world_output(bcm, level)

    def _release(self, bcm: int) -> None:
        self._record(bcm, None)
        self._set_world_output(bcm, self.LOW)

    def _set_world_output(self, bcm: int, level: int) -> None:
        name = self._names.get(bcm)
        if name in OUTPUT_NAMES:
            self._world.set_output(name, level == self.HIGH)

    def _record(self, bcm: int, level: int | None) -> None:
        self._history.append(OutputChange(self._clock.monotonic(), bcm, self._names.get(bcm), level))

    # -- edge detection ---------------------------------------------------------------
    def add_event_detect(self, channel: int, edge: int, callback: Callable[[int], Any] | None = None,
                         bouncetime: int | None = None) -> None:
        """Watch an input channel for RISING, FALLING or BOTH edges; ``callback(channel)``
        runs on the stand-in's callback thread. ``bouncetime`` is in ms."""
        if callback is not None and not callable(callback):
            raise TypeError("Parameter must be callable")
        with self._lock:
            bcm = self._to_bcm(channel)
            ch = self._channels.get(bcm)
            if ch is None or ch.direction != self.IN:
                raise RuntimeError("You must setup() the GPIO channel as an input first")
            if edge not in (self.RISING, self.FALLING, self.BOTH):
                raise ValueError("The edge must be set to RISING, FALLING or BOTH")
            if bouncetime is not None and bouncetime <= 0:
                raise ValueError("Bouncetime must be greater than 0")
            if bcm in self._detects:
                raise RuntimeError("Conflicting edge detection already enabled for this GPIO channel")
            detect = _Detect(edge, bouncetime)
            detect.level = self._input_level(bcm, self._world.inputs())
            if callback is not None:
                detect.callbacks.append(callback)
            self._detects[bcm] = detect
            self._start_thread()

    def add_event_callback(self, channel: int, callback: Callable[[int], Any]) -> None:
        """Add one more callback to a channel that already has edge detection."""
        if not callable(callback):
            raise TypeError("Parameter must be callable")
        with self._lock:
            bcm = self._to_bcm(channel)
            ch = self._channels.get(bcm)
            if ch is None or ch.direction != self.IN:
                raise RuntimeError("You must setup() the GPIO channel as an input first")
            detect = self._detects.get(bcm)
            if detect is None:
                raise RuntimeError("Add event detection using add_event_detect first before "
                                   "adding a callback")
            detect.callbacks.append(callback)

    def remove_event_detect(self, channel: int) -> None:
        """Stop watching a channel (its callbacks go too)."""
        with self._lock:
            self._detects.pop(self._to_bcm(channel), None)

    def event_detected(self, channel: int) -> bool:
        """True once after each detected edge on the channel."""
        with self._lock:
            detect = self._detects.get(self._to_bcm(channel))
            if detect is None or not detect.detected:
                return False
            detect.detected = False
            return True

    def _on_world_inputs(self, inputs: dict) -> None:
        """World listener: turn input changes into edges on watched channels."""
        with self._lock:
            if self._closed:
                return
            for bcm, detect in list(self._detects.items()):
                if self._names.get(bcm) in INPUT_WORLD_KEYS:
                    self._line_changed(bcm, detect, self._input_level(bcm, inputs))

    def _line_changed(self, bcm: int, detect: _Detect, level: int) -> None:
        """Called with the lock held whenever a watched line may have a new level."""
        if level == detect.level:
            return
        detect.level = level
        wanted = detect.edge == self.BOTH or (detect.edge == self.RISING) == (level == self.HIGH)
        if not wanted:
            return
        now_s = self._clock.monotonic()
        if (detect.bouncetime_ms is not None and detect.last_edge_s is not None
                and (now_s - detect.last_edge_s) * 1000.0 < detect.bouncetime_ms):
            return  # RPi.GPIO drops edges inside the bounce time
        detect.last_edge_s = now_s
        detect.detected = True
        self._pending += 1
        self._events.put(bcm)

    # -- the callback thread -----------------------------------------------------------
    def _start_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._dispatch, name="gpio-standin-callbacks",
                                        daemon=True)
        self._thread.start()

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            try:
                bcm = self._events.get(timeout=_DISPATCH_POLL_S)
            except queue.Empty:
                continue
            if bcm == _WAKE:
                continue
            try:
                with self._lock:
                    detect = self._detects.get(bcm)
                    callbacks = list(detect.callbacks) if detect is not None else []
                    channel = self._from_bcm(bcm) if self._mode is not None else bcm
                for callback in callbacks:
                    try:
                        callback(channel)
                    except Exception:  # noqa: BLE001
                        # Like RPi.GPIO: a failing callback is reported and the thread goes on.
                        log.exception("gpio stand-in: callback for channel %d failed", channel)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def wait_idle(self, timeout_s: float = 2.0) -> bool:
        """Wait until every queued edge has been reported (a stand-in extra for tests).

        This waits on another thread's progress, so the bound is real time, not the
        stand-in's clock. Returns False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def close(self) -> None:
        """Stop the callback thread and ignore further world changes (a stand-in extra)."""
        with self._lock:
            self._closed = True
            self._stop.set()
            thread = self._thread
        self._events.put(_WAKE)
        if thread is not None:
            thread.join(timeout=2 * _DISPATCH_POLL_S + 1.0)

    # -- test helpers ------------------------------------------------------------------
    def pin(self, name: str) -> int:
        """The BCM number wired to ``name``."""
        return self._pins[name]

    def bounce(self, name_or_channel: str | int, glitches: int = 1) -> None:
        """Make a watched input line bounce: it leaves its settled level and comes back
        ``glitches`` times, all at once, then stays where the world puts it. Edges fire as
        they would (subject to the edge type and ``bouncetime``); anyone reading the line
        afterwards sees the settled level. A stand-in extra for tests."""
        if glitches < 1:
            raise ValueError(f"gpio stand-in: glitches = {glitches}: expected at least 1")
        inputs = self._world.inputs()
        with self._lock:
            bcm = self._pins[name_or_channel] if isinstance(name_or_channel, str) else int(name_or_channel)
            detect = self._detects.get(bcm)
            if detect is None:
                raise RuntimeError(f"gpio stand-in: BCM {bcm} has no edge detection to bounce")
            settled = self._input_level(bcm, inputs)
            for _ in range(glitches):
                self._line_changed(bcm, detect, self.HIGH if settled == self.LOW else self.LOW)
                self._line_changed(bcm, detect, settled)

    def output_changes(self, name_or_channel: str | int | None = None) -> list[OutputChange]:
        """Every output change so far (optionally for one name or BCM channel)."""
        with self._lock:
            if name_or_channel is None:
                return list(self._history)
            bcm = self._pins[name_or_channel] if isinstance(name_or_channel, str) else name_or_channel
            return [c for c in self._history if c.channel == bcm]

    def clear_history(self) -> None:
        """Forget the recorded output changes."""
        with self._lock:
            self._history.clear()

    def is_setup(self, channel_bcm: int) -> bool:
        """True when the BCM channel is set up (a stand-in extra for tests)."""
        with self._lock:
            return channel_bcm in self._channels

    def event_bouncetime(self, channel_bcm: int) -> int | None:
        """The ``bouncetime`` a channel's edge detection was set up with (a stand-in extra
        for tests); KeyError without edge detection."""
        with self._lock:
            return self._detects[channel_bcm].bouncetime_ms

    def has_event_detect(self, channel_bcm: int) -> bool:
        """True when the BCM channel has edge detection (a stand-in extra for tests)."""
        with self._lock:
            return channel_bcm in self._detects
