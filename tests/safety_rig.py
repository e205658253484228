"""A cart on a manual clock for safety tests: the real Cart, the real MCU driver and the
real MCU emulator (over a loopback serial line), the world model, and safety I/O wired
straight to the world. Nothing runs in the background; ``advance`` moves time in
supervisor ticks."""

from __future__ import annotations

from nirf import config as config_mod
from nirf.controller.cart import Cart
from nirf.drivers.laser_mcu import McuLaser
from nirf.hal.clock import ManualClock
from nirf.hal.errors import DeviceError
from nirf.hal.safety_io import FOOTSWITCH, INTERLOCK, KEY, Indicators, SafetyInputs
from nirf.sim.mcu_emulator import McuEmulator, factory_for
from nirf.sim.serial_link import LoopbackSerial
from nirf.sim.world import SensorModel, World


def make_config(**sections) -> config_mod.Config:
    """A validated config: the sim profile's defaults with the given sections overridden,
    e.g. ``make_config(safety={"emission_delay_s": 1.0})``."""
    data = {"cart": {"profile": "sim"}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_mod.Config("<test>", config_mod.validate(data, "<test>"))


class WorldIO(SafetyInputs, Indicators):
    """Safety inputs and indicators read from and written to the world, with edge
    callbacks delivered synchronously (so tests are deterministic)."""

    def __init__(self, world: World):
        self.world = world
        self._listeners = []
        self._last = world.inputs()
        world.add_listener(self._on_world)

    def _on_world(self, kind, payload):
        if kind != "inputs":
            return
        names = {"key": KEY, "interlock_closed": INTERLOCK, "footswitch": FOOTSWITCH}
        for k, name in names.items():
            if payload[k] != self._last.get(k):
                for listener in list(self._listeners):
                    listener(name, payload[k])
        self._last = dict(payload)

    def key_on(self):
        return self.world.inputs()["key"]

    def interlock_closed(self):
        return self.world.inputs()["interlock_closed"]

    def footswitch_pressed(self):
        return self.world.inputs()["footswitch"]

    def add_listener(self, listener):
        self._listeners.append(listener)

    def set_emission_indicator(self, on):
        self.world.set_output("indicator", on)

    def emission_indicator(self):
        return self.world.indicator

    def set_white_light(self, on):
        self.world.set_output("white_light", on)


class Rig:
    """The safety-relevant part of the cart on a manual clock."""

    TICK_S = 0.02

    def __init__(self, *, footswitch_in_series: bool = False, budget_path=None, mcu_budget_s: float = 1800.0,
                 clock: ManualClock | None = None, world: World | None = None, mcu: McuEmulator | None = None,
                 start: bool = True, **sections):
        # the cart's own period matches the rig's ticks unless a test sets another rate
        sections["safety"] = {"supervisor_rate_hz": 1.0 / self.TICK_S, **sections.get("safety", {})}
        self.cfg = make_config(**sections)
        self.clock = clock or ManualClock()
        self.world = world or World(self.clock, SensorModel(width=64, height=48),
                                    footswitch_in_series=footswitch_in_series)
        lc = self.cfg.laser
        # the factory record as the sim profile's hardware writes it: the true (linear) curve,
        # the ceiling and optical trip at 1.1 x laser.max_power_mw; the MCU's own budget
        # generous by default, so the host's budget (S7a) is tested on its own
        self.mcu = mcu or McuEmulator(self.world, self.clock, full_scale_mw=lc.full_scale_mw,
                                      heartbeat_timeout_ms=self.cfg.safety.heartbeat_timeout_ms,
                                      factory=factory_for(lc.full_scale_mw, lc.max_power_mw, mcu_budget_s))
        self.ports = []
        self.laser = McuLaser(self._new_port, clock=self.clock, timeout_s=0.05, retries=2,
                              heartbeat_timeout_ms=self.cfg.safety.heartbeat_timeout_ms)
        self.io = WorldIO(self.world)
        self.cart = Cart(self.cfg, laser=self.laser, wheel=None, inputs=self.io, indicators=self.io,
                         clock=self.clock, budget_path=budget_path)
        # the indicator's history, from the world's own record of its outputs
        self.indicator_on_since = None
        self.world.add_listener(self._on_world)
        if start:
            self.start()

    def start(self) -> None:
        """Connect (the factory record is read and the host table checked against it)."""
        self.cart.start()
        self.cart.tick()

    def _new_port(self):
        port = LoopbackSerial(self.mcu, self.clock, timeout=0.05)
        self.ports.append(port)
        return port

    def _on_world(self, kind, payload):
        if kind == "outputs":
            if payload["indicator"] and self.indicator_on_since is None:
                self.indicator_on_since = self.clock.monotonic()
            elif not payload["indicator"]:
                self.indicator_on_since = None

    def advance(self, seconds: float, *, host_alive: bool = True, camera_frames: bool = True) -> None:
        """Move time on in supervisor ticks. ``host_alive=False`` freezes the controller
        (only the MCU runs); ``camera_frames`` reports a fresh frame each tick while the
        camera is watched."""
        steps = max(1, int(round(seconds / self.TICK_S)))
        for _ in range(steps):
            self.clock.advance(self.TICK_S)
            self.mcu.tick()
            if host_alive:
                if camera_frames and self.cart.camera_watch:
                    self.cart.note_camera(True, self.clock.monotonic())
                self.relay_notices()
                self.cart.tick()

    def relay_notices(self) -> None:
        """What the safety core's frames thread does: take in what the MCU sent on its own
        and hand its notices to the cart (an input edge or a fault wakes the supervisor)."""
        try:
            _, notices = self.laser.poll()
        except DeviceError:
            return  # a dead link: the supervisor finds out on its own
        self.cart.on_mcu_notices(notices)

    def mcu_status_lost(self) -> bool:
        """True when the cart has no MCU status now (a dead or garbled link): it cannot have
        heard the MCU's counters then."""
        return self.cart.mcu_status is None or not self.cart._link_ok

    @property
    def output_mw(self) -> float:
        return self.world.laser_output_mw()

    def key_cycle(self, off_s: float = 0.6) -> None:
        """Turn the key off for ``off_s`` and on again at the cart (S3a: >= 0.5 s is a cycle)."""
        self.world.apply({"key": False})
        self.advance(off_s)
        self.world.apply({"key": True})
        self.advance(self.TICK_S)

    def arm_and_emit(self, power_mw: float = 50.0) -> None:
        self.cart.arm()
        self.advance(self.cfg.safety.emission_delay_s + self.TICK_S)
        self.cart.laser_on(power_mw)
        self.advance(self.TICK_S)
