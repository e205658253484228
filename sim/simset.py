"""Validation of the ``sim.set`` command's arguments (SIM.md), in one place.

Every argument is optional; what is given replaces the current value. Anything unknown,
of the wrong type or out of range is refused with :class:`~hal.errors.InvalidArgument`
naming the argument, the value and what is allowed; nothing is applied then.
"""

from __future__ import annotations

import math

from nirf.hal.errors import InvalidArgument

MAX_INCLUSIONS = 32
MAX_MOTION_PX = 50.0  # per frame; more would carry a focus out of a test frame at once
FAULT_KEYS = ("camera_stall", "serial_corruption", "mcu_overtemp", "wheel_stuck", "photodiode_gain", "gate_leak")


def _num(name: str, v, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidArgument(f"sim.set {name}: {v!r} is not a finite number")
    if not lo <= v <= hi:
        raise InvalidArgument(f"sim.set {name}: {v!r} outside {lo}-{hi}")
    return float(v)


def _bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise InvalidArgument(f"sim.set {name}: {v!r} is not true or false")
    return v


def validate(args, width: int = 1456, height: int = 1088) -> dict:
    """Return a normalised copy of ``args`` or raise InvalidArgument."""
    if not isinstance(args, dict):
        raise InvalidArgument(f"sim.set: arguments must be a map, got {type(args).__name__}")
    out: dict = {}
    for key, v in args.items():
        if key == "interlock":
            if v not in ("open", "closed"):
                raise InvalidArgument(f"sim.set interlock: {v!r}, allowed 'open' or 'closed'")
            out[key] = v
        elif key in ("key", "footswitch", "service_jumper"):
            out[key] = _bool(key, v)
        elif key == "pulse":
            out[key] = _pulse(v)
        elif key == "ambient_e_per_ms":
            out[key] = _num(key, v, 0.0, 1e5)
        elif key == "laser_leak":
            out[key] = _num(key, v, 0.0, 1e3)
        elif key == "seed":
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
                raise InvalidArgument(f"sim.set seed: {v!r}, allowed a whole number 0 to 2**63-1")
            out[key] = v
        elif key == "illumination":
            if v == "uniform":
                out[key] = "uniform"
            elif isinstance(v, dict) and set(v) == {"gaussian_sigma_frac"}:
                out[key] = {"gaussian_sigma_frac": _num("illumination.gaussian_sigma_frac",
                                                        v["gaussian_sigma_frac"], 0.01, 10.0)}
            else:
                raise InvalidArgument(f"sim.set illumination: {v!r}, allowed 'uniform' or "
                                      "{'gaussian_sigma_frac': number}")
        elif key == "phantom":
            out[key] = _phantom(v, width, height)
        elif key == "fault":
            out[key] = _fault(v)
        elif key == "camera_platform":
            if v not in ("pi4", "pi5"):
                raise InvalidArgument(f"sim.set camera_platform: {v!r}, allowed 'pi4' or 'pi5'")
            out[key] = v
        elif key == "wheel":
            out[key] = _wheel(v)
        elif key == "scene":
            from nirf.sim.scenes import NAMES

            if v not in NAMES:
                raise InvalidArgument(f"sim.set scene: {v!r}, allowed {', '.join(NAMES)}")
            out[key] = v
        elif key == "motion_px":
            out[key] = _num(key, v, 0.0, MAX_MOTION_PX)
        else:
            raise InvalidArgument(
                f"sim.set: unknown argument {key!r}; known: interlock, key, footswitch, ambient_e_per_ms, "
                "illumination, laser_leak, phantom, fault, seed, pulse, service_jumper, camera_platform, wheel, "
                "scene, motion_px")
    return out


def _phantom(v, width: int, height: int) -> dict:
    if not isinstance(v, dict):
        raise InvalidArgument(f"sim.set phantom: {v!r} is not a map")
    unknown = set(v) - {"background_icg_nM", "autofluorescence_nM", "inclusions"}
    if unknown:
        raise InvalidArgument(f"sim.set phantom: unknown key {sorted(unknown)[0]!r}; known: "
                              "background_icg_nM, autofluorescence_nM, inclusions")
    out = {
        "background_icg_nM": _num("phantom.background_icg_nM", v.get("background_icg_nM", 50.0), 0.0, 1e5),
        "autofluorescence_nM": _num("phantom.autofluorescence_nM", v.get("autofluorescence_nM", 0.0), 0.0, 1e5),
        "inclusions": [],
    }
    incl = v.get("inclusions", [])
    if not isinstance(incl, list) or len(incl) > MAX_INCLUSIONS:
        raise InvalidArgument(f"sim.set phantom.inclusions: a list of at most {MAX_INCLUSIONS} maps")
    size = max(width, height)
    for i, inc in enumerate(incl):
        if not isinstance(inc, dict) or set(inc) != {"x", "y", "radius", "icg_nM"}:
            raise InvalidArgument(f"sim.set phantom.inclusions[{i}]: {inc!r}, need exactly x, y, radius, icg_nM")
        out["inclusions"].append({
            "x": _num(f"phantom.inclusions[{i}].x", inc["x"], -size, 2 * size),
            "y": _num(f"phantom.inclusions[{i}].y", inc["y"], -size, 2 * size),
            "radius": _num(f"phantom.inclusions[{i}].radius", inc["radius"], 0.0, 2 * size),
            "icg_nM": _num(f"phantom.inclusions[{i}].icg_nM", inc["icg_nM"], 0.0, 1e5),
        })
    return out


MAX_PULSE_MS = 60_000


def _pulse(v) -> dict:
    if not isinstance(v, dict) or set(v) != {"input", "ms"}:
        raise InvalidArgument(f"sim.set pulse: {v!r}, need exactly input and ms")
    if v["input"] not in ("interlock", "key", "footswitch"):
        raise InvalidArgument(f"sim.set pulse.input: {v['input']!r}, allowed 'interlock', 'key' or 'footswitch'")
    return {"input": v["input"], "ms": _num("pulse.ms", v["ms"], 1.0, MAX_PULSE_MS)}


def _fault(v) -> dict:
    if not isinstance(v, dict):
        raise InvalidArgument(f"sim.set fault: {v!r} is not a map")
    out = {}
    for k, x in v.items():
        if k in ("camera_stall", "mcu_overtemp", "wheel_stuck"):
            out[k] = _bool(f"fault.{k}", x)
        elif k == "serial_corruption":
            out[k] = _num("fault.serial_corruption", x, 0.0, 1.0)
        elif k == "photodiode_gain":
            out[k] = _num("fault.photodiode_gain", x, 0.0, 10.0)
        elif k == "gate_leak":
            out[k] = _num("fault.gate_leak", x, 0.0, 1.0)
        else:
            raise InvalidArgument(f"sim.set fault: unknown fault {k!r}; known: {', '.join(FAULT_KEYS)}")
    return out


WHEEL_KEYS = ("prompt_space", "lf_errors", "powerup_garbage")


def _wheel(v) -> dict:
    """``wheel``: FW102C variants peers report (SIM.md); each a bool."""
    if not isinstance(v, dict):
        raise InvalidArgument(f"sim.set wheel: {v!r} is not a map")
    out = {}
    for k, x in v.items():
        if k not in WHEEL_KEYS:
            raise InvalidArgument(f"sim.set wheel: unknown key {k!r}; known: {', '.join(WHEEL_KEYS)}")
        out[k] = _bool(f"wheel.{k}", x)
    return out
