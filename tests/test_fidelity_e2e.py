"""The whole simulated cart, in its processes, as a Pi 4 and as a Pi 5: after
``sim.set {"camera_platform": ...}`` and ``camera.set`` the camera is configured anew and
delivers 10-bit (Pi 4) or 16-bit left-aligned (Pi 5) raw; the cart's SBR of the default
phantom stays within 3 % of the truth (4.0) on both."""

from __future__ import annotations

import statistics

import pytest

from tests.cartproc import start_cart
from tests.test_e2e_skeleton import BACKGROUND_ROI, HEIGHT, SIGNAL_ROI, WIDTH, RawClient

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cart(tmp_path_factory):
    c = start_cart(tmp_path_factory.mktemp("fidelity"), width=WIDTH, height=HEIGHT)
    client = None
    try:
        c.wait_for_keys()
        client = RawClient(c)
        client.wait("status", timeout_s=60)
        yield c
    finally:
        if client:
            client.close()
        c.stop()


@pytest.mark.parametrize("platform", ["pi4", "pi5"])
def test_sbr_within_3_percent_on_both_platforms(cart, platform):
    client = RawClient(cart)
    try:
        client.wait("status", timeout_s=10)
        client.ok("acquire.stop")
        values = client.ok("sim.set", {"camera_platform": platform, "interlock": "closed",
                                       "key": True, "ambient_e_per_ms": 5.0})
        assert values["camera_platform"] == platform
        # the stand-in takes the platform at the camera's next configure, as a real camera
        # would be configured anew on another Pi
        client.ok("camera.set", {"exposure_us": 10_000})
        client.ok("roi.set", {"signal": SIGNAL_ROI, "background": BACKGROUND_ROI})
        client.ok("arm")
        client.wait("status", lambda m: m["state"] == "ARMED", timeout_s=10)
        client.ok("laser.on", {"power_mw": 50})
        client.ok("acquire.start", {"mode": "fluorescence"})
        first = client.wait("result", lambda m: m["valid"], timeout_s=30)
        sbrs = []
        while len(sbrs) < 12:
            r = client.wait("result", lambda m: m["frame_seq"] > first["frame_seq"], timeout_s=15)
            if r["valid"]:
                sbrs.append(r["sbr"])
        client.ok("acquire.stop")
        client.ok("disarm")
        assert statistics.mean(sbrs) == pytest.approx(4.0, rel=0.03)
    finally:
        client.close()
