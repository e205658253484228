"""The camera driver (drivers.camera.PiCamera) against the picamera2 stand-in
(sim.picamera2_standin), the stand-in itself, and the driver's error paths with fakes.

The world, the stand-in and the driver share one ManualClock: the test sets the laser and
triggers exposures at explicit times, and the stand-in's waits advance the clock, so
nothing depends on how fast this machine is.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from nirf.drivers.camera import PiCamera, imx296_trigger_hook, picamera2_factory
from nirf.hal.camera import CameraSettings
from nirf.hal.clock import ManualClock
from nirf.hal.errors import CameraStall, DeviceError, InvalidArgument, WrongState
from nirf.services.common.framering import FrameRing, slot_of
from nirf.sim.picamera2_standin import MappedArray, Picamera2StandIn, Platform
from nirf.sim.world import SensorModel, World
from nirf.sim.worldview import LocalWorldView

WIDTH, HEIGHT = 72, 48  # 144-byte rows: the stand-in pads them to 192
EXPOSURE_US = 10_000
BLACK = 16


class FakeRenderer:
    """Encodes what it was asked for in the frame: every pixel is black + round(laser_mw),
    except pixel (0, 0), which is at full scale (to check bit alignment)."""

    def __init__(self, sensor: SensorModel):
        self.sensor = sensor
        self.calls: list[tuple[float, int, float]] = []

    def render(self, scene, laser_mw, exposure_us, gain, out=None):
        self.calls.append((laser_mw, exposure_us, gain))
        value = min(BLACK + int(round(laser_mw)), (1 << self.sensor.bits) - 1)
        frame = np.full((self.sensor.height, self.sensor.width), value, dtype=np.uint16)
        frame[0, 0] = (1 << self.sensor.bits) - 1
        return frame


class Rig:
    """World + view + stand-in factory + driver on one manual clock."""

    def __init__(self, *, pi5=False, mono=True, hide_platform=False, platform=None,
                 real_renderer=False, **driver_kwargs):
        self.clock = ManualClock()
        self.sensor = SensorModel(width=WIDTH, height=HEIGHT)
        self.world = World(self.clock, self.sensor)
        if platform is not None:
            # As a test of the whole cart does it: sim.set {"camera_platform": ...}
            self.world.apply({"camera_platform": platform})
        self.view = LocalWorldView(self.world)
        # None: the stand-in's own FrameRenderer (the simulator's physics)
        self.renderer = None if real_renderer else FakeRenderer(self.sensor)
        self.cameras: list[Picamera2StandIn] = []
        self._pi5 = pi5
        self._mono = mono
        self._hide_platform = hide_platform
        driver_kwargs.setdefault("stall_timeout_s", 0.3)
        self.driver = PiCamera(self.factory, clock=self.clock, **driver_kwargs)

    def factory(self) -> Picamera2StandIn:
        cam = Picamera2StandIn(self.view, renderer=self.renderer, clock=self.clock,
                               left_aligned=self._pi5, mono=self._mono)
        if self._hide_platform:
            cam.platform = None
        self.cameras.append(cam)
        return cam

    @property
    def camera(self) -> Picamera2StandIn:
        return self.cameras[-1]

    def start(self, exposure_us=EXPOSURE_US, gain=2.0):
        self.driver.configure(CameraSettings(exposure_us=exposure_us, gain=gain,
                                             width=WIDTH, height=HEIGHT))
        self.driver.start()

    def expose(self, counter: int, *, laser_mw: float = 0.0, off_after_us: int | None = None,
               lit: bool = True) -> int:
        """Trigger one exposure 1 ms from now with the laser at ``laser_mw`` from its start
        (off again after ``off_after_us`` if given). Returns the exposure start (wall ns)."""
        t0 = self.clock.time_ns() + 1_000_000
        self.world.set_laser_drive(laser_mw, t0)
        if off_after_us is not None:
            self.world.set_laser_drive(0.0, t0 + off_after_us * 1000)
        self.world.trigger(counter, t0, lit)
        return t0

    def close(self):
        self.driver.close()
        for cam in self.cameras:
            cam.close()


@pytest.fixture(params=["pi4", "pi5"])
def rig(request):
    """Every test taking ``rig`` runs as on a Pi 4 and as on a Pi 5 (sim.set
    camera_platform)."""
    r = Rig(platform=request.param)
    yield r
    r.close()


def wait_for(predicate, timeout_s=5.0):
    """Wait (real time, bounded) for a condition another thread makes true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


# -- frames and metadata -----------------------------------------------------------------


def test_frame_arrives_with_metadata_and_is_released(rig):
    rig.start(exposure_us=EXPOSURE_US, gain=2.0)
    t0 = rig.expose(0, laser_mw=100.0)
    frame = rig.driver.capture(timeout_s=2.0)

    assert frame.data.dtype == np.uint16
    assert frame.data.shape == (HEIGHT, WIDTH)
    assert frame.meta.seq == 0
    assert frame.meta.exposure_us == EXPOSURE_US
    assert frame.meta.gain == pytest.approx(2.0)
    assert (frame.meta.width, frame.meta.height) == (WIDTH, HEIGHT)
    assert frame.meta.frame_duration_us > 0
    # The renderer saw the exposure and gain set through the driver, and a fully lit frame.
    assert rig.renderer.calls[-1] == (pytest.approx(100.0), EXPOSURE_US, pytest.approx(2.0))
    assert int(frame.data[HEIGHT // 2, WIDTH // 2]) == BLACK + 100
    # Copied out and handed back: the camera holds no request for us.
    assert rig.camera.outstanding_requests == 0
    # Manual exposure, set before start.
    assert rig.camera.camera_configuration()["controls"]["AeEnable"] is False
    assert t0 <= frame.meta.t_end_ns


@pytest.mark.parametrize("platform", ["pi4", "pi5"])
@pytest.mark.parametrize("into_ring", [True, False])
def test_a_frame_read_in_place_is_copied_once_and_outlives_its_camera_buffer(tmp_path, platform, into_ring):
    # As in the cart: the raw buffer read in place (MappedArray), the frame's one copy made
    # by the driver (into a ring slot when there is an allocator) before the request goes
    # back; the stand-in then writes later frames into that same buffer, as libcamera does.
    ring = FrameRing(tmp_path / "frames.ring", WIDTH * HEIGHT * 2, slots=4) if into_ring else None
    r = Rig(platform=platform, mapped_array=MappedArray, allocator=ring.allocate if ring else None)
    try:
        r.start()
        r.expose(0, laser_mw=100.0)
        kept = r.driver.capture(timeout_s=2.0)
        for n in range(1, 6):
            r.expose(n, laser_mw=10.0 * n)
            later = r.driver.capture(timeout_s=2.0)
            assert int(later.data[5, 5]) == BLACK + 10 * n
        assert r.camera.buffers_reused >= 4  # the kept frame's camera buffer was written again ...
        assert int(kept.data[5, 5]) == BLACK + 100 and int(kept.data[0, 0]) == (1 << r.sensor.bits) - 1
        assert (slot_of(kept.data) is not None) == into_ring  # ... but the frame is its own copy
        assert r.driver.copies_into_allocated == (6 if into_ring else 0)
        assert r.driver.frames_copied == 6 and r.driver.copy_cpu_s > 0.0  # the copy's CPU, for the benchmark
        assert r.camera.outstanding_requests == 0
    finally:
        r.close()
        if ring is not None:
            ring.close()


def test_sequence_numbers_and_frame_duration(rig):
    rig.start()
    starts = []
    frames = []
    for n in range(3):
        starts.append(rig.expose(n, laser_mw=10.0 * n))
        frames.append(rig.driver.capture(timeout_s=2.0))
    assert [f.meta.seq for f in frames] == [0, 1, 2]
    assert [int(f.data[5, 5]) for f in frames] == [BLACK, BLACK + 10, BLACK + 20]
    # FrameDuration is the trigger period.
    assert frames[2].meta.frame_duration_us == (starts[2] - starts[1]) // 1000


def test_times_are_converted_to_wall_clock(rig):
    rig.start()
    t0 = rig.expose(0, laser_mw=5.0)
    frame = rig.driver.capture(timeout_s=2.0)
    meta = frame.meta
    # The exposure window comes back on the wall clock the trigger was given on.
    assert abs(meta.t_start_ns - t0) < 10_000
    assert meta.t_end_ns - meta.t_start_ns == EXPOSURE_US * 1000
    assert meta.t_end_ns <= rig.clock.time_ns()
    # The sensor's own timestamp is on the monotonic clock, far from the wall clock.
    mono_end_ns = meta.t_end_ns - (rig.clock.time_ns() - int(rig.clock.monotonic() * 1e9))
    assert abs(meta.sensor_timestamp_ns - mono_end_ns) < 10_000
    assert abs(meta.sensor_timestamp_ns - meta.t_end_ns) > 10**15


def test_wall_clock_conversion_with_the_system_clock():
    """Real clocks: the wall time of the exposure survives the trip through the sensor's
    monotonic timestamps (to well within a frame)."""
    from nirf.hal.clock import SystemClock

    clock = SystemClock()
    sensor = SensorModel(width=WIDTH, height=HEIGHT)
    world = World(clock, sensor)
    view = LocalWorldView(world)
    cams = []

    def factory():
        cams.append(Picamera2StandIn(view, renderer=FakeRenderer(sensor), clock=clock))
        return cams[-1]

    driver = PiCamera(factory, clock=clock, stall_timeout_s=5.0)
    try:
        driver.configure(CameraSettings(exposure_us=1000, width=WIDTH, height=HEIGHT))
        driver.start()
        t0 = time.time_ns()
        world.trigger(0, t0, False)
        frame = driver.capture()
        assert abs(frame.meta.t_start_ns - t0) < 20_000_000
        assert frame.meta.t_end_ns - frame.meta.t_start_ns == 1_000_000
        age_ns = time.time_ns() - frame.meta.t_end_ns
        assert abs(frame.meta.sensor_timestamp_ns - (time.monotonic_ns() - age_ns)) < 20_000_000
    finally:
        driver.close()


def test_half_lit_exposure_gives_half_the_mean_power(rig):
    rig.start(exposure_us=EXPOSURE_US)
    rig.expose(0, laser_mw=200.0, off_after_us=EXPOSURE_US // 2)
    frame = rig.driver.capture(timeout_s=2.0)
    assert rig.renderer.calls[-1][0] == pytest.approx(100.0, rel=1e-6)
    assert int(frame.data[10, 10]) == BLACK + 100


# -- rendered as the exposure starts ---------------------------------------------------------


def expected_mean_counts(r, laser_mw: float, exposure_us: int, gain: float) -> float:
    """The physics' noise-free mean of the frame (sim.render), independent of the stand-in
    (the powers used stay below saturation, so no pixel is clipped)."""
    from nirf.sim.render import FrameRenderer
    return float(FrameRenderer(r.sensor).expected_counts(r.world.scene(), laser_mw, exposure_us, gain).mean())


@pytest.mark.parametrize("pi5", [False, True])
def test_a_frame_rendered_as_its_exposure_starts_is_kept_when_nothing_changed(pi5):
    r = Rig(real_renderer=True, pi5=pi5)
    try:
        r.start(exposure_us=EXPOSURE_US, gain=1.0)
        r.expose(0, laser_mw=40.0)
        frame = r.driver.capture(timeout_s=2.0)
        assert (r.camera.frames_rendered_early, r.camera.frames_rendered_again) == (1, 0)
        want = expected_mean_counts(r, 40.0, EXPOSURE_US, 1.0)
        assert float(frame.data.mean()) == pytest.approx(want, rel=0.01)
    finally:
        r.close()


def test_light_reported_after_the_early_render_makes_the_frame_rendered_again():
    """The hardware reports the laser turning off half way through the exposure only after
    the stand-in began rendering (the report is late): the frame must show what happened,
    half the light, not what was assumed."""
    r = Rig(real_renderer=True)
    try:
        r.start(exposure_us=EXPOSURE_US, gain=1.0)
        cam = r.camera
        wait = cam._wait_until_world
        late = {}

        def late_report(t_wall_ns):
            if not late:  # once: between the early render and the end of the exposure
                late["t"] = t0 + EXPOSURE_US * 500
                r.world.set_laser_drive(0.0, late["t"])
            return wait(t_wall_ns)

        cam._wait_until_world = late_report
        t0 = r.expose(0, laser_mw=40.0)
        frame = r.driver.capture(timeout_s=2.0)
        assert late, "the late report was not injected"
        assert (cam.frames_rendered_early, cam.frames_rendered_again) == (0, 1)
        half = expected_mean_counts(r, 20.0, EXPOSURE_US, 1.0)
        full = expected_mean_counts(r, 40.0, EXPOSURE_US, 1.0)
        assert abs(full - half) > 20  # the two are told apart
        assert float(frame.data.mean()) == pytest.approx(half, rel=0.01)
    finally:
        r.close()


def test_a_moving_scene_is_rendered_once_at_the_end():
    r = Rig(real_renderer=True)
    try:
        r.world.apply({"motion_px": 2})
        r.start(exposure_us=EXPOSURE_US, gain=1.0)
        r.expose(0, laser_mw=40.0)
        r.driver.capture(timeout_s=2.0)
        assert (r.camera.frames_rendered_early, r.camera.frames_rendered_again) == (0, 0)
    finally:
        r.close()


def test_laser_after_the_window_does_not_leak_in(rig):
    rig.start(exposure_us=EXPOSURE_US)
    t0 = rig.clock.time_ns() + 1_000_000
    rig.world.set_laser_drive(0.0, t0)
    # The laser comes on 1 ms after the exposure ended (but before the margin ran out).
    rig.world.set_laser_drive(300.0, t0 + EXPOSURE_US * 1000 + 1_000_000)
    rig.world.trigger(0, t0, False)
    frame = rig.driver.capture(timeout_s=2.0)
    assert rig.renderer.calls[-1][0] == pytest.approx(0.0)
    assert int(frame.data[10, 10]) == BLACK


# -- bit alignment -----------------------------------------------------------------------


def test_left_aligned_raw_is_undone_from_the_platform():
    r = Rig(pi5=True)
    try:
        r.start()
        assert r.camera.platform is Platform.PISP
        r.expose(0, laser_mw=50.0)
        frame = r.driver.capture(timeout_s=2.0)
        assert r.driver.left_aligned
        assert int(frame.data.max()) <= frame.full_scale == 1023
        assert int(frame.data[0, 0]) == 1023
        assert int(frame.data[7, 7]) == BLACK + 50
    finally:
        r.close()


@pytest.mark.parametrize("mono,asked,delivered", [(True, "R10", "R16"),
                                                  (False, "SRGGB10", "SRGGB16")])
def test_pi5_turns_unpacked_10_bit_into_16_bit_and_the_driver_takes_it(mono, asked, delivered):
    """libcamera's PiSP pipeline (pisp.cpp, platformValidate) signals any unpacked raw
    request that is not 16-bit as 16-bit unpacked; the values are left-aligned."""
    r = Rig(platform="pi5", mono=mono, colour=not mono, raw_format=asked)
    try:
        r.start()
        assert r.camera.camera_configuration()["raw"]["format"] == delivered
        r.expose(0, laser_mw=50.0)
        frame = r.driver.capture(timeout_s=2.0)
        assert r.driver.left_aligned
        value = BLACK + 50 if mono else 4 * (BLACK + 50)
        assert int(frame.data[6, 6]) == value
        assert int(frame.data.max()) <= frame.full_scale
    finally:
        r.close()


def test_pi4_keeps_the_10_bit_format():
    r = Rig(platform="pi4")
    try:
        r.start()
        assert r.camera.camera_configuration()["raw"]["format"] == "R10"
        assert not r.driver.left_aligned
    finally:
        r.close()


def test_platform_follows_sim_set_at_the_next_configure():
    r = Rig(platform="pi4")
    try:
        r.start()
        assert r.camera.platform is Platform.VC4
        r.driver.stop()
        r.world.apply({"camera_platform": "pi5"})
        r.start()
        assert r.camera.platform is Platform.PISP
        assert r.driver.left_aligned
        r.expose(0, laser_mw=8.0)
        assert int(r.driver.capture(timeout_s=2.0).data[4, 4]) == BLACK + 8
    finally:
        r.close()


def test_forcing_right_alignment_on_16_bit_raw_is_refused():
    r = Rig(platform="pi5", left_aligned=False)
    try:
        with pytest.raises(DeviceError, match="left-aligned"):
            r.start()
    finally:
        r.close()


def test_stand_in_delivers_left_aligned_bytes_with_padded_stride():
    r = Rig(pi5=True)
    try:
        r.start()
        r.expose(0, laser_mw=50.0)
        assert wait_for(lambda: r.camera.frames_completed >= 1)
        with r.camera.captured_request(wait=1.0) as request:
            raw = request.make_array("raw")
        assert raw.dtype == np.uint8
        assert raw.shape[0] == HEIGHT and raw.shape[1] > 2 * WIDTH  # padded rows
        pixels = raw.view("<u2")[:, :WIDTH]
        assert int(pixels[0, 0]) == 1023 << 6 == 65472
        assert r.camera.outstanding_requests == 0
        r.driver.stop()
    finally:
        r.close()


def test_alignment_found_from_the_data_when_the_platform_is_unknown():
    r = Rig(pi5=True, hide_platform=True)
    try:
        r.start()
        r.expose(0, laser_mw=30.0)
        frame = r.driver.capture(timeout_s=2.0)
        assert r.driver.left_aligned
        assert int(frame.data.max()) <= 1023
        assert int(frame.data[3, 3]) == BLACK + 30
    finally:
        r.close()


@pytest.mark.parametrize("pi5", [False, True])
def test_forced_alignment_is_obeyed(pi5):
    r = Rig(pi5=pi5, hide_platform=True, left_aligned=pi5)
    try:
        r.start()
        r.expose(0, laser_mw=40.0)
        frame = r.driver.capture(timeout_s=2.0)
        assert r.driver.left_aligned is pi5
        assert int(frame.data[3, 3]) == BLACK + 40
        assert int(frame.data[0, 0]) == 1023
    finally:
        r.close()


# -- stall and restart -------------------------------------------------------------------


def test_stall_raises_camera_stall_then_restart_recovers(rig):
    rig.start()
    rig.expose(0, laser_mw=20.0)
    assert rig.driver.capture(timeout_s=2.0).meta.seq == 0

    rig.world.apply({"fault": {"camera_stall": True}})
    rig.expose(1, laser_mw=20.0)
    before = rig.clock.monotonic()
    with pytest.raises(CameraStall) as info:
        rig.driver.capture()  # the driver's stall timeout (0.3 s)
    assert info.value.device == "camera"
    assert "0.3" in str(info.value)
    waited = rig.clock.monotonic() - before
    assert 0.3 - 1e-6 <= waited < 2.0
    # The stand-in has seen (and swallowed) that trigger before the fault is lifted.
    assert wait_for(lambda: rig.camera.triggers_swallowed >= 1)

    # Lifting the fault is not enough: the stalled camera stays silent until restarted.
    rig.world.apply({"fault": {"camera_stall": False}})
    rig.expose(2, laser_mw=20.0)
    with pytest.raises(CameraStall):
        rig.driver.capture()

    stalled = rig.camera
    rig.driver.restart()
    assert len(rig.cameras) == 2 and not stalled.is_open
    assert rig.driver.streaming
    rig.expose(3, laser_mw=70.0)
    frame = rig.driver.capture(timeout_s=2.0)
    assert frame.meta.seq == 0  # a new stream
    assert int(frame.data[4, 4]) == BLACK + 70
    assert frame.meta.exposure_us == EXPOSURE_US  # settings carried over


# -- state checks ------------------------------------------------------------------------


def test_configure_after_start_is_refused(rig):
    rig.start(exposure_us=EXPOSURE_US)
    with pytest.raises(WrongState, match="stop"):
        rig.driver.configure(CameraSettings(exposure_us=20_000, width=WIDTH, height=HEIGHT))
    assert rig.driver.settings.exposure_us == EXPOSURE_US
    rig.driver.stop()
    applied = rig.driver.configure(CameraSettings(exposure_us=20_000, width=WIDTH, height=HEIGHT))
    assert applied.exposure_us == 20_000


def test_capture_before_start_is_refused(rig):
    with pytest.raises(WrongState):
        rig.driver.capture(timeout_s=0.1)


def test_configure_takes_the_sensor_size(rig):
    applied = rig.driver.configure(CameraSettings(width=1456, height=1088))
    assert (applied.width, applied.height) == (WIDTH, HEIGHT)


def test_bad_settings_are_refused(rig):
    with pytest.raises(InvalidArgument):
        rig.driver.configure(CameraSettings(exposure_us=5))
    with pytest.raises(InvalidArgument):
        rig.driver.configure(CameraSettings(gain=40.0))


@pytest.mark.parametrize("kwargs", [
    {"raw_format": "R10_CSI2P"},
    {"raw_format": "SRGGB10_PISP_COMP1"},
    {"raw_format": "R12"},  # depth differs from bits=10
    {"raw_format": "R8", "colour": True},
    {"stall_timeout_s": 0.0},
    {"bits": 20},
    {"bits": 16, "colour": True},
])
def test_bad_constructor_arguments_are_refused(kwargs):
    with pytest.raises(InvalidArgument):
        PiCamera(lambda: None, **kwargs)


def test_colour_asks_for_a_bayer_format():
    assert PiCamera(lambda: None, colour=True).raw_format == "SRGGB10"
    assert PiCamera(lambda: None, raw_format=None, bits=12).raw_format == "R12"


def test_colour_binning_halves_the_size():
    r = Rig(mono=False, colour=True, raw_format="SRGGB10")
    try:
        r.start()
        r.expose(0, laser_mw=25.0)
        frame = r.driver.capture(timeout_s=2.0)
        assert frame.data.shape == (HEIGHT // 2, WIDTH // 2)
        assert (frame.meta.width, frame.meta.height) == (WIDTH // 2, HEIGHT // 2)
        assert int(frame.data[5, 5]) == 4 * (BLACK + 25)
        assert frame.meta.bits == 12 and frame.meta.black_level == 4 * BLACK
        assert int(frame.data.max()) <= frame.full_scale
    finally:
        r.close()


def test_external_trigger_hook_is_called_on_start_and_close():
    calls = []
    r = Rig(external_trigger=calls.append)
    try:
        r.start()
        assert calls == [True]
        r.driver.stop()
        r.driver.start()
        assert calls == [True, True]
    finally:
        r.close()
    assert calls[-1] is False


def test_imx296_trigger_hook_writes_the_parameter(tmp_path):
    param = tmp_path / "trigger_mode"
    hook = imx296_trigger_hook(param)
    hook(True)
    assert param.read_text() == "1"
    hook(False)
    assert param.read_text() == "0"
    broken = imx296_trigger_hook(tmp_path / "missing" / "trigger_mode")
    with pytest.raises(DeviceError, match="trigger"):
        broken(True)


# -- the stand-in's buffers --------------------------------------------------------------


def test_only_the_newest_completed_request_is_kept(rig):
    """picamera2 keeps one completed request and releases older ones (picamera2.py,
    _max_queue_len): a slow reader gets the newest frame, the others are gone."""
    rig.start()
    for n in range(6):
        rig.expose(n, laser_mw=float(n))
        # Let the sensor finish this exposure before the next one starts.
        assert wait_for(lambda n=n: rig.camera.frames_completed >= n + 1)
    cam = rig.camera
    assert cam.camera_configuration()["buffer_count"] > 1
    assert cam.frames_dropped == 5
    assert int(rig.driver.capture(timeout_s=1.0).data[2, 2]) - BLACK == 5
    with pytest.raises(CameraStall):
        rig.driver.capture(timeout_s=0.05)  # nothing else was kept


def test_one_buffer_keeps_no_request():
    r = Rig()
    try:
        r.start()
        cam = r.camera
        cam.stop()
        cam.configure(cam.create_video_configuration(buffer_count=1))
        cam.start()
        r.expose(0, laser_mw=3.0)
        assert wait_for(lambda: cam.frames_completed >= 1)
        with pytest.raises(TimeoutError):
            cam.capture_request(wait=0.05)
        cam.cancel_all_and_flush()
    finally:
        r.close()


def test_a_timed_out_capture_stays_queued_and_takes_the_next_request(rig):
    """Upstream: the job of a capture_request that timed out stays in the job list; the
    next frame completes it, and its request is held until someone releases it."""
    rig.start()
    cam = rig.camera
    with pytest.raises(TimeoutError):
        cam.capture_request(wait=0.05)
    assert cam.queued_jobs == 1
    rig.expose(0, laser_mw=1.0)
    assert wait_for(lambda: cam.outstanding_requests == 1)
    assert cam.queued_jobs == 0
    # A fresh capture waits for the frame after: the first one is stuck in the stale job.
    with pytest.raises(TimeoutError):
        cam.capture_request(wait=0.05)
    cam.cancel_all_and_flush()


def test_driver_never_leaves_a_request_in_a_timed_out_job(rig):
    rig.start()
    with pytest.raises(CameraStall):
        rig.driver.capture(timeout_s=0.05)
    rig.expose(0, laser_mw=9.0)
    frame = rig.driver.capture(timeout_s=2.0)  # the same job, now completed
    assert int(frame.data[2, 2]) == BLACK + 9
    assert rig.camera.outstanding_requests == 0
    assert rig.camera.queued_jobs == 0
    # A timeout, then a stop: what the stale job took is given back, the job cancelled.
    with pytest.raises(CameraStall):
        rig.driver.capture(timeout_s=0.05)
    rig.expose(1, laser_mw=1.0)
    assert wait_for(lambda: rig.camera.outstanding_requests == 1)
    rig.driver.stop()
    assert rig.camera.outstanding_requests == 0
    assert rig.driver.stale_requests_released == 1


def test_requests_are_released_exactly_once_and_are_not_context_managers(rig):
    rig.start()
    rig.expose(0, laser_mw=2.0)
    request = rig.camera.capture_request(wait=2.0)
    assert not hasattr(request, "__enter__")
    request.release()
    with pytest.raises(RuntimeError, match="ref_count"):
        request.release()


def test_stand_in_clamps_controls_instead_of_refusing(rig):
    rig.start()
    cam = rig.camera
    cam.set_controls({"AnalogueGain": 40.0, "ExposureTime": 5})
    lo_exposure = cam.camera_controls["ExposureTime"][0]
    rig.expose(0)
    rig.driver.capture(timeout_s=2.0)
    assert rig.renderer.calls[-1][2] == pytest.approx(16.0)
    assert rig.renderer.calls[-1][1] == lo_exposure
    with pytest.raises(RuntimeError, match="not advertised"):
        cam.set_controls({"Brightness": 0.5})


def test_driver_refuses_what_the_camera_would_clamp():
    class Narrow(ExplodingCamera):
        camera_controls = {"ExposureTime": (29, 20_000, 10_000), "AnalogueGain": (1.0, 8.0, 1.0)}

    cam = PiCamera(lambda: Narrow("none"), clock=ManualClock())
    with pytest.raises(InvalidArgument, match="ExposureTime 30000 outside .*29-20000"):
        cam.configure(CameraSettings(exposure_us=30_000, width=WIDTH, height=HEIGHT))
    with pytest.raises(InvalidArgument, match="AnalogueGain 12.0 outside"):
        cam.configure(CameraSettings(gain=12.0, width=WIDTH, height=HEIGHT))


# -- exposure and frame duration --------------------------------------------------------


def test_frame_duration_limits_let_a_long_exposure_through(rig):
    """picamera2's video configuration fixes the frame at 33,333 us; libcamera then clips
    ExposureTime to it. The driver widens FrameDurationLimits, so 50 ms stays 50 ms."""
    rig.start(exposure_us=50_000)
    applied = rig.camera.camera_configuration()["controls"]["FrameDurationLimits"]
    assert applied[0] >= 50_000 and applied[1] >= 50_000
    assert rig.camera.effective_exposure_time_us() == 50_000
    rig.expose(0, laser_mw=4.0)
    frame = rig.driver.capture(timeout_s=2.0)
    assert frame.meta.exposure_us == 50_000
    assert rig.renderer.calls[-1][1] == 50_000


def test_stand_in_clips_exposure_to_the_default_frame_duration(rig):
    """What a driver that does not set FrameDurationLimits gets."""
    rig.start()
    cam = rig.camera
    cam.stop()
    cam.configure(cam.create_video_configuration(controls={"ExposureTime": 50_000}))
    cam.start()
    assert cam.effective_exposure_time_us() == 33_333
    rig.expose(0)
    request = cam.capture_request(wait=2.0)
    assert request.get_metadata()["ExposureTime"] == 33_333
    request.release()


def test_the_trigger_pulse_sets_the_exposure(rig):
    """External trigger: the sensor integrates for the low pulse plus 14.26 us; the
    metadata still give the control's value."""
    rig.start(exposure_us=EXPOSURE_US)
    t0 = rig.clock.time_ns() + 1_000_000
    rig.world.set_laser_drive(100.0, t0)
    rig.world.trigger(0, t0, True, pulse_us=20_000)
    request = rig.camera.capture_request(wait=2.0)
    md = request.get_metadata()
    request.release()
    assert rig.camera.last_exposure_us == pytest.approx(20_014.26)
    assert rig.renderer.calls[-1][1] == 20_014
    assert md["ExposureTime"] == EXPOSURE_US
    # The exposure window ends when the pulse-driven exposure ends.
    mono_to_wall = rig.clock.time_ns() - int(rig.clock.monotonic() * 1e9)
    assert md["SensorTimestamp"] + mono_to_wall == t0 + 20_014_260


def test_stand_in_bounded_wait_times_out(rig):
    rig.start()
    with pytest.raises(TimeoutError):
        rig.camera.capture_request(wait=0.05)
    job = rig.camera.capture_request(wait=False)
    with pytest.raises(TimeoutError):
        rig.camera.wait(job, timeout=0.05)
    rig.camera.cancel_all_and_flush()


def test_stand_in_signal_function_returns_the_job_and_calls_back_with_it(rig):
    # as picamera2's capture_request: with a signal_function and no wait, the job comes
    # back at once; the function is called with that job once its request has come, and
    # the job's result is that request (picamera2 Job.signal / Job.get_result)
    rig.start(exposure_us=EXPOSURE_US)
    called = []
    done = threading.Event()

    def signalled(job):
        called.append(job)
        done.set()

    job = rig.camera.capture_request(signal_function=signalled)
    assert not called  # no frame yet: nothing was waited for
    rig.expose(1, laser_mw=40.0)
    assert done.wait(5.0)
    assert called == [job]
    request = rig.camera.wait(job, timeout=1.0)
    assert request.get_metadata()["ExposureTime"] == EXPOSURE_US
    request.release()
    # a cancelled job is not signalled
    later = []
    rig.camera.capture_request(signal_function=later.append)
    rig.camera.cancel_all_and_flush()
    assert later == []


def test_stand_in_refuses_configure_while_started(rig):
    rig.start()
    with pytest.raises(RuntimeError, match="stopped"):
        rig.camera.configure(rig.camera.create_video_configuration())


def test_stand_in_ignores_triggers_from_before_the_stream(rig):
    rig.world.set_laser_drive(10.0, rig.clock.time_ns())
    rig.world.trigger(0, rig.clock.time_ns(), True)
    rig.clock.advance(0.001)
    rig.start()
    rig.expose(1, laser_mw=60.0)
    frame = rig.driver.capture(timeout_s=2.0)
    assert int(frame.data[1, 1]) == BLACK + 60
    assert len(rig.renderer.calls) == 1


# -- errors from picamera2 ---------------------------------------------------------------


class ExplodingCamera:
    """A Picamera2 look-alike whose chosen method raises like picamera2 does."""

    platform = None

    def __init__(self, fail: str):
        self.fail = fail

    def _maybe(self, name):
        if self.fail == name:
            raise RuntimeError(f"{name} went wrong")

    def create_video_configuration(self, **kwargs):
        return {"raw": dict(kwargs["raw"]), "controls": kwargs.get("controls", {})}

    def configure(self, config):
        self._maybe("configure")
        self.config = config

    def set_controls(self, controls):
        self._maybe("set_controls")

    def camera_configuration(self):
        if self.fail == "compressed":
            return {"raw": {"format": "R16_PISP_COMP1", "size": (WIDTH, HEIGHT)}}
        return self.config

    def start(self):
        self._maybe("start")

    def stop(self):
        self._maybe("stop")

    def close(self):
        pass

    def capture_request(self, wait=None):
        self._maybe("capture_request")
        raise TimeoutError("nothing")


@pytest.mark.parametrize("fail", ["configure", "set_controls", "compressed"])
def test_configure_errors_become_device_errors(fail):
    cam = PiCamera(lambda: ExplodingCamera(fail), clock=ManualClock())
    with pytest.raises(DeviceError) as info:
        cam.configure(CameraSettings(width=WIDTH, height=HEIGHT))
    assert info.value.device == "camera"
    if fail != "compressed":
        assert isinstance(info.value.__cause__, RuntimeError)
    else:
        assert "R16_PISP_COMP1" in str(info.value)


def test_start_and_capture_errors_become_device_errors():
    cam = PiCamera(lambda: ExplodingCamera("start"), clock=ManualClock())
    cam.configure(CameraSettings(width=WIDTH, height=HEIGHT))
    with pytest.raises(DeviceError, match="start"):
        cam.start()
    assert not cam.streaming

    cam = PiCamera(lambda: ExplodingCamera("capture_request"), clock=ManualClock())
    cam.start()
    with pytest.raises(DeviceError, match="capture") as info:
        cam.capture(timeout_s=0.1)
    assert not isinstance(info.value, CameraStall)

    cam = PiCamera(lambda: ExplodingCamera("none"), clock=ManualClock())
    cam.start()
    with pytest.raises(CameraStall):
        cam.capture(timeout_s=0.1)


def test_factory_errors_become_device_errors():
    def broken_factory():
        raise OSError("no camera on the CSI port")

    cam = PiCamera(broken_factory, clock=ManualClock())
    with pytest.raises(DeviceError, match="CSI"):
        cam.start()


# -- imports -----------------------------------------------------------------------------


def test_driver_module_does_not_import_picamera2():
    code = (
        "import sys\n"
        "sys.modules['picamera2'] = None  # any import attempt would fail\n"
        "import nirf.drivers.camera\n"
        "assert 'picamera2' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_picamera2_factory_off_a_pi_raises_a_device_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)
    with pytest.raises(DeviceError, match="picamera2"):
        picamera2_factory(0)
    # Handed to the driver as the factory, the error surfaces when the camera is opened.
    cam = PiCamera(picamera2_factory, clock=ManualClock())
    with pytest.raises(DeviceError, match="picamera2") as info:
        cam.start()
    assert info.value.device == "camera"


# -- with the real renderer, when it exists ----------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("nirf.sim.render") is None,
                    reason="nirf.sim.render not written yet")
def test_real_renderer_frame_through_the_driver():
    from nirf.sim.render import FrameRenderer

    clock = ManualClock()
    sensor = SensorModel(width=WIDTH, height=HEIGHT)
    world = World(clock, sensor)
    view = LocalWorldView(world)
    cams = []

    def factory():
        cams.append(Picamera2StandIn(view, renderer=FrameRenderer(sensor, seed=1), clock=clock,
                                     left_aligned=True))
        return cams[-1]

    driver = PiCamera(factory, clock=clock, stall_timeout_s=1.0)
    try:
        driver.configure(CameraSettings(exposure_us=EXPOSURE_US, width=WIDTH, height=HEIGHT))
        driver.start()
        frames = {}
        for n, mw in enumerate((0.0, 100.0)):
            t0 = clock.time_ns() + 1_000_000
            world.set_laser_drive(mw, t0)
            world.trigger(n, t0, mw > 0)
            frames[mw] = driver.capture(timeout_s=2.0)
        dark, lit = frames[0.0], frames[100.0]
        assert dark.data.shape == (HEIGHT, WIDTH) and dark.data.dtype == np.uint16
        assert int(lit.data.max()) <= lit.full_scale
        # Fluorescence adds signal where the laser shone.
        assert float(lit.data.mean()) > float(dark.data.mean()) + 5
    finally:
        driver.close()
        for cam in cams:
            cam.close()


# -- the simulator's own lateness ----------------------------------------------------------


def test_a_frame_the_simulator_completes_late_is_counted_and_logged_once_per_episode(caplog):
    """A real sensor never falls behind its triggers; the stand-in may (its render runs in
    Python). A frame it completes well after its exposure ended is counted, and the log says
    so once per episode, so a latency figure measured meanwhile is known to hold the
    simulator's delay. Frames on time are not counted."""
    r = Rig()
    try:
        r.start(exposure_us=EXPOSURE_US, gain=1.0)
        r.expose(0)
        r.driver.capture(timeout_s=2.0)
        assert r.camera.frames_late == 0
        r.clock.advance(3.0)
        caplog.set_level("WARNING", logger="nirf.sim.picamera2_standin")
        for counter, behind_s in ((1, 1.0), (2, 0.5)):  # triggers the sensor takes up late
            r.world.trigger(counter, r.clock.time_ns() - int(behind_s * 1e9), True)
            r.driver.capture(timeout_s=2.0)
        cam = r.camera
        assert cam.frames_late == 2
        want = 1.0 - EXPOSURE_US / 1e6 - cam.settle_margin_s
        assert cam.max_late_s == pytest.approx(want, abs=0.05)
        warnings = [m for m in caplog.messages if "simulated sensor late" in m]
        assert len(warnings) == 1 and "frame 1 " in warnings[0]
        r.clock.advance(11.0)  # a new episode, past the warning interval: logged again
        r.world.trigger(3, r.clock.time_ns() - int(0.5e9), True)
        r.driver.capture(timeout_s=2.0)
        assert cam.frames_late == 3
        assert len([m for m in caplog.messages if "simulated sensor late" in m]) == 2
    finally:
        r.close()


def test_a_streams_first_second_is_not_judged_late():
    """The first render of a stream builds the renderer's caches and the frames queued behind
    it come late too; lateness counts from the stream's second second on."""
    r = Rig()
    try:
        r.start(exposure_us=EXPOSURE_US, gain=1.0)
        r.clock.advance(3.0)
        r.world.trigger(0, r.clock.time_ns() - int(1e9), True)
        r.driver.capture(timeout_s=2.0)
        assert r.camera.frames_late == 0
        r.clock.advance(0.5)  # 0.5 s after the first trigger: not judged either
        r.world.trigger(1, r.clock.time_ns() - int(1e9), True)
        r.driver.capture(timeout_s=2.0)
        assert r.camera.frames_late == 0
        r.clock.advance(1.0)  # 1.5 s after it: judged
        r.world.trigger(2, r.clock.time_ns() - int(1e9), True)
        r.driver.capture(timeout_s=2.0)
        assert r.camera.frames_late == 1
    finally:
        r.close()


class _CountingCondition:
    """A condition that counts its waits."""

    def __init__(self, cond):
        self._cond, self.waits = cond, 0

    def __enter__(self):
        return self._cond.__enter__()

    def __exit__(self, *exc):
        return self._cond.__exit__(*exc)

    def wait(self, timeout=None):
        self.waits += 1
        return self._cond.wait(timeout)

    def notify_all(self):
        self._cond.notify_all()


def test_a_capture_on_the_machines_clock_sleeps_once_until_its_frame_comes():
    """On the real clock the stand-in waits for a frame as picamera2 does, in one sleep the
    frame's arrival ends (every extra wake-up is CPU the frame path is charged for); on a
    manual clock it waits in short slices, so the time the test advances to is seen."""
    from nirf.hal.clock import SystemClock
    from nirf.sim.picamera2_standin import StandInJob

    world = World(SystemClock(), SensorModel(width=WIDTH, height=HEIGHT))
    cam = Picamera2StandIn(LocalWorldView(world), renderer=FakeRenderer(world.sensor), clock=SystemClock())
    counting = cam._cond = _CountingCondition(cam._cond)
    job = StandInJob(cam, None)
    marker = object()

    def finish():
        with counting:
            job._finish(marker)
            counting.notify_all()

    timer = threading.Timer(0.15, finish)
    timer.start()
    try:
        assert cam._wait_job(job, 5.0) is marker
        assert counting.waits == 1
    finally:
        timer.cancel()
        cam.close()

    manual = ManualClock()
    cam2 = Picamera2StandIn(LocalWorldView(World(manual, SensorModel(width=WIDTH, height=HEIGHT))),
                            renderer=FakeRenderer(world.sensor), clock=manual)
    try:
        with pytest.raises(TimeoutError):  # a manual clock's time runs out in slices
            cam2._wait_job(StandInJob(cam2, None), 0.05)
    finally:
        cam2.close()
