"""The laser source over the project's own MCU serial protocol (docs/mcu-protocol.md).

:class:`McuLaser` is handed a ``port_factory`` that returns an open pyserial-like port; it
never opens a device by path itself and never touches the modem-control lines. Every
command carries a sequence number and a CRC-16/CCITT checksum; a missing or corrupted reply
is retried with the identical line (the MCU answers a retry from its cache and never acts
twice), a bounded number of times. Frame notices and fault notices that the MCU sends on
its own are queued for :meth:`McuLaser.poll`.

One lock serialises every exchange: the supervisor thread and the camera thread share the
driver.
"""

from __future__ import annotations

import binascii
import collections
import logging
import math
import random
import select
import threading
from typing import Any, Callable

from serial import SerialException

from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import (
    DeviceDisconnected,
    DeviceError,
    DeviceRejected,
    DeviceTimeout,
    InvalidArgument,
    ProtocolError,
)
from nirf.hal.laser import FactoryCalibration, FrameTag, LaserSource, LaserStatus, McuNotice, trigger_period_us
from nirf.hal.threads import WakeSignal

log = logging.getLogger(__name__)

MAX_SEQ = 65535
MAX_LINE_BYTES = 512  # a line longer than this without a terminator is garbage
READ_SLICE_S = 0.05  # the port's read timeout: how long one read may block
FRAME_QUEUE_LEN = 4096  # > 60 s of frame notices at 60 fps
NOTICE_QUEUE_LEN = 256
# Errors a port raises when it vanishes. pyserial's SerialException is an OSError too.
_PORT_ERRORS = (SerialException, OSError)
# "- ERR <code>" and "<seq> ERR <code>" codes that mean the command line was damaged on its
# way to the MCU: resending the identical line is the cure.
_RESEND_CODES = ("CRC", "MALFORMED")
_STATUS_KEYS = ("out", "duty", "ceil", "ilk", "key", "temp", "pd", "faults", "fc", "ft", "mod",
                "ilkc", "keyc", "ont", "bud")
_FACTORY_KEYS = ("n", "pdf", "max", "ceil", "trip", "budget")


def crc16_ccitt(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF), as the protocol specifies."""
    return binascii.crc_hqx(data, 0xFFFF)


def frame_line(body: str) -> bytes:
    """``body`` with its checksum and terminator, ready to send."""
    return f"{body}*{crc16_ccitt(body.encode('ascii')):04X}\n".encode("ascii")


def check_line(raw: bytes) -> str | None:
    """The body of a received line if its checksum is right, else None."""
    raw = raw.rstrip(b"\r\n")
    star = raw.rfind(b"*")
    if star < 0 or len(raw) - star - 1 != 4:
        return None
    try:
        body = raw[:star].decode("ascii")
        crc = int(raw[star + 1:].decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        return None
    if crc16_ccitt(raw[:star]) != crc:
        return None
    return body


class McuLaser(LaserSource):
    """The laser MCU driver.

    ``port_factory()`` returns an OPEN pyserial-like port (in production
    ``lambda: serial.Serial(path, 115200, timeout=0.05)``). ``timeout_s`` is the wait for
    each reply, ``retries`` the number of resends after the first attempt,
    ``heartbeat_timeout_ms`` the MCU watchdog timeout set at connect (100-1000 ms).
    """

    def __init__(
        self,
        port_factory: Callable[[], Any],
        *,
        clock: Clock | None = None,
        timeout_s: float = 0.2,
        retries: int = 3,
        heartbeat_timeout_ms: int = 500,
    ):
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and 0.0 < timeout_s <= 10.0):
            raise InvalidArgument(f"laser-mcu: timeout_s {timeout_s!r} outside (0, 10] s")
        if not (isinstance(retries, int) and 0 <= retries <= 10):
            raise InvalidArgument(f"laser-mcu: retries {retries!r} outside 0-10")
        if not (isinstance(heartbeat_timeout_ms, int) and 100 <= heartbeat_timeout_ms <= 1000):
            raise InvalidArgument(f"laser-mcu: heartbeat_timeout_ms {heartbeat_timeout_ms!r} outside 100-1000")
        self._port_factory = port_factory
        self.clock: Clock = clock or SystemClock()
        self.timeout_s = float(timeout_s)
        self.retries = retries
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self._lock = threading.RLock()
        self._port: Any = None
        self._wanted = False  # connect() succeeded once and close() was not called since
        # Start at a random sequence number, so a restarted host is unlikely to repeat the
        # (seq, command) the MCU holds in its retry cache from the previous session.
        self._seq = random.SystemRandom().randrange(MAX_SEQ + 1)
        self._hbst_known: bool | None = None  # whether the MCU answers HBST (None: not asked yet)
        self._rx = bytearray()
        self._frames: collections.deque[FrameTag] = collections.deque(maxlen=FRAME_QUEUE_LEN)
        self._notices: collections.deque[McuNotice] = collections.deque(maxlen=NOTICE_QUEUE_LEN)
        self._identity = ""
        self._factory: FactoryCalibration | None = None
        self._factory_error = "not connected"
        # counters for telemetry and tests
        self.corrupt_lines = 0  # received lines that failed their checksum or parse
        self.resends = 0  # command lines sent again
        self.stale_replies = 0  # replies to an earlier attempt or command, ignored
        self.dropped_notices = 0  # queued notices lost because poll() was not called
        # wait_input(): woken by the port's descriptor, or by this pipe when a command's
        # exchange took in (and queued) lines the MCU sent on its own
        self._wake: WakeSignal | None = None  # made at the first wait_input()
        self._queued_unseen = False

    # -- lifecycle --------------------------------------------------------------------------
    def connect(self) -> None:
        """Open the port; the first act forces the output off, then identity and watchdog.
        Raises DeviceDisconnected when the port cannot be opened, DeviceTimeout or
        ProtocolError when the MCU does not answer properly."""
        with self._lock:
            self._drop_port()
            self._open_and_handshake()
            self._wanted = True

    def reconnect(self, attempts: int = 3, backoff_s: float = 0.1) -> None:
        """Open a new port through the factory and force the output off first; at most
        ``attempts`` tries, ``backoff_s`` apart. Raises DeviceDisconnected when all fail."""
        if not 1 <= attempts <= 10:
            raise InvalidArgument(f"laser-mcu: reconnect attempts {attempts!r} outside 1-10")
        with self._lock:
            last: Exception | None = None
            for attempt in range(1, attempts + 1):
                self._drop_port()
                try:
                    self._open_and_handshake()
                except DeviceError as err:
                    last = err
                    log.warning("laser-mcu: reconnect attempt %d/%d failed: %s", attempt, attempts, err)
                    if attempt < attempts:
                        self.clock.sleep(backoff_s)
                    continue
                self._wanted = True
                log.info("laser-mcu: reconnected (attempt %d), output forced off", attempt)
                return
            raise DeviceDisconnected(self.device, f"reconnect failed after {attempts} attempts: {last}") from last

    def close(self) -> None:
        """Force the output off (best effort) and release the port."""
        with self._lock:
            if self._port is not None:
                self._do_force_off()
            self._wanted = False
            self._drop_port()

    def identity(self) -> str:
        """The MCU's identity (``model=... fw=... proto=... sn=...``)."""
        with self._lock:
            self._identity = self._command("ID")
            return self._identity

    # -- LaserSource ------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Feed the MCU's watchdog (S5)."""
        self._command("HB")

    def set_watchdog_timeout(self, timeout_ms: int) -> None:
        """Change the MCU's watchdog timeout (100-1000 ms)."""
        if not (isinstance(timeout_ms, int) and 100 <= timeout_ms <= 1000):
            raise InvalidArgument(f"laser-mcu: watchdog timeout {timeout_ms!r} ms outside 100-1000")
        self._command(f"WDT {timeout_ms}")
        self.heartbeat_timeout_ms = timeout_ms

    def heartbeat_status(self) -> LaserStatus:
        """Feed the watchdog and read the status in one exchange (``HBST``, firmware 2.1).
        An MCU that does not know the command (``ERR UNKNOWN``, older firmware) is asked with
        ``HB`` and ``ST`` from then on."""
        if self._hbst_known is not False:
            try:
                status = self._parse_status(self._command("HBST"))
            except DeviceRejected as err:
                if "does not know this command" not in str(err):
                    raise
                log.warning("laser-mcu: the MCU does not know HBST; heartbeat and status go separately")
                self._hbst_known = False
            else:
                self._hbst_known = True
                return status
        return super().heartbeat_status()

    def status(self) -> LaserStatus:
        """One status reading (``ST``)."""
        return self._parse_status(self._command("ST"))

    def _parse_status(self, payload: str) -> LaserStatus:
        fields = dict(tok.partition("=")[::2] for tok in payload.split(" ") if "=" in tok)
        missing = [k for k in _STATUS_KEYS if k not in fields]
        if missing:
            raise ProtocolError(self.device, f"status reply lacks {', '.join(missing)}: {payload!r}")
        try:
            faults = () if fields["faults"] == "-" else tuple(fields["faults"].split(","))
            return LaserStatus(
                output_on=fields["out"] == "1",
                duty=float(fields["duty"]),
                interlock_closed=fields["ilk"] == "1",
                key_on=fields["key"] == "1",
                temp_c=float(fields["temp"]),
                photodiode_mw=float(fields["pd"]),
                faults=faults,
                frame_counter=int(fields["fc"]),
                frame_timing=fields["ft"] == "1",
                modulation=fields["mod"] == "1",
                duty_ceiling=float(fields["ceil"]),
                interlock_openings=int(fields["ilkc"]),
                key_offs=int(fields["keyc"]),
                on_time_s=float(fields["ont"]),
                budget_s=float(fields["bud"]),
            )
        except ValueError as err:
            raise ProtocolError(self.device, f"status reply has a bad value: {payload!r}") from err

    def factory(self) -> FactoryCalibration:
        """The MCU's factory record as read at connect (DeviceError when the MCU has none
        or it could not be read)."""
        with self._lock:
            if self._factory is None:
                raise DeviceError(self.device, f"no factory record: {self._factory_error}")
            return self._factory

    def read_factory(self) -> FactoryCalibration:
        """Read the factory record from the MCU now (``FAC`` then ``FACR`` per point) and
        cache it."""
        with self._lock:
            try:
                payload = self._command("FAC")
            except DeviceRejected as err:
                self._factory, self._factory_error = None, str(err)
                raise
            fields = dict(tok.partition("=")[::2] for tok in payload.split(" ") if "=" in tok)
            missing = [k for k in _FACTORY_KEYS if k not in fields]
            if missing:
                raise ProtocolError(self.device, f"factory reply lacks {', '.join(missing)}: {payload!r}")
            try:
                n = int(fields["n"])
                points = []
                for i in range(n):
                    pf = dict(tok.partition("=")[::2] for tok in self._command(f"FACR {i}").split(" ") if "=" in tok)
                    if int(pf.get("i", -1)) != i:
                        raise ProtocolError(self.device, f"factory point reply for {i} names {pf.get('i')!r}")
                    points.append((float(pf["d"]), float(pf["mw"])))
                fc = FactoryCalibration(tuple(points), float(fields["pdf"]), float(fields["max"]),
                                        float(fields["ceil"]), float(fields["trip"]), float(fields["budget"]))
            except (KeyError, ValueError, InvalidArgument) as err:
                raise ProtocolError(self.device, f"factory record unreadable: {err}") from err
            self._factory = fc
            return fc

    def _do_write_factory(self, fc: FactoryCalibration) -> None:
        with self._lock:
            self._command(f"FACB {len(fc.points)} {fc.photodiode_factor:.6f} {fc.max_power_mw:.3f} {fc.budget_s:.3f}")
            for i, (d, mw) in enumerate(fc.points):
                self._command(f"FACW {i} {d:.6f} {mw:.3f}")
            self._command("FACC")
            self.read_factory()

    def clear_faults(self) -> None:
        """Clear latched MCU faults; DeviceRejected names the cause that persists."""
        self._command("CLR")

    def stop_frames(self) -> None:
        """Stop triggering the camera; the laser returns to continuous while enabled."""
        self._command("FTOFF")

    def wait_input(self, timeout_s: float) -> bool:
        """Block until the MCU has sent something (the port is readable, or a command's
        exchange queued lines it sent on its own) or ``timeout_s`` passes; True when there may
        be something for :meth:`poll`. A port without a descriptor (a test's fake) is polled
        instead: this waits ``min(timeout_s, 5 ms)``."""
        port = self._port
        fileno = getattr(port, "fileno", None)
        try:
            fd = fileno() if fileno is not None else None
        except (OSError, ValueError, AttributeError, TypeError):
            fd = None
        if not isinstance(fd, int):
            self.clock.sleep(min(timeout_s, 0.005))
            return True
        if self._wake is None:
            self._wake = WakeSignal()
        wake_r = self._wake.fileno()
        try:
            ready, _, _ = select.select([fd, wake_r], [], [], max(timeout_s, 0.0))
        except (OSError, ValueError):  # the port closed meanwhile
            self.clock.sleep(min(timeout_s, 0.005))
            return True
        if wake_r in ready:
            self._wake.consume()
        return bool(ready)

    def _wake_waiter(self) -> None:
        if self._wake is not None:  # else nobody waits in wait_input()
            self._wake.set()

    def poll(self) -> tuple[list[FrameTag], list[McuNotice]]:
        """Frame tags and notices the MCU sent since the last call, without blocking."""
        with self._lock:
            self._ensure_port()
            try:
                waiting = self._port.in_waiting
                if waiting:
                    self._rx += self._port.read(waiting)
            except _PORT_ERRORS as err:
                self._lost(err, "poll")
            while True:
                raw = self._pop_line()
                if raw is None:
                    break
                self._dispatch(raw, pending_seq=None)
            frames, notices = list(self._frames), list(self._notices)
            self._frames.clear()
            self._notices.clear()
            return frames, notices

    # -- I/O hooks --------------------------------------------------------------------------
    def _do_set_duty(self, duty: float, expected_mw: float) -> None:
        self._command(f"DUTY {duty:.6f} {expected_mw:.3f}")

    def _do_set_enabled(self, on: bool, expected_mw: float) -> None:
        self._command(f"EN 1 {expected_mw:.3f}" if on else "EN 0")

    def _do_force_off(self) -> None:
        with self._lock:
            try:
                self._command("EN 0")
                self._command("DUTY 0 0")
            except DeviceError as err:
                # Never raises: with a dead link the MCU's watchdog turns the laser off.
                log.error("laser-mcu: could not confirm output off (%s); relying on the MCU watchdog", err)

    def _do_start_frames(self, fps: float, exposure_us: int, modulate: bool) -> None:
        period_us = trigger_period_us(fps)
        self._command(f"FTON {period_us} {exposure_us} {int(modulate)}")

    # -- exchange ---------------------------------------------------------------------------
    def _command(self, command: str) -> str:
        """Send one command and return the reply's fields (after ``OK``)."""
        with self._lock:
            try:
                return self._command_locked(command)
            finally:
                if self._queued_unseen:
                    # lines the MCU sent on its own came in with the reply: tell wait_input()
                    self._queued_unseen = False
                    self._wake_waiter()

    def _command_locked(self, command: str) -> str:
        with self._lock:
            self._ensure_port()
            self._seq = (self._seq + 1) % (MAX_SEQ + 1)
            seq = self._seq
            line = frame_line(f"{seq} {command}")
            corrupt = silent = 0
            for attempt in range(self.retries + 1):
                if attempt:
                    self.resends += 1
                    log.warning("laser-mcu: resending %r (seq %d), attempt %d of %d",
                                command, seq, attempt + 1, self.retries + 1)
                try:
                    self._port.write(line)
                except _PORT_ERRORS as err:
                    self._lost(err, command)
                outcome, payload = self._await_reply(seq, command)
                if outcome == "ok":
                    return payload
                if outcome == "corrupt":
                    corrupt += 1
                else:
                    silent += 1
            attempts = self.retries + 1
            if corrupt:
                raise ProtocolError(self.device, f"no valid reply to {command!r} (seq {seq}) after {attempts} "
                                                 f"attempts: {corrupt} corrupted, {silent} missing")
            raise DeviceTimeout(self.device, f"no reply to {command!r} (seq {seq}) after {attempts} attempts "
                                             f"of {self.timeout_s:.3f} s")

    def _await_reply(self, seq: int, command: str) -> tuple[str, str]:
        """Read until the reply to ``seq``: ("ok", fields), ("corrupt", "") or
        ("silent", ""). Raises DeviceRejected for a refusal."""
        deadline = self.clock.monotonic() + self.timeout_s
        # Backstop against a port that returns at once without the clock moving.
        for _ in range(100_000):
            raw = self._pop_line()
            if raw is None:
                if self.clock.monotonic() >= deadline:
                    return "silent", ""
                self._read_some(command)
                continue
            result = self._dispatch(raw, pending_seq=seq, command=command)
            if result is not None:
                return result
        return "silent", ""

    def _read_some(self, command: str) -> None:
        before = self.clock.monotonic()
        try:
            # Whole chunks, not pyserial's read_until (one read(1) and select per byte: most
            # of the safety core's time at 50 status polls a second). The first byte may
            # wait for the port's timeout; what has arrived with it is taken in one read.
            waiting = self._port.in_waiting
            if waiting:
                chunk = self._port.read(waiting)
            else:
                chunk = self._port.read(1)
                if chunk:
                    more = self._port.in_waiting
                    if more:
                        chunk += self._port.read(more)
        except _PORT_ERRORS as err:
            self._lost(err, command)  # raises
            return
        if chunk:
            self._rx += chunk
            if len(self._rx) > MAX_LINE_BYTES and b"\n" not in self._rx:
                self.corrupt_lines += 1
                self._rx.clear()
        elif self.clock.monotonic() - before < READ_SLICE_S / 2:
            # The port came back empty at once (no timeout of its own): wait a little
            # rather than spin.
            self.clock.sleep(0.002)

    def _pop_line(self) -> bytes | None:
        i = self._rx.find(b"\n")
        if i < 0:
            return None
        raw = bytes(self._rx[:i])
        del self._rx[:i + 1]
        return raw

    def _dispatch(self, raw: bytes, pending_seq: int | None, command: str = "") -> tuple[str, str] | None:
        """Handle one received line. Returns the outcome when it settles the command
        waiting for ``pending_seq``, else None."""
        if not raw.strip(b"\r"):
            return None
        body = check_line(raw)
        if body is None:
            self.corrupt_lines += 1
            if raw.startswith(b"!"):
                log.debug("laser-mcu: dropped a corrupted notice %r", raw)
                return None
            log.debug("laser-mcu: corrupted line %r", raw)
            # Most likely our reply, damaged: resend (a stray is harmless, see the cache).
            return ("corrupt", "") if pending_seq is not None else None
        parts = body.split(" ")
        if parts[0] == "!":
            self._unsolicited(parts[1:], raw)
            if pending_seq is not None:
                self._queued_unseen = True
            return None
        if parts[0] == "-":
            # The MCU saw a damaged line: ours, if we are waiting.
            log.debug("laser-mcu: MCU reports %s", body)
            return ("corrupt", "") if pending_seq is not None else None
        try:
            seq = int(parts[0])
        except ValueError:
            self.corrupt_lines += 1
            return ("corrupt", "") if pending_seq is not None else None
        if seq != pending_seq or len(parts) < 2:
            self.stale_replies += 1
            log.debug("laser-mcu: ignored a stale reply %r (waiting for seq %s)", body, pending_seq)
            return None
        if parts[1] == "OK":
            return "ok", " ".join(parts[2:])
        if parts[1] == "ERR" and len(parts) >= 3:
            code = parts[2]
            if code in _RESEND_CODES:
                return "corrupt", ""
            raise DeviceRejected(self.device, self._refusal_message(command, parts[2:]))
        self.corrupt_lines += 1
        return "corrupt", ""

    def _refusal_message(self, command: str, err: list[str]) -> str:
        if err[0] == "REFUSED" and len(err) >= 3 and err[1] == "CEILING":
            value = command.partition(" ")[2]
            return f"{command!r} refused: duty {value} above the MCU's duty ceiling {err[2]}"
        if err[0] == "REFUSED" and len(err) >= 2:
            reason = {"FAULT": "faults latched", "ILK": "interlock open", "KEY": "key off",
                      "OTEMP": "over temperature",
                      "JUMPER": "the MCU's service jumper is open (factory values are written only with it closed)",
                      "NOFAC": "the MCU has no factory record",
                      "BUDGET": "the MCU's emission budget is used up (seconds until enough is free)",
                      "XMW": "expected mW disagrees with the MCU's factory table at this duty (factory mW)",
                      "LIMIT": "expected mW above the MCU's optical trip (trip mW)",
                      "OUT": "the output is on",
                      "TABLE": "factory record invalid",
                      "INCOMPLETE": "factory record incomplete (missing points)"}.get(err[1], err[1])
            detail = f" ({' '.join(err[2:])})" if len(err) > 2 else ""
            return f"{command!r} refused: {reason}{detail}"
        if err[0] == "ARG":
            return f"{command!r} rejected: argument out of the MCU's range or format"
        if err[0] == "UNKNOWN":
            return f"{command!r} rejected: the MCU does not know this command (firmware version?)"
        return f"{command!r} rejected: {' '.join(err)}"

    def _unsolicited(self, parts: list[str], raw: bytes) -> None:
        if not parts:
            self.corrupt_lines += 1
            return
        kind, detail = parts[0], parts[1:]
        if kind == "FRM":
            try:
                counter, gate, mcu_us = int(detail[0]), detail[1], int(detail[2])
                if gate not in ("L", "D") or len(detail) != 3:
                    raise ValueError(gate)
            except (IndexError, ValueError):
                self.corrupt_lines += 1
                log.debug("laser-mcu: malformed frame notice %r", raw)
                return
            if len(self._frames) == self._frames.maxlen:
                self.dropped_notices += 1
            self._frames.append(FrameTag(counter, gate == "L", mcu_us, self.clock.time_ns()))
            return
        if kind == "FAULT":
            log.warning("laser-mcu: MCU latched fault %s", " ".join(detail))
        elif kind == "CUT":
            log.info("laser-mcu: lit frame %s cut mid-exposure", " ".join(detail))
        elif kind == "LIT":
            log.warning("laser-mcu: light seen during dark frame %s (the gate leaks)", " ".join(detail))
        elif kind == "IN":
            kind = "INPUT"
        elif kind == "BOOT":
            log.warning("laser-mcu: MCU reset (%s)", " ".join(detail))
        if len(self._notices) == self._notices.maxlen:
            self.dropped_notices += 1
        self._notices.append(McuNotice(kind, tuple(detail)))

    # -- port management -------------------------------------------------------------------
    def _open_and_handshake(self) -> None:
        try:
            port = self._port_factory()
        except _PORT_ERRORS as err:
            raise DeviceDisconnected(self.device, f"cannot open the port: {err}") from err
        self._port = port
        self._rx.clear()
        self._hbst_known = None  # perhaps another MCU, with other firmware
        try:
            port.timeout = min(READ_SLICE_S, self.timeout_s)
            port.reset_input_buffer()
        except _PORT_ERRORS as err:
            self._lost(err, "open")
        try:
            # S1: the first act on the link forces the output off.
            self._command("EN 0")
            self._command("DUTY 0 0")
            self._identity = self._command("ID")
            self._command(f"WDT {self.heartbeat_timeout_ms}")
        except DeviceError:
            # Never keep a port on which the output was not confirmed off.
            self._drop_port()
            raise
        try:
            # S6a: the absolute limits come from the MCU, never from the host's own files.
            self.read_factory()
        except DeviceRejected as err:
            # An MCU without a record refuses to emit; connecting still lets a service
            # tool write one.
            log.error("laser-mcu: MCU has no factory record (%s); it will refuse to emit", err)
        except DeviceError:
            self._drop_port()
            raise
        log.info("laser-mcu: connected to %s, output off", self._identity)

    def _ensure_port(self) -> None:
        if self._port is not None:
            return
        if not self._wanted:
            raise DeviceDisconnected(self.device, "not connected (call connect())")
        # One automatic attempt; it forces the output off before anything else.
        log.warning("laser-mcu: port lost earlier; trying to reconnect once")
        self._open_and_handshake()

    def _lost(self, err: Exception, during: str) -> None:
        self._drop_port()
        raise DeviceDisconnected(self.device, f"port lost during {during!r}: {err}") from err

    def _drop_port(self) -> None:
        port, self._port = self._port, None
        self._rx.clear()
        if port is not None:
            try:
                port.close()
            except _PORT_ERRORS as err:
                log.debug("laser-mcu: closing the old port failed: %s", err)
