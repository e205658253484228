"""Pool several carts' exports into one analysis (PRODUCT.md section 10, several centres).

Each export is the long CSV of :mod:`nirf.services.study.records`. Pooling:

1. Records are identified by their globally unique ``uid``: the same record in two exports
   (a cart exported twice) is kept once; the same uid with different content is a conflict.
2. A patient is ``(centre_id, case_id)``. When two exports hold a case record for the same
   patient (two carts saw the same patient), the patient is merged when the records agree
   on the patient's fields (:data:`PATIENT_FIELDS`) and on the final margin status each cart
   holds; their captures and entries are then analysed together. When they differ, the
   patient is **not** merged: it is reported as a conflict, with the differing values, and
   left out of the pooled analysis until the sites resolve it.
3. Records of a patient that no export has a case record for are reported (``no_case``) and
   left out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from nirf.hal.errors import InvalidArgument
from nirf.services.study import records

# The fields that describe the patient; two carts' case records must agree on these.
PATIENT_FIELDS = ("histology", "arm", "weight_kg", "dose_mg", "injection_time", "surgery_date",
                  "exclusions_confirmed")


def read_exports(paths: Iterable[str | os.PathLike]) -> list[tuple[str, dict]]:
    """Read export files: ``[(name, records map), ...]``."""
    out = []
    for p in paths:
        path = Path(p)
        try:
            with path.open(newline="", encoding="utf-8") as f:
                out.append((path.name, records.read_csv(f, name=str(path.name))))
        except OSError as err:
            raise InvalidArgument(f"export {path}: cannot read it ({err.strerror or err})") from err
    return out


def _patient(rec: Mapping) -> tuple[str, str]:
    return (rec["centre_id"], rec["case_id"])


def _latest_status(entries: list[Mapping]) -> str | None:
    if not entries:
        return None
    return max(entries, key=lambda e: (e["t_ns"], e["uid"]))["status"]


def pool(sources: list[tuple[str, Mapping]]) -> tuple[dict, dict]:
    """Pool records maps ``[(source name, map), ...]``; returns ``(pooled map, summary)``
    with ``summary = {"sources", "patients", "merged", "conflicts"}``: ``merged`` lists
    the patients seen in more than one source and merged, ``conflicts`` every conflict
    (``kind`` ``patient``, ``uid`` or ``no_case``) with what differs."""
    conflicts: list[dict] = []
    by_uid: dict[str, tuple[str, str, Mapping]] = {}  # uid -> (list name, source, record)
    bad_uids: set[str] = set()
    for name, data in sources:
        for list_name in records.KINDS.values():
            for rec in data.get(list_name, []):
                uid = rec.get("uid")
                if not uid:
                    raise InvalidArgument(f"{name}: a {list_name} record has no record_uid")
                seen = by_uid.get(uid)
                if seen is None:
                    by_uid[uid] = (list_name, name, rec)
                elif dict(seen[2]) != dict(rec) or seen[0] != list_name:
                    if uid not in bad_uids:
                        diff = sorted(k for k in set(seen[2]) | set(rec) if seen[2].get(k) != rec.get(k))
                        conflicts.append({"kind": "uid", "uid": uid, "sources": [seen[1], name],
                                          "centre_id": rec.get("centre_id"), "case_id": rec.get("case_id"),
                                          "fields": {k: [seen[2].get(k), rec.get(k)] for k in diff}})
                    bad_uids.add(uid)
    unique = {uid: v for uid, v in by_uid.items() if uid not in bad_uids}

    # Case records per patient, and each source's margin entries per patient.
    cases: dict[tuple, list[tuple[str, Mapping]]] = {}
    margins: dict[tuple, dict[str, list]] = {}
    for list_name, source, rec in unique.values():
        if list_name == "cases":
            cases.setdefault(_patient(rec), []).append((source, rec))
        elif list_name == "margins":
            margins.setdefault(_patient(rec), {}).setdefault(rec["cart_id"], []).append(rec)

    excluded: set[tuple] = set()
    merged = []
    for key, held in sorted(cases.items()):
        if len(held) > 1:
            diff = {f: [rec.get(f) for _, rec in held] for f in PATIENT_FIELDS
                    if len({repr(rec.get(f)) for _, rec in held}) > 1}
            statuses = {cart: _latest_status(es) for cart, es in margins.get(key, {}).items()}
            if len(set(statuses.values())) > 1:
                diff["margin_status"] = [statuses[c] for c in sorted(statuses)]
            if diff:
                conflicts.append({"kind": "patient", "centre_id": key[0], "case_id": key[1],
                                  "sources": [s for s, _ in held],
                                  "carts": [rec.get("cart_id") for _, rec in held], "fields": diff})
                excluded.add(key)
                continue
            merged.append({"centre_id": key[0], "case_id": key[1], "sources": [s for s, _ in held],
                           "carts": [rec.get("cart_id") for _, rec in held]})

    pooled: dict = {list_name: [] for list_name in records.KINDS.values()}
    orphans: dict[tuple, int] = {}
    kept_case: set[tuple] = set()
    for list_name, _source, rec in unique.values():  # in the order the exports list them
        key = _patient(rec)
        if key in excluded:
            continue
        if key not in cases:
            orphans[key] = orphans.get(key, 0) + 1
            continue
        if list_name == "cases":
            if key in kept_case:  # a merged patient: one case record is enough
                continue
            kept_case.add(key)
        pooled[list_name].append(rec)
    for key, n in sorted(orphans.items()):
        conflicts.append({"kind": "no_case", "centre_id": key[0], "case_id": key[1], "records": n})
    summary = {"sources": [name for name, _ in sources], "patients": len(cases) - len(excluded),
               "merged": merged, "conflicts": conflicts}
    return records.fill(pooled), summary
