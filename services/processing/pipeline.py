"""The fluorescence processing pipeline: one laser-on/laser-off pair in, one result out.

Per pair (see docs/processing.md for the full description):

- ``D = on - off`` as signed float32: ambient light and the dark level cancel. D is never
  clamped before a mean is taken (clamping at zero biases dim means upward); it is clamped
  only for the false-colour preview.
- An optional flat-field gain map (the excitation profile, normalised to mean 1 over the
  centre of the field) divides D, so a dim corner is not mistaken for weak uptake.
- Statistics over the signal and background ROIs: means, the background's spread, SBR,
  CNR, intensity in counts/s/mW, saturation from the raw on frame.
- A downsampled false-colour preview.

Only what needs every pixel touches every pixel: the ROI statistics read the ROI pixels
only, the preview reads a strided view, and the frame-wide saturation check is one fast
maximum over the on frame (an exact count follows only when that maximum is at full scale).
All working buffers are allocated when the ROIs or the flat field change, never per frame.

The call (PRODUCT.md section 7, v2): positive only when SBR >= ``sbr_threshold`` and
intensity >= ``intensity_floor_cps_mw`` and CNR >= ``cnr_floor`` (:func:`call`); every
result names the criteria that held (``criteria_met``) and failed (``criteria_failed``).
A result is not valid, with its reasons in ``flags``, for saturation in an ROI beyond the
allowed fraction, overlapping ROIs, a filter other than the emission filter, motion of
more than ``motion_limit_px`` between consecutive laser-on frames, an off frame that saw
laser light (the MCU's gating record: ``lit`` or ``cut`` in its metadata), an on frame
cut mid-exposure, settings that differ within the pair, no laser power, and a background
that is not positive or too faint against its own noise.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from nirf.hal.errors import InvalidArgument, WrongState

log = logging.getLogger(__name__)

# Metadata every frame of a pair must carry (PROTOCOL `result`, hal.camera.FrameMeta).
META_KEYS = ("frame_seq", "t_start_ns", "t_end_ns", "exposure_us", "gain", "laser_mw",
             "filter_position", "bits")

# Fraction of each axis, around the centre, over which a flat field is normalised to 1.
FLAT_FIELD_CENTRE_FRACTION = 0.5

# The preview's display range is 0 .. this percentile of the downsampled D, so one hot
# pixel cannot squash the whole image into black.
PREVIEW_PERCENTILE = 99.5
# ... estimated from every this-many-th pixel of the preview (a display range needs no exact
# order statistic; a selection over all of them was a third of the preview's time).
PREVIEW_SPAN_STEP = 4
# ... but never less than this many counts, so a frame of pure noise stays dark.
PREVIEW_MIN_SPAN_COUNTS = 16.0

# Colour of raw on-frame pixels at full scale in the preview: a cyan that the colour map
# below never produces, so saturation is visible at a glance.
PREVIEW_SATURATED_RGB = (0, 200, 255)

# The preview's colour map, as (position 0..1, (r, g, b)) anchors joined linearly:
# black -> deep violet -> crimson -> orange -> pale yellow. Brightness rises monotonically,
# so it reads correctly in grey scale too.
COLOUR_MAP_ANCHORS = (
    (0.00, (0, 0, 0)),
    (0.25, (60, 10, 110)),
    (0.50, (190, 40, 80)),
    (0.75, (245, 140, 20)),
    (1.00, (255, 255, 200)),
)


def _build_colour_lut() -> np.ndarray:
    """The 256-entry rgb8 lookup table of :data:`COLOUR_MAP_ANCHORS`."""
    pos = np.array([a[0] for a in COLOUR_MAP_ANCHORS])
    rgb = np.array([a[1] for a in COLOUR_MAP_ANCHORS], dtype=np.float64)
    x = np.linspace(0.0, 1.0, 256)
    lut = np.empty((256, 3), dtype=np.uint8)
    for c in range(3):
        lut[:, c] = np.round(np.interp(x, pos, rgb[:, c])).astype(np.uint8)
    return lut


COLOUR_LUT = _build_colour_lut()
# The same table as one 4-byte word per entry (r, g, b, 0 in memory): a lookup takes whole
# words, which numpy copies as numbers (a take of 3-byte items copies each one as bytes,
# about three times slower), and the three colour planes are then copied out of the words.
_COLOUR_LUT_WORDS = (np.concatenate([COLOUR_LUT, np.zeros((256, 1), dtype=np.uint8)], axis=1)
                     .view(np.uint32).reshape(256))


# --- regions of interest ---------------------------------------------------------------


@dataclass(frozen=True)
class Roi:
    """A rectangle in full-frame pixels: columns ``x .. x+w-1``, rows ``y .. y+h-1``."""

    x: int
    y: int
    w: int
    h: int

    def __post_init__(self) -> None:
        for name in ("x", "y", "w", "h"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidArgument(f"ROI {name} = {v!r}: expected a whole number of pixels")
            object.__setattr__(self, name, int(v))
        if self.x < 0 or self.y < 0:
            raise InvalidArgument(f"ROI origin ({self.x}, {self.y}) is negative; pixels start at 0")
        if self.w < 1 or self.h < 1:
            raise InvalidArgument(f"ROI size {self.w}x{self.h} px: width and height must be at least 1")

    @classmethod
    def from_list(cls, values: Sequence[Any], width: int | None = None,
                  height: int | None = None) -> "Roi":
        """An ROI from ``[x, y, w, h]`` (as the bus and the config carry it), checked
        against the frame size when one is given."""
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != 4:
            raise InvalidArgument(f"ROI {values!r}: expected [x, y, w, h]")
        roi = cls(*values)
        if width is not None and height is not None:
            roi.check_inside(width, height)
        return roi

    def to_list(self) -> list[int]:
        """``[x, y, w, h]``."""
        return [self.x, self.y, self.w, self.h]

    @property
    def area_px(self) -> int:
        """The number of pixels in the ROI."""
        return self.w * self.h

    def check_inside(self, width: int, height: int) -> "Roi":
        """Raise :class:`InvalidArgument` unless the ROI lies inside a ``width x height``
        frame; returns the ROI for chaining."""
        if self.x + self.w > width or self.y + self.h > height:
            raise InvalidArgument(
                f"ROI {self.to_list()} reaches column {self.x + self.w - 1}, row "
                f"{self.y + self.h - 1}; the frame is {width}x{height} px "
                f"(last column {width - 1}, last row {height - 1})")
        return self

    def slices(self) -> tuple[slice, slice]:
        """``(rows, columns)`` slices for indexing a frame array."""
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)

    def overlaps(self, other: "Roi") -> bool:
        """True when the two rectangles share at least one pixel."""
        return (self.x < other.x + other.w and other.x < self.x + self.w
                and self.y < other.y + other.h and other.y < self.y + self.h)


# --- flat field --------------------------------------------------------------------------


def _centre_mean(image: np.ndarray, fraction: float = FLAT_FIELD_CENTRE_FRACTION) -> float:
    """Mean over the central ``fraction`` of each axis."""
    h, w = image.shape
    ch, cw = max(1, int(round(h * fraction))), max(1, int(round(w * fraction)))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return float(image[y0:y0 + ch, x0:x0 + cw].mean(dtype=np.float64))


def _block_edges(n: int, block: int) -> np.ndarray:
    """Start indices of consecutive blocks of ``block`` along an axis of length ``n``
    (the last block may be shorter)."""
    return np.arange(0, n, block)


def _interp_axis(coarse: np.ndarray, centres: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Linear interpolation of ``coarse`` (samples at ``centres``) onto pixel centres
    0.5 .. n-0.5 along ``axis``; linear extrapolation over the half block beyond the
    first and last centre (an illumination profile is steepest at the edges)."""
    x = np.arange(n) + 0.5
    if len(centres) < 2:
        return np.repeat(coarse, n, axis=axis)
    i1 = np.searchsorted(centres, x).clip(1, len(centres) - 1)
    i0 = i1 - 1
    t = (x - centres[i0]) / (centres[i1] - centres[i0])
    a = np.take(coarse, i0, axis=axis)
    b = np.take(coarse, i1, axis=axis)
    shape = [1, 1]
    shape[axis] = n
    t = t.reshape(shape)
    return a * (1.0 - t) + b * t


def flat_field_from_uniform(diff_frames: list[np.ndarray], *, block_px: int = 16,
                            smooth_blocks: int = 0, min_gain: float = 0.02) -> np.ndarray:
    """A flat-field gain map from laser-on minus laser-off frames of a uniform target.

    The frames are averaged and reduced to means over ``block_px`` square blocks: that
    is the smoothing, and it divides the pixel noise by ``block_px`` (an optional extra
    box of ``2 * smooth_blocks + 1`` blocks flattens the profile near the edges, so it is
    off by default). The block means are interpolated back to every pixel (bilinear
    between block centres) and normalised to mean 1 over the centre of the field (the
    middle half of each axis). The result is the relative excitation at each pixel:
    divide D by it.

    Raises :class:`InvalidArgument` for no frames, frames of different shapes, values
    that are not finite, or a map whose darkest point is below ``min_gain`` of the
    centre (too little excitation there to correct).
    """
    if not diff_frames:
        raise InvalidArgument("flat field: no difference frames given (need at least 1)")
    shape = np.shape(diff_frames[0])
    if len(shape) != 2 or min(shape) < 2:
        raise InvalidArgument(f"flat field: frames must be 2-D images, got shape {shape}")
    if block_px < 1:
        raise InvalidArgument(f"flat field: block_px = {block_px}, must be at least 1")
    if smooth_blocks < 0:
        raise InvalidArgument(f"flat field: smooth_blocks = {smooth_blocks}, must be at least 0")
    acc = np.zeros(shape, dtype=np.float64)
    for i, frame in enumerate(diff_frames):
        if np.shape(frame) != shape:
            raise InvalidArgument(
                f"flat field: frame {i} has shape {np.shape(frame)}, frame 0 has {shape}")
        acc += frame
    acc /= len(diff_frames)
    if not np.all(np.isfinite(acc)):
        raise InvalidArgument("flat field: the difference frames contain NaN or infinity")
    h, w = shape
    rows, cols = _block_edges(h, block_px), _block_edges(w, block_px)
    sums = np.add.reduceat(np.add.reduceat(acc, rows, axis=0), cols, axis=1)
    counts = np.outer(np.diff(np.append(rows, h)), np.diff(np.append(cols, w)))
    coarse = sums / counts
    if smooth_blocks:
        coarse = box_smooth(coarse, smooth_blocks)
    centres_y = (rows + np.append(rows[1:], h)) / 2.0
    centres_x = (cols + np.append(cols[1:], w)) / 2.0
    full = _interp_axis(_interp_axis(coarse, centres_x, w, axis=1), centres_y, h, axis=0)
    centre = _centre_mean(full)
    if not centre > 0:
        raise InvalidArgument(
            f"flat field: mean difference over the centre is {centre:.3g} counts; a uniform "
            "target lit by the laser must give a positive difference")
    full /= centre
    darkest = float(full.min())
    if darkest < min_gain:
        raise InvalidArgument(
            f"flat field: darkest point has {darkest:.3g} of the centre's excitation, below "
            f"the limit {min_gain}; the field is too unevenly lit to correct")
    return full.astype(np.float32)


def box_smooth(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a ``(2r+1)`` square box, edges padded by replication (separable)."""
    k = 2 * radius + 1
    p = np.pad(image.astype(np.float64), radius, mode="edge")
    c = np.cumsum(np.pad(p, ((1, 0), (0, 0))), axis=0)
    p = (c[k:] - c[:-k]) / k
    c = np.cumsum(np.pad(p, ((0, 0), (1, 0))), axis=1)
    return (c[:, k:] - c[:, :-k]) / k


# --- the call -------------------------------------------------------------------------

CRITERIA = ("sbr", "intensity", "cnr")


def call(sbr: float | None, intensity: float | None, cnr: float | None, *, sbr_threshold: float,
         intensity_floor: float, cnr_floor: float) -> tuple[bool, list[str], list[str]]:
    """The positive/negative call: ``(positive, criteria met, criteria failed)``.

    Positive only when every criterion holds: SBR >= ``sbr_threshold``, intensity (counts
    per second per mW) >= ``intensity_floor``, CNR >= ``cnr_floor``. A value that is
    undefined (None) fails its criterion.
    """
    checks = {"sbr": (sbr, sbr_threshold), "intensity": (intensity, intensity_floor),
              "cnr": (cnr, cnr_floor)}
    met, failed = [], []
    for name in CRITERIA:
        value, limit = checks[name]
        ok = value is not None and math.isfinite(value) and value >= limit
        (met if ok else failed).append(name)
    return not failed, met, failed


# --- motion between consecutive laser-on frames -----------------------------------------

# Shifts searched, pixels each way; a larger motion reads as this (and is flagged).
MOTION_SEARCH_PX = 12
# The profiles come from two stripes this wide through the signal ROI's centre (where
# motion matters most): rows for the horizontal shift, columns for the vertical one. Both
# together read some 7 % of a frame.
MOTION_STRIPE_PX = 48
_STRIPE_ONES = np.ones(MOTION_STRIPE_PX, dtype=np.float32)
assert MOTION_STRIPE_PX * 0xFFFF < 2 ** 24  # float32 sums of the stripe stay exact
# A shift counts only when the fit at the best shift beats no shift by this many standard
# deviations of the fit's own noise (a featureless field has no measurable motion).
MOTION_SIGNIFICANCE = 8.0


class _Profile:
    """A 1-D profile with what comparing it as the previous one needs: its float64 values
    and, for each of the ``2 * search + 1`` windows of ``size - 2 * search`` values a shift
    compares against, the sum of the window and the sum of its squared deviations from its
    mean (computed once, used when the profile is "previous").

    The windows cover all but ``2 * search`` values, so each sum is the whole profile's
    less a short head and tail: two small cumulative sums instead of two over the whole
    profile. The values are integers (sums of raw counts), so every sum is exact."""

    __slots__ = ("v", "search", "n", "ssd")

    def __init__(self, values: np.ndarray, search: int):
        self.v = v = values.astype(np.float64)
        self.search = search
        m = 2 * search
        self.n = n = v.size - m
        if n < 1:
            self.ssd = None
            return
        sq = v * v
        # window k is v[k:k + n]: the total less v[:k] (head) and v[k + n:] (tail)
        s1 = float(v.sum()) - _heads(v[:m]) - _tails(v[n:])
        s2 = float(sq.sum()) - _heads(sq[:m]) - _tails(sq[n:])
        self.ssd = s2 - s1 * s1 / n


def _heads(x: np.ndarray) -> np.ndarray:
    """``[0, x[0], x[0] + x[1], ..., sum(x)]``: the sums of the first k values, k = 0..len."""
    out = np.zeros(x.size + 1)
    np.cumsum(x, out=out[1:])
    return out


def _tails(x: np.ndarray) -> np.ndarray:
    """``[sum(x), sum(x[1:]), ..., x[-1], 0]``: the sums from value k on, k = 0..len."""
    out = np.zeros(x.size + 1)
    np.cumsum(x[::-1], out=out[1:])
    return out[::-1]


def _profile_shift(prev, cur, search: int) -> float | None:
    """The shift (pixels, positive: ``cur`` is ``prev`` moved to higher indices) that best
    aligns two 1-D profiles (arrays or :class:`_Profile`), to a fraction of a pixel; 0.0
    when no shift fits significantly better than none; None when the profiles are too
    short."""
    prev = prev if isinstance(prev, _Profile) and prev.search == search else _Profile(np.asarray(prev), search)
    cur_v = cur.v if isinstance(cur, _Profile) else np.asarray(cur, dtype=np.float64)
    n = prev.n
    if n < 16 or cur_v.size != prev.v.size:
        return None
    a = cur_v[search:search + n]
    a = a - float(a.sum()) / n
    # The mean squared difference between a and each window k of prev (prev[k:k+n], both
    # zero-mean): (sum(a^2) + ssd_k - 2 a.b_k) / n. Window k aligns with cur for the shift
    # search - k; the constant sum(a^2) and the 1/n enter only the values compared below.
    part = (prev.ssd - 2.0 * np.correlate(prev.v, a, mode="valid"))[::-1]  # index i: shift i - search
    j = int(np.argmin(part))
    aa = float(np.dot(a, a))

    def err(i: int) -> float:
        return max((aa + float(part[i])) / n, 0.0)

    e_min, e_zero = err(j), err(search)
    # Under no motion both are noise: e ~ 2 var with a spread of about e * sqrt(2 / n).
    if j == search or e_zero - e_min <= MOTION_SIGNIFICANCE * max(e_min, 1e-12) * math.sqrt(2.0 / n):
        return 0.0
    shift = float(j - search)
    if 0 < j < 2 * search:  # parabola through the minimum and its neighbours
        e_lo, e_hi = err(j - 1), err(j + 1)
        den = e_lo - 2.0 * e_min + e_hi
        if den > 0:
            shift += 0.5 * (e_lo - e_hi) / den
    return shift


# A pair lost in between is bridged: the shift over that many frame numbers is divided
# down to one laser-on interval. Beyond this gap the motion is unknown.
MOTION_MAX_GAP = 8


class MotionTracker:
    """Measures the shift of the scene between consecutive laser-on frames from two
    profiles of the raw on frame through the signal ROI's centre: column sums over a band
    of rows (horizontal motion) and row sums over a band of columns (vertical). The off
    frame holds little but ambient light, so motion is measured on to on. A featureless
    field has no measurable motion (and motion there moves nothing the ROIs would see).

    When the ROIs move, the new frame is also read at the old centre, so the shift is
    still measured; a lost pair or two are bridged (the shift divided by the laser-on
    intervals spanned). Only the first pair, or one after a long gap, has no measurement."""

    def __init__(self) -> None:
        self._prev: tuple | None = None  # (frame_seq, centre, x profile, y profile)
        # The two bands as float32, kept from pair to pair: a fresh array of this size
        # (200-300 KB) is mapped and unmapped by the allocator on every call, and its pages
        # faulted in again each time (some 120 page faults a pair).
        self._bands: dict[tuple[int, int], np.ndarray] = {}

    def reset(self) -> None:
        """Forget the previous frame (the next measurement is unknown)."""
        self._prev = None

    def _band(self, shape: tuple[int, int]) -> np.ndarray:
        buf = self._bands.get(shape)
        if buf is None:
            if len(self._bands) > 8:  # a frame size or a stripe clipped differently
                self._bands.clear()
            buf = self._bands[shape] = np.empty(shape, dtype=np.float32)
        return buf

    def _profiles(self, on: np.ndarray, centre: tuple[int, int]) -> tuple[_Profile, _Profile]:
        h, w = on.shape
        half = MOTION_STRIPE_PX // 2
        cx, cy = centre
        y0, x0 = min(max(0, cy - half), max(0, h - 2 * half)), min(max(0, cx - half), max(0, w - 2 * half))
        # The column band's row sums as one matrix-vector product in float32: exact, since
        # MOTION_STRIPE_PX uint16 values sum to less than 2**24 (about 3x faster than a reduce
        # along the short, strided axis). The band is made a contiguous float32 block first:
        # a product of the strided uint16 view converts it element by element, twice as slow.
        col_view = on[:, x0:x0 + 2 * half]  # narrower than the stripe in a small frame
        row_view = on[y0:y0 + 2 * half]
        cols = self._band(col_view.shape)
        rows = self._band(row_view.shape)
        np.copyto(cols, col_view)
        np.copyto(rows, row_view)  # the row band too: one product
        return (_Profile(np.matmul(_STRIPE_ONES[:rows.shape[0]], rows), MOTION_SEARCH_PX),
                _Profile(np.matmul(cols, _STRIPE_ONES[:cols.shape[1]]), MOTION_SEARCH_PX))

    def update(self, on: np.ndarray, frame_seq: int | None, centre: tuple[int, int],
               seq_step: int = 2) -> tuple[float, float] | None:
        """``(dx, dy)`` in pixels per laser-on interval since the previous laser-on frame
        seen, or None when there is none to compare with (the first pair, a gap of more
        than :data:`MOTION_MAX_GAP` frame numbers, frame numbers out of order)."""
        xp, yp = self._profiles(on, centre)
        prev, self._prev = self._prev, (frame_seq, centre, xp, yp)
        if prev is None or frame_seq is None or prev[0] is None:
            return None
        gap = frame_seq - prev[0]
        if gap <= 0 or gap % seq_step or gap > MOTION_MAX_GAP:
            return None
        if prev[1] != centre:  # the ROIs moved: compare where the previous profiles were taken
            xp, yp = self._profiles(on, prev[1])
        dx = _profile_shift(prev[2], xp, MOTION_SEARCH_PX)
        dy = _profile_shift(prev[3], yp, MOTION_SEARCH_PX)
        if dx is None and dy is None:
            return None
        intervals = gap // seq_step
        return ((dx or 0.0) / intervals, (dy or 0.0) / intervals)


# --- the processor -----------------------------------------------------------------------


class _RoiWork:
    """Preallocated buffers for the statistics of one ROI."""

    def __init__(self, roi: Roi):
        self.roi = roi
        self.rows, self.cols = roi.slices()
        self.d = np.empty((roi.h, roi.w), dtype=np.float32)
        self.flat = self.d.reshape(-1)  # a view: the buffer is contiguous
        self.inv_gain: np.ndarray | None = None


@dataclass
class _PairStats:
    """Per-pair values that enter the running average."""

    signal_mean: float
    background_mean: float
    background_std: float
    intensity: float | None


class PairProcessor:
    """Turns laser-on/laser-off frame pairs into results and previews.

    ``width``, ``height``: the full frame in pixels; ``bits``: the sensor's bit depth
    (full scale ``2**bits - 1``); ``sbr_threshold``: the positive/negative call;
    ``saturation_limit``: the largest fraction of an ROI allowed at full scale;
    ``preview_downsample``: the preview keeps every n-th row and column;
    ``flat_field``: an optional gain map (see :meth:`set_flat_field`);
    ``average_pairs``: results also carry the average of the last N valid pairs;
    ``intensity_floor_cps_mw``, ``cnr_floor``: the call's other criteria (:func:`call`);
    ``emission_filter``: the filter position a valid pair must be taken through (None: not
    checked); ``motion_limit_px``: the largest on-to-on shift of a valid pair;
    ``background_min_snr``: the background mean must be at least this many standard
    errors of itself (its spread over the square root of its pixel count).

    Not thread-safe: one processor per processing thread.
    """

    def __init__(self, width: int, height: int, bits: int, *, sbr_threshold: float = 2.0,
                 saturation_limit: float = 0.0, preview_downsample: int = 8,
                 flat_field: np.ndarray | None = None, average_pairs: int = 1,
                 intensity_floor_cps_mw: float = 50.0, cnr_floor: float = 3.0,
                 emission_filter: int | None = None, motion_limit_px: float = 1.0,
                 background_min_snr: float = 10.0):
        for name, v, lo, hi in (("width", width, 2, 16384), ("height", height, 2, 16384),
                                ("bits", bits, 1, 16), ("preview_downsample", preview_downsample, 1, 64),
                                ("average_pairs", average_pairs, 1, 4096)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                raise InvalidArgument(f"pipeline: {name} = {v!r}, allowed whole numbers {lo} to {hi}")
        if not (isinstance(sbr_threshold, numbers.Real) and math.isfinite(sbr_threshold)
                and sbr_threshold > 0):
            raise InvalidArgument(f"pipeline: sbr_threshold = {sbr_threshold!r}, must be a positive number")
        if not (isinstance(saturation_limit, numbers.Real) and 0.0 <= saturation_limit <= 1.0):
            raise InvalidArgument(f"pipeline: saturation_limit = {saturation_limit!r}, allowed 0.0 to 1.0")
        for name, v in (("intensity_floor_cps_mw", intensity_floor_cps_mw), ("cnr_floor", cnr_floor),
                        ("motion_limit_px", motion_limit_px), ("background_min_snr", background_min_snr)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise InvalidArgument(f"pipeline: {name} = {v!r}, must be a number >= 0")
        if emission_filter is not None and (isinstance(emission_filter, bool)
                                            or not isinstance(emission_filter, (int, np.integer))):
            raise InvalidArgument(f"pipeline: emission_filter = {emission_filter!r}, expected a "
                                  "filter position (whole number) or None")
        self.width = int(width)
        self.height = int(height)
        self.bits = int(bits)
        self.full_scale = (1 << self.bits) - 1
        self.intensity_floor = float(intensity_floor_cps_mw)
        self.cnr_floor = float(cnr_floor)
        self.emission_filter = None if emission_filter is None else int(emission_filter)
        self.motion_limit_px = float(motion_limit_px)
        self.background_min_snr = float(background_min_snr)
        self.motion = MotionTracker()
        self._rois_overlap = False
        self.sbr_threshold = float(sbr_threshold)
        self.saturation_limit = float(saturation_limit)
        self.preview_downsample = int(preview_downsample)
        self.average_pairs = int(average_pairs)
        self._signal: _RoiWork | None = None
        self._background: _RoiWork | None = None
        self._gain: np.ndarray | None = None
        self._window: deque[_PairStats] = deque(maxlen=self.average_pairs)
        self._window_key: tuple | None = None
        # preview buffers: the strided view of a frame has ceil(size / step) samples
        k = self.preview_downsample
        self.preview_width = -(-self.width // k)
        self.preview_height = -(-self.height // k)
        pshape = (self.preview_height, self.preview_width)
        self._pv_d = np.empty(pshape, dtype=np.float32)
        # the sampled pixels, gathered contiguous first: a subtract that converts strided
        # uint16 to float32 goes element by element through numpy's buffered casts
        self._pv_on = np.empty(pshape, dtype=np.uint16)
        self._pv_off = np.empty(pshape, dtype=np.uint16)
        self._pv_sort = np.empty(-(-(pshape[0] * pshape[1]) // PREVIEW_SPAN_STEP), dtype=np.float32)
        self._pv_idx = np.empty(pshape, dtype=np.intp)  # the take's own index type: no conversion
        self._pv_sat = np.empty(pshape, dtype=bool)
        self._pv_rgb = np.empty(pshape + (3,), dtype=np.uint8)
        self._pv_words = np.empty(pshape, dtype=np.uint32)  # the lookup's words ...
        self._pv_word_bytes = self._pv_words.view(np.uint8).reshape(pshape + (4,))  # ... as r, g, b, 0
        self._pv_inv_gain: np.ndarray | None = None
        self._frame_sat: np.ndarray | None = None  # allocated on first saturated frame
        self.set_flat_field(flat_field)

    # -- configuration ---------------------------------------------------------------------
    @property
    def rois(self) -> tuple[Roi, Roi] | None:
        """``(signal, background)`` or None before :meth:`set_rois`."""
        if self._signal is None or self._background is None:
            return None
        return self._signal.roi, self._background.roi

    def set_rois(self, signal: Roi, background: Roi) -> None:
        """Use these ROIs from the next pair on (resets the running average).

        Both must lie inside the frame; the background needs at least 2 pixels for its
        spread. Overlapping ROIs are accepted, but every result of theirs is not valid
        (``rois_overlap``): they make SBR meaningless.
        """
        if not isinstance(signal, Roi) or not isinstance(background, Roi):
            raise InvalidArgument(f"pipeline: set_rois expects two Roi objects, got "
                                  f"{type(signal).__name__} and {type(background).__name__}")
        signal.check_inside(self.width, self.height)
        background.check_inside(self.width, self.height)
        if background.area_px < 2:
            raise InvalidArgument(f"background ROI {background.to_list()} has "
                                  f"{background.area_px} px; at least 2 are needed for its spread")
        self._rois_overlap = signal.overlaps(background)
        if self._rois_overlap:
            log.warning("signal ROI %s overlaps background ROI %s", signal.to_list(),
                        background.to_list())
        self._signal = _RoiWork(signal)
        self._background = _RoiWork(background)
        self._attach_gain()
        self.reset_average()

    @property
    def flat_field(self) -> np.ndarray | None:
        """The gain map in use (normalised to mean 1 over the centre), or None. Treat it as
        read-only: it is shared with the automatic ROI search."""
        return self._gain

    def set_flat_field(self, gain_map: np.ndarray | None) -> None:
        """Use a flat-field gain map (or none). The map is the relative excitation per
        pixel, shape ``(height, width)``, finite and positive; it is renormalised to mean 1
        over the centre of the field, so intensities refer to the centre's excitation.
        Resets the running average."""
        if gain_map is None:
            self._gain = None
        else:
            g = np.asarray(gain_map)
            if g.shape != (self.height, self.width):
                raise InvalidArgument(f"flat field shape {g.shape} does not match the frame "
                                      f"({self.height}, {self.width})")
            if not np.all(np.isfinite(g)) or not float(g.min()) > 0.0:
                raise InvalidArgument(f"flat field: every value must be finite and above 0 "
                                      f"(smallest is {float(np.nanmin(g)):.3g})")
            g = g.astype(np.float32)
            g /= np.float32(_centre_mean(g))
            self._gain = g
        self._attach_gain()
        self.reset_average()

    def _attach_gain(self) -> None:
        """Precompute the reciprocal gain over each ROI and the preview grid, so a frame
        costs one multiply per used pixel instead of a divide."""
        k = self.preview_downsample
        if self._gain is None:
            self._pv_inv_gain = None
        else:
            self._pv_inv_gain = np.ascontiguousarray(1.0 / self._gain[::k, ::k], dtype=np.float32)
        for work in (self._signal, self._background):
            if work is None:
                continue
            if self._gain is None:
                work.inv_gain = None
            else:
                work.inv_gain = np.ascontiguousarray(
                    1.0 / self._gain[work.rows, work.cols], dtype=np.float32)

    def reset_average(self) -> None:
        """Forget the pairs collected for the running average."""
        self._window.clear()
        self._window_key = None

    # -- per pair --------------------------------------------------------------------------
    def _check_frame(self, name: str, frame: np.ndarray) -> None:
        if not isinstance(frame, np.ndarray) or frame.dtype.kind not in "ui":
            raise InvalidArgument(f"pipeline: the {name} frame must be an integer numpy array "
                                  f"of raw counts, got {getattr(frame, 'dtype', type(frame).__name__)}")
        if frame.shape != (self.height, self.width):
            raise InvalidArgument(f"pipeline: the {name} frame has shape {frame.shape}, expected "
                                  f"({self.height}, {self.width})")

    def _check_meta(self, name: str, meta: dict) -> None:
        for key in META_KEYS:
            if key not in meta:
                raise InvalidArgument(f"pipeline: the {name} frame's metadata lacks {key!r}")
        for key in ("exposure_us", "gain", "laser_mw"):
            v = meta[key]
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise InvalidArgument(f"pipeline: {name} {key} = {v!r} is not a finite number")
        if meta["exposure_us"] <= 0 or meta["gain"] <= 0 or meta["laser_mw"] < 0:
            raise InvalidArgument(
                f"pipeline: {name} exposure_us = {meta['exposure_us']}, gain = {meta['gain']}, "
                f"laser_mw = {meta['laser_mw']}: exposure and gain must be above 0, power at least 0")
        if int(meta["bits"]) != self.bits:
            raise InvalidArgument(f"pipeline: the {name} frame is {meta['bits']}-bit, the "
                                  f"pipeline was set up for {self.bits}-bit")

    def _roi_stats(self, work: _RoiWork, on: np.ndarray, off: np.ndarray,
                   want_std: bool, frame_saturated: bool = True) -> tuple[float, float | None, float]:
        """Mean (and optionally the spread) of D over one ROI, and the fraction of its
        raw on-frame pixels at full scale (0 without a look when ``frame_saturated`` says
        the whole on frame has none). Reads only the ROI's pixels."""
        on_r = on[work.rows, work.cols]
        np.subtract(on_r, off[work.rows, work.cols], out=work.d, dtype=np.float32)
        if work.inv_gain is not None:
            np.multiply(work.d, work.inv_gain, out=work.d)
        n = work.flat.size
        mean = float(work.flat.sum()) / n
        std = None
        if want_std:
            # Two-pass variance (subtract the mean first): E[x^2] - E[x]^2 in float32
            # cancels badly when the mean is large against the spread.
            np.subtract(work.d, np.float32(mean), out=work.d)
            std = math.sqrt(max(float(np.dot(work.flat, work.flat)) / n, 0.0))
        saturated = 0.0
        if frame_saturated and int(on_r.max()) >= self.full_scale:
            saturated = float(np.count_nonzero(on_r >= self.full_scale)) / n
        return mean, std, saturated

    def _frame_saturated_fraction(self, on: np.ndarray) -> float:
        # A maximum is a read-only pass; the exact count (a write pass) only when needed.
        if int(on.max()) < self.full_scale:
            return 0.0
        if self._frame_sat is None:
            self._frame_sat = np.empty(on.shape, dtype=bool)
        np.greater_equal(on, self.full_scale, out=self._frame_sat)
        return float(np.count_nonzero(self._frame_sat)) / on.size

    def process(self, on: np.ndarray, off: np.ndarray, meta_on: dict, meta_off: dict) -> dict:
        """The result of one pair: the PROTOCOL ``result`` fields except ``seq``, ``t_ns``
        and ``t_done_ns`` (the publisher adds those). See docs/processing.md."""
        if self._signal is None or self._background is None:
            raise WrongState("pipeline: no ROIs set; set them (roi.set) or choose them "
                             "automatically before processing pairs")
        self._check_frame("laser-on", on)
        self._check_frame("laser-off", off)
        self._check_meta("laser-on", meta_on)
        self._check_meta("laser-off", meta_off)

        # The frame-wide maximum first: it streams the whole on frame through the cache, so
        # the ROIs and the motion profiles then read the on frame from the cache, not from
        # memory row by row.
        frame_sat = self._frame_saturated_fraction(on)
        any_sat = frame_sat > 0
        s_mean, _, s_sat = self._roi_stats(self._signal, on, off, want_std=False, frame_saturated=any_sat)
        b_mean, b_std, b_sat = self._roi_stats(self._background, on, off, want_std=True, frame_saturated=any_sat)

        exposure_s = meta_on["exposure_us"] * 1e-6
        gain = float(meta_on["gain"])
        laser_mw = float(meta_on["laser_mw"])

        flags: list[str] = []
        if max(s_sat, b_sat) > self.saturation_limit:
            flags.append("saturated")
        if any(meta_on[k] != meta_off[k] for k in ("exposure_us", "gain", "filter_position")):
            flags.append("settings_changed")
        if laser_mw <= 0.0:
            flags.append("laser_off")
        if self._rois_overlap:
            flags.append("rois_overlap")
        if self.emission_filter is not None and meta_on["filter_position"] != self.emission_filter:
            flags.append("filter_not_emission")
        # the MCU's gating record: the off frame must have had no laser light at all (its
        # photodiode saw none during the exposure either)
        if meta_off.get("lit") or meta_off.get("cut") or meta_off.get("light_seen"):
            flags.append("off_frame_lit")
        if meta_on.get("cut"):
            flags.append("on_frame_cut")
        roi_s, roi_b = self._signal.roi, self._background.roi
        shift = self.motion.update(on, meta_on.get("frame_seq"), (roi_s.x + roi_s.w // 2, roi_s.y + roi_s.h // 2))
        motion_px = None if shift is None else math.hypot(*shift)
        if motion_px is not None and motion_px > self.motion_limit_px:
            flags.append("motion")
        sbr = s_mean / b_mean if b_mean > 0 else None
        if sbr is None:
            flags.append("background_not_positive")
        elif b_std and b_mean < self.background_min_snr * b_std / math.sqrt(self._background.flat.size):
            # a background at the noise (a drape, no ICG): any SBR would be noise over noise
            flags.append("background_too_dim")
            sbr = None
        intensity = s_mean / (exposure_s * gain * laser_mw) if laser_mw > 0 else None
        cnr = (s_mean - b_mean) / b_std if b_std else None
        valid = not flags
        positive, met, failed = call(sbr, intensity, cnr, sbr_threshold=self.sbr_threshold,
                                     intensity_floor=self.intensity_floor, cnr_floor=self.cnr_floor)
        result: dict[str, Any] = {
            "frame_seq": int(meta_on["frame_seq"]),
            "t_capture_ns": int(max(meta_on["t_end_ns"], meta_off["t_end_ns"])),
            "intensity": intensity,
            "signal_mean": s_mean,
            "background_mean": b_mean,
            "background_std": b_std,
            "sbr": sbr,
            "cnr": cnr,
            "saturated_fraction": s_sat,
            "background_saturated_fraction": b_sat,
            "frame_saturated_fraction": frame_sat,
            "valid": valid,
            "flags": flags,
            "positive": bool(valid and positive),
            "threshold": self.sbr_threshold,
            "intensity_floor": self.intensity_floor,
            "cnr_floor": self.cnr_floor,
            "criteria_met": met,
            "criteria_failed": failed,
            "motion_px": motion_px,
            "motion_shift": None if shift is None else [shift[0], shift[1]],
            "roi": {"signal": roi_s.to_list(), "background": roi_b.to_list()},
        }
        if self.average_pairs > 1:
            result["average"] = self._update_average(
                valid, _PairStats(s_mean, b_mean, b_std or 0.0, intensity), meta_on)
        return result

    def _update_average(self, valid: bool, stats: _PairStats, meta_on: dict) -> dict:
        """Add a valid pair to the window of the last N and return the averaged values.

        The average is the mean of the per-pair ROI means. Every pair's ROI has the same
        number of pixels, so this equals the mean of D over all pixels of the N pairs;
        SBR is then the ratio of the averaged means (not the mean of per-pair ratios,
        which a noisy denominator biases upward). The window restarts whenever the
        settings (exposure, gain, laser power, filter) change.
        """
        if valid:
            key = (meta_on["exposure_us"], meta_on["gain"], meta_on["laser_mw"],
                   meta_on["filter_position"])
            if key != self._window_key:
                self._window.clear()
                self._window_key = key
            self._window.append(stats)
        n = len(self._window)
        if n == 0:
            return {"pairs": 0, "intensity": None, "signal_mean": None, "background_mean": None,
                    "sbr": None, "cnr": None, "valid": False, "positive": False,
                    "criteria_met": [], "criteria_failed": list(CRITERIA)}
        s = sum(p.signal_mean for p in self._window) / n
        b = sum(p.background_mean for p in self._window) / n
        std = sum(p.background_std for p in self._window) / n
        intens = [p.intensity for p in self._window if p.intensity is not None]
        sbr = s / b if b > 0 else None
        intensity = sum(intens) / len(intens) if intens else None
        # contrast against a single pair's pixel spread (see docs/processing.md)
        cnr = (s - b) / std if std > 0 else None
        positive, met, failed = call(sbr, intensity, cnr, sbr_threshold=self.sbr_threshold,
                                     intensity_floor=self.intensity_floor, cnr_floor=self.cnr_floor)
        return {
            "pairs": n,
            "intensity": intensity,
            "signal_mean": s,
            "background_mean": b,
            "sbr": sbr,
            "cnr": cnr,
            "valid": sbr is not None,
            "positive": bool(sbr is not None and positive),
            "criteria_met": met,
            "criteria_failed": failed,
        }

    # -- preview ---------------------------------------------------------------------------
    def preview(self, on: np.ndarray, off: np.ndarray, *, display_max_counts: float | None = None,
                any_saturated: bool | None = None) -> tuple[int, int, bytes]:
        """The false-colour preview of a pair: ``(width, height, rgb8 bytes, row-major)``.

        Every ``preview_downsample``-th row and column of D (flat-field corrected when a
        map is set) is scaled from 0 to ``display_max_counts`` (by default the
        :data:`PREVIEW_PERCENTILE` percentile of every :data:`PREVIEW_SPAN_STEP`-th of those
        pixels, at least :data:`PREVIEW_MIN_SPAN_COUNTS`),
        clamped, and coloured through :data:`COLOUR_LUT`; raw on-frame pixels at full
        scale are painted :data:`PREVIEW_SATURATED_RGB`. ``any_saturated=False`` says the
        whole on frame has no pixel at full scale (a result of :meth:`process` for this pair
        with ``frame_saturated_fraction`` 0), so the preview does not look for one.
        """
        self._check_frame("laser-on", on)
        self._check_frame("laser-off", off)
        k = self.preview_downsample
        on_s, off_s = self._pv_on, self._pv_off
        np.copyto(on_s, on[::k, ::k])
        np.copyto(off_s, off[::k, ::k])
        d = self._pv_d
        np.subtract(on_s, off_s, out=d, dtype=np.float32)
        if self._pv_inv_gain is not None:
            np.multiply(d, self._pv_inv_gain, out=d)
        if display_max_counts is None:
            flat = self._pv_sort
            np.copyto(flat, d.reshape(-1)[::PREVIEW_SPAN_STEP])
            kth = min(flat.size - 1, int(flat.size * PREVIEW_PERCENTILE / 100.0))
            flat.partition(kth)
            span = max(float(flat[kth]), PREVIEW_MIN_SPAN_COUNTS)
        else:
            span = float(display_max_counts)
            if not math.isfinite(span) or span <= 0:
                raise InvalidArgument(f"preview: display_max_counts = {display_max_counts!r}, "
                                      "must be a positive number")
        # Clamp for display only; the statistics above never see this.
        np.multiply(d, np.float32(255.0 / span), out=d)
        np.clip(d, 0.0, 255.0, out=d)
        np.copyto(self._pv_idx, d, casting="unsafe")
        rgb = self._pv_rgb
        np.take(_COLOUR_LUT_WORDS, self._pv_idx, out=self._pv_words, mode="clip")
        for c in range(3):
            np.copyto(rgb[:, :, c], self._pv_word_bytes[:, :, c])
        # the mask only where a pixel may be at full scale (a read-only pass, or the
        # caller's word that the whole frame has none)
        if any_saturated is not False and int(on_s.max()) >= self.full_scale:
            np.greater_equal(on_s, self.full_scale, out=self._pv_sat)
            rgb[self._pv_sat] = PREVIEW_SATURATED_RGB
        return self.preview_width, self.preview_height, rgb.tobytes()
