"""A running simulated cart for the laser-safety tests over the bus (``test_safety_bus``,
``test_safety_pulses``): its operator, the hardware's own record of the optical output
(``WorldProbe``) and the sequences those tests repeat."""

from __future__ import annotations

import shutil
import time

from tests import faults as fi
from tests.cartproc import start_cart, wait_for_file

WIDTH, HEIGHT = 364, 272  # small frames: these tests are about the laser, not the images
MAX_MW = 200.0
TRIP_MW = 1.1 * MAX_MW
FULL_SCALE_MW = 500.0  # the simulated diode's true curve: 500 mW x duty


class Bench:
    """One running cart, its operator and the hardware's own view."""

    def __init__(self, tmp, extra: str = "", safety: str = ""):
        self.cart = start_cart(tmp, width=WIDTH, height=HEIGHT, extra=extra, safety=safety)
        try:
            self.cart.wait_for_keys()
            self.op = fi.Operator(self.cart, topics=("status", "event"))
            self.op.wait("status", timeout_s=60)
            assert wait_for_file(self.cart.runtime_dir / "hardware.json", 10)
            self.probe = fi.WorldProbe(self.cart.runtime_dir)
        except BaseException:
            self.cart.stop()
            raise

    def close(self) -> None:
        self.op.close()
        self.probe.close()
        self.cart.stop()
        shutil.rmtree(self.cart.runtime_dir, ignore_errors=True)

    # -- helpers
    def status(self) -> dict:
        return self.op.ok("status")

    def key_cycle(self, off_s: float = 0.7) -> None:
        """The key turned off and on at the cart (S3a: off >= 0.5 s)."""
        self.probe.set({"key": False})
        fi.wait_until(lambda: self.status()["key"] is False, 5, "the controller to see the key off")
        time.sleep(off_s)
        self.probe.set({"key": True})
        fi.wait_until(lambda: self.status()["key"] is True, 5, "the controller to see the key on")

    def to_safe(self) -> None:
        self.op.to_safe()

    def calibrate(self, points, factor: float = 1.0, reason: str = "test", cycle: bool = True) -> dict:
        if cycle:
            self.key_cycle()
        return self.op.call("calibrate.power", {"points": points, "photodiode_factor": factor, "reason": reason})

    def restore_factory_table(self) -> None:
        self.to_safe()
        r = self.calibrate([[0.0, 0.0], [1.0, FULL_SCALE_MW]], reason="back to the true curve")
        assert r["ok"], r

    def arm_to(self, stage: str, power_mw: float = 50.0) -> None:
        self.op.drain()  # a queued status from before must not answer the waits below
        self.op.ok("arm")
        if stage == "ARMING":
            return
        self.op.wait_state("ARMED", 10)
        if stage == "EMITTING":
            self.op.ok("laser.on", {"power_mw": power_mw})
            self.op.wait_state("EMITTING", 10, lambda m: m["laser"]["on"])
            fi.wait_until(lambda: self.probe.output_mw() > 0, 5, "light out of the cart")


def pulse_trial(bench, stage: str, name: str, ms: int) -> None:
    code = {"interlock": "INTERLOCK_OPEN", "key": "KEY_OFF"}[name]
    bench.to_safe()
    bench.arm_to(stage)
    bench.op.drain()
    t_req = time.time_ns()
    bench.probe.set({"pulse": {"input": name, "ms": ms}})
    st = bench.op.wait_state("FAULT", 5)
    assert code in fi.fault_codes(st) or f"MCU_{'ILK' if name == 'interlock' else 'KEY'}" in fi.fault_codes(st), st
    # another laser.on without reset and re-arm is refused ...
    assert not bench.op.call("laser.on", {"power_mw": 50.0})["ok"]
    # ... and no light follows the pulse, neither by itself nor from that laser.on: from the
    # pulse's end (plus the time the request took to arrive), watched for 0.3 s
    time.sleep(0.3)
    after = t_req + int(ms * 1e6) + 50_000_000
    assert bench.probe.lit_after(after) == [], f"light after a {ms} ms {name} pulse in {stage}"
    assert bench.probe.output_mw() == 0.0
    assert bench.status()["state"] == "FAULT"
