"""nirfctl's study commands without a cart: the requests margin/followup/ae/pathology/report
make, ``export --dictionary`` and ``pool`` over two state folders."""

from __future__ import annotations

import csv
import json

from nirf.hal.clock import ManualClock
from nirf.services.cli import main as cli
from nirf.services.study.casestore import CaseStore
from tests.study_synth import make_study


def request(*argv):
    return cli._request_for(cli._parser().parse_args(list(argv)))


def test_the_requests_of_the_study_commands():
    assert request("margin", "set", "DFSP-014", "close", "--reason", "addendum") == (
        "margin.set", {"case_id": "DFSP-014", "status": "close", "reason": "addendum"})
    assert request("followup", "add", "DFSP-014", "2025-05-02", "--recurrence") == (
        "followup.add", {"case_id": "DFSP-014", "visit_date": "2025-05-02", "local_recurrence": True})
    assert request("ae", "add", "DFSP-014", "rash", "--grade", "2", "--related", "possible",
                   "--onset", "2024-05-03")[1] == {"case_id": "DFSP-014", "term": "rash", "grade": 2,
                                                  "related": "possible", "onset": "2024-05-03"}
    assert request("pathology", "set", "DFSP-014-c002", "indeterminate", "--not-blinded") == (
        "pathology.set", {"capture_id": "DFSP-014-c002", "status": "indeterminate", "blinded": False})
    assert request("report", "--threshold", "2.5", "--histology", "DFSP") == (
        "report", {"histology": "DFSP", "threshold": 2.5})
    assert request("case", "open", "DFSP-014", "--histology", "DFSP", "--arm", "control",
                   "--exclusions-confirmed", "--surgery-date", "2024-05-02")[1] == {
        "case_id": "DFSP-014", "histology": "DFSP", "arm": "control", "surgery_date": "2024-05-02",
        "exclusions_confirmed": True}


def test_export_with_dictionary_and_pool_of_two_centres(tmp_path, capsys):
    exports = []
    for centre, cart_id, seed in (("AMS", "cart-a", 1), ("ROT", "cart-b", 2)):
        state = tmp_path / cart_id
        clock = ManualClock()
        with CaseStore(state / "study.db", clock=clock, centre_id=centre, cart_id=cart_id) as store:
            make_study(store, clock, seed=seed, per_cell=2)
        out = tmp_path / f"{cart_id}.csv"
        args = ["--state-dir", str(state), "export", "--out", str(out)]
        if centre == "AMS":
            args += ["--dictionary", str(tmp_path / "dictionary.csv")]
        assert cli.main(args) == cli.EXIT_OK
        exports.append(out)
    assert "data dictionary" in capsys.readouterr().err
    with (tmp_path / "dictionary.csv").open(newline="") as f:
        assert next(csv.reader(f))[0] == "Variable / Field Name"
    pooled, page, report = tmp_path / "pooled.csv", tmp_path / "pooled.html", tmp_path / "pooled.json"
    assert cli.main(["pool", *map(str, exports), "--out", str(pooled), "--html", str(page),
                     "--report", str(report)]) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert "24 patient(s), 0 merged, 0 conflict(s)" in err
    rep = json.loads(report.read_text())
    assert sum(rep["flow"]["enrolled"].values()) == 24
    assert rep["pooling"]["conflicts"] == []
    assert "<svg" in page.read_text()
    with pooled.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["centre_id"] for r in rows} == {"AMS", "ROT"}
    # the same export twice pools to the same patients: records are known by their uid
    assert cli.main(["pool", str(exports[0]), str(exports[0]), "--report", str(report)]) == cli.EXIT_OK
    assert "12 patient(s), 0 merged, 0 conflict(s)" in capsys.readouterr().err
