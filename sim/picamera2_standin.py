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
  ``captured_request`` (context manager that releases);
* requests with ``make_array("raw")``, ``get_metadata()``, ``release()`` and the context
  manager protocol.

Like the IMX296 in external-trigger mode, the stand-in exposes a frame only when the MCU
triggers one: a background thread takes each :class:`~sim.world.Trigger` from the world
view, waits (on the clock) until the exposure window ``[t_start, t_start + ExposureTime]``
has passed plus a small margin (so laser changes reported late by the hardware process are
in), and renders the frame from the laser output averaged over exactly that window. A
laser toggle mistimed against the exposure therefore gives a partly lit frame.

Raw data arrive the way picamera2 hands them out for unpacked raw formats: a ``uint8``
array of shape ``(height, stride_bytes)``, little-endian 16-bit pixels, rows padded to an
aligned stride. On a Pi 4 (platform ``VC4``) the pixel values are right-aligned (0..1023 for
10 bits); on a Pi 5 (platform ``PISP``, ``left_aligned=True`` here) they are shifted left to
fill 16 bits (full scale 65472).

Metadata: ``ExposureTime`` (us), ``AnalogueGain``, ``DigitalGain``, ``FrameDuration`` (us:
the time since the previous trigger, i.e. the trigger period), ``SensorBlackLevels`` (in
16-bit units, as libcamera reports them) and ``SensorTimestamp``: the end of the exposure
(start of read-out) in ns on the *monotonic* clock (``clock.monotonic()`` in ns; on a Pi
libcamera uses ``CLOCK_MONOTONIC``, the clock of ``time.monotonic_ns``), not the wall clock.

The injected fault ``camera_stall`` makes the stand-in swallow triggers, as picamera2 can
stop delivering frames in dark scenes; once stalled it stays stalled until the next
``start`` (a restart), even if the fault is lifted.

Frames that the application does not collect go into a small queue bounded by the buffer
count; when it is full the oldest completed request is dropped, as a camera with a few
buffers does. Requests must be released; requests held by the application take buffers
away from the queue.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import re
import threading
from collections import deque
from typing import Any, Callable

import numpy as np

from hal.clock import Clock, SystemClock

log = logging.getLogger(__name__)

# Margin after the end of an exposure before the laser history is read: laser events from
# the hardware process reach this process a little late.
DEFAULT_SETTLE_MARGIN_S = 0.003
# Longest single wait slice: keeps stop() responsive and lets clock-driven waits notice
# frames that arrive meanwhile.
_POLL_S = 0.01
# How long the background thread blocks for the next trigger before checking for stop
# (real time: triggers arrive from another thread or process).
_TRIGGER_POLL_S = 0.05
DEFAULT_BUFFER_COUNT = 4
DEFAULT_FRAME_DURATION_US = 33_333  # reported for the first frame, before a period is known

_UNPACKED_RE = re.compile(r"^(R|S[RGB]{4})(8|10|12|14|16)$")
_ANY_RAW_RE = re.compile(r"^(S?)([RGB]+?)(\d+)(?:_(.+))?$")


class Platform(enum.Enum):
    """The Pi's camera pipeline, named as picamera2 names it (``Picamera2.platform``)."""

    VC4 = 0  # Pi 4 and earlier: unpacked raw is right-aligned
    PISP = 1  # Pi 5: unpacked raw is left-aligned in 16 bits


class StandInRequest:
    """A completed request: one frame's raw buffer and metadata. Release it when done."""

    def __init__(self, owner: "Picamera2StandIn", raw: np.ndarray, metadata: dict, config: dict):
        self._owner = owner
        self._raw = raw
        self._metadata = metadata
        self.config = config
        self._released = False
        self._lock = threading.Lock()

    def make_array(self, name: str) -> np.ndarray:
        """A copy of the named stream's buffer (only ``"raw"`` exists here)."""
        with self._lock:
            if self._released:
                raise RuntimeError("request already released")
            if name != "raw":
                raise RuntimeError(f"Stream {name!r} is not defined")
            fmt = str(self.config.get("raw", {}).get("format", ""))
            if "_" in fmt:
                raise RuntimeError(f"the camera stand-in delivers unpacked raw only, not {fmt}")
            return self._raw.copy()

    def get_metadata(self) -> dict:
        """The frame's metadata (a copy)."""
        return dict(self._metadata)

    def release(self) -> None:
        """Give the buffer back to the camera. Releasing twice is harmless."""
        with self._lock:
            if self._released:
                return
            self._released = True
            self._raw = None  # type: ignore[assignment]
        self._owner._request_released()

    @property
    def released(self) -> bool:
        """True once the request has been given back."""
        return self._released

    def __enter__(self) -> "StandInRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class StandInJob:
    """What ``capture_request(wait=False)`` returns: a pending capture."""

    def __init__(self, owner: "Picamera2StandIn"):
        self._owner = owner

    def get_result(self, timeout: float | None = None) -> StandInRequest:
        """Wait for the request; ``TimeoutError`` after ``timeout`` seconds."""
        return self._owner._take_request(timeout)


def _raw_format_parts(fmt: str) -> tuple[str, int, str | None]:
    """``"SRGGB10_CSI2P"`` -> ("RGGB", 10, "CSI2P"); ``"R10"`` -> ("R", 10, None)."""
    m = _ANY_RAW_RE.match(fmt)
    if not m:
        raise RuntimeError(f"Unrecognised raw format {fmt}")
    return m.group(2), int(m.group(3)), m.group(4)


class Picamera2StandIn:
    """picamera2's ``Picamera2`` for the simulated cart (see the module docstring).

    ``world_view`` is a :class:`sim.worldview.WorldView`; ``renderer`` an object with
    ``render(scene, laser_mw, exposure_us, gain) -> uint16 (height, width)`` right-aligned
    counts (default: :class:`sim.render.FrameRenderer` on the view's sensor, created at the
    first ``start``); ``clock`` the clock waits are measured on (default the system clock);
    ``left_aligned`` makes it behave as a Pi 5 (``platform`` PISP); ``mono`` False makes it
    a colour sensor (Bayer raw formats).
    """

    def __init__(
        self,
        world_view: Any,
        *,
        renderer: Any = None,
        clock: Clock | None = None,
        left_aligned: bool = False,
        seed: int = 0,
        mono: bool = True,
        settle_margin_s: float = DEFAULT_SETTLE_MARGIN_S,
        stride_align_bytes: int = 64,
    ):
        self.world_view = world_view
        self.sensor = world_view.sensor
        self._renderer = renderer
        # The built-in renderer clips to the sensor's full scale itself; an injected one
        # may not, so only its frames pay for a clip when packed.
        self._renderer_clips = renderer is None
        self._seed = int(seed)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self.left_aligned = bool(left_aligned)
        self.platform: Platform | None = Platform.PISP if left_aligned else Platform.VC4
        self.mono = bool(mono)
        self.settle_margin_s = float(settle_margin_s)
        self.stride_align_bytes = int(stride_align_bytes)
        self._native_format = f"{'R' if mono else 'SRGGB'}{self.sensor.bits}"

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._config: dict | None = None
        self._controls: dict[str, Any] = {
            "ExposureTime": 10_000,
            "AnalogueGain": 1.0,
            "AeEnable": False,
        }
        self._completed: deque[StandInRequest] = deque()
        self._held = 0  # requests handed out and not yet released
        self._started = False
        self._closed = False
        self._stalled = False
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream_start_wall_ns = 0
        self._last_trigger_ns: int | None = None
        # counters, for tests and diagnostics
        self.frames_completed = 0
        self.frames_dropped = 0
        self.triggers_swallowed = 0

    # -- description ----------------------------------------------------------------------
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
        }

    # -- configuration --------------------------------------------------------------------
    def _create_configuration(self, kind: str, main: dict | None, raw: dict | None,
                              controls: dict | None, buffer_count: int, **extra) -> dict:
        self._check_open()
        raw = dict(raw) if raw else {}
        raw.setdefault("format", self._native_format)
        raw.setdefault("size", (self.sensor.width, self.sensor.height))
        return {
            "use_case": kind,
            "main": dict(main) if main else {"format": "XBGR8888", "size": (640, 480)},
            "raw": raw,
            "controls": dict(controls) if controls else {},
            "buffer_count": int(buffer_count),
            **extra,
        }

    def create_video_configuration(self, main: dict | None = None, lores: dict | None = None,
                                   raw: dict | None = None, controls: dict | None = None,
                                   buffer_count: int = 6, **extra) -> dict:
        """A configuration for streaming (several buffers)."""
        return self._create_configuration("video", main, raw, controls, buffer_count, **extra)

    def create_still_configuration(self, main: dict | None = None, lores: dict | None = None,
                                   raw: dict | None = None, controls: dict | None = None,
                                   buffer_count: int = 1, **extra) -> dict:
        """A configuration for stills (by default one buffer)."""
        return self._create_configuration("still", main, raw, controls, buffer_count, **extra)

    def configure(self, camera_config: dict | None = None) -> None:
        """Apply a configuration. Like libcamera, the raw stream gets the sensor's own mode:
        its size and bit depth replace what was asked; an unpacked request stays unpacked;
        a packed request stays packed on a Pi 4 and becomes the lossy compressed format on a
        Pi 5."""
        with self._lock:
            self._check_open()
            if self._started:
                raise RuntimeError("Camera must be stopped before configuring")
        if camera_config is None:
            camera_config = self.create_video_configuration()
        if not isinstance(camera_config, dict) or "raw" not in camera_config:
            raise RuntimeError(f"Invalid camera configuration: {camera_config!r}")
        config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in camera_config.items()}
        raw = config["raw"] or {}
        fmt = str(raw.get("format", self._native_format))
        _order, _bits, packing = _raw_format_parts(fmt)
        native_order, _ = _raw_format_parts(self._native_format)[:2]
        if packing is None:
            actual = self._native_format
        elif self.platform is Platform.PISP or self.left_aligned:
            actual = f"{native_order}16_PISP_COMP1"
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

    def set_controls(self, controls: dict) -> None:
        """Set controls; they apply to frames exposed from now on."""
        limits = self.camera_controls
        checked: dict[str, Any] = {}
        for name, value in dict(controls).items():
            if name not in limits:
                raise RuntimeError(f"Control {name} is not advertised by libcamera")
            lo, hi, _ = limits[name]
            if name == "ExposureTime":
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not math.isfinite(value) or not lo <= value <= hi:
                    raise RuntimeError(f"ExposureTime {value!r} outside {lo}-{hi} us")
                value = int(value)
            elif name == "AnalogueGain":
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not math.isfinite(value) or not lo <= value <= hi:
                    raise RuntimeError(f"AnalogueGain {value!r} outside {lo}-{hi}")
                value = float(value)
            checked[name] = value
        with self._lock:
            self._check_open()
            self._controls.update(checked)

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
            from sim.render import FrameRenderer

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
        """Stop streaming; completed requests not collected are dropped."""
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
        """Requests handed out and not released yet."""
        with self._lock:
            return self._held

    def sensor_clock_ns(self) -> int:
        """The clock ``SensorTimestamp`` is on (monotonic, ns)."""
        return int(round(self._clock.monotonic() * 1e9))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Camera is closed")

    # -- capture --------------------------------------------------------------------------
    def capture_request(self, wait: Any = None, signal_function: Callable | None = None,
                        flush: Any = None):
        """The next completed request. ``wait``: None or True blocks until a frame (or a
        stop); a number of seconds bounds the wait (``TimeoutError``); False returns a job.
        ``flush`` True (or a monotonic time in ns) skips frames exposed before then."""
        if signal_function is not None:
            raise NotImplementedError("the camera stand-in does not support signal_function")
        if flush is True:
            flush = self.sensor_clock_ns()
        if flush:
            self._flush_before(int(flush))
        if wait is False:
            return StandInJob(self)
        timeout = None if wait is None or wait is True else float(wait)
        return self._take_request(timeout)

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

    def _flush_before(self, t_mono_ns: int) -> None:
        with self._lock:
            while self._completed:
                md = self._completed[0].get_metadata()
                exposure_start = md["SensorTimestamp"] - 1000 * md["ExposureTime"]
                if exposure_start >= t_mono_ns:
                    break
                self._completed.popleft()
                self.frames_dropped += 1

    def _take_request(self, timeout_s: float | None) -> StandInRequest:
        """Pop the oldest completed request, waiting at most ``timeout_s`` on the clock."""
        deadline = None if timeout_s is None else self._clock.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("Camera is closed")
                if not self._started:
                    raise RuntimeError("Camera is not started")
                if self._completed:
                    self._held += 1
                    return self._completed.popleft()
                if deadline is None:
                    self._cond.wait(_POLL_S)
                    continue
                remaining = deadline - self._clock.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no completed request within {timeout_s} s")
                step = min(remaining, _POLL_S)
                before = self._clock.monotonic()
                self._cond.wait(step)
                if not self._completed and self._clock.monotonic() == before:
                    # A clock that does not run by itself (a manual clock in tests): spend
                    # the slice on it, so the timeout still ends.
                    self._clock.sleep(step)

    def _request_released(self) -> None:
        with self._lock:
            self._held = max(0, self._held - 1)

    # -- the sensor -----------------------------------------------------------------------
    def _run(self) -> None:
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
            exposure_us = int(self._controls["ExposureTime"])
            gain = float(self._controls["AnalogueGain"])
            config = self._config
        t_end_ns = trigger.t_start_ns + exposure_us * 1000
        if not self._wait_until_world(t_end_ns + int(self.settle_margin_s * 1e9)):
            return  # stopped meanwhile
        scene = self.world_view.scene()
        if scene.camera_stall or self._stalled:
            self._stalled = True
            self.triggers_swallowed += 1
            return
        laser_mw = float(self.world_view.laser_mean_mw(trigger.t_start_ns, t_end_ns))
        counts = self._renderer.render(scene, laser_mw, exposure_us, gain)
        raw = self._pack(np.asarray(counts))
        # The sensor clock is the monotonic clock; the world's times are wall clock.
        wall_minus_mono_ns = self.world_view.now_ns() - self.sensor_clock_ns()
        if self._last_trigger_ns is None:
            frame_duration_us = DEFAULT_FRAME_DURATION_US
        else:
            frame_duration_us = max(1, (trigger.t_start_ns - self._last_trigger_ns) // 1000)
        self._last_trigger_ns = trigger.t_start_ns
        black16 = self.sensor.black_level << (16 - self.sensor.bits)
        metadata = {
            "ExposureTime": exposure_us,
            "AnalogueGain": gain,
            "DigitalGain": 1.0,
            "AeLocked": False,
            "SensorTimestamp": t_end_ns - wall_minus_mono_ns,
            "FrameDuration": int(frame_duration_us),
            "SensorBlackLevels": (black16,) * 4,
            "Lux": 0.0,
        }
        request = StandInRequest(self, raw, metadata, config or {})
        with self._cond:
            if not self._started:
                return
            free = self._buffer_count() - self._held
            if free <= 0:
                # Every buffer is held by the application: this frame has nowhere to go.
                self.frames_dropped += 1
                return
            while len(self._completed) >= free:
                self._completed.popleft()
                self.frames_dropped += 1
            self._completed.append(request)
            self.frames_completed += 1
            self._cond.notify_all()

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

    def _pack(self, counts: np.ndarray) -> np.ndarray:
        """Right-aligned counts -> the uint8 (height, stride) buffer picamera2 hands out."""
        h, w = self.sensor.height, self.sensor.width
        if counts.shape != (h, w):
            raise ValueError(f"renderer gave a {counts.shape} frame, sensor is {(h, w)}")
        full_scale = (1 << self.sensor.bits) - 1
        stride_px = self._stride_bytes() // 2
        # Only the row padding needs zeros: the pixels are all written below (np.zeros of
        # the whole buffer and a uint16 minimum cost several ms a frame at full size).
        buf = np.empty((h, stride_px), dtype="<u2")
        buf[:, w:] = 0
        view = buf[:, :w]
        if self._renderer_clips and counts.dtype == np.uint16:
            np.copyto(view, counts)
        else:
            np.minimum(counts, full_scale, out=view, casting="unsafe")
        if self.left_aligned:
            np.left_shift(view, 16 - self.sensor.bits, out=view)
        return buf.view(np.uint8)
