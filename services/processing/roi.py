"""Automatic choice of the signal and background ROIs from a difference image.

The method (docs/processing.md, "Automatic ROIs"), all on a downsampled image so it costs
little even at full resolution:

1. Block means of D = on - off over ``block_px`` square blocks (averaging removes most of
   the shot noise), optionally divided by the block means of a flat-field gain map.
2. A box smoothing over ``2 * smooth_blocks + 1`` blocks.
3. Otsu's threshold between the dim mode (normal tissue) and the bright tail. The scene
   counts as fluorescent only if the bright class's mean exceeds the dim class's by at
   least ``min_snr`` times the block-to-block noise (a robust estimate from differences of
   neighbouring blocks), and the largest bright blob has at least ``min_blob_blocks``
   blocks that are above the threshold before smoothing too. A saturated tumour is only flatter at the top: it stays in the bright class.
4. The largest 8-connected bright blob (pure-numpy labelling), holes filled.
5. Signal ROI: a square centred on the blob's deepest point (largest inscribed square),
   ``signal_fill`` of that square's side, so it stays well inside the blob.
6. Background ROI: a square of the same size, inside the frame, at least ``margin_blocks``
   blocks from every bright block, in the largest such region, as near the blob as that
   allows (nearby tissue sees similar illumination and optics).

When nothing fluorescent is found, or no background box fits, :class:`NotAvailable` is
raised (protocol code ``NOT_AVAILABLE``): the operator must set the ROIs by hand. Bad
inputs (wrong shapes, parameters out of range) raise :class:`InvalidArgument`.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from hal.errors import InvalidArgument, NotAvailable
from services.processing.pipeline import Roi, box_smooth

log = logging.getLogger(__name__)


def _block_mean(image: np.ndarray, block: int) -> np.ndarray:
    """Means over ``block`` square blocks; rows and columns beyond the last whole block
    are dropped (less than one block at the bottom and right edges)."""
    h, w = image.shape
    nby, nbx = h // block, w // block
    cropped = image[:nby * block, :nbx * block]
    sums = cropped.reshape(nby, block, nbx, block).sum(axis=(1, 3), dtype=np.float64)
    return sums / float(block * block)


def _shifted_views(padded: np.ndarray, h: int, w: int):
    """The nine 3x3-neighbourhood shifts of a 1-padded array, each ``h x w``."""
    for dy in range(3):
        for dx in range(3):
            yield padded[dy:dy + h, dx:dx + w]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: ``(labels, count)`` with labels 1..count
    and 0 outside the mask.

    Each pixel takes the minimum flat index over its neighbourhood until nothing changes,
    with pointer jumping (a label is replaced by its own pixel's label) to converge in far
    fewer rounds than the component's diameter. Bounded by the number of pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    n = h * w
    sentinel = n
    lab = np.where(mask, np.arange(n).reshape(h, w), sentinel)
    for _ in range(n + 1):
        padded = np.pad(lab, 1, constant_values=sentinel)
        new = lab.copy()
        for view in _shifted_views(padded, h, w):
            np.minimum(new, view, out=new)
        new[~mask] = sentinel
        flat = new.reshape(-1)
        inside = flat < sentinel
        flat[inside] = flat[flat[inside]]
        if np.array_equal(new, lab):
            break
        lab = new
    else:  # pragma: no cover - cannot happen: labels only decrease
        raise RuntimeError("component labelling did not converge")
    roots, labels = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((h, w), dtype=np.int32)
    out[mask] = labels + 1
    return out, len(roots)


def _fill_holes(blob: np.ndarray) -> np.ndarray:
    """The blob with every enclosed hole (a region of the complement not touching the
    frame edge) filled."""
    holes, count = label_components(~blob)
    if count == 0:
        return blob
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    enclosed = ~np.isin(holes, edge) & (holes > 0)
    return blob | enclosed


def chessboard_depth(mask: np.ndarray, outside: bool = False) -> np.ndarray:
    """Per pixel of ``mask``: how many 3x3 erosions it survives plus one (0 outside the
    mask). A pixel of depth d has a ``(2d-1)``-block square of mask pixels centred on it.
    ``outside`` is the value assumed beyond the frame edge."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    depth = np.zeros((h, w), dtype=np.int32)
    current = mask.copy()
    for d in range(1, max(h, w) + 2):
        if not current.any():
            break
        depth[current] = d
        padded = np.pad(current, 1, constant_values=outside)
        eroded = np.ones((h, w), dtype=bool)
        for view in _shifted_views(padded, h, w):
            eroded &= view
        current = eroded
    return depth


def _noise_sigma(coarse: np.ndarray) -> float:
    """Block-to-block noise from the median absolute difference of neighbours (robust to
    edges and smooth gradients): for independent noise, diff sigma = sqrt(2) sigma."""
    diffs = np.concatenate([np.abs(np.diff(coarse, axis=1)).ravel(),
                            np.abs(np.diff(coarse, axis=0)).ravel()])
    return 1.4826 * float(np.median(diffs)) / math.sqrt(2.0)


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float | None:
    """Otsu's threshold of ``values`` (None when they are all equal)."""
    lo, hi = np.percentile(values, [0.1, 99.9])
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
        if not hi > lo:
            return None
    hist, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    p = hist / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2.0
    omega = np.cumsum(p)
    mu = np.cumsum(p * centres)
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * omega - mu) ** 2 / (omega * (1.0 - omega))
    between[~np.isfinite(between)] = -1.0
    i = int(np.argmax(between))
    return float(edges[i + 1])


def auto_rois(image, width: int, height: int, *, block_px: int = 8, smooth_blocks: int = 1,
              flat_field: np.ndarray | None = None, min_snr: float = 8.0,
              min_blob_blocks: int = 9, signal_fill: float = 0.6,
              margin_blocks: int | None = None) -> tuple[Roi, Roi]:
    """Choose ``(signal, background)`` ROIs for a scene.

    ``image`` is either the difference image D (2-D, ``height x width``) or a pair
    ``(on, off)`` of raw frames. ``flat_field`` (optional) is the gain map the pipeline
    uses, so an unevenly lit field is judged on corrected values. ``margin_blocks`` (in
    blocks) keeps the background away from the blob's glow; by default half the blob's
    equivalent radius, at least 2 blocks.

    Raises :class:`NotAvailable` when no fluorescent region stands out from the noise or
    no background box fits, :class:`InvalidArgument` for bad inputs.
    """
    if isinstance(block_px, bool) or not isinstance(block_px, int) or block_px < 1:
        raise InvalidArgument(f"auto ROI: block_px = {block_px!r}, must be a whole number >= 1")
    if not 0.0 < signal_fill <= 1.0:
        raise InvalidArgument(f"auto ROI: signal_fill = {signal_fill!r}, allowed above 0 up to 1")
    if isinstance(image, (tuple, list)):
        if len(image) != 2:
            raise InvalidArgument(f"auto ROI: expected (on, off), got {len(image)} arrays")
        on, off = (np.asarray(a) for a in image)
        for name, a in (("on", on), ("off", off)):
            if a.shape != (height, width):
                raise InvalidArgument(f"auto ROI: the {name} frame has shape {a.shape}, "
                                      f"expected ({height}, {width})")
        # Block means are linear: mean(on) - mean(off) is the block mean of D.
        coarse = _block_mean(on, block_px) - _block_mean(off, block_px)
    else:
        d = np.asarray(image)
        if d.shape != (height, width):
            raise InvalidArgument(f"auto ROI: the difference image has shape {d.shape}, "
                                  f"expected ({height}, {width})")
        coarse = _block_mean(d, block_px)
    nby, nbx = coarse.shape
    if nby < 5 or nbx < 5:
        raise InvalidArgument(f"auto ROI: a {width}x{height} frame gives only {nbx}x{nby} "
                              f"blocks of {block_px} px; at least 5x5 are needed")
    if flat_field is not None:
        g = np.asarray(flat_field)
        if g.shape != (height, width) or not np.all(g > 0):
            raise InvalidArgument(f"auto ROI: the flat field must be positive, shape "
                                  f"({height}, {width}); got {g.shape}")
        coarse = coarse / _block_mean(g, block_px)
    if not np.all(np.isfinite(coarse)):
        raise InvalidArgument("auto ROI: the image contains NaN or infinity")

    sigma = _noise_sigma(coarse)
    smooth = box_smooth(coarse, smooth_blocks) if smooth_blocks > 0 else coarse
    threshold = _otsu_threshold(smooth.ravel())
    if threshold is None:
        raise NotAvailable("auto ROI: the difference image is uniform; nothing fluorescent found")
    bright = smooth > threshold
    if not bright.any() or bright.all():
        raise NotAvailable("auto ROI: no region stands out; nothing fluorescent found")
    gap = float(smooth[bright].mean() - smooth[~bright].mean())
    # A noise-free image (sigma 0) with a step is a clear find; guard the division.
    snr = gap / sigma if sigma > 0 else math.inf
    if snr < min_snr:
        raise NotAvailable(
            f"auto ROI: the brightest region is {snr:.1f} noise sigmas above the rest, below "
            f"the limit {min_snr}; nothing fluorescent found (set the ROIs by hand)")

    labels, _ = label_components(bright)
    sizes = np.bincount(labels.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    # Size counts blocks bright before smoothing too: smoothing spreads a one-block speck
    # over its neighbours.
    core = int(np.count_nonzero((labels == biggest) & (coarse > threshold)))
    if core < min_blob_blocks:
        raise NotAvailable(
            f"auto ROI: the largest bright region has {core} blocks of {block_px} px, "
            f"below the minimum {min_blob_blocks}; nothing fluorescent found")
    blob = _fill_holes(labels == biggest)
    ys, xs = np.nonzero(blob)
    cy, cx = float(ys.mean()), float(xs.mean())

    # Signal: the centre of the largest inscribed square, nearest the centroid on ties.
    depth = chessboard_depth(blob, outside=False)
    deepest = int(depth.max())
    dy, dx = np.nonzero(depth == deepest)
    j = int(np.argmin((dy - cy) ** 2 + (dx - cx) ** 2))
    sy, sx = int(dy[j]), int(dx[j])
    side_px = max(2, int(round(signal_fill * (2 * deepest - 1) * block_px)))
    signal = _square(sx, sy, side_px, block_px, width, height)

    # Background: far from every bright block (not just the blob), inside the frame.
    if margin_blocks is None:
        margin_blocks = max(2, int(round(0.5 * math.sqrt(blob.sum() / math.pi))))
    half_blocks = math.ceil(side_px / block_px / 2.0)
    dist_bright = chessboard_depth(~bright, outside=True)  # distance to bright, in blocks
    yy, xx = np.mgrid[0:nby, 0:nbx]
    dist_edge = np.minimum(np.minimum(yy, nby - 1 - yy), np.minimum(xx, nbx - 1 - xx))
    candidates = (dist_bright > half_blocks + margin_blocks) & (dist_edge >= half_blocks)
    if not candidates.any():
        raise NotAvailable(
            f"auto ROI: no background box of {side_px}x{side_px} px fits at least "
            f"{margin_blocks * block_px} px from the fluorescent region; set the ROIs by hand")
    regions, _ = label_components(candidates)
    largest = int(np.argmax(np.bincount(regions.ravel())[1:])) + 1
    ry, rx = np.nonzero(regions == largest)
    j = int(np.argmin((ry - cy) ** 2 + (rx - cx) ** 2))
    background = _square(int(rx[j]), int(ry[j]), side_px, block_px, width, height)
    # DEBUG: the search runs every second while automatic ROIs are on
    log.debug("auto ROIs: signal %s, background %s (blob %d blocks, %.1f sigma)",
              signal.to_list(), background.to_list(), int(blob.sum()), snr)
    return signal, background


def _square(bx: int, by: int, side_px: int, block_px: int, width: int, height: int) -> Roi:
    """A ``side_px`` square centred on block (bx, by), shifted to lie inside the frame."""
    side = min(side_px, width, height)
    x = int(round((bx + 0.5) * block_px - side / 2.0))
    y = int(round((by + 0.5) * block_px - side / 2.0))
    x = min(max(x, 0), width - side)
    y = min(max(y, 0), height - side)
    return Roi(x, y, side, side)
