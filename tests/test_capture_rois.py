"""The capture's choice of results (services/study/clinical.py ``_collect``) without sockets: in
automatic-ROI mode only results whose ROIs were found after the request count; ROIs set by
command count whenever they were set; a capture whose results keep coming back not valid
is refused with their reasons; and the capture's call needs all three criteria."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nirf.hal.errors import DeviceTimeout
from nirf.services.study.clinical import Clinical, _Collecting, _average

T_REQUEST = 1_000_000


def result(seq: int, *, found_ns: int | None, mode: str = "auto", valid: bool = True, flags=()):
    return {"frame_seq": seq, "valid": valid, "flags": list(flags), "roi_mode": mode, "roi_found_ns": found_ns,
            "signal_mean": 300.0, "background_mean": 100.0, "background_std": 10.0, "intensity": 600.0,
            "threshold": 2.0, "t_capture_ns": seq}


class FakeService:
    """Hands out the prepared results, a few per wait, as the controller's wait_results does."""

    fps = 30.0

    def __init__(self, results: list[dict]):
        self.queue = list(results)

    def wait_results(self, count, timeout_s, valid_only=True):
        batch, self.queue = self.queue[:3], self.queue[3:]
        return [r for r in batch if r["valid"] or not valid_only]


def collector(results: list[dict]) -> tuple[Clinical, _Collecting]:
    clin = Clinical.__new__(Clinical)  # only _collect is exercised: no sockets, no store
    clin.service = FakeService(results)
    clin._check_imaging = lambda: None
    c = _Collecting("C-1", "CASE", "captures/CASE/C-1", {}, T_REQUEST)
    c.forwarded = {r["frame_seq"] for r in results}
    c.first_seq = min(c.forwarded)
    return clin, c


def test_only_rois_found_after_the_request_count_in_automatic_mode():
    before = [result(s, found_ns=T_REQUEST - 5) for s in (10, 12, 14)]
    after = [result(s, found_ns=T_REQUEST + 5) for s in (16, 18, 20)]
    clin, c = collector(before + after)
    got = clin._collect(c, 3)
    assert [r["frame_seq"] for r in got] == [16, 18, 20]


def test_rois_set_by_command_count_whenever_they_were_set():
    clin, c = collector([result(s, found_ns=5, mode="set") for s in (10, 12)])
    assert [r["frame_seq"] for r in clin._collect(c, 2)] == [10, 12]


def test_results_that_keep_coming_back_not_valid_refuse_the_capture_with_reasons():
    bad = [result(s, found_ns=T_REQUEST + 1, valid=False, flags=["background_too_dim"]) for s in range(10, 60, 2)]
    clin, c = collector(bad)
    with pytest.raises(DeviceTimeout, match="not valid: background_too_dim 12"):
        clin._collect(c, 2)


def test_a_few_invalid_results_are_skipped_not_fatal():
    mixed = [result(10, found_ns=T_REQUEST + 1, valid=False, flags=["motion"]),
             result(12, found_ns=T_REQUEST + 1), result(14, found_ns=T_REQUEST + 1)]
    clin, c = collector(mixed)
    assert [r["frame_seq"] for r in clin._collect(c, 2)] == [12, 14]


@pytest.mark.parametrize("intensity,cnr,positive,failed", [
    (600.0, 20.0, True, []), (1.8, 20.0, False, ["intensity"]), (600.0, 0.5, False, ["cnr"])])
def test_the_capture_call_needs_every_criterion(intensity, cnr, positive, failed):
    rs = [dict(result(s, found_ns=0), intensity=intensity, background_std=(300.0 - 100.0) / cnr) for s in (1, 2)]
    cfg = SimpleNamespace(sbr_threshold=2.0, intensity_floor_cps_mw=50.0, cnr_floor=3.0)
    summary = _average(rs, cfg)
    assert summary["sbr"] == pytest.approx(3.0)
    assert summary["positive"] is positive and summary["criteria_failed"] == failed

