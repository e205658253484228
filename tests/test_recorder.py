"""The recorder (services/study/recorder.py) in-process, and the controller's clinical side
(services/study/clinical.py) against a stand-in controller: atomic capture folders, embedded
metadata, gap accounting, full disks, crashes mid-write, and the capture command's
refusals."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from nirf.hal.camera import Frame, FrameMeta
from nirf.hal.clock import ManualClock
from nirf.hal.errors import DeviceError, DeviceTimeout, InvalidArgument, NoCase, WrongState
from nirf.services.gateway import bus as bus_mod
from nirf.services.study import tiff as tiff_mod
from nirf.services.study.recorder import Recorder, RecorderService
from nirf.services.study.tiff import pair_file_name, read_pair, read_tiff

W, H = 32, 24
CASE = "DFSP-014"
CAP = "DFSP-014-c001"
FOLDER = f"captures/{CASE}/{CAP}"


def meta(mcu_frame: int, lit: bool) -> dict:
    return {"seq": mcu_frame - 100, "mcu_frame": mcu_frame, "lit": lit,
            "t_start_ns": 1_700_000_000_000_000_000 + mcu_frame * 33_000_000,
            "t_end_ns": 1_700_000_000_010_000_000 + mcu_frame * 33_000_000,
            "exposure_us": 10_000, "gain": 2.0, "laser_mw": 50.0 if lit else 0.0,
            "filter_position": 1, "bits": 10, "black_level": 16, "width": W, "height": H}


def pixels(seq: int, role: str) -> np.ndarray:
    rng = np.random.default_rng(seq * 2 + (role == "off"))
    return rng.integers(0, 1024, size=(H, W), dtype=np.uint16)


def pair_msg(seq: int, index: int = 0, capture_id: str = CAP, case_id: str = CASE) -> list[bytes]:
    header = {"capture_id": capture_id, "case_id": case_id, "folder": f"captures/{case_id}/{capture_id}",
              "index": index, "frame_seq": seq, "on": meta(seq, True), "off": meta(seq + 1, False),
              "extra": {"site": "tumor_bed", "label": "12 o'clock", "filter_name": "icg_emission"}}
    return [b"pair", bus_mod.pack(header), pixels(seq, "on").tobytes(), pixels(seq, "off").tobytes()]


def end_msg(seqs, capture_id: str = CAP, case_id: str = CASE, measurements: dict | None = None) -> list[bytes]:
    header = {"capture_id": capture_id, "case_id": case_id, "folder": f"captures/{case_id}/{capture_id}",
              "frame_seqs": list(seqs)}
    if measurements is not None:
        header["measurements"] = measurements
    return [b"end", bus_mod.pack(header)]


def names(done: dict) -> list[str]:
    return [f.rsplit("/", 1)[1] for f in done["files"]]


def answer(reply) -> dict:
    assert reply is not None and reply[0] == b"done"
    return bus_mod.unpack(reply[1])


def visible_files(root: Path) -> list[str]:
    """Every file whose path has no hidden component, relative to root."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        out += [str(rel / f) for f in filenames if not f.startswith(".")]
    return sorted(out)


def all_entries(root: Path) -> list[str]:
    return sorted(str(Path(d).relative_to(root) / f) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture
def rec(tmp_path):
    return Recorder(tmp_path, reserve_bytes=0)


def feed(rec, seqs):
    for i, s in enumerate(seqs):
        assert rec.handle(pair_msg(s, i)) is None


# ---------------------------------------------------------------------- writing a capture
def test_requested_pairs_are_written_with_metadata_and_nothing_else(rec, tmp_path):
    feed(rec, [10, 12, 14, 16, 18])
    done = answer(rec.handle(end_msg([12, 16])))
    assert done["errors"] == []
    expected = [f"{FOLDER}/pair0000-frame000000000012.ome.tiff", f"{FOLDER}/pair0001-frame000000000016.ome.tiff"]
    assert done["files"] == expected
    assert visible_files(tmp_path) == sorted(expected)
    assert all_entries(tmp_path) == sorted(expected)  # no temporary or staging file left
    assert done["frames_lost"] == 0
    assert done["bytes_written"] == sum((tmp_path / f).stat().st_size for f in expected)

    on, off, m_on, m = read_pair(tmp_path / expected[1])
    np.testing.assert_array_equal(on, pixels(16, "on"))
    np.testing.assert_array_equal(off, pixels(16, "off"))
    assert m["role"] == "off" and m["frame_seq"] == 16 and m["mcu_frame"] == 17
    assert m["capture_id"] == CAP and m["case_id"] == CASE
    assert m["exposure_us"] == 10_000 and m["gain"] == 2.0 and m["laser_mw"] == 0.0
    assert m["filter_position"] == 1 and m["filter_name"] == "icg_emission"
    assert m["t_start_ns"] == meta(17, False)["t_start_ns"] and m["t_end_ns"] == meta(17, False)["t_end_ns"]
    assert m["site"] == "tumor_bed" and m["label"] == "12 o'clock"
    assert m_on["lit"] is True and m_on["laser_mw"] == 50.0 and m_on["seq"] == meta(16, True)["seq"]
    assert m_on["pair_index"] == 3 and m_on["role"] == "on"  # the 4th pair forwarded, the 2nd kept
    assert rec.buffers == {}  # memory released


def test_file_names_sort_in_acquisition_order_past_a_thousand(tmp_path):
    rec = Recorder(tmp_path, reserve_bytes=0)
    seqs = [996, 998, 1000, 1002]  # unpadded, "1000-..." would sort before "996-..."
    feed(rec, seqs)
    done = answer(rec.handle(end_msg(seqs)))
    assert names(done) == sorted(names(done))
    assert [read_pair(tmp_path / f)[2]["frame_seq"] for f in sorted(done["files"])] == seqs


def test_pair_file_names_refuse_what_cannot_be_padded():
    assert pair_file_name(3, 42) == "pair0003-frame000000000042.ome.tiff"
    with pytest.raises(InvalidArgument, match="10000"):
        pair_file_name(10000, 1)
    with pytest.raises(InvalidArgument, match="frame_seq"):
        pair_file_name(0, -1)


def test_an_aborted_capture_writes_nothing(rec, tmp_path):
    feed(rec, [2, 4, 6])
    done = answer(rec.handle(end_msg([])))
    assert done["files"] == [] and done["errors"] == []
    assert all_entries(tmp_path) == [] and rec.buffers == {}


def test_an_existing_capture_folder_is_never_replaced(rec, tmp_path):
    (tmp_path / FOLDER).mkdir(parents=True)
    (tmp_path / FOLDER / "keep.txt").write_text("earlier")
    feed(rec, [2])
    done = answer(rec.handle(end_msg([2])))
    assert done["files"] == [] and done["errors"][0]["code"] == "WRITE_FAILED"
    assert "already exists" in done["errors"][0]["message"]
    assert (tmp_path / FOLDER / "keep.txt").read_text() == "earlier"
    assert all_entries(tmp_path) == [f"{FOLDER}/keep.txt"]


# ---------------------------------------------------------------------- gaps (never silent)
def test_a_pair_missing_inside_the_span_is_counted(rec):
    feed(rec, [10, 12, 16, 18])  # 14 and 15 never arrived
    done = answer(rec.handle(end_msg([10, 12, 16, 18])))
    assert done["frames_lost"] == 2
    assert done["gaps"]["gaps"] == 1 and done["gaps"]["gap_ranges"] == [[14, 15]]
    assert len(done["files"]) == 4


def test_requested_pairs_that_never_arrived_are_lost_and_named(rec):
    feed(rec, [12, 14])
    done = answer(rec.handle(end_msg([10, 12, 14, 16])))  # first and last never came
    assert done["missing_pairs"] == [10, 16]
    assert done["frames_lost"] == 4
    assert names(done) == ["pair0000-frame000000000012.ome.tiff", "pair0001-frame000000000014.ome.tiff"]


def test_nothing_received_loses_the_whole_span(rec, tmp_path):
    done = answer(rec.handle(end_msg([4, 6])))
    assert done["frames_lost"] == 4 and done["missing_pairs"] == [4, 6]
    assert done["files"] == []


def test_pairs_beyond_the_memory_bound_are_dropped_and_counted(tmp_path):
    one_pair = 2 * W * H * 2
    rec = Recorder(tmp_path, reserve_bytes=0, max_buffer_bytes=2 * one_pair)
    feed(rec, [2, 4, 6, 8])
    done = answer(rec.handle(end_msg([2, 4, 6, 8])))
    assert done["gaps"]["dropped_pairs"] == 2
    assert done["frames_lost"] == 4 and done["missing_pairs"] == [6, 8]
    assert len(done["files"]) == 2


def test_a_capture_that_never_ends_is_forgotten(tmp_path):
    clock = ManualClock()
    rec = Recorder(tmp_path, reserve_bytes=0, stale_after_s=60.0, clock=clock)
    feed(rec, [2])
    clock.advance(30.0)
    assert rec.expire_stale() == 0 and CAP in rec.buffers
    clock.advance(31.0)
    assert rec.expire_stale() == 1 and rec.buffers == {}


def test_a_new_capture_drops_one_that_never_ended(rec):
    feed(rec, [2])
    rec.handle(pair_msg(8, 0, capture_id="DFSP-014-c002"))
    assert list(rec.buffers) == ["DFSP-014-c002"]


# ---------------------------------------------------------------------- refusals and crashes
def test_a_full_disk_mid_capture_refuses_it_and_leaves_nothing(rec, tmp_path, mocker):
    real_write = tiff_mod._write_all
    calls = {"n": 0}

    def write_then_fill(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    mocker.patch.object(tiff_mod, "_write_all", side_effect=write_then_fill)
    feed(rec, [2, 4, 6])
    done = answer(rec.handle(end_msg([2, 4, 6])))
    assert calls["n"] == 2
    assert done["files"] == [] and done["errors"][0]["code"] == "DISK_FULL"
    assert "disk full" in done["errors"][0]["message"] and "frame000000000002" not in done["errors"][0]["message"]
    assert "pair0001-frame000000000004.ome.tiff" in done["errors"][0]["message"]  # names the file it failed on
    assert all_entries(tmp_path) == []  # the two files already written went with the staging folder
    assert rec.captures_refused == 1


def test_too_little_free_space_refuses_before_writing(tmp_path, mocker):
    rec = Recorder(tmp_path, reserve_bytes=10_000_000)
    mocker.patch("nirf.services.study.recorder.shutil.disk_usage",
                 return_value=SimpleNamespace(total=20_000_000, used=15_000_000, free=5_000_000))
    writes = mocker.spy(tiff_mod, "_write_all")
    feed(rec, [2])
    done = answer(rec.handle(end_msg([2])))
    assert done["errors"][0]["code"] == "DISK_FULL"
    assert "5000000 bytes free" in done["errors"][0]["message"] and "10000000" in done["errors"][0]["message"]
    assert writes.call_count == 0 and all_entries(tmp_path) == []


def test_a_crash_mid_write_leaves_only_hidden_files_that_the_next_start_removes(tmp_path, mocker):
    # A committed capture first, which must survive everything below.
    rec = Recorder(tmp_path, reserve_bytes=0)
    feed(rec, [2])
    committed = answer(rec.handle(end_msg([2])))["files"]

    class Killed(BaseException):
        """Stands for SIGKILL: nothing after it runs, no cleanup."""

    real_write = tiff_mod._write_all
    calls = {"n": 0}

    def die_on_third(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:
            real_write(fd, data[: len(data) // 2])  # half a file on disk
            raise Killed()
        real_write(fd, data)

    mocker.patch.object(tiff_mod, "_write_all", side_effect=die_on_third)
    mocker.patch.object(tiff_mod, "_remove_quietly")  # a killed process removes nothing
    cap2 = "DFSP-014-c002"
    for i, s in enumerate([8, 10]):
        rec.handle(pair_msg(s, i, capture_id=cap2))
    with pytest.raises(Killed):
        rec.finish(bus_mod.unpack(end_msg([8, 10], capture_id=cap2)[1]))
    mocker.stopall()

    leftovers = [e for e in all_entries(tmp_path) if e not in committed]
    assert leftovers, "the simulated crash should leave something behind"
    assert visible_files(tmp_path) == sorted(committed)  # nothing of the crashed capture is visible
    for f in committed:
        read_tiff(tmp_path / f)

    restarted = Recorder(tmp_path, reserve_bytes=0)
    removed = restarted.remove_leftovers()
    assert removed
    assert all_entries(tmp_path) == sorted(committed)


def test_leftover_temporary_files_inside_a_capture_folder_are_removed(tmp_path):
    folder = tmp_path / FOLDER
    folder.mkdir(parents=True)
    (folder / "pair0000-frame000000000002.ome.tiff").write_bytes(b"kept")
    (folder / ".pair0001-frame000000000004.ome.tiff.abc.tmp").write_bytes(b"half")
    Recorder(tmp_path).remove_leftovers()
    assert all_entries(tmp_path) == [f"{FOLDER}/pair0000-frame000000000002.ome.tiff"]


@pytest.mark.parametrize("bad", [
    [b"pair", b"\xc1not msgpack", b"", b""],
    [b"pair", bus_mod.pack({"capture_id": "../../etc", "case_id": CASE, "frame_seq": 1}), b"", b""],
    [b"pair", bus_mod.pack({"capture_id": CAP, "case_id": CASE, "frame_seq": "x"}), b"", b""],
    [b"what", bus_mod.pack({})],
    [b"pair"],
])
def test_malformed_messages_are_counted_not_raised(rec, tmp_path, bad):
    assert rec.handle(bad) is None
    assert rec.bad_messages == 1 and all_entries(tmp_path) == []


def test_a_malformed_end_still_gets_an_answer(rec, tmp_path):
    reply = answer(rec.handle([b"end", bus_mod.pack({"capture_id": CAP, "case_id": "../x", "frame_seqs": [1]})]))
    assert reply["capture_id"] == CAP and reply["errors"][0]["code"] == "BAD_REQUEST"
    assert all_entries(tmp_path) == []


def test_a_frame_of_the_wrong_size_is_not_recorded(rec):
    msg = pair_msg(2)
    msg[3] = msg[3][:-2]
    rec.handle(msg)
    done = answer(rec.handle(end_msg([2])))
    assert done["missing_pairs"] == [2] and done["frames_lost"] == 2 and done["files"] == []


# ---------------------------------------------------------------------- over real sockets
@pytest.fixture
def short_runtime():
    d = Path(tempfile.mkdtemp(prefix="nirf-r-"))  # ipc paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_the_service_answers_over_its_sockets(tmp_path, short_runtime):
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.bind(f"ipc://{short_runtime / 'record.ipc'}")
        acks = ctx.socket(zmq.PULL)
        acks.setsockopt(zmq.LINGER, 0)
        acks.bind(f"ipc://{short_runtime / 'record_ack.ipc'}")
        svc = RecorderService(Recorder(tmp_path, reserve_bytes=0), short_runtime, context=ctx)
        svc.connect()
        for i, s in enumerate([4, 6]):
            push.send_multipart(pair_msg(s, i))
        push.send_multipart(end_msg([4, 6]))
        handled = 0
        deadline = time.monotonic() + 10
        while handled < 3 and time.monotonic() < deadline:
            handled += svc.serve_once(200)
        assert handled == 3
        assert acks.poll(5000)
        topic, body = acks.recv_multipart()
        done = bus_mod.unpack(body)
        assert topic == b"done" and done["capture_id"] == CAP and len(done["files"]) == 2
    finally:
        ctx.destroy(linger=0)


# ---------------------------------------------------------------------- the controller's side
class FakeTelemetry:
    def __init__(self):
        self.published = []

    def publish(self, topic, body, extra=()):
        self.published.append((topic, body))
        return body


class FakeAudit:
    def __init__(self):
        self.records = []

    def write(self, kind, **fields):
        self.records.append((kind, fields))


class FakeImaging:
    """The imaging process as the study process reaches it: its internal record.* commands,
    served in-process by the real RecordTap (which holds the socket to the recorder)."""

    def __init__(self, ctx, runtime_dir: Path):
        from nirf.services.imaging.record_tap import RecordTap

        self.tap = RecordTap(ctx, f"ipc://{runtime_dir / 'record.ipc'}")
        self.handlers = self.tap.handlers()

    def call(self, cmd, args=None, **kw):
        return self.handlers[cmd](args or {}, None)


class FakeController:
    """What Clinical uses of the study process's service, with the imaging side's tap and a
    recorder thread on real sockets, and results made up from the pairs it is fed."""

    def __init__(self, state_dir: Path, runtime_dir: Path, valid=lambda seq: True):
        from nirf.config import validate, Config
        from nirf.controller.state import State

        self.cfg = Config("test", validate({}))
        self.state_dir, self.runtime_dir = state_dir, runtime_dir
        self.ctx = zmq.Context()
        self.telemetry, self.audit = FakeTelemetry(), FakeAudit()
        self.cart = SimpleNamespace(state=State.EMITTING, setpoint_mw=50.0)
        self.acquisition = SimpleNamespace(mode="fluorescence")
        self.fps = 30.0
        self.filter = {"position": 1, "name": "icg_emission", "moving": False}
        self.valid = valid
        self._cond = threading.Condition()
        self._results: list[dict] = []
        self.clinical = None
        self.seq = 100
        self.imaging = FakeImaging(self.ctx, runtime_dir)

    def wait_results(self, count, timeout_s, valid_only=True):
        """Feeds pairs through the imaging tap and answers with their results."""
        out = []
        for _ in range(count):
            seq = self.seq
            self.seq += 2
            on = Frame(pixels(seq, "on"), FrameMeta(seq=seq, t_start_ns=1, t_end_ns=2, exposure_us=10_000, gain=2.0,
                                                    width=W, height=H, lit=True, mcu_frame=seq, laser_mw=50.0,
                                                    filter_position=1))
            off = Frame(pixels(seq, "off"), on.meta.with_(mcu_frame=seq + 1, lit=False, laser_mw=0.0))
            from nirf.services.imaging.main import _meta

            self.imaging.tap.on_pair(on, off, {"frame_seq": seq, "on": _meta(on.meta), "off": _meta(off.meta)})
            r = {"frame_seq": seq, "t_capture_ns": 1_700_000_000_000_000_000 + seq, "valid": self.valid(seq),
                 "signal_mean": 40.0, "background_mean": 10.0, "background_std": 5.0, "sbr": 4.0, "cnr": 6.0,
                 "intensity": 123.0, "threshold": 2.0,
                 "roi": {"signal": [1, 1, 4, 4], "background": [10, 10, 4, 4]}}
            if r["valid"] or not valid_only:
                out.append(r)
        return out


@pytest.fixture
def clinical_rig(tmp_path, short_runtime):
    from nirf.services.study.clinical import Clinical

    ctl = FakeController(tmp_path, short_runtime)
    ctl.clinical = Clinical(ctl)
    recorder = Recorder(tmp_path, reserve_bytes=0)
    svc = RecorderService(recorder, short_runtime, context=ctl.ctx)
    svc.connect()
    thread = threading.Thread(target=svc.serve, daemon=True)
    thread.start()
    wait_connected(ctl)
    yield ctl, recorder
    svc.stop_event.set()
    thread.join(timeout=5)
    ctl.clinical.close()
    ctl.imaging.tap.close()
    ctl.ctx.destroy(linger=0)


def wait_connected(ctl):
    # A PUSH socket is writable once a peer is connected: the recorder is there.
    assert ctl.imaging.tap._push.poll(5000, zmq.POLLOUT), "the recorder did not connect"


def open_case(clinical, case_id=CASE):
    return clinical.cmd_case_open({"case_id": case_id, "histology": "DFSP", "arm": "control"})


def test_capture_needs_an_open_case(clinical_rig):
    ctl, _ = clinical_rig
    with pytest.raises(NoCase):
        ctl.clinical.cmd_capture({"site": "tumor_bed"})


def test_capture_needs_fluorescence_while_emitting(clinical_rig):
    from nirf.controller.state import State

    ctl, _ = clinical_rig
    open_case(ctl.clinical)
    ctl.cart.state = State.ARMED
    with pytest.raises(WrongState, match="ARMED"):
        ctl.clinical.cmd_capture({"site": "tumor_bed"})
    ctl.cart.state = State.EMITTING
    ctl.acquisition.mode = "white"
    with pytest.raises(WrongState, match="white"):
        ctl.clinical.cmd_capture({"site": "tumor_bed"})


@pytest.mark.parametrize("args", [{"site": "elbow"}, {"site": "tumor_bed", "pairs": 0},
                                  {"site": "tumor_bed", "pairs": 65}, {"site": "tumor_bed", "pairs": True},
                                  {"site": "tumor_bed", "colour": "red"}, {"site": "tumor_bed", "label": 3}])
def test_capture_arguments_are_checked(clinical_rig, args):
    ctl, _ = clinical_rig
    open_case(ctl.clinical)
    with pytest.raises(InvalidArgument):
        ctl.clinical.cmd_capture(args)


def test_a_capture_is_recorded_and_stored(clinical_rig, tmp_path):
    ctl, recorder = clinical_rig
    open_case(ctl.clinical)
    assert ctl.clinical.current_case_id() == CASE
    reply = ctl.clinical.cmd_capture({"site": "tumor_bed", "label": "3 o'clock", "pairs": 3})
    assert reply["capture_id"] == CAP
    assert reply["sbr"] == pytest.approx(4.0) and reply["positive"] is True and reply["threshold"] == 2.0
    assert reply["cnr"] == pytest.approx(6.0) and reply["intensity"] == pytest.approx(123.0)
    assert len(reply["files"]) == 3 and all((tmp_path / f).is_file() for f in reply["files"])
    stored = ctl.clinical.store.get_capture(CAP)
    assert stored["files"] == reply["files"] and stored["frames_lost"] == 0 and stored["pairs"] == 3
    assert stored["calibration_id"] == "nominal" and stored["config_hash"] == ctl.cfg.sha256
    assert stored["settings"]["frame_seqs"] == [100, 102, 104]
    assert stored["settings"]["exposure_us"] == 10_000
    events = [b for t, b in ctl.telemetry.published if t == "event" and b["kind"] == "capture"]
    assert events and events[-1]["capture_id"] == CAP


def test_only_valid_results_count_and_only_their_frames_are_kept(tmp_path, short_runtime):
    from nirf.services.study.clinical import Clinical

    ctl = FakeController(tmp_path, short_runtime, valid=lambda seq: seq % 4 == 0)
    ctl.clinical = Clinical(ctl)
    svc = RecorderService(Recorder(tmp_path, reserve_bytes=0), short_runtime, context=ctl.ctx)
    svc.connect()
    thread = threading.Thread(target=svc.serve, daemon=True)
    thread.start()
    try:
        wait_connected(ctl)
        open_case(ctl.clinical)
        reply = ctl.clinical.cmd_capture({"site": "gross_tumor", "pairs": 2})
        kept = sorted({int(Path(f).name.split("frame")[1].split(".")[0]) for f in reply["files"]})
        assert kept and all(s % 4 == 0 for s in kept) and len(kept) == 2
        assert visible_files(tmp_path / "captures") == sorted(f.split("/", 1)[1] for f in reply["files"])
    finally:
        svc.stop_event.set()
        thread.join(timeout=5)
        ctl.clinical.close()
        ctl.ctx.destroy(linger=0)


def test_a_full_disk_refuses_the_capture_and_stores_nothing(clinical_rig, tmp_path, mocker):
    ctl, _ = clinical_rig
    open_case(ctl.clinical)
    mocker.patch.object(tiff_mod, "_write_all", side_effect=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(DeviceError, match="disk full") as info:
        ctl.clinical.cmd_capture({"site": "tumor_bed", "pairs": 2})
    assert info.value.code == "DEVICE_ERROR"
    assert ctl.clinical.store.captures(CASE) == []
    assert visible_files(tmp_path / "captures") == []


def test_no_recorder_gives_a_clear_error(tmp_path, short_runtime, mocker):
    from nirf.services.study import clinical as clinical_mod

    mocker.patch.object(clinical_mod, "RECORDER_BASE_TIMEOUT_S", 0.5)
    mocker.patch.object(clinical_mod, "RECORDER_PER_PAIR_S", 0.0)
    ctl = FakeController(tmp_path, short_runtime)
    ctl.clinical = clinical_mod.Clinical(ctl)
    try:
        open_case(ctl.clinical)
        with pytest.raises(DeviceError, match="recorder") as info:
            ctl.clinical.cmd_capture({"site": "tumor_bed", "pairs": 2})
        assert "running" in str(info.value)
        assert ctl.clinical.store.captures(CASE) == []
    finally:
        ctl.clinical.close()
        ctl.ctx.destroy(linger=0)


def test_too_few_valid_results_time_out(tmp_path, short_runtime, mocker):
    from nirf.services.study import clinical as clinical_mod

    mocker.patch.object(clinical_mod, "RESULTS_MARGIN_S", 0.0)
    ctl = FakeController(tmp_path, short_runtime, valid=lambda seq: False)
    ctl.fps = 60.0
    ctl.clinical = clinical_mod.Clinical(ctl)
    try:
        open_case(ctl.clinical)
        with pytest.raises(DeviceTimeout, match="0 of 1 valid") as info:
            ctl.clinical.cmd_capture({"site": "tumor_bed", "pairs": 1})
        assert info.value.code == "TIMEOUT"
    finally:
        ctl.clinical.close()
        ctl.ctx.destroy(linger=0)


def test_an_uncommitted_capture_folder_is_set_aside_at_start(tmp_path, short_runtime):
    from nirf.services.study.clinical import Clinical

    orphan = tmp_path / FOLDER
    orphan.mkdir(parents=True)
    (orphan / "2-on.tiff").write_bytes(b"complete but never stored")
    ctl = FakeController(tmp_path, short_runtime)
    ctl.clinical = Clinical(ctl)
    try:
        assert not orphan.exists()
        assert visible_files(tmp_path / "captures") == []
        hidden = [p.name for p in (tmp_path / "captures" / CASE).iterdir()]
        assert len(hidden) == 1 and hidden[0].startswith(".orphan-")
    finally:
        ctl.clinical.close()
        ctl.ctx.destroy(linger=0)


def test_case_commands_and_the_report(clinical_rig):
    ctl, _ = clinical_rig
    c = ctl.clinical
    case = c.cmd_case_open({"case_id": "SSCC-002", "histology": "sSCC", "arm": "icg_0.25mg_per_kg",
                            "weight_kg": 80, "injection_time": "2024-05-01T08:00:00+00:00"})
    assert case["dose_mg"] == pytest.approx(20.0)
    with pytest.raises(WrongState):
        open_case(c)
    reply = c.cmd_capture({"site": "tumor_bed", "pairs": 1})
    assert c.cmd_pathology_set({"capture_id": reply["capture_id"], "margin_positive": True})["margin_positive"]
    with pytest.raises(InvalidArgument):
        c.cmd_pathology_set({"capture_id": reply["capture_id"]})
    closed = c.cmd_case_close({})
    assert closed["case_id"] == "SSCC-002" and c.current_case_id() is None
    with pytest.raises(NoCase):
        c.cmd_case_close({})
    report = c.cmd_report({})
    overall = report["groups"][-1]
    assert overall["histology"] == "all" and overall["counts"]["tp"] == 1
    assert c.cmd_report({"histology": "DFSP"})["groups"][-1]["counts"]["tp"] == 0
