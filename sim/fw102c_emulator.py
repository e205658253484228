"""Byte-level emulator of the Thorlabs FW102C motorised filter wheel.

It speaks the wheel's ASCII protocol as the vendor documents it and as public drivers
observe it, and moves the world's filter over time. It is an emulator *core* (see
:mod:`nirf.sim.serial_link`): no I/O of its own, only ``feed``, ``take_output`` and ``tick``.

Protocol as modelled here
-------------------------
* The host sends a line ending in CR. LF bytes are ignored, so ``pos?\\r\\n`` works too;
  a line ending only in LF is not a command yet.
* The wheel answers with the echo of the line and a CR, then the value and a CR (queries
  only), then the prompt ``"> "`` (a greater-than sign and a space, no CR after it), as
  Odemis's driver (``tlfw.py``) waits for and its simulator sends.
* Errors replace the value and end in LF, then CR (``Command error CMD_ARG_INVALID\n\r> ``):
  python-microscope's driver notes that error messages use LF, Odemis's simulator sends
  exactly this. ``Command error CMD_NOT_DEFINED`` for anything it does not
  know (unknown keyword, upper case, a query of a set-only keyword, non-ASCII bytes, a
  line longer than :data:`MAX_LINE_BYTES`) and ``Command error CMD_ARG_INVALID`` for a
  known keyword with a bad argument (not a plain decimal number, or out of range).
* An empty line (a bare CR) gives just a new prompt.
* Keywords: ``*idn?``, ``pos=N``/``pos?``, ``pcount=6|12``/``pcount?``,
  ``speed=0|1``/``speed?``, ``trig=0|1``/``trig?``, ``sensors=0|1``/``sensors?``,
  ``baud=0|1``/``baud?`` and ``save``. Settings other than the position, the count and
  the speed are stored and reported but change nothing (the line rate does not change).

Variants (``sim.set wheel``, read from ``world.wheel`` for every line)
----------------------------------------------------------------------
* ``prompt_space`` (default True): False sends a bare ``>`` prompt, as older notes have it.
* ``lf_errors`` (default True): False ends error lines in CR like the other lines.
* ``powerup_garbage`` (default False): the first line after power-up (the emulator's start,
  or setting the variant to True, which stands for a power cycle) is not understood: the
  wheel answers a few NUL bytes and ``Command error CMD_NOT_DEFINED`` without an echo,
  then the prompt (Odemis's ``tlfw.py``: "can have some \x00 bytes at the beginning +
  CMD_NOT_DEFINED"; it sends a bare CR first and discards what comes back).

Moves (choices made here; document any change in docs/filter-wheel.md)
----------------------------------------------------------------------
* ``pos=N`` is echoed at once; the prompt follows only when the move is over. That is
  what the vendor's terminal-style interface suggests (one command at a time, the prompt
  meaning "ready"), and a driver that waits for the prompt and then checks ``pos?`` works
  whether or not the real firmware does the same.
* Lines that arrive during a move wait in the input buffer and are handled, in order,
  after the prompt (the firmware is busy turning the wheel).
* The wheel turns the shortest way round; on a tie (half a turn) it turns towards higher
  numbers. Each step takes ``step_s`` at speed 0 (the vendor's "slow", the emulator's
  power-up setting and the cart's normal speed) and ``step_s * HIGH_SPEED_FACTOR`` at
  speed 1.
* Mid-move the world is told, with ``moving=True``, the last slot the wheel has fully
  reached (it starts at the slot it left); at the end it is told the target with
  ``moving=False``. Nothing is "in" the optical path while ``moving`` is true.
* ``world.faults["wheel_stuck"]`` true: the wheel does not advance (a move that starts
  then goes nowhere; a move under way stops at the slot it last reached). The motor keeps
  trying for ``stall_give_up_s``; then the firmware gives up: the world is told the slot
  where the wheel stands with ``moving=False`` and the prompt comes back, so ``pos?``
  then reports the old position, not the one requested. With ``stall_give_up_s=None``
  it never gives up and stays silent until the fault is cleared, then finishes the move.
  A ``pos=N`` to the slot the wheel already stands at is done at once, stuck or not.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

from nirf.hal.clock import Clock
from nirf.sim.world import World

log = logging.getLogger(__name__)

CR = b"\r"
LF = b"\n"
PROMPT = b"> "  # the real wheel's prompt; b">" with the prompt_space variant off
POWERUP_NULS = 3
IDN = "THORLABS FW102C/FW212C Filter Wheel version 1.07"
ERR_NOT_DEFINED = "Command error CMD_NOT_DEFINED"
ERR_ARG_INVALID = "Command error CMD_ARG_INVALID"

# The firmware's command buffer is small; longer lines are refused whole.
MAX_LINE_BYTES = 32
# Bytes beyond this, queued during a move, are dropped (a full UART FIFO).
MAX_INPUT_BYTES = 1024
# Steps at speed 1 take this fraction of a step at speed 0.
HIGH_SPEED_FACTOR = 0.5
VALID_COUNTS = (6, 12)

_NUMBER = re.compile(r"[0-9]{1,3}")


@dataclass
class _Move:
    """A move in progress."""

    target: int
    direction: int  # +1 towards higher numbers, -1 towards lower
    steps_left: int
    step_time_s: float
    step_progress_s: float = 0.0  # time spent on the current step
    stalled_s: float = 0.0  # time in a row the wheel has been held back by a jam


class Fw102cEmulator:
    """The FW102C as an emulator core: protocol, move timing and the stuck-wheel fault.

    ``positions`` is the wheel's slot count (6 for the FW102C, 12 for the FW212C);
    ``step_s`` is the time of one slot-to-slot step at speed 0; ``stall_give_up_s`` is how
    long a jammed wheel keeps trying before it returns its prompt (None: forever).
    """

    def __init__(self, world: World, clock: Clock, *, positions: int = 6, step_s: float = 0.3,
                 stall_give_up_s: float | None = 2.0):
        if positions not in VALID_COUNTS:
            raise ValueError(f"fw102c emulator: positions {positions} is not one of {VALID_COUNTS}")
        if not step_s >= 0.0:
            raise ValueError(f"fw102c emulator: step_s {step_s} must be 0 or more")
        if stall_give_up_s is not None and not stall_give_up_s >= 0.0:
            raise ValueError(f"fw102c emulator: stall_give_up_s {stall_give_up_s} must be 0 or more")
        self.world = world
        self.clock = clock
        self.step_s = float(step_s)
        self.stall_give_up_s = stall_give_up_s
        self._lock = threading.RLock()
        self._in = bytearray()
        self._out = bytearray()
        self.pcount = positions
        self.speed = 0
        self.trig = 0
        self.sensors = 0
        self.baud = 1
        start = world.filter_position
        self.position = start if 1 <= start <= positions else 1
        self._move: _Move | None = None
        self._last_tick_s = clock.monotonic()
        # Power-up garbage is due on the first line after each (simulated) power-up.
        self._power_cycles_seen = -1 if self._variant("powerup_garbage") else self._power_cycles()
        world.set_filter(self.position, moving=False)

    # -- variants --------------------------------------------------------------------------
    def _variant(self, name: str) -> bool:
        defaults = {"prompt_space": True, "lf_errors": True, "powerup_garbage": False}
        return bool(getattr(self.world, "wheel", {}).get(name, defaults[name]))

    def _power_cycles(self) -> int:
        return int(getattr(self.world, "wheel_power_cycles", 0))

    @property
    def prompt(self) -> bytes:
        """The prompt the wheel sends now (``"> "``, or ``">"`` with the variant off)."""
        return PROMPT if self._variant("prompt_space") else b">"

    # -- EmulatorCore ---------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes from the host. Complete lines are handled at once unless a move is under
        way; then they wait for its end."""
        with self._lock:
            self._in += bytes(data)
            self._advance()
            self._handle_lines()
            self._bound_input()

    def take_output(self) -> bytes:
        """Bytes the wheel has sent since the last call."""
        with self._lock:
            out = bytes(self._out)
            self._out.clear()
            return out

    def tick(self) -> None:
        """Let the wheel turn according to the clock, then handle waiting lines."""
        with self._lock:
            self._advance()
            self._handle_lines()

    # -- state -----------------------------------------------------------------------------
    @property
    def moving(self) -> bool:
        """True while a move (or a jammed attempt at one) is under way."""
        with self._lock:
            return self._move is not None

    def step_time_s(self) -> float:
        """The time of one step at the current speed setting."""
        return self.step_s * (HIGH_SPEED_FACTOR if self.speed == 1 else 1.0)

    # -- lines -----------------------------------------------------------------------------
    def _bound_input(self) -> None:
        # An unfinished line longer than the firmware's buffer is refused whole when its CR
        # comes, so only its start need be kept; that also leaves room for the CR.
        last_cr = self._in.rfind(CR)
        tail_start = last_cr + 1
        tail_limit = tail_start + MAX_LINE_BYTES + 1
        if len(self._in) > tail_limit:
            del self._in[tail_limit:]
        if len(self._in) > MAX_INPUT_BYTES:
            # lines queued during a move: a full FIFO loses the newest bytes
            log.debug("fw102c emulator: input buffer full, %d bytes dropped", len(self._in) - MAX_INPUT_BYTES)
            del self._in[MAX_INPUT_BYTES:]

    def _handle_lines(self) -> None:
        while self._move is None:
            cr = self._in.find(CR)
            if cr < 0:
                return
            raw = bytes(self._in[:cr])
            del self._in[:cr + 1]
            self._handle_line(raw.replace(b"\n", b""))

    def _send(self, text: bytes) -> None:
        self._out += text

    def _handle_line(self, raw: bytes) -> None:
        if self._variant("powerup_garbage") and self._power_cycles_seen != self._power_cycles():
            # Fresh from power-up the wheel garbles its first line: NULs, an error, no echo.
            self._power_cycles_seen = self._power_cycles()
            self._send(b"\x00" * POWERUP_NULS)
            self._reply(ERR_NOT_DEFINED)
            return
        # The firmware echoes what it received, as a terminal would.
        self._send(raw + CR)
        if len(raw) > MAX_LINE_BYTES:
            self._reply(ERR_NOT_DEFINED)
            return
        try:
            line = raw.decode("ascii").strip(" ")
        except UnicodeDecodeError:
            self._reply(ERR_NOT_DEFINED)
            return
        if not line:
            self._send(self.prompt)
            return
        if line.endswith("?"):
            self._query(line[:-1])
        elif "=" in line:
            keyword, _, argument = line.partition("=")
            self._set(keyword, argument)
        elif line == "save":
            self._send(self.prompt)
        else:
            self._reply(ERR_NOT_DEFINED)

    def _reply(self, value: str) -> None:
        end = LF + CR if value.startswith("Command error") and self._variant("lf_errors") else CR
        self._send(value.encode("ascii") + end + self.prompt)

    def _query(self, keyword: str) -> None:
        values = {
            "*idn": IDN,
            "pos": str(self.position),
            "pcount": str(self.pcount),
            "speed": str(self.speed),
            "trig": str(self.trig),
            "sensors": str(self.sensors),
            "baud": str(self.baud),
        }
        self._reply(values.get(keyword, ERR_NOT_DEFINED))

    def _set(self, keyword: str, argument: str) -> None:
        allowed = {
            "pos": range(1, self.pcount + 1),
            "pcount": VALID_COUNTS,
            "speed": (0, 1),
            "trig": (0, 1),
            "sensors": (0, 1),
            "baud": (0, 1),
        }
        if keyword not in allowed:
            self._reply(ERR_NOT_DEFINED)
            return
        if not _NUMBER.fullmatch(argument) or int(argument) not in allowed[keyword]:
            self._reply(ERR_ARG_INVALID)
            return
        value = int(argument)
        if keyword == "pos":
            self._start_move(value)
            return
        if keyword == "pcount":
            self.pcount = value
            if self.position > value:
                self.position = 1
                self.world.set_filter(self.position, moving=False)
        else:
            setattr(self, keyword, value)
        self._send(self.prompt)

    # -- moves -----------------------------------------------------------------------------
    def _start_move(self, target: int) -> None:
        forward = (target - self.position) % self.pcount
        backward = (self.position - target) % self.pcount
        if forward == 0:
            self._send(self.prompt)
            return
        direction, steps = (1, forward) if forward <= backward else (-1, backward)
        self._move = _Move(target, direction, steps, self.step_time_s())
        self._last_tick_s = self.clock.monotonic()
        log.debug("fw102c emulator: moving %d -> %d, %d steps", self.position, target, steps)
        self.world.set_filter(self.position, moving=True)

    def _advance(self) -> None:
        now = self.clock.monotonic()
        dt = max(0.0, now - self._last_tick_s)
        self._last_tick_s = now
        move = self._move
        if move is None:
            return
        if self.world.faults.get("wheel_stuck"):
            move.stalled_s += dt
            if self.stall_give_up_s is not None and move.stalled_s >= self.stall_give_up_s:
                log.debug("fw102c emulator: jammed at %d, giving up on %d", self.position, move.target)
                self._finish()
            return
        move.stalled_s = 0.0
        move.step_progress_s += dt
        while move.steps_left > 0 and move.step_progress_s >= move.step_time_s:
            move.step_progress_s -= move.step_time_s
            move.steps_left -= 1
            self.position = (self.position - 1 + move.direction) % self.pcount + 1
            if move.steps_left > 0:
                self.world.set_filter(self.position, moving=True)
        if move.steps_left == 0:
            self._finish()

    def _finish(self) -> None:
        self._move = None
        self.world.set_filter(self.position, moving=False)
        self._send(self.prompt)
