"""The NIR camera and the frame type.

Pixel values in a :class:`Frame` are always right-aligned raw counts (0 .. 2**bits - 1),
whatever the sensor's packing on the wire; the driver undoes any left alignment.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np

from nirf.hal.errors import InvalidArgument


@dataclass(frozen=True)
class CameraSettings:
    exposure_us: int = 10_000
    gain: float = 1.0
    width: int = 1456
    height: int = 1088

    def validated(self) -> "CameraSettings":
        if not 10 <= self.exposure_us <= 1_000_000:
            raise InvalidArgument(f"exposure {self.exposure_us} us outside 10-1000000 us")
        if not math.isfinite(self.gain) or not 1.0 <= self.gain <= 16.0:
            raise InvalidArgument(f"analogue gain {self.gain} outside 1.0-16.0")
        if not (16 <= self.width <= 8192 and 16 <= self.height <= 8192):
            raise InvalidArgument(f"frame size {self.width}x{self.height} outside 16-8192")
        return self


@dataclass(frozen=True)
class FrameMeta:
    """What is known about one frame. Times are wall clock (``time.time_ns`` scale)."""

    seq: int  # the camera's own frame sequence number, from 0 at start
    t_start_ns: int  # start of exposure
    t_end_ns: int  # end of exposure
    exposure_us: int
    gain: float
    width: int
    height: int
    bits: int = 10
    black_level: int = 16
    sensor_timestamp_ns: int = 0  # the sensor's own clock, as reported
    frame_duration_us: int = 0
    # Filled in by the controller's acquisition from the MCU's frame tags and its state:
    lit: bool | None = None  # laser gated on during this frame
    mcu_frame: int | None = None
    laser_mw: float = 0.0  # calibrated optical power during lit frames
    filter_position: int = 0
    cut: bool = False  # the MCU cut this lit frame's exposure (a turn-off or decrease)
    light_seen: bool = False  # the MCU's photodiode saw light during this dark frame's exposure

    def with_(self, **changes) -> "FrameMeta":
        return replace(self, **changes)


@dataclass(frozen=True)
class Frame:
    data: np.ndarray  # uint16, shape (height, width), right-aligned counts
    meta: FrameMeta

    @property
    def full_scale(self) -> int:
        return (1 << self.meta.bits) - 1


class NirCamera(ABC):
    """configure -> start -> capture ... -> stop. ``capture`` raises ``CameraStall`` when
    no frame arrives within the timeout; ``restart`` recovers a stalled camera."""

    device = "camera"

    @abstractmethod
    def configure(self, settings: CameraSettings) -> CameraSettings:
        """Apply exposure and gain (manual only) and the frame size; returns what was
        applied. Allowed only while stopped."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def capture(self, timeout_s: float = 1.0) -> Frame: ...

    @abstractmethod
    def restart(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def settings(self) -> CameraSettings: ...

    @property
    @abstractmethod
    def streaming(self) -> bool: ...


def check_positive_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgument(f"{name} {value!r} outside {lo}-{hi}")
    return value
