"""The imaging archive (PRODUCT.md section 9): each capture as a Multi-frame Grayscale Word
Secondary Capture image and a TID 1500 Comprehensive SR, checked with references outside
the project: pydicom reads them back, dicom3tools' ``dciodvfy`` validates them against the
standard's IODs, and a real Orthanc PACS (Debian package) receives them by C-STORE from
the durable outbox, also while it is down and across a restart of the sender."""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from nirf.hal.clock import ManualClock
from nirf.hal.errors import InvalidArgument
from nirf.services.gateway import bus as bus_mod
from nirf.services.study.recorder import Recorder
from nirf.services.study import dicom
from nirf.services.study.outbox import CStoreSender, Outbox, SendResult

pydicom = pytest.importorskip("pydicom")

ROOT = "1.2.826.0.1.3680043.10.4711"
CASE = "DFSP-014"
W, H = 40, 30
T0 = 1_764_580_000_123_456_789
SETTINGS = dicom.DicomSettings(uid_root=ROOT, software_version="0.1.0", station_name="NIRFCART",
                               institution="Study centre 3")
MEASURED = {"sbr": 3.25, "intensity": 1234.5, "cnr": 7.5, "site": "tumor_bed", "label": "12 o'clock",
            "rois": {"signal": [10, 8, 12, 10], "background": [0, 0, 8, 6]}, "t_ns": T0 + 2 * 10**9}


def frames(n_pairs: int = 2, seed: int = 1):
    rng = np.random.default_rng(seed)
    out, meta = [], []
    for i in range(2 * n_pairs):
        out.append(rng.integers(0, 4096, size=(H, W), dtype=np.uint16))
        meta.append({"t_start_ns": T0 + i * 33_333_333, "lit": i % 2 == 0, "bits": 12})
    return out, meta


def read(data: bytes):
    return pydicom.dcmread(io.BytesIO(data))


def items(ds):
    """Every content item of an SR, depth first: (concept meaning, item)."""
    for item in getattr(ds, "ContentSequence", []):
        concept = item.get("ConceptNameCodeSequence")  # an image a region is drawn on has none
        yield (concept[0].CodeMeaning if concept else ""), item
        yield from items(item)


# ---------------------------------------------------------------------- the objects
def test_frames_and_report_read_back_with_pydicom():
    f, m = frames()
    objs = dicom.capture_files(f, m, MEASURED, case_id=CASE, capture_id=f"{CASE}-c003", settings=SETTINGS)
    assert [k for k, _, _ in objs] == ["frames", "sr"]
    sc, sr = read(objs[0][2]), read(objs[1][2])

    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    assert sc.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert sc.PatientID == CASE and str(sc.PatientName) == CASE and sc.PatientIdentityRemoved == "YES"
    assert int(sc.NumberOfFrames) == 4 and (sc.Rows, sc.Columns) == (H, W)
    assert (sc.BitsAllocated, sc.BitsStored, sc.HighBit, sc.PixelRepresentation) == (16, 12, 11, 0)
    np.testing.assert_array_equal(sc.pixel_array, np.stack(f))
    assert [float(v) for v in sc.FrameTimeVector] == pytest.approx([0, 33.333333, 33.333333, 33.333333])
    assert sc.InstitutionName == "Study centre 3" and sc.Manufacturer == "nirf-cart"
    for uid in (sc.StudyInstanceUID, sc.SeriesInstanceUID, sc.SOPInstanceUID, sr.SOPInstanceUID):
        assert uid.startswith(ROOT + ".") and len(uid) <= 64
        pydicom.uid.UID(uid).is_valid or pytest.fail(f"{uid} is not a valid UID")

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.PatientID == CASE and sr.StudyInstanceUID == sc.StudyInstanceUID
    assert sr.Modality == "SR" and sr.CompletionFlag == "COMPLETE"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.ContentTemplateSequence[0].MappingResource == "DCMR"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    ref = sr.PertinentOtherEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == sc.SOPInstanceUID

    found = list(items(sr))
    nums = {name: float(it.MeasuredValueSequence[0].NumericValue) for name, it in found if it.ValueType == "NUM"}
    assert nums == {"Signal-to-background ratio": 3.25, "Mean fluorescence intensity": 1234.5,
                    "Contrast-to-noise ratio": 7.5}
    groups = [it for name, it in found if name == "Measurement Group"]
    assert [g.ContentTemplateSequence[0].TemplateIdentifier for g in groups] == ["1410", "1410"]
    regions = [it for name, it in found if name == "Image Region"]
    assert [list(map(float, r.GraphicData)) for r in regions] == [
        [10, 8, 22, 8, 22, 18, 10, 18, 10, 8], [0, 0, 8, 0, 8, 6, 0, 6, 0, 0]]
    for r in regions:  # each outline is drawn on the frames image
        assert r.GraphicType == "POLYLINE"
        assert r.ContentSequence[0].RelationshipType == "SELECTED FROM"
        assert r.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sc.SOPInstanceUID
    trackers = [it.UID for name, it in found if name == "Tracking Unique Identifier"]
    assert len(set(trackers)) == 2 and all(t.startswith(ROOT) for t in trackers)


def test_highdicom_reads_the_report_as_a_tid_1500_measurement_report():
    """highdicom (an independent implementation of the SR templates) parses the report
    as TID 1500 with two TID 1410 planar ROI groups and finds every value."""
    hd = pytest.importorskip("highdicom")
    f, m = frames()
    objs = dicom.capture_files(f, m, MEASURED, case_id=CASE, capture_id=f"{CASE}-c003", settings=SETTINGS)
    sc, ds = read(objs[0][2]), read(objs[1][2])
    report = hd.sr.ComprehensiveSR.from_dataset(ds)
    assert report.SOPInstanceUID == ds.SOPInstanceUID
    measurement_report = hd.sr.MeasurementReport.from_sequence([ds], is_root=True)
    groups = measurement_report.get_planar_roi_measurement_groups()
    assert [g.finding_type.value for g in groups] == ["SIGNAL", "BACKGROUND"]
    signal, background = groups
    np.testing.assert_array_equal(signal.roi.value, [[10, 8], [22, 8], [22, 18], [10, 18], [10, 8]])
    np.testing.assert_array_equal(background.roi.value, [[0, 0], [8, 0], [8, 6], [0, 6], [0, 0]])
    assert signal.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sc.SOPInstanceUID
    got = {x.name.meaning: (x.value, x.unit.value) for x in signal.get_measurements()}
    assert got == {"Signal-to-background ratio": (3.25, "1"), "Mean fluorescence intensity": (1234.5, "[arb'U]"),
                   "Contrast-to-noise ratio": (7.5, "1")}
    assert background.get_measurements() == []
    assert signal.tracking_uid != background.tracking_uid


def test_a_missing_measurement_is_an_empty_value_with_its_reason():
    f, m = frames(1)
    objs = dicom.capture_files(f, m, dict(MEASURED, cnr=None), case_id=CASE, capture_id=f"{CASE}-c004",
                               settings=SETTINGS)
    cnr = [it for name, it in items(read(objs[1][2])) if name == "Contrast-to-noise ratio"][0]
    assert len(cnr.MeasuredValueSequence) == 0
    assert cnr.NumericValueQualifierCodeSequence[0].CodeMeaning == "Measurement failure"


def test_uids_are_the_same_for_the_same_capture_and_differ_between_captures():
    f, m = frames(1)
    a = dicom.capture_files(f, m, MEASURED, case_id=CASE, capture_id=f"{CASE}-c001", settings=SETTINGS)
    b = dicom.capture_files(f, m, MEASURED, case_id=CASE, capture_id=f"{CASE}-c001", settings=SETTINGS)
    c = dicom.capture_files(f, m, MEASURED, case_id=CASE, capture_id=f"{CASE}-c002", settings=SETTINGS)
    assert [u for _, u, _ in a] == [u for _, u, _ in b]
    assert not {u for _, u, _ in a} & {u for _, u, _ in c}
    assert read(a[0][2]).StudyInstanceUID == read(c[0][2]).StudyInstanceUID  # one study per case


def test_a_bad_root_or_frames_are_refused_by_name():
    with pytest.raises(InvalidArgument, match="uid_root"):
        dicom.make_uid("1.2.abc", 1, "x")
    with pytest.raises(InvalidArgument, match="too long"):
        dicom.make_uid("1." * 28 + "1", 1, "x")
    f, m = frames(1)
    with pytest.raises(InvalidArgument, match="one each"):
        dicom.capture_files(f, m[:1], MEASURED, case_id=CASE, capture_id="c", settings=SETTINGS)


def test_dciodvfy_finds_no_error(tmp_path):
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is not installed (Debian package 'dicom3tools'; .ci/run installs it)")
    f, m = frames(3)
    for kind, _, data in dicom.capture_files(f, m, MEASURED, case_id=CASE, capture_id=f"{CASE}-c005",
                                             settings=SETTINGS):
        path = tmp_path / f"{kind}.dcm"
        path.write_bytes(data)
        out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
        errors = [line for line in text.splitlines() if line.startswith("Error")]
        assert errors == [], f"{kind}: {text}"
        iod = "MultiframeGrayscaleWordSCImage" if kind == "frames" else "ComprehensiveSR"
        assert iod in text  # dciodvfy recognised the object as that IOD


# ---------------------------------------------------------------------- the outbox
class FakePacs:
    def __init__(self):
        self.up = False
        self.stored: list[str] = []
        self.refuse: set[str] = set()
        self.calls = 0

    def send(self, paths):
        self.calls += 1
        out = []
        for p in paths:
            if not self.up:
                out.append(SendResult(False, message="connection refused"))
            elif any(r in p.name for r in self.refuse):
                out.append(SendResult(False, refused=True, message="refused with status 0xA900"))
            else:
                self.stored.append(p.name.split("-", 1)[1])
                out.append(SendResult(True))
        return out


def queue_file(tmp_path, name: str, body: bytes = b"x") -> object:
    src = tmp_path / "src" / name
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(body)
    return src


def test_the_outbox_backs_off_doubling_and_loses_nothing_while_the_pacs_is_down(tmp_path):
    clock, pacs = ManualClock(), FakePacs()
    box = Outbox(tmp_path / "outbox", pacs.send, retry_initial_s=2.0, retry_max_s=10.0, clock=clock)
    for n in range(3):
        box.add(queue_file(tmp_path, f"c{n}-frames.dcm"))
    waits = []
    for _ in range(5):
        assert box.send_due() == 0
        waits.append(round(box.next_try - clock.monotonic(), 6))
        assert box.send_due() == 0 and pacs.calls == len(waits)  # not before the wait is over
        clock.advance(waits[-1])
    assert waits == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert len(box.pending()) == 3 and box.status()["failures"] == 5
    pacs.up = True
    assert box.send_due() == 3
    assert pacs.stored == ["c0-frames.dcm", "c1-frames.dcm", "c2-frames.dcm"]  # in the order queued
    assert box.pending() == [] and box.status()["failures"] == 0


def test_outbox_entries_survive_a_restart_and_source_files_stay(tmp_path):
    pacs = FakePacs()
    src = queue_file(tmp_path, "c0-sr.dcm", b"report")
    Outbox(tmp_path / "outbox", pacs.send, clock=ManualClock()).add(src)
    (tmp_path / "outbox" / ".half.tmp").write_bytes(b"an interrupted add")
    again = Outbox(tmp_path / "outbox", pacs.send, clock=ManualClock())
    assert [p.name.split("-", 1)[1] for p in again.pending()] == ["c0-sr.dcm"]
    assert not (tmp_path / "outbox" / ".half.tmp").exists()
    pacs.up = True
    assert again.send_due() == 1 and src.read_bytes() == b"report"


def test_a_refused_file_is_set_aside_after_some_tries_and_does_not_block_others(tmp_path):
    clock, pacs = ManualClock(), FakePacs()
    pacs.up, pacs.refuse = True, {"bad"}
    box = Outbox(tmp_path / "outbox", pacs.send, retry_initial_s=1.0, retry_max_s=1.0, max_refusals=3,
                 clock=clock)
    box.add(queue_file(tmp_path, "bad.dcm"))
    box.add(queue_file(tmp_path, "good.dcm"))
    for _ in range(3):
        box.send_due()
        clock.advance(1.0)
    assert pacs.stored == ["good.dcm"] and box.pending() == []
    assert [p.name.split("-", 1)[1] for p in (tmp_path / "outbox" / "refused").iterdir()] == ["bad.dcm"]
    assert box.status()["refused"] == 1


def test_outbox_settings_are_checked():
    with pytest.raises(InvalidArgument, match="retry_initial_s"):
        Outbox("/nonexistent-never-created", lambda p: [], retry_initial_s=5.0, retry_max_s=1.0)


# ---------------------------------------------------------------------- a real PACS
def pair_msg(capture_id: str, seq: int, index: int) -> list[bytes]:
    rng = np.random.default_rng(seq)
    on = rng.integers(0, 1024, (H, W), dtype=np.uint16)
    off = rng.integers(0, 1024, (H, W), dtype=np.uint16)
    m = {"seq": seq, "mcu_frame": seq, "lit": True, "t_start_ns": T0 + seq * 33_333_333, "exposure_us": 10_000,
         "gain": 2.0, "laser_mw": 80.0, "filter_position": 1, "bits": 10, "width": W, "height": H}
    header = {"capture_id": capture_id, "case_id": CASE, "folder": f"captures/{CASE}/{capture_id}",
              "index": index, "frame_seq": seq, "on": m,
              "off": dict(m, mcu_frame=seq + 1, lit=False, laser_mw=0.0, t_start_ns=m["t_start_ns"] + 33_333_333),
              "extra": {"site": "tumor_bed", "filter_name": "icg_emission"}}
    return [b"pair", bus_mod.pack(header), on.tobytes(), off.tobytes()]


def capture(rec: Recorder, capture_id: str, first_seq: int) -> dict:
    seqs = [first_seq, first_seq + 2]
    for i, s in enumerate(seqs):
        assert rec.handle(pair_msg(capture_id, s, i)) is None
    end = {"capture_id": capture_id, "case_id": CASE, "folder": f"captures/{CASE}/{capture_id}",
           "frame_seqs": seqs, "measurements": dict(MEASURED, t_ns=T0 + first_seq * 10**8)}
    topic, body = rec.handle([b"end", bus_mod.pack(end)])
    done = bus_mod.unpack(body)
    assert done["errors"] == [] and done["dicom_errors"] == [] and len(done["dicom"]) == 2
    return done


def sender_for(pacs) -> CStoreSender:
    return CStoreSender("127.0.0.1", pacs.dicom_port, pacs.ae_title, "NIRFCART", timeout_s=5.0)


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} not within {timeout_s:.0f} s")


@pytest.fixture
def orthanc(tmp_path):
    from orthanc_peer import OrthancPeer

    peer = OrthancPeer(tmp_path / "pacs")
    yield peer
    peer.stop()


@pytest.mark.slow
def test_captures_made_while_the_pacs_is_down_all_arrive_once_across_a_sender_restart(tmp_path, orthanc):
    state = tmp_path / "cart"
    sender = sender_for(orthanc)

    def recorder():
        box = Outbox(state / "outbox", sender.send, retry_initial_s=0.2, retry_max_s=1.0,
                     describe=sender.describe())
        return Recorder(state, reserve_bytes=0, dicom=SETTINGS, outbox=box)

    # The PACS runs, then goes down for three captures; the sender tries and backs off.
    orthanc.start()
    assert orthanc.sop_instance_uids() == []
    orthanc.stop()
    rec = recorder()
    stop = threading.Event()
    loop = threading.Thread(target=rec.outbox.run, args=(stop,), daemon=True)
    loop.start()
    expected = []
    for n, seq in enumerate((100, 200, 300)):
        done = capture(rec, f"{CASE}-c{n + 1:03d}", seq)
        for rel in done["dicom"]:
            expected.append(str(pydicom.dcmread(state / rel, stop_before_pixels=True).SOPInstanceUID))
    wait_until(lambda: rec.outbox.failures >= 2, 30, "two failed attempts")
    assert len(rec.outbox.pending()) == 6 and rec.outbox.sent == 0
    # The cart restarts (a new sender on the same outbox), then the PACS comes back.
    stop.set()
    rec.outbox.wake()
    loop.join(10)
    assert not loop.is_alive()
    rec = recorder()
    assert len(rec.outbox.pending()) == 6
    orthanc.start()
    stop = threading.Event()
    loop = threading.Thread(target=rec.outbox.run, args=(stop,), daemon=True)
    loop.start()
    try:
        wait_until(lambda: not rec.outbox.pending(), 60, "the outbox emptied")
    finally:
        stop.set()
        rec.outbox.wake()
        loop.join(10)
    stored = orthanc.sop_instance_uids()
    assert sorted(stored) == sorted(expected) and len(set(expected)) == 6  # each exactly once

    # A crash between the PACS's confirmation and the outbox's unlink sends a file again:
    # the PACS still holds one copy (the instance keeps its UID).
    again = sender.send([state / f"captures/{CASE}/{CASE}-c001/{CASE}-c001-sr.dcm"])
    assert again[0].stored
    assert sorted(orthanc.sop_instance_uids()) == sorted(expected)


@pytest.mark.slow
def test_a_capture_reaches_the_pacs_as_pydicom_reads_it(tmp_path, orthanc):
    orthanc.start()
    state = tmp_path / "cart"
    sender = sender_for(orthanc)
    rec = Recorder(state, reserve_bytes=0, dicom=SETTINGS,
                   outbox=Outbox(state / "outbox", sender.send, clock=ManualClock()))
    done = capture(rec, f"{CASE}-c001", 10)
    assert rec.outbox.send_due() == 2
    sc_local = pydicom.dcmread(state / done["dicom"][0])
    # Orthanc's own copy, fetched over its REST API, matches what the cart wrote.
    ids = orthanc.get("/instances")
    import urllib.request

    copies = {}
    for i in ids:
        with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}/instances/{i}/file", timeout=10) as r:
            ds = pydicom.dcmread(io.BytesIO(r.read()))
        copies[ds.SOPClassUID] = ds
    sc = copies["1.2.840.10008.5.1.4.1.1.7.3"]
    np.testing.assert_array_equal(sc.pixel_array, sc_local.pixel_array)
    assert sc.PatientID == CASE
    sr = copies["1.2.840.10008.5.1.4.1.1.88.33"]
    assert {n: float(it.MeasuredValueSequence[0].NumericValue) for n, it in items(sr) if it.ValueType == "NUM"}[
        "Signal-to-background ratio"] == 3.25


@pytest.mark.e2e
@pytest.mark.slow
def test_a_capture_through_the_bus_reaches_the_pacs(tmp_path, orthanc):
    """The whole path once: the simulated cart captures, its recorder writes the DICOM
    files and its outbox sends them to Orthanc."""
    import datetime as dt

    from nirf.services.cli.client import CartClient
    from tests.cartproc import start_cart

    orthanc.start()
    extra = (f'[dicom]\nenabled = true\nuid_root = "{ROOT}"\npacs_port = {orthanc.dicom_port}\n'
             f'pacs_ae_title = "{orthanc.ae_title}"\nretry_initial_s = 0.5\nretry_max_s = 2.0\n')
    cart = start_cart(tmp_path / "cart", width=364, height=272, extra=extra)
    client = None
    try:
        cart.wait_for_keys()
        client = CartClient.from_state_dir(cart.state_dir, cart.control, cart.telemetry)
        client.subscribe("status")
        assert client.wait_for("status", timeout_s=60) is not None, cart.log_text()
        injected = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=20)).isoformat(timespec="seconds")
        client.call("case.open", {"case_id": "SSCC-042", "histology": "sSCC", "arm": "icg_25mg",
                                  "injection_time": injected})
        client.call("roi.set", {"signal": [152, 106, 60, 60], "background": [10, 10, 60, 60]})
        client.call("arm")
        assert client.wait_for("status", lambda m: m["state"] == "ARMED", timeout_s=15), "never ARMED"
        client.call("laser.on", {"power_mw": 50})
        assert client.wait_for("status", lambda m: m["state"] == "EMITTING", timeout_s=15), "never EMITTING"
        client.call("acquire.start", {"mode": "fluorescence"}, timeout_s=15)
        reply = client.call("capture", {"site": "tumor_bed", "label": "e2e", "pairs": 2}, timeout_s=90)
        client.call("laser.off")
        folder = cart.state_dir / "captures" / "SSCC-042" / reply["capture_id"]
        local = sorted(folder.glob("*.dcm"))
        assert [p.name.rsplit("-", 1)[1] for p in local] == ["frames.dcm", "sr.dcm"]
        uids = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in local)
        wait_until(lambda: sorted(orthanc.sop_instance_uids()) == uids, 60, "both instances in the PACS")
        sr = pydicom.dcmread([p for p in local if p.name.endswith("sr.dcm")][0])
        sbr = {n: float(it.MeasuredValueSequence[0].NumericValue) for n, it in items(sr) if it.ValueType == "NUM"}
        assert sbr["Signal-to-background ratio"] == pytest.approx(reply["sbr"], rel=1e-6)
        assert sr.PatientID == "SSCC-042"
    finally:
        if client is not None:
            client.close()
        cart.stop()


# ---------------------------------------------------------------------- the recorder's side
def test_without_measurements_the_capture_is_kept_and_the_missing_dicom_named(tmp_path):
    box = Outbox(tmp_path / "outbox", FakePacs().send, clock=ManualClock())
    rec = Recorder(tmp_path, reserve_bytes=0, dicom=SETTINGS, outbox=box)
    for i, s in enumerate((2, 4)):
        rec.handle(pair_msg(f"{CASE}-c001", s, i))
    end = {"capture_id": f"{CASE}-c001", "case_id": CASE, "folder": f"captures/{CASE}/{CASE}-c001",
           "frame_seqs": [2, 4]}
    done = bus_mod.unpack(rec.handle([b"end", bus_mod.pack(end)])[1])
    assert done["errors"] == [] and len(done["files"]) == 2 and done["dicom"] == []
    assert "no measurements" in done["dicom_errors"][0] and box.pending() == []


def test_a_full_disk_while_writing_dicom_refuses_the_capture_and_queues_nothing(tmp_path, mocker):
    from nirf.services.study import tiff as tiff_mod

    box = Outbox(tmp_path / "outbox", FakePacs().send, clock=ManualClock())
    rec = Recorder(tmp_path, reserve_bytes=0, dicom=SETTINGS, outbox=box)
    real = tiff_mod._write_all
    calls = {"n": 0}

    def fill_on_dicom(fd, data):
        calls["n"] += 1
        if calls["n"] == 3:  # two OME-TIFFs went through; the first DICOM file fails
            raise OSError(28, "No space left on device")
        real(fd, data)

    mocker.patch.object(tiff_mod, "_write_all", side_effect=fill_on_dicom)
    for i, s in enumerate((2, 4)):
        rec.handle(pair_msg(f"{CASE}-c001", s, i))
    end = {"capture_id": f"{CASE}-c001", "case_id": CASE, "folder": f"captures/{CASE}/{CASE}-c001",
           "frame_seqs": [2, 4], "measurements": MEASURED}
    done = bus_mod.unpack(rec.handle([b"end", bus_mod.pack(end)])[1])
    assert done["errors"][0]["code"] == "DISK_FULL" and done["files"] == [] and done["dicom"] == []
    assert box.pending() == [] and not (tmp_path / "captures" / CASE / f"{CASE}-c001").exists()


def test_dicom_settings_in_the_configuration_are_checked():
    from nirf import config as config_mod
    from nirf.hal.errors import ConfigError

    ok = config_mod.validate({"dicom": {"enabled": True, "uid_root": ROOT, "pacs_port": 11112}})
    assert ok["dicom"]["uid_root"] == ROOT and ok["dicom"]["pacs_port"] == 11112
    for bad, words in (({"enabled": True}, "required when enabled"),
                       ({"uid_root": "1.2.03"}, "leading zeros"),
                       ({"uid_root": "1." * 25 + "1"}, "at most 40"),
                       ({"ae_title": "A" * 17}, "1 to 16"),
                       ({"pacs_ae_title": "back\\slash"}, "backslash"),
                       ({"retry_initial_s": 50.0, "retry_max_s": 10.0}, "must not exceed"),
                       ({"pacs_port": 0}, "1 to 65535")):
        with pytest.raises(ConfigError, match=words) as err:
            config_mod.validate({"dicom": bad}, "cart.toml")
        assert "cart.toml: [dicom]" in str(err.value)


@pytest.mark.slow
def test_a_damaged_file_in_the_outbox_is_set_aside_and_the_rest_arrive(tmp_path, orthanc):
    orthanc.start()
    f, m = frames(1)
    good = tmp_path / "good.dcm"
    good.write_bytes(dicom.capture_files(f, m, MEASURED, case_id=CASE, capture_id=f"{CASE}-c009",
                                         settings=SETTINGS)[1][2])
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not DICOM at all")
    clock = ManualClock()
    box = Outbox(tmp_path / "outbox", sender_for(orthanc).send, retry_initial_s=1.0, retry_max_s=1.0,
                 max_refusals=2, clock=clock)
    box.add(bad)
    box.add(good)
    assert box.send_due() == 1
    clock.advance(1.0)
    assert box.send_due() == 0 and box.pending() == []
    assert box.status()["refused"] == 1 and "unreadable" in box.last_error
    assert orthanc.sop_instance_uids() == [str(read(good.read_bytes()).SOPInstanceUID)]
