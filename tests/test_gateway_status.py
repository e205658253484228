"""When the gateway sends a status. The first (the protocol's "ready") (the protocol's "ready"): only once the safety
core has heard every process it watches, so an ``arm`` right after it is not refused for a
process still starting; and after a bounded wait in any case, so a process that never comes
up is reported instead of hiding the cart. After that, at once on every change a client
waits for (state, faults, case, the laser's own report that it is on), else at the status
rate."""

from nirf.services.gateway.main import READY_WAIT_S, Gateway


def gateway(states: dict, started: float = 100.0) -> Gateway:
    gw = object.__new__(Gateway)  # only the readiness logic: no sockets, no threads
    gw.states, gw.started, gw._is_ready = states, started, False
    gw._last_status_key = None
    return gw


def safety(**ages) -> dict:
    return {"state": "SAFE", "faults": [], "services": ages}


def test_not_ready_until_the_safety_core_has_heard_every_watched_process():
    gw = gateway({"safety": safety(gateway=None, imaging=None), "imaging": {}})
    assert not gw._ready(now=101.0)
    gw.states["safety"] = safety(gateway=40, imaging=None)
    assert not gw._ready(now=101.1)
    gw.states["safety"] = safety(gateway=40, imaging=12)
    assert gw._ready(now=101.2)


def test_not_ready_without_the_imaging_process_or_the_safety_core():
    assert not gateway({"imaging": {}})._ready(now=101.0)
    assert not gateway({"safety": safety(gateway=1, imaging=1)})._ready(now=101.0)


def test_ready_stays_ready_when_a_process_later_goes_silent():
    gw = gateway({"safety": safety(gateway=1, imaging=1), "imaging": {}})
    assert gw._ready(now=101.0)
    gw.states["safety"] = safety(gateway=1, imaging=None)
    assert gw._ready(now=102.0)  # silence later is a fault shown in status, not "not ready"


def test_a_process_that_never_reports_does_not_hide_the_cart_for_ever():
    gw = gateway({"safety": safety(gateway=5, imaging=None)}, started=100.0)
    assert not gw._ready(now=100.0 + READY_WAIT_S - 0.1)
    assert gw._ready(now=100.0 + READY_WAIT_S + 0.1)
    # without the safety core there is nothing true to say: still no status
    assert not gateway({}, started=0.0)._ready(now=10 * READY_WAIT_S)


def test_the_laser_reporting_on_or_off_is_a_change_sent_at_once():
    gw = gateway({"safety": {"state": "ARMED", "faults": [], "laser": {"on": False}}})
    assert gw._status_changed()  # the first
    assert not gw._status_changed()
    gw.states["safety"] = {"state": "EMITTING", "faults": [], "laser": {"on": False}}
    assert gw._status_changed()  # laser.on accepted: the state changes first ...
    gw.states["safety"] = {"state": "EMITTING", "faults": [], "laser": {"on": True}}
    assert gw._status_changed()  # ... the MCU's report that the output is on follows
    assert not gw._status_changed()
    gw.states["safety"] = {"state": "EMITTING", "faults": [], "laser": {"on": True, "power_mw": 49.7}}
    assert not gw._status_changed()  # a new reading alone waits for the status rate
    gw.states["safety"] = {"state": "EMITTING", "faults": [{"code": "OVERTEMP"}], "laser": {"on": False}}
    assert gw._status_changed()
