"""Frame tagging and pairing: camera frames matched to the MCU's frame notices by time, so a
frame lost on either side never shifts the laser-on/laser-off labels."""

from __future__ import annotations

import numpy as np

from services.imaging.acquisition import Acquisition, FrameTagger
from hal.camera import Frame, FrameMeta
from hal.laser import FrameTag

PERIOD_US = 33_333
SENSOR_OFFSET_US = 987_654  # the sensor clock and the MCU clock start anywhere


def tag(n):
    return FrameTag(counter=n, lit=n % 2 == 0, mcu_time_us=1_000 + n * PERIOD_US, host_time_ns=0)


def sensor_ts_ns(n, jitter_us=0):
    return (1_000 + n * PERIOD_US + SENSOR_OFFSET_US + jitter_us) * 1000


def test_tagger_matches_in_order():
    t = FrameTagger(PERIOD_US)
    t.add([tag(n) for n in range(6)])
    assert [t.match(sensor_ts_ns(n, jitter_us=(-1) ** n * 300)).counter for n in range(6)] == list(range(6))


def test_tagger_survives_a_frame_the_camera_dropped():
    t = FrameTagger(PERIOD_US)
    t.add([tag(n) for n in range(8)])
    got = [t.match(sensor_ts_ns(n)).counter for n in (0, 1, 2, 4, 5, 6)]  # frame 3 never arrived
    assert got == [0, 1, 2, 4, 5, 6]
    assert [n % 2 == 0 for n in got] == [tag(n).lit for n in got]


def test_tagger_leaves_a_frame_untagged_when_its_notice_was_lost():
    t = FrameTagger(PERIOD_US)
    t.add([tag(n) for n in (0, 1, 2, 4, 5)])  # the notice of frame 3 was corrupted
    assert [t.match(sensor_ts_ns(n)).counter for n in (0, 1, 2)] == [0, 1, 2]
    assert t.match(sensor_ts_ns(3)) is None
    assert t.unmatched == 1
    assert t.match(sensor_ts_ns(4)).counter == 4


class FakeCamera:
    def __init__(self, frames):
        self.frames = list(frames)
        self.settings = type("S", (), {"exposure_us": 10_000})()
        self.started = False

    def start(self):
        self.started = True

    def stop(self):
        self.started = False

    def capture(self, timeout_s):
        from hal.errors import CameraStall

        if not self.frames:
            raise CameraStall("camera", "no frame")
        return self.frames.pop(0)


class FakeLaser:
    def __init__(self, tags):
        self.tags = list(tags)

    def poll(self):
        out, self.tags = self.tags, []
        return out, []

    def start_frames(self, *a, **k):
        pass

    def stop_frames(self):
        pass


def frame(n):
    meta = FrameMeta(seq=n, t_start_ns=n, t_end_ns=n + 1, exposure_us=10_000, gain=1.0, width=4, height=2,
                     sensor_timestamp_ns=sensor_ts_ns(n))
    return Frame(np.full((2, 4), n, dtype=np.uint16), meta)


def test_pairs_are_lit_then_dark_of_consecutive_counters():
    pairs = []
    acq = Acquisition(FakeCamera([frame(n) for n in (0, 1, 2, 3, 5, 6, 7)]), FakeLaser([tag(n) for n in range(8)]),
                      on_pair=lambda on, off: pairs.append((on.meta.mcu_frame, off.meta.mcu_frame)),
                      laser_mw=lambda: 50.0)
    acq._tagger = FrameTagger(PERIOD_US)
    acq._pending_on = None
    acq.mode = "fluorescence"
    for _ in range(7):
        f = acq.camera.capture(1.0)
        acq._tagger.add(acq.laser.poll()[0])
        acq._handle(f, acq._tagger.match(f.meta.sensor_timestamp_ns))
    # frame 4 (lit) was lost: 5 has no partner; 6 and 7 pair again
    assert pairs == [(0, 1), (2, 3), (6, 7)]
    assert acq.pairs_incomplete == 1
