"""The study's scenes (SIM.md ``scene``), captured in automatic-ROI mode through the bus on
the running simulated cart, judged against each scene's geometry and truth in
:mod:`nirf.sim.scenes` (not against the pipeline's opinion); and each validity reason of
PRODUCT.md section 7 on the running cart.

- ``clean_bed``: a stored negative capture, SBR within 10 % of the truth of its ROIs;
- ``residual_focus``, ``rim``, each focus of ``small_foci``: positive, SBR within 5 % of
  the truth, the signal ROI at least 90 % on the uptake;
- ``no_icg``, ``drape``: a negative, or a refusal naming the results' reasons; never
  a positive;
- the same under Gaussian illumination with a calibrated flat field.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from nirf.services.cli.client import CartClient, CartError
from nirf.sim import scenes
from tests.cartproc import start_cart

pytestmark = pytest.mark.e2e

W, H = 728, 544
LASER_MW = 50
PAIRS = 4
GAUSSIAN = {"gaussian_sigma_frac": 0.35}


def connect(cart, timeout_s: float = 60.0) -> CartClient:
    cart.wait_for_keys(timeout_s)
    client = CartClient.from_state_dir(cart.state_dir, cart.control, cart.telemetry)
    client.subscribe("status", "event", "result")
    assert client.wait_for("status", timeout_s=timeout_s) is not None, cart.log_text()[-3000:]
    return client


@pytest.fixture(scope="module")
def cart(tmp_path_factory):
    c = start_cart(tmp_path_factory.mktemp("scenes"), width=W, height=H)
    try:
        client = connect(c)
        client.call("arm")
        assert client.wait_for("status", lambda m: m["state"] == "ARMED", timeout_s=15), "never ARMED"
        client.call("laser.on", {"power_mw": LASER_MW})
        client.call("acquire.start", {"mode": "fluorescence"}, timeout_s=15)
        injected = (datetime.now(timezone.utc) - timedelta(hours=20)).isoformat(timespec="seconds")
        client.call("case.open", {"case_id": "SCN-001", "histology": "DFSP", "arm": "icg_25mg",
                                  "injection_time": injected})
        client.close()
        yield c
    finally:
        c.stop()


# the light the cart's stored flat field was calibrated under (the cart keeps the last one)
_FLAT = {"light": None}


@pytest.fixture
def client(cart):
    cl = connect(cart)
    cl.call("roi.set", {"auto": True})
    cl.call("sim.set", {"illumination": "uniform", "motion_px": 0, "scene": "default"})
    if _FLAT["light"] not in (None, "uniform"):
        # a Gaussian flat field under uniform light would make the dim corners look bright
        calibrate_flat(cl, "uniform")
        sim_set(cl, {"scene": "default"})
    yield cl
    cl.call("sim.set", {"illumination": "uniform", "motion_px": 0, "scene": "default"})
    cl.close()


def sim_set(client, args: dict) -> None:
    """sim.set, then wait for a result of a pair exposed well after it (the camera learns
    the new scene from the hardware process a moment later)."""
    client.call("sim.set", args)
    after = time.time_ns() + 150_000_000
    assert client.wait_for("result", lambda m: m["t_capture_ns"] > after, timeout_s=20), "no result after sim.set"


def capture(client, label: str):
    """A tumor-bed capture in automatic mode: the reply, or the CartError refusing it."""
    try:
        return client.call("capture", {"site": "tumor_bed", "label": label, "pairs": PAIRS}, timeout_s=60)
    except CartError as err:
        return err


def calibrate_flat(client, light: str) -> dict | str:
    """A flat field of the light from a uniform target (what calibrate.flat is for); the
    cart keeps the last one, so every test calibrates for its own light. Returns the
    illumination for sim.set."""
    illum = GAUSSIAN if light == "gaussian" else "uniform"
    sim_set(client, {"illumination": illum,
                     "phantom": {"background_icg_nM": 100.0, "autofluorescence_nM": 0.0, "inclusions": []}})
    client.call("calibrate.flat", {"pairs": 8}, timeout_s=60)
    _FLAT["light"] = light
    return illum


def judged(reply, scene, shape=None) -> dict:
    """The capture judged from the scene's geometry."""
    sig, bg = reply["roi"]["signal"], reply["roi"]["background"]
    return {"truth": scenes.roi_true_sbr(scene, sig, bg, W, H),
            "on_uptake": scenes.uptake_fraction(scene, sig, W, H, shape)}


@pytest.mark.parametrize("light", ["uniform", "gaussian"])
def test_focal_uptake_is_positive_and_measured_on_the_uptake(client, light):
    illum = calibrate_flat(client, light)
    for name in ("residual_focus", "rim"):
        sc = scenes.build(name, W, H)
        sim_set(client, {"scene": name, "illumination": illum})
        reply = capture(client, f"{name} {light}")
        assert not isinstance(reply, CartError), reply
        j = judged(reply, sc)
        assert reply["positive"] is True, (name, reply)
        assert reply["sbr"] == pytest.approx(sc.true_sbr, rel=0.05), (name, reply, j)
        assert j["on_uptake"] >= 0.90, (name, reply, j)
        assert reply["criteria_failed"] == [] and set(reply["criteria_met"]) == {"sbr", "intensity", "cnr"}


@pytest.mark.parametrize("light", ["uniform", "gaussian"])
def test_each_small_focus_is_positive_on_its_own(client, light):
    illum = calibrate_flat(client, light)
    sc = scenes.build("small_foci", W, H)
    # all three in view: the ROI lands on one of them
    sim_set(client, {"scene": "small_foci", "illumination": illum})
    reply = capture(client, f"small_foci {light}")
    assert not isinstance(reply, CartError), reply
    assert reply["positive"] is True and reply["sbr"] == pytest.approx(sc.true_sbr, rel=0.05), reply
    assert max(scenes.uptake_fraction(sc, reply["roi"]["signal"], W, H, f) for f in sc.findings) >= 0.90
    # each focus alone (the others out of view), down to radius 10 px
    for i, focus in enumerate(sc.findings):
        ph = dict(sc.phantom, inclusions=[sc.phantom["inclusions"][i]])
        sim_set(client, {"phantom": ph, "illumination": illum})
        reply = capture(client, f"focus r{focus.outer:.0f} {light}")
        assert not isinstance(reply, CartError), reply
        j = judged(reply, sc, focus)
        assert reply["positive"] is True, (focus, reply)
        assert reply["sbr"] == pytest.approx(sc.true_sbr, rel=0.05), (focus, reply, j)
        assert j["on_uptake"] >= 0.90, (focus, reply, j)


@pytest.mark.parametrize("light", ["uniform", "gaussian"])
def test_a_clean_bed_is_a_stored_negative(client, light):
    illum = calibrate_flat(client, light)
    sc = scenes.build("clean_bed", W, H)
    sim_set(client, {"scene": "clean_bed", "illumination": illum})
    reply = capture(client, f"clean bed {light}")
    assert not isinstance(reply, CartError), reply
    assert reply["capture_id"] and reply["files"]
    assert reply["positive"] is False and "sbr" in reply["criteria_failed"]
    j = judged(reply, sc)
    assert reply["sbr"] == pytest.approx(j["truth"], rel=0.10), (reply, j)
    assert reply["sbr"] < 1.2


@pytest.mark.parametrize("light", ["uniform", "gaussian"])
@pytest.mark.parametrize("name", ["no_icg", "drape"])
def test_no_icg_and_drape_are_never_positive(client, name, light):
    illum = calibrate_flat(client, light)
    sim_set(client, {"scene": name, "illumination": illum})
    for attempt in range(2):
        reply = capture(client, f"{name} {light} {attempt}")
        if isinstance(reply, CartError):
            assert reply.code == "TIMEOUT" and "not valid: " in reply.message, reply
        else:
            assert reply["positive"] is False, reply
            assert reply["criteria_failed"], reply


def results(client, predicate, count: int = 3, timeout_s: float = 20.0) -> list[dict]:
    """The next ``count`` results that satisfy ``predicate``."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(got)} matching results within {timeout_s} s"
        m = client.wait_for("result", predicate, timeout_s=remaining)
        if m is not None:
            got.append(m)
    return got


def test_motion_between_laser_on_frames_is_flagged_with_its_shift(client):
    sim_set(client, {"scene": "residual_focus"})
    still = results(client, lambda m: m.get("motion_px") is not None and m.get("roi") is not None)
    assert all("motion" not in r["flags"] and r["motion_px"] <= 1.0 for r in still), still
    sim_set(client, {"motion_px": 3})
    moving = results(client, lambda m: "motion" in m["flags"])
    for r in moving:
        assert r["valid"] is False and r["positive"] is False
        assert r["motion_shift"][0] == pytest.approx(6.0, abs=1.0), r  # 3 px a frame: 6 px on to on
    refused = capture(client, "moving")
    seen = []
    while (m := client.wait_for("result", timeout_s=0.2)) is not None and len(seen) < 20:
        seen.append((m["frame_seq"], m["flags"], m.get("motion_shift"), m["roi"]["signal"] if m["roi"] else None,
                     m.get("roi_generation")))
    assert isinstance(refused, CartError) and "motion" in refused.message, (refused, seen)


def test_a_saturated_roi_pixel_is_flagged(client):
    sim_set(client, {"scene": "default"})
    client.call("laser.set", {"power_mw": 100})  # the 200 nM disk reaches full scale
    try:
        got = results(client, lambda m: "saturated" in m["flags"])
        assert all(r["saturated_fraction"] > 0 and not r["valid"] for r in got)
    finally:
        client.call("laser.set", {"power_mw": LASER_MW})


def test_overlapping_rois_are_flagged(client):
    client.call("roi.set", {"signal": [300, 200, 100, 100], "background": [350, 250, 100, 100]})
    got = results(client, lambda m: m.get("roi_mode") == "set" and m["roi"]["signal"] == [300, 200, 100, 100])
    assert all("rois_overlap" in r["flags"] and not r["valid"] for r in got), got


def test_a_background_on_the_drape_is_no_background(client):
    sc = scenes.build("drape", W, H)
    sim_set(client, {"scene": "drape"})
    on_drape = [20, 20, 60, 60]
    assert sc.drape.mask(W, H)[20:80, 20:80].all()
    client.call("roi.set", {"signal": [500, 250, 60, 60], "background": on_drape})
    got = results(client, lambda m: m.get("roi_mode") == "set" and m["roi"]["background"] == on_drape)
    for r in got:
        assert not r["valid"] and r["sbr"] is None and not r["positive"]
        assert {"background_too_dim", "background_not_positive"} & set(r["flags"]), r


def test_the_open_filter_is_flagged(client):
    sim_set(client, {"scene": "default"})
    client.call("filter.move", {"name": "open"}, timeout_s=15)
    try:
        got = results(client, lambda m: "filter_not_emission" in m["flags"], timeout_s=30)
        assert all(not r["valid"] and not r["positive"] for r in got)
    finally:
        client.call("filter.move", {"name": "icg_emission"}, timeout_s=15)


def _lit_exposures(events, t0_ns, t1_ns, exposure_ns):
    """The world's lit frames in [t0, t1]: (start, end, decreased) from its record of the
    optical output (the MCU lights the whole period of a lit frame; the exposure is its first
    ``exposure_ns``); ``decreased`` when the output stepped down to a lower non-zero level
    before the exposure ended (a cut the MCU must report)."""
    out, start, level, decreased = [], None, 0.0, False
    for t, mw in events:
        if level == 0.0 and mw > 0.0:
            start, decreased = t, False
        elif start is not None and 0.0 < mw < level and t < start + exposure_ns:
            decreased = True
        elif start is not None and mw == 0.0:
            if t0_ns <= start <= t1_ns:
                out.append((start, t, decreased))
            start = None
        level = mw
    return out


def test_a_decrease_during_a_lit_exposure_flags_that_pair_cut(cart, client):
    """``laser.set`` lower while the MCU has a lit exposure open: the MCU cuts it and says so
    (``! CUT``), and the result of that pair is invalid with ``on_frame_cut``. Judged on the
    world's own record of the optical output: every flagged pair's on exposure was cut, and
    every pair whose on exposure was cut is flagged (or counted as a late report)."""
    from tests.faults import WorldProbe

    fps = 30.0
    exposure_us = 25_000  # most of the period: a decrease usually lands inside a lit exposure
    probe = WorldProbe(cart.runtime_dir)
    try:
        client.call("camera.set", {"exposure_us": exposure_us, "fps": fps})
        sim_set(client, {"scene": "default"})
        before = client.call("status")["pairs"]
        t0 = time.time_ns()
        for _ in range(12):
            client.call("laser.set", {"power_mw": 40})
            time.sleep(0.045)
            client.call("laser.set", {"power_mw": LASER_MW})  # an increase waits for the next lit frame
            time.sleep(0.07)
        t1 = time.time_ns()
        got = []
        deadline = time.monotonic() + 20
        while not got or got[-1]["t_capture_ns"] < t1 + 300_000_000:
            assert time.monotonic() < deadline, "results stopped"
            m = client.wait_for("result", timeout_s=2)
            if m is not None and m["t_capture_ns"] > t0:
                got.append(m)
        after = client.call("status")["pairs"]
        exposures = _lit_exposures(probe.events(), t0 - 100_000_000, t1 + 400_000_000, exposure_us * 1000)
    finally:
        probe.close()
        client.call("laser.set", {"power_mw": LASER_MW})
        client.call("camera.set", {"exposure_us": 10_000, "fps": fps})
    period_ns = 1e9 / fps

    def exposure_of(r):
        # t_capture is the end of the pair's off frame, one period after the on frame
        on_start = r["t_capture_ns"] - period_ns - exposure_us * 1000
        near = [e for e in exposures if abs(e[0] - on_start) < 5_000_000]
        return near[0] if near else None

    flagged = [r for r in got if "on_frame_cut" in r["flags"]]
    assert flagged, f"no pair flagged cut in {len(got)} results; cut exposures in the world: " \
                    f"{sum(e[2] for e in exposures)}"
    for r in flagged:
        e = exposure_of(r)
        assert e is not None and e[2], f"pair {r['frame_seq']} flagged cut, but the world shows its exposure whole"
        assert r["valid"] is False and r["positive"] is False
    missed = [r["frame_seq"] for r in got if "on_frame_cut" not in r["flags"]
              and (e := exposure_of(r)) is not None and e[2]]
    late = after["cut_notices_late"] - before["cut_notices_late"]
    assert len(missed) <= late, f"pairs cut in the world but not flagged: {missed} (late reports: {late})"
    assert after["cut_notices"] - before["cut_notices"] >= len(flagged)


def _level_at(events, t_ns):
    """The world's optical output at ``t_ns`` (its record is a step function)."""
    level = 0.0
    for t, mw in events:
        if t > t_ns:
            break
        level = mw
    return level


def test_light_in_the_off_frames_makes_every_pair_off_frame_lit(cart, client):
    """A leaking modulation gate (``sim.set fault gate_leak``): the world lights the dark
    frames at a tenth of the lit level; the MCU's photodiode sees it in the exposure and
    reports it (``! LIT``), and the results are invalid with ``off_frame_lit``; once the
    gate is healthy they are valid again. Judged on the world's record of the optical
    output: a flagged pair's off exposure was lit, and a pair whose off exposure was lit is
    flagged unless its report came late (counted)."""
    from tests.faults import WorldProbe

    probe = WorldProbe(cart.runtime_dir)
    got = []
    try:
        sim_set(client, {"scene": "default"})
        before = client.call("status")["pairs"]
        client.call("sim.set", {"fault": {"gate_leak": 0.1}})
        t0 = time.time_ns() + 100_000_000
        deadline = time.monotonic() + 20
        while len(got) < 12:
            assert time.monotonic() < deadline, f"results stopped after {len(got)}"
            m = client.wait_for("result", timeout_s=2)
            if m is not None and m["t_capture_ns"] > t0:
                got.append(m)
        events = probe.events()
    finally:
        client.call("sim.set", {"fault": {"gate_leak": 0.0}})
        probe.close()
    # t_capture is the end of the off frame's exposure: 2 ms before it lies inside it
    lit_off = [r for r in got if _level_at(events, r["t_capture_ns"] - 2_000_000) > 0]
    assert len(lit_off) >= len(got) - 1, "the world did not light the off frames: the fault was not injected"
    flagged = [r for r in got if "off_frame_lit" in r["flags"]]
    assert flagged, f"no result flagged off_frame_lit among {len(got)}"
    for r in flagged:
        assert r in lit_off, f"pair {r['frame_seq']} flagged, but its off exposure was dark in the world"
        assert r["valid"] is False and r["positive"] is False
    # the counters come with the imaging process's periodic state: wait for them to catch up
    deadline = time.monotonic() + 5
    while True:
        after = client.call("status")["pairs"]
        if after["dark_light_notices"] - before["dark_light_notices"] >= len(flagged) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after["dark_light_notices"] - before["dark_light_notices"] >= len(flagged)
    missed = [r["frame_seq"] for r in lit_off if r not in flagged]
    late = after["dark_light_notices_late"] - before["dark_light_notices_late"]
    assert len(missed) <= late, f"off frames lit in the world but not flagged: {missed} (late reports: {late})"
    # healthy again: a pair exposed well after the repair is valid
    after_fix = time.time_ns() + 200_000_000
    m = client.wait_for("result", lambda r: r["t_capture_ns"] > after_fix, timeout_s=10)
    assert m is not None and "off_frame_lit" not in m["flags"], m and m["flags"]


# --- the calibration gate (PRODUCT.md section 7: device profile) ------------------------


def test_a_capture_needs_flat_field_and_todays_qc_or_a_recorded_override(tmp_path):
    """The gate the device profile always has, switched on here in the sim profile."""
    from nirf.services.study.casestore import CaseStore

    c = start_cart(tmp_path, width=W, height=H, extra="[processing]\ncapture_requires_calibration = true\n")
    try:
        cl = connect(c)
        cl.call("arm")
        assert cl.wait_for("status", lambda m: m["state"] == "ARMED", timeout_s=15), "never ARMED"
        cl.call("laser.on", {"power_mw": LASER_MW})
        cl.call("acquire.start", {"mode": "fluorescence"}, timeout_s=15)
        injected = (datetime.now(timezone.utc) - timedelta(hours=20)).isoformat(timespec="seconds")
        cl.call("case.open", {"case_id": "GATE-001", "histology": "DFSP", "arm": "icg_25mg", "injection_time": injected})
        refused = capture(cl, "uncalibrated")
        assert isinstance(refused, CartError) and refused.code == "WRONG_STATE", refused
        assert "flat field" in refused.message and "QC" in refused.message and "override_reason" in refused.message
        with pytest.raises(CartError, match="override_reason"):
            cl.call("capture", {"site": "tumor_bed", "pairs": PAIRS, "override_reason": "  "})
        over = cl.call("capture", {"site": "tumor_bed", "label": "overridden", "pairs": PAIRS,
                                   "override_reason": "QC target cracked; surgeon accepts"}, timeout_s=60)
        assert over["override"]["reason"] == "QC target cracked; surgeon accepts"
        stored = CaseStore(c.state_dir / "study.db").get_capture(over["capture_id"])
        settings = stored["settings"]
        assert settings["override"]["reason"] == "QC target cracked; surgeon accepts"
        assert any("flat field" in p for p in settings["override"]["problems"])
        # calibrated, baseline and a passed QC today: no override needed, none stored
        calibrate_flat(cl, "uniform")
        cl.call("qc.baseline", {"results": 4}, timeout_s=60)
        assert cl.call("qc.run", {"results": 4}, timeout_s=60)["passed"] is True
        sim_set(cl, {"scene": "residual_focus"})
        fine = cl.call("capture", {"site": "tumor_bed", "label": "calibrated", "pairs": PAIRS}, timeout_s=60)
        assert fine["override"] is None and fine["positive"] is True
        assert "override" not in CaseStore(c.state_dir / "study.db").get_capture(fine["capture_id"])["settings"]
        cl.close()
    finally:
        c.stop()


def test_the_device_profile_always_gates_captures():
    """Unit level: the device profile's gate cannot be switched off by the key."""
    from types import SimpleNamespace

    from nirf.hal.errors import WrongState
    from nirf.services.study.clinical import Clinical

    gate = Clinical._calibration_gate
    calibration = SimpleNamespace(capture_problems=lambda: ["no QC check today"])
    for profile, key, refused in (("device", False, True), ("device", True, True), ("sim", False, False),
                                  ("sim", True, True)):
        fake = SimpleNamespace(cfg=SimpleNamespace(profile=profile,
                                                   processing=SimpleNamespace(capture_requires_calibration=key)),
                               service=SimpleNamespace(calibration=calibration))
        if refused:
            with pytest.raises(WrongState, match="no QC check today"):
                gate(fake, None, None)
            assert gate(fake, "target lost", SimpleNamespace(name="op"))["problems"] == ["no QC check today"]
        else:
            assert gate(fake, None, None) is None
