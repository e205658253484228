"""Safety inputs (key switch, interlock loop, foot switch) and indicator outputs.

In hardware the key and interlock are in series with the laser driver's enable; these
readings let the software refuse and trip early and report what happened.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

# Input names used in callbacks.
KEY = "key"
INTERLOCK = "interlock"
FOOTSWITCH = "footswitch"

InputListener = Callable[[str, bool], None]
"""Called as ``listener(name, value)`` from the driver's thread on a debounced edge.
``value`` is True for key on, interlock closed, foot switch pressed."""


class SafetyInputs(ABC):
    device = "gpio"

    @abstractmethod
    def key_on(self) -> bool: ...

    @abstractmethod
    def interlock_closed(self) -> bool: ...

    @abstractmethod
    def footswitch_pressed(self) -> bool: ...

    @abstractmethod
    def add_listener(self, listener: InputListener) -> None: ...


class Indicators(ABC):
    device = "gpio"

    @abstractmethod
    def set_emission_indicator(self, on: bool) -> None: ...

    @abstractmethod
    def emission_indicator(self) -> bool: ...

    @abstractmethod
    def set_white_light(self, on: bool) -> None: ...
