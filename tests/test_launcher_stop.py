"""Stopping the whole cart (Ctrl-C on the launcher, ``systemctl stop``) while it emits: the
safety core ends the emission itself, as a shutdown, before any service it watches goes.

Version 2 before this stopped imaging and the gateway first: the safety core saw them vanish
and latched SERVICE_LOST, so every ordinary stop left a fault in the audit log. The laser was
off either way; the record was wrong. Judged on the audit log and on the simulated world's
own record of the optical output.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.cartproc import start_cart
from tests.faults import Operator, WorldProbe

pytestmark = pytest.mark.slow


def _services_up(op: Operator) -> bool:
    """Whether the safety core would arm now (every service it watches is running)."""
    reply = op.call("arm")
    if reply.get("ok"):
        op.ok("disarm")
        op.wait_state("SAFE")
        return True
    return False


def test_stopping_the_cart_while_emitting_is_a_shutdown_not_a_fault(tmp_path):
    cart = start_cart(tmp_path, width=728, height=544)
    op = probe = None
    try:
        cart.wait_for_keys()
        op = Operator(cart)
        probe = WorldProbe(cart.runtime_dir)
        deadline = time.monotonic() + 30.0
        while "not running" in str(op.call("status").get("error", "")) or not _services_up(op):
            assert time.monotonic() < deadline, "the cart's services did not come up"
            time.sleep(0.2)
        op.emit(50.0)
        assert probe.output_mw() > 0.0 or probe.lit_after(0)
        t_stop = time.time_ns()
        op.close()
        op = None
        cart.stop()  # SIGTERM to the launcher: it stops its children in order
        assert cart.proc.returncode is not None
    finally:
        if op is not None:
            op.close()
        cart.stop()
    lines = [json.loads(x) for x in (cart.state_dir / "audit.jsonl").read_text().splitlines() if x.strip()]
    after = [x for x in lines if int(x.get("t_ns", 0)) >= t_stop]
    states = [x for x in after if x.get("kind") == "state"]
    faults = [x for x in after if x.get("kind") == "fault"]
    assert any(x.get("from") == "EMITTING" and x.get("to") == "SAFE" and x.get("reason") == "shutdown"
               for x in states), states
    assert not faults and not any(x.get("to") == "FAULT" for x in states), (faults, states)
    # the true output: dark after the stop, and it was the safety core that made it so
    # (the hardware process was still there to be told)
    events = probe.events()
    assert events and events[-1][1] == 0.0
    off_ns = probe.last_off_ns()
    assert off_ns is not None and off_ns >= t_stop
    probe.close()


def test_the_launcher_gives_the_safety_core_the_niceness_of_its_systemd_unit():
    import re
    from pathlib import Path

    from nirf.services.launcher import NICENESS

    unit = (Path(__file__).resolve().parent.parent / "systemd" / "nirf-safety.service").read_text()
    assert NICENESS["safety"] == int(re.search(r"^Nice=(-?\d+)", unit, re.M).group(1))
    assert NICENESS["hardware"] < NICENESS["safety"] < 0  # the simulated MCU above the safety core


def test_spawned_children_run_at_that_niceness_when_permitted(tmp_path):
    import os

    from nirf.services.launcher import NICENESS
    from tests.faults import child_pid

    cart = start_cart(tmp_path, width=728, height=544)
    try:
        cart.wait_for_keys()
        root = os.geteuid() == 0
        own = os.getpriority(os.PRIO_PROCESS, 0)
        wanted = {"nirf.controller.main": NICENESS["safety"] if root else own,
                  "nirf.sim.hardware": NICENESS["hardware"] if root else own,
                  "nirf.services.imaging.main": own}
        deadline = time.monotonic() + 30.0
        while True:  # the children start (and are reniced) a moment after the keys exist
            try:
                seen = {m: os.getpriority(os.PRIO_PROCESS, child_pid(cart, m)) for m in wanted}
            except (AssertionError, ProcessLookupError):
                seen = None
            if seen == wanted or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert seen == wanted
    finally:
        cart.stop()
