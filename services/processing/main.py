"""The processing service: its own process, so a crash in image processing never touches
laser safety.

It subscribes to laser-on/laser-off pairs from imaging (``frames.ipc``: topic ``pair``, a
msgpack header, then either the two raw uint16 frames or, usually, nothing more: the header's
``ring`` names the two frames' slots in shared memory, read in place and reported done on
``frames_done.ipc``; see :mod:`nirf.services.common.framering`), runs the pipeline
(:mod:`nirf.services.processing.pipeline`) and pushes one ``result`` per pair, and a false-colour
``preview`` at a modest rate, back to the controller (``results.ipc``), which publishes
them on the telemetry endpoint.

In automatic-ROI mode the ROI search (:mod:`nirf.services.processing.roi`) runs off the per-pair path, in
its own thread: it takes the newest pair (shared when the pair carried its pixels, a copy
when they are in the ring, whose slots go back when the pair is done), searches,
and hands back ROIs tagged with a generation number, the time they were found
(``roi_found_ns``, wall clock) and the pair they were found on. The per-pair path applies
the newest ROIs at its next pair and tags every result with them, so a capture can take
only results whose ROIs were found after its request arrived. A search runs every
``AUTO_ROI_REFRESH_S``, at once when automatic mode is (re)entered, and at once when a
pair header carries a newer ``roi_refresh_after_ns`` (a capture's request time): that
search uses a pair captured after it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from nirf import config as config_mod
from nirf.hal.errors import NirfError
from nirf.services.gateway import bus as bus_mod
from nirf.services.common import entry, framering
from nirf.services.common import sdnotify

log = logging.getLogger(__name__)

# How often the automatic ROI search runs again while the controller asks for "auto".
AUTO_ROI_REFRESH_S = 1.0


class _Found:
    """One automatic search's outcome, as handed from the search thread to the pair path."""

    __slots__ = ("generation", "signal", "background", "found_ns", "frame_seq", "search_s", "request_ns")

    def __init__(self, generation, signal, background, found_ns, frame_seq, search_s, request_ns):
        self.generation = generation
        self.signal = signal
        self.background = background
        self.found_ns = found_ns
        self.frame_seq = frame_seq
        self.search_s = search_s
        self.request_ns = request_ns


class ProcessingService:
    def __init__(self, cfg, runtime_dir: Path, *, context: zmq.Context | None = None):
        from nirf.services.processing.pipeline import PairProcessor

        self.cfg = cfg
        self.runtime_dir = Path(runtime_dir)
        self.ctx = context or zmq.Context()
        p = cfg.processing
        cam = cfg.camera
        self.proc = self._new_processor(cam.width, cam.height, cam.bits)
        self._proc_shape = (cam.height, cam.width, cam.bits)
        self.preview_period_s = 1.0 / cfg.bus.preview_rate_hz
        self._next_preview = 0.0
        self._roi_version = None
        self._auto_rois = None  # (signal, background) found by the automatic search, applied
        self._roi_tag: dict = {}  # what every result says about its ROIs
        self._roi_generation = 0
        # the automatic search: the newest pair waits in a one-place mailbox for the thread
        self._search_cond = threading.Condition()
        self._search_pair: tuple | None = None  # (on, off, seq, t_capture_ns, flat, shape)
        self._search_due = True  # search at the next chance
        self._search_after_ns = 0  # a capture's request: search on a pair captured after it
        self._next_auto_roi = 0.0
        self._found: _Found | None = None
        self._search_epoch = 0  # bumped when found ROIs go stale (new frame size, auto re-entered)
        self._finder = None
        self._search_thread: threading.Thread | None = None
        self.search_times_s: list[float] = []  # the last searches' durations (bench)
        self.pairs_received = 0
        self.pairs_missing = 0
        self._last_seq: int | None = None
        self.stop_event = threading.Event()
        # calibration: the flat field the controller names in each pair header is loaded from
        # here (services/imaging/calibration.py); (file name, processor) it was applied to
        self.calibration_dir = cfg.state_dir() / "calibration"
        self._flat_applied: tuple | None = None
        # systemd's watchdog, fed from the receive loop (no-op off systemd)
        self.watchdog = sdnotify.WatchdogPinger()
        # frames in shared memory: the ring imaging names, and what we tell it back
        self.ring = framering.RingReader(framering.ring_path(self.runtime_dir))
        self.instance = f"{os.getpid()}-{time.time_ns()}"
        self.ring_reports = None
        self._last_rx = time.monotonic()
        self._ring_token: str | None = None
        self.ring_pairs = 0  # pairs read in place from the ring
        self.ring_dropped = 0  # pairs whose slots were not (or no longer) theirs
        self.pipeline_cpu_s = 0.0  # CPU seconds in the pipeline (statistics and previews) since start
        self._in_ring: dict | None = None  # the ring part of the pair being handled

    def connect(self) -> None:
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 8)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"pair")
        self.sub.connect(f"ipc://{self.runtime_dir / 'frames.ipc'}")
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 200)
        self.push.connect(f"ipc://{self.runtime_dir / 'results.ipc'}")
        self.ring_reports = self.ctx.socket(zmq.PUSH)
        self.ring_reports.setsockopt(zmq.LINGER, 0)
        self.ring_reports.setsockopt(zmq.SNDHWM, 100)
        self.ring_reports.connect(f"ipc://{self.runtime_dir / 'frames_done.ipc'}")
        self._report("idle", since=self._last_rx)  # a new processing: earlier leases are void

    def _new_processor(self, width: int, height: int, bits: int):
        from nirf.services.processing.pipeline import PairProcessor

        p = self.cfg.processing
        return PairProcessor(width, height, bits, sbr_threshold=p.sbr_threshold,
                             saturation_limit=p.saturation_limit, preview_downsample=p.preview_downsample,
                             average_pairs=p.average_pairs, intensity_floor_cps_mw=p.intensity_floor_cps_mw,
                             cnr_floor=p.cnr_floor, motion_limit_px=p.motion_limit_px,
                             background_min_snr=p.background_min_snr,
                             emission_filter=self.cfg.filter_wheel.emission_position)

    def start_search_thread(self) -> None:
        """Run the automatic ROI search in its own thread (``serve`` does this; without it
        the search runs inline in :meth:`handle`, as the in-process tests use it)."""
        if self._search_thread is None:
            self._search_thread = threading.Thread(target=self._search_loop, name="roi-search", daemon=True)
            self._search_thread.start()

    def _search_loop(self) -> None:
        while not self.stop_event.is_set():
            with self._search_cond:
                if self._search_pair is None:
                    self._search_cond.wait(0.2)
                job, self._search_pair = self._search_pair, None
            if job is not None:
                epoch, job = job[0], job[1:]
                try:
                    found = self._search(*job)
                except Exception:  # a bad frame must not end the search thread
                    log.exception("automatic ROI search failed")
                    continue
                with self._search_cond:
                    if epoch == self._search_epoch:  # else: found on a view that no longer applies
                        self._found = found

    def _search(self, on, off, seq, t_capture_ns, flat, shape, request_ns) -> _Found:
        """One automatic search (in whichever thread runs it)."""
        from nirf.services.processing.roi import RoiFinder

        h, w = shape
        if self._finder is None or (self._finder.height, self._finder.width) != (h, w):
            self._finder = RoiFinder(w, h)
        got = self._finder.find((on, off), flat)
        self.search_times_s = (self.search_times_s + [got.elapsed_s])[-1000:]
        with self._search_cond:
            self._roi_generation += 1
            generation = self._roi_generation
        return _Found(generation, got.signal, got.background, time.time_ns(), seq, got.elapsed_s, request_ns)

    def serve(self) -> None:
        self.start_search_thread()
        while not self.stop_event.is_set():
            self.watchdog()
            if not self.sub.poll(int(framering.IDLE_REPORT_S * 1000)):
                # nothing for a while: any pair imaging still counts as ours was lost on the way
                self._report("idle", since=self._last_rx)
                continue
            frames = self.sub.recv_multipart(copy=False)
            self._last_rx = time.monotonic()
            try:
                self.handle(frames)
            except Exception:  # one bad pair must not stop the stream
                log.exception("pair could not be processed")

    def _report(self, kind: str, **fields) -> None:
        if self.ring_reports is None:
            return
        try:
            self.ring_reports.send(bus_mod.pack(framering.report(kind, self._ring_token, self.instance, **fields)),
                                   zmq.NOBLOCK)
        except zmq.Again:
            pass  # imaging is not there: its next ring starts free anyway

    def _ensure_processor(self, width: int, height: int, bits: int) -> None:
        if self._proc_shape == (height, width, bits):
            return
        self.proc = self._new_processor(width, height, bits)
        self._proc_shape = (height, width, bits)
        self._roi_version = None
        self._auto_rois = None
        with self._search_cond:
            self._found = None  # found on frames of the old size
            self._search_epoch += 1
            self._search_due = True

    def handle(self, frames) -> dict | None:
        header = bus_mod.unpack(frames[1].bytes)
        ring_part = header.get("ring")
        if ring_part is None:
            return self._handle(header, frames[2].buffer, frames[3].buffer, None)
        try:
            self._ring_token = ring_part.get("token") if isinstance(ring_part, dict) else None
            on, off = self.ring.views(ring_part)
        except framering.RingMiss as err:
            self.ring_dropped += 1
            log.warning("pair %s dropped: %s", header.get("frame_seq"), err)
            self._ring_done(ring_part)
            return None
        try:
            self.ring_pairs += 1
            return self._handle(header, on, off, ring_part)
        finally:
            del on, off
            self._ring_done(ring_part)

    def _ring_done(self, ring_part) -> None:
        seq = ring_part.get("seq") if isinstance(ring_part, dict) else None
        if isinstance(seq, int):
            self._report("done", seq=seq)

    def _handle(self, header: dict, on_buf, off_buf, ring_part: dict | None) -> dict | None:
        m_on, m_off = header["on"], header["off"]
        h, w = m_on["height"], m_on["width"]
        if ring_part is None:
            on = np.frombuffer(on_buf, dtype=np.uint16).reshape(h, w)
            off = np.frombuffer(off_buf, dtype=np.uint16).reshape(h, w)
        else:
            on, off = on_buf, off_buf
            if on.shape != (h, w) or off.shape != (h, w):
                self.ring_dropped += 1
                log.warning("pair %s dropped: ring slots of %s, header says %dx%d", header.get("frame_seq"),
                            on.shape, w, h)
                return None
        self._in_ring = ring_part
        self._ensure_processor(w, h, m_on["bits"])
        seq = header["frame_seq"]
        self.pairs_received += 1
        if self._last_seq is not None and seq is not None and seq > self._last_seq + 2:
            self.pairs_missing += (seq - self._last_seq) // 2 - 1
        self._last_seq = seq

        flat_ok = self._apply_flat_field(header.get("flat_field"), w, h)
        t_capture_ns = max(m_on["t_end_ns"], m_off["t_end_ns"])
        rois_ready = self._update_rois(header, on, off, w, h, seq, t_capture_ns)
        meta_on = dict(m_on, frame_seq=seq)
        meta_off = dict(m_off, frame_seq=seq)
        t0 = time.thread_time()
        if rois_ready:
            result = self.proc.process(on, off, meta_on, meta_off)
        else:
            result = self._result_without_rois(meta_on, meta_off)
        self.pipeline_cpu_s += time.thread_time() - t0
        if ring_part is not None and not self.ring.current(ring_part):
            # a slot was written again while in use (never, while the leases hold): no result
            # computed on a torn frame goes out
            self.ring_dropped += 1
            log.error("pair %s dropped: its frame was overwritten while processed", seq)
            return None
        result.update(self._roi_tag)
        result["calibration_id"] = header.get("calibration_id")  # every result records its calibration
        result["flat_field_applied"] = flat_ok
        result["t_done_ns"] = time.time_ns()
        result["pairs_received"] = self.pairs_received
        result["pairs_missing"] = self.pairs_missing
        result["pairs_dropped_ring"] = self.ring_dropped  # frames no longer in shared memory
        result["pipeline_cpu_s"] = round(self.pipeline_cpu_s, 6)  # the pipeline's CPU so far (previews too)
        self.push.send_multipart([b"result", bus_mod.pack(result)])
        now = time.monotonic()
        if now >= self._next_preview:
            self._next_preview = now + self.preview_period_s
            t0 = time.thread_time()
            frame_sat = result.get("frame_saturated_fraction")  # None while the ROIs are pending
            pw, ph, rgb = self.proc.preview(on, off, any_saturated=None if frame_sat is None else frame_sat > 0)
            self.pipeline_cpu_s += time.thread_time() - t0
            if ring_part is not None and not self.ring.current(ring_part):
                return result
            self.push.send_multipart([b"preview", bus_mod.pack({"width": pw, "height": ph, "format": "rgb8",
                                                                "frame_seq": seq}), rgb])
        return result

    def _update_rois(self, header: dict, on, off, width: int, height: int, seq, t_capture_ns: int) -> bool:
        """Apply the ROIs the controller asks for. In automatic mode, offer this pair to
        the search when one is due and apply the newest ROIs found (an unchanged answer
        keeps the running average). Returns whether ROIs are in place."""
        from nirf.services.processing.pipeline import Roi

        roi = header["roi"]
        now = time.monotonic()
        if roi != "auto":
            if header["roi_version"] != self._roi_version:
                self.proc.set_rois(Roi(*roi["signal"]), Roi(*roi["background"]))
                self._roi_version = header["roi_version"]
                self._auto_rois = None
                with self._search_cond:
                    self._roi_generation += 1
                    generation = self._roi_generation
                self._roi_tag = {"roi_mode": "set", "roi_generation": generation, "roi_found_ns": time.time_ns(),
                                 "roi_frame_seq": seq, "roi_search_ms": None}
            return True
        if header["roi_version"] != self._roi_version:
            # (re)entering automatic mode: forget boxes set by command, search at once
            self._roi_version = header["roi_version"]
            self._auto_rois = None
            self._roi_tag = {}
            with self._search_cond:
                self._found = None
                self._search_epoch += 1
                self._search_due = True
        after = header.get("roi_refresh_after_ns")
        with self._search_cond:
            if isinstance(after, int) and after > self._search_after_ns:
                self._search_after_ns = after
                self._search_due = True
            due = self._search_due or now >= self._next_auto_roi
            fresh_enough = t_capture_ns >= self._search_after_ns
            job = None
            if due and fresh_enough:
                self._search_due = False
                self._next_auto_roi = now + AUTO_ROI_REFRESH_S
                if self._in_ring is not None:
                    # the search outlives this pair; the ring's slots go back when it is done
                    on, off = on.copy(), off.copy()
                job = (on, off, seq, t_capture_ns, self.proc.flat_field, (height, width), self._search_after_ns)
                if self._search_thread is not None:
                    self._search_pair = (self._search_epoch, *job)
                    self._search_cond.notify_all()
                    job = None
        if job is not None:  # no search thread: search inline
            found = self._search(*job)
            with self._search_cond:
                self._found = found
        with self._search_cond:
            found = self._found
        if found is not None and self._roi_tag.get("roi_generation") != found.generation:
            if (found.signal, found.background) != self._auto_rois:
                self.proc.set_rois(found.signal, found.background)
                self._auto_rois = (found.signal, found.background)
            self._roi_tag = {"roi_mode": "auto", "roi_generation": found.generation, "roi_found_ns": found.found_ns,
                             "roi_frame_seq": found.frame_seq, "roi_search_ms": round(found.search_s * 1e3, 3)}
        return self._auto_rois is not None

    def _result_without_rois(self, meta_on: dict, meta_off: dict) -> dict:
        """A result that says why there is no number: the first automatic search has not
        finished yet (``roi_pending``)."""
        p = self.cfg.processing
        return {"frame_seq": meta_on["frame_seq"], "t_capture_ns": max(meta_on["t_end_ns"], meta_off["t_end_ns"]),
                "intensity": None, "signal_mean": None, "background_mean": None, "sbr": None, "cnr": None,
                "saturated_fraction": None, "valid": False, "flags": ["roi_pending"], "positive": False,
                "threshold": p.sbr_threshold, "intensity_floor": p.intensity_floor_cps_mw, "cnr_floor": p.cnr_floor,
                "criteria_met": [], "criteria_failed": ["sbr", "intensity", "cnr"], "roi": None}

    def _apply_flat_field(self, name: str | None, width: int, height: int) -> bool:
        """Load and apply the named flat field when the name (or the processor) changed;
        True when a flat field is applied. A map that cannot be used is logged and the
        pairs are processed uncorrected (``flat_field_applied`` false in the result)."""
        from nirf.services.imaging.calibration import load_flat_field

        if self._flat_applied is None or self._flat_applied[:2] != (name, self.proc):
            applied = False
            try:
                self.proc.set_flat_field(None if name is None else
                                         load_flat_field(self.calibration_dir, name, width, height))
                applied = name is not None
            except NirfError as err:
                log.error("flat field not applied: %s", err)
                self.proc.set_flat_field(None)
            self._flat_applied = (name, self.proc, applied)
        return self._flat_applied[2]

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def main(argv=None) -> int:
    p = entry.parser("NIRF fluorescence processing service")
    args = p.parse_args(argv)
    entry.configure_logging("processing")
    try:
        cfg = config_mod.load(args.config)
    except NirfError as err:
        log.error("cannot start: %s", err)
        return 2
    svc = ProcessingService(cfg, cfg.runtime_dir())
    svc.connect()
    return entry.serve(svc, "processing ready")


if __name__ == "__main__":
    raise SystemExit(main())
