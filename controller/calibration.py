"""Laser power calibration: PWM duty <-> optical milliwatts, and the monitor photodiode.

The table maps duty fractions to optical power measured at the working distance with a power
meter. Between points the power is interpolated linearly; the table must rise strictly.
Results report the calibrated power, never the raw duty.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hal.errors import ConfigError, InvalidArgument

MIN_POWER_POINTS = 2
MAX_POWER_POINTS = 32
MAX_CALIBRATED_MW = 1000.0


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
    def load(cls, path: Path) -> "PowerCalibration":
        data = json.loads(Path(path).read_text())
        return cls(tuple(data["duty"]), tuple(data["power_mw"]), float(data.get("photodiode_factor", 1.0)),
                   str(data.get("calibration_id", path.stem)), dict(data.get("notes", {})))


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
