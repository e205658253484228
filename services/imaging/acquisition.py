"""Acquisition: camera frames tagged laser-on or laser-off from the MCU's frame record,
paired, and handed to a sink.

The MCU is the timing master: it triggers every exposure and, in fluorescence mode, gates
the laser on for even-numbered frames. Frame 0 is triggered the moment the MCU accepts
``FTON``; each trigger produces a frame notice on the serial line
(:class:`nirf.hal.laser.FrameTag`: counter, lit, the MCU's microsecond time); each exposure
produces a camera frame with a sensor timestamp. picamera2 may drop any frame (it discards
requests whose status is not Success, and keeps only the newest completed request), so a
frame's place in the stream says nothing about its counter. :class:`FrameTagger` works the
counter out from time instead:

* the first frames are placed against the time of frame 0's trigger, bounded below by when
  ``FTON`` was sent and above by its acknowledgement and by the earliest arrival of the
  MCU's notices (a notice never arrives before its trigger). When those bounds are within a
  quarter period, the frame is placed from their middle; otherwise from the upper bound,
  one-sided (the frame can only be later than it looks); with a wide window and no notice
  yet, the frame is left untagged. A loaded host can take several periods between sending
  FTON and reading the reply: splitting such a window in the middle would give frames the
  counters of triggers not yet notified (no pair ever) or of their neighbours (on and off
  swapped);
* once a frame has been matched, the sensor's clock is locked to the MCU's clock and each
  later frame is placed by its sensor timestamp, the drift between the two crystals
  followed;
* a frame that falls between two trigger times by more than a quarter period, or whose
  notice is missing, is left untagged rather than guessed.

So one, two or three frames lost anywhere, the first included, never shift the on/off
labels of the frames after them.

In external-trigger mode the IMX296 exposes for the trigger's low pulse plus 14.26 us,
whatever its metadata say; the MCU is asked for a pulse 14 us shorter than the exposure
wanted, and each frame records the exposure the pulse gives.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from typing import Callable

from nirf.hal.camera import CameraSettings, Frame, NirCamera
from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import CameraStall, DeviceError, InvalidArgument
from nirf.hal.laser import FrameTag, LaserSource, trigger_period_us
from nirf.hal.threads import os_named

log = logging.getLogger(__name__)

MODES = ("fluorescence", "white", "dark")
ACQUISITION_THREAD = "nirf-acquire"  # its OS name (the benchmark reads it)
# A frame whose trigger record has not come yet waits for it at most this long (the record
# leaves the MCU as the exposure starts, so it is normally there well before the frame; the
# camera keeps only its newest frame meanwhile, so a long wait would cost frames instead).
TAG_WAIT_S = 0.03
TAG_POLL_S = 0.002
RELOCK_AFTER_MISSES = 30  # frames in a row without a record (half a second at 60 fps)

# The IMX296 exposes for the trigger's low pulse plus 14.26 us (Raspberry Pi documentation,
# "External Trigger on the GS Camera"); the pulse is shortened by the whole microseconds.
TRIGGER_EXPOSURE_EXTRA_US = 14.26

PairSink = Callable[[Frame, Frame], None]
FrameSink = Callable[[Frame], None]


class FrameTagger:
    """Match camera frames to the MCU's frame notices by time (see the module docstring).

    ``period_us`` is the trigger period; ``start_window_ns`` the wall-clock interval
    (before sending, after the reply) in which the MCU triggered frame 0, when known.
    ``tolerance`` is how far (a fraction of the period) a frame may sit from a trigger time
    and still be given that trigger's counter.
    """

    MAX_TAGS = 256

    def __init__(self, period_us: float, *, start_window_ns: tuple[int, int] | None = None,
                 tolerance: float = 0.25):
        if not period_us > 0:
            raise InvalidArgument(f"frame tagger: period {period_us!r} us must be positive")
        if not 0.0 < tolerance < 0.5:
            raise InvalidArgument(f"frame tagger: tolerance {tolerance!r} outside 0-0.5 periods")
        self.period_us = float(period_us)
        self.tolerance = float(tolerance)
        self.start_window_ns = start_window_ns
        self._tags: collections.OrderedDict[int, FrameTag] = collections.OrderedDict()
        self._mcu_t0_us: float | None = None  # MCU time of frame 0, from the notices
        self._host_minus_mcu_ns: int | None = None  # earliest notice arrival minus its MCU time
        self.sensor_minus_mcu_us: float | None = None  # locked after the first match
        self.unmatched = 0  # frames without a notice for their counter
        self.rejected = 0  # frames between two trigger times
        self.relocks = 0  # times the lock on the sensor clock was given up and found again
        self._misses_in_a_row = 0
        self.last_counter: int | None = None

    def add(self, tags) -> None:
        """Take the MCU's frame notices (any order, duplicates ignored)."""
        for tag in tags:
            self._tags[tag.counter] = tag
            t0 = tag.mcu_time_us - tag.counter * self.period_us
            # The MCU's timer is exact; averaging would only add rounding. Keep the first.
            if self._mcu_t0_us is None:
                self._mcu_t0_us = t0
            lead = tag.host_time_ns - tag.mcu_time_us * 1000
            if self._host_minus_mcu_ns is None or lead < self._host_minus_mcu_ns:
                self._host_minus_mcu_ns = lead
        while len(self._tags) > self.MAX_TAGS:
            self._tags.popitem(last=False)

    def awaited(self, meta) -> int | None:
        """The counter of the trigger that exposed this frame when its notice has not come
        yet (it may still be on its way through the safety core), else None."""
        n = self.counter_for(meta, count=False)
        return n if n is not None and n not in self._tags else None

    def counter_for(self, meta, count: bool = True) -> int | None:
        """The counter of the trigger that exposed this frame, or None when the frame does
        not sit close enough to any trigger time. ``count`` False leaves the counters of
        rejected frames alone (a look ahead, not a decision)."""
        if self.sensor_minus_mcu_us is not None and self._mcu_t0_us is not None:
            mcu_us = meta.sensor_timestamp_ns / 1000.0 - self.sensor_minus_mcu_us
            x = (mcu_us - self._mcu_t0_us) / self.period_us
            n = round(x)
        else:
            # Before the first match: bounds on the wall-clock time of frame 0's trigger.
            period_ns = self.period_us * 1000.0
            lo, hi = self.start_window_ns or (None, None)
            upper = None  # from the notices: one arrives after its trigger, never before
            if self._host_minus_mcu_ns is not None and self._mcu_t0_us is not None:
                upper = self._mcu_t0_us * 1000.0 + self._host_minus_mcu_ns
                if lo is not None and upper < lo:  # the two disagree: trust the notices
                    lo = hi = None
                hi = upper if hi is None else min(hi, upper)
            if lo is not None and hi - lo <= self.tolerance * period_ns:
                # narrow enough that its middle cannot be taken for the next trigger
                x = (meta.t_start_ns - (lo + hi) / 2) / period_ns
                n = round(x)
            elif upper is not None:
                # One-sided: frame 0 began at most ``hi``, so the frame can only be later
                # than it looks from there (a wide FTON window alone would be a guess: under
                # load the request and its reply can take several periods).
                x = (meta.t_start_ns - hi) / period_ns
                n = math.ceil(x - self.tolerance)
                if lo is not None and n > (meta.t_start_ns - lo) / period_ns + self.tolerance:
                    self.rejected += count
                    return None
                x = n  # no distance check possible
            else:
                return None  # a wide window and no notice yet: wait rather than guess
        if n < 0 or abs(x - n) > self.tolerance:
            self.rejected += count
            log.debug("frame at sensor time %d ns is %.2f periods from any trigger",
                      meta.sensor_timestamp_ns, abs(x - n))
            return None
        return int(n)

    def _missed(self) -> None:
        """One more frame in a row without its record. After RELOCK_AFTER_MISSES the lock on
        the sensor clock is given up and found again from the notices' times, as at the start
        (the sensor clock jumped: a camera restarted, a stalled machine), instead of dropping
        every frame from then on."""
        if self.sensor_minus_mcu_us is None:
            return
        self._misses_in_a_row += 1
        if self._misses_in_a_row >= RELOCK_AFTER_MISSES:
            log.warning("frame tagging: %d frames in a row fit no trigger; finding the sensor clock's offset again",
                        self._misses_in_a_row)
            self.sensor_minus_mcu_us = None
            self._misses_in_a_row = 0
            self.relocks += 1

    def match(self, meta) -> FrameTag | None:
        """The MCU's notice for this frame (a :class:`~hal.camera.FrameMeta`), or None."""
        n = self.counter_for(meta)
        if n is None:
            self._missed()
            return None
        tag = self._tags.pop(n, None)
        # Notices of earlier triggers can no longer find their frame.
        for stale in [c for c in self._tags if c < n]:
            del self._tags[stale]
        if tag is None:
            self.unmatched += 1
            log.warning("frame %d: no record of its trigger from the laser controller; the frame is dropped", n)
            self._missed()
            return None
        self._misses_in_a_row = 0
        sensor_us = meta.sensor_timestamp_ns / 1000.0
        if self.sensor_minus_mcu_us is None:
            self.sensor_minus_mcu_us = sensor_us - tag.mcu_time_us
        else:
            # follow slow drift between the two crystals
            error = (sensor_us - self.sensor_minus_mcu_us) - tag.mcu_time_us
            self.sensor_minus_mcu_us += 0.1 * error
        self.last_counter = n
        return tag


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
        # Counters of lit frames the MCU reported cut mid-exposure (``! CUT <counter>``); a
        # pair's on frame is marked when the pair is made, one period after its exposure.
        self._cut: collections.deque[int] = collections.deque(maxlen=64)
        self._last_handed: int | None = None  # counter of the newest frame handed on
        self.cuts = 0  # CUT notices taken
        self.cuts_late = 0  # of those, for a frame already handed on (not marked)
        # Counters of dark frames whose exposure the MCU's photodiode saw light in (``! LIT``)
        self._dark_lit: collections.deque[int] = collections.deque(maxlen=64)
        self.dark_lit = 0
        self.dark_lit_late = 0
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

    def trigger_pulse_us(self, exposure_us: int) -> int:
        """The MCU's trigger pulse for an exposure of ``exposure_us`` (the sensor adds
        14.26 us to the pulse)."""
        return max(1, int(exposure_us) - int(TRIGGER_EXPOSURE_EXTRA_US))

    def _start_locked(self, mode: str) -> None:
        self._tagger = FrameTagger(trigger_period_us(self.fps))  # the MCU's own period, whole us
        self._pending_on: Frame | None = None
        # counters start again from 0 with every FTON: cut reports of the last run are void
        self._cut.clear()
        self._dark_lit.clear()
        self._last_handed = None
        self.camera.start()
        pulse_us = self.trigger_pulse_us(self.camera.settings.exposure_us)
        self._true_exposure_us = int(round(pulse_us + TRIGGER_EXPOSURE_EXTRA_US))
        try:
            self.laser.poll()  # discard notices from before this start
            sent_ns = self.clock.time_ns()
            self.laser.start_frames(self.fps, pulse_us, modulate=(mode == "fluorescence"))
            # Frame 0 was triggered when the MCU took FTON: between these two instants.
            self._tagger.start_window_ns = (sent_ns, self.clock.time_ns())
        except Exception:
            self.camera.stop()
            raise
        self.mode = mode
        self._stop.clear()
        self.last_frame_monotonic = self.clock.monotonic()
        self.on_liveness(True, self.last_frame_monotonic)
        self._thread = threading.Thread(target=os_named(ACQUISITION_THREAD, self._run), name=f"acquire-{mode}",
                                        daemon=True)
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
        self._pending_on = None  # an on frame whose off frame never came: its buffer goes back
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
                        # The MCU's frame record goes on, and the new camera's timestamps are
                        # on the same monotonic clock: the tagger keeps its lock.
                        self.camera.restart()
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
            self._tag_and_handle(frame)

    def _tag_and_handle(self, frame: Frame) -> None:
        """Give a captured frame its trigger's record and hand it on. The frame can overtake
        the record (it goes through the safety core, which a busy machine delays): it waits
        for it a little (TAG_WAIT_S, about two frame periods at 60 fps), never long."""
        self._take_notices()
        deadline = None
        wait_input = getattr(self.laser, "wait_input", None)
        while self._tagger.awaited(frame.meta) is not None and not self._stop.is_set():
            t = self.clock.monotonic()
            deadline = t + TAG_WAIT_S if deadline is None else deadline
            if t >= deadline:
                break
            if wait_input is not None:
                wait_input(min(TAG_POLL_S, deadline - t))  # back at once when a record comes
            else:
                self.clock.sleep(TAG_POLL_S)
            self._take_notices()
        self._handle(frame, self._tagger.match(frame.meta))

    def _take_notices(self) -> None:
        try:
            tags, notices = self.laser.poll()
        except DeviceError as err:
            log.warning("could not read frame notices: %s", err)
            tags, notices = [], []
        self._note_cuts(notices)
        self._tagger.add(tags)

    def _note_cuts(self, notices) -> None:
        """The MCU's reports on frames already triggered: ``CUT`` (a lit exposure cut by a
        turn-off or decrease) and ``LIT`` (light seen during a dark exposure)."""
        for n in notices:
            kind = getattr(n, "kind", None)
            if kind not in ("CUT", "LIT"):
                continue
            try:
                counter = int(n.detail[0])
            except (IndexError, ValueError, TypeError):
                log.warning("malformed %s notice %r", kind, n)
                continue
            late = self._last_handed is not None and counter <= self._last_handed
            if kind == "CUT":
                self.cuts += 1
                self.cuts_late += late
                self._cut.append(counter)
            else:
                self.dark_lit += 1
                self.dark_lit_late += late
                self._dark_lit.append(counter)
            if late:
                log.warning("the MCU reported frame %d %s after it was handed on", counter,
                            "cut" if kind == "CUT" else "lit in the dark")

    def _marked(self, frame: Frame) -> Frame:
        """``frame`` with ``cut`` set when the MCU reported its exposure cut."""
        c = frame.meta.mcu_frame
        if c is not None:
            self._last_handed = c
        if c is None:
            return frame
        marks = {}
        if c in self._cut:
            marks["cut"] = True
        if c in self._dark_lit:
            marks["light_seen"] = True
        return Frame(frame.data, frame.meta.with_(**marks)) if marks else frame

    def _handle(self, frame: Frame, tag: FrameTag | None) -> None:
        lit = None if tag is None else tag.lit
        exposure_us = getattr(self, "_true_exposure_us", None) or frame.meta.exposure_us
        meta = frame.meta.with_(
            # The trigger pulse set the exposure, whatever the camera's metadata say.
            exposure_us=exposure_us,
            lit=lit,
            mcu_frame=None if tag is None else tag.counter,
            laser_mw=self.laser_mw() if lit else 0.0,
            filter_position=self.filter_position(),
        )
        frame = Frame(frame.data, meta)
        if self.mode != "fluorescence":
            self.on_frame(self._marked(frame))
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
        self.on_pair(self._marked(on), self._marked(frame))
