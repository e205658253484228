"""Each laser safety rule of the product (S1-S13), with a test that fails if the rule is
removed. The cart runs on a manual clock against the real MCU emulator and driver."""

from __future__ import annotations

import re

import pytest

from nirf.controller.cart import Readings, emission_permitted
from nirf.controller.state import State
from nirf.hal.errors import ConfigError, FaultActive, InterlockOpen, InvalidArgument, KeyOff, WrongState
from nirf.sim.serial_link import LoopbackSerial
from tests.safety_rig import Rig, make_config

DEVICE_RULES = dict(safety={"footswitch_required": True, "boot_requires_key_cycle": True,
                            "reset_requires_key_cycle": True})


def key_cycle(rig):
    rig.key_cycle(0.6)


# ----------------------------------------------------------------------------- S1
def test_s1_output_forced_off_when_the_controller_connects():
    rig = Rig()
    # A previous controller left the MCU enabled.
    rig.cart.arm()
    rig.advance(2.1)
    rig.cart.laser_on(60)
    rig.advance(0.05)
    assert rig.output_mw > 0
    # A new controller process starts: its first act on the link turns the output off.
    from nirf.controller.cart import Cart
    from nirf.drivers.laser_mcu import McuLaser

    laser = McuLaser(lambda: LoopbackSerial(rig.mcu, rig.clock, timeout=0.05), clock=rig.clock, timeout_s=0.05)
    cart = Cart(rig.cfg, laser=laser, wheel=None, inputs=rig.io, indicators=rig.io, clock=rig.clock)
    cart.start()
    assert rig.output_mw == 0.0
    assert cart.state is State.SAFE


def test_s1_device_profile_needs_a_key_cycle_after_boot():
    rig = Rig(**DEVICE_RULES)
    with pytest.raises(KeyOff, match="and on again"):
        rig.cart.arm()
    key_cycle(rig)
    rig.cart.arm()
    assert rig.cart.state is State.ARMING


# ----------------------------------------------------------------------------- S2
@pytest.mark.parametrize("broken", ["state", "key", "interlock", "fault", "indicator", "footswitch", "setpoint"])
def test_s2_every_condition_alone_withholds_permission(broken):
    good = dict(state=State.EMITTING, key_on=True, interlock_closed=True, footswitch_pressed=True,
                footswitch_required=True, faults_latched=False, indicator_on_for_s=2.5, emission_delay_s=2.0,
                setpoint_mw=50.0)
    assert emission_permitted(Readings(**good))[0]
    bad = dict(good)
    bad.update({"state": {"state": State.ARMED}, "key": {"key_on": False},
                "interlock": {"interlock_closed": False}, "fault": {"faults_latched": True},
                "indicator": {"indicator_on_for_s": 1.9}, "footswitch": {"footswitch_pressed": False},
                "setpoint": {"setpoint_mw": 0.0}}[broken])
    ok, reasons = emission_permitted(Readings(**bad))
    assert not ok and reasons


def test_s2_no_light_before_the_emission_delay():
    rig = Rig(safety={"emission_delay_s": 3.0})
    rig.cart.arm()
    assert rig.world.indicator  # arming lights the indicator
    rig.advance(2.9)
    assert rig.cart.state is State.ARMING
    with pytest.raises(WrongState):
        rig.cart.laser_on(50)
    assert rig.output_mw == 0.0
    rig.advance(0.2)
    assert rig.cart.state is State.ARMED
    rig.cart.laser_on(50)
    rig.advance(0.02)
    assert rig.output_mw == pytest.approx(50.0, rel=0.01)
    assert rig.world.indicator


def test_s2_laser_on_refused_outside_armed():
    rig = Rig()
    with pytest.raises(WrongState):
        rig.cart.laser_on(50)
    assert rig.output_mw == 0.0


def test_s2_foot_switch_must_be_held_where_required():
    rig = Rig(**DEVICE_RULES)
    key_cycle(rig)
    rig.cart.arm()
    rig.advance(2.1)
    with pytest.raises(WrongState, match="foot switch"):
        rig.cart.laser_on(50)
    rig.world.apply({"footswitch": True})
    rig.cart.laser_on(50)
    rig.advance(0.02)
    assert rig.output_mw > 0


# ----------------------------------------------------------------------------- S3
def test_s3_inhibits_in_safe_refuse_arm_without_a_fault():
    rig = Rig()
    rig.world.apply({"interlock": "open"})
    with pytest.raises(InterlockOpen):
        rig.cart.arm()
    rig.world.apply({"interlock": "closed", "key": False})
    with pytest.raises(KeyOff):
        rig.cart.arm()
    rig.advance(0.1)
    assert rig.cart.state is State.SAFE and not rig.cart.faults


@pytest.mark.parametrize("event,code", [({"interlock": "open"}, "INTERLOCK_OPEN"), ({"key": False}, "KEY_OFF")])
@pytest.mark.parametrize("stage", ["ARMING", "ARMED", "EMITTING"])
def test_s3_interlock_or_key_trips_at_once_in_active_states(event, code, stage):
    rig = Rig()
    rig.cart.arm()
    if stage != "ARMING":
        rig.advance(2.1)
    if stage == "EMITTING":
        rig.cart.laser_on(50)
        rig.advance(0.02)
    assert rig.cart.state.value == stage
    rig.world.apply(event)  # the edge callback trips without waiting for a tick
    assert rig.cart.state is State.FAULT
    assert rig.cart.faults[0].code == code
    assert rig.output_mw == 0.0
    assert not rig.world.indicator


def test_s3_releasing_the_foot_switch_only_stops_emission():
    rig = Rig(**DEVICE_RULES)
    key_cycle(rig)
    rig.world.apply({"footswitch": True})
    rig.cart.arm()
    rig.advance(2.1)
    rig.cart.laser_on(50)
    rig.advance(0.02)
    rig.world.apply({"footswitch": False})
    assert rig.cart.state is State.ARMED
    assert not rig.cart.faults
    rig.advance(0.02)
    assert rig.output_mw == 0.0


# ----------------------------------------------------------------------------- S4
def test_s4_faults_latch_until_reset_and_a_new_full_delay():
    rig = Rig()
    rig.arm_and_emit(50)
    rig.world.apply({"interlock": "open"})
    rig.advance(0.1)
    rig.world.apply({"interlock": "closed"})
    rig.advance(1.0)
    assert rig.cart.state is State.FAULT  # closing the loop does not clear the fault
    with pytest.raises(FaultActive):
        rig.cart.arm()
    assert rig.output_mw == 0.0
    rig.cart.fault_reset()
    assert rig.cart.state is State.SAFE
    rig.cart.arm()
    rig.advance(1.9)
    assert rig.cart.state is State.ARMING  # the full delay again
    rig.advance(0.2)
    assert rig.cart.state is State.ARMED


def test_s4_reset_refused_while_the_cause_persists():
    rig = Rig()
    rig.arm_and_emit(50)
    rig.world.apply({"interlock": "open"})
    with pytest.raises(FaultActive, match="interlock"):
        rig.cart.fault_reset()
    assert rig.cart.state is State.FAULT


def test_s4_device_reset_after_an_interlock_trip_needs_a_key_cycle():
    rig = Rig(**DEVICE_RULES)
    key_cycle(rig)
    rig.world.apply({"footswitch": True})
    rig.arm_and_emit(50)
    rig.world.apply({"interlock": "open"})
    rig.advance(0.1)
    rig.world.apply({"interlock": "closed"})
    rig.advance(0.1)
    with pytest.raises(FaultActive, match="turn the key off"):
        rig.cart.fault_reset()
    key_cycle(rig)
    rig.cart.fault_reset()
    assert rig.cart.state is State.SAFE


# ----------------------------------------------------------------------------- S5
def test_s5_heartbeats_keep_the_mcu_happy_while_the_host_lives():
    rig = Rig()
    rig.arm_and_emit(50)
    rig.advance(10.0)
    assert rig.cart.state is State.EMITTING and rig.output_mw > 0


def test_s5_a_frozen_host_loses_the_laser_within_the_heartbeat_timeout():
    rig = Rig()
    rig.arm_and_emit(50)
    rig.advance(0.5 + 0.1, host_alive=False)  # heartbeat_timeout_ms 500, one tick of margin
    assert rig.output_mw == 0.0
    rig.advance(0.04)  # the host wakes up and sees the MCU's latched watchdog fault
    assert rig.cart.state is State.FAULT
    assert any(f.code == "MCU_WDOG" for f in rig.cart.faults)


def test_s5_heartbeat_timeout_bounds_are_enforced_in_config():
    for bad in (50, 1500):
        with pytest.raises(ConfigError, match="heartbeat_timeout_ms"):
            make_config(safety={"heartbeat_timeout_ms": bad})


# ----------------------------------------------------------------------------- S6
def test_s6_power_over_the_limit_is_rejected_not_clipped():
    rig = Rig()
    rig.cart.arm()
    rig.advance(2.1)
    with pytest.raises(InvalidArgument, match="max_power_mw 200"):
        rig.cart.laser_on(250)
    assert rig.cart.state is State.ARMED and rig.cart.setpoint_mw == 0
    assert rig.output_mw == 0.0


def test_s6_peak_irradiance_over_the_limit_is_rejected():
    rig = Rig(laser={"max_power_mw": 300.0, "field_area_cm2": 10.0})
    rig.cart.arm()
    rig.advance(2.1)
    # 300 mW x 2.0 / 10 cm2 = 60 mW/cm2 > 50
    with pytest.raises(InvalidArgument, match="irradiance"):
        rig.cart.laser_on(300)
    rig.cart.laser_on(250)  # 50 mW/cm2: at the limit, allowed
    rig.advance(0.02)
    with pytest.raises(InvalidArgument, match="irradiance"):
        rig.cart.laser_set(260)
    assert rig.cart.setpoint_mw == 250


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5, 0, "50", True])
def test_s6_nonsense_power_is_rejected(bad):
    rig = Rig()
    rig.cart.arm()
    rig.advance(2.1)
    with pytest.raises(InvalidArgument):
        rig.cart.laser_on(bad)
    assert rig.output_mw == 0.0


def test_s6_config_may_not_exceed_150_mw_per_cm2():
    with pytest.raises(ConfigError, match="irradiance_limit_mw_cm2"):
        make_config(laser={"irradiance_limit_mw_cm2": 200.0})


# ----------------------------------------------------------------------------- S7
def test_s7_continuous_emission_ends_by_itself():
    rig = Rig(laser={"max_emission_s": 5.0})
    rig.arm_and_emit(50)
    rig.advance(4.8)
    assert rig.output_mw > 0
    rig.advance(0.3)
    assert rig.cart.state is State.ARMED
    assert rig.output_mw == 0.0


def test_s7_config_caps_emission_time_at_1800_s():
    with pytest.raises(ConfigError, match="max_emission_s"):
        make_config(laser={"max_emission_s": 3600.0})


# ----------------------------------------------------------------------------- S8
def test_s8_a_corrupted_link_faults_after_bounded_retries():
    rig = Rig()
    rig.arm_and_emit(50)
    rig.world.faults["serial_corruption"] = 1.0
    writes_before = sum(len(p.written) for p in rig.ports)
    rig.advance(0.1)
    assert rig.cart.state is State.FAULT
    assert any(f.code == "SERIAL_LINK" for f in rig.cart.faults)
    # bounded: a handful of lines, not an endless loop
    assert sum(len(p.written) for p in rig.ports) - writes_before < 5000
    # the MCU's watchdog takes the light away even though the host cannot talk to it
    rig.advance(0.7)
    assert rig.output_mw == 0.0


# ----------------------------------------------------------------------------- S9
def test_s9_camera_stall_while_emitting_trips():
    rig = Rig()
    rig.cart.note_camera(True, rig.clock.monotonic())
    rig.arm_and_emit(50)
    rig.advance(2.0)
    assert rig.cart.state is State.EMITTING
    rig.advance(1.1, camera_frames=False)
    assert rig.cart.state is State.FAULT
    assert rig.cart.faults[0].code == "CAMERA_STALL"
    assert rig.output_mw == 0.0
    with pytest.raises(FaultActive, match="camera"):
        rig.cart.fault_reset()
    rig.advance(0.1)  # frames flow again after the restart
    rig.cart.fault_reset()
    assert rig.cart.state is State.SAFE


# ----------------------------------------------------------------------------- S10
def test_s10_over_temperature_faults():
    rig = Rig()
    rig.arm_and_emit(50)
    rig.world.faults["mcu_overtemp"] = True
    rig.advance(0.1)
    assert rig.cart.state is State.FAULT
    assert {f.code for f in rig.cart.faults} & {"OVER_TEMP", "MCU_OTEMP"}
    assert rig.output_mw == 0.0
    with pytest.raises(FaultActive):
        rig.cart.fault_reset()


def test_s10_config_caps_the_temperature_limit_at_60_c():
    with pytest.raises(ConfigError, match="max_temp_c"):
        make_config(laser={"max_temp_c": 70.0})


# ----------------------------------------------------------------------------- S12
def test_s12_a_crashed_controller_leaves_the_laser_off_and_a_restart_starts_safe():
    rig = Rig()
    rig.arm_and_emit(80)
    # the controller process dies: nothing more arrives on the link
    rig.advance(1.0, host_alive=False)
    assert rig.output_mw == 0.0
    from nirf.controller.cart import Cart
    from nirf.drivers.laser_mcu import McuLaser

    laser = McuLaser(lambda: LoopbackSerial(rig.mcu, rig.clock, timeout=0.05), clock=rig.clock, timeout_s=0.05)
    cart = Cart(rig.cfg, laser=laser, wheel=None, inputs=rig.io, indicators=rig.io, clock=rig.clock)
    cart.start()
    assert cart.state is State.SAFE
    assert rig.output_mw == 0.0
    cart.tick()  # it then reports the watchdog trip that happened while it was gone
    assert any(f.code == "MCU_WDOG" for f in cart.faults)


# ----------------------------------------------------------------------------- S13
def test_s13_photodiode_disagreeing_with_the_setpoint_faults():
    rig = Rig()
    rig.arm_and_emit(50)
    rig.advance(1.0)
    assert rig.cart.state is State.EMITTING  # a healthy photodiode agrees
    rig.world.faults["photodiode_gain"] = 0.7  # reads 30 % low
    rig.advance(0.5)
    assert rig.cart.state is State.FAULT
    assert rig.cart.faults[0].code == "OUTPUT_MISMATCH"
    assert rig.output_mw == 0.0


def test_s13_light_while_not_emitting_faults():
    rig = Rig()
    rig.advance(0.5)
    assert rig.cart.state is State.SAFE
    # a driver stage welded on: light leaves the diode behind the MCU's back
    rig.world.set_laser_drive(30.0)
    rig.advance(0.5)
    assert rig.cart.state is State.FAULT
    assert rig.cart.faults[0].code == "OUTPUT_MISMATCH"


def test_s10_the_controller_applies_its_own_lower_temperature_limit():
    # The diode idles at about 25 C; a 20 C limit is exceeded before the MCU's own limit.
    rig = Rig(laser={"max_temp_c": 20.0})
    rig.advance(0.1)
    assert rig.cart.state is State.FAULT
    assert [f.code for f in rig.cart.faults] == ["OVER_TEMP"]


# ----------------------------------------------------------------------------- S3a (v2)
def pulse(rig, name: str, ms: float) -> None:
    """Open the interlock (or turn the key off) for exactly ``ms`` between two ticks, as
    ``sim.set pulse`` does in the hardware process: the MCU hears both edges by interrupt,
    the host's GPIO listener both edges as callbacks."""
    opened = {"interlock": {"interlock": "open"}, "key": {"key": False}}[name]
    closed = {"interlock": {"interlock": "closed"}, "key": {"key": True}}[name]
    rig.world.set_inputs(opened)
    rig.clock.advance(ms / 1000.0)
    rig.world.set_inputs(closed)


def reach(rig, stage: str) -> None:
    rig.cart.arm()
    if stage != "ARMING":
        rig.advance(rig.cfg.safety.emission_delay_s + Rig.TICK_S)
    if stage == "EMITTING":
        rig.cart.laser_on(50)
        rig.advance(Rig.TICK_S)
        assert rig.output_mw > 0
    assert rig.cart.state.value == stage


def assert_no_light_until_reset_and_rearm(rig):
    """After a latched trip nothing emits by itself: not the next second, not after another
    laser.on, not before fault.reset and a new arm with the full delay."""
    for _ in range(50):
        rig.advance(Rig.TICK_S)
        assert rig.output_mw == 0.0
    with pytest.raises(WrongState):
        rig.cart.laser_on(50)
    with pytest.raises(FaultActive):
        rig.cart.arm()
    assert rig.output_mw == 0.0


@pytest.mark.parametrize("repeat", range(10))
@pytest.mark.parametrize("ms", [1, 2, 5, 10])
@pytest.mark.parametrize("name,code", [("interlock", "INTERLOCK_OPEN"), ("key", "KEY_OFF")])
@pytest.mark.parametrize("stage", ["ARMING", "ARMED", "EMITTING"])
def test_s3a_a_pulse_of_any_length_latches_fault(stage, name, code, ms, repeat):
    rig = Rig()
    reach(rig, stage)
    pulse(rig, name, ms)
    assert rig.cart.state is State.FAULT  # the edge callback, before any tick
    assert rig.output_mw == 0.0
    assert code in {f.code for f in rig.cart.faults}
    assert_no_light_until_reset_and_rearm(rig)


@pytest.mark.parametrize("ms", [1, 2, 5, 10])
@pytest.mark.parametrize("name,code", [("interlock", "INTERLOCK_OPEN"), ("key", "KEY_OFF")])
@pytest.mark.parametrize("stage", ["ARMING", "ARMED", "EMITTING"])
def test_s3a_the_mcu_edge_counters_trip_when_the_host_saw_no_edge(stage, name, code, ms):
    # The GPIO callbacks lost the pulse (say, a library debounce): the MCU's interrupt counted
    # it, and the rise of its counter trips at the next tick.
    rig = Rig()
    reach(rig, stage)
    rig.io._listeners.clear()
    pulse(rig, name, ms)
    assert rig.cart.state.value == stage  # the host has not heard yet
    rig.advance(Rig.TICK_S)
    assert rig.cart.state is State.FAULT
    assert code in {f.code for f in rig.cart.faults}
    assert rig.output_mw == 0.0
    assert_no_light_until_reset_and_rearm(rig)


@pytest.mark.parametrize("stage", ["ARMED", "EMITTING"])
def test_s3a_without_the_mcus_notice_the_backstop_status_read_still_trips(stage, monkeypatch):
    # the GPIO callbacks lost the pulse and so did the line carrying the MCU's own notice of
    # it: the counters still come with the next backstop read of the MCU's status
    from nirf.controller.cart import STATUS_BACKSTOP_S

    rig = Rig()
    reach(rig, stage)
    rig.io._listeners.clear()
    monkeypatch.setattr(rig, "relay_notices", lambda: rig.laser.poll())  # read, never handed on
    pulse(rig, "interlock", 1)
    ticks = 0
    while rig.cart.state.value == stage and ticks < 50:
        rig.advance(Rig.TICK_S)
        ticks += 1
    assert rig.cart.state is State.FAULT and "INTERLOCK_OPEN" in {f.code for f in rig.cart.faults}
    assert ticks * Rig.TICK_S <= STATUS_BACKSTOP_S + Rig.TICK_S + 1e-9
    assert rig.output_mw == 0.0


def test_the_mcus_status_is_read_on_its_events_and_at_the_backstop_not_on_every_tick():
    from nirf.controller.cart import STATUS_BACKSTOP_S

    rig = Rig()
    reach(rig, "EMITTING")
    rig.advance(0.2)  # settled: the MCU reports what the host asked
    reads, ticks = rig.cart.status_reads, rig.cart.ticks
    rig.advance(2.0)
    n_reads, n_ticks = rig.cart.status_reads - reads, rig.cart.ticks - ticks
    assert n_ticks == 100
    assert 2.0 / STATUS_BACKSTOP_S - 1 <= n_reads <= 2.0 / STATUS_BACKSTOP_S + 1
    # an input edge the MCU reports (its "! IN" notice): read at the very next tick
    rig.io._listeners.clear()
    reads = rig.cart.status_reads
    pulse(rig, "key", 1)
    rig.advance(Rig.TICK_S)
    assert rig.cart.status_reads == reads + 1 and rig.cart.state is State.FAULT
    # a change the host asked for is watched on every tick until the MCU reports it
    rig2 = Rig()
    reach(rig2, "ARMED")
    rig2.advance(0.2)
    reads = rig2.cart.status_reads
    rig2.cart.laser_on(50)
    rig2.advance(Rig.TICK_S)
    assert rig2.cart.status_reads >= reads + 1 and rig2.cart.mcu_status.output_on


def test_the_heartbeat_carries_the_backstop_status_read_in_one_exchange():
    # Steady emission: one exchange per heartbeat interval (HBST), no status read of its own,
    # and still a status reading at least every STATUS_BACKSTOP_S.
    from nirf.controller.cart import STATUS_BACKSTOP_S

    rig = Rig()
    reach(rig, "EMITTING")
    rig.advance(0.2)
    rig.mcu.executed.clear()
    reads = rig.cart.status_reads
    seen = []
    for _ in range(100):
        rig.advance(Rig.TICK_S)
        seen.append(rig.cart._last_status_at)
    names = [line.split(" ")[1] for line in rig.mcu.executed]
    interval = rig.cart.heartbeat_interval_s
    assert names.count("HBST") == pytest.approx(2.0 / interval, abs=1)
    assert names.count("HB") == 0 and names.count("ST") <= 1
    assert rig.cart.status_reads - reads >= 2.0 / STATUS_BACKSTOP_S - 1
    gaps = [b - a for a, b in zip(seen, seen[1:]) if b != a]
    assert max(gaps) <= STATUS_BACKSTOP_S + 1e-9
    assert rig.output_mw == pytest.approx(50.0, rel=0.2)


def test_s3a_an_opening_counted_while_safe_does_not_trip_a_later_arm():
    rig = Rig()
    rig.io._listeners.clear()
    pulse(rig, "interlock", 2)
    rig.cart.arm()
    rig.advance(rig.cfg.safety.emission_delay_s + Rig.TICK_S)
    assert rig.cart.state is State.ARMED and not rig.cart.faults


@pytest.mark.parametrize("off_s,counts", [(0.005, False), (0.1, False), (0.45, False), (0.5, True), (2.0, True)])
def test_s3a_a_key_cycle_is_off_for_at_least_half_a_second(off_s, counts):
    rig = Rig(**DEVICE_RULES)
    rig.world.set_inputs({"key": False})
    rig.clock.advance(off_s)
    rig.world.set_inputs({"key": True})
    rig.advance(Rig.TICK_S)
    if counts:
        rig.cart.arm()
        assert rig.cart.state is State.ARMING
    else:
        with pytest.raises(KeyOff, match="at least 0.5 s"):
            rig.cart.arm()


def test_s3a_a_key_glitch_is_no_key_cycle_for_a_reset_either():
    rig = Rig(**DEVICE_RULES)
    key_cycle(rig)
    rig.world.apply({"footswitch": True})
    rig.arm_and_emit(50)
    pulse(rig, "interlock", 5)
    assert rig.cart.state is State.FAULT
    pulse(rig, "key", 5)  # a glitch, not a turn of the key
    rig.advance(0.1)
    with pytest.raises(FaultActive, match="turn the key off"):
        rig.cart.fault_reset()
    key_cycle(rig)
    rig.cart.fault_reset()
    assert rig.cart.state is State.SAFE


# ----------------------------------------------------------------------------- S6a (v2)
ATTACK_TABLE = [[0.0, 0.0], [0.8, 40.0], [1.0, 50.0]]


def install(rig, points, factor=1.0):
    from nirf.controller.calibration import PowerCalibration

    cal = PowerCalibration(tuple(d for d, _ in points), tuple(p for _, p in points), factor, "test")
    rig.cart.install_calibration(cal)


def test_s6a_the_attack_table_is_refused_naming_the_limit():
    rig = Rig()
    rig.key_cycle()
    with pytest.raises(InvalidArgument, match=r"exceeds the limit .* mW \(20 % of the factory value"):
        install(rig, ATTACK_TABLE, 1.0)
    with pytest.raises(InvalidArgument, match="photodiode_factor 0.1 is more than 20 %"):
        install(rig, [[0.0, 0.0], [1.0, 500.0]], 0.1)
    assert rig.cart.calibration.calibration_id == "factory"


@pytest.mark.parametrize("why,prepare,needle", [
    ("not SAFE", lambda rig: (rig.key_cycle(), rig.cart.arm()), "only in SAFE"),
    ("no key cycle", lambda rig: None, "never since start"),
    ("key cycle too old", lambda rig: (rig.key_cycle(), rig.advance(61.0)), "within the 60 s"),
    ("a key glitch", lambda rig: pulse(rig, "key", 5), "never since start"),
])
def test_s6a_a_new_table_needs_safe_and_a_recent_key_cycle(why, prepare, needle):
    rig = Rig()
    prepare(rig)
    with pytest.raises(WrongState, match=needle):
        install(rig, [[0.0, 0.0], [1.0, 480.0]])
    assert rig.cart.calibration.calibration_id == "factory"


def _band_edge_tables():
    """Tables just inside the S6a band around the true (factory) curve 0..500 mW: the
    lowest and the highest allowed, and a zigzag between them."""
    duties = [i / 20 for i in range(21)]
    low = [[d, max(0.0, 0.8 * 500 * d - 0.02 * 500 + 1e-6)] for d in duties]
    low = [[d, p + i * 1e-3] for i, (d, p) in enumerate(low)]  # strictly rising
    high = [[d, 1.2 * 500 * d + 0.02 * 500 - 1e-6] for d in duties]
    zig = [[d, (lo if i % 2 else hi)] for i, ((d, lo), (_, hi)) in enumerate(zip(low, high))]
    zig = [pt for i, pt in enumerate(zig) if i == 0 or pt[1] > zig[i - 1][1]]
    return {"low": low, "high": high, "zigzag": zig}


@pytest.mark.parametrize("setpoint", [200.0, 150.0, 50.0])
@pytest.mark.parametrize("kind", ["low", "high", "zigzag"])
def test_s6a_no_table_inside_the_band_gets_light_above_1_1_x_max(kind, setpoint):
    # Whatever the outcome (emitting, refused at the MCU's ceiling, tripped by a monitor),
    # the true output never exceeds 1.1 x laser.max_power_mw.
    rig = Rig()
    rig.key_cycle()
    install(rig, _band_edge_tables()[kind])
    limit = 1.1 * rig.cfg.laser.max_power_mw
    rig.cart.arm()
    rig.advance(2.1)
    try:
        rig.cart.laser_on(setpoint)
    except InvalidArgument as err:
        assert "ceiling" in str(err)  # refused, never clipped
    for _ in range(50):
        rig.advance(Rig.TICK_S)
        assert rig.output_mw <= limit, f"{rig.output_mw} mW with table {kind} at {setpoint} mW"
    assert max(mw for _, mw in rig.world.laser_events()) <= limit


def test_s6a_a_stored_table_outside_the_band_is_refused_at_connect():
    from nirf.controller.calibration import PowerCalibration

    rig = Rig(start=False)
    rig.cart.calibration = PowerCalibration((0.0, 0.8, 1.0), (0.0, 40.0, 50.0), 0.1, "power-tampered")
    rig.start()
    assert rig.cart.calibration.calibration_id == "factory"
    assert any("power-tampered" in p and "refused" in p for p in rig.cart.calibration_problems)


def test_s6a_every_on_and_set_carries_the_expected_mw():
    rig = Rig()
    sent = []
    real_duty, real_en = rig.laser.set_duty, rig.laser.set_enabled
    rig.laser.set_duty = lambda d, mw: (sent.append(("duty", d, mw)), real_duty(d, mw))[1]
    rig.laser.set_enabled = lambda on, mw=0.0: (sent.append(("en", on, mw)), real_en(on, mw))[1]
    rig.arm_and_emit(60)
    rig.cart.laser_set(80)
    rig.advance(Rig.TICK_S)
    assert ("duty", pytest.approx(60 / 500), 60.0) in sent and ("en", True, 60.0) in sent
    assert ("duty", pytest.approx(80 / 500), 80.0) in sent


# ----------------------------------------------------------------------------- S7a (v2)
def lit_seconds(rig, t0_ns: int, t1_ns: int) -> float:
    """Seconds with light out of the cart in [t0, t1], from the world's own record."""
    events = rig.world.laser_events()
    total = 0.0
    for (t, mw), nxt in zip(events, events[1:] + [(t1_ns, 0.0)]):
        a, b = max(t, t0_ns), min(nxt[0], t1_ns)
        if mw > 0 and b > a:
            total += (b - a) / 1e9
    return total


def test_s7a_reissuing_laser_on_cannot_exceed_the_budget():
    rig = Rig(laser={"max_emission_s": 3.0})
    rig.world.laser_history_s = 60.0
    rig.cart.arm()
    rig.advance(2.1)
    t0 = rig.clock.time_ns()
    refusals = []
    for _ in range(12):  # the attack: off and on again every second for 12 s
        try:
            rig.cart.laser_off()
            rig.cart.laser_on(50)
        except WrongState as err:
            refusals.append(str(err))
        rig.advance(1.0)
    t1 = rig.clock.time_ns()
    # at most max_emission_s in any window of twice that (one tick of slack for the check)
    for start in range(0, 61):  # every window of 6 s, in steps of 0.1 s
        w0 = t0 + int(start * 1e8)
        assert lit_seconds(rig, w0, w0 + int(6e9)) <= 3.0 + Rig.TICK_S
    assert lit_seconds(rig, t0, t1) <= 6.0 + 2 * Rig.TICK_S  # two windows' worth in 12 s
    assert refusals and all(re.search(r"wait \d+ s", r) for r in refusals)


def test_s7a_the_refusal_lasts_until_enough_budget_is_free():
    rig = Rig(laser={"max_emission_s": 3.0})
    rig.arm_and_emit(50)
    rig.advance(3.2)
    assert rig.cart.state is State.ARMED and rig.output_mw == 0.0
    with pytest.raises(WrongState, match=r"wait (\d+) s") as err:
        rig.cart.laser_on(50)
    wait = int(re.search(r"wait (\d+) s", str(err.value)).group(1))
    # with a 3 s budget, "60 s free" becomes half the budget: free again at 7.5 s of the 6 s
    # window that began with the emission, 4.3 s from now
    assert wait == 5
    rig.advance(wait - 1.0)
    with pytest.raises(WrongState):
        rig.cart.laser_on(50)
    rig.advance(1.1)
    rig.cart.laser_on(50)
    rig.advance(Rig.TICK_S)
    assert rig.output_mw > 0


def test_s7a_the_budget_survives_disarm_reset_and_a_restart(tmp_path):
    path = tmp_path / "budget.json"
    rig = Rig(laser={"max_emission_s": 10.0}, budget_path=path)
    rig.arm_and_emit(50)
    rig.advance(4.0)
    rig.cart.disarm()  # disarm does not give the time back
    rig.arm_and_emit(50)
    rig.advance(3.0)
    pulse(rig, "interlock", 2)  # a trip, then a reset: the time stays used
    rig.advance(0.1)
    rig.cart.fault_reset()
    # a restart of the safety core: a new cart on the same state folder (the MCU's budget is
    # 1800 s here, so its count hardly matters: the host's persisted record must hold)
    assert rig.cart.budget.flush()
    from nirf.controller.cart import Cart

    cart = Cart(rig.cfg, laser=rig.laser, wheel=None, inputs=rig.io, indicators=rig.io, clock=rig.clock,
                budget_path=path)
    cart.start()
    cart.tick()
    assert 6.9 <= cart.budget.used_s() <= 7.2
    cart.arm()
    for _ in range(int(2.1 / Rig.TICK_S)):
        rig.clock.advance(Rig.TICK_S)
        rig.mcu.tick()
        cart.tick()
    cart.laser_on(50)
    lit = 0.0
    for _ in range(int(6.0 / Rig.TICK_S)):
        rig.clock.advance(Rig.TICK_S)
        rig.mcu.tick()
        cart.tick()
        lit += Rig.TICK_S if rig.output_mw > 0 else 0.0
    assert 2.8 <= lit <= 3.0 + 2 * Rig.TICK_S  # the 3 s left of the 10 s budget, no more
    with pytest.raises(WrongState, match="wait"):
        cart.laser_off()
        cart.laser_on(50)


def test_s7a_the_mcu_count_wins_when_it_is_larger():
    rig = Rig(laser={"max_emission_s": 10.0}, mcu_budget_s=10.0)  # the same budget in both
    rig.arm_and_emit(50)
    rig.advance(6.0)
    rig.cart.disarm()
    # a new safety core without the host's record (memory only): the MCU still counts 6 s
    from nirf.controller.cart import Cart

    cart = Cart(rig.cfg, laser=rig.laser, wheel=None, inputs=rig.io, indicators=rig.io, clock=rig.clock)
    cart.start()
    cart.tick()
    assert cart.budget.used_s() == 0.0
    assert cart.safety_status()["emission_budget"]["used_s"] >= 5.9
    cart.arm()
    lit = 0.0
    for i in range(int(8.0 / Rig.TICK_S)):
        rig.clock.advance(Rig.TICK_S)
        rig.mcu.tick()
        cart.tick()
        if i == int(2.1 / Rig.TICK_S):
            cart.laser_on(50)
        lit += Rig.TICK_S if rig.output_mw > 0 else 0.0
    assert lit <= 4.0 + 2 * Rig.TICK_S


# ----------------------------------------------------------------------------- S16 (v2)
class SteppingStop:
    """A stop event whose wait moves the manual clock (and the MCU) on instead of sleeping,
    so :meth:`Cart.run` runs minutes of its real schedule in a moment."""

    def __init__(self, rig, until_s: float):
        self.rig = rig
        self.until = rig.clock.monotonic() + until_s

    def is_set(self) -> bool:
        return self.rig.clock.monotonic() >= self.until

    def wait(self, seconds: float) -> bool:
        self.rig.clock.advance(max(seconds, 1e-6))
        self.rig.mcu.tick()
        return self.is_set()


@pytest.mark.parametrize("rate_hz,interval_ms", [(50.0, 100), (50.0, 70), (33.0, 100), (20.0, 150)])
def test_s16_the_heartbeat_keeps_its_own_deadline(rate_hz, interval_ms):
    rig = Rig(safety={"supervisor_rate_hz": rate_hz, "heartbeat_interval_ms": interval_ms})
    rig.cart.heartbeat_sent.clear()
    rig.cart.run(SteppingStop(rig, 20.0))
    times = list(rig.cart.heartbeat_sent)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) >= 20.0 / (interval_ms / 1000.0) - 2
    assert max(abs(g - interval_ms / 1000.0) for g in gaps) < 1e-6
    stats = rig.cart.heartbeat_stats()
    assert stats["median_gap_ms"] == pytest.approx(interval_ms, abs=0.01)


def test_s16_ticks_alone_keep_the_heartbeat_grid():
    # ticks that never land on a deadline (every 19.9 ms): each heartbeat goes at the first
    # tick after its deadline and the next deadline stays on the grid, so the mean gap is the
    # interval (version 1: "at least the interval since the last", about 119 ms)
    rig = Rig()
    rig.cart.heartbeat_sent.clear()
    for _ in range(int(20.0 / 0.0199)):
        rig.clock.advance(0.0199)
        rig.mcu.tick()
        rig.cart.tick()
    times = list(rig.cart.heartbeat_sent)
    mean_gap = (times[-1] - times[0]) / (len(times) - 1)
    assert mean_gap == pytest.approx(0.100, abs=0.001)


@pytest.mark.parametrize("interval,timeout,ok", [(100, 500, True), (250, 500, True), (260, 500, False),
                                                 (100, 150, False)])
def test_s16_the_interval_is_at_most_half_the_timeout(interval, timeout, ok):
    kw = dict(safety={"heartbeat_interval_ms": interval, "heartbeat_timeout_ms": timeout})
    if ok:
        assert make_config(**kw).safety.heartbeat_interval_ms == interval
    else:
        with pytest.raises(ConfigError, match="heartbeat_interval_ms"):
            make_config(**kw)


# ----------------------------------------------------------------------------- error paths (v2)
def test_without_the_factory_record_nothing_emits_and_no_table_is_taken():
    from nirf.hal.errors import DeviceError

    rig = Rig(start=False)
    def no_record():
        raise DeviceError("laser-mcu", "no factory record: blank MCU")
    rig.laser.factory = no_record
    rig.start()
    assert rig.cart.factory is None
    assert any("factory record cannot be read" in p for p in rig.cart.calibration_problems)
    rig.cart.arm()
    rig.advance(2.1)
    with pytest.raises(WrongState, match="factory record"):
        rig.cart.laser_on(50)
    rig.cart.disarm()
    rig.key_cycle()
    with pytest.raises(WrongState, match="factory record"):
        install(rig, [[0.0, 0.0], [1.0, 500.0]])
    assert rig.output_mw == 0.0


def test_a_heartbeat_between_ticks_that_fails_latches_serial_link():
    from nirf.hal.errors import DeviceTimeout

    rig = Rig()
    rig.arm_and_emit(50)
    def silent():
        raise DeviceTimeout("laser-mcu", "no reply to HBST")
    rig.laser.heartbeat = rig.laser.heartbeat_status = silent
    rig.clock.advance(0.2)
    rig.cart._heartbeat_between_ticks(rig.clock.monotonic())
    assert rig.cart.state is State.FAULT and rig.cart.faults[0].code == "SERIAL_LINK"
    rig.advance(0.7, host_alive=False)  # the MCU's watchdog covers a link that is gone
    assert rig.output_mw == 0.0
