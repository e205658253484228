"""Calibration procedures run by command, and the calibrations in use.

Procedures, each a command on the control endpoint (operators only):

- ``calibrate.dark``: a master dark (the mean of N frames through the blocked filter) for
  the camera's current exposure and gain;
- ``calibrate.flat``: a flat-field gain map from laser-on minus laser-off pairs of a
  uniform fluorescent target (the relative excitation at each pixel);
- (``calibrate.power``, the duty-to-mW table, belongs to the safety core: controller/main.py);
- ``qc.baseline`` / ``qc.run``: the daily quality-control check against a reference target:
  mean intensity and SBR over N results compared with a stored baseline, pass or fail,
  appended to ``qc.jsonl`` and to the audit log.

``calibrate.status`` reports what is in use. Everything lives in ``<state_dir>/calibration/``:
one file per calibration, named by its id (``dark-<exposure_us>-<gain>-<stamp>.npy``,
``flat-<stamp>.npy``, ``power-<stamp>.json``), ``qc-baseline.json``, ``qc.jsonl`` and
``current.json`` naming the ones in use, read at start so a restart keeps the calibration.
Files are written atomically (temporary file, fsync, rename, fsync of the folder).

Every result records :meth:`Calibration.current_id`, ``p:<power id>|f:<flat id>|d:<dark id>``
(``nominal`` for the power table before any calibration, ``-`` for no flat field or no dark
for the current exposure and gain), so a number can always be traced to the calibration
that produced it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from nirf.controller.calibration import validate_power_points  # noqa: F401 (re-exported for tests)
from nirf.services.common.files import write_atomic
from nirf.controller.state import State
from nirf.hal.errors import (Busy, ConfigError, DeviceError, DeviceTimeout, InvalidArgument, NirfError,
                        NotPermitted, WrongState)

log = logging.getLogger(__name__)

FOLDER_NAME = "calibration"
CURRENT_FILE = "current.json"
QC_BASELINE_FILE = "qc-baseline.json"
QC_LOG_FILE = "qc.jsonl"

DARK_FRAMES_DEFAULT = 16
FLAT_PAIRS_DEFAULT = 16
MAX_FRAMES = 256  # per procedure: enough to beat down noise, small enough to finish in seconds
MIN_POWER_POINTS, MAX_POWER_POINTS = 2, 32
MAX_CALIBRATED_MW = 1000.0
PHOTODIODE_FACTOR_RANGE = (0.1, 10.0)
MAX_REASON_CHARS = 500

# A uniform target must give at least this mean difference (counts) over the centre of the
# field, else the flat field would be mostly noise.
MIN_FLAT_CENTRE_COUNTS = 10.0

# How often a wait re-checks its condition (seconds of the service's clock).
WAIT_POLL_S = 0.02
# Headroom on top of the frames' own duration when waiting for frames or results: the
# camera and the MCU's frame timing take a moment to start.
START_MARGIN_S = 3.0
# How many bytes from the end of qc.jsonl are read at start to find the last check.
QC_TAIL_BYTES = 64 * 1024


# ---------------------------------------------------------------------- small helpers
def utc_stamp(time_ns: int) -> str:
    """``20250102T030405.678Z``: a file-name-safe UTC time to the millisecond."""
    secs, ns = divmod(int(time_ns), 1_000_000_000)
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(secs)) + f".{ns // 1_000_000:03d}Z"


def utc_iso(time_ns: int) -> str:
    """ISO 8601 UTC time to the millisecond, for people reading a record."""
    secs, ns = divmod(int(time_ns), 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns // 1_000_000:03d}Z"


def dark_key(exposure_us: int, gain: float) -> str:
    """The key of a master dark: the exposure and the analogue gain it was taken at."""
    return f"{int(exposure_us)}-{float(gain):g}"


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_flat_field(folder: Path, name: str, width: int, height: int) -> np.ndarray:
    """The flat-field map stored as ``folder/name``, checked: a plain file name (no path),
    shape ``(height, width)``, finite and positive. Raises :class:`InvalidArgument`."""
    if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
        raise InvalidArgument(f"flat field: {name!r} is not a plain file name in the calibration folder")
    path = Path(folder) / name
    try:
        gain_map = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InvalidArgument(f"flat field {name}: cannot be read ({err})") from err
    if gain_map.shape != (height, width):
        raise InvalidArgument(f"flat field {name}: shape {gain_map.shape} does not match the frame "
                              f"({height}, {width})")
    if not np.all(np.isfinite(gain_map)) or not float(gain_map.min()) > 0.0:
        raise InvalidArgument(f"flat field {name}: values must be finite and above 0 "
                              f"(smallest {float(np.nanmin(gain_map)):.3g})")
    return gain_map.astype(np.float32, copy=False)


def _only(args: dict, allowed: set, cmd: str) -> None:
    if not isinstance(args, dict):
        raise InvalidArgument(f"{cmd}: arguments must be a map")
    extra = sorted(set(map(str, args)) - allowed)
    if extra:
        raise InvalidArgument(f"{cmd}: unknown argument {extra[0]!r}; allowed: "
                              f"{', '.join(sorted(allowed)) or 'none'}")


def _whole(cmd: str, name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgument(f"{cmd}: {name} = {value!r}, allowed whole numbers {lo} to {hi}")
    return value


def _number(cmd: str, name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{cmd}: {name} = {value!r} is not a finite number")
    if not lo <= value <= hi:
        raise InvalidArgument(f"{cmd}: {name} = {value!r} outside {lo} to {hi}")
    return float(value)


def qc_compare(measured: dict, baseline: dict, intensity_tolerance: float, sbr_tolerance: float) -> dict:
    """Compare a QC measurement with the baseline: each quantity's relative deviation
    against its tolerance, and ``passed`` when both are within."""
    out: dict = {}
    passed = True
    for key, tol in (("intensity", intensity_tolerance), ("sbr", sbr_tolerance)):
        ref = float(baseline[key])
        value = float(measured[key])
        deviation = (value - ref) / ref
        ok = abs(deviation) <= tol
        passed = passed and ok
        out[key] = {"measured": value, "baseline": ref, "deviation": round(deviation, 5),
                    "tolerance": tol, "ok": ok}
    out["passed"] = passed
    return out


# ---------------------------------------------------------------------- collectors
class _DarkCollector:
    """Sums dark frames (in the acquisition thread) until enough have arrived."""

    def __init__(self, wanted: int):
        self.wanted = wanted
        self.count = 0
        self.sum: np.ndarray | None = None
        self.meta = None
        self.skipped = 0
        self.done = threading.Event()

    def add(self, frame) -> None:
        if self.count >= self.wanted:
            return
        m = frame.meta
        if self.meta is None:
            self.meta = m
            self.sum = np.zeros(frame.data.shape, dtype=np.float64)
        elif (m.exposure_us, m.gain, frame.data.shape) != (self.meta.exposure_us, self.meta.gain, self.sum.shape):
            self.skipped += 1  # settings changed under us: not part of this master dark
            return
        self.sum += frame.data
        self.count += 1
        if self.count >= self.wanted:
            self.done.set()


class _FlatCollector:
    """Sums laser-on minus laser-off differences of pairs (in the acquisition thread)."""

    def __init__(self, wanted: int):
        self.wanted = wanted
        self.count = 0
        self.sum: np.ndarray | None = None
        self.meta = None
        self.saturated_pairs = 0
        self.skipped = 0
        self.done = threading.Event()
        self._diff: np.ndarray | None = None

    def add(self, on, off) -> None:
        if self.count >= self.wanted:
            return
        mo, mf = on.meta, off.meta
        if (mo.exposure_us, mo.gain) != (mf.exposure_us, mf.gain) or not mo.laser_mw > 0:
            self.skipped += 1  # not a usable lit/unlit pair of the same settings
            return
        if self.meta is None:
            self.meta = mo
            self.sum = np.zeros(on.data.shape, dtype=np.float64)
            self._diff = np.empty(on.data.shape, dtype=np.float32)
        elif (mo.exposure_us, mo.gain, on.data.shape) != (self.meta.exposure_us, self.meta.gain, self.sum.shape):
            self.skipped += 1
            return
        # a clipped pixel in the lit frame would under-state the excitation there
        if int(on.data.max()) >= (1 << int(mo.bits)) - 1:
            self.saturated_pairs += 1
        np.subtract(on.data, off.data, out=self._diff, dtype=np.float32)
        self.sum += self._diff
        self.count += 1
        if self.count >= self.wanted:
            self.done.set()


# ---------------------------------------------------------------------- the service part
class Calibration:
    """The calibration procedures of a running controller and the calibrations in use.

    ``service`` is the :class:`nirf.services.imaging.main.ControllerService` (or anything with
    the same attributes: ``cfg``, ``state_dir``, ``clock``, ``cart``, ``acquisition``,
    ``filter``, ``_move_filter``, ``wait_results``, ``audit``, ``telemetry``, ``roi``).
    Construction reads ``current.json`` and applies a stored power calibration to
    ``service.cart``; a stored file that cannot be read is logged and reported in
    ``calibrate.status`` under ``problems``, and the cart runs without it.
    """

    def __init__(self, service, *, clock=None):
        self.service = service
        self.clock = clock or service.clock
        self.folder = Path(service.state_dir) / FOLDER_NAME
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._flat: dict | None = None
        self._darks: dict[str, dict] = {}  # dark_key -> metadata
        self._flat_job: _FlatCollector | None = None
        self.qc_baseline: dict | None = None
        self.last_qc: dict | None = None
        self.problems: list[str] = []
        self._load()

    # ------------------------------------------------------------------ start-up
    def _problem(self, message: str) -> None:
        log.error("calibration: %s", message)
        self.problems.append(message)

    def _load(self) -> None:
        path = self.folder / CURRENT_FILE
        if path.exists():
            try:
                current = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(current, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as err:
                self._problem(f"{path.name} cannot be read ({err}); running uncalibrated")
                current = {}
            flat = current.get("flat")
            if flat is not None:
                if self._file_ok(flat, "flat field"):
                    self._flat = flat
            for key, meta in dict(current.get("darks") or {}).items():
                if self._file_ok(meta, "master dark"):
                    self._darks[key] = meta
        baseline = self.folder / QC_BASELINE_FILE
        if baseline.exists():
            try:
                self.qc_baseline = json.loads(baseline.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                self._problem(f"{baseline.name} cannot be read ({err}); run qc.baseline again")
        self.last_qc = self._last_qc_record()
        log.info("calibration in use: %s", self.current_id())

    def _file_ok(self, meta, what: str) -> bool:
        name = meta.get("file") if isinstance(meta, dict) else None
        if not isinstance(name, str) or Path(name).name != name or not (self.folder / name).is_file():
            self._problem(f"{what} {name or meta!r} named in {CURRENT_FILE} is missing; not used")
            return False
        return True

    def _last_qc_record(self) -> dict | None:
        path = self.folder / QC_LOG_FILE
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - QC_TAIL_BYTES))
                lines = f.read().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                return json.loads(line)
            except ValueError:
                continue  # a torn last line (crash while appending): look at the one before
        return None

    # ------------------------------------------------------------------ what results record
    def _camera_settings(self):
        return self.service.acquisition.camera.settings

    def _flat_usable(self, settings) -> bool:
        f = self._flat
        return f is not None and (f["width"], f["height"]) == (settings.width, settings.height)

    def current_id(self) -> str:
        """``p:<power id>|f:<flat id>|d:<dark id>`` for the calibrations applied now (the dark
        of the camera's current exposure and gain); ``-`` where there is none."""
        s = self._camera_settings()
        with self._lock:
            p = self.service.cart.power_calibration_id()
            f = self._flat["id"] if self._flat_usable(s) else "-"
            d = self._darks.get(dark_key(s.exposure_us, s.gain))
        return f"p:{p}|f:{f}|d:{d['id'] if d else '-'}"

    def flat_field_file(self) -> str | None:
        """The flat-field file (a name in the calibration folder) processing should apply,
        or None: none stored, or it was made for another frame size."""
        s = self._camera_settings()
        with self._lock:
            return self._flat["file"] if self._flat_usable(s) else None

    def capture_problems(self) -> list[str]:
        """Why a patient capture should not be taken now (PRODUCT.md section 7, v2): no
        valid flat field for the camera's frame size, no QC check today (the cart's local
        calendar day), or today's last QC check failed. Empty when all is well."""
        s = self._camera_settings()
        problems = []
        with self._lock:
            if not self._flat_usable(s):
                problems.append(f"no valid flat field for {s.width}x{s.height} (run calibrate.flat)")
            last = self.last_qc
        if last is None:
            problems.append("no QC check on record (run qc.run on the reference target)")
        else:
            import datetime as _dt

            now = _dt.datetime.fromtimestamp(self.clock.time_ns() / 1e9).date()
            created = last.get("created_ns")
            day = _dt.datetime.fromtimestamp(created / 1e9).date() if isinstance(created, int) else None
            if day != now:
                problems.append(f"no QC check today (the last, {last.get('id')}, was on {day}); run qc.run")
            elif not last.get("passed"):
                problems.append(f"today's last QC check {last.get('id')} failed; do not image patients "
                                "until a QC check passes")
        return problems

    def on_pair(self, on, off, header: dict | None = None) -> None:
        """The controller calls this for every laser-on/laser-off pair (acquisition thread).
        Costs one attribute read unless a flat-field calibration is collecting."""
        job = self._flat_job
        if job is None:
            return
        try:
            job.add(on, off)
        except Exception:  # a calibration bug must never stop the frame stream
            log.exception("flat-field collection failed on a pair")

    # ------------------------------------------------------------------ commands
    def handlers(self) -> dict:
        """The commands this adds to the control endpoint (all need the operator role)."""
        return {
            "calibrate.dark": self.cmd_dark,
            "calibrate.flat": self.cmd_flat,
            "calibrate.status": self.cmd_status,
            "qc.baseline": self.cmd_qc_baseline,
            "qc.run": self.cmd_qc_run,
        }

    def _wait(self, event: threading.Event, timeout_s: float) -> bool:
        deadline = self.clock.monotonic() + timeout_s
        while not event.is_set():
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return event.is_set()
            self.clock.sleep(min(WAIT_POLL_S, remaining))
        return True

    def _new_name(self, prefix: str, suffix: str) -> tuple[str, str, int]:
        """(id, file name, time_ns) for a new calibration file that does not exist yet."""
        t_ns = self.clock.time_ns()
        base = f"{prefix}-{utc_stamp(t_ns)}"
        for n in range(1, 10):  # same millisecond twice: a short suffix, a bounded number of tries
            cal_id = base if n == 1 else f"{base}-{n}"
            if not (self.folder / f"{cal_id}{suffix}").exists():
                return cal_id, f"{cal_id}{suffix}", t_ns
        raise Busy(f"calibration files named {base}* already exist; try again in a moment")

    def _save_current(self) -> None:
        with self._lock:
            current = {"flat": self._flat, "darks": dict(self._darks)}
        write_atomic(self.folder / CURRENT_FILE, _json_bytes(current))

    def _announce(self, what: str, meta: dict, caller, **extra) -> None:
        detail = {"what": what, "id": meta.get("id"), "calibration_id": self.current_id(),
                  "by": getattr(caller, "name", None), **extra}
        self.service.audit.write("calibration", **detail)
        try:
            self.service.telemetry.publish("event", {"kind": "calibration", **detail})
        except Exception:  # telemetry is best effort; the calibration is stored already
            log.exception("calibration event not published")

    # --- dark ---------------------------------------------------------------------------
    def cmd_dark(self, args, caller) -> dict:
        """``calibrate.dark {frames}``: the mean of N frames through the blocked filter, for
        the current exposure and gain. SAFE or ARMED with acquisition off."""
        cmd = "calibrate.dark"
        _only(args, {"frames"}, cmd)
        frames = _whole(cmd, "frames", args.get("frames", DARK_FRAMES_DEFAULT), 1, MAX_FRAMES)
        svc = self.service
        if svc.cart.state not in (State.SAFE, State.ARMED) or svc.acquisition.mode != "off":
            raise WrongState(f"{cmd} needs state SAFE or ARMED with acquisition off; state is "
                             f"{svc.cart.state.value}, acquisition {svc.acquisition.mode}")
        fw = svc.cfg.filter_wheel
        start_position = svc.filter.get("position")
        timeout_s = frames / svc.acquisition.fps * 2.0 + START_MARGIN_S
        warnings: list[str] = []
        svc._move_filter(fw.blocked_position)
        try:
            job = self._collect_frames(frames, timeout_s)
        finally:
            if start_position is not None and start_position != fw.blocked_position:
                try:
                    svc._move_filter(start_position)
                except DeviceError as err:
                    log.error("%s: could not move the filter wheel back: %s", cmd, err)
                    warnings.append(f"filter wheel not moved back to position {start_position}: {err}")
        if job.count < frames:
            raise DeviceTimeout("camera", f"{cmd}: only {job.count} of {frames} dark frames within "
                                          f"{timeout_s:.1f} s")
        master = (job.sum / job.count).astype(np.float32)
        m = job.meta
        cal_id, name, t_ns = self._new_name(f"dark-{dark_key(m.exposure_us, m.gain)}", ".npy")
        write_atomic(self.folder / name, _npy_bytes(master))
        meta = {"id": cal_id, "file": name, "created": utc_iso(t_ns), "created_ns": t_ns,
                "by": getattr(caller, "name", None), "exposure_us": int(m.exposure_us), "gain": float(m.gain),
                "width": int(master.shape[1]), "height": int(master.shape[0]), "frames": job.count,
                "mean_counts": round(float(master.mean()), 3), "std_counts": round(float(master.std()), 3),
                "black_level": int(m.black_level)}
        with self._lock:
            self._darks[dark_key(m.exposure_us, m.gain)] = meta
        self._save_current()
        self._announce("dark", meta, caller)
        return {**meta, "calibration_id": self.current_id(), "warnings": warnings}

    def _collect_frames(self, frames: int, timeout_s: float) -> _DarkCollector:
        acq = self.service.acquisition
        job = _DarkCollector(frames)
        old_sink = acq.on_frame
        acq.on_frame = job.add
        try:
            acq.start("dark")
            self._wait(job.done, timeout_s)
        finally:
            acq.stop()
            acq.on_frame = old_sink
        return job

    # --- flat field -----------------------------------------------------------------------
    def cmd_flat(self, args, caller) -> dict:
        """``calibrate.flat {pairs}``: a flat-field map from N pairs of a uniform target.
        Needs fluorescence acquisition running (state EMITTING)."""
        from nirf.services.processing.pipeline import flat_field_from_uniform

        cmd = "calibrate.flat"
        _only(args, {"pairs"}, cmd)
        pairs = _whole(cmd, "pairs", args.get("pairs", FLAT_PAIRS_DEFAULT), 1, MAX_FRAMES)
        svc = self.service
        if svc.acquisition.mode != "fluorescence":
            raise WrongState(f"{cmd} needs fluorescence acquisition running on a uniform target "
                             f"(laser.on, then acquire.start fluorescence); acquisition is {svc.acquisition.mode}")
        timeout_s = pairs * 2.0 / svc.acquisition.fps * 2.0 + START_MARGIN_S
        job = _FlatCollector(pairs)
        with self._lock:
            if self._flat_job is not None:
                raise Busy(f"{cmd}: a flat-field calibration is already collecting")
            self._flat_job = job
        try:
            self._wait(job.done, timeout_s)
        finally:
            with self._lock:
                self._flat_job = None
        if job.count < pairs:
            raise DeviceTimeout("camera", f"{cmd}: only {job.count} of {pairs} laser-on/laser-off pairs "
                                          f"within {timeout_s:.1f} s")
        if job.saturated_pairs:
            raise InvalidArgument(f"{cmd}: {job.saturated_pairs} of {pairs} laser-on frames reach full scale "
                                  f"({(1 << int(job.meta.bits)) - 1} counts); lower the laser power or the "
                                  "exposure and run it again")
        mean_diff = job.sum / job.count
        h, w = mean_diff.shape
        centre = float(mean_diff[h // 4: h - h // 4, w // 4: w - w // 4].mean())
        if centre < MIN_FLAT_CENTRE_COUNTS:
            raise InvalidArgument(f"{cmd}: the uniform target gives {centre:.1f} counts over the centre, "
                                  f"below the minimum {MIN_FLAT_CENTRE_COUNTS}; raise the power or exposure")
        gain_map = flat_field_from_uniform([mean_diff])
        cal_id, name, t_ns = self._new_name("flat", ".npy")
        write_atomic(self.folder / name, _npy_bytes(gain_map))
        m = job.meta
        meta = {"id": cal_id, "file": name, "created": utc_iso(t_ns), "created_ns": t_ns,
                "by": getattr(caller, "name", None), "width": int(w), "height": int(h), "pairs": job.count,
                "exposure_us": int(m.exposure_us), "gain": float(m.gain), "laser_mw": float(m.laser_mw),
                "centre_counts": round(centre, 2), "min_gain": round(float(gain_map.min()), 4),
                "max_gain": round(float(gain_map.max()), 4)}
        with self._lock:
            self._flat = meta
        self._save_current()
        self._announce("flat", meta, caller)
        return {**meta, "calibration_id": self.current_id()}

    # --- status -------------------------------------------------------------------------------
    def cmd_status(self, args, caller) -> dict:
        """``calibrate.status``: the ids and dates of what is in use, the stored darks, the QC
        baseline and the last QC check."""
        _only(args, set(), "calibrate.status")
        s = self._camera_settings()
        with self._lock:
            power = {"id": self.service.cart.power_calibration_id()}
            flat = dict(self._flat) if self._flat else None
            flat_in_use = self._flat_usable(s)
            darks = sorted((dict(d) for d in self._darks.values()), key=lambda d: (d["exposure_us"], d["gain"]))
            dark = self._darks.get(dark_key(s.exposure_us, s.gain))
        return {"calibration_id": self.current_id(), "power": power, "flat": flat, "flat_in_use": flat_in_use,
                "darks": darks, "dark_in_use": dark["id"] if dark else None,
                "qc_baseline": self.qc_baseline, "last_qc": self.last_qc,
                "problems": list(self.problems) + self._power_problems()}

    def _power_problems(self) -> list[str]:
        """The safety core's word on the power table (a stored table it refused, say)."""
        get = getattr(self.service.cart, "power_problems", None)
        try:
            return [str(p) for p in get()] if get is not None else []
        except Exception:  # a status must never fail for this
            log.exception("power problems unavailable")
            return []

    # --- quality control -------------------------------------------------------------------------
    def _qc_results(self, cmd: str, args) -> int:
        _only(args, {"results"}, cmd)
        return _whole(cmd, "results", args.get("results", self.service.cfg.calibration.qc_results), 1, MAX_FRAMES)

    def _measure(self, cmd: str, results: int) -> dict:
        svc = self.service
        if svc.acquisition.mode != "fluorescence":
            raise WrongState(f"{cmd} needs fluorescence acquisition running on the reference target; "
                             f"acquisition is {svc.acquisition.mode}")
        timeout_s = results * 2.0 / svc.acquisition.fps * 3.0 + START_MARGIN_S
        got = svc.wait_results(results, timeout_s)
        usable = [r for r in got if r.get("intensity") is not None and r.get("sbr") is not None]
        if len(usable) < results:
            raise DeviceTimeout("processing", f"{cmd}: only {len(usable)} of {results} valid results within "
                                              f"{timeout_s:.1f} s")
        intensity = [float(r["intensity"]) for r in usable]
        sbr = [float(r["sbr"]) for r in usable]
        cam = self._camera_settings()
        last = usable[-1]
        return {"results": len(usable),
                "intensity": statistics.fmean(intensity),
                "intensity_sd": statistics.stdev(intensity) if len(intensity) > 1 else 0.0,
                "sbr": statistics.fmean(sbr), "sbr_sd": statistics.stdev(sbr) if len(sbr) > 1 else 0.0,
                "exposure_us": cam.exposure_us, "gain": cam.gain, "power_mw": svc.cart.setpoint_mw,
                "roi": last.get("roi"), "calibration_id": last.get("calibration_id", self.current_id()),
                "frame_seq": [usable[0].get("frame_seq"), last.get("frame_seq")]}

    def cmd_qc_baseline(self, args, caller) -> dict:
        """``qc.baseline {results}``: measure the reference target and store it as the
        baseline later checks are compared with."""
        cmd = "qc.baseline"
        n = self._qc_results(cmd, args)
        m = self._measure(cmd, n)
        if not (m["intensity"] > 0 and m["sbr"] > 0):
            raise InvalidArgument(f"{cmd}: intensity {m['intensity']:.4g} and SBR {m['sbr']:.4g} must both be "
                                  "above 0 for a baseline; is the reference target in view?")
        cal_id, _, t_ns = self._new_name("qc-baseline", ".json")
        baseline = {"id": cal_id, "created": utc_iso(t_ns), "created_ns": t_ns,
                    "by": getattr(caller, "name", None), **m}
        write_atomic(self.folder / QC_BASELINE_FILE, _json_bytes(baseline))
        self.qc_baseline = baseline
        self._announce("qc.baseline", baseline, caller)
        return baseline

    def cmd_qc_run(self, args, caller) -> dict:
        """``qc.run {results}``: measure the reference target, compare with the baseline
        (intensity and SBR within the configured tolerances), log and publish the outcome."""
        cmd = "qc.run"
        n = self._qc_results(cmd, args)
        baseline = self.qc_baseline
        if baseline is None:
            raise WrongState(f"{cmd}: no QC baseline stored; run qc.baseline on the reference target first")
        m = self._measure(cmd, n)
        tol = self.service.cfg.calibration
        verdict = qc_compare(m, baseline, tol.qc_intensity_tolerance, tol.qc_sbr_tolerance)
        # Conditions that make the comparison questionable are recorded, not judged.
        differences = [f"{k}: baseline {baseline.get(k)!r}, now {m.get(k)!r}"
                       for k in ("exposure_us", "gain", "roi") if baseline.get(k) != m.get(k)]
        t_ns = self.clock.time_ns()
        record = {"id": f"qc-{utc_stamp(t_ns)}", "created": utc_iso(t_ns), "created_ns": t_ns,
                  "by": getattr(caller, "name", None), "passed": verdict["passed"], "baseline_id": baseline["id"],
                  "intensity": verdict["intensity"], "sbr": verdict["sbr"], "results": m["results"],
                  "calibration_id": m["calibration_id"], "power_mw": m["power_mw"], "differences": differences}
        self._append_qc(record)
        self.last_qc = record
        (log.info if record["passed"] else log.warning)(
            "QC %s: intensity %+.1f %% (tolerance %.0f %%), SBR %+.1f %% (tolerance %.0f %%)",
            "passed" if record["passed"] else "FAILED", 100 * verdict["intensity"]["deviation"],
            100 * tol.qc_intensity_tolerance, 100 * verdict["sbr"]["deviation"], 100 * tol.qc_sbr_tolerance)
        self.service.audit.write("qc", **record)
        try:
            self.service.telemetry.publish("event", {"kind": "qc", "id": record["id"], "passed": record["passed"],
                                                     "intensity_deviation": verdict["intensity"]["deviation"],
                                                     "sbr_deviation": verdict["sbr"]["deviation"]})
        except Exception:
            log.exception("QC event not published")
        return record

    def _append_qc(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        try:
            with open(self.folder / QC_LOG_FILE, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise NirfError(f"QC log {self.folder / QC_LOG_FILE}: cannot append the result ({err})") from err
