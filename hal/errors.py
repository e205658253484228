"""The project's error hierarchy.

Every error the cart raises on purpose derives from :class:`NirfError`. Errors that a
bus client can see carry a protocol ``code`` (PROTOCOL: error codes) so the command server
maps them to a reply without a lookup table. Where a matching built-in exception exists
the error subclasses it too (``DeviceTimeout`` is a ``TimeoutError``), so generic callers
can still catch them.
"""

from __future__ import annotations


class NirfError(Exception):
    """Base of every error the cart raises on purpose."""

    code = "DEVICE_ERROR"


# --- configuration ------------------------------------------------------------------


class ConfigError(NirfError, ValueError):
    """A configuration file is unreadable, has an unknown key or a value out of range."""

    code = "INVALID_ARGUMENT"


# --- devices ------------------------------------------------------------------------


class DeviceError(NirfError):
    """A device failed or answered something it should not have.

    ``device`` names the device (``"laser-mcu"``, ``"filter-wheel"``, ``"camera"``,
    ``"gpio"``) so an operator knows where to look.
    """

    code = "DEVICE_ERROR"

    def __init__(self, device: str, message: str):
        super().__init__(f"{device}: {message}")
        self.device = device


class DeviceTimeout(DeviceError, TimeoutError):
    """A device did not answer within its time limit."""

    code = "TIMEOUT"


class ProtocolError(DeviceError):
    """A device's replies stayed malformed or corrupted after the bounded retries."""


class DeviceDisconnected(DeviceError, ConnectionError):
    """The device's port went away (unplugged, USB re-enumeration)."""


class DeviceRejected(DeviceError):
    """The device understood a command and refused it (e.g. a duty above its ceiling)."""


class CameraStall(DeviceTimeout):
    """The camera delivered no frame within its timeout."""


class WheelStuck(DeviceTimeout):
    """The filter wheel did not reach the requested position in time."""


# --- commands refused ---------------------------------------------------------------


class CommandRefused(NirfError):
    """A command was understood and refused; ``code`` is the protocol error code."""

    code = "BAD_REQUEST"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(CommandRefused):
    code = "BAD_REQUEST"


class UnknownCommand(CommandRefused):
    code = "UNKNOWN_COMMAND"


class InvalidArgument(CommandRefused, ValueError):
    code = "INVALID_ARGUMENT"


class NotPermitted(CommandRefused, PermissionError):
    code = "NOT_PERMITTED"


class WrongState(CommandRefused):
    code = "WRONG_STATE"


class KeyOff(CommandRefused):
    code = "KEY_OFF"


class InterlockOpen(CommandRefused):
    code = "INTERLOCK_OPEN"


class FaultActive(CommandRefused):
    code = "FAULT_ACTIVE"


class NoCase(CommandRefused):
    code = "NO_CASE"


class NotAvailable(CommandRefused):
    code = "NOT_AVAILABLE"


class Busy(CommandRefused):
    code = "BUSY"
