"""The cart's state machine and safety supervisor.

One class, :class:`Cart`, owns the laser decision. Everything that can change whether light
may leave the cart goes through :meth:`Cart._apply`, and the rule itself is the short pure
function :func:`emission_permitted` - read it first. The supervisor loop (:meth:`Cart.tick`,
run at a fixed rate by :meth:`Cart.run`) reads the key, interlock and foot switch, the MCU's
status (faults, temperature, monitor photodiode, its counts of input openings and its
on-time) and the camera's liveness, and trips to FAULT on any violated rule. Safety-input
edges also trip at once from the GPIO callback, without waiting for the next tick.

Version 2 rules (PRODUCT section 4):

* S3a: an interlock opening or key-off edge of any length latches in ARMING/ARMED/EMITTING,
  from the GPIO callback or from a rise of the MCU's edge counters
  (``LaserStatus.interlock_openings``/``key_offs``), whichever comes first. A key "turned off
  and on at the cart" means off for at least :data:`KEY_CYCLE_MIN_OFF_S`, then on.
* S6a: the MCU's factory record (``laser.factory()``) bounds the host's power table
  (:meth:`Cart.install_calibration`); every on/set carries the expected mW.
* S7a: emission time accumulates in :class:`nirf.controller.budget.EmissionBudget`.
* S16: the heartbeat has its own deadline; :meth:`Cart.run` wakes for it between ticks.

The clock is a parameter: tests drive ``tick()`` with a manual clock through minutes of
simulated time in milliseconds.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
import threading
from dataclasses import dataclass
from typing import Callable

from nirf.controller.budget import EmissionBudget
from nirf.controller.calibration import PowerCalibration, factory_violation
from nirf.controller.state import (
    CAMERA_STALL, INPUT_DISAGREE, INTERLOCK_OPEN, KEY_OFF, MCU_FAULT_PREFIX, OUTPUT_MISMATCH,
    OVER_TEMP, SERIAL_LINK, Fault, State, recovery_hint,
)
from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import (
    DeviceError, FaultActive, InterlockOpen, InvalidArgument, KeyOff, NirfError, WrongState,
)
from nirf.hal.filter_wheel import FilterWheel
from nirf.hal.laser import LaserSource, LaserStatus
from nirf.hal.safety_io import FOOTSWITCH, INTERLOCK, KEY, Indicators, SafetyInputs
from nirf.hal.threads import WakeSignal

log = logging.getLogger(__name__)

EventListener = Callable[[str, dict], None]

# How long the MCU's and the Pi's readings of the key/interlock may disagree before it is a
# fault: the two are sampled at different instants, so an edge shows up in one first.
INPUT_DISAGREE_GRACE_S = 0.25
# MCU fault codes that mean the same as the controller's own input trips.
MCU_INPUT_FAULTS = {"ILK": INTERLOCK_OPEN, "KEY": KEY_OFF}
# How long a status report waits for the supervisor before reading without the lock.
STATUS_LOCK_WAIT_S = 0.05
# How often a dead MCU link is retried while in FAULT.
RECONNECT_INTERVAL_S = 1.0
# S3a: a key "turned off and on at the cart" is off at least this long, then on; a shorter
# off (a glitch, a bounce) trips an armed laser but counts as no key cycle.
KEY_CYCLE_MIN_OFF_S = 0.5
# S6a: the key cycle that authorises a change of the power calibration is this recent.
SERVICE_KEY_CYCLE_WINDOW_S = 60.0
# A polled foot-switch reading must show "released" on this many ticks in a row to end
# emission (the GPIO callback delivers debounced releases at once); a shorter release seen by
# the poll alone is contact bounce.
FOOTSWITCH_POLL_CONFIRM = 2
# Heartbeat send times kept for the status and the benchmark (S16), and the span reported.
# The MCU's status is read when something calls for it (an MCU notice of an input edge, a
# fault or a reset; a change the host asked for that the MCU has not reported yet; an output
# reading out of tolerance), and at least this often whatever happens (the backstop). Every
# heartbeat reads it in the same exchange (HBST), so with the default 100 ms heartbeat the
# backstop needs no exchange of its own. The other checks run on every tick.
STATUS_BACKSTOP_S = 0.1
# MCU notices that call for its status at once: an input edge, a latched fault, a reset
MCU_EVENT_NOTICES = frozenset({"INPUT", "FAULT", "BOOT"})
HEARTBEAT_HISTORY = 4096
HEARTBEAT_REPORT_S = 60.0


@dataclass(frozen=True)
class Readings:
    """One consistent view of what the supervisor knows, for the permission rule."""

    state: State
    key_on: bool
    interlock_closed: bool
    footswitch_pressed: bool
    footswitch_required: bool
    faults_latched: bool
    indicator_on_for_s: float | None  # None: indicator off
    emission_delay_s: float
    setpoint_mw: float


def emission_permitted(r: Readings) -> tuple[bool, list[str]]:
    """The laser may emit only if every condition of PRODUCT S2 holds. Returns the decision
    and, when refused, every reason."""
    reasons = []
    if r.state is not State.EMITTING:
        reasons.append(f"state is {r.state.value}, not EMITTING")
    if not r.key_on:
        reasons.append("key is off")
    if not r.interlock_closed:
        reasons.append("interlock is open")
    if r.faults_latched:
        reasons.append("a fault is latched")
    if r.indicator_on_for_s is None or r.indicator_on_for_s < r.emission_delay_s:
        reasons.append(f"emission indicator on for less than {r.emission_delay_s} s")
    if r.footswitch_required and not r.footswitch_pressed:
        reasons.append("foot switch not held")
    if not r.setpoint_mw > 0:
        reasons.append("no power setpoint")
    return (not reasons, reasons)


def _shown(st: LaserStatus) -> tuple:
    """What the status map shows of an MCU status reading, the noisy readings left out."""
    return (st.output_on, st.duty, st.faults, st.interlock_closed, st.key_on, st.frame_timing, st.modulation)


class Cart:
    """The controller: state machine, safety supervisor and device owner."""

    def __init__(
        self,
        cfg,
        *,
        laser: LaserSource,
        wheel: FilterWheel | None,
        inputs: SafetyInputs,
        indicators: Indicators,
        clock: Clock | None = None,
        calibration: PowerCalibration | None = None,
        budget_path=None,
    ):
        self.cfg = cfg
        self.laser = laser
        self.wheel = wheel
        self.inputs = inputs
        self.indicators = indicators
        self.clock = clock or SystemClock()
        self.calibration = calibration or PowerCalibration.nominal(cfg.laser.full_scale_mw)
        # the MCU's factory record, read at connect (S6a); None until then
        self.factory = None
        self.calibration_problems: list[str] = []
        self._lock = threading.RLock()
        self._listeners: list[EventListener] = []

        s = cfg.safety
        self.emission_delay_s = s.emission_delay_s
        self.footswitch_required = s.footswitch_required
        self.heartbeat_interval_s = s.heartbeat_interval_ms / 1000.0
        self.period_s = 1.0 / s.supervisor_rate_hz

        self.state = State.SAFE
        self.faults: list[Fault] = []
        self.setpoint_mw = 0.0
        self._indicator_on_since: float | None = None
        self._enabled_sent: bool | None = None
        self._duty_sent: float | None = None
        self._next_heartbeat: float | None = None
        self.heartbeat_sent: collections.deque[float] = collections.deque(maxlen=HEARTBEAT_HISTORY)
        self.budget = EmissionBudget(cfg.laser.max_emission_s, self.clock, budget_path)
        # the MCU's opening counters as last seen (S3a); None: no baseline yet
        self._mcu_counts: tuple[int, int] | None = None
        self._last_reconnect = -math.inf
        self._link_ok = False
        self.mcu_status: LaserStatus | None = None
        self.key_on = False
        self.interlock_closed = False
        self.footswitch_pressed = False
        self._footswitch_released_polls = 0
        # S1/S4/S6a key cycles: when the key went off (while it is off), and when it last came
        # back on after at least KEY_CYCLE_MIN_OFF_S off
        self._key_off_at: float | None = None
        self.key_cycled_at: float | None = None
        self._trip_needs_key_cycle = False
        self._trip_at: float | None = None
        self._disagree_since: float | None = None
        self._output_bad_since: float | None = None
        # camera liveness, reported by the acquisition
        self.camera_watch = False
        self.camera_last_frame: float | None = None
        self.ticks = 0
        self.status_reads = 0
        self._watches: list = []
        self._last_status_at: float | None = None
        self._status_wanted = True
        self._wake = WakeSignal()  # an MCU event: tick now, status included
        # told after an MCU status read that changed what the status map shows of it (output,
        # duty, faults, inputs, frame timing); the power and temperature readings, which move
        # on every read, go out with the periodic state
        self.on_status_change: Callable[[], None] | None = None

    # ------------------------------------------------------------------ extra rules
    def add_watch(self, watch) -> None:
        """An extra rule the supervisor checks on every tick, under the cart's lock.

        ``watch.trips(now, state)`` returns ``(code, message)`` pairs to latch now (it is
        asked only in ARMING, ARMED and EMITTING); ``watch.causes(now)`` returns what still
        stands in the way of ``arm`` and ``fault.reset`` (e.g. a process that is silent)."""
        self._watches.append(watch)

    def _check_watches(self, now: float) -> None:
        if not self.state.active:
            return
        for watch in self._watches:
            for code, message in watch.trips(now, self.state):
                self._trip(code, message)

    def _watch_causes(self) -> list[str]:
        now = self.clock.monotonic()
        return [c for w in self._watches for c in w.causes(now)]

    # ------------------------------------------------------------------ events
    def add_listener(self, listener: EventListener) -> None:
        """``listener(kind, detail)`` for "state", "fault", "safety" and "info" events. Called
        with the cart's lock held: listeners must only queue, never block."""
        self._listeners.append(listener)

    def _emit(self, kind: str, **detail) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, detail)
            except Exception:  # a broken listener must not break the safety loop
                log.exception("event listener failed")

    def _set_state(self, new: State, reason: str) -> None:
        old = self.state
        if new is old:
            return
        self.state = new
        # S7a: time in EMITTING is time with emission permitted, whatever the frame gating
        if new is State.EMITTING:
            self.budget.start()
        elif old is State.EMITTING:
            self.budget.stop()
        log.info("state %s -> %s (%s)", old.value, new.value, reason)
        self._emit("state", **{"from": old.value, "to": new.value, "reason": reason})

    # ------------------------------------------------------------------ start / stop
    def start(self) -> None:
        """Connect the devices and reach SAFE. The laser link's first act forces the output
        off (the driver's ``connect``); the indicator starts off."""
        with self._lock:
            self.state = State.SAFE
            self._enabled_sent = False
            self.laser.connect()
            self._link_ok = True
            self._read_factory()
            self.indicators.set_emission_indicator(False)
            self.indicators.set_white_light(False)
            if self.wheel is not None:
                self.wheel.connect()
            self.inputs.add_listener(self.on_input)
            self._read_inputs()
            self._emit("state", **{"from": None, "to": State.SAFE.value, "reason": "boot"})

    # ------------------------------------------------------------------ calibration (S6a)
    def _read_factory(self) -> None:
        """Take the MCU's factory record and re-validate the host table against it: a table
        outside the S6a band (a tampered file, a table made for another laser) is refused and
        the factory table used instead, and the refusal is reported."""
        try:
            self.factory = self.laser.factory()
        except DeviceError as err:
            self.factory = None
            self._calibration_problem(f"the laser controller's factory record cannot be read ({err}); "
                                      "laser.on is refused until it can")
            return
        cal = self.calibration
        if cal.calibration_id == "nominal":
            self.calibration = PowerCalibration.from_factory(self.factory)
            return
        why = factory_violation(cal.duty, cal.power_mw, cal.photodiode_factor, self.factory)
        if why is not None:
            self._calibration_problem(f"power calibration {cal.calibration_id} refused against the laser "
                                      f"controller's factory record: {why}; the factory table is in use")
            self.calibration = PowerCalibration.from_factory(self.factory)

    def _calibration_problem(self, message: str) -> None:
        log.error("%s", message)
        self.calibration_problems.append(message)
        self._emit("info", message=message)

    def check_calibration(self, cal: PowerCalibration) -> None:
        """Raise :class:`InvalidArgument` naming the limit when ``cal`` is outside the S6a
        band around the MCU's factory record."""
        if self.factory is None:
            raise WrongState("calibrate.power: the laser controller's factory record has not been read; "
                             "the table cannot be checked against it")
        why = factory_violation(cal.duty, cal.power_mw, cal.photodiode_factor, self.factory)
        if why is not None:
            raise InvalidArgument(f"calibrate.power: {why}")

    def service_act_refusal(self) -> str | None:
        """Why a service act (S6a: a new power calibration) is refused now, or None: only in
        SAFE, and with the key turned off (>= 0.5 s) and on at the cart within the last 60 s."""
        if self.state is not State.SAFE:
            return f"state is {self.state.value}; a power calibration is accepted only in SAFE (disarm first)"
        now = self.clock.monotonic()
        if self.key_cycled_at is None or now - self.key_cycled_at > SERVICE_KEY_CYCLE_WINDOW_S:
            ago = "never since start" if self.key_cycled_at is None else f"{now - self.key_cycled_at:.0f} s ago"
            return (f"turn the key off (at least {KEY_CYCLE_MIN_OFF_S} s) and on at the cart within the "
                    f"{SERVICE_KEY_CYCLE_WINDOW_S:.0f} s before the command (last key cycle: {ago})")
        if not self.key_on:
            return "the key is off: turn it on after the key cycle"
        return None

    def install_calibration(self, cal: PowerCalibration) -> None:
        """Use ``cal`` from now on, after checking it against the factory record and the
        service-act conditions (the caller checks the role)."""
        with self._lock:
            why = self.service_act_refusal()
            if why is not None:
                raise WrongState(f"calibrate.power: {why}")
            self.check_calibration(cal)
            self.calibration = cal

    def shutdown(self) -> None:
        """Laser off, indicator off, links closed. Safe to call more than once."""
        with self._lock:
            self.laser.force_off()
            self._enabled_sent = False
            try:
                self.indicators.set_emission_indicator(False)
            except NirfError:
                log.exception("indicator off failed at shutdown")
            if self.state.active:
                self._set_state(State.SAFE, "shutdown")
            self.budget.close()
            self.laser.close()
            if self.wheel is not None:
                self.wheel.close()

    def run(self, stop: threading.Event, on_healthy_tick: Callable[[], None] | None = None) -> None:
        """The supervisor loop at ``safety.supervisor_rate_hz`` until ``stop`` is set.

        S16: the heartbeat keeps its own deadline. The loop sleeps until whichever comes
        first, the next tick or the next heartbeat, so a heartbeat is never held back to the
        next tick (version 1 sent every 120 ms for a 100 ms interval at 50 Hz)."""
        next_t = self.clock.monotonic()
        with self._lock:
            # The heartbeat's schedule starts with the ticks': with an interval that is a whole
            # number of periods (100 ms at 50 or 20 Hz) every heartbeat falls on a tick, and
            # the loop wakes once for both.
            if self._link_ok:
                self._next_heartbeat = next_t
        # An MCU event (mcu_event) wakes the loop early; a stand-in for ``stop`` (a test that
        # moves a manual clock in its wait) is waited on itself.
        sleep = self._wake.wait if isinstance(stop, threading.Event) else stop.wait
        while not stop.is_set():
            now = self.clock.monotonic()
            woken = self._wake.is_set()
            if now >= next_t or woken:
                self._wake.clear()
                try:
                    self.tick()
                    if on_healthy_tick is not None:
                        on_healthy_tick()
                except Exception:
                    # Never leave the loop on an unexpected error: make the laser safe and go on.
                    log.exception("supervisor tick failed; forcing the laser off")
                    with self._lock:
                        self._trip("SUPERVISOR_ERROR", "internal error in the supervisor loop; see the log")
                if now >= next_t:  # an extra tick for an MCU event leaves the schedule alone
                    next_t += self.period_s
                    if next_t < self.clock.monotonic() - self.period_s:  # far behind (the process was frozen)
                        next_t = self.clock.monotonic()
            elif self.heartbeat_due(now):
                self._heartbeat_between_ticks(now)
            wake = next_t
            if self._next_heartbeat is not None and self._link_ok:
                wake = min(wake, self._next_heartbeat)
            sleep(max(wake - self.clock.monotonic(), 0.0))

    def wake(self) -> None:
        """Wake the supervisor loop now (it ticks at once; used at stop)."""
        self._wake.set()

    def mcu_event(self) -> None:
        """The MCU reported an input edge, a latched fault or its reset on its own: read its
        status and check everything at once, not at the next backstop read."""
        self._status_wanted = True
        self._wake.set()

    def on_mcu_notices(self, notices) -> None:
        """The notices the MCU sent on its own (``McuNotice``), as the thread that reads them
        hands them on: an event among them wakes the supervisor (:meth:`mcu_event`)."""
        if any(n.kind in MCU_EVENT_NOTICES for n in notices):
            self.mcu_event()

    def _took_status(self, status, now: float) -> None:
        """A fresh status reading of the MCU (read on its own or with a heartbeat)."""
        self._status_wanted = False
        prev, self.mcu_status = self.mcu_status, status
        self._last_status_at = now
        self.status_reads += 1
        if self.on_status_change is not None and (prev is None or _shown(prev) != _shown(status)):
            self.on_status_change()

    def _status_due(self, now: float) -> bool:
        """Whether this tick reads the MCU's status (see STATUS_BACKSTOP_S)."""
        st = self.mcu_status
        if self._status_wanted or st is None or self._last_status_at is None:
            return True
        if now - self._last_status_at >= STATUS_BACKSTOP_S - self.period_s / 2:
            # the backstop, unless the next heartbeat (which reads the status) comes sooner
            # than the next tick would
            nxt = self._next_heartbeat
            if not (self._link_ok and nxt is not None and nxt - now <= self.period_s
                    and nxt - self._last_status_at <= STATUS_BACKSTOP_S + self.period_s):
                return True
        if bool(st.output_on) != bool(self._enabled_sent):
            return True  # asked to turn on or off: watch until the MCU says it did
        if self._enabled_sent and self._duty_sent is not None and abs(st.duty - self._duty_sent[0]) > 2e-6:
            return True  # a new power, not yet reported
        return self._output_bad_since is not None or self._disagree_since is not None

    # ------------------------------------------------------------------ heartbeat (S5, S16)
    def _heartbeat_between_ticks(self, now: float) -> None:
        """A heartbeat whose deadline falls between two ticks, sent at its deadline. A link
        failure is handled as in the tick: the laser off and SERIAL_LINK latched."""
        with self._lock:
            try:
                self._heartbeat_if_due(now)
            except DeviceError as err:
                self._link_ok = False
                self._last_reconnect = now
                self.mcu_status = None
                dead = isinstance(err, (TimeoutError, ConnectionError))
                self._trip(SERIAL_LINK, f"laser controller link failed: {err}", force_off=not dead)
            except Exception:
                log.exception("heartbeat failed; forcing the laser off")
                self._trip("SUPERVISOR_ERROR", "internal error sending the heartbeat; see the log")

    def heartbeat_due(self, now: float) -> bool:
        return self._link_ok and (self._next_heartbeat is None or now >= self._next_heartbeat)

    def _heartbeat_if_due(self, now: float) -> None:
        """Send the heartbeat when its deadline has come. The next deadline is this one plus
        the interval (not "the interval after this send"), so lateness does not accumulate;
        only after falling more than a whole interval behind (a frozen process) does the
        schedule restart from now. Raises DeviceError from the link."""
        if not self._link_ok:
            return
        if self._next_heartbeat is None:
            self._next_heartbeat = now
        if now < self._next_heartbeat:
            return
        self.heartbeat_sent.append(self.clock.monotonic())  # the send time, at the sender
        try:
            # The heartbeat carries a status reading in the same exchange (the MCU's HBST):
            # the backstop read costs no exchange of its own.
            self._took_status(self.laser.heartbeat_status(), now)
        finally:
            self._next_heartbeat += self.heartbeat_interval_s
            if self._next_heartbeat <= now:
                self._next_heartbeat = now + self.heartbeat_interval_s

    def heartbeat_stats(self, span_s: float = HEARTBEAT_REPORT_S) -> dict:
        """Gaps between heartbeat sends over the last ``span_s`` (measured at the sender)."""
        now = self.clock.monotonic()
        times = [t for t in list(self.heartbeat_sent) if t >= now - span_s]
        gaps = [(b - a) * 1000.0 for a, b in zip(times, times[1:])]
        late = self.heartbeat_interval_s * 1000.0 + 10.0
        return {"interval_ms": round(self.heartbeat_interval_s * 1000.0, 3), "span_s": span_s,
                "gaps": len(gaps),
                "median_gap_ms": round(statistics.median(gaps), 3) if gaps else None,
                "max_gap_ms": round(max(gaps), 3) if gaps else None,
                "late_gaps": sum(1 for g in gaps if g > late)}

    # ------------------------------------------------------------------ readings
    def _read_inputs(self) -> None:
        """Poll the inputs (a backup for the edge callbacks: an opening seen here trips like
        an edge does). A polled foot-switch release counts only when it lasts
        FOOTSWITCH_POLL_CONFIRM ticks (shorter is contact bounce)."""
        self._set_key(self.inputs.key_on())
        self.interlock_closed = self.inputs.interlock_closed()
        if self.inputs.footswitch_pressed():
            self._footswitch_released_polls = 0
            self.footswitch_pressed = True
        else:
            self._footswitch_released_polls += 1
            if self._footswitch_released_polls >= FOOTSWITCH_POLL_CONFIRM or not self.footswitch_pressed:
                self.footswitch_pressed = False

    def _set_key(self, on: bool) -> None:
        """Follow the key; a key cycle (S3a) is off for at least KEY_CYCLE_MIN_OFF_S, then on."""
        on = bool(on)
        now = self.clock.monotonic()
        if not on:
            if self._key_off_at is None:
                self._key_off_at = now
        elif self._key_off_at is not None:
            if now - self._key_off_at >= KEY_CYCLE_MIN_OFF_S:
                self.key_cycled_at = now
                self._emit("info", message=f"key turned off for {now - self._key_off_at:.2f} s and on: "
                                           "a key cycle at the cart")
            self._key_off_at = None
        self.key_on = on

    def _key_cycled_since(self, t: float | None) -> bool:
        return self.key_cycled_at is not None and (t is None or self.key_cycled_at > t)

    def on_input(self, name: str, value: bool) -> None:
        """GPIO edge callback: update the reading and trip at once if it is unsafe (S3)."""
        with self._lock:
            if name == KEY:
                self._set_key(value)
            elif name == INTERLOCK:
                self.interlock_closed = bool(value)
            elif name == FOOTSWITCH:
                # the driver reports a release only once it has lasted its debounce time
                self.footswitch_pressed = bool(value)
                self._footswitch_released_polls = 0 if value else FOOTSWITCH_POLL_CONFIRM
            self._emit("input", name=name, value=bool(value))
            self._check_inputs()
            self._apply()

    def readings(self) -> Readings:
        now = self.clock.monotonic()
        return Readings(
            state=self.state,
            key_on=self.key_on,
            interlock_closed=self.interlock_closed,
            footswitch_pressed=self.footswitch_pressed,
            footswitch_required=self.footswitch_required,
            faults_latched=bool(self.faults),
            indicator_on_for_s=None if self._indicator_on_since is None else now - self._indicator_on_since,
            emission_delay_s=self.emission_delay_s,
            setpoint_mw=self.setpoint_mw,
        )

    # ------------------------------------------------------------------ the supervisor
    def tick(self) -> None:
        """One supervisor iteration: read, heartbeat, check every rule, apply."""
        with self._lock:
            self.ticks += 1
            now = self.clock.monotonic()
            try:
                self._read_inputs()
            except DeviceError as err:
                self._trip("GPIO", f"safety inputs unreadable: {err}")
            self._poll_mcu(now)
            self._check_inputs()
            self._check_mcu_counts()
            self._check_rules(now)
            self._check_watches(now)
            self.budget.tick()
            self._apply()

    def _check_mcu_counts(self) -> None:
        """S3a: the MCU counts every opening edge by interrupt, however short. A rise of either
        count while ARMING, ARMED or EMITTING trips, even when both readings are closed again
        by now (a pulse shorter than a tick)."""
        st = self.mcu_status
        if st is None:
            return
        counts = (int(st.interlock_openings), int(st.key_offs))
        before, self._mcu_counts = self._mcu_counts, counts
        if before is None or counts[0] < before[0] or counts[1] < before[1]:
            return  # first reading, or the MCU restarted its counts: a new baseline
        if not self.state.active:
            return
        if counts[0] > before[0]:
            self._trip(INTERLOCK_OPEN, f"the laser controller counted {counts[0] - before[0]} interlock "
                                       "opening(s) while the laser was armed", key_cycle=True)
        elif counts[1] > before[1]:
            self._trip(KEY_OFF, f"the laser controller counted {counts[1] - before[1]} key-off edge(s) "
                                "while the laser was armed", key_cycle=True)

    def _poll_mcu(self, now: float) -> None:
        if not self._link_ok:
            if now - self._last_reconnect < RECONNECT_INTERVAL_S:
                return
            self._last_reconnect = now
            try:
                reconnect = getattr(self.laser, "reconnect", None)
                # one attempt per interval: a silent MCU must not hold up the loop
                reconnect(attempts=1) if reconnect else self.laser.connect()
                self._link_ok = True
                self._enabled_sent = False
                self._duty_sent = None
                self._mcu_counts = None  # the MCU may have rebooted: a new baseline
                self._next_heartbeat = None
                self._read_factory()
                self._emit("info", message="laser controller link restored")
            except DeviceError as err:
                log.warning("laser controller still unreachable: %s", err)
                return
        try:
            self._heartbeat_if_due(now)
            if self._status_due(now):
                self._took_status(self.laser.status(), now)
        except DeviceError as err:
            self._link_ok = False
            self._last_reconnect = now
            self.mcu_status = None
            # A silent or vanished MCU will not hear "off" either (its watchdog covers that);
            # a garbled link might, so only then is it worth the time.
            dead = isinstance(err, (TimeoutError, ConnectionError))
            self._trip(SERIAL_LINK, f"laser controller link failed: {err}", force_off=not dead)

    def _check_inputs(self) -> None:
        """S3: in an active state an open interlock or a key that is off trips at once;
        releasing a required foot switch only stops emission."""
        if not self.state.active:
            return
        if not self.interlock_closed:
            self._trip(INTERLOCK_OPEN, "interlock opened while the laser was armed", key_cycle=True)
        elif not self.key_on:
            self._trip(KEY_OFF, "key switched off while the laser was armed", key_cycle=True)
        elif self.state is State.EMITTING and self.footswitch_required and not self.footswitch_pressed:
            self._stop_emission("foot switch released")

    def _check_rules(self, now: float) -> None:
        st = self.mcu_status
        max_temp = self.cfg.laser.max_temp_c
        if st is not None:
            for code in st.faults:
                if code in MCU_INPUT_FAULTS:
                    # the MCU saw the loop open or the key off first: the same trip as ours
                    self._trip(MCU_INPUT_FAULTS[code], f"laser controller latched {code} "
                               f"({'interlock opened' if code == 'ILK' else 'key switched off'} while enabled)",
                               key_cycle=True)
                else:
                    self._trip(MCU_FAULT_PREFIX + code, f"laser controller reports fault {code}")
            if st.temp_c > max_temp:
                self._trip(OVER_TEMP, f"laser temperature {st.temp_c:.1f} C above laser.max_temp_c {max_temp} C")
            # The MCU and the Pi read the same loop: a lasting disagreement is a wiring fault.
            if st.interlock_closed != self.interlock_closed or st.key_on != self.key_on:
                if self._disagree_since is None:
                    self._disagree_since = now
                elif now - self._disagree_since > INPUT_DISAGREE_GRACE_S:
                    self._trip(INPUT_DISAGREE,
                               f"laser controller reads interlock {'closed' if st.interlock_closed else 'open'}, "
                               f"key {'on' if st.key_on else 'off'}; the Pi reads interlock "
                               f"{'closed' if self.interlock_closed else 'open'}, key {'on' if self.key_on else 'off'}")
            else:
                self._disagree_since = None
            self._check_output(now, st)

        if self.state is State.ARMING and self._indicator_on_since is not None \
                and now - self._indicator_on_since >= self.emission_delay_s:
            self._set_state(State.ARMED, f"indicator on for {self.emission_delay_s} s")
        if self.state is State.EMITTING:
            if self.budget.free_s(self._mcu_on_time_s()) <= 0.0:
                # S7a: the accumulated on-time (host or MCU count, the larger) reached the limit
                self.budget.mark_exhausted()
                self._stop_emission(f"emission budget used: laser.max_emission_s "
                                    f"({self.cfg.laser.max_emission_s:.0f} s) of emission within "
                                    f"{self.budget.window_s:.0f} s")
            elif self.camera_watch and self.camera_last_frame is not None and \
                    now - self.camera_last_frame > self.cfg.safety.camera_stall_s:
                self._trip(CAMERA_STALL, f"no camera frame for {now - self.camera_last_frame:.1f} s "
                                         f"(limit {self.cfg.safety.camera_stall_s} s) while emitting")

    def _check_output(self, now: float, st: LaserStatus) -> None:
        """S13: the monitor photodiode must track the setpoint within the tolerance while
        emitting, and read near zero otherwise."""
        measured = self.calibration.photodiode_to_mw(st.photodiode_mw)
        emitting = self._enabled_sent and self.state is State.EMITTING
        tol = self.cfg.safety.output_tolerance
        if emitting:
            bad = abs(measured - self.setpoint_mw) > tol * self.setpoint_mw
            what = (f"monitor photodiode reads {measured:.1f} mW, setpoint {self.setpoint_mw:.1f} mW "
                    f"(tolerance {tol * 100:.0f} %)")
        else:
            limit = self.cfg.safety.idle_output_limit_mw
            bad = measured > limit
            what = f"monitor photodiode reads {measured:.1f} mW with the laser off (limit {limit} mW)"
        if not bad:
            self._output_bad_since = None
            return
        if self._output_bad_since is None:
            self._output_bad_since = now
        if now - self._output_bad_since >= self.cfg.safety.output_settle_s:
            self._trip(OUTPUT_MISMATCH, what)

    def _mcu_on_time_s(self) -> float:
        """The MCU's on-time count in the host's terms (S7a: the larger count wins). The MCU
        judges its count against its own ``budget_s`` in its own window of twice that; when
        the two budgets are the same (the configuration writes the MCU's from
        ``laser.max_emission_s``) this is its count as it is, otherwise the same fraction of
        the host's budget, so a longer MCU window never locks the host out for its length."""
        st = self.mcu_status
        if st is None or not st.budget_s > 0:
            return 0.0
        return float(st.on_time_s) * self.budget.limit_s / float(st.budget_s)

    def _mcu_time_scale(self) -> float:
        """MCU seconds per host-budget second (how fast the scaled MCU count can fall)."""
        st = self.mcu_status
        if st is None or not st.budget_s > 0:
            return 1.0
        return float(st.budget_s) / self.budget.limit_s

    def _stop_emission(self, reason: str) -> None:
        self._set_state(State.ARMED, reason)
        self._emit("safety", message=f"emission stopped: {reason}")

    def _trip(self, code: str, message: str, *, key_cycle: bool = False, force_off: bool = True) -> None:
        """Latch a fault: laser off first, then the bookkeeping."""
        if force_off:
            self.laser.force_off()
        self._enabled_sent = False
        self._duty_sent = None
        if any(f.code == code for f in self.faults):
            return
        if key_cycle:
            self._trip_needs_key_cycle = True
            self._trip_at = self.clock.monotonic()
        fault = Fault(code, f"{message}; to recover: {recovery_hint(code)}", self.clock.time_ns())
        self.faults.append(fault)
        # State and event first: a failing indicator write must not hide the fault.
        self._set_state(State.FAULT, code)
        log.warning("FAULT %s: %s", code, fault.message)
        self._emit("fault", code=code, message=fault.message)
        try:
            self._set_indicator(False)
        except NirfError as err:
            log.error("emission indicator could not be turned off: %s", err)

    # ------------------------------------------------------------------ applying the decision
    def _set_indicator(self, on: bool) -> None:
        if on and self._indicator_on_since is None:
            self.indicators.set_emission_indicator(True)
            self._indicator_on_since = self.clock.monotonic()
        elif not on and self._indicator_on_since is not None:
            self._indicator_on_since = None
            self.indicators.set_emission_indicator(False)

    def _apply(self) -> None:
        """The one place that grants or withdraws permission to emit."""
        self._set_indicator(self.state.active)
        permitted, _ = emission_permitted(self.readings())
        sent = False
        try:
            if permitted:
                # S6a: every on/set carries the mW the host expects, for the MCU's cross-check
                expected = self.setpoint_mw
                duty = self.calibration.duty_for(expected)
                if self._duty_sent != (duty, expected):
                    sent = True
                    self.laser.set_duty(duty, expected)
                    self._duty_sent = (duty, expected)
                if self._enabled_sent is not True:
                    sent = True
                    self.laser.set_enabled(True, expected)
                    self._enabled_sent = True
            elif self._enabled_sent is not False or (self.mcu_status and self.mcu_status.output_on):
                sent = True
                self.laser.set_enabled(False)
                self._enabled_sent = False
        except DeviceError as err:
            self._link_ok = self._link_ok and not isinstance(err, ConnectionError)
            self._trip(SERIAL_LINK, f"laser controller did not accept the command: {err}")
        if sent:
            # what the MCU now does is read back at once (a tick right away), not at the next
            # backstop tick: status shows the output on or off within milliseconds
            self._status_wanted = True
            self._wake.set()

    # ------------------------------------------------------------------ commands
    def check_power(self, power_mw) -> float:
        """S6: reject (never clip) a setpoint over the power or peak-irradiance limit."""
        if isinstance(power_mw, bool) or not isinstance(power_mw, (int, float)) or not math.isfinite(power_mw):
            raise InvalidArgument(f"power_mw {power_mw!r} is not a finite number")
        power_mw = float(power_mw)
        lc = self.cfg.laser
        if power_mw <= 0:
            raise InvalidArgument(f"power_mw {power_mw} must be above 0 (use laser.off to stop)")
        if power_mw > lc.max_power_mw:
            raise InvalidArgument(f"power_mw {power_mw} above laser.max_power_mw {lc.max_power_mw}")
        peak = power_mw * lc.beam_peak_to_mean / lc.field_area_cm2
        if peak > lc.irradiance_limit_mw_cm2:
            raise InvalidArgument(
                f"power_mw {power_mw} gives a peak irradiance of {peak:.1f} mW/cm2, above "
                f"laser.irradiance_limit_mw_cm2 {lc.irradiance_limit_mw_cm2} "
                f"(peak/mean {lc.beam_peak_to_mean}, field {lc.field_area_cm2} cm2)")
        if self.factory is None:
            raise WrongState("the laser controller's factory record has not been read (S6a): no emission "
                             "until the link is up")
        duty = self.calibration.duty_for(power_mw)
        ceiling = min(lc.duty_ceiling, float(self.factory.duty_ceiling))
        if duty > ceiling:
            raise InvalidArgument(f"power_mw {power_mw} needs duty {duty:.3f}, above the MCU's ceiling "
                                  f"{ceiling:.4f}")
        return power_mw

    def _check_inhibits(self) -> None:
        if not self.interlock_closed:
            raise InterlockOpen("interlock is open: close the interlock loop before arming")
        if not self.key_on:
            raise KeyOff("key switch is off: turn the key on before arming")

    def arm(self) -> dict:
        with self._lock:
            self._read_inputs()
            self._check_inhibits()
            if self.state is State.FAULT:
                raise FaultActive(f"fault latched ({', '.join(f.code for f in self.faults)}): fault.reset first")
            if self.state is not State.SAFE:
                raise WrongState(f"arm needs state SAFE, state is {self.state.value}")
            if self.cfg.safety.boot_requires_key_cycle and not self._key_cycled_since(None):
                raise KeyOff(f"turn the key off (at least {KEY_CYCLE_MIN_OFF_S} s) and on again at the cart "
                             "before the first arm after boot")
            if not self._link_ok or self.mcu_status is None:
                raise DeviceError("laser-mcu", "no status from the laser controller yet; try again")
            causes = self._watch_causes()
            if causes:
                raise WrongState("cannot arm: " + "; ".join(causes))
            # a fresh baseline for the MCU's opening counters, so an opening while SAFE just
            # before this arm is not taken for one while armed
            self.mcu_status = self.laser.status()
            self._mcu_counts = None
            self._check_mcu_counts()
            self._set_indicator(True)
            self._set_state(State.ARMING, "arm")
            self._apply()
            return {"state": self.state.value, "emission_delay_s": self.emission_delay_s}

    def disarm(self) -> dict:
        with self._lock:
            if self.state is State.FAULT:
                self.laser.force_off()
                raise WrongState("state is FAULT: use fault.reset")
            self._set_state(State.SAFE, "disarm")
            self.setpoint_mw = 0.0
            self._apply()
            return {"state": self.state.value}

    def laser_on(self, power_mw) -> dict:
        with self._lock:
            if self.state is State.EMITTING:
                raise WrongState("laser is already on (state EMITTING): use laser.set to change power")
            if self.state is not State.ARMED:
                raise WrongState(f"laser.on needs state ARMED, state is {self.state.value}")
            power_mw = self.check_power(power_mw)
            if self.footswitch_required and not self.footswitch_pressed:
                raise WrongState("hold the foot switch to emit (safety.footswitch_required)")
            # S7a: re-issuing laser.on does not restart the clock
            refusal = self.budget.turn_on_refusal(self._mcu_on_time_s(), self._mcu_time_scale())
            if refusal is not None:
                raise WrongState(f"laser.on refused: {refusal}")
            self.setpoint_mw = power_mw
            self._output_bad_since = None
            self._set_state(State.EMITTING, f"laser.on {power_mw} mW")
            self._apply()
            return {"state": self.state.value, "setpoint_mw": self.setpoint_mw}

    def laser_set(self, power_mw) -> dict:
        with self._lock:
            if self.state not in (State.ARMED, State.EMITTING):
                raise WrongState(f"laser.set needs state ARMED or EMITTING, state is {self.state.value}")
            self.setpoint_mw = self.check_power(power_mw)
            self._output_bad_since = None
            self._apply()
            return {"state": self.state.value, "setpoint_mw": self.setpoint_mw}

    def laser_off(self) -> dict:
        with self._lock:
            if self.state is State.EMITTING:
                self._stop_emission("laser.off")
            elif self.state is not State.ARMED:
                raise WrongState(f"laser.off needs state EMITTING or ARMED, state is {self.state.value}")
            self._apply()
            return {"state": self.state.value}

    def persisting_causes(self) -> list[str]:
        """What still stands in the way of a reset (S4)."""
        causes = []
        if not self.interlock_closed:
            causes.append("interlock is open")
        if not self.key_on:
            causes.append("key is off")
        if not self._link_ok:
            causes.append("laser controller link is down")
        st = self.mcu_status
        if st is not None and st.temp_c > self.cfg.laser.max_temp_c:
            causes.append(f"laser temperature {st.temp_c:.1f} C above {self.cfg.laser.max_temp_c} C")
        if self.camera_watch and self.camera_last_frame is not None and \
                self.clock.monotonic() - self.camera_last_frame > self.cfg.safety.camera_stall_s:
            causes.append("camera still delivers no frames")
        causes.extend(self._watch_causes())
        return causes

    def fault_reset(self) -> dict:
        with self._lock:
            self._read_inputs()
            if self.state is State.SAFE and not self.faults:
                return {"state": self.state.value}
            if self.state is not State.FAULT:
                raise WrongState(f"fault.reset needs state FAULT, state is {self.state.value}")
            causes = self.persisting_causes()
            if causes:
                raise FaultActive("cannot reset while the cause persists: " + "; ".join(causes))
            if self._trip_needs_key_cycle and self.cfg.safety.reset_requires_key_cycle \
                    and not self._key_cycled_since(self._trip_at):
                raise FaultActive(f"after an interlock or key trip, turn the key off (at least "
                                  f"{KEY_CYCLE_MIN_OFF_S} s) and on at the cart before fault.reset")
            try:
                self.laser.clear_faults()
                self.mcu_status = self.laser.status()
            except DeviceError as err:
                raise FaultActive(f"the laser controller refused to clear its faults: {err}") from err
            if self.mcu_status.faults:
                raise FaultActive(f"the laser controller still reports {', '.join(self.mcu_status.faults)}")
            self.faults.clear()
            self._trip_needs_key_cycle = False
            self._disagree_since = None
            self._output_bad_since = None
            self.setpoint_mw = 0.0
            self._set_state(State.SAFE, "fault.reset")
            self._apply()
            return {"state": self.state.value}

    @property
    def emission_enabled(self) -> bool:
        """True while the supervisor has granted the MCU permission to emit."""
        return bool(self._enabled_sent)

    # ------------------------------------------------------------------ camera liveness
    def note_camera(self, watching: bool, last_frame_monotonic: float | None = None) -> None:
        """The acquisition reports whether the camera is streaming and its latest frame.
        Called for every frame, so it takes no lock: two plain attribute writes, read by the
        supervisor on its next tick."""
        if last_frame_monotonic is not None:
            self.camera_last_frame = last_frame_monotonic
        elif not watching:
            self.camera_last_frame = None
        self.camera_watch = watching

    # ------------------------------------------------------------------ status
    def safety_status(self) -> dict:
        """The controller's part of the ``status`` telemetry map.

        It waits briefly for the cart's lock, for a consistent view; when the supervisor is
        stuck on a slow or dead device it reads without it, so telemetry keeps flowing (each
        field is read once: at worst the map mixes readings a tick apart)."""
        locked = self._lock.acquire(timeout=STATUS_LOCK_WAIT_S)
        try:
            return self._status_fields()
        finally:
            if locked:
                self._lock.release()

    def _status_fields(self) -> dict:
        st = self.mcu_status
        measured = self.calibration.photodiode_to_mw(st.photodiode_mw) if st else 0.0
        return {
            "state": self.state.value,
            "faults": [f.to_dict() for f in list(self.faults)],
            "laser": {
                "on": bool(self._enabled_sent and st is not None and st.output_on),
                "power_mw": round(measured, 2),
                "setpoint_mw": self.setpoint_mw,
                "temp_c": None if st is None else round(st.temp_c, 2),
            },
            # Either reading of an open loop or a key that is off counts: the MCU usually
            # sees an edge a few milliseconds before the Pi's debounced input does.
            "interlock": "closed" if self.interlock_closed and (st is None or st.interlock_closed) else "open",
            "key": self.key_on and (st is None or st.key_on),
            "footswitch": self.footswitch_pressed,
            "indicator": self._indicator_on_since is not None,
            # v2 additions: the S7a budget and the S16 heartbeat, as the sender measured it
            "emission_budget": self.budget.status(self._mcu_on_time_s()),
            "heartbeat": self.heartbeat_stats(),
        }
