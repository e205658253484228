"""A small client for the cart's bus, used by ``nirfctl`` and the tests' helpers.

Requests go over a REQ socket with a timeout; after a timeout the socket is closed and a
new one opened (a REQ socket that lost its reply cannot send again). Telemetry comes from
a SUB socket; every receive has a timeout.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import msgpack
import zmq
import zmq.auth

from nirf.hal.errors import DeviceTimeout

DEFAULT_TIMEOUT_S = 5.0


class CartError(Exception):
    """The cart answered with an error reply."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CartClient:
    def __init__(self, control: str, telemetry: str | None, server_public: bytes,
                 client_public: bytes, client_secret: bytes, *, context: zmq.Context | None = None):
        self.control = control
        self.telemetry = telemetry
        self.server_public = server_public
        self.client_public = client_public
        self.client_secret = client_secret
        self.ctx = context or zmq.Context.instance()
        self._req: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        self._ids = itertools.count(1)

    @classmethod
    def from_state_dir(cls, state_dir: Path, control: str, telemetry: str | None = None,
                       key_file: Path | None = None, **kw) -> "CartClient":
        keys = Path(state_dir) / "keys"
        server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
        pub, sec = zmq.auth.load_certificate(str(key_file or keys / "local-operator.key_secret"))
        if sec is None:
            raise ValueError(f"{key_file}: no secret key in this file")
        return cls(control, telemetry, server_public, pub, sec, **kw)

    def _curve(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret

    def _socket(self) -> zmq.Socket:
        if self._req is None:
            s = self.ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            self._curve(s)
            s.connect(self.control)
            self._req = s
        return self._req

    def request(self, cmd: str, args: dict | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
        """Send one request and return the whole reply map. Raises DeviceTimeout when the cart
        does not answer in time."""
        sock = self._socket()
        req = {"id": f"c{os.getpid()}-{next(self._ids)}", "cmd": cmd}
        if args:
            req["args"] = args
        sock.send(msgpack.packb(req, use_bin_type=True))
        if not sock.poll(int(timeout_s * 1000)):
            sock.close(linger=0)
            self._req = None
            raise DeviceTimeout("cart", f"no answer to {cmd!r} from {self.control} within {timeout_s} s")
        return msgpack.unpackb(sock.recv(), raw=False)

    def call(self, cmd: str, args: dict | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        """Send a request; return its result or raise CartError."""
        reply = self.request(cmd, args, timeout_s)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise CartError(err.get("code", "?"), err.get("message", ""))
        return reply.get("result")

    # -------------------------------------------------------------- telemetry
    def subscribe(self, *topics: str) -> None:
        if self.telemetry is None:
            raise ValueError("no telemetry endpoint given")
        if self._sub is None:
            s = self.ctx.socket(zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVHWM, 1000)
            self._curve(s)
            s.connect(self.telemetry)
            self._sub = s
        for t in topics or ("",):
            self._sub.setsockopt(zmq.SUBSCRIBE, t.encode())

    def receive(self, timeout_s: float) -> tuple[str, dict, list[bytes]] | None:
        """The next telemetry message (topic, map, extra frames), or None after the timeout."""
        if self._sub is None or not self._sub.poll(int(timeout_s * 1000)):
            return None
        frames = self._sub.recv_multipart()
        return frames[0].decode("ascii", "replace"), msgpack.unpackb(frames[1], raw=False), frames[2:]

    def wait_for(self, topic: str, predicate=lambda m: True, timeout_s: float = 10.0) -> dict | None:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            got = self.receive(remaining)
            if got and got[0] == topic and predicate(got[1]):
                return got[1]

    def close(self) -> None:
        for s in (self._req, self._sub):
            if s is not None:
                s.close(linger=0)
        self._req = self._sub = None
