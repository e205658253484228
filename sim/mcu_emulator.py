"""Emulator of the laser MCU firmware, speaking the protocol of docs/mcu-protocol.md.

:class:`McuEmulator` is an emulator *core* (see :mod:`sim.serial_link`): bytes in through
``feed``, bytes out through ``take_output``, time-driven behaviour in ``tick``. It behaves
the way the firmware must: output off at boot, checksum and sequence number on every line,
replies to a retried line served from a cache, heartbeat watchdog, its own maximum
on-time and duty ceiling, latched faults, a thermal model, a monitor photodiode, and the
frame timing (camera triggers with the laser gated on even frames).

It drives the diode on the :class:`~sim.world.World`; the World applies the key/interlock
series loop on its own, as the hardware does. Everything time-driven reads the clock it was
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

from hal.clock import Clock
from hal.errors import InvalidArgument
from sim.world import World

log = logging.getLogger(__name__)

MODEL = "NIRF-LMCU"
FIRMWARE_VERSION = "1.0.0"
PROTOCOL_VERSION = 1

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

# Strict number formats: no signs, exponents, nan or inf ever reach the firmware's maths.
_DECIMAL = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,6})?$")
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


class McuEmulator:
    """The laser MCU, emulated at the byte level (an EmulatorCore for PtyLink and
    LoopbackSerial)."""

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
        self.full_scale_mw = float(full_scale_mw)
        self.duty_ceiling = float(duty_ceiling)
        self.max_on_s = float(max_on_s)
        self.max_temp_c = float(max_temp_c)
        self.serial_number = f"EMU{int(seed) & 0xFFFFFF:06d}"
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        # link
        self._rx = bytearray()
        self._discarding = False  # inside an over-long line, until its terminator
        self._tx = bytearray()
        self._cache: tuple[int, str, str] | None = None  # (seq, command text, reply text)
        # Every command line executed (not replayed), "seq text", most recent last; for
        # tests and logs.
        self.executed: collections.deque[str] = collections.deque(maxlen=512)
        # output
        now_s = clock.monotonic()
        self._boot_ns = clock.time_ns()
        self._enabled = False
        self._duty = 0.0
        self._wdt_ms = int(heartbeat_timeout_ms)
        self._last_feed_s = now_s
        self._on_since_s = now_s
        self._faults: list[str] = []
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
        # Safe at boot: no drive, whatever the world held before.
        self.world.set_laser_drive(0.0, self._boot_ns)
        self._send(f"! BOOT {MODEL} {FIRMWARE_VERSION}")

    # -- EmulatorCore ------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes from the host. Complete lines are acted on at once."""
        with self._lock:
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
            self._advance()

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

    # -- time-driven behaviour ----------------------------------------------------------------
    def _advance(self) -> None:
        now_s = self.clock.monotonic()
        now_ns = self.clock.time_ns()
        # Frames first, at their exact scheduled times; then the checks at "now".
        self._run_frames(now_ns)
        self._update_thermal(now_s, now_ns)
        self._check_safety(now_s, now_ns)

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
            drive_mw = self._drive_mw()
            lit = self._enabled and self._gate_open(n)
            # The gate for this frame is set before the trigger, at the trigger's time, so
            # the whole frame period is lit (or dark).
            self.world.set_laser_drive(drive_mw, t_ns)
            self.world.trigger(n, t_ns, lit, self._exposure_us)  # the trigger pulse is the exposure
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

    def _check_safety(self, now_s: float, now_ns: int) -> None:
        new: list[str] = []
        if self._enabled:
            inputs = self.world.inputs()
            if not inputs["interlock_closed"]:
                new.append("ILK")
            if not inputs["key"]:
                new.append("KEY")
            if now_s - self._last_feed_s > self._wdt_ms / 1000.0:
                new.append("WDOG")
            if now_s - self._on_since_s >= self.max_on_s:
                new.append("MAXON")
        if self._temp_reading_c() > self.max_temp_c:
            new.append("OTEMP")
        new = [code for code in new if code not in self._faults]
        if not new:
            return
        for code in new:
            self._faults.append(code)
            log.warning("MCU emulator: fault %s latched", code)
            self._send(f"! FAULT {code}")
        if self._enabled:
            self._enabled = False
            self._apply_drive(now_ns)

    # -- drive ---------------------------------------------------------------------------------
    def _gate_open(self, frame: int) -> bool:
        return not (self._ft_running and self._ft_modulate) or frame % 2 == 0

    def _drive_mw(self) -> float:
        if not self._enabled or not self._gate_open(self._gate_frame):
            return 0.0
        return self._duty * self.full_scale_mw

    def _apply_drive(self, t_ns: int | None = None) -> None:
        self.world.set_laser_drive(self._drive_mw(), self.clock.time_ns() if t_ns is None else t_ns)

    def _mcu_us(self, t_ns: int) -> int:
        return (t_ns - self._boot_ns) // 1000

    def _photodiode_mw(self) -> float:
        if self._ft_running and self._ft_modulate:
            # The monitor is sampled during lit frames and held, so status does not
            # flicker with the frame gate.
            optical = self._duty * self.full_scale_mw if (self._enabled and self.world.enable_chain_closed()) else 0.0
        else:
            optical = self.world.laser_output_mw()
        gain = float(self.world.faults.get("photodiode_gain", 1.0))
        reading = optical * gain
        reading += self._rng.gauss(0.0, PD_NOISE_MW + PD_NOISE_REL * abs(reading))
        return max(0.0, reading)

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
        _nargs(args, 1)
        if not _DECIMAL.match(args[0]):
            raise _Reply("ERR ARG")
        duty = float(args[0])
        if duty > 1.0:
            raise _Reply("ERR ARG")
        if duty > self.duty_ceiling + 1e-9:
            # rejected, never clamped: the duty stays what it was
            raise _Reply(f"ERR REFUSED CEILING {self.duty_ceiling:.4f}")
        self._duty = duty
        self._apply_drive()
        return f"OK duty={self._duty:.4f}"

    def _cmd_en(self, args: list[str]) -> str:
        _nargs(args, 1)
        if args[0] == "0":
            self._enabled = False
            self._apply_drive()
            return "OK out=0"
        if args[0] != "1":
            raise _Reply("ERR ARG")
        if self._faults:
            raise _Reply(f"ERR REFUSED FAULT {','.join(self._faults)}")
        inputs = self.world.inputs()
        if not inputs["interlock_closed"]:
            raise _Reply("ERR REFUSED ILK")
        if not inputs["key"]:
            raise _Reply("ERR REFUSED KEY")
        now_s = self.clock.monotonic()
        if not self._enabled:
            self._on_since_s = now_s  # on-time counts from the off -> on transition
        self._last_feed_s = now_s  # enabling arms the watchdog with a full timeout
        self._enabled = True
        self._apply_drive()
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

    def _cmd_st(self, args: list[str]) -> str:
        _nargs(args, 0)
        inputs = self.world.inputs()
        return (
            f"OK out={int(self._enabled)} duty={self._duty:.4f} ceil={self.duty_ceiling:.4f}"
            f" ilk={int(inputs['interlock_closed'])} key={int(inputs['key'])}"
            f" temp={self._temp_reading_c():.1f} pd={self._photodiode_mw():.2f}"
            f" faults={','.join(self._faults) or '-'} fc={self._frame_count}"
            f" ft={int(self._ft_running)} mod={int(self._ft_running and self._ft_modulate)}"
            f" wdt={self._wdt_ms}"
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
        self._ft_running = True
        self._ft_modulate = mod_text == "1"
        self._period_ns = period_us * 1000
        self._exposure_us = exposure_us
        self._t0_ns = self.clock.time_ns()
        self._next_frame = 0
        self._frame_count = 0
        self._gate_frame = 0
        self._apply_drive(self._t0_ns)
        return f"OK t0={self._mcu_us(self._t0_ns)}"

    def _cmd_ftoff(self, args: list[str]) -> str:
        _nargs(args, 0)
        self._ft_running = False
        self._ft_modulate = False
        self._apply_drive()  # back to continuous while enabled
        return f"OK fc={self._frame_count}"

    _COMMANDS = {
        "ID": _cmd_id,
        "DUTY": _cmd_duty,
        "EN": _cmd_en,
        "HB": _cmd_hb,
        "WDT": _cmd_wdt,
        "ST": _cmd_st,
        "CLR": _cmd_clr,
        "FTON": _cmd_fton,
        "FTOFF": _cmd_ftoff,
    }


def _nargs(args: list[str], n: int) -> None:
    if len(args) != n:
        raise _Reply("ERR ARG")
