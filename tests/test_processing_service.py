"""The processing service's handling of pairs, in-process (no sockets): ROIs by command or
found automatically, re-found as the scene changes, a measurement (a negative) when nothing
fluorescent stands out, every result tagged with the ROIs' generation and the time they were
found, and the search in its own thread."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from nirf.services.gateway import bus as bus_mod
from nirf.services.processing import main as processing_main
from nirf.services.processing.main import ProcessingService
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


def test_nothing_fluorescent_gives_a_negative_measurement_not_a_missing_one(service):
    r = handle(service, scene(with_disk=False), 0)
    assert r["valid"] is True and r["flags"] == [] and r["positive"] is False
    assert r["sbr"] == pytest.approx(1.0, rel=0.05)
    assert "sbr" in r["criteria_failed"]
    assert r["t_capture_ns"] == 1
    assert r["roi_mode"] == "auto" and r["roi_generation"] >= 1 and r["roi_frame_seq"] == 0
    published = [bus_mod.unpack(p[1]) for p in service.sent if p[0] == b"result"]
    assert published and published[-1]["roi_generation"] == r["roi_generation"]


def test_each_search_is_a_new_generation_found_after_the_pairs_it_tags(service):
    import time

    before = time.time_ns()
    first = handle(service, scene(), 0)
    second = handle(service, scene(), 2)
    assert second["roi_generation"] > first["roi_generation"]
    assert before <= first["roi_found_ns"] <= second["roi_found_ns"] <= time.time_ns()
    assert second["roi_frame_seq"] == 2


def test_a_capture_request_makes_the_search_use_a_later_pair(service, monkeypatch):
    monkeypatch.setattr(processing_main, "AUTO_ROI_REFRESH_S", 3600.0)  # no periodic search
    first = handle(service, scene(), 0)
    same = handle(service, scene(), 2)
    assert same["roi_generation"] == first["roi_generation"]
    on, off = frames(scene(), 4)
    # a capture asked at t = 100 ns: the pair of t_end 5 is older, the one of t_end 7 not
    for seq, expect_new in ((4, False), (6, True)):
        meta = lambda lit: {"seq": seq, "mcu_frame": seq, "lit": lit, "t_start_ns": seq, "t_end_ns": seq + 1 if seq == 4 else 200,  # noqa: E731
                            "exposure_us": 10_000, "gain": 1.0, "laser_mw": 50.0 if lit else 0.0,
                            "filter_position": 1, "bits": 10, "black_level": 16, "width": W, "height": H}
        header = {"frame_seq": seq, "on": meta(True), "off": meta(False), "threshold": 2.0, "roi": "auto",
                  "roi_version": 1, "calibration_id": "c", "flat_field": None, "roi_refresh_after_ns": 100}
        r = service.handle([_Part(b"pair"), _Part(bus_mod.pack(header)), _Part(on.tobytes()), _Part(off.tobytes())])
        assert (r["roi_generation"] > first["roi_generation"]) is expect_new
        if expect_new:
            assert r["roi_frame_seq"] == 6


def test_the_search_thread_hands_rois_to_the_pair_path(service):
    import threading
    import time

    threads = []
    search = service._search

    def recording(*job):
        threads.append(threading.current_thread().name)
        return search(*job)

    service._search = recording
    service.start_search_thread()
    try:
        deadline = time.monotonic() + 20.0
        r = handle(service, scene(), 0)
        if r.get("roi_generation") is None:  # the search has not answered yet: no number, and why
            assert r["flags"] == ["roi_pending"] and r["valid"] is False
        seq = 2
        while r.get("roi_generation") is None:
            assert time.monotonic() < deadline, "the search thread never answered"
            r = handle(service, scene(), seq)
            seq += 2
            time.sleep(0.01)
        assert r["valid"] and r["sbr"] == pytest.approx(4.0, rel=0.05)
        assert r["roi_search_ms"] is not None and r["roi_search_ms"] > 0
        assert threads and set(threads) == {"roi-search"}  # never on the per-pair path
    finally:
        service.stop_event.set()
        service._search_thread.join(timeout=5)


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


@pytest.mark.parametrize("frame,key,flag", [("off", "lit", "off_frame_lit"), ("off", "cut", "off_frame_lit"),
                                            ("on", "cut", "on_frame_cut")])
def test_the_gating_record_in_the_pair_header_invalidates(service, frame, key, flag):
    """The MCU's record of a frame (``lit``; ``cut`` for a frame the laser was cut during)
    travels in the pair header's frame metadata; the service flags it."""
    on, off = frames(scene(), 0)
    meta = lambda lit: {"seq": 0, "mcu_frame": 0, "lit": lit, "t_start_ns": 0, "t_end_ns": 1,  # noqa: E731
                        "exposure_us": 10_000, "gain": 1.0, "laser_mw": 50.0 if lit else 0.0,
                        "filter_position": 1, "bits": 10, "black_level": 16, "width": W, "height": H}
    header = {"frame_seq": 0, "on": meta(True), "off": meta(False), "threshold": 2.0, "roi": "auto",
              "roi_version": 1, "calibration_id": "c", "flat_field": None}
    header[frame][key] = True
    r = service.handle([_Part(b"pair"), _Part(bus_mod.pack(header)), _Part(on.tobytes()), _Part(off.tobytes())])
    assert flag in r["flags"] and r["valid"] is False and r["positive"] is False


def test_the_open_filter_in_the_pair_header_invalidates(service):
    on, off = frames(scene(), 0)
    meta = lambda lit: {"seq": 0, "mcu_frame": 0, "lit": lit, "t_start_ns": 0, "t_end_ns": 1,  # noqa: E731
                        "exposure_us": 10_000, "gain": 1.0, "laser_mw": 50.0 if lit else 0.0,
                        "filter_position": 2, "bits": 10, "black_level": 16, "width": W, "height": H}
    header = {"frame_seq": 0, "on": meta(True), "off": meta(False), "threshold": 2.0, "roi": "auto",
              "roi_version": 1, "calibration_id": "c", "flat_field": None}
    r = service.handle([_Part(b"pair"), _Part(bus_mod.pack(header)), _Part(on.tobytes()), _Part(off.tobytes())])
    assert r["flags"] == ["filter_not_emission"]


# -- frames in shared memory ---------------------------------------------------------------
def _ring_pair(svc, ring, conc, seq, roi):
    """The pair of ``handle`` as imaging sends it from the ring: slot numbers, no pixels."""
    from nirf.services.common.framering import FrameRing  # noqa: F401 (the type of ``ring``)

    on, off = frames(conc, seq)
    a, b = ring.allocate(H, W), ring.allocate(H, W)
    a[...], b[...] = on, off
    how, part = ring.lease_pair(a, b)
    assert how == "ring"
    meta = lambda lit: {"seq": seq, "mcu_frame": seq, "lit": lit, "t_start_ns": seq, "t_end_ns": seq + 1,  # noqa: E731
                        "exposure_us": 10_000, "gain": 1.0, "laser_mw": 50.0 if lit else 0.0,
                        "filter_position": 1, "bits": 10, "black_level": 16, "width": W, "height": H}
    header = {"frame_seq": seq, "on": meta(True), "off": meta(False), "threshold": 2.0, "roi": roi,
              "roi_version": 1, "calibration_id": "p:nominal|f:-|d:-", "flat_field": None, "ring": part}
    return [_Part(b"pair"), _Part(bus_mod.pack(header))], part


@pytest.fixture
def ring_service(service):
    from nirf.services.common import framering

    ring = framering.FrameRing(framering.ring_path(service.runtime_dir), H * W * 2, slots=8)
    service.reports = []
    service.ring_reports = SimpleNamespace(send=lambda data, flags=0: service.reports.append(bus_mod.unpack(data)))
    yield service, ring
    ring.close()


FIXED = {"signal": [100, 70, 56, 52], "background": [10, 10, 40, 40]}


def test_a_pair_read_in_place_from_the_ring_gives_the_same_result_and_is_reported_done(ring_service):
    svc, ring = ring_service
    by_pixels = handle(svc, scene(), 3, roi=FIXED)
    parts, part = _ring_pair(svc, ring, scene(), 3, FIXED)
    in_place = svc.handle(parts)
    for key in ("sbr", "intensity", "signal_mean", "background_mean", "cnr", "valid", "flags"):
        assert in_place[key] == by_pixels[key]
    assert svc.ring_pairs == 1 and svc.ring_dropped == 0
    assert svc.reports[-1]["kind"] == "done" and svc.reports[-1]["seq"] == part["seq"]
    ring.on_report(svc.reports[-1])
    import gc

    gc.collect()
    assert ring.busy()["free"] == ring.slots  # the report ends the lease: nothing leaks


def test_the_automatic_search_gets_a_copy_not_the_ring_slots(ring_service):
    svc, ring = ring_service
    svc._search_thread = object()  # as when the thread runs: the job waits in the mailbox
    parts, _ = _ring_pair(svc, ring, scene(), 1, "auto")
    svc.handle(parts)
    job = svc._search_pair
    assert job is not None
    on, off = job[1], job[2]
    assert on.flags.owndata and off.flags.owndata  # its own arrays: the slots may go back


def test_a_frame_overwritten_while_processed_gives_no_result(ring_service, monkeypatch):
    svc, ring = ring_service
    parts, part = _ring_pair(svc, ring, scene(), 5, FIXED)
    real = svc.proc.process

    def overwritten(on, off, m_on, m_off):
        ring._gens[part["on"][0]] += 1  # imaging (wrongly) wrote the slot again meanwhile
        return real(on, off, m_on, m_off)

    monkeypatch.setattr(svc.proc, "process", overwritten)
    before = len(svc.sent)
    assert svc.handle(parts) is None
    assert len(svc.sent) == before and svc.ring_dropped == 1  # no result on a torn frame
    assert svc.reports[-1] == {"kind": "done", "token": ring.token_hex, "instance": svc.instance,
                               "seq": part["seq"]}


def test_a_pair_of_a_ring_that_is_gone_is_dropped_and_reported(ring_service):
    svc, ring = ring_service
    parts, part = _ring_pair(svc, ring, scene(), 6, FIXED)
    header = bus_mod.unpack(parts[1].bytes)
    header["ring"] = dict(part, token="00" * 16)
    assert svc.handle([parts[0], _Part(bus_mod.pack(header))]) is None
    assert svc.ring_dropped == 1 and svc.reports[-1]["kind"] == "done"


def test_results_carry_the_pipelines_cpu_so_far_for_the_benchmark(service):
    rois = {"signal": [W // 2 - 10, H // 2 - 10, 20, 20], "background": [5, 5, 20, 20]}
    first = handle(service, scene(), 0, roi=rois)
    second = handle(service, scene(), 2, roi=rois)
    assert first["pipeline_cpu_s"] >= 0.0
    assert second["pipeline_cpu_s"] >= first["pipeline_cpu_s"]  # cumulative: a benchmark takes differences
    assert second["pairs_received"] == first["pairs_received"] + 1
