"""Diagnostic accuracy of tumor-bed fluorescence against pathology (PRODUCT.md section 1).

Pure Python, no scipy: a medical device lists every dependency, and the few special
functions needed here are short. The report's shape is pinned by the bus protocol
("The report"): a list of groups, each with its 2x2 counts and four proportions
(sensitivity, specificity, PPV, NPV), every proportion with an exact Clopper-Pearson and a
Wilson score 95 % interval.

The exact interval uses the inverse of the regularised incomplete beta function
``I_x(a, b)``:

- lower bound for ``k`` successes of ``n``: the ``alpha/2`` quantile of Beta(k, n-k+1)
  (0 when k = 0);
- upper bound: the ``1-alpha/2`` quantile of Beta(k+1, n-k) (1 when k = n).
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping

from hal.errors import InvalidArgument

log = logging.getLogger(__name__)

HISTOLOGIES = ("DFSP", "sSCC")
ARMS = ("control", "icg_0.25mg_per_kg", "icg_25mg")
ALL = "all"

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


# --- the report -------------------------------------------------------------------


def _check_filter(name: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise InvalidArgument(f"report: {name} = {value!r}; allowed one of "
                              f"{', '.join(repr(v) for v in allowed)} (or leave it out)")


def _group(histology: str, arm: str, rows: list[Mapping]) -> dict:
    tp = sum(1 for r in rows if r["positive"] and r["margin_positive"])
    fp = sum(1 for r in rows if r["positive"] and not r["margin_positive"])
    tn = sum(1 for r in rows if not r["positive"] and not r["margin_positive"])
    fn = sum(1 for r in rows if not r["positive"] and r["margin_positive"])
    return {
        "histology": histology,
        "arm": arm,
        "counts": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "positive_margins": tp + fn,
        "metrics": {
            "sensitivity": proportion(tp, tp + fn),
            "specificity": proportion(tn, tn + fp),
            "ppv": proportion(tp, tp + fp),
            "npv": proportion(tn, tn + fn),
        },
    }


def build_report(rows: Iterable[Mapping], histology: str | None = None,
                 arm: str | None = None) -> dict:
    """The accuracy report in the protocol's shape from tumor-bed captures with pathology.

    Each row needs ``histology``, ``arm``, ``positive`` (the cart's call) and
    ``margin_positive`` (the pathology truth). Rows whose call or truth is missing
    (``None``) cannot be scored and are left out (logged). The optional filters keep only
    rows of that histology and/or arm.

    Groups, in a fixed order: for each histology with data, one per arm with data then one
    over all its arms; finally one with histology and arm both ``"all"`` (always present,
    with null proportions when there is no data).
    """
    _check_filter("histology", histology, HISTOLOGIES)
    _check_filter("arm", arm, ARMS)
    kept: list[Mapping] = []
    skipped = 0
    for row in rows:
        h, a = row["histology"], row["arm"]
        if h not in HISTOLOGIES or a not in ARMS:
            raise InvalidArgument(f"report: a row has histology {h!r}, arm {a!r}; allowed "
                                  f"{', '.join(HISTOLOGIES)} and {', '.join(ARMS)}")
        if (histology is not None and h != histology) or (arm is not None and a != arm):
            continue
        if row["positive"] is None or row["margin_positive"] is None:
            skipped += 1
            continue
        kept.append(row)
    if skipped:
        log.info("report: %d row(s) without a call or a pathology finding left out", skipped)

    groups = []
    for h in HISTOLOGIES:
        of_histology = [r for r in kept if r["histology"] == h]
        if not of_histology:
            continue
        for a in ARMS:
            of_arm = [r for r in of_histology if r["arm"] == a]
            if of_arm:
                groups.append(_group(h, a, of_arm))
        groups.append(_group(h, ALL, of_histology))
    groups.append(_group(ALL, ALL, kept))
    return {"groups": groups}
