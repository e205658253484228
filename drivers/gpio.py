"""Safety inputs and indicator outputs through the RPi.GPIO API.

The driver is handed the GPIO module: on the Pi the ``RPi.GPIO`` module that rpi-lgpio
provides (load it with :func:`import_rpi_gpio`), in the simulator and in tests
:class:`nirf.sim.gpio_standin.GpioStandIn`. This module never imports RPi.GPIO at import time:
that import fails off a Pi.

Wiring: the key, interlock and foot switch contacts are read on inputs with pull
resistors. With the default active-low wiring a closed contact pulls the line to ground,
so LOW means key on, interlock closed, foot switch pressed, and an open contact (or a cut
wire) reads HIGH, the safe reading. The emission indicator and the white light are
active-high outputs, LOW (off) from construction on.

Edges and debounce (PRODUCT S3a): every input has edge detection on both edges and NO
library ``bouncetime``. A library debounce would lose short openings: RPi.GPIO drops any
edge within ``bouncetime`` of the last one it reported, and rpi-lgpio (lgpio underneath)
reports an edge only after the line has been stable for ``bouncetime``, so a 1 ms opening
produces no callback at all. Both libraries queue edge events and call the callback once
per edge, with the channel only (not the level, not the direction), so the driver judges
by what it reported last:

* key and interlock: an edge while the last report was "closed"/"on" can only be an
  opening, however short, and however the line reads by the time the callback runs: it is
  reported at once, without any wait. The return to closed/on is debounced in software: the
  callback waits ``debounce_ms`` and reports "closed" only if the line still reads so.
  When that wait ends with the line closed again, the pulse's return edge is still queued
  behind: it is remembered as owed and its callback ignored (for at most
  :data:`OWED_RETURN_S`), so one pulse is one opening, not two.
* foot switch: a release is reported only when the line still reads released
  :data:`FOOTSWITCH_RELEASE_CHECK` x ``debounce_ms`` after the edge (a release of
  ``debounce_ms``, 20 ms by default, or more always ends emission; a shorter one is contact
  bounce and is ignored); a press is debounced the same way.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from types import ModuleType
from typing import Any, Callable

from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import DeviceError
from nirf.hal.safety_io import FOOTSWITCH, INTERLOCK, KEY, Indicators, InputListener, SafetyInputs

log = logging.getLogger(__name__)

DEVICE = "gpio"
INPUT_NAMES = (KEY, INTERLOCK, FOOTSWITCH)
INDICATOR = "indicator"
WHITE_LIGHT = "white_light"
OUTPUT_NAMES = (INDICATOR, WHITE_LIGHT)
PIN_NAMES = INPUT_NAMES + OUTPUT_NAMES

# The GPIOs on the 40-pin header, in BCM numbering.
BCM_HEADER_PINS = range(0, 28)
MAX_DEBOUNCE_MS = 200  # the configuration's upper bound
# The settle wait on a return to closed lasts a little longer than the debounce time.
SETTLE_MARGIN_S = 0.002
# The foot-switch release is judged this fraction of debounce_ms after its edge: early
# enough that a release lasting debounce_ms is still released then, even with the callback
# running a few ms late, late enough that ordinary contact bounce (well under a ms to a few
# ms) has returned.
FOOTSWITCH_RELEASE_CHECK = 0.5
# inputs whose opening edge is reported at once (never debounced)
LATCHING_INPUTS = (KEY, INTERLOCK)
# How long the return edge of a pulse already reported (opened and closed again) is
# expected to follow; an edge after that is judged afresh (as an opening). Erring late only
# reports one opening too many, never one too few... except when the library lost an edge,
# which the MCU's edge counters and the supervisor's polling cover.
OWED_RETURN_S = 0.5

# What the RPi.GPIO API raises for misuse and failures (rpi-lgpio too); OSError for a GPIO
# character device that vanished or is not permitted.
_MODULE_ERRORS = (RuntimeError, ValueError, OSError)


def import_rpi_gpio(
    importer: Callable[[str], ModuleType] | None = None,
    environ: Any = os.environ,
    getcwd: Callable[[], str] = os.getcwd,
) -> ModuleType:
    """Import the RPi.GPIO module (rpi-lgpio on a Pi 5) now, translating every failure to
    load it into :class:`DeviceError`.

    rpi-lgpio's ``lgpio`` creates its notification FIFO ``.lgd-nfy<N>`` at import, in the
    directory ``$LG_WD`` names or else the working directory (lg ``lgNotify.c``,
    ``lgUtil.c``; ``PY_LGPIO/lgpio_extra.py`` then opens it). A service that runs in ``/``
    under ``ProtectSystem=strict`` cannot create it and the import raises
    ``FileNotFoundError``. When ``LG_WD`` is unset and systemd gave the service a runtime
    directory (``$RUNTIME_DIRECTORY``), that directory is used. ``importer``, ``environ``
    and ``getcwd`` are injectable for tests."""
    if not environ.get("LG_WD"):
        runtime = str(environ.get("RUNTIME_DIRECTORY", "")).split(":")[0]
        if runtime:
            # Set in os.environ, so the C library's getenv sees it too.
            environ["LG_WD"] = runtime
    if importer is None:
        importer = importlib.import_module
    try:
        return importer("RPi.GPIO")
    except ImportError as err:
        raise DeviceError(DEVICE, f"the RPi.GPIO module is not installed ({err}); on the Pi "
                                  "install rpi-lgpio") from err
    except RuntimeError as err:
        # RPi.GPIO raises RuntimeError at import off a Pi or without access to the GPIOs.
        raise DeviceError(DEVICE, f"the RPi.GPIO module cannot run here: {err}") from err
    except OSError as err:
        where = environ.get("LG_WD") or _cwd_or_unknown(getcwd)
        raise DeviceError(
            DEVICE,
            f"importing RPi.GPIO (rpi-lgpio) failed: {type(err).__name__}: {err}; lgpio "
            f"creates its notification FIFO .lgd-nfy* in LG_WD or the working directory "
            f"({where}), which must exist and be writable: set LG_WD to such a directory "
            "(the systemd units use their RuntimeDirectory)") from err
    except Exception as err:  # anything else a C extension's import can raise
        raise DeviceError(DEVICE, f"importing RPi.GPIO failed: {type(err).__name__}: {err}") from err


def _cwd_or_unknown(getcwd: Callable[[], str]) -> str:
    try:
        return getcwd()
    except OSError:
        return "the working directory (unknown)"


class GpioSafetyIO(SafetyInputs, Indicators):
    """Key switch, interlock loop and foot switch inputs plus the emission indicator and
    white-light outputs on GPIO pins.

    ``pins`` maps ``"key"``, ``"interlock"``, ``"footswitch"``, ``"indicator"`` and
    ``"white_light"`` to BCM numbers. Listeners added with :meth:`add_listener` are called
    as ``listener(name, value)`` from the GPIO module's callback thread: at once for an
    opening of the key or interlock, after the debounce for a return to closed and for
    the foot switch (see the module docstring); ``value`` is True for key on, interlock
    closed, foot switch pressed. ``clock`` times the debounce wait.

    Raises :class:`DeviceError` (device ``"gpio"``) when the module refuses a pin; the
    pins already set up are released again before it propagates.
    """

    def __init__(
        self,
        gpio: Any,
        pins: dict[str, int],
        *,
        active_low_inputs: bool = True,
        debounce_ms: int = 20,
        clock: Clock | None = None,
    ):
        missing = [n for n in PIN_NAMES if n not in pins]
        if missing:
            raise ValueError(f"gpio: pins has no {missing[0]!r}; needed are {', '.join(PIN_NAMES)}")
        unknown = sorted(set(pins) - set(PIN_NAMES))
        if unknown:
            raise ValueError(f"gpio: pins names unknown {unknown[0]!r}; known are {', '.join(PIN_NAMES)}")
        for name, bcm in pins.items():
            if isinstance(bcm, bool) or not isinstance(bcm, int) or bcm not in BCM_HEADER_PINS:
                raise ValueError(f"gpio: {name} pin = {bcm!r}: expected a BCM number "
                                 f"{BCM_HEADER_PINS[0]} to {BCM_HEADER_PINS[-1]}")
        if len(set(pins.values())) != len(pins):
            raise ValueError(f"gpio: two names share one pin in {pins!r}")
        if isinstance(debounce_ms, bool) or not 0 <= debounce_ms <= MAX_DEBOUNCE_MS:
            raise ValueError(f"gpio: debounce_ms = {debounce_ms!r}: allowed 0 to {MAX_DEBOUNCE_MS}")
        self._gpio = gpio
        self._pins = {n: int(pins[n]) for n in PIN_NAMES}
        self._names = {bcm: n for n, bcm in self._pins.items()}
        self._active_low = bool(active_low_inputs)
        self._debounce_ms = int(debounce_ms)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._lock = threading.Lock()
        self._listeners: list[InputListener] = []
        # Last debounced value reported per input; None until first read.
        self._state: dict[str, bool | None] = {n: None for n in INPUT_NAMES}
        # when the return edge of a reported pulse became owed, per latching input
        self._owed_return: dict[str, float] = {}
        self._claimed: list[int] = []  # channels we set up, to clean up only those
        self._closed = False
        try:
            self._setup()
        except DeviceError:
            self._release_claimed()
            raise
        log.info("gpio ready: pins %s, active-low inputs %s, debounce %d ms",
                 self._pins, self._active_low, self._debounce_ms)

    # -- setup ---------------------------------------------------------------------------
    def _setup(self) -> None:
        g = self._gpio
        self._call("setmode(BCM)", None, g.setmode, g.BCM)
        # Outputs first, driven LOW at once: indicator and white light off (safe state).
        for name in OUTPUT_NAMES:
            pin = self._pins[name]
            self._call("setup as output, LOW", name, g.setup, pin, g.OUT, initial=g.LOW)
            self._claimed.append(pin)
        pull = g.PUD_UP if self._active_low else g.PUD_DOWN
        for name in INPUT_NAMES:
            pin = self._pins[name]
            self._call("setup as input with pull resistor", name, g.setup, pin, g.IN, pull_up_down=pull)
            self._claimed.append(pin)
        for name in INPUT_NAMES:
            pin = self._pins[name]
            # no bouncetime: a library debounce drops short openings (module docstring)
            self._call("add_event_detect(BOTH)", name, g.add_event_detect, pin, g.BOTH,
                       callback=self._on_edge)
        # Read the starting levels after detection is on, so no change falls in between.
        for name in INPUT_NAMES:
            value = self._read(name)
            with self._lock:
                if self._state[name] is None:
                    self._state[name] = value

    def _call(self, what: str, name: str | None, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Call the GPIO module, translating its errors into DeviceError naming the pin."""
        try:
            return fn(*args, **kwargs)
        except _MODULE_ERRORS as err:
            where = f"{name} pin (BCM {self._pins[name]})" if name is not None else "the GPIO module"
            raise DeviceError(DEVICE, f"{what} on {where} failed: {err}") from err

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError(DEVICE, "the GPIO driver is closed")

    # -- inputs ----------------------------------------------------------------------------
    def _read(self, name: str) -> bool:
        level = self._call("input", name, self._gpio.input, self._pins[name])
        # A closed contact drives the line to its rail: LOW with active-low wiring.
        return (level == self._gpio.LOW) if self._active_low else (level == self._gpio.HIGH)

    def key_on(self) -> bool:
        """True when the key switch is on (read from the pin now)."""
        self._check_open()
        return self._read(KEY)

    def interlock_closed(self) -> bool:
        """True when the interlock loop is closed (read from the pin now)."""
        self._check_open()
        return self._read(INTERLOCK)

    def footswitch_pressed(self) -> bool:
        """True while the foot switch is held (read from the pin now)."""
        self._check_open()
        return self._read(FOOTSWITCH)

    def add_listener(self, listener: InputListener) -> None:
        """Call ``listener(name, value)`` on every input change: an opening of the key or
        interlock at once, a return to closed and any foot-switch change once debounced."""
        with self._lock:
            self._listeners.append(listener)

    def _on_edge(self, channel: int) -> None:
        """Edge callback, on the GPIO module's callback thread. Never raises into it."""
        name = self._names.get(channel)
        if name not in INPUT_NAMES or self._closed:
            return
        opened = False
        if name in LATCHING_INPUTS:
            now = self._clock.monotonic()
            with self._lock:
                owed_at = self._owed_return.pop(name, None)
                was_closed = self._state[name] is True
            if was_closed and owed_at is not None and now - owed_at <= OWED_RETURN_S:
                return  # the return edge of a pulse reported (open, then closed) already
            if was_closed:
                # An edge from closed/on is an opening, even if the line is closed again
                # by now (a pulse shorter than the callback's latency): report it at once.
                self._report(name, False)
                opened = True
            wait_s = self._debounce_ms / 1000.0 + SETTLE_MARGIN_S if self._debounce_ms > 0 else 0.0
        else:
            wait_s = self._debounce_ms / 1000.0 * FOOTSWITCH_RELEASE_CHECK
        # The return (and the foot switch either way) is judged by the level after a wait:
        # a bounce that came back reports nothing.
        if wait_s > 0:
            self._clock.sleep(wait_s)
        try:
            value = self._read(name)
        except DeviceError:
            log.exception("gpio: cannot read the %s pin after an edge", name)
            return
        if opened and value:
            with self._lock:
                self._owed_return[name] = self._clock.monotonic()
        self._report(name, value)

    def _report(self, name: str, value: bool) -> None:
        """Tell the listeners when ``value`` differs from the last report for ``name``."""
        with self._lock:
            if self._closed:
                return
            previous = self._state[name]
            self._state[name] = value
            listeners = list(self._listeners) if previous is not None and previous != value else []
        if listeners:
            log.info("gpio: %s -> %s", name, value)
        for listener in listeners:
            try:
                listener(name, value)
            except Exception:  # noqa: BLE001
                # One failing listener must not keep the others from hearing a safety input.
                log.exception("gpio: listener %r failed on %s = %s", listener, name, value)

    # -- outputs -------------------------------------------------------------------------
    def _write(self, name: str, on: bool) -> None:
        self._check_open()
        g = self._gpio
        self._call(f"output {'HIGH' if on else 'LOW'}", name, g.output, self._pins[name],
                   g.HIGH if on else g.LOW)

    def set_emission_indicator(self, on: bool) -> None:
        """Switch the emission warning light (and buzzer) on or off."""
        self._write(INDICATOR, on)

    def emission_indicator(self) -> bool:
        """True when the indicator output is driven on (read back from the pin)."""
        self._check_open()
        return self._call("input", INDICATOR, self._gpio.input, self._pins[INDICATOR]) == self._gpio.HIGH

    def set_white_light(self, on: bool) -> None:
        """Switch the white-light LED ring on or off."""
        self._write(WHITE_LIGHT, on)

    # -- shutdown ------------------------------------------------------------------------
    def close(self) -> None:
        """Turn both outputs off and release this driver's channels (only those; other
        users of the module keep theirs). Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        first_error: DeviceError | None = None
        for name in OUTPUT_NAMES:
            try:
                self._call("output LOW", name, self._gpio.output, self._pins[name], self._gpio.LOW)
            except DeviceError as err:
                log.error("%s", err)
                first_error = first_error or err
        for name in INPUT_NAMES:
            try:
                self._call("remove_event_detect", name, self._gpio.remove_event_detect, self._pins[name])
            except DeviceError as err:
                log.error("%s", err)
                first_error = first_error or err
        self._release_claimed()
        if first_error is not None:
            raise first_error

    def _release_claimed(self) -> None:
        if not self._claimed:
            return
        try:
            self._gpio.cleanup(list(self._claimed))
        except _MODULE_ERRORS as err:
            log.error("gpio: cleanup of BCM %s failed: %s", self._claimed, err)
        self._claimed = []

    def __enter__(self) -> "GpioSafetyIO":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
