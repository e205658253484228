"""The excitation laser source: a laser diode behind a microcontroller (MCU).

The MCU is the last software layer before the photons. It owns the PWM duty, the enable,
the per-frame gating (it triggers the camera and lights the laser on alternate frames), the
host watchdog and its own limits. The controller only grants or withdraws permission to
emit; it never times individual frames over serial.

Power is handled as a PWM duty fraction here (0.0-1.0): the conversion between optical
milliwatts and duty belongs to the calibration, which lives above this interface.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from hal.errors import InvalidArgument


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
    duty_ceiling: float = 1.0  # the MCU's own maximum duty, set at calibration


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

    kind: str  # "FAULT", ...
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

    # -- emission ---------------------------------------------------------------------
    def set_duty(self, duty: float) -> None:
        """Set the PWM duty fraction (0..1). The MCU rejects a duty above its ceiling."""
        if not isinstance(duty, (int, float)) or not math.isfinite(duty) or not 0.0 <= duty <= 1.0:
            raise InvalidArgument(f"laser duty {duty!r} outside 0.0-1.0")
        self._do_set_duty(float(duty))

    def set_enabled(self, on: bool) -> None:
        """Grant (True) or withdraw (False) permission to emit."""
        self._do_set_enabled(bool(on))

    def force_off(self) -> None:
        """Withdraw emission and set the duty to zero. Never raises for a missing reply
        from a dead link: the MCU's watchdog covers that case."""
        self._do_force_off()

    @abstractmethod
    def heartbeat(self) -> None:
        """Tell the MCU the host is alive (S5)."""

    @abstractmethod
    def status(self) -> LaserStatus: ...

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
    def _do_set_duty(self, duty: float) -> None: ...

    @abstractmethod
    def _do_set_enabled(self, on: bool) -> None: ...

    @abstractmethod
    def _do_force_off(self) -> None: ...

    @abstractmethod
    def _do_start_frames(self, fps: float, exposure_us: int, modulate: bool) -> None: ...
