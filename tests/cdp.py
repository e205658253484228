"""A small headless-Chromium driver for the display's end-to-end test, standard library only.

Chromium is started with ``--remote-debugging-port=0``: it picks a free port and writes it
to ``DevToolsActivePort`` in its profile folder. The page's DevTools endpoint is found
through the HTTP ``/json/list`` listing and spoken to over a WebSocket (RFC 6455) with
JSON commands ``{"id", "method", "params"}``; replies carry the same id, and events (no
id) are skipped. Every wait has a deadline, and the browser runs in its own process group,
killed as a whole on :meth:`Chromium.stop`.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from nirf.hal.clock import Clock, SystemClock

CHROMIUM = "/usr/bin/chromium"
# Without these, headless Chromium on a machine with no network waits on connections
# (component updates, sync, QUIC probes) and the tests hang.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
)
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # fixed by RFC 6455
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class CdpError(RuntimeError):
    """DevTools answered a command with an error, or a page script threw."""


class WebSocket:
    """The client side of RFC 6455, just enough for DevTools: text messages, masked
    frames out, fragmented frames in, ping answered, close honoured."""

    def __init__(self, url: str, timeout_s: float = 10.0):
        parts = urlparse(url)
        if parts.scheme != "ws":
            raise ValueError(f"websocket url {url!r}: only ws:// is supported")
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout_s)
        self._buf = b""
        key = base64.b64encode(os.urandom(16))
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        request = (f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        deadline = time.monotonic() + timeout_s
        while b"\r\n\r\n" not in self._buf:
            self._fill(deadline)
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise CdpError(f"websocket handshake refused: {lines[0]}")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        expected = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise CdpError("websocket handshake: wrong Sec-WebSocket-Accept")

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("websocket: no data before the deadline")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 16)
        except socket.timeout as err:
            raise TimeoutError("websocket: no data before the deadline") from err
        if not chunk:
            raise ConnectionError("websocket: the browser closed the connection")
        self._buf += chunk

    def _take(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            self._fill(deadline)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        # XOR with the repeating 4-byte mask, done on one big integer rather than per byte
        reps = mask * (n // 4 + 1)
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(reps[:n], "big")).to_bytes(n, "big") if n else b""
        self.sock.sendall(head + mask + masked)

    def send_text(self, text: str) -> None:
        self._send_frame(_OP_TEXT, text.encode("utf-8"))

    def recv_text(self, timeout_s: float) -> str:
        """The next whole text message; TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        parts: list[bytes] = []
        while True:
            b0, b1 = self._take(2, deadline)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._take(2, deadline))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._take(8, deadline))
            mask = self._take(4, deadline) if b1 & 0x80 else None
            payload = self._take(n, deadline)
            if mask:
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            if opcode == _OP_PING:
                self._send_frame(_OP_PONG, payload)
                continue
            if opcode == _OP_PONG:
                continue
            if opcode == _OP_CLOSE:
                raise ConnectionError("websocket: the browser sent close")
            if opcode in (_OP_TEXT, _OP_BINARY, _OP_CONT):
                parts.append(payload)
                if fin:
                    return b"".join(parts).decode("utf-8")

    def close(self) -> None:
        try:
            self._send_frame(_OP_CLOSE, b"")
        except OSError:
            pass
        self.sock.close()


class Page:
    """One browser tab, driven over DevTools."""

    def __init__(self, ws_url: str, clock: Clock | None = None):
        self.ws = WebSocket(ws_url)
        self.clock = clock or SystemClock()
        self._ids = itertools.count(1)

    def call(self, method: str, params: dict | None = None, timeout_s: float = 10.0) -> dict:
        """Send a DevTools command and return its result."""
        msg_id = next(self._ids)
        self.ws.send_text(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = self.clock.monotonic() + timeout_s
        while True:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"DevTools: no answer to {method} within {timeout_s} s")
            reply = json.loads(self.ws.recv_text(remaining))
            if reply.get("id") != msg_id:
                continue  # an event, or the late answer to an earlier call
            if "error" in reply:
                raise CdpError(f"{method}: {reply['error']}")
            return reply.get("result", {})

    def evaluate(self, expression: str, timeout_s: float = 10.0):
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True}, timeout_s)
        if "exceptionDetails" in res:
            detail = res["exceptionDetails"]
            text = detail.get("exception", {}).get("description") or detail.get("text")
            raise CdpError(f"page script failed: {text}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float, interval_s: float = 0.05):
        """Poll ``expression`` until it is truthy; return its value. TimeoutError (with the
        last value seen) when the deadline passes."""
        deadline = self.clock.monotonic() + timeout_s
        last = None
        while True:
            last = self.evaluate(expression, timeout_s=max(1.0, deadline - self.clock.monotonic()))
            if last:
                return last
            if self.clock.monotonic() >= deadline:
                raise TimeoutError(f"{expression!r} still {last!r} after {timeout_s} s")
            self.clock.sleep(interval_s)

    def navigate(self, url: str, timeout_s: float = 15.0) -> None:
        """Open ``url`` and wait until the document has loaded."""
        self.call("Page.enable")
        self.call("Page.navigate", {"url": url}, timeout_s)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", timeout_s)

    def set_viewport(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the visible page."""
        res = self.call("Page.captureScreenshot", {"format": "png"}, timeout_s=20.0)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(res["data"]))
        return path

    def close(self) -> None:
        self.ws.close()


class Chromium:
    """A headless Chromium in its own process group, with a throw-away profile."""

    def __init__(self, binary: str = CHROMIUM, width: int = 1920, height: int = 1080,
                 clock: Clock | None = None):
        self.binary = binary
        self.width, self.height = width, height
        self.clock = clock or SystemClock()
        self.profile_dir = Path(tempfile.mkdtemp(prefix="nirf-chromium-"))
        self.log_path = self.profile_dir / "chromium.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout_s: float = 30.0) -> "Chromium":
        cmd = [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile_dir}",
               "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
               f"--window-size={self.width},{self.height}", "about:blank"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        port_file = self.profile_dir / "DevToolsActivePort"
        deadline = self.clock.monotonic() + timeout_s
        while True:
            if port_file.exists():
                first = port_file.read_text().split("\n", 1)[0].strip()
                if first.isdigit():
                    self.port = int(first)
                    return self
            if self.proc.poll() is not None:
                raise CdpError(f"chromium exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            if self.clock.monotonic() >= deadline:
                raise TimeoutError(f"chromium did not open its DevTools port within {timeout_s} s: "
                                   f"{self.log_text()[-2000:]}")
            self.clock.sleep(0.05)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def new_page(self, timeout_s: float = 10.0) -> Page:
        """Attach to the browser's first tab."""
        deadline = self.clock.monotonic() + timeout_s
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=timeout_s) as r:
                targets = json.loads(r.read())
            pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            if pages:
                page = Page(pages[0]["webSocketDebuggerUrl"], self.clock)
                page.set_viewport(self.width, self.height)
                return page
            if self.clock.monotonic() >= deadline:
                raise TimeoutError("chromium shows no page to attach to")
            self.clock.sleep(0.1)

    def stop(self) -> None:
        """Kill the whole process group (Chromium starts several processes)."""
        if self.proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                try:
                    self.proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.profile_dir, ignore_errors=True)
