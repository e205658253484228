"""The study's records in SQLite (PRODUCT.md D1, D5, C4 and section 10): cases with their
enrolment checks, site captures, and the append-only entries of pathology, the patient's
margin status, follow-up visits and adverse events; the report and the export are made
from them (:meth:`CaseStore.dataset`).

Durability: the database runs in WAL mode with ``synchronous=FULL``, so a transaction
that has returned is on disk and survives a power cut; every write is one transaction
(``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error). Foreign keys are enforced
and the schema carries its version in ``PRAGMA user_version`` (version-1 files are
migrated when opened). Entries are append-only: triggers refuse to update or delete them,
and a correction is a new entry with its reason.

Privacy: a case is known only by a pseudonymous study code (``case_id``) that must match
the study's configured pattern; no field holds a patient's name.

Every record carries ``centre_id``, ``cart_id`` and a globally unique ``uid``; a patient
is ``(centre_id, case_id)``.

One case is open at a time. Opening a second one is refused with
:class:`~hal.errors.WrongState` (close the open case first); the rule is also enforced by a
unique index, so two processes cannot break it. A case left open by a crash is still the
open case when the store is opened again, so the session can carry on.

The commands follow the bus protocol (``case.open``, ``case.close``, ``capture``,
``pathology.set``, ``margin.set``, ``followup.add``, ``ae.add``, ``report``).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import sqlite3
import tempfile
import socket
import threading
import uuid
from contextlib import contextmanager
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TextIO

from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import DeviceError, InvalidArgument, NoCase, WrongState
from nirf.services.study.report import ARMS, HISTOLOGIES, STATUSES, ReportOptions, build_study_report
from nirf.services.study import records

log = logging.getLogger(__name__)

DEVICE = "case-store"
SCHEMA_VERSION = 2

SITES = ("gross_tumor", "tumor_bed", "specimen_cross_section")
ARM_CONTROL = "control"
ARM_PER_KG = "icg_0.25mg_per_kg"
ARM_FIXED = "icg_25mg"
# 20-200 kg keeps the per-kg dose at most 50 mg (PRODUCT.md section 10).
WEIGHT_RANGE_KG = (20.0, 200.0)
LABEL_MAX_CHARS = 80
TEXT_MAX_CHARS = 500
DEFAULT_CASE_ID_PATTERN = r"^[A-Z]{2,6}-[0-9]{3,5}$"
DEFAULT_CENTRE_ID = "CENTRE-01"
RELATED = ("not", "unlikely", "possible", "probable", "definite")
# Record ids other than the case's (capture ids): letters, digits and _ . - only.
_CASE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SITE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_NS_PER_HOUR = 3_600_000_000_000
# How long a writer waits for another connection's lock before failing (bounded).
_BUSY_TIMEOUT_S = 5.0

_HISTOLOGY_CHECK = ", ".join(repr(h) for h in HISTOLOGIES)
_ARM_CHECK = ", ".join(repr(a) for a in ARMS)
_SITE_CHECK = ", ".join(repr(s) for s in SITES)
_STATUS_CHECK = ", ".join(repr(s) for s in STATUSES)
_RELATED_CHECK = ", ".join(repr(r) for r in RELATED)
_NEW_UID = "lower(hex(randomblob(16)))"

# Version 1: cases, captures, one pathology row per capture (overwritten), events.
_SCHEMA_V1 = f"""
CREATE TABLE cases (
    case_id            TEXT PRIMARY KEY,
    histology          TEXT NOT NULL CHECK (histology IN ({_HISTOLOGY_CHECK})),
    arm                TEXT NOT NULL CHECK (arm IN ({_ARM_CHECK})),
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
    site                  TEXT NOT NULL CHECK (site IN ({_SITE_CHECK})),
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

# Version 2 (PRODUCT.md section 10, D5): centre, cart and a globally unique id on every
# record; the enrolment checks; append-only entries for pathology (with status, blinding,
# reason and who), the patient's margin status, follow-up visits and adverse events.
# {centre} and {cart} are filled in for the rows a version-1 file already holds.
_MIGRATE_V2 = f"""
ALTER TABLE cases ADD COLUMN uid TEXT;
ALTER TABLE cases ADD COLUMN centre_id TEXT;
ALTER TABLE cases ADD COLUMN cart_id TEXT;
ALTER TABLE cases ADD COLUMN surgery_date TEXT;
ALTER TABLE cases ADD COLUMN exclusions_confirmed INTEGER;
ALTER TABLE cases ADD COLUMN clock_override_reason TEXT;
ALTER TABLE cases ADD COLUMN opened_by TEXT;
UPDATE cases SET uid = {_NEW_UID}, centre_id = :centre, cart_id = :cart,
    surgery_date = substr(opened_at, 1, 10);
ALTER TABLE captures ADD COLUMN uid TEXT;
ALTER TABLE captures ADD COLUMN centre_id TEXT;
ALTER TABLE captures ADD COLUMN cart_id TEXT;
ALTER TABLE captures ADD COLUMN intensity_floor REAL;
ALTER TABLE captures ADD COLUMN cnr_floor REAL;
ALTER TABLE captures ADD COLUMN clock_override_reason TEXT;
ALTER TABLE captures ADD COLUMN captured_by TEXT;
UPDATE captures SET uid = {_NEW_UID}, centre_id = :centre, cart_id = :cart;
ALTER TABLE events ADD COLUMN uid TEXT;
ALTER TABLE events ADD COLUMN centre_id TEXT;
ALTER TABLE events ADD COLUMN cart_id TEXT;
UPDATE events SET uid = {_NEW_UID}, centre_id = :centre, cart_id = :cart;
CREATE UNIQUE INDEX cases_uid ON cases (uid);
CREATE UNIQUE INDEX captures_uid ON captures (uid);

CREATE TABLE pathology_entries (
    entry_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    uid        TEXT NOT NULL UNIQUE,
    centre_id  TEXT NOT NULL,
    cart_id    TEXT NOT NULL,
    capture_id TEXT NOT NULL REFERENCES captures (capture_id),
    status     TEXT NOT NULL CHECK (status IN ({_STATUS_CHECK})),
    blinded    INTEGER CHECK (blinded IN (0, 1)),
    reason     TEXT,
    entered_by TEXT NOT NULL,
    entered_at TEXT NOT NULL,
    t_ns       INTEGER NOT NULL
);
INSERT INTO pathology_entries (uid, centre_id, cart_id, capture_id, status, blinded, reason,
    entered_by, entered_at, t_ns)
    SELECT {_NEW_UID}, :centre, :cart, capture_id,
           CASE margin_positive WHEN 1 THEN 'positive' ELSE 'negative' END, NULL, NULL,
           'unknown (version 1)', entered_at, entered_t_ns FROM pathology;
DROP TABLE pathology;

CREATE TABLE margin_entries (
    entry_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    uid        TEXT NOT NULL UNIQUE,
    centre_id  TEXT NOT NULL,
    cart_id    TEXT NOT NULL,
    case_id    TEXT NOT NULL REFERENCES cases (case_id),
    status     TEXT NOT NULL CHECK (status IN ({_STATUS_CHECK})),
    reason     TEXT,
    entered_by TEXT NOT NULL,
    entered_at TEXT NOT NULL,
    t_ns       INTEGER NOT NULL
);

CREATE TABLE followup_entries (
    entry_id         INTEGER PRIMARY KEY AUTOINCREMENT,
    uid              TEXT NOT NULL UNIQUE,
    centre_id        TEXT NOT NULL,
    cart_id          TEXT NOT NULL,
    case_id          TEXT NOT NULL REFERENCES cases (case_id),
    visit_date       TEXT NOT NULL,
    local_recurrence INTEGER NOT NULL CHECK (local_recurrence IN (0, 1)),
    reason           TEXT,
    entered_by       TEXT NOT NULL,
    entered_at       TEXT NOT NULL,
    t_ns             INTEGER NOT NULL
);

CREATE TABLE ae_entries (
    entry_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    uid        TEXT NOT NULL UNIQUE,
    centre_id  TEXT NOT NULL,
    cart_id    TEXT NOT NULL,
    case_id    TEXT NOT NULL REFERENCES cases (case_id),
    term       TEXT NOT NULL,
    grade      INTEGER NOT NULL CHECK (grade BETWEEN 1 AND 5),
    related    TEXT NOT NULL CHECK (related IN ({_RELATED_CHECK})),
    onset      TEXT NOT NULL,
    entered_by TEXT NOT NULL,
    entered_at TEXT NOT NULL,
    t_ns       INTEGER NOT NULL
);

CREATE TABLE case_corrections (
    entry_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    uid        TEXT NOT NULL UNIQUE,
    centre_id  TEXT NOT NULL,
    cart_id    TEXT NOT NULL,
    case_id    TEXT NOT NULL REFERENCES cases (case_id),
    field      TEXT NOT NULL,
    old_value  TEXT,
    new_value  TEXT,
    reason     TEXT NOT NULL,
    entered_by TEXT NOT NULL,
    entered_at TEXT NOT NULL,
    t_ns       INTEGER NOT NULL
);
""" + "".join(f"""
CREATE TRIGGER {table}_append_only_update BEFORE UPDATE ON {table}
    BEGIN SELECT RAISE(ABORT, '{table} is append-only: add a correcting entry'); END;
CREATE TRIGGER {table}_append_only_delete BEFORE DELETE ON {table}
    BEGIN SELECT RAISE(ABORT, '{table} is append-only: add a correcting entry'); END;
""" for table in ("pathology_entries", "margin_entries", "followup_entries", "ae_entries", "case_corrections"))

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
    """Whether the kernel considers the wall clock synchronised (what ``timedatectl``
    reports as "System clock synchronized"): ``adjtimex`` answers ``TIME_ERROR`` (5) while
    the clock is unsynchronised. ``None`` when that cannot be told. A Pi has no real-time
    clock: until synchronised, wall times (and so hours since injection) can be far off."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        # struct timex is about 208 bytes on 64-bit Linux; modes = 0 (the first field)
        # only reads the state.
        buf = ctypes.create_string_buffer(512)
        state = libc.adjtimex(buf)
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != 5


def _default_cart_id() -> str:
    # The host's name, reduced to the characters an id allows.
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname() or "cart")[:32].strip("-.")
    return name if name and name[0].isalnum() else "cart"


def _run_script(db: sqlite3.Connection, script: str, params: Mapping) -> None:
    """Run a schema script statement by statement inside the open transaction
    (``executescript`` would commit first). Statements end where SQLite says they are
    complete, so triggers with inner semicolons stay whole."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            text = statement.strip()
            if text:
                db.execute(text, {k: v for k, v in params.items() if f":{k}" in text})
            statement = ""


def _uid() -> str:
    """A globally unique record id: 128 random bits as hex."""
    return uuid.uuid4().hex


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


def validate_case_id(case_id: Any, name: str = "case_id",
                     pattern: str = DEFAULT_CASE_ID_PATTERN) -> str:
    """Check a pseudonymous case id against the study's id pattern (PRODUCT.md C4; default
    ``^[A-Z]{2,6}-[0-9]{3,5}$``, e.g. ``DFSP-014``): names do not fit it."""
    if not isinstance(case_id, str):
        raise InvalidArgument(f"{name} = {case_id!r}: expected a string such as 'DFSP-014'")
    if len(case_id) > 64 or not re.fullmatch(pattern, case_id):
        raise InvalidArgument(f"{name} = {case_id!r}: does not match the study's pseudonymous id "
                              f"pattern {pattern} (e.g. 'DFSP-014'; never a patient's name)")
    return case_id


def _record_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _CASE_ID_RE.fullmatch(value):
        raise InvalidArgument(f"{name} = {value!r}: allowed 1-64 characters of A-Z a-z 0-9 _ . -, "
                              f"starting with a letter or digit")
    return value


def _site_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _SITE_ID_RE.fullmatch(value):
        raise InvalidArgument(f"{name} = {value!r}: allowed 1-32 characters of A-Z a-z 0-9 _ . -, "
                              f"starting with a letter or digit")
    return value


def _text(name: str, value: Any, *, optional: bool = False, max_chars: int = TEXT_MAX_CHARS) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{name} = {value!r}: expected a non-empty text")
    if len(value) > max_chars or any(not ch.isprintable() for ch in value):
        raise InvalidArgument(f"{name} = {value[:40]!r}...: at most {max_chars} printable characters")
    return value


def _iso_date(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} = {value!r}: expected an ISO date such as '2024-05-02'")
    try:
        return date.fromisoformat(value).isoformat() if len(value) == 10 else _bad_date(name, value)
    except ValueError:
        return _bad_date(name, value)


def _bad_date(name: str, value: Any):
    raise InvalidArgument(f"{name} = {value!r}: expected an ISO date YYYY-MM-DD such as '2024-05-02'")


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


# --- the store ---------------------------------------------------------------------


class CaseStore:
    """The case database (one SQLite file).

    ``clock`` gives the wall time stamped on every record (``time_ns``). ``fixed_dose_mg``
    and ``dose_mg_per_kg`` set the doses of the fixed and per-kg arms;
    ``imaging_window_h`` the ``[earliest, latest]`` hours after injection outside which a
    capture is stored with a warning event. All three come from the ``[study]`` config
    section (:meth:`from_config`). ``software_version`` and ``config_hash`` are stamped on
    every case and capture. ``centre_id`` and ``cart_id`` are stamped on every record;
    ``case_id_pattern`` checks case ids; ``require_exclusions`` (the ``device`` profile)
    makes ``exclusions_confirmed`` mandatory at case opening; ``report_options`` says how
    close and indeterminate margins are scored.

    Thread-safe: one connection, used under a lock. Errors: bad input raises
    :class:`~hal.errors.InvalidArgument` naming the value and what is allowed; a database
    failure raises :class:`~hal.errors.DeviceError` for device ``"case-store"``.
    """

    def __init__(self, path: str | os.PathLike, *, clock: Clock | None = None,
                 fixed_dose_mg: float = 25.0, dose_mg_per_kg: float = 0.25,
                 imaging_window_h: Sequence[float] = (18.0, 30.0),
                 software_version: str | None = None, config_hash: str = "",
                 centre_id: str = DEFAULT_CENTRE_ID, cart_id: str | None = None,
                 case_id_pattern: str = DEFAULT_CASE_ID_PATTERN, require_exclusions: bool = False,
                 report_options: ReportOptions | None = None):
        self.path = Path(path)
        self.centre_id = _site_id(centre_id, "centre_id")
        self.cart_id = _site_id(cart_id if cart_id else _default_cart_id(), "cart_id")
        try:
            re.compile(case_id_pattern)
        except (re.error, TypeError) as err:
            raise InvalidArgument(f"case_id_pattern = {case_id_pattern!r}: not a regular expression ({err})") from err
        self.case_id_pattern = case_id_pattern
        self.require_exclusions = bool(require_exclusions)
        self.report_options = report_options or ReportOptions()
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
        study = config.study.as_dict()
        options = ReportOptions(close_as=study.get("close_as", "exclude"),
                                indeterminate_as=study.get("indeterminate_as", "exclude"),
                                bootstrap_resamples=study.get("bootstrap_resamples", 2000),
                                bootstrap_seed=study.get("bootstrap_seed", 20240501))
        return cls(path, clock=clock, fixed_dose_mg=study["fixed_dose_mg"],
                   dose_mg_per_kg=study["dose_mg_per_kg"],
                   imaging_window_h=study["imaging_window_h"],
                   config_hash=getattr(config, "sha256", ""),
                   centre_id=study.get("centre_id") or DEFAULT_CENTRE_ID,
                   cart_id=study.get("cart_id") or None,
                   case_id_pattern=study.get("case_id_pattern") or DEFAULT_CASE_ID_PATTERN,
                   require_exclusions=getattr(config, "profile", "sim") == "device",
                   report_options=options)

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
            if version == 0:  # a new file
                _run_script(db, _SCHEMA_V1, {})
            # version 1 -> 2; rows already there get this cart's centre and cart ids
            _run_script(db, _MIGRATE_V2, {"centre": self.centre_id, "cart": self.cart_id})
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
        db.execute("INSERT INTO events (case_id, capture_id, t_ns, at, kind, message, detail, uid, "
                   "centre_id, cart_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (case_id, capture_id, t_ns, _iso_from_ns(t_ns), kind, message,
                    _to_json("event detail", detail), _uid(), self.centre_id, self.cart_id))
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
            "uid": row["uid"],
            "centre_id": row["centre_id"],
            "cart_id": row["cart_id"],
            "histology": row["histology"],
            "arm": row["arm"],
            "weight_kg": row["weight_kg"],
            "dose_mg": row["dose_mg"],
            "injection_time": row["injection_time"],
            "surgery_date": row["surgery_date"],
            "exclusions_confirmed": None if row["exclusions_confirmed"] is None else bool(row["exclusions_confirmed"]),
            "hours_since_injection": None,
            "opened_at": row["opened_at"],
            "closed_at": row["closed_at"],
            "clock_synchronised": None if row["clock_synchronised"] is None else bool(row["clock_synchronised"]),
            "clock_override_reason": row["clock_override_reason"],
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
                  clock_synchronised: bool | None = None, surgery_date: str | None = None,
                  centre_id: str | None = None, exclusions_confirmed: bool | None = None,
                  clock_override_reason: str | None = None, by: str = "") -> dict:
        """Open a case and make it the current one; returns it with ``dose_mg`` and
        ``hours_since_injection`` (now) and ``warnings`` (e.g. outside the imaging window).

        Enrolment checks (PRODUCT.md section 10): the case id matches the study's pattern;
        ``weight_kg`` (20-200) is required for the per-kg arm; ``injection_time`` (ISO 8601
        with a time zone, not in the future) for both ICG arms, none for the control arm;
        ``exclusions_confirmed`` must be true when given, and given when the store requires
        it (``device`` profile); ``surgery_date`` (ISO date, default today, not in the future).
        ``clock_override_reason`` records why the case went ahead with the clock not
        synchronised (the caller decides whether that is needed). Raises ``WrongState``
        while another case is open, ``InvalidArgument`` for bad input or a case id already used.
        """
        validate_case_id(case_id, pattern=self.case_id_pattern)
        _choice("histology", histology, HISTOLOGIES)
        _choice("arm", arm, ARMS)
        centre = self.centre_id if centre_id is None else _site_id(centre_id, "centre_id")
        if arm == ARM_PER_KG and weight_kg is None:
            raise InvalidArgument(f"weight_kg is required for arm {ARM_PER_KG!r} (the dose is "
                                  f"{self.dose_mg_per_kg:g} mg/kg); allowed {WEIGHT_RANGE_KG[0]:g} "
                                  f"to {WEIGHT_RANGE_KG[1]:g} kg")
        weight = None if weight_kg is None else _number("weight_kg", weight_kg, lo=WEIGHT_RANGE_KG[0],
                                                        hi=WEIGHT_RANGE_KG[1])
        now_ns = self.clock.time_ns()
        if arm == ARM_CONTROL:
            if injection_time not in (None, ""):
                raise InvalidArgument(f"injection_time = {injection_time!r}: the control arm "
                                      f"receives no ICG; leave injection_time out")
            injection_iso, injection_ns = None, None
        else:
            injection_iso, injection_ns = _parse_injection_time(injection_time)
            if injection_ns > now_ns:
                raise InvalidArgument(f"injection_time = {injection_time!r}: "
                                      f"{(injection_ns - now_ns) / _NS_PER_HOUR:.2f} h in the future "
                                      f"(now {_iso_from_ns(now_ns)}); check the time and its time zone")
        if exclusions_confirmed is None:
            if self.require_exclusions:
                raise InvalidArgument("exclusions_confirmed is required: confirm that the patient meets "
                                      "none of the study's exclusion criteria (true)")
        elif exclusions_confirmed is not True:
            raise InvalidArgument(f"exclusions_confirmed = {exclusions_confirmed!r}: a patient is enrolled "
                                  f"only once the exclusion criteria are confirmed (true)")
        today = datetime.fromtimestamp(now_ns / 1e9, tz=timezone.utc).date()
        if surgery_date is None:
            surgery = today.isoformat()
        else:
            surgery = _iso_date("surgery_date", surgery_date)
            if date.fromisoformat(surgery) > today:
                raise InvalidArgument(f"surgery_date = {surgery_date!r}: after today ({today.isoformat()})")
        override = _text("clock_override_reason", clock_override_reason, optional=True)
        synced = _optional_bool("clock_synchronised", clock_synchronised)
        dose = self._dose_mg(arm, weight)
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
                "config_hash, uid, centre_id, cart_id, surgery_date, exclusions_confirmed, "
                "clock_override_reason, opened_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (case_id, histology, arm, weight, dose, injection_iso, injection_ns,
                 _iso_from_ns(now_ns), now_ns, synced, self.software_version, self.config_hash,
                 _uid(), centre, self.cart_id, surgery, _optional_bool("exclusions_confirmed",
                                                                      exclusions_confirmed),
                 override, by or None))
            if injection_ns is not None:
                hours = (now_ns - injection_ns) / _NS_PER_HOUR
                w = self._window_warning(db, case_id, hours, None, now_ns)
                if w:
                    warnings.append(w)
            if synced == 0:
                warnings.append(self._event(db, case_id, "clock_not_synchronised",
                                            "wall clock not synchronised at case opening; times "
                                            "and hours since injection may be off", t_ns=now_ns))
            if override:
                warnings.append(self._event(db, case_id, "clock_override",
                                            f"case opened with the clock not synchronised: {override}",
                                            t_ns=now_ns, by=by))
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
                    software_version: str | None = None, config_hash: str | None = None,
                    intensity_floor: float | None = None, cnr_floor: float | None = None,
                    clock_override_reason: str | None = None, by: str = "") -> dict:
        """Store one site capture in the open case; returns it (with ``capture_id``,
        ``hours_since_injection`` and ``warnings``). ``intensity_floor`` and ``cnr_floor``
        are the floors the call was made with (kept so a re-scored call applies them too).

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
            "intensity_floor": _number("intensity_floor", intensity_floor, optional=True),
            "cnr_floor": _number("cnr_floor", cnr_floor, optional=True),
        }
        override = _text("clock_override_reason", clock_override_reason, optional=True)
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
            _record_id(capture_id, "capture_id")
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
                "clock_synchronised, frames_lost, uid, centre_id, cart_id, intensity_floor, cnr_floor, "
                "clock_override_reason, captured_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (capture_id, case_id, site, label, t_ns, _iso_from_ns(t_ns), hours, pairs,
                 values["sbr"], values["intensity"], values["cnr"], positive_int,
                 values["threshold"], rois_json, settings_json, files_json,
                 software_version or self.software_version,
                 self.config_hash if config_hash is None else config_hash,
                 calibration_id, synced, frames_lost, _uid(), case["centre_id"], self.cart_id,
                 values["intensity_floor"], values["cnr_floor"], override, by or None))
            if override:
                warnings.append(self._event(db, case_id, "clock_override",
                                            f"capture {capture_id} with the clock not synchronised: "
                                            f"{override}", capture_id=capture_id, t_ns=t_ns, by=by))
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
        """A capture by id (with ``pathology_status`` and ``margin_positive``, ``None``
        until pathology is set, or for close/indeterminate);
        ``InvalidArgument`` when unknown."""
        with self._read() as db:
            row = db.execute("SELECT * FROM captures WHERE capture_id = ?", (capture_id,)).fetchone()
            if row is None:
                raise InvalidArgument(f"capture_id = {capture_id!r}: no such capture")
            capture = self._capture_dict(row)
            p = db.execute("SELECT status FROM pathology_entries WHERE capture_id = ? "
                           "ORDER BY t_ns DESC, entry_id DESC LIMIT 1", (capture_id,)).fetchone()
            capture["pathology_status"] = None if p is None else p[0]
            capture["margin_positive"] = {"positive": True, "negative": False}.get(capture["pathology_status"])
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

    # --- append-only entries: pathology, margin status, follow-up, adverse events -------

    def _case_row(self, db: sqlite3.Connection, case_id: Any) -> sqlite3.Row:
        if not isinstance(case_id, str):
            raise InvalidArgument(f"case_id = {case_id!r}: expected a string")
        row = db.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        if row is None:
            raise InvalidArgument(f"case_id = {case_id!r}: no such case")
        return row

    @staticmethod
    def _need_reason(what: str, old: str, new: str, reason: str | None) -> None:
        if reason is None:
            raise InvalidArgument(f"{what}: changing {old} to {new} needs a reason (entries are "
                                  f"append-only: the old value, who, when and why are kept)")

    def set_pathology(self, capture_id: str, status: str | None = None, *,
                      margin_positive: bool | None = None, blinded: bool | None = None,
                      reason: str | None = None, by: str = "") -> dict:
        """Record pathology's finding for a capture (open or closed case): ``status``
        (positive, close, negative, indeterminate) or the version-1 ``margin_positive``.
        ``blinded``: whether the pathologist was blinded to the fluorescence call.
        Append-only (PRODUCT.md D5): a change adds an entry, needs a ``reason`` and keeps
        the old one (who, when, why); entering the same finding again changes nothing.
        Returns the current entry with its ``history`` (oldest first)."""
        if not isinstance(capture_id, str):
            raise InvalidArgument(f"capture_id = {capture_id!r}: expected a string")
        if isinstance(status, bool):  # the version-1 call: set_pathology(capture_id, True)
            status, margin_positive = None, status
        if status is None:
            if not isinstance(margin_positive, bool):
                raise InvalidArgument(f"margin_positive = {margin_positive!r}: expected true or false "
                                      f"(or give status: {', '.join(STATUSES)})")
            status = "positive" if margin_positive else "negative"
        elif margin_positive is not None and margin_positive != (status == "positive"):
            raise InvalidArgument(f"status = {status!r} and margin_positive = {margin_positive!r} disagree")
        _choice("status", status, STATUSES)
        blinded_int = _optional_bool("blinded", blinded)
        reason = _text("reason", reason, optional=True)
        now_ns = self.clock.time_ns()
        with self._write() as db:
            row = db.execute("SELECT cap.case_id, cap.site, c.centre_id FROM captures AS cap "
                             "JOIN cases AS c ON c.case_id = cap.case_id WHERE cap.capture_id = ?",
                             (capture_id,)).fetchone()
            if row is None:
                raise InvalidArgument(f"capture_id = {capture_id!r}: no such capture")
            old = db.execute("SELECT * FROM pathology_entries WHERE capture_id = ? "
                             "ORDER BY t_ns DESC, entry_id DESC LIMIT 1", (capture_id,)).fetchone()
            now_ns = _after(old, now_ns)
            if old is None or old["status"] != status or old["blinded"] != blinded_int:
                if old is not None:
                    self._need_reason(f"pathology of capture {capture_id}",
                                      f"{old['status']} (blinded {_yes_no(old['blinded'])})",
                                      f"{status} (blinded {_yes_no(blinded_int)})", reason)
                    self._event(db, row["case_id"], "pathology_changed",
                                f"capture {capture_id}: pathology changed from {old['status']} to "
                                f"{status} by {by or 'unknown'}: {reason}", capture_id=capture_id,
                                t_ns=now_ns, old=old["status"], new=status, by=by, reason=reason)
                db.execute("INSERT INTO pathology_entries (uid, centre_id, cart_id, capture_id, status, "
                           "blinded, reason, entered_by, entered_at, t_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (_uid(), row["centre_id"], self.cart_id, capture_id, status, blinded_int,
                            reason, by or "unknown", _iso_from_ns(now_ns), now_ns))
            history = [_entry(r) for r in db.execute(
                "SELECT * FROM pathology_entries WHERE capture_id = ? ORDER BY t_ns, entry_id", (capture_id,))]
        log.info("capture %s: pathology %s", capture_id, status)
        current = history[-1]
        return {"capture_id": capture_id, "case_id": row["case_id"], "site": row["site"],
                "status": current["status"], "margin_positive": {"positive": True, "negative": False}.get(
                    current["status"]), "blinded": current["blinded"], "entered_at": current["entered_at"],
                "entered_by": current["entered_by"], "reason": current["reason"], "history": history}

    def set_margin(self, case_id: str, status: str, *, reason: str | None = None, by: str = "") -> dict:
        """The patient's final margin status from pathology (every arm; the control arm has
        no captures). Append-only like :meth:`set_pathology`."""
        _choice("status", status, STATUSES)
        reason = _text("reason", reason, optional=True)
        now_ns = self.clock.time_ns()
        with self._write() as db:
            case = self._case_row(db, case_id)
            old = db.execute("SELECT * FROM margin_entries WHERE case_id = ? "
                             "ORDER BY t_ns DESC, entry_id DESC LIMIT 1", (case_id,)).fetchone()
            now_ns = _after(old, now_ns)
            if old is None or old["status"] != status:
                if old is not None:
                    self._need_reason(f"margin status of case {case_id}", old["status"], status, reason)
                    self._event(db, case_id, "margin_changed", f"case {case_id}: margin status changed "
                                f"from {old['status']} to {status} by {by or 'unknown'}: {reason}",
                                t_ns=now_ns, old=old["status"], new=status, by=by, reason=reason)
                db.execute("INSERT INTO margin_entries (uid, centre_id, cart_id, case_id, status, reason, "
                           "entered_by, entered_at, t_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (_uid(), case["centre_id"], self.cart_id, case_id, status, reason,
                            by or "unknown", _iso_from_ns(now_ns), now_ns))
            history = [_entry(r) for r in db.execute(
                "SELECT * FROM margin_entries WHERE case_id = ? ORDER BY t_ns, entry_id", (case_id,))]
        return {"case_id": case_id, "status": history[-1]["status"], "history": history}

    def add_followup(self, case_id: str, visit_date: str, local_recurrence: bool, *,
                     reason: str | None = None, by: str = "") -> dict:
        """A follow-up visit (ISO date, from the surgery date to today). Entering a visit
        date again with another finding corrects it: a ``reason`` is then required and the
        old entry kept."""
        visit = _iso_date("visit_date", visit_date)
        if not isinstance(local_recurrence, bool):
            raise InvalidArgument(f"local_recurrence = {local_recurrence!r}: expected true or false")
        reason = _text("reason", reason, optional=True)
        now_ns = self.clock.time_ns()
        today = datetime.fromtimestamp(now_ns / 1e9, tz=timezone.utc).date()
        with self._write() as db:
            case = self._case_row(db, case_id)
            if visit < case["surgery_date"]:
                raise InvalidArgument(f"visit_date = {visit_date!r}: before the surgery date "
                                      f"{case['surgery_date']} of case {case_id}")
            if date.fromisoformat(visit) > today:
                raise InvalidArgument(f"visit_date = {visit_date!r}: after today ({today.isoformat()})")
            old = db.execute("SELECT * FROM followup_entries WHERE case_id = ? AND visit_date = ? "
                             "ORDER BY t_ns DESC, entry_id DESC LIMIT 1", (case_id, visit)).fetchone()
            now_ns = _after(old, now_ns)
            if old is None or bool(old["local_recurrence"]) != local_recurrence:
                if old is not None:
                    self._need_reason(f"follow-up of case {case_id} on {visit}",
                                      f"local_recurrence {bool(old['local_recurrence'])}",
                                      f"{local_recurrence}", reason)
                    self._event(db, case_id, "followup_changed", f"case {case_id}: visit {visit} changed "
                                f"by {by or 'unknown'}: {reason}", t_ns=now_ns, by=by, reason=reason,
                                old=bool(old["local_recurrence"]), new=local_recurrence)
                db.execute("INSERT INTO followup_entries (uid, centre_id, cart_id, case_id, visit_date, "
                           "local_recurrence, reason, entered_by, entered_at, t_ns) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (_uid(), case["centre_id"], self.cart_id, case_id, visit, int(local_recurrence),
                            reason, by or "unknown", _iso_from_ns(now_ns), now_ns))
            visits = [_entry(r) for r in db.execute(
                "SELECT * FROM followup_entries WHERE case_id = ? ORDER BY visit_date, t_ns, entry_id",
                (case_id,))]
        return {"case_id": case_id, "visit_date": visit, "local_recurrence": local_recurrence,
                "entries": visits}

    def add_adverse_event(self, case_id: str, term: str, grade: int, related: str, onset: str, *,
                          by: str = "") -> dict:
        """An adverse event: ``term``, ``grade`` 1-5, ``related`` to ICG (not, unlikely,
        possible, probable, definite), ``onset`` (ISO date, not before the case was opened
        minus 2 days, nor after today)."""
        term = _text("term", term, max_chars=200)
        if isinstance(grade, bool) or not isinstance(grade, int) or not 1 <= grade <= 5:
            raise InvalidArgument(f"grade = {grade!r}: a whole number from 1 to 5")
        _choice("related", related, RELATED)
        onset = _iso_date("onset", onset)
        now_ns = self.clock.time_ns()
        today = datetime.fromtimestamp(now_ns / 1e9, tz=timezone.utc).date()
        if date.fromisoformat(onset) > today:
            raise InvalidArgument(f"onset = {onset!r}: after today ({today.isoformat()})")
        with self._write() as db:
            case = self._case_row(db, case_id)
            uid = _uid()
            db.execute("INSERT INTO ae_entries (uid, centre_id, cart_id, case_id, term, grade, related, "
                       "onset, entered_by, entered_at, t_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (uid, case["centre_id"], self.cart_id, case_id, term, grade, related, onset,
                        by or "unknown", _iso_from_ns(now_ns), now_ns))
        return {"case_id": case_id, "uid": uid, "term": term, "grade": grade, "related": related,
                "onset": onset, "entered_by": by or "unknown", "entered_at": _iso_from_ns(now_ns)}

    def correct_case(self, case_id: str, field: str, value: Any, *, reason: str, by: str = "") -> dict:
        """Correct a field of a case entered wrongly (PRODUCT.md D5): ``histology``,
        ``weight_kg``, ``injection_time``, ``surgery_date`` or ``exclusions_confirmed``.
        The new value passes the same checks as at ``case.open`` (the dose is computed
        again); the old value, who, when and why (``reason`` required) are kept in
        ``case_corrections`` and a ``case_corrected`` event. Returns the case with its
        ``corrections``."""
        _choice("field", field, CORRECTABLE)
        reason = _text("reason", reason)
        now_ns = self.clock.time_ns()
        with self._write() as db:
            case = self._case_row(db, case_id)
            updates: dict[str, Any] = {}
            if field == "histology":
                updates["histology"] = _choice("histology", value, HISTOLOGIES)
            elif field == "weight_kg":
                if value is None and case["arm"] == ARM_PER_KG:
                    raise InvalidArgument(f"weight_kg is required for arm {ARM_PER_KG!r}")
                weight = None if value is None else _number("weight_kg", value, lo=WEIGHT_RANGE_KG[0],
                                                            hi=WEIGHT_RANGE_KG[1])
                updates["weight_kg"] = weight
                updates["dose_mg"] = self._dose_mg(case["arm"], weight)
            elif field == "injection_time":
                if case["arm"] == ARM_CONTROL:
                    raise InvalidArgument("injection_time: the control arm receives no ICG")
                iso, t_ns = _parse_injection_time(value)
                if t_ns > now_ns:
                    raise InvalidArgument(f"injection_time = {value!r}: in the future")
                updates["injection_time"], updates["injection_t_ns"] = iso, t_ns
            elif field == "surgery_date":
                day = _iso_date("surgery_date", value)
                today = datetime.fromtimestamp(now_ns / 1e9, tz=timezone.utc).date()
                if date.fromisoformat(day) > today:
                    raise InvalidArgument(f"surgery_date = {value!r}: after today ({today.isoformat()})")
                updates["surgery_date"] = day
            else:
                if value is not True:
                    raise InvalidArgument(f"exclusions_confirmed = {value!r}: only a confirmation (true) "
                                          f"can be entered; a patient found ineligible is reported, not erased")
                updates["exclusions_confirmed"] = 1
            old = case[field]
            new = updates[field]
            if old != new:
                db.execute(f"UPDATE cases SET {', '.join(f'{k} = ?' for k in updates)} WHERE case_id = ?",
                           (*updates.values(), case_id))
                db.execute("INSERT INTO case_corrections (uid, centre_id, cart_id, case_id, field, old_value, "
                           "new_value, reason, entered_by, entered_at, t_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (_uid(), case["centre_id"], self.cart_id, case_id, field,
                            None if old is None else str(old), None if new is None else str(new), reason,
                            by or "unknown", _iso_from_ns(now_ns), now_ns))
                self._event(db, case_id, "case_corrected", f"case {case_id}: {field} corrected from {old!r} "
                            f"to {new!r} by {by or 'unknown'}: {reason}", t_ns=now_ns, field=field,
                            old=old, new=new, by=by, reason=reason)
            out = self._case_dict(db.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone(), db)
            out["corrections"] = [_entry(r) for r in db.execute(
                "SELECT * FROM case_corrections WHERE case_id = ? ORDER BY t_ns, entry_id", (case_id,))]
        return out

    # --- the records, the report, events and export --------------------------------

    def dataset(self, case_id: str | None = None) -> dict:
        """Every record of the study (or of one case) as the records map the report and
        the export read (:mod:`nirf.services.study.records`). Child records carry their case's
        centre, so a patient is ``(centre_id, case_id)`` throughout."""
        where, params = ("WHERE c.case_id = ?", (case_id,)) if case_id is not None else ("", ())
        with self._read() as db:
            if case_id is not None:
                self._case_row(db, case_id)
            cases = [dict(r) for r in db.execute(f"SELECT * FROM cases AS c {where} "
                                                 f"ORDER BY c.opened_t_ns, c.case_id", params)]
            caps = db.execute("SELECT cap.*, c.centre_id AS case_centre FROM captures AS cap "
                              f"JOIN cases AS c ON c.case_id = cap.case_id {where} "
                              "ORDER BY cap.t_ns, cap.capture_id", params).fetchall()
            path = db.execute("SELECT p.*, cap.uid AS capture_uid, cap.case_id, c.centre_id AS case_centre "
                              "FROM pathology_entries AS p JOIN captures AS cap ON cap.capture_id = p.capture_id "
                              f"JOIN cases AS c ON c.case_id = cap.case_id {where} "
                              "ORDER BY p.t_ns, p.entry_id", params).fetchall()
            tables = {}
            for name, table in (("margins", "margin_entries"), ("followups", "followup_entries"),
                                ("adverse_events", "ae_entries"), ("case_corrections", "case_corrections")):
                tables[name] = db.execute(f"SELECT e.*, c.centre_id AS case_centre FROM {table} AS e "
                                          f"JOIN cases AS c ON c.case_id = e.case_id {where} "
                                          f"ORDER BY e.t_ns, e.entry_id", params).fetchall()
            devs = db.execute("SELECT e.*, c.centre_id AS case_centre FROM events AS e "
                              f"JOIN cases AS c ON c.case_id = e.case_id {where} "
                              f"{'AND' if where else 'WHERE'} e.kind IN ({', '.join('?' * len(DEVIATIONS))}) "
                              "ORDER BY e.event_id", params + DEVIATIONS).fetchall()
        data = {
            "cases": [{**c, "exclusions_confirmed": _bool(c["exclusions_confirmed"]),
                       "clock_synchronised": _bool(c["clock_synchronised"])} for c in cases],
            "captures": [_capture_record(r) for r in caps],
            "pathology": [{**dict(r), "centre_id": r["case_centre"], "blinded": _bool(r["blinded"])}
                          for r in path],
            "margins": [{**dict(r), "centre_id": r["case_centre"]} for r in tables["margins"]],
            "followups": [{**dict(r), "centre_id": r["case_centre"],
                           "local_recurrence": bool(r["local_recurrence"])} for r in tables["followups"]],
            "adverse_events": [{**dict(r), "centre_id": r["case_centre"]} for r in tables["adverse_events"]],
            "case_corrections": [{**dict(r), "centre_id": r["case_centre"]} for r in tables["case_corrections"]],
            "deviations": [{"uid": r["uid"], "centre_id": r["case_centre"], "cart_id": r["cart_id"],
                            "case_id": r["case_id"], "capture_id": r["capture_id"], "kind": r["kind"],
                            "message": r["message"], "entered_at": r["at"], "t_ns": r["t_ns"]}
                           for r in devs],
        }
        return records.fill(data)

    def report(self, histology: str | None = None, arm: str | None = None,
               threshold: float | None = None, comparative: bool = True) -> dict:
        """The study report (protocol "v2 report"), optionally filtered or re-scored at an
        SBR ``threshold``; ``comparative=False`` for observers."""
        return build_study_report(self.dataset(), histology=histology, arm=arm, threshold=threshold,
                                  options=self.report_options, comparative=comparative)

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

    def export_csv(self, out_file: str | os.PathLike | TextIO, case_id: str | None = None) -> int:
        """Write the long CSV (one row per record, :mod:`nirf.services.study.records`) of one
        case or the whole study; returns the number of rows. A path is written atomically
        (temporary file, fsync, rename); an open text file is written as is."""
        data = self.dataset(case_id)
        if not isinstance(out_file, (str, os.PathLike)):
            return records.write_csv(data, out_file)
        text = records.csv_text(data)
        _write_atomically(out_file, text)
        n = text.count("\n") - 1
        log.info("exported %d record row(s) to %s", n, out_file)
        return len(records.rows(data))

    @staticmethod
    def export_dictionary(out_file: str | os.PathLike | TextIO) -> int:
        """Write the REDCap data dictionary of the export; returns the number of fields."""
        if not isinstance(out_file, (str, os.PathLike)):
            records.write_dictionary(out_file)
            return len(records.FIELDS)
        buf = io.StringIO(newline="")
        records.write_dictionary(buf)
        _write_atomically(out_file, buf.getvalue())
        return len(records.FIELDS)


# Case fields that case.correct may change (the arm is the randomisation: never).
CORRECTABLE = ("histology", "weight_kg", "injection_time", "surgery_date", "exclusions_confirmed")

# Events that the report lists as protocol deviations.
DEVIATIONS = ("outside_imaging_window", "clock_not_synchronised", "clock_override", "frames_lost")


def _after(old: sqlite3.Row | None, now_ns: int) -> int:
    """A correcting entry's time: now, but always after the entry it corrects, so "the
    latest entry" is well defined by time alone (also in a pooled export)."""
    return now_ns if old is None else max(now_ns, old["t_ns"] + 1)


def _bool(v: Any) -> bool | None:
    return None if v is None else bool(v)


def _yes_no(v: Any) -> str:
    return "unknown" if v is None else ("yes" if v else "no")


def _entry(row: sqlite3.Row) -> dict:
    """An append-only entry as a reply: the value, who, when and why."""
    out = {k: row[k] for k in row.keys() if k not in ("entry_id",)}
    for key in ("blinded", "local_recurrence"):
        if key in out:
            out[key] = _bool(out[key])
    return out


def _capture_record(r: sqlite3.Row) -> dict:
    settings = json.loads(r["settings"]) if r["settings"] else {}
    files = json.loads(r["files"]) if r["files"] else []

    def num(v):
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return {"uid": r["uid"], "centre_id": r["case_centre"], "cart_id": r["cart_id"], "case_id": r["case_id"],
            "capture_uid": r["uid"], "capture_id": r["capture_id"], "site": r["site"], "label": r["label"],
            "captured_at": r["captured_at"], "t_ns": r["t_ns"],
            "hours_since_injection": r["hours_since_injection"], "pairs": r["pairs"], "sbr": r["sbr"],
            "intensity": r["intensity"], "cnr": r["cnr"], "positive": _bool(r["positive"]),
            "threshold": r["threshold"], "intensity_floor": r["intensity_floor"], "cnr_floor": r["cnr_floor"],
            "frames_lost": r["frames_lost"], "n_files": len(files) if isinstance(files, (list, dict)) else None,
            "calibration_id": r["calibration_id"], "software_version": r["software_version"],
            "config_hash": r["config_hash"], "exposure_us": num(settings.get("exposure_us")),
            "gain": num(settings.get("gain")), "laser_mw": num(settings.get("laser_mw")),
            "clock_synchronised": _bool(r["clock_synchronised"]),
            "clock_override_reason": r["clock_override_reason"], "entered_by": r["captured_by"]}


def _write_atomically(target: str | os.PathLike, text: str) -> None:
    """Temporary file in the same folder, fsync, rename: the file appears whole or not at all."""
    target = os.fspath(target)
    folder = os.path.dirname(os.path.abspath(target))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(target) + ".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
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
        raise DeviceError(DEVICE, f"cannot write the export {target}: {err.strerror or err}") from err
