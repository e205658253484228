"""Calibration procedures: storage, ids and validation against a fake controller (fast, no
processes), the processing service applying a stored flat field, and the whole cart end to
end: a flat field from a uniform target under Gaussian light brings the default phantom's SBR
back to 4, every result records the calibration id, a power table changes the duty used, and
the daily QC check passes, then fails when the reference target changes."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from nirf import config
from nirf.controller.calibration import PowerCalibration
from nirf.controller.power import PowerCalibrations
from nirf.controller.state import State
from nirf.hal.camera import CameraSettings, Frame, FrameMeta
from nirf.hal.clock import ManualClock
from nirf.hal.errors import DeviceTimeout, InvalidArgument, WrongState
from nirf.services.imaging import calibration as cs
from nirf.services.imaging.calibration import Calibration
from tests.safety_rig import Rig

CFG = config.load("sim")
CALLER = SimpleNamespace(name="tech", role="operator")
W, H = 64, 48  # small frames keep the fake-service tests fast


# ---------------------------------------------------------------------- a fake controller
class FakeAcquisition:
    """Delivers frames to ``on_frame`` when the clock sleeps (so ManualClock drives it)."""

    def __init__(self, settings: CameraSettings, frame_level: float = 16.0, deliver: bool = True):
        self.camera = SimpleNamespace(settings=settings)
        self.mode = "off"
        self.fps = 30.0
        self.on_frame = lambda f: None
        self.frame_level = frame_level
        self.deliver = deliver
        self.starts: list[str] = []
        self._seq = 0
        self._rng = np.random.default_rng(1)

    def start(self, mode):
        self.starts.append(mode)
        self.mode = mode

    def stop(self):
        self.mode = "off"

    def tick(self):
        if self.mode == "dark" and self.deliver:
            s = self.camera.settings
            data = (self.frame_level + self._rng.normal(0, 1.0, (s.height, s.width))).round().astype(np.uint16)
            meta = FrameMeta(self._seq, 0, 1, s.exposure_us, s.gain, s.width, s.height)
            self._seq += 1
            self.on_frame(Frame(data, meta))


class HookClock(ManualClock):
    """A ManualClock that runs a hook on every sleep: the "hardware" producing data while
    the code under test waits."""

    def __init__(self):
        super().__init__()
        self.hooks: list = []

    def sleep(self, seconds):
        super().sleep(seconds)
        for hook in list(self.hooks):
            hook()


class Recorder:
    def __init__(self):
        self.items = []

    def write(self, kind, **fields):
        self.items.append((kind, fields))

    def publish(self, topic, body):
        self.items.append((topic, body))


class FakeService:
    """The calibration service's view of a controller: a real cart (tests.safety_rig: the
    real MCU emulator and driver, on the service's manual clock) and fakes for the rest.
    ``started=False`` leaves the cart unconnected, so a stored table is loaded first and
    checked against the MCU's factory record when :meth:`start` connects, as at boot."""

    def __init__(self, state_dir: Path, settings: CameraSettings | None = None, *, started: bool = True):
        self.cfg = CFG
        self.state_dir = state_dir
        self.clock = HookClock()
        self.rig = Rig(clock=self.clock, start=started)
        self.cart = self.rig.cart
        # the safety core's power table (controller/power.py); imaging reads only its id
        self.power = PowerCalibrations(CFG, state_dir, self.clock, on_change=lambda body: self.audit.write(
            body["kind"], **{k: v for k, v in body.items() if k != "kind"}))
        loaded = self.power.load()
        if loaded is not None:
            self.cart.calibration = loaded  # checked against the factory record at start
        self.cart.power_calibration_id = lambda: self.cart.calibration.calibration_id
        self.cart.power_problems = lambda: list(self.power.problems) + list(self.cart.calibration_problems)
        self.acquisition = FakeAcquisition(settings or CameraSettings(10_000, 1.0, W, H))
        self.clock.hooks.append(self.acquisition.tick)
        self.filter = {"position": 1, "name": "icg_emission", "moving": False}
        self.moves: list[int] = []
        self.audit = Recorder()
        self.telemetry = Recorder()
        self.results: list[dict] = []
        self.roi = {"signal": [1, 1, 4, 4], "background": [10, 10, 4, 4]}

    def _move_filter(self, position):
        self.moves.append(position)
        self.filter["position"] = position
        return {"position": position}

    def wait_results(self, count, timeout_s, valid_only=True):
        got, self.results = self.results[:count], self.results[count:]
        return got


@pytest.fixture
def svc(tmp_path):
    return FakeService(tmp_path)


def _pair(on_data, off_data, laser_mw=50.0, exposure_us=10_000, gain=1.0, bits=10):
    h, w = on_data.shape
    m_on = FrameMeta(0, 0, 1, exposure_us, gain, w, h, bits=bits, lit=True, laser_mw=laser_mw)
    m_off = FrameMeta(1, 1, 2, exposure_us, gain, w, h, bits=bits, lit=False, laser_mw=0.0)
    return Frame(on_data, m_on), Frame(off_data, m_off)


def gaussian(width, height, sigma_frac=0.35):
    x = np.arange(width) + 0.5 - width / 2
    y = np.arange(height) + 0.5 - height / 2
    s = sigma_frac * height
    return np.exp(-(y[:, None] ** 2) / (2 * s * s)) * np.exp(-(x[None, :] ** 2) / (2 * s * s))


def feed_uniform_pairs(svc, cal, level_counts=300.0, seed=3):
    """Each clock sleep delivers one pair of a uniform target under Gaussian light."""
    rng = np.random.default_rng(seed)
    s = svc.acquisition.camera.settings
    illum = gaussian(s.width, s.height)

    def hook():
        off = (16 + rng.normal(0, 2, (s.height, s.width))).round().astype(np.uint16)
        on = (16 + level_counts * illum + rng.normal(0, 2, (s.height, s.width))).clip(0, 1023).round().astype(np.uint16)
        cal.on_pair(*_pair(on, off), {})

    svc.clock.hooks.append(hook)
    return illum


# ---------------------------------------------------------------------- ids and storage
def test_fresh_cart_uses_the_factory_table_and_says_so(svc):
    cal = Calibration(svc)
    assert cal.current_id() == "p:factory|f:-|d:-"
    assert cal.flat_field_file() is None
    st = cal.cmd_status({}, CALLER)
    assert st["power"] == {"id": "factory"} and st["flat"] is None and st["darks"] == []
    assert st["problems"] == []


def test_stamp_and_key_formats():
    t_ns = 1_700_000_000_123_456_789
    assert cs.utc_stamp(t_ns) == "20231114T221320.123Z"
    assert cs.utc_iso(t_ns) == "2023-11-14T22:13:20.123Z"
    assert cs.dark_key(10000, 1.0) == "10000-1" and cs.dark_key(2000, 2.5) == "2000-2.5"


def test_write_atomic_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "x.json"
    cs.write_atomic(p, b"old")
    cs.write_atomic(p, b"new content")
    assert p.read_bytes() == b"new content"
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_write_atomic_failure_is_a_project_error_naming_the_file(tmp_path):
    from nirf.hal.errors import NirfError

    with pytest.raises(NirfError, match="cal.json"):
        cs.write_atomic(tmp_path / "missing-folder" / "cal.json", b"{}")


# ---------------------------------------------------------------------- power
@pytest.mark.parametrize("points,needle", [
    ([[0.0, 0.0]], "1 points given, allowed 2 to 32"),
    ([[i / 40, i] for i in range(33)], "33 points given"),
    ([[0.0, 0.0], [0.5, 250.0], [0.5, 260.0]], "duty must rise strictly"),
    ([[0.0, 0.0], [0.5, 250.0], [0.6, 250.0]], "power must rise strictly"),
    ([[0.0, 0.0], [1.2, 500.0]], "outside 0.0 to 1.0"),
    ([[0.0, 0.0], [1.0, 1500.0]], "1500.0 outside 0.0 to 1000.0"),
    ([[0.0, 0.0], [0.5, float("nan")]], "not a finite number"),
    ([[0.0, 0.0], [0.5]], "is not a [duty, mW] pair"),
    ("lots", "must be a list"),
    ([[0.0, True], [0.5, 250.0]], "not a finite number"),
])
def test_power_points_are_validated_with_the_value_and_limit(points, needle):
    with pytest.raises(InvalidArgument) as err:
        cs.validate_power_points(points)
    assert needle in str(err.value)


def power(svc, args):
    """calibrate.power as the safety core runs it (controller/power.py)."""
    return svc.power.command(args, CALLER, svc.cart)


def test_calibrate_power_stores_applies_and_survives_a_restart(svc):
    cal = Calibration(svc)
    nominal_duty = svc.cart.calibration.duty_for(50.0)
    svc.rig.key_cycle()
    r = power(svc, {"points": [[0.0, 0.0], [0.4, 220.0], [0.8, 440.0]], "photodiode_factor": 1.1,
                    "reason": "annual power-meter check"})
    assert r["id"].startswith("power-") and (svc.power.folder / r["file"]).is_file()
    assert svc.cart.calibration.calibration_id == r["id"]
    assert svc.cart.calibration.duty_for(50.0) == pytest.approx(50.0 / 550.0)
    assert svc.cart.calibration.duty_for(50.0) != pytest.approx(nominal_duty)
    assert svc.cart.calibration.photodiode_to_mw(10.0) == pytest.approx(11.0)
    assert cal.current_id().startswith(f"p:{r['id']}|")
    stored = json.loads((svc.power.folder / "power-current.json").read_text())
    assert stored["id"] == r["id"]
    assert ("calibration", ) == tuple(k for k, f in svc.audit.items if f.get("id") == r["id"])
    audited = [f for k, f in svc.audit.items if f.get("id") == r["id"]][0]
    assert audited["by"] == "tech" and audited["reason"] == "annual power-meter check"

    # a restarted controller (new cart with the nominal table) picks it up again, and its
    # check against the factory record at connect accepts it
    svc2 = FakeService(svc.state_dir, started=False)
    cal2 = Calibration(svc2)
    svc2.rig.start()
    assert svc2.cart.calibration.duty_for(50.0) == pytest.approx(50.0 / 550.0)
    assert cal2.current_id() == cal.current_id()


def test_calibrate_power_warns_when_the_ceiling_cannot_reach_the_maximum(svc):
    svc.rig.key_cycle()
    r = power(svc, {"points": [[0.0, 0.0], [1.0, 420.0]], "reason": "r"})
    # the factory ceiling is the duty of 220 mW on the true curve, 0.44: 0.44 x 420 = 184.8 < 200
    assert r["reachable_mw_at_ceiling"] == pytest.approx(184.8)
    assert any("max_power_mw" in w for w in r["warnings"])


def test_calibrate_power_is_refused_while_emitting(svc):
    svc.rig.key_cycle()
    svc.rig.arm_and_emit(50)
    before = svc.cart.calibration
    with pytest.raises(WrongState, match="EMITTING"):
        power(svc, {"points": [[0.0, 0.0], [1.0, 500.0]], "reason": "r"})
    assert svc.cart.calibration is before
    assert not list(Path(svc.state_dir, "calibration").glob("power-*"))


def test_unknown_arguments_and_bad_counts_are_refused(svc):
    cal = Calibration(svc)
    with pytest.raises(InvalidArgument, match="unknown argument 'frame'"):
        cal.cmd_dark({"frame": 3}, CALLER)
    with pytest.raises(InvalidArgument, match="frames = 0, allowed whole numbers 1 to 256"):
        cal.cmd_dark({"frames": 0}, CALLER)
    with pytest.raises(InvalidArgument, match="pairs = 300"):
        cal.cmd_flat({"pairs": 300}, CALLER)
    with pytest.raises(InvalidArgument, match="points is required"):
        power(svc, {})


def test_a_broken_power_file_is_reported_and_the_factory_table_used(svc):
    svc.rig.key_cycle()
    r = power(svc, {"points": [[0.0, 0.0], [1.0, 450.0]], "reason": "r"})
    (svc.power.folder / r["file"]).write_text("{ not json")
    svc2 = FakeService(svc.state_dir, started=False)
    cal2 = Calibration(svc2)
    svc2.rig.start()
    assert cal2.current_id().startswith("p:factory|")
    assert svc2.cart.calibration.calibration_id == "factory"
    assert any(r["file"] in p for p in svc2.power.problems + svc2.cart.calibration_problems)


def test_an_unreadable_current_file_means_uncalibrated_with_a_problem(svc):
    folder = svc.state_dir / "calibration"
    folder.mkdir(exist_ok=True)
    (folder / "current.json").write_text("[1, 2")
    cal = Calibration(svc)
    assert cal.current_id() == "p:factory|f:-|d:-"
    assert any("current.json" in p for p in cal.problems)


# ---------------------------------------------------------------------- dark
def test_calibrate_dark_averages_blocked_frames_for_the_current_settings(svc):
    svc.acquisition.frame_level = 20.0
    cal = Calibration(svc)
    r = cal.cmd_dark({"frames": 8}, CALLER)
    blocked, start = CFG.filter_wheel.blocked_position, 1
    assert svc.moves == [blocked, start]  # to the blocked filter, then back
    assert svc.acquisition.starts == ["dark"] and svc.acquisition.mode == "off"
    master = np.load(cal.folder / r["file"])
    assert master.dtype == np.float32 and master.shape == (H, W)
    assert float(master.mean()) == pytest.approx(20.0, abs=0.2)
    # averaging 8 frames shrinks the per-pixel spread of 1 count by about sqrt(8)
    assert float(master.std()) < 0.6
    assert r["frames"] == 8 and r["exposure_us"] == 10_000 and r["gain"] == 1.0
    assert r["id"].startswith("dark-10000-1-")
    assert cal.current_id() == f"p:factory|f:-|d:{r['id']}"
    # the sink is restored for normal operation
    assert svc.acquisition.on_frame is not None and svc.acquisition.on_frame.__name__ != "add"

    # another exposure has no dark: the id says so
    svc.acquisition.camera.settings = CameraSettings(20_000, 1.0, W, H)
    assert cal.current_id().endswith("|d:-")
    assert cal.cmd_status({}, CALLER)["dark_in_use"] is None


def test_calibrate_dark_is_refused_while_acquiring_or_emitting(svc):
    cal = Calibration(svc)
    svc.acquisition.mode = "white"
    with pytest.raises(WrongState, match="acquisition off"):
        cal.cmd_dark({}, CALLER)
    svc.acquisition.mode = "off"
    svc.cart.state = State.EMITTING
    with pytest.raises(WrongState, match="EMITTING"):
        cal.cmd_dark({}, CALLER)
    assert svc.moves == []


def test_calibrate_dark_times_out_without_frames_and_stores_nothing(svc):
    svc.acquisition.deliver = False
    cal = Calibration(svc)
    with pytest.raises(DeviceTimeout, match="only 0 of 4 dark frames"):
        cal.cmd_dark({"frames": 4}, CALLER)
    assert svc.moves[-1] == 1  # the wheel went back all the same
    assert not list(cal.folder.glob("dark-*"))


# ---------------------------------------------------------------------- flat field
def test_calibrate_flat_needs_fluorescence_acquisition(svc):
    with pytest.raises(WrongState, match="fluorescence"):
        Calibration(svc).cmd_flat({}, CALLER)


def test_calibrate_flat_recovers_the_excitation_profile(tmp_path):
    w, h = 256, 192  # the map is smoothed over 16 px blocks: the light must vary slower than that
    svc = FakeService(tmp_path, CameraSettings(10_000, 1.0, w, h))
    cal = Calibration(svc)
    svc.acquisition.mode = "fluorescence"
    illum = feed_uniform_pairs(svc, cal)
    r = cal.cmd_flat({"pairs": 8}, CALLER)
    assert r["pairs"] == 8 and r["id"].startswith("flat-")
    assert cal.flat_field_file() == r["file"]
    assert f"|f:{r['id']}|" in cal.current_id()
    gain_map = cs.load_flat_field(cal.folder, r["file"], w, h)
    # the map is the profile normalised over the centre: compare shapes, not scale
    expected = illum / np.mean(illum[h // 4: h - h // 4, w // 4: w - w // 4])
    inner = (slice(8, h - 8), slice(8, w - 8))
    # block smoothing rounds off the profile a little where it curves most (the corners)
    assert np.allclose(gain_map[inner], expected[inner], rtol=0.05)
    bright = illum > 0.5
    assert np.allclose(gain_map[bright], expected[bright], rtol=0.02)
    assert r["min_gain"] < 0.7 < r["max_gain"]
    # the tap is idle again: more pairs do not touch anything
    assert cal._flat_job is None


def test_calibrate_flat_refuses_a_saturated_target(svc):
    cal = Calibration(svc)
    svc.acquisition.mode = "fluorescence"
    feed_uniform_pairs(svc, cal, level_counts=2000.0)
    with pytest.raises(InvalidArgument, match="full scale"):
        cal.cmd_flat({"pairs": 4}, CALLER)
    assert cal.flat_field_file() is None


def test_calibrate_flat_refuses_too_little_fluorescence(svc):
    cal = Calibration(svc)
    svc.acquisition.mode = "fluorescence"
    feed_uniform_pairs(svc, cal, level_counts=3.0)
    with pytest.raises(InvalidArgument, match="below the minimum"):
        cal.cmd_flat({"pairs": 4}, CALLER)


def test_calibrate_flat_times_out_without_pairs(svc):
    cal = Calibration(svc)
    svc.acquisition.mode = "fluorescence"
    with pytest.raises(DeviceTimeout, match="only 0 of 4"):
        cal.cmd_flat({"pairs": 4}, CALLER)
    assert cal._flat_job is None


def test_a_flat_field_for_another_frame_size_is_not_applied(svc):
    cal = Calibration(svc)
    svc.acquisition.mode = "fluorescence"
    feed_uniform_pairs(svc, cal)
    r = cal.cmd_flat({"pairs": 2}, CALLER)
    svc.acquisition.camera.settings = CameraSettings(10_000, 1.0, W * 2, H * 2)
    assert cal.flat_field_file() is None
    assert "|f:-|" in cal.current_id()
    st = cal.cmd_status({}, CALLER)
    assert st["flat"]["id"] == r["id"] and st["flat_in_use"] is False


@pytest.mark.parametrize("name", ["../secret.npy", "/etc/passwd", ".hidden.npy", ""])
def test_load_flat_field_accepts_only_plain_names(tmp_path, name):
    with pytest.raises(InvalidArgument, match="plain file name"):
        cs.load_flat_field(tmp_path, name, W, H)


def test_load_flat_field_checks_shape_and_values(tmp_path):
    np.save(tmp_path / "f.npy", np.ones((H, W), np.float32))
    assert cs.load_flat_field(tmp_path, "f.npy", W, H).shape == (H, W)
    with pytest.raises(InvalidArgument, match=r"shape \(48, 64\)"):
        cs.load_flat_field(tmp_path, "f.npy", W + 1, H)
    bad = np.ones((H, W), np.float32)
    bad[3, 3] = 0.0
    np.save(tmp_path / "z.npy", bad)
    with pytest.raises(InvalidArgument, match="above 0"):
        cs.load_flat_field(tmp_path, "z.npy", W, H)
    with pytest.raises(InvalidArgument, match="cannot be read"):
        cs.load_flat_field(tmp_path, "missing.npy", W, H)


def test_the_tap_never_raises_into_the_frame_stream(svc):
    cal = Calibration(svc)
    cal._flat_job = cs._FlatCollector(2)
    cal.on_pair(object(), object(), {})  # garbage in: logged, not raised
    assert cal._flat_job.count == 0


# ---------------------------------------------------------------------- QC
def _results(intensity, sbr, n, roi=None):
    return [{"valid": True, "intensity": intensity * (1 + 0.001 * (i % 3)), "sbr": sbr, "frame_seq": 2 * i,
             "roi": roi or {"signal": [1, 1, 4, 4], "background": [10, 10, 4, 4]},
             "calibration_id": "p:nominal|f:-|d:-"} for i in range(n)]


def test_qc_compare_uses_relative_deviation_and_both_tolerances():
    base = {"intensity": 100.0, "sbr": 4.0}
    assert cs.qc_compare({"intensity": 109.0, "sbr": 4.19}, base, 0.10, 0.05)["passed"]
    v = cs.qc_compare({"intensity": 111.0, "sbr": 4.0}, base, 0.10, 0.05)
    assert not v["passed"] and not v["intensity"]["ok"] and v["sbr"]["ok"]
    assert v["intensity"]["deviation"] == pytest.approx(0.11)
    assert not cs.qc_compare({"intensity": 100.0, "sbr": 3.7}, base, 0.10, 0.05)["passed"]


def test_qc_run_without_a_baseline_is_refused(svc):
    svc.acquisition.mode = "fluorescence"
    with pytest.raises(WrongState, match="qc.baseline"):
        Calibration(svc).cmd_qc_run({}, CALLER)


def test_qc_needs_fluorescence_acquisition(svc):
    with pytest.raises(WrongState, match="fluorescence"):
        Calibration(svc).cmd_qc_baseline({}, CALLER)


def test_qc_baseline_then_pass_then_fail_is_logged(svc):
    cal = Calibration(svc)
    svc.acquisition.mode = "fluorescence"
    svc.results = _results(1000.0, 4.0, 4)
    base = cal.cmd_qc_baseline({"results": 4}, CALLER)
    assert base["intensity"] == pytest.approx(1000.0, rel=0.01) and base["sbr"] == pytest.approx(4.0)
    assert json.loads((cal.folder / "qc-baseline.json").read_text())["id"] == base["id"]

    svc.results = _results(1050.0, 4.1, 4)
    ok = cal.cmd_qc_run({"results": 4}, CALLER)
    assert ok["passed"] and ok["baseline_id"] == base["id"]
    svc.results = _results(1000.0, 3.3, 4)
    bad = cal.cmd_qc_run({"results": 4}, CALLER)
    assert not bad["passed"] and not bad["sbr"]["ok"] and bad["intensity"]["ok"]

    lines = [json.loads(x) for x in (cal.folder / "qc.jsonl").read_text().splitlines()]
    assert [x["passed"] for x in lines] == [True, False]
    assert [f["passed"] for k, f in svc.audit.items if k == "qc"] == [True, False]
    events = [b for t, b in svc.telemetry.items if t == "event" and b["kind"] == "qc"]
    assert [e["passed"] for e in events] == [True, False]
    # a restart remembers the baseline and the last check
    cal2 = Calibration(FakeService(svc.state_dir))
    assert cal2.qc_baseline["id"] == base["id"] and cal2.last_qc["id"] == bad["id"]


def test_qc_tolerances_come_from_the_configuration(svc, tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[calibration]\nqc_sbr_tolerance = 0.3\n")
    svc.cfg = config.load(p)
    cal = Calibration(svc)
    svc.acquisition.mode = "fluorescence"
    svc.results = _results(1000.0, 4.0, 2)
    cal.cmd_qc_baseline({"results": 2}, CALLER)
    svc.results = _results(1000.0, 3.3, 2)  # -17.5 %: fails at 5 %, passes at 30 %
    assert cal.cmd_qc_run({"results": 2}, CALLER)["passed"]


def test_qc_records_changed_conditions(svc):
    cal = Calibration(svc)
    svc.acquisition.mode = "fluorescence"
    svc.results = _results(1000.0, 4.0, 2)
    cal.cmd_qc_baseline({"results": 2}, CALLER)
    svc.results = _results(1000.0, 4.0, 2, roi={"signal": [2, 2, 4, 4], "background": [10, 10, 4, 4]})
    r = cal.cmd_qc_run({"results": 2}, CALLER)
    assert any(d.startswith("roi:") for d in r["differences"])


def test_qc_with_too_few_results_times_out(svc):
    cal = Calibration(svc)
    svc.acquisition.mode = "fluorescence"
    svc.results = _results(1000.0, 4.0, 1)
    with pytest.raises(DeviceTimeout, match="only 1 of 3 valid results"):
        cal.cmd_qc_baseline({"results": 3}, CALLER)
    assert not (cal.folder / "qc-baseline.json").exists()


def test_calibration_config_keys_are_bounded(tmp_path):
    from nirf.hal.errors import ConfigError

    p = tmp_path / "c.toml"
    p.write_text("[calibration]\nqc_intensity_tolerance = 0.9\n")
    with pytest.raises(ConfigError, match="qc_intensity_tolerance"):
        config.load(p)


# ---------------------------------------------------------------------- processing applies it
class _Part:
    def __init__(self, data: bytes):
        self.bytes = data
        self.buffer = memoryview(data)


def test_processing_applies_the_named_flat_field_and_records_the_id(tmp_path, monkeypatch):
    from nirf.services.gateway import bus as bus_mod
    from nirf.services.processing.pipeline import Roi
    from nirf.services.processing.main import ProcessingService

    monkeypatch.setenv("NIRF_STATE_DIR", str(tmp_path))
    ctx = zmq.Context()
    try:
        proc_svc = ProcessingService(CFG, tmp_path / "run", context=ctx)
        sent = []
        proc_svc.push = SimpleNamespace(send_multipart=lambda parts: sent.append(parts))
        w, h = 128, 96
        illum = gaussian(w, h).astype(np.float32)
        folder = tmp_path / "calibration"
        folder.mkdir()
        np.save(folder / "flat-a.npy", illum)
        conc = np.full((h, w), 50.0)
        conc[h // 2 - 10: h // 2 + 10, w // 2 - 10: w // 2 + 10] = 200.0
        on = (16 + 2.0 * conc * illum).round().astype(np.uint16)
        off = np.full((h, w), 16, np.uint16)

        def meta(lit):
            return {"seq": 0, "mcu_frame": 0, "lit": lit, "t_start_ns": 0, "t_end_ns": 1, "exposure_us": 10_000,
                    "gain": 1.0, "laser_mw": 50.0 if lit else 0.0, "filter_position": 1, "bits": 10,
                    "black_level": 16, "width": w, "height": h}

        def handle(flat, cal_id, seq):
            header = {"frame_seq": seq, "on": meta(True), "off": meta(False), "threshold": 2.0,
                      "roi": {"signal": Roi(w // 2 - 5, h // 2 - 5, 10, 10).to_list(),
                              "background": [2, 40, 10, 10]},
                      "roi_version": 1, "calibration_id": cal_id, "flat_field": flat}
            return proc_svc.handle([_Part(b"pair"), _Part(bus_mod.pack(header)), _Part(on.tobytes()),
                                    _Part(off.tobytes())])

        plain = handle(None, "p:nominal|f:-|d:-", 2)
        corrected = handle("flat-a.npy", "p:nominal|f:flat-a|d:-", 4)
        broken = handle("flat-missing.npy", "p:nominal|f:flat-missing|d:-", 6)
    finally:
        ctx.destroy(linger=0)
    assert plain["calibration_id"] == "p:nominal|f:-|d:-" and not plain["flat_field_applied"]
    assert corrected["calibration_id"] == "p:nominal|f:flat-a|d:-" and corrected["flat_field_applied"]
    assert corrected["sbr"] == pytest.approx(4.0, rel=0.02)
    assert plain["sbr"] > 4.0 * 1.2  # uneven light inflates it without the flat field
    assert not broken["flat_field_applied"] and broken["sbr"] == pytest.approx(plain["sbr"])
    published = [bus_mod.unpack(p[1]) for p in sent if p[0] == b"result"]
    assert [r["calibration_id"] for r in published] == [plain["calibration_id"], corrected["calibration_id"],
                                                        broken["calibration_id"]]


# ---------------------------------------------------------------------- the whole cart
WIDTH, HEIGHT = 728, 544
SIGNAL_ROI = [WIDTH // 2 - 30, HEIGHT // 2 - 30, 60, 60]  # inside the default phantom's disk
BACKGROUND_ROI = [40, 200, 120, 140]  # left of the disk, where the Gaussian light is weak
GAUSSIAN = {"gaussian_sigma_frac": 0.35}
UNIFORM_TARGET = {"background_icg_nM": 100.0, "autofluorescence_nM": 0.0, "inclusions": []}


def default_phantom(background_nM=50.0):
    return {"background_icg_nM": background_nM, "autofluorescence_nM": 0.0,
            "inclusions": [{"x": WIDTH / 2, "y": HEIGHT / 2, "radius": HEIGHT / 6, "icg_nM": 200.0}]}


@pytest.fixture(scope="module")
def cart(tmp_path_factory):
    from tests.cartproc import start_cart

    c = start_cart(tmp_path_factory.mktemp("calibration"), width=WIDTH, height=HEIGHT)
    try:
        c.wait_for_keys()
        yield c
    finally:
        c.stop()


@pytest.fixture
def client(cart):
    from nirf.services.cli.client import CartClient

    ctx = zmq.Context()
    cl = CartClient.from_state_dir(cart.state_dir, cart.control, cart.telemetry, context=ctx)
    try:
        cl.subscribe("status", "result", "event")
        assert cl.wait_for("status", timeout_s=60) is not None, cart.log_text()
        # every test starts from SAFE, uniform light and the default phantom
        cl.call("acquire.stop")
        cl.call("sim.set", {"interlock": "closed", "key": True, "illumination": "uniform",
                            "phantom": default_phantom()})
        st = cl.call("status")
        if st["state"] == "FAULT":
            cl.call("fault.reset")
        elif st["state"] != "SAFE":
            cl.call("disarm")
        yield cl
    finally:
        cl.close()
        ctx.destroy(linger=0)


def key_cycle_at_the_cart(cl):
    """The key off for more than 0.5 s and on again (S3a), seen by the controller."""
    cl.call("sim.set", {"key": False})
    assert cl.wait_for("status", lambda m: m["key"] is False, timeout_s=5) is not None
    time.sleep(0.6)
    cl.call("sim.set", {"key": True})
    assert cl.wait_for("status", lambda m: m["key"] is True, timeout_s=5) is not None


def emit_and_acquire(cl, power_mw=50.0):
    cl.call("arm")
    assert cl.wait_for("status", lambda m: m["state"] == "ARMED", timeout_s=5) is not None
    cl.call("laser.on", {"power_mw": power_mw})
    cl.call("acquire.start", {"mode": "fluorescence"})
    assert cl.wait_for("result", lambda m: m["valid"], timeout_s=15) is not None


def results_after(cl, t_ns, n, timeout_s=15.0):
    """The next ``n`` valid results captured after ``t_ns`` plus a settling margin (the
    scene change reaches the simulated camera through the world bus)."""
    after = t_ns + 300_000_000
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        r = cl.wait_for("result", lambda m: m["valid"] and m["t_capture_ns"] > after,
                        timeout_s=max(0.1, deadline - time.monotonic()))
        if r is not None:
            got.append(r)
    assert len(got) == n, f"only {len(got)} of {n} results"
    return got


@pytest.mark.e2e
def test_dark_through_the_cart(client):
    r = client.call("calibrate.dark", {"frames": 8}, timeout_s=20)
    assert abs(r["mean_counts"] - 16) < 4  # the sim's black level, through the blocked filter
    assert r["id"].startswith("dark-10000-1-")
    st = client.call("calibrate.status")
    assert st["dark_in_use"] == r["id"] and st["calibration_id"].endswith(f"|d:{r['id']}")
    assert client.call("status")["filter"]["position"] == 1  # back at the emission filter


@pytest.mark.e2e
def test_flat_field_through_the_cart_restores_sbr_and_results_carry_the_id(client, cart):
    client.call("roi.set", {"signal": SIGNAL_ROI, "background": BACKGROUND_ROI})
    client.call("sim.set", {"illumination": GAUSSIAN})
    refused = client.request("calibrate.flat", {"pairs": 4})
    assert refused["error"]["code"] == "WRONG_STATE"
    emit_and_acquire(client)

    # the default phantom under uneven light, no flat field yet
    t0 = time.time_ns()
    uncorrected = results_after(client, t0, 8)
    before_id = client.call("calibrate.status")["calibration_id"]
    assert "|f:-|" in before_id

    # a uniform target under the same light: the flat field
    client.call("sim.set", {"phantom": UNIFORM_TARGET})
    results_after(client, time.time_ns(), 2)  # the uniform target is in view now
    flat = client.call("calibrate.flat", {"pairs": 16}, timeout_s=30)
    assert flat["width"] == WIDTH and flat["height"] == HEIGHT
    assert (cart.state_dir / "calibration" / flat["file"]).is_file()

    # the default phantom again: corrected now
    client.call("sim.set", {"phantom": default_phantom()})
    corrected = results_after(client, time.time_ns(), 10)
    cal_id = client.call("calibrate.status")["calibration_id"]
    assert f"|f:{flat['id']}|" in cal_id
    assert all(r["calibration_id"] == cal_id and r["flat_field_applied"] for r in corrected)
    assert all(r["calibration_id"] == before_id for r in uncorrected)

    sbr_flat = statistics.mean(r["sbr"] for r in corrected)
    sbr_raw = statistics.mean(r["sbr"] for r in uncorrected)
    assert sbr_flat == pytest.approx(4.0, rel=0.03), (sbr_flat, sbr_raw)
    assert abs(sbr_raw - 4.0) > 0.5 * 4.0  # the uncorrected SBR is far off under Gaussian light
    client.call("acquire.stop")
    client.call("disarm")


@pytest.mark.e2e
def test_daily_qc_passes_then_fails_when_the_target_changes(client, cart):
    client.call("roi.set", {"signal": SIGNAL_ROI, "background": BACKGROUND_ROI})
    emit_and_acquire(client)
    results_after(client, time.time_ns(), 2)
    base = client.call("qc.baseline", {"results": 8}, timeout_s=20)
    assert base["sbr"] > 1.0 and base["intensity"] > 0
    ok = client.call("qc.run", {"results": 8}, timeout_s=20)
    assert ok["passed"], ok
    assert client.wait_for("event", lambda m: m["kind"] == "qc" and m["id"] == ok["id"], timeout_s=5)

    # the reference target's background brightens: SBR falls by about a sixth
    client.call("sim.set", {"phantom": default_phantom(background_nM=60.0)})
    results_after(client, time.time_ns(), 2)
    bad = client.call("qc.run", {"results": 8}, timeout_s=20)
    assert not bad["passed"] and not bad["sbr"]["ok"]
    assert bad["sbr"]["deviation"] < -0.05

    folder = cart.state_dir / "calibration"
    lines = [json.loads(x) for x in (folder / "qc.jsonl").read_text().splitlines()]
    assert [(x["id"], x["passed"]) for x in lines[-2:]] == [(ok["id"], True), (bad["id"], False)]
    audit = [json.loads(x) for x in (cart.state_dir / "audit.jsonl").read_text().splitlines()]
    assert [x["passed"] for x in audit if x["kind"] == "qc"][-2:] == [True, False]
    assert client.call("calibrate.status")["last_qc"]["id"] == bad["id"]
    client.call("acquire.stop")
    client.call("disarm")


@pytest.mark.e2e
def test_power_table_changes_the_duty_and_the_monitor_stays_consistent(client):
    def status_with(pred):
        s = client.wait_for("status", pred, timeout_s=5)
        assert s is not None, client.call("status")
        return s

    client.call("arm")
    status_with(lambda m: m["state"] == "ARMED")
    client.call("laser.on", {"power_mw": 50})
    nominal = status_with(lambda m: m["state"] == "EMITTING" and m["sim"]["laser_output_mw"] > 0)
    assert nominal["sim"]["laser_output_mw"] == pytest.approx(50.0, rel=0.01)
    refused = client.request("calibrate.power", {"points": [[0.0, 0.0], [0.8, 440.0]], "reason": "r"})
    assert refused["error"]["code"] == "WRONG_STATE"

    client.call("disarm")  # S6a: a new table only in SAFE, with the key cycled at the cart
    key_cycle_at_the_cart(client)
    # the power meter reads 10 % more than the module's rating; the monitor tap agrees
    r = client.call("calibrate.power", {"points": [[0.0, 0.0], [0.4, 220.0], [0.8, 440.0]],
                                        "photodiode_factor": 1.1, "reason": "power meter reads 10 % high"})
    try:
        client.call("arm")
        status_with(lambda m: m["state"] == "ARMED")
        client.call("laser.on", {"power_mw": 50})
        s = status_with(lambda m: m["state"] == "EMITTING"
                        and m["sim"]["laser_output_mw"] == pytest.approx(50.0 / 1.1, rel=0.01))
        assert s["laser"]["power_mw"] == pytest.approx(50.0, rel=0.1)
        # a second later: still emitting, no output-mismatch fault
        later = status_with(lambda m: m["t_ns"] > s["t_ns"] + 1_000_000_000)
        assert later["state"] == "EMITTING" and not later["faults"]
        assert client.call("calibrate.status")["calibration_id"].startswith(f"p:{r['id']}|")
    finally:
        client.call("disarm")
        # back to the simulator's true table for the tests that follow
        key_cycle_at_the_cart(client)
        client.call("calibrate.power", {"points": [[0.0, 0.0], [1.0, 500.0]], "reason": "back to the true table"})


# ---------------------------------------------------------------------- S6a: a service act
from nirf.controller.calibration import factory_violation  # noqa: E402
from nirf.hal.errors import NotPermitted  # noqa: E402

KINKED = SimpleNamespace(points=((0.0, 0.0), (0.5, 100.0), (1.0, 500.0)), photodiode_factor=1.0)


def test_the_band_is_checked_at_the_factory_breakpoints_too():
    # a straight line agrees with the kinked factory table at both ends and at every point of
    # its own, but is 150 mW off at the factory's breakpoint (limit 0.2 x 100 + 0.02 x 500)
    why = factory_violation((0.0, 1.0), (0.0, 500.0), 1.0, KINKED)
    assert why is not None and "at duty 0.5 " in why and "limit 30.00 mW" in why
    assert factory_violation((0.0, 0.5, 1.0), (0.0, 125.0, 500.0), 1.0, KINKED) is None


@pytest.mark.parametrize("delta,ok", [(0.0, True), (29.9, True), (30.1, False), (-29.9, True), (-30.1, False)])
def test_the_band_is_20_percent_plus_2_percent_of_full_scale(delta, ok):
    why = factory_violation((0.0, 0.5, 1.0), (0.0, 100.0 + delta, 500.0), 1.0, KINKED)
    assert (why is None) == ok


@pytest.mark.parametrize("factor,ok", [(1.0, True), (0.81, True), (1.19, True), (0.79, False), (1.21, False)])
def test_the_photodiode_factor_is_within_20_percent_of_the_factory_one(factor, ok):
    assert (factory_violation((0.0, 0.5, 1.0), (0.0, 100.0, 500.0), factor, KINKED) is None) == ok


def _refusal(svc, args, caller=CALLER):
    with pytest.raises(NirfErrorBase) as err:
        svc.power.command(args, caller, svc.cart)
    return err.value


from nirf.hal.errors import NirfError as NirfErrorBase  # noqa: E402

GOOD = {"points": [[0.0, 0.0], [1.0, 480.0]], "reason": "meter check"}


@pytest.mark.parametrize("case,args,code,needle", [
    ("attack", {"points": [[0.0, 0.0], [0.8, 40.0], [1.0, 50.0]], "photodiode_factor": 0.1, "reason": "x"},
     "INVALID_ARGUMENT", "exceeds the limit"),
    ("factor", {"points": [[0.0, 0.0], [1.0, 500.0]], "photodiode_factor": 1.5, "reason": "x"},
     "INVALID_ARGUMENT", "more than 20 %"),
    ("not monotonic", {"points": [[0.0, 0.0], [0.5, 260.0], [1.0, 250.0]], "reason": "x"},
     "INVALID_ARGUMENT", "must rise strictly"),
    ("no reason", {"points": [[0.0, 0.0], [1.0, 480.0]]}, "INVALID_ARGUMENT", "reason is required"),
    ("blank reason", {"points": [[0.0, 0.0], [1.0, 480.0]], "reason": "  "}, "INVALID_ARGUMENT", "reason is required"),
])
def test_a_table_outside_the_rules_is_refused_audited_and_changes_nothing(svc, case, args, code, needle):
    svc.rig.key_cycle()
    before = svc.cart.calibration
    err = _refusal(svc, args)
    assert err.code == code and needle in str(err)
    assert svc.cart.calibration is before
    assert not list(Path(svc.state_dir, "calibration").glob("power-*"))
    assert any(k == "calibration_refused" and f["code"] == code for k, f in svc.audit.items)


def test_the_service_conditions_are_refused_with_the_limit_named(svc):
    err = _refusal(svc, GOOD)  # no key cycle since start
    assert err.code == "WRONG_STATE" and "within the 60 s before the command" in str(err)
    svc.rig.key_cycle()
    svc.clock.advance(61.0)
    svc.rig.advance(0.02)
    assert "s ago" in str(_refusal(svc, GOOD))
    svc.rig.key_cycle()
    svc.rig.cart.arm()
    assert "only in SAFE" in str(_refusal(svc, GOOD))
    observer = SimpleNamespace(name="screen", role="observer")
    svc.rig.cart.disarm()
    err = _refusal(svc, GOOD, observer)
    assert isinstance(err, NotPermitted)


def test_a_tampered_stored_table_is_refused_at_connect_and_reported(svc):
    svc.rig.key_cycle()
    r = power(svc, dict(GOOD))
    # someone edits the stored file: the attack of issue 14
    path = svc.power.folder / r["file"]
    data = json.loads(path.read_text())
    data.update(duty=[0.0, 0.8, 1.0], power_mw=[0.0, 40.0, 50.0], photodiode_factor=0.1)
    path.write_text(json.dumps(data))
    svc2 = FakeService(svc.state_dir, started=False)
    cal2 = Calibration(svc2)
    svc2.rig.start()
    assert svc2.cart.calibration.calibration_id == "factory"
    assert cal2.current_id().startswith("p:factory|")
    problems = cal2.cmd_status({}, CALLER)["problems"]
    assert any(r["id"] in p and "refused" in p and "exceeds the limit" in p for p in problems)
