"""S3a, repeated: interlock and key pulses of 1, 2, 5 and 10 ms (``sim.set pulse``, timed in
the hardware process) in ARMING, ARMED and EMITTING, through the bus of the running
simulated cart. Every one must latch FAULT, and no light may follow (judged on the hardware's
own record of the optical output) without a reset and a new arm.

Ten of each in ``make test`` (240 pulses), fifty with ``NIRF_FAULTS_LONG=1`` (1200), or
``NIRF_PULSE_REPEATS=N``. A trial is mostly waiting (the emission delay before ARMED, the
0.3 s watched for light after the pulse), so the repeats of each kind are shared between
four carts that run side by side (idle between trials: no camera stream). The module has
those carts to itself: they are stopped when it ends, before any timing-sensitive test of
another module runs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import faults as fi
from tests.safetybench import Bench, pulse_trial

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPEATS = int(os.environ.get("NIRF_PULSE_REPEATS", "50" if fi.LONG else "10"))
CARTS = 4


@pytest.fixture(scope="module")
def carts(tmp_path_factory):
    started: list[Bench] = []
    try:
        for i in range(CARTS):
            started.append(Bench(tmp_path_factory.mktemp(f"pulses-{i}")))
        yield started
    finally:
        for b in started:
            b.close()


def shares(total: int, n: int) -> list[int]:
    """``total`` trials dealt out to ``n`` carts as evenly as they go."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def test_the_trials_are_all_dealt_out():
    assert [sum(shares(t, n)) for t, n in ((10, 2), (11, 2), (50, 3), (1, 2))] == [10, 11, 50, 1]
    assert max(shares(11, 2)) - min(shares(11, 2)) == 1


@pytest.mark.parametrize("ms", [1, 2, 5, 10])
@pytest.mark.parametrize("stage", ["ARMING", "ARMED", "EMITTING"])
@pytest.mark.parametrize("name", ["interlock", "key"])
def test_every_pulse_latches_fault(carts, stage, name, ms):
    def run(bench: Bench, n: int) -> int:
        for _ in range(n):
            pulse_trial(bench, stage, name, ms)
        return n

    with ThreadPoolExecutor(max_workers=len(carts)) as pool:
        done = [pool.submit(run, b, n) for b, n in zip(carts, shares(REPEATS, len(carts)))]
        # result() re-raises the assertion of a failed trial; each trial's own waits are bounded
        assert sum(f.result(timeout=60 + 10 * REPEATS) for f in done) == REPEATS
