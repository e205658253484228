"""The surgical display: PNG encoding, the latest-value model and its staleness, the
read-only web server and its update stream, the observer key, and, end to end, the page
in headless Chromium against the whole simulated cart."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth

from nirf import config as config_mod
from nirf.hal.clock import ManualClock
from nirf.hal.errors import InvalidArgument
from nirf.services.common import keys as keys_mod
from nirf.services.display.main import DisplayHTTPServer, DisplayModel, TelemetryListener
from nirf.services.processing.png import encode_png
from tests.cartproc import ROOT, free_port, start_cart

ARTIFACTS = ROOT / "test-artifacts"


# --------------------------------------------------------------------------- PNG
def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def decode_png(data: bytes) -> tuple[int, int, int, np.ndarray]:
    """An independent reader for 8-bit grey/RGB PNGs (all five filter types), checking
    every chunk's CRC: (width, height, colour type, pixels)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind}"
        chunks.append((kind, body))
        pos += 12 + n
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and interlace == 0
    bpp = {0: 1, 2: 3}[colour]
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    stride = width * bpp
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = [0] * stride
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], list(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
            pred = {0: 0, 1: a, 2: b, 3: (a + b) // 2, 4: _paeth(a, b, c)}[ftype]
            line[x] = (line[x] + pred) & 0xFF
        out[y] = line
        prev = line
    return width, height, colour, out.reshape(height, width, bpp) if bpp > 1 else out


def test_png_round_trips_rgb_and_grey():
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    w, h, colour, back = decode_png(encode_png(rgb.tobytes(), 23, 17))
    assert (w, h, colour) == (23, 17, 2)
    assert np.array_equal(back, rgb)
    grey = rng.integers(0, 256, size=(5, 9), dtype=np.uint8)
    w, h, colour, back = decode_png(encode_png(grey))
    assert (w, h, colour) == (9, 5, 0)
    assert np.array_equal(back, grey)


def test_png_compresses_a_smooth_preview():
    ramp = np.linspace(0, 255, 182, dtype=np.float32)
    img = np.repeat(np.stack([ramp, ramp[::-1], np.full_like(ramp, 40)], axis=-1)[None], 136, axis=0)
    png = encode_png(img.astype(np.uint8))
    assert len(png) < img.size // 10


@pytest.mark.parametrize("kwargs, words", [
    (dict(pixels=b"\0" * 11, width=2, height=2), ["11 bytes", "2x2x3", "12"]),
    (dict(pixels=b"", width=0, height=2), ["width = 0"]),
    (dict(pixels=b"\0" * 12, width=2, height=2, channels=4), ["channels = 4"]),
    (dict(pixels=np.zeros((2, 2, 3), dtype=np.uint16)), ["uint16"]),
])
def test_png_refuses_data_that_does_not_fit(kwargs, words):
    pixels = kwargs.pop("pixels")
    with pytest.raises(InvalidArgument) as err:
        encode_png(pixels, **kwargs)
    for word in words:
        assert word in str(err.value)


# --------------------------------------------------------------------------- model
def _status(state="SAFE", acquisition="off", case=None, **extra):
    return {"state": state, "faults": [], "laser": {"on": state == "EMITTING", "power_mw": 50.0,
                                                    "setpoint_mw": 50.0, "temp_c": 25.0},
            "interlock": "closed", "key": True, "acquisition": acquisition, "case": case,
            "camera": {"width": 728, "height": 544, "fps": 30.0}, "profile": "sim", "seq": 1, "t_ns": 1, **extra}


def _preview(seq=1, w=4, h=3, value=0):
    return {"width": w, "height": h, "format": "rgb8", "frame_seq": seq, "t_ns": 5}, bytes([value]) * (w * h * 3)


def _feed_preview(model, **kw) -> bool:
    header, pixels = _preview(**kw)
    return model.handle("preview", header, [pixels])


def test_status_goes_stale_after_the_configured_time():
    clock = ManualClock()
    model = DisplayModel(stale_after_s=1.0, clock=clock)
    assert model.snapshot()["stale"] and model.snapshot()["status_stale"]  # nothing yet
    model.handle("status", _status())
    snap = model.snapshot()
    assert not snap["stale"] and snap["status"]["state"] == "SAFE"
    clock.advance(0.9)
    assert not model.snapshot()["stale"]
    clock.advance(0.2)
    snap = model.snapshot()
    assert snap["stale"] and snap["status_stale"] and snap["status_age_s"] == pytest.approx(1.1)


def test_the_image_counts_as_stale_only_while_frames_are_expected():
    clock = ManualClock()
    model = DisplayModel(stale_after_s=1.0, clock=clock)
    model.handle("status", _status("EMITTING", acquisition="off"))
    snap = model.snapshot()
    assert snap["image_stale"] and not snap["stale"]  # no acquisition, no frames expected
    model.handle("status", _status("SAFE", acquisition="fluorescence"))
    assert not model.snapshot()["stale"]  # no pairs without emission
    model.handle("status", _status("EMITTING", acquisition="fluorescence"))
    assert model.snapshot()["stale"]
    _feed_preview(model)
    assert not model.snapshot()["stale"]
    clock.advance(1.5)
    model.handle("status", _status("EMITTING", acquisition="fluorescence"))
    snap = model.snapshot()
    assert snap["stale"] and snap["image_stale"] and not snap["status_stale"]


def test_the_png_goes_only_to_a_browser_that_lacks_it():
    model = DisplayModel(clock=ManualClock())
    assert _feed_preview(model, seq=8, w=5, h=2, value=200)
    first = model.snapshot()
    assert "png_b64" in first["preview"] and first["preview"]["frame_seq"] == 8
    w, h, _, px = decode_png(base64.b64decode(first["preview"]["png_b64"]))
    assert (w, h) == (5, 2) and int(px.min()) == 200
    again = model.snapshot(have_preview_id=first["preview"]["id"])
    assert "png_b64" not in again["preview"]
    _feed_preview(model, seq=10)
    assert "png_b64" in model.snapshot(have_preview_id=first["preview"]["id"])["preview"]


def test_a_preview_is_encoded_once_when_asked_for_and_not_at_all_when_nobody_looks():
    model = DisplayModel(clock=ManualClock())
    for seq in range(5):  # nobody looks: raw pixels kept, nothing encoded
        assert _feed_preview(model, seq=seq, w=5, h=2, value=100 + seq)
    assert model.previews_encoded == 0
    snaps = [model.snapshot() for _ in range(3)]  # three browsers without it
    png = model.latest_png()
    assert model.previews_encoded == 1
    assert all(s["preview"]["frame_seq"] == 4 and s["preview"]["png_b64"] == snaps[0]["preview"]["png_b64"]
               for s in snaps)
    w, h, _, px = decode_png(png)
    assert (w, h) == (5, 2) and int(px.min()) == 104  # the newest preview's pixels
    assert base64.b64decode(snaps[0]["preview"]["png_b64"]) == png


def test_a_preview_that_comes_in_during_an_encode_is_the_one_the_snapshot_carries(monkeypatch):
    # the encode runs outside the lock: a newer preview arriving meanwhile must not leave the
    # browser with the older picture at the newer version (it would wait for a change that
    # already happened)
    import nirf.services.display.main as display_main

    model = DisplayModel(clock=ManualClock())
    assert _feed_preview(model, seq=1, w=5, h=2, value=10)
    real = display_main.encode_png
    calls = []

    def encode_and_meanwhile_a_new_preview(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            assert _feed_preview(model, seq=2, w=5, h=2, value=20)
        return real(*a, **kw)

    monkeypatch.setattr(display_main, "encode_png", encode_and_meanwhile_a_new_preview)
    snap = model.snapshot()
    assert snap["v"] == model.version and snap["preview"]["frame_seq"] == 2
    _, _, _, px = decode_png(base64.b64decode(snap["preview"]["png_b64"]))
    assert int(px.min()) == 20 and len(calls) == 2


def test_a_preview_whose_bytes_do_not_match_its_size_is_refused():
    model = DisplayModel(clock=ManualClock())
    assert model.handle("preview", {"format": "rgb8", "width": 4, "height": 4, "frame_seq": 1}, [b"\0" * 10]) is False
    assert model.snapshot()["preview"] is None


def test_results_with_nan_become_valid_json():
    model = DisplayModel(clock=ManualClock())
    model.handle("result", {"frame_seq": 3, "sbr": float("nan"), "cnr": float("inf"), "valid": False,
                            "flags": ["background_not_positive"], "threshold": 2.0,
                            "roi": {"signal": [1, 2, 3, 4], "background": [5, 6, 7, 8]}, "extra": "dropped"})
    text = json.dumps(model.snapshot(), allow_nan=False)
    result = json.loads(text)["result"]
    assert result["sbr"] is None and result["cnr"] is None and "extra" not in result
    assert result["roi"]["signal"] == [1, 2, 3, 4]


@pytest.mark.parametrize("topic, body, extra", [
    ("preview", {"width": 4, "height": 3, "format": "bgr8", "frame_seq": 1}, [b"\0" * 36]),
    ("preview", {"width": 4, "height": 3, "format": "rgb8", "frame_seq": 1}, [b"\0" * 35]),
    ("preview", {"width": 10**6, "height": 3, "format": "rgb8", "frame_seq": 1}, [b"\0" * 36]),
    ("preview", {"width": 4, "height": 3, "format": "rgb8", "frame_seq": 1}, []),
    ("status", ["not", "a", "map"], []),
    ("weather", {"sunny": True}, []),
])
def test_unusable_messages_are_ignored_and_change_nothing(topic, body, extra):
    model = DisplayModel(clock=ManualClock())
    before = model.version
    assert model.handle(topic, body, extra) is False
    assert model.version == before and model.messages_ignored == 1


def test_a_capture_site_shows_with_its_case_and_goes_with_it():
    model = DisplayModel(clock=ManualClock())
    model.handle("status", _status(case="P-017"))
    model.handle("event", {"kind": "capture", "site": "tumor_bed", "label": "12 o'clock", "capture_id": 4})
    assert model.snapshot()["case"] == {"id": "P-017", "site": "tumor_bed", "label": "12 o'clock"}
    model.handle("status", _status(case=None))
    assert model.snapshot()["case"] == {"id": None}


def test_wait_newer_returns_at_once_when_there_is_news_and_after_the_timeout_otherwise():
    model = DisplayModel(clock=ManualClock())
    model.handle("status", _status())
    assert model.wait_newer(0, timeout_s=5.0) == 1
    assert model.wait_newer(1, timeout_s=0.01) == 1


# --------------------------------------------------------------------------- HTTP server
@pytest.fixture
def server():
    model = DisplayModel(stale_after_s=1.0)
    srv = DisplayHTTPServer(("127.0.0.1", 0), model, max_update_hz=50.0, max_clients=2)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.close_streams()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _url(srv, path):
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def test_the_page_and_its_files_are_served_from_the_project(server):
    with urllib.request.urlopen(_url(server, "/"), timeout=5) as r:
        html = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert "display.js" in html and "display.css" in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
    for path, kind in (("/display.js", "javascript"), ("/display.css", "css")):
        with urllib.request.urlopen(_url(server, path), timeout=5) as r:
            assert kind in r.headers["Content-Type"]
            assert b"http://" not in r.read() or path == "/display.css"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_the_display_refuses_anything_but_reading(server, method):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    try:
        conn.request(method, "/", body=b'{"cmd": "arm"}')
        r = conn.getresponse()
        assert r.status == 405 and r.getheader("Allow") == "GET, HEAD"
    finally:
        conn.close()


@pytest.mark.parametrize("path", ["/../config/__init__.py", "/display_main.py", "/static/../keys", "/preview.png"])
def test_unknown_paths_are_not_found(server, path):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(_url(server, path), timeout=5)
    assert err.value.code == 404


def _open_stream(srv, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(5)
    s.connect(("127.0.0.1", srv.server_address[1]))
    s.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{srv.server_address[1]}\r\n\r\n".encode())
    return s


def _read_events(s: socket.socket, count: int, timeout_s: float = 5.0, buf: bytearray | None = None) -> list[dict]:
    buf = buf if buf is not None else bytearray()
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count:
        while b"\n\n" not in buf:
            assert time.monotonic() < deadline, f"only {len(out)} events in {timeout_s} s"
            chunk = s.recv(65536)
            assert chunk, "stream closed"
            buf += chunk
        block, _, rest = bytes(buf).partition(b"\n\n")
        buf[:] = rest
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                out.append(json.loads(line[6:]))
    return out


def test_the_stream_pushes_the_latest_values_and_keeps_beating(server):
    s = _open_stream(server)
    try:
        buf = bytearray()
        first = _read_events(s, 1, buf=buf)[0]
        assert first["status"] == {} and first["stale"]
        server.model.handle("status", _status("ARMED"))
        got = _read_events(s, 1, buf=buf)[0]
        assert got["status"]["state"] == "ARMED"
        # nothing new: heartbeats still come, with the age growing
        beats = _read_events(s, 3, buf=buf)
        assert beats[-1]["status_age_s"] > got["status_age_s"]
    finally:
        s.close()


def test_a_slow_browser_gets_the_latest_not_a_queue(server):
    """While a browser does not read, the model moves on; when it reads again it sees only
    a few old updates (what fit in the socket buffers) and then the newest, never every
    version in between."""
    s = _open_stream(server, rcvbuf=4096)
    try:
        buf = bytearray()
        _read_events(s, 1, buf=buf)
        rng = np.random.default_rng(1)
        last_version = 0
        for seq in range(200):  # incompressible previews: each update is large
            px = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8).tobytes()
            server.model.handle("preview", {"width": 80, "height": 60, "format": "rgb8", "frame_seq": seq}, [px])
            last_version = server.model.version
        received = []
        deadline = time.monotonic() + 10
        while not received or received[-1]["v"] < last_version:
            assert time.monotonic() < deadline, "never caught up with the latest version"
            received += _read_events(s, 1, buf=buf)
        assert len(received) < 30, f"{len(received)} updates queued for a slow reader"
        assert received[-1]["preview"]["frame_seq"] == 199
    finally:
        s.close()


def test_browsers_beyond_the_limit_are_turned_away_and_slots_come_back(server):
    streams = [_open_stream(server) for _ in range(2)]
    try:
        for s in streams:
            _read_events(s, 1)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(_url(server, "/events"), timeout=5)
        assert err.value.code == 503
        streams.pop().close()
        # the freed slot is reusable once the server notices the closed stream
        deadline = time.monotonic() + 5
        while True:
            s = _open_stream(server)
            head = s.recv(200)
            if head.startswith(b"HTTP/1.0 200"):
                streams.append(s)
                break
            s.close()
            assert time.monotonic() < deadline, head
            time.sleep(0.05)
    finally:
        for s in streams:
            s.close()


# --------------------------------------------------------------------------- keys and config
def test_the_display_key_is_an_observer_key_with_a_private_secret(tmp_path):
    secret = keys_mod.ensure_display_key(tmp_path)
    assert secret.exists() and (secret.stat().st_mode & 0o777) == 0o600
    public_text = (tmp_path / "keys" / "observers" / "display.key").read_bytes()
    assert keys_mod.ensure_display_key(tmp_path) == secret  # idempotent: the same key
    assert (tmp_path / "keys" / "observers" / "display.key").read_bytes() == public_text
    public, _ = zmq.auth.load_certificate(str(secret))
    assert keys_mod.KeyRing(tmp_path).lookup(public) == (keys_mod.OBSERVER, "display")


def test_display_config_defaults_and_the_device_profile():
    sim = config_mod.load("sim")
    assert (sim.display.bind_address, sim.display.port, sim.display.stale_after_s) == ("127.0.0.1", 8080, 1.0)
    assert config_mod.load("device").display.bind_address == "0.0.0.0"
    with pytest.raises(config_mod.ConfigError, match="stale_after_s"):
        config_mod.validate({"display": {"stale_after_s": 0.0}})


def test_the_listener_reads_telemetry_with_the_observer_key(tmp_path):
    """A CURVE publisher that admits only listed keys: the display's observer key gets
    status and preview through, and a burst of previews costs one PNG encode."""
    keys_mod.ensure_sim_keys(tmp_path)
    secret = keys_mod.ensure_display_key(tmp_path)
    ctx = zmq.Context()
    auth = keys_mod.start_authenticator(ctx, keys_mod.KeyRing(tmp_path))
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    server_keys = keys_mod.load_server_keys(tmp_path)
    keys_mod.make_curve_server(pub, *server_keys)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    model = DisplayModel(clock=ManualClock())
    listener = TelemetryListener(model, ctx, f"tcp://127.0.0.1:{port}", server_keys[0],
                                 *keys_mod.load_client_keys(secret))
    listener.start()
    try:
        deadline = time.monotonic() + 10
        while model.snapshot()["status"].get("state") != "ARMED":  # slow joiner: publish until seen
            assert time.monotonic() < deadline, "no status reached the display"
            pub.send_multipart([b"status", msgpack.packb(_status("ARMED"))])
            model.wait_newer(model.version, 0.05)
        header, px = _preview()
        batch = [[b"preview", msgpack.packb(dict(header, frame_seq=i)), px] for i in range(5)]
        listener._deliver(batch)
        snap = model.snapshot()
        assert snap["preview"]["frame_seq"] == 4 and model.previews_encoded == 1
        # a batch: only its newest result is read (the model keeps one); every status and
        # event is handed over, in order
        received = listener.received
        batch = [[b"result", msgpack.packb({"sbr": 1.0 + i, "valid": True, "frame_seq": i})] for i in range(3)]
        batch.insert(1, [b"status", msgpack.packb(_status("EMITTING"))])
        batch.append([b"result", b"\xc1"])  # undecodable: the newest, so nothing newer is shown
        batch.append([b"status", msgpack.packb(_status("ARMED"))])
        listener._deliver(batch)
        snap = model.snapshot()
        assert listener.received == received + len(batch)
        assert snap["status"]["state"] == "ARMED"
        assert snap["result"]["frame_seq"] == 2 and snap["result"]["sbr"] == 3.0
    finally:
        listener.stop()
        auth.stop()
        ctx.destroy(linger=0)


# --------------------------------------------------------------------------- end to end in Chromium
CHROMIUM = Path("/usr/bin/chromium")
WIDTH, HEIGHT = 728, 544
SIGNAL_ROI = [WIDTH // 2 - 30, HEIGHT // 2 - 30, 60, 60]
BACKGROUND_ROI = [20, 20, 150, 150]


def _display_port(cart) -> int:
    return tomllib.loads(cart.config_path.read_text())["display"]["port"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The simulated cart (with its display, started by the launcher) and a headless
    Chromium showing the page."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package to run the display's browser tests")
    from nirf.services.cli.client import CartClient
    from tests.cdp import Chromium

    cart = start_cart(tmp_path_factory.mktemp("display"), width=WIDTH, height=HEIGHT)
    browser = client = None
    try:
        cart.wait_for_keys()
        client = CartClient.from_state_dir(cart.state_dir, cart.control, cart.telemetry)
        client.subscribe("status")
        assert client.wait_for("status", timeout_s=60) is not None, cart.log_text()
        browser = Chromium(width=1920, height=1080).start()
        page = browser.new_page()
        yield cart, client, browser, page
    finally:
        if client is not None:
            client.close()
        if browser is not None:
            browser.stop()
        cart.stop()


def _open_page(page, cart) -> None:
    url = f"http://127.0.0.1:{_display_port(cart)}/"
    if page.evaluate("location.href") != url:
        page.navigate(url)
    page.wait_for("['SAFE', 'ARMING', 'ARMED', 'EMITTING', 'FAULT']"
                  ".includes(document.getElementById('state').textContent)", 10)


def _emit(client, page) -> None:
    """Bring the cart to EMITTING with fluorescence acquisition on (whatever came before)."""
    state = client.call("status")["state"]
    if state == "FAULT":
        client.call("fault.reset")
    if state != "EMITTING":
        client.call("roi.set", {"signal": SIGNAL_ROI, "background": BACKGROUND_ROI})
        if state != "ARMED":
            client.call("arm")
            page.wait_for("['ARMING', 'ARMED'].includes(document.getElementById('state').textContent)", 5)
            client.wait_for("status", lambda m: m["state"] == "ARMED", timeout_s=10)
        client.call("laser.on", {"power_mw": 50})
    client.call("acquire.start", {"mode": "fluorescence"})
    page.wait_for("document.getElementById('state').textContent === 'EMITTING'", 5)


def _text(page, element_id):
    return page.evaluate(f"document.getElementById({json.dumps(element_id)}).textContent")


def _stale_banner(page):
    return page.evaluate("(() => { const b = document.getElementById('stale');"
                         " return b.hidden ? null : b.textContent; })()")


@pytest.mark.e2e
def test_the_launcher_starts_the_display_and_prints_its_address(live):
    cart, _, _, _ = live
    url = f"http://127.0.0.1:{_display_port(cart)}/"
    assert f"display:   {url}" in cart.log_text()
    with urllib.request.urlopen(url, timeout=5) as r:
        assert b"display.js" in r.read()


@pytest.mark.e2e
def test_the_page_shows_state_power_sbr_rois_and_a_live_image(live):
    cart, client, _, page = live
    _open_page(page, cart)
    assert _stale_banner(page) is None
    _emit(client, page)
    page.wait_for("document.getElementById('call').textContent === 'POSITIVE'", 15)

    sbr = float(_text(page, "sbr"))
    assert sbr == pytest.approx(4.0, rel=0.15)  # the default phantom: 200 nM over 50 nM
    assert _text(page, "power").endswith("mW") and float(_text(page, "power").split()[0]) == pytest.approx(50, rel=0.2)
    assert "2.0" in _text(page, "threshold")
    assert _text(page, "case") == "no case open"

    # the image changes: its pixels differ between two moments
    grab = ("(() => { const c = document.getElementById('image');"
            " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " let h = 0; for (let i = 0; i < d.length; i += 97) h = (h * 31 + d[i]) >>> 0; return h; })()")
    images_before = page.evaluate("window.nirfDisplay.images")
    first = page.evaluate(grab)
    page.wait_for(f"window.nirfDisplay.images >= {images_before + 3}", 5)
    assert page.evaluate(grab) != first
    # the signal ROI is drawn in its colour (the page's green) near its corner
    corner = page.evaluate(
        "(() => { const c = document.getElementById('image');"
        " const {x0, y0, w, h} = window.nirfDisplay.imageRect;"
        f" const x = Math.round(x0 + {SIGNAL_ROI[0]} * w / {WIDTH}), y = Math.round(y0 + {SIGNAL_ROI[1] + 30} * h / {HEIGHT});"
        " const d = c.getContext('2d').getImageData(x - 3, y, 7, 1).data;"
        " let green = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 1] > 200 && d[i] < 120) green++;"
        " return green; })()")
    assert corner >= 1

    _measure_and_screenshot(page)


def _measure_and_screenshot(page):
    """Update rate and latency over a few seconds (reported, not asserted), and the
    screenshot a person looks at."""
    page.evaluate("window.nirfDisplay.resultLatencyMs.length = 0; window.nirfDisplay.imageLatencyMs.length = 0")
    start = page.evaluate("({u: window.nirfDisplay.updates, i: window.nirfDisplay.images, t: performance.now()})")
    time.sleep(3.0)  # a measuring window, not a wait for a condition
    end = page.evaluate("({u: window.nirfDisplay.updates, i: window.nirfDisplay.images, t: performance.now(),"
                        " r: window.nirfDisplay.resultLatencyMs, m: window.nirfDisplay.imageLatencyMs})")
    seconds = (end["t"] - start["t"]) / 1000.0

    def pct(values, q):
        return round(float(np.percentile(values, q)), 1) if values else None

    metrics = {
        "updates_per_s": round((end["u"] - start["u"]) / seconds, 1),
        "images_per_s": round((end["i"] - start["i"]) / seconds, 1),
        "result_latency_ms": {"p50": pct(end["r"], 50), "p95": pct(end["r"], 95), "n": len(end["r"])},
        "image_latency_ms": {"p50": pct(end["m"], 50), "p95": pct(end["m"], 95), "n": len(end["m"])},
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "display-metrics.json").write_text(json.dumps(metrics, indent=2))
    print("display metrics:", json.dumps(metrics))
    page.screenshot(ARTIFACTS / "display-emitting.png")


@pytest.mark.e2e
def test_the_state_turns_to_fault_within_a_second_of_opening_the_interlock(live):
    cart, client, _, page = live
    _open_page(page, cart)
    _emit(client, page)
    opened_ms = page.evaluate("Date.now()")
    client.call("sim.set", {"interlock": "open"})
    page.wait_for("document.getElementById('state').textContent === 'FAULT'", 5)
    changed_ms = page.evaluate("window.nirfDisplay.stateChangedAtMs")
    fault_text = _text(page, "fault")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(ARTIFACTS / "display-fault.png")
    # the requirement of the display's issue: FAULT on screen within 1 s
    assert changed_ms - opened_ms < 1000.0, f"FAULT shown {changed_ms - opened_ms:.0f} ms after the interlock opened"
    assert "interlock" in fault_text.lower()
    client.call("sim.set", {"interlock": "closed"})
    client.wait_for("status", lambda m: m["interlock"] == "closed", timeout_s=5)
    client.call("fault.reset")
    page.wait_for("document.getElementById('state').textContent === 'SAFE'", 5)


@pytest.mark.e2e
def test_the_page_warns_stale_when_the_cart_stops(live):
    """A second display, started on its own, outlives the cart: its page must say STALE
    once the cart is silent, and again (for another reason) when the display itself goes."""
    cart, _, _, page = live
    port = free_port()
    env = dict(os.environ, NIRF_STATE_DIR=str(cart.state_dir), NIRF_RUNTIME_DIR=str(cart.runtime_dir),
               PYTHONUNBUFFERED="1")
    log_path = cart.config_path.parent / "display2.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nirf.services.display.main", "--config", str(cart.config_path),
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        page.navigate(url)
        page.wait_for("document.getElementById('state').textContent === 'SAFE'", 10)
        assert _stale_banner(page) is None

        cart.stop()
        banner = page.wait_for(
            "(() => { const b = document.getElementById('stale'); return b.hidden ? null : b.textContent; })()", 5)
        assert "STALE" in banner and "cart" in banner
        assert page.evaluate("document.body.classList.contains('stale')")
        page.screenshot(ARTIFACTS / "display-stale.png")

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        banner = page.wait_for(
            "(() => { const t = document.getElementById('stale').textContent;"
            " return t.includes('display service') ? t : null; })()", 5)
        assert "STALE" in banner
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_a_request_naming_another_host_is_refused(server):
    """C8: a page of another site reaching the display through the browser (DNS rebinding)
    names its own host; the display answers 421 and shows nothing."""
    for host, code in (("evil.example", 421), ("127.0.0.1:1", 421), (f"127.0.0.1:{server.server_address[1]}", 200),
                       (f"localhost:{server.server_address[1]}", 200)):
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        try:
            conn.request("GET", "/snapshot.json", headers={"Host": host})
            r = conn.getresponse()
            body = r.read()
            assert r.status == code, (host, r.status)
            if code != 200:
                assert b"state" not in body
        finally:
            conn.close()


def test_idle_connections_beyond_the_cap_close_the_oldest_and_the_page_answers(server):
    """C8: silent connections are capped; at the cap the oldest idle one is closed, so a
    flood of them never starves the page."""
    import nirf.services.display.main as display_main
    idle = []
    try:
        for _ in range(display_main.MAX_CONNECTIONS + 40):
            idle.append(socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5))
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        conn.request("GET", "/snapshot.json")
        assert conn.getresponse().status == 200
        conn.close()
        assert server.connections_open <= display_main.MAX_CONNECTIONS
        assert server.closed_for_room >= 40
        # the oldest were closed by the server: reading them gives end of file
        idle[0].settimeout(5)
        assert idle[0].recv(10) == b""
    finally:
        for s in idle:
            s.close()
