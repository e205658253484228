"""Reference figures for the study report, computed from the raw records with outside
libraries: statsmodels (proportion_confint beta/wilson; the cluster-robust variance of a
mean, which is Obuchowski's ratio-estimator variance), scipy (mannwhitneyu, chi2_contingency
without correction, fisher_exact) and lifelines (KaplanMeierFitter,
multivariate_logrank_test). The bookkeeping (which capture is a margin's, which patient is
in which group) is written again here, independently of services.study.report."""

from __future__ import annotations

import math
from datetime import date

import numpy as np
import pytest

sm = pytest.importorskip("statsmodels.api")
from statsmodels.stats.proportion import proportion_confint  # noqa: E402

scipy_stats = pytest.importorskip("scipy.stats")
lifelines = pytest.importorskip("lifelines")
from lifelines.statistics import multivariate_logrank_test  # noqa: E402

Z = 1.959963984540054
ICG = ("icg_0.25mg_per_kg", "icg_25mg")
ARMS = ("control",) + ICG
HIST = ("DFSP", "sSCC")


def key(rec):
    return (rec["centre_id"], rec["case_id"])


def latest(entries):
    return max(entries, key=lambda e: (e["t_ns"], e["uid"])) if entries else None


def truth_of(status, close_as="exclude", indeterminate_as="exclude"):
    if status == "positive":
        return True
    if status == "negative":
        return False
    how = {"close": close_as, "indeterminate": indeterminate_as}.get(status, "exclude")
    return None if how == "exclude" else how == "positive"


def ref_proportion(k, n, clusters=None):
    if n == 0:
        return {"k": k, "n": n, "value": None, "clopper_pearson": None, "wilson": None, "cluster_adjusted": None}
    out = {"k": k, "n": n, "value": k / n,
           "clopper_pearson": list(proportion_confint(k, n, alpha=0.05, method="beta")),
           "wilson": list(proportion_confint(k, n, alpha=0.05, method="wilson"))}
    # beta at k = 0 or n gives nan for the open end in some statsmodels versions: the exact bound is 0 or 1
    out["clopper_pearson"] = [0.0 if k == 0 else out["clopper_pearson"][0],
                              1.0 if k == n else out["clopper_pearson"][1]]
    out["cluster_adjusted"] = None if clusters is None else ref_cluster(clusters)
    return out


def ref_cluster(clusters):
    """p +- z * the cluster-robust standard error of the mean of the unit outcomes
    (statsmodels OLS on a constant, cov_type='cluster', its default G/(G-1) correction)."""
    clusters = [(x, m) for x, m in clusters if m > 0]
    if len(clusters) < 2:
        return None
    y, g = [], []
    for i, (x, m) in enumerate(clusters):
        y += [1.0] * x + [0.0] * (m - x)
        g += [i] * m
    y = np.array(y)
    fit = sm.OLS(y, np.ones_like(y)).fit(cov_type="cluster", cov_kwds={"groups": np.array(g)})
    p, se = float(fit.params[0]), float(fit.bse[0])
    return [max(0.0, p - Z * se), min(1.0, p + Z * se)]


def ref_group(h, a, rows, clustered=True):
    c = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    per = {}
    for r in rows:
        name = ("tp" if r["truth"] else "fp") if r["call"] else ("fn" if r["truth"] else "tn")
        c[name] += 1
        per.setdefault(r["patient"], {"tp": 0, "fp": 0, "tn": 0, "fn": 0})[name] += 1

    def cl(num, den):
        if not clustered:
            return None
        return [(v[num], sum(v[d] for d in den)) for v in per.values()]

    return {"histology": h, "arm": a, "counts": c, "positive_margins": c["tp"] + c["fn"],
            "metrics": {"sensitivity": ref_proportion(c["tp"], c["tp"] + c["fn"], cl("tp", ("tp", "fn"))),
                        "specificity": ref_proportion(c["tn"], c["tn"] + c["fp"], cl("tn", ("tn", "fp"))),
                        "ppv": ref_proportion(c["tp"], c["tp"] + c["fp"], cl("tp", ("tp", "fp"))),
                        "npv": ref_proportion(c["tn"], c["tn"] + c["fn"], cl("tn", ("tn", "fn")))}}


def ref_groups(rows, clustered=True):
    out = []
    for h in HIST:
        rh = [r for r in rows if r["histology"] == h]
        if not rh:
            continue
        for a in ICG:
            ra = [r for r in rh if r["arm"] == a]
            if ra:
                out.append(ref_group(h, a, ra, clustered))
        out.append(ref_group(h, "all", rh, clustered))
    out.append(ref_group("all", "all", rows, clustered))
    return out


def ref_auc(pos, neg):
    if not pos or not neg:
        return None
    return float(scipy_stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic) / (len(pos) * len(neg))


def ref_bootstrap(units, resamples, seed):
    patients = sorted({u[0] for u in units}, key=repr)
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(resamples, len(patients)))
    by = {p: [u for u in units if u[0] == p] for p in patients}
    aucs = []
    for draw in draws:
        chosen = [u for i in draw for u in by[patients[i]]]
        value = ref_auc([u[1] for u in chosen if u[2]], [u[1] for u in chosen if not u[2]])
        if value is not None:
            aucs.append(value)
    return [float(v) for v in np.percentile(aucs, [2.5, 97.5])]


def ref_km(times, events, at=730.5):
    if not times or max(times) < at:
        return None, None
    kmf = lifelines.KaplanMeierFitter().fit(np.array(times, float), np.array(events, bool))
    s = float(kmf.survival_function_at_times(at).iloc[0])
    ci = kmf.confidence_interval_survival_function_
    row = ci[ci.index <= at].iloc[-1]
    lower, upper = float(row.iloc[0]), float(row.iloc[1])
    return 1.0 - s, [1.0 - upper, 1.0 - lower]


def reference_report(data, threshold=None, resamples=2000, seed=20240501):
    """Every figure of the v2 report from the records, by outside libraries."""
    cases = {key(c): c for c in data["cases"]}
    caps = sorted(data["captures"], key=lambda c: (c["t_ns"], c["uid"]))
    path = {}
    for e in data["pathology"]:
        path.setdefault(e["capture_uid"], []).append(e)

    def call(c):
        if c["positive"] is None:
            return None
        if threshold is None:
            return c["positive"]
        floors = all(f is None or (v is not None and v >= f)
                     for v, f in ((c["intensity"], c["intensity_floor"]), (c["cnr"], c["cnr_floor"])))
        return c["sbr"] is not None and c["sbr"] >= threshold and floors

    def score(c):
        floors = all(f is None or (v is not None and v >= f)
                     for v, f in ((c["intensity"], c["intensity_floor"]), (c["cnr"], c["cnr_floor"])))
        return c["sbr"] if c["sbr"] is not None and floors else 0.0

    flow = {"enrolled": {a: sum(c["arm"] == a for c in cases.values()) for a in ARMS},
            "captures": len(caps), "tumor_bed_captures": sum(c["site"] == "tumor_bed" for c in caps),
            "not_evaluable": {"retake": 0, "no_valid_call": 0, "control_arm": 0},
            "without_pathology": 0, "close": 0, "indeterminate": 0, "scored_margins": 0}
    labels = {}
    for c in caps:
        if c["site"] != "tumor_bed":
            continue
        if cases[key(c)]["arm"] == "control":
            flow["not_evaluable"]["control_arm"] += 1
        else:
            labels.setdefault((key(c), c["label"] or ""), []).append(c)
    flow["imaged"] = len({k[0] for k in labels})
    rows, patient_calls = [], {}
    for (pk, _), group in labels.items():
        flow["not_evaluable"]["retake"] += len(group) - 1
        valid = [c for c in group if c["positive"] is not None]
        if not valid:
            flow["not_evaluable"]["no_valid_call"] += 1
            continue
        counted = valid[-1]
        patient_calls.setdefault(pk, []).append(call(counted))
        entry = latest([e for c in group for e in path.get(c["uid"], [])])
        if entry is None:
            flow["without_pathology"] += 1
            continue
        if entry["status"] in ("close", "indeterminate"):
            flow[entry["status"]] += 1
        t = truth_of(entry["status"])
        if t is None:
            continue
        flow["scored_margins"] += 1
        rows.append({"histology": cases[pk]["histology"], "arm": cases[pk]["arm"], "patient": pk,
                     "call": call(counted), "truth": t, "score": score(counted)})
    status = {}
    for e in data["margins"]:
        status.setdefault(key(e), []).append(e)
    status = {k: latest(v)["status"] for k, v in status.items()}
    patient_rows = []
    for pk, calls in patient_calls.items():
        t = truth_of(status.get(pk))
        if t is not None:
            patient_rows.append({"histology": cases[pk]["histology"], "arm": cases[pk]["arm"], "patient": pk,
                                 "call": any(calls), "truth": t})

    roc = []
    for h in HIST + ("all",):
        for a in ICG + ("all",):
            if h == "all" and a != "all":
                continue
            rr = [r for r in rows if h in ("all", r["histology"]) and a in ("all", r["arm"])]
            if not rr:
                continue
            pos = [r["score"] for r in rr if r["truth"]]
            neg = [r["score"] for r in rr if not r["truth"]]
            auc = ref_auc(pos, neg)
            roc.append({"histology": h, "arm": a, "auc": auc,
                        "auc_ci": None if auc is None else ref_bootstrap(
                            [(r["patient"], r["score"], r["truth"]) for r in rr], resamples, seed),
                        "points": [[0.0, 0.0, None]] + ([] if not pos or not neg else [
                            [float(np.mean(np.array(neg) >= t)), float(np.mean(np.array(pos) >= t)), t]
                            for t in sorted(set(pos + neg), reverse=True)])})

    margins_by_arm, recurrence = [], []
    visits = {}
    for e in data["followups"]:
        visits.setdefault(key(e), {}).setdefault(e["visit_date"], []).append(e)
    for h in HIST:
        pts = [k for k, c in cases.items() if c["histology"] == h]
        if not pts:
            continue
        arms, table = [], []
        for a in ARMS:
            pa = [k for k in pts if cases[k]["arm"] == a]
            if not pa:
                continue
            known = [truth_of(status.get(k)) for k in pa]
            known = [t for t in known if t is not None]
            arms.append({"arm": a, "positive": sum(known), "n": len(known)})
            if known:
                table.append([sum(known), len(known) - sum(known)])
        test = {"p": None}
        if len(table) >= 2 and all(sum(col) > 0 for col in zip(*table)):
            chi2, p, dof, _ = scipy_stats.chi2_contingency(np.array(table), correction=False)
            test = {"chi2_p" if len(table) == 2 else "p": float(p), "chi2": float(chi2)}
            if len(table) == 2:
                test["p"] = float(scipy_stats.fisher_exact(np.array(table))[1])
        elif len(table) == 2:
            test = {"p": float(scipy_stats.fisher_exact(np.array(table))[1])}
        margins_by_arm.append({"histology": h, "arms": arms, "test": test})
        rarms, T, E, G = [], [], [], []
        for a in ARMS:
            pa = [k for k in pts if cases[k]["arm"] == a]
            if not pa:
                continue
            times, events = [], []
            for k in pa:
                v = visits.get(k)
                if not v:
                    continue
                findings = sorted((d, latest(es)["local_recurrence"]) for d, es in v.items())
                start = date.fromisoformat(cases[k]["surgery_date"])
                ev = [d for d, rec in findings if rec]
                end = ev[0] if ev else findings[-1][0]
                times.append((date.fromisoformat(end) - start).days)
                events.append(bool(ev))
            km, ci = ref_km(times, events)
            rarms.append({"arm": a, "n": len(pa), "events": sum(events), "km_24m": km, "km_24m_ci": ci})
            T += times
            E += events
            G += [a] * len(times)
        p = None
        if len(set(G)) >= 2 and any(E):
            p = float(multivariate_logrank_test(np.array(T, float), np.array(G), np.array(E, bool)).p_value)
        recurrence.append({"histology": h, "arms": rarms, "logrank_p": p})

    worst = {}
    for e in data["adverse_events"]:
        worst[key(e)] = max(worst.get(key(e), 0), e["grade"])
    aes = []
    for a in ARMS:
        pa = [k for k, c in cases.items() if c["arm"] == a]
        if pa:
            aes.append({"arm": a, "n": len(pa), "patients_with_ae": sum(k in worst for k in pa),
                        "by_grade": {str(g): sum(worst.get(k) == g for k in pa) for g in range(1, 6)}})
    return {"groups": ref_groups(rows), "per_patient": ref_groups(patient_rows, clustered=False),
            "flow": flow, "roc": roc, "margins_by_arm": margins_by_arm, "recurrence": recurrence,
            "adverse_events": aes}


def compare(got, want, path="report", diffs=None):
    """Assert that every figure of ``want`` is in ``got`` (numbers to 1e-9 absolute);
    returns the list of absolute differences of the numbers compared."""
    diffs = [] if diffs is None else diffs
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{path}: {got!r} is not a map"
        for k, v in want.items():
            assert k in got, f"{path}: {k!r} missing"
            compare(got[k], v, f"{path}.{k}", diffs)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: {got!r} vs {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            compare(g, w, f"{path}[{i}]", diffs)
    elif isinstance(want, bool) or want is None or isinstance(want, str):
        assert got == want, f"{path}: {got!r} != {want!r}"
    else:
        assert got is not None and not isinstance(got, bool), f"{path}: {got!r} vs {want!r}"
        d = abs(float(got) - float(want))
        assert d <= 1e-9 or (math.isnan(got) and math.isnan(want)), f"{path}: {got!r} != {want!r}"
        diffs.append(d)
    return diffs
