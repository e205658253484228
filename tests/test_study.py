"""The v2 study report on a synthetic study, every figure against statsmodels, scipy and
lifelines (tests/study_reference.py); the control arm's place; corrections; enrolment
checks; pooling of two carts; the long CSV and its REDCap data dictionary."""

from __future__ import annotations

import csv
import io
import re
import sqlite3
from types import SimpleNamespace

import pytest

from nirf.hal.clock import ManualClock
from nirf.hal.errors import InvalidArgument, WrongState
from nirf.services.study.casestore import CaseStore
from nirf.services.study.report import ReportOptions
from nirf.services.study import pool, records
from tests import study_reference as ref
from tests.study_synth import make_study

RESAMPLES = 400


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    clock = ManualClock()
    path = tmp_path_factory.mktemp("study") / "study.db"
    store = CaseStore(path, clock=clock, centre_id="AMS", cart_id="cart-a",
                      report_options=ReportOptions(bootstrap_resamples=RESAMPLES))
    make_study(store, clock)
    yield store
    store.close()


def test_every_figure_equals_the_outside_references(study, capsys):
    report = study.report()
    want = ref.reference_report(study.dataset(), resamples=RESAMPLES)
    diffs = ref.compare(report, want)
    assert len(diffs) > 500
    # the synthetic study exercises every path it is meant to
    flow = report["flow"]
    assert all(flow["not_evaluable"][k] > 0 for k in ("retake", "no_valid_call", "control_arm"))
    assert flow["close"] > 0 and flow["indeterminate"] > 0 and flow["without_pathology"] > 0
    assert any(a["events"] > 0 for r in report["recurrence"] for a in r["arms"])
    assert all(r["logrank_p"] is not None for r in report["recurrence"])
    km = [a["km_24m"] for r in report["recurrence"] for a in r["arms"]]
    assert sum(v is not None for v in km) >= 4, km
    with capsys.disabled():
        print(f"\n[study] {len(diffs)} figures vs statsmodels/scipy/lifelines, max abs difference "
              f"{max(diffs):.3g}")


@pytest.mark.slow  # several seconds of reference statistics: in make test, not test-quick
def test_rescored_at_a_threshold_equals_the_references(study):
    report = study.report(threshold=2.5)
    assert report["threshold"] == 2.5
    ref.compare(report, ref.reference_report(study.dataset(), threshold=2.5, resamples=RESAMPLES))
    # a capture below its intensity floor stays negative at a low threshold
    floored = [c for c in study.dataset()["captures"] if c["intensity_floor"] is not None and c["sbr"]
               and c["sbr"] >= 1.0 and c["intensity"] < c["intensity_floor"]]
    assert floored, "the synthetic study has captures below their intensity floor"
    ref.compare(study.report(threshold=1.0),
                ref.reference_report(study.dataset(), threshold=1.0, resamples=RESAMPLES))


def test_the_control_arm_is_never_in_the_accuracy_groups(study):
    report = study.report()
    for section in ("groups", "per_patient", "roc", "sbr_by_pathology"):
        assert all(g["arm"] != "control" for g in report[section]), section
    assert all(any(a["arm"] == "control" for a in m["arms"]) for m in report["margins_by_arm"])
    assert all(any(a["arm"] == "control" for a in r["arms"]) for r in report["recurrence"])
    assert any(a["arm"] == "control" for a in report["adverse_events"])
    assert report["flow"]["enrolled"]["control"] > 0
    # the control arm alone: nothing to score
    only = study.report(arm="control")
    assert [(g["histology"], g["arm"]) for g in only["groups"]] == [("all", "all")]
    assert sum(only["groups"][0]["counts"].values()) == 0


def test_every_tumor_bed_capture_is_accounted_for(study):
    f = study.report()["flow"]
    buckets = (f["scored_margins"] + sum(f["not_evaluable"].values()) + f["without_pathology"]
               + f["close"] + f["indeterminate"])
    assert buckets == f["tumor_bed_captures"]
    assert f["window_deviations"] > 0


@pytest.mark.slow  # seconds of CPU: in make test, not in test-quick
def test_close_and_indeterminate_can_be_counted(tmp_path):
    clock = ManualClock()
    store = CaseStore(tmp_path / "s.db", clock=clock, report_options=ReportOptions(
        close_as="positive", indeterminate_as="negative", bootstrap_resamples=200))
    make_study(store, clock, per_cell=3, seed=3)
    default = ref.reference_report(store.dataset(), resamples=200)
    report = store.report()
    assert report["flow"]["close"] == default["flow"]["close"]  # still counted in the flow
    scored = sum(report["groups"][-1]["counts"].values())
    assert scored == default["flow"]["scored_margins"] + default["flow"]["close"] + default["flow"]["indeterminate"]


def test_an_observer_report_leaves_out_the_comparative_outcomes(study):
    report = study.report(comparative=False)
    assert not {"margins_by_arm", "recurrence", "adverse_events"} & set(report)
    assert {"groups", "per_patient", "flow", "roc", "methods"} <= set(report)


def test_report_rejects_a_bad_threshold(study):
    for bad in (0, -1, "2", True, 5000):
        with pytest.raises(InvalidArgument, match="threshold"):
            study.report(threshold=bad)


# --- corrections (D5) -------------------------------------------------------------------


def test_corrections_keep_the_history_and_need_a_reason(tmp_path):
    clock = ManualClock()
    store = CaseStore(tmp_path / "s.db", clock=clock)
    store.open_case("DFSP-001", "DFSP", "control")
    cap = store.add_capture("tumor_bed", "12", sbr=3.0, intensity=1.0, cnr=1.0, positive=True, threshold=2.0)
    store.close_case()
    first = store.set_pathology(cap["capture_id"], "close", blinded=True, by="carol")
    assert first["entered_by"] == "carol" and len(first["history"]) == 1
    assert store.set_pathology(cap["capture_id"], "close", blinded=True, by="carol")["history"] == first["history"]
    with pytest.raises(InvalidArgument, match="needs a reason"):
        store.set_pathology(cap["capture_id"], "positive", blinded=True, by="dave")
    clock.advance(60)
    second = store.set_pathology(cap["capture_id"], "positive", blinded=True, reason="deeper levels", by="dave")
    old, new = second["history"]
    assert (old["status"], old["entered_by"], old["reason"]) == ("close", "carol", None)
    assert (new["status"], new["entered_by"], new["reason"]) == ("positive", "dave", "deeper levels")
    assert new["entered_at"] > old["entered_at"]
    # the margin status, and a visit entered again with another finding
    store.set_margin("DFSP-001", "negative", by="carol")
    with pytest.raises(InvalidArgument, match="needs a reason"):
        store.set_margin("DFSP-001", "positive", by="carol")
    assert [e["status"] for e in store.set_margin("DFSP-001", "positive", reason="addendum",
                                                  by="dave")["history"]] == ["negative", "positive"]
    visit = clock_date(clock)
    store.add_followup("DFSP-001", visit, False, by="erin")
    with pytest.raises(InvalidArgument, match="needs a reason"):
        store.add_followup("DFSP-001", visit, True, by="erin")
    entries = store.add_followup("DFSP-001", visit, True, reason="biopsy", by="erin")["entries"]
    assert [(e["local_recurrence"], e["reason"]) for e in entries] == [(False, None), (True, "biopsy")]
    # the database itself refuses to rewrite or delete an entry
    store.close()
    db = sqlite3.connect(tmp_path / "s.db")
    for table in ("pathology_entries", "margin_entries", "followup_entries", "ae_entries"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(f"UPDATE {table} SET entered_by = 'x'")
            db.execute(f"DELETE FROM {table}")
            raise sqlite3.DatabaseError("append-only (empty table)")
    db.close()


def test_a_case_correction_keeps_the_old_value_who_when_why(tmp_path):
    from tests.test_casestore import iso_hours_before_start

    store = CaseStore(tmp_path / "s.db", clock=ManualClock())
    store.open_case("DFSP-001", "DFSP", "icg_0.25mg_per_kg", 60, iso_hours_before_start(20), by="alice")
    store.close_case()
    with pytest.raises(InvalidArgument, match="reason"):
        store.correct_case("DFSP-001", "weight_kg", 80, reason="", by="bob")
    with pytest.raises(InvalidArgument, match="20 to 200"):
        store.correct_case("DFSP-001", "weight_kg", 400, reason="typo", by="bob")
    with pytest.raises(InvalidArgument, match="allowed one of"):
        store.correct_case("DFSP-001", "arm", "control", reason="typo", by="bob")
    case = store.correct_case("DFSP-001", "weight_kg", 80, reason="scale read wrongly", by="bob")
    assert case["weight_kg"] == 80 and case["dose_mg"] == pytest.approx(20.0)
    (c,) = case["corrections"]
    assert (c["field"], c["old_value"], c["new_value"], c["entered_by"], c["reason"]) == (
        "weight_kg", "60.0", "80.0", "bob", "scale read wrongly")
    data = _export(store)
    assert data["case_corrections"][0]["old_value"] == "60.0" and data["cases"][0]["dose_mg"] == 20.0


def clock_date(clock) -> str:
    from tests.study_synth import today
    return today(clock).date().isoformat()


# --- enrolment checks -----------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["JohnSmith1", "DFSP-1", "dfsp-001", "D-001", "DFSP-001 ", "DFSPXYZ-001",
                                     "DFSP-123456"])
def test_case_ids_must_match_the_pattern(tmp_path, case_id):
    store = CaseStore(tmp_path / "s.db", clock=ManualClock())
    with pytest.raises(InvalidArgument, match="pattern"):
        store.open_case(case_id, "DFSP", "control")


def test_the_pattern_is_configurable(tmp_path):
    store = CaseStore(tmp_path / "s.db", clock=ManualClock(), case_id_pattern=r"^P[0-9]{4}$")
    assert store.open_case("P0001", "DFSP", "control")["case_id"] == "P0001"


@pytest.mark.parametrize("kwargs, match", [
    ({"arm": "icg_0.25mg_per_kg", "weight_kg": 400, "hours": 20}, "allowed 20 to 200"),
    ({"arm": "icg_0.25mg_per_kg", "weight_kg": 15, "hours": 20}, "allowed 20 to 200"),
    ({"arm": "icg_25mg", "hours": -3}, "in the future"),
    ({"arm": "control", "hours": 20}, "control arm receives no ICG"),
    ({"arm": "control", "exclusions_confirmed": False}, "exclusion criteria"),
    ({"arm": "control", "surgery_date": "2999-01-01"}, "after today"),
    ({"arm": "control", "surgery_date": "01/02/2024"}, "ISO date"),
])
def test_enrolment_checks(tmp_path, kwargs, match):
    from tests.test_casestore import iso_hours_before_start

    kwargs = dict(kwargs)
    hours = kwargs.pop("hours", None)
    if hours is not None:
        kwargs["injection_time"] = iso_hours_before_start(hours)
    store = CaseStore(tmp_path / "s.db", clock=ManualClock())
    with pytest.raises(InvalidArgument, match=match):
        store.open_case("DFSP-001", "DFSP", **kwargs)
    assert store.cases() == []


def test_exclusions_are_required_where_the_store_says(tmp_path):
    store = CaseStore(tmp_path / "s.db", clock=ManualClock(), require_exclusions=True)
    with pytest.raises(InvalidArgument, match="exclusions_confirmed is required"):
        store.open_case("DFSP-001", "DFSP", "control")
    assert store.open_case("DFSP-001", "DFSP", "control", exclusions_confirmed=True)["exclusions_confirmed"]


def test_the_device_refuses_an_unsynchronised_clock_unless_overridden():
    from nirf.services.study.clinical import Clinical

    gate = Clinical.__new__(Clinical)  # only the gate: no sockets needed
    gate.cfg = SimpleNamespace(profile="device")
    for state in (False, None):
        gate.clock_sync = lambda state=state: state
        with pytest.raises(WrongState, match="not synchronised"):
            gate._clock_gate("case.open", {})
        assert gate._clock_gate("capture", {"clock_override_reason": "GPS down, time set by hand"}) == (
            state, "GPS down, time set by hand")
    gate.clock_sync = lambda: True
    assert gate._clock_gate("case.open", {}) == (True, None)
    gate.cfg = SimpleNamespace(profile="sim")
    gate.clock_sync = lambda: False
    assert gate._clock_gate("case.open", {}) == (False, None)


def test_an_override_is_recorded_as_a_deviation(tmp_path):
    store = CaseStore(tmp_path / "s.db", clock=ManualClock())
    store.open_case("DFSP-001", "DFSP", "control", clock_synchronised=False,
                    clock_override_reason="no network in theatre 3", by="alice")
    kinds = [d["kind"] for d in store.report()["deviations"]]
    assert kinds == ["clock_not_synchronised", "clock_override"]
    assert store.dataset()["cases"][0]["clock_override_reason"] == "no network in theatre 3"


def test_the_clock_state_reader_answers():
    from nirf.services.study.casestore import wall_clock_synchronised

    assert wall_clock_synchronised() in (True, False, None)


# --- several centres and carts -----------------------------------------------------------


def _two_centres(tmp_path, same_numbers=True):
    stores = []
    for centre, cart, seed, first in (("AMS", "cart-a", 11, 1), ("ROT", "cart-b", 12, 1 if same_numbers else 501)):
        clock = ManualClock()
        s = CaseStore(tmp_path / f"{cart}-{first}" / "study.db", clock=clock, centre_id=centre, cart_id=cart,
                      report_options=ReportOptions(bootstrap_resamples=RESAMPLES))
        make_study(s, clock, seed=seed, per_cell=3, first_number=first)
        stores.append(s)
    return stores


def _export(store) -> dict:
    buf = io.StringIO()
    store.export_csv(buf)
    return records.read_csv(io.StringIO(buf.getvalue()))


@pytest.mark.slow  # several seconds of reference statistics: in make test, not test-quick
def test_pooling_two_centres_equals_one_cart_holding_all(tmp_path):
    a, b = _two_centres(tmp_path)
    assert {c["case_id"] for c in a.dataset()["cases"]} == {c["case_id"] for c in b.dataset()["cases"]}
    pooled, summary = pool.pool([("a.csv", _export(a)), ("b.csv", _export(b))])
    assert summary["conflicts"] == [] and summary["merged"] == []
    # one cart holding every case: the second centre's cases entered on it under their centre
    # (a cart gives each local case number once, so they get other numbers there)
    path = tmp_path / "one" / "study.db"
    for centre, seed, first in (("AMS", 11, 1), ("ROT", 12, 501)):
        clock = ManualClock()
        with CaseStore(path, clock=clock, centre_id=centre, cart_id="cart-a") as one:
            make_study(one, clock, seed=seed, per_cell=3, first_number=first)
    with CaseStore(path, clock=ManualClock(), report_options=ReportOptions(bootstrap_resamples=RESAMPLES)) as one:
        whole = one.report()
    from nirf.services.study.report import build_study_report

    got = build_study_report(pooled, options=ReportOptions(bootstrap_resamples=RESAMPLES))

    def local(number_text: str) -> str:  # DFSP-512 -> DFSP-012
        p, n = number_text.split("-", 1)
        return f"{p}-{int(n[:3]) - 500:03d}{n[3:]}"

    for d in whole["deviations"]:
        if d["centre_id"] == "ROT":
            d["case_id"] = local(d["case_id"])
            d["capture_id"] = d["capture_id"] and local(d["capture_id"])
            d["message"] = re.sub(r"(DFSP|SSCC)-5(\d\d)", lambda m: f"{m[1]}-0{m[2]}", d["message"])
    for d in whole["deviations"] + got["deviations"]:
        d["cart_id"] = None
    key = lambda d: (d["centre_id"], d["case_id"], d["kind"], d["at"])  # noqa: E731
    whole["deviations"].sort(key=key)
    got["deviations"].sort(key=key)
    assert got["deviations"] == whole["deviations"]
    assert got == whole
    # and the pooled figures are right by the outside references
    ref.compare(got, ref.reference_report(pooled, resamples=RESAMPLES))


def test_the_same_patient_from_two_carts_is_merged_when_equal_and_a_conflict_when_not(tmp_path):
    a, b = _two_centres(tmp_path)
    ea, eb = _export(a), _export(b)
    # the same export twice: every record is the same record (same uid), nothing doubles
    twice, summary = pool.pool([("a.csv", ea), ("a-again.csv", ea)])
    assert summary["conflicts"] == [] and twice == records.fill(ea)
    # cart B also saw AMS patient DFSP-001, with the same patient record
    case = next(c for c in ea["cases"] if c["case_id"] == "DFSP-001")
    seen_b = {**case, "uid": "b" * 32, "cart_id": "cart-b"}
    cap_b = {**next(c for c in ea["captures"] if c["case_id"] == "DFSP-001"), "uid": "c" * 32,
             "cart_id": "cart-b", "capture_uid": "c" * 32}
    extra = {"cases": [seen_b], "captures": [cap_b]}
    merged, summary = pool.pool([("a.csv", ea), ("b.csv", eb), ("b2.csv", records.fill(extra))])
    assert summary["conflicts"] == []
    assert [(m["centre_id"], m["case_id"]) for m in summary["merged"]] == [("AMS", "DFSP-001")]
    assert sum(c["case_id"] == "DFSP-001" and c["centre_id"] == "AMS" for c in merged["cases"]) == 1
    assert any(c["uid"] == "c" * 32 for c in merged["captures"])
    # ... and with another arm and dose: a conflict, not merged, left out
    other = ("icg_25mg", 25.0) if case["arm"] != "icg_25mg" else ("control", 0.0)
    seen_b = {**seen_b, "arm": other[0], "dose_mg": other[1]}
    out, summary = pool.pool([("a.csv", ea), ("b2.csv", records.fill({"cases": [seen_b]}))])
    (conflict,) = summary["conflicts"]
    assert conflict["kind"] == "patient" and (conflict["centre_id"], conflict["case_id"]) == ("AMS", "DFSP-001")
    assert set(conflict["fields"]) == {"arm", "dose_mg"} and summary["merged"] == []
    assert not any(r["case_id"] == "DFSP-001" for lst in out.values() for r in lst)
    # a record changed under the same uid is a conflict too
    changed = records.fill(ea)
    changed["captures"][0] = {**changed["captures"][0], "sbr": 9.9}
    _, summary = pool.pool([("a.csv", ea), ("a-edited.csv", changed)])
    assert [c["kind"] for c in summary["conflicts"]] == ["uid"]
    assert set(summary["conflicts"][0]["fields"]) == {"sbr"}


# --- the export and its data dictionary ---------------------------------------------------

# REDCap's field types and text validation types (its data dictionary documentation).
REDCAP_FIELD_TYPES = {"text", "notes", "dropdown", "radio", "checkbox", "yesno", "truefalse", "calc",
                      "file", "descriptive", "slider", "sql"}
REDCAP_VALIDATIONS = {"", "date_ymd", "date_mdy", "date_dmy", "datetime_ymd", "datetime_seconds_ymd",
                      "integer", "number", "email", "phone", "time", "zipcode", "alpha_only"}


def test_export_is_long_csv_with_a_redcap_dictionary(study, tmp_path):
    out, dictionary = tmp_path / "study.csv", tmp_path / "dictionary.csv"
    n = study.export_csv(out)
    study.export_dictionary(dictionary)
    with dictionary.open(newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == (
        "Variable / Field Name", "Form Name", "Section Header", "Field Type", "Field Label",
        "Choices, Calculations, OR Slider Labels", "Field Note", "Text Validation Type OR Show Slider Number",
        "Text Validation Min", "Text Validation Max", "Identifier?", "Branching Logic (Show field only if...)",
        "Required Field?", "Custom Alignment", "Question Number (surveys only)", "Matrix Group Name",
        "Matrix Ranking?", "Field Annotation")
    fields = {r[0]: r for r in rows[1:]}
    for name, r in fields.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]{0,99}", name), name
        assert r[1] == "study_record" and r[4], name
        assert r[3] in REDCAP_FIELD_TYPES and r[7] in REDCAP_VALIDATIONS, r
        assert bool(r[5]) == (r[3] in ("dropdown", "radio", "checkbox")), r
    with out.open(newline="") as f:
        data = list(csv.DictReader(f))
    assert len(data) == n > 100
    header = list(data[0])
    assert header[0] == rows[1][0]  # the record id comes first, as REDCap wants
    assert set(header) <= set(fields)
    choices = {name: {c.split(",")[0].strip() for c in r[5].split("|")} for name, r in fields.items() if r[5]}
    for row in data:
        for col, cell in row.items():
            if cell == "":
                continue
            f = fields[col]
            assert not (cell.startswith(("{", "[")) and cell.endswith(("}", "]"))), (col, cell)  # no JSON
            if f[3] == "yesno":
                assert cell in ("0", "1"), (col, cell)
            if f[3] == "dropdown":
                assert cell in choices[col], (col, cell)
            if f[7] == "integer":
                int(cell)
            if f[7] == "number":
                float(cell)
            if f[7] == "date_ymd":
                assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", cell), (col, cell)
    assert {r["record_type"] for r in data} == set(records.KINDS)
    assert len({r["record_uid"] for r in data}) == len(data)


def test_export_reads_back_to_the_same_records(study):
    assert _export(study) == study.dataset()


def test_a_version_1_database_is_migrated(tmp_path):
    from nirf.services.study import casestore

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    casestore._run_script(db, casestore._SCHEMA_V1, {})
    db.execute("INSERT INTO cases VALUES ('DFSP-014', 'DFSP', 'icg_25mg', NULL, 25, '2024-05-01T08:00:00+00:00', "
               "0, '2024-05-02T08:00:00+00:00', 0, NULL, NULL, NULL, 'v1', '')")
    db.execute("INSERT INTO captures VALUES ('DFSP-014-c001', 'DFSP-014', 'tumor_bed', '12', 1, 'x', 24, 8, 3.0, "
               "1.0, 2.0, 1, 2.0, '{}', '{}', '[]', 'v1', '', 'nominal', NULL, 0)")
    db.execute("INSERT INTO pathology VALUES ('DFSP-014-c001', 1, '2024-05-03T08:00:00+00:00', 5)")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    with CaseStore(path, clock=ManualClock(), centre_id="AMS", cart_id="cart-a") as store:
        data = store.dataset()
        assert data["cases"][0]["centre_id"] == "AMS" and len(data["cases"][0]["uid"]) == 32
        assert data["cases"][0]["surgery_date"] == "2024-05-02"
        assert data["pathology"][0]["status"] == "positive"
        assert store.get_capture("DFSP-014-c001")["margin_positive"] is True
        assert store.report()["groups"][-1]["counts"]["tp"] == 1


@pytest.mark.parametrize("column, cell, match", [
    ("arm", "icg_1mg", "column arm"),
    ("exclusions_confirmed", "yes", "exclusions_confirmed"),
    ("surgery_date", "02/05/2024", "YYYY-MM-DD"),
    ("histology", "BCC", "allowed DFSP, sSCC"),
    ("weight_kg", "seventy", "weight_kg"),
])
def test_a_damaged_export_is_refused_naming_line_column_and_value(study, column, cell, match):
    buf = io.StringIO()
    study.export_csv(buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    rows[0][column] = cell
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    with pytest.raises(InvalidArgument, match=match) as err:
        records.read_csv(io.StringIO(out.getvalue()), name="centre-a.csv")
    assert "centre-a.csv line 2" in str(err.value)
    with pytest.raises(InvalidArgument, match="not in the study's data dictionary"):
        records.read_csv(io.StringIO("record_uid,record_type,centre_id,cart_id,case_id,patient_name\n"))
