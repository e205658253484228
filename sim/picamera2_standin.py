"""A stand-in for picamera2's ``Picamera2`` class, rendering frames from the world.

It offers the part of picamera2's surface the camera driver uses, under the same names
and with the same behaviour where it matters:

* ``create_video_configuration`` / ``create_still_configuration`` (``raw={"format",
  "size"}``, ``controls``, ``buffer_count``), ``configure`` (refused while started),
  ``camera_configuration``, ``sensor_modes``, ``camera_controls``, ``camera_properties``;
* ``set_controls`` with ``ExposureTime`` (us), ``AnalogueGain``, ``AeEnable``, ...;
* ``start``, ``stop``, ``close``;
* ``capture_request(wait=...)`` (``wait`` a number of seconds bounds the wait and raises
  ``TimeoutError``; ``wait=False`` returns a job for ``Picamera2.wait(job, timeout)``),
  ``captured_request`` (context manager that releases), ``cancel_all_and_flush``;
* requests with ``make_array("raw")``, ``get_metadata()`` and ``release()``. Like
  picamera2's ``CompletedRequest`` they are *not* context managers, and releasing one twice
  raises ``RuntimeError`` (a negative reference count upstream).

Where picamera2 is stricter or different from what a driver might assume, the stand-in does
as picamera2 does (docs/conformance.md lists each behaviour with its upstream reference):

* Only one completed request is kept (two or more buffers, ``queue`` True; none with one
  buffer): when a newer frame completes, the older one not yet collected is released, so a
  slow reader loses frames rather than reading stale ones from a queue.
* A capture is a *job* in a queue. A ``capture_request`` that timed out stays queued: the next
  frame completes it, and the request it took is held by nobody (a lost buffer) unless the
  caller waits on the same job again or calls ``cancel_all_and_flush``. Jobs survive
  ``stop``.
* Controls are clamped to their limits, not refused; ``ExposureTime`` is also clipped to the
  frame duration that ``FrameDurationLimits`` allows (picamera2's video configuration
  defaults it to 33,333 us). Unknown controls raise ``RuntimeError``.
* In external-trigger mode (every frame here is triggered by the MCU) the sensor exposes for
  the trigger's low pulse plus 14.26 us, whatever ``ExposureTime`` says; the metadata still
  report the (clipped) control value.
* ``camera_platform`` ``"pi5"`` (PiSP): an unpacked raw request (``R10``, ``SRGGB10``) is
  changed to its 16-bit form (``R16``, ``SRGGB16``) with the 10-bit values left-aligned; a
  packed one becomes the compressed ``PISP_COMP1`` format. ``"pi4"`` (VC4) keeps ``R10``.
* Frames whose exposure the MCU marks as failed (``drop_counters``) never reach the
  application, as picamera2 drops requests whose status is not Success.

Like the IMX296 in external-trigger mode, the stand-in exposes a frame only when the MCU
triggers one: a background thread takes each :class:`~sim.world.Trigger` from the world
view, waits (on the clock) until the exposure window ``[t_start, t_start + ExposureTime]``
has passed plus a small margin (so laser changes reported late by the hardware process are
in), and renders the frame from the laser output averaged over exactly that window. A
laser toggle mistimed against the exposure therefore gives a partly lit frame. (With the
built-in renderer the frame is rendered as the exposure starts, from the light in force
then, and that render is kept only if the light and the scene are still the same once the
exposure is over, so the frame is ready when its exposure ends, as a sensor's is.)

Raw data arrive the way picamera2 hands them out for unpacked raw formats: a ``uint8``
array of shape ``(height, stride_bytes)``, little-endian 16-bit pixels, rows padded to an
aligned stride. On a Pi 4 (platform ``VC4``) the pixel values are right-aligned (0..1023 for
10 bits); on a Pi 5 (platform ``PISP``) the format reads back as 16-bit and the values are
shifted left to fill 16 bits (full scale 65472).

Metadata: ``ExposureTime`` (us), ``AnalogueGain``, ``DigitalGain``, ``FrameDuration`` (us:
the time since the previous trigger, i.e. the trigger period), ``SensorBlackLevels`` (in
16-bit units, as libcamera reports them) and ``SensorTimestamp``: the end of the exposure
(start of read-out) in ns on the *monotonic* clock (``clock.monotonic()`` in ns; on a Pi
libcamera uses ``CLOCK_MONOTONIC``, the clock of ``time.monotonic_ns``), not the wall clock.

The injected fault ``camera_stall`` makes the stand-in swallow triggers, as picamera2 can
stop delivering frames in dark scenes; once stalled it stays stalled until the next
``start`` (a restart), even if the fault is lifted.

Requests must be released; requests held by the application (or by a stale job) take
buffers away from the camera, and with none free the sensor has nowhere to put a frame.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import re
import threading
from collections import deque
from concurrent.futures import CancelledError
from typing import Any, Callable

import numpy as np

from nirf.hal.clock import Clock, SystemClock
from nirf.sim.threads import name_os_thread

log = logging.getLogger(__name__)

# Margin after the end of an exposure before the laser history is read: laser events from
# the hardware process reach this process a little late.
DEFAULT_SETTLE_MARGIN_S = 0.003
# Longest single wait slice: keeps stop() responsive and lets clock-driven waits notice
# frames that arrive meanwhile.
_POLL_S = 0.01
_WAIT_BACKSTOP_S = 1.0  # an unbounded wait looks at the camera's state at least this often
# How long the background thread blocks for the next trigger before checking for stop
# (real time: triggers arrive from another thread or process).
_TRIGGER_POLL_S = 0.05
DEFAULT_BUFFER_COUNT = 4
DEFAULT_FRAME_DURATION_US = 33_333  # reported for the first frame, before a period is known
# picamera2's create_video_configuration fixes the frame duration at 30 fps unless the
# application sets FrameDurationLimits itself (picamera2.py, create_video_configuration).
VIDEO_FRAME_DURATION_LIMITS_US = (33_333, 33_333)
# In external-trigger mode the IMX296 exposes for the trigger's low pulse plus this much
# (Raspberry Pi documentation, "External Trigger on the GS Camera").
TRIGGER_EXPOSURE_EXTRA_US = 14.26
PLATFORMS = ("pi4", "pi5")
# A real sensor hands over each frame as its readout ends; this one renders it in Python and
# may fall behind on a loaded machine. A frame completed more than this long after its
# exposure ended (past the settle margin) counts as late, and the log says so (at most once
# per LATE_WARNING_EVERY_S of the world's clock), so that a latency figure measured meanwhile
# is known to hold the simulator's own delay. A stream's first second is not judged: the first
# render builds the renderer's caches (about 170 ms late at 1456x1088 on a slow machine), and
# the frames queued behind it come late too until the sensor thread has caught up.
LATE_FRAME_S = 0.1
LATE_UNJUDGED_S = 1.0
LATE_WARNING_EVERY_S = 10.0
# (bench/soak.py reads "<n> late so far, the latest <ms> ms" back from the cart's log)
LATE_WARNING = ("simulated sensor late: frame %s completed %.0f ms after its exposure ended "
                "(%d late so far, the latest %.0f ms); the simulator's render fell behind, "
                "which a real sensor does not: latency measured now includes this delay")

# The sensor thread's name in /proc/<pid>/task/<tid>/comm (at most 15 bytes): the benchmark
# reads that thread's CPU time to tell the simulator's rendering from the driver's work.
OS_THREAD_NAME = "nirf-sim-camera"

_UNPACKED_RE = re.compile(r"^(R|S[RGB]{4})(8|10|12|14|16)$")
_ANY_RAW_RE = re.compile(r"^(S?)([RGB]+?)(\d+)(?:_(.+))?$")


class Platform(enum.Enum):
    """The Pi's camera pipeline, named as picamera2 names it (``Picamera2.platform``)."""

    VC4 = 0  # Pi 4 and earlier: unpacked raw is right-aligned
    PISP = 1  # Pi 5: unpacked raw is delivered as 16 bits, left-aligned


class StandInRequest:
    """A completed request: one frame's raw buffer and metadata. Release it exactly once
    when done (a second release raises, as picamera2's reference count does)."""

    def __init__(self, owner: "Picamera2StandIn", raw: np.ndarray, metadata: dict, config: dict):
        self._owner = owner
        self._raw = raw
        self._metadata = metadata
        self.config = config
        self._released = False
        self._lock = threading.Lock()

    def _buffer(self, name: str) -> np.ndarray:
        """The named stream's buffer itself (only ``"raw"`` exists here). Call with the lock."""
        if self._released:
            raise RuntimeError("request already released")
        if name != "raw":
            raise RuntimeError(f"Stream {name!r} is not defined")
        fmt = str(self.config.get("raw", {}).get("format", ""))
        if "_" in fmt:
            raise RuntimeError(f"the camera stand-in delivers unpacked raw only, not {fmt}")
        return self._raw

    def make_array(self, name: str) -> np.ndarray:
        """A copy of the named stream's buffer (only ``"raw"`` exists here)."""
        with self._lock:
            return self._buffer(name).copy()

    def get_metadata(self) -> dict:
        """The frame's metadata (a copy)."""
        return dict(self._metadata)

    def release(self) -> None:
        """Give the buffer back to the camera. A second release raises RuntimeError."""
        with self._lock:
            if self._released:
                raise RuntimeError("CompletedRequest: lock now has negative ref_count")
            self._released = True
            raw, self._raw = self._raw, None  # type: ignore[assignment]
        self._owner._request_released(self, raw)

    @property
    def released(self) -> bool:
        """True once the request has been given back."""
        return self._released


class MappedArray:
    """picamera2's ``MappedArray`` for the stand-in's requests: ``with MappedArray(request,
    "raw") as m`` gives the raw buffer itself as a (height, stride) uint8 array, no copy
    (``reshape=False``: the flat buffer; ``write=False``: a read-only view). As upstream, the
    array is the camera's: once the request is released the buffer goes back to the camera
    and a later frame is written into it."""

    def __init__(self, request: StandInRequest, stream: str, reshape: bool = True, write: bool = True):
        self._request, self._stream = request, stream
        self._reshape, self._write = bool(reshape), bool(write)
        self._array: np.ndarray | None = None

    def __enter__(self) -> "MappedArray":
        with self._request._lock:
            raw = self._request._buffer(self._stream)
        a = raw if self._reshape else raw.reshape(-1)
        if not self._write:
            a = a.view()
            a.flags.writeable = False
        self._array = a
        return self

    def __exit__(self, *exc) -> None:
        self._array = None

    @property
    def array(self) -> np.ndarray | None:
        return self._array


class StandInJob:
    """A queued capture: what ``capture_request(wait=False)`` returns. It completes with the
    first request that arrives while it is at the head of the camera's job queue."""

    def __init__(self, owner: "Picamera2StandIn", flush_ns: int | None,
                 signal_function: Callable | None = None):
        self._owner = owner
        self.flush_ns = flush_ns
        self._signal_function = signal_function
        self._done = threading.Event()
        self._result: StandInRequest | None = None
        self._error: BaseException | None = None

    def _is_done(self) -> bool:
        # Private: picamera2's Job offers no such method, so drivers must not use one.
        return self._done.is_set()

    def _finish(self, result: StandInRequest | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()

    def _signal(self) -> None:
        """Call the job's ``signal_function`` with the job, once it has its request (as
        picamera2's ``Job.signal`` does; not for a cancelled or failed job). Called without
        the camera's lock held, so the function may call back into the camera."""
        if self._signal_function is not None and self._error is None:
            self._signal_function(self)

    def get_result(self, timeout: float | None = None) -> StandInRequest:
        """Wait for the request; ``TimeoutError`` after ``timeout`` seconds (the job stays
        queued, as in picamera2)."""
        return self._owner._wait_job(self, timeout)


def _same_mw(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def _raw_format_parts(fmt: str) -> tuple[str, int, str | None]:
    """``"SRGGB10_CSI2P"`` -> ("RGGB", 10, "CSI2P"); ``"R10"`` -> ("R", 10, None)."""
    m = _ANY_RAW_RE.match(fmt)
    if not m:
        raise RuntimeError(f"Unrecognised raw format {fmt}")
    return m.group(2), int(m.group(3)), m.group(4)


def _format_name(order: str, bits: int, packing: str | None = None) -> str:
    """("RGGB", 16) -> "SRGGB16"; ("R", 16, "PISP_COMP1") -> "R16_PISP_COMP1"."""
    base = f"{'R' if order == 'R' else 'S' + order}{bits}"
    return f"{base}_{packing}" if packing else base


class Picamera2StandIn:
    """picamera2's ``Picamera2`` for the simulated cart (see the module docstring).

    ``world_view`` is a :class:`nirf.sim.worldview.WorldView`; ``renderer`` an object with
    ``render(scene, laser_mw, exposure_us, gain) -> uint16 (height, width)`` right-aligned
    counts (default: :class:`nirf.sim.render.FrameRenderer` on the view's sensor, created at the
    first ``start``); ``clock`` the clock waits are measured on (default the system clock);
    ``platform`` ``"pi4"`` or ``"pi5"`` fixes the Pi it imitates (None: the world's
    ``camera_platform`` at each ``configure``, see ``sim.set``); ``left_aligned`` True is the
    older spelling of ``platform="pi5"``; ``mono`` False makes it a colour sensor (Bayer raw
    formats); ``drop_counters`` are MCU frame counters whose exposures fail (no request).
    """

    def __init__(
        self,
        world_view: Any,
        *,
        renderer: Any = None,
        clock: Clock | None = None,
        left_aligned: bool = False,
        platform: str | None = None,
        seed: int = 0,
        mono: bool = True,
        settle_margin_s: float = DEFAULT_SETTLE_MARGIN_S,
        stride_align_bytes: int = 64,
        drop_counters: Any = (),
    ):
        if platform is not None and platform not in PLATFORMS:
            raise ValueError(f"camera stand-in platform {platform!r}: allowed {', '.join(PLATFORMS)}")
        self.world_view = world_view
        self.sensor = world_view.sensor
        self._renderer = renderer
        # The built-in renderer clips to the sensor's full scale itself; an injected one
        # may not, so only its frames pay for a clip when packed.
        self._renderer_clips = renderer is None
        self._seed = int(seed)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._fixed_platform = "pi5" if left_aligned else platform
        self.platform: Platform | None = Platform.VC4
        self.left_aligned = False
        self._set_platform(self._fixed_platform or self._world_platform())
        self.mono = bool(mono)
        self.settle_margin_s = float(settle_margin_s)
        self.stride_align_bytes = int(stride_align_bytes)
        self.drop_counters = set(int(c) for c in drop_counters)
        self._native_format = f"{'R' if mono else 'SRGGB'}{self.sensor.bits}"

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._config: dict | None = None
        self._controls: dict[str, Any] = {
            "ExposureTime": 10_000,
            "AnalogueGain": 1.0,
            "AeEnable": False,
            "FrameDurationLimits": VIDEO_FRAME_DURATION_LIMITS_US,
        }
        self._completed: deque[StandInRequest] = deque()
        self._jobs: deque[StandInJob] = deque()
        self._held: set[int] = set()  # ids of requests handed out and not yet released
        self._pool: list[np.ndarray] = []  # raw buffers of released or dropped requests
        self._max_queue_len = 1
        self._started = False
        self._closed = False
        self._stalled = False
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream_start_wall_ns = 0
        self._last_trigger_ns: int | None = None
        self._first_trigger_ns = 0  # the stream's first trigger (wall clock)
        # counters, for tests and diagnostics
        self.frames_completed = 0
        self.frames_dropped = 0
        self.frames_failed = 0
        self.triggers_swallowed = 0
        self.frames_rendered_early = 0  # rendered as the exposure started, and kept
        self.frames_rendered_again = 0  # the light or scene changed meanwhile: rendered again
        self.buffers_reused = 0  # frames written into the buffer of an earlier, released request
        self.last_exposure_us: float | None = None  # what the sensor really integrated
        self.frames_late = 0  # completed more than LATE_FRAME_S after the exposure ended
        self.max_late_s = 0.0  # the latest of those
        self._late_warned_ns: int | None = None

    # -- description ----------------------------------------------------------------------
    def _world_platform(self) -> str:
        try:
            value = getattr(self.world_view.scene(), "camera_platform", "pi4")
        except Exception:  # a view without a scene yet: the Pi 4 default
            value = "pi4"
        return value if value in PLATFORMS else "pi4"

    def _set_platform(self, name: str) -> None:
        self.left_aligned = name == "pi5"
        self.platform = Platform.PISP if self.left_aligned else Platform.VC4

    @property
    def camera_properties(self) -> dict:
        """Static properties of the (simulated) sensor."""
        return {
            "Model": "imx296",
            "PixelArraySize": (self.sensor.width, self.sensor.height),
            "UnitCellSize": (3450, 3450),
        }

    @property
    def sensor_modes(self) -> list[dict]:
        """The single full-frame mode of the IMX296."""
        return [{
            "format": f"{self._native_format}_CSI2P",
            "unpacked": self._native_format,
            "bit_depth": self.sensor.bits,
            "size": (self.sensor.width, self.sensor.height),
            "fps": 60.38,
            "crop_limits": (0, 0, self.sensor.width, self.sensor.height),
            "exposure_limits": (29, 15_534_385, None),
        }]

    @property
    def camera_controls(self) -> dict[str, tuple]:
        """Controls the stand-in accepts, as (min, max, default)."""
        return {
            "ExposureTime": (29, 15_534_385, 10_000),
            "AnalogueGain": (1.0, 16.0, 1.0),
            "AeEnable": (False, True, False),
            "FrameDurationLimits": (16_562, 15_534_385, DEFAULT_FRAME_DURATION_US),
            "ColourGains": (0.0, 32.0, None),
            "AwbEnable": (False, True, False),
            "NoiseReductionMode": (0, 4, 0),
        }

    # -- configuration --------------------------------------------------------------------
    def _create_configuration(self, kind: str, main: dict | None, raw: dict | None,
                              controls: dict | None, buffer_count: int, queue: bool = True,
                              default_controls: dict | None = None, **extra) -> dict:
        self._check_open()
        raw = dict(raw) if raw else {}
        raw.setdefault("format", self._native_format)
        raw.setdefault("size", (self.sensor.width, self.sensor.height))
        # As picamera2 does: the use case's defaults first, the caller's controls win.
        merged = dict(default_controls or {})
        merged.update(dict(controls) if controls else {})
        return {
            "use_case": kind,
            "main": dict(main) if main else {"format": "XBGR8888", "size": (640, 480)},
            "raw": raw,
            "controls": merged,
            "buffer_count": int(buffer_count),
            "queue": bool(queue),
            **extra,
        }

    def create_video_configuration(self, main: dict | None = None, lores: dict | None = None,
                                   raw: dict | None = None, controls: dict | None = None,
                                   buffer_count: int = 6, queue: bool = True, **extra) -> dict:
        """A configuration for streaming (several buffers); the frame duration defaults to
        33,333 us (30 fps) unless ``controls`` set ``FrameDurationLimits``."""
        return self._create_configuration(
            "video", main, raw, controls, buffer_count, queue,
            {"NoiseReductionMode": 1, "FrameDurationLimits": VIDEO_FRAME_DURATION_LIMITS_US},
            **extra)

    def create_still_configuration(self, main: dict | None = None, lores: dict | None = None,
                                   raw: dict | None = None, controls: dict | None = None,
                                   buffer_count: int = 1, queue: bool = True, **extra) -> dict:
        """A configuration for stills (by default one buffer)."""
        return self._create_configuration(
            "still", main, raw, controls, buffer_count, queue,
            {"FrameDurationLimits": (100, 1_000_000_000)}, **extra)

    def configure(self, camera_config: dict | None = None) -> None:
        """Apply a configuration. Like libcamera, the raw stream gets the sensor's own mode
        size. On a Pi 4 the format keeps its packing; on a Pi 5 an unpacked request becomes
        16-bit unpacked and a packed one the lossy compressed format."""
        with self._lock:
            self._check_open()
            if self._started:
                raise RuntimeError("Camera must be stopped before configuring")
        if self._fixed_platform is None:
            self._set_platform(self._world_platform())
        if camera_config is None:
            camera_config = self.create_video_configuration()
        if not isinstance(camera_config, dict) or "raw" not in camera_config:
            raise RuntimeError(f"Invalid camera configuration: {camera_config!r}")
        config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in camera_config.items()}
        raw = config["raw"] or {}
        fmt = str(raw.get("format", self._native_format))
        _order, _bits, packing = _raw_format_parts(fmt)
        native_order, _ = _raw_format_parts(self._native_format)[:2]
        if self.platform is Platform.PISP:
            # pisp.cpp platformValidate: the front end writes 16-bit unpacked or PISP_COMP1.
            actual = _format_name(native_order, 16, "PISP_COMP1" if packing else None)
        elif packing is None:
            actual = self._native_format
        else:
            actual = f"{self._native_format}_{packing}"
        raw["format"] = actual
        raw["size"] = (self.sensor.width, self.sensor.height)
        raw["stride"] = self._stride_bytes()
        config["raw"] = raw
        count = int(config.get("buffer_count", DEFAULT_BUFFER_COUNT))
        if count < 1:
            raise RuntimeError(f"buffer_count {count} must be at least 1")
        controls = config.get("controls") or {}
        with self._lock:
            self._config = config
            # picamera2 keeps the newest completed request only with queue and 2+ buffers.
            self._max_queue_len = 1 if config.get("queue", True) and count > 1 else 0
        if controls:
            self.set_controls(controls)

    def camera_configuration(self) -> dict | None:
        """The configuration in force (after ``configure`` adjusted it)."""
        with self._lock:
            if self._config is None:
                return None
            return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._config.items()}

    def _stride_bytes(self) -> int:
        row = self.sensor.width * 2
        a = max(1, self.stride_align_bytes)
        return (row + a - 1) // a * a

    @staticmethod
    def _number(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RuntimeError(f"control {name}: {value!r} is not a number")
        return float(value)

    def set_controls(self, controls: dict) -> None:
        """Set controls; they apply to frames exposed from now on. Numbers outside a
        control's limits are clamped to them (libcamera does not refuse them)."""
        limits = self.camera_controls
        checked: dict[str, Any] = {}
        for name, value in dict(controls).items():
            if name not in limits:
                raise RuntimeError(f"Control {name} is not advertised by libcamera")
            lo, hi, _ = limits[name]
            if name == "ExposureTime":
                value = int(min(max(self._number(name, value), lo), hi))
            elif name == "AnalogueGain":
                value = min(max(self._number(name, value), lo), hi)
            elif name == "FrameDurationLimits":
                try:
                    fmin, fmax = (self._number(name, v) for v in value)
                except (TypeError, ValueError) as err:
                    raise RuntimeError(f"control {name}: {value!r} is not a (min, max) pair") from err
                fmin = int(min(max(fmin, lo), hi))
                fmax = int(min(max(fmax, fmin), hi))
                value = (fmin, fmax)
            checked[name] = value
        with self._lock:
            self._check_open()
            self._controls.update(checked)

    def effective_exposure_time_us(self) -> int:
        """``ExposureTime`` as the sensor would apply it when free-running: clipped to the
        longest frame ``FrameDurationLimits`` allows."""
        with self._lock:
            return self._effective_exposure_locked()

    def _effective_exposure_locked(self) -> int:
        _fmin, fmax = self._controls["FrameDurationLimits"]
        return int(min(self._controls["ExposureTime"], fmax))

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, config: dict | None = None, show_preview: bool = False) -> None:
        """Start streaming: triggers from now on expose frames."""
        if config is not None:
            self.configure(config)
        with self._lock:
            self._check_open()
            if self._config is None:
                raise RuntimeError("Camera has not been configured")
            if self._started:
                return
        if self._renderer is None:
            # Imported here: the renderer is only needed once frames are made.
            from nirf.sim.render import FrameRenderer

            self._renderer = FrameRenderer(self.sensor, seed=self._seed)
        with self._lock:
            self._started = True
            self._stalled = False
            self._last_trigger_ns = None
            self._stream_start_wall_ns = self.world_view.now_ns()
            self._stop_event.clear()
            self._thread = threading.Thread(target=self._run, name="picamera2-standin",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop streaming; the completed request not collected is released. Queued jobs
        stay queued (picamera2's stop does not cancel them)."""
        with self._lock:
            thread = self._thread
            self._thread = None
            self._started = False
            self._stop_event.set()
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            # The thread notices the stop within one poll slice or one wait slice.
            thread.join(timeout=2.0)
            if thread.is_alive():
                log.warning("camera stand-in thread did not stop within 2 s")
        with self._lock:
            self._completed.clear()

    def close(self) -> None:
        """Stop and close the camera; it cannot be used afterwards."""
        if self._closed:
            return
        self.stop()
        with self._lock:
            self._closed = True
            for job in self._jobs:
                job._finish(None, RuntimeError("Camera is closed"))
            self._jobs.clear()
            self._cond.notify_all()

    def cancel_all_and_flush(self) -> None:
        """Cancel every queued job (their results raise ``CancelledError``) and release
        the completed request kept, as picamera2's method of that name does."""
        with self._lock:
            for job in self._jobs:
                job._finish(None, CancelledError())
            self._jobs.clear()
            self._completed.clear()
            self._cond.notify_all()

    @property
    def started(self) -> bool:
        """True while streaming."""
        return self._started

    @property
    def is_open(self) -> bool:
        """False once closed."""
        return not self._closed

    @property
    def outstanding_requests(self) -> int:
        """Requests handed out (to the application or to a stale job) and not released."""
        with self._lock:
            return len(self._held)

    @property
    def queued_jobs(self) -> int:
        """Capture jobs waiting for a request."""
        with self._lock:
            return len(self._jobs)

    def sensor_clock_ns(self) -> int:
        """The clock ``SensorTimestamp`` is on (monotonic, ns)."""
        return int(round(self._clock.monotonic() * 1e9))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Camera is closed")

    # -- capture --------------------------------------------------------------------------
    def capture_request(self, wait: Any = None, signal_function: Callable | None = None,
                        flush: Any = None):
        """Queue a capture job and (unless ``wait`` is False) wait for its request.
        ``wait``: None blocks, unless a ``signal_function`` is given (then, as in picamera2,
        the job is returned at once and ``signal_function(job)`` is called when its request
        has come, from the camera's thread); True blocks; a number of seconds bounds the
        wait (``TimeoutError``, the job stays queued); False returns the job. ``flush`` True
        (or a monotonic time in ns) skips frames exposed before then."""
        if wait is None:
            wait = signal_function is None
        if flush is True:
            flush = self.sensor_clock_ns()
        job = StandInJob(self, int(flush) if flush else None, signal_function)
        with self._cond:
            self._check_open()
            self._jobs.append(job)
            finished = self._run_jobs_locked() if len(self._jobs) == 1 else []
        for done in finished:
            done._signal()
        if wait is False:
            return job
        timeout = None if wait is True else float(wait)
        return self._wait_job(job, timeout)

    def wait(self, job: StandInJob, timeout: float | None = None) -> StandInRequest:
        """Wait for a job from ``capture_request(wait=False)``."""
        return job.get_result(timeout=timeout)

    @contextlib.contextmanager
    def captured_request(self, wait: Any = None, flush: Any = None):
        """``capture_request`` as a context manager that releases the request."""
        request = self.capture_request(wait=wait, flush=flush)
        try:
            yield request
        finally:
            request.release()

    def _run_jobs_locked(self) -> list[StandInJob]:
        """Give completed requests to queued jobs, oldest job first (caller holds the lock);
        the jobs finished, for the caller to signal once it has let go of the lock."""
        finished: list[StandInJob] = []
        while self._jobs and self._completed:
            job = self._jobs[0]
            if job.flush_ns is not None:
                while self._completed:
                    md = self._completed[0]._metadata
                    if md["SensorTimestamp"] - 1000 * md["ExposureTime"] >= job.flush_ns:
                        break
                    self._completed.popleft()
                    self.frames_dropped += 1
                if not self._completed:
                    break
            request = self._completed.popleft()
            self._held.add(id(request))
            self._jobs.popleft()
            job._finish(request)
            finished.append(job)
        self._cond.notify_all()
        return finished

    def _wait_job(self, job: StandInJob, timeout_s: float | None) -> StandInRequest:
        """Wait for ``job`` at most ``timeout_s`` on the clock. On timeout the job is left in
        the queue, as picamera2 leaves it."""
        deadline = None if timeout_s is None else self._clock.monotonic() + max(0.0, timeout_s)
        # On the machine's clock the condition's own timeout is the deadline: one wake-up per
        # frame, as picamera2's wait on its job. Another clock (a manual one in tests) is
        # waited on in short slices, so a time it is advanced to is seen.
        slice_s = None if isinstance(self._clock, SystemClock) else _POLL_S
        with self._cond:
            while True:
                if job._is_done():
                    if job._error is not None:
                        raise job._error
                    return job._result  # type: ignore[return-value]
                if self._closed:
                    raise RuntimeError("Camera is closed")
                if deadline is None:
                    self._cond.wait(slice_s or _WAIT_BACKSTOP_S)
                    continue
                remaining = deadline - self._clock.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no completed request within {timeout_s} s")
                step = remaining if slice_s is None else min(remaining, slice_s)
                before = self._clock.monotonic()
                self._cond.wait(step)
                if not job._is_done() and self._clock.monotonic() == before:
                    # A clock that does not run by itself (a manual clock in tests): spend
                    # the slice on it, so the timeout still ends.
                    self._clock.sleep(step)

    def _request_released(self, request: StandInRequest, raw: np.ndarray | None = None) -> None:
        with self._lock:
            self._held.discard(id(request))
            if raw is not None:
                self._recycle_locked(raw)

    def _recycle_locked(self, raw: np.ndarray) -> None:
        """A raw buffer back to the camera's pool (as libcamera requeues a released
        request's buffer): later frames are written into it."""
        if len(self._pool) < self._buffer_count() + 2:
            self._pool.append(raw)

    def _take_buffer(self, h: int, stride_px: int, w: int) -> np.ndarray:
        """A (h, stride_px) uint16 buffer whose row padding is zero: a recycled one when
        there is one of this size (no new pages to fault in), else a new one."""
        with self._lock:
            while self._pool:
                raw = self._pool.pop()
                if raw.shape == (h, stride_px * 2):
                    self.buffers_reused += 1
                    return raw.view("<u2")
        buf = np.empty((h, stride_px), dtype="<u2")
        buf[:, w:] = 0
        return buf

    # -- the sensor -----------------------------------------------------------------------
    def _run(self) -> None:
        name_os_thread(OS_THREAD_NAME)
        while not self._stop_event.is_set():
            trigger = self.world_view.wait_trigger(_TRIGGER_POLL_S)
            if trigger is None:
                continue
            try:
                self._expose(trigger)
            except Exception:  # one bad frame must not kill the sensor thread
                log.exception("camera stand-in failed to produce frame %s", trigger.counter)

    def _expose(self, trigger: Any) -> None:
        if trigger.t_start_ns < self._stream_start_wall_ns:
            # Triggered before this stream started: the sensor was not listening.
            log.debug("camera stand-in: trigger %s predates the stream; ignored", trigger.counter)
            return
        with self._lock:
            reported_us = self._effective_exposure_locked()
            gain = float(self._controls["AnalogueGain"])
            config = self._config
        pulse_us = int(getattr(trigger, "pulse_us", 0) or 0)
        # External trigger: the pulse sets the exposure; without a known pulse (a test
        # triggering by hand) the control value stands in for it.
        exposure_us = pulse_us + TRIGGER_EXPOSURE_EXTRA_US if pulse_us > 0 else float(reported_us)
        t_end_ns = trigger.t_start_ns + int(round(exposure_us * 1000))
        # The renderer works in whole microseconds (14.26 us rounds to 14: 0.3 ppm of 50 ms).
        render_us = int(round(exposure_us)) if pulse_us > 0 else reported_us
        early = self._render_early(trigger.t_start_ns, t_end_ns, render_us, gain)
        if not self._wait_until_world(t_end_ns + int(self.settle_margin_s * 1e9)):
            return  # stopped meanwhile
        scene = self.world_view.scene()
        if scene.camera_stall or self._stalled:
            self._stalled = True
            self.triggers_swallowed += 1
            return
        if trigger.counter in self.drop_counters:
            # The frame's buffer came back with an error status: picamera2 drops it.
            self.frames_failed += 1
            return
        laser_mw = float(self.world_view.laser_mean_mw(trigger.t_start_ns, t_end_ns))
        if early is not None and early[0] == scene.version and _same_mw(early[1], laser_mw):
            raw = early[2]
            self.frames_rendered_early += 1
        else:
            if early is not None:
                self.frames_rendered_again += 1
                with self._lock:
                    self._recycle_locked(early[2])
            raw = self._render_packed(scene, laser_mw, render_us, gain)
        self.last_exposure_us = exposure_us
        # The sensor clock is the monotonic clock; the world's times are wall clock.
        wall_minus_mono_ns = self.world_view.now_ns() - self.sensor_clock_ns()
        first_of_stream = self._last_trigger_ns is None
        if first_of_stream:
            self._first_trigger_ns = trigger.t_start_ns
            frame_duration_us = DEFAULT_FRAME_DURATION_US
        else:
            frame_duration_us = max(1, (trigger.t_start_ns - self._last_trigger_ns) // 1000)
        self._last_trigger_ns = trigger.t_start_ns
        black16 = self.sensor.black_level << (16 - self.sensor.bits)
        metadata = {
            # What the control says (clipped), not what the trigger pulse made of it.
            "ExposureTime": reported_us,
            "AnalogueGain": gain,
            "DigitalGain": 1.0,
            "AeLocked": False,
            "SensorTimestamp": t_end_ns - wall_minus_mono_ns,
            "FrameDuration": int(frame_duration_us),
            "SensorBlackLevels": (black16,) * 4,
            "Lux": 0.0,
        }
        if trigger.t_start_ns - self._first_trigger_ns >= LATE_UNJUDGED_S * 1e9:
            self._note_lateness(trigger.counter, t_end_ns)
        request = StandInRequest(self, raw, metadata, config or {})
        with self._cond:
            if not self._started:
                return
            if self._buffer_count() - len(self._held) - len(self._completed) <= 0:
                # Every buffer is held (by the application or a stale job): libcamera has
                # no request to fill, so this frame has nowhere to go.
                self.frames_dropped += 1
                return
            self._completed.append(request)
            self.frames_completed += 1
            finished = self._run_jobs_locked()
            while len(self._completed) > self._max_queue_len:
                # Only the newest completed request is kept; older ones go back at once.
                old = self._completed.popleft()
                self.frames_dropped += 1
                if old._raw is not None:
                    self._recycle_locked(old._raw)
                    old._raw = None  # never handed out: nobody can read it any more
            self._cond.notify_all()
        for done in finished:
            done._signal()

    def _note_lateness(self, counter: int, t_end_ns: int) -> None:
        """Count (and now and then log) a frame this simulator completed late."""
        now_ns = self.world_view.now_ns()
        late_s = (now_ns - t_end_ns) / 1e9 - self.settle_margin_s
        if late_s <= LATE_FRAME_S:
            return
        self.frames_late += 1
        self.max_late_s = max(self.max_late_s, late_s)
        if self._late_warned_ns is None or now_ns - self._late_warned_ns >= LATE_WARNING_EVERY_S * 1e9:
            self._late_warned_ns = now_ns
            log.warning(LATE_WARNING, counter, late_s * 1e3, self.frames_late, self.max_late_s * 1e3)

    def _buffer_count(self) -> int:
        config = self._config or {}
        return max(1, int(config.get("buffer_count", DEFAULT_BUFFER_COUNT)))

    def _wait_until_world(self, t_wall_ns: int) -> bool:
        """Sleep on the clock until the world's clock reaches ``t_wall_ns``. False if
        stopped meanwhile. Bounded: the world clock may not follow our clock (another
        process's manual clock), so give up waiting after the expected time has been slept
        a few times over."""
        remaining_ns = t_wall_ns - self.world_view.now_ns()
        budget_s = max(0.0, remaining_ns / 1e9) * 3 + 0.1
        slept_s = 0.0
        while remaining_ns > 0:
            if self._stop_event.is_set():
                return False
            if slept_s >= budget_s:
                log.warning("camera stand-in: world clock did not reach the end of exposure")
                break
            step = min(remaining_ns / 1e9, 0.05)
            self._clock.sleep(step)
            slept_s += step
            remaining_ns = t_wall_ns - self.world_view.now_ns()
        return not self._stop_event.is_set()

    def _render_early(self, t_start_ns: int, t_end_ns: int, render_us: int,
                      gain: float) -> tuple[int, float, np.ndarray] | None:
        """The frame rendered as the exposure starts, from the light it will have seen if
        nothing changes before it ends: ``(scene version, laser mW, raw buffer)``, kept only
        if both are still the same once the exposure is over (else the frame is rendered
        again from what really happened). The frame is then ready when its exposure ends,
        as a sensor's would be, instead of a render's time later. Only with the built-in
        renderer, and not while the scene moves (each render moves it one step)."""
        if not self._renderer_clips:
            return None
        scene = self.world_view.scene()
        if scene.camera_stall or self._stalled or getattr(scene, "motion_px", 0.0):
            return None
        laser_mw = float(self.world_view.laser_mean_mw(t_start_ns, t_end_ns))
        return scene.version, laser_mw, self._render_packed(scene, laser_mw, render_us, gain)

    def _render_packed(self, scene: Any, laser_mw: float, render_us: int, gain: float) -> np.ndarray:
        """A frame rendered into the uint8 (height, stride) buffer picamera2 hands out: in
        place with the built-in renderer, else rendered and then packed."""
        if not self._renderer_clips:
            return self._pack(np.asarray(self._renderer.render(scene, laser_mw, render_us, gain)))
        h, w = self.sensor.height, self.sensor.width
        buf = self._take_buffer(h, self._stride_bytes() // 2, w)
        view = buf[:, :w]
        self._renderer.render(scene, laser_mw, render_us, gain, out=view)
        if self.left_aligned:
            np.left_shift(view, 16 - self.sensor.bits, out=view)
        return buf.view(np.uint8)

    def _pack(self, counts: np.ndarray) -> np.ndarray:
        """Right-aligned counts -> the uint8 (height, stride) buffer picamera2 hands out."""
        h, w = self.sensor.height, self.sensor.width
        if counts.shape != (h, w):
            raise ValueError(f"renderer gave a {counts.shape} frame, sensor is {(h, w)}")
        full_scale = (1 << self.sensor.bits) - 1
        stride_px = self._stride_bytes() // 2
        # Only the row padding needs zeros: the pixels are all written below (np.zeros of
        # the whole buffer and a uint16 minimum cost several ms a frame at full size).
        buf = self._take_buffer(h, stride_px, w)
        view = buf[:, :w]
        if self._renderer_clips and counts.dtype == np.uint16:
            np.copyto(view, counts)
        else:
            np.minimum(counts, full_scale, out=view, casting="unsafe")
        if self.left_aligned:
            np.left_shift(view, 16 - self.sensor.bits, out=view)
        return buf.view(np.uint8)
