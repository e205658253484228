"""The excitation laser source: a laser diode behind a microcontroller (MCU).

The MCU is the last software layer before the photons. It owns the PWM duty, the enable,
the per-frame gating (it triggers the camera and lights the laser on alternate frames), the
host watchdog and its own limits. The controller only grants or withdraws permission to
emit; it never times individual frames over serial.

Power is handled as a PWM duty fraction here (0.0-1.0); the conversion between optical
milliwatts and duty belongs to the calibration, which lives above this interface. Every
command that turns the output on or sets its duty also carries the optical power the host
expects from it, so the MCU can cross-check it against its own factory-calibrated monitor
photodiode (PRODUCT.md S6a). The MCU's factory record (:class:`FactoryCalibration`) holds
the absolute limits; the host reads it at connect and can never raise it.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from nirf.hal.errors import InvalidArgument


@dataclass(frozen=True)
class LaserStatus:
    """One status reading from the MCU."""

    output_on: bool  # the MCU's laser enable output (before per-frame gating)
    duty: float  # commanded PWM duty, 0..1
    interlock_closed: bool  # the MCU's own reading of the interlock loop
    key_on: bool  # the MCU's own reading of the key switch
    temp_c: float  # laser diode temperature
    photodiode_mw: float  # monitor photodiode, in the MCU's uncalibrated mW
    faults: tuple[str, ...] = ()  # latched MCU fault codes (e.g. "WDOG", "ILK", "KEY")
    frame_counter: int = 0  # frames triggered since frame timing was last started
    frame_timing: bool = False  # triggering the camera
    modulation: bool = False  # gating the laser on alternate frames
    duty_ceiling: float = 1.0  # the MCU's own maximum duty (from its factory record)
    # Opening edges counted by the MCU's input interrupt since its boot, whatever the
    # output state: a count that rises reveals an opening however short it was.
    interlock_openings: int = 0
    key_offs: int = 0
    on_time_s: float = 0.0  # emission-permitted time within the MCU's sliding window
    budget_s: float = 0.0  # the MCU's own emission budget (window = 2 x budget_s)


OPTICAL_TRIP_FACTOR = 1.1  # ceiling and optical trip at 1.1 x the maximum power (S6a)
DUTY_RESOLUTION = 1e-6  # the protocol's duty resolution (six decimals)
MAX_FACTORY_POINTS = 16


@dataclass(frozen=True)
class FactoryCalibration:
    """The MCU's factory record (S6a): written only with its service jumper closed, read
    back by the host at connect.

    ``points`` maps PWM duty to optical mW (duty strictly increasing from 0.0 to 1.0, mW
    never decreasing); ``photodiode_factor`` is optical mW per MCU ``pd`` unit;
    ``duty_ceiling`` the duty at which the table gives ``optical_trip_mw`` (1.1 x
    ``max_power_mw``, rounded down to the protocol's resolution, 1.0 when the table never
    gets there); ``budget_s`` the MCU's emission budget (S7a). Build one with
    :meth:`build`, which derives the ceiling and the trip.
    """

    points: tuple[tuple[float, float], ...]
    photodiode_factor: float
    max_power_mw: float
    duty_ceiling: float
    optical_trip_mw: float
    budget_s: float

    def __post_init__(self) -> None:
        pts = tuple((float(d), float(mw)) for d, mw in self.points)
        object.__setattr__(self, "points", pts)
        if not 2 <= len(pts) <= MAX_FACTORY_POINTS:
            raise InvalidArgument(f"factory table: {len(pts)} points, allowed 2-{MAX_FACTORY_POINTS}")
        for d, mw in pts:
            if not (math.isfinite(d) and math.isfinite(mw)) or not 0.0 <= d <= 1.0 or not 0.0 <= mw <= 9999.0:
                raise InvalidArgument(f"factory table: point ({d!r}, {mw!r}) outside duty 0-1, 0-9999 mW")
        if pts[0][0] != 0.0 or pts[-1][0] != 1.0:
            raise InvalidArgument(f"factory table: must run from duty 0.0 to 1.0, got {pts[0][0]}-{pts[-1][0]}")
        for (d0, p0), (d1, p1) in zip(pts, pts[1:]):
            if d1 <= d0 or p1 < p0:
                raise InvalidArgument(f"factory table: not monotonic between ({d0}, {p0}) and ({d1}, {p1})")
        if pts[-1][1] <= 0.0:
            raise InvalidArgument("factory table: gives no light at duty 1.0")
        for name, v, lo, hi in (("photodiode_factor", self.photodiode_factor, 1e-6, 1000.0),
                                ("max_power_mw", self.max_power_mw, 0.001, 9999.0),
                                ("duty_ceiling", self.duty_ceiling, 0.0, 1.0),
                                ("optical_trip_mw", self.optical_trip_mw, 0.001, 9999.0),
                                ("budget_s", self.budget_s, 0.001, 9999.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise InvalidArgument(f"factory record: {name} {v!r} outside {lo}-{hi}")
            object.__setattr__(self, name, float(v))

    @classmethod
    def build(cls, points, photodiode_factor: float, max_power_mw: float, budget_s: float) -> "FactoryCalibration":
        """A record whose ceiling and optical trip follow from the table and the maximum
        power, as the MCU itself derives them when the record is written."""
        # to the protocol's mW resolution (three decimals), so a record read back equals it
        trip = round(OPTICAL_TRIP_FACTOR * float(max_power_mw), 3)
        probe = cls(tuple(points), photodiode_factor, max_power_mw, 1.0, trip, budget_s)
        return cls(probe.points, photodiode_factor, max_power_mw, probe.ceiling_for(trip), trip, budget_s)

    def mw_at(self, duty: float) -> float:
        """Optical mW the factory table gives at ``duty`` (piecewise-linear)."""
        if not math.isfinite(duty) or not 0.0 <= duty <= 1.0:
            raise InvalidArgument(f"duty {duty!r} outside 0.0-1.0")
        duties = [d for d, _ in self.points]
        i = bisect.bisect_right(duties, duty) - 1
        if i >= len(self.points) - 1:
            return self.points[-1][1]
        (d0, p0), (d1, p1) = self.points[i], self.points[i + 1]
        return p0 + (p1 - p0) * (duty - d0) / (d1 - d0)

    def duty_for(self, mw: float) -> float:
        """The smallest duty at which the factory table gives ``mw``. InvalidArgument
        names the table's maximum when it never gets there."""
        if not math.isfinite(mw) or mw < 0.0:
            raise InvalidArgument(f"power {mw!r} mW is not a finite number >= 0")
        if mw > self.points[-1][1]:
            raise InvalidArgument(f"power {mw} mW above the factory table's maximum {self.points[-1][1]} mW")
        for (d0, p0), (d1, p1) in zip(self.points, self.points[1:]):
            if mw <= p1:
                if p1 == p0 or mw <= p0:
                    return d0 if mw <= p0 else d1
                return d0 + (d1 - d0) * (mw - p0) / (p1 - p0)
        return 1.0

    def ceiling_for(self, trip_mw: float) -> float:
        """The duty ceiling for an optical trip level: the duty where the table reaches
        it, rounded down to the protocol's resolution; 1.0 when it never does."""
        if trip_mw >= self.points[-1][1]:
            return 1.0
        return math.floor(self.duty_for(trip_mw) / DUTY_RESOLUTION + 1e-6) * DUTY_RESOLUTION


def trigger_period_us(fps: float) -> int:
    """The camera trigger period the MCU runs for ``fps``: whole microseconds (the
    protocol's ``FTON <period_us>``). Whoever times frames against the MCU's triggers uses
    this, not ``1e6 / fps``: at 60 fps the two differ by a third of a microsecond a frame,
    a quarter of a period after about 12,500 frames (3.5 minutes)."""
    return int(round(1e6 / fps))


@dataclass(frozen=True)
class FrameTag:
    """The MCU's notice of one camera trigger: which frame, and whether the laser was
    gated on for it."""

    counter: int
    lit: bool
    mcu_time_us: int  # the MCU's own microsecond clock at the trigger
    host_time_ns: int  # host wall clock when the notice was read


@dataclass(frozen=True)
class McuNotice:
    """An unsolicited message from the MCU other than a frame tag (e.g. a fault)."""

    kind: str  # "FAULT", "BOOT", "CUT" (a lit frame cut mid-exposure), "LIT" (light seen in a
    # dark frame's exposure), "INPUT" (an input edge)
    detail: tuple[str, ...] = field(default_factory=tuple)


class LaserSource(ABC):
    """A laser driven through its MCU.

    Public methods validate their arguments and then call the matching ``_do_*`` method,
    which does the I/O. Implementations must leave the output off after ``connect``.
    """

    device = "laser-mcu"

    # -- lifecycle --------------------------------------------------------------------
    @abstractmethod
    def connect(self) -> None:
        """Open the link; the first act on it forces the laser output off."""

    @abstractmethod
    def close(self) -> None:
        """Force the output off (best effort) and release the port."""

    @abstractmethod
    def identity(self) -> str:
        """The MCU's identity string (model, firmware version, serial number)."""

    @abstractmethod
    def factory(self) -> FactoryCalibration:
        """The MCU's factory record, read at connect and cached."""

    def write_factory(self, fc: FactoryCalibration) -> None:
        """Write a new factory record. The MCU accepts it only while its service jumper is
        closed (DeviceRejected naming the jumper otherwise) and with the output off."""
        if not isinstance(fc, FactoryCalibration):
            raise InvalidArgument(f"write_factory needs a FactoryCalibration, got {type(fc).__name__}")
        self._do_write_factory(fc)

    # -- emission ---------------------------------------------------------------------
    def set_duty(self, duty: float, expected_mw: float) -> None:
        """Set the PWM duty fraction (0..1) and the optical mW the host expects from it.
        The MCU rejects a duty above its ceiling and trips (XMW) when its own reading
        disagrees with ``expected_mw`` while emitting."""
        if isinstance(duty, bool) or not isinstance(duty, (int, float)) or not math.isfinite(duty) \
                or not 0.0 <= duty <= 1.0:
            raise InvalidArgument(f"laser duty {duty!r} outside 0.0-1.0")
        self._do_set_duty(float(duty), _check_mw(expected_mw))

    def set_enabled(self, on: bool, expected_mw: float = 0.0) -> None:
        """Grant (True) or withdraw (False) permission to emit; ``expected_mw`` is the
        optical mW the host expects once the output is on (ignored for off)."""
        self._do_set_enabled(bool(on), _check_mw(expected_mw) if on else 0.0)

    def force_off(self) -> None:
        """Withdraw emission and set the duty to zero. Never raises for a missing reply
        from a dead link: the MCU's watchdog covers that case."""
        self._do_force_off()

    @abstractmethod
    def heartbeat(self) -> None:
        """Tell the MCU the host is alive (S5)."""

    @abstractmethod
    def status(self) -> LaserStatus: ...

    def heartbeat_status(self) -> LaserStatus:
        """A heartbeat and then a status reading; a source that can do both in one exchange
        (the MCU's ``HBST``) overrides this. Only the supervisor loop calls it, as it alone
        sends heartbeats (S5)."""
        self.heartbeat()
        return self.status()

    @abstractmethod
    def clear_faults(self) -> None:
        """Clear the MCU's latched faults (refused by the MCU while a cause persists)."""

    # -- frame timing -----------------------------------------------------------------
    def start_frames(self, fps: float, exposure_us: int, modulate: bool) -> None:
        """Start triggering camera exposures at ``fps``; with ``modulate`` the laser is
        gated on for alternate frames (even counters lit) while emission is permitted."""
        if not math.isfinite(fps) or not 0.1 <= fps <= 120.0:
            raise InvalidArgument(f"frame rate {fps!r} outside 0.1-120 fps")
        if exposure_us <= 0 or exposure_us >= 1e6 / fps:
            raise InvalidArgument(f"exposure {exposure_us} us does not fit a frame at {fps} fps")
        self._do_start_frames(float(fps), int(exposure_us), bool(modulate))

    @abstractmethod
    def stop_frames(self) -> None: ...

    @abstractmethod
    def poll(self) -> tuple[list[FrameTag], list[McuNotice]]:
        """Read what the MCU sent on its own since the last call, without blocking."""

    # -- I/O hooks --------------------------------------------------------------------
    @abstractmethod
    def _do_set_duty(self, duty: float, expected_mw: float) -> None: ...

    @abstractmethod
    def _do_set_enabled(self, on: bool, expected_mw: float) -> None: ...

    @abstractmethod
    def _do_write_factory(self, fc: FactoryCalibration) -> None: ...

    @abstractmethod
    def _do_force_off(self) -> None: ...

    @abstractmethod
    def _do_start_frames(self, fps: float, exposure_us: int, modulate: bool) -> None: ...


MAX_EXPECTED_MW = 9999.0


def _check_mw(mw) -> float:
    if isinstance(mw, bool) or not isinstance(mw, (int, float)) or not math.isfinite(mw) \
            or not 0.0 <= mw <= MAX_EXPECTED_MW:
        raise InvalidArgument(f"expected power {mw!r} mW outside 0-{MAX_EXPECTED_MW:g} mW")
    return float(mw)
