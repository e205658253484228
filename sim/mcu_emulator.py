"""Emulator of the laser MCU firmware, speaking the protocol of docs/mcu-protocol.md.

:class:`McuEmulator` is an emulator *core* (see :mod:`nirf.sim.serial_link`): bytes in through
``feed``, bytes out through ``take_output``, time-driven behaviour in ``tick``. It behaves
the way the firmware must: output off at boot, checksum and sequence number on every line,
replies to a retried line served from a cache, heartbeat watchdog, its own maximum
on-time and duty ceiling, latched faults, a thermal model, a monitor photodiode, and the
frame timing (camera triggers with the laser gated on even frames).

Protocol 2 adds the factory record (S6a: table, photodiode factor, duty ceiling and optical
trip, written only with the service jumper closed), the expected-mW cross-check on every
on/set command, edge-latched inputs (a World listener stands for the firmware's pin-change
interrupt), the accumulated emission budget over a sliding window (S7a) and the frame-
boundary gating of turn-on and power increases while modulating (S15).

It drives the diode on the :class:`~sim.world.World`; the World applies the key/interlock
series loop on its own, as the hardware does. The diode's true response is linear,
``full_scale_mw`` x duty; :func:`factory_for` builds the factory record that measures it. Everything time-driven reads the clock it was
given: ``monotonic()`` for durations (watchdog, on-time, thermal model), ``time_ns()`` for
world timestamps (frame triggers, laser drive changes).
"""

from __future__ import annotations

import collections
import logging
import math
import random
import re
import threading

from nirf.hal.clock import Clock
from nirf.hal.errors import InvalidArgument
from nirf.hal.laser import MAX_FACTORY_POINTS, OPTICAL_TRIP_FACTOR, FactoryCalibration
from nirf.sim.world import World

log = logging.getLogger(__name__)

MODEL = "NIRF-LMCU"
FIRMWARE_VERSION = "2.1.0"
PROTOCOL_VERSION = 2

MAX_LINE_BYTES = 96  # longest command line the firmware buffers, terminator excluded
TX_LIMIT_BYTES = 65536  # like a UART transmit buffer: lines beyond it are dropped
MAX_SEQ = 65535

WDT_MIN_MS = 100
WDT_MAX_MS = 1000
PERIOD_MIN_US = 8_333  # 120 frames/s
PERIOD_MAX_US = 10_000_000  # 0.1 frames/s
# A late tick (the emulator's process was paused) replays at most this many frames; the
# rest are skipped, their counters consumed, so later frames stay on the t0 + n*period grid.
MAX_CATCHUP_FRAMES = 240

AMBIENT_C = 25.0
THERMAL_RISE_C_PER_MW = 15.0 / 500.0  # +15 C at 500 mW optical, in steady state
THERMAL_TAU_S = 30.0
# The thermal model steps at most this often: far below its time constant, and it keeps
# the per-tick cost low (each step averages the world's laser history).
THERMAL_STEP_S = 0.05
OVERTEMP_READING_C = 70.0  # what the sensor reads with the mcu_overtemp fault injected
OTEMP_HYSTERESIS_C = 5.0  # OTEMP may be cleared only this far below the limit

PD_NOISE_MW = 0.2  # monitor photodiode noise floor (1 sigma)
PD_NOISE_REL = 0.002  # and proportional noise (1 sigma)
# The simulated photodiode's true response: optical mW per pd unit (the factory measures it).
PD_MW_PER_UNIT = 1.0

# S6a: own reading above the optical trip for longer than 5 ms -> OPT. Judged on 1 ms
# samples, so the MCU trips once a run of samples spans more than 4 ms: light above the
# trip then never lasts beyond 5 ms.
OPT_TRIP_S = 0.004
XMW_TRIP_S = 0.050  # S6a: reading and expected mW disagreeing for longer than this -> XMW
XMW_REL = 0.20  # "disagree": by more than 20 % of the larger of the two ...
XMW_FS_ALLOWANCE = 0.02  # ... plus 2 % of the factory table's full scale (S6a's own allowance)
XMW_FLOOR_MW = 1.0  # ... plus the photodiode's noise floor, so 0 mW vs 0.3 mW is no mismatch
# The emulator's ticks: every millisecond while anything runs on time (the output enabled,
# frame timing, a trip timer), every IDLE_TICK_S otherwise: a dark laser needs only its
# thermal model and checks then, and input edges come by interrupt at any time.
IDLE_TICK_S = 0.02
# Light in a dark frame's exposure (the gate leaking): a reading above this, 7.5 sigma of
# the photodiode's noise floor, is reported with ! LIT <counter> (PRODUCT.md section 7).
DARK_LIGHT_MW = 1.5
BUDGET_MIN_FREE_MAX_S = 60.0  # EN 1 needs min(60 s, budget / 10) of budget free

# Strict number formats: no signs, exponents, nan or inf ever reach the firmware's maths.
_DECIMAL = re.compile(r"^[0-9]{1,4}(\.[0-9]{1,6})?$")
_UINT = re.compile(r"^[0-9]{1,8}$")
_SEQ = re.compile(r"^[0-9]{1,5}$")
_HEX4 = re.compile(r"^[0-9A-Fa-f]{4}$")
# Characters a corrupted line may show instead of the right one (printable, no terminator).
_CORRUPT_ALPHABET = [chr(c) for c in range(0x20, 0x7F)]


def crc16_ccitt(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor), the way
    the firmware computes it: bit by bit, no table."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            if crc & 0x8000:
                crc = ((crc << 1) ^ 0x1021) & 0xFFFF
            else:
                crc = (crc << 1) & 0xFFFF
    return crc


class _Reply(Exception):
    """Internal: an error reply, raised from a command handler."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def factory_for(full_scale_mw: float, max_power_mw: float, budget_s: float,
                photodiode_factor: float = PD_MW_PER_UNIT) -> FactoryCalibration:
    """The factory record a factory would measure on the simulated diode: its true
    (linear) duty -> mW curve, its photodiode's true factor, and the given limits."""
    return FactoryCalibration.build(((0.0, 0.0), (1.0, float(full_scale_mw))), photodiode_factor,
                                    max_power_mw, budget_s)


# The simulated factory sets the MCU's own budget this far above the host's
# laser.max_emission_s, so in normal use the host ends emission first and the MCU's BUDGET
# trip stays the backstop it is meant to be.
SIM_BUDGET_MARGIN_S = 1.0


def factory_from_config(cfg) -> FactoryCalibration:
    """The record the simulated factory writes at boot: the diode's true curve
    (``laser.full_scale_mw`` x duty), the photodiode's true factor, ``laser.max_power_mw``
    and ``laser.max_emission_s`` (+ SIM_BUDGET_MARGIN_S) as the budget."""
    lc = cfg.laser
    return factory_for(lc.full_scale_mw, lc.max_power_mw, lc.max_emission_s + SIM_BUDGET_MARGIN_S)


class McuEmulator:
    """The laser MCU, emulated at the byte level (an EmulatorCore for PtyLink and
    LoopbackSerial).

    ``factory`` is the record held in the MCU's flash at boot (None: a blank MCU, which
    refuses to emit until one is written with the service jumper closed). Without it, the
    emulator is given a record measuring its own diode whose ceiling is ``duty_ceiling``
    and whose budget is ``max_on_s`` (the version-1 constructor, kept for older tests).
    """

    def __init__(
        self,
        world: World,
        clock: Clock,
        *,
        full_scale_mw: float = 500.0,
        duty_ceiling: float = 0.8,
        heartbeat_timeout_ms: int = 500,
        max_on_s: float = 1800.0,
        max_temp_c: float = 65.0,
        seed: int = 0,
        factory: FactoryCalibration | None | str = "default",
    ):
        if not (math.isfinite(full_scale_mw) and full_scale_mw > 0):
            raise InvalidArgument(f"MCU emulator: full_scale_mw {full_scale_mw!r} must be > 0")
        if not (math.isfinite(duty_ceiling) and 0.0 < duty_ceiling <= 1.0):
            raise InvalidArgument(f"MCU emulator: duty_ceiling {duty_ceiling!r} outside (0, 1]")
        if not WDT_MIN_MS <= int(heartbeat_timeout_ms) <= WDT_MAX_MS:
            raise InvalidArgument(f"MCU emulator: heartbeat_timeout_ms {heartbeat_timeout_ms!r} "
                                  f"outside {WDT_MIN_MS}-{WDT_MAX_MS}")
        if not (math.isfinite(max_on_s) and max_on_s > 0):
            raise InvalidArgument(f"MCU emulator: max_on_s {max_on_s!r} must be > 0")
        if not math.isfinite(max_temp_c):
            raise InvalidArgument(f"MCU emulator: max_temp_c {max_temp_c!r} must be finite")
        self.world = world
        self.clock = clock
        self.full_scale_mw = float(full_scale_mw)  # the diode's true mW at duty 1.0
        self.max_on_s = float(max_on_s)
        self.max_temp_c = float(max_temp_c)
        self.serial_number = f"EMU{int(seed) & 0xFFFFFF:06d}"
        if factory == "default":
            factory = factory_for(full_scale_mw, duty_ceiling * full_scale_mw / OPTICAL_TRIP_FACTOR, max_on_s)
        elif factory is not None and not isinstance(factory, FactoryCalibration):
            raise InvalidArgument(f"MCU emulator: factory {factory!r} is not a FactoryCalibration")
        self._factory: FactoryCalibration | None = factory
        self._fac_stage: dict | None = None  # a record being written (FACB/FACW), until FACC
        self._rng = random.Random(seed)
        self._pd_rng = random.Random(seed + 1)  # photodiode noise, apart from line corruption
        self._lock = threading.RLock()
        # link
        self._rx = bytearray()
        self._discarding = False  # inside an over-long line, until its terminator
        self._tx = bytearray()
        # set by the serial link: called when output is queued outside feed and tick (an
        # interrupt), so it goes out at once even between idle ticks
        self.on_output = None
        self._in_tick = False
        self._cache: tuple[int, str, str] | None = None  # (seq, command text, reply text)
        # Every command line executed (not replayed), "seq text", most recent last; for
        # tests and logs.
        self.executed: collections.deque[str] = collections.deque(maxlen=512)
        # output
        now_s = clock.monotonic()
        self._boot_ns = clock.time_ns()
        self._enabled = False  # permission to emit (EN 1 accepted, no trip since)
        self._duty = 0.0  # commanded duty and the mW the host expects from it
        self._expected_mw = 0.0
        # The level in effect. Outside modulation it follows the command at once; while
        # modulating an increase waits for the next lit trigger (S15).
        self._applied_duty = 0.0
        self._applied_mw = 0.0
        self._wdt_ms = int(heartbeat_timeout_ms)
        self._last_feed_s = now_s
        self._on_since_s = now_s
        self._faults: list[str] = []
        # monitor photodiode (calibrated mW) and the S6a timers
        self._pd_live_mw = 0.0
        self._pd_held_mw = 0.0  # last lit-level sample while modulating (status shows it)
        self._pd_held_valid = False  # a lit sample taken at the level now in effect
        self._opt_since: float | None = None
        self._xmw_since: float | None = None
        # inputs, as the pin-change interrupt saw them
        inputs = world.inputs()
        self._ilk_closed = bool(inputs["interlock_closed"])
        self._key_on = bool(inputs["key"])
        self._ilk_openings = 0
        self._key_offs = 0
        # S7a: emission-permitted intervals (start_s, end_s) within the sliding window
        self._on_intervals: collections.deque[tuple[float, float]] = collections.deque()
        self._closed_on_s = 0.0  # the total length of _on_intervals, kept as they come and go
        self._permit_since: float | None = None
        # thermal model
        self._temp_c = AMBIENT_C
        self._thermal_s = now_s
        self._thermal_ns = self._boot_ns
        # frame timing
        self._ft_running = False
        self._ft_modulate = False
        self._period_ns = 0
        self._exposure_us = 0
        self._t0_ns = 0
        self._next_frame = 0  # counter of the next frame to trigger
        self._frame_count = 0  # frames triggered since the last start
        self._gate_frame = 0  # counter of the frame in progress (decides the gate)
        self._frame_lit = False  # the frame in progress was triggered lit and is still lit
        # the dark frame whose exposure the photodiode still watches: (counter, start, end ns)
        self._dark_exposure: tuple[int, int, int] | None = None
        # Safe at boot: no drive, whatever the world held before.
        self.world.set_laser_drive(0.0, self._boot_ns)
        self.world.add_listener(self._on_world)
        self._send(f"! BOOT {MODEL} {FIRMWARE_VERSION}")

    # -- EmulatorCore ------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes from the host. Complete lines are acted on at once."""
        with self._lock:
            self._in_tick = True  # the link sends what this queues right after
            try:
                self._feed_locked(data)
            finally:
                self._in_tick = False

    def _feed_locked(self, data: bytes) -> None:
        self._advance()
        for byte in bytes(data):
            if byte == 0x0A:  # LF ends a line
                if self._discarding:
                    self._discarding = False
                else:
                    self._handle_line(bytes(self._rx))
                self._rx.clear()
            elif self._discarding:
                continue
            elif len(self._rx) >= MAX_LINE_BYTES:
                # Too long for the firmware's buffer: answer once, drop the rest.
                self._rx.clear()
                self._discarding = True
                self._send("- ERR MALFORMED")
            else:
                self._rx.append(byte)

    def take_output(self) -> bytes:
        """Bytes the MCU has sent since the last call."""
        with self._lock:
            out = bytes(self._tx)
            self._tx.clear()
            return out

    def tick(self) -> None:
        """Run the time-driven behaviour: frame triggers, thermal model, safety checks."""
        with self._lock:
            self._in_tick = True
            try:
                self._advance()
            finally:
                self._in_tick = False

    def tick_interval_s(self) -> float:
        """How soon the next tick is needed (see :data:`IDLE_TICK_S`)."""
        busy = (self._enabled or self._ft_running or self._opt_since is not None
                or self._xmw_since is not None)
        return 0.001 if busy else IDLE_TICK_S

    # -- introspection for tests and the hardware process -------------------------------------
    @property
    def output_enabled(self) -> bool:
        """The MCU's laser enable (before per-frame gating)."""
        with self._lock:
            return self._enabled

    @property
    def faults(self) -> tuple[str, ...]:
        """The latched fault codes, oldest first."""
        with self._lock:
            return tuple(self._faults)

    @property
    def factory(self) -> FactoryCalibration | None:
        """The factory record in effect (None on a blank MCU)."""
        with self._lock:
            return self._factory

    @property
    def duty_ceiling(self) -> float:
        """The duty ceiling of the factory record (0 on a blank MCU: nothing allowed)."""
        with self._lock:
            return self._factory.duty_ceiling if self._factory else 0.0

    def on_time_s(self) -> float:
        """Emission-permitted seconds within the current window of 2 x budget."""
        with self._lock:
            return self._used_s(self.clock.monotonic())

    # -- output line -----------------------------------------------------------------------------
    def _send(self, text: str) -> None:
        line = f"{text}*{crc16_ccitt(text.encode('ascii')):04X}"
        p = float(self.world.faults.get("serial_corruption", 0.0) or 0.0)
        if p > 0 and self._rng.random() < p:
            i = self._rng.randrange(len(line))
            choices = [c for c in _CORRUPT_ALPHABET if c != line[i]]
            line = line[:i] + self._rng.choice(choices) + line[i + 1:]
        data = line.encode("ascii") + b"\n"
        if len(self._tx) + len(data) > TX_LIMIT_BYTES:
            return  # nobody is reading; a real UART buffer overflows the same way
        self._tx += data
        if self.on_output is not None and not self._in_tick:
            self.on_output()  # an interrupt's notice: the link sends it now, not at the next tick

    # -- input interrupt ----------------------------------------------------------------------
    def _on_world(self, kind: str, payload: dict) -> None:
        """The pin-change interrupt: every input edge, at once, whatever the tick."""
        if kind != "inputs":
            return
        with self._lock:
            # frames due before the edge first, so the record stays in time order
            self._run_frames(self.clock.time_ns())
            ilk, key = bool(payload["interlock_closed"]), bool(payload["key"])
            new: list[str] = []
            if ilk != self._ilk_closed:
                self._ilk_closed = ilk
                self._send(f"! IN ILK {int(ilk)}")
                if not ilk:
                    self._ilk_openings += 1
                    new.append("ILK")
            if key != self._key_on:
                self._key_on = key
                self._send(f"! IN KEY {int(key)}")
                if not key:
                    self._key_offs += 1
                    new.append("KEY")
            # An opening latches while the output is permitted, even if it closes again
            # before the next tick: the edge is what counts (S3a).
            if new and self._enabled:
                self._latch(new, self.clock.time_ns())

    # -- time-driven behaviour ----------------------------------------------------------------
    def _advance(self) -> None:
        now_s = self.clock.monotonic()
        now_ns = self.clock.time_ns()
        # The watchdog is the firmware's own timer interrupt: after a stall of the emulator
        # (its process frozen), a deadline that passed meanwhile acts before any late frame
        # trigger is replayed, so catching up never lights the laser again.
        if self._enabled and now_s - self._last_feed_s > self._wdt_ms / 1000.0:
            self._latch(["WDOG"], now_ns)
        # Frames first, at their exact scheduled times; then the checks at "now".
        self._run_frames(now_ns)
        self._watch_dark_exposure(now_ns)
        self._update_thermal(now_s, now_ns)
        self._sample_photodiode()
        self._check_safety(now_s, now_ns)

    def _modulating(self) -> bool:
        return self._ft_running and self._ft_modulate

    def _run_frames(self, now_ns: int) -> None:
        if not self._ft_running or now_ns < self._t0_ns:
            return
        due = (now_ns - self._t0_ns) // self._period_ns + 1  # frames whose time has come
        if due - self._next_frame > MAX_CATCHUP_FRAMES:
            skipped = due - MAX_CATCHUP_FRAMES - self._next_frame
            log.warning("MCU emulator ran late: skipping %d frame triggers", skipped)
            self._next_frame = due - MAX_CATCHUP_FRAMES
        while self._next_frame < due:
            n = self._next_frame
            t_ns = self._t0_ns + n * self._period_ns
            self._gate_frame = n
            lit = self._enabled and self._gate_open(n)
            if lit and (self._applied_duty, self._applied_mw) != (self._duty, self._expected_mw):
                # S15: the frame boundary is where a pending turn-on or increase applies.
                self._applied_duty, self._applied_mw = self._duty, self._expected_mw
                self._pd_held_valid = False
            self._watch_dark_exposure(t_ns)  # the previous frame's exposure has ended by now
            self._frame_lit = lit
            if not lit and self._ft_modulate:
                self._dark_exposure = (n, t_ns, t_ns + self._exposure_us * 1000)
            # The gate for this frame is set before the trigger, at the trigger's time, so
            # the whole frame period is lit (or dark).
            self.world.set_laser_drive(self._drive_mw(), t_ns)
            # the trigger pulse is the exposure (the IMX296 exposes for the pulse)
            self.world.trigger(n, t_ns, lit, self._exposure_us * 1000, pulse_us=self._exposure_us)
            self._send(f"! FRM {n} {'L' if lit else 'D'} {self._mcu_us(t_ns)}")
            self._next_frame = n + 1
            self._frame_count = n + 1

    def _update_thermal(self, now_s: float, now_ns: int) -> None:
        dt_s = now_s - self._thermal_s
        if dt_s < THERMAL_STEP_S:
            return
        if now_ns > self._thermal_ns:
            power_mw = self.world.laser_mean_mw(self._thermal_ns, now_ns)
        else:
            power_mw = self.world.laser_output_mw()
        steady_c = AMBIENT_C + THERMAL_RISE_C_PER_MW * power_mw
        # exact step of a first-order system over dt, so coarse ticks give the same curve
        self._temp_c = steady_c + (self._temp_c - steady_c) * math.exp(-dt_s / THERMAL_TAU_S)
        self._thermal_s = now_s
        self._thermal_ns = now_ns

    def _temp_reading_c(self) -> float:
        if self.world.faults.get("mcu_overtemp"):
            return OVERTEMP_READING_C
        return self._temp_c

    def _pdf(self) -> float:
        return self._factory.photodiode_factor if self._factory else PD_MW_PER_UNIT

    def _pd_reading_mw(self, optical_mw: float) -> float:
        """What the monitor photodiode reads for ``optical_mw`` of true output, in
        factory-calibrated mW (its gain fault and noise included)."""
        gain = float(self.world.faults.get("photodiode_gain", 1.0))
        units = optical_mw * gain / PD_MW_PER_UNIT
        units += self._pd_rng.gauss(0.0, (PD_NOISE_MW + PD_NOISE_REL * abs(optical_mw * gain)) / PD_MW_PER_UNIT)
        return max(0.0, units) * self._pdf()

    def _sample_photodiode(self) -> None:
        """One ADC sample of the monitor photodiode, in factory-calibrated mW. While
        modulating, samples taken in lit frames are held, so the reading is the lit level
        and does not flicker with the gate."""
        self._pd_live_mw = self._pd_reading_mw(self.world.laser_output_mw())
        if not self._enabled:
            self._pd_held_mw = self._pd_live_mw
            self._pd_held_valid = False
        elif self._modulating():
            if self._frame_lit:
                self._pd_held_mw = self._pd_live_mw
                self._pd_held_valid = True
        else:
            self._pd_held_mw = self._pd_live_mw
            self._pd_held_valid = True

    def _watch_dark_exposure(self, until_ns: int, *, cut_short: bool = False) -> None:
        """Light during a dark frame's exposure (a leaking gate): the host must know that the
        off frame of its pair is not dark (section 7), once per frame.

        The firmware samples the photodiode all through the exposure, whenever its main
        loop runs. This emulator's loop can run late (its process descheduled for longer
        than an exposure), so each dark exposure is judged once, when it is over, from the
        world's record of the optical output over it, never from one sample at "now".
        ``cut_short``: the frame timing stops or restarts at ``until_ns``, which ends the
        exposure there."""
        watched = self._dark_exposure
        if watched is None:
            return
        counter, start_ns, end_ns = watched
        if until_ns < end_ns and not cut_short:
            return  # still exposing
        self._dark_exposure = None
        end_ns = min(until_ns, end_ns)
        if end_ns > start_ns and self._pd_reading_mw(self.world.laser_peak_mw(start_ns, end_ns)) > DARK_LIGHT_MW:
            self._send(f"! LIT {counter}")

    def _xmw_disagrees(self) -> bool:
        reading, expected = self._pd_held_mw, self._applied_mw
        full_scale = self._factory.points[-1][1] if self._factory else 0.0
        tolerance = XMW_REL * max(reading, expected) + XMW_FS_ALLOWANCE * full_scale + XMW_FLOOR_MW
        return abs(reading - expected) > tolerance

    def _check_safety(self, now_s: float, now_ns: int) -> None:
        new: list[str] = []
        if self._enabled:
            inputs = self.world.inputs()
            # the interrupt's view, and the level now (an input changed behind the World's
            # back by a test still counts)
            if not self._ilk_closed or not inputs["interlock_closed"]:
                new.append("ILK")
            if not self._key_on or not inputs["key"]:
                new.append("KEY")
            if now_s - self._last_feed_s > self._wdt_ms / 1000.0:
                new.append("WDOG")
            if now_s - self._on_since_s >= self.max_on_s:
                new.append("MAXON")
            if self._factory is not None and self._used_s(now_s) >= self._factory.budget_s:
                new.append("BUDGET")
        # S6a optical trip on the live reading, whatever the gate.
        if self._factory is not None and self._pd_live_mw > self._factory.optical_trip_mw:
            if self._opt_since is None:
                self._opt_since = now_s
            elif now_s - self._opt_since > OPT_TRIP_S:
                new.append("OPT")
        else:
            self._opt_since = None
        # S6a expected-mW cross-check, on a reading taken at the level now in effect.
        if self._enabled and self._pd_held_valid and self._xmw_disagrees():
            if self._xmw_since is None:
                self._xmw_since = now_s
            elif now_s - self._xmw_since > XMW_TRIP_S:
                new.append("XMW")
        else:
            self._xmw_since = None
        if self._temp_reading_c() > self.max_temp_c:
            new.append("OTEMP")
        self._latch(new, now_ns)

    def _latch(self, codes: list[str], now_ns: int) -> None:
        new = []
        for code in codes:
            if code not in self._faults and code not in new:
                new.append(code)
        if not new:
            return
        for code in new:
            self._faults.append(code)
            log.warning("MCU emulator: fault %s latched", code)
            self._send(f"! FAULT {code}")
        if self._enabled:
            self._turn_off(now_ns)

    # -- S7a budget -----------------------------------------------------------------------------
    def _used_s(self, now_s: float) -> float:
        if self._factory is None:
            return 0.0
        window_start = now_s - 2.0 * self._factory.budget_s
        while self._on_intervals and self._on_intervals[0][1] <= window_start:
            start, end = self._on_intervals.popleft()
            self._closed_on_s -= end - start
        # Intervals are in time order and never overlap: only the oldest can straddle the
        # window's start. A running total keeps this cheap however many on/off cycles.
        used = self._closed_on_s
        if self._on_intervals and self._on_intervals[0][0] < window_start:
            used -= window_start - self._on_intervals[0][0]
        if self._permit_since is not None:
            used += now_s - max(self._permit_since, window_start)
        return max(0.0, used)

    def _min_free_s(self) -> float:
        return min(BUDGET_MIN_FREE_MAX_S, self._factory.budget_s / 10.0) if self._factory else 0.0

    def _wait_for_free_s(self, now_s: float) -> float:
        """Seconds until min_free of budget is free, if nothing emits meanwhile."""
        budget = self._factory.budget_s
        need = self._used_s(now_s) - (budget - self._min_free_s())
        if need <= 0:
            return 0.0
        # Used time leaves the window oldest first, at the rate the old intervals covered it.
        window_start = now_s - 2.0 * budget
        for start, end in self._on_intervals:
            start = max(start, window_start)
            span = end - start
            if span >= need:
                return start + need - window_start
            need -= span
        return 2.0 * budget

    # -- drive ---------------------------------------------------------------------------------
    def _gate_open(self, frame: int) -> bool:
        return not self._modulating() or frame % 2 == 0

    def _drive_mw(self) -> float:
        if not self._enabled:
            return 0.0
        if self._modulating():
            if self._frame_lit:
                return self._applied_duty * self.full_scale_mw
            # sim.set fault gate_leak: the per-frame gate lets this fraction through
            leak = float(self.world.faults.get("gate_leak", 0.0) or 0.0)
            return self._applied_duty * self.full_scale_mw * leak
        return self._applied_duty * self.full_scale_mw

    def _apply_drive(self, t_ns: int | None = None) -> None:
        self.world.set_laser_drive(self._drive_mw(), self.clock.time_ns() if t_ns is None else t_ns)

    def _in_lit_exposure(self, now_ns: int) -> bool:
        if not (self._ft_running and self._frame_lit):
            return False
        t_start = self._t0_ns + self._gate_frame * self._period_ns
        return t_start <= now_ns < t_start + self._exposure_us * 1000

    def _turn_off(self, now_ns: int) -> None:
        """Output off at once (command, trip or watchdog); never waits for a boundary."""
        if self._in_lit_exposure(now_ns):
            self._send(f"! CUT {self._gate_frame}")
        was = self._enabled
        self._enabled = False
        self._frame_lit = False
        self._pd_held_valid = False
        self._xmw_since = None
        if was and self._permit_since is not None:
            end = self.clock.monotonic()
            self._on_intervals.append((self._permit_since, end))
            self._closed_on_s += end - self._permit_since
        self._permit_since = None
        self._apply_drive(now_ns)

    def _set_level(self, duty: float, mw: float) -> None:
        """A new commanded level. Decreases act at once; increases too, except while
        modulating with the output on, when they wait for the next lit trigger (S15)."""
        self._duty, self._expected_mw = duty, mw
        if not self._enabled or not self._modulating():
            if (self._applied_duty, self._applied_mw) != (duty, mw):
                self._pd_held_valid = False
            self._applied_duty, self._applied_mw = duty, mw
            self._apply_drive()
            return
        if duty <= self._applied_duty:
            now_ns = self.clock.time_ns()
            if duty < self._applied_duty and self._in_lit_exposure(now_ns):
                self._send(f"! CUT {self._gate_frame}")
            if (self._applied_duty, self._applied_mw) != (duty, mw):
                self._pd_held_valid = False
            self._applied_duty, self._applied_mw = duty, mw
            self._apply_drive(now_ns)
        # else: pending until the next lit trigger (_run_frames applies it)

    def _mcu_us(self, t_ns: int) -> int:
        return (t_ns - self._boot_ns) // 1000

    def _check_expected(self, duty: float, mw: float) -> None:
        """S6a at command time: the expected mW must be one the factory table allows at
        this duty (within the same tolerance S6a grants the host's own table)."""
        fc = self._factory
        if mw > fc.optical_trip_mw:
            raise _Reply(f"ERR REFUSED LIMIT {fc.optical_trip_mw:.3f}")
        factory_mw = fc.mw_at(duty)
        if abs(mw - factory_mw) > 0.2 * factory_mw + XMW_FS_ALLOWANCE * fc.points[-1][1] + 1e-6:
            raise _Reply(f"ERR REFUSED XMW {factory_mw:.3f}")

    # -- command lines ----------------------------------------------------------------------------
    def _handle_line(self, raw: bytes) -> None:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw:
            return  # blank lines are ignored (a host may send one to resynchronise)
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            self._send("- ERR MALFORMED")
            return
        star = line.rfind("*")
        if star < 0 or not _HEX4.match(line[star + 1:]):
            self._send("- ERR MALFORMED")
            return
        body = line[:star]
        if crc16_ccitt(body.encode("ascii")) != int(line[star + 1:], 16):
            self._send("- ERR CRC")
            return
        seq_text, _, command = body.partition(" ")
        if not _SEQ.match(seq_text) or int(seq_text) > MAX_SEQ:
            self._send("- ERR MALFORMED")
            return
        seq = int(seq_text)
        if self._cache is not None and self._cache[0] == seq and self._cache[1] == command:
            # A retry of the last command: answer again, act never twice.
            self._send(f"{seq} {self._cache[2]}")
            return
        reply = self._execute(seq, command)
        self._cache = (seq, command, reply)
        self._send(f"{seq} {reply}")
        # The ADC samples continuously: a level the command just changed is seen at once,
        # not at the next tick, so the optical trip's 5 ms count from the change itself.
        self._sample_photodiode()
        self._check_safety(self.clock.monotonic(), self.clock.time_ns())

    def _execute(self, seq: int, command: str) -> str:
        parts = command.split(" ")
        if not command or any(p == "" for p in parts):
            return "ERR MALFORMED"
        name, args = parts[0], parts[1:]
        handler = self._COMMANDS.get(name)
        if handler is None:
            return "ERR UNKNOWN"
        self.executed.append(f"{seq} {command}")
        try:
            return handler(self, args)
        except _Reply as reply:
            return reply.text

    # Each handler returns the reply after the sequence number ("OK ...") or raises _Reply.
    def _cmd_id(self, args: list[str]) -> str:
        _nargs(args, 0)
        return f"OK model={MODEL} fw={FIRMWARE_VERSION} proto={PROTOCOL_VERSION} sn={self.serial_number}"

    def _cmd_duty(self, args: list[str]) -> str:
        _nargs(args, 2)
        duty, mw = _decimal(args[0]), _decimal(args[1])
        if duty > 1.0:
            raise _Reply("ERR ARG")
        if self._factory is None:
            if duty > 0.0:
                raise _Reply("ERR REFUSED NOFAC")
        else:
            if duty > self._factory.duty_ceiling + 1e-9:
                # rejected, never clamped: the duty stays what it was
                raise _Reply(f"ERR REFUSED CEILING {self._factory.duty_ceiling:.6f}")
            self._check_expected(duty, mw)
        self._set_level(duty, mw)
        return f"OK duty={self._duty:.6f} mw={self._expected_mw:.3f}"

    def _cmd_en(self, args: list[str]) -> str:
        if args == ["0"]:
            self._turn_off(self.clock.time_ns())
            return "OK out=0"
        _nargs(args, 2)
        if args[0] != "1":
            raise _Reply("ERR ARG")
        mw = _decimal(args[1])
        if self._factory is None:
            raise _Reply("ERR REFUSED NOFAC")
        if self._faults:
            raise _Reply(f"ERR REFUSED FAULT {','.join(self._faults)}")
        inputs = self.world.inputs()
        if not inputs["interlock_closed"] or not self._ilk_closed:
            raise _Reply("ERR REFUSED ILK")
        if not inputs["key"] or not self._key_on:
            raise _Reply("ERR REFUSED KEY")
        self._check_expected(self._duty, mw)
        now_s = self.clock.monotonic()
        if not self._enabled:
            wait_s = self._wait_for_free_s(now_s)
            if wait_s > 0:
                raise _Reply(f"ERR REFUSED BUDGET {math.ceil(wait_s)}")
            self._on_since_s = now_s  # MAXON: continuous on-time from the off -> on transition
            self._permit_since = now_s  # S7a: accumulates across every on period
            self._enabled = True
            self._frame_lit = False  # while modulating, light starts at the next lit trigger
            self._pd_held_valid = False
            if not self._modulating():
                self._applied_duty = self._duty
        # an accepted EN 1 feeds the watchdog (on turning on: arms it with a full timeout)
        self._last_feed_s = now_s
        self._set_level(self._duty, mw)
        return "OK out=1"

    def _cmd_hb(self, args: list[str]) -> str:
        _nargs(args, 0)
        self._last_feed_s = self.clock.monotonic()
        return "OK"

    def _cmd_wdt(self, args: list[str]) -> str:
        _nargs(args, 1)
        if not _UINT.match(args[0]) or not WDT_MIN_MS <= int(args[0]) <= WDT_MAX_MS:
            raise _Reply("ERR ARG")
        self._wdt_ms = int(args[0])
        return f"OK wdt={self._wdt_ms}"

    def _cmd_hbst(self, args: list[str]) -> str:
        """A heartbeat and a status reading in one exchange (firmware 2.1): feeds the watchdog
        exactly as HB does, then answers as ST does."""
        self._cmd_hb(args)
        return self._cmd_st(args)

    def _cmd_st(self, args: list[str]) -> str:
        _nargs(args, 0)
        inputs = self.world.inputs()
        now_s = self.clock.monotonic()
        pd_units = (self._pd_held_mw if self._modulating() and self._enabled else self._pd_live_mw) / self._pdf()
        budget = self._factory.budget_s if self._factory else 0.0
        return (
            f"OK out={int(self._enabled)} duty={self._duty:.4f} ceil={self.duty_ceiling:.6f}"
            f" ilk={int(inputs['interlock_closed'])} key={int(inputs['key'])}"
            f" temp={self._temp_reading_c():.1f} pd={pd_units:.2f}"
            f" faults={','.join(self._faults) or '-'} fc={self._frame_count}"
            f" ft={int(self._ft_running)} mod={int(self._modulating())}"
            f" wdt={self._wdt_ms} ilkc={self._ilk_openings} keyc={self._key_offs}"
            f" ont={self._used_s(now_s):.3f} bud={budget:.3f}"
        )

    def _cmd_clr(self, args: list[str]) -> str:
        _nargs(args, 0)
        inputs = self.world.inputs()
        persisting = {
            "ILK": not inputs["interlock_closed"],
            "KEY": not inputs["key"],
            "OTEMP": self._temp_reading_c() > self.max_temp_c - OTEMP_HYSTERESIS_C,
        }
        for code in self._faults:
            if persisting.get(code, False):
                # all or nothing: nothing is cleared while any latched cause persists
                raise _Reply(f"ERR REFUSED {code}")
        # BUDGET clears like the others; the used time itself is never cleared, and EN 1
        # stays refused until enough of it has left the window.
        cleared = ",".join(self._faults) or "-"
        self._faults.clear()
        return f"OK cleared={cleared}"

    def _cmd_fton(self, args: list[str]) -> str:
        _nargs(args, 3)
        period_text, exposure_text, mod_text = args
        if not _UINT.match(period_text) or not _UINT.match(exposure_text) or mod_text not in ("0", "1"):
            raise _Reply("ERR ARG")
        period_us, exposure_us = int(period_text), int(exposure_text)
        if not PERIOD_MIN_US <= period_us <= PERIOD_MAX_US or not 1 <= exposure_us < period_us:
            raise _Reply("ERR ARG")
        self._watch_dark_exposure(self.clock.time_ns(), cut_short=True)  # the last run's exposure, to now
        self._ft_running = True
        self._ft_modulate = mod_text == "1"
        self._period_ns = period_us * 1000
        self._exposure_us = exposure_us
        self._t0_ns = self.clock.time_ns()
        self._next_frame = 0
        self._frame_count = 0
        self._gate_frame = 0
        # Dark until frame 0's trigger (at t0, on the next step) decides its gate.
        self._frame_lit = False
        self._pd_held_valid = False
        self._apply_drive(self._t0_ns)
        return f"OK t0={self._mcu_us(self._t0_ns)}"

    def _cmd_ftoff(self, args: list[str]) -> str:
        _nargs(args, 0)
        self._watch_dark_exposure(self.clock.time_ns(), cut_short=True)  # an exposure in progress ends here
        self._ft_running = False
        self._ft_modulate = False
        self._frame_lit = False
        # back to continuous while enabled, at the commanded level
        self._applied_duty, self._applied_mw = self._duty, self._expected_mw
        self._pd_held_valid = False
        self._apply_drive()
        return f"OK fc={self._frame_count}"

    # -- factory record (S6a) ------------------------------------------------------------------
    def _require_jumper(self) -> None:
        if not self.world.service_jumper:
            raise _Reply("ERR REFUSED JUMPER")
        if self._enabled:
            raise _Reply("ERR REFUSED OUT")

    def _cmd_fac(self, args: list[str]) -> str:
        _nargs(args, 0)
        fc = self._factory
        if fc is None:
            raise _Reply("ERR REFUSED NOFAC")
        return (f"OK n={len(fc.points)} pdf={fc.photodiode_factor:.6f} max={fc.max_power_mw:.3f}"
                f" ceil={fc.duty_ceiling:.6f} trip={fc.optical_trip_mw:.3f} budget={fc.budget_s:.3f}")

    def _cmd_facr(self, args: list[str]) -> str:
        _nargs(args, 1)
        if self._factory is None:
            raise _Reply("ERR REFUSED NOFAC")
        if not _UINT.match(args[0]) or int(args[0]) >= len(self._factory.points):
            raise _Reply("ERR ARG")
        i = int(args[0])
        d, mw = self._factory.points[i]
        return f"OK i={i} d={d:.6f} mw={mw:.3f}"

    def _cmd_facb(self, args: list[str]) -> str:
        _nargs(args, 4)
        if not _UINT.match(args[0]) or not 2 <= int(args[0]) <= MAX_FACTORY_POINTS:
            raise _Reply("ERR ARG")
        pdf, max_mw, budget = _decimal(args[1]), _decimal(args[2]), _decimal(args[3])
        self._require_jumper()
        self._fac_stage = {"n": int(args[0]), "pdf": pdf, "max": max_mw, "budget": budget,
                           "points": [None] * int(args[0])}
        return f"OK n={int(args[0])}"

    def _cmd_facw(self, args: list[str]) -> str:
        _nargs(args, 3)
        if not _UINT.match(args[0]):
            raise _Reply("ERR ARG")
        i, d, mw = int(args[0]), _decimal(args[1]), _decimal(args[2])
        self._require_jumper()
        if self._fac_stage is None or i >= self._fac_stage["n"] or d > 1.0:
            raise _Reply("ERR ARG")
        self._fac_stage["points"][i] = (d, mw)
        return f"OK i={i}"

    def _cmd_facc(self, args: list[str]) -> str:
        _nargs(args, 0)
        self._require_jumper()
        stage, self._fac_stage = self._fac_stage, None
        if stage is None or any(p is None for p in stage["points"]):
            raise _Reply("ERR REFUSED INCOMPLETE")
        try:
            # The MCU derives the ceiling and the trip itself; nobody sends them.
            fc = FactoryCalibration.build(tuple(stage["points"]), stage["pdf"], stage["max"], stage["budget"])
        except InvalidArgument as err:
            log.warning("MCU emulator: factory record refused: %s", err)
            raise _Reply("ERR REFUSED TABLE") from None
        self._factory = fc
        log.warning("MCU emulator: new factory record written under the service jumper: %s", fc)
        return f"OK ceil={fc.duty_ceiling:.6f} trip={fc.optical_trip_mw:.3f}"

    _COMMANDS = {
        "ID": _cmd_id,
        "DUTY": _cmd_duty,
        "EN": _cmd_en,
        "HB": _cmd_hb,
        "HBST": _cmd_hbst,
        "WDT": _cmd_wdt,
        "ST": _cmd_st,
        "CLR": _cmd_clr,
        "FTON": _cmd_fton,
        "FTOFF": _cmd_ftoff,
        "FAC": _cmd_fac,
        "FACR": _cmd_facr,
        "FACB": _cmd_facb,
        "FACW": _cmd_facw,
        "FACC": _cmd_facc,
    }


def _decimal(text: str) -> float:
    if not _DECIMAL.match(text):
        raise _Reply("ERR ARG")
    return float(text)


def _nargs(args: list[str], n: int) -> None:
    if len(args) != n:
        raise _Reply("ERR ARG")
