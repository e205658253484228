"""One contract per device kind, run against every implementation available: the
simulator's path always (over a loopback line and over a real pseudo-terminal with
pyserial), real hardware when its port is named in the environment, skipped otherwise.

Real hardware: NIRF_HW_MCU_PORT, NIRF_HW_WHEEL_PORT (serial device paths), NIRF_HW_GPIO=1,
NIRF_HW_CAMERA=1. Checks that would emit light run on hardware only with
NIRF_HW_ALLOW_EMISSION=1 (and the room prepared for a class 3B/4 laser).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from nirf.hal.camera import CameraSettings, Frame
from nirf.hal.clock import ManualClock, SystemClock
from nirf.hal.errors import DeviceRejected, InvalidArgument, WrongState
from nirf.hal.laser import LaserSource, LaserStatus
from nirf.sim.world import SensorModel, World
from nirf.sim.worldview import LocalWorldView

HW_EMISSION = os.environ.get("NIRF_HW_ALLOW_EMISSION") == "1"


def _serial(port_path):
    import serial

    return lambda: serial.Serial(port_path, 115200, timeout=0.05)


# ============================================================================ laser source
@pytest.fixture(params=["loopback", "pty", "hardware"])
def laser(request):
    from nirf.drivers.laser_mcu import McuLaser
    from nirf.sim.mcu_emulator import McuEmulator
    from nirf.sim.serial_link import LoopbackSerial, PtyLink

    kind = request.param
    link = None
    world = None
    if kind == "loopback":
        clock = ManualClock()
        world = World(clock)
        mcu = McuEmulator(world, clock, duty_ceiling=0.8)
        drv = McuLaser(lambda: LoopbackSerial(mcu, clock, timeout=0.05), clock=clock, timeout_s=0.05)
    elif kind == "pty":
        world = World(SystemClock())
        mcu = McuEmulator(world, SystemClock(), duty_ceiling=0.8)
        link = PtyLink(mcu, "mcu").start()
        drv = McuLaser(_serial(link.port))
    else:
        port = os.environ.get("NIRF_HW_MCU_PORT")
        if not port:
            pytest.skip("no laser MCU attached (set NIRF_HW_MCU_PORT)")
        drv = McuLaser(_serial(port))
    drv.connect()
    drv.world = world
    drv.kind = kind
    yield drv
    drv.close()
    if link:
        link.stop()


def test_laser_is_off_right_after_connect(laser: LaserSource):
    st = laser.status()
    assert isinstance(st, LaserStatus)
    assert st.output_on is False
    if laser.world is not None:
        assert laser.world.laser_output_mw() == 0.0


def test_laser_identity_and_status_fields(laser):
    assert laser.identity()
    st = laser.status()
    assert 0.0 <= st.duty <= 1.0 and 0.0 < st.duty_ceiling <= 1.0
    assert isinstance(st.interlock_closed, bool) and isinstance(st.key_on, bool)
    assert -20 < st.temp_c < 100
    laser.heartbeat()


def test_laser_rejects_duty_outside_range_and_above_ceiling(laser):
    with pytest.raises(InvalidArgument):
        laser.set_duty(1.5, 0.0)
    with pytest.raises(InvalidArgument):
        laser.set_duty(float("nan"), 0.0)
    ceiling = laser.status().duty_ceiling
    if ceiling < 1.0:
        with pytest.raises(DeviceRejected):
            laser.set_duty(min(1.0, ceiling + 0.05), 0.0)
        assert laser.status().duty <= ceiling


def test_laser_enable_emits_and_force_off_stops(laser):
    if laser.kind == "hardware" and not HW_EMISSION:
        pytest.skip("emission on real hardware needs NIRF_HW_ALLOW_EMISSION=1")
    expected_mw = laser.factory().mw_at(0.1)
    laser.set_duty(0.1, expected_mw)
    laser.set_enabled(True, expected_mw)
    assert laser.status().output_on
    laser.force_off()
    st = laser.status()
    assert not st.output_on
    if laser.world is not None:
        assert laser.world.laser_output_mw() == 0.0


def test_laser_frame_timing_reports_frames(laser):
    laser.start_frames(50.0, 5000, modulate=False)
    deadline = time.monotonic() + 5.0
    tags = []
    while len(tags) < 3 and time.monotonic() < deadline:
        if laser.kind == "loopback":
            laser.clock.advance(0.02)
        else:
            time.sleep(0.02)
        tags += laser.poll()[0]
    laser.stop_frames()
    assert len(tags) >= 3
    counters = [t.counter for t in tags]
    assert counters == sorted(counters)


# ============================================================================ filter wheel
@pytest.fixture(params=["loopback", "pty", "hardware"])
def wheel(request):
    from nirf.drivers.fw102c import Fw102cWheel
    from nirf.sim.fw102c_emulator import Fw102cEmulator
    from nirf.sim.serial_link import LoopbackSerial, PtyLink

    kind = request.param
    link = None
    if kind == "loopback":
        clock = ManualClock()
        emu = Fw102cEmulator(World(clock), clock, step_s=0.3)
        drv = Fw102cWheel(lambda: LoopbackSerial(emu, clock, timeout=0.05), clock=clock)
    elif kind == "pty":
        emu = Fw102cEmulator(World(SystemClock()), SystemClock(), step_s=0.02)
        link = PtyLink(emu, "wheel").start()
        drv = Fw102cWheel(_serial(link.port))
    else:
        port = os.environ.get("NIRF_HW_WHEEL_PORT")
        if not port:
            pytest.skip("no filter wheel attached (set NIRF_HW_WHEEL_PORT)")
        drv = Fw102cWheel(_serial(port))
    drv.connect()
    yield drv
    drv.close()
    if link:
        link.stop()


def test_wheel_reports_identity_and_positions(wheel):
    assert "FW" in wheel.identity().upper()
    assert wheel.position_count() in (6, 12)
    assert 1 <= wheel.position() <= wheel.position_count()


def test_wheel_moves_and_verifies(wheel):
    start = wheel.position()
    for target in (3, 2, 1):
        assert wheel.move(target) == target
        assert wheel.position() == target
    wheel.move(start)


@pytest.mark.parametrize("bad", [0, 7, -1, "2", 2.0, True])
def test_wheel_refuses_positions_that_do_not_exist(wheel, bad):
    with pytest.raises(InvalidArgument):
        wheel.move(bad)


# ============================================================================ safety I/O
@pytest.fixture(params=["standin", "hardware"])
def gpio_io(request):
    from nirf.drivers.gpio import GpioSafetyIO, import_rpi_gpio
    from nirf.sim.gpio_standin import GpioStandIn

    pins = {"key": 17, "interlock": 27, "footswitch": 22, "indicator": 23, "white_light": 24}
    if request.param == "standin":
        world = World(SystemClock())
        module = GpioStandIn(LocalWorldView(world), pins)
    else:
        if os.environ.get("NIRF_HW_GPIO") != "1":
            pytest.skip("not on the cart (set NIRF_HW_GPIO=1)")
        module = import_rpi_gpio()
    io = GpioSafetyIO(module, pins, debounce_ms=5)
    yield io
    io.close()


def test_gpio_reads_are_booleans(gpio_io):
    for value in (gpio_io.key_on(), gpio_io.interlock_closed(), gpio_io.footswitch_pressed()):
        assert isinstance(value, bool)


def test_gpio_indicator_reads_back(gpio_io):
    assert gpio_io.emission_indicator() is False  # off after construction
    gpio_io.set_emission_indicator(True)
    assert gpio_io.emission_indicator() is True
    gpio_io.set_emission_indicator(False)
    assert gpio_io.emission_indicator() is False
    gpio_io.set_white_light(True)
    gpio_io.set_white_light(False)


# ============================================================================ camera
class _Triggers:
    """Stands in for the MCU's trigger output: triggers at a fixed rate on the system clock."""

    def __init__(self, world: World, fps: float):
        self.world, self.period = world, 1.0 / fps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        n = 0
        while not self._stop.wait(self.period):
            self.world.trigger(n, time.time_ns(), n % 2 == 0)
            n += 1

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2)


@pytest.fixture(params=["standin-pi4", "standin-pi5", "hardware"])
def camera(request):
    from nirf.drivers.camera import PiCamera, picamera2_factory
    from nirf.sim.picamera2_standin import Picamera2StandIn

    triggers = None
    if request.param.startswith("standin"):
        world = World(SystemClock(), SensorModel(width=256, height=192))
        world.apply({"camera_platform": request.param.removeprefix("standin-")})
        view = LocalWorldView(world)
        cam = PiCamera(lambda: Picamera2StandIn(view), stall_timeout_s=2.0)
        triggers = _Triggers(world, 30.0)
    else:
        if os.environ.get("NIRF_HW_CAMERA") != "1":
            pytest.skip("not on the cart (set NIRF_HW_CAMERA=1)")
        cam = PiCamera(picamera2_factory, stall_timeout_s=2.0)
    yield cam
    cam.close()
    if triggers:
        triggers.stop()


def test_camera_lifecycle_and_frames(camera):
    applied = camera.configure(CameraSettings(5000, 1.0, 256, 192))
    assert applied.exposure_us == 5000 and applied.gain == 1.0
    camera.start()
    try:
        with pytest.raises(WrongState):
            camera.configure(CameraSettings(6000, 1.0, 256, 192))
        frames = [camera.capture(timeout_s=3.0) for _ in range(3)]
    finally:
        camera.stop()
    for f in frames:
        assert isinstance(f, Frame)
        assert f.data.dtype == np.uint16 and f.data.shape == (192, 256)
        assert int(f.data.max()) <= f.full_scale
        assert f.meta.exposure_us == 5000
        assert abs(f.meta.t_end_ns - time.time_ns()) < 10e9  # wall clock, not a sensor clock
        assert f.meta.t_end_ns >= f.meta.t_start_ns
    assert [f.meta.seq for f in frames] == sorted(f.meta.seq for f in frames)


# ============================================================================ conformance
def test_conformance_table_names_only_tests_that_exist():
    """docs/conformance.md: every test it cites is defined in the file it names."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "conformance.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| [CAWG]\d+ \|", line)]
    assert len(rows) >= 30
    sources = {p.name: p.read_text() for p in (root / "tests").glob("test_*.py")}
    for row in rows:
        cells = row.split("|")
        assert len(cells) >= 5 and cells[3].strip() and cells[4].strip(), row
        current = None
        for token in re.findall(r"(test_\w+\.py)|(test_\w+)", cells[4]):
            if token[0]:
                current = token[0]
                assert current in sources, f"{row[:12]}: no tests/{current}"
            else:
                assert current, f"{row[:12]}: {token[1]} without a file"
                assert re.search(rf"def {token[1]}\b", sources[current]), \
                    f"{row[:12]}: {current} has no {token[1]}"
