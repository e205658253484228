"""The study's statistics, in numpy and plain Python (no scipy at run time: a medical device
lists every dependency, and the few special functions needed are short).

Every method here is named in the report's ``methods`` map and compared in the tests with an
outside reference (statsmodels, scipy, lifelines):

- :func:`clopper_pearson`, :func:`wilson`: a binomial proportion's exact and score 95 %
  intervals (``statsmodels.stats.proportion.proportion_confint`` methods ``beta`` and
  ``wilson``).
- :func:`clustered_proportion`: several margins per patient. Obuchowski (1998) treats the
  proportion as a ratio estimator ``p = sum(x_i) / sum(m_i)`` over patients ``i`` with
  ``m_i`` margins of which ``x_i`` are successes; its variance is
  ``I / (I - 1) * sum((x_i - p m_i)^2) / (sum m_i)^2`` (``I`` patients), the same as a
  cluster-robust sandwich variance with the usual ``G / (G - 1)`` correction. The interval
  is ``p +- z sqrt(var)`` clipped to [0, 1].
- :func:`auc_mann_whitney`: the area under the ROC curve as the Mann-Whitney statistic
  over (positive, negative) pairs, a tie counting half; :func:`auc_cluster_bootstrap`:
  a percentile interval from resampling patients (not margins) with a seeded generator.
- :func:`pearson_chi2`: Pearson's chi-square test of independence without continuity
  correction; :func:`fisher_exact_2x2`: Fisher's exact test, two-sided (tables at most as
  probable as the one observed).
- :func:`kaplan_meier_incidence`: 1 - S(t) from the Kaplan-Meier estimate with the
  exponential Greenwood (log(-log)) 95 % interval, turned into an incidence interval;
  :func:`logrank`: the k-sample log-rank test.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from nirf.hal.errors import InvalidArgument

log = logging.getLogger(__name__)

# z for a two-sided 95 % interval: the 0.975 quantile of the standard normal.
Z_95 = 1.959963984540054

# The continued fraction converges in O(sqrt(max(a, b))) terms; studies of this size
# (n up to a few thousand) need far fewer than this bound, which only guards against a
# non-converging input turning into an endless loop.
_CF_MAX_TERMS = 10_000
_CF_EPS = 1e-15
# Smallest magnitude allowed for a Lentz denominator, so a zero never divides.
_CF_TINY = 1e-300
# Bisection alone halves a bracket of width 1 below 1e-16 in 54 steps; Newton speeds the
# usual case. The bound keeps the inverse finite whatever happens.
_INV_MAX_STEPS = 200


# --- special functions -------------------------------------------------------------


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Evaluate the continued fraction of ``I_x(a, b)`` with the modified Lentz method.

    Converges fast for ``x < (a + 1) / (a + b + 2)``; the caller swaps the arguments
    otherwise.
    """

    def guard(v: float) -> float:
        return v if abs(v) >= _CF_TINY else _CF_TINY

    # Term 0 has numerator 1; start the recurrences from the first partial denominator.
    c = 1.0
    d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    result = d
    for m in range(1, _CF_MAX_TERMS + 1):
        two_m = 2 * m
        # Even step: coefficient m (b - m) x / ((a + 2m - 1)(a + 2m)).
        coeff = m * (b - m) * x / ((a + two_m - 1.0) * (a + two_m))
        d = 1.0 / guard(1.0 + coeff * d)
        c = guard(1.0 + coeff / c)
        result *= d * c
        # Odd step: coefficient -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)).
        coeff = -(a + m) * (a + b + m) * x / ((a + two_m) * (a + two_m + 1.0))
        d = 1.0 / guard(1.0 + coeff * d)
        c = guard(1.0 + coeff / c)
        step = d * c
        result *= step
        if abs(step - 1.0) < _CF_EPS:
            return result
    raise ArithmeticError(f"incomplete beta: continued fraction for a={a}, b={b}, x={x} "
                          f"did not converge in {_CF_MAX_TERMS} terms")


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` for ``a, b > 0``,
    ``0 <= x <= 1``."""
    if not (a > 0 and b > 0):
        raise InvalidArgument(f"incomplete beta: a = {a}, b = {b}; both must be > 0")
    if not 0.0 <= x <= 1.0:
        raise InvalidArgument(f"incomplete beta: x = {x}; allowed 0 to 1")
    if x == 0.0:
        return 0.0
    if x == 1.0:
        return 1.0
    # x^a (1-x)^b / (a B(a, b)), in logs so large a, b do not overflow.
    log_front = a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    # On the other side the fraction converges slowly; use I_x(a, b) = 1 - I_{1-x}(b, a).
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def betaincinv(a: float, b: float, p: float) -> float:
    """The ``x`` in [0, 1] with ``I_x(a, b) = p``: a safeguarded Newton iteration that
    never leaves its bisection bracket."""
    if not (a > 0 and b > 0):
        raise InvalidArgument(f"inverse incomplete beta: a = {a}, b = {b}; both must be > 0")
    if not 0.0 <= p <= 1.0:
        raise InvalidArgument(f"inverse incomplete beta: p = {p}; allowed 0 to 1")
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    x = a / (a + b)  # the mean: a reasonable start
    log_b = _log_beta(a, b)
    for _ in range(_INV_MAX_STEPS):
        f = betainc(a, b, x) - p
        if f == 0.0:
            return x
        if f < 0.0:
            lo = x
        else:
            hi = x
        # The density of Beta(a, b) is the derivative of I_x(a, b) in x.
        log_density = (a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_b
        density = math.exp(log_density) if log_density < 700.0 else math.inf
        candidate = x - f / density if density > 0.0 and math.isfinite(density) else math.nan
        if not lo < candidate < hi:
            candidate = 0.5 * (lo + hi)
        if abs(candidate - x) <= 1e-15 * max(x, 1e-300) or hi - lo <= 1e-16:
            return candidate
        x = candidate
    log.warning("inverse incomplete beta a=%s b=%s p=%s stopped after %d steps at bracket "
                "width %.3g", a, b, p, _INV_MAX_STEPS, hi - lo)
    return 0.5 * (lo + hi)


# --- proportions and their intervals -------------------------------------------------


def _check_counts(k: int, n: int) -> None:
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidArgument(f"proportion: {name} = {v!r}; expected a whole number")
    if n < 0 or not 0 <= k <= n:
        raise InvalidArgument(f"proportion: k = {k}, n = {n}; need 0 <= k <= n")


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float] | None:
    """The exact (Clopper-Pearson) two-sided ``1 - alpha`` interval for ``k`` of ``n``;
    ``None`` when ``n == 0``."""
    _check_counts(k, n)
    if not 0.0 < alpha < 1.0:
        raise InvalidArgument(f"clopper_pearson: alpha = {alpha}; allowed strictly between 0 and 1")
    if n == 0:
        return None
    lower = 0.0 if k == 0 else betaincinv(k, n - k + 1, alpha / 2.0)
    upper = 1.0 if k == n else betaincinv(k + 1, n - k, 1.0 - alpha / 2.0)
    return (lower, upper)


def wilson(k: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval for ``k`` of ``n`` (default z: two-sided 95 %);
    ``None`` when ``n == 0``."""
    _check_counts(k, n)
    if not (math.isfinite(z) and z > 0.0):
        raise InvalidArgument(f"wilson: z = {z}; must be a positive number")
    if n == 0:
        return None
    p_hat = k / n
    z2 = z * z
    scale = 1.0 + z2 / n
    centre = (p_hat + z2 / (2.0 * n)) / scale
    half = (z / scale) * math.sqrt(p_hat * (1.0 - p_hat) / n + z2 / (4.0 * n * n))
    # At k = 0 (k = n) the lower (upper) bound is exactly 0 (1); the formula only gets
    # there up to rounding, which can also push a bound a hair outside [0, 1].
    lower = 0.0 if k == 0 else max(0.0, centre - half)
    upper = 1.0 if k == n else min(1.0, centre + half)
    return (lower, upper)


def proportion(k: int, n: int) -> dict:
    """``{"k", "n", "value", "clopper_pearson", "wilson"}`` with both 95 % intervals as
    two-item lists; value and intervals are ``None`` when ``n == 0``."""
    _check_counts(k, n)
    if n == 0:
        return {"k": k, "n": n, "value": None, "clopper_pearson": None, "wilson": None}
    return {
        "k": k,
        "n": n,
        "value": k / n,
        "clopper_pearson": list(clopper_pearson(k, n)),
        "wilson": list(wilson(k, n)),
    }


# --- clustered proportions (Obuchowski 1998) ---------------------------------------------


def clustered_proportion(clusters: Iterable[tuple[int, int]], z: float = Z_95) -> list[float] | None:
    """The cluster-adjusted 95 % interval of a proportion from ``(successes, units)`` per
    patient (patients with no unit are ignored): the ratio estimator with Obuchowski's
    variance and a normal interval clipped to [0, 1]. ``None`` with fewer than two patients
    (the variance needs two)."""
    pairs = [(int(x), int(m)) for x, m in clusters if int(m) > 0]
    for x, m in pairs:
        if not 0 <= x <= m:
            raise InvalidArgument(f"clustered proportion: {x} successes of {m} units; need 0 <= x <= m")
    n_clusters = len(pairs)
    if n_clusters < 2:
        return None
    x = np.array([p[0] for p in pairs], dtype=float)
    m = np.array([p[1] for p in pairs], dtype=float)
    total = m.sum()
    p_hat = x.sum() / total
    var = n_clusters / (n_clusters - 1.0) * float(np.sum((x - p_hat * m) ** 2)) / (total * total)
    half = z * math.sqrt(max(var, 0.0))
    return [max(0.0, p_hat - half), min(1.0, p_hat + half)]


# --- ROC and AUC ---------------------------------------------------------------------------


def auc_mann_whitney(scores_pos: Sequence[float], scores_neg: Sequence[float]) -> float | None:
    """P(score of a positive > score of a negative), ties counted half; ``None`` when either
    side is empty."""
    pos = np.asarray(scores_pos, dtype=float)
    neg = np.asarray(scores_neg, dtype=float)
    if pos.size == 0 or neg.size == 0:
        return None
    # Sorted negatives: for each positive, how many negatives are below it and how many equal.
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left")
    below_or_equal = np.searchsorted(neg_sorted, pos, side="right")
    u = float(np.sum(below) + 0.5 * np.sum(below_or_equal - below))
    return u / (pos.size * neg.size)


def bootstrap_indices(n_clusters: int, n_resamples: int, seed: int) -> np.ndarray:
    """The patients drawn in each bootstrap resample: ``numpy.random.default_rng(seed)
    .integers(0, n_clusters, size=(n_resamples, n_clusters))`` (documented so that anyone
    can redraw them)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_clusters, size=(n_resamples, n_clusters))


def auc_cluster_bootstrap(units: Sequence[tuple[object, float, bool]], *, n_resamples: int = 2000,
                          seed: int = 20240501, level: float = 0.95) -> list[float] | None:
    """A percentile interval for the AUC from resampling patients with replacement.

    ``units``: ``(patient key, score, truth)`` per margin. Patients are ordered by key and
    drawn with :func:`bootstrap_indices`; a resample without a positive or without a
    negative margin has no AUC and is skipped. The bounds are ``numpy.percentile`` (linear)
    of the resampled AUCs at ``(1 - level) / 2`` and ``(1 + level) / 2``. ``None`` when the
    AUC itself is undefined or no resample has one.
    """
    by_patient: dict = {}
    for key, score, truth in units:
        by_patient.setdefault(key, []).append((float(score), bool(truth)))
    keys = sorted(by_patient, key=repr)
    pos_all = [s for k in keys for s, t in by_patient[k] if t]
    neg_all = [s for k in keys for s, t in by_patient[k] if not t]
    if auc_mann_whitney(pos_all, neg_all) is None:
        return None
    # Vectorised over resamples: with w_a the number of times patient a is drawn, the
    # resample's Mann-Whitney sum is w' M w, where M[a, b] sums the pair scores (1, or 1/2
    # for a tie) of a's positive margins against b's negative ones; its pairs number
    # (w . n_pos)(w . n_neg). Every term is a multiple of 1/2, so the sums are exact.
    index = {k: i for i, k in enumerate(keys)}
    pos = [(index[k], s) for k in keys for s, t in by_patient[k] if t]
    neg = [(index[k], s) for k in keys for s, t in by_patient[k] if not t]
    pos_scores = np.array([s for _, s in pos])
    neg_scores = np.array([s for _, s in neg])
    pair = (pos_scores[:, None] > neg_scores[None, :]) + 0.5 * (pos_scores[:, None] == neg_scores[None, :])
    n = len(keys)
    to_pos = np.zeros((len(pos), n))
    to_pos[np.arange(len(pos)), [i for i, _ in pos]] = 1.0
    to_neg = np.zeros((len(neg), n))
    to_neg[np.arange(len(neg)), [i for i, _ in neg]] = 1.0
    m = to_pos.T @ pair @ to_neg
    n_pos, n_neg = to_pos.sum(axis=0), to_neg.sum(axis=0)
    draws = bootstrap_indices(n, n_resamples, seed)
    weights = np.zeros((n_resamples, n))
    np.add.at(weights, (np.repeat(np.arange(n_resamples), n), draws.ravel()), 1.0)
    pairs = (weights @ n_pos) * (weights @ n_neg)
    sums = np.einsum("ij,ij->i", weights @ m, weights)
    ok = pairs > 0  # a resample without a positive or a negative margin has no AUC
    aucs = (sums[ok] / pairs[ok]).tolist()
    if not aucs:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(np.array(aucs), [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def roc_points(scores_pos: Sequence[float], scores_neg: Sequence[float]) -> list[list]:
    """``[fpr, tpr, threshold]`` for "positive when score >= threshold" at every distinct
    score, highest first, after a first point ``[0, 0, None]`` (nothing called positive)."""
    pos = np.asarray(scores_pos, dtype=float)
    neg = np.asarray(scores_neg, dtype=float)
    points: list[list] = [[0.0, 0.0, None]]
    if pos.size == 0 or neg.size == 0:
        return points
    for t in sorted(set(pos.tolist()) | set(neg.tolist()), reverse=True):
        points.append([float(np.mean(neg >= t)), float(np.mean(pos >= t)), float(t)])
    return points


# --- tests between groups -------------------------------------------------------------------


def _gammainc_lower_series(a: float, x: float) -> float:
    # P(a, x) = x^a e^-x / Gamma(a + 1) * sum_k x^k / ((a+1)...(a+k)); converges fast for x < a + 1.
    term = 1.0 / a
    total = term
    for k in range(1, _CF_MAX_TERMS):
        term *= x / (a + k)
        total += term
        if abs(term) < abs(total) * _CF_EPS:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gammainc_upper_fraction(a: float, x: float) -> float:
    # Q(a, x) = e^-x x^a / Gamma(a) * 1 / (x + 1 - a - 1 (1 - a) / (x + 3 - a - ...)), Lentz.
    b = x + 1.0 - a
    c = 1.0 / _CF_TINY
    d = 1.0 / b
    h = d
    for i in range(1, _CF_MAX_TERMS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = d if abs(d) >= _CF_TINY else _CF_TINY
        c = b + an / c
        c = c if abs(c) >= _CF_TINY else _CF_TINY
        d = 1.0 / d
        step = d * c
        h *= step
        if abs(step - 1.0) < _CF_EPS:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def gammaincc(a: float, x: float) -> float:
    """The regularised upper incomplete gamma function ``Q(a, x)`` for ``a > 0, x >= 0``."""
    if not a > 0 or not x >= 0:
        raise InvalidArgument(f"incomplete gamma: a = {a}, x = {x}; need a > 0 and x >= 0")
    if x == 0.0:
        return 1.0
    if x < a + 1.0:
        return max(0.0, 1.0 - _gammainc_lower_series(a, x))
    return min(1.0, _gammainc_upper_fraction(a, x))


def chi2_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for X ~ chi-square with ``df`` degrees of freedom."""
    if df < 1:
        raise InvalidArgument(f"chi-square: df = {df}; need at least 1")
    return gammaincc(df / 2.0, max(statistic, 0.0) / 2.0)


def pearson_chi2(table: Sequence[Sequence[int]]) -> dict | None:
    """Pearson's chi-square test of independence, no continuity correction:
    ``{"statistic", "df", "p"}``; ``None`` when a row or column total is zero (an expected
    count of zero) or the table is smaller than 2x2."""
    t = np.asarray(table, dtype=float)
    if t.ndim != 2 or t.shape[0] < 2 or t.shape[1] < 2:
        return None
    if np.any(t < 0):
        raise InvalidArgument(f"chi-square: table {t.tolist()} has a negative count")
    rows, cols = t.sum(axis=1), t.sum(axis=0)
    total = t.sum()
    if total == 0 or np.any(rows == 0) or np.any(cols == 0):
        return None
    expected = np.outer(rows, cols) / total
    statistic = float(np.sum((t - expected) ** 2 / expected))
    df = (t.shape[0] - 1) * (t.shape[1] - 1)
    return {"statistic": statistic, "df": df, "p": chi2_sf(statistic, df)}


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_exact_2x2(table: Sequence[Sequence[int]]) -> float:
    """The two-sided p of Fisher's exact test for a 2x2 table: the total probability (with
    the margins fixed) of the tables no more probable than the observed one, allowing a
    relative 1e-7 for rounding."""
    (a, b), (c, d) = [[int(v) for v in row] for row in table]
    if min(a, b, c, d) < 0:
        raise InvalidArgument(f"Fisher's exact test: table {[[a, b], [c, d]]} has a negative count")
    row1, row2, col1 = a + b, c + d, a + c
    n = row1 + row2
    if n == 0 or row1 == 0 or row2 == 0 or col1 == 0 or col1 == n:
        return 1.0
    lo, hi = max(0, col1 - row2), min(row1, col1)
    log_denominator = _log_comb(n, col1)

    def prob(x: int) -> float:
        return math.exp(_log_comb(row1, x) + _log_comb(row2, col1 - x) - log_denominator)

    observed = prob(a)
    p = sum(q for q in (prob(x) for x in range(lo, hi + 1)) if q <= observed * (1.0 + 1e-7))
    return min(1.0, p)


# --- time to event ---------------------------------------------------------------------------


def _km_steps(times: Sequence[float], events: Sequence[bool]):
    """(time, at risk, events) at each distinct time with at least one event, in order."""
    t = np.asarray(times, dtype=float)
    e = np.asarray(events, dtype=bool)
    steps = []
    for u in np.unique(t[e]):
        steps.append((float(u), int(np.sum(t >= u)), int(np.sum(e & (t == u)))))
    return steps


def kaplan_meier_incidence(times: Sequence[float], events: Sequence[bool], at: float,
                           z: float = Z_95) -> tuple[float | None, list[float] | None]:
    """Cumulative incidence ``1 - S(at)`` from the Kaplan-Meier estimate and its 95 %
    interval: the exponential Greenwood interval of ``S`` on the log(-log) scale
    (``S^exp(+-z sqrt(V) / log S)`` with ``V = sum d / (n (n - d))`` over steps where
    ``n > d``), turned into ``[1 - upper, 1 - lower]``. Where ``S`` is 1 the interval is
    [0, 0]; where it is 0, [1, 1]. ``(None, None)`` when nobody is at risk at ``at`` (no
    time reaches it), including when there is nobody at all."""
    t = np.asarray(times, dtype=float)
    if t.size != len(events):
        raise InvalidArgument(f"Kaplan-Meier: {t.size} times but {len(events)} event flags")
    if t.size == 0 or not np.any(t >= at):
        return None, None
    surv = 1.0
    greenwood = 0.0
    for u, n, d in _km_steps(times, events):
        if u > at:
            break
        surv *= 1.0 - d / n
        if n > d:
            greenwood += d / (n * (n - d))
    if surv >= 1.0:
        return 0.0, [0.0, 0.0]
    if surv <= 0.0:
        return 1.0, [1.0, 1.0]
    log_s = math.log(surv)
    spread = z * math.sqrt(greenwood) / log_s  # negative: log S < 0
    lower_s = math.exp(-math.exp(math.log(-log_s) - spread))
    upper_s = math.exp(-math.exp(math.log(-log_s) + spread))
    return 1.0 - surv, [1.0 - upper_s, 1.0 - lower_s]


def logrank(times: Sequence[float], events: Sequence[bool], groups: Sequence) -> dict | None:
    """The k-sample log-rank test: ``{"statistic", "df", "p"}`` with ``df = k - 1`` over the
    groups present; ``None`` with fewer than two groups or no event (nothing to compare)."""
    t = np.asarray(times, dtype=float)
    e = np.asarray(events, dtype=bool)
    g = np.asarray([str(v) for v in groups])
    labels = sorted(set(g.tolist()))
    k = len(labels)
    if k < 2 or not np.any(e):
        return None
    observed_minus_expected = np.zeros(k)
    variance = np.zeros((k, k))
    for u in np.unique(t[e]):
        at_risk = np.array([np.sum((t >= u) & (g == lab)) for lab in labels], dtype=float)
        deaths = np.array([np.sum((t == u) & e & (g == lab)) for lab in labels], dtype=float)
        n, d = at_risk.sum(), deaths.sum()
        observed_minus_expected += deaths - d * at_risk / n
        if n > 1:
            share = at_risk / n
            factor = d * (n - d) / (n - 1)
            variance += factor * (np.diag(share) - np.outer(share, share))
    # The k group sums add to zero: the test uses any k - 1 of them. The pseudo-inverse
    # keeps a degenerate variance (an event with one patient at risk) from failing: its
    # direction then adds nothing to the statistic.
    v = variance[:-1, :-1]
    diff = observed_minus_expected[:-1]
    statistic = float(diff @ np.linalg.pinv(v) @ diff)
    if not math.isfinite(statistic):
        return None
    return {"statistic": statistic, "df": k - 1, "p": chi2_sf(statistic, k - 1)}
