"""Tests of the automatic ROI choice (services.processing.roi) on frames synthesised here with the
simulator's physics (SIM.md "Physics of a frame"): it always yields, puts the signal ROI on
the uptake and the background clear of it, honours a flat field; its square search
against a brute-force count."""

from __future__ import annotations

import numpy as np
import pytest

from nirf.hal.errors import InvalidArgument
from nirf.services.processing.pipeline import PairProcessor, Roi, flat_field_from_uniform
from nirf.services.processing.roi import RoiFinder, _largest_square, auto_rois
from nirf.sim.world import DEFAULT_K_FLUO

W, H = 728, 544
FULL_SCALE = 1023


def render(lit: bool, rng, *, background_nM=50.0, inclusions=None, power_mw=50.0,
           ambient_e_per_ms=5.0, gaussian_sigma_frac=None, exposure_ms=10.0, gain=1.0):
    """One raw 10-bit frame following SIM.md: filter 1 (T_em 0.9, T_amb 0.05), dark
    0.01 e-/ms, normal shot noise of variance e, read noise 2 e-, 0.25 ADU/e-, black 16."""
    if inclusions is None:
        inclusions = [(W / 2, H / 2, H / 6, 200.0)]
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    conc = np.full((H, W), background_nM)
    for x, y, r, nM in inclusions:
        conc[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = nM
    illum = 1.0
    if gaussian_sigma_frac is not None:
        sigma = gaussian_sigma_frac * H
        illum = np.exp(-((xx - W / 2) ** 2 + (yy - H / 2) ** 2) / (2 * sigma ** 2))
    e = exposure_ms * (0.05 * ambient_e_per_ms + 0.01)
    if lit:
        e = e + exposure_ms * 0.9 * DEFAULT_K_FLUO * power_mw * illum * conc
    e = np.broadcast_to(e, (H, W))
    # shot and read noise: one normal of variance e + 2^2
    noisy = e + np.sqrt(e + 4.0) * rng.standard_normal((H, W), dtype=np.float32)
    return np.clip(np.round(noisy * 0.25 * gain + 16), 0, FULL_SCALE).astype(np.uint16)


def render_pair(rng, **scene):
    return render(True, rng, **scene), render(False, rng, **scene)


def meta(seq: int, power_mw=50.0) -> dict:
    return {"frame_seq": seq, "t_start_ns": seq * 1000, "t_end_ns": seq * 1000 + 10,
            "exposure_us": 10_000, "gain": 1.0, "laser_mw": power_mw, "filter_position": 1,
            "bits": 10}


def corners(roi: Roi):
    return [(roi.x, roi.y), (roi.x + roi.w, roi.y), (roi.x, roi.y + roi.h),
            (roi.x + roi.w, roi.y + roi.h)]


def inside_disk(roi: Roi, x, y, r) -> bool:
    return all((cx - x) ** 2 + (cy - y) ** 2 <= r * r for cx, cy in corners(roi))


def distance_to_disk_edge(roi: Roi, x, y, r) -> float:
    """How far the nearest point of the ROI is outside the disk (negative: overlaps)."""
    nx = min(max(x, roi.x), roi.x + roi.w)
    ny = min(max(y, roi.y), roi.y + roi.h)
    return float(np.hypot(nx - x, ny - y) - r)


DISK = (W / 2, H / 2, H / 6)


@pytest.mark.parametrize("sbr", [1.5, 4.0, 8.0])
def test_auto_rois_give_sbr_within_5_percent(sbr):
    rng = np.random.default_rng(int(sbr * 10))
    scene = dict(background_nM=200.0 / sbr)
    on, off = render_pair(rng, **scene)
    signal, background = auto_rois((on, off), W, H)
    assert inside_disk(signal, *DISK)
    assert distance_to_disk_edge(background, *DISK) > 16
    assert signal.area_px >= 32 * 32 and background.area_px == signal.area_px
    p = PairProcessor(W, H, 10, average_pairs=4)
    p.set_rois(signal, background)
    p.process(on, off, meta(0), meta(1))
    for i in range(1, 4):
        r = p.process(*render_pair(rng, **scene), meta(2 * i), meta(2 * i + 1))
    assert r["average"]["sbr"] == pytest.approx(sbr, rel=0.05)


def test_off_centre_tumour_is_found_and_the_larger_of_two_wins():
    rng = np.random.default_rng(2)
    big = (0.3 * W, 0.35 * H, 70.0)
    small = (0.8 * W, 0.7 * H, 25.0)
    on, off = render_pair(rng, inclusions=[(*big, 200.0), (*small, 200.0)])
    signal, background = auto_rois((on, off), W, H)
    assert inside_disk(signal, *big)
    # the background keeps clear of both bright regions
    assert distance_to_disk_edge(background, *big) > 16
    assert distance_to_disk_edge(background, *small) > 0


def test_saturated_tumour_is_still_found():
    rng = np.random.default_rng(3)
    on, off = render_pair(rng, power_mw=150.0, ambient_e_per_ms=100.0)
    assert (on >= FULL_SCALE).mean() > 0.05  # the tumour really is clipped
    signal, background = auto_rois((on, off), W, H)
    assert inside_disk(signal, *DISK)
    assert distance_to_disk_edge(background, *DISK) > 16
    p = PairProcessor(W, H, 10)
    p.set_rois(signal, background)
    r = p.process(on, off, meta(0, 150.0), meta(1, 150.0))
    assert "saturated" in r["flags"] and not r["valid"]


def test_difference_image_and_pair_give_the_same_rois():
    rng = np.random.default_rng(4)
    on, off = render_pair(rng)
    d = on.astype(np.float32) - off
    assert auto_rois(d, W, H) == auto_rois((on, off), W, H)


def test_a_uniform_field_still_gets_rois_and_reads_sbr_near_1():
    rng = np.random.default_rng(5)
    on, off = render_pair(rng, inclusions=[])
    signal, background = auto_rois((on, off), W, H)
    assert not signal.overlaps(background)
    p = PairProcessor(W, H, 10)
    p.set_rois(signal, background)
    r = p.process(on, off, meta(0), meta(1))
    assert r["valid"] and r["positive"] is False
    assert r["sbr"] == pytest.approx(1.0, abs=0.03)


def test_no_laser_light_still_gets_rois_and_an_invalid_result():
    rng = np.random.default_rng(5)
    on, off = render(False, rng), render(False, rng)
    signal, background = auto_rois((on, off), W, H)
    p = PairProcessor(W, H, 10)
    p.set_rois(signal, background)
    r = p.process(on, off, meta(0, 0.0), meta(1, 0.0))
    assert not r["valid"] and "laser_off" in r["flags"] and r["positive"] is False


def test_a_field_almost_filled_by_uptake_keeps_the_rois_apart():
    rng = np.random.default_rng(7)
    on, off = render_pair(rng, inclusions=[(W / 2, H / 2, 0.6 * W, 200.0)])
    signal, background = auto_rois((on, off), W, H)
    assert not signal.overlaps(background)
    assert inside_disk(signal, W / 2, H / 2, 0.6 * W)


def test_a_ring_gets_its_signal_roi_inside_the_annulus():
    rng = np.random.default_rng(9)
    x, y, outer, inner = 0.6 * W, 0.5 * H, 80.0, 45.0
    on, off = render_pair(rng, inclusions=[(x, y, outer, 150.0), (x, y, inner, 25.0)])
    signal, _ = auto_rois((on, off), W, H)
    yy, xx = np.mgrid[signal.y:signal.y + signal.h, signal.x:signal.x + signal.w] + 0.5
    r2 = (xx - x) ** 2 + (yy - y) ** 2
    assert ((r2 <= outer ** 2) & (r2 > inner ** 2)).mean() >= 0.9


def test_largest_square_matches_a_brute_force_search():
    rng = np.random.default_rng(10)
    for _ in range(20):
        mask = rng.random((14, 17)) < 0.8
        mask[3:9, 4:11] = True
        best = 0
        for s in range(1, 15):
            if any(mask[y:y + s, x:x + s].all() for y in range(14 - s + 1) for x in range(17 - s + 1)):
                best = s
        x, y, side = _largest_square(mask, rng.random((14, 17)), tolerance=0.0)
        assert side == best
        assert mask[y:y + side, x:x + side].all()


def test_the_search_reports_its_levels_and_time():
    rng = np.random.default_rng(11)
    on, off = render_pair(rng)
    found = RoiFinder(W, H).find((on, off))
    assert found.block_px == 4 or found.block_px >= 1
    # tissue 50 nM and tumour 200 nM as D counts: 10 ms * 0.9 * k * 50 mW * c * 0.25 ADU/e-
    per_nm = 10.0 * 0.9 * DEFAULT_K_FLUO * 50.0 * 0.25
    assert found.tissue_level == pytest.approx(50.0 * per_nm, rel=0.03)
    assert found.peak_level == pytest.approx(200.0 * per_nm, rel=0.03)
    assert found.elapsed_s > 0


def test_flat_field_lets_auto_rois_work_under_uneven_light():
    rng = np.random.default_rng(8)
    diffs = []
    for _ in range(2):
        on, off = render_pair(rng, inclusions=[], gaussian_sigma_frac=0.35)
        diffs.append(on.astype(np.float32) - off)
    gain_map = flat_field_from_uniform(diffs)
    on, off = render_pair(rng, gaussian_sigma_frac=0.35)
    signal, background = auto_rois((on, off), W, H, flat_field=gain_map)
    assert inside_disk(signal, *DISK)
    p = PairProcessor(W, H, 10, flat_field=gain_map)
    p.set_rois(signal, background)
    r = p.process(on, off, meta(0), meta(1))
    assert r["sbr"] == pytest.approx(4.0, rel=0.05)


def test_bad_inputs_are_invalid_arguments():
    d = np.zeros((H, W))
    with pytest.raises(InvalidArgument, match="shape"):
        auto_rois(d[:-1], W, H)
    with pytest.raises(InvalidArgument, match="on frame"):
        auto_rois((d[:, :-1], d), W, H)
    with pytest.raises(InvalidArgument, match="expected"):
        auto_rois((d, d, d), W, H)
    with pytest.raises(InvalidArgument, match="block_px"):
        auto_rois(d, W, H, block_px=0)
    with pytest.raises(InvalidArgument, match="5x5"):
        auto_rois(np.zeros((4, 4)), 4, 4)
    with pytest.raises(InvalidArgument, match="NaN"):
        auto_rois(np.full((H, W), np.nan), W, H)
