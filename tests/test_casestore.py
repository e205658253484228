"""The case store: cases, doses, validation, captures, pathology, report, export, and
durability (WAL, synchronous=FULL, committed rows surviving a killed writer)."""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
import signal
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from nirf.hal.clock import ManualClock
from nirf.hal.errors import DeviceError, InvalidArgument, NoCase, WrongState
from nirf.services.study.casestore import SCHEMA_VERSION, CaseStore, validate_case_id
from nirf.services.study import records

WALL_START_NS = 1_700_000_000_000_000_000  # ManualClock's default wall time


def iso_hours_before_start(hours: float, tz_hours: float = 0.0) -> str:
    """An injection time ``hours`` before the clock's start, in the given time zone."""
    start = datetime.fromtimestamp(WALL_START_NS / 1e9, tz=timezone.utc)
    return (start - timedelta(hours=hours)).astimezone(timezone(timedelta(hours=tz_hours))).isoformat()


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def store(tmp_path, clock):
    s = CaseStore(tmp_path / "study.db", clock=clock)
    yield s
    s.close()


def capture_kwargs(**over):
    kw = dict(sbr=3.1, intensity=1234.5, cnr=4.2, positive=True, threshold=2.0, pairs=8,
              rois={"signal": [10, 10, 50, 50], "background": [200, 10, 50, 50]},
              settings={"exposure_us": 10000, "gain": 2.0, "laser_mw": 100.0},
              files=["DFSP-014-c001/pair-0000-on.tif"], calibration_id="cal-2024-05-01",
              clock_synchronised=True)
    kw.update(over)
    return kw


# --- durability settings --------------------------------------------------------------


def test_pragmas_wal_full_foreign_keys_version(store):
    p = store.pragmas()
    assert p["journal_mode"] == "wal"
    assert p["synchronous"] == 2  # FULL
    assert p["foreign_keys"] == 1
    assert p["user_version"] == SCHEMA_VERSION


def test_wal_mode_is_persistent_in_the_file(store, tmp_path):
    con = sqlite3.connect(tmp_path / "study.db")
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        con.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "future.db"
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(DeviceError, match="newer"):
        CaseStore(path, clock=ManualClock())


def test_closed_store_refuses_use(tmp_path, clock):
    s = CaseStore(tmp_path / "s.db", clock=clock)
    s.close()
    s.close()  # idempotent
    with pytest.raises(DeviceError, match="closed"):
        s.current_case()


# --- cases and doses ---------------------------------------------------------------------


@pytest.mark.parametrize("arm,weight,expected_mg", [
    ("icg_0.25mg_per_kg", 80, 0.25 * 80),
    ("icg_0.25mg_per_kg", 62.4, 0.25 * 62.4),
    ("icg_25mg", None, 25.0),
    ("icg_25mg", 90, 25.0),  # the fixed dose does not depend on weight
])
def test_dose_of_icg_arms(store, arm, weight, expected_mg):
    case = store.open_case("DFSP-014", "DFSP", arm, weight, iso_hours_before_start(24))
    assert case["dose_mg"] == pytest.approx(expected_mg)
    assert case["hours_since_injection"] == pytest.approx(24.0)
    assert case["warnings"] == []


def test_control_arm_has_no_dose(store):
    case = store.open_case("SSCC-0001", "sSCC", "control")
    assert case["dose_mg"] == 0.0
    assert case["hours_since_injection"] is None
    assert case["injection_time"] is None


def test_doses_come_from_config_values(tmp_path, clock):
    s = CaseStore(tmp_path / "c.db", clock=clock, fixed_dose_mg=30.0, dose_mg_per_kg=0.5)
    try:
        assert s.open_case("AA-001", "DFSP", "icg_0.25mg_per_kg", 70, iso_hours_before_start(20))["dose_mg"] == 35.0
        s.close_case()
        assert s.open_case("AA-002", "DFSP", "icg_25mg", None, iso_hours_before_start(20))["dose_mg"] == 30.0
    finally:
        s.close()


def test_from_config_uses_the_study_section(tmp_path, clock):
    from nirf.config import load
    cfg = load("sim")
    s = CaseStore.from_config(tmp_path / "c.db", cfg, clock=clock)
    try:
        assert s.fixed_dose_mg == cfg.study.fixed_dose_mg
        assert s.imaging_window_h == tuple(cfg.study.imaging_window_h)
        s.open_case("AA-001", "DFSP", "icg_25mg", None, iso_hours_before_start(24))
        c = s.add_capture("gross_tumor", **capture_kwargs())
        assert c["config_hash"] == cfg.sha256
    finally:
        s.close()


def test_hours_since_injection_follow_the_clock_and_time_zone(store, clock):
    store.open_case("DFSP-001", "DFSP", "icg_25mg", None, iso_hours_before_start(20, tz_hours=-5))
    clock.advance(3 * 3600)
    assert store.current_case()["hours_since_injection"] == pytest.approx(23.0)


def test_one_case_at_a_time(store):
    store.open_case("DFSP-001", "DFSP", "control")
    with pytest.raises(WrongState, match="DFSP-001"):
        store.open_case("DFSP-002", "DFSP", "control")
    store.close_case()
    assert store.open_case("DFSP-002", "DFSP", "control")["case_id"] == "DFSP-002"


def test_close_without_case_is_no_case(store):
    with pytest.raises(NoCase):
        store.close_case()
    store.open_case("DFSP-001", "DFSP", "control")
    closed = store.close_case()
    assert closed["case_id"] == "DFSP-001" and closed["closed_at"] is not None
    assert store.current_case() is None
    with pytest.raises(NoCase):
        store.close_case()


def test_case_id_is_used_once(store):
    store.open_case("DFSP-001", "DFSP", "control")
    store.close_case()
    with pytest.raises(InvalidArgument, match="already used"):
        store.open_case("DFSP-001", "DFSP", "control")


def test_open_case_survives_a_restart(tmp_path, clock):
    s = CaseStore(tmp_path / "s.db", clock=clock)
    s.open_case("DFSP-009", "DFSP", "control")
    s.close()
    s = CaseStore(tmp_path / "s.db", clock=clock)
    try:
        assert s.current_case()["case_id"] == "DFSP-009"
    finally:
        s.close()


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_id,match", [
    ("John Smith", "pattern"),
    ("JohnSmith1", "pattern"),
    ("Mary-Jane", "pattern"),
    ("", "pattern"),
    ("x" * 64 + "1", "pattern"),
    ("DFSP/014", "pattern"),
    ("-DFSP014", "pattern"),
    ("Müller1", "pattern"),
    (14, "string"),
])
def test_bad_case_ids(store, case_id, match):
    with pytest.raises(InvalidArgument, match=match):
        store.open_case(case_id, "DFSP", "control")
    assert store.current_case() is None


@pytest.mark.parametrize("case_id", ["DFSP-014", "SSCC-0231", "AB-123", "ABCDEF-12345"])
def test_good_case_ids(case_id):
    assert validate_case_id(case_id) == case_id


@pytest.mark.parametrize("kwargs,match", [
    (dict(histology="BCC", arm="control"), "'DFSP', 'sSCC'"),
    (dict(histology="DFSP", arm="icg_5mg"), "'icg_25mg'"),
    (dict(histology="DFSP", arm="icg_0.25mg_per_kg", injection_time="2023-11-13T22:00:00Z"), "weight_kg is required"),
    (dict(histology="DFSP", arm="icg_0.25mg_per_kg", weight_kg=19.5, injection_time="2023-11-13T22:00:00Z"), "20 to 200"),
    (dict(histology="DFSP", arm="icg_0.25mg_per_kg", weight_kg=201, injection_time="2023-11-13T22:00:00Z"), "20 to 200"),
    (dict(histology="DFSP", arm="icg_0.25mg_per_kg", weight_kg=float("nan"), injection_time="2023-11-13T22:00:00Z"), "finite"),
    (dict(histology="DFSP", arm="icg_0.25mg_per_kg", weight_kg=True, injection_time="2023-11-13T22:00:00Z"), "finite"),
    (dict(histology="DFSP", arm="icg_25mg"), "ISO 8601"),
    (dict(histology="DFSP", arm="icg_25mg", injection_time="yesterday"), "ISO 8601"),
    (dict(histology="DFSP", arm="icg_25mg", injection_time="2023-11-13T22:00:00"), "time zone"),
    (dict(histology="DFSP", arm="control", injection_time="2023-11-13T22:00:00Z"), "control"),
])
def test_bad_case_fields(store, kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        store.open_case("DFSP-001", **kwargs)
    assert store.current_case() is None


def test_bad_capture_fields(store):
    store.open_case("DFSP-001", "DFSP", "control")
    with pytest.raises(InvalidArgument, match="'tumor_bed'"):
        store.add_capture("margin", **capture_kwargs())
    with pytest.raises(InvalidArgument, match="finite"):
        store.add_capture("tumor_bed", **capture_kwargs(sbr=float("inf")))
    with pytest.raises(InvalidArgument, match="true or false"):
        store.add_capture("tumor_bed", **capture_kwargs(positive="yes"))
    with pytest.raises(InvalidArgument, match="frames_lost"):
        store.add_capture("tumor_bed", **capture_kwargs(frames_lost=-1))
    with pytest.raises(InvalidArgument, match="label"):
        store.add_capture("tumor_bed", "x" * 81, **capture_kwargs())
    with pytest.raises(InvalidArgument, match="JSON"):
        store.add_capture("tumor_bed", **capture_kwargs(settings={"gain": float("nan")}))
    assert store.captures() == []


# --- captures, pathology, events -------------------------------------------------------


def test_capture_needs_an_open_case(store):
    with pytest.raises(NoCase):
        store.add_capture("tumor_bed", **capture_kwargs())
    with pytest.raises(NoCase):
        store.next_capture_id()


def test_capture_is_stored_with_everything(store, clock):
    store.open_case("DFSP-014", "DFSP", "icg_0.25mg_per_kg", 70, iso_hours_before_start(22))
    clock.advance(1800)
    expected_id = store.next_capture_id()
    kw = capture_kwargs(frames_lost=0)
    c = store.add_capture("tumor_bed", "12 o'clock", **kw)
    assert c["capture_id"] == expected_id
    assert c["case_id"] == "DFSP-014" and c["site"] == "tumor_bed" and c["label"] == "12 o'clock"
    assert c["hours_since_injection"] == pytest.approx(22.5)
    for key in ("sbr", "intensity", "cnr", "positive", "threshold", "pairs", "rois", "settings",
                "files", "calibration_id", "clock_synchronised"):
        assert c[key] == kw[key], key
    assert c["t_ns"] == clock.time_ns()
    assert c["software_version"] and c["warnings"] == []
    assert store.get_capture(c["capture_id"])["margin_positive"] is None
    assert store.current_case()["capture_count"] == 1
    second = store.add_capture("gross_tumor", **capture_kwargs())
    assert second["capture_id"] != c["capture_id"]


def test_capture_with_undefined_sbr(store):
    store.open_case("DFSP-001", "DFSP", "control")
    c = store.add_capture("tumor_bed", **capture_kwargs(sbr=None, positive=None))
    assert c["sbr"] is None and c["positive"] is None


def test_explicit_capture_id_must_be_unique(store):
    store.open_case("DFSP-001", "DFSP", "control")
    store.add_capture("tumor_bed", capture_id="cap-1", **capture_kwargs())
    with pytest.raises(InvalidArgument, match="already used"):
        store.add_capture("tumor_bed", capture_id="cap-1", **capture_kwargs())


def test_imaging_outside_window_is_a_warning_event(store, clock):
    store.open_case("DFSP-001", "DFSP", "icg_25mg", None, iso_hours_before_start(29.5))
    inside = store.add_capture("gross_tumor", **capture_kwargs())
    assert inside["warnings"] == []
    clock.advance(3600)  # 30.5 h: past the default window's end of 30 h
    late = store.add_capture("tumor_bed", **capture_kwargs())
    assert [w["kind"] for w in late["warnings"]] == ["outside_imaging_window"]
    events = store.events("DFSP-001")
    assert [e["kind"] for e in events] == ["outside_imaging_window"]
    assert events[0]["capture_id"] == late["capture_id"]
    assert events[0]["detail"]["hours_since_injection"] == pytest.approx(30.5)
    assert "18-30 h" in events[0]["message"]


def test_opening_outside_window_warns(store):
    case = store.open_case("DFSP-001", "DFSP", "icg_25mg", None, iso_hours_before_start(2))
    assert [w["kind"] for w in case["warnings"]] == ["outside_imaging_window"]


def test_lost_frames_and_unsynchronised_clock_are_events(store):
    store.open_case("DFSP-001", "DFSP", "control", clock_synchronised=False)
    c = store.add_capture("tumor_bed", **capture_kwargs(frames_lost=3, clock_synchronised=False))
    kinds = [e["kind"] for e in store.events("DFSP-001")]
    assert kinds == ["clock_not_synchronised", "frames_lost", "clock_not_synchronised"]
    assert c["frames_lost"] == 3
    assert store.events("OTH-001") == []


def test_pathology(store):
    store.open_case("DFSP-001", "DFSP", "control")
    c = store.add_capture("tumor_bed", **capture_kwargs())
    store.close_case()  # pathology arrives after the case is closed
    got = store.set_pathology(c["capture_id"], True)
    assert got["margin_positive"] is True
    assert store.get_capture(c["capture_id"])["margin_positive"] is True
    with pytest.raises(InvalidArgument, match="reason"):
        store.set_pathology(c["capture_id"], False)  # a correction needs its reason
    store.set_pathology(c["capture_id"], False, reason="re-read")
    assert store.get_capture(c["capture_id"])["margin_positive"] is False
    assert [e["kind"] for e in store.events("DFSP-001")] == ["pathology_changed"]


def test_pathology_errors(store):
    with pytest.raises(InvalidArgument, match="no such capture"):
        store.set_pathology("DFSP-001-c001", True)
    store.open_case("DFSP-001", "DFSP", "control")
    c = store.add_capture("tumor_bed", **capture_kwargs())
    with pytest.raises(InvalidArgument, match="allowed one of"):
        store.set_pathology(c["capture_id"], 1)
    with pytest.raises(InvalidArgument, match="true or false"):
        store.set_pathology(c["capture_id"], margin_positive="yes")


# --- report --------------------------------------------------------------------------------


def test_report_counts_tumor_bed_captures_with_pathology(store):
    # (histology, arm, weight, [(site, label, call, truth or None)])
    plan = [
        ("DFSP-001", "DFSP", "icg_25mg", [("tumor_bed", "1", True, True), ("tumor_bed", "2", False, False),
                                          ("gross_tumor", "", True, False), ("tumor_bed", "3", True, None)]),
        ("DFSP-002", "DFSP", "control", [("tumor_bed", "1", True, False), ("specimen_cross_section", "", False, True)]),
        ("SSCC-003", "sSCC", "icg_0.25mg_per_kg", [("tumor_bed", "1", False, True), ("tumor_bed", "2", True, True)]),
    ]
    expected = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for case_id, histology, arm, captures in plan:
        store.open_case(case_id, histology, arm, 70 if arm == "icg_0.25mg_per_kg" else None,
                        None if arm == "control" else iso_hours_before_start(24))
        for site, label, call, truth in captures:
            c = store.add_capture(site, label, **capture_kwargs(positive=call))
            if truth is not None:
                store.set_pathology(c["capture_id"], margin_positive=truth)
                if site == "tumor_bed" and arm != "control":
                    key = ("t" if call == truth else "f") + ("p" if call else "n")
                    expected[key] += 1
        store.close_case()
    rep = store.report()
    groups = {(g["histology"], g["arm"]): g for g in rep["groups"]}
    # the control arm has no imaging: never in the accuracy groups
    assert set(groups) == {("DFSP", "icg_25mg"), ("DFSP", "all"),
                           ("sSCC", "icg_0.25mg_per_kg"), ("sSCC", "all"), ("all", "all")}
    assert groups[("all", "all")]["counts"] == expected
    assert groups[("sSCC", "all")]["positive_margins"] == 2
    assert rep["flow"]["not_evaluable"]["control_arm"] == 1 and rep["flow"]["without_pathology"] == 1
    only = store.report(histology="sSCC")
    assert {g["histology"] for g in only["groups"]} == {"sSCC", "all"}
    with pytest.raises(InvalidArgument, match="allowed"):
        store.report(arm="placebo")


# --- export --------------------------------------------------------------------------------


def read_csv(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_export_csv_one_case_and_study(store, tmp_path):
    store.open_case("DFSP-001", "DFSP", "icg_0.25mg_per_kg", 80, iso_hours_before_start(24))
    a = store.add_capture("tumor_bed", "3 o'clock", **capture_kwargs())
    store.add_capture("gross_tumor", "=cmd()", **capture_kwargs(sbr=None, positive=None))
    store.set_pathology(a["capture_id"], "negative", blinded=True, by="carol")
    store.close_case()
    store.open_case("DFSP-002", "DFSP", "control")
    store.add_capture("tumor_bed", **capture_kwargs())
    out = tmp_path / "export"
    out.mkdir()
    n = store.export_csv(out / "case1.csv", case_id="DFSP-001")
    rows = read_csv((out / "case1.csv").read_text())
    assert n == len(rows) == 4  # the case, two captures, one pathology entry
    assert list(rows[0]) == list(records.COLUMNS)
    by_type = {}
    for r in rows:
        by_type.setdefault(r["record_type"], []).append(r)
    (case,) = by_type["case"]
    assert case["case_id"] == "DFSP-001" and case["arm"] == "icg_0.25mg_per_kg"
    assert float(case["dose_mg"]) == pytest.approx(20.0) and case["centre_id"] and case["cart_id"]
    bed, gross = by_type["capture"]
    assert bed["capture_id"] == a["capture_id"] and bed["label"] == "3 o'clock" and bed["positive"] == "1"
    assert gross["sbr"] == "" and gross["positive"] == ""
    assert gross["label"] == "'=cmd()"  # a spreadsheet must not run it as a formula
    (path,) = by_type["pathology"]
    assert (path["status"], path["blinded"], path["entered_by"]) == ("negative", "1", "carol")
    assert path["capture_uid"] == bed["record_uid"]
    assert sorted(os.listdir(out)) == ["case1.csv"]  # no temporary file left
    back = records.read_csv(io.StringIO((out / "case1.csv").read_text()))
    assert back["captures"][1]["label"] == "=cmd()"  # and the quote comes off when read back

    buf = io.StringIO()
    assert store.export_csv(buf) == 6
    assert [r["case_id"] for r in read_csv(buf.getvalue()) if r["record_type"] == "case"] == ["DFSP-001", "DFSP-002"]
    with pytest.raises(InvalidArgument, match="no such case"):
        store.export_csv(io.StringIO(), case_id="NOPE-001")


# --- durability across processes -----------------------------------------------------------


def test_committed_capture_survives_reopen(tmp_path, clock):
    s = CaseStore(tmp_path / "s.db", clock=clock)
    s.open_case("DFSP-001", "DFSP", "control")
    c = s.add_capture("tumor_bed", **capture_kwargs())
    s.set_pathology(c["capture_id"], margin_positive=True)
    s.close()
    s = CaseStore(tmp_path / "s.db", clock=clock)
    try:
        again = s.get_capture(c["capture_id"])
        assert again["sbr"] == c["sbr"] and again["margin_positive"] is True
    finally:
        s.close()


def _writer_then_hang(path: str, n_committed: int, conn) -> None:
    """Child process: commit some captures through the store, then stop in the middle of a
    write transaction and wait to be killed."""
    store = CaseStore(path, clock=ManualClock())
    store.open_case("DFSP-077", "DFSP", "control")
    for i in range(n_committed):
        c = store.add_capture("tumor_bed", f"site {i}", sbr=2.0 + i, intensity=1.0, cnr=1.0,
                              positive=True, threshold=2.0)
        conn.send(c["capture_id"])
    # A transaction left open: the rows are written into the WAL but never committed.
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA synchronous=FULL")
    raw.execute("BEGIN IMMEDIATE")
    raw.execute("INSERT INTO captures (capture_id, case_id, site, label, t_ns, captured_at, rois, "
                "settings, files, software_version, config_hash, calibration_id, frames_lost) "
                "VALUES ('uncommitted-1', 'DFSP-077', 'tumor_bed', '', 0, '', '{}', '{}', '[]', '', '', '', 0)")
    raw.execute("UPDATE cases SET closed_at = 'never' WHERE case_id = 'DFSP-077'")
    conn.send("in-transaction")
    conn.poll(30)  # the parent kills us long before this ends


def test_killed_writer_leaves_committed_rows(tmp_path):
    path = str(tmp_path / "crash.db")
    # spawn, not fork: the child must not inherit other tests' threads or locks.
    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=_writer_then_hang, args=(path, 5, child_end), daemon=True)
    proc.start()
    committed = []
    try:
        while True:
            assert parent_end.poll(20), "writer process sent nothing within 20 s"
            msg = parent_end.recv()
            if msg == "in-transaction":
                break
            committed.append(msg)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    assert len(committed) == 5

    store = CaseStore(path, clock=ManualClock())
    try:
        caps = store.captures("DFSP-077")
        assert [c["capture_id"] for c in caps] == committed
        assert [c["sbr"] for c in caps] == [2.0 + i for i in range(5)]
        assert store.current_case()["case_id"] == "DFSP-077"  # the uncommitted close is gone
        # The store is still writable: no lock was left behind.
        store.add_capture("tumor_bed", **capture_kwargs())
    finally:
        store.close()
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
