"""``nirfctl doctor``: each check passes on a healthy probe and fails, naming the fix, on
the fault it exists for. The camera checks run on frames the picamera2 stand-in delivers
as a Pi 4 and as a Pi 5."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from nirf.services.cli import doctor
from nirf.services.cli.doctor import CameraSample, Probe
from nirf.sim.picamera2_standin import Picamera2StandIn
from nirf.sim.world import SensorModel, World
from nirf.hal.clock import SystemClock
from nirf.sim.worldview import LocalWorldView


def cfg(black_level=16, bits=10):
    return SimpleNamespace(
        profile="device",
        laser=SimpleNamespace(port="/dev/nirf/laser"),
        filter_wheel=SimpleNamespace(port="/dev/nirf/wheel"),
        camera=SimpleNamespace(bits=bits, black_level=black_level, colour=False,
                               exposure_us=10_000, fps=30.0))


class FakeProbe(Probe):
    """A healthy Pi unless told otherwise."""

    def __init__(self, **faults):
        super().__init__(user="nirf", environ={"LG_WD": "/run/nirf"})
        self.faults = faults

    def groups(self):
        return {"nirf", "dialout", "gpio", "video"} - set(self.faults.get("no_groups", ()))

    def glob(self, pattern):
        if pattern == "/.lgd-nfy*":
            return ["/.lgd-nfy0"] if self.faults.get("fifo_in_root") else []
        if pattern in self.faults.get("no_nodes", ()):
            return []
        return [pattern.replace("*", "0")]

    def access_rw(self, path):
        return path not in self.faults.get("denied", ())

    def realpath(self, path):
        return None if path in self.faults.get("missing_ports", ()) else "/dev/ttyUSB0"

    def writable_dir(self, path):
        return not self.faults.get("lgwd_readonly")

    def clock_synchronised(self):
        return self.faults.get("synced", True)

    def camera_sample(self):
        raise RuntimeError("no camera here")


@pytest.mark.parametrize("check,faults,words", [
    (doctor.check_groups, {"no_groups": ["video"]}, "usermod"),
    (doctor.check_device_nodes, {"no_nodes": ["/dev/dma_heap/*"]}, "/dev/dma_heap"),
    (doctor.check_device_nodes, {"denied": ["/dev/media0"]}, "access"),
    (doctor.check_udev_names, {"missing_ports": ["/dev/nirf/wheel"]}, "99-nirf.rules"),
    (doctor.check_lgpio_dir, {"lgwd_readonly": True}, "LG_WD"),
    (doctor.check_lgpio_dir, {"fifo_in_root": True}, "/.lgd-nfy0"),
    (doctor.check_clock, {"synced": False}, "not synchronised"),
])
def test_system_checks_pass_when_healthy_and_fail_on_their_fault(check, faults, words):
    assert check(FakeProbe(), cfg()).ok is True
    result = check(FakeProbe(**faults), cfg())
    assert result.ok is False and words in result.detail


def test_a_camera_that_cannot_be_sampled_is_skipped_not_crashed():
    results = doctor.run_checks(FakeProbe(), cfg())
    camera = [r for r in results if r.name == "camera"]
    assert camera and camera[0].ok is None and "no camera here" in camera[0].detail


class Triggers:
    """The MCU's part: triggers the world at ``fps`` with a pulse, on the system clock."""

    def __init__(self, world):
        self.world = world
        self._stop = threading.Event()
        self._thread = None

    def start(self, pulse_us, fps):
        def run():
            n, t0 = 0, time.time_ns()
            while not self._stop.is_set():
                t = t0 + int(n * 1e9 / fps)
                delay = (t - time.time_ns()) / 1e9
                if delay > 0 and self._stop.wait(delay):
                    return
                self.world.trigger(n, t, False, pulse_us)
                n += 1
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)


@pytest.mark.parametrize("platform,fmt", [("pi4", "R10"), ("pi5", "R16")])
def test_camera_checks_on_the_stand_in(platform, fmt):
    world = World(SystemClock(), SensorModel(width=128, height=96))
    world.apply({"camera_platform": platform, "ambient_e_per_ms": 0.0})
    cam = Picamera2StandIn(LocalWorldView(world), seed=3)
    triggers = Triggers(world)
    try:
        sample = doctor.sample_with_picamera2(cam, triggers.start, triggers.stop, raw_format="R10",
                                              exposure_us=10_000, fps=30.0, frames=4)
    finally:
        cam.close()
    assert sample.raw_format == fmt and sample.platform == platform
    assert doctor.check_raw_format(sample, cfg()).ok is True
    # the sim sensor's black level is 16: right with 16, wrong with the IMX296's 60
    good = doctor.check_black_level(sample, cfg(black_level=16))
    assert good.ok is True and abs(good.values["measured"] - 16) < 2
    bad = doctor.check_black_level(sample, cfg(black_level=60))
    assert bad.ok is False and "60" in bad.detail
    trig = doctor.check_trigger(sample, cfg())
    assert trig.ok is True, trig.detail
    assert trig.values["exposure_from_pulse_us"] == pytest.approx(10_000.26)


def synthetic(fmt="R10", values=(16,), intervals_us=(33_333, 33_333), exposure_md=10_000):
    frames = [np.full((4, 4), v, dtype=np.uint16) for v in values]
    stamps = np.cumsum([1_000_000_000, *[int(i * 1000) for i in intervals_us]])
    md = [{"SensorTimestamp": int(t), "ExposureTime": exposure_md} for t in stamps]
    return CameraSample(fmt, "", frames, md, 1e6 / 30, 9_986, 10_000)


@pytest.mark.parametrize("sample,words", [
    (synthetic(fmt="R10_CSI2P"), "packed"),
    (synthetic(fmt="R16", values=(16 << 6 | 1,)), "low 6 bits"),
    (synthetic(fmt="R10", values=(16 << 6,)), "left-aligned data"),
    (synthetic(fmt="R12"), "expected R10 or R16"),
])
def test_raw_format_check_fails_on_what_the_driver_would_misread(sample, words):
    result = doctor.check_raw_format(sample, cfg())
    assert result.ok is False and words in result.detail


def test_trigger_check_sees_a_free_running_sensor_and_a_clipped_exposure():
    assert doctor.check_trigger(synthetic(intervals_us=(33_333, 66_667)), cfg()).ok is True  # a drop
    free = doctor.check_trigger(synthetic(intervals_us=(16_667, 16_667)), cfg())
    assert free.ok is False and "trigger_mode=1" in free.detail
    clipped = doctor.check_trigger(synthetic(exposure_md=8_000), cfg())
    assert clipped.ok is False and "FrameDurationLimits" in clipped.detail


def test_nirfctl_doctor_exit_code_and_json(capsys):
    import json

    args = SimpleNamespace(json=True, no_camera=False)
    assert doctor.doctor_command(args, cfg(), probe=FakeProbe()) == 0  # camera skipped only
    out = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in out} >= {"groups", "device_nodes", "udev_names", "lgpio_dir", "clock"}
    assert doctor.doctor_command(args, cfg(), probe=FakeProbe(synced=False)) == 1


def test_nirfctl_has_the_doctor_command(capsys):
    from nirf.services.cli.main import main

    code = main(["--config", "sim", "doctor", "--no-camera"])
    assert code in (0, 1)
    out = capsys.readouterr().out
    assert "groups" in out and "lgpio_dir" in out


def test_the_cart_sampler_with_the_emulators_behind_its_ports(monkeypatch):
    """The Pi glue itself: the wheel turns to the blocked slot, the MCU triggers dark frames
    with the laser off, picamera2 (here the stand-in, as a Pi 5) delivers them."""
    import nirf.drivers.camera
    from nirf.sim.fw102c_emulator import Fw102cEmulator
    from nirf.sim.mcu_emulator import McuEmulator
    from nirf.sim.serial_link import PtyLink

    clock = SystemClock()
    world = World(clock, SensorModel(width=128, height=96))
    world.apply({"camera_platform": "pi5"})
    mcu = PtyLink(McuEmulator(world, clock), "mcu").start()
    wheel = PtyLink(Fw102cEmulator(world, clock, step_s=0.01), "wheel").start()
    cams = []

    def factory(index=0):
        cams.append(Picamera2StandIn(LocalWorldView(world), seed=5))
        return cams[-1]

    monkeypatch.setattr(nirf.drivers.camera, "picamera2_factory", factory)
    c = cfg(black_level=16)
    c.laser = SimpleNamespace(port=mcu.port, baudrate=115200)
    c.filter_wheel = SimpleNamespace(port=wheel.port, baudrate=115200, blocked_position=3)
    try:
        sample = doctor.cart_camera_sampler(c)()
    finally:
        mcu.stop()
        wheel.stop()
    assert world.filter_position == 3
    assert world.laser_output_mw() == 0.0
    assert sample.raw_format == "R16" and sample.platform == "pi5"
    assert len(sample.frames) == 6 and cams and not cams[0].is_open
    for check in (doctor.check_raw_format, doctor.check_black_level, doctor.check_trigger):
        result = check(sample, c)
        assert result.ok is True, (result.name, result.detail)
