"""The study report (PRODUCT.md section 10; bus protocol "The report" and "v2 report").

The report is computed from the study's records (:func:`build_study_report`), the same way
whether they come from one cart's case store or from several carts' exports pooled
(:mod:`nirf.services.study.pool`). The records are a map of lists (see
:mod:`nirf.services.study.records`): ``cases``, ``captures``, ``pathology`` (entries per
capture), ``margins`` (the patient's final margin status), ``followups``,
``adverse_events`` and ``deviations``. Every record carries ``uid``, ``centre_id`` and
``cart_id``; a patient is ``(centre_id, case_id)``.

How the figures are made (the methods are named in the report's ``methods``):

- Diagnostic accuracy counts margins of the ICG arms only; the control arm has no imaging
  and never enters ``groups``, ``per_patient`` or ``roc``. A margin is (patient, capture
  label) among tumor-bed captures: the last capture with a call (a defined SBR) counts, the
  others are retakes. Its pathology is the latest entry for any capture of that label.
  ``positive`` and ``negative`` are scored; ``close`` and ``indeterminate`` are left out and
  counted in ``flow`` unless configured to count as positive or negative.
- The call is the one made at capture (the threshold in force then is kept with it), or,
  when a ``threshold`` is asked for, ``SBR >= threshold`` with the intensity and CNR floors
  stored with the capture still applying (a capture below a floor is negative whatever the
  threshold; its ROC score is 0).
- Per patient: positive when any counted tumor-bed margin is; truth from ``margin.set``.
- Every tumor-bed capture ends in exactly one ``flow`` bucket: scored, retake, no valid
  call, control arm, without pathology, close or indeterminate (left out), so no exclusion
  is silent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from typing import Iterable, Mapping

from nirf.hal.errors import InvalidArgument
from nirf.services.study.stats import (Z_95, auc_cluster_bootstrap, auc_mann_whitney, betainc,  # noqa: F401
                                  betaincinv, clopper_pearson, clustered_proportion,
                                  fisher_exact_2x2, kaplan_meier_incidence, logrank,
                                  pearson_chi2, proportion, roc_points, wilson)

log = logging.getLogger(__name__)

HISTOLOGIES = ("DFSP", "sSCC")
ARMS = ("control", "icg_0.25mg_per_kg", "icg_25mg")
ICG_ARMS = ("icg_0.25mg_per_kg", "icg_25mg")
ALL = "all"
STATUSES = ("positive", "close", "negative", "indeterminate")
# How a close or indeterminate margin enters the 2x2 tables (configurable).
TREATMENTS = ("exclude", "positive", "negative")
GRADES = (1, 2, 3, 4, 5)
# The primary outcome's horizon: 2 years of 365.25 days.
HORIZON_DAYS = 730.5

METHODS = {
    "proportion_intervals": "two-sided 95 %: exact Clopper-Pearson (beta quantiles) and Wilson score",
    "cluster_adjusted": "Obuchowski (1998) ratio estimator for clustered proportions: variance "
                        "I/(I-1) * sum((x_i - p m_i)^2) / (sum m_i)^2 over the I patients, normal "
                        "95 % interval clipped to [0, 1]; null with fewer than 2 patients; "
                        "per_patient groups have one unit per patient and no such interval",
    "margin": "a margin is (patient, capture label) of a tumor-bed capture; the last capture with "
              "a call counts, earlier ones are retakes; pathology: the latest entry for the label",
    "per_patient": "positive when any counted tumor-bed margin is; truth: the latest margin.set",
    "auc": "Mann-Whitney: P(SBR of a positive margin > SBR of a negative one), ties half",
    "auc_ci": "percentile 95 % interval of a cluster bootstrap over patients "
              "(numpy default_rng(seed).integers(0, I, (B, I)); resamples lacking a class skipped)",
    "roc_points": "[fpr, tpr, threshold] for 'positive when SBR >= threshold' at each distinct SBR",
    "margins_by_arm": "patients whose final margin is positive among those with a scored status, "
                      "per arm; Pearson chi-square without continuity correction over the arms; "
                      "Fisher's exact test (two-sided) when two arms have patients",
    "recurrence": "Kaplan-Meier from the surgery date, event: first visit with local recurrence, "
                  "censored at the last visit without; km_24m = 1 - S(730.5 days) with the "
                  "exponential Greenwood (log(-log)) 95 % interval turned into incidence; null "
                  "when nobody is at risk at 730.5 days; log-rank test over the arms",
    "adverse_events": "patients with at least one adverse event, and patients by their worst grade",
}


@dataclass(frozen=True)
class ReportOptions:
    """How the report scores what is configurable (``[study]`` in the configuration)."""

    close_as: str = "exclude"
    indeterminate_as: str = "exclude"
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 20240501

    def __post_init__(self):
        for name in ("close_as", "indeterminate_as"):
            value = getattr(self, name)
            if value not in TREATMENTS:
                raise InvalidArgument(f"{name} = {value!r}: allowed one of {', '.join(TREATMENTS)}")
        if not 100 <= self.bootstrap_resamples <= 100_000:
            raise InvalidArgument(f"bootstrap_resamples = {self.bootstrap_resamples}: allowed 100 to 100000")

    def truth(self, status: str | None) -> bool | None:
        """The 2x2 truth of a pathology status; ``None`` when it is left out."""
        if status == "positive":
            return True
        if status == "negative":
            return False
        treatment = {"close": self.close_as, "indeterminate": self.indeterminate_as}.get(status, "exclude")
        return None if treatment == "exclude" else treatment == "positive"


def _check_filter(name: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise InvalidArgument(f"report: {name} = {value!r}; allowed one of "
                              f"{', '.join(repr(v) for v in allowed)} (or leave it out)")


def _metric(k: int, n: int, clusters: list[tuple[int, int]] | None) -> dict:
    m = proportion(k, n)
    m["cluster_adjusted"] = None if clusters is None or n == 0 else clustered_proportion(clusters)
    return m


def _group(histology: str, arm: str, rows: list[Mapping], clustered: bool = True) -> dict:
    """Counts and the four proportions of ``rows`` (``positive`` call, ``margin_positive``
    truth, ``patient`` key for the cluster-adjusted interval)."""
    tp = sum(1 for r in rows if r["positive"] and r["margin_positive"])
    fp = sum(1 for r in rows if r["positive"] and not r["margin_positive"])
    tn = sum(1 for r in rows if not r["positive"] and not r["margin_positive"])
    fn = sum(1 for r in rows if not r["positive"] and r["margin_positive"])
    clusters = None
    if clustered and all(r.get("patient") is not None for r in rows):
        per: dict = {}
        for r in rows:
            c = per.setdefault(r["patient"], [0, 0, 0, 0])  # tp fp tn fn
            c[(0 if r["margin_positive"] else 1) if r["positive"] else (3 if r["margin_positive"] else 2)] += 1
        clusters = list(per.values())

    def cl(num: int, den: tuple[int, ...]):
        if clusters is None:
            return None
        return [(c[num], sum(c[i] for i in den)) for c in clusters]

    return {
        "histology": histology,
        "arm": arm,
        "counts": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "positive_margins": tp + fn,
        "metrics": {
            "sensitivity": _metric(tp, tp + fn, cl(0, (0, 3))),
            "specificity": _metric(tn, tn + fp, cl(2, (2, 1))),
            "ppv": _metric(tp, tp + fp, cl(0, (0, 1))),
            "npv": _metric(tn, tn + fn, cl(2, (2, 3))),
        },
    }


def _groups(kept: list[Mapping], clustered: bool = True) -> list[dict]:
    groups = []
    for h in HISTOLOGIES:
        of_histology = [r for r in kept if r["histology"] == h]
        if not of_histology:
            continue
        for a in ICG_ARMS:
            of_arm = [r for r in of_histology if r["arm"] == a]
            if of_arm:
                groups.append(_group(h, a, of_arm, clustered))
        groups.append(_group(h, ALL, of_histology, clustered))
    groups.append(_group(ALL, ALL, kept, clustered))
    return groups


def build_report(rows: Iterable[Mapping], histology: str | None = None,
                 arm: str | None = None) -> dict:
    """The accuracy groups (protocol "The report") from scored rows.

    Each row needs ``histology``, ``arm``, ``positive`` (the call) and ``margin_positive``
    (the truth); ``patient`` (any hashable) adds the cluster-adjusted interval. Rows whose
    call or truth is missing are left out, and so are control-arm rows (the control arm
    has no imaging). Groups, in a fixed order: per histology with data, one per ICG arm
    with data then one over the ICG arms; finally ``("all", "all")``, always present.
    """
    _check_filter("histology", histology, HISTOLOGIES)
    _check_filter("arm", arm, ARMS)
    kept: list[Mapping] = []
    for row in rows:
        h, a = row["histology"], row["arm"]
        if h not in HISTOLOGIES or a not in ARMS:
            raise InvalidArgument(f"report: a row has histology {h!r}, arm {a!r}; allowed "
                                  f"{', '.join(HISTOLOGIES)} and {', '.join(ARMS)}")
        if (histology is not None and h != histology) or (arm is not None and a != arm):
            continue
        if a not in ICG_ARMS or row["positive"] is None or row["margin_positive"] is None:
            continue
        kept.append(row)
    return {"groups": _groups(kept)}


# --- the v2 report from the records ------------------------------------------------------


def _patient(rec: Mapping) -> tuple[str, str]:
    return (rec["centre_id"], rec["case_id"])


def _latest(entries: Iterable[Mapping]) -> Mapping | None:
    best = None
    for e in entries:
        if best is None or (e["t_ns"], e["uid"]) > (best["t_ns"], best["uid"]):
            best = e
    return best


def _call(capture: Mapping, threshold: float | None) -> bool | None:
    """The capture's call: as made, or re-scored at ``threshold`` with its floors."""
    if capture.get("positive") is None:
        return None
    if threshold is None:
        return bool(capture["positive"])
    return capture.get("sbr") is not None and capture["sbr"] >= threshold and _floors_pass(capture)


def _floors_pass(capture: Mapping) -> bool:
    for value, floor in ((capture.get("intensity"), capture.get("intensity_floor")),
                         (capture.get("cnr"), capture.get("cnr_floor"))):
        if floor is not None and (value is None or value < floor):
            return False
    return True


def _score(capture: Mapping) -> float:
    return float(capture["sbr"]) if capture.get("sbr") is not None and _floors_pass(capture) else 0.0


def _days(start: str, end: str) -> int:
    return (date.fromisoformat(end[:10]) - date.fromisoformat(start[:10])).days


def build_study_report(data: Mapping, *, histology: str | None = None, arm: str | None = None,
                       threshold: float | None = None, options: ReportOptions | None = None,
                       comparative: bool = True) -> dict:
    """The v2 report from the study's records (see the module's text for the methods).

    ``histology``/``arm`` keep only those patients; ``threshold`` re-scores every call at
    that SBR; ``comparative=False`` (observers) leaves out ``margins_by_arm``,
    ``recurrence`` and ``adverse_events``.
    """
    _check_filter("histology", histology, HISTOLOGIES)
    _check_filter("arm", arm, ARMS)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 < threshold <= 1000.0):
        raise InvalidArgument(f"report: threshold = {threshold!r}; allowed a number above 0, at most 1000")
    opts = options or ReportOptions()
    cases = {}
    for c in data.get("cases", []):
        if (histology is None or c["histology"] == histology) and (arm is None or c["arm"] == arm):
            cases[_patient(c)] = c

    def mine(records: Iterable[Mapping]) -> list[Mapping]:
        return [r for r in records if _patient(r) in cases]

    captures = sorted(mine(data.get("captures", [])), key=lambda r: (r["t_ns"], r["uid"]))
    pathology_by_capture: dict[str, list] = {}
    for e in mine(data.get("pathology", [])):
        pathology_by_capture.setdefault(e["capture_uid"], []).append(e)
    margin_status = {}
    for key, entries in _by_patient(mine(data.get("margins", []))).items():
        margin_status[key] = _latest(entries)["status"]

    flow = {"enrolled": {a: sum(1 for c in cases.values() if c["arm"] == a) for a in ARMS},
            "imaged": 0, "captures": len(captures),
            "tumor_bed_captures": 0, "not_evaluable": {"retake": 0, "no_valid_call": 0, "control_arm": 0},
            "without_pathology": 0, "indeterminate": 0, "close": 0,
            "margins": 0, "scored_margins": 0, "retakes": 0,
            "patients_scored": 0, "patients_without_margin_status": 0,
            "window_deviations": 0}
    thresholds_in_force: dict[str, int] = {}
    beds: dict[tuple, list] = {}
    for cap in captures:
        if cap["site"] != "tumor_bed":
            continue
        flow["tumor_bed_captures"] += 1
        if cases[_patient(cap)]["arm"] not in ICG_ARMS:
            flow["not_evaluable"]["control_arm"] += 1
            continue
        beds.setdefault((_patient(cap), cap.get("label") or ""), []).append(cap)
    flow["imaged"] = len({key[0] for key in beds})

    scored: list[dict] = []
    counted_calls: dict[tuple, list[bool]] = {}
    for (patient, _label), caps in beds.items():
        flow["margins"] += 1
        valid = [c for c in caps if c.get("positive") is not None]
        counted = valid[-1] if valid else caps[-1]
        flow["not_evaluable"]["retake"] += len(caps) - 1
        flow["retakes"] += len(caps) - 1
        if not valid:
            flow["not_evaluable"]["no_valid_call"] += 1
            continue
        t = counted.get("threshold")
        tkey = "null" if t is None else f"{t:g}"
        thresholds_in_force[tkey] = thresholds_in_force.get(tkey, 0) + 1
        call = _call(counted, threshold)
        counted_calls.setdefault(patient, []).append(call)
        entry = _latest(e for c in caps for e in pathology_by_capture.get(c["uid"], []))
        if entry is None:
            flow["without_pathology"] += 1
            continue
        status = entry["status"]
        if status in ("close", "indeterminate"):
            flow[status] += 1
        truth = opts.truth(status)
        if truth is None:
            continue
        case = cases[patient]
        flow["scored_margins"] += 1
        scored.append({"histology": case["histology"], "arm": case["arm"], "patient": patient,
                       "positive": call, "margin_positive": truth, "score": _score(counted),
                       "blinded": entry.get("blinded")})

    per_patient_rows = []
    for patient, calls in counted_calls.items():
        truth = opts.truth(margin_status.get(patient))
        if truth is None:
            flow["patients_without_margin_status"] += 1
            continue
        case = cases[patient]
        per_patient_rows.append({"histology": case["histology"], "arm": case["arm"],
                                 "positive": any(calls), "margin_positive": truth})
    flow["patients_scored"] = len(per_patient_rows)

    deviations = []
    for d in mine(data.get("deviations", [])):
        deviations.append({**{k: d.get(k) for k in ("centre_id", "cart_id", "case_id", "capture_id",
                                                    "kind", "message")}, "at": d.get("entered_at")})
        if d.get("kind") == "outside_imaging_window":
            flow["window_deviations"] += 1

    report = {
        "groups": _groups(scored),
        "per_patient": _groups(per_patient_rows, clustered=False),
        "flow": flow,
        "roc": _roc(scored, opts),
        "threshold": threshold,
        "thresholds_in_force": thresholds_in_force,
        "deviations": deviations,
        "sbr_by_pathology": _sbr_by_pathology(scored),
        "methods": dict(METHODS, options=f"close margins: {opts.close_as}; indeterminate: "
                                         f"{opts.indeterminate_as}; bootstrap {opts.bootstrap_resamples} "
                                         f"resamples, seed {opts.bootstrap_seed}"),
    }
    if comparative:
        report["margins_by_arm"] = _margins_by_arm(cases, margin_status, opts)
        report["recurrence"] = _recurrence(cases, mine(data.get("followups", [])))
        report["adverse_events"] = _adverse_events(cases, mine(data.get("adverse_events", [])),
                                                   histology)
    return report


def _by_patient(records: Iterable[Mapping]) -> dict[tuple, list]:
    out: dict[tuple, list] = {}
    for r in records:
        out.setdefault(_patient(r), []).append(r)
    return out


def _roc(scored: list[dict], opts: ReportOptions) -> list[dict]:
    out = []
    for h in HISTOLOGIES + (ALL,):
        for a in ICG_ARMS + (ALL,):
            rows = [r for r in scored if (h == ALL or r["histology"] == h) and (a == ALL or r["arm"] == a)]
            if not rows or (h == ALL and a != ALL):
                continue
            pos = [r["score"] for r in rows if r["margin_positive"]]
            neg = [r["score"] for r in rows if not r["margin_positive"]]
            units = [(r["patient"], r["score"], r["margin_positive"]) for r in rows]
            out.append({"histology": h, "arm": a, "n_positive": len(pos), "n_negative": len(neg),
                        "auc": auc_mann_whitney(pos, neg),
                        "auc_ci": auc_cluster_bootstrap(units, n_resamples=opts.bootstrap_resamples,
                                                        seed=opts.bootstrap_seed),
                        "points": roc_points(pos, neg)})
    return out


def _sbr_by_pathology(scored: list[dict]) -> list[dict]:
    """The SBR of each scored margin by its pathology truth, per histology and ICG arm
    (for the report page's plot)."""
    out = []
    for h in HISTOLOGIES:
        for a in ICG_ARMS:
            rows = [r for r in scored if r["histology"] == h and r["arm"] == a]
            if rows:
                out.append({"histology": h, "arm": a,
                            "positive": sorted(r["score"] for r in rows if r["margin_positive"]),
                            "negative": sorted(r["score"] for r in rows if not r["margin_positive"])})
    return out


def _margins_by_arm(cases: Mapping, margin_status: Mapping, opts: ReportOptions) -> list[dict]:
    out = []
    for h in HISTOLOGIES:
        patients = [k for k, c in cases.items() if c["histology"] == h]
        if not patients:
            continue
        arms = []
        for a in ARMS:
            of_arm = [k for k in patients if cases[k]["arm"] == a]
            if not of_arm:
                continue
            truths = [opts.truth(margin_status.get(k)) for k in of_arm]
            known = [t for t in truths if t is not None]
            arms.append({"arm": a, "positive": sum(known), "n": len(known),
                         "without_status": len(truths) - len(known)})
        table = [[x["positive"], x["n"] - x["positive"]] for x in arms if x["n"] > 0]
        test: dict = {"method": "none (fewer than two arms with a margin status)", "p": None}
        chi = pearson_chi2(table) if len(table) >= 2 else None
        if len(table) == 2:
            test = {"method": "fisher_exact", "p": fisher_exact_2x2(table),
                    "chi2": None if chi is None else chi["statistic"],
                    "chi2_p": None if chi is None else chi["p"]}
        elif len(table) > 2:
            test = {"method": "pearson_chi2", "p": None if chi is None else chi["p"],
                    "chi2": None if chi is None else chi["statistic"],
                    "df": None if chi is None else chi["df"]}
        out.append({"histology": h, "arms": arms, "test": test})
    return out


def _recurrence(cases: Mapping, followups: list[Mapping]) -> list[dict]:
    # One visit per (patient, visit date): a later entry for the same visit corrects it.
    visits: dict[tuple, dict] = {}
    for key, entries in _by_patient(followups).items():
        per_date: dict[str, list] = {}
        for e in entries:
            per_date.setdefault(e["visit_date"], []).append(e)
        visits[key] = {d: _latest(es)["local_recurrence"] for d, es in per_date.items()}
    out = []
    for h in HISTOLOGIES:
        patients = [k for k, c in cases.items() if c["histology"] == h]
        if not patients:
            continue
        arms, all_t, all_e, all_g = [], [], [], []
        for a in ARMS:
            of_arm = [k for k in patients if cases[k]["arm"] == a]
            if not of_arm:
                continue
            times, events = [], []
            for k in of_arm:
                v = visits.get(k)
                start = cases[k].get("surgery_date")
                if not v or not start:  # no follow-up (or no time zero): counted, not estimated
                    continue
                ordered = sorted(v.items())
                first_event = next((d for d, rec in ordered if rec), None)
                if first_event is not None:
                    times.append(_days(start, first_event))
                    events.append(True)
                else:
                    times.append(_days(start, ordered[-1][0]))
                    events.append(False)
            km, ci = kaplan_meier_incidence(times, events, HORIZON_DAYS)
            arms.append({"arm": a, "n": len(of_arm), "with_followup": len(times),
                         "without_followup": len(of_arm) - len(times), "events": sum(events),
                         "km_24m": km, "km_24m_ci": ci})
            all_t += times
            all_e += events
            all_g += [a] * len(times)
        test = logrank(all_t, all_e, all_g)
        out.append({"histology": h, "arms": arms, "logrank_p": None if test is None else test["p"]})
    return out


def _adverse_events(cases: Mapping, entries: list[Mapping], histology: str | None) -> list[dict]:
    worst: dict[tuple, int] = {}
    for e in entries:
        k = _patient(e)
        worst[k] = max(worst.get(k, 0), int(e["grade"]))
    out = []
    for a in ARMS:
        of_arm = [k for k, c in cases.items() if c["arm"] == a]
        if not of_arm:
            continue
        by_grade = {str(g): sum(1 for k in of_arm if worst.get(k) == g) for g in GRADES}
        out.append({"arm": a, "histology": histology or ALL, "n": len(of_arm),
                    "patients_with_ae": sum(1 for k in of_arm if k in worst), "by_grade": by_grade})
    return out
