"""Tests of the simulated camera's frame renderer: the physics of SIM.md and the noise
statistics (mean, variance, independence across pixels and frames).

The statistical tests use fixed seeds but are sized so that they would pass with almost
any seed: each tolerance is several standard errors of its estimate (the margins are
given next to each test), while a wrong variance or correlated noise misses them by far.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from nirf.hal.clock import ManualClock
from nirf.hal.errors import InvalidArgument
from nirf.sim.render import NOISE_MAX, NOISE_MEAN, NOISE_VAR, FrameRenderer, shaped_noise_u16
from nirf.sim.world import Inclusion, Phantom, SceneSnapshot, SensorModel, World

SENSOR = SensorModel()
EXPOSURE_US = 10_000


def default_scene(**changes) -> SceneSnapshot:
    scene = World(ManualClock(), SENSOR).scene()
    return dataclasses.replace(scene, **changes) if changes else scene


def uniform_scene(icg_nM: float, **changes) -> SceneSnapshot:
    """A field without inclusions: every pixel has the same expected signal."""
    return default_scene(phantom=Phantom(icg_nM, 0.0, []), **changes)


def model_variance_counts(e: float, gain: float, sensor: SensorModel = SENSOR) -> float:
    """SIM.md's variance in counts: shot + read noise scaled to counts, plus rounding."""
    counts_per_e = sensor.adu_per_e * gain
    return counts_per_e**2 * (e + sensor.read_noise_e**2) + 1.0 / 12.0


def disk_masks(sensor: SensorModel = SENSOR) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """A signal ROI well inside the default inclusion and a background ROI well outside."""
    cy, cx = sensor.height // 2, sensor.width // 2
    half = int(sensor.height / 6 / 2)  # a square inside the disk (radius height/6)
    signal = (slice(cy - half, cy + half), slice(cx - half, cx + half))
    background = (slice(20, 220), slice(20, 220))
    return signal, background


# --- the noise shaping --------------------------------------------------------------------


def test_shaped_noise_matches_its_definition_and_moments():
    """All 65536 inputs: the integer is u6 + 16 * (sum of the five 2-bit fields), and its
    exact mean and variance are the constants the renderer rescales with."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty_like(bits)
    scratch = np.empty_like(bits)
    v = shaped_noise_u16(bits, out, scratch).astype(np.int64)
    b = bits.astype(np.int64)
    expected = (b & 63) + 16 * sum((b >> (6 + 2 * k)) & 3 for k in range(5))
    assert np.array_equal(v, expected)
    assert v.mean() == pytest.approx(NOISE_MEAN, abs=1e-9)
    assert v.var() == pytest.approx(NOISE_VAR, rel=1e-12)
    assert v.max() == NOISE_MAX and v.min() == 0
    # Close to normal: the central +-1 sigma holds about 68 % of the mass.
    z = (v - NOISE_MEAN) / math.sqrt(NOISE_VAR)
    assert 0.64 < np.mean(np.abs(z) < 1.0) < 0.72


# --- mean and variance against the model ---------------------------------------------------


@pytest.mark.parametrize(
    "icg_nM, laser_mw, gain",
    [
        (50.0, 0.0, 1.0),   # laser off: ambient and dark only, ~2.6 e-
        (50.0, 5.0, 1.0),   # ~60 e-
        (50.0, 50.0, 4.0),  # ~600 e-, counts near 60 % of full scale
        (20.0, 50.0, 1.0),  # ~240 e-
    ],
)
@pytest.mark.parametrize("seed", [0, 7])
def test_mean_and_variance_match_the_model(icg_nM, laser_mw, gain, seed):
    """Pooled over a full uniform frame (1.58 M pixels), the signal above black and the
    variance agree with SIM.md within 3 % (standard errors are about 0.1 %)."""
    scene = uniform_scene(icg_nM)
    r = FrameRenderer(SENSOR, seed=seed)
    e = float(r.expected_electrons(scene, laser_mw, EXPOSURE_US)[0, 0])
    expected_mean = float(r.expected_counts(scene, laser_mw, EXPOSURE_US, gain)[0, 0])
    frame = r.render(scene, laser_mw, EXPOSURE_US, gain).astype(np.float64)
    black = SENSOR.black_level
    assert frame.mean() - black == pytest.approx(expected_mean - black, rel=0.03)
    assert frame.var() == pytest.approx(model_variance_counts(e, gain), rel=0.03)


def test_expected_counts_follow_the_physics():
    """SIM.md's formula, term by term, at one pixel of a uniform field."""
    scene = uniform_scene(50.0, ambient_e_per_ms=5.0)
    r = FrameRenderer(SENSOR)
    t_em, t_amb, _ = scene.filters[1]
    t_ms = EXPOSURE_US / 1000.0
    e = t_ms * (t_amb * 5.0 + t_em * scene.k_fluo * 50.0 * 50.0) + t_ms * SENSOR.dark_e_per_ms
    assert r.expected_electrons(scene, 50.0, EXPOSURE_US)[3, 5] == pytest.approx(e)
    assert r.expected_counts(scene, 50.0, EXPOSURE_US, 2.0)[3, 5] == pytest.approx(
        e * SENSOR.adu_per_e * 2.0 + SENSOR.black_level)


# --- independence ---------------------------------------------------------------------------


def _overlapping_batch_variance(roi_means: np.ndarray, k: int, mean: float) -> float:
    """Variance of the mean of k consecutive frames' ROI means, from all overlapping windows
    of k frames (for each ROI), about the known mean. ``roi_means`` is (frames, rois)."""
    csum = np.cumsum(np.vstack([np.zeros(roi_means.shape[1]), roi_means]), axis=0)
    window_means = (csum[k:] - csum[:-k]) / k
    return float(np.mean((window_means - mean) ** 2))


@pytest.mark.slow  # many renders; kept out of the quick run
def test_variance_of_roi_mean_falls_as_one_over_k():
    """The variance of a 200x200 ROI mean averaged over K frames is the single-frame
    variance / K for K = 1, 4, 16, within 10 %.

    A 1400x1000 sensor holds 35 disjoint 200x200 ROIs; 768 frames give 26880 single-frame
    ROI means, and overlapping 16-frame windows an estimate of the K = 16 variance with a
    standard error of about 2.8 % (so 10 % is ~3.5 standard errors); K = 4 and K = 1 are far
    more precise. Noise reused between frames would not fall like this.
    """
    sensor = SensorModel(width=1400, height=1000)
    world = World(ManualClock(), sensor)
    scene = dataclasses.replace(world.scene(), phantom=Phantom(50.0, 0.0, []))
    r = FrameRenderer(sensor, seed=3)
    laser_mw, gain, n_frames = 5.0, 1.0, 768
    e = float(r.expected_electrons(scene, laser_mw, EXPOSURE_US)[0, 0])
    frame = np.empty((sensor.height, sensor.width), np.uint16)
    roi_means = np.empty((n_frames, 35))
    for i in range(n_frames):
        r.render(scene, laser_mw, EXPOSURE_US, gain, out=frame)
        sums = frame.reshape(5, 200, 7, 200).sum(axis=(1, 3), dtype=np.int64)
        roi_means[i] = sums.reshape(-1) / 40_000.0
    grand_mean = float(roi_means.mean())
    single_pixel_var = model_variance_counts(e, gain)
    variances = {k: _overlapping_batch_variance(roi_means, k, grand_mean) for k in (1, 4, 16)}
    for k, var in variances.items():
        assert var * k * 40_000 == pytest.approx(single_pixel_var, rel=0.10), k
        assert var * k / variances[1] == pytest.approx(1.0, rel=0.10), k


@pytest.mark.parametrize("second_mw", [50.0, 0.0])
def test_noise_of_two_frames_is_uncorrelated(second_mw):
    """Consecutive frames (laser on then on, and on then off as in a modulated pair):
    the correlation of their noise over a full frame is below 0.01 (its standard error is
    ~0.0008); a reused or shifted noise field would correlate."""
    scene = default_scene()
    r = FrameRenderer(SENSOR, seed=11)
    f1 = r.render(scene, 50.0, EXPOSURE_US, 1.0).astype(np.float64)
    f2 = r.render(scene, second_mw, EXPOSURE_US, 1.0).astype(np.float64)
    n1 = f1 - r.expected_counts(scene, 50.0, EXPOSURE_US, 1.0)
    n2 = f2 - r.expected_counts(scene, second_mw, EXPOSURE_US, 1.0)
    corr = np.corrcoef(n1.ravel(), n2.ravel())[0, 1]
    assert abs(corr) < 0.01
    # Neighbouring pixels of one frame are uncorrelated too.
    corr_x = np.corrcoef(n1[:, 1:].ravel(), n1[:, :-1].ravel())[0, 1]
    corr_y = np.corrcoef(n1[1:, :].ravel(), n1[:-1, :].ravel())[0, 1]
    assert abs(corr_x) < 0.01 and abs(corr_y) < 0.01


def test_seeding_is_reproducible_and_the_scene_seed_reseeds():
    scene = default_scene(seed=5)
    a = FrameRenderer(SENSOR, seed=1)
    b = FrameRenderer(SENSOR, seed=1)
    assert np.array_equal(a.render(scene, 50.0, EXPOSURE_US, 1.0),
                          b.render(scene, 50.0, EXPOSURE_US, 1.0))
    c = FrameRenderer(SENSOR, seed=2)
    assert not np.array_equal(a.render(scene, 50.0, EXPOSURE_US, 1.0),
                              c.render(scene, 50.0, EXPOSURE_US, 1.0))
    # A new scene seed restarts the noise from (seed, scene seed).
    d = FrameRenderer(SENSOR, seed=1)
    first = d.render(dataclasses.replace(scene, seed=6), 50.0, EXPOSURE_US, 1.0)
    assert np.array_equal(first, FrameRenderer(SENSOR, seed=1).render(
        dataclasses.replace(scene, seed=6), 50.0, EXPOSURE_US, 1.0))
    assert not np.array_equal(first, FrameRenderer(SENSOR, seed=1).render(
        scene, 50.0, EXPOSURE_US, 1.0))


# --- levels ------------------------------------------------------------------------------------


def test_saturation_clips_at_full_scale():
    """150 mW at gain 2: the tumor (~3600 counts expected) saturates, the background
    (~910 counts) does not."""
    scene = default_scene()
    r = FrameRenderer(SENSOR, seed=1)
    frame = r.render(scene, 150.0, EXPOSURE_US, 2.0)
    full_scale = 2**SENSOR.bits - 1
    assert frame.max() == full_scale
    signal, background = disk_masks()
    assert np.all(frame[signal] == full_scale)
    assert frame[background].max() < full_scale
    expected = r.expected_counts(scene, 150.0, EXPOSURE_US, 2.0)
    assert frame[background].mean() == pytest.approx(expected[background].mean(), rel=0.01)


def test_no_wrap_around_below_zero():
    """With a black level of 0, dark pixels' noise reaches below zero: they clip at 0
    instead of wrapping to 65535."""
    sensor = SensorModel(black_level=0)
    world = World(ManualClock(), sensor)
    scene = dataclasses.replace(world.scene(), filter_position=3)
    frame = FrameRenderer(sensor, seed=9).render(scene, 0.0, EXPOSURE_US, 8.0)
    assert frame.min() == 0 and frame.max() < 40


@pytest.mark.parametrize("sensor", [SENSOR, SensorModel(bits=12, black_level=64)])
def test_dark_frame_sits_at_black_level_plus_dark_current(sensor):
    """Filter 3 blocks everything: with the laser on, the frame is black level plus dark
    current (SE of the mean ~0.0005 counts)."""
    world = World(ManualClock(), sensor)
    scene = dataclasses.replace(world.scene(), filter_position=3)
    r = FrameRenderer(sensor, seed=2)
    frame = r.render(scene, 50.0, EXPOSURE_US, 1.0)
    dark_counts = sensor.dark_e_per_ms * EXPOSURE_US / 1000.0 * sensor.adu_per_e
    assert frame.mean() == pytest.approx(sensor.black_level + dark_counts, abs=0.01)
    assert np.median(frame) == sensor.black_level


def test_default_phantom_tumor_near_sixty_percent_of_full_scale():
    scene = default_scene()
    r = FrameRenderer(SENSOR, seed=4)
    frame = r.render(scene, 50.0, EXPOSURE_US, 1.0)
    signal, _ = disk_masks()
    fraction = frame[signal].mean() / (2**SENSOR.bits - 1)
    assert 0.55 < fraction < 0.65


@pytest.mark.parametrize("ambient_factor", [0.0, 1.0, 10.0, 100.0])
def test_on_minus_off_gives_true_sbr_whatever_the_ambient(ambient_factor):
    """SBR of laser-on minus laser-off is 4.0 within 2 % with ambient light from 0 to 100
    times the default: ambient and dark current cancel (the ROI means' standard errors are
    ~0.05 %)."""
    scene = default_scene(ambient_e_per_ms=5.0 * ambient_factor)
    r = FrameRenderer(SENSOR, seed=5)
    on = r.render(scene, 50.0, EXPOSURE_US, 1.0).astype(np.float64)
    off = r.render(scene, 0.0, EXPOSURE_US, 1.0).astype(np.float64)
    diff = on - off
    signal, background = disk_masks()
    assert diff[signal].mean() / diff[background].mean() == pytest.approx(4.0, rel=0.02)


# --- scene options ---------------------------------------------------------------------------


def test_gaussian_illumination_profile():
    """Peak 1.0 at the centre, sigma = frac x height pixels; it scales the laser terms only."""
    frac = 0.25
    scene = uniform_scene(50.0, illumination={"gaussian_sigma_frac": frac}, ambient_e_per_ms=0.0)
    uniform = uniform_scene(50.0, ambient_e_per_ms=0.0)
    r = FrameRenderer(SENSOR)
    dark = SENSOR.dark_e_per_ms * EXPOSURE_US / 1000.0
    e = r.expected_electrons(scene, 50.0, EXPOSURE_US) - dark
    e_uniform = r.expected_electrons(uniform, 50.0, EXPOSURE_US) - dark
    cy, cx = SENSOR.height // 2, SENSOR.width // 2
    sigma_px = frac * SENSOR.height
    assert e[cy, cx] == pytest.approx(e_uniform[cy, cx], rel=1e-3)
    # Pixel centres sit at +0.5: one sigma to the right of the centre.
    col = int(round(SENSOR.width / 2.0 + sigma_px - 0.5))
    offset = col + 0.5 - SENSOR.width / 2.0
    expected_ratio = math.exp(-0.5 * (offset / sigma_px) ** 2)
    ratio_y = math.exp(-0.5 * ((cy + 0.5 - SENSOR.height / 2.0) / sigma_px) ** 2)
    assert e[cy, col] / e_uniform[cy, col] == pytest.approx(expected_ratio * ratio_y, rel=1e-9)
    # Symmetric about the centre.
    assert np.allclose(e, e[::-1, ::-1])


def test_moving_filter_is_blocked():
    scene = default_scene(filter_moving=True)
    r = FrameRenderer(SENSOR)
    e = r.expected_electrons(scene, 50.0, EXPOSURE_US)
    assert np.allclose(e, SENSOR.dark_e_per_ms * EXPOSURE_US / 1000.0)


def test_white_light_adds_through_t_amb():
    r = FrameRenderer(SENSOR, white_light_e_per_ms=20.0)
    off = r.expected_electrons(default_scene(), 0.0, EXPOSURE_US)
    on = r.expected_electrons(default_scene(white_light=True), 0.0, EXPOSURE_US)
    t_amb = default_scene().filters[1][1]
    assert np.allclose(on - off, 20.0 * t_amb * EXPOSURE_US / 1000.0)
    open_on = r.expected_electrons(default_scene(white_light=True, filter_position=2), 0.0,
                                   EXPOSURE_US)
    open_off = r.expected_electrons(default_scene(filter_position=2), 0.0, EXPOSURE_US)
    assert np.allclose(open_on - open_off, 20.0 * EXPOSURE_US / 1000.0)


def test_laser_leak_is_uniform_and_scaled_by_t_laser():
    r = FrameRenderer(SENSOR)
    # Open filter (T_laser = 1), no ICG: the leak is all the laser-dependent signal.
    base = dict(phantom=Phantom(0.0, 0.0, []), filter_position=2)
    without = r.expected_electrons(default_scene(**base), 50.0, EXPOSURE_US)
    leak = r.expected_electrons(default_scene(laser_leak=0.2, **base), 50.0, EXPOSURE_US)
    assert np.allclose(leak - without, 0.2 * 50.0 * EXPOSURE_US / 1000.0)
    # The emission filter has T_laser = 0: no leak.
    through_em = r.expected_electrons(default_scene(laser_leak=0.2), 50.0, EXPOSURE_US)
    assert np.allclose(through_em, r.expected_electrons(default_scene(), 50.0, EXPOSURE_US))


def test_inclusions_replace_the_background_and_autofluorescence_adds_everywhere():
    phantom = Phantom(10.0, 3.0, [Inclusion(100.0, 50.0, 20.0, 80.0)])
    scene = default_scene(phantom=phantom, ambient_e_per_ms=0.0)
    r = FrameRenderer(SENSOR)
    e = r.expected_electrons(scene, 50.0, EXPOSURE_US)
    dark = SENSOR.dark_e_per_ms * EXPOSURE_US / 1000.0
    per_nm = EXPOSURE_US / 1000.0 * scene.filters[1][0] * scene.k_fluo * 50.0
    assert e[50, 100] - dark == pytest.approx(per_nm * 83.0)
    assert e[50, 200] - dark == pytest.approx(per_nm * 13.0)
    assert e[50, 100 + 25] - dark == pytest.approx(per_nm * 13.0)


def test_a_changed_scene_is_not_served_from_the_cache():
    r = FrameRenderer(SENSOR, seed=1)
    first = default_scene()
    r.render(first, 50.0, EXPOSURE_US, 1.0)
    moved = default_scene(phantom=Phantom(50.0, 0.0, [Inclusion(200.0, 200.0, 50.0, 400.0)]),
                          version=first.version)  # same version, different content
    frame = r.render(moved, 50.0, EXPOSURE_US, 1.0)
    signal, _ = disk_masks()
    assert frame[signal].mean() < 0.3 * (2**SENSOR.bits - 1)  # the centre disk is gone
    assert frame[190:210, 190:210].mean() > 0.9 * (2**SENSOR.bits - 1)


# --- arguments -----------------------------------------------------------------------------------


def test_render_into_a_given_array():
    r = FrameRenderer(SENSOR, seed=1)
    out = np.zeros((SENSOR.height, SENSOR.width), np.uint16)
    result = r.render(default_scene(), 50.0, EXPOSURE_US, 1.0, out=out)
    assert result is out and out.mean() > SENSOR.black_level


def test_render_into_a_padded_camera_buffer_gives_the_same_frame():
    """A view of a buffer whose rows are padded (a camera's stride) is written in place,
    pixel for pixel as a plain array with the same seed, and the padding is not touched."""
    plain = FrameRenderer(SENSOR, seed=3).render(default_scene(), 50.0, EXPOSURE_US, 1.0)
    buffer = np.full((SENSOR.height, SENSOR.width + 24), 7, np.uint16)
    view = buffer[:, :SENSOR.width]
    result = FrameRenderer(SENSOR, seed=3).render(default_scene(), 50.0, EXPOSURE_US, 1.0, out=view)
    assert result is view
    np.testing.assert_array_equal(view, plain)
    assert (buffer[:, SENSOR.width:] == 7).all()


@pytest.mark.parametrize("out", [
    np.zeros((10, 10), np.uint16),
    np.zeros((SENSOR.height, 2 * SENSOR.width), np.uint16)[:, ::2],  # every other pixel
    np.zeros((SENSOR.height, SENSOR.width), np.uint16)[::-1],  # rows backwards
    np.zeros((SENSOR.height, SENSOR.width), np.float32),
    np.zeros((SENSOR.width, SENSOR.height), np.uint16).T,  # right shape, not C-contiguous
])
def test_render_rejects_an_unfit_output_array(out):
    with pytest.raises(InvalidArgument, match="out must be"):
        FrameRenderer(SENSOR).render(default_scene(), 50.0, EXPOSURE_US, 1.0, out=out)


@pytest.mark.parametrize("laser_mw, exposure_us, gain, match", [
    (-1.0, EXPOSURE_US, 1.0, "laser power"),
    (float("nan"), EXPOSURE_US, 1.0, "laser power"),
    (50.0, 0, 1.0, "exposure"),
    (50.0, 12.5, 1.0, "exposure"),
    (50.0, EXPOSURE_US, 0.0, "gain"),
    (50.0, EXPOSURE_US, float("inf"), "gain"),
])
def test_render_rejects_bad_settings(laser_mw, exposure_us, gain, match):
    with pytest.raises(InvalidArgument, match=match):
        FrameRenderer(SENSOR).render(default_scene(), laser_mw, exposure_us, gain)


def test_bad_illumination_is_rejected():
    r = FrameRenderer(SENSOR)
    with pytest.raises(InvalidArgument, match="illumination"):
        r.expected_electrons(default_scene(illumination="spotlight"), 50.0, EXPOSURE_US)
    with pytest.raises(InvalidArgument, match="gaussian_sigma_frac"):
        r.expected_electrons(default_scene(illumination={"gaussian_sigma_frac": -1}), 50.0,
                             EXPOSURE_US)


@pytest.mark.parametrize("sensor, kwargs, match", [
    (SensorModel(width=0), {}, "sensor size"),
    (SensorModel(bits=0), {}, "bits"),
    (SENSOR, {"cache_size": 0}, "cache_size"),
])
def test_constructor_rejects_bad_arguments(sensor, kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        FrameRenderer(sensor, **kwargs)


def test_many_powers_each_render_their_own_level():
    """Powers beyond the cache size (as half-lit frames give) are each rendered at their
    own level, not a stale one."""
    scene = uniform_scene(50.0)
    r = FrameRenderer(SENSOR, seed=8, cache_size=2)
    for laser_mw in (10.0, 25.0, 40.0, 25.0, 10.0):
        frame = r.render(scene, laser_mw, EXPOSURE_US, 1.0)
        expected = r.expected_counts(scene, laser_mw, EXPOSURE_US, 1.0)[0, 0]
        assert frame.mean() == pytest.approx(expected, abs=0.05)
