"""The clinical workflow on the whole simulated cart, driven through ``nirfctl`` as a
technician would: open a case, capture the three sites, enter pathology, read the report,
export CSV; and a crash test: the recorder and the controller killed in the middle of a
capture leave every committed capture intact and nothing half-written in sight."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import zmq

from nirf.services.study.casestore import CaseStore
from nirf.services.cli.client import CartClient, CartError
from nirf.services.study.tiff import read_tiff
from tests.cartproc import ROOT, start_cart

pytestmark = pytest.mark.e2e

WIDTH, HEIGHT = 728, 544
SIGNAL_ROI = [WIDTH // 2 - 30, HEIGHT // 2 - 30, 60, 60]  # inside the default phantom's disk
BACKGROUND_ROI = [20, 20, 150, 150]
RESAMPLES = 300


def nirfctl(cart, *args: str, timeout_s: float = 60.0) -> tuple[int, dict]:
    """Run the CLI as its own process with --json; returns (exit code, parsed reply)."""
    env = dict(os.environ, NIRF_STATE_DIR=str(cart.state_dir))
    proc = subprocess.run([sys.executable, "-m", "nirf.services.cli.main", "--config", str(cart.config_path),
                           "--state-dir", str(cart.state_dir), "--json", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)
    try:
        reply = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        reply = {"raw": proc.stdout}
    reply["_stderr"] = proc.stderr
    return proc.returncode, reply


def ok(cart, *args: str) -> dict:
    code, reply = nirfctl(cart, *args)
    assert code == 0 and reply.get("ok"), (args, reply, cart.log_text()[-3000:])
    return reply["result"]


def connect(cart, timeout_s: float = 60.0) -> CartClient:
    deadline = time.monotonic() + timeout_s
    while not (cart.state_dir / "keys" / "local-operator.key_secret").exists():
        assert cart.proc.poll() is None, cart.log_text()
        assert time.monotonic() < deadline, "keys were not created"
        time.sleep(0.05)
    client = CartClient.from_state_dir(cart.state_dir, cart.control, cart.telemetry)
    client.subscribe("status", "event")
    assert client.wait_for("status", timeout_s=timeout_s) is not None, cart.log_text()
    return client


def start_imaging(client: CartClient) -> None:
    """Arm, emit and run fluorescence acquisition with the phantom's known ROIs."""
    client.call("roi.set", {"signal": SIGNAL_ROI, "background": BACKGROUND_ROI})
    client.call("arm")
    assert client.wait_for("status", lambda m: m["state"] == "ARMED", timeout_s=10), "never ARMED"
    client.call("laser.on", {"power_mw": 50})
    client.call("acquire.start", {"mode": "fluorescence"}, timeout_s=15)


@pytest.fixture(scope="module")
def cart(tmp_path_factory):
    # fewer bootstrap resamples than the default keep the reference computation short
    c = start_cart(tmp_path_factory.mktemp("clinical"), width=WIDTH, height=HEIGHT,
                   extra=f"[study]\nbootstrap_resamples = {RESAMPLES}\n")
    try:
        client = connect(c)
        client.close()
        yield c
    finally:
        c.stop()


def test_the_study_workflow_through_the_cli(cart, tmp_path):
    client = connect(cart)
    try:
        code, refused = nirfctl(cart, "capture", "tumor_bed")
        assert code == 1 and refused["error"]["code"] == "NO_CASE"

        injected = (datetime.now(timezone.utc) - timedelta(hours=20)).isoformat(timespec="seconds")
        case = ok(cart, "case", "open", "DFSP-101", "--histology", "DFSP", "--arm", "icg_0.25mg_per_kg",
                  "--weight-kg", "70", "--injection-time", injected)
        assert case["case_id"] == "DFSP-101" and case["dose_mg"] == pytest.approx(0.25 * 70)
        assert case["hours_since_injection"] == pytest.approx(20.0, abs=0.1)
        assert client.wait_for("status", lambda m: m["case"] == "DFSP-101", timeout_s=5)

        code, refused = nirfctl(cart, "capture", "tumor_bed")  # laser not emitting yet
        assert code == 1 and refused["error"]["code"] == "WRONG_STATE"

        start_imaging(client)
        captures = {}
        for site, label in (("gross_tumor", "whole lesion"), ("tumor_bed", "12 o'clock"),
                            ("specimen_cross_section", "slice 2")):
            captures[site] = ok(cart, "capture", site, "--label", label, "--pairs", "4")
        event = client.wait_for("event", lambda m: m.get("kind") == "capture"
                                and m.get("capture_id") == captures["specimen_cross_section"]["capture_id"],
                                timeout_s=5)
        assert event is not None and event["site"] == "specimen_cross_section"

        ids = [c["capture_id"] for c in captures.values()]
        assert len(set(ids)) == 3 and all(i.startswith("DFSP-101-") for i in ids)
        for site, cap in captures.items():
            # the phantom's disk over its surround: SBR 4, a positive call at threshold 2
            assert cap["sbr"] == pytest.approx(4.0, rel=0.1), (site, cap)
            assert cap["positive"] is True and cap["threshold"] == 2.0
            assert len(cap["files"]) == 4  # one OME-TIFF per pair
            on_files = [f for f in cap["files"] if f.endswith(".ome.tiff")]
            array, meta = read_tiff(cart.state_dir / on_files[0])  # the pair's laser-on plane
            assert array.shape == (HEIGHT, WIDTH)
            assert meta["capture_id"] == cap["capture_id"] and meta["case_id"] == "DFSP-101"
            assert meta["lit"] is True and meta["laser_mw"] > 0 and meta["exposure_us"] > 0
            assert meta["site"] == site and f"-frame{meta['frame_seq']:012d}.ome.tiff" in on_files[0]

        bed = captures["tumor_bed"]["capture_id"]
        ok(cart, "pathology", "set", bed, "negative")
        ok(cart, "pathology", "set", captures["gross_tumor"]["capture_id"], "positive")  # not scored
        assert ok(cart, "case", "close")["capture_count"] == 3
        assert client.wait_for("status", lambda m: m["case"] is None, timeout_s=5)

        report = ok(cart, "report")
        groups = {(g["histology"], g["arm"]): g for g in report["groups"]}
        arm = groups[("DFSP", "icg_0.25mg_per_kg")]
        # only the tumor bed counts: called positive, pathology negative
        assert arm["counts"] == {"tp": 0, "fp": 1, "tn": 0, "fn": 0}
        assert arm["metrics"]["specificity"]["value"] == 0.0 and arm["metrics"]["sensitivity"]["value"] is None
        assert groups[("all", "all")]["counts"] == arm["counts"]
        assert ok(cart, "report", "--histology", "sSCC")["groups"][-1]["counts"]["fp"] == 0
        page = tmp_path / "report.html"
        ok(cart, "report", "--html", str(page))
        assert "<svg" in page.read_text() and "Flow" in page.read_text()

        out = tmp_path / "case.csv"
        code, _ = nirfctl(cart, "export", "--case", "DFSP-101", "--out", str(out))
        assert code == 0
        rows = list(csv.DictReader(out.open(newline="")))
        caps = [r for r in rows if r["record_type"] == "capture"]
        assert sorted(r["capture_id"] for r in caps) == sorted(ids)
        by_site = {r["site"]: r for r in caps}
        bed_path = [r for r in rows if r["record_type"] == "pathology" and r["capture_id"] == bed]
        assert [r["status"] for r in bed_path] == ["negative"]
        # the audit names the key: the CLI's local operator here
        assert bed_path[0]["entered_by"] == "local-operator"
        assert by_site["tumor_bed"]["n_files"] == str(len(captures["tumor_bed"]["files"]))
        assert all(r["frames_lost"] == "0" for r in caps)

        env = dict(os.environ, NIRF_STATE_DIR=str(cart.state_dir))
        study = subprocess.run([sys.executable, "-m", "nirf.services.cli.main", "--config", str(cart.config_path), "export"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
        assert study.returncode == 0, study.stderr
        assert sum(r["record_type"] == "capture" for r in csv.DictReader(io.StringIO(study.stdout))) == 3
    finally:
        client.call("acquire.stop")
        client.call("disarm")
        client.close()


# ---------------------------------------------------------------------- crash in a capture
def child_pid(launcher_pid: int, module: str) -> int:
    """The pid of the launcher's child running ``module`` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and module.encode() in cmdline:
            return int(entry.name)
    raise AssertionError(f"no {module} process under the launcher {launcher_pid}")


def staging_folders(case_dir: Path) -> list[str]:
    try:
        return [n for n in os.listdir(case_dir) if n.endswith(".partial")]
    except FileNotFoundError:
        return []


def test_killing_recorder_and_controller_mid_capture_loses_nothing_committed(tmp_path):
    cart = start_cart(tmp_path, width=WIDTH, height=HEIGHT)
    client = connect(cart)
    stop_capturing = threading.Event()
    try:
        client.call("case.open", {"case_id": "SSCC-007", "histology": "sSCC", "arm": "control"})
        start_imaging(client)
        recorder_pid = int((cart.runtime_dir / "recorder.pid").read_text())
        # the study process holds the case store and commits each capture
        controller_pid = child_pid(cart.proc.pid, "nirf.services.study.main")
        case_dir = cart.state_dir / "captures" / "SSCC-007"
        committed_replies: list[dict] = []

        # The capturing thread has its own client and context (sockets are not shared
        # across threads); terminating that context ends its wait at once after the kill.
        worker_ctx = zmq.Context()

        def keep_capturing():
            c2 = CartClient.from_state_dir(cart.state_dir, cart.control, context=worker_ctx)
            try:
                for _ in range(30):
                    if stop_capturing.is_set():
                        return
                    try:
                        committed_replies.append(c2.call("capture", {"site": "tumor_bed", "pairs": 16},
                                                         timeout_s=30))
                    except (CartError, TimeoutError, zmq.ZMQError):
                        return
            finally:
                c2.close()

        worker = threading.Thread(target=keep_capturing, daemon=True)
        worker.start()
        # Kill the moment a capture is being written: its hidden staging folder exists.
        caught = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and worker.is_alive():
            if len(committed_replies) >= 1 and staging_folders(case_dir):
                os.kill(recorder_pid, signal.SIGKILL)
                os.kill(controller_pid, signal.SIGKILL)
                caught = True
                break
            time.sleep(0.001)
        assert caught, f"no capture was being written within the time ({len(committed_replies)} committed)"
        stop_capturing.set()
        terminator = threading.Thread(target=worker_ctx.term, daemon=True)  # returns once the worker closed
        terminator.start()
        worker.join(timeout=10)
        terminator.join(timeout=10)
        assert not worker.is_alive()
        # the launcher restarts both (as systemd would); what counts is what was committed
    finally:
        stop_capturing.set()
        client.close()
        cart.stop()

    with CaseStore(cart.state_dir / "study.db") as store:
        stored = store.captures("SSCC-007")
    assert stored, "at least the first capture was committed before the kill"
    assert {c["capture_id"] for c in committed_replies} <= {c["capture_id"] for c in stored}
    committed_files = set()
    for cap in stored:
        assert len(cap["files"]) == cap["pairs"]
        for rel in cap["files"]:
            array, meta = read_tiff(cart.state_dir / rel)
            assert array.shape == (HEIGHT, WIDTH) and meta["capture_id"] == cap["capture_id"]
            committed_files.add(rel)

    # Nothing half-written in sight: every visible file under captures is a complete
    # frame, and whatever the crash interrupted is hidden (dot names) or gone.
    root = cart.state_dir
    visible = []
    for dirpath, dirnames, filenames in os.walk(root / "captures"):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        visible += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    for path in visible:
        array, meta = read_tiff(path)
        assert array.shape == (meta["height"], meta["width"])
    assert committed_files <= {str(p.relative_to(root)) for p in visible}


# ---------------------------------------------------------------------- export without a cart
def test_export_without_a_case_database_is_a_usage_error(tmp_path, capsys):
    from nirf.services.cli import main as cli

    assert cli.main(["--state-dir", str(tmp_path), "export"]) == cli.EXIT_USAGE
    assert "no case database" in capsys.readouterr().err


def test_export_of_an_unknown_case_is_refused_and_writes_nothing(tmp_path, capsys):
    from nirf.services.cli import main as cli

    CaseStore(tmp_path / "study.db").close()
    out = tmp_path / "x.csv"
    assert cli.main(["--state-dir", str(tmp_path), "export", "--case", "NOPE-1", "--out", str(out)]) != 0
    assert "NOPE-1" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------- a study through the bus
OFF_DISK_ROI = [WIDTH - 120, HEIGHT - 120, 60, 60]  # on the phantom's surround: SBR about 1


def test_a_synthetic_study_through_the_bus_equals_the_outside_references(cart, tmp_path):
    """Every arm and histology, the control arm included, 1-3 tumor-bed captures per ICG
    patient (positive and negative calls, a retake), every pathology status, margin status,
    follow-up with events and censoring, adverse events: entered over the bus as study
    staff would, the report read over the bus, and each figure compared with statsmodels,
    scipy and lifelines computed from the exported records."""
    import numpy as np

    from nirf.services.common import keys as keys_mod
    from nirf.services.study import records
    from tests import study_reference as ref

    rng = np.random.default_rng(18)
    client = connect(cart)
    today = datetime.now(timezone.utc).date()
    try:
        start_imaging(client)
        number = 200
        for h, prefix in (("DFSP", "DFSP"), ("sSCC", "SSCC")):
            for arm in ("control", "icg_0.25mg_per_kg", "icg_25mg"):
                for _ in range(2):
                    number += 1
                    case_id = f"{prefix}-{number}"
                    surgery = today - timedelta(days=int(rng.integers(740, 1000)))
                    args = {"case_id": case_id, "histology": h, "arm": arm, "surgery_date": surgery.isoformat(),
                            "exclusions_confirmed": True}
                    if arm != "control":
                        args["injection_time"] = (datetime.now(timezone.utc) - timedelta(hours=20)).isoformat()
                    if arm == "icg_0.25mg_per_kg":
                        args["weight_kg"] = 70.0
                    client.call("case.open", args)
                    labels = [] if arm == "control" else ["12 o'clock", "6 o'clock", "9 o'clock"][:int(rng.integers(1, 4))]
                    for j, label in enumerate(labels):
                        positive_view = bool(rng.random() < 0.5)
                        client.call("roi.set", {"signal": SIGNAL_ROI if positive_view else OFF_DISK_ROI,
                                                "background": BACKGROUND_ROI})
                        cap = client.call("capture", {"site": "tumor_bed", "label": label, "pairs": 1}, timeout_s=60)
                        if j == 0 and number % 3 == 0:  # a retake of the same margin
                            cap = client.call("capture", {"site": "tumor_bed", "label": label, "pairs": 1},
                                              timeout_s=60)
                        status = str(rng.choice(["positive", "negative", "negative", "close", "indeterminate"]))
                        client.call("pathology.set", {"capture_id": cap["capture_id"], "status": status,
                                                      "blinded": True})
                    client.call("case.close")
                    client.call("margin.set", {"case_id": case_id,
                                               "status": str(rng.choice(["positive", "negative", "negative"]))})
                    last = min(int(rng.integers(200, 900)), (today - surgery).days)
                    recur = int(rng.integers(100, 800)) if rng.random() < 0.35 else None
                    for day in (180, 365, 730, 900):
                        day = min(day, last)
                        found = recur is not None and day >= recur
                        client.call("followup.add", {"case_id": case_id,
                                                     "visit_date": (surgery + timedelta(days=day)).isoformat(),
                                                     "local_recurrence": found})
                        if found or day == last:
                            break
                    if rng.random() < 0.5:
                        client.call("ae.add", {"case_id": case_id, "term": "rash", "grade": int(rng.integers(1, 4)),
                                               "related": "possible", "onset": surgery.isoformat()})
        # a correction over the bus needs its reason, and names the key
        refused = nirfctl(cart, "margin", "set", "DFSP-201", "indeterminate")
        if refused[0] == 0:  # the same status as before: nothing to correct; pick another
            refused = nirfctl(cart, "margin", "set", "DFSP-201", "close")
        assert refused[0] == 1 and "reason" in refused[1]["error"]["message"], refused
        report = client.call("report", timeout_s=30)
        rescored = client.call("report", {"threshold": 3.0}, timeout_s=30)
    finally:
        client.call("acquire.stop")
        client.call("disarm")
        client.close()

    out = tmp_path / "study.csv"
    assert nirfctl(cart, "export", "--out", str(out), "--dictionary", str(tmp_path / "dict.csv"))[0] == 0
    with out.open(newline="") as f:
        data = records.read_csv(f)
    assert {e["entered_by"] for e in data["margins"]} == {"local-operator"}
    diffs = ref.compare(report, ref.reference_report(data, resamples=RESAMPLES))
    diffs += ref.compare(rescored, ref.reference_report(data, threshold=3.0, resamples=RESAMPLES))
    assert report["flow"]["enrolled"]["control"] >= 4
    assert all(g["arm"] != "control" for g in report["groups"] + report["per_patient"])
    calls = {c["positive"] for c in data["captures"] if c["site"] == "tumor_bed"}
    assert calls == {True, False}, "both calls made through the simulated camera"
    print(f"\n[bus study] {len(diffs)} figures vs references, max abs difference {max(diffs):.3g}")

    # an observer reads the report without the comparative outcomes
    folder = tmp_path / "observer"
    public, secret = keys_mod.create_keypair(folder, "monitor")
    keys_mod.authorise(cart.state_dir, public, "observer", "monitor")
    observer = CartClient.from_state_dir(cart.state_dir, cart.control, key_file=secret)
    try:
        seen = None
        deadline = time.monotonic() + 20
        while seen is None and time.monotonic() < deadline:
            try:
                seen = observer.call("report", timeout_s=5)
            except (CartError, TimeoutError, Exception):  # the key is picked up within seconds
                observer.close()
                observer = CartClient.from_state_dir(cart.state_dir, cart.control, key_file=secret)
        assert seen is not None, "the observer key was never admitted"
        assert not {"margins_by_arm", "recurrence", "adverse_events"} & set(seen)
        assert seen["groups"] == report["groups"]
    finally:
        observer.close()
