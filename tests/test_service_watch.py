"""The safety core watches the gateway and imaging (PRODUCT section 3): silent for 500 ms
while ARMING, ARMED or EMITTING is FAULT SERVICE_LOST with the laser off (judged on the
world's optical output); arm and fault.reset are refused while one of them is silent; in
SAFE a silent process changes nothing."""

from __future__ import annotations

import pytest

from nirf.controller.main import SERVICES_TIMEOUT_S, ServiceWatch
from nirf.controller.state import SERVICE_LOST, State
from nirf.hal.errors import FaultActive, WrongState
from tests.safety_rig import Rig


class WatchedRig(Rig):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.watch = ServiceWatch(("gateway", "imaging"), SERVICES_TIMEOUT_S, self.clock)
        self.cart.add_watch(self.watch)
        self.silent: set[str] = set()

    def advance(self, seconds: float, **kw) -> None:
        steps = max(1, int(round(seconds / self.TICK_S)))
        for _ in range(steps):
            for name in ("gateway", "imaging"):
                if name not in self.silent:
                    self.watch.beat(name)
            super().advance(self.TICK_S, **kw)


@pytest.fixture
def rig():
    r = WatchedRig(safety={"emission_delay_s": 1.0})
    r.advance(0.1)
    return r


@pytest.mark.parametrize("process", ["gateway", "imaging"])
@pytest.mark.parametrize("state", ["ARMING", "ARMED", "EMITTING"])
def test_a_silent_process_while_armed_turns_the_laser_off(rig, process, state):
    rig.cart.arm()
    if state != "ARMING":
        rig.advance(1.1)
    if state == "EMITTING":
        rig.cart.laser_on(50.0)
        rig.advance(0.1)
        assert rig.output_mw > 0
    assert rig.cart.state.value == state
    rig.silent.add(process)
    rig.advance(SERVICES_TIMEOUT_S - 0.1)
    assert rig.cart.state.value == state  # 400 ms of silence is not yet lost
    rig.advance(0.2)
    assert rig.cart.state is State.FAULT
    assert [f.code for f in rig.cart.faults] == [SERVICE_LOST]
    assert process in rig.cart.faults[0].message
    assert rig.output_mw == 0.0
    # no reset while it is silent; once it is back, reset and a new arm with the full delay
    with pytest.raises(FaultActive, match=process):
        rig.cart.fault_reset()
    rig.silent.clear()
    rig.advance(0.1)
    rig.cart.fault_reset()
    assert rig.cart.state is State.SAFE


def test_arm_is_refused_while_a_watched_process_is_silent(rig):
    rig.silent.add("imaging")
    rig.advance(1.0)
    assert rig.cart.state is State.SAFE  # in SAFE a silent process changes nothing
    with pytest.raises(WrongState, match="imaging"):
        rig.cart.arm()
    rig.silent.clear()
    rig.advance(0.1)
    rig.cart.arm()
    assert rig.cart.state is State.ARMING


def test_a_process_never_seen_counts_as_silent():
    r = WatchedRig(safety={"emission_delay_s": 1.0})
    r.silent.add("gateway")
    r.advance(0.1)
    with pytest.raises(WrongState, match="gateway"):
        r.cart.arm()


def test_a_dead_thread_stops_the_safety_cores_watchdog_pings(tmp_path):
    """systemd's watchdog is fed from the supervisor's healthy ticks only while every other
    thread of the process is alive too: a dead command, notices or frame thread gets the
    process restarted instead of running on half-deaf."""
    import threading
    from types import SimpleNamespace

    from nirf.controller.main import SafetyCore

    rig = Rig(safety={"emission_delay_s": 1.0})
    core = SafetyCore(rig.cfg, rig.laser, rig.io, state_dir=tmp_path / "state", runtime_dir=tmp_path / "run",
                      clock=rig.clock)
    pings = []

    class Pinger:  # a ping due on every tick (the real one is due a few times per period)
        def due(self):
            return True

        def __call__(self):
            pings.append(1)

    core.watchdog = Pinger()
    stop = threading.Event()
    alive = threading.Thread(target=stop.wait, daemon=True)
    alive.start()
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    core.server = SimpleNamespace(worker_alive=lambda: True)
    try:
        core._threads = [alive, alive]
        core._healthy_tick()
        assert pings == [1]
        core._threads = [alive, dead]
        core._healthy_tick()
        assert pings == [1]
        core._threads = [alive]
        core.server = SimpleNamespace(worker_alive=lambda: False)
        core._healthy_tick()
        assert pings == [1]
    finally:
        stop.set()
        core.ctx.destroy(linger=0)


def test_a_process_restarted_faster_than_the_timeout_still_trips(rig):
    """A gateway or imaging that died and came back within 500 ms lost what it knew (pending
    commands, frame tags): a new instance in its heartbeats while armed is SERVICE_LOST."""
    rig.watch.beat("gateway", "a")
    rig.watch.active = lambda: rig.cart.state.active
    rig.cart.arm()
    rig.advance(1.1)
    rig.cart.laser_on(50.0)
    rig.advance(0.1)
    assert rig.output_mw > 0
    rig.watch.beat("gateway", "a")
    rig.advance(0.1)
    assert rig.cart.state is State.EMITTING  # the same instance: nothing happened
    rig.watch.beat("gateway", "b")
    rig.advance(0.04)
    assert rig.cart.state is State.FAULT and "restarted" in rig.cart.faults[0].message
    assert rig.output_mw == 0.0


def test_a_restart_while_safe_changes_nothing(rig):
    rig.watch.active = lambda: rig.cart.state.active
    rig.watch.beat("imaging", "a")
    rig.watch.beat("imaging", "b")
    rig.advance(0.1)
    rig.cart.arm()
    rig.advance(0.1)
    assert rig.cart.state is State.ARMING


def test_heartbeats_waiting_unread_are_not_silence_for_a_refusal():
    """The safety core descheduled for 600 ms: the gateway's heartbeats wait in the socket
    while the arm request is handled first. Silence counts up to the last read of the
    heartbeats, so arm is not refused for it; a truly silent process still is."""
    r = WatchedRig(safety={"emission_delay_s": 1.0})
    r.advance(0.1)
    r.watch.serviced(r.clock.monotonic())
    r.silent.update({"gateway", "imaging"})
    r.clock.advance(0.6)  # nothing ran: no heartbeat read, no check
    assert r.watch.causes(r.clock.monotonic()) == []
    r.watch.serviced(r.clock.monotonic())  # the reader ran and found nothing
    assert r.watch.causes(r.clock.monotonic()) == ["the gateway process is not running",
                                                  "the imaging process is not running"]
    with pytest.raises(WrongState, match="gateway"):
        r.cart.arm()


def test_a_stalled_heartbeat_reader_still_trips_while_armed(rig):
    """Only refusals measure up to the last read: while armed a reader that stopped reading
    for good ends in SERVICE_LOST (the trips measure up to now)."""
    rig.watch.serviced(rig.clock.monotonic())
    rig.cart.arm()
    rig.silent.update({"gateway", "imaging"})
    rig.advance(SERVICES_TIMEOUT_S + 0.2)
    assert rig.cart.state is State.FAULT
    assert [f.code for f in rig.cart.faults] == [SERVICE_LOST]
    assert rig.output_mw == 0.0


def test_a_new_imaging_process_voids_the_camera_watch_of_the_old_one(tmp_path):
    """Imaging killed while it streamed: its last word was "watching, frame at t". The new
    process starts with no stream; the safety core must not wait for the old stream's frames
    (a reset would be refused for ever: "camera still delivers no frames"). The same process
    going on beating changes nothing."""
    from nirf.controller.main import SafetyCore

    rig = Rig(safety={"emission_delay_s": 1.0})
    core = SafetyCore(rig.cfg, rig.laser, rig.io, state_dir=tmp_path / "state", runtime_dir=tmp_path / "run",
                      clock=rig.clock)
    try:
        core._on_notice({"kind": "camera", "watching": True, "frame": True, "instance": "old"})
        rig.clock.advance(rig.cfg.safety.camera_stall_s + 0.5)
        core._on_notice({"kind": "hb", "process": "imaging", "instance": "old"})
        assert "camera still delivers no frames" in core.cart.persisting_causes()
        core._on_notice({"kind": "hb", "process": "gateway", "instance": "gw"})  # another process
        assert "camera still delivers no frames" in core.cart.persisting_causes()
        core._on_notice({"kind": "hb", "process": "imaging", "instance": "new"})
        assert "camera still delivers no frames" not in core.cart.persisting_causes()
        # the new one's own stream is watched as before
        core._on_notice({"kind": "camera", "watching": True, "frame": True, "instance": "new"})
        rig.clock.advance(rig.cfg.safety.camera_stall_s + 0.5)
        assert "camera still delivers no frames" in core.cart.persisting_causes()
    finally:
        core.ctx.destroy(linger=0)


def test_camera_notices_do_not_stand_in_for_imagings_heartbeat(tmp_path):
    """Imaging's acquisition thread tells the camera's frames; its heartbeat thread stops
    beating when any of its threads died. Frames still coming must not keep imaging counted
    as running: only its heartbeat does, so a dead thread while streaming is SERVICE_LOST."""
    from nirf.controller.main import SafetyCore

    rig = Rig(safety={"emission_delay_s": 1.0})
    core = SafetyCore(rig.cfg, rig.laser, rig.io, state_dir=tmp_path / "state", runtime_dir=tmp_path / "run",
                      clock=rig.clock)
    try:
        core._on_notice({"kind": "hb", "process": "gateway", "instance": "gw"})
        core._on_notice({"kind": "hb", "process": "imaging", "instance": "im"})
        core.watch.serviced(rig.clock.monotonic())
        assert core.watch.causes(rig.clock.monotonic()) == []
        for _ in range(10):  # 600 ms of frames, no imaging heartbeat
            rig.clock.advance(0.06)
            core._on_notice({"kind": "camera", "watching": True, "frame": True, "instance": "im"})
            core._on_notice({"kind": "hb", "process": "gateway", "instance": "gw"})
            core.watch.serviced(rig.clock.monotonic())
        assert core.watch.causes(rig.clock.monotonic()) == ["the imaging process is not running"]
        assert core.notices_bad == 0  # the frames themselves were taken (camera-stall rule)
    finally:
        core.ctx.destroy(linger=0)
