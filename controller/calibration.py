"""Laser power calibration: PWM duty <-> optical milliwatts, and the monitor photodiode.

The table maps duty fractions to optical power measured at the working distance with a power
meter. Between points the power is interpolated linearly; the table must rise strictly.
Results report the calibrated power, never the raw duty.

PRODUCT S6a: the MCU holds a factory table and photodiode factor that no command changes;
the host's own table (what ``calibrate.power`` installs) is accepted only within a tolerance
band around it, checked by :func:`factory_violation`:

    |P_new(d) - P_factory(d)| <= 0.2 P_factory(d) + 0.02 P_factory(1.0)  at every duty d

and a photodiode factor within 20 % of the factory one. Both tables are piecewise linear and
so is the bound (it follows P_factory), so the difference minus the bound is linear between
the breakpoints of the two tables taken together: checking at every breakpoint of both
(within the new table's duty range, where it is used) checks every duty.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from nirf.hal.errors import ConfigError, InvalidArgument

MIN_POWER_POINTS = 2
MAX_POWER_POINTS = 32
MAX_CALIBRATED_MW = 1000.0
# S6a tolerance around the factory table and photodiode factor.
TABLE_REL_TOLERANCE = 0.20
TABLE_FULL_SCALE_TOLERANCE = 0.02  # of the factory power at duty 1.0
PHOTODIODE_REL_TOLERANCE = 0.20
# floating-point slack when comparing at the band's edge
_EPS_MW = 1e-9


@dataclass(frozen=True)
class PowerCalibration:
    duty: tuple[float, ...]
    power_mw: tuple[float, ...]
    photodiode_factor: float = 1.0  # optical mW per photodiode mW (monitor tap ratio)
    calibration_id: str = "nominal"
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.duty) != len(self.power_mw) or len(self.duty) < 2:
            raise ConfigError("power calibration: needs at least two (duty, mW) points of equal count")
        if any(b <= a for a, b in zip(self.duty, self.duty[1:])) or \
                any(b <= a for a, b in zip(self.power_mw, self.power_mw[1:])):
            raise ConfigError("power calibration: duty and power must both rise strictly")
        if self.duty[0] < 0 or self.duty[-1] > 1:
            raise ConfigError("power calibration: duty points outside 0-1")

    @classmethod
    def nominal(cls, full_scale_mw: float) -> "PowerCalibration":
        """A straight line through zero: the module's rating until a calibration is run."""
        return cls((0.0, 1.0), (0.0, float(full_scale_mw)), 1.0, "nominal")

    def duty_for(self, power_mw: float) -> float:
        if not math.isfinite(power_mw) or power_mw < 0:
            raise InvalidArgument(f"power_mw {power_mw!r} is not a finite number >= 0")
        if power_mw > self.power_mw[-1]:
            raise InvalidArgument(
                f"power_mw {power_mw} above the calibrated maximum {self.power_mw[-1]:.1f} mW")
        return _interp(power_mw, self.power_mw, self.duty)

    def power_for(self, duty: float) -> float:
        return _interp(min(max(duty, self.duty[0]), self.duty[-1]), self.duty, self.power_mw)

    def photodiode_to_mw(self, photodiode_mw: float) -> float:
        return photodiode_mw * self.photodiode_factor

    def to_dict(self) -> dict:
        return {"duty": list(self.duty), "power_mw": list(self.power_mw),
                "photodiode_factor": self.photodiode_factor, "calibration_id": self.calibration_id,
                "notes": self.notes}

    @classmethod
    def from_factory(cls, factory) -> "PowerCalibration":
        """The MCU's factory table and photodiode factor as a host table (what the cart uses
        until a service calibration is accepted, and falls back to when a stored one is
        refused). A flat stretch (below the lasing threshold) keeps its last duty, so the
        table rises strictly."""
        duties: list[float] = []
        powers: list[float] = []
        for d, p in factory.points:
            d, p = float(d), float(p)
            if powers and p <= powers[-1]:
                duties[-1] = d  # flat: the highest duty that still gives this power
                continue
            duties.append(d)
            powers.append(p)
        return cls(tuple(duties), tuple(powers), float(factory.photodiode_factor), "factory",
                   {"source": "laser controller factory record"})

    @property
    def points(self) -> tuple[tuple[float, float], ...]:
        return tuple(zip(self.duty, self.power_mw))

    @classmethod
    def load(cls, path: Path) -> "PowerCalibration":
        data = json.loads(Path(path).read_text())
        return cls(tuple(data["duty"]), tuple(data["power_mw"]), float(data.get("photodiode_factor", 1.0)),
                   str(data.get("calibration_id", path.stem)), dict(data.get("notes", {})))


def _factory_mw(points, duty: float) -> float:
    """Piecewise-linear power of a (duty, mW) table, held constant beyond its ends."""
    xs = tuple(float(d) for d, _ in points)
    ys = tuple(float(p) for _, p in points)
    if duty >= xs[-1]:
        return ys[-1]
    return _interp(duty, xs, ys)


def factory_violation(duty: tuple[float, ...], power_mw: tuple[float, ...], photodiode_factor: float,
                      factory) -> str | None:
    """Why a host table and photodiode factor fall outside the S6a band around the MCU's
    factory record (``factory.points``, ``factory.photodiode_factor``), or None when they are
    inside. The message names the duty, both powers and the limit."""
    fpoints = tuple((float(d), float(p)) for d, p in factory.points)
    if len(fpoints) < 2:
        return "the laser controller's factory table has fewer than two points"
    if any(b[1] < a[1] for a, b in zip(fpoints, fpoints[1:])):
        return "the laser controller's factory table does not rise"
    full = _factory_mw(fpoints, 1.0)
    lo, hi = duty[0], duty[-1]
    checks = sorted({*duty, *(d for d, _ in fpoints if lo <= d <= hi)})
    for d in checks:
        new = _interp(d, duty, power_mw) if d < hi else power_mw[-1]
        ref = _factory_mw(fpoints, d)
        allowed = TABLE_REL_TOLERANCE * ref + TABLE_FULL_SCALE_TOLERANCE * full
        if abs(new - ref) > allowed + _EPS_MW:
            return (f"at duty {d:.4g} the table gives {new:.2f} mW, the factory table {ref:.2f} mW: "
                    f"the difference {abs(new - ref):.2f} mW exceeds the limit {allowed:.2f} mW "
                    f"(20 % of the factory value + 2 % of its {full:.1f} mW at duty 1.0)")
    ff = float(factory.photodiode_factor)
    if not (math.isfinite(photodiode_factor) and abs(photodiode_factor - ff) <= PHOTODIODE_REL_TOLERANCE * ff + 1e-12):
        return (f"photodiode_factor {photodiode_factor} is more than 20 % from the factory factor "
                f"{ff:.4g} (allowed {ff * (1 - PHOTODIODE_REL_TOLERANCE):.4g} to "
                f"{ff * (1 + PHOTODIODE_REL_TOLERANCE):.4g})")
    return None


def _interp(x: float, xs: tuple[float, ...], ys: tuple[float, ...]) -> float:
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def validate_power_points(points) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``[[duty, mW], ...]`` checked: 2-32 points, duty 0-1, mW 0-1000, both strictly
    rising. Returns ``(duties, powers_mw)``; raises :class:`InvalidArgument` naming the
    point, the value and the limit."""
    cmd = "calibrate.power"
    if not isinstance(points, (list, tuple)):
        raise InvalidArgument(f"{cmd}: points must be a list of [duty, mW] pairs, got {type(points).__name__}")
    if not MIN_POWER_POINTS <= len(points) <= MAX_POWER_POINTS:
        raise InvalidArgument(f"{cmd}: {len(points)} points given, allowed {MIN_POWER_POINTS} to "
                              f"{MAX_POWER_POINTS}")
    duties, powers = [], []
    for i, p in enumerate(points):
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise InvalidArgument(f"{cmd}: point {i} = {p!r} is not a [duty, mW] pair")
        duties.append(_finite(cmd, f"point {i} duty", p[0], 0.0, 1.0))
        powers.append(_finite(cmd, f"point {i} mW", p[1], 0.0, MAX_CALIBRATED_MW))
    for i in range(1, len(points)):
        if duties[i] <= duties[i - 1]:
            raise InvalidArgument(f"{cmd}: point {i} duty {duties[i]} is not above point {i - 1}'s "
                                  f"{duties[i - 1]}; duty must rise strictly")
        if powers[i] <= powers[i - 1]:
            raise InvalidArgument(f"{cmd}: point {i} power {powers[i]} mW is not above point {i - 1}'s "
                                  f"{powers[i - 1]} mW; power must rise strictly with duty")
    return tuple(duties), tuple(powers)


def _finite(cmd: str, name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{cmd}: {name} = {value!r} is not a finite number")
    if not lo <= value <= hi:
        raise InvalidArgument(f"{cmd}: {name} = {value!r} outside {lo} to {hi}")
    return float(value)
