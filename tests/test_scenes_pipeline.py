"""The study's scenes through the real pipeline at full resolution: frames rendered by the
simulator's renderer (the one the running cart uses), automatic ROIs, the pipeline's
result; judged against an independent numpy computation from each scene's phantom and
geometry (the disks rasterised here, not by the simulator or the pipeline). Then each
validity reason of PRODUCT.md section 7 through the same renderer and pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nirf.hal.clock import ManualClock
from nirf.services.processing.pipeline import PairProcessor, Roi, flat_field_from_uniform
from nirf.services.processing.roi import RoiFinder
from nirf.sim import scenes
from nirf.sim.render import FrameRenderer
from nirf.sim.world import SensorModel, World

W, H = 1456, 1088
SENSOR = SensorModel(width=W, height=H)
EXPOSURE_US = 10_000
LASER_MW = 50.0
GAUSSIAN = {"gaussian_sigma_frac": 0.35}
PAIRS = 3


def truth_concentration(phantom: dict) -> np.ndarray:
    """The phantom's concentration per pixel, rasterised here: pixel (row, col) centred at
    (col + 0.5, row + 0.5); each disk replaces what is under it; autofluorescence on top."""
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    conc = np.full((H, W), phantom["background_icg_nM"], dtype=np.float64)
    for d in phantom["inclusions"]:
        conc[(xx - d["x"]) ** 2 + (yy - d["y"]) ** 2 <= d["radius"] ** 2] = d["icg_nM"]
    return conc + phantom["autofluorescence_nM"]


def on_uptake(roi: Roi, shape: scenes.Shape) -> float:
    """Share of the ROI's pixels whose centre lies in the disk or annulus, computed here."""
    yy, xx = np.mgrid[roi.y:roi.y + roi.h, roi.x:roi.x + roi.w] + 0.5
    r2 = (xx - shape.x) ** 2 + (yy - shape.y) ** 2
    return float(((r2 <= shape.outer ** 2) & (r2 > shape.inner ** 2 if shape.inner else True)).mean())


def world_for(phantom: dict | None = None, scene: str | None = None, illumination="uniform", **extra) -> World:
    world = World(ManualClock(), SENSOR)
    args = {"illumination": illumination, **extra}
    if scene is not None:
        args["scene"] = scene
    if phantom is not None:
        args["phantom"] = phantom
    world.apply(args)
    return world


def meta(seq: int, laser_mw: float, **extra) -> dict:
    return {"frame_seq": seq, "t_start_ns": 0, "t_end_ns": 1, "exposure_us": EXPOSURE_US, "gain": 1.0,
            "laser_mw": laser_mw, "filter_position": 1, "bits": 10, **extra}


def run(world: World, *, flat=None, pairs: int = PAIRS, rois=None, laser_mw: float = LASER_MW, seed: int = 3,
        processor: PairProcessor | None = None, meta_on=None, meta_off=None):
    """Render ``pairs`` pairs, find ROIs on the first (unless given), process all: the list of
    results and the ROIs."""
    renderer = FrameRenderer(SENSOR, seed=seed)
    proc = processor or PairProcessor(W, H, 10, flat_field=flat, emission_filter=1)
    snap = world.scene()
    out = []
    for i in range(pairs):
        on = renderer.render(snap, laser_mw, EXPOSURE_US, 1.0)
        off = renderer.render(snap, 0.0, EXPOSURE_US, 1.0)
        if i == 0 and rois is None:
            rois = RoiFinder(W, H).find((on, off), proc.flat_field).rois
        if i == 0:
            proc.set_rois(*rois)
        m_on = meta(2 * i, laser_mw, **(meta_on or {}))
        m_off = meta(2 * i, 0.0, **(meta_off or {}))
        out.append(proc.process(on, off, m_on, m_off))
    return out, rois


def capture_sbr(results: list[dict]) -> float:
    """As a capture averages: the ratio of the mean ROI means."""
    return sum(r["signal_mean"] for r in results) / sum(r["background_mean"] for r in results)


def gaussian_flat() -> np.ndarray:
    """A flat field calibrated from a uniform target under the Gaussian light."""
    world = world_for({"background_icg_nM": 100.0, "autofluorescence_nM": 0.0, "inclusions": []},
                      illumination=GAUSSIAN)
    renderer = FrameRenderer(SENSOR, seed=99)
    snap = world.scene()
    diffs = [renderer.render(snap, LASER_MW, EXPOSURE_US, 1.0).astype(np.float32)
             - renderer.render(snap, 0.0, EXPOSURE_US, 1.0) for _ in range(4)]
    return flat_field_from_uniform(diffs)


@pytest.fixture(scope="module")
def flat():
    return gaussian_flat()


@pytest.mark.parametrize("light", ["uniform", "gaussian"])
@pytest.mark.parametrize("name", ["residual_focus", "rim", "focus_r10", "focus_r14", "focus_r20"])
def test_focal_uptake_positive_within_5_percent_on_the_uptake(name, light, flat):
    if name.startswith("focus_"):
        sc = scenes.build("small_foci", W, H)
        i = [f"focus_r{r:.0f}" for r in scenes.SMALL_FOCI_RADII_PX].index(name)
        shape = sc.findings[i]
        phantom = dict(sc.phantom, inclusions=[sc.phantom["inclusions"][i]])
    else:
        sc = scenes.build(name, W, H)
        shape = sc.findings[0]
        phantom = sc.phantom
    results, (signal, background) = run(world_for(phantom, illumination=GAUSSIAN if light == "gaussian" else "uniform"),
                                        flat=flat if light == "gaussian" else None)
    conc = truth_concentration(phantom)
    truth = conc[signal.slices()].mean() / conc[background.slices()].mean()
    assert truth == pytest.approx(sc.true_sbr, rel=0.01)  # the ROIs sit where the scene's truth holds
    assert on_uptake(signal, shape) >= 0.90
    assert all(r["valid"] and r["positive"] for r in results), [r["flags"] for r in results]
    assert capture_sbr(results) == pytest.approx(truth, rel=0.05)
    assert results[-1]["criteria_met"] == ["sbr", "intensity", "cnr"]


@pytest.mark.parametrize("light", ["uniform", "gaussian"])
def test_all_three_foci_in_view_the_roi_lands_on_one(light, flat):
    sc = scenes.build("small_foci", W, H)
    results, (signal, _) = run(world_for(scene="small_foci", illumination=GAUSSIAN if light == "gaussian" else "uniform"),
                               flat=flat if light == "gaussian" else None)
    assert max(on_uptake(signal, f) for f in sc.findings) >= 0.90
    assert capture_sbr(results) == pytest.approx(3.0, rel=0.05)


@pytest.mark.parametrize("light", ["uniform", "gaussian"])
def test_a_clean_bed_is_measured_and_negative(light, flat):
    sc = scenes.build("clean_bed", W, H)
    results, (signal, background) = run(world_for(scene="clean_bed", illumination=GAUSSIAN if light == "gaussian" else "uniform"),
                                        flat=flat if light == "gaussian" else None)
    conc = truth_concentration(sc.phantom)
    truth = conc[signal.slices()].mean() / conc[background.slices()].mean()
    assert all(r["valid"] and not r["positive"] for r in results)
    assert "sbr" in results[0]["criteria_failed"]
    assert capture_sbr(results) == pytest.approx(truth, rel=0.10)
    assert 48 / 52 <= truth <= 52 / 48


@pytest.mark.parametrize("light", ["uniform", "gaussian"])
@pytest.mark.parametrize("name", ["no_icg", "drape"])
def test_no_icg_and_drape_never_positive(name, light, flat):
    results, _ = run(world_for(scene=name, illumination=GAUSSIAN if light == "gaussian" else "uniform"),
                     flat=flat if light == "gaussian" else None, pairs=4)
    for r in results:
        assert r["positive"] is False
        assert r["flags"] or r["criteria_failed"]


def test_no_icg_contrast_alone_would_have_been_called_positive():
    """The version-1 failure: the SBR of autofluorescence contrast passes the threshold;
    the intensity (about 1.8 counts/s/mW, some 600x below ICG) does not."""
    sc = scenes.build("no_icg", W, H)
    spot = sc.uptake[0]
    # ROIs by hand, large, where the truth is known: on the structure and on tissue
    signal = Roi(int(spot.x - 80), int(spot.y - 80), 160, 160)
    background = Roi(40, 40, 300, 300)
    results, _ = run(world_for(scene="no_icg"), rois=(signal, background), pairs=8)
    conc = truth_concentration(sc.phantom)
    expect_intensity = conc[signal.slices()].mean() * 1e3 * 0.9 * 0.0265 * 0.25  # counts/s/mW
    assert expect_intensity == pytest.approx(1.79, rel=0.02)
    sbr = capture_sbr(results)
    assert sbr >= 2.0  # SBR alone would call it
    mean_intensity = sum(r["intensity"] for r in results) / len(results)
    assert mean_intensity == pytest.approx(expect_intensity, rel=0.15)
    for r in results:
        assert r["positive"] is False and "intensity" in r["criteria_failed"]


# --- validity reasons through the renderer and the pipeline -----------------------------


def test_any_saturated_roi_pixel_invalidates():
    results, _ = run(world_for(scene="default"), laser_mw=100.0, pairs=1)
    r = results[0]
    assert "saturated" in r["flags"] and not r["valid"] and r["saturated_fraction"] > 0


def test_overlapping_rois_invalidate():
    results, _ = run(world_for(scene="default"), rois=(Roi(600, 450, 200, 200), Roi(700, 550, 200, 200)), pairs=1)
    assert "rois_overlap" in results[0]["flags"] and not results[0]["valid"]


def test_the_open_filter_invalidates():
    world = world_for(scene="default")
    world.set_filter(2, False)
    results, _ = run(world, pairs=1, meta_on={"filter_position": 2}, meta_off={"filter_position": 2})
    assert "filter_not_emission" in results[0]["flags"] and not results[0]["valid"]


@pytest.mark.parametrize("name", ["clean_bed", "no_icg", "drape"])
def test_no_motion_is_never_flagged_even_in_featureless_scenes(name):
    still, _ = run(world_for(scene=name), pairs=6)
    assert still[0]["motion_px"] is None  # nothing to compare the first with
    assert all(r["motion_px"] is not None and r["motion_px"] <= 1.0 and "motion" not in r["flags"]
               for r in still[1:])


@pytest.mark.parametrize("name", ["residual_focus", "rim", "small_foci", "default"])
def test_motion_is_measured_on_to_on_and_flagged_above_1_px(name):
    still, _ = run(world_for(scene=name), pairs=4)
    assert all(r["motion_px"] is not None and r["motion_px"] <= 1.0 and "motion" not in r["flags"]
               for r in still[1:])
    assert still[0]["motion_px"] is None  # nothing to compare the first with
    moving, _ = run(world_for(scene=name, motion_px=2.0), pairs=4)
    for r in moving[1:]:
        assert "motion" in r["flags"] and not r["valid"]
        # 2 px a frame: 4 px between consecutive laser-on frames, to the right
        assert r["motion_shift"][0] == pytest.approx(4.0, abs=0.5)
        assert abs(r["motion_shift"][1]) <= 0.5


def test_a_lost_pair_is_bridged_and_moved_rois_still_see_the_motion():
    proc = PairProcessor(W, H, 10)
    world = world_for(scene="residual_focus", motion_px=2.0)
    renderer = FrameRenderer(SENSOR, seed=4)
    snap = world.scene()
    focus = scenes.build("residual_focus", W, H).findings[0]
    near = (Roi(int(focus.x) - 10, int(focus.y) - 10, 20, 20), Roi(100, 100, 50, 50))
    moved = (Roi(int(focus.x) - 8, int(focus.y) - 12, 20, 20), Roi(100, 100, 50, 50))
    out = []
    for seq in (0, 2, 6, 8, 20):  # pair 4 never arrived; after 8 a long gap
        on, off = renderer.render(snap, LASER_MW, EXPOSURE_US, 1.0), renderer.render(snap, 0.0, EXPOSURE_US, 1.0)
        if seq == 2:  # pair 4 was rendered but lost: the scene moved on regardless
            renderer.render(snap, LASER_MW, EXPOSURE_US, 1.0), renderer.render(snap, 0.0, EXPOSURE_US, 1.0)
        proc.set_rois(*(moved if seq == 8 else near))
        out.append(proc.process(on, off, meta(seq, LASER_MW), meta(seq, 0.0)))
    assert out[0]["motion_px"] is None
    for r in out[1:4]:  # consecutive, bridged over the lost pair, and with the ROIs moved
        assert r["motion_shift"][0] == pytest.approx(4.0, abs=0.5) and "motion" in r["flags"]
    assert out[4]["motion_px"] is None  # too long a gap to say


@pytest.mark.parametrize("where,flag", [("off_lit", "off_frame_lit"), ("off_cut", "off_frame_lit"),
                                        ("off_light_seen", "off_frame_lit"), ("on_cut", "on_frame_cut")])
def test_the_mcu_gating_record_invalidates_a_lit_or_cut_frame(where, flag):
    meta_on = {"cut": True} if where == "on_cut" else {}
    meta_off = {"off_lit": {"lit": True}, "off_cut": {"cut": True},
                "off_light_seen": {"light_seen": True}}.get(where, {})
    results, _ = run(world_for(scene="default"), pairs=1, meta_on=meta_on, meta_off=meta_off)
    assert flag in results[0]["flags"] and not results[0]["valid"]
    clean, _ = run(world_for(scene="default"), pairs=1, meta_on={"cut": False}, meta_off={"lit": False, "cut": False, "light_seen": False})
    assert clean[0]["valid"]


def test_a_background_on_the_drape_is_no_background():
    sc = scenes.build("drape", W, H)
    on_drape = Roi(40, 40, 120, 120)
    assert sc.drape.mask(W, H)[on_drape.slices()].all()
    results, _ = run(world_for(scene="drape"), rois=(Roi(1000, 500, 100, 100), on_drape), pairs=6)
    for r in results:
        assert not r["valid"] and r["sbr"] is None and r["positive"] is False
        assert {"background_too_dim", "background_not_positive"} & set(r["flags"])


def test_every_result_names_the_criteria_that_held_and_failed():
    results, _ = run(world_for(scene="clean_bed"), pairs=1)
    r = results[0]
    assert sorted(r["criteria_met"] + r["criteria_failed"]) == ["cnr", "intensity", "sbr"]
    assert r["intensity_floor"] == 50.0 and r["cnr_floor"] == 3.0 and r["threshold"] == 2.0
    assert math.isfinite(r["sbr"])
