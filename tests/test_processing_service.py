"""The processing service's handling of pairs, in-process (no sockets): ROIs by command or
found automatically, re-found as the scene changes, and an honest result when nothing
fluorescent is in view."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from services.gateway import bus as bus_mod
from services.processing import main as processing_main
from services.processing.main import ProcessingService
from tests.safety_rig import make_config

W, H = 256, 192


class _Part:
    def __init__(self, data: bytes):
        self.bytes = data
        self.buffer = memoryview(data)


def frames(concentration, seed):
    rng = np.random.default_rng(seed)
    on = (16 + 2.0 * concentration + rng.normal(0, 2.0, concentration.shape)).round().astype(np.uint16)
    off = (16 + rng.normal(0, 2.0, concentration.shape)).round().astype(np.uint16)
    return on, off


def scene(with_disk=True, cx=W // 2, cy=H // 2):
    c = np.full((H, W), 50.0)
    if with_disk:
        yy, xx = np.mgrid[0:H, 0:W]
        c[(xx - cx) ** 2 + (yy - cy) ** 2 <= 30 ** 2] = 200.0
    return c


@pytest.fixture
def service(tmp_path, monkeypatch):
    monkeypatch.setenv("NIRF_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(processing_main, "AUTO_ROI_REFRESH_S", 0.0)  # search again on every pair
    ctx = zmq.Context()
    svc = ProcessingService(make_config(camera={"width": W, "height": H}), tmp_path / "run", context=ctx)
    svc.sent = []
    svc.push = SimpleNamespace(send_multipart=lambda parts: svc.sent.append(parts))
    yield svc
    ctx.destroy(linger=0)


def handle(svc, conc, seq, roi="auto", roi_version=1):
    on, off = frames(conc, seq)
    meta = lambda lit: {"seq": seq, "mcu_frame": seq, "lit": lit, "t_start_ns": seq, "t_end_ns": seq + 1,  # noqa: E731
                        "exposure_us": 10_000, "gain": 1.0, "laser_mw": 50.0 if lit else 0.0,
                        "filter_position": 1, "bits": 10, "black_level": 16, "width": W, "height": H}
    header = {"frame_seq": seq, "on": meta(True), "off": meta(False), "threshold": 2.0, "roi": roi,
              "roi_version": roi_version, "calibration_id": "p:nominal|f:-|d:-", "flat_field": None}
    return svc.handle([_Part(b"pair"), _Part(bus_mod.pack(header)), _Part(on.tobytes()), _Part(off.tobytes())])


def test_nothing_fluorescent_gives_an_invalid_result_not_an_error(service):
    r = handle(service, scene(with_disk=False), 0)
    assert r["valid"] is False and r["flags"] == ["no_roi"] and r["sbr"] is None
    assert r["t_capture_ns"] == 1
    published = [bus_mod.unpack(p[1]) for p in service.sent if p[0] == b"result"]
    assert published and published[-1]["flags"] == ["no_roi"]


def test_automatic_rois_follow_the_scene(service):
    first = handle(service, scene(cx=80), 0)
    assert first["valid"] and first["sbr"] == pytest.approx(4.0, rel=0.05)
    x, y, w, h = first["roi"]["signal"]
    assert x <= 80 <= x + w
    moved = handle(service, scene(cx=180), 2)  # the camera moved: the disk is elsewhere now
    x, y, w, h = moved["roi"]["signal"]
    assert x <= 180 <= x + w
    assert moved["sbr"] == pytest.approx(4.0, rel=0.05)


def test_rois_by_command_win_and_auto_comes_back(service):
    boxes = {"signal": [W // 2 - 10, H // 2 - 10, 20, 20], "background": [5, 5, 40, 40]}
    r = handle(service, scene(), 0, roi=boxes, roi_version=2)
    assert r["roi"] == boxes
    r = handle(service, scene(), 2, roi="auto", roi_version=3)
    assert r["roi"] != boxes and r["valid"]
