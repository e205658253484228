"""The NIR camera (Sony IMX296 global-shutter module) through picamera2.

The driver is handed a *camera factory*: a callable returning a Picamera2-like object. On
the cart that is :func:`picamera2_factory`; in the simulator it makes a
:class:`nirf.sim.picamera2_standin.Picamera2StandIn`; tests hand in fakes. picamera2 is imported
only inside :func:`picamera2_factory`, so this module imports anywhere.

What it does:

* ``configure`` asks for a raw stream in an *unpacked* format (``R10`` for the mono sensor,
  ``SRGGB10`` for a colour one) and sets exposure and analogue gain by hand
  (``AeEnable`` False) before the camera starts, with ``FrameDurationLimits`` wide enough
  for the exposure (picamera2's video configuration otherwise fixes the frame at 33,333 us
  and libcamera clips the exposure to it). Exposure and gain outside the camera's own
  limits are refused here, because libcamera would clamp them without a word. It checks
  that the camera really gave an unpacked format: the bit depth asked for (Pi 4), or its
  16-bit form (Pi 5: libcamera's PiSP pipeline turns ``R10`` into ``R16`` with the values
  left-aligned); a packed or compressed format is refused.
* ``capture`` waits, bounded, for one completed request, copies the raw frame out and
  releases the request at once (a held request is a buffer the camera cannot fill), then
  returns right-aligned counts. picamera2 keeps only the newest completed request, so a
  slow reader loses frames; the acquisition pairs from the MCU's frame record, not from
  the order frames arrive in. A capture that timed out is a job still queued in picamera2:
  the driver waits on that same job next time (so the request it takes is not lost), and
  releases or cancels it on stop, restart and close.
* Bit alignment: a Pi 5 (picamera2 platform ``PISP``) delivers unpacked raw left-aligned in
  16 bits; a Pi 4 (``VC4``) right-aligned. With ``left_aligned=None`` the driver reads the
  camera object's ``platform`` attribute and the raw format it was given, and on the first
  frame after each start checks the data agree (a value above full scale can only be
  left-aligned; left-aligned data have their low bits zero) and corrects itself with a
  warning. ``left_aligned=True/False`` forces the layout.
* Times: picamera2's ``SensorTimestamp`` is the end of exposure (start of read-out) on the
  monotonic clock (``CLOCK_MONOTONIC``, the one behind ``time.monotonic_ns``), not the wall
  clock. The driver converts it to wall clock with an offset measured at each frame by
  reading the wall clock, the monotonic clock and the wall clock again (best of three
  brackets), so a wall clock stepped by time synchronisation is followed from the next frame.
* A colour sensor (``colour=True``): each 2x2 Bayer cell is summed into one pixel, so the
  frame is half the width and height and has two more bits (black level times four).
* No frame within the stall timeout raises :class:`~hal.errors.CameraStall`; ``restart``
  closes the camera, makes a new one with the factory, configures it as before and starts.
* The IMX296 runs in external-trigger mode on the cart (the MCU triggers each exposure; the
  exposure is the trigger's low pulse plus :data:`TRIGGER_EXPOSURE_EXTRA_US`, whatever the
  metadata say, so the acquisition records the pulse-derived exposure). The driver calls the
  optional ``external_trigger`` hook with True before every start and with False when it
  closes; on the cart the mode is set at boot by the kernel module's option instead
  (docs/camera.md), because the service's sandbox cannot write ``/sys``.

Every picamera2 exception is translated into :class:`~hal.errors.DeviceError` for device
``"camera"``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nirf.hal.camera import CameraSettings, Frame, FrameMeta, NirCamera
from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import CameraStall, DeviceError, InvalidArgument, NirfError, WrongState

log = logging.getLogger(__name__)

DEVICE = "camera"

# The kernel's IMX296 module parameter that switches the sensor to external trigger
# (Raspberry Pi OS; writable by root only). In that mode each trigger pulse on the XTR pin
# starts one exposure and the pulse's low time sets the exposure length.
IMX296_TRIGGER_MODE_PARAM = "/sys/module/imx296/parameters/trigger_mode"

# Raspberry Pi documentation, "External Trigger on the GS Camera": the IMX296 exposes for
# the low pulse plus this much.
TRIGGER_EXPOSURE_EXTRA_US = 14.26

_UNPACKED_FORMAT_RE = re.compile(r"^(R|S(?:RGGB|GRBG|GBRG|BGGR))(8|10|12|14|16)$")
DEFAULT_BUFFER_COUNT = 4
_OFFSET_SAMPLES = 3  # clock brackets per wall-clock offset estimate; the tightest wins


def picamera2_factory(index: int = 0) -> Any:
    """Open ``picamera2.Picamera2(index)``: the camera factory for the cart
    (``PiCamera(picamera2_factory)``, or ``functools.partial(picamera2_factory, 1)`` for
    another camera).

    picamera2 is imported here, never at module import, because it only exists on
    Raspberry Pi OS."""
    try:
        from picamera2 import Picamera2  # only on Raspberry Pi OS (python3-picamera2)
    except ImportError as err:
        raise DeviceError(
            DEVICE,
            f"picamera2 is not available ({err}); on Raspberry Pi OS install "
            "python3-picamera2 and create the virtual environment with "
            "--system-site-packages",
        ) from err
    try:
        return Picamera2(index)
    except Exception as err:
        raise DeviceError(DEVICE, f"cannot open camera {index}: {err}") from err


def picamera2_mapped_array() -> Callable[[Any, str], Any]:
    """picamera2's ``MappedArray``: ``with MappedArray(request, "raw") as m`` gives the raw
    buffer as a (height, stride) uint8 array without copying it (upstream's ``make_array``
    copies it; the driver then copies once more to right-align or un-pad). Imported here,
    for the same reason as in :func:`picamera2_factory`."""
    try:
        from picamera2 import MappedArray  # only on Raspberry Pi OS (python3-picamera2)
    except ImportError as err:
        raise DeviceError(DEVICE, f"picamera2 is not available ({err})") from err
    return MappedArray


def upstream_mapped_array(request: Any, stream: str) -> Any:
    """``picamera2.MappedArray(request, stream)``, imported at the first frame (the device
    profile's camera is built where picamera2 may not be installed yet)."""
    return picamera2_mapped_array()(request, stream)


def imx296_trigger_hook(
    param_path: str | Path = IMX296_TRIGGER_MODE_PARAM,
) -> Callable[[bool], None]:
    """An ``external_trigger`` hook that writes the IMX296 driver's ``trigger_mode``
    parameter (1 = wait for trigger pulses, 0 = free running). Writing it needs root (or a
    udev rule granting the service user write access)."""
    path = Path(param_path)

    def set_trigger_mode(enabled: bool) -> None:
        value = "1" if enabled else "0"
        try:
            path.write_text(value)
        except OSError as err:
            raise DeviceError(
                DEVICE,
                f"cannot set IMX296 external trigger to {value} in {path}: {err} "
                "(the parameter is writable by root only)",
            ) from err

    return set_trigger_mode


def _raw_format_depth(fmt: str) -> tuple[bool, int] | None:
    """``"R10"`` -> (mono True, 10); ``"SRGGB12"`` -> (False, 12); packed or compressed
    formats (``R10_CSI2P``, ``..._PISP_COMP1``) and anything else -> None."""
    m = _UNPACKED_FORMAT_RE.match(fmt)
    if not m:
        return None
    return m.group(1) == "R", int(m.group(2))


class PiCamera(NirCamera):
    """The IMX296 (or another picamera2 sensor) as a :class:`~hal.camera.NirCamera`.

    ``camera_factory()`` returns a Picamera2-like object. ``raw_format`` is the unpacked raw
    format to ask for (None: ``R<bits>``, or ``SRGGB<bits>`` when ``colour``).
    ``left_aligned``: None detects the layout (see the module docstring); True or False
    forces it. ``bits`` and ``black_level`` describe the sensor's counts. ``clock`` gives the
    wall clock (``time_ns``) and the monotonic clock the sensor timestamps are on
    (``monotonic``); ``sensor_clock_ns`` overrides the latter. ``stall_timeout_s`` is the
    default capture timeout. ``external_trigger(enabled)`` is called with True before each
    start and with False on close.
    """

    def __init__(
        self,
        camera_factory: Callable[[], Any],
        *,
        clock: Clock | None = None,
        raw_format: str | None = None,
        left_aligned: bool | None = None,
        bits: int = 10,
        black_level: int = 16,
        colour: bool = False,
        stall_timeout_s: float = 1.0,
        external_trigger: Callable[[bool], None] | None = None,
        buffer_count: int = DEFAULT_BUFFER_COUNT,
        sensor_clock_ns: Callable[[], int] | None = None,
        mapped_array: Callable[[Any, str], Any] | None = None,
        allocator: Callable[[int, int], np.ndarray | None] | None = None,
    ):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 8 <= bits <= 16:
            raise InvalidArgument(f"camera: bits {bits!r} outside 8-16")
        if colour and bits > 14:
            # The sum of four pixels must still fit in 16 bits.
            raise InvalidArgument(f"camera: colour binning needs at most 14 bits, not {bits}")
        if isinstance(black_level, bool) or not isinstance(black_level, int) \
                or not 0 <= black_level < (1 << bits):
            raise InvalidArgument(
                f"camera: black level {black_level!r} outside 0-{(1 << bits) - 1}")
        if raw_format is None or (colour and raw_format == f"R{bits}"):
            # The mono default names no Bayer order; a colour sensor needs one.
            raw_format = f"SRGGB{bits}" if colour else f"R{bits}"
        parsed = _raw_format_depth(raw_format)
        if parsed is None:
            raise InvalidArgument(
                f"camera: raw format {raw_format!r} is not an unpacked raw format "
                "(R8-R16 or S<bayer>8-16, e.g. R10 or SRGGB10); packed formats are replaced "
                "by a lossy compressed one on a Pi 5")
        mono, depth = parsed
        if depth != bits:
            raise InvalidArgument(
                f"camera: raw format {raw_format} has {depth} bits, the sensor {bits}")
        if colour and mono:
            raise InvalidArgument(
                f"camera: colour binning needs a Bayer raw format, not {raw_format}")
        if not (isinstance(stall_timeout_s, (int, float)) and math.isfinite(stall_timeout_s)
                and 0.0 < stall_timeout_s <= 60.0):
            raise InvalidArgument(f"camera: stall timeout {stall_timeout_s!r} s outside 0-60 s")
        if isinstance(buffer_count, bool) or not isinstance(buffer_count, int) \
                or not 2 <= buffer_count <= 16:
            raise InvalidArgument(f"camera: buffer count {buffer_count!r} outside 2-16")

        self._factory = camera_factory
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._sensor_clock_ns = sensor_clock_ns or self._monotonic_ns
        self.raw_format = raw_format
        self.bits = bits
        self.black_level = black_level
        self.colour = bool(colour)
        self.stall_timeout_s = float(stall_timeout_s)
        self._external_trigger = external_trigger
        self.buffer_count = buffer_count
        self._left_aligned_forced = left_aligned
        self._left_aligned = bool(left_aligned)
        self._check_alignment = left_aligned is None  # auto mode: verify on the first frame

        self._lock = threading.RLock()
        self._cam: Any = None
        self._settings = CameraSettings(width=1456, height=1088)
        self._configured = False
        self._streaming = False
        self._seq = 0
        self._last_frame_mono_s: float | None = None
        self._pending_job: Any = None  # a capture job that timed out, still queued upstream
        self.stale_requests_released = 0  # requests a timed-out job took, given back
        # picamera2's MappedArray (or the stand-in's): the raw buffer read in place, so the
        # frame's one copy is the driver's own, into ``allocator``'s array (shared memory)
        self._mapped_array = mapped_array
        self.allocator = allocator
        self.copies_into_allocated = 0  # frames whose one copy went into an allocated array
        # CPU seconds of this process's threads spent in the one copy of each frame (a
        # benchmark's figure: the copy is most of the device path's memory traffic)
        self.copy_cpu_s = 0.0
        self.frames_copied = 0

    # -- properties -----------------------------------------------------------------------
    @property
    def settings(self) -> CameraSettings:
        """What was last applied (the raw frame size is the camera's actual size)."""
        return self._settings

    @property
    def streaming(self) -> bool:
        """True between a successful start and stop (or close)."""
        return self._streaming

    @property
    def left_aligned(self) -> bool:
        """Whether raw data are taken as left-aligned in 16 bits (after detection)."""
        return self._left_aligned

    @property
    def frames_captured(self) -> int:
        """Frames returned by ``capture`` since the last start."""
        return self._seq

    # -- helpers --------------------------------------------------------------------------
    def _monotonic_ns(self) -> int:
        return int(round(self._clock.monotonic() * 1e9))

    @contextlib.contextmanager
    def _vendor(self, action: str):
        """Translate whatever picamera2 raises into the project's DeviceError."""
        try:
            yield
        except NirfError:
            raise
        except Exception as err:
            raise DeviceError(DEVICE, f"{action} failed: {type(err).__name__}: {err}") from err

    def _ensure_camera(self) -> Any:
        if self._cam is None:
            with self._vendor("opening the camera"):
                cam = self._factory()
            if cam is None:
                raise DeviceError(DEVICE, "the camera factory returned no camera")
            self._cam = cam
            self._resolve_alignment(cam)
        return self._cam

    def _resolve_alignment(self, cam: Any) -> None:
        if self._left_aligned_forced is not None:
            self._left_aligned = bool(self._left_aligned_forced)
            return
        platform = getattr(cam, "platform", None)
        name = str(getattr(platform, "name", platform or "")).upper()
        if "PISP" in name:
            self._left_aligned = True  # Pi 5 back end: unpacked raw fills 16 bits
        elif "VC4" in name:
            self._left_aligned = False
        else:
            self._left_aligned = False
            log.info("camera platform %r unknown; raw bit alignment will be read from the "
                     "first frame", platform)
        log.debug("camera raw data taken as %s-aligned", "left" if self._left_aligned else "right")

    def _close_camera_quietly(self, cam: Any) -> None:
        """Best effort: a camera being replaced may already be broken."""
        for action in ("stop", "close"):
            try:
                getattr(cam, action)()
            except Exception as err:
                log.warning("camera %s during restart failed: %s", action, err)

    # -- lifecycle ------------------------------------------------------------------------
    def configure(self, settings: CameraSettings) -> CameraSettings:
        """Apply a raw unpacked stream, exposure and gain (manual only). Refused while
        streaming. Returns the settings applied, with the camera's actual raw size."""
        s = settings.validated()
        with self._lock:
            if self._streaming:
                raise WrongState(
                    "camera: configure refused while streaming; stop the camera first")
            cam = self._ensure_camera()
            controls = self._controls_for(cam, s)
            with self._vendor(f"configuring raw {self.raw_format} {s.width}x{s.height}"):
                config = cam.create_video_configuration(
                    raw={"format": self.raw_format, "size": (s.width, s.height)},
                    controls=dict(controls),
                    buffer_count=self.buffer_count,
                )
                cam.configure(config)
                # Set again explicitly: exposure and gain must be in force from the first frame.
                cam.set_controls(dict(controls))
                applied = cam.camera_configuration() or {}
            raw = applied.get("raw") or {}
            actual_format = str(raw.get("format", self.raw_format))
            self._resolve_alignment(cam)  # the platform may only be known once configured
            self._check_raw_format(actual_format)
            width, height = (int(v) for v in raw.get("size", (s.width, s.height)))
            if (width, height) != (s.width, s.height):
                log.info("camera raw size is %dx%d (asked %dx%d): the sensor mode decides",
                         width, height, s.width, s.height)
            if self.colour and (width % 2 or height % 2):
                raise DeviceError(
                    DEVICE, f"raw size {width}x{height} is odd; 2x2 binning needs even sizes")
            self._settings = replace(s, width=width, height=height)
            self._configured = True
            return self._settings

    def _controls_for(self, cam: Any, s: CameraSettings) -> dict:
        """Manual exposure and gain, checked against the camera's own limits (libcamera
        clamps silently), and a frame duration range that cannot clip the exposure."""
        limits = getattr(cam, "camera_controls", None) or {}
        for name, value in (("ExposureTime", int(s.exposure_us)), ("AnalogueGain", float(s.gain))):
            if name in limits:
                lo, hi = limits[name][0], limits[name][1]
                if lo is not None and hi is not None and not lo <= value <= hi:
                    raise InvalidArgument(
                        f"camera: {name} {value} outside the camera's limits {lo}-{hi} "
                        "(the camera would clamp it without saying)")
        controls: dict[str, Any] = {"ExposureTime": int(s.exposure_us),
                                    "AnalogueGain": float(s.gain), "AeEnable": False}
        if "FrameDurationLimits" in limits or not limits:
            lo, hi = (limits.get("FrameDurationLimits") or (1, 1_000_000_000))[:2]
            lo, hi = int(lo or 1), int(hi or 1_000_000_000)
            # The shortest frame must hold the exposure; the longest is the sensor's.
            controls["FrameDurationLimits"] = (min(max(lo, int(s.exposure_us)), hi), hi)
        return controls

    def _check_raw_format(self, actual_format: str) -> None:
        """Accept the unpacked format asked for, or (Pi 5) its 16-bit left-aligned form."""
        parsed = _raw_format_depth(actual_format)
        asked_mono = _raw_format_depth(self.raw_format)[0]  # type: ignore[index]
        if parsed is not None and parsed[0] == asked_mono and parsed[1] == self.bits:
            return
        if parsed is not None and parsed[0] == asked_mono and parsed[1] == 16 and self.bits < 16:
            # libcamera's PiSP pipeline (Pi 5) writes unpacked raw as 16 bits, the sensor's
            # bits at the top: the layout follows from the format itself.
            if self._left_aligned_forced is False:
                raise DeviceError(
                    DEVICE, f"the camera gave 16-bit raw {actual_format} for {self.raw_format}; "
                            "its values are left-aligned, but left_aligned=False was forced")
            if not self._left_aligned:
                log.info("camera raw %s for %s: %d-bit values left-aligned in 16 bits",
                         actual_format, self.raw_format, self.bits)
            self._left_aligned = True
            return
        raise DeviceError(
            DEVICE,
            f"the camera gave raw format {actual_format}, not an unpacked {self.bits}-bit "
            f"format like the {self.raw_format} asked for (nor its 16-bit form)")

    def _drop_pending_job(self, cam: Any) -> None:
        """Give back what a timed-out capture job took, and cancel queued jobs."""
        job, self._pending_job = self._pending_job, None
        if job is not None:
            try:
                # picamera2's Job has no done(): a zero wait returns the request if the job
                # has one, else raises TimeoutError (still queued: cancelled below).
                request = cam.wait(job, 0)
                request.release()
                self.stale_requests_released += 1
            except Exception as err:  # still queued, cancelled or failed: nothing is held
                log.debug("stale camera job: %s: %s", type(err).__name__, err)
        cancel = getattr(cam, "cancel_all_and_flush", None) if cam is not None else None
        if job is not None and cancel is not None:
            try:
                cancel()
            except Exception as err:
                log.warning("cancelling queued camera jobs failed: %s", err)

    def start(self) -> None:
        """Start streaming (configuring with the current settings if never configured)."""
        with self._lock:
            if self._streaming:
                return
            if not self._configured:
                self.configure(self._settings)
            if self._external_trigger is not None:
                with self._vendor("enabling the external trigger"):
                    self._external_trigger(True)
            with self._vendor("starting the camera"):
                self._cam.start()
            self._streaming = True
            self._seq = 0
            self._last_frame_mono_s = self._clock.monotonic()
            self._check_alignment = self._left_aligned_forced is None

    def stop(self) -> None:
        """Stop streaming. Stopping a stopped camera does nothing."""
        with self._lock:
            if not self._streaming:
                return
            self._streaming = False
            with self._vendor("stopping the camera"):
                self._cam.stop()
            self._drop_pending_job(self._cam)

    def restart(self) -> None:
        """Recover a stalled camera: close it, make a new one with the factory, configure
        it with the last settings and start it. One attempt; failures raise DeviceError."""
        with self._lock:
            old, self._cam = self._cam, None
            self._streaming = False
            self._configured = False
            if old is not None:
                self._drop_pending_job(old)
                self._close_camera_quietly(old)
            log.info("camera restarting")
            self.configure(self._settings)
            self.start()

    def close(self) -> None:
        """Stop and release the camera; the external trigger is switched off."""
        with self._lock:
            cam, self._cam = self._cam, None
            was_streaming, self._streaming = self._streaming, False
            self._configured = False
            errors: list[Exception] = []
            if cam is not None:
                self._drop_pending_job(cam)
                for action in (("stop",) if was_streaming else ()) + ("close",):
                    try:
                        getattr(cam, action)()
                    except Exception as err:
                        errors.append(err)
                        log.warning("camera %s on close failed: %s", action, err)
            if self._external_trigger is not None and cam is not None:
                try:
                    self._external_trigger(False)
                except Exception as err:
                    log.warning("disabling the camera's external trigger failed: %s", err)
            if errors:
                raise DeviceError(DEVICE, f"closing the camera failed: {errors[0]}") from errors[0]

    # -- capture --------------------------------------------------------------------------
    def seconds_since_last_frame(self) -> float | None:
        """Monotonic seconds since the last frame (or since start); None when stopped."""
        if not self._streaming or self._last_frame_mono_s is None:
            return None
        return self._clock.monotonic() - self._last_frame_mono_s

    def capture(self, timeout_s: float | None = None) -> Frame:
        """The next frame, as right-aligned counts with wall-clock times. Waits at most
        ``timeout_s`` (default: the stall timeout); nothing by then raises CameraStall."""
        timeout = self.stall_timeout_s if timeout_s is None else timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not math.isfinite(timeout) or not 0.0 < timeout <= 60.0:
            raise InvalidArgument(f"camera: capture timeout {timeout!r} s outside 0-60 s")
        with self._lock:
            if not self._streaming:
                raise WrongState("camera: capture refused: the camera is not streaming")
            cam = self._cam
            settings = self._settings
        try:
            request = self._next_request(cam, float(timeout))
        except TimeoutError as err:
            raise CameraStall(
                DEVICE,
                f"no frame within {timeout:g} s (stall limit {self.stall_timeout_s:g} s); "
                "restart the camera") from err
        except NirfError:
            raise
        except Exception as err:
            raise DeviceError(DEVICE, f"capture failed: {type(err).__name__}: {err}") from err
        if request is None:
            raise DeviceError(DEVICE, "capture returned no request")
        try:
            with self._vendor("reading the raw frame"):
                metadata = request.get_metadata()
                if self._mapped_array is not None:
                    # read in place; the frame's pixels are copied once, below, before release
                    with self._mapped_array(request, "raw") as mapped:
                        frame = self._build_frame(mapped.array, metadata, settings, shared=True)
                else:
                    frame = None
                    raw = request.make_array("raw")  # picamera2 copies the buffer out
        finally:
            # Hand the buffer back at once: the frame is already copied out.
            try:
                request.release()
            except Exception as err:
                log.warning("releasing a camera request failed: %s", err)
        if frame is None:
            frame = self._build_frame(raw, metadata, settings, shared=False)
        self._last_frame_mono_s = self._clock.monotonic()
        return frame

    def _next_request(self, cam: Any, timeout_s: float) -> Any:
        """One completed request within ``timeout_s``. A picamera2 capture that times out
        stays queued and takes the next request when it comes; so the job is kept and waited
        on again, never abandoned with a buffer in it."""
        if not hasattr(cam, "wait"):
            return cam.capture_request(wait=timeout_s)
        job = self._pending_job
        if job is None:
            job = cam.capture_request(wait=False)
        self._pending_job = job
        request = cam.wait(job, timeout_s)  # TimeoutError: the job stays for next time
        self._pending_job = None
        return request

    def _wall_minus_sensor_ns(self) -> int:
        """Offset from the sensor's (monotonic) clock to the wall clock: read wall,
        monotonic, wall; keep the tightest bracket of a few."""
        best_span, best_offset = None, 0
        for _ in range(_OFFSET_SAMPLES):
            w0 = self._clock.time_ns()
            m = self._sensor_clock_ns()
            w1 = self._clock.time_ns()
            span = w1 - w0
            if best_span is None or span < best_span:
                best_span, best_offset = span, (w0 + w1) // 2 - m
        return best_offset

    def _pixels(self, raw: Any, width: int, height: int) -> np.ndarray:
        """The raw buffer as a (height, width) uint16 view, whatever its padding."""
        a = np.asarray(raw)
        if a.ndim != 2:
            raise DeviceError(DEVICE, f"raw frame has {a.ndim} dimensions, expected 2")
        if a.dtype == np.uint8:
            # picamera2 hands raw out as bytes per row (stride may be padded)
            if a.shape[1] % 2:
                raise DeviceError(
                    DEVICE, f"raw row of {a.shape[1]} bytes is not whole 16-bit pixels")
            a = (a if a.flags.c_contiguous else np.ascontiguousarray(a)).view("<u2")
        elif a.dtype != np.uint16:
            raise DeviceError(DEVICE, f"raw frame of dtype {a.dtype}, expected uint8 or uint16")
        if a.shape[0] < height or a.shape[1] < width:
            raise DeviceError(DEVICE, f"raw frame {a.shape[1]}x{a.shape[0]} smaller than the "
                                      f"configured {width}x{height}")
        return a[:height, :width]

    def _right_aligned(self, px: np.ndarray, shared: bool = False) -> np.ndarray:
        """Right-aligned counts in an array of the frame's own: the one copy of the pixels
        (into the allocator's array when there is one). ``shared``: ``px`` is the camera's
        buffer itself, so a copy is needed even when nothing is to shift."""
        shift = 16 - self.bits
        if self._check_alignment:
            self._check_alignment = False
            full_scale = (1 << self.bits) - 1
            if not self._left_aligned and int(px.max(initial=0)) > full_scale:
                log.warning("camera raw values exceed %d: data are left-aligned; shifting",
                            full_scale)
                self._left_aligned = True
            elif self._left_aligned and np.any(px & ((1 << shift) - 1)):
                log.warning(
                    "camera raw data have low bits set: data are right-aligned; not shifting")
                self._left_aligned = False
        out = self.allocator(*px.shape) if self.allocator is not None else None
        if out is not None:
            self.copies_into_allocated += 1
            if self._left_aligned:
                return np.right_shift(px, px.dtype.type(shift), out=out)  # a scalar of px's type: no casting
            np.copyto(out, px)
            return out
        if self._left_aligned:
            return np.right_shift(px, shift)
        if shared:
            return np.array(px, order="C")
        return np.ascontiguousarray(px)

    def _build_frame(self, raw: Any, md: dict, settings: CameraSettings, shared: bool = False) -> Frame:
        try:
            sensor_ts_ns = int(md["SensorTimestamp"])
            exposure_us = int(md.get("ExposureTime", settings.exposure_us))
            gain = float(md.get("AnalogueGain", settings.gain))
            frame_duration_us = int(md.get("FrameDuration", 0))
        except (KeyError, TypeError, ValueError) as err:
            raise DeviceError(DEVICE, f"frame metadata unusable ({err!r}): {md!r}") from err
        t0 = time.thread_time()
        data = self._right_aligned(self._pixels(raw, settings.width, settings.height), shared)
        self.copy_cpu_s += time.thread_time() - t0
        self.frames_copied += 1
        bits, black, width, height = self.bits, self.black_level, settings.width, settings.height
        if self.colour:
            # Sum each 2x2 Bayer cell: one pixel per cell, two more bits of range.
            data = (data[0::2, 0::2] + data[0::2, 1::2]) + (data[1::2, 0::2] + data[1::2, 1::2])
            bits, black, width, height = bits + 2, black * 4, width // 2, height // 2
        t_end_ns = sensor_ts_ns + self._wall_minus_sensor_ns()
        meta = FrameMeta(
            seq=self._seq,
            t_start_ns=t_end_ns - exposure_us * 1000,
            t_end_ns=t_end_ns,
            exposure_us=exposure_us,
            gain=gain,
            width=width,
            height=height,
            bits=bits,
            black_level=black,
            sensor_timestamp_ns=sensor_ts_ns,
            frame_duration_us=frame_duration_us,
        )
        self._seq += 1
        return Frame(data=data, meta=meta)
