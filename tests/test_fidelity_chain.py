"""The whole imaging chain as on the cart, with the stand-ins behaving as upstream does:
the MCU emulator triggers every exposure over a pseudo-terminal (our MCU driver reads its
frame notices), the picamera2 stand-in imitates a Pi 4 or a Pi 5 (sim.set camera_platform),
drops frames picamera2 would drop and keeps only one completed request, the camera driver
and the acquisition pair frames, and the processing pipeline measures them.

Judged against the simulator's truth: the phantom's SBR of 4.0, and the fluorescence
intensity per unit exposure, which must not depend on the exposure chosen (the IMX296
exposes for the trigger pulse; picamera2's default frame duration would clip the
metadata's exposure to 33 ms)."""

from __future__ import annotations

import threading
import time

import pytest
import serial

from nirf.services.imaging.acquisition import Acquisition
from nirf.drivers.camera import PiCamera
from nirf.drivers.laser_mcu import McuLaser
from nirf.hal.camera import CameraSettings
from nirf.hal.clock import SystemClock
from nirf.services.processing.pipeline import PairProcessor, Roi
from nirf.sim.mcu_emulator import McuEmulator, factory_for
from nirf.sim.picamera2_standin import Picamera2StandIn
from nirf.sim.serial_link import PtyLink
from nirf.sim.world import SensorModel, World
from nirf.sim.worldview import LocalWorldView

W, H = 256, 192
# the default phantom: a disk of radius H/6 at the centre, 200 nM in 50 nM: SBR 4.0
SIGNAL = Roi(W // 2 - 12, H // 2 - 12, 24, 24)
BACKGROUND = Roi(8, 8, 48, 48)
TRUE_SBR = 4.0
DUTY = 0.1
FULL_SCALE_MW = 500.0
# frames picamera2 throws away (status not Success): one at the start, two and three later
DROPPED = frozenset({0, 7, 8, 15, 16, 17})
WAIT_S = 30.0  # generous: the machine is shared


class Cart:
    """World, MCU emulator on a pty, MCU driver, camera stand-in and driver, acquisition."""

    def __init__(self, platform: str, dropped=DROPPED):
        clock = SystemClock()
        self.world = World(clock, SensorModel(width=W, height=H))
        self.world.apply({"camera_platform": platform})
        self.view = LocalWorldView(self.world)
        # the factory record a factory would write: the diode's true curve and a 200 mW limit
        self.link = PtyLink(McuEmulator(self.world, clock, full_scale_mw=FULL_SCALE_MW, duty_ceiling=0.8,
                                        factory=factory_for(FULL_SCALE_MW, 200.0, 600.0)), "mcu").start()
        self.laser = McuLaser(lambda: serial.Serial(self.link.port, 115200, timeout=0.05))
        self.laser.connect()
        self._beat_stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        self.cameras: list[Picamera2StandIn] = []

        def factory():
            self.cameras.append(Picamera2StandIn(self.view, seed=7, drop_counters=dropped))
            return self.cameras[-1]

        self.camera = PiCamera(factory, stall_timeout_s=2.0)
        self.pairs: list = []
        self.got_pairs = threading.Condition()

        def on_pair(on, off):
            with self.got_pairs:
                self.pairs.append((on, off))
                self.got_pairs.notify_all()

        self.acq = Acquisition(self.camera, self.laser, on_pair=on_pair,
                               laser_mw=lambda: self.duty * FULL_SCALE_MW, stall_timeout_s=2.0)
        self.duty = DUTY

    def _heartbeat(self):
        while not self._beat_stop.wait(0.1):
            try:
                self.laser.heartbeat()
            except Exception:  # the test's assertions report what went wrong
                pass

    def run(self, exposure_us: int, fps: float, n_pairs: int, duty: float = DUTY) -> list:
        self.duty = duty
        self.acq.configure(CameraSettings(exposure_us, 1.0, W, H), fps)
        self.laser.set_duty(duty, duty * FULL_SCALE_MW)
        self.laser.set_enabled(True, duty * FULL_SCALE_MW)
        self.acq.start("fluorescence")
        deadline = time.monotonic() + WAIT_S
        with self.got_pairs:
            while len(self.pairs) < n_pairs and time.monotonic() < deadline:
                self.got_pairs.wait(0.5)
        self.acq.stop()
        self.laser.set_enabled(False)
        assert len(self.pairs) >= n_pairs, f"only {len(self.pairs)} pairs in {WAIT_S} s"
        return list(self.pairs)

    def close(self):
        self._beat_stop.set()
        self._beat.join(timeout=2)
        self.camera.close()
        self.laser.close()
        self.link.stop()


@pytest.fixture(params=["pi4", "pi5"])
def cart(request):
    c = Cart(request.param)
    yield c
    c.close()


def measure(pairs):
    proc = PairProcessor(W, H, 10)
    proc.set_rois(SIGNAL, BACKGROUND)
    results = []
    for on, off in pairs:
        def meta(f):
            m = f.meta
            return {"frame_seq": m.seq, "t_start_ns": m.t_start_ns, "t_end_ns": m.t_end_ns,
                    "exposure_us": m.exposure_us, "gain": m.gain, "laser_mw": on.meta.laser_mw,
                    "filter_position": m.filter_position, "bits": m.bits}
        results.append(proc.process(on.data, off.data, meta(on), meta(off)))
    return results


def test_pairs_survive_dropped_frames_and_sbr_is_the_truth(cart):
    pairs = cart.run(10_000, 30.0, n_pairs=8)
    assert cart.cameras[-1].frames_failed >= 1, "no frame was dropped: the test proves nothing"
    for on, off in pairs:
        assert on.meta.lit is True and off.meta.lit is False
        assert on.meta.mcu_frame % 2 == 0 and off.meta.mcu_frame == on.meta.mcu_frame + 1
        assert on.meta.mcu_frame not in DROPPED and off.meta.mcu_frame not in DROPPED
    results = measure(pairs)
    assert all(r["valid"] for r in results), [r["flags"] for r in results]
    sbr = sum(r["signal_mean"] for r in results) / sum(r["background_mean"] for r in results)
    assert sbr == pytest.approx(TRUE_SBR, rel=0.03)
    # every pair's lit frame is the bright one: a swapped label would make it negative
    assert all(r["signal_mean"] > 0 for r in results)


@pytest.mark.slow  # seconds of CPU: in make test, not in test-quick
def test_intensity_does_not_depend_on_the_exposure(cart):
    """50 ms at 10 fps and 10 ms at 30 fps: the fluorescence per unit exposure is the same.
    Divided by a clipped 33 ms, the 50 ms pairs would read 1.5 times too bright."""
    # 10 mW: the 50 ms tumour stays below full scale (about 60 %)
    short = measure(cart.run(10_000, 30.0, n_pairs=4, duty=0.02))
    cart.pairs.clear()
    long = measure(cart.run(50_000, 10.0, n_pairs=3, duty=0.02))
    assert all(r["valid"] for r in short + long), [r["flags"] for r in short + long]
    i_short = sum(r["intensity"] for r in short) / len(short)
    i_long = sum(r["intensity"] for r in long) / len(long)
    assert i_long == pytest.approx(i_short, rel=0.03)
    assert cart.cameras[-1].last_exposure_us == pytest.approx(50_000, abs=1)
