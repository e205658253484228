"""The clinical workflow of the study process: cases, site captures, pathology and the
report (bus commands ``case.open``, ``case.close``, ``capture``, ``pathology.set``,
``report``), with the case store (:mod:`nirf.services.study.casestore`, ``<state_dir>/study.db``) and
the recorder process (:mod:`nirf.services.study.recorder`).

A capture, step by step:

1. checks: a case is open (``NO_CASE``), fluorescence acquisition runs while the laser
   emits (``WRONG_STATE``), no other capture runs (``BUSY``);
2. from now on every laser-on/laser-off pair the acquisition produces is forwarded by the
   imaging process to the recorder (``record.begin``; services/imaging/record_tap.py, never
   blocking: a pair the socket cannot take at once is counted and shows up as lost frames);
3. the next ``pairs`` valid results of pairs forwarded in step 2 are collected and averaged
   (in automatic-ROI mode only results whose ROIs were found after the request arrived:
   the pair headers ask processing for a fresh search; a capture whose results keep coming
   back not valid is refused with their reasons); the call needs SBR, intensity and CNR
   (:func:`nirf.services.processing.pipeline.call`);
4. the recorder is told which pairs those were (``end``); it writes exactly their frames
   and answers with the files, the frames lost and any error (a full disk refuses the
   capture: nothing is stored);
5. the capture is stored in the case store (one transaction) and announced on telemetry
   (``event`` of kind ``capture``).

In the ``device`` profile (or with ``[processing] capture_requires_calibration``) a
capture needs a valid flat field and a passed QC check of the day; ``override_reason``
takes it anyway, and the capture stores the override with the reason and the problems.

A capture is a long command: it runs in the study process's worker and blocks only the
request that started it (PRODUCT S14); the safety core never waits for it, and a capture
stops, refused with ``WRONG_STATE``, when the laser stops emitting or acquisition stops.

Files: ``<state_dir>/captures/<case_id>/<capture_id>/pair<index>-frame<frame_seq>.ome.tiff``,
one OME-TIFF per pair (laser-on plane, laser-off plane), plus the DICOM files when enabled.
A capture folder appears complete or not at all (the recorder renames it into place). A
folder whose capture never reached the case store (the controller died in between) is
moved aside to a hidden ``.orphan-...`` name at the next start, so every visible capture
folder belongs to a stored capture.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from nirf.hal.errors import Busy, DeviceError, DeviceTimeout, InvalidArgument, NoCase, WrongState
from nirf.services.common import ipc
from nirf.services.study.casestore import SITES, CaseStore, LABEL_MAX_CHARS, wall_clock_synchronised
from nirf.services.study.recorder import CAPTURES_FOLDER

log = logging.getLogger(__name__)

DEVICE = "recorder"
DEFAULT_PAIRS = 8
MAX_PAIRS = 64
CALIBRATION_ID = "nominal"  # when the controller names no stored calibration
# A capture waits at most this long beyond the nominal time for its results, and for the
# recorder this long plus a little per pair (each pair is two fsynced files).
RESULTS_MARGIN_S = 5.0
RECORDER_BASE_TIMEOUT_S = 10.0
RECORDER_PER_PAIR_S = 0.5
# How long to wait for the acquisition thread to hand over the last needed pair.
HANDOVER_TIMEOUT_S = 2.0
_POLL_S = 0.2
# A capture gives up once this many (at least; 3 per pair asked for) of its results were not
# valid, and names their reasons.
INVALID_MIN = 12


class _Collecting:
    """The capture that is currently collecting pairs; the pairs themselves go from the
    imaging process to the recorder (services/imaging/record_tap.py)."""

    def __init__(self, capture_id: str, case_id: str, folder: str, extra: dict, t_request_ns: int = 0):
        self.capture_id = capture_id
        self.t_request_ns = t_request_ns  # wall clock: automatic ROIs must be found after it
        self.case_id = case_id
        self.folder = folder
        self.extra = extra
        self.forwarded: set[int] = set()
        self.first_seq: int | None = None
        self.first_on_meta: dict | None = None
        self.sent = 0
        self.not_sent = 0

    def update(self, status: dict) -> None:
        seqs = [s for s in status.get("forwarded") or [] if isinstance(s, int)]
        self.forwarded = set(seqs)
        if seqs and self.first_seq is None:
            self.first_seq = seqs[0]
        self.sent = int(status.get("sent") or 0)
        self.not_sent = int(status.get("not_sent") or 0)
        if self.first_on_meta is None and isinstance(status.get("first_on_meta"), dict):
            self.first_on_meta = status["first_on_meta"]


class Clinical:
    """The clinical commands of a running :class:`~services.imaging.main.ControllerService`.

    Construct it after the service's ZeroMQ context exists (``service.start``); register
    :meth:`handlers` with the command server, call :meth:`on_pair` for every pair the
    acquisition produces and :meth:`close` when the service stops.
    """

    def __init__(self, service, *, store: CaseStore | None = None,
                 clock_sync: Callable[[], bool | None] = wall_clock_synchronised):
        self.service = service
        # Whether the wall clock is synchronised (injectable for tests); in the device
        # profile case.open and capture are refused while it is not, unless overridden.
        self.clock_sync = clock_sync
        self.cfg = service.cfg
        self.state_dir = Path(service.state_dir)
        self.runtime_dir = Path(service.runtime_dir)
        self.store = store or CaseStore.from_config(self.state_dir / "study.db", self.cfg)
        self._send_lock = threading.Lock()
        self._capture_lock = threading.Lock()
        self._collecting: _Collecting | None = None
        self._closed = False
        self._clock_synced: bool | None = None
        self._clock_override: str | None = None
        self.pairs_not_sent = 0  # over the service's life, for diagnostics
        ctx: zmq.Context = service.ctx
        self._acks = ctx.socket(zmq.PULL)
        self._acks.setsockopt(zmq.LINGER, 0)
        self._acks.bind(f"ipc://{self.runtime_dir / 'record_ack.ipc'}")
        case = self.store.current_case()
        self._case_id: str | None = case["case_id"] if case else None
        if self._case_id:
            log.info("case %s is still open from before; carrying on", self._case_id)
        self._set_orphans_aside()

    # ------------------------------------------------------------------ wiring
    def handlers(self) -> dict[str, Callable[[dict, Any], Any]]:
        """The bus commands this class serves."""
        return {"case.open": self.cmd_case_open, "case.close": self.cmd_case_close,
                "capture": self.cmd_capture, "pathology.set": self.cmd_pathology_set,
                "margin.set": self.cmd_margin_set, "followup.add": self.cmd_followup_add,
                "ae.add": self.cmd_ae_add, "case.correct": self.cmd_case_correct, "report": self.cmd_report,
                "backup": self.cmd_backup}

    def current_case_id(self) -> str | None:
        """The open case's id (for the status map), or ``None``."""
        return self._case_id

    def close(self) -> None:
        """Release the sockets and the case store (idempotent)."""
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            self._collecting = None
            for s in (self._acks,):
                try:
                    s.close(linger=0)
                except zmq.ZMQError:
                    pass
        self.store.close()

    # ------------------------------------------------------------------ commands
    def cmd_case_open(self, args: dict, caller=None) -> dict:
        """``case.open``: open a case; returns it with the dose and hours since injection.
        v2: ``surgery_date``, ``centre_id``, ``exclusions_confirmed`` (required in the
        ``device`` profile), ``clock_override_reason`` (see :meth:`_clock_gate`)."""
        _only(args, {"case_id", "histology", "arm", "weight_kg", "injection_time", "surgery_date",
                     "centre_id", "exclusions_confirmed", "clock_override_reason"}, "case.open")
        for key in ("case_id", "histology", "arm"):
            if key not in args:
                raise InvalidArgument(f"case.open: {key} is required")
        synced, override = self._clock_gate("case.open", args)
        case = self.store.open_case(args["case_id"], args["histology"], args["arm"],
                                    weight_kg=args.get("weight_kg"),
                                    injection_time=args.get("injection_time"),
                                    clock_synchronised=synced, surgery_date=args.get("surgery_date"),
                                    centre_id=args.get("centre_id"),
                                    exclusions_confirmed=args.get("exclusions_confirmed"),
                                    clock_override_reason=override, by=_who(caller))
        self._case_id = case["case_id"]
        self._event("case_opened", case_id=case["case_id"], histology=case["histology"], arm=case["arm"],
                    warnings=case.get("warnings", []))
        return case

    def _clock_gate(self, cmd: str, args: dict) -> tuple[bool | None, str | None]:
        """The clock's state, and the override reason when one is needed and given. In the
        ``device`` profile a clock that is not known to be synchronised refuses ``cmd``
        with ``WRONG_STATE`` unless ``clock_override_reason`` says why to go ahead (it is
        recorded with the record and as a deviation)."""
        try:
            synced = self.clock_sync()
        except Exception:  # an unreadable clock state counts as not synchronised
            log.exception("clock synchronisation state unavailable")
            synced = None
        reason = args.get("clock_override_reason")
        if reason is not None and (not isinstance(reason, str) or not reason.strip()):
            raise InvalidArgument(f"clock_override_reason = {reason!r}: expected a non-empty text")
        if synced is True or getattr(self.cfg, "profile", "sim") != "device":
            return synced, None
        if reason is None:
            raise WrongState(f"{cmd} refused: the wall clock is not synchronised (state "
                             f"{'unknown' if synced is None else 'unsynchronised'}); times and hours since "
                             f"injection would be wrong. Wait for time synchronisation, or give "
                             f"clock_override_reason to go ahead (it is recorded)")
        return synced, reason

    def cmd_case_close(self, args: dict, caller=None) -> dict:
        """``case.close``: close the open case (``NO_CASE`` when none)."""
        _only(args, set(), "case.close")
        if self._capture_lock.locked():
            raise Busy("a capture is running; close the case when it has finished")
        case = self.store.close_case()
        self._case_id = None
        self._event("case_closed", case_id=case["case_id"], captures=case.get("capture_count"))
        return case

    def cmd_pathology_set(self, args: dict, caller=None) -> dict:
        """``pathology.set``: pathology's finding for a capture (``margin_positive`` or v2
        ``status``, ``blinded``, ``reason`` when it changes an earlier entry)."""
        _only(args, {"capture_id", "margin_positive", "status", "blinded", "reason"}, "pathology.set")
        if "capture_id" not in args or ("margin_positive" not in args and "status" not in args):
            raise InvalidArgument("pathology.set needs capture_id (str) and status (positive, close, negative, "
                                  "indeterminate) or margin_positive (true/false)")
        result = self.store.set_pathology(args["capture_id"], args.get("status"),
                                          margin_positive=args.get("margin_positive"),
                                          blinded=args.get("blinded"), reason=args.get("reason"),
                                          by=_who(caller))
        self._audit("pathology_set", capture_id=result["capture_id"], status=result["status"],
                    by=_who(caller), reason=result["reason"])
        return result

    def cmd_margin_set(self, args: dict, caller=None) -> dict:
        """``margin.set``: the patient's final margin status (every arm)."""
        _only(args, {"case_id", "status", "reason"}, "margin.set")
        if "case_id" not in args or "status" not in args:
            raise InvalidArgument("margin.set needs case_id and status (positive, close, negative, indeterminate)")
        result = self.store.set_margin(args["case_id"], args["status"], reason=args.get("reason"),
                                       by=_who(caller))
        self._audit("margin_set", case_id=result["case_id"], status=result["status"], by=_who(caller))
        return result

    def cmd_followup_add(self, args: dict, caller=None) -> dict:
        """``followup.add``: a follow-up visit (``reason`` when it corrects a visit)."""
        _only(args, {"case_id", "visit_date", "local_recurrence", "reason"}, "followup.add")
        for key in ("case_id", "visit_date", "local_recurrence"):
            if key not in args:
                raise InvalidArgument(f"followup.add: {key} is required")
        result = self.store.add_followup(args["case_id"], args["visit_date"], args["local_recurrence"],
                                         reason=args.get("reason"), by=_who(caller))
        self._audit("followup_added", case_id=result["case_id"], visit_date=result["visit_date"],
                    by=_who(caller))
        return result

    def cmd_ae_add(self, args: dict, caller=None) -> dict:
        """``ae.add``: an adverse event."""
        _only(args, {"case_id", "term", "grade", "related", "onset"}, "ae.add")
        for key in ("case_id", "term", "grade", "related", "onset"):
            if key not in args:
                raise InvalidArgument(f"ae.add: {key} is required")
        result = self.store.add_adverse_event(args["case_id"], args["term"], args["grade"], args["related"],
                                              args["onset"], by=_who(caller))
        self._audit("ae_added", case_id=result["case_id"], grade=result["grade"], by=_who(caller))
        return result

    def cmd_case_correct(self, args: dict, caller=None) -> dict:
        """``case.correct`` (added): correct a case field entered wrongly, with a reason."""
        _only(args, {"case_id", "field", "value", "reason"}, "case.correct")
        for key in ("case_id", "field", "value", "reason"):
            if key not in args:
                raise InvalidArgument(f"case.correct: {key} is required")
        result = self.store.correct_case(args["case_id"], args["field"], args["value"], reason=args["reason"],
                                         by=_who(caller))
        self._audit("case_corrected", case_id=result["case_id"], field=args["field"], by=_who(caller))
        return result

    def cmd_report(self, args: dict, caller=None) -> dict:
        """``report``: the study report, optionally for one histology/arm or re-scored at an
        SBR ``threshold``; an observer's leaves out the comparative outcomes."""
        _only(args, {"histology", "arm", "threshold"}, "report")
        comparative = getattr(caller, "role", "operator") == "operator"
        return self.store.report(histology=args.get("histology"), arm=args.get("arm"),
                                 threshold=args.get("threshold"), comparative=comparative)

    def cmd_backup(self, args: dict, caller=None) -> dict:
        """``backup``: a consistent online copy of the case store (services.study.backup)."""
        from nirf.services.study.backup import BACKUPS_FOLDER, backup

        _only(args, {"dest"}, "backup")
        dest = args.get("dest", str(self.state_dir / BACKUPS_FOLDER))
        if not isinstance(dest, str) or not dest:
            raise InvalidArgument(f"backup: dest = {dest!r}: a folder path (str)")
        return backup(self.store.path, dest)

    def cmd_capture(self, args: dict, caller=None) -> dict:
        """``capture``: average the next valid results, record their frames, store it."""
        t_request_ns = time.time_ns()
        _only(args, {"site", "label", "pairs", "clock_override_reason", "override_reason"}, "capture")
        site = args.get("site")
        if site not in SITES:
            raise InvalidArgument(f"site = {site!r}: allowed {', '.join(SITES)}")
        label = args.get("label", "")
        if not isinstance(label, str) or len(label) > LABEL_MAX_CHARS:
            raise InvalidArgument(f"label = {label!r}: a string of at most {LABEL_MAX_CHARS} characters")
        pairs = args.get("pairs", DEFAULT_PAIRS)
        if isinstance(pairs, bool) or not isinstance(pairs, int) or not 1 <= pairs <= MAX_PAIRS:
            raise InvalidArgument(f"pairs = {pairs!r}: a whole number from 1 to {MAX_PAIRS}")
        override = self._calibration_gate(args.get("override_reason"), caller)
        case = self.store.current_case()
        if case is None:
            raise NoCase("no case is open; open one with case.open before capturing")
        synced, override_clock = self._clock_gate("capture", args)
        self._check_imaging()
        if not self._capture_lock.acquire(blocking=False):
            raise Busy("another capture is running; try again when it has finished")
        try:
            # read by _capture when it stores the capture (set under the capture lock)
            self._clock_synced, self._clock_override = synced, override_clock
            return self._capture(case, site, label, pairs, t_request_ns, override)
        finally:
            self._capture_lock.release()

    # ------------------------------------------------------------------ the capture
    def _calibration_gate(self, reason, caller) -> dict | None:
        """Refuse a capture without a valid flat field and a passed QC of the day where
        that is required (the device profile); an ``override_reason`` lets it through and
        is returned for the capture to store."""
        if reason is not None and (not isinstance(reason, str) or not reason.strip()
                                   or len(reason) > LABEL_MAX_CHARS):
            raise InvalidArgument(f"override_reason = {reason!r}: a non-empty string of at most "
                                  f"{LABEL_MAX_CHARS} characters")
        required = self.cfg.profile == "device" or bool(getattr(self.cfg.processing,
                                                                 "capture_requires_calibration", False))
        calibration = getattr(self.service, "calibration", None)
        if not required or calibration is None:
            return None
        problems = calibration.capture_problems()
        if not problems:
            return None
        if reason is None:
            raise WrongState("capture refused: " + "; ".join(problems) + ". Calibrate and run QC, or give "
                             "override_reason to capture anyway (it is stored with the capture)")
        override = {"reason": reason.strip(), "problems": problems, "by": getattr(caller, "name", None),
                    "t_ns": time.time_ns()}
        log.warning("capture without calibration, overridden by %s: %s (%s)", override["by"], override["reason"],
                    "; ".join(problems))
        return override

    def _check_imaging(self) -> None:
        from nirf.controller.state import State

        state = self.service.cart.state
        mode = self.service.acquisition.mode
        if state is not State.EMITTING or mode != "fluorescence":
            raise WrongState(f"capture needs fluorescence acquisition while the laser emits; state is "
                             f"{getattr(state, 'value', state)}, acquisition {mode}")

    def _capture(self, case: dict, site: str, label: str, pairs: int, t_request_ns: int = 0,
                 override: dict | None = None) -> dict:
        case_id = case["case_id"]
        capture_id = self.store.next_capture_id()
        folder = f"{CAPTURES_FOLDER}/{case_id}/{capture_id}"
        self._set_aside(self.state_dir / folder)
        filt = dict(getattr(self.service, "filter", {}) or {})
        extra = {"site": site, "label": label, "filter_name": filt.get("name"),
                 "software_version": self.store.software_version, "config_sha256": self.cfg.sha256}
        c = _Collecting(capture_id, case_id, folder, extra, t_request_ns)
        started = time.monotonic()
        self._drain_acks()
        imaging = self.service.imaging
        imaging.call("record.begin", {"capture_id": capture_id, "case_id": case_id, "folder": folder,
                                      "extra": extra, "t_request_ns": t_request_ns})
        self._collecting = c
        try:
            results = self._collect(c, pairs)
            needed = [r["frame_seq"] for r in results]
            self._await_handover(c, needed)
            c.update(imaging.call("record.stop", {"capture_id": capture_id}))
        except BaseException:
            self._collecting = None
            try:
                c.update(imaging.call("record.stop", {"capture_id": capture_id}))
            except Exception:
                log.exception("capture %s: the recording could not be stopped", capture_id)
            self._abandon(c)
            raise
        self._collecting = None
        if c.sent == 0:
            raise DeviceError(DEVICE, f"capture {capture_id}: none of {c.not_sent} pair(s) could be handed to "
                                      f"the recorder (is the recorder running?); capture refused")
        summary = _average(results, self.cfg.processing)
        first_roi = results[0].get("roi") if isinstance(results[0].get("roi"), dict) else {}
        # What the recorder's DICOM report carries (PRODUCT.md section 9).
        measurements = {"sbr": summary["sbr"], "intensity": summary["intensity"], "cnr": summary["cnr"],
                        "rois": first_roi, "site": site, "label": label, "t_ns": _capture_t_ns(results)}
        done = self._finish_recording(c, needed, pairs, measurements)
        if done.get("errors"):
            first = done["errors"][0]
            raise DeviceError(DEVICE, f"capture {capture_id} refused: {first.get('message')}")
        meta = c.first_on_meta or {}
        settings = {
            "exposure_us": meta.get("exposure_us"), "gain": meta.get("gain"), "fps": self.service.fps,
            "width": meta.get("width"), "height": meta.get("height"), "laser_mw": meta.get("laser_mw"),
            "laser_setpoint_mw": getattr(self.service.cart, "setpoint_mw", None),
            "filter": filt, "frame_seqs": needed, "pairs_not_sent": c.not_sent,
            "pairs_forwarded": c.sent + c.not_sent, "recording": done.get("gaps", {}),
            "missing_pairs": done.get("missing_pairs", []),
            "collect_s": round(time.monotonic() - started, 3),
            "call": {k: summary[k] for k in ("criteria_met", "criteria_failed", "intensity_floor", "cnr_floor")},
            "roi_search": {k: results[0].get(k) for k in ("roi_mode", "roi_generation", "roi_found_ns",
                                                          "roi_frame_seq")},
            "request_ns": t_request_ns,
        }
        if override is not None:
            settings["override"] = override
        first_result = results[0]
        rois = first_result.get("roi") if isinstance(first_result.get("roi"), dict) else {}
        stored = self.store.add_capture(
            site, label, sbr=summary["sbr"], intensity=summary["intensity"], cnr=summary["cnr"],
            positive=summary["positive"], threshold=summary["threshold"], pairs=len(results), rois=rois,
            settings=settings, files=done["files"], t_ns=_capture_t_ns(results), capture_id=capture_id,
            calibration_id=self._calibration_id(), clock_synchronised=self._clock_synced,
            frames_lost=int(done.get("frames_lost", 0)), clock_override_reason=self._clock_override,
            intensity_floor=_floor(self.cfg, "intensity_floor"), cnr_floor=_floor(self.cfg, "cnr_floor"))
        reply = {"capture_id": capture_id, "sbr": summary["sbr"], "intensity": summary["intensity"],
                 "cnr": summary["cnr"], "positive": summary["positive"], "threshold": summary["threshold"],
                 "files": done["files"], "site": site, "label": label, "pairs": len(results),
                 "frames_lost": stored["frames_lost"], "warnings": stored.get("warnings", []),
                 "criteria_met": summary["criteria_met"], "criteria_failed": summary["criteria_failed"],
                 "roi": rois, "override": override}
        self._event("capture", case_id=case_id, capture_id=capture_id, site=site, label=label,
                    sbr=summary["sbr"], positive=summary["positive"], threshold=summary["threshold"],
                    files=len(done["files"]), frames_lost=stored["frames_lost"],
                    override=None if override is None else override["reason"],
                    warnings=[w.get("kind") for w in stored.get("warnings", [])])
        return reply

    def _collect(self, c: _Collecting, pairs: int) -> list[dict]:
        """The next ``pairs`` valid results of pairs forwarded to the recorder, with
        automatic ROIs found after the request. Refused with the results' reasons when
        they keep coming back not valid."""
        fps = float(self.service.fps or 1.0)
        timeout_s = RESULTS_MARGIN_S + 3.0 * pairs * 2.0 / max(fps, 1.0)
        deadline = time.monotonic() + timeout_s
        got: list[dict] = []
        seen: set[int] = set()
        reasons: dict[str, int] = {}
        not_valid = 0
        give_up = max(3 * pairs, INVALID_MIN)
        while len(got) < pairs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeviceTimeout("capture", f"only {len(got)} of {pairs} valid result(s) within "
                                               f"{timeout_s:.1f} s{_reasons_text(reasons)}; capture refused")
            # Short waits so a laser or acquisition stop ends the capture at once.
            batch = self.service.wait_results(pairs - len(got), min(_POLL_S, remaining), valid_only=False)
            for r in batch:
                seq = r.get("frame_seq")
                if not isinstance(seq, int) or seq in seen:
                    continue
                if seq not in c.forwarded and (c.first_seq is None or seq <= c.first_seq):
                    c.update(self.service.imaging.call("record.status", {"capture_id": c.capture_id}))
                # A result of a pair sent before the capture started has no frames here.
                ours = seq in c.forwarded or (c.first_seq is not None and seq > c.first_seq)
                if not ours:
                    continue
                if "roi_pending" in (r.get("flags") or []) or (
                        r.get("roi_mode") == "auto" and not (isinstance(r.get("roi_found_ns"), int)
                                                             and r["roi_found_ns"] >= c.t_request_ns)):
                    continue  # no ROIs yet, or found before the request: the scene may have changed since
                seen.add(seq)
                if not r.get("valid"):
                    not_valid += 1
                    for flag in r.get("flags") or ["not_valid"]:
                        reasons[flag] = reasons.get(flag, 0) + 1
                    if not_valid >= give_up:
                        # the same refusal as the timeout (clients know it), sooner and with reasons
                        raise DeviceTimeout("capture", f"only {len(got)} of {pairs} valid result(s): {not_valid} "
                                                       f"not valid{_reasons_text(reasons)}; capture refused")
                    continue
                got.append(r)
                if len(got) == pairs:
                    break
            if len(got) < pairs:
                self._check_imaging()
        return got

    def _calibration_id(self) -> str:
        """The calibration in use, when the controller has one; else "nominal"."""
        calibration = getattr(self.service, "calibration", None)
        try:
            value = calibration.current_id() if calibration is not None else None
        except Exception:  # a broken calibration store must not lose the capture
            log.exception("calibration id unavailable")
            value = None
        return value if isinstance(value, str) and value else CALIBRATION_ID

    def _await_handover(self, c: _Collecting, needed: list[int]) -> None:
        """A result can overtake the forwarding of its own pair by a hair; wait (bounded)
        until imaging has forwarded every needed pair."""
        deadline = time.monotonic() + HANDOVER_TIMEOUT_S
        while not set(needed) <= c.forwarded:
            if time.monotonic() > deadline:
                log.warning("capture %s: pair(s) %s never came through the acquisition", c.capture_id,
                            sorted(set(needed) - c.forwarded))
                return
            c.update(self.service.imaging.call("record.status", {"capture_id": c.capture_id}))
            if not set(needed) <= c.forwarded:
                time.sleep(0.02)

    def _abandon(self, c: _Collecting) -> None:
        """Tell the recorder to drop what it holds of a refused capture. Best effort and
        brief: a recorder that misses it drops the pairs anyway at the next capture."""
        if c.sent:
            self._send_end(c, [], timeout_s=0.2)

    def _send_end(self, c: _Collecting, frame_seqs: list[int], timeout_s: float = 2.0,
                  measurements: dict | None = None) -> bool:
        """Queue the end message behind the capture's pairs (imaging holds the socket)."""
        args = {"capture_id": c.capture_id, "case_id": c.case_id, "folder": c.folder,
                "frame_seqs": list(frame_seqs), "timeout_s": timeout_s}
        if measurements is not None:
            args["measurements"] = measurements
        try:
            self.service.imaging.call("record.end", args, timeout_s=timeout_s + 2.0)
            return True
        except Exception as err:
            log.error("capture %s: the end message was not queued: %s", c.capture_id, err)
            return False

    def _finish_recording(self, c: _Collecting, needed: list[int], pairs: int,
                          measurements: dict | None = None) -> dict:
        timeout_s = RECORDER_BASE_TIMEOUT_S + RECORDER_PER_PAIR_S * pairs
        if not self._send_end(c, needed, timeout_s=timeout_s / 2, measurements=measurements):
            raise DeviceTimeout(DEVICE, f"capture {c.capture_id}: the recorder took no message within "
                                        f"{timeout_s / 2:.1f} s (is it running?); capture refused")
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeviceTimeout(DEVICE, f"capture {c.capture_id}: no answer from the recorder within "
                                            f"{timeout_s:.1f} s (is it running?); capture refused")
            if not self._acks.poll(int(min(remaining, _POLL_S) * 1000) + 1):
                continue
            frames = self._acks.recv_multipart()
            try:
                done = ipc.unpack_map(frames[1]) if len(frames) >= 2 and frames[0] == b"done" else None
            except ValueError:
                done = None
            if not isinstance(done, dict) or done.get("capture_id") != c.capture_id:
                continue  # a late answer to an earlier, abandoned capture
            return done

    def _drain_acks(self) -> None:
        while self._acks.poll(0):
            self._acks.recv_multipart()

    # ------------------------------------------------------------------ folders
    def _set_aside(self, folder: Path) -> None:
        """Move a capture folder that no stored capture owns out of sight (hidden name)."""
        if not folder.exists():
            return
        target = folder.with_name(f".orphan-{folder.name}-{time.time_ns()}")
        try:
            folder.rename(target)
            log.warning("capture folder %s belongs to no stored capture (interrupted before it was "
                        "stored); moved to %s", folder, target.name)
        except OSError as err:
            raise DeviceError(DEVICE, f"capture folder {folder} exists without a stored capture and "
                                      f"cannot be moved aside: {err.strerror or err}") from err

    def _set_orphans_aside(self) -> None:
        root = self.state_dir / CAPTURES_FOLDER
        if not root.is_dir():
            return
        for case_dir in root.iterdir():
            if not case_dir.is_dir() or case_dir.name.startswith("."):
                continue
            for folder in case_dir.iterdir():
                if not folder.is_dir() or folder.name.startswith("."):
                    continue
                try:
                    self.store.get_capture(folder.name)
                except InvalidArgument:
                    try:
                        self._set_aside(folder)
                    except DeviceError as err:
                        log.error("%s", err)

    # ------------------------------------------------------------------ telemetry
    def _audit(self, kind: str, **detail) -> None:
        # Study entries are audited but not published: telemetry reaches the surgical
        # display, which must not show pathology or outcomes.
        try:
            self.service.audit.write(kind, **detail)
        except Exception:
            log.exception("entry %s not audited", kind)

    def _event(self, kind: str, **detail) -> None:
        try:
            self.service.telemetry.publish("event", {"kind": kind, **detail})
        except Exception:  # telemetry is best effort; the record is in the case store
            log.exception("event %s not published", kind)
        try:
            self.service.audit.write(kind, **detail)
        except Exception:
            log.exception("event %s not audited", kind)


def _who(caller) -> str:
    """The name of the caller's key (the person, on the device), for the record."""
    name = getattr(caller, "name", None)
    return name if isinstance(name, str) and name else "unknown"


def _floor(cfg, key: str) -> float | None:
    """A processing floor (minimum intensity or CNR for a positive call) when configured."""
    try:
        value = cfg.processing.as_dict().get(key)
    except AttributeError:
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _only(args: dict, allowed: set, cmd: str) -> None:
    extra = sorted(set(map(str, args)) - allowed)
    if extra:
        allowed_text = ", ".join(sorted(allowed)) or "none"
        raise InvalidArgument(f"{cmd}: unknown argument {extra[0]!r}; allowed: {allowed_text}")


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _average(results: list[dict], processing) -> dict:
    """One capture's figures from its results, as the pipeline averages: the mean of the
    per-pair ROI means (the ROIs have the same pixels in every pair), SBR the ratio of the
    averaged means (a mean of per-pair ratios would be biased upward by noise), CNR against
    the mean background spread, intensity the mean; the call on those
    (:func:`nirf.services.processing.pipeline.call`: SBR, intensity and CNR must all reach their limits).
    ``processing`` is the ``[processing]`` configuration (its floors and threshold)."""
    from nirf.services.processing.pipeline import call

    default_threshold = float(processing.sbr_threshold)
    threshold = results[-1].get("threshold", default_threshold) if results else default_threshold
    intensity_floor = float(getattr(processing, "intensity_floor_cps_mw", 0.0))
    cnr_floor = float(getattr(processing, "cnr_floor", 0.0))
    signal = _mean([r.get("signal_mean") for r in results])
    background = _mean([r.get("background_mean") for r in results])
    spread = _mean([r.get("background_std") for r in results])
    if signal is not None and background is not None:
        sbr = signal / background if background > 0 else None
        cnr = (signal - background) / spread if spread else None
    else:
        sbr = _mean([r.get("sbr") for r in results])
        cnr = _mean([r.get("cnr") for r in results])
    intensity = _mean([r.get("intensity") for r in results])
    positive, met, failed = call(sbr, intensity, cnr, sbr_threshold=float(threshold),
                                 intensity_floor=intensity_floor, cnr_floor=cnr_floor)
    return {"sbr": sbr, "intensity": intensity, "cnr": cnr,
            "positive": None if sbr is None else bool(positive), "threshold": float(threshold),
            "criteria_met": met, "criteria_failed": failed, "intensity_floor": intensity_floor,
            "cnr_floor": cnr_floor}


def _reasons_text(reasons: dict[str, int]) -> str:
    """``" (not valid: motion 12, saturated 3)"``, or nothing when there are none."""
    if not reasons:
        return ""
    parts = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return f" (not valid: {parts})"


def _capture_t_ns(results: list[dict]) -> int | None:
    """The capture's wall time: the capture time of its last pair (else now)."""
    times = [r.get("t_capture_ns") for r in results if isinstance(r.get("t_capture_ns"), int)]
    return max(times) if times else None
