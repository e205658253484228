"""Tests of the fluorescence pipeline (services.processing.pipeline) against frames synthesised here
with the simulator's physics (SIM.md "Physics of a frame")."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nirf.hal.errors import InvalidArgument, WrongState
from nirf.services.processing.pipeline import (
    COLOUR_LUT,
    PREVIEW_SATURATED_RGB,
    PairProcessor,
    Roi,
    flat_field_from_uniform,
)
from nirf.sim.world import DEFAULT_K_FLUO

# --- a frame synthesiser following SIM.md -------------------------------------------------

W, H = 728, 544  # half the reference sensor in each axis: fast, same geometry


@dataclass
class Scene:
    """What SIM.md's physics needs to render one frame."""

    width: int = W
    height: int = H
    background_nM: float = 50.0
    autofluorescence_nM: float = 0.0
    # (x, y, radius, icg_nM); default: SIM.md's centred disk of radius height/6, 200 nM
    inclusions: list = field(default_factory=lambda: [(W / 2, H / 2, H / 6, 200.0)])
    ambient_e_per_ms: float = 5.0
    gaussian_sigma_frac: float | None = None  # illumination profile; None = uniform
    power_mw: float = 50.0
    exposure_ms: float = 10.0
    gain: float = 1.0
    t_em: float = 0.9  # filter 1, ICG emission band-pass
    t_amb: float = 0.05
    dark_e_per_ms: float = 0.01
    read_noise_e: float = 2.0
    adu_per_e: float = 0.25
    black_level: int = 16
    bits: int = 10
    k_fluo: float = DEFAULT_K_FLUO


def concentration(scene: Scene) -> np.ndarray:
    """ICG + autofluorescence per pixel (nM)."""
    yy, xx = np.mgrid[0:scene.height, 0:scene.width] + 0.5
    c = np.full((scene.height, scene.width), scene.background_nM, dtype=np.float64)
    for x, y, r, nM in scene.inclusions:
        c[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = nM
    return c + scene.autofluorescence_nM


def illumination(scene: Scene) -> np.ndarray:
    """Relative excitation per pixel (1 at the centre)."""
    if scene.gaussian_sigma_frac is None:
        return np.ones((scene.height, scene.width))
    yy, xx = np.mgrid[0:scene.height, 0:scene.width] + 0.5
    sigma = scene.gaussian_sigma_frac * scene.height
    r2 = (xx - scene.width / 2) ** 2 + (yy - scene.height / 2) ** 2
    return np.exp(-r2 / (2 * sigma * sigma))


def fluorescence_e(scene: Scene) -> np.ndarray:
    """Electrons from fluorescence alone in one lit exposure (the true D, in e-)."""
    t = scene.exposure_ms
    return t * scene.t_em * scene.k_fluo * scene.power_mw * illumination(scene) * concentration(scene)


def render(scene: Scene, lit: bool, rng: np.random.Generator) -> np.ndarray:
    """One raw frame: electrons, normal shot noise (variance e), read noise, gain, black
    level, rounding and clipping to the sensor's full scale."""
    t = scene.exposure_ms
    e = t * scene.t_amb * scene.ambient_e_per_ms + t * scene.dark_e_per_ms
    e = e + (fluorescence_e(scene) if lit else np.zeros((scene.height, scene.width)))
    # shot noise (variance e) and read noise are independent normals: draw their sum as
    # one normal of variance e + read_noise^2
    noisy = e + np.sqrt(e + scene.read_noise_e ** 2) * rng.standard_normal(e.shape, dtype=np.float32)
    counts = np.round(noisy * scene.adu_per_e * scene.gain + scene.black_level)
    return np.clip(counts, 0, 2 ** scene.bits - 1).astype(np.uint16)


def meta(scene: Scene, seq: int, lit: bool, t0_ns: int = 1_000_000_000) -> dict:
    exposure_us = int(round(scene.exposure_ms * 1000))
    t_start = t0_ns + seq * 33_333_333
    return {"frame_seq": seq, "t_start_ns": t_start, "t_end_ns": t_start + exposure_us * 1000,
            "exposure_us": exposure_us, "gain": scene.gain,
            "laser_mw": scene.power_mw, "filter_position": 1, "bits": scene.bits}


def pair(scene: Scene, rng: np.random.Generator, seq: int = 0, off_scene: Scene | None = None):
    """(on, off, meta_on, meta_off) for one pair, the off frame one frame period later."""
    on = render(scene, True, rng)
    off = render(off_scene or scene, False, rng)
    return on, off, meta(scene, seq, True), meta(off_scene or scene, seq + 1, False)


def true_sbr(scene: Scene, signal: Roi, background: Roi) -> float:
    """Ratio of the tissue's fluorescence (concentration) over the two ROIs."""
    c = concentration(scene)
    return float(c[signal.slices()].mean() / c[background.slices()].mean())


# ROIs for the default geometry: signal well inside the disk (radius ~90 px), background
# well outside it, left of centre.
SIGNAL = Roi(W // 2 - 50, H // 2 - 50, 100, 100)
BACKGROUND = Roi(40, H // 2 - 75, 150, 150)


def processor(**kw) -> PairProcessor:
    p = PairProcessor(W, H, 10, **kw)
    p.set_rois(SIGNAL, BACKGROUND)
    return p


def run_pairs(p: PairProcessor, scene: Scene, rng, n: int, off_scene: Scene | None = None) -> list[dict]:
    return [p.process(*pair(scene, rng, 2 * i, off_scene)) for i in range(n)]


# --- SBR accuracy ---------------------------------------------------------------------------


@pytest.mark.parametrize("sbr", [1.5, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("ambient_factor", [0.0, 10.0, 100.0])
def test_sbr_within_3_percent_of_truth(sbr, ambient_factor):
    # Tumour fixed at 200 nM (below saturation at 50 mW even with 100x ambient); the
    # background sets the contrast.
    scene = Scene(background_nM=200.0 / sbr, ambient_e_per_ms=5.0 * ambient_factor)
    truth = true_sbr(scene, SIGNAL, BACKGROUND)
    assert truth == pytest.approx(sbr)
    p = processor(average_pairs=4)
    results = run_pairs(p, scene, np.random.default_rng(int(sbr * 100 + ambient_factor)), 4)
    last = results[-1]
    assert last["average"]["pairs"] == 4
    assert last["average"]["sbr"] == pytest.approx(truth, rel=0.03)
    assert all(r["valid"] and not r["flags"] for r in results)
    # the call follows the averaged SBR against the threshold
    assert last["average"]["positive"] == (last["average"]["sbr"] >= 2.0)


def test_intensity_is_normalised_to_exposure_gain_and_power():
    rng = np.random.default_rng(7)
    p = processor()
    expected = (DEFAULT_K_FLUO * 0.9 * 200.0 * 0.25) * 1000.0  # counts per s per mW
    for scene in (Scene(), Scene(power_mw=25.0, gain=2.0), Scene(exposure_ms=5.0, power_mw=80.0)):
        r = p.process(*pair(scene, rng))
        assert r["intensity"] == pytest.approx(expected, rel=0.02)


def test_result_carries_pair_identity_and_rois():
    scene = Scene()
    on, off, m_on, m_off = pair(scene, np.random.default_rng(1), seq=40)
    r = processor(sbr_threshold=3.0).process(on, off, m_on, m_off)
    assert r["frame_seq"] == 40
    assert r["t_capture_ns"] == max(m_on["t_end_ns"], m_off["t_end_ns"]) == m_off["t_end_ns"]
    assert r["roi"] == {"signal": SIGNAL.to_list(), "background": BACKGROUND.to_list()}
    assert r["threshold"] == 3.0
    assert r["positive"] is True  # true SBR 4 >= 3


def test_numpy_typed_metadata_is_accepted():
    on, off, m_on, m_off = pair(Scene(), np.random.default_rng(17))
    typed = {k: (np.int64(v) if isinstance(v, int) else np.float64(v)) for k, v in m_on.items()}
    r = processor().process(on, off, typed, m_off)
    assert r["valid"] and isinstance(r["frame_seq"], int) and isinstance(r["t_capture_ns"], int)


def test_statistics_match_a_plain_numpy_reference():
    scene = Scene()
    on, off, m_on, m_off = pair(scene, np.random.default_rng(2))
    r = processor().process(on, off, m_on, m_off)
    d = on.astype(np.float64) - off.astype(np.float64)
    s, b = d[SIGNAL.slices()], d[BACKGROUND.slices()]
    assert r["signal_mean"] == pytest.approx(s.mean(), rel=1e-5)
    assert r["background_mean"] == pytest.approx(b.mean(), rel=1e-5)
    assert r["background_std"] == pytest.approx(b.std(), rel=1e-4)
    assert r["cnr"] == pytest.approx((s.mean() - b.mean()) / b.std(), rel=1e-4)
    assert r["sbr"] == pytest.approx(s.mean() / b.mean(), rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_roi_means_match_reference_for_any_roi(data):
    w = data.draw(st.integers(4, 40), label="width")
    h = data.draw(st.integers(4, 40), label="height")

    def roi():
        x = data.draw(st.integers(0, w - 1))
        y = data.draw(st.integers(0, h - 1))
        return Roi(x, y, data.draw(st.integers(1, w - x)), data.draw(st.integers(1, h - y)))

    signal, background = roi(), roi()
    if background.area_px < 2:
        background = Roi(0, 0, 2, 1)
    seed = data.draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    on = rng.integers(0, 1024, (h, w), dtype=np.uint16)
    off = rng.integers(0, 1024, (h, w), dtype=np.uint16)
    p = PairProcessor(w, h, 10, preview_downsample=3)
    p.set_rois(signal, background)
    m = meta(Scene(width=w, height=h), 0, True)
    r = p.process(on, off, m, dict(m))
    d = on.astype(np.float64) - off
    assert r["signal_mean"] == pytest.approx(d[signal.slices()].mean(), abs=1e-3)
    assert r["background_mean"] == pytest.approx(d[background.slices()].mean(), abs=1e-3)
    sat = (on[signal.slices()] >= 1023).mean()
    assert r["saturated_fraction"] == pytest.approx(sat)
    assert r["frame_saturated_fraction"] == pytest.approx((on >= 1023).mean())
    pw, ph, rgb = p.preview(on, off)
    assert (pw, ph) == (math.ceil(w / 3), math.ceil(h / 3)) and len(rgb) == pw * ph * 3


# --- dim scenes: the sign of D is kept ---------------------------------------------------------


def test_dim_scene_is_not_biased_upward_unlike_clamping():
    # True SBR 1.2 at 0.25 mW: fluorescence of about 1 count per pixel against a
    # difference noise of about 1.1 counts, so many pixels of D are negative.
    scene = Scene(background_nM=50.0, inclusions=[(W / 2, H / 2, H / 6, 60.0)], power_mw=0.25)
    true_d = fluorescence_e(scene) * scene.adu_per_e * scene.gain
    true_s, true_b = true_d[SIGNAL.slices()].mean(), true_d[BACKGROUND.slices()].mean()
    p = processor(average_pairs=16)
    rng = np.random.default_rng(11)
    clamped_s, clamped_b = [], []
    for i in range(16):
        on, off, m_on, m_off = pair(scene, rng, 2 * i)
        r = p.process(on, off, m_on, m_off)
        d = np.maximum(on.astype(np.float64) - off, 0.0)  # the biased approach
        clamped_s.append(d[SIGNAL.slices()].mean())
        clamped_b.append(d[BACKGROUND.slices()].mean())
    avg = r["average"]
    assert avg["pairs"] == 16
    assert avg["signal_mean"] == pytest.approx(true_s, rel=0.03)
    assert avg["background_mean"] == pytest.approx(true_b, rel=0.03)
    assert avg["sbr"] == pytest.approx(1.2, rel=0.03)
    clamped_b_mean = float(np.mean(clamped_b))
    clamped_sbr = float(np.mean(clamped_s)) / clamped_b_mean
    assert clamped_b_mean > 1.1 * true_b  # clamping inflates a dim mean
    assert abs(clamped_sbr - 1.2) > 2 * abs(avg["sbr"] - 1.2)


# --- flat field -----------------------------------------------------------------------------------


def test_flat_field_corrects_uneven_illumination():
    rng = np.random.default_rng(21)
    uniform = Scene(inclusions=[], gaussian_sigma_frac=0.35)
    diffs = []
    for i in range(4):
        on, off, _, _ = pair(uniform, rng, 2 * i)
        diffs.append(on.astype(np.float32) - off)
    gain_map = flat_field_from_uniform(diffs)
    assert gain_map.shape == (H, W)
    # the map follows the true profile (normalised over the centre) within a few percent
    profile = illumination(uniform)
    ch, cw = H // 4, W // 4
    profile = profile / profile[ch:H - ch, cw:W - cw].mean()
    assert np.allclose(gain_map[::16, ::16], profile[::16, ::16], rtol=0.05)

    scene = replace(uniform, inclusions=[(W / 2, H / 2, H / 6, 200.0)])
    truth = true_sbr(scene, SIGNAL, BACKGROUND)
    plain = processor(average_pairs=4)
    corrected = processor(average_pairs=4, flat_field=gain_map)
    for i in range(4):
        on, off, m_on, m_off = pair(scene, rng, 2 * i)
        r_plain = plain.process(on, off, m_on, m_off)
        r_corr = corrected.process(on, off, m_on, m_off)
    assert r_corr["average"]["sbr"] == pytest.approx(truth, rel=0.03)
    # without the correction the dim edge makes the contrast look far higher
    assert r_plain["average"]["sbr"] > 1.3 * truth
    # and the corrected statistics equal D divided by the renormalised map
    g = gain_map / gain_map[ch:H - ch, cw:W - cw].mean()
    d = (on.astype(np.float64) - off) / g
    assert r_corr["signal_mean"] == pytest.approx(d[SIGNAL.slices()].mean(), rel=1e-4)


def test_set_flat_field_none_restores_plain_statistics():
    scene = Scene()
    on, off, m_on, m_off = pair(scene, np.random.default_rng(3))
    p = processor()
    before = p.process(on, off, m_on, m_off)
    gain = np.linspace(0.5, 1.5, W, dtype=np.float32)[None, :].repeat(H, axis=0)
    p.set_flat_field(gain)
    changed = p.process(on, off, m_on, m_off)
    p.set_flat_field(None)
    after = p.process(on, off, m_on, m_off)
    assert changed["background_mean"] != pytest.approx(before["background_mean"], rel=0.05)
    assert after["background_mean"] == pytest.approx(before["background_mean"])


def test_flat_field_from_uniform_rejects_bad_input():
    with pytest.raises(InvalidArgument, match="no difference frames"):
        flat_field_from_uniform([])
    with pytest.raises(InvalidArgument, match="shape"):
        flat_field_from_uniform([np.ones((32, 32)), np.ones((32, 30))])
    dark_edge = np.ones((64, 64))
    dark_edge[:, :4] = 0.0
    with pytest.raises(InvalidArgument, match="below the limit"):
        flat_field_from_uniform([dark_edge], block_px=4, smooth_blocks=0)
    with pytest.raises(InvalidArgument, match="positive difference"):
        flat_field_from_uniform([-np.ones((64, 64))])
    with pytest.raises(InvalidArgument, match="NaN"):
        flat_field_from_uniform([np.full((64, 64), np.nan)])


def test_set_flat_field_rejects_bad_maps():
    p = processor()
    with pytest.raises(InvalidArgument, match="shape"):
        p.set_flat_field(np.ones((H, W - 1)))
    bad = np.ones((H, W))
    bad[5, 5] = 0.0
    with pytest.raises(InvalidArgument, match="above 0"):
        p.set_flat_field(bad)


# --- flags and validity --------------------------------------------------------------------------


def test_saturated_tumour_is_flagged_and_not_valid():
    scene = Scene(power_mw=150.0)  # tumour ~1800 counts before clipping at 1023
    on, off, m_on, m_off = pair(scene, np.random.default_rng(4))
    r = processor().process(on, off, m_on, m_off)
    assert "saturated" in r["flags"]
    assert r["valid"] is False and r["positive"] is False
    assert r["saturated_fraction"] > 0.99
    disk_fraction = float((concentration(scene) > 100).mean())
    assert r["frame_saturated_fraction"] == pytest.approx(disk_fraction, rel=0.05)


def test_one_saturated_pixel_invalidates_by_default_and_a_limit_allows_some():
    scene = Scene()
    on, off, m_on, m_off = pair(scene, np.random.default_rng(5))
    on = on.copy()
    rows, cols = SIGNAL.slices()
    on[rows, cols][0, 0] = 1023  # 1 of 10000 px
    default = processor().process(on, off, m_on, m_off)
    assert default["saturated_fraction"] == pytest.approx(1e-4)
    assert "saturated" in default["flags"] and not default["valid"]
    on[rows, cols][:1, :50] = 1023  # 50 of 10000 px: 0.5 %
    lenient = processor(saturation_limit=0.01).process(on, off, m_on, m_off)
    assert lenient["saturated_fraction"] == pytest.approx(0.005)
    assert lenient["valid"] and "saturated" not in lenient["flags"]
    strict = processor(saturation_limit=0.001).process(on, off, m_on, m_off)
    assert "saturated" in strict["flags"] and not strict["valid"]


@pytest.mark.parametrize("key,value", [("exposure_us", 5000), ("gain", 2.0), ("filter_position", 2)])
def test_settings_changed_within_pair(key, value):
    on, off, m_on, m_off = pair(Scene(), np.random.default_rng(6))
    m_off[key] = value
    r = processor().process(on, off, m_on, m_off)
    assert r["flags"] == ["settings_changed"]
    assert r["valid"] is False and r["positive"] is False


def test_laser_off_flag_and_no_intensity():
    scene = Scene(power_mw=0.0)
    on, off, m_on, m_off = pair(scene, np.random.default_rng(8))
    r = processor().process(on, off, m_on, m_off)
    assert "laser_off" in r["flags"]
    assert r["intensity"] is None
    assert r["valid"] is False and r["positive"] is False


def test_background_not_positive_gives_no_sbr():
    # No ICG outside the tumour, and ambient light that rose between the two frames:
    # the background difference is negative.
    scene = Scene(background_nM=0.0, ambient_e_per_ms=5.0)
    brighter_off = replace(scene, ambient_e_per_ms=100.0)
    on, off, m_on, m_off = pair(scene, np.random.default_rng(9), off_scene=brighter_off)
    r = processor().process(on, off, m_on, m_off)
    assert r["background_mean"] < 0
    assert r["sbr"] is None
    assert r["flags"] == ["background_not_positive"]
    assert r["valid"] is False and r["positive"] is False


# --- averaging -------------------------------------------------------------------------------------


def test_average_of_last_n_valid_pairs():
    rng = np.random.default_rng(10)
    scene = Scene()
    p = processor(average_pairs=3)
    results = run_pairs(p, scene, rng, 5)
    last3 = results[-3:]
    avg = results[-1]["average"]
    assert avg["pairs"] == 3
    assert avg["signal_mean"] == pytest.approx(np.mean([r["signal_mean"] for r in last3]))
    assert avg["background_mean"] == pytest.approx(np.mean([r["background_mean"] for r in last3]))
    assert avg["sbr"] == pytest.approx(avg["signal_mean"] / avg["background_mean"])
    # an invalid pair is reported but does not enter the average
    on, off, m_on, m_off = pair(scene, rng, 20)
    m_off["gain"] = 4.0
    bad = p.process(on, off, m_on, m_off)
    assert not bad["valid"]
    assert bad["average"]["signal_mean"] == pytest.approx(avg["signal_mean"])
    # new ROIs start a new window
    p.set_rois(SIGNAL, Roi(40, 40, 100, 100))
    fresh = p.process(*pair(scene, rng, 30))
    assert fresh["average"]["pairs"] == 1


def test_average_restarts_when_power_changes():
    rng = np.random.default_rng(12)
    p = processor(average_pairs=8)
    run_pairs(p, Scene(), rng, 3)
    r = p.process(*pair(Scene(power_mw=30.0), rng, 10))
    assert r["average"]["pairs"] == 1


def test_no_average_field_without_averaging():
    r = processor().process(*pair(Scene(), np.random.default_rng(13)))
    assert "average" not in r


# --- preview ---------------------------------------------------------------------------------------


def test_preview_size_and_colours():
    scene = Scene()
    on, off, _, _ = pair(scene, np.random.default_rng(14))
    p = processor(preview_downsample=8)
    width, height, rgb = p.preview(on, off)
    assert (width, height) == (math.ceil(W / 8), math.ceil(H / 8))
    assert isinstance(rgb, bytes) and len(rgb) == width * height * 3
    img = np.frombuffer(rgb, dtype=np.uint8).reshape(height, width, 3)
    centre = img[height // 2, width // 2].astype(int)
    corner = img[3, 3].astype(int)
    assert centre.sum() > corner.sum() + 100  # the tumour is brighter
    # every pixel is a colour of the fixed map
    lut = {tuple(c) for c in COLOUR_LUT.tolist()}
    assert {tuple(c) for c in img.reshape(-1, 3).tolist()} <= lut


def test_preview_marks_saturated_pixels_and_clamps_negative_values():
    scene = Scene(power_mw=150.0)
    on, off, _, _ = pair(scene, np.random.default_rng(15))
    on = on.copy()
    on[:8, :] = 0  # a strip darker than the off frame: negative D
    p = processor(preview_downsample=4)
    width, height, rgb = p.preview(on, off, display_max_counts=500.0)
    img = np.frombuffer(rgb, dtype=np.uint8).reshape(height, width, 3)
    assert tuple(img[height // 2, width // 2]) == PREVIEW_SATURATED_RGB
    assert tuple(img[0, 0]) == tuple(COLOUR_LUT[0])  # clamped to the bottom of the map
    with pytest.raises(InvalidArgument, match="display_max_counts"):
        p.preview(on, off, display_max_counts=0.0)


def test_preview_pixels_are_the_colour_map_of_a_plain_reference():
    # the preview against a plain numpy restatement of its definition (every k-th pixel of
    # D, scaled to the display maximum, clamped, looked up row by row in the (256, 3) map;
    # full-scale raw pixels painted PREVIEW_SATURATED_RGB)
    scene = Scene(power_mw=150.0)
    on, off, _, _ = pair(scene, np.random.default_rng(21))
    p = processor(preview_downsample=4)
    width, height, rgb = p.preview(on, off, display_max_counts=300.0)
    d = on[::4, ::4].astype(np.float32) - off[::4, ::4].astype(np.float32)
    idx = np.clip(d * np.float32(255.0 / 300.0), 0.0, 255.0).astype(np.intp)
    expected = COLOUR_LUT[idx]
    expected[on[::4, ::4] >= p.full_scale] = PREVIEW_SATURATED_RGB
    assert (on[::4, ::4] >= p.full_scale).any() and (~(on[::4, ::4] >= p.full_scale)).any()
    assert np.array_equal(np.frombuffer(rgb, dtype=np.uint8).reshape(height, width, 3), expected)


def test_preview_display_range_is_near_numpy_percentile_of_all_its_pixels():
    # the span comes from a sample of the preview's pixels; against numpy's percentile of
    # every one of them, on a scene with a bright inclusion (its top 0.5 % decides the span)
    from nirf.services.processing.pipeline import PREVIEW_PERCENTILE

    scene = Scene()
    on, off, _, _ = pair(scene, np.random.default_rng(23))
    p = processor(preview_downsample=4)
    width, height, rgb = p.preview(on, off)
    d = on[::4, ::4].astype(np.float32) - off[::4, ::4].astype(np.float32)
    exact = float(np.percentile(d, PREVIEW_PERCENTILE))
    # the colours the same span gives, from its definition: with the exact span most
    # pixels must come out the same colour index, within one step
    img = np.frombuffer(rgb, dtype=np.uint8).reshape(height, width, 3)
    ref_idx = np.clip(d * np.float32(255.0 / exact), 0.0, 255.0).astype(np.intp)
    lut = {tuple(c): i for i, c in enumerate(COLOUR_LUT.tolist())}
    got_idx = np.array([lut[tuple(c)] for c in img.reshape(-1, 3).tolist()]).reshape(height, width)
    assert np.mean(np.abs(got_idx - ref_idx) <= 2) > 0.99
    assert ref_idx.max() == 255 and ref_idx.min() < 100  # the scene spans much of the map


def test_preview_told_the_frame_has_no_full_scale_pixel_is_the_same_preview():
    # the service passes what process() found (frame_saturated_fraction 0: no pixel at full
    # scale); the preview then skips its own look, and the picture is the same
    for power, rng in ((50.0, 22), (150.0, 23)):
        on, off, m_on, m_off = pair(Scene(power_mw=power), np.random.default_rng(rng))
        p = processor(preview_downsample=4)
        saturated = p.process(on, off, m_on, m_off)["frame_saturated_fraction"] > 0
        assert saturated == (power == 150.0)  # one pair of each kind
        assert p.preview(on, off, any_saturated=saturated) == p.preview(on, off)


@given(st.integers(min_value=0, max_value=0xFFFF), st.integers(min_value=0, max_value=2**32 - 1))
@settings(max_examples=25, deadline=None)
def test_motion_profiles_are_exact_integer_sums(fill, seed):
    # the column stripe is summed as a float32 matrix-vector product: exact for uint16 at any
    # value, checked against integer sums (a frame near full scale is the worst case)
    from nirf.services.processing.pipeline import MOTION_STRIPE_PX, MotionTracker

    rng = np.random.default_rng(seed)
    frame = np.clip(fill + rng.integers(-3, 4, size=(120, 160)), 0, 0xFFFF).astype(np.uint16)
    xp, yp = MotionTracker()._profiles(frame, (80, 60))
    half = MOTION_STRIPE_PX // 2
    rows = frame[60 - half:60 + half].astype(np.int64).sum(axis=0)
    cols = frame[:, 80 - half:80 + half].astype(np.int64).sum(axis=1)
    assert np.array_equal(xp.v, rows.astype(np.float64)) and np.array_equal(yp.v, cols.astype(np.float64))


@given(st.integers(min_value=30, max_value=400), st.integers(min_value=1, max_value=16),
       st.integers(min_value=0, max_value=4095), st.integers(min_value=0, max_value=2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_motion_profile_window_sums_match_a_plain_computation(size, search, level, seed):
    # each window's squared deviations from its mean, as numpy computes them window by
    # window, for stripe sums of frames up to 12 bits
    from nirf.services.processing.pipeline import MOTION_STRIPE_PX, _Profile

    rng = np.random.default_rng(seed)
    values = np.clip(level + rng.integers(-50, 51, size=size), 0, 4095) * MOTION_STRIPE_PX
    p = _Profile(values.astype(np.float32), search)
    n = size - 2 * search
    if n < 1:
        assert p.ssd is None
        return
    expected = [float(np.sum((w - w.mean()) ** 2)) for w in
                (values[k:k + n].astype(np.float64) for k in range(2 * search + 1))]
    assert p.n == n and p.v.dtype == np.float64
    assert np.allclose(p.ssd, expected, rtol=1e-9, atol=1e-6 * max(1.0, max(expected)))


def test_colour_map_brightness_rises():
    brightness = COLOUR_LUT.astype(int).sum(axis=1)
    assert brightness[0] == 0
    assert np.all(np.diff(brightness) >= 0)


# --- errors ------------------------------------------------------------------------------------------


def test_roi_validation():
    with pytest.raises(InvalidArgument, match="negative"):
        Roi(-1, 0, 10, 10)
    with pytest.raises(InvalidArgument, match="at least 1"):
        Roi(0, 0, 0, 10)
    with pytest.raises(InvalidArgument, match="whole number"):
        Roi(0, 0, 10.5, 10)
    with pytest.raises(InvalidArgument, match="whole number"):
        Roi(True, 0, 10, 10)
    with pytest.raises(InvalidArgument, match="728x544"):
        Roi.from_list([700, 0, 40, 10], W, H)
    with pytest.raises(InvalidArgument, match=r"\[x, y, w, h\]"):
        Roi.from_list([1, 2, 3], W, H)
    assert Roi.from_list([1, 2, 3, 4], W, H).to_list() == [1, 2, 3, 4]


def test_processor_rejects_bad_rois_frames_and_metadata():
    p = PairProcessor(W, H, 10)
    on, off, m_on, m_off = pair(Scene(), np.random.default_rng(16))
    with pytest.raises(WrongState, match="no ROIs"):
        p.process(on, off, m_on, m_off)
    with pytest.raises(InvalidArgument, match="frame is 728x544"):
        p.set_rois(Roi(0, 0, 10, 10), Roi(0, 540, 10, 10))
    with pytest.raises(InvalidArgument, match="at least 2"):
        p.set_rois(Roi(0, 0, 10, 10), Roi(100, 100, 1, 1))
    p.set_rois(SIGNAL, BACKGROUND)
    with pytest.raises(InvalidArgument, match="shape"):
        p.process(on[:-1], off, m_on, m_off)
    with pytest.raises(InvalidArgument, match="integer"):
        p.process(on.astype(np.float32), off, m_on, m_off)
    missing = dict(m_on)
    del missing["laser_mw"]
    with pytest.raises(InvalidArgument, match="laser_mw"):
        p.process(on, off, missing, m_off)
    with pytest.raises(InvalidArgument, match="12-bit"):
        p.process(on, off, dict(m_on, bits=12), m_off)
    with pytest.raises(InvalidArgument, match="not a finite number"):
        p.process(on, off, dict(m_on, gain=float("nan")), m_off)
    with pytest.raises(InvalidArgument, match="sbr_threshold"):
        PairProcessor(W, H, 10, sbr_threshold=-1.0)
    with pytest.raises(InvalidArgument, match="preview_downsample"):
        PairProcessor(W, H, 10, preview_downsample=0)
