"""How the stand-ins that live in the controller's process (the RPi.GPIO stand-in, the
picamera2 stand-in) see the world.

In the running simulated cart the world lives in the hardware process and
:class:`nirf.sim.remote.RemoteWorldView` mirrors it over the simulator's own sockets. In tests
:class:`LocalWorldView` wraps a :class:`~sim.world.World` in the same process.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Protocol

from nirf.sim.world import SceneSnapshot, SensorModel, Trigger, World

InputsListener = Callable[[dict], None]


class WorldView(Protocol):
    sensor: SensorModel

    def inputs(self) -> dict:
        """``{"key": bool, "interlock_closed": bool, "footswitch": bool}``"""

    def add_input_listener(self, listener: InputsListener) -> None:
        """``listener(inputs)`` is called with the new inputs map whenever one changes."""

    def set_output(self, name: str, value: bool) -> None:
        """Drive a world output: ``"indicator"`` or ``"white_light"``."""

    def scene(self) -> SceneSnapshot: ...

    def laser_mean_mw(self, t0_ns: int, t1_ns: int) -> float:
        """The laser's optical output averaged over [t0, t1] (wall clock ns)."""

    def wait_trigger(self, timeout_s: float) -> Trigger | None:
        """The next camera trigger from the MCU, or None after ``timeout_s``."""

    def now_ns(self) -> int:
        """The world's wall clock."""


class LocalWorldView:
    """A :class:`WorldView` over a World in this process."""

    def __init__(self, world: World):
        self.world = world
        self.sensor = world.sensor
        self._triggers: collections.deque[Trigger] = collections.deque(maxlen=256)
        self._cond = threading.Condition()
        self._input_listeners: list[InputsListener] = []
        world.add_listener(self._on_world)

    def _on_world(self, kind: str, payload: dict) -> None:
        if kind == "trigger":
            with self._cond:
                self._triggers.append(Trigger(payload["counter"], payload["t_start_ns"], payload["lit"],
                                              exposure_ns=int(payload.get("exposure_ns", 0)),
                                              pulse_us=int(payload.get("pulse_us", 0))))
                self._cond.notify_all()
        elif kind == "inputs":
            for listener in list(self._input_listeners):
                listener(dict(payload))

    def inputs(self) -> dict:
        return self.world.inputs()

    def add_input_listener(self, listener: InputsListener) -> None:
        self._input_listeners.append(listener)

    def set_output(self, name: str, value: bool) -> None:
        self.world.set_output(name, value)

    def scene(self) -> SceneSnapshot:
        return self.world.scene()

    def laser_mean_mw(self, t0_ns: int, t1_ns: int) -> float:
        return self.world.laser_mean_mw(t0_ns, t1_ns)

    def wait_trigger(self, timeout_s: float) -> Trigger | None:
        with self._cond:
            if not self._triggers:
                self._cond.wait(timeout_s)
            return self._triggers.popleft() if self._triggers else None

    def pending_triggers(self) -> int:
        with self._cond:
            return len(self._triggers)

    def now_ns(self) -> int:
        return self.world._clock.time_ns()
