"""The ZeroMQ bus: the control endpoint (ROUTER) and the telemetry endpoint (PUB), both
CURVE with a ZAP authenticator (PROTOCOL.md).

A request is one msgpack map ``{"id", "cmd", "args"}``; the reply echoes the id with either
``result`` or ``error {code, message}``. Anything malformed gets ``BAD_REQUEST`` with a null
id; oversized messages are dropped by the socket (``MAXMSGSIZE``); nothing a client sends
can stop the server.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import zmq

from nirf.hal.errors import NirfError, NotPermitted, UnknownCommand
from nirf.services.common.keys import OPERATOR, make_curve_server

log = logging.getLogger(__name__)

MAX_ID_LEN = 64
# Arguments nested deeper than this are refused before any handler sees them.
MAX_ARGS_DEPTH = 32
# Commands an observer may call; everything else needs the operator role.
from nirf.services.gateway.commands import READ_ONLY  # noqa: E402  (the one command table)

UNPACK_LIMITS = dict(max_str_len=16 * 1024, max_bin_len=64 * 1024, max_array_len=4096, max_map_len=256)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's role and the name its file was authorised under."""

    role: str
    name: str


Handler = Callable[[dict, Caller], Any]


def unpack(data: bytes) -> Any:
    """msgpack with limits for untrusted bytes. Raises ValueError on anything wrong."""
    return msgpack.unpackb(data, raw=False, strict_map_key=True, **UNPACK_LIMITS)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=_default)


def _default(obj):
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def error_reply(req_id, code: str, message: str) -> dict:
    return {"id": req_id, "ok": False, "error": {"code": code, "message": message}}


def nesting_depth(obj, limit: int = MAX_ARGS_DEPTH + 1) -> int:
    """How deeply maps and lists nest in ``obj`` (a scalar is 0), counted up to ``limit``."""
    if limit <= 0 or not isinstance(obj, (dict, list, tuple)):
        return 0
    children = obj.values() if isinstance(obj, dict) else obj
    return 1 + max((nesting_depth(v, limit - 1) for v in children), default=0)


def finite(obj, depth: int = 0) -> bool:
    """True when no float in the structure is NaN or infinite (and it nests at most
    ``MAX_ARGS_DEPTH`` levels; deeper is treated as not finite)."""
    if depth > MAX_ARGS_DEPTH:
        return False
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(finite(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(finite(v, depth + 1) for v in obj)
    return True


def decode_request(data: bytes) -> tuple[str, str, dict] | dict:
    """``(id, cmd, args)`` of a request frame, or the error reply for a malformed one."""
    try:
        req = unpack(data)
    except (ValueError, TypeError) as err:
        return error_reply(None, "BAD_REQUEST", f"not a msgpack map of the request shape ({type(err).__name__})")
    if not isinstance(req, dict):
        return error_reply(None, "BAD_REQUEST", f"request must be a map, got {type(req).__name__}")
    req_id = req.get("id")
    if not isinstance(req_id, str) or len(req_id) > MAX_ID_LEN:
        return error_reply(None, "BAD_REQUEST", f"'id' must be a string of at most {MAX_ID_LEN} characters")
    cmd = req.get("cmd")
    if not isinstance(cmd, str):
        return error_reply(req_id, "BAD_REQUEST", "'cmd' must be a string")
    args = req.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return error_reply(req_id, "BAD_REQUEST", f"'args' must be a map, got {type(args).__name__}")
    if nesting_depth(args) > MAX_ARGS_DEPTH:
        return error_reply(req_id, "INVALID_ARGUMENT", f"arguments nest deeper than {MAX_ARGS_DEPTH} levels")
    if not finite(args):
        return error_reply(req_id, "INVALID_ARGUMENT", "arguments contain NaN or infinity")
    return req_id, cmd, args


class CommandServer:
    """Serves commands on a ROUTER socket; one request at a time, in the caller's thread."""

    def __init__(self, ctx: zmq.Context, endpoint: str, server_keys: tuple[bytes, bytes], ring,
                 handlers: dict[str, Handler], *, max_message_bytes: int = 65536, audit=None):
        self.handlers = handlers
        self.ring = ring
        self.audit = audit
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        make_curve_server(self.sock, *server_keys)
        self.sock.bind(endpoint)
        self.endpoint = endpoint
        self.requests = 0

    def serve(self, stop: threading.Event, poll_ms: int = 100) -> None:
        """Answer requests until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.poll_once(poll_ms)
            except zmq.ZMQError as err:
                if err.errno == zmq.ETERM or self.sock.closed:
                    return
                log.exception("command socket error")
            except Exception:  # the loop must outlive any single bad message
                log.exception("unexpected error while serving a request")

    def poll_once(self, timeout_ms: int) -> bool:
        """Serve at most one request, waiting up to ``timeout_ms``. True when one came."""
        if not self.sock.poll(timeout_ms):
            return False
        frames = self.sock.recv_multipart(copy=False)
        self.requests += 1
        payload = frames[-1]
        try:
            user = payload.get("User-Id")
        except zmq.ZMQError:
            user = None
        reply = self.handle(payload.bytes, user.encode() if isinstance(user, str) else user)
        if reply is None:
            return True
        try:
            body = pack(reply)
        except (TypeError, ValueError, OverflowError) as err:
            log.error("reply to %s could not be encoded: %s", reply.get("id"), err)
            body = pack(error_reply(reply.get("id"), "DEVICE_ERROR",
                                    f"the result could not be encoded ({type(err).__name__})"))
        try:
            self.sock.send_multipart([f.bytes for f in frames[:-1]] + [body], zmq.NOBLOCK)
        except zmq.ZMQError as err:
            log.warning("reply not sent: %s", err)
        return True

    def handle(self, data: bytes, user_key: bytes | None) -> dict | None:
        """Decode, authorise, dispatch and build the reply. Never raises.

        Returns None (no reply at all) when the sender's key is not in the key ring: a key
        removed while its connection stays open must lose access at once, and a stranger
        learns nothing from silence.
        """
        known = self.ring.lookup(user_key) if user_key else None
        if known is None:
            log.warning("request from a key that is not (or no longer) authorised: dropped")
            return None
        decoded = decode_request(data)
        if isinstance(decoded, dict):
            return decoded
        req_id, cmd, args = decoded
        caller = Caller(*known)
        try:
            # The role comes first: "anything else from an observer is NOT_PERMITTED", and an
            # observer learns nothing about which commands exist.
            if cmd not in READ_ONLY and caller.role != OPERATOR:
                raise NotPermitted(f"{cmd[:64]!r} is not allowed for key {caller.name!r}: it is an observer "
                                   f"(observers may call {', '.join(sorted(READ_ONLY))})")
            handler = self.handlers.get(cmd)
            if handler is None:
                raise UnknownCommand(f"unknown command {cmd[:64]!r}; known: {', '.join(sorted(self.handlers))}")
            result = handler(args, caller)
            reply = {"id": req_id, "ok": True, "result": result}
        except NirfError as err:
            reply = error_reply(req_id, err.code, getattr(err, "message", None) or str(err))
        except Exception as err:  # a bug in a handler must not take the server down
            log.exception("command %s failed", cmd[:64])
            reply = error_reply(req_id, "DEVICE_ERROR", f"internal error in {cmd[:64]}: {type(err).__name__}: {err}")
        if self.audit is not None and cmd not in ("status", "ping"):
            self.audit.write("command", client=caller.name, role=caller.role, cmd=cmd, args=args,
                             ok=reply["ok"], result=reply.get("result") if reply["ok"] else reply["error"])
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)


class Telemetry:
    """The PUB endpoint. Thread-safe; every map gets ``seq`` (per topic) and ``t_ns``."""

    def __init__(self, ctx: zmq.Context, endpoint: str, server_keys: tuple[bytes, bytes]):
        self.ctx, self.endpoint, self.server_keys = ctx, endpoint, server_keys
        self._lock = threading.Lock()
        self._seq: dict[str, int] = {}
        self.sock = self._bind()

    def _bind(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100)  # a slow subscriber loses messages, never stalls us
        make_curve_server(sock, *self.server_keys)
        sock.bind(self.endpoint)
        return sock

    def rebind(self, attempts: int = 50) -> None:
        """Close the endpoint and open it again: every subscriber is disconnected and must
        pass the authenticator again to reconnect (how a revoked key loses telemetry)."""
        with self._lock:
            self.sock.close(linger=0)
            for i in range(attempts):
                try:
                    self.sock = self._bind()
                    return
                except zmq.ZMQError:
                    time.sleep(0.01)  # the port is released asynchronously
            self.sock = self._bind()

    def publish(self, topic: str, body: dict, extra: list | tuple = ()) -> dict:
        return self.publish_packed(topic, body, extra)[0]

    def publish_packed(self, topic: str, body: dict, extra: list | tuple = ()) -> tuple[dict, bytes]:
        """:meth:`publish`, returning the packed map too, for a caller that passes the same
        message on elsewhere without packing it again."""
        with self._lock:
            seq = self._seq.get(topic, 0)
            self._seq[topic] = seq + 1
            msg = dict(body, seq=seq, t_ns=time.time_ns())
            data = pack(msg)
            try:
                self.sock.send_multipart([topic.encode("ascii"), data, *extra], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
        return msg, data

    def close(self) -> None:
        self.sock.close(linger=0)
