"""Automatic choice of the signal and background ROIs from a laser-on/laser-off pair.

The method (docs/processing.md, "Automatic ROIs"). It always yields a pair of ROIs: a
scene without focal uptake gets its signal ROI on the brightest tissue (a clean tumor bed
then reads SBR near 1, a negative), so true negatives are measured, not dropped.

1. A coarse image: D = on - off sampled at the centre of every ``block_px`` square block
   (one pixel in ``block_px**2``; :func:`default_block_px`), divided by the flat field
   sampled at the same points, so an unevenly lit field is judged on corrected values;
   with a flat field, blocks lit below :data:`MIN_EXCITATION` are left out.
2. Levels: the tissue level ``B`` is the median of the coarse image over tissue (a drape
   is not tissue), the noise a robust estimate from neighbouring blocks.
3. A box smoothing of ``2r + 1`` blocks, ``r`` the smallest of 1, 2, 4 that puts the peak
   ``P`` (the smoothed maximum) at least :data:`CONTRAST_SIGMAS` smoothed noise sigmas
   above ``B``. The uptake mask holds the blocks above half way from ``B`` to ``P`` (half
   maximum). Holes are kept: for rim uptake the mask is the annulus itself, not the disk
   it encloses.
4. Signal ROI: the largest square that lies inside the mask (a summed-area table per
   candidate size, binary search over the size), where several fit the brightest. It is
   shrunk by one block each side (and to at most :data:`MAX_ROI_PX` a side, about its
   centre); squares of at most :data:`REFINE_MAX_PX` pixels are
   refined at full resolution in a small window around them (the same half-maximum rule
   on the pixels), so a focus of radius 10 px gets a square inside it.
5. Background ROI: a square (the signal's size, at least :data:`MIN_BACKGROUND_PX`) on
   tissue (not a non-fluorescent drape: blocks below :data:`TISSUE_FRACTION` of the
   tissue level are excluded when the tissue level stands clear of the noise), at least
   ``margin`` blocks from every block above a quarter of the way from ``B`` to ``P``,
   nearest the signal ROI (similar illumination and optics). When nothing fits, the
   margin shrinks; at worst the square farthest from the signal is used, and the
   pipeline's validity rules judge the result.

Bad inputs (wrong shapes, parameters out of range, NaN) raise :class:`InvalidArgument`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from nirf.hal.errors import InvalidArgument
from nirf.services.processing.pipeline import Roi

log = logging.getLogger(__name__)

CONTRAST_SIGMAS = 12.0
SMOOTH_RADII = (1, 2, 4)
REFINE_MAX_PX = 48
# The signal square is at most this many pixels a side (centred where it was found): the
# means of 128 x 128 pixels are already far more precise than the scene is uniform, and
# every pair reads the ROIs' pixels.
MAX_ROI_PX = 128
MIN_BACKGROUND_PX = 24
TISSUE_FRACTION = 0.25
# With a flat field, blocks lit at less than this share of the centre's excitation are left
# out of the search (dividing by a small gain amplifies their noise).
MIN_EXCITATION = 0.25
# The coarse image is about this many blocks along the shorter side.
TARGET_BLOCKS = 136
# Share of a candidate square's blocks that may fall outside the mask (pixel noise holes).
HOLE_TOLERANCE = 0.03


@dataclass(frozen=True)
class RoiSearch:
    """The outcome of one search: the ROIs and how they were found."""

    signal: Roi
    background: Roi
    block_px: int
    smooth_blocks: int
    tissue_level: float  # B, counts of D (flat-field corrected)
    peak_level: float  # P
    noise_sigma: float  # per coarse sample
    refined: bool
    elapsed_s: float

    @property
    def rois(self) -> tuple[Roi, Roi]:
        """``(signal, background)``."""
        return self.signal, self.background


def default_block_px(width: int, height: int) -> int:
    """The block size that gives about :data:`TARGET_BLOCKS` blocks on the shorter side
    (4 at 1456x1088, 2 at 728x544)."""
    return max(1, int(round(min(width, height) / TARGET_BLOCKS)))


def _integral(a: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column (int32 for masks, float64
    for values)."""
    dtype = np.float64 if a.dtype.kind == "f" else np.int32
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=dtype)
    np.cumsum(a, axis=0, out=out[1:, 1:])
    np.cumsum(out[1:, 1:], axis=1, out=out[1:, 1:])
    return out


def _box_sums(table: np.ndarray, s: int) -> np.ndarray:
    """Sums over every ``s x s`` square; entry ``[y, x]`` covers ``[y:y+s, x:x+s]``."""
    return table[s:, s:] - table[:-s, s:] - table[s:, :-s] + table[:-s, :-s]


def _smooth(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a ``(2r+1)`` square box, same shape, edges by replication; separable
    running sums in float32 (one axis at a time keeps the sums small enough to be exact
    to well below the noise)."""
    if r <= 0:
        return a
    k = 2 * r + 1
    p = np.pad(a.astype(np.float32, copy=False), ((r + 1, r), (0, 0)), mode="edge")
    p[0] = 0.0
    c = np.cumsum(p, axis=0)
    rows = c[k:] - c[:-k]
    p = np.pad(rows, ((0, 0), (r + 1, r)), mode="edge")
    p[:, 0] = 0.0
    c = np.cumsum(p, axis=1)
    out = c[:, k:] - c[:, :-k]
    out *= np.float32(1.0 / (k * k))
    return out


def _noise_sigma(coarse: np.ndarray, use: np.ndarray | None) -> float:
    """Sample-to-sample noise from the median absolute difference of horizontal
    neighbours (robust to edges and gradients): diff sigma = sqrt(2) sigma. With the
    mask ``use``, only pairs of samples both in it count (the noise of well-lit tissue,
    not of a dark drape or of a corner a flat field amplifies). Every fourth row is
    enough."""
    a = coarse[::4]
    d = np.abs(a[:, 1:] - a[:, :-1])
    if use is not None:
        u = use[::4]
        keep = u[:, 1:] & u[:, :-1]
        if np.count_nonzero(keep) >= 100:
            d = d[keep]
    return 1.4826 * float(np.median(d)) / math.sqrt(2.0)


def _largest_square(mask: np.ndarray, score: np.ndarray, max_side: int | None = None,
                    tolerance: float = HOLE_TOLERANCE) -> tuple[int, int, int]:
    """``(x, y, side)`` of the largest square inside ``mask`` (at most ``tolerance`` of it
    outside); among those of that size the one whose centre has the highest ``score``
    (a smoothed image: its value is already a local mean)."""
    h, w = mask.shape
    table = _integral(mask.astype(np.int32))
    count = int(table[-1, -1])
    hi = min(h, w, int(math.isqrt(max(count, 1) * 2)) + 1)  # no square larger than the mask
    if max_side is not None:
        hi = min(hi, max_side)
    lo = 1

    def fits(s: int):
        need = s * s - int(tolerance * s * s)
        return _box_sums(table, s) >= need

    if count == 0:
        # no block above the threshold (cannot happen with a maximum in the mask)
        y, x = np.unravel_index(int(np.argmax(score)), score.shape)
        return int(x), int(y), 1
    while lo < hi:  # the largest s that fits somewhere
        mid = (lo + hi + 1) // 2
        if fits(mid).any():
            lo = mid
        else:
            hi = mid - 1
    ok = fits(lo)
    c = lo // 2
    centre = score[c:c + ok.shape[0], c:c + ok.shape[1]]
    y, x = np.unravel_index(int(np.argmax(np.where(ok, centre, -np.inf))), ok.shape)
    return int(x), int(y), lo


class RoiFinder:
    """The automatic ROI search for one frame size; keeps the sampled flat field between
    searches. Not thread-safe: one finder per search thread."""

    def __init__(self, width: int, height: int, *, block_px: int | None = None):
        for name, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 2:
                raise InvalidArgument(f"auto ROI: {name} = {v!r}, must be a whole number >= 2")
        self.width, self.height = int(width), int(height)
        if block_px is None:
            block_px = default_block_px(self.width, self.height)
        if isinstance(block_px, bool) or not isinstance(block_px, (int, np.integer)) or block_px < 1:
            raise InvalidArgument(f"auto ROI: block_px = {block_px!r}, must be a whole number >= 1")
        self.block_px = int(block_px)
        f = self.block_px
        self._rows = slice(f // 2, self.height, f)
        self._cols = slice(f // 2, self.width, f)
        nby = len(range(*self._rows.indices(self.height)))
        nbx = len(range(*self._cols.indices(self.width)))
        if nby < 5 or nbx < 5:
            raise InvalidArgument(f"auto ROI: a {width}x{height} frame gives only {nbx}x{nby} "
                                  f"blocks of {f} px; at least 5x5 are needed")
        self._flat_key: int | None = None
        self._flat_coarse: np.ndarray | None = None
        self._flat: np.ndarray | None = None

    # -- inputs --------------------------------------------------------------------------
    def _set_flat(self, flat_field: np.ndarray | None) -> None:
        if flat_field is None:
            self._flat_key = None
            self._flat_coarse = None
            self._flat = None
            return
        if self._flat_key == id(flat_field) and self._flat is flat_field:
            return
        g = np.asarray(flat_field)
        if g.shape != (self.height, self.width) or not np.all(np.isfinite(g)) or not float(g.min()) > 0:
            raise InvalidArgument(f"auto ROI: the flat field must be finite and positive, shape "
                                  f"({self.height}, {self.width}); got {g.shape}")
        self._flat = flat_field
        self._flat_key = id(flat_field)
        self._flat_coarse = np.ascontiguousarray(g[self._rows, self._cols], dtype=np.float32)

    def _coarse(self, image) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(coarse D, on, off) or (coarse D, D, None) for a difference image."""
        if isinstance(image, (tuple, list)):
            if len(image) != 2:
                raise InvalidArgument(f"auto ROI: expected (on, off), got {len(image)} arrays")
            on, off = (np.asarray(a) for a in image)
            for name, a in (("on", on), ("off", off)):
                if a.shape != (self.height, self.width):
                    raise InvalidArgument(f"auto ROI: the {name} frame has shape {a.shape}, "
                                          f"expected ({self.height}, {self.width})")
            coarse = np.subtract(on[self._rows, self._cols], off[self._rows, self._cols], dtype=np.float32)
            return coarse, on, off
        d = np.asarray(image)
        if d.ndim != 2 or d.shape != (self.height, self.width):
            raise InvalidArgument(f"auto ROI: the difference image has shape {d.shape}, "
                                  f"expected ({self.height}, {self.width})")
        return np.asarray(d[self._rows, self._cols], dtype=np.float32), d, None

    def _window_d(self, full, off, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """D at full resolution over a window, flat-field corrected."""
        if off is None:
            d = np.asarray(full[y0:y1, x0:x1], dtype=np.float32)
        else:
            d = np.subtract(full[y0:y1, x0:x1], off[y0:y1, x0:x1], dtype=np.float32)
        if self._flat is not None:
            d = d / np.asarray(self._flat[y0:y1, x0:x1], dtype=np.float32)
        return d

    # -- the search ------------------------------------------------------------------------
    def find(self, image, flat_field: np.ndarray | None = None) -> RoiSearch:
        """Search ``image`` (the pair ``(on, off)`` of raw frames, or the difference image
        D) for the signal and background ROIs. ``flat_field``: the gain map the pipeline
        divides D by (or None)."""
        t0 = time.perf_counter()
        self._set_flat(flat_field)
        coarse, full, off = self._coarse(image)
        if self._flat_coarse is not None:
            coarse /= self._flat_coarse
        if not np.all(np.isfinite(coarse)):
            raise InvalidArgument("auto ROI: the image contains NaN or infinity")
        f = self.block_px
        # where a flat field says the excitation is too weak, D / gain is mostly
        # amplified noise: the search ignores it
        lit = None if self._flat_coarse is None else self._flat_coarse >= MIN_EXCITATION
        sample = coarse[::4, ::4] if lit is None else coarse[::4, ::4][lit[::4, ::4]]
        level = float(np.median(sample)) if sample.size else float(np.median(coarse))
        use = lit
        if level > 0:
            use = coarse >= TISSUE_FRACTION * level if lit is None else lit & (coarse >= TISSUE_FRACTION * level)
        sigma = _noise_sigma(coarse, use)
        # a drape (no fluorescence) is not tissue, when tissue stands clear of the noise
        drape_aware = level > 10.0 * sigma / (2 * SMOOTH_RADII[-1] + 1)
        if drape_aware:
            on_tissue = sample[sample >= TISSUE_FRACTION * level]
            tissue_level = float(np.median(on_tissue)) if on_tissue.size else level
        else:
            tissue_level = level

        # smoothing: as little as the contrast allows
        for r in SMOOTH_RADII:
            smooth = _smooth(coarse, r)
            if lit is not None:
                smooth[~lit] = tissue_level  # neither uptake nor background there
            peak = float(smooth.max())
            if peak - tissue_level >= CONTRAST_SIGMAS * sigma / (2 * r + 1):
                break
        if drape_aware:
            tissue = smooth >= TISSUE_FRACTION * tissue_level
        else:
            tissue = np.ones(smooth.shape, dtype=bool)
        if lit is not None:
            tissue &= lit
        threshold = tissue_level + 0.5 * (peak - tissue_level)
        bright = smooth > threshold

        # a clear contrast gives a clean mask: the square must lie wholly inside it; at low
        # contrast a few noise holes are tolerated
        bx, by, side = _largest_square(bright, smooth, tolerance=0.0 if r == SMOOTH_RADII[0] else HOLE_TOLERANCE)
        refined = False
        side_px = side * f
        # refined only where the contrast is clear at the first smoothing (refining noise
        # would pick the luckiest few pixels)
        if side_px <= REFINE_MAX_PX and r == SMOOTH_RADII[0]:
            signal = self._refine(full, off, bx, by, side, tissue_level)
            refined = signal is not None
        else:
            signal = None
        if signal is None:
            inset = 1 if side >= 4 else 0
            signal = self._block_square(bx + inset, by + inset, side - 2 * inset)
        if max(signal.w, signal.h) > MAX_ROI_PX:
            cx, cy = signal.x + signal.w // 2, signal.y + signal.h // 2
            w, h = min(signal.w, MAX_ROI_PX), min(signal.h, MAX_ROI_PX)
            signal = Roi(cx - w // 2, cy - h // 2, w, h)

        background = self._background(smooth, tissue, tissue_level, peak, signal)
        search = RoiSearch(signal, background, f, r, tissue_level, peak, sigma, refined,
                           time.perf_counter() - t0)
        log.debug("auto ROIs: signal %s, background %s (B %.1f, P %.1f, sigma %.2f, r %d)",
                  signal.to_list(), background.to_list(), tissue_level, peak, sigma, r)
        return search

    def _block_square(self, bx: int, by: int, side: int) -> Roi:
        """The pixels of ``side x side`` blocks from block (bx, by), inside the frame."""
        f = self.block_px
        side = max(1, side)
        x, y = bx * f, by * f
        w = min(side * f, self.width - x)
        h = min(side * f, self.height - y)
        return Roi(x, y, max(1, w), max(1, h))

    def _refine(self, full, off, bx: int, by: int, side: int, tissue_level: float) -> Roi | None:
        """The coarse square refined at full resolution: the largest square inside the
        half-maximum contour of D in a window around it, shrunk by a pixel each side."""
        f = self.block_px
        pad = 2 * f + 4
        x0, y0 = max(0, bx * f - pad), max(0, by * f - pad)
        x1 = min(self.width, (bx + side) * f + pad)
        y1 = min(self.height, (by + side) * f + pad)
        if x1 - x0 < 5 or y1 - y0 < 5:
            return None
        d = self._window_d(full, off, x0, y0, x1, y1)
        sm = _smooth(d, 1)
        peak = float(sm.max())
        if not peak > tissue_level:
            return None
        mask = sm > tissue_level + 0.5 * (peak - tissue_level)
        x, y, s = _largest_square(mask, sm, tolerance=0.0)
        inset = 1 if s >= 6 else 0
        s -= 2 * inset
        if s < 2:
            return None
        return Roi(x0 + x + inset, y0 + y + inset, s, s)

    def _background(self, smooth: np.ndarray, tissue: np.ndarray, tissue_level: float, peak: float,
                    signal: Roi) -> Roi:
        """A background square on tissue, away from the uptake, nearest the signal ROI."""
        f = self.block_px
        nby, nbx = smooth.shape
        side_px = min(max(signal.w, signal.h, MIN_BACKGROUND_PX), self.width // 2, self.height // 2)
        side = max(1, -(-side_px // f))
        glow = smooth > tissue_level + 0.25 * (peak - tissue_level)
        avoid = (glow | ~tissue).astype(np.int32)
        table = _integral(avoid)
        cy = (signal.y + signal.h / 2.0) / f
        cx = (signal.x + signal.w / 2.0) / f
        for margin in (max(2, side // 2), 2, 1, 0):
            k = side + 2 * margin
            if k > min(nby, nbx):
                continue
            clear = _box_sums(table, k) == 0  # [y, x]: the k-square from (x, y) is clear
            if not clear.any():
                continue
            # distance of each candidate square's centre (in blocks) from the signal's
            qy = (np.arange(clear.shape[0], dtype=np.float32) + (margin + side / 2.0 - cy)) ** 2
            qx = (np.arange(clear.shape[1], dtype=np.float32) + (margin + side / 2.0 - cx)) ** 2
            dist = qy[:, None] + qx[None, :]
            dist[~clear] = np.inf
            y, x = np.unravel_index(int(np.argmin(dist)), dist.shape)
            return self._fit(int(x + margin) * f, int(y + margin) * f, side_px)
        # nothing clear: the square farthest from the signal, away from its blocks
        far_x = 0 if cx > nbx / 2 else self.width - side_px
        far_y = 0 if cy > nby / 2 else self.height - side_px
        return self._fit(far_x, far_y, side_px)

    def _fit(self, x: int, y: int, side_px: int) -> Roi:
        x = min(max(0, x), self.width - side_px)
        y = min(max(0, y), self.height - side_px)
        return Roi(x, y, side_px, side_px)


def auto_rois(image, width: int, height: int, *, block_px: int | None = None,
              flat_field: np.ndarray | None = None) -> tuple[Roi, Roi]:
    """``(signal, background)`` ROIs for a scene: ``image`` is the pair ``(on, off)`` or
    the difference image D (``height x width``); ``flat_field`` the gain map the pipeline
    uses. Always yields; see the module docstring. Raises :class:`InvalidArgument` for bad
    inputs."""
    return RoiFinder(width, height, block_px=block_px).find(image, flat_field).rois
