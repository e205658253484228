"""Emission filter wheel (reference: Thorlabs FW102C, 6 positions)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from nirf.hal.errors import InvalidArgument


class FilterWheel(ABC):
    """A motorised filter wheel with positions numbered from 1.

    ``move`` returns only once the wheel reports the requested position, or raises
    ``WheelStuck`` (a ``DeviceTimeout``) naming the wheel and the position.
    """

    device = "filter-wheel"

    @abstractmethod
    def connect(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def identity(self) -> str: ...

    @abstractmethod
    def position_count(self) -> int: ...

    @abstractmethod
    def position(self) -> int: ...

    def move(self, position: int, timeout_s: float = 5.0) -> int:
        if isinstance(position, bool) or not isinstance(position, int):
            raise InvalidArgument(f"filter position {position!r} is not a whole number")
        count = self.position_count()
        if not 1 <= position <= count:
            raise InvalidArgument(f"filter position {position} outside 1-{count}")
        return self._do_move(position, timeout_s)

    @abstractmethod
    def _do_move(self, position: int, timeout_s: float) -> int: ...
