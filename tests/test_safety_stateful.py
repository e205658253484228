"""Random sequences of commands and world events against the cart, checking after every
step that light leaves the cart only when every safety condition holds (PRODUCT S2):
key on, interlock closed, state ARMED or EMITTING, the emission indicator on for at least
the emission delay, and no fault latched.

Version 2 draws interlock and key pulses of 1-10 ms (S3a: each one in ARMING, ARMED or
EMITTING latches FAULT, whether or not the host's GPIO callback heard it), foot-switch
pulses, key cycles and ``calibrate.power`` tables inside and outside the S6a band (the true
output never exceeds 1.1 x ``laser.max_power_mw``), and checks the S7a budget against the
world's own record of the light."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nirf.controller.calibration import PowerCalibration
from nirf.controller.state import State
from nirf.hal.errors import NirfError
from tests.safety_rig import Rig

MAX_EMISSION_S = 20.0
# tables a calibrate.power command could send (the true curve is 500 mW x duty)
TABLES = {
    "attack": ([0.0, 0.8, 1.0], [0.0, 40.0, 50.0], 0.1),
    "band_low": ([0.0, 0.1, 0.5, 1.0], [0.0, 30.0, 190.0, 390.0], 1.0),
    "band_high": ([0.0, 0.5, 1.0], [9.9, 309.9, 609.9], 1.0),
    "outside_high": ([0.0, 0.5, 1.0], [0.0, 320.0, 620.0], 1.0),
    "factor_low": ([0.0, 1.0], [0.0, 500.0], 0.75),
    "true": ([0.0, 1.0], [0.0, 500.0], 1.0),
}

POWERS = st.sampled_from([10.0, 50.0, 120.0, 200.0, 250.0, 0.0, -1.0, float("nan")])


class CartSafety(RuleBasedStateMachine):
    @initialize(device_rules=st.booleans())
    def start(self, device_rules):
        safety = {"emission_delay_s": 1.0}
        if device_rules:
            safety.update(footswitch_required=True, boot_requires_key_cycle=True, reset_requires_key_cycle=True)
        self.rig = Rig(safety=safety, laser={"max_emission_s": MAX_EMISSION_S}, footswitch_in_series=False)
        self.rig.world.laser_history_s = 1e6  # the whole run, for the budget invariant
        self.rig.cart.note_camera(True, self.rig.clock.monotonic())
        self.camera_alive = True

    # -- commands ---------------------------------------------------------------------
    def _try(self, fn, *args):
        try:
            fn(*args)
        except NirfError:
            pass

    @rule()
    def arm(self):
        self._try(self.rig.cart.arm)

    @rule()
    def disarm(self):
        self._try(self.rig.cart.disarm)

    @rule(power=POWERS)
    def laser_on(self, power):
        self._try(self.rig.cart.laser_on, power)

    @rule(wait_s=st.sampled_from([0.3, 0.9, 0.98, 1.0, 1.02, 1.5]), power=POWERS)
    def arm_wait_and_emit(self, wait_s, power):
        """The sequence an operator (or an impatient script) uses, with waits around the
        emission delay."""
        self._try(self.rig.cart.arm)
        self.rig.advance(wait_s, camera_frames=self.camera_alive)
        self._try(self.rig.cart.laser_on, power)
        self.rig.advance(0.02, camera_frames=self.camera_alive)

    @rule(power=POWERS)
    def laser_set(self, power):
        self._try(self.rig.cart.laser_set, power)

    @rule()
    def laser_off(self):
        self._try(self.rig.cart.laser_off)

    @rule()
    def fault_reset(self):
        self._try(self.rig.cart.fault_reset)

    # -- the world --------------------------------------------------------------------
    @rule(closed=st.booleans())
    def interlock(self, closed):
        self.rig.world.apply({"interlock": "closed" if closed else "open"})

    @rule(on=st.booleans())
    def key(self, on):
        self.rig.world.apply({"key": on})

    @rule(pressed=st.booleans())
    def footswitch(self, pressed):
        self.rig.world.apply({"footswitch": pressed})

    @rule(hot=st.booleans())
    def overtemp(self, hot):
        self.rig.world.faults["mcu_overtemp"] = hot

    @rule(gain=st.sampled_from([1.0, 1.0, 0.5, 1.5]))
    def photodiode(self, gain):
        self.rig.world.faults["photodiode_gain"] = gain

    @rule(p=st.sampled_from([0.0, 0.0, 0.2, 1.0]))
    def serial_noise(self, p):
        self.rig.world.faults["serial_corruption"] = p

    @rule(alive=st.booleans())
    def camera(self, alive):
        self.camera_alive = alive

    @rule(seconds=st.sampled_from([0.02, 0.1, 0.5, 1.2, 3.0]))
    def time_passes(self, seconds):
        self.rig.advance(seconds, camera_frames=self.camera_alive)

    @rule(seconds=st.sampled_from([0.2, 0.8]))
    def host_freezes(self, seconds):
        self.rig.advance(seconds, host_alive=False)

    # -- v2: pulses, key cycles, calibrations --------------------------------------------
    @rule(name=st.sampled_from(["interlock", "key"]), ms=st.sampled_from([1, 2, 5, 10]), heard=st.booleans())
    def pulse(self, name, ms, heard):
        """S3a: an opening of any length in an active state latches FAULT, from the GPIO edge
        or, when the host's callback lost it (``heard`` false), from the MCU's counter at the
        next tick."""
        rig = self.rig
        if not rig.world.inputs()["key"] or not rig.world.inputs()["interlock_closed"]:
            return
        was_active = rig.cart.state.active
        listeners = list(rig.io._listeners)
        if not heard:
            rig.io._listeners.clear()
        opened, closed = ({"interlock": "open"}, {"interlock": "closed"}) if name == "interlock" \
            else ({"key": False}, {"key": True})
        rig.world.set_inputs(opened)
        rig.clock.advance(ms / 1000.0)
        rig.world.set_inputs(closed)
        rig.io._listeners[:] = listeners
        rig.advance(0.02, camera_frames=self.camera_alive)
        if was_active and not rig.mcu_status_lost():
            assert rig.cart.state is State.FAULT, f"a {ms} ms {name} pulse did not latch"

    @rule(ms=st.sampled_from([2, 30]))
    def footswitch_pulse(self, ms):
        rig = self.rig
        before = rig.world.inputs()["footswitch"]
        rig.world.set_inputs({"footswitch": not before})
        rig.clock.advance(ms / 1000.0)
        rig.world.set_inputs({"footswitch": before})

    @rule(off_s=st.sampled_from([0.005, 0.3, 0.6]))
    def key_cycle(self, off_s):
        self.rig.world.apply({"key": False})
        self.rig.advance(off_s, camera_frames=self.camera_alive)
        self.rig.world.apply({"key": True})

    @rule(name=st.sampled_from(sorted(TABLES)))
    def calibrate(self, name):
        duty, mw, factor = TABLES[name]
        self._try(self.rig.cart.install_calibration, PowerCalibration(tuple(duty), tuple(mw), factor, name))

    # -- what must always hold ----------------------------------------------------------
    @invariant()
    def light_only_when_every_condition_holds(self):
        rig = self.rig
        if rig.output_mw <= 0:
            return
        inputs = rig.world.inputs()
        cart = rig.cart
        assert inputs["key"], "light with the key off"
        assert inputs["interlock_closed"], "light with the interlock open"
        # ARMED means permitted but off: light belongs to EMITTING alone
        assert cart.state is State.EMITTING, f"light in state {cart.state}"
        assert rig.world.indicator, "light with the indicator off"
        assert rig.indicator_on_since is not None
        on_for = rig.clock.monotonic() - rig.indicator_on_since
        assert on_for >= cart.emission_delay_s, f"light after the indicator was on only {on_for:.3f} s"
        assert not cart.faults, f"light with faults latched: {[f.code for f in cart.faults]}"

    @invariant()
    def never_above_1_1_x_max_for_more_than_5_ms(self):
        rig = self.rig
        limit = 1.1 * rig.cfg.laser.max_power_mw
        events = rig.world.laser_events()
        over_since = None
        for t, mw in events:
            if mw > limit and over_since is None:
                over_since = t
            elif mw <= limit and over_since is not None:
                assert t - over_since <= 5_000_000, f"{(t - over_since) / 1e6:.1f} ms above {limit} mW"
                over_since = None
        if over_since is not None:
            assert rig.clock.time_ns() - over_since <= 5_000_000

    @invariant()
    def the_emission_budget_holds(self):
        """S7a, judged from the world's record: at most max_emission_s of light in the window
        of twice that ending now (plus a tick for the check's own granularity)."""
        rig = self.rig
        now = rig.clock.time_ns()
        start = now - int(2 * MAX_EMISSION_S * 1e9)
        events = rig.world.laser_events()
        lit, value, since = 0.0, 0.0, start
        for t, mw in events:
            if t <= start:
                value = mw
                continue
            if value > 0:
                lit += (t - since) / 1e9
            value, since = mw, t
        if value > 0:
            lit += (now - since) / 1e9
        assert lit <= MAX_EMISSION_S + 2 * rig.TICK_S, f"{lit:.2f} s of light in {2 * MAX_EMISSION_S} s"

    @invariant()
    def indicator_matches_the_state(self):
        cart = self.rig.cart
        assert self.rig.world.indicator == cart.state.active


CartSafety.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
TestCartSafety = CartSafety.TestCase
# Hundreds of stateful steps: in the full run, not the quick one.
TestCartSafety = pytest.mark.slow(TestCartSafety)
