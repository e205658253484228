"""The one table of bus commands: who may call each, which process owns it, which lane it
runs in, and the names of its arguments.

Lanes (PRODUCT S14):

* ``safety``: answered by the safety core at once; never queued behind anything else;
* ``quick``: short commands of imaging and study, served by their owner's command thread;
* ``long``: ``capture``, ``calibrate.*`` (but ``calibrate.power`` and ``calibrate.status``),
  ``qc.*``, ``selftest``: one at a time over the whole cart (a second is ``BUSY`` naming
  the first), run in the owner's worker thread, blocking only the request that started it;
* ``local``: answered by the gateway itself from what it knows (``ping``, ``status``).

``expires``: a command that would start or raise emission, and every long command, is never
acted on more than a second after it arrived (``EXPIRED``). ``always``: ``laser.off`` and
``disarm`` are never expired, rate-limited, or refused for audit or load.

Argument values are checked by the owner, which knows the ranges; the table checks the
names, so a misspelt argument is refused before it travels.
"""

from __future__ import annotations

from dataclasses import dataclass

OPERATOR, OBSERVER = "operator", "observer"


@dataclass(frozen=True)
class Command:
    name: str
    owner: str  # "gateway", "safety", "imaging", "study"
    lane: str  # "local", "safety", "quick", "long"
    role: str = OPERATOR  # the least role that may call it
    args: frozenset[str] | None = frozenset()  # allowed argument names; None: checked by the owner
    expires: bool = False
    always: bool = False  # laser.off, disarm
    reply_timeout_s: float = 15.0


def _c(name, owner, lane, role=OPERATOR, args=(), **kw) -> Command:
    return Command(name, owner, lane, role, None if args is None else frozenset(args), **kw)


LONG_TIMEOUT_S = 900.0

COMMANDS: dict[str, Command] = {c.name: c for c in (
    _c("ping", "gateway", "local", OBSERVER),
    _c("status", "gateway", "local", OBSERVER),
    _c("arm", "safety", "safety", expires=True),
    _c("disarm", "safety", "safety", always=True),
    _c("laser.on", "safety", "safety", args={"power_mw"}, expires=True),
    _c("laser.set", "safety", "safety", args={"power_mw"}, expires=True),
    _c("laser.off", "safety", "safety", always=True),
    _c("fault.reset", "safety", "safety", expires=True),
    _c("calibrate.power", "safety", "safety", args=None),
    _c("filter.move", "imaging", "quick", args={"position", "name"}),
    _c("camera.set", "imaging", "quick", args={"exposure_us", "gain", "fps"}),
    _c("acquire.start", "imaging", "quick", args={"mode"}),
    _c("acquire.stop", "imaging", "quick"),
    _c("roi.set", "imaging", "quick", args={"signal", "background", "auto"}),
    _c("sim.set", "imaging", "quick", args=None),
    _c("calibrate.status", "imaging", "quick"),
    _c("calibrate.dark", "imaging", "long", args=None, expires=True, reply_timeout_s=LONG_TIMEOUT_S),
    _c("calibrate.flat", "imaging", "long", args=None, expires=True, reply_timeout_s=LONG_TIMEOUT_S),
    _c("qc.baseline", "imaging", "long", args=None, expires=True, reply_timeout_s=LONG_TIMEOUT_S),
    _c("qc.run", "imaging", "long", args=None, expires=True, reply_timeout_s=LONG_TIMEOUT_S),
    _c("selftest", "imaging", "long", expires=True, reply_timeout_s=120.0),
    _c("case.open", "study", "quick", args=None),
    _c("case.close", "study", "quick"),
    _c("pathology.set", "study", "quick", args=None),
    _c("margin.set", "study", "quick", args=None),
    _c("followup.add", "study", "quick", args=None),
    _c("ae.add", "study", "quick", args=None),
    _c("case.correct", "study", "quick", args=None),
    _c("report", "study", "quick", OBSERVER, args=None, reply_timeout_s=60.0),
    _c("capture", "study", "long", args=None, expires=True, reply_timeout_s=LONG_TIMEOUT_S),
    # an online copy of the case store: runs beside captures (it must not wait for them)
    _c("backup", "study", "quick", args={"dest"}, reply_timeout_s=300.0),
)}

READ_ONLY = frozenset(name for name, c in COMMANDS.items() if c.role == OBSERVER)
OWNERS = ("safety", "imaging", "study")
