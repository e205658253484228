"""The processing service: its own process, so a crash in image processing never touches
laser safety.

It subscribes to laser-on/laser-off pairs from the controller (``frames.ipc``: topic
``pair``, a msgpack header, then the two raw uint16 frames), runs the pipeline
(:mod:`services.processing.pipeline`) and pushes one ``result`` per pair, and a false-colour
``preview`` at a modest rate, back to the controller (``results.ipc``), which publishes
them on the telemetry endpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import zmq

import config as config_mod
from hal.errors import NirfError
from services.gateway import bus as bus_mod
from services.common import entry
from services.common import sdnotify

log = logging.getLogger(__name__)

# How often the automatic ROI search runs again while the controller asks for "auto".
AUTO_ROI_REFRESH_S = 1.0


class ProcessingService:
    def __init__(self, cfg, runtime_dir: Path, *, context: zmq.Context | None = None):
        from services.processing.pipeline import PairProcessor

        self.cfg = cfg
        self.runtime_dir = Path(runtime_dir)
        self.ctx = context or zmq.Context()
        p = cfg.processing
        cam = cfg.camera
        self.proc = PairProcessor(cam.width, cam.height, cam.bits, sbr_threshold=p.sbr_threshold,
                                  saturation_limit=p.saturation_limit, preview_downsample=p.preview_downsample,
                                  average_pairs=p.average_pairs)
        self._proc_shape = (cam.height, cam.width, cam.bits)
        self.preview_period_s = 1.0 / cfg.bus.preview_rate_hz
        self._next_preview = 0.0
        self._roi_version = None
        self._auto_rois = None  # (signal, background) found by the automatic search
        self._next_auto_roi = 0.0
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

    def serve(self) -> None:
        while not self.stop_event.is_set():
            self.watchdog()
            if not self.sub.poll(200):
                continue
            frames = self.sub.recv_multipart(copy=False)
            try:
                self.handle(frames)
            except Exception:  # one bad pair must not stop the stream
                log.exception("pair could not be processed")

    def _ensure_processor(self, width: int, height: int, bits: int) -> None:
        if self._proc_shape == (height, width, bits):
            return
        from services.processing.pipeline import PairProcessor

        p = self.cfg.processing
        self.proc = PairProcessor(width, height, bits, sbr_threshold=p.sbr_threshold,
                                  saturation_limit=p.saturation_limit, preview_downsample=p.preview_downsample,
                                  average_pairs=p.average_pairs)
        self._proc_shape = (height, width, bits)
        self._roi_version = None
        self._auto_rois = None

    def handle(self, frames) -> dict:
        header = bus_mod.unpack(frames[1].bytes)
        m_on, m_off = header["on"], header["off"]
        h, w = m_on["height"], m_on["width"]
        on = np.frombuffer(frames[2].buffer, dtype=np.uint16).reshape(h, w)
        off = np.frombuffer(frames[3].buffer, dtype=np.uint16).reshape(h, w)
        self._ensure_processor(w, h, m_on["bits"])
        seq = header["frame_seq"]
        self.pairs_received += 1
        if self._last_seq is not None and seq is not None and seq > self._last_seq + 2:
            self.pairs_missing += (seq - self._last_seq) // 2 - 1
        self._last_seq = seq

        rois_ready = self._update_rois(header, on, off, w, h)
        flat_ok = self._apply_flat_field(header.get("flat_field"), w, h)
        meta_on = dict(m_on, frame_seq=seq)
        meta_off = dict(m_off, frame_seq=seq)
        if rois_ready:
            result = self.proc.process(on, off, meta_on, meta_off)
        else:
            result = self._result_without_rois(meta_on, meta_off)
        result["calibration_id"] = header.get("calibration_id")  # every result records its calibration
        result["flat_field_applied"] = flat_ok
        result["t_done_ns"] = time.time_ns()
        result["pairs_received"] = self.pairs_received
        result["pairs_missing"] = self.pairs_missing
        self.push.send_multipart([b"result", bus_mod.pack(result)])
        now = time.monotonic()
        if now >= self._next_preview:
            self._next_preview = now + self.preview_period_s
            pw, ph, rgb = self.proc.preview(on, off)
            self.push.send_multipart([b"preview", bus_mod.pack({"width": pw, "height": ph, "format": "rgb8",
                                                                "frame_seq": seq}), rgb])
        return result

    def _update_rois(self, header: dict, on, off, width: int, height: int) -> bool:
        """Apply the ROIs the controller asks for. In automatic mode the search runs again
        every ``AUTO_ROI_REFRESH_S`` (the field of view moves during surgery); an unchanged
        answer keeps the running average. Returns whether ROIs are in place."""
        from services.processing.pipeline import Roi

        roi = header["roi"]
        now = time.monotonic()
        if roi != "auto":
            if header["roi_version"] != self._roi_version:
                self.proc.set_rois(Roi(*roi["signal"]), Roi(*roi["background"]))
                self._roi_version = header["roi_version"]
            return True
        if header["roi_version"] != self._roi_version or now >= self._next_auto_roi:
            from services.processing.roi import auto_rois

            self._next_auto_roi = now + AUTO_ROI_REFRESH_S
            if header["roi_version"] != self._roi_version:
                self._auto_rois = None  # coming from boxes set by command: apply what is found
                self._roi_version = header["roi_version"]
            try:
                found = auto_rois((on, off), width, height)
            except NirfError as err:
                if self._auto_rois is not None:
                    log.info("automatic ROI: nothing found (%s)", err)
                self._auto_rois = None
            else:
                if found != self._auto_rois:
                    self.proc.set_rois(*found)
                    self._auto_rois = found
        return self._auto_rois is not None

    def _result_without_rois(self, meta_on: dict, meta_off: dict) -> dict:
        """A result that says why there is no number: no fluorescent region was found."""
        return {"frame_seq": meta_on["frame_seq"], "t_capture_ns": max(meta_on["t_end_ns"], meta_off["t_end_ns"]),
                "intensity": None, "signal_mean": None, "background_mean": None, "sbr": None, "cnr": None,
                "saturated_fraction": None, "valid": False, "flags": ["no_roi"], "positive": False,
                "threshold": self.cfg.processing.sbr_threshold, "roi": None}

    def _apply_flat_field(self, name: str | None, width: int, height: int) -> bool:
        """Load and apply the named flat field when the name (or the processor) changed;
        True when a flat field is applied. A map that cannot be used is logged and the
        pairs are processed uncorrected (``flat_field_applied`` false in the result)."""
        from services.imaging.calibration import load_flat_field

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
