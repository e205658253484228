"""The safety core's part of the self-test: the laser MCU and the GPIO, each checked and
reported on its own (the camera and the wheel are imaging's: services/imaging/selftest.py).

It runs only in SAFE. It never emits light: the laser check reads the MCU's identity and
status and requires the output off and no latched fault. The GPIO check flashes the emission
indicator briefly and reads it back (a lamp test).
"""

from __future__ import annotations

import logging

from nirf.hal.errors import NirfError

log = logging.getLogger(__name__)


def _check(name: str, fn) -> dict:
    try:
        detail = fn()
        ok = bool(detail.pop("ok", True))
        return {"ok": ok, **detail}
    except NirfError as err:
        return {"ok": False, "error": str(err)}
    except Exception as err:  # a broken check reports, it does not take the cart down
        log.exception("self-test of %s failed", name)
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}


def check_laser(laser, max_temp_c: float) -> dict:
    ident = laser.identity()
    st = laser.status()
    problems = []
    if st.output_on:
        problems.append("output is on outside emission")
    if st.faults:
        problems.append(f"faults latched: {', '.join(st.faults)}")
    if not st.temp_c < max_temp_c:
        problems.append(f"temperature {st.temp_c:.1f} C not below {max_temp_c} C")
    return {"ok": not problems, "identity": ident, "temp_c": st.temp_c, "duty_ceiling": st.duty_ceiling,
            "interlock_closed": st.interlock_closed, "key_on": st.key_on, "problems": problems}


def check_gpio(io) -> dict:
    readings = {"key_on": io.key_on(), "interlock_closed": io.interlock_closed(),
                "footswitch_pressed": io.footswitch_pressed()}
    io.set_emission_indicator(True)
    lit = io.emission_indicator()
    io.set_emission_indicator(False)
    dark = not io.emission_indicator()
    return {"ok": lit and dark, "indicator_loop": lit and dark, **readings}
