"""The study's statistics against outside references: statsmodels (proportion_confint, the
cluster-robust variance), scipy (mannwhitneyu, chi2_contingency, fisher_exact, chi2) and
lifelines (KaplanMeierFitter, multivariate_logrank_test); and a simulation showing that the
cluster-adjusted interval keeps its coverage where the plain ones do not."""

from __future__ import annotations

import numpy as np
import pytest

from nirf.hal.errors import InvalidArgument
from nirf.services.study import stats
from tests import study_reference as ref

scipy_stats = pytest.importorskip("scipy.stats")
from statsmodels.stats.proportion import proportion_confint  # noqa: E402


def test_proportion_intervals_match_statsmodels():
    worst = 0.0
    for n in list(range(1, 41)) + [57, 100, 333, 1000]:
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n} & set(range(n + 1))):
            for method, ours in (("beta", stats.clopper_pearson), ("wilson", stats.wilson)):
                lo, hi = proportion_confint(k, n, alpha=0.05, method=method)
                got = ours(k, n)
                if method == "beta":  # statsmodels gives nan at the closed ends in some versions
                    lo, hi = (0.0 if k == 0 else lo), (1.0 if k == n else hi)
                worst = max(worst, abs(got[0] - lo), abs(got[1] - hi))
    assert worst < 1e-12, worst


def test_cluster_adjusted_matches_the_cluster_robust_variance():
    rng = np.random.default_rng(1)
    for _ in range(30):
        m = rng.integers(1, 6, size=int(rng.integers(2, 40)))
        x = np.array([rng.integers(0, mi + 1) for mi in m])
        clusters = list(zip(x.tolist(), m.tolist()))
        got = stats.clustered_proportion(clusters)
        want = ref.ref_cluster(clusters)
        assert got == pytest.approx(want, abs=1e-12)
    assert stats.clustered_proportion([(1, 3)]) is None  # one patient: no variance
    assert stats.clustered_proportion([(3, 3), (2, 2)]) == [1.0, 1.0]
    with pytest.raises(InvalidArgument):
        stats.clustered_proportion([(4, 3), (1, 2)])


def test_auc_matches_mann_whitney_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(40):
        pos = np.round(rng.normal(3, 1, size=int(rng.integers(1, 30))), 1).tolist()
        neg = np.round(rng.normal(2, 1, size=int(rng.integers(1, 30))), 1).tolist()
        assert stats.auc_mann_whitney(pos, neg) == pytest.approx(ref.ref_auc(pos, neg), abs=1e-12)
    assert stats.auc_mann_whitney([2.0, 2.0], [2.0]) == 0.5
    assert stats.auc_mann_whitney([], [1.0]) is None


def test_cluster_bootstrap_redraws_patients_with_the_documented_generator():
    rng = np.random.default_rng(3)
    units = []
    for p in range(25):
        for _ in range(int(rng.integers(1, 5))):
            truth = bool(rng.random() < 0.4)
            units.append((("AMS", f"DFSP-{p:03d}"), round(float(rng.normal(3 if truth else 2, 1)), 1), truth))
    got = stats.auc_cluster_bootstrap(units, n_resamples=300, seed=99)
    assert got == pytest.approx(ref.ref_bootstrap(units, 300, 99), abs=1e-12)
    assert got[0] < stats.auc_mann_whitney([u[1] for u in units if u[2]], [u[1] for u in units if not u[2]]) < got[1]
    assert stats.auc_cluster_bootstrap(units, n_resamples=300, seed=100) != got  # the seed matters


def test_chi_square_and_fisher_match_scipy():
    rng = np.random.default_rng(4)
    for _ in range(60):
        rows = int(rng.integers(2, 4))
        table = rng.integers(0, 25, size=(rows, 2))
        table[:, 0] += 1
        table[:, 1] += 1
        chi2, p, dof, _ = scipy_stats.chi2_contingency(table, correction=False)
        got = stats.pearson_chi2(table.tolist())
        assert got["statistic"] == pytest.approx(chi2, abs=1e-10)
        assert got["df"] == dof
        assert got["p"] == pytest.approx(p, abs=1e-12)
        if rows == 2:
            assert stats.fisher_exact_2x2(table.tolist()) == pytest.approx(
                scipy_stats.fisher_exact(table)[1], abs=1e-12)
    for x, df in ((0.5, 1), (3.84, 1), (40.0, 2), (1e-3, 4), (200.0, 3)):
        assert stats.chi2_sf(x, df) == pytest.approx(scipy_stats.chi2.sf(x, df), rel=1e-10, abs=1e-300)
    assert stats.pearson_chi2([[0, 5], [0, 7]]) is None  # an empty column: no test
    assert stats.fisher_exact_2x2([[0, 5], [0, 7]]) == 1.0


def test_kaplan_meier_and_logrank_match_lifelines():
    lifelines = pytest.importorskip("lifelines")
    from lifelines.statistics import multivariate_logrank_test

    rng = np.random.default_rng(5)
    for trial in range(25):
        n = int(rng.integers(3, 40))
        times = rng.integers(0, 1400, size=n).astype(float)
        times[rng.random(n) < 0.2] = 365.0  # ties
        events = rng.random(n) < 0.4
        got = stats.kaplan_meier_incidence(times.tolist(), events.tolist(), 730.5)
        want = ref.ref_km(times.tolist(), events.tolist())
        if want[0] is None:
            assert got == (None, None)
        else:
            assert got[0] == pytest.approx(want[0], abs=1e-12)
            assert got[1] == pytest.approx(want[1], abs=1e-12)
        groups = rng.choice(["control", "icg_25mg", "icg_0.25mg_per_kg"], size=n)
        test = stats.logrank(times.tolist(), events.tolist(), groups.tolist())
        if len(set(groups)) > 1 and events.any():
            p = multivariate_logrank_test(times, groups, events).p_value
            assert test["p"] == pytest.approx(p, abs=1e-10), trial
    # nobody followed to two years: no estimate
    assert stats.kaplan_meier_incidence([100.0, 200.0], [True, False], 730.5) == (None, None)
    # every event before two years: incidence 1
    assert stats.kaplan_meier_incidence([100.0, 800.0], [True, True], 730.5)[0] == 0.5
    del lifelines


@pytest.mark.slow  # seconds of CPU: in make test, not in test-quick
def test_cluster_adjusted_coverage_holds_where_plain_intervals_fail(capsys):
    """4 margins per patient, within-patient correlation 0.5 (beta-binomial, ICC = 1 / (a +
    b + 1)), true sensitivity 0.8, 60 patients: the plain intervals cover the truth about
    80 % of the time, the cluster-adjusted one about 95 %."""
    rng = np.random.default_rng(20240501)
    p, icc, m, patients, reps = 0.8, 0.5, 4, 60, 2000
    s = (1 - icc) / icc
    covered = {"wilson": 0, "clopper_pearson": 0, "cluster_adjusted": 0}
    for _ in range(reps):
        p_i = rng.beta(p * s, (1 - p) * s, size=patients)
        x = rng.binomial(m, p_i)
        k, n = int(x.sum()), m * patients
        for name, ci in (("wilson", stats.wilson(k, n)), ("clopper_pearson", stats.clopper_pearson(k, n)),
                         ("cluster_adjusted", stats.clustered_proportion(zip(x.tolist(), [m] * patients)))):
            covered[name] += ci[0] <= p <= ci[1]
    coverage = {k: float(v) / reps for k, v in covered.items()}
    with capsys.disabled():
        print(f"\n[coverage] {reps} studies of {patients} patients x {m} margins, ICC {icc}: {coverage}")
    assert 0.93 <= coverage["cluster_adjusted"] <= 0.97, coverage
    assert coverage["wilson"] <= 0.85 and coverage["clopper_pearson"] <= 0.87, coverage
