"""The S7a emission budget on its own (controller.budget): the sliding window, the wait it
names, the MCU's count, persistence across a restart and a damaged record."""

from __future__ import annotations

import json

import pytest

from nirf.controller.budget import EmissionBudget
from nirf.hal.clock import ManualClock


def emit(budget, clock, seconds):
    budget.start()
    clock.advance(seconds)
    budget.stop()


def test_time_accumulates_over_separate_stretches():
    clock = ManualClock()
    b = EmissionBudget(10.0, clock)
    for _ in range(4):
        emit(b, clock, 2.0)
        clock.advance(0.5)
    assert b.used_s() == pytest.approx(8.0)
    assert b.free_s() == pytest.approx(2.0)


def test_the_window_is_twice_the_limit():
    clock = ManualClock()
    b = EmissionBudget(10.0, clock)
    emit(b, clock, 10.0)  # [0, 10]
    clock.advance(5.0)  # now 15: the window [-5, 15] holds all 10 s
    assert b.used_s() == pytest.approx(10.0)
    clock.advance(7.0)  # now 22: the window [2, 22] holds 8 s
    assert b.used_s() == pytest.approx(8.0)
    clock.advance(10.0)
    assert b.used_s() == 0.0


def test_the_running_stretch_counts():
    clock = ManualClock()
    b = EmissionBudget(10.0, clock)
    b.start()
    clock.advance(3.0)
    assert b.used_s() == pytest.approx(3.0)
    assert b.emitting


def test_after_the_limit_a_turn_on_waits_for_enough_free_budget():
    clock = ManualClock()
    b = EmissionBudget(300.0, clock)
    emit(b, clock, 300.0)  # [0, 300]
    b.mark_exhausted()
    why = b.turn_on_refusal()
    # 60 s free once the window [t - 600, t] holds 240 s: t = 660, 360 s from now
    assert why is not None and "wait 360 s" in why and "60 s of budget is free" in why
    clock.advance(359.0)
    assert b.turn_on_refusal() is not None
    clock.advance(1.5)
    assert b.turn_on_refusal() is None


def test_before_the_limit_any_free_budget_allows_a_turn_on():
    clock = ManualClock()
    b = EmissionBudget(300.0, clock)
    emit(b, clock, 290.0)
    assert b.turn_on_refusal() is None  # the supervisor ends it when the budget runs out


def test_the_mcu_count_wins_when_larger_and_bounds_the_wait():
    clock = ManualClock()
    b = EmissionBudget(300.0, clock)
    assert b.free_s(mcu_used_s=250.0) == pytest.approx(50.0)
    b.mark_exhausted()
    why = b.turn_on_refusal(mcu_used_s=300.0)
    assert why is not None and "wait 60 s" in why  # its count falls at most 1 s per second


def test_the_record_survives_a_restart(tmp_path):
    clock = ManualClock()
    path = tmp_path / "safety" / "budget.json"
    b = EmissionBudget(10.0, clock, path)
    emit(b, clock, 4.0)
    b.start()
    clock.advance(3.0)
    b.tick()  # saved while emitting: a crash now keeps these 3 s
    assert b.flush()
    b2 = EmissionBudget(10.0, clock, path)  # the process died; a new one reads the file
    assert b2.used_s() == pytest.approx(7.0)
    assert not b2.emitting


def test_a_damaged_record_counts_as_a_used_up_budget(tmp_path):
    clock = ManualClock()
    path = tmp_path / "budget.json"
    path.write_text("{ torn")
    b = EmissionBudget(10.0, clock, path)
    assert b.load_problem and "cannot be read" in b.load_problem
    assert b.free_s() == 0.0
    assert b.turn_on_refusal() is not None


def test_a_record_from_the_future_counts_up_to_now(tmp_path):
    clock = ManualClock()
    path = tmp_path / "budget.json"
    now = clock.time_ns() / 1e9
    path.write_text(json.dumps({"version": 1, "intervals": [[now - 2.0, now + 50.0]], "open_since": None}))
    b = EmissionBudget(10.0, clock, path)
    assert b.used_s() == pytest.approx(2.0)


def test_a_bad_limit_is_refused():
    with pytest.raises(ValueError, match="limit_s"):
        EmissionBudget(0.0, ManualClock())


def test_a_record_that_cannot_be_written_is_logged_not_raised(tmp_path, caplog):
    clock = ManualClock()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    b = EmissionBudget(10.0, clock, blocker / "budget.json")
    emit(b, clock, 1.0)
    assert b.flush()
    assert b.used_s() == pytest.approx(1.0)  # the count in memory still holds
    assert any("not saved" in r.message for r in caplog.records)
    b.close()
