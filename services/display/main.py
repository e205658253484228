"""The surgical display: a read-only live view of the cart in a web browser.

Its own process (``nirf-display.service`` on the cart, started by the launcher in the
``sim`` profile). It subscribes to the telemetry endpoint with an *observer* key, so the
bus itself refuses it anything but reading, and serves one page over HTTP:

* ``GET /``, ``/display.css``, ``/display.js``: the page, shipped with the project;
* ``GET /events``: a Server-Sent Events stream of JSON updates (state, laser, result,
  ROIs, case, ages of the data, and the preview as a PNG whenever it changed);
* ``GET /snapshot.json`` and ``GET /preview.png``: the latest values, for a look by hand.

Anything else is refused (``405`` for any method but GET and HEAD): nothing on the page
can change the cart.

Each browser gets *the latest* values, never a queue: its stream thread waits for the
model to change, then sends the current snapshot. When a browser reads slowly, the sends
block and the versions in between are skipped; the small socket send buffer keeps at most
a frame or two in flight. The preview is PNG-encoded when a browser first asks for it, once
per preview whatever the number of browsers, and not at all while nobody looks.

"Stale": the page shows a STALE warning when no status or no frame has arrived for
``display.stale_after_s`` (1 s). The server reports the age of each kind of data in every
update (measured on its monotonic clock when the message arrived) and pushes an update at
least every :data:`HEARTBEAT_S` even when nothing changed; the page also warns when the
updates themselves stop (display service gone).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import socket
import sys
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from nirf import config as config_mod
from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import ConfigError, InvalidArgument, NirfError
from nirf.services.gateway import bus as bus_mod
from nirf.services.common import entry
from nirf.services.common import keys as keys_mod
from nirf.services.common import sdnotify
from nirf.services.processing.png import encode_png

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# path -> (file name, content type); nothing outside this list is ever served
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/display.css": ("display.css", "text/css; charset=utf-8"),
    "/display.js": ("display.js", "text/javascript; charset=utf-8"),
}
TOPICS = ("status", "result", "preview", "event")
# An update goes to every browser at least this often, so the ages on the page keep
# moving (and the STALE warning can appear) even when the cart has gone silent.
HEARTBEAT_S = 0.25
# Kernel send buffer per browser: about one preview. A slow browser then holds back at
# most a frame or two in the network; everything newer waits in the model as one value.
STREAM_SNDBUF_BYTES = 64 * 1024
# A browser that takes longer than this to accept a write is dropped (frees its slot).
STREAM_WRITE_TIMEOUT_S = 10.0
RECEIVE_POLL_MS = 200
# The listener takes telemetry in batches at most this often: a page that redraws a few times
# a second loses nothing by it (the newest result and preview of a batch are the ones shown),
# and the display wakes ten times a second instead of for each of the forty-odd messages.
RECEIVE_BATCH_S = 0.1
# The model keeps one value of these topics: of a batch, only the newest is read.
NEWEST_ONLY = (b"result", b"preview")
PREVIEW_ENCODE_TRIES = 3  # encodes outside the lock before one under it (a burst of previews)
# Telemetry batch drained per wake-up; bounded so the listener always comes back to check
# whether it should stop.
MAX_DRAIN = 200
EVENTS_KEPT = 5
# Previews larger than this are refused (the protocol's previews are a few hundred pixels).
MAX_PREVIEW_SIDE_PX = 2048

STATUS_KEYS = ("state", "faults", "interlock", "key", "footswitch", "indicator", "acquisition",
               "case", "profile", "t_ns", "seq")
RESULT_KEYS = ("frame_seq", "t_capture_ns", "t_done_ns", "t_ns", "intensity", "sbr", "cnr",
               "saturated_fraction", "valid", "flags", "positive", "threshold", "roi", "average")


def _clean(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy: NaN and infinities become null (browsers' JSON.parse refuses
    them), bytes become text, anything exotic its string form."""
    if depth > 8:
        return None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _pick(source: Any, keys) -> dict:
    if not isinstance(source, dict):
        return {}
    return {k: _clean(source[k]) for k in keys if k in source}


class DisplayModel:
    """The latest telemetry values, as the page shows them. Thread-safe.

    The telemetry listener feeds it (:meth:`handle`); each browser's stream thread waits
    for a newer :attr:`version` (:meth:`wait_newer`) and takes a :meth:`snapshot`. Only
    the latest value of each kind is kept, so memory does not grow with slow readers.
    """

    def __init__(self, stale_after_s: float = 1.0, clock: Clock | None = None,
                 compress_level: int = 1):
        if not (math.isfinite(stale_after_s) and stale_after_s > 0):
            raise InvalidArgument(f"display: stale_after_s = {stale_after_s!r}, must be a positive number")
        self.stale_after_s = float(stale_after_s)
        self.clock = clock or SystemClock()
        self.compress_level = compress_level
        self._cond = threading.Condition()
        self.version = 0
        self._status: dict = {}
        self._status_rx: float | None = None
        self._result: dict = {}
        self._result_rx: float | None = None
        self._preview: dict | None = None  # {"id", "width", "height", "frame_seq", "t_ns"}
        self._preview_rx: float | None = None
        self._preview_png: bytes | None = None
        self._preview_b64: str | None = None
        self._preview_raw = None  # the pixels of the latest preview until they are encoded
        self._preview_id = 0
        self._site: dict | None = None
        self._site_case: Any = None
        self._events: deque = deque(maxlen=EVENTS_KEPT)
        self.previews_encoded = 0
        self.messages_ignored = 0

    # ------------------------------------------------------------------ feeding
    def _bump(self) -> None:
        self.version += 1
        self._cond.notify_all()

    def handle(self, topic: str, body: Any, extra: list | tuple = ()) -> bool:
        """Take one telemetry message; False (and a log line) when it is not usable."""
        if not isinstance(body, dict):
            self.messages_ignored += 1
            log.warning("ignored a %r message whose body is not a map", topic)
            return False
        try:
            if topic == "status":
                self.on_status(body)
            elif topic == "result":
                self.on_result(body)
            elif topic == "preview":
                if len(extra) < 1:
                    raise InvalidArgument("preview without its pixel frame")
                self.on_preview(body, extra[0])
            elif topic == "event":
                self.on_event(body)
            else:
                self.messages_ignored += 1
                return False
        except InvalidArgument as err:
            self.messages_ignored += 1
            log.warning("ignored a %r message: %s", topic, err)
            return False
        return True

    def on_status(self, msg: dict) -> None:
        """A ``status`` map: the state, faults, laser and case."""
        status = _pick(msg, STATUS_KEYS)
        status["laser"] = _pick(msg.get("laser"), ("on", "power_mw", "setpoint_mw"))
        status["camera"] = _pick(msg.get("camera"), ("width", "height", "fps", "streaming"))
        status["filter"] = _pick(msg.get("filter"), ("name", "position", "moving"))
        with self._cond:
            if status.get("case") != self._site_case:
                # a site belongs to the case it was captured in
                self._site = None
                self._site_case = status.get("case")
            self._status = status
            self._status_rx = self.clock.monotonic()
            self._bump()

    def on_result(self, msg: dict) -> None:
        """A ``result`` map: SBR, CNR, the call, the threshold and the ROIs."""
        result = _pick(msg, RESULT_KEYS)
        with self._cond:
            self._result = result
            self._result_rx = self.clock.monotonic()
            self._bump()

    def on_event(self, msg: dict) -> None:
        """An ``event`` map; a capture's site becomes the site shown with the case."""
        kind = msg.get("kind")
        entry = {"kind": _clean(kind), "t_ns": _clean(msg.get("t_ns"))}
        for key in ("message", "code", "from", "to", "reason", "site", "label", "capture_id", "case_id"):
            if key in msg:
                entry[key] = _clean(msg[key])
        with self._cond:
            self._events.append(entry)
            if isinstance(msg.get("site"), str):
                self._site = {"site": msg["site"], "label": _clean(msg.get("label"))}
                self._site_case = self._status.get("case")
            self._bump()

    def on_preview(self, header: dict, pixels) -> None:
        """A ``preview``: map ``{width, height, format: "rgb8", frame_seq}`` and raw bytes.
        Encoded to PNG here, once, whatever the number of browsers."""
        fmt = header.get("format")
        width, height = header.get("width"), header.get("height")
        if fmt != "rgb8":
            raise InvalidArgument(f"preview format {fmt!r}: only 'rgb8' is shown")
        for name, side in (("width", width), ("height", height)):
            if not isinstance(side, int) or isinstance(side, bool) or not 1 <= side <= MAX_PREVIEW_SIDE_PX:
                raise InvalidArgument(f"preview {name} = {side!r}: allowed 1 to {MAX_PREVIEW_SIDE_PX}")
        data = pixels.buffer if hasattr(pixels, "buffer") else pixels
        if len(memoryview(data).cast("B")) != width * height * 3:
            raise InvalidArgument(f"preview of {len(memoryview(data).cast('B'))} bytes for {width}x{height} rgb8")
        with self._cond:
            self._preview_id += 1
            self._preview = {"id": self._preview_id, "width": width, "height": height,
                             "frame_seq": _clean(header.get("frame_seq")), "t_ns": _clean(header.get("t_ns"))}
            self._preview_raw = data  # encoded when a browser first asks (_preview_encoded)
            self._preview_png = self._preview_b64 = None
            self._preview_rx = self.clock.monotonic()
            self._bump()

    def _preview_encoded(self) -> tuple[dict, bytes, str] | None:
        """The latest preview as (id, PNG, base64), encoded on the first request for it and
        kept for every later one: once per preview whatever the number of browsers, and not
        at all while nobody looks (the encode is most of this process's work). The encode
        runs outside the lock, so telemetry is never held up by it."""
        with self._cond:
            if self._preview is None:
                return None
            meta, raw = dict(self._preview), self._preview_raw
            if self._preview_png is not None:
                return meta, self._preview_png, self._preview_b64
        png, b64 = self._encode(raw, meta)
        with self._cond:
            self.previews_encoded += 1
            if self._preview is not None and self._preview["id"] == meta["id"]:
                self._preview_png, self._preview_b64 = png, b64
                self._preview_raw = None
        return meta, png, b64

    # ------------------------------------------------------------------ reading
    def wait_newer(self, version: int, timeout_s: float) -> int:
        """Wait until :attr:`version` is above ``version`` or the timeout passes; return the
        current version either way."""
        with self._cond:
            if self.version <= version and timeout_s > 0:
                self._cond.wait_for(lambda: self.version > version, timeout=timeout_s)
            return self.version

    def wake_all(self) -> None:
        """Wake every waiting stream (used when stopping)."""
        with self._cond:
            self._cond.notify_all()

    def latest_png(self) -> bytes | None:
        """The latest preview as PNG bytes, or None before the first one."""
        encoded = self._preview_encoded()
        return None if encoded is None else encoded[1]

    def _age(self, rx: float | None, now: float) -> float | None:
        return None if rx is None else max(0.0, now - rx)

    def snapshot(self, have_preview_id: int | None = None) -> dict:
        """The values for the page. The PNG is included only when its id differs from
        ``have_preview_id`` (the one the browser already has).

        The snapshot is consistent: its preview (and its PNG) is the newest at its version.
        The encode runs outside the lock; should a newer preview come in meanwhile, it is
        encoded in turn (PREVIEW_ENCODE_TRIES times, then under the lock)."""
        for _ in range(PREVIEW_ENCODE_TRIES):
            with self._cond:
                wanted = self._preview is not None and self._preview["id"] != have_preview_id
                if not wanted or self._preview_png is not None:
                    return self._snapshot_locked(wanted)
            self._preview_encoded()  # kept when that preview is still the newest
        with self._cond:
            if self._preview is not None and self._preview_png is None:
                self._preview_png, self._preview_b64 = self._encode_locked()
            return self._snapshot_locked(self._preview is not None and self._preview["id"] != have_preview_id)

    def _encode_locked(self) -> tuple[bytes, str]:
        encoded = self._encode(self._preview_raw, self._preview)
        self._preview_raw = None
        self.previews_encoded += 1
        return encoded

    def _encode(self, raw, meta: dict) -> tuple[bytes, str]:
        """One preview as (PNG, base64)."""
        png = encode_png(raw, meta["width"], meta["height"], channels=3, compress_level=self.compress_level)
        return png, base64.b64encode(png).decode("ascii")

    def _snapshot_locked(self, with_png: bool) -> dict:
        now = self.clock.monotonic()
        status_age = self._age(self._status_rx, now)
        preview_age = self._age(self._preview_rx, now)
        result_age = self._age(self._result_rx, now)
        preview = None
        if self._preview is not None:
            preview = dict(self._preview)
            if with_png:
                preview["png_b64"] = self._preview_b64
        status = self._status
        # fluorescence pairs (and so previews) come only while the laser may emit
        acquiring = status.get("acquisition") == "fluorescence" and status.get("state") == "EMITTING"
        status_stale = status_age is None or status_age > self.stale_after_s
        image_stale = preview_age is None or preview_age > self.stale_after_s
        return {
            "v": self.version,
            "server_time_ns": self.clock.time_ns(),
            "stale_after_s": self.stale_after_s,
            "status_age_s": status_age,
            "result_age_s": result_age,
            "preview_age_s": preview_age,
            # The page shows STALE when the cart is silent, or when it should be sending
            # frames (fluorescence acquisition on) and none came.
            "stale": bool(status_stale or (acquiring and image_stale)),
            "status_stale": bool(status_stale),
            "image_stale": bool(image_stale),
            "status": status,
            "result": self._result,
            "preview": preview,
            "case": {"id": status.get("case"), **(self._site or {})},
            "events": list(self._events),
        }


class TelemetryListener:
    """Subscribes to the telemetry endpoint (CURVE, observer key) and feeds the model.

    It wakes when telemetry arrives, lets a batch gather for :data:`RECEIVE_BATCH_S`, drains
    it, reads only the newest result and the newest preview of the batch (the model keeps one
    of each; a burst of previews costs one PNG encode) and hands everything else (statuses,
    events) over in order.
    """

    def __init__(self, model: DisplayModel, ctx: zmq.Context, endpoint: str,
                 server_public: bytes, client_public: bytes, client_secret: bytes,
                 watchdog=lambda: None):
        self.model = model
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        # A modest queue: statuses and results are small; previews are dropped by the
        # publisher rather than piling up here when this process falls behind.
        self.sock.setsockopt(zmq.RCVHWM, 100)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4 * 1024 * 1024)
        keys_mod.make_curve_client(self.sock, server_public, client_public, client_secret)
        for topic in TOPICS:
            self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sock.connect(endpoint)
        self.stop_event = threading.Event()
        self.watchdog = watchdog
        self.received = 0
        self._thread = threading.Thread(target=self._run, name="display-telemetry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        """True while the receive thread runs."""
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.watchdog()
                if not self.sock.poll(RECEIVE_POLL_MS):
                    continue
                if self.stop_event.wait(RECEIVE_BATCH_S):  # let the batch gather
                    break
                batch = []
                for _ in range(MAX_DRAIN):
                    try:
                        batch.append(self.sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                self._deliver(batch)
        except zmq.ZMQError as err:
            if not self.stop_event.is_set():
                log.error("telemetry receive failed on %s: %s", self.endpoint, err)
        finally:
            self.sock.close(linger=0)

    def _deliver(self, batch: list) -> None:
        # Of NEWEST_ONLY, only a batch's newest message that decodes is read. Statuses and
        # events all go over, in order.
        chosen: dict[int, dict] = {}
        for topic in NEWEST_ONLY:
            for i in range(len(batch) - 1, -1, -1):
                frames = batch[i]
                if len(frames) >= 2 and frames[0] == topic:
                    body = self._decode(frames)
                    if body is not None:
                        chosen[i] = body
                        break
        for i, frames in enumerate(batch):
            self.received += 1
            if len(frames) < 2:
                continue
            if frames[0] in NEWEST_ONLY:
                body = chosen.get(i)
            else:
                body = self._decode(frames)
            if body is None:
                continue
            topic = frames[0].decode("ascii", "replace")
            try:
                self.model.handle(topic, body, frames[2:])
            except Exception:  # one odd message must not end the display
                log.exception("could not show a %r message", topic)

    @staticmethod
    def _decode(frames) -> dict | None:
        try:
            body = bus_mod.unpack(frames[1])
        except ValueError as err:
            log.warning("ignored an undecodable %r message: %s", frames[0][:32], err)
            return None
        if not isinstance(body, dict):
            log.warning("ignored a %r message that is not a map", frames[0][:32])
            return None
        return body

    def stop(self, timeout_s: float = 2.0) -> None:
        self.stop_event.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)


# C8: idle connections time out, connections are capped (at the cap the oldest idle one is
# closed to make room), and the Host header must name this display.
IDLE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
LISTEN_BACKLOG = 256


class DisplayHTTPServer(ThreadingHTTPServer):
    """Serves the page and one update stream per browser, each in its own thread.

    A connection is *idle* from its accept until its request line has arrived, and between
    requests of a kept-alive connection; the live stream is never idle. Idle connections are
    closed after :data:`IDLE_TIMEOUT_S`, and when :data:`MAX_CONNECTIONS` are open the oldest
    idle one is closed for the newcomer, so a flood of silent connections cannot starve
    the page."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], model: DisplayModel, *, max_update_hz: float = 25.0,
                 max_clients: int = 8, static_dir: Path = STATIC_DIR, clock: Clock | None = None):
        self.model = model
        self.clock = clock or SystemClock()
        self.min_interval_s = 1.0 / max_update_hz
        self.client_slots = threading.BoundedSemaphore(max_clients)
        self.max_clients = max_clients
        self.stopping = threading.Event()
        self.static = {}
        for path, (name, ctype) in STATIC_FILES.items():
            try:
                self.static[path] = ((static_dir / name).read_bytes(), ctype)
            except OSError as err:
                raise ConfigError(f"display: page file {name} missing from {static_dir}: {err.strerror}") from err
        self._streams_lock = threading.Lock()
        self.streams_open = 0
        self._conn_lock = threading.Lock()
        self._conns: dict = {}  # socket -> [accepted monotonic, idle]
        self.max_connections = MAX_CONNECTIONS
        self.closed_for_room = 0
        host, port = address
        self.allowed_hosts = {f"{h}:{port}" for h in (host, "localhost", "127.0.0.1", "[::1]")} | \
            {h for h in (host, "localhost", "127.0.0.1", "[::1]")}
        super().__init__(address, DisplayRequestHandler)
        real_port = self.server_address[1]
        self.allowed_hosts |= {f"{h}:{real_port}" for h in (host, "localhost", "127.0.0.1", "[::1]")}

    # -- connection bookkeeping (C8)
    def process_request(self, request, client_address):
        with self._conn_lock:
            if len(self._conns) >= self.max_connections:
                idle = [(since, s) for s, (since, is_idle) in self._conns.items() if is_idle]
                if idle:
                    _, oldest = min(idle, key=lambda x: x[0])
                    self._conns.pop(oldest, None)
                    self.closed_for_room += 1
                    try:
                        oldest.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                else:  # every connection is busy (live streams): refuse the newcomer
                    self.shutdown_request(request)
                    return
            self._conns[request] = [time.monotonic(), True]
        super().process_request(request, client_address)

    def mark(self, request, idle: bool) -> None:
        with self._conn_lock:
            entry = self._conns.get(request)
            if entry is not None:
                entry[0], entry[1] = time.monotonic(), idle

    def shutdown_request(self, request):
        with self._conn_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)

    def host_allowed(self, host: str) -> bool:
        """The Host header names this display: its address, localhost, or (bound to every
        interface) an IP address or this machine's name. Anything else is a page from
        another site asking through the browser (DNS rebinding): refused."""
        if host in self.allowed_hosts:
            return True
        if self.server_address[0] not in ("0.0.0.0", "::"):
            return False
        name, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
        if port and port != str(self.server_address[1]):
            return False
        names = {socket.gethostname().lower(), socket.gethostname().lower() + ".local"}
        return bool(re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,3}){3}", name)) or name in names

    @property
    def connections_open(self) -> int:
        with self._conn_lock:
            return len(self._conns)

    def handle_error(self, request, client_address) -> None:
        """A browser that goes away mid-answer is normal; anything else is logged (the
        default prints to stderr, outside logging)."""
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)):
            log.debug("display: %s went away: %s", client_address[0], err)
        else:
            log.exception("display: request from %s failed", client_address[0])

    def close_streams(self) -> None:
        self.stopping.set()
        self.model.wake_all()


class DisplayRequestHandler(BaseHTTPRequestHandler):
    """GET and HEAD only; every other method is refused with 405."""

    server: DisplayHTTPServer
    server_version = "nirf-display"
    sys_version = ""
    timeout = IDLE_TIMEOUT_S  # a connection that sends nothing is closed (C8)

    def handle_one_request(self) -> None:
        self.server.mark(self.request, idle=True)
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.server.mark(self.request, idle=False)
            host = (self.headers.get("Host") or "").strip().lower()
            if not self.server.host_allowed(host):
                self.send_error(HTTPStatus.MISDIRECTED_REQUEST, "unknown Host")
                return False
        return ok

    # Browsers probe with several methods; none of them may change anything.
    def _refuse(self) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def log_message(self, fmt, *args) -> None:  # route the access log through logging
        log.debug("%s %s", self.address_string(), fmt % args)

    def _common_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        # Only the project's own files: no scripts or images from anywhere else.
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                         "connect-src 'self'; frame-ancestors 'none'; form-action 'none'")

    def _send_body(self, body: bytes, ctype: str, status: int = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self._common_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in self.server.static:
            body, ctype = self.server.static[path]
            self._send_body(body, ctype)
        elif path == "/events":
            self._stream()
        elif path == "/snapshot.json":
            snap = self.server.model.snapshot()
            if snap["preview"]:
                snap["preview"].pop("png_b64", None)
            self._send_body(json.dumps(snap).encode(), "application/json")
        elif path == "/preview.png":
            png = self.server.model.latest_png()
            if png is None:
                self._send_body(b"no preview yet\n", "text/plain; charset=utf-8", HTTPStatus.NOT_FOUND)
            else:
                self._send_body(png, "image/png")
        else:
            self._send_body(b"not found\n", "text/plain; charset=utf-8", HTTPStatus.NOT_FOUND)

    def _stream(self) -> None:
        srv = self.server
        if not srv.client_slots.acquire(blocking=False):
            self._send_body(f"busy: at most {srv.max_clients} displays at once\n".encode(),
                            "text/plain; charset=utf-8", HTTPStatus.SERVICE_UNAVAILABLE)
            return
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF_BYTES)
            self.connection.settimeout(STREAM_WRITE_TIMEOUT_S)
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self._common_headers()
            self.end_headers()
            if self.command == "HEAD":
                return
            # Reconnect quickly after the display service restarts.
            self.wfile.write(b"retry: 500\n\n")
            self.wfile.flush()
            with srv._streams_lock:
                srv.streams_open += 1
            try:
                self._push_updates()
            finally:
                with srv._streams_lock:
                    srv.streams_open -= 1
        except OSError as err:  # the browser went away or stopped reading
            log.debug("display stream to %s ended: %s", self.address_string(), err)
        finally:
            srv.client_slots.release()
            self.close_connection = True

    def _push_updates(self) -> None:
        srv = self.server
        model = srv.model
        sent_version = -1
        have_preview_id = None
        last_sent = -math.inf
        while not srv.stopping.is_set():
            model.wait_newer(sent_version, HEARTBEAT_S)
            if srv.stopping.is_set():
                return
            # Rate cap per browser; whatever changes meanwhile is folded into one update.
            pause_s = last_sent + srv.min_interval_s - srv.clock.monotonic()
            if pause_s > 0 and srv.stopping.wait(pause_s):
                return
            snap = model.snapshot(have_preview_id)
            data = json.dumps(snap, separators=(",", ":"), allow_nan=False).encode()
            self.wfile.write(b"data: " + data + b"\n\n")
            self.wfile.flush()
            last_sent = srv.clock.monotonic()
            sent_version = snap["v"]
            if snap["preview"] is not None:
                have_preview_id = snap["preview"]["id"]


class DisplayService:
    """The display process's parts: the model, the telemetry listener and the web server.

    ``start()`` binds the HTTP address (raises :class:`ConfigError` naming the address when
    it is taken) and starts both threads; ``stop()`` ends them. ``url`` is the page's
    address.
    """

    def __init__(self, cfg, state_dir: Path, *, context: zmq.Context | None = None,
                 clock: Clock | None = None, telemetry_endpoint: str | None = None,
                 port: int | None = None):
        self.cfg = cfg
        self.clock = clock or SystemClock()
        d = cfg.display
        self.model = DisplayModel(d.stale_after_s, self.clock)
        self.ctx = context or zmq.Context()
        self._own_ctx = context is None
        kd = keys_mod.keys_dir(state_dir)
        key_file = Path(d.key_file) if d.key_file else kd / f"{keys_mod.DISPLAY_KEY_NAME}.key_secret"
        if not key_file.exists() and not d.key_file and cfg.profile == "sim":
            key_file = keys_mod.ensure_display_key(state_dir)
        for path, what in ((kd / "server.key", "the cart's public key"), (key_file, "the display's observer key")):
            if not path.exists():
                raise ConfigError(f"display: {what} not found at {path}; on the device create it at install "
                                  "(see the display's documentation)")
        server_public, _ = zmq.auth.load_certificate(str(kd / "server.key"))
        client_public, client_secret = keys_mod.load_client_keys(key_file)
        endpoint = telemetry_endpoint or cfg.bus.telemetry_endpoint.replace("0.0.0.0", "127.0.0.1")
        self.pinger = sdnotify.WatchdogPinger()
        self.listener = TelemetryListener(self.model, self.ctx, endpoint, server_public, client_public,
                                          client_secret, watchdog=self.pinger)
        bind = (d.bind_address, d.port if port is None else port)
        try:
            self.http = DisplayHTTPServer(bind, self.model, max_update_hz=d.max_update_hz,
                                          max_clients=d.max_clients, clock=self.clock)
        except OSError as err:
            self.listener.sock.close(linger=0)
            raise ConfigError(f"display: cannot listen on {bind[0]}:{bind[1]} ({err.strerror}); "
                              "set [display] bind_address / port") from err
        self._http_thread = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.2},
                                             name="display-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> None:
        self.listener.start()
        self._http_thread.start()
        log.info("surgical display at %s (telemetry from %s)", self.url, self.listener.endpoint)

    def stop(self) -> None:
        self.http.close_streams()
        self.http.shutdown()
        self.http.server_close()
        self.listener.stop()
        if self._own_ctx:
            self.ctx.destroy(linger=0)


def main(argv=None) -> int:
    p = entry.parser("NIRF surgical display: a read-only live view in a browser")
    p.add_argument("--port", type=int, default=None, help="override [display] port")
    args = p.parse_args(argv)
    entry.configure_logging("display")
    stop = threading.Event()
    entry.stop_on_signals(stop)
    try:
        cfg = config_mod.load(args.config)
        svc = DisplayService(cfg, cfg.state_dir(), port=args.port)
    except NirfError as err:
        log.error("cannot start: %s", err)
        return 2
    svc.start()
    sdnotify.ready()
    sdnotify.status(f"serving {svc.url}")
    try:
        while not stop.wait(0.5):
            if not svc.listener.is_alive():
                log.error("the telemetry listener stopped; exiting so the service is restarted")
                return 1
    finally:
        sdnotify.stopping()
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
