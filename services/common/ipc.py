"""Internal messages between the cart's processes.

The processes talk over ``ipc://`` sockets in the runtime folder. Internal input is checked
like network input: every frame must be a msgpack map within the size limits, and every
field is checked before use; a message that fails is counted and dropped, never raised
into a loop (PRODUCT section 3: "internal input is checked like network input").

Three patterns, one helper each:

* requests: :class:`InternalServer` (a ROUTER) answers ``{"id", "cmd", "args", "caller",
  "t_arrival_ns", "expires"}`` with ``{"id", "ok", "result" | "error"}``. Quick commands run
  in the server's thread; long ones run one at a time in a worker thread, and a second long
  command while one runs is ``BUSY`` naming the first. A command marked ``expires`` that
  cannot start within :data:`EXPIRY_S` of its arrival at the gateway is refused with
  ``EXPIRED`` and never acted on. :class:`InternalClient` makes blocking calls with a timeout.
* notices: fire-and-forget maps over PUSH/PULL (heartbeats, per-frame liveness).
* publications: ``[topic, map]`` over PUB/SUB (state snapshots, events, frame records).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgpack
import zmq

from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import Busy, CommandRefused, NirfError
from nirf.hal.threads import WakeSignal

log = logging.getLogger(__name__)

# How long after its arrival a command that would start or raise emission (or a long
# command) may still start (PRODUCT S14).
EXPIRY_S = 1.0
# Internal messages carry no frames (those travel as raw buffers beside a header), so the
# limits can stay small.
INTERNAL_MAX_BYTES = 1 << 20
UNPACK_LIMITS = dict(max_str_len=256 * 1024, max_bin_len=256 * 1024, max_array_len=65536, max_map_len=1024)
MAX_ID_LEN = 64


class Expired(CommandRefused):
    """A command that could not start within a second of its arrival (never acted on)."""

    code = "EXPIRED"


def endpoint(runtime_dir: Path, name: str) -> str:
    """The ``ipc://`` address of the internal socket ``name`` in the runtime folder."""
    return f"ipc://{Path(runtime_dir) / (name + '.ipc')}"


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=_default)


def _default(obj):
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def unpack_map(data) -> dict | None:
    """The msgpack map in ``data``, or ``None`` when it is not one (never raises)."""
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, **UNPACK_LIMITS)
    except (ValueError, TypeError, msgpack.ExtraData):
        return None
    return obj if isinstance(obj, dict) else None


class Revision:
    """Orders a process's state snapshots: ``(process start time, counter)``, so a reader
    keeps the newest even when a reply and a publication arrive out of order, and a
    restarted process's snapshots win over its predecessor's."""

    def __init__(self):
        import itertools

        self._start = time.time_ns()
        self._count = itertools.count(1)

    def next(self) -> list[int]:
        return [self._start, next(self._count)]


def newer(candidate: dict, current: dict | None) -> bool:
    """True when the snapshot ``candidate`` is at least as new as ``current``."""
    if current is None:
        return True
    a, b = candidate.get("rev"), current.get("rev")
    if not (isinstance(a, list) and isinstance(b, list)):
        return True
    return a >= b


def finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _socket(ctx: zmq.Context, kind: int, *, hwm: int = 1000) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, INTERNAL_MAX_BYTES)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RCVHWM, hwm)
    return s


# ---------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the gateway authenticated it."""

    role: str
    name: str


INTERNAL = Caller("operator", "internal")

Handler = Callable[[dict, Caller], Any]


def error_reply(req_id, code: str, message: str) -> dict:
    return {"id": req_id, "ok": False, "error": {"code": code, "message": message}}


@dataclass(frozen=True)
class Request:
    id: str
    cmd: str
    args: dict
    caller: Caller
    t_arrival_ns: int
    expires: bool

    @classmethod
    def parse(cls, msg: dict | None) -> "Request | str":
        """A request from a decoded map, or the reason it is not one."""
        if msg is None:
            return "not a msgpack map"
        rid, cmd, args = msg.get("id"), msg.get("cmd"), msg.get("args", {})
        if not isinstance(rid, str) or len(rid) > MAX_ID_LEN:
            return "'id' must be a string of at most 64 characters"
        if not isinstance(cmd, str) or not cmd or len(cmd) > 64:
            return "'cmd' must be a short string"
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return "'args' must be a map"
        c = msg.get("caller") or {}
        if not isinstance(c, dict) or not isinstance(c.get("role", ""), str) or not isinstance(c.get("name", ""), str):
            return "'caller' must be a map of role and name"
        t = msg.get("t_arrival_ns", 0)
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            return "'t_arrival_ns' must be a non-negative integer"
        return cls(rid, cmd, args, Caller(c.get("role", "operator"), c.get("name", "internal")), t,
                   bool(msg.get("expires", False)))


# The serving thread's backstop for a stop event set without wake(), and the long-command
# worker's for a stop without close(): an idle server wakes this often, no more.
SERVE_POLL_MS = 250
WORKER_POLL_S = 1.0


class InternalServer:
    """Serves internal requests on a ROUTER socket.

    ``handlers`` maps a command to ``fn(args, caller)``; commands in ``long_commands`` run
    in one worker thread, so they never hold up the quick ones. Replies from the worker
    reach the socket through an inproc pipe, so only the serving thread touches the ROUTER.
    """

    def __init__(self, ctx: zmq.Context, address: str, handlers: dict[str, Handler], *,
                 long_commands: frozenset[str] | set[str] = frozenset(), clock: Clock | None = None,
                 name: str = "internal", state: Callable[[], dict] | None = None):
        self.handlers = dict(handlers)
        # Every reply carries the process's state as it is after the command, so the gateway
        # answers a status asked right after a reply with the command's effect in it.
        self.state = state
        self.long_commands = frozenset(long_commands)
        self.clock = clock or SystemClock()
        self.name = name
        self.sock = _socket(ctx, zmq.ROUTER)
        self.sock.bind(address)
        self.address = address
        pipe = f"inproc://{name}-replies-{id(self)}"
        self._replies_in = ctx.socket(zmq.PULL)
        self._replies_in.bind(pipe)
        self._replies_out = ctx.socket(zmq.PUSH)
        self._replies_out.connect(pipe)
        self._out_lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self.running_long: str | None = None
        self.dropped = 0  # malformed frames
        self.served = 0
        self._worker = threading.Thread(target=self._work, name=f"{name}-long", daemon=True)
        self._stop = threading.Event()
        self._wake = WakeSignal()
        self._worker.start()

    def wake(self) -> None:
        """Make the serving thread look at its stop event now (call it after setting it)."""
        self._wake.set()

    # -- the serving thread
    def serve(self, stop: threading.Event, poll_ms: int = SERVE_POLL_MS,
              on_idle: Callable[[], None] | None = None) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._replies_in, zmq.POLLIN)
        wake_fd = self._wake.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        while not stop.is_set():
            try:
                events = dict(poller.poll(poll_ms))
                if wake_fd in events:
                    self._wake.consume()
                if self._replies_in in events:
                    while True:
                        try:
                            frames = self._replies_in.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._send(frames)
                if self.sock in events:
                    while True:
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_request(frames)
                if on_idle is not None:
                    on_idle()
            except zmq.ZMQError as err:
                if err.errno == zmq.ETERM or self.sock.closed:
                    return
                log.exception("%s: socket error", self.name)
            except Exception:  # the loop outlives any single bad message
                log.exception("%s: unexpected error while serving", self.name)
        self._stop.set()

    def _send(self, frames: list) -> None:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as err:
            log.warning("%s: reply not sent: %s", self.name, err)

    def _reply(self, envelope: list, reply: dict) -> None:
        if self.state is not None and reply.get("id") is not None:
            try:
                reply["state"] = self.state()
            except Exception:
                log.exception("%s: state for the reply failed", self.name)
        try:
            body = pack(reply)
        except (TypeError, ValueError, OverflowError) as err:
            body = pack(error_reply(reply.get("id"), "DEVICE_ERROR", f"result not encodable ({type(err).__name__})"))
        if threading.current_thread() is self._worker:
            with self._out_lock:
                self._replies_out.send_multipart(envelope + [body])
        else:
            self._send(envelope + [body])

    def _on_request(self, frames: list) -> None:
        if len(frames) < 2:
            self.dropped += 1
            return
        envelope, body = frames[:-1], frames[-1]
        req = Request.parse(unpack_map(body))
        if isinstance(req, str):
            self.dropped += 1
            self._reply(envelope, error_reply(None, "BAD_REQUEST", f"internal request refused: {req}"))
            return
        self.served += 1
        handler = self.handlers.get(req.cmd)
        if handler is None:
            self._reply(envelope, error_reply(req.id, "UNKNOWN_COMMAND", f"{self.name} does not serve {req.cmd!r}"))
            return
        if req.cmd in self.long_commands:
            if self.running_long is not None:
                self._reply(envelope, error_reply(req.id, Busy.code, f"{self.running_long} is running; "
                                                                     f"try {req.cmd} when it has finished"))
                return
            self.running_long = req.cmd
            self._jobs.put((envelope, req, handler))
            return
        self._reply(envelope, self.run(req, handler))

    def run(self, req: Request, handler: Handler) -> dict:
        """Run one request now: refuse it if it expired, else call the handler."""
        if req.expires and req.t_arrival_ns:
            late_s = (self.clock.time_ns() - req.t_arrival_ns) / 1e9
            if late_s > EXPIRY_S:
                return error_reply(req.id, Expired.code, f"{req.cmd} arrived {late_s:.2f} s ago and could not "
                                                         f"start within {EXPIRY_S:.0f} s: not acted on; send it again")
        try:
            return {"id": req.id, "ok": True, "result": handler(req.args, req.caller)}
        except NirfError as err:
            return error_reply(req.id, err.code, getattr(err, "message", None) or str(err))
        except Exception as err:  # a bug in a handler must not take the server down
            log.exception("%s: %s failed", self.name, req.cmd)
            return error_reply(req.id, "DEVICE_ERROR", f"internal error in {req.cmd}: {type(err).__name__}: {err}")

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=WORKER_POLL_S)
            except queue.Empty:
                continue
            if job is None:  # close() wakes the worker to end
                continue
            envelope, req, handler = job
            try:
                self._reply(envelope, self.run(req, handler))
            finally:
                self.running_long = None

    def worker_alive(self) -> bool:
        return self._worker.is_alive()

    def close(self) -> None:
        self._stop.set()
        self.wake()
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass  # a job is queued: the worker runs it and then sees the stop
        self._worker.join(timeout=1.0)
        for s in (self.sock, self._replies_in, self._replies_out):
            s.close(linger=0)


class InternalClient:
    """Blocking calls to one internal server, thread-safe (one call at a time).

    A reply that does not come within the timeout raises ``DeviceTimeout``; the socket is
    then replaced, so a late reply can never be taken for the next call's."""

    def __init__(self, ctx: zmq.Context, address: str, *, name: str):
        self.ctx, self.address, self.name = ctx, address, name
        self._lock = threading.Lock()
        self._sock: zmq.Socket | None = None
        self._n = 0

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = _socket(self.ctx, zmq.DEALER)
            self._sock.connect(self.address)
        return self._sock

    def call(self, cmd: str, args: dict | None = None, *, timeout_s: float = 2.0,
             caller: Caller = INTERNAL, t_arrival_ns: int | None = None, expires: bool = False):
        from nirf.hal.errors import DeviceTimeout

        with self._lock:
            self._n += 1
            rid = f"{self.name}-{self._n}"
            sock = self._socket()
            sock.send(pack({"id": rid, "cmd": cmd, "args": args or {}, "caller": {"role": caller.role,
                            "name": caller.name}, "t_arrival_ns": t_arrival_ns or time.time_ns(),
                            "expires": expires}))
            deadline = time.monotonic() + timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                    sock.close(linger=0)
                    self._sock = None
                    raise DeviceTimeout(self.name, f"no answer to {cmd} within {timeout_s} s")
                reply = unpack_map(sock.recv())
                if reply is None or reply.get("id") != rid:
                    continue  # a late reply to an earlier, timed-out call
                break
        if reply.get("ok"):
            return reply.get("result")
        err = reply.get("error") or {}
        raise RemoteError(str(err.get("code", "DEVICE_ERROR")), str(err.get("message", "")))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None


class RemoteError(CommandRefused):
    """An error reply from another process, carrying its protocol code unchanged."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------- notices and publications
class Notifier:
    """Fire-and-forget maps to one PULL socket; never blocks (a full queue drops)."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.sock = _socket(ctx, zmq.PUSH, hwm=100)
        self.sock.connect(address)
        self._lock = threading.Lock()

    def send(self, msg: dict) -> bool:
        with self._lock:
            try:
                self.sock.send(pack(msg), zmq.NOBLOCK)
                return True
            except zmq.Again:
                return False

    def close(self) -> None:
        self.sock.close(linger=0)


class Publisher:
    """``[topic, map]`` on a bound PUB socket; thread-safe; a slow subscriber loses messages."""

    def __init__(self, ctx: zmq.Context, address: str, hwm: int = 1000):
        self.sock = _socket(ctx, zmq.PUB, hwm=hwm)
        self.sock.bind(address)
        self._lock = threading.Lock()

    def publish(self, topic: str, body: dict) -> None:
        self.publish_packed(topic, pack(body))

    def publish_packed(self, topic: str, data: bytes) -> None:
        """Publish a map already packed (msgpack bytes)."""
        with self._lock:
            try:
                self.sock.send_multipart([topic.encode("ascii"), data], zmq.NOBLOCK)
            except zmq.Again:
                pass

    def close(self, linger_s: float = 0.0) -> None:
        """Close the socket; ``linger_s`` gives messages still queued that long to go out."""
        self.sock.close(linger=int(linger_s * 1000))


class EventsOut:
    """``telemetry.publish`` and ``audit.write`` for code that runs inside a process other
    than the gateway: both go out on the process's publisher, and the gateway relays the
    events to telemetry and writes the ``audit`` entries to the audit log."""

    def __init__(self, pub: Publisher):
        self.pub = pub

    def publish(self, topic: str, body: dict, extra=()) -> dict:
        self.pub.publish(topic, body)
        return body

    def write(self, kind: str, **fields) -> None:
        self.pub.publish("audit", {"kind": kind, **fields})


def subscriber(ctx: zmq.Context, address: str, topics: tuple[str, ...] = ("",), hwm: int = 10000) -> zmq.Socket:
    s = _socket(ctx, zmq.SUB, hwm=hwm)
    for t in topics:
        s.setsockopt(zmq.SUBSCRIBE, t.encode("ascii"))
    s.connect(address)
    return s


def receive_publication(sock: zmq.Socket) -> tuple[str, dict] | None:
    """One ``[topic, map]`` publication without blocking, or ``None`` (nothing there, or a
    malformed message, which is dropped)."""
    try:
        frames = sock.recv_multipart(zmq.NOBLOCK)
    except zmq.Again:
        return None
    if len(frames) != 2:
        return None
    try:
        topic = frames[0].decode("ascii")
    except UnicodeDecodeError:
        return None
    body = unpack_map(frames[1])
    return None if body is None else (topic, body)
