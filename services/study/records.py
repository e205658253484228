"""The study's records in long format: one CSV row per record, and the REDCap data
dictionary that describes every column.

Record types (column ``record_type``): ``case``, ``capture``, ``pathology``, ``margin``,
``followup``, ``adverse_event``, ``deviation``, ``case_correction``. Every row has ``record_uid`` (globally
unique: a random 128-bit hex id made where the record was made), ``centre_id``,
``cart_id`` and ``case_id``; the other columns are empty where they do not apply to the
record type. Cells hold plain values, never JSON: true/false as REDCap's ``yesno`` codes
1/0, dates as ``YYYY-MM-DD``, wall times as ISO 8601 text (with their time zone).

:func:`write_csv` and :func:`read_csv` turn the records map (the one
:func:`nirf.services.study.report.build_study_report` reads) into rows and back, so a pooled analysis
of exports (:mod:`nirf.services.study.pool`) sees exactly what the carts held.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, TextIO

from nirf.hal.errors import InvalidArgument

FORM = "study_record"
# The data dictionary's columns, in the order and spelling REDCap's dictionary upload expects.
DICTIONARY_COLUMNS = (
    "Variable / Field Name", "Form Name", "Section Header", "Field Type", "Field Label",
    "Choices, Calculations, OR Slider Labels", "Field Note",
    "Text Validation Type OR Show Slider Number", "Text Validation Min", "Text Validation Max",
    "Identifier?", "Branching Logic (Show field only if...)", "Required Field?",
    "Custom Alignment", "Question Number (surveys only)", "Matrix Group Name",
    "Matrix Ranking?", "Field Annotation",
)

# record_type -> the list name in the records map
KINDS = {"case": "cases", "capture": "captures", "pathology": "pathology", "margin": "margins",
         "followup": "followups", "adverse_event": "adverse_events", "deviation": "deviations",
         "case_correction": "case_corrections"}


@dataclass(frozen=True)
class Field:
    """One column: its REDCap type (``text``, ``notes``, ``dropdown``, ``yesno``), text
    validation (``number``, ``integer``, ``date_ymd`` or none), choices and label; ``key``
    is the record's key it holds (default: the same name)."""

    name: str
    kind: str
    label: str
    validation: str = ""
    choices: tuple = ()
    key: str = ""

    @property
    def record_key(self) -> str:
        return self.key or self.name


def _t(name, label, key=""):
    return Field(name, "text", label, key=key)


def _num(name, label):
    return Field(name, "text", label, "number")


def _int(name, label):
    return Field(name, "text", label, "integer")


def _date(name, label):
    return Field(name, "text", label, "date_ymd")


def _yn(name, label):
    return Field(name, "yesno", label)


def _dd(name, label, choices):
    return Field(name, "dropdown", label, choices=tuple(choices))


FIELDS: tuple[Field, ...] = (
    _t("record_uid", "Globally unique record id", key="uid"),
    _dd("record_type", "Record type", KINDS),
    _t("centre_id", "Centre"),
    _t("cart_id", "Cart"),
    _t("case_id", "Pseudonymous case id (with the centre: the patient)"),
    # case
    _dd("histology", "Histology", ("DFSP", "sSCC")),
    _t("arm", "Arm: control, icg_0.25mg_per_kg or icg_25mg"),
    _num("weight_kg", "Weight (kg)"),
    _num("dose_mg", "ICG dose (mg)"),
    _t("injection_time", "ICG injection time (ISO 8601)"),
    _date("surgery_date", "Surgery date"),
    _yn("exclusions_confirmed", "Exclusion criteria confirmed"),
    _t("opened_at", "Case opened at (ISO 8601)"),
    _t("closed_at", "Case closed at (ISO 8601)"),
    _yn("clock_synchronised", "Wall clock synchronised"),
    _t("clock_override_reason", "Why it went ahead with the clock not synchronised"),
    # capture
    _t("capture_uid", "Capture's record id (for pathology entries)"),
    _t("capture_id", "Capture id on its cart"),
    _dd("site", "Site", ("gross_tumor", "tumor_bed", "specimen_cross_section")),
    _t("label", "Margin label (e.g. 12 o'clock)"),
    _t("captured_at", "Captured at (ISO 8601)"),
    _int("t_ns", "Wall time of the record (ns since 1970)"),
    _num("hours_since_injection", "Hours since injection"),
    _int("pairs", "Frame pairs averaged"),
    _num("sbr", "Signal-to-background ratio"),
    _num("intensity", "Intensity (counts/s/mW)"),
    _num("cnr", "Contrast-to-noise ratio"),
    _yn("positive", "Fluorescence call positive"),
    _num("threshold", "SBR threshold in force at capture"),
    _num("intensity_floor", "Intensity floor in force at capture"),
    _num("cnr_floor", "CNR floor in force at capture"),
    _int("frames_lost", "Frames lost from the recording"),
    _int("n_files", "Frame files recorded"),
    _t("calibration_id", "Calibration in use"),
    _t("software_version", "Software version"),
    _t("config_hash", "Configuration SHA-256"),
    _int("exposure_us", "Exposure (us)"),
    _num("gain", "Analogue gain"),
    _num("laser_mw", "Laser power (mW)"),
    # pathology, margin, followup, adverse event
    _dd("status", "Pathology status", ("positive", "close", "negative", "indeterminate")),
    _yn("blinded", "Pathologist blinded to the fluorescence call"),
    Field("reason", "notes", "Reason for the change"),
    _t("entered_by", "Entered by (key name)"),
    _t("entered_at", "Entered at (ISO 8601)"),
    _date("visit_date", "Follow-up visit date"),
    _yn("local_recurrence", "Local recurrence at the visit"),
    _t("term", "Adverse event term"),
    _dd("grade", "Adverse event grade (CTCAE)", ("1", "2", "3", "4", "5")),
    _dd("related", "Relation to ICG", ("not", "unlikely", "possible", "probable", "definite")),
    _date("onset", "Adverse event onset"),
    # deviation
    _t("kind", "Deviation kind"),
    Field("message", "notes", "Deviation"),
    # case correction
    _t("field", "Case field corrected"),
    _t("old_value", "Value before the correction"),
    _t("new_value", "Value after the correction"),
)
COLUMNS = tuple(f.name for f in FIELDS)
_BY_NAME = {f.name: f for f in FIELDS}
_KEYS = tuple(f.record_key for f in FIELDS if f.name != "record_type")
_FORMULA_START = ("=", "+", "-", "@")
# The arms' codes hold a dot, which REDCap's choice codes do not allow: a text field, checked here.
_ARMS = ("control", "icg_0.25mg_per_kg", "icg_25mg")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


def dictionary_rows() -> list[list[str]]:
    """The REDCap data dictionary: one row per field, :data:`DICTIONARY_COLUMNS` wide."""
    rows = []
    for f in FIELDS:
        choices = " | ".join(f"{c}, {c}" for c in f.choices)
        row = {"Variable / Field Name": f.name, "Form Name": FORM, "Field Type": f.kind,
               "Field Label": f.label, "Choices, Calculations, OR Slider Labels": choices,
               "Text Validation Type OR Show Slider Number": f.validation,
               "Required Field?": "y" if f.name in ("record_uid", "record_type") else ""}
        rows.append([row.get(c, "") for c in DICTIONARY_COLUMNS])
    return rows


def write_dictionary(out: TextIO) -> None:
    """Write the data dictionary as CSV."""
    w = csv.writer(out)
    w.writerow(DICTIONARY_COLUMNS)
    w.writerows(dictionary_rows())


def _cell(f: Field, value) -> str:
    if value is None:
        return ""
    if f.kind == "yesno":
        return "1" if value else "0"
    if f.validation == "number":
        return repr(float(value))
    if f.validation == "integer" or f.name == "grade":
        return str(int(value))
    text = str(value)
    # A spreadsheet runs a cell starting with these as a formula; a leading quote stops it
    # (and is taken off again when the file is read back).
    return "'" + text if text[:1] in _FORMULA_START and f.kind in ("text", "notes") and not f.validation \
        and f.name not in ("injection_time", "opened_at", "closed_at", "captured_at", "entered_at") else text


def _value(f: Field, cell: str):
    if cell == "":
        return None
    try:
        if f.kind == "yesno":
            if cell not in ("0", "1"):
                raise ValueError(cell)
            return cell == "1"
        if f.validation == "number":
            return float(cell)
        if f.validation == "integer" or f.name == "grade":
            return int(cell)
    except ValueError:
        raise InvalidArgument(f"column {f.name} = {cell!r}: not a valid {f.kind} {f.validation}".rstrip()) from None
    if f.validation == "date_ymd" and not _DATE_RE.fullmatch(cell):
        raise InvalidArgument(f"column {f.name} = {cell!r}: expected a date YYYY-MM-DD")
    if f.name == "arm" and cell not in _ARMS:
        raise InvalidArgument(f"column arm = {cell!r}: allowed {', '.join(_ARMS)}")
    if f.choices and cell not in f.choices:
        raise InvalidArgument(f"column {f.name} = {cell!r}: allowed {', '.join(f.choices)}")
    if cell[:2] in tuple("'" + c for c in _FORMULA_START):
        return cell[1:]
    return cell


def rows(data: Mapping) -> list[list[str]]:
    """The records map as CSV rows (without the header), in record-type order."""
    out = []
    for kind, list_name in KINDS.items():
        for rec in data.get(list_name, []):
            out.append([kind if f.name == "record_type" else _cell(f, rec.get(f.record_key))
                        for f in FIELDS])
    return out


def write_csv(data: Mapping, out: TextIO) -> int:
    """Write the records map as the long CSV; returns the number of rows."""
    body = rows(data)
    w = csv.writer(out)
    w.writerow(COLUMNS)
    w.writerows(body)
    return len(body)


def csv_text(data: Mapping) -> str:
    """The long CSV as text."""
    buf = io.StringIO(newline="")
    write_csv(data, buf)
    return buf.getvalue()


def read_csv(source: TextIO | Iterable[str], name: str = "export") -> dict:
    """Read a long CSV back into a records map. An unknown column or a bad cell raises
    :class:`~hal.errors.InvalidArgument` naming the file, line, column and value."""
    reader = csv.reader(source)
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidArgument(f"{name}: empty file; expected the study export's header") from None
    unknown = [c for c in header if c not in _BY_NAME]
    if unknown:
        raise InvalidArgument(f"{name}: column {unknown[0]!r} is not in the study's data dictionary")
    for required in ("record_uid", "record_type", "centre_id", "cart_id", "case_id"):
        if required not in header:
            raise InvalidArgument(f"{name}: column {required!r} missing")
    data: dict = {list_name: [] for list_name in KINDS.values()}
    for line_no, cells in enumerate(reader, start=2):
        if not cells:
            continue
        if len(cells) != len(header):
            raise InvalidArgument(f"{name} line {line_no}: {len(cells)} cells, the header has {len(header)}")
        kind = cells[header.index("record_type")]
        if kind not in KINDS:
            raise InvalidArgument(f"{name} line {line_no}: record_type = {kind!r}; allowed {', '.join(KINDS)}")
        rec = {}
        for col, cell in zip(header, cells):
            if col == "record_type":
                continue
            f = _BY_NAME[col]
            try:
                value = _value(f, cell)
            except InvalidArgument as err:
                raise InvalidArgument(f"{name} line {line_no}: {err}") from None
            if value is not None:
                rec[f.record_key] = value
        data[KINDS[kind]].append(rec)
    return fill(data)


def fill(data: Mapping) -> dict:
    """A records map with every field of its record types present (``None`` where empty),
    so maps read from CSV compare equal to maps read from a case store."""
    out = {}
    for list_name in KINDS.values():
        # An empty text is an empty cell: None on both sides.
        out[list_name] = [{k: (None if v == "" else v) for k, v in ((k, rec.get(k)) for k in _KEYS)}
                          for rec in data.get(list_name, [])]
    return out
