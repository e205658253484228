"""The world's laser history: the mean optical output over a window (what the camera renders
a frame from, and what the tests judge light by), checked against numpy's integration of the
same step function sampled at every nanosecond boundary that matters; and the peak over a
window (what the MCU's photodiode sees in a dark exposure), against the same sampling."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nirf.sim.world import mean_of_steps, peak_of_steps


def reference_mean(events, t0, t1):
    """Independent: the step function's value on each piece between consecutive change points
    (numpy searchsorted picks the value in force), integrated piece by piece."""
    times = np.array([t for t, _ in events], dtype=np.int64)
    values = np.array([v for _, v in events], dtype=np.float64)

    def value_at(t):
        i = np.searchsorted(times, t, side="right") - 1
        return values[max(i, 0)]

    if t1 <= t0:
        return float(value_at(t0))
    cuts = np.unique(np.concatenate([[t0, t1], times[(times > t0) & (times < t1)]]))
    widths = np.diff(cuts).astype(np.float64)
    return float(sum(w * value_at(a) for w, a in zip(widths, cuts[:-1])) / (t1 - t0))


steps = st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from([0.0, 12.5, 50.0, 200.0])),
                 min_size=1, max_size=60).map(lambda ev: sorted(ev, key=lambda e: e[0]))


@settings(max_examples=400, deadline=None)
@given(steps, st.integers(-100, 10_100), st.integers(0, 3_000))
def test_the_mean_over_any_window_equals_the_integral(events, t0, width):
    got = mean_of_steps(events, t0, t0 + width)
    assert abs(got - reference_mean(events, t0, t0 + width)) <= 1e-9 * max(1.0, abs(got))


@settings(max_examples=400, deadline=None)
@given(steps, st.integers(-100, 10_100), st.integers(0, 3_000))
def test_the_peak_over_any_window_is_the_highest_value_in_force_in_it(events, t0, width):
    times = np.array([t for t, _ in events], dtype=np.int64)
    values = np.array([v for _, v in events], dtype=np.float64)
    # independent: the value in force (numpy searchsorted) at t0 and at every change inside
    at = np.unique(np.concatenate([[t0], times[(times > t0) & (times < t0 + width)]]))
    in_force = values[np.maximum(np.searchsorted(times, at, side="right") - 1, 0)]
    assert peak_of_steps(events, t0, t0 + width) == float(in_force.max())


def test_a_long_history_and_a_window_at_its_end():
    # a modulated laser: on and off every 8.3 ms for a minute, then a half-lit exposure
    events = [(i * 8_333_333, 50.0 if i % 2 else 0.0) for i in range(7200)]
    t_last = events[-1][0]
    assert mean_of_steps(events, t_last - 4_000_000, t_last + 4_000_000) == 25.0
    assert mean_of_steps(events, t_last + 1, t_last + 1) == 50.0
    assert mean_of_steps(events, -5, -1) == 0.0  # before the first point: its value
