"""The power table in use: the technician's duty-to-mW measurements, validated, stored in
the state folder and applied to the cart (``calibrate.power``).

The safety core owns this file and no other calibration: the table decides how much light
a setpoint gives, so it lives beside the rules that bound it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

from nirf.controller.calibration import PowerCalibration, validate_power_points
from nirf.controller.state import State
from nirf.hal.clock import Clock
from nirf.hal.errors import InvalidArgument, NirfError, NotPermitted, WrongState
from nirf.services.common.files import write_atomic

log = logging.getLogger(__name__)

FOLDER = "calibration"
CURRENT = "power-current.json"
PHOTODIODE_FACTOR_RANGE = (0.1, 10.0)
MAX_REASON_CHARS = 500


class PowerCalibrations:
    """The stored power tables and the one in use."""

    def __init__(self, cfg, state_dir: Path, clock: Clock, *, on_change: Callable[[dict], None] = lambda body: None):
        self.cfg = cfg
        self.folder = Path(state_dir) / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.on_change = on_change
        self.meta: dict | None = None
        self.problems: list[str] = []

    def load(self) -> PowerCalibration | None:
        """The stored table in use, or None (nominal); a file that cannot be used is reported
        in :attr:`problems` and the nominal table is used."""
        path = self.folder / CURRENT
        if not path.exists():
            return None
        name = path.name
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            name = str(meta["file"])
            cal = PowerCalibration.load(self.folder / Path(name).name)
        except (OSError, ValueError, KeyError, TypeError, NirfError) as err:
            msg = f"power calibration {name} cannot be used ({err}); the nominal table is in use"
            log.error("%s", msg)
            self.problems.append(msg)
            return None
        self.meta = meta
        return cal

    @property
    def current_id(self) -> str:
        return self.meta["id"] if self.meta else "nominal"

    def command(self, args: dict, who, cart) -> dict:
        """``calibrate.power {points: [[duty, mW], ...], photodiode_factor, reason}``: store the
        technician's power-meter table and apply it. A service act (PRODUCT S6a): SAFE only,
        an operator, the key turned off (>= 0.5 s) and on at the cart within the 60 s before,
        the table monotonic and within the band around the MCU's factory table, the
        photodiode factor within 20 % of the factory one, and a ``reason`` (audited with the
        caller). Every refusal names the limit and is audited too."""
        try:
            return self._command(args, who, cart)
        except NirfError as err:
            self.on_change({"kind": "calibration_refused", "what": "power", "by": getattr(who, "name", None),
                            "code": err.code, "error": str(err)})
            raise

    def _command(self, args: dict, who, cart) -> dict:
        cmd = "calibrate.power"
        extra = sorted(set(map(str, args)) - {"points", "photodiode_factor", "reason"})
        if extra:
            raise InvalidArgument(f"{cmd}: unknown argument {extra[0]!r}; allowed: photodiode_factor, points, reason")
        if getattr(who, "role", None) != "operator":
            raise NotPermitted(f"{cmd} needs the operator role, caller has {getattr(who, 'role', None)!r}")
        if "points" not in args:
            raise InvalidArgument(f"{cmd}: points is required, [[duty, mW], ...] from the power meter")
        reason = args.get("reason")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
            raise InvalidArgument(f"{cmd}: reason is required: why the table changes, 1 to "
                                  f"{MAX_REASON_CHARS} characters (got {reason!r:.60})")
        duties, powers = validate_power_points(args["points"])
        if cart.factory is None:
            raise WrongState(f"{cmd}: the laser controller's factory record has not been read; "
                             "no table can be checked against it")
        factor = args.get("photodiode_factor", cart.factory.photodiode_factor)
        lo, hi = PHOTODIODE_FACTOR_RANGE
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                or not lo <= factor <= hi:
            raise InvalidArgument(f"{cmd}: photodiode_factor = {factor!r} outside {lo} to {hi}")
        refusal = cart.service_act_refusal()
        if refusal is not None:
            raise WrongState(f"{cmd}: {refusal}")
        t_ns = self.clock.time_ns()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t_ns / 1e9)) + f".{(t_ns // 1_000_000) % 1000:03d}Z"
        cal_id = f"power-{stamp}"
        by = getattr(who, "name", None)
        cal = PowerCalibration(duties, powers, float(factor), cal_id, {"created_ns": t_ns, "by": by, "reason": reason})
        cart.check_calibration(cal)  # the S6a band, before anything is written
        meta = {"id": cal_id, "file": f"{cal_id}.json", "created_ns": t_ns, "by": by,
                "points": [[d, p] for d, p in zip(duties, powers)], "photodiode_factor": float(factor),
                "reason": reason}
        write_atomic(self.folder / meta["file"], json.dumps(cal.to_dict()).encode())
        # checks the state, key cycle and band again under the cart's lock, then swaps the table
        cart.install_calibration(cal)
        write_atomic(self.folder / CURRENT, json.dumps(meta).encode())
        self.meta = meta
        lc = self.cfg.laser
        reachable_mw = cal.power_for(min(lc.duty_ceiling, cart.factory.duty_ceiling))
        warnings = []
        if reachable_mw < lc.max_power_mw:
            warnings.append(f"at the MCU's duty ceiling the table gives {reachable_mw:.1f} mW, below "
                            f"laser.max_power_mw {lc.max_power_mw}: higher setpoints will be refused")
        self.on_change({"kind": "calibration", "what": "power", "id": cal_id, "by": by, "reason": reason})
        return {**meta, "max_calibrated_mw": powers[-1], "reachable_mw_at_ceiling": round(reachable_mw, 2),
                "warnings": warnings}
