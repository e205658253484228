"""Accuracy of the processing pipeline against the simulator's own ground truth: frames
rendered by the simulator's renderer (the one the running cart uses), processed by the
pipeline, compared with the phantom's true SBR = (inclusion + autofluorescence) /
(background + autofluorescence)."""

from __future__ import annotations


import numpy as np
import pytest

from nirf.services.processing.pipeline import PairProcessor, Roi, flat_field_from_uniform
from nirf.services.processing.roi import auto_rois
from nirf.sim.render import FrameRenderer
from nirf.sim.world import SensorModel, World
from nirf.hal.clock import ManualClock

W, H = 728, 544
SENSOR = SensorModel(width=W, height=H)
CX, CY, R = W / 2, H / 2, H / 6
SIGNAL = Roi(int(CX) - 30, int(CY) - 30, 60, 60)
BACKGROUND = Roi(20, 20, 150, 150)
EXPOSURE_US = 10_000


def scene(*, incl_nM, bg_nM=50.0, ambient=5.0, illumination="uniform", inclusions=True, seed=1):
    world = World(ManualClock(), SENSOR)
    world.apply({"ambient_e_per_ms": ambient, "illumination": illumination, "seed": seed,
                 "phantom": {"background_icg_nM": bg_nM, "autofluorescence_nM": 0.0,
                             "inclusions": [{"x": CX, "y": CY, "radius": R, "icg_nM": incl_nM}] if inclusions else []}})
    return world.scene()


def meta(seq, laser_mw):
    return {"frame_seq": seq, "t_start_ns": 0, "t_end_ns": 1, "exposure_us": EXPOSURE_US, "gain": 1.0,
            "laser_mw": laser_mw, "filter_position": 1, "bits": 10}


def pairs(sc, laser_mw, n, seed=3):
    r = FrameRenderer(SENSOR, seed=seed)
    for i in range(n):
        on = r.render(sc, laser_mw, EXPOSURE_US, 1.0)
        off = r.render(sc, 0.0, EXPOSURE_US, 1.0)
        yield i, on, off


def mean_sbr(sc, laser_mw, n=4, rois=(SIGNAL, BACKGROUND), flat=None):
    proc = PairProcessor(W, H, 10, flat_field=flat)
    proc.set_rois(*rois)
    s = b = 0.0
    for i, on, off in pairs(sc, laser_mw, n):
        res = proc.process(on, off, meta(2 * i, laser_mw), meta(2 * i, laser_mw))
        assert res["valid"], res["flags"]
        s += res["signal_mean"]
        b += res["background_mean"]
    return s / b


# laser power chosen so the inclusion stays below saturation
@pytest.mark.parametrize("true_sbr,laser_mw", [(1.5, 50.0), (2.0, 50.0), (4.0, 50.0), (8.0, 25.0)])
@pytest.mark.parametrize("ambient_factor", [0, 10, 100])
def test_sbr_within_3_percent_of_the_truth(true_sbr, laser_mw, ambient_factor):
    sc = scene(incl_nM=50.0 * true_sbr, ambient=5.0 * ambient_factor)
    assert mean_sbr(sc, laser_mw) == pytest.approx(true_sbr, rel=0.03)


def test_automatic_rois_within_5_percent():
    sc = scene(incl_nM=200.0)
    _, on, off = next(pairs(sc, 50.0, 1, seed=11))
    rois = auto_rois((on, off), W, H)
    assert mean_sbr(sc, 50.0, rois=rois) == pytest.approx(4.0, rel=0.05)


def test_flat_field_restores_sbr_under_gaussian_light():
    light = {"gaussian_sigma_frac": 0.35}
    uniform = scene(incl_nM=0.0, bg_nM=100.0, illumination=light, inclusions=False)
    diffs = [on.astype(np.float32) - off for _, on, off in pairs(uniform, 50.0, 8, seed=5)]
    flat = flat_field_from_uniform(diffs)
    sc = scene(incl_nM=200.0, illumination=light)
    without = mean_sbr(sc, 50.0)
    corrected = mean_sbr(sc, 50.0, flat=flat)
    assert corrected == pytest.approx(4.0, rel=0.03)
    assert abs(without - 4.0) > 0.2  # the uneven light really distorts it uncorrected


def test_a_dim_scene_is_not_biased_upward():
    """True SBR 1.2 at 0.25 mW: the mean difference is below one count, under the noise. The signed means give
    the truth; clamping D at zero before the means (what the pipeline must not do) inflates
    the background mean more than the signal's and the ratio moves away."""
    sc = scene(incl_nM=60.0)
    n = 32
    proc = PairProcessor(W, H, 10)
    proc.set_rois(SIGNAL, BACKGROUND)
    s = b = cs = cb = 0.0
    for i, on, off in pairs(sc, 0.25, n, seed=7):
        res = proc.process(on, off, meta(2 * i, 0.25), meta(2 * i, 0.25))
        s += res["signal_mean"]
        b += res["background_mean"]
        d = on.astype(np.float32) - off
        cs += np.clip(d[SIGNAL.slices()], 0, None).mean()
        cb += np.clip(d[BACKGROUND.slices()], 0, None).mean()
    signed = s / b
    clamped = cs / cb
    assert signed == pytest.approx(1.2, rel=0.03)
    assert abs(clamped - 1.2) > abs(signed - 1.2)
    # the clamped means are biased upward: the background by more than its standard error
    assert cb / n > b / n


def test_a_saturated_tumour_is_flagged_not_reported_valid():
    sc = scene(incl_nM=800.0)  # 4x the default inclusion at 50 mW: far above full scale
    proc = PairProcessor(W, H, 10)
    proc.set_rois(SIGNAL, BACKGROUND)
    _, on, off = next(pairs(sc, 50.0, 1))
    res = proc.process(on, off, meta(0, 50.0), meta(0, 50.0))
    assert not res["valid"] and "saturated" in res["flags"]
    assert res["positive"] is False
    assert res["saturated_fraction"] > 0.5
