"""Acquisition: camera frames tagged laser-on or laser-off from the MCU's frame notices,
paired, and handed to a sink.

The MCU is the timing master: it triggers every exposure and, in fluorescence mode, gates
the laser on for even-numbered frames. Each trigger produces a frame notice on the serial
line (:class:`hal.laser.FrameTag`); each exposure produces a camera frame with a sensor
timestamp. :class:`FrameTagger` matches the two by time (the offset between the MCU's clock
and the sensor's clock is learned from the first frame and then tracked), so a frame dropped
on either side never shifts the on/off labels of the frames after it.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

from hal.camera import CameraSettings, Frame, NirCamera
from hal.clock import Clock, SystemClock
from hal.errors import CameraStall, DeviceError, InvalidArgument
from hal.laser import FrameTag, LaserSource

log = logging.getLogger(__name__)

MODES = ("fluorescence", "white", "dark")

PairSink = Callable[[Frame, Frame], None]
FrameSink = Callable[[Frame], None]


class FrameTagger:
    """Match camera frames to the MCU's frame notices by time."""

    def __init__(self, period_us: float):
        self.period_us = float(period_us)
        self._tags: collections.deque[FrameTag] = collections.deque(maxlen=128)
        self.offset_us: float | None = None
        self.unmatched = 0

    def add(self, tags) -> None:
        self._tags.extend(tags)

    def match(self, sensor_timestamp_ns: int) -> FrameTag | None:
        t_us = sensor_timestamp_ns / 1000.0
        if not self._tags:
            self.unmatched += 1
            return None
        if self.offset_us is None:
            tag = self._tags.popleft()
            self.offset_us = t_us - tag.mcu_time_us
            return tag
        expected = t_us - self.offset_us
        best = min(self._tags, key=lambda g: abs(g.mcu_time_us - expected))
        error = best.mcu_time_us - expected
        if abs(error) > self.period_us / 2:
            self.unmatched += 1
            return None
        while self._tags and self._tags[0] is not best:
            self._tags.popleft()
        self._tags.popleft()
        # follow slow drift between the two clocks
        self.offset_us -= 0.05 * error
        return best


class Acquisition:
    """Runs the camera in one of the modes and feeds frames or pairs to sinks."""

    def __init__(
        self,
        camera: NirCamera,
        laser: LaserSource,
        *,
        clock: Clock | None = None,
        on_pair: PairSink | None = None,
        on_frame: FrameSink | None = None,
        laser_mw: Callable[[], float] = lambda: 0.0,
        on_liveness: Callable[[bool, float | None], None] | None = None,
        stall_timeout_s: float = 1.0,
        filter_position: Callable[[], int] = lambda: 0,
    ):
        self.camera = camera
        self.laser = laser
        self.clock = clock or SystemClock()
        self.on_pair = on_pair or (lambda on, off: None)
        self.on_frame = on_frame or (lambda f: None)
        self.laser_mw = laser_mw
        self.on_liveness = on_liveness or (lambda watching, t: None)
        self.stall_timeout_s = stall_timeout_s
        self.filter_position = filter_position
        self.mode = "off"
        self.fps = 30.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames = 0
        self.pairs = 0
        self.pairs_incomplete = 0
        self.stalls = 0
        self.last_frame_monotonic: float | None = None
        self._fps_window: collections.deque[float] = collections.deque(maxlen=61)

    # ------------------------------------------------------------------ control
    def configure(self, settings: CameraSettings, fps: float) -> CameraSettings:
        """Apply settings; the frame rate wins: a too-long exposure is shortened to fit."""
        if not 1.0 <= fps <= 60.0:
            raise InvalidArgument(f"fps {fps} outside 1-60")
        max_exposure = int(1e6 / fps * 0.9)
        if settings.exposure_us > max_exposure:
            settings = CameraSettings(max_exposure, settings.gain, settings.width, settings.height)
        with self._lock:
            running = self.mode
            if running != "off":
                self._stop_locked()
            applied = self.camera.configure(settings)
            self.fps = float(fps)
            if running != "off":
                self._start_locked(running)
        return applied

    def start(self, mode: str) -> None:
        if mode not in MODES:
            raise InvalidArgument(f"acquisition mode {mode!r}: allowed {', '.join(MODES)}")
        with self._lock:
            if self.mode != "off":
                self._stop_locked()
            self._start_locked(mode)

    def _start_locked(self, mode: str) -> None:
        self._tagger = FrameTagger(1e6 / self.fps)
        self._pending_on: Frame | None = None
        self.camera.start()
        try:
            self.laser.poll()  # discard notices from before this start
            self.laser.start_frames(self.fps, self.camera.settings.exposure_us, modulate=(mode == "fluorescence"))
        except Exception:
            self.camera.stop()
            raise
        self.mode = mode
        self._stop.clear()
        self.last_frame_monotonic = self.clock.monotonic()
        self.on_liveness(True, self.last_frame_monotonic)
        self._thread = threading.Thread(target=self._run, name=f"acquire-{mode}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.stall_timeout_s + 2.0)
        self._thread = None
        self.mode = "off"
        self.on_liveness(False, None)
        try:
            self.laser.stop_frames()
        except DeviceError as err:
            log.warning("could not stop the MCU's frame timing: %s", err)
        try:
            self.camera.stop()
        except DeviceError as err:
            log.warning("could not stop the camera: %s", err)

    def running(self) -> bool:
        """True while the acquisition thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def measured_fps(self) -> float:
        w = self._fps_window
        if len(w) < 2 or w[-1] == w[0]:
            return 0.0
        return (len(w) - 1) / (w[-1] - w[0])

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        last_restart = -1e9
        while not self._stop.is_set():
            try:
                frame = self.camera.capture(timeout_s=self.stall_timeout_s)
            except CameraStall as err:
                self.stalls += 1
                log.warning("%s", err)
                now = self.clock.monotonic()
                if now - last_restart >= self.stall_timeout_s and not self._stop.is_set():
                    last_restart = now
                    try:
                        self.camera.restart()
                        self._tagger = FrameTagger(1e6 / self.fps)
                    except DeviceError as rerr:
                        log.error("camera restart failed: %s", rerr)
                continue
            except DeviceError as err:
                log.error("camera error: %s", err)
                self._stop.wait(0.05)
                continue
            now = self.clock.monotonic()
            self.last_frame_monotonic = now
            self._fps_window.append(now)
            self.frames += 1
            self.on_liveness(True, now)
            try:
                tags, _notices = self.laser.poll()
            except DeviceError as err:
                log.warning("could not read frame notices: %s", err)
                tags = []
            self._tagger.add(tags)
            tag = self._tagger.match(frame.meta.sensor_timestamp_ns)
            self._handle(frame, tag)

    def _handle(self, frame: Frame, tag: FrameTag | None) -> None:
        lit = None if tag is None else tag.lit
        meta = frame.meta.with_(
            lit=lit,
            mcu_frame=None if tag is None else tag.counter,
            laser_mw=self.laser_mw() if lit else 0.0,
            filter_position=self.filter_position(),
        )
        frame = Frame(frame.data, meta)
        if self.mode != "fluorescence":
            self.on_frame(frame)
            return
        if tag is None:
            self._pending_on = None
            return
        if tag.lit:
            if self._pending_on is not None:
                self.pairs_incomplete += 1
            self._pending_on = frame
            return
        on = self._pending_on
        self._pending_on = None
        if on is None or on.meta.mcu_frame + 1 != tag.counter:
            self.pairs_incomplete += 1
            return
        self.pairs += 1
        self.on_pair(on, frame)
