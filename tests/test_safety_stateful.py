"""Random sequences of commands and world events against the cart, checking after every
step that light leaves the cart only when every safety condition holds (PRODUCT S2):
key on, interlock closed, state ARMED or EMITTING, the emission indicator on for at least
the emission delay, and no fault latched."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from controller.state import State
from hal.errors import NirfError
from tests.safety_rig import Rig

POWERS = st.sampled_from([10.0, 50.0, 120.0, 200.0, 250.0, 0.0, -1.0, float("nan")])


class CartSafety(RuleBasedStateMachine):
    @initialize(device_rules=st.booleans())
    def start(self, device_rules):
        safety = {"emission_delay_s": 1.0}
        if device_rules:
            safety.update(footswitch_required=True, boot_requires_key_cycle=True, reset_requires_key_cycle=True)
        self.rig = Rig(safety=safety, laser={"max_emission_s": 20.0}, footswitch_in_series=False)
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
    def indicator_matches_the_state(self):
        cart = self.rig.cart
        assert self.rig.world.indicator == cart.state.active


CartSafety.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
TestCartSafety = CartSafety.TestCase
# Hundreds of stateful steps: in the full run, not the quick one.
TestCartSafety = pytest.mark.slow(TestCartSafety)
