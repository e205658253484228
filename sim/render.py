"""The simulated camera's frame renderer: the physics of a frame and its noise.

Per pixel, the electrons collected in an exposure of ``t_ms`` milliseconds are (SIM.md,
"Physics of a frame")::

    e = t_ms * ( T_amb * (ambient_e_per_ms + white_light_e_per_ms if the white light is on)
               + illum(x, y) * P_mW * ( T_em * k_fluo * (icg_nM(x, y) + autofluorescence_nM)
                                      + T_laser * k_leak ) )
        + t_ms * dark_e_per_ms

with ``(T_em, T_amb, T_laser) = scene.filters[scene.filter_position]``. Choices made here:

- Pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)`` in the phantom's pixel
  coordinates, so its centre is ``(col + 0.5, row + 0.5)``. An inclusion's disk holds the
  pixels whose centre lies within ``radius`` of ``(x, y)``; inside it the ICG is the
  inclusion's ``icg_nM`` (it replaces the background, it does not add to it), and a later
  inclusion is drawn over an earlier one. Autofluorescence is added everywhere.
- Illumination ``"uniform"`` is 1.0 everywhere. ``{"gaussian_sigma_frac": f}`` is a
  centred Gaussian, 1.0 at the frame centre, with sigma ``f * height`` pixels (the same
  sigma along both axes). It multiplies every laser term (fluorescence and leak).
- While the wheel is moving (``scene.filter_moving``) the filter is treated as blocked:
  only dark current reaches the sensor. A filter position missing from ``scene.filters``
  is treated as blocked too.
- The white light adds ``white_light_e_per_ms`` (default :data:`WHITE_LIGHT_E_PER_MS`) to
  the ambient light before the filter, so it reaches the sensor through ``T_amb``.

Counts are ``e * adu_per_e * gain + black_level`` plus noise, rounded half up and clipped
to ``[0, 2**bits - 1]``.

Noise. Shot noise and read noise are drawn together as one approximately normal variate
per pixel with variance ``e + read_noise_e**2`` electrons, exactly as the model's mean and
variance require at any signal (also at a few electrons, where Poisson would be skewed:
there the 2 e- read noise and 4 e- per count hide the difference). Drawing 1.6 million
normals or Poissons per frame with numpy is far too slow (tens of ms), so each pixel gets
16 fresh random bits (drawn from an ``SFC64`` bit generator) shaped into an
approximately normal integer with a few vectorised integer operations:

    v = u6 + 16 * (c1 + c2 + c3 + c4 + c5)

where ``u6`` is a uniform 6-bit value (0..63) and each ``c`` a uniform 2-bit value (0..3):
a sum of six independent uniforms of equal width (the coarse ones on a 16-step grid that
the fine one fills in), i.e. an Irwin-Hall-like distribution. Its mean (151.5) and
variance (1941.25) are exact and are used to rescale it to the pixel's mean and sigma in
counts, so the mean and variance are right; its shape is close to normal (excess kurtosis
-0.22, largest CDF difference 0.01) but its tails stop at 3.44 sigma (beyond 3 sigma it
has about half the normal's 0.27 %). That bound also tells, per setting, whether any pixel
can reach 0 or saturation, so the clip pass is skipped when none can. Its resolution is
1/44 of a sigma, well below one count unless the noise exceeds ~40 counts. Every pixel of
every frame uses its own fresh bits, so noise is independent from pixel to pixel and from
frame to frame; nothing is reused.

Everything that does not change from frame to frame is cached: the spatial maps per
phantom and illumination content, and the per-pixel offset and noise scale per
(scene content, laser power, exposure, gain). So a frame costs one draw of random bits,
nine in-place integer operations on 16-bit values and three or four float32 passes,
in cache-sized slices.

Motion (SIM.md ``motion_px``): when the scene's ``motion_px`` is not 0 the rendered field
moves that many pixels to the right from one rendered frame to the next (so by
``motion_px`` between a pair's two frames and twice that between consecutive laser-on
frames), wrapping round at the frame edge; the shift accumulates over frames and is
rounded to whole pixels. The whole precomputed field moves (the illumination profile
with the tissue: a test of motion needs only the shift).

Seeding: the generator is seeded from ``(seed, scene.seed)`` the first time and re-seeded
whenever ``scene.seed`` changes, so a run is reproducible.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Any

import numpy as np

from nirf.hal.errors import InvalidArgument
from nirf.sim.world import SceneSnapshot, SensorModel

logger = logging.getLogger(__name__)

DEVICE = "camera-sim"

# White-light lamp as seen by the sensor before the filter, e- per ms: four times the
# default ambient, so through the ICG emission filter (T_amb 0.05) it adds ~10 e- per 10 ms
# frame (a couple of counts) and through the open position ~200 e- (about 50 counts).
WHITE_LIGHT_E_PER_MS = 20.0

# How many (scene, power, exposure, gain) settings keep their precomputed maps: at least
# two, because modulation alternates laser-on and laser-off frames.
DEFAULT_CACHE_SIZE = 4

# Exact moments of v = u6 + 16 * (c1 + ... + c5) (see the module docstring):
# mean 31.5 + 5 * 16 * 1.5; variance (64**2 - 1) / 12 + 5 * 16**2 * (4**2 - 1) / 12.
NOISE_MEAN = 31.5 + 5 * 16 * 1.5
NOISE_VAR = (64**2 - 1) / 12.0 + 5 * 16**2 * (4**2 - 1) / 12.0
NOISE_SD = math.sqrt(NOISE_VAR)
NOISE_MAX = 63 + 16 * 5 * 3  # the largest v

# Frames are processed in slices of whole rows, about this many pixels, so that the
# intermediate buffers stay in the CPU cache between the passes (measured faster than
# whole-frame passes).
CHUNK_PIXELS = 1 << 18

_BLOCKED = (0.0, 0.0, 0.0)


def shaped_noise_u16(bits: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Shape uniform random 16-bit values into the approximately normal integers
    ``v = u6 + 16 * (c1 + ... + c5)`` (mean :data:`NOISE_MEAN`, variance
    :data:`NOISE_VAR`), written into ``out``; ``scratch`` is a buffer of the same size.

    Bit layout of each value: bits 0-5 are ``u6``; the five 2-bit ``c``s sit at bits 6, 8,
    10, 12 and 14. Nine in-place operations on 16-bit lanes, no branches, no tables.
    """
    np.bitwise_and(bits, 0xCCC0, out=scratch)  # the c's at bits 6, 10, 14 ...
    np.right_shift(scratch, 2, out=scratch)  # ... moved to bits 4, 8, 12
    np.bitwise_and(bits, 0x3300, out=out)  # the c's at bits 8, 12
    # Nibbles at bits 4, 8, 12 now hold c, c + c, c + c (each <= 6, no carries).
    np.add(scratch, out, out=scratch)
    # Multiplying by 0x111 adds those three nibbles into bits 12-15 (the sum is <= 15 and
    # the partial sums below stay <= 9, so nothing carries into them); the rest wraps.
    np.multiply(scratch, np.uint16(0x0111), out=scratch)
    np.right_shift(scratch, 8, out=scratch)
    np.bitwise_and(scratch, 0x00F0, out=scratch)  # 16 * (c1 + ... + c5)
    np.bitwise_and(bits, 0x003F, out=out)  # u6
    np.add(out, scratch, out=out)
    return out


class _Settings:
    """Per-pixel constants of one (scene, power, exposure, gain): counts = offset + scale * v,
    v the shaped noise integer."""

    __slots__ = ("offset", "scale", "needs_clip")

    def __init__(self, offset: np.ndarray, scale: np.ndarray | np.float32, needs_clip: bool):
        self.offset = offset
        self.scale = scale
        self.needs_clip = needs_clip


class FrameRenderer:
    """Renders raw frames (uint16 counts, ``(height, width)``) of the simulated NIR camera
    from a :class:`~sim.world.SceneSnapshot`, per SIM.md's physics, with shot and read
    noise. Not thread-safe: one camera thread owns it.

    ``seed`` with ``scene.seed`` seeds the noise. ``white_light_e_per_ms`` is the white
    lamp's light before the filter; ``cache_size`` how many settings keep their
    precomputed maps.
    """

    def __init__(
        self,
        sensor: SensorModel,
        *,
        seed: int = 0,
        white_light_e_per_ms: float = WHITE_LIGHT_E_PER_MS,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        if sensor.width <= 0 or sensor.height <= 0:
            raise InvalidArgument(
                f"{DEVICE}: sensor size {sensor.width}x{sensor.height} must be positive")
        if not 1 <= sensor.bits <= 16:
            raise InvalidArgument(f"{DEVICE}: sensor bits {sensor.bits} outside 1 to 16")
        if cache_size < 1:
            raise InvalidArgument(f"{DEVICE}: cache_size {cache_size} must be at least 1")
        self.sensor = sensor
        self.full_scale = (1 << sensor.bits) - 1
        self._seed = int(seed)
        self._white_light_e_per_ms = float(white_light_e_per_ms)
        self._cache_size = int(cache_size)
        self._n_pixels = sensor.width * sensor.height
        self._scene_seed: int | None = None
        self._bitgen: np.random.SFC64 | None = None
        self._maps_key: tuple | None = None
        self._conc: np.ndarray | None = None  # ICG + autofluorescence, nM, float64
        self._illum: np.ndarray | None = None  # excitation profile, None when uniform
        self._terms_key: tuple | None = None
        self._terms: tuple[float, np.ndarray, np.ndarray] | None = None
        self._settings: OrderedDict[tuple, _Settings] = OrderedDict()
        # Work buffers reused by every slice of every frame.
        self._chunk_rows = max(1, min(sensor.height, CHUNK_PIXELS // sensor.width))
        chunk = self._chunk_rows * sensor.width
        self._noise = np.empty(chunk, np.uint16)
        self._scratch = np.empty(chunk, np.uint16)
        self._counts_f = np.empty(chunk, np.float32)
        self._motion_total = 0.0  # pixels moved so far (SIM.md motion_px)
        self._moved_offset: np.ndarray | None = None
        self._moved_scale: np.ndarray | None = None

    # -- public -------------------------------------------------------------------------
    def render(
        self,
        scene: SceneSnapshot,
        laser_mw: float,
        exposure_us: int,
        gain: float,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """One noisy raw frame: uint16 counts, shape ``(height, width)``, written into
        ``out`` when given (uint16, that shape, rows contiguous: a view of a camera buffer
        with padded rows will do), else a new array.
        ``laser_mw`` is the laser output averaged over the exposure."""
        h, w = self.sensor.height, self.sensor.width
        if out is None:
            out = np.empty((h, w), np.uint16)
        elif (out.shape != (h, w) or out.dtype != np.uint16 or not out.flags.writeable
              or out.strides[1] != out.itemsize or out.strides[0] < w * out.itemsize):
            raise InvalidArgument(
                f"{DEVICE}: out must be a writeable uint16 array of shape {(h, w)} with "
                f"contiguous rows (padding after each row allowed, as a camera buffer's "
                f"stride), got {out.dtype} {out.shape} strides {out.strides}")
        settings = self._settings_for(scene, laser_mw, exposure_us, gain)
        motion = float(getattr(scene, "motion_px", 0.0) or 0.0)
        if motion:
            settings = self._moved(settings, motion)
        bitgen = self._generator(scene)
        full_scale = float(self.full_scale)
        scalar_scale = not isinstance(settings.scale, np.ndarray)
        # Slices of whole rows, so a padded camera buffer is written in place.
        rows = self._chunk_rows
        for row in range(0, h, rows):
            row_end = min(h, row + rows)
            start, stop = row * w, row_end * w
            n = stop - start
            # Fresh bits for every pixel: 4 pixels per 64-bit word.
            bits = bitgen.random_raw((n + 3) // 4).view(np.uint16)[:n]
            noise = shaped_noise_u16(bits, self._noise[:n], self._scratch[:n])
            counts_f = self._counts_f[:n]
            scale = settings.scale if scalar_scale else settings.scale[start:stop]
            np.multiply(noise, scale, out=counts_f)
            np.add(counts_f, settings.offset[start:stop], out=counts_f)
            # The offset includes +0.5, so the truncating cast rounds half up. The clip is
            # the sensor's saturation (and keeps the cast defined); it is skipped when no
            # pixel can leave the range, which the bounded noise makes checkable.
            if settings.needs_clip:
                np.clip(counts_f, 0.0, full_scale, out=counts_f)
            np.copyto(out[row:row_end], counts_f.reshape(row_end - row, w), casting="unsafe")
        return out

    def expected_electrons(
        self, scene: SceneSnapshot, laser_mw: float, exposure_us: int
    ) -> np.ndarray:
        """Noise-free electrons per pixel, float64 ``(height, width)``."""
        self._check_exposure(laser_mw, exposure_us)
        return self._electrons(scene, float(laser_mw), int(exposure_us))

    def expected_counts(
        self, scene: SceneSnapshot, laser_mw: float, exposure_us: int, gain: float
    ) -> np.ndarray:
        """Noise-free counts per pixel before rounding and clipping, float64
        ``(height, width)``: ``e * adu_per_e * gain + black_level``."""
        self._check_exposure(laser_mw, exposure_us)
        self._check_gain(gain)
        e = self._electrons(scene, float(laser_mw), int(exposure_us))
        return e * (self.sensor.adu_per_e * float(gain)) + self.sensor.black_level

    def _moved(self, settings: _Settings, motion_px: float) -> _Settings:
        """The per-pixel constants shifted by the motion accumulated up to this frame."""
        self._motion_total += motion_px
        h, w = self.sensor.height, self.sensor.width
        shift = int(round(self._motion_total)) % w
        if shift == 0:
            return settings
        if self._moved_offset is None:
            self._moved_offset = np.empty(h * w, np.float32)
        np.copyto(self._moved_offset.reshape(h, w), np.roll(settings.offset.reshape(h, w), shift, axis=1))
        scale = settings.scale
        if isinstance(scale, np.ndarray):
            if self._moved_scale is None:
                self._moved_scale = np.empty(h * w, np.float32)
            np.copyto(self._moved_scale.reshape(h, w), np.roll(scale.reshape(h, w), shift, axis=1))
            scale = self._moved_scale
        return _Settings(self._moved_offset, scale, settings.needs_clip)

    # -- validation ------------------------------------------------------------------------
    @staticmethod
    def _check_exposure(laser_mw: float, exposure_us: int) -> None:
        if not (isinstance(laser_mw, (int, float, np.number)) and math.isfinite(laser_mw)
                and laser_mw >= 0):
            raise InvalidArgument(
                f"{DEVICE}: laser power {laser_mw!r} mW must be a finite number >= 0")
        if not (isinstance(exposure_us, (int, np.integer)) and exposure_us > 0):
            raise InvalidArgument(
                f"{DEVICE}: exposure {exposure_us!r} us must be a positive integer")

    @staticmethod
    def _check_gain(gain: float) -> None:
        if not (isinstance(gain, (int, float, np.number)) and math.isfinite(gain)
                and gain > 0):
            raise InvalidArgument(f"{DEVICE}: analogue gain {gain!r} must be finite and > 0")

    # -- noise generator -------------------------------------------------------------------
    def _generator(self, scene: SceneSnapshot) -> np.random.SFC64:
        scene_seed = int(scene.seed)
        if self._bitgen is None or scene_seed != self._scene_seed:
            # SeedSequence wants non-negative entropy; fold signs into 64 bits.
            entropy = [self._seed % (1 << 64), scene_seed % (1 << 64)]
            self._bitgen = np.random.SFC64(np.random.SeedSequence(entropy))
            self._scene_seed = scene_seed
            logger.debug("noise re-seeded from (%d, %d)", self._seed, scene_seed)
        return self._bitgen

    # -- physics -----------------------------------------------------------------------------
    @staticmethod
    def _maps_key_of(scene: SceneSnapshot) -> tuple:
        ph = scene.phantom
        inclusions = tuple((float(i.x), float(i.y), float(i.radius), float(i.icg_nM))
                           for i in ph.inclusions)
        return (float(ph.background_icg_nM), float(ph.autofluorescence_nM), inclusions,
                _illumination_key(scene.illumination))

    def _spatial_maps(self, scene: SceneSnapshot) -> tuple[np.ndarray, np.ndarray | None]:
        """(concentration map in nM, illumination map or None for uniform), cached by the
        phantom's and illumination's content."""
        key = self._maps_key_of(scene)
        if key != self._maps_key:
            self._conc = _concentration_map(scene, self.sensor.width, self.sensor.height)
            self._illum = _illumination_map(scene.illumination, self.sensor.width,
                                            self.sensor.height)
            self._maps_key = key
            # Everything derived from the old maps is stale.
            self._terms = None
            self._settings.clear()
        assert self._conc is not None
        return self._conc, self._illum

    def _transmissions(self, scene: SceneSnapshot) -> tuple[float, float, float]:
        if scene.filter_moving:
            return _BLOCKED
        t = scene.filters.get(scene.filter_position, _BLOCKED)
        return float(t[0]), float(t[1]), float(t[2])

    def _electron_terms(self, scene: SceneSnapshot,
                        exposure_us: int) -> tuple[float, np.ndarray, np.ndarray]:
        """``(base_e, per_mw, per_mw_f32)``: the electrons that do not depend on the laser
        (ambient, white light, dark current), and the electrons per mW of laser output per
        pixel (float64 map, and flat float32 for the per-frame maps). Cached for the last
        scene content and exposure, so alternating laser-on and laser-off frames, or a
        half-lit frame's odd power, only rescale it."""
        conc, illum = self._spatial_maps(scene)
        t_em, t_amb, t_laser = self._transmissions(scene)
        key = (self._maps_key_of(scene), (t_em, t_amb, t_laser),
               float(scene.ambient_e_per_ms), bool(scene.white_light),
               float(scene.laser_leak), float(scene.k_fluo), int(exposure_us))
        if key != self._terms_key or self._terms is None:
            t_ms = exposure_us / 1000.0
            ambient = float(scene.ambient_e_per_ms)
            if scene.white_light:
                ambient += self._white_light_e_per_ms
            base_e = t_ms * (t_amb * ambient + self.sensor.dark_e_per_ms)
            per_mw = conc * (t_ms * t_em * float(scene.k_fluo))
            per_mw += t_ms * t_laser * float(scene.laser_leak)
            if illum is not None:
                per_mw *= illum
            self._terms = (base_e, per_mw, per_mw.astype(np.float32).reshape(-1))
            self._terms_key = key
        return self._terms

    def _electrons(self, scene: SceneSnapshot, laser_mw: float, exposure_us: int) -> np.ndarray:
        base_e, per_mw, _ = self._electron_terms(scene, exposure_us)
        e = per_mw * laser_mw
        e += base_e
        return e

    def _settings_for(self, scene: SceneSnapshot, laser_mw: float, exposure_us: int,
                      gain: float) -> _Settings:
        self._check_exposure(laser_mw, exposure_us)
        self._check_gain(gain)
        base_e, _, per_mw = self._electron_terms(scene, int(exposure_us))
        key = (self._terms_key, float(laser_mw), float(gain))
        found = self._settings.get(key)
        if found is not None:
            self._settings.move_to_end(key)
            return found
        # float32 throughout: a few ms even on a cache miss, and ample precision for counts.
        counts_per_e = np.float32(self.sensor.adu_per_e * float(gain))
        e = per_mw * np.float32(laser_mw)
        e += np.float32(base_e)
        mean_counts = e * counts_per_e
        mean_counts += np.float32(self.sensor.black_level + 0.5)  # +0.5: truncation rounds
        scale = np.maximum(e, np.float32(0.0), out=e)
        scale += np.float32(self.sensor.read_noise_e ** 2)
        np.sqrt(scale, out=scale)
        scale *= np.float32(float(counts_per_e) / NOISE_SD)
        # counts = mean + scale * (v - mean_v)
        offset = mean_counts
        offset -= scale * np.float32(NOISE_MEAN)
        # Margins of 0.01 count cover float32 rounding in the per-frame arithmetic.
        lowest = float(offset.min())
        highest = float((offset + scale * np.float32(NOISE_MAX)).max())
        needs_clip = lowest < 0.01 or highest >= self.full_scale + 1 - 0.01
        settings = _Settings(offset, _compact(scale), needs_clip)
        self._settings[key] = settings
        while len(self._settings) > self._cache_size:
            self._settings.popitem(last=False)
        return settings


def _compact(scale: np.ndarray) -> np.ndarray | np.float32:
    """A float32 scalar when the noise scale is the same everywhere (a cheaper multiply),
    else the flat float32 map itself."""
    if scale.size and scale.min() == scale.max():
        return np.float32(scale[0])
    return scale


def _illumination_key(illumination: Any) -> tuple:
    if isinstance(illumination, dict):
        return ("gaussian", repr(illumination.get("gaussian_sigma_frac")))
    return ("uniform", repr(illumination))


def _concentration_map(scene: SceneSnapshot, width: int, height: int) -> np.ndarray:
    """ICG plus autofluorescence in nM per pixel: background, then each disk drawn over it."""
    ph = scene.phantom
    conc = np.full((height, width), float(ph.background_icg_nM), np.float64)
    cols = np.arange(width, dtype=np.float64) + 0.5
    rows = np.arange(height, dtype=np.float64) + 0.5
    for inc in ph.inclusions:
        r = float(inc.radius)
        if r <= 0:
            continue
        # Only the bounding box of the disk needs testing.
        r0 = max(0, int(math.floor(inc.y - r)))
        r1 = min(height, int(math.ceil(inc.y + r)) + 1)
        c0 = max(0, int(math.floor(inc.x - r)))
        c1 = min(width, int(math.ceil(inc.x + r)) + 1)
        if r0 >= r1 or c0 >= c1:
            continue
        dy2 = (rows[r0:r1, None] - inc.y) ** 2
        dx2 = (cols[None, c0:c1] - inc.x) ** 2
        inside = dy2 + dx2 <= r * r
        conc[r0:r1, c0:c1][inside] = float(inc.icg_nM)
    conc += float(ph.autofluorescence_nM)
    return conc


def _illumination_map(illumination: Any, width: int, height: int) -> np.ndarray | None:
    """None for uniform; else the centred Gaussian (peak 1.0, sigma = frac x height px)."""
    if not isinstance(illumination, dict):
        if illumination != "uniform":
            raise InvalidArgument(
                f"{DEVICE}: illumination {illumination!r} must be 'uniform' or "
                "{'gaussian_sigma_frac': f}")
        return None
    frac = illumination.get("gaussian_sigma_frac")
    if not (isinstance(frac, (int, float)) and math.isfinite(frac) and frac > 0):
        raise InvalidArgument(
            f"{DEVICE}: gaussian_sigma_frac {frac!r} must be a finite number > 0")
    sigma_px = float(frac) * height
    cols = np.arange(width, dtype=np.float64) + 0.5 - width / 2.0
    rows = np.arange(height, dtype=np.float64) + 0.5 - height / 2.0
    gx = np.exp(-(cols**2) / (2.0 * sigma_px**2))
    gy = np.exp(-(rows**2) / (2.0 * sigma_px**2))
    return gy[:, None] * gx[None, :]
