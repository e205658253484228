"""Ready scenes for the study's cases (SIM.md ``sim.set scene``), each with its truth.

A scene is a phantom (the ``sim.set phantom`` map: background ICG, autofluorescence,
disks drawn in order, a later disk over an earlier one) plus what the tests need to judge
the processing against the geometry rather than against the pipeline's opinion:

- ``true_sbr``: the true SBR for the ROIs the scene's docstring names (ratio of the total
  fluorophore concentration, ICG plus autofluorescence; ambient light and dark current
  cancel in laser-on minus laser-off, and a calibrated flat field removes the
  illumination profile);
- ``uptake``: the regions of focal uptake, as disks and annuli in pixels (full frame,
  pixel ``(row, col)`` centred at ``(col + 0.5, row + 0.5)``, as the renderer draws them);
- :func:`uptake_fraction` and :func:`roi_true_sbr`: what an ROI covers, from that geometry.

Sizes of foci are in pixels whatever the frame size (SIM.md: "radius 25 px", "radius
10-20 px"); positions, and the size of large structures (the rim, the drape), scale with
the frame. The concentrations are chosen against the default sensor (10-bit, 50 mW,
10 ms, gain 1): 150 nM, three times the 50 nM background, stays below full scale.

The phantom model has one concentration per disk; in ``no_icg`` the disks stand for
autofluorescent structures (there is no ICG anywhere), so their ``icg_nM`` is the
autofluorescence above the tissue's uniform level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from nirf.hal.errors import InvalidArgument

BACKGROUND_NM = 50.0
UPTAKE_NM = 150.0  # focal uptake three times the background (SIM.md)
RIM_CENTRE_NM = 25.0  # the dark centre of a rim: half the surrounding tissue
TEXTURE_NM = 2.0  # clean bed: patches +-4 % of the background
NO_ICG_TISSUE_NM = 0.1  # autofluorescence of tissue; with 0.3 nM structures it reads
NO_ICG_STRUCTURE_NM = 0.3  # ~1.8 counts/s/mW at the brightest, as measured on version 1
SMALL_FOCI_RADII_PX = (10.0, 14.0, 20.0)
RESIDUAL_FOCUS_RADIUS_PX = 25.0


@dataclass(frozen=True)
class Shape:
    """A disk (``inner`` 0) or an annulus: pixel centres with ``inner < r <= outer``
    (a disk includes its centre)."""

    x: float
    y: float
    outer: float
    inner: float = 0.0

    def mask(self, width: int, height: int) -> np.ndarray:
        """Pixels whose centre lies in the shape."""
        cols = np.arange(width) + 0.5
        rows = np.arange(height) + 0.5
        r2 = (rows[:, None] - self.y) ** 2 + (cols[None, :] - self.x) ** 2
        inside = r2 <= self.outer ** 2
        if self.inner > 0:
            inside &= r2 > self.inner ** 2
        return inside


@dataclass(frozen=True)
class Scene:
    """One ready scene: its phantom, its truth and its regions of uptake."""

    name: str
    phantom: dict
    true_sbr: float | None
    doc: str
    uptake: tuple[Shape, ...] = field(default_factory=tuple)
    # each region of uptake that counts as a separate finding (small_foci: each focus)
    findings: tuple[Shape, ...] = field(default_factory=tuple)
    # where a background ROI may go and keep the named truth (mask of tissue without uptake)
    drape: Shape | None = None


def _disk(x, y, r, nm) -> dict:
    return {"x": float(x), "y": float(y), "radius": float(r), "icg_nM": float(nm)}


def _texture(width: int, height: int, level: float) -> list[dict]:
    """Slight texture: large patches a few per cent above and below ``level``, drawn
    first so any focus drawn later replaces them."""
    r = height / 7.0
    spots = [(0.22, 0.30, +1), (0.70, 0.25, -1), (0.45, 0.72, +1), (0.85, 0.70, -1),
             (0.15, 0.78, -1)]
    return [_disk(fx * width, fy * height, r, level + sign * TEXTURE_NM) for fx, fy, sign in spots]


def build(name: str, width: int, height: int) -> Scene:
    """The scene ``name`` for a ``width x height`` frame (see :data:`NAMES`)."""
    if name not in NAMES:
        raise InvalidArgument(f"scene {name!r}: allowed {', '.join(NAMES)}")
    return _BUILDERS[name](width, height)


def default(width: int, height: int) -> Scene:
    """SIM.md's default phantom: 50 nM everywhere, a 200 nM disk of radius height/6 at the
    centre. Truth: signal ROI inside the disk, background outside it: SBR 4.0."""
    disk = Shape(width / 2.0, height / 2.0, height / 6.0)
    return Scene("default", {"background_icg_nM": BACKGROUND_NM, "autofluorescence_nM": 0.0,
                             "inclusions": [_disk(disk.x, disk.y, disk.outer, 200.0)]},
                 4.0, default.__doc__, (disk,), (disk,))


def clean_bed(width: int, height: int) -> Scene:
    """A tumor bed with no focal uptake: 50 nM with large patches of +-2 nM (slight
    texture). Truth: signal ROI on a bright patch, background ROI on plain tissue: SBR
    52 / 50 = 1.04 (any pair of tissue ROIs lies between 48/52 and 52/48); a negative."""
    return Scene("clean_bed", {"background_icg_nM": BACKGROUND_NM, "autofluorescence_nM": 0.0,
                               "inclusions": _texture(width, height, BACKGROUND_NM)},
                 (BACKGROUND_NM + TEXTURE_NM) / BACKGROUND_NM, clean_bed.__doc__)


def residual_focus(width: int, height: int) -> Scene:
    """A residual focus of radius 25 px at 150 nM (3x the 50 nM background) off centre,
    on plain tissue. Truth: signal ROI inside the focus, background ROI on tissue outside
    it: SBR 3.0."""
    focus = Shape(0.68 * width, 0.55 * height, RESIDUAL_FOCUS_RADIUS_PX)
    return Scene("residual_focus", {"background_icg_nM": BACKGROUND_NM, "autofluorescence_nM": 0.0,
                                    "inclusions": [_disk(focus.x, focus.y, focus.outer, UPTAKE_NM)]},
                 UPTAKE_NM / BACKGROUND_NM, residual_focus.__doc__, (focus,), (focus,))


def rim(width: int, height: int) -> Scene:
    """Rim uptake: an annulus at 150 nM (3x background), outer radius height/7, inner
    radius 0.55 of that, around a dark centre of 25 nM, off centre. Truth: signal ROI
    inside the annulus, background ROI on tissue outside the rim: SBR 3.0 (a signal ROI
    in the centre would read 0.5)."""
    outer = height / 7.0
    ring = Shape(0.40 * width, 0.45 * height, outer, 0.55 * outer)
    return Scene("rim", {"background_icg_nM": BACKGROUND_NM, "autofluorescence_nM": 0.0,
                         "inclusions": [_disk(ring.x, ring.y, ring.outer, UPTAKE_NM),
                                        _disk(ring.x, ring.y, ring.inner, RIM_CENTRE_NM)]},
                 UPTAKE_NM / BACKGROUND_NM, rim.__doc__, (ring,), (ring,))


def small_foci(width: int, height: int) -> Scene:
    """Three foci of radius 10, 14 and 20 px at 150 nM (3x background), well apart.
    Truth for each: signal ROI inside that focus, background ROI on tissue away from all
    three: SBR 3.0."""
    spots = ((0.25, 0.30), (0.70, 0.35), (0.45, 0.75))
    foci = tuple(Shape(fx * width, fy * height, r) for (fx, fy), r in zip(spots, SMALL_FOCI_RADII_PX))
    return Scene("small_foci", {"background_icg_nM": BACKGROUND_NM, "autofluorescence_nM": 0.0,
                                "inclusions": [_disk(f.x, f.y, f.outer, UPTAKE_NM) for f in foci]},
                 UPTAKE_NM / BACKGROUND_NM, small_foci.__doc__, foci, foci)


def no_icg(width: int, height: int) -> Scene:
    """No ICG at all: tissue autofluorescence of 0.1 nM-equivalent with one structure of
    0.3 nM (faint contrast, ~1.8 counts/s/mW at 10 ms, gain 1). Truth: signal ROI on
    the structure, background on tissue: SBR 3.0, but the intensity is some 600 times
    below an ICG tumor's: the call must be negative (or the result invalid), never
    positive."""
    spot = Shape(0.5 * width, 0.5 * height, height / 8.0)
    return Scene("no_icg", {"background_icg_nM": 0.0, "autofluorescence_nM": NO_ICG_TISSUE_NM,
                            "inclusions": [_disk(spot.x, spot.y, spot.outer,
                                                 NO_ICG_STRUCTURE_NM - NO_ICG_TISSUE_NM)]},
                 NO_ICG_STRUCTURE_NM / NO_ICG_TISSUE_NM, no_icg.__doc__, (spot,), ())


def drape(width: int, height: int) -> Scene:
    """Part of the field (the left ~38 %) covered by a non-fluorescent drape (0 nM, no
    autofluorescence), the rest a clean bed (50 nM with +-2 nM texture). Truth: signal
    and background ROIs on tissue: SBR 1.04 at most (a negative); a background ROI on
    the drape has no fluorescence, so the SBR is undefined (the result is not valid)."""
    # a disk so large its edge is nearly straight across the field (centre and radius kept
    # within what sim.set accepts for a phantom, so the scene can be sent as one)
    big = 1.4 * width
    cover = Shape(0.40 * width - big, 0.5 * height, big)
    inclusions = [d for d in _texture(width, height, BACKGROUND_NM)]
    inclusions.append(_disk(cover.x, cover.y, cover.outer, 0.0))
    return Scene("drape", {"background_icg_nM": BACKGROUND_NM, "autofluorescence_nM": 0.0,
                           "inclusions": inclusions},
                 (BACKGROUND_NM + TEXTURE_NM) / BACKGROUND_NM, drape.__doc__, drape=cover)


_BUILDERS = {"default": default, "clean_bed": clean_bed, "residual_focus": residual_focus,
             "rim": rim, "small_foci": small_foci, "no_icg": no_icg, "drape": drape}
NAMES = tuple(_BUILDERS)


def concentration(scene: Scene, width: int, height: int) -> np.ndarray:
    """The scene's total fluorophore concentration per pixel (nM), from its phantom map
    (the same drawing rule as the renderer: disks in order, each replacing what is under
    it, autofluorescence added everywhere). For judging ROIs; the renderer draws its own."""
    ph = scene.phantom
    conc = np.full((height, width), float(ph["background_icg_nM"]))
    for inc in ph["inclusions"]:
        conc[Shape(inc["x"], inc["y"], inc["radius"]).mask(width, height)] = inc["icg_nM"]
    return conc + float(ph["autofluorescence_nM"])


def uptake_fraction(scene: Scene, roi, width: int, height: int, shape: Shape | None = None) -> float:
    """The fraction of an ROI's pixels (``roi``: ``[x, y, w, h]``) inside the scene's
    uptake (or inside ``shape``), from the geometry."""
    x, y, w, h = (int(v) for v in roi)
    shapes = (shape,) if shape is not None else scene.uptake
    if not shapes or w <= 0 or h <= 0:
        return 0.0
    inside = np.zeros((height, width), dtype=bool)
    for s in shapes:
        inside |= s.mask(width, height)
    return float(inside[y:y + h, x:x + w].mean())


def roi_true_sbr(scene: Scene, signal, background, width: int, height: int) -> float:
    """The true SBR of these two ROIs: the ratio of their mean concentrations (what
    laser-on minus laser-off measures once the illumination is flat-fielded)."""
    conc = concentration(scene, width, height)

    def mean(roi) -> float:
        x, y, w, h = (int(v) for v in roi)
        return float(conc[y:y + h, x:x + w].mean())

    b = mean(background)
    return math.inf if b <= 0 else mean(signal) / b
