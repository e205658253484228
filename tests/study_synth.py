"""A synthetic study written into a case store: both histologies, the three arms (the control
arm included), 1-5 tumor-bed captures per ICG patient with retakes and invalid captures,
every pathology status, corrections, margin status per patient, follow-up with events and
censoring, adverse events, an imaging-window deviation. Seeded."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np

ARMS = ("control", "icg_0.25mg_per_kg", "icg_25mg")
HIST = ("DFSP", "sSCC")
STATUSES = ("positive", "close", "negative", "indeterminate")


def today(clock) -> datetime:
    return datetime.fromtimestamp(clock.time_ns() / 1e9, tz=timezone.utc)


def make_study(store, clock, *, seed: int = 7, per_cell: int = 6, first_number: int = 1,
               prefix: dict | None = None) -> list[str]:
    """Write the study; returns the case ids. ``prefix`` maps histology to the id's letters."""
    rng = np.random.default_rng(seed)
    prefix = prefix or {"DFSP": "DFSP", "sSCC": "SSCC"}
    ids = []
    number = first_number
    recur_p = {"control": 0.45, "icg_0.25mg_per_kg": 0.3, "icg_25mg": 0.15}
    for h in HIST:
        for arm in ARMS:
            for _ in range(per_cell):
                case_id = f"{prefix[h]}-{number:03d}"
                number += 1
                ids.append(case_id)
                now = today(clock)
                surgery = (now.date() - timedelta(days=int(rng.integers(760, 1300)))).isoformat()
                kwargs = {"surgery_date": surgery, "exclusions_confirmed": True, "by": "alice"}
                if arm == "icg_0.25mg_per_kg":
                    kwargs["weight_kg"] = float(rng.integers(45, 120))
                if arm != "control":
                    kwargs["injection_time"] = (now - timedelta(hours=float(rng.uniform(19, 26)))).isoformat()
                store.open_case(case_id, h, arm, **kwargs)
                _captures(store, clock, rng, case_id, arm)
                store.close_case()
                if arm == "icg_0.25mg_per_kg" and rng.random() < 0.3:
                    store.correct_case(case_id, "weight_kg", kwargs["weight_kg"] + 5.0,
                                       reason="weighed again before surgery", by="alice")
                _margin(store, rng, case_id, arm)
                _followup(store, clock, rng, case_id, surgery, recur_p[arm])
                for _ in range(int(rng.integers(0, 3))):
                    store.add_adverse_event(case_id, str(rng.choice(["nausea", "rash", "hypotension"])),
                                            int(rng.integers(1, 6)),
                                            str(rng.choice(["not", "unlikely", "possible", "probable", "definite"])),
                                            surgery, by="bob")
                clock.advance(600)
    return ids


def _captures(store, clock, rng, case_id, arm):
    store.add_capture("gross_tumor", "lesion", sbr=4.0, intensity=900.0, cnr=8.0, positive=True, threshold=2.0)
    n_labels = int(rng.integers(1, 5)) if arm != "control" else int(rng.integers(0, 2))
    for j in range(n_labels):
        label = ("12 o'clock", "3 o'clock", "6 o'clock", "9 o'clock")[j]
        truth = rng.random() < 0.35
        caps = []
        for attempt in range(int(rng.integers(1, 3)) if rng.random() < 0.4 else 1):
            clock.advance(int(rng.integers(30, 120)))
            if rng.random() < 0.12:  # no valid call (e.g. background not positive)
                c = store.add_capture("tumor_bed", label, sbr=None, intensity=None, cnr=None, positive=None,
                                      threshold=2.0)
            else:
                sbr = round(float((2.6 if truth else 1.5) + rng.normal(0, 0.7)), 1)
                sbr = max(sbr, 0.6)
                intensity = float(rng.uniform(20, 600))
                floor = 150.0 if rng.random() < 0.4 else None
                cnr = float(rng.uniform(1, 10))
                positive = sbr >= 2.0 and (floor is None or intensity >= floor)
                c = store.add_capture("tumor_bed", label, sbr=sbr, intensity=intensity, cnr=cnr,
                                      positive=positive, threshold=2.0 if j % 3 else 2.2,
                                      intensity_floor=floor, cnr_floor=2.0 if rng.random() < 0.2 else None)
            caps.append(c)
        u = rng.random()
        if u < 0.08:
            continue  # no pathology
        status = ("positive" if truth else "negative") if u < 0.8 else str(rng.choice(["close", "indeterminate"]))
        target = caps[0] if (len(caps) > 1 and rng.random() < 0.3) else caps[-1]
        store.set_pathology(target["capture_id"], status, blinded=bool(rng.random() < 0.8), by="carol")
        if rng.random() < 0.15:  # a correction, with its reason
            new = "negative" if status != "negative" else "positive"
            store.set_pathology(target["capture_id"], new, blinded=bool(rng.random() < 0.8),
                                reason="re-read of the slide", by="dave")
    if arm != "control" and rng.random() < 0.2:
        clock.advance(12 * 3600)  # past the imaging window
        store.add_capture("specimen_cross_section", "late slice", sbr=3.0, intensity=500.0, cnr=4.0,
                          positive=True, threshold=2.0)


def _margin(store, rng, case_id, arm):
    u = rng.random()
    if u < 0.08:
        return
    status = "positive" if u < 0.4 else ("negative" if u < 0.85 else str(rng.choice(["close", "indeterminate"])))
    store.set_margin(case_id, status, by="carol")
    if rng.random() < 0.1:
        store.set_margin(case_id, "negative" if status != "negative" else "positive",
                         reason="final report amended", by="dave")


def _followup(store, clock, rng, case_id, surgery, p_recur):
    if rng.random() < 0.1:
        return  # no follow-up yet: counted, not estimated
    start = datetime.fromisoformat(surgery).date()
    horizon = (today(clock).date() - start).days
    last = int(rng.integers(100, horizon + 1))
    recur_day = int(rng.integers(60, 1100)) if rng.random() < p_recur else None
    for day in (90, 180, 365, 545, 730, 912, 1095):
        if day > last:
            day = last
        found = recur_day is not None and day >= recur_day
        store.add_followup(case_id, (start + timedelta(days=day)).isoformat(), bool(found), by="erin")
        if found or day == last:
            break
    if rng.random() < 0.1:
        # a visit corrected afterwards
        d = (start + timedelta(days=90)).isoformat()
        store.add_followup(case_id, d, True, reason="histology of a biopsy came back positive", by="erin")
