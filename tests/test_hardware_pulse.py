"""The simulated hardware process: the factory record it writes at boot, the service jumper
and ``sim.set {"pulse": ...}`` timed inside it, judged through its own sockets and the
MCU's pseudo-terminal with the real driver."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import pytest
import serial
import zmq

from nirf import config as config_mod
from nirf.drivers.laser_mcu import McuLaser
from nirf.hal.errors import DeviceRejected, InvalidArgument
from nirf.sim import simset
from nirf.sim.hardware import HardwareProcess

RECV_TIMEOUT_MS = 5000


@pytest.fixture
def hw():
    runtime = Path(tempfile.mkdtemp(prefix="nirfhw"))  # ipc paths must stay short
    cfg = config_mod.Config("<test>", config_mod.validate({"cart": {"profile": "sim"}}, "<test>"))
    proc = HardwareProcess(cfg, runtime)
    info = proc.start()
    server = threading.Thread(target=proc.serve, daemon=True)
    server.start()
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.DEALER)
    ctl.setsockopt(zmq.LINGER, 0)
    ctl.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    ctl.connect(info["world_ctl"])
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    sub.setsockopt(zmq.SUBSCRIBE, b"inputs")
    sub.connect(info["world_pub"])
    laser = McuLaser(lambda: serial.Serial(info["mcu_port"], 115200, timeout=0.05), heartbeat_timeout_ms=1000)

    def request(req: dict) -> dict:
        ctl.send(msgpack.packb(req))
        return msgpack.unpackb(ctl.recv(), raw=False)

    yield proc, cfg, laser, request, sub
    laser.close()
    proc._stop.set()
    server.join(timeout=5)
    ctl.close()
    sub.close()
    ctx.term()
    proc.stop()
    shutil.rmtree(runtime, ignore_errors=True)


def test_factory_record_from_the_config_and_the_true_curve(hw):
    proc, cfg, laser, request, sub = hw
    laser.connect()
    fc = laser.factory()
    assert fc.max_power_mw == cfg.laser.max_power_mw
    assert fc.optical_trip_mw == pytest.approx(1.1 * cfg.laser.max_power_mw)
    assert fc.budget_s >= cfg.laser.max_emission_s
    # the factory table is the world's true curve: drive the ceiling and measure the world
    d = fc.duty_ceiling
    laser.set_duty(d, fc.mw_at(d))
    laser.set_enabled(True, fc.mw_at(d))
    true_mw = proc.world.laser_output_mw()
    laser.set_enabled(False)
    assert true_mw == pytest.approx(fc.mw_at(d), rel=1e-9)
    assert true_mw <= 1.1 * cfg.laser.max_power_mw
    # no jumper, no new record
    with pytest.raises(DeviceRejected, match="service jumper"):
        laser.write_factory(type(fc).build(((0.0, 0.0), (1.0, 100.0)), 1.0, 400.0, 100.0))
    assert laser.read_factory() == fc


def test_pulse_edges_are_published_with_their_times_and_latch_the_mcu(hw):
    proc, cfg, laser, request, sub = hw
    laser.connect()
    fc = laser.factory()
    time.sleep(0.2)  # let the subscription settle before the first edge
    for name, ms, code in (("interlock", 1, "ILK"), ("key", 2, "KEY"), ("interlock", 5, "ILK")):
        laser.clear_faults()
        laser.set_duty(0.1, fc.mw_at(0.1))
        laser.set_enabled(True, fc.mw_at(0.1))
        before = laser.status()
        reply = request({"op": "set", "changes": {"pulse": {"input": name, "ms": ms}}})
        assert reply["ok"], reply
        edges = []
        while len(edges) < 2:
            kind, data = sub.recv_multipart()
            msg = msgpack.unpackb(data, raw=False)
            if "t_ns" in msg:  # an edge; the periodic state messages carry no time
                edges.append(msg)
        field = "interlock_closed" if name == "interlock" else "key"
        assert [e[field] for e in edges] == [False, True]
        length_ms = (edges[1]["t_ns"] - edges[0]["t_ns"]) / 1e6
        assert length_ms >= ms - 0.05
        st = laser.status()
        assert code in st.faults and not st.output_on
        assert proc.world.laser_output_mw() == 0.0
        counted = (st.interlock_openings - before.interlock_openings, st.key_offs - before.key_offs)
        assert counted == ((1, 0) if name == "interlock" else (0, 1))
        print(f"{name} {ms} ms pulse measured {length_ms:.3f} ms")
    # the same edges, and the light they ended, in the world's record over the ctl socket
    rec = request({"op": "record", "since_ns": 0})
    assert rec["ok"]
    assert [value for _, _, value in rec["edges"]] == [False, True] * 3
    assert rec["laser"][-1][1] == 0.0 and max(mw for _, mw in rec["laser"]) == pytest.approx(fc.mw_at(0.1))
    assert not request({"op": "record", "since_ns": "x"})["ok"]


def test_service_jumper_and_pulse_arguments_validated():
    assert simset.validate({"service_jumper": True}) == {"service_jumper": True}
    assert simset.validate({"pulse": {"input": "key", "ms": 1}}) == {"pulse": {"input": "key", "ms": 1.0}}
    for bad in ({"pulse": {"input": "door", "ms": 5}}, {"pulse": {"input": "key", "ms": 0.5}},
                {"pulse": {"input": "key"}}, {"pulse": "key"}, {"service_jumper": 1}):
        with pytest.raises(InvalidArgument):
            simset.validate(bad)
