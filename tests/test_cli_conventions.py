"""``nirfctl``'s command-line conventions without a cart: ``--json`` anywhere on the line,
``--version``, ``export --json``, a readable self-test, a closed pipe, exit codes."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys


from nirf.services.cli import main as cli
from nirf.services.study.casestore import CaseStore
from tests.cartproc import ROOT


def test_json_may_follow_any_subcommand():
    assert cli.split_anywhere_flags(["capture", "tumor_bed", "--json"]) == (["capture", "tumor_bed"], {"--json"})
    assert cli.split_anywhere_flags(["--json", "status"]) == (["status"], {"--json"})
    # the global options with a value may follow too
    assert cli.split_anywhere_flags(["status", "--config", "x.toml", "--timeout=3"]) == (
        ["--config", "x.toml", "--timeout=3", "status"], set())
    # after "--" nothing is taken: it may be an argument's value
    assert cli.split_anywhere_flags(["call", "x", "--", "--json"]) == (["call", "x", "--", "--json"], set())
    for line in (["capture", "tumor_bed", "--label", "x", "--json"], ["laser", "on", "--mw", "5", "--json"],
                 ["backup", "--json", "--dest", "/tmp"]):
        rest, found = cli.split_anywhere_flags(line)
        assert found == {"--json"} and cli._parser().parse_args(rest).command == line[0]


def test_version_is_printed_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "nirf.services.cli.main", "--version"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0
    assert proc.stdout.startswith("nirfctl ") and proc.stdout.split()[1][0].isdigit()


def _store_with_captures(state, n: int):
    with CaseStore(state / "study.db") as store:
        import datetime

        when = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=24)).isoformat()
        store.open_case("DFSP-014", "DFSP", "icg_25mg", injection_time=when, clock_synchronised=True)
        for i in range(n):
            store.add_capture("tumor_bed", f"spot {i}", sbr=3.0 + i, intensity=100.0, cnr=4.0, positive=True,
                              threshold=2.0, pairs=8, rois={"signal": [1, 1, 4, 4], "background": [9, 9, 4, 4]},
                              settings={}, files=[], clock_synchronised=True)


def test_export_json_after_the_subcommand_gives_the_rows_as_maps(tmp_path, capsys):
    _store_with_captures(tmp_path, 2)
    code = cli.main(["--state-dir", str(tmp_path), "export", "--case", "DFSP-014", "--json"])
    out, err = capsys.readouterr()
    doc = json.loads(out)
    # the same rows as the CSV export (long format: the case's record, then one per capture)
    cli.main(["--state-dir", str(tmp_path), "export", "--case", "DFSP-014"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert code == 0 and doc["ok"] is True and doc["result"]["rows"] == len(rows)
    assert doc["result"]["records"] == rows
    assert [r["label"] for r in rows if r["record_type"] == "capture"] == ["spot 0", "spot 1"]


def test_export_json_to_a_file_reports_it(tmp_path, capsys):
    _store_with_captures(tmp_path, 1)
    out_file = tmp_path / "x.csv"
    assert cli.main(["--json", "--state-dir", str(tmp_path), "export", "--out", str(out_file)]) == 0
    doc = json.loads(capsys.readouterr().out)
    with open(out_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert doc["result"] == {"rows": len(rows), "case_id": None, "out": str(out_file), "dictionary": None}
    assert [r["record_type"] for r in rows].count("capture") == 1


def test_a_closed_pipe_ends_quietly(tmp_path):
    _store_with_captures(tmp_path, 400)  # far more than a pipe holds
    script = (f"{sys.executable} -m nirf.services.cli.main --state-dir {tmp_path} export | head -n 2; "
              "exit ${PIPESTATUS[0]}")
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_selftest_is_a_line_per_device():
    text = cli.format_selftest({"ok": False, "devices": {
        "laser-mcu": {"ok": True, "identity": "MCU 1.2", "temp_c": 31.5},
        "camera": {"ok": False, "error": "only 3 of 10 frames within 5 s"}}})
    lines = text.splitlines()
    assert lines[0].split() == ["self-test", "FAIL"]
    assert lines[1].split()[:2] == ["laser-mcu", "ok"] and "temp_c 31.5" in lines[1]
    assert lines[2].split()[:2] == ["camera", "FAIL"] and "only 3 of 10 frames" in lines[2]


def test_a_config_error_is_json_with_json(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cart]\nnope = 1\n")
    code = cli.main(["status", "--json", "--config", str(bad)])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE and json.loads(out)["ok"] is False and "nope" in err


def test_backup_passes_an_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = cli._parser().parse_args(["backup", "--dest", "usb"])
    assert cli._request_for(args) == ("backup", {"dest": str(tmp_path / "usb")})
    assert cli._request_for(cli._parser().parse_args(["backup"])) == ("backup", {})


def test_a_usage_problem_found_after_parsing_exits_2_and_says_why(tmp_path, capsys):
    # no keys in this state folder: named, exit 2, and a JSON error with --json
    code = cli.main(["--state-dir", str(tmp_path), "status", "--json"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE and "server.key" in err
    doc = json.loads(out)
    assert doc["ok"] is False and doc["error"]["code"] == "USAGE" and "server.key" in doc["error"]["message"]


def test_capture_overrides_go_into_the_request():
    """``nirfctl capture`` can give the device profile's calibration-gate override and the
    clock override, each with its reason; without them the request carries neither."""
    from nirf.services.cli import main as cli

    def request(*argv):
        return cli._request_for(cli._parser().parse_args(["capture", "tumor_bed", *argv]))

    assert request() == ("capture", {"site": "tumor_bed", "label": "", "pairs": 8})
    cmd, args = request("--pairs", "4", "--override-reason", "QC target cracked, replaced tomorrow",
                        "--clock-override-reason", "no network in theatre 3")
    assert cmd == "capture" and args["pairs"] == 4
    assert args["override_reason"] == "QC target cracked, replaced tomorrow"
    assert args["clock_override_reason"] == "no network in theatre 3"
