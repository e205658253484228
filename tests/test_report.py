"""Accuracy statistics and the report's shape.

Interval values are checked against results derived here by other means: closed forms at
the edges, binomial tail sums from ``math.comb`` in the middle, the Wilson bounds as roots
of their defining quadratic, and the published 27-of-30 example.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from nirf.hal.errors import InvalidArgument
from nirf.services.study import report
from nirf.services.study.report import (betainc, betaincinv, build_report, clopper_pearson, proportion,
                             wilson)

ALPHA = 0.05
Z = 1.959963984540054


def upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed term by term."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def lower_tail(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, k + 1))


def wilson_by_quadratic(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson bounds: the p solving (k/n - p)^2 = z^2 p (1 - p) / n, i.e.
    (1 + z^2/n) p^2 - (2 k/n + z^2/n) p + (k/n)^2 = 0."""
    ph = k / n
    a = 1 + z * z / n
    b = -(2 * ph + z * z / n)
    c = ph * ph
    disc = math.sqrt(b * b - 4 * a * c)
    return ((-b - disc) / (2 * a), (-b + disc) / (2 * a))


# --- the incomplete beta function ----------------------------------------------------


def test_betainc_matches_binomial_identity():
    # I_p(k, n-k+1) = P(X >= k) for X ~ Binomial(n, p).
    for n, k, p in [(10, 3, 0.2), (30, 27, 0.8), (50, 1, 0.01), (200, 150, 0.77)]:
        assert betainc(k, n - k + 1, p) == pytest.approx(upper_tail(k, n, p), rel=1e-11, abs=1e-14)


def test_betainc_closed_forms_and_edges():
    # I_x(1, 1) = x; I_x(a, 1) = x^a; I_x(1, b) = 1 - (1-x)^b.
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert betainc(1, 1, x) == pytest.approx(x, abs=1e-15)
        assert betainc(3.5, 1, x) == pytest.approx(x**3.5, abs=1e-14)
        assert betainc(1, 4, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-14)


def test_betaincinv_inverts():
    for a, b, p in [(2, 3, 0.3), (27, 4, 0.025), (0.5, 0.5, 0.9), (100, 1, 0.5)]:
        x = betaincinv(a, b, p)
        assert 0 < x < 1
        assert betainc(a, b, x) == pytest.approx(p, rel=1e-10)


@pytest.mark.parametrize("args", [(0, 1, 0.5), (1, -1, 0.5), (1, 1, 1.5), (1, 1, -0.1)])
def test_betainc_rejects_bad_arguments(args):
    with pytest.raises(InvalidArgument):
        betainc(*args)


def test_betaincinv_rejects_bad_probability():
    with pytest.raises(InvalidArgument):
        betaincinv(2, 2, 1.2)


# --- Clopper-Pearson -------------------------------------------------------------------


def test_clopper_pearson_27_of_30_known_values():
    lo, hi = clopper_pearson(27, 30)
    assert round(lo, 4) == 0.7347
    assert round(hi, 4) == 0.9789


def test_clopper_pearson_27_of_30_tails_are_half_alpha():
    lo, hi = clopper_pearson(27, 30)
    assert upper_tail(27, 30, lo) == pytest.approx(ALPHA / 2, rel=1e-9)
    assert lower_tail(27, 30, hi) == pytest.approx(ALPHA / 2, rel=1e-9)


@pytest.mark.parametrize("n", [1, 2, 7, 30, 250])
def test_clopper_pearson_zero_of_n(n):
    lo, hi = clopper_pearson(0, n)
    assert lo == 0.0
    assert hi == pytest.approx(1 - (ALPHA / 2) ** (1 / n), rel=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 30, 250])
def test_clopper_pearson_n_of_n(n):
    lo, hi = clopper_pearson(n, n)
    assert hi == 1.0
    assert lo == pytest.approx((ALPHA / 2) ** (1 / n), rel=1e-12)


def test_clopper_pearson_n_equal_one():
    assert clopper_pearson(0, 1) == (0.0, pytest.approx(1 - ALPHA / 2))
    assert clopper_pearson(1, 1) == (pytest.approx(ALPHA / 2), 1.0)


def test_clopper_pearson_other_alpha():
    lo, hi = clopper_pearson(4, 12, alpha=0.1)
    assert upper_tail(4, 12, lo) == pytest.approx(0.05, rel=1e-9)
    assert lower_tail(4, 12, hi) == pytest.approx(0.05, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=120).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(min_value=0, max_value=n))))
def test_clopper_pearson_tails_property(nk):
    n, k = nk
    lo, hi = clopper_pearson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    if k > 0:
        assert upper_tail(k, n, lo) == pytest.approx(ALPHA / 2, rel=1e-7)
    if k < n:
        assert lower_tail(k, n, hi) == pytest.approx(ALPHA / 2, rel=1e-7)


def test_clopper_pearson_zero_denominator_is_none():
    assert clopper_pearson(0, 0) is None


@pytest.mark.parametrize("k,n", [(-1, 3), (4, 3), (1.5, 3), (True, 3)])
def test_counts_validated(k, n):
    with pytest.raises(InvalidArgument):
        clopper_pearson(k, n)
    with pytest.raises(InvalidArgument):
        wilson(k, n)


def test_clopper_pearson_alpha_validated():
    with pytest.raises(InvalidArgument, match="alpha"):
        clopper_pearson(1, 2, alpha=1.0)


# --- Wilson ----------------------------------------------------------------------------


def test_wilson_27_of_30_known_values():
    lo, hi = wilson(27, 30)
    assert round(lo, 4) == 0.7438
    assert round(hi, 4) == 0.9654


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 9), (9, 9), (3, 17), (27, 30), (500, 1000)])
def test_wilson_roots_of_quadratic(k, n):
    lo, hi = wilson(k, n)
    qlo, qhi = wilson_by_quadratic(k, n, Z)
    assert lo == pytest.approx(max(0.0, qlo), abs=1e-12)
    assert hi == pytest.approx(min(1.0, qhi), abs=1e-12)
    assert 0.0 <= lo <= hi <= 1.0


def test_wilson_edges():
    lo, hi = wilson(0, 12)
    assert lo == 0.0 and 0.0 < hi < 1.0
    lo, hi = wilson(12, 12)
    assert hi == 1.0 and 0.0 < lo < 1.0
    assert wilson(0, 0) is None


# --- proportion -------------------------------------------------------------------------


def test_proportion_shape_and_values():
    p = proportion(27, 30)
    assert set(p) == {"k", "n", "value", "clopper_pearson", "wilson"}
    assert (p["k"], p["n"]) == (27, 30)
    assert p["value"] == pytest.approx(0.9)
    assert p["clopper_pearson"] == pytest.approx(list(clopper_pearson(27, 30)))
    assert p["wilson"] == pytest.approx(list(wilson(27, 30)))
    assert isinstance(p["clopper_pearson"], list) and len(p["clopper_pearson"]) == 2


def test_proportion_zero_denominator_nulls():
    assert proportion(0, 0) == {"k": 0, "n": 0, "value": None, "clopper_pearson": None,
                                "wilson": None}


# --- the report -------------------------------------------------------------------------


def row(histology, arm, positive, margin_positive):
    return {"histology": histology, "arm": arm, "positive": positive,
            "margin_positive": margin_positive}


def rows_from_counts(histology, arm, tp=0, fp=0, tn=0, fn=0):
    return ([row(histology, arm, True, True)] * tp + [row(histology, arm, True, False)] * fp
            + [row(histology, arm, False, False)] * tn + [row(histology, arm, False, True)] * fn)


def groups_by_key(rep):
    return {(g["histology"], g["arm"]): g for g in rep["groups"]}


def test_report_shape_is_the_protocols():
    rep = build_report(rows_from_counts("DFSP", "icg_25mg", tp=3, fp=1, tn=5, fn=2))
    assert set(rep) == {"groups"}
    for g in rep["groups"]:
        assert set(g) == {"histology", "arm", "counts", "positive_margins", "metrics"}
        assert set(g["counts"]) == {"tp", "fp", "tn", "fn"}
        assert set(g["metrics"]) == {"sensitivity", "specificity", "ppv", "npv"}
        for m in g["metrics"].values():
            # v2: each metric map gains the cluster-adjusted interval (null without patients)
            assert set(m) == {"k", "n", "value", "clopper_pearson", "wilson", "cluster_adjusted"}
            assert m["cluster_adjusted"] is None


def test_report_metrics_from_counts():
    tp, fp, tn, fn = 27, 4, 40, 3
    rep = build_report(rows_from_counts("sSCC", "icg_0.25mg_per_kg", tp=tp, fp=fp, tn=tn, fn=fn))
    g = groups_by_key(rep)[("sSCC", "icg_0.25mg_per_kg")]
    assert g["counts"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert g["positive_margins"] == tp + fn
    m = g["metrics"]
    assert (m["sensitivity"]["k"], m["sensitivity"]["n"]) == (tp, tp + fn)
    assert (m["specificity"]["k"], m["specificity"]["n"]) == (tn, tn + fp)
    assert (m["ppv"]["k"], m["ppv"]["n"]) == (tp, tp + fp)
    assert (m["npv"]["k"], m["npv"]["n"]) == (tn, tn + fn)
    assert m["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
    assert [round(v, 4) for v in m["sensitivity"]["clopper_pearson"]] == [0.7347, 0.9789]
    assert [round(v, 4) for v in m["sensitivity"]["wilson"]] == [0.7438, 0.9654]


def test_report_grouping():
    data = (rows_from_counts("DFSP", "control", tp=1, tn=2)
            + rows_from_counts("DFSP", "icg_25mg", tp=4, fp=1, fn=1)
            + rows_from_counts("sSCC", "icg_0.25mg_per_kg", tn=3, fn=2))
    rep = build_report(data)
    keys = [(g["histology"], g["arm"]) for g in rep["groups"]]
    # v2: the control arm has no imaging and never enters the accuracy groups
    assert keys == [("DFSP", "icg_25mg"), ("DFSP", "all"),
                    ("sSCC", "icg_0.25mg_per_kg"), ("sSCC", "all"), ("all", "all")]
    by = groups_by_key(rep)
    assert by[("DFSP", "all")]["counts"] == {"tp": 4, "fp": 1, "tn": 0, "fn": 1}
    assert by[("all", "all")]["counts"] == {"tp": 4, "fp": 1, "tn": 3, "fn": 3}
    # Each arm group's counts add up to the histology's.
    for h in ("DFSP", "sSCC"):
        arms = [g for g in rep["groups"] if g["histology"] == h and g["arm"] != "all"]
        for key in ("tp", "fp", "tn", "fn"):
            assert sum(g["counts"][key] for g in arms) == by[(h, "all")]["counts"][key]


def test_report_zero_denominators_give_nulls():
    rep = build_report(rows_from_counts("DFSP", "icg_25mg", tn=4))
    m = groups_by_key(rep)[("DFSP", "icg_25mg")]["metrics"]
    for name in ("sensitivity", "ppv"):
        assert m[name]["value"] is None and m[name]["clopper_pearson"] is None
        assert m[name]["wilson"] is None and m[name]["n"] == 0
    assert m["specificity"]["value"] == 1.0


def test_report_empty_has_only_the_all_group():
    rep = build_report([])
    assert [(g["histology"], g["arm"]) for g in rep["groups"]] == [("all", "all")]
    assert rep["groups"][0]["metrics"]["sensitivity"]["value"] is None


def test_report_filters():
    data = (rows_from_counts("DFSP", "control", tp=1, tn=2)
            + rows_from_counts("DFSP", "icg_25mg", tp=4, fn=1)
            + rows_from_counts("sSCC", "icg_25mg", tn=3))
    rep = build_report(data, histology="DFSP")
    assert {g["histology"] for g in rep["groups"]} == {"DFSP", "all"}
    assert groups_by_key(rep)[("all", "all")]["counts"]["tp"] == 4  # the control rows never count
    rep = build_report(data, arm="icg_25mg")
    assert {g["arm"] for g in rep["groups"]} == {"icg_25mg", "all"}
    assert groups_by_key(rep)[("all", "all")]["counts"] == {"tp": 4, "fp": 0, "tn": 3, "fn": 1}


def test_report_skips_rows_without_call_or_truth():
    data = rows_from_counts("DFSP", "icg_25mg", tp=2) + [row("DFSP", "icg_25mg", None, True),
                                                         row("DFSP", "icg_25mg", True, None)]
    rep = build_report(data)
    assert groups_by_key(rep)[("all", "all")]["counts"]["tp"] == 2


@pytest.mark.parametrize("kw", [{"histology": "melanoma"}, {"arm": "icg_1mg"}])
def test_report_bad_filter(kw):
    with pytest.raises(InvalidArgument, match="allowed"):
        build_report([], **kw)


def test_report_bad_row():
    with pytest.raises(InvalidArgument):
        build_report([row("BCC", "control", True, True)])


def test_constants_match_protocol():
    assert report.HISTOLOGIES == ("DFSP", "sSCC")
    assert report.ARMS == ("control", "icg_0.25mg_per_kg", "icg_25mg")


def test_rows_with_patients_get_the_cluster_adjusted_interval():
    data = [dict(r, patient=i // 3) for i, r in enumerate(rows_from_counts("DFSP", "icg_25mg", tp=7, fn=2, tn=6))]
    m = groups_by_key(build_report(data))[("DFSP", "icg_25mg")]["metrics"]["sensitivity"]
    lo, hi = m["cluster_adjusted"]
    assert 0.0 <= lo < m["value"] < hi <= 1.0
