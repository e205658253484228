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

from services.study.casestore import CaseStore
from services.cli.client import CartClient, CartError
from services.study.tiff import read_tiff
from tests.cartproc import ROOT, start_cart

pytestmark = pytest.mark.e2e

WIDTH, HEIGHT = 728, 544
SIGNAL_ROI = [WIDTH // 2 - 30, HEIGHT // 2 - 30, 60, 60]  # inside the default phantom's disk
BACKGROUND_ROI = [20, 20, 150, 150]


def nirfctl(cart, *args: str, timeout_s: float = 60.0) -> tuple[int, dict]:
    """Run the CLI as its own process with --json; returns (exit code, parsed reply)."""
    env = dict(os.environ, NIRF_STATE_DIR=str(cart.state_dir))
    proc = subprocess.run([sys.executable, "-m", "services.cli.main", "--config", str(cart.config_path),
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
    c = start_cart(tmp_path_factory.mktemp("clinical"), width=WIDTH, height=HEIGHT)
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

        out = tmp_path / "case.csv"
        code, _ = nirfctl(cart, "export", "--case", "DFSP-101", "--out", str(out))
        assert code == 0
        rows = list(csv.DictReader(out.open(newline="")))
        assert sorted(r["capture_id"] for r in rows) == sorted(ids)
        by_site = {r["site"]: r for r in rows}
        assert by_site["tumor_bed"]["margin_positive"] == "false"
        assert by_site["specimen_cross_section"]["margin_positive"] == ""
        assert json.loads(by_site["tumor_bed"]["files"]) == captures["tumor_bed"]["files"]
        assert all(r["frames_lost"] == "0" for r in rows)

        env = dict(os.environ, NIRF_STATE_DIR=str(cart.state_dir))
        study = subprocess.run([sys.executable, "-m", "services.cli.main", "--config", str(cart.config_path), "export"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
        assert study.returncode == 0, study.stderr
        assert len(list(csv.DictReader(io.StringIO(study.stdout)))) == 3
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
        client.call("case.open", {"case_id": "SSCC-7", "histology": "sSCC", "arm": "control"})
        start_imaging(client)
        recorder_pid = int((cart.runtime_dir / "recorder.pid").read_text())
        # the study process holds the case store and commits each capture
        controller_pid = child_pid(cart.proc.pid, "services.study.main")
        case_dir = cart.state_dir / "captures" / "SSCC-7"
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
        stored = store.captures("SSCC-7")
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
    from services.cli import main as cli

    assert cli.main(["--state-dir", str(tmp_path), "export"]) == cli.EXIT_USAGE
    assert "no case database" in capsys.readouterr().err


def test_export_of_an_unknown_case_is_refused_and_writes_nothing(tmp_path, capsys):
    from services.cli import main as cli

    CaseStore(tmp_path / "study.db").close()
    out = tmp_path / "x.csv"
    assert cli.main(["--state-dir", str(tmp_path), "export", "--case", "NOPE-1", "--out", str(out)]) != 0
    assert "NOPE-1" in capsys.readouterr().err and not out.exists()
