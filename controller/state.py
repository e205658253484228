"""Cart states (PROTOCOL: States) and latched faults."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(str, Enum):
    SAFE = "SAFE"  # laser off, not armed
    ARMING = "ARMING"  # indicator on, waiting emission_delay_s
    ARMED = "ARMED"  # emission permitted, laser off
    EMITTING = "EMITTING"  # laser on
    FAULT = "FAULT"  # laser off, latched until fault.reset

    @property
    def active(self) -> bool:
        """True in the states where the indicator is lit and a safety input trips."""
        return self in (State.ARMING, State.ARMED, State.EMITTING)


# Fault codes the controller latches. MCU faults are reported as "MCU_<code>".
INTERLOCK_OPEN = "INTERLOCK_OPEN"
KEY_OFF = "KEY_OFF"
SERIAL_LINK = "SERIAL_LINK"
CAMERA_STALL = "CAMERA_STALL"
OVER_TEMP = "OVER_TEMP"
OUTPUT_MISMATCH = "OUTPUT_MISMATCH"
MCU_FAULT_PREFIX = "MCU_"
INPUT_DISAGREE = "INPUT_DISAGREE"
# A process the safety core watches (the gateway, imaging) went silent while the laser was
# armed: nobody could turn it off or see what it lights (PRODUCT section 3).
SERVICE_LOST = "SERVICE_LOST"
# MCU fault codes of PRODUCT S6a/S7a, as the controller reports them
MCU_OPTICAL_TRIP = "MCU_OPT"
MCU_EXPECTED_MW = "MCU_XMW"
MCU_BUDGET = "MCU_BUDGET"

RECOVERY = {
    INTERLOCK_OPEN: "close the interlock loop (door, connector, emergency stop), then fault.reset",
    KEY_OFF: "turn the key on, then fault.reset",
    SERIAL_LINK: "check the laser controller's USB cable; fault.reset once it answers",
    CAMERA_STALL: "the camera was restarted; check the scene and fault.reset",
    OVER_TEMP: "let the laser cool below the limit, then fault.reset",
    OUTPUT_MISMATCH: "the monitor photodiode disagrees with the setpoint: check the laser "
                     "and its calibration before fault.reset",
    INPUT_DISAGREE: "the laser controller and the Pi read the safety inputs differently: check "
                    "the wiring, then fault.reset",
    SERVICE_LOST: "the named process stopped answering and is being restarted; fault.reset once "
                  "status shows it alive again",
    MCU_OPTICAL_TRIP: "the laser controller's own photodiode read more than 1.1 x laser.max_power_mw: "
                      "have the laser and its calibration checked before fault.reset",
    MCU_EXPECTED_MW: "the laser controller's photodiode disagreed with the expected power by more than "
                     "20 %: check the power calibration (calibrate.power) before fault.reset",
    MCU_BUDGET: "the laser controller's emission budget (S7a) is used up: wait for budget to free, "
                "then fault.reset",
}


@dataclass(frozen=True)
class Fault:
    code: str
    message: str
    t_ns: int

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


def recovery_hint(code: str) -> str:
    if code in RECOVERY:
        return RECOVERY[code]
    if code.startswith(MCU_FAULT_PREFIX):
        return "the laser controller latched this fault; remove its cause, then fault.reset"
    return RECOVERY.get(code, "remove the cause, then fault.reset")
