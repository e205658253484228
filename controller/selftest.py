"""The self-test: each device checked in turn and reported on its own.

It runs only in SAFE with acquisition stopped (it moves the filter wheel and runs the camera).
It never emits light: the laser check reads the MCU's identity and status and requires the
output off and no latched fault. The GPIO check flashes the emission indicator briefly and reads
it back (a lamp test).
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from hal.errors import NirfError

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


def check_wheel(wheel, positions: list[int], move_timeout_s: float) -> dict:
    start = wheel.position()
    visited = {}
    for p in positions:
        visited[str(p)] = wheel.move(p, move_timeout_s) == p
    wheel.move(start, move_timeout_s)
    return {"ok": all(visited.values()), "identity": wheel.identity(), "positions": wheel.position_count(),
            "visited": visited, "returned_to": start}


def check_camera(acquisition, frames_wanted: int, black_level: int, timeout_s: float) -> dict:
    """Dark frames (the caller has moved the wheel to the blocked filter): frames arrive and
    their level sits near the black level."""
    got: list[np.ndarray] = []
    done = threading.Event()

    def on_frame(frame):
        if len(got) < frames_wanted:
            got.append(frame.data.astype(np.float32, copy=True))
            if len(got) >= frames_wanted:
                done.set()

    old_sink = acquisition.on_frame
    acquisition.on_frame = on_frame
    try:
        acquisition.start("dark")
        done.wait(timeout_s)
    finally:
        acquisition.stop()
        acquisition.on_frame = old_sink
    if len(got) < frames_wanted:
        return {"ok": False, "error": f"only {len(got)} of {frames_wanted} frames within {timeout_s} s"}
    stack = np.stack(got)
    dark_mean = float(stack.mean())
    dark_std = float(stack.std())
    ok = abs(dark_mean - black_level) < max(8.0, 0.05 * black_level + 5.0)
    return {"ok": ok, "frames": len(got), "dark_mean": round(dark_mean, 2), "dark_std": round(dark_std, 2),
            "black_level": black_level}


def check_gpio(io) -> dict:
    readings = {"key_on": io.key_on(), "interlock_closed": io.interlock_closed(),
                "footswitch_pressed": io.footswitch_pressed()}
    io.set_emission_indicator(True)
    lit = io.emission_indicator()
    io.set_emission_indicator(False)
    dark = not io.emission_indicator()
    return {"ok": lit and dark, "indicator_loop": lit and dark, **readings}
