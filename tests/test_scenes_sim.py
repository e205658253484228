"""The simulator's ready scenes (SIM.md ``sim.set scene``) and ``motion_px``: validation,
what the world and the renderer do with them, and each scene's stated truth against its own
phantom, rasterised here."""

from __future__ import annotations

import numpy as np
import pytest

from nirf.hal.clock import ManualClock
from nirf.hal.errors import InvalidArgument
from nirf.sim import scenes
from nirf.sim.render import FrameRenderer
from nirf.sim.simset import validate
from nirf.sim.world import DEFAULT_K_FLUO, SensorModel, World

W, H = 728, 544
SENSOR = SensorModel(width=W, height=H)


def raster(phantom: dict) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    conc = np.full((H, W), phantom["background_icg_nM"], dtype=np.float64)
    for d in phantom["inclusions"]:
        conc[(xx - d["x"]) ** 2 + (yy - d["y"]) ** 2 <= d["radius"] ** 2] = d["icg_nM"]
    return conc + phantom["autofluorescence_nM"]


def test_sim_set_checks_scene_and_motion():
    assert validate({"scene": "rim", "motion_px": 2.5}) == {"scene": "rim", "motion_px": 2.5}
    with pytest.raises(InvalidArgument, match="scene: 'tattoo', allowed default, clean_bed"):
        validate({"scene": "tattoo"})
    with pytest.raises(InvalidArgument, match="motion_px"):
        validate({"motion_px": -1})
    with pytest.raises(InvalidArgument, match="motion_px"):
        validate({"motion_px": "fast"})


def test_the_world_takes_a_scene_and_reports_it():
    world = World(ManualClock(), SENSOR)
    world.apply(validate({"scene": "small_foci", "motion_px": 1.5}, W, H))
    values = world.values()
    assert values["scene"] == "small_foci" and values["motion_px"] == 1.5
    assert values["phantom"] == scenes.build("small_foci", W, H).phantom
    assert world.scene().motion_px == 1.5


@pytest.mark.parametrize("name", scenes.NAMES)
def test_each_scene_states_its_own_truth(name):
    sc = scenes.build(name, W, H)
    conc = raster(sc.phantom)
    tissue = conc[np.isclose(conc, sc.phantom["background_icg_nM"] + sc.phantom["autofluorescence_nM"])]
    for shape in sc.findings or sc.uptake:
        yy, xx = np.mgrid[0:H, 0:W] + 0.5
        r2 = (xx - shape.x) ** 2 + (yy - shape.y) ** 2
        inside = (r2 <= shape.outer ** 2) & (r2 > shape.inner ** 2)
        assert conc[inside].mean() / tissue.mean() == pytest.approx(sc.true_sbr, rel=1e-9)
    if name in ("clean_bed", "drape"):
        assert conc.max() / tissue.mean() == pytest.approx(sc.true_sbr)  # brightest patch over plain tissue
    if name == "small_foci":
        assert sorted(f.outer for f in sc.findings) == [10.0, 14.0, 20.0]
    if name == "residual_focus":
        assert sc.findings[0].outer == 25.0
    if name == "rim":
        centre = conc[int(sc.uptake[0].y), int(sc.uptake[0].x)]
        assert centre < tissue.mean()  # a dark centre
    if name == "drape":
        assert (conc == 0).mean() == pytest.approx(0.38, abs=0.03)
    if name == "no_icg":
        # the brightest reading in counts/s/mW at the sensor's defaults: ~1.8 (SIM.md physics)
        cps_per_mw = conc.max() * 1e3 * 0.9 * DEFAULT_K_FLUO * SENSOR.adu_per_e
        assert cps_per_mw == pytest.approx(1.79, rel=0.01)


def test_motion_moves_the_rendered_field_by_motion_px_per_frame():
    world = World(ManualClock(), SENSOR)
    world.apply({"scene": "residual_focus", "motion_px": 3.0})
    renderer = FrameRenderer(SENSOR, seed=1)
    snap = world.scene()
    focus = scenes.build("residual_focus", W, H).findings[0]
    row = int(focus.y)
    centres = []
    for _ in range(4):
        frame = renderer.render(snap, 50.0, 10_000, 1.0).astype(np.float64)
        line = frame[row - 5:row + 5].mean(axis=0)
        bright = line > (line.max() + np.median(line)) / 2
        centres.append(float(np.nonzero(bright)[0].mean()))
    steps = np.diff(centres)
    assert steps == pytest.approx([3.0, 3.0, 3.0], abs=0.5)
    assert centres[0] == pytest.approx(focus.x - 0.5 + 3.0, abs=1.0)  # moved once before the first


def test_no_motion_renders_the_field_in_place():
    world = World(ManualClock(), SENSOR)
    world.apply({"scene": "residual_focus"})
    renderer = FrameRenderer(SENSOR, seed=2)
    snap = world.scene()
    focus = scenes.build("residual_focus", W, H).findings[0]
    for _ in range(4):
        frame = renderer.render(snap, 50.0, 10_000, 1.0).astype(np.float64)
        ys, xs = np.nonzero(frame > (frame.max() + np.median(frame)) / 2)
        assert xs.mean() + 0.5 == pytest.approx(focus.x, abs=0.5)
        assert ys.mean() + 0.5 == pytest.approx(focus.y, abs=0.5)
