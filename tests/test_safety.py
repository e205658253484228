"""Each laser safety rule of the product (S1-S13), with a test that fails if the rule is
removed. The cart runs on a manual clock against the real MCU emulator and driver."""

from __future__ import annotations

import pytest

from controller.cart import Readings, emission_permitted
from controller.state import State
from hal.errors import ConfigError, FaultActive, InterlockOpen, InvalidArgument, KeyOff, WrongState
from sim.serial_link import LoopbackSerial
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
    from controller.cart import Cart
    from drivers.laser_mcu import McuLaser

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
    from controller.cart import Cart
    from drivers.laser_mcu import McuLaser

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
