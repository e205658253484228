"""Driver for the Thorlabs FW102C (and FW212C) motorised filter wheel over its ASCII
serial protocol.

The driver is handed a factory that returns an open pyserial-like port; it never opens a
path itself. Production::

    wheel = Fw102cWheel(lambda: serial.Serial(path, 115200, timeout=0.05))

Every exchange is: write ``command`` + CR, then read up to the prompt (``"> "`` on the real
wheel; a bare ``>`` is accepted too). What came before the prompt is the echo of the
command, then the value (queries) or a vendor error line; lines may end in CR or LF (error
lines end in LF). NUL bytes are noise, not text. Fresh from power-up the wheel can answer
its first line with NULs and ``CMD_NOT_DEFINED`` instead of an echo, so ``connect`` first
sends a bare CR and throws away whatever that brings back, as Odemis's driver does. Every
wait is bounded by a deadline on the driver's clock; nothing is retried without a bound.
See docs/filter-wheel.md.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Callable

from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import (
    DeviceDisconnected,
    DeviceError,
    DeviceRejected,
    DeviceTimeout,
    InvalidArgument,
    ProtocolError,
    WheelStuck,
)
from nirf.hal.filter_wheel import FilterWheel

log = logging.getLogger(__name__)

try:  # pyserial's flush calls on a vanished tty raise termios.error, which is no OSError
    from termios import error as _TermiosError
except ImportError:  # pragma: no cover - not on Linux
    class _TermiosError(Exception):
        pass

# What a port raises when its device vanishes (serial.SerialException is an OSError).
_PORT_ERRORS = (OSError, _TermiosError)

PROMPT = b">"  # the wheel sends "> "; the space is left over and stripped with the next reply
ERROR_PREFIX = "Command error"
# A reply longer than this without a prompt is not the wheel talking.
MAX_REPLY_BYTES = 256
# How many stale replies (a late prompt from an abandoned move) may precede ours.
MAX_STALE_REPLIES = 4
# Longest a single read may block; the port's own timeout is lowered to this if larger.
READ_POLL_S = 0.05
# Pause between position checks while waiting for a move to show up in ``pos?``.
VERIFY_POLL_S = 0.1
# A position query near the end of a move still gets at least this long to answer.
MIN_QUERY_S = 0.2
# How long connect waits for the prompt after its wake-up CR.
WAKE_TIMEOUT_S = 0.5
KNOWN_MODELS = ("FW102C", "FW212C")

PortFactory = Callable[[], Any]


def _positive_seconds(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


class Fw102cWheel(FilterWheel):
    """The FW102C filter wheel on a serial port.

    ``port_factory()`` returns an open pyserial-like port (``write``, ``read``,
    ``read_until``, ``in_waiting``, ``reset_input_buffer``, ``close``, ``timeout``).
    ``timeout_s`` bounds every ordinary command; ``move_timeout_s`` is the default limit
    for a move, from the command to the verified position. Thread-safe.
    """

    def __init__(self, port_factory: PortFactory, *, clock: Clock = SystemClock(),
                 timeout_s: float = 1.0, move_timeout_s: float = 5.0):
        for name, value in (("timeout_s", timeout_s), ("move_timeout_s", move_timeout_s)):
            if not _positive_seconds(value):
                raise InvalidArgument(f"{self.device}: {name} {value!r} must be a positive number of seconds")
        self._port_factory = port_factory
        self._clock = clock
        self.timeout_s = float(timeout_s)
        self.move_timeout_s = float(move_timeout_s)
        self._lock = threading.RLock()
        self._port: Any = None
        self._rx = bytearray()
        self._identity: str | None = None
        self._count: int | None = None
        self._last_position: int | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def connect(self) -> None:
        """Open the port, check the wheel's identity and read its slot count and position."""
        with self._lock:
            if self._port is not None:
                return
            try:
                port = self._port_factory()
            except (OSError, DeviceError) as err:  # serial.SerialException is an OSError
                raise DeviceDisconnected(self.device, f"cannot open the wheel's port: {err}") from err
            self._port = port
            self._rx.clear()
            try:
                # A blocking port would make our deadlines meaningless.
                if port.timeout is None or port.timeout > READ_POLL_S:
                    port.timeout = READ_POLL_S
                self._wake(port)
                identity = self._query("*idn?")
                if not any(model in identity.upper() for model in KNOWN_MODELS):
                    raise ProtocolError(self.device, f"*idn? answered {identity!r}, expected one of "
                                                     f"{', '.join(KNOWN_MODELS)}")
                count = self._query_int("pcount?")
                if not 2 <= count <= 12:
                    raise ProtocolError(self.device, f"pcount? answered {count}, expected 2 to 12")
                self._identity, self._count = identity, count
                self._query_int("pos?")
            except BaseException:
                self._drop_port()
                raise
            log.info("%s: %s, %d positions, at %s", self.device, identity, count, self._last_position)

    def _wake(self, port: Any) -> None:
        """Send a bare CR and discard the answer: after power-up the first line can come back
        as NUL bytes and CMD_NOT_DEFINED, and any half-typed line is ended. A wheel that
        says nothing here is left to the identity query to report."""
        self._io(port.reset_input_buffer)
        self._rx.clear()
        self._io(port.write, b"\r")
        deadline = self._clock.monotonic() + WAKE_TIMEOUT_S
        try:
            heard = self._read_reply(port, "(wake-up)", deadline, WAKE_TIMEOUT_S)
            if heard:
                log.info("%s: discarded %r after the wake-up CR", self.device, heard)
        except (DeviceTimeout, ProtocolError) as err:
            log.debug("%s: wake-up CR: %s", self.device, err)
        self._rx.clear()

    def close(self) -> None:
        """Close the port. The wheel stays where it is."""
        with self._lock:
            self._drop_port()

    def _drop_port(self) -> None:
        port, self._port = self._port, None
        self._rx.clear()
        if port is not None:
            try:
                port.close()
            except OSError as err:
                log.warning("%s: closing the port failed: %s", self.device, err)

    @property
    def connected(self) -> bool:
        """True between a successful ``connect`` and ``close`` (or a vanished port)."""
        return self._port is not None

    # -- FilterWheel -----------------------------------------------------------------------
    def identity(self) -> str:
        """The wheel's ``*idn?`` answer, read at connect."""
        with self._lock:
            self._require_port()
            return str(self._identity)

    def position_count(self) -> int:
        """The number of slots the wheel reported at connect (6 for the FW102C)."""
        with self._lock:
            self._require_port()
            return int(self._count)  # type: ignore[arg-type]

    def position(self) -> int:
        """The position the wheel reports now (asks it)."""
        with self._lock:
            return self._query_int("pos?")

    @property
    def last_known_position(self) -> int | None:
        """The last position the wheel reported, without asking it (None before any)."""
        return self._last_position

    def move(self, position: int, timeout_s: float | None = None) -> int:
        """Move to ``position`` (1..count) and return it once ``pos?`` confirms it.

        ``timeout_s`` defaults to the constructor's ``move_timeout_s``. Raises
        ``InvalidArgument`` for a position outside the wheel, ``WheelStuck`` when the wheel
        does not finish or does not report the position in time.
        """
        limit_s = self.move_timeout_s if timeout_s is None else timeout_s
        if not _positive_seconds(limit_s):
            raise InvalidArgument(f"{self.device}: move timeout {timeout_s!r} must be a positive "
                                  f"number of seconds")
        return super().move(position, float(limit_s))

    def _do_move(self, position: int, timeout_s: float) -> int:
        with self._lock:
            deadline = self._clock.monotonic() + timeout_s
            try:
                # The wheel returns its prompt when the move is over (or at once, on
                # firmware that does not wait): either way the check below decides.
                self._exchange(f"pos={position}", timeout_s)
            except DeviceTimeout as err:
                raise self._stuck(position, timeout_s, "did not finish moving") from err
            while True:
                remaining_s = deadline - self._clock.monotonic()
                try:
                    reported = self._query_int("pos?", max(min(self.timeout_s, remaining_s), MIN_QUERY_S))
                except DeviceTimeout as err:
                    raise self._stuck(position, timeout_s, "stopped answering") from err
                if reported == position:
                    log.debug("%s: at position %d", self.device, position)
                    return position
                if self._clock.monotonic() >= deadline:
                    raise self._stuck(position, timeout_s, f"reports position {reported}")
                self._clock.sleep(VERIFY_POLL_S)

    def _stuck(self, position: int, timeout_s: float, what: str) -> WheelStuck:
        last = "unknown" if self._last_position is None else str(self._last_position)
        return WheelStuck(self.device, f"{what}: requested position {position} not reached within "
                                       f"{timeout_s:g} s (last known position {last})")

    # -- speed -----------------------------------------------------------------------------
    def high_speed(self) -> bool:
        """True when the wheel is set to its fast move profile (``speed?`` = 1)."""
        with self._lock:
            return self._query_int("speed?") == 1

    def set_high_speed(self, enabled: bool) -> None:
        """Select the fast (True) or slow (False) move profile."""
        with self._lock:
            self._exchange(f"speed={1 if enabled else 0}", self.timeout_s)

    # -- exchanges -------------------------------------------------------------------------
    def _require_port(self) -> Any:
        if self._port is None:
            raise DeviceDisconnected(self.device, "not connected (call connect())")
        return self._port

    def _query(self, command: str, timeout_s: float | None = None) -> str:
        values = self._exchange(command, self.timeout_s if timeout_s is None else timeout_s)
        if len(values) != 1:
            raise ProtocolError(self.device, f"{command} answered {values!r}, expected one value")
        return values[0]

    def _query_int(self, command: str, timeout_s: float | None = None) -> int:
        text = self._query(command, timeout_s)
        try:
            value = int(text)
        except ValueError as err:
            raise ProtocolError(self.device, f"{command} answered {text!r}, expected a whole number") from err
        if command == "pos?":
            self._last_position = value
        return value

    def _exchange(self, command: str, timeout_s: float) -> list[str]:
        """Send ``command`` and return the lines between its echo and the prompt, with
        vendor errors turned into the project's errors."""
        port = self._require_port()
        deadline = self._clock.monotonic() + timeout_s
        self._io(port.reset_input_buffer)
        self._rx.clear()
        self._io(port.write, command.encode("ascii") + b"\r")
        resent = False
        for _ in range(MAX_STALE_REPLIES + 1):
            lines = self._read_reply(port, command, deadline, timeout_s)
            if command in lines:
                values = lines[lines.index(command) + 1:]
                self._raise_vendor_error(command, values)
                return values
            if not resent and any(line.startswith(ERROR_PREFIX) for line in lines):
                # An error with no echo is a line the wheel did not read (garbled just after
                # a power-up): it did nothing, so sending the command once more is safe.
                resent = True
                log.warning("%s: %r answered %r without an echo; sending it again",
                            self.device, command, lines)
                self._io(port.write, command.encode("ascii") + b"\r")
                continue
            # A prompt without our echo belongs to an earlier command (a move we gave up
            # waiting for); ours follows it.
            log.debug("%s: skipped stale reply %r before %s", self.device, lines, command)
        raise ProtocolError(self.device, f"no echo of {command!r} in {MAX_STALE_REPLIES + 1} replies")

    def _read_reply(self, port: Any, command: str, deadline: float, timeout_s: float) -> list[str]:
        """Read up to the next prompt; return the non-empty lines before it."""
        while True:
            end = self._rx.find(PROMPT)
            if end >= 0:
                chunk = bytes(self._rx[:end])
                del self._rx[:end + 1]
                # NULs are line noise (power-up); LF ends error lines, CR the others.
                text = chunk.replace(b"\x00", b"").decode("ascii", errors="replace")
                text = text.replace("\n", "\r")
                return [line.strip() for line in text.split("\r") if line.strip()]
            if len(self._rx) > MAX_REPLY_BYTES:
                raise ProtocolError(self.device, f"{command}: {len(self._rx)} bytes without a prompt "
                                                 f"(limit {MAX_REPLY_BYTES})")
            started = self._clock.monotonic()
            if started >= deadline:
                heard = bytes(self._rx)
                raise DeviceTimeout(self.device, f"no prompt after {command!r} within {timeout_s:g} s"
                                                 f" (heard {heard!r})")
            data = self._io(port.read_until, PROMPT, MAX_REPLY_BYTES)
            self._rx += data
            if not data:
                # A port that returns at once (or a clock that does not move while it
                # waits) must not turn this into a busy loop.
                waited_s = self._clock.monotonic() - started
                if waited_s < READ_POLL_S / 2:
                    self._clock.sleep(READ_POLL_S - waited_s)

    def _io(self, call: Callable, *args: Any) -> Any:
        try:
            return call(*args)
        except _PORT_ERRORS as err:
            name = getattr(self._port, "port", None) or "port"
            self._drop_port()
            raise DeviceDisconnected(self.device, f"{name} failed ({err}); the wheel's port is gone") from err

    def _raise_vendor_error(self, command: str, values: list[str]) -> None:
        for value in values:
            if not value.startswith(ERROR_PREFIX):
                continue
            code = value[len(ERROR_PREFIX):].strip()
            if code == "CMD_ARG_INVALID":
                limit = f"1-{self._count}" if command.startswith("pos=") and self._count else "its range"
                raise InvalidArgument(f"{self.device}: the wheel refused {command!r} "
                                      f"(argument outside {limit})")
            raise DeviceRejected(self.device, f"the wheel refused {command!r}: {code or value}")

