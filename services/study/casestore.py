"""The study's case records: cases, site captures, pathology and warnings, in SQLite
(PRODUCT.md D1, C4).

Durability: the database runs in WAL mode with ``synchronous=FULL``, so a transaction
that has returned is on disk and survives a power cut; every write is one transaction
(``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error). Foreign keys are enforced
and the schema carries its version in ``PRAGMA user_version``.

Privacy: a case is known only by a pseudonymous study code (``case_id``); no field holds
a patient's name, and ids that look like names (spaces, no digit) are refused.

One case is open at a time. Opening a second one is refused with
:class:`~hal.errors.WrongState` (close the open case first); the rule is also enforced by a
unique index, so two processes cannot break it. A case left open by a crash is still the
open case when the store is opened again, so the session can carry on.

Captures, pathology and the report follow the bus protocol (``case.open``,
``case.close``, ``capture``, ``pathology.set``, ``report``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import sqlite3
import tempfile
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TextIO

from hal.clock import Clock, SystemClock
from hal.errors import DeviceError, InvalidArgument, NoCase, WrongState
from services.study.report import ARMS, HISTOLOGIES, build_report

log = logging.getLogger(__name__)

DEVICE = "case-store"
SCHEMA_VERSION = 1

SITES = ("gross_tumor", "tumor_bed", "specimen_cross_section")
ARM_CONTROL = "control"
ARM_PER_KG = "icg_0.25mg_per_kg"
ARM_FIXED = "icg_25mg"
WEIGHT_RANGE_KG = (1.0, 400.0)
LABEL_MAX_CHARS = 80
_CASE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NS_PER_HOUR = 3_600_000_000_000
# How long a writer waits for another connection's lock before failing (bounded).
_BUSY_TIMEOUT_S = 5.0

_SCHEMA = f"""
CREATE TABLE cases (
    case_id            TEXT PRIMARY KEY,
    histology          TEXT NOT NULL CHECK (histology IN ({", ".join(repr(h) for h in HISTOLOGIES)})),
    arm                TEXT NOT NULL CHECK (arm IN ({", ".join(repr(a) for a in ARMS)})),
    weight_kg          REAL,
    dose_mg            REAL NOT NULL CHECK (dose_mg >= 0),
    injection_time     TEXT,
    injection_t_ns     INTEGER,
    opened_at          TEXT NOT NULL,
    opened_t_ns        INTEGER NOT NULL,
    closed_at          TEXT,
    closed_t_ns        INTEGER,
    clock_synchronised INTEGER,
    software_version   TEXT NOT NULL,
    config_hash        TEXT NOT NULL
);
CREATE UNIQUE INDEX one_open_case ON cases ((closed_at IS NULL)) WHERE closed_at IS NULL;

CREATE TABLE captures (
    capture_id            TEXT PRIMARY KEY,
    case_id               TEXT NOT NULL REFERENCES cases (case_id),
    site                  TEXT NOT NULL CHECK (site IN ({", ".join(repr(s) for s in SITES)})),
    label                 TEXT NOT NULL,
    t_ns                  INTEGER NOT NULL,
    captured_at           TEXT NOT NULL,
    hours_since_injection REAL,
    pairs                 INTEGER,
    sbr                   REAL,
    intensity             REAL,
    cnr                   REAL,
    positive              INTEGER CHECK (positive IN (0, 1)),
    threshold             REAL,
    rois                  TEXT NOT NULL,
    settings              TEXT NOT NULL,
    files                 TEXT NOT NULL,
    software_version      TEXT NOT NULL,
    config_hash           TEXT NOT NULL,
    calibration_id        TEXT NOT NULL,
    clock_synchronised    INTEGER,
    frames_lost           INTEGER NOT NULL CHECK (frames_lost >= 0)
);
CREATE INDEX captures_by_case ON captures (case_id, t_ns);

CREATE TABLE pathology (
    capture_id      TEXT PRIMARY KEY REFERENCES captures (capture_id),
    margin_positive INTEGER NOT NULL CHECK (margin_positive IN (0, 1)),
    entered_at      TEXT NOT NULL,
    entered_t_ns    INTEGER NOT NULL
);

CREATE TABLE events (
    event_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id    TEXT REFERENCES cases (case_id),
    capture_id TEXT REFERENCES captures (capture_id),
    t_ns       INTEGER NOT NULL,
    at         TEXT NOT NULL,
    kind       TEXT NOT NULL,
    message    TEXT NOT NULL,
    detail     TEXT NOT NULL
);
CREATE INDEX events_by_case ON events (case_id, event_id);
"""

# Columns of the CSV export, in order: the case, then the capture, then pathology.
CSV_COLUMNS = (
    "case_id", "histology", "arm", "weight_kg", "dose_mg", "injection_time", "opened_at",
    "closed_at", "case_clock_synchronised",
    "capture_id", "site", "label", "captured_at", "t_ns", "hours_since_injection", "pairs",
    "sbr", "intensity", "cnr", "positive", "threshold", "rois", "settings", "files",
    "software_version", "config_hash", "calibration_id", "clock_synchronised", "frames_lost",
    "margin_positive", "pathology_entered_at",
)


def _software_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("nirf-cart")
        except PackageNotFoundError:
            return "unknown"
    except ImportError:  # pragma: no cover - always present on 3.11
        return "unknown"


def wall_clock_synchronised() -> bool | None:
    """Whether systemd-timesyncd reports the wall clock synchronised; ``None`` when that
    cannot be told (no timesyncd). A Pi has no real-time clock: until synchronised, wall
    times (and so hours since injection) can be far off, which each record notes."""
    flag_dir = Path("/run/systemd/timesync")
    if not flag_dir.is_dir():
        return None
    return (flag_dir / "synchronized").exists()


def _iso_from_ns(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns / 1e9, tz=timezone.utc).isoformat(timespec="milliseconds")


def _json_default(value: Any) -> Any:
    # numpy scalars arrive from processing results; JSON knows only Python numbers.
    for attr in ("tolist", "item"):
        if hasattr(value, attr):
            return getattr(value, attr)()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _to_json(name: str, value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"{name} cannot be stored as JSON: {err}") from err


# --- argument checks ---------------------------------------------------------------


def validate_case_id(case_id: Any, name: str = "case_id") -> str:
    """Check a pseudonymous id: 1-64 characters of letters, digits, ``_ . -``, starting
    with a letter or digit, with at least one digit (study codes have one; names do not)."""
    if not isinstance(case_id, str):
        raise InvalidArgument(f"{name} = {case_id!r}: expected a string such as 'DFSP-014'")
    if any(ch.isspace() for ch in case_id):
        raise InvalidArgument(f"{name} = {case_id!r}: contains spaces and looks like a name; "
                              f"use the study's pseudonymous code (no patient names)")
    if not _CASE_ID_RE.fullmatch(case_id):
        raise InvalidArgument(f"{name} = {case_id!r}: allowed 1-64 characters of A-Z a-z 0-9 "
                              f"_ . -, starting with a letter or digit")
    if not any(ch.isdigit() for ch in case_id):
        raise InvalidArgument(f"{name} = {case_id!r}: has no digit and may be a name; use the "
                              f"study's pseudonymous code (e.g. 'DFSP-014'; no patient names)")
    return case_id


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise InvalidArgument(f"{name} = {value!r}: allowed one of "
                              f"{', '.join(repr(a) for a in allowed)}")
    return value


def _number(name: str, value: Any, *, optional: bool = False, lo: float | None = None,
            hi: float | None = None) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{name} = {value!r}: expected a finite number")
    value = float(value)
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise InvalidArgument(f"{name} = {value:g}: allowed {lo:g} to {hi:g}")
    return value


def _optional_bool(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} = {value!r}: expected true or false")
    return int(value)


def _parse_injection_time(value: Any) -> tuple[str, int]:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"injection_time = {value!r}: expected ISO 8601 with a time zone, "
                              f"e.g. '2024-05-02T08:30:00+02:00'")
    try:
        when = datetime.fromisoformat(value)
    except ValueError as err:
        raise InvalidArgument(f"injection_time = {value!r}: not ISO 8601 (e.g. "
                              f"'2024-05-02T08:30:00+02:00')") from err
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidArgument(f"injection_time = {value!r}: has no time zone; add one, e.g. "
                              f"'+02:00' or 'Z'")
    delta = when - datetime(1970, 1, 1, tzinfo=timezone.utc)
    t_ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
    return when.isoformat(), t_ns


def _label(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"label = {value!r}: expected a string such as \"12 o'clock\"")
    if len(value) > LABEL_MAX_CHARS or any(not ch.isprintable() for ch in value):
        raise InvalidArgument(f"label = {value!r}: at most {LABEL_MAX_CHARS} printable characters")
    return value


def _csv_safe(text: str) -> str:
    # A spreadsheet would run a cell starting with these as a formula.
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


# --- the store ---------------------------------------------------------------------


class CaseStore:
    """The case database (one SQLite file).

    ``clock`` gives the wall time stamped on every record (``time_ns``). ``fixed_dose_mg``
    and ``dose_mg_per_kg`` set the doses of the fixed and per-kg arms;
    ``imaging_window_h`` the ``[earliest, latest]`` hours after injection outside which a
    capture is stored with a warning event. All three come from the ``[study]`` config
    section (:meth:`from_config`). ``software_version`` and ``config_hash`` are stamped on
    every case and capture.

    Thread-safe: one connection, used under a lock. Errors: bad input raises
    :class:`~hal.errors.InvalidArgument` naming the value and what is allowed; a database
    failure raises :class:`~hal.errors.DeviceError` for device ``"case-store"``.
    """

    def __init__(self, path: str | os.PathLike, *, clock: Clock | None = None,
                 fixed_dose_mg: float = 25.0, dose_mg_per_kg: float = 0.25,
                 imaging_window_h: Sequence[float] = (18.0, 30.0),
                 software_version: str | None = None, config_hash: str = ""):
        self.path = Path(path)
        self.clock = clock if clock is not None else SystemClock()
        self.fixed_dose_mg = _number("fixed_dose_mg", fixed_dose_mg, lo=0.0, hi=1000.0)
        self.dose_mg_per_kg = _number("dose_mg_per_kg", dose_mg_per_kg, lo=0.0, hi=100.0)
        window = tuple(imaging_window_h)
        if len(window) != 2 or not all(isinstance(v, (int, float)) for v in window) \
                or not window[0] < window[1]:
            raise InvalidArgument(f"imaging_window_h = {imaging_window_h!r}: expected "
                                  f"[earliest, latest] hours with earliest < latest")
        self.imaging_window_h = (float(window[0]), float(window[1]))
        self.software_version = software_version or _software_version()
        self.config_hash = config_hash
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: the module opens no implicit transactions; this class
            # issues BEGIN IMMEDIATE / COMMIT itself, so every write is exactly one.
            self._conn = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_S,
                                         isolation_level=None, check_same_thread=False)
            self._conn.row_factory = sqlite3.Row
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise DeviceError(DEVICE, f"database {self.path}: journal mode {mode!r}, "
                                          f"WAL required (is it on a file system without shared memory?)")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as err:
            self.close()
            raise DeviceError(DEVICE, f"cannot open database {self.path}: {err}") from err
        except Exception:
            self.close()
            raise
        log.info("case store %s open (schema %d)", self.path, SCHEMA_VERSION)

    @classmethod
    def from_config(cls, path: str | os.PathLike, config: Any, *,
                    clock: Clock | None = None) -> "CaseStore":
        """A store using the ``[study]`` section of a validated config and its hash."""
        study = config.study
        return cls(path, clock=clock, fixed_dose_mg=study.fixed_dose_mg,
                   dose_mg_per_kg=study.dose_mg_per_kg,
                   imaging_window_h=study.imaging_window_h,
                   config_hash=getattr(config, "sha256", ""))

    # --- plumbing ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    def __enter__(self) -> "CaseStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DeviceError(DEVICE, f"database {self.path} is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back on error."""
        with self._lock:
            db = self._db()
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as err:
                raise DeviceError(DEVICE, f"database {self.path}: cannot start a write: {err}") from err
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error as rb_err:
                    log.error("rollback failed on %s: %s", self.path, rb_err)
                if isinstance(exc, sqlite3.Error):
                    raise DeviceError(DEVICE, f"database {self.path}: write failed: {exc}") from exc
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent read (one snapshot for the block)."""
        with self._lock:
            db = self._db()
            try:
                db.execute("BEGIN")
                try:
                    yield db
                finally:
                    db.execute("COMMIT")
            except sqlite3.Error as err:
                raise DeviceError(DEVICE, f"database {self.path}: read failed: {err}") from err

    def _migrate(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == SCHEMA_VERSION:
                return
            if version > SCHEMA_VERSION:
                raise DeviceError(DEVICE, f"database {self.path} has schema version {version}, "
                                          f"newer than this software's {SCHEMA_VERSION}; "
                                          f"update the software")
            # version 0: a new file. (Later versions add their steps here.)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def pragmas(self) -> dict:
        """The connection's durability settings, for self-tests: ``journal_mode``,
        ``synchronous`` (2 = FULL), ``foreign_keys``, ``user_version``."""
        with self._lock:
            db = self._db()
            return {name: db.execute(f"PRAGMA {name}").fetchone()[0]
                    for name in ("journal_mode", "synchronous", "foreign_keys", "user_version")}

    def _event(self, db: sqlite3.Connection, case_id: str | None, kind: str, message: str,
               capture_id: str | None = None, t_ns: int | None = None, **detail: Any) -> dict:
        t_ns = self.clock.time_ns() if t_ns is None else t_ns
        db.execute("INSERT INTO events (case_id, capture_id, t_ns, at, kind, message, detail) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (case_id, capture_id, t_ns, _iso_from_ns(t_ns), kind, message,
                    _to_json("event detail", detail)))
        log.warning("case %s: %s", case_id, message)
        return {"kind": kind, "message": message}

    def _window_warning(self, db: sqlite3.Connection, case_id: str, hours: float | None,
                        capture_id: str | None, t_ns: int) -> dict | None:
        lo, hi = self.imaging_window_h
        if hours is None or lo <= hours <= hi:
            return None
        what = f"capture {capture_id}" if capture_id else "case opened"
        return self._event(db, case_id, "outside_imaging_window",
                           f"{what} at {hours:.1f} h after injection, outside the study window "
                           f"{lo:g}-{hi:g} h", capture_id=capture_id, t_ns=t_ns,
                           hours_since_injection=hours, window_h=[lo, hi])

    # --- cases ------------------------------------------------------------------------

    def _dose_mg(self, arm: str, weight_kg: float | None) -> float:
        if arm == ARM_CONTROL:
            return 0.0
        if arm == ARM_FIXED:
            return self.fixed_dose_mg
        return round(self.dose_mg_per_kg * weight_kg, 6)

    def _case_dict(self, row: sqlite3.Row, db: sqlite3.Connection) -> dict:
        case = {
            "case_id": row["case_id"],
            "histology": row["histology"],
            "arm": row["arm"],
            "weight_kg": row["weight_kg"],
            "dose_mg": row["dose_mg"],
            "injection_time": row["injection_time"],
            "hours_since_injection": None,
            "opened_at": row["opened_at"],
            "closed_at": row["closed_at"],
            "clock_synchronised": None if row["clock_synchronised"] is None else bool(row["clock_synchronised"]),
            "capture_count": db.execute("SELECT COUNT(*) FROM captures WHERE case_id = ?",
                                   (row["case_id"],)).fetchone()[0],
        }
        if row["injection_t_ns"] is not None:
            # Hours now for an open case; at closing for a closed one.
            ref_ns = row["closed_t_ns"] if row["closed_t_ns"] is not None else self.clock.time_ns()
            case["hours_since_injection"] = (ref_ns - row["injection_t_ns"]) / _NS_PER_HOUR
        return case

    def open_case(self, case_id: str, histology: str, arm: str, weight_kg: float | None = None,
                  injection_time: str | None = None, *,
                  clock_synchronised: bool | None = None) -> dict:
        """Open a case and make it the current one; returns it with ``dose_mg`` and
        ``hours_since_injection`` (now) and ``warnings`` (e.g. outside the imaging window).

        ``weight_kg`` (1-400) is required for the per-kg arm, ``injection_time`` (ISO 8601
        with a time zone) for both ICG arms; the control arm takes no injection time.
        Raises ``WrongState`` while another case is open, ``InvalidArgument`` for bad
        input or a case id already used.
        """
        validate_case_id(case_id)
        _choice("histology", histology, HISTOLOGIES)
        _choice("arm", arm, ARMS)
        if arm == ARM_PER_KG and weight_kg is None:
            raise InvalidArgument(f"weight_kg is required for arm {ARM_PER_KG!r} (the dose is "
                                  f"{self.dose_mg_per_kg:g} mg/kg); allowed {WEIGHT_RANGE_KG[0]:g} "
                                  f"to {WEIGHT_RANGE_KG[1]:g} kg")
        weight = None if weight_kg is None else _number("weight_kg", weight_kg, lo=WEIGHT_RANGE_KG[0],
                                                        hi=WEIGHT_RANGE_KG[1])
        if arm == ARM_CONTROL:
            if injection_time not in (None, ""):
                raise InvalidArgument(f"injection_time = {injection_time!r}: the control arm "
                                      f"receives no ICG; leave injection_time out")
            injection_iso, injection_ns = None, None
        else:
            injection_iso, injection_ns = _parse_injection_time(injection_time)
        synced = _optional_bool("clock_synchronised", clock_synchronised)
        dose = self._dose_mg(arm, weight)
        now_ns = self.clock.time_ns()
        warnings = []
        with self._write() as db:
            open_row = db.execute("SELECT case_id FROM cases WHERE closed_at IS NULL").fetchone()
            if open_row is not None:
                raise WrongState(f"case {open_row['case_id']!r} is open; close it before opening "
                                 f"case {case_id!r} (one case at a time)")
            if db.execute("SELECT 1 FROM cases WHERE case_id = ?", (case_id,)).fetchone():
                raise InvalidArgument(f"case_id = {case_id!r}: already used in this study; "
                                      f"each case id is used once")
            db.execute(
                "INSERT INTO cases (case_id, histology, arm, weight_kg, dose_mg, injection_time, "
                "injection_t_ns, opened_at, opened_t_ns, clock_synchronised, software_version, "
                "config_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (case_id, histology, arm, weight, dose, injection_iso, injection_ns,
                 _iso_from_ns(now_ns), now_ns, synced, self.software_version, self.config_hash))
            if injection_ns is not None:
                hours = (now_ns - injection_ns) / _NS_PER_HOUR
                w = self._window_warning(db, case_id, hours, None, now_ns)
                if w:
                    warnings.append(w)
            if synced == 0:
                warnings.append(self._event(db, case_id, "clock_not_synchronised",
                                            "wall clock not synchronised at case opening; times "
                                            "and hours since injection may be off", t_ns=now_ns))
            row = db.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
            case = self._case_dict(row, db)
        case["warnings"] = warnings
        log.info("case %s opened (%s, %s, %.3f mg)", case_id, histology, arm, dose)
        return case

    def close_case(self) -> dict:
        """Close the open case; returns it. ``NoCase`` when none is open."""
        now_ns = self.clock.time_ns()
        with self._write() as db:
            row = db.execute("SELECT case_id FROM cases WHERE closed_at IS NULL").fetchone()
            if row is None:
                raise NoCase("no case is open")
            db.execute("UPDATE cases SET closed_at = ?, closed_t_ns = ? WHERE case_id = ?",
                       (_iso_from_ns(now_ns), now_ns, row["case_id"]))
            case = self._case_dict(db.execute("SELECT * FROM cases WHERE case_id = ?",
                                              (row["case_id"],)).fetchone(), db)
        log.info("case %s closed", case["case_id"])
        return case

    def current_case(self) -> dict | None:
        """The open case (with hours since injection now), or ``None``."""
        with self._read() as db:
            row = db.execute("SELECT * FROM cases WHERE closed_at IS NULL").fetchone()
            return None if row is None else self._case_dict(row, db)

    def get_case(self, case_id: str) -> dict:
        """A case by id; ``InvalidArgument`` when unknown."""
        with self._read() as db:
            row = db.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
            if row is None:
                raise InvalidArgument(f"case_id = {case_id!r}: no such case")
            return self._case_dict(row, db)

    def cases(self) -> list[dict]:
        """Every case, oldest first."""
        with self._read() as db:
            return [self._case_dict(r, db)
                    for r in db.execute("SELECT * FROM cases ORDER BY opened_t_ns, case_id")]

    # --- captures ---------------------------------------------------------------------

    def next_capture_id(self) -> str:
        """The id the next capture of the open case will get by default (for naming its
        files before it is stored). ``NoCase`` without an open case."""
        with self._read() as db:
            return self._next_capture_id(db)

    def _next_capture_id(self, db: sqlite3.Connection) -> str:
        row = db.execute("SELECT case_id FROM cases WHERE closed_at IS NULL").fetchone()
        if row is None:
            raise NoCase("no case is open; open one with case.open before capturing")
        case_id = row["case_id"]
        n = db.execute("SELECT COUNT(*) FROM captures WHERE case_id = ?", (case_id,)).fetchone()[0]
        # Skip ids taken by captures stored under explicit ids.
        for k in range(n + 1, n + 1 + 10_000):
            candidate = f"{case_id}-c{k:03d}"
            if not db.execute("SELECT 1 FROM captures WHERE capture_id = ?", (candidate,)).fetchone():
                return candidate
        raise DeviceError(DEVICE, f"no free capture id for case {case_id!r}")  # pragma: no cover

    def add_capture(self, site: str, label: str = "", *, sbr: float | None,
                    intensity: float | None, cnr: float | None, positive: bool | None,
                    threshold: float | None, pairs: int | None = None,
                    rois: Mapping | None = None, settings: Mapping | None = None,
                    files: Sequence | Mapping | None = None, t_ns: int | None = None,
                    capture_id: str | None = None, calibration_id: str = "",
                    clock_synchronised: bool | None = None, frames_lost: int = 0,
                    software_version: str | None = None, config_hash: str | None = None) -> dict:
        """Store one site capture in the open case; returns it (with ``capture_id``,
        ``hours_since_injection`` and ``warnings``).

        ``t_ns``: the capture's wall time (default now). ``rois``, ``settings`` and
        ``files`` are stored as JSON. A capture outside the imaging window, with lost
        frames, or with an unsynchronised clock is stored with a warning event.
        ``NoCase`` without an open case; ``InvalidArgument`` for bad input.
        """
        _choice("site", site, SITES)
        label = _label(label)
        values = {
            "sbr": _number("sbr", sbr, optional=True),
            "intensity": _number("intensity", intensity, optional=True),
            "cnr": _number("cnr", cnr, optional=True),
            "threshold": _number("threshold", threshold, optional=True),
        }
        positive_int = _optional_bool("positive", positive)
        synced = _optional_bool("clock_synchronised", clock_synchronised)
        if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1):
            raise InvalidArgument(f"pairs = {pairs!r}: expected a whole number >= 1")
        if isinstance(frames_lost, bool) or not isinstance(frames_lost, int) or frames_lost < 0:
            raise InvalidArgument(f"frames_lost = {frames_lost!r}: expected a whole number >= 0")
        if t_ns is None:
            t_ns = self.clock.time_ns()
        elif isinstance(t_ns, bool) or not isinstance(t_ns, int) or t_ns < 0:
            raise InvalidArgument(f"t_ns = {t_ns!r}: expected a wall time in ns (>= 0)")
        if capture_id is not None:
            validate_case_id(capture_id, "capture_id")
        if not isinstance(calibration_id, str):
            raise InvalidArgument(f"calibration_id = {calibration_id!r}: expected a string")
        rois_json = _to_json("rois", rois if rois is not None else {})
        settings_json = _to_json("settings", settings if settings is not None else {})
        files_json = _to_json("files", files if files is not None else [])
        warnings = []
        with self._write() as db:
            case = db.execute("SELECT * FROM cases WHERE closed_at IS NULL").fetchone()
            if case is None:
                raise NoCase("no case is open; open one with case.open before capturing")
            case_id = case["case_id"]
            if capture_id is None:
                capture_id = self._next_capture_id(db)
            elif db.execute("SELECT 1 FROM captures WHERE capture_id = ?", (capture_id,)).fetchone():
                raise InvalidArgument(f"capture_id = {capture_id!r}: already used")
            hours = None
            if case["injection_t_ns"] is not None:
                hours = (t_ns - case["injection_t_ns"]) / _NS_PER_HOUR
            db.execute(
                "INSERT INTO captures (capture_id, case_id, site, label, t_ns, captured_at, "
                "hours_since_injection, pairs, sbr, intensity, cnr, positive, threshold, rois, "
                "settings, files, software_version, config_hash, calibration_id, "
                "clock_synchronised, frames_lost) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (capture_id, case_id, site, label, t_ns, _iso_from_ns(t_ns), hours, pairs,
                 values["sbr"], values["intensity"], values["cnr"], positive_int,
                 values["threshold"], rois_json, settings_json, files_json,
                 software_version or self.software_version,
                 self.config_hash if config_hash is None else config_hash,
                 calibration_id, synced, frames_lost))
            w = self._window_warning(db, case_id, hours, capture_id, t_ns)
            if w:
                warnings.append(w)
            if frames_lost:
                warnings.append(self._event(db, case_id, "frames_lost",
                                            f"capture {capture_id}: {frames_lost} frame(s) lost "
                                            f"from the recording", capture_id=capture_id,
                                            t_ns=t_ns, frames_lost=frames_lost))
            if synced == 0:
                warnings.append(self._event(db, case_id, "clock_not_synchronised",
                                            f"capture {capture_id}: wall clock not synchronised; "
                                            f"hours since injection may be off",
                                            capture_id=capture_id, t_ns=t_ns))
            capture = self._capture_dict(db.execute(
                "SELECT * FROM captures WHERE capture_id = ?", (capture_id,)).fetchone())
        capture["warnings"] = warnings
        log.info("case %s: capture %s stored (%s, sbr %s)", case_id, capture_id, site, values["sbr"])
        return capture

    @staticmethod
    def _capture_dict(row: sqlite3.Row) -> dict:
        capture = {key: row[key] for key in row.keys()}
        for key in ("rois", "settings", "files"):
            capture[key] = json.loads(capture[key])
        for key in ("positive", "clock_synchronised"):
            capture[key] = None if capture[key] is None else bool(capture[key])
        return capture

    def get_capture(self, capture_id: str) -> dict:
        """A capture by id (with ``margin_positive``, ``None`` until pathology is set);
        ``InvalidArgument`` when unknown."""
        with self._read() as db:
            row = db.execute("SELECT * FROM captures WHERE capture_id = ?", (capture_id,)).fetchone()
            if row is None:
                raise InvalidArgument(f"capture_id = {capture_id!r}: no such capture")
            capture = self._capture_dict(row)
            p = db.execute("SELECT margin_positive FROM pathology WHERE capture_id = ?",
                           (capture_id,)).fetchone()
            capture["margin_positive"] = None if p is None else bool(p[0])
            return capture

    def captures(self, case_id: str | None = None) -> list[dict]:
        """The captures of one case (default: the open one), in time order."""
        with self._read() as db:
            if case_id is None:
                row = db.execute("SELECT case_id FROM cases WHERE closed_at IS NULL").fetchone()
                if row is None:
                    raise NoCase("no case is open; name the case")
                case_id = row["case_id"]
            return [self._capture_dict(r) for r in db.execute(
                "SELECT * FROM captures WHERE case_id = ? ORDER BY t_ns, capture_id", (case_id,))]

    # --- pathology and the report --------------------------------------------------

    def set_pathology(self, capture_id: str, margin_positive: bool) -> dict:
        """Record pathology's finding for a capture (open or closed case). Entering it
        again replaces it and leaves a ``pathology_changed`` event. ``InvalidArgument``
        for an unknown capture or a finding that is not true/false."""
        if not isinstance(margin_positive, bool):
            raise InvalidArgument(f"margin_positive = {margin_positive!r}: expected true or false")
        if not isinstance(capture_id, str):
            raise InvalidArgument(f"capture_id = {capture_id!r}: expected a string")
        now_ns = self.clock.time_ns()
        with self._write() as db:
            row = db.execute("SELECT case_id, site FROM captures WHERE capture_id = ?",
                             (capture_id,)).fetchone()
            if row is None:
                raise InvalidArgument(f"capture_id = {capture_id!r}: no such capture")
            old = db.execute("SELECT margin_positive FROM pathology WHERE capture_id = ?",
                             (capture_id,)).fetchone()
            if old is not None and bool(old[0]) != margin_positive:
                self._event(db, row["case_id"], "pathology_changed",
                            f"capture {capture_id}: pathology changed from "
                            f"{'positive' if old[0] else 'negative'} to "
                            f"{'positive' if margin_positive else 'negative'}",
                            capture_id=capture_id, t_ns=now_ns, old=bool(old[0]),
                            new=margin_positive)
            db.execute("INSERT INTO pathology (capture_id, margin_positive, entered_at, entered_t_ns) "
                       "VALUES (?, ?, ?, ?) ON CONFLICT (capture_id) DO UPDATE SET "
                       "margin_positive = excluded.margin_positive, entered_at = excluded.entered_at, "
                       "entered_t_ns = excluded.entered_t_ns",
                       (capture_id, int(margin_positive), _iso_from_ns(now_ns), now_ns))
        log.info("capture %s: pathology margin %s", capture_id,
                 "positive" if margin_positive else "negative")
        return {"capture_id": capture_id, "case_id": row["case_id"], "site": row["site"],
                "margin_positive": margin_positive, "entered_at": _iso_from_ns(now_ns)}

    def report_rows(self) -> list[dict]:
        """The rows the report scores: tumor-bed captures that have pathology."""
        with self._read() as db:
            rows = db.execute(
                "SELECT c.histology, c.arm, cap.capture_id, cap.positive, p.margin_positive "
                "FROM captures AS cap JOIN cases AS c ON c.case_id = cap.case_id "
                "JOIN pathology AS p ON p.capture_id = cap.capture_id "
                "WHERE cap.site = 'tumor_bed' ORDER BY cap.t_ns, cap.capture_id").fetchall()
        return [{"histology": r["histology"], "arm": r["arm"], "capture_id": r["capture_id"],
                 "positive": None if r["positive"] is None else bool(r["positive"]),
                 "margin_positive": bool(r["margin_positive"])} for r in rows]

    def report(self, histology: str | None = None, arm: str | None = None) -> dict:
        """The diagnostic-accuracy report (protocol "The report"), optionally filtered."""
        if histology is not None:
            _choice("histology", histology, HISTOLOGIES)
        if arm is not None:
            _choice("arm", arm, ARMS)
        return build_report(self.report_rows(), histology=histology, arm=arm)

    # --- events and export ----------------------------------------------------------

    def events(self, case_id: str | None = None) -> list[dict]:
        """Warning events of one case (all cases when ``None``), oldest first."""
        with self._read() as db:
            if case_id is None:
                rows = db.execute("SELECT * FROM events ORDER BY event_id").fetchall()
            else:
                rows = db.execute("SELECT * FROM events WHERE case_id = ? ORDER BY event_id",
                                  (case_id,)).fetchall()
        return [{"event_id": r["event_id"], "case_id": r["case_id"], "capture_id": r["capture_id"],
                 "t_ns": r["t_ns"], "at": r["at"], "kind": r["kind"], "message": r["message"],
                 "detail": json.loads(r["detail"])} for r in rows]

    def _export_rows(self, case_id: str | None) -> list[list]:
        with self._read() as db:
            if case_id is not None and not db.execute(
                    "SELECT 1 FROM cases WHERE case_id = ?", (case_id,)).fetchone():
                raise InvalidArgument(f"case_id = {case_id!r}: no such case")
            query = (
                "SELECT c.case_id, c.histology, c.arm, c.weight_kg, c.dose_mg, c.injection_time, "
                "c.opened_at, c.closed_at, c.clock_synchronised AS case_clock_synchronised, "
                "cap.capture_id, cap.site, cap.label, cap.captured_at, cap.t_ns, "
                "cap.hours_since_injection, cap.pairs, cap.sbr, cap.intensity, cap.cnr, "
                "cap.positive, cap.threshold, cap.rois, cap.settings, cap.files, "
                "cap.software_version, cap.config_hash, cap.calibration_id, "
                "cap.clock_synchronised, cap.frames_lost, p.margin_positive, "
                "p.entered_at AS pathology_entered_at "
                "FROM captures AS cap JOIN cases AS c ON c.case_id = cap.case_id "
                "LEFT JOIN pathology AS p ON p.capture_id = cap.capture_id ")
            params: tuple = ()
            if case_id is not None:
                query += "WHERE c.case_id = ? "
                params = (case_id,)
            query += "ORDER BY c.opened_t_ns, c.case_id, cap.t_ns, cap.capture_id"
            rows = db.execute(query, params).fetchall()
        bool_columns = {"case_clock_synchronised", "positive", "clock_synchronised", "margin_positive"}
        out = []
        for r in rows:
            line = []
            for col in CSV_COLUMNS:
                v = r[col]
                if col in bool_columns and v is not None:
                    v = "true" if v else "false"
                elif col == "label":
                    v = _csv_safe(v)
                line.append("" if v is None else v)
            out.append(line)
        return out

    def export_csv(self, out_file: str | os.PathLike | TextIO, case_id: str | None = None) -> int:
        """Write one row per capture (case fields, capture fields, pathology) for one case
        or the whole study; returns the number of rows. A path is written atomically
        (temporary file, fsync, rename); an open text file is written as is."""
        rows = self._export_rows(case_id)
        if not isinstance(out_file, (str, os.PathLike)):
            writer = csv.writer(out_file)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)
            return len(rows)
        buf = io.StringIO(newline="")
        writer = csv.writer(buf)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
        target = os.fspath(out_file)
        folder = os.path.dirname(os.path.abspath(target))
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(target) + ".",
                                       suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            tmp = None
        except OSError as err:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            raise DeviceError(DEVICE, f"cannot write the export {target}: "
                                      f"{err.strerror or err}") from err
        log.info("exported %d capture row(s) to %s", len(rows), target)
        return len(rows)
