"""A capture as DICOM, for the study's research PACS (PRODUCT.md section 9).

Each capture becomes two instances in one series of the case's study:

- the frames as a Multi-frame Grayscale Word Secondary Capture image (SOP class
  1.2.840.10008.5.1.4.1.1.7.3): every recorded pair, laser-on frame then laser-off frame,
  16 bits, with a frame time vector and a label per frame;
- the measurements as a Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33) following TID 1500
  "Measurement Report": an image library naming the frames, and a planar ROI measurement
  group (TID 1410) per region: the signal region carries SBR, intensity and CNR, the
  background region its outline.

PatientID and PatientName are the pseudonymous case id: the cart never knows the patient.
Every UID lies under the cart's configured root and is derived from the case, the capture
and its first frame's time, so writing the same capture again gives the same UIDs (a PACS
then keeps one copy: a resend after a crash is harmless).

SBR, intensity and CNR have no standard codes; they are coded in the cart's private coding
scheme ``99NIRF`` (private schemes start with "99", PS3.16 8.2), declared in the SR's
Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from nirf.hal.errors import InvalidArgument

SC_WORD_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.7.3"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
PRIVATE_SCHEME = "99NIRF"
MANUFACTURER = "nirf-cart"
MODEL = "NIRF imaging cart"
MAX_UID_CHARS = 64


@dataclass(frozen=True)
class DicomSettings:
    """What the files need from the configuration's ``[dicom]`` section."""

    uid_root: str
    institution: str = ""
    software_version: str = ""
    station_name: str = ""

    @classmethod
    def from_config(cls, cfg, software_version: str = "") -> "DicomSettings":
        d = cfg.dicom
        return cls(uid_root=d.uid_root, institution=d.institution, software_version=software_version,
                   station_name=d.ae_title)


def make_uid(root: str, kind: int, *parts: Any) -> str:
    """A UID under ``root``: ``<root>.<kind>.<number from a hash of parts>``; the same
    parts always give the same UID."""
    if not root or not all(p.isdigit() for p in root.split(".")):
        raise InvalidArgument(f"DICOM uid_root = {root!r}: dot-separated numbers required")
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    room = MAX_UID_CHARS - len(root) - len(str(kind)) - 2
    if room < 8:
        raise InvalidArgument(f"DICOM uid_root = {root!r}: too long ({len(root)} characters) to leave room "
                              f"for the cart's own numbers")
    number = str(int.from_bytes(digest, "big"))[:min(room, 38)].lstrip("0") or "0"
    return f"{root}.{kind}.{number}"


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.CodeValue, ds.CodingSchemeDesignator, ds.CodeMeaning = value, scheme, meaning
    return ds


def _da_tm(t_ns: int) -> tuple[str, str]:
    when = dt.datetime.fromtimestamp(t_ns / 1e9, tz=dt.timezone.utc)
    return when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")


def _common(ds, *, case_id: str, study_uid: str, series_uid: str, sop_class: str, sop_uid: str,
            t_ns: int, settings: DicomSettings, modality: str, series_number: int, study_id: str) -> None:
    """Patient, study, series, equipment and SOP common attributes shared by both objects."""
    date, time = _da_tm(t_ns)
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: labels may hold any letter
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.StudyDate, ds.StudyTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.PatientName = case_id
    ds.PatientID = case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"  # the case id is a pseudonym
    ds.DeidentificationMethod = "study pseudonym; cart records no identity"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyID = study_id[:16]
    ds.StudyDescription = "NIRF margin imaging"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL
    if settings.software_version:
        ds.SoftwareVersions = settings.software_version[:64]
    if settings.station_name:
        ds.StationName = settings.station_name[:16]
    if settings.institution:
        ds.InstitutionName = settings.institution[:64]


def _save(ds) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "NIRF_CART"
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, little_endian=True, implicit_vr=False)
    return buf.getvalue()


def capture_uids(root: str, case_id: str, capture_id: str, t_ns: int) -> dict[str, str]:
    """The study, series and instance UIDs of a capture (deterministic)."""
    return {"study": make_uid(root, 1, "study", case_id),
            "series": make_uid(root, 2, "series", case_id, capture_id, t_ns),
            "frames": make_uid(root, 3, "frames", case_id, capture_id, t_ns),
            "sr": make_uid(root, 4, "sr", case_id, capture_id, t_ns),
            "tracking_signal": make_uid(root, 5, "signal", case_id, capture_id, t_ns),
            "tracking_background": make_uid(root, 5, "background", case_id, capture_id, t_ns),
            "frame_of_reference": make_uid(root, 6, "for", case_id, capture_id, t_ns)}


def frames_dataset(frames: Sequence[np.ndarray], frame_meta: Sequence[Mapping[str, Any]], *,
                   case_id: str, capture_id: str, site: str, settings: DicomSettings,
                   series_number: int = 1):
    """The Multi-frame Grayscale Word SC image of a capture's frames (on, off, on, off ...)."""
    from pydicom.dataset import Dataset

    if not frames or len(frames) != len(frame_meta):
        raise InvalidArgument(f"{len(frames)} frame(s) and {len(frame_meta)} metadata map(s): one each needed")
    shape = frames[0].shape
    for f in frames:
        if not isinstance(f, np.ndarray) or f.dtype != np.uint16 or f.shape != shape or f.ndim != 2:
            raise InvalidArgument(f"frames must be 2-D uint16 arrays of one size {shape}")
    t_ns = _first_time(frame_meta)
    uids = capture_uids(settings.uid_root, case_id, capture_id, t_ns)
    ds = Dataset()
    _common(ds, case_id=case_id, study_uid=uids["study"], series_uid=uids["series"],
            sop_class=SC_WORD_MULTIFRAME, sop_uid=uids["frames"], t_ns=t_ns, settings=settings,
            modality="OT", series_number=series_number, study_id=case_id)
    ds.SeriesDescription = f"{capture_id} {site}".strip()[:64]
    ds.Laterality = ""  # type 2C; the cart does not know the side
    ds.PatientOrientation = ""  # type 2C; a free-hand field of view has none
    ds.ConversionType = "DI"  # digital interface: frames straight from the camera
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.AcquisitionDateTime = _da_tm(t_ns)[0] + _da_tm(t_ns)[1]
    ds.ImageComments = (f"capture {capture_id}, site {site}: frames in pairs, laser-on then laser-off: "
                        + " ".join("on" if m.get("lit", i % 2 == 0) else "off" for i, m in enumerate(frame_meta)))[:10240]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    stack = np.stack(frames)
    bits = _bits_stored(stack, frame_meta)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PresentationLUTShape = "IDENTITY"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.NumberOfFrames = len(frames)
    ds.FrameIncrementPointer = 0x00181065  # Frame Time Vector
    times = [_frame_time_ns(m) for m in frame_meta]
    ds.FrameTimeVector = ["0"] + [_ds((b - a) / 1e6) if a is not None and b is not None else "0"
                                  for a, b in zip(times, times[1:])]
    ds.PixelData = np.ascontiguousarray(stack, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def measurement_dataset(frames_ds, measurements: Mapping[str, Any], *, case_id: str, capture_id: str,
                        settings: DicomSettings, series_number: int = 1):
    """The TID 1500 Comprehensive SR of a capture's measurements, referencing ``frames_ds``."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    t_ns = int(measurements.get("t_ns") or _ns_from_dataset(frames_ds))
    first = int(measurements.get("first_frame_t_ns") or t_ns)
    uids = capture_uids(settings.uid_root, case_id, capture_id, first)
    ds = Dataset()
    _common(ds, case_id=case_id, study_uid=frames_ds.StudyInstanceUID, series_uid=frames_ds.SeriesInstanceUID,
            sop_class=COMPREHENSIVE_SR, sop_uid=uids["sr"], t_ns=t_ns, settings=settings,
            modality="SR", series_number=series_number, study_id=case_id)
    ds.InstanceNumber = 2
    ds.SeriesDescription = frames_ds.SeriesDescription
    ds.ReferencedPerformedProcedureStepSequence = Seq([])
    ds.PerformedProcedureCodeSequence = Seq([])
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = frames_ds.SeriesInstanceUID
    ref_sop = Dataset()
    ref_sop.ReferencedSOPClassUID, ref_sop.ReferencedSOPInstanceUID = frames_ds.SOPClassUID, frames_ds.SOPInstanceUID
    ref_series.ReferencedSOPSequence = Seq([ref_sop])
    evidence = Dataset()
    evidence.StudyInstanceUID = frames_ds.StudyInstanceUID
    evidence.ReferencedSeriesSequence = Seq([ref_series])
    ds.PertinentOtherEvidenceSequence = Seq([evidence])
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "NIRF cart measurements"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    ds.CodingSchemeIdentificationSequence = Seq([scheme])

    # Root: TID 1500 Imaging Measurement Report
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Seq([_code("126000", "DCM", "Imaging Measurement Report")])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "1500"
    ds.ContentTemplateSequence = Seq([template])

    site = str(measurements.get("site") or "")
    items = [
        _item("HAS CONCEPT MOD", "CODE", ("121049", "DCM", "Language of Content Item and Descendants"),
              code=("eng", "RFC5646", "English")),
        _item("HAS OBS CONTEXT", "CODE", ("121005", "DCM", "Observer Type"), code=("121007", "DCM", "Device")),
        _item("HAS OBS CONTEXT", "UIDREF", ("121012", "DCM", "Device Observer UID"),
              uid=make_uid(settings.uid_root, 7, "device", settings.station_name or MANUFACTURER)),
        _item("HAS OBS CONTEXT", "TEXT", ("121013", "DCM", "Device Observer Name"),
              text=settings.station_name or MANUFACTURER),
        _item("HAS OBS CONTEXT", "TEXT", ("121015", "DCM", "Device Observer Model Name"), text=MODEL),
        _item("HAS CONCEPT MOD", "CODE", ("121058", "DCM", "Procedure reported"),
              code=("NIRF-ICG", PRIVATE_SCHEME, "Near-infrared fluorescence imaging with ICG")),
    ]
    image_item = _image_ref(frames_ds, "CONTAINS")
    library = _item("CONTAINS", "CONTAINER", ("111028", "DCM", "Image Library"), children=[
        _item("CONTAINS", "CONTAINER", ("126200", "DCM", "Image Library Group"), children=[image_item])])
    items.append(library)

    rois = measurements.get("rois") or {}
    groups = []
    for region, tracking in (("signal", uids["tracking_signal"]), ("background", uids["tracking_background"])):
        roi = rois.get(region) if isinstance(rois, Mapping) else None
        children = [
            _item("HAS OBS CONTEXT", "TEXT", ("112039", "DCM", "Tracking Identifier"),
                  text=" ".join(p for p in (capture_id, site, region, "region") if p)),
            _item("HAS OBS CONTEXT", "UIDREF", ("112040", "DCM", "Tracking Unique Identifier"), uid=tracking),
            _item("CONTAINS", "CODE", ("121071", "DCM", "Finding"),
                  code=(region.upper(), PRIVATE_SCHEME,
                        "Fluorescence signal region" if region == "signal" else "Background region")),
        ]
        if _is_rect(roi):
            x, y, w, h = (float(v) for v in roi)
            # SCOORD column/row pixel coordinates; a closed polyline traces the rectangle.
            outline = [x, y, x + w, y, x + w, y + h, x, y + h, x, y]
            scoord = _item("CONTAINS", "SCOORD", ("111030", "DCM", "Image Region"), graphic=outline,
                           children=[_image_ref(frames_ds, "SELECTED FROM")])
            children.append(scoord)
        if region == "signal":
            for key, code, unit in (("sbr", ("SBR", "Signal-to-background ratio"), ("1", "UCUM", "no units")),
                                    ("intensity", ("INTENSITY", "Mean fluorescence intensity"),
                                     ("[arb'U]", "UCUM", "arbitrary unit")),
                                    ("cnr", ("CNR", "Contrast-to-noise ratio"), ("1", "UCUM", "no units"))):
                children.append(_num_item((code[0], PRIVATE_SCHEME, code[1]), measurements.get(key), unit))
        groups.append(_item("CONTAINS", "CONTAINER", ("125007", "DCM", "Measurement Group"), children=children,
                            template="1410"))
    items.append(_item("CONTAINS", "CONTAINER", ("126010", "DCM", "Imaging Measurements"), children=groups))
    ds.ContentSequence = Seq(items)
    return ds


def capture_files(frames: Sequence[np.ndarray], frame_meta: Sequence[Mapping[str, Any]],
                  measurements: Mapping[str, Any], *, case_id: str, capture_id: str,
                  settings: DicomSettings) -> list[tuple[str, str, bytes]]:
    """Both DICOM files of a capture: ``[(kind, SOPInstanceUID, file bytes), ...]`` with
    kind ``"frames"`` and ``"sr"``."""
    site = str(measurements.get("site") or "")
    frames_ds = frames_dataset(frames, frame_meta, case_id=case_id, capture_id=capture_id, site=site,
                               settings=settings)
    m = dict(measurements)
    m.setdefault("first_frame_t_ns", _first_time(frame_meta))
    sr = measurement_dataset(frames_ds, m, case_id=case_id, capture_id=capture_id, settings=settings)
    return [("frames", frames_ds.SOPInstanceUID, _save(frames_ds)), ("sr", sr.SOPInstanceUID, _save(sr))]


# --- helpers ----------------------------------------------------------------------------


def _item(relationship: str, value_type: str, concept: tuple[str, str, str], *, code=None, text=None,
          uid=None, graphic=None, children=None, template: str | None = None):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    ds = Dataset()
    ds.RelationshipType = relationship
    ds.ValueType = value_type
    ds.ConceptNameCodeSequence = Seq([_code(*concept)])
    if value_type == "CODE":
        ds.ConceptCodeSequence = Seq([_code(*code)])
    elif value_type == "TEXT":
        ds.TextValue = str(text)
    elif value_type == "UIDREF":
        ds.UID = uid
    elif value_type == "SCOORD":
        ds.GraphicType = "POLYLINE"
        ds.GraphicData = [float(v) for v in graphic]
    elif value_type == "CONTAINER":
        ds.ContinuityOfContent = "SEPARATE"
        if template:
            t = Dataset()
            t.MappingResource, t.TemplateIdentifier = "DCMR", template
            ds.ContentTemplateSequence = Seq([t])
    if children:
        ds.ContentSequence = Seq(children)
    return ds


def _num_item(concept: tuple[str, str, str], value: Any, unit: tuple[str, str, str]):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    ds = _item("CONTAINS", "NUM", concept)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
        mv = Dataset()
        mv.NumericValue = _ds(float(value))
        mv.MeasurementUnitsCodeSequence = Seq([_code(*unit)])
        ds.MeasuredValueSequence = Seq([mv])
    else:
        # No value (no background, say): an empty measured value and the reason, PS3.3 C.18.1.
        ds.MeasuredValueSequence = Seq([])
        ds.NumericValueQualifierCodeSequence = Seq([_code("114006", "DCM", "Measurement failure")])
    return ds


def _image_ref(frames_ds, relationship: str):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    ds = Dataset()
    ds.RelationshipType = relationship
    ds.ValueType = "IMAGE"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = frames_ds.SOPClassUID, frames_ds.SOPInstanceUID
    ds.ReferencedSOPSequence = Seq([ref])
    return ds


def _is_rect(roi: Any) -> bool:
    return (isinstance(roi, (list, tuple)) and len(roi) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in roi))


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.6e}"
    return text


def _frame_time_ns(meta: Mapping[str, Any]) -> int | None:
    t = meta.get("t_start_ns")
    return int(t) if isinstance(t, int) and not isinstance(t, bool) and t > 0 else None


def _first_time(frame_meta: Sequence[Mapping[str, Any]]) -> int:
    for m in frame_meta:
        t = _frame_time_ns(m)
        if t is not None:
            return t
    raise InvalidArgument("no frame carries t_start_ns: the capture's time is unknown")


def _ns_from_dataset(ds) -> int:
    when = dt.datetime.strptime(ds.ContentDate + ds.ContentTime, "%Y%m%d%H%M%S.%f").replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1e9)


def _bits_stored(stack: np.ndarray, frame_meta: Sequence[Mapping[str, Any]]) -> int:
    """The camera's bit depth when every pixel fits in it, else 16 (Word SC: 9 to 16)."""
    bits = frame_meta[0].get("bits")
    top = int(stack.max()) if stack.size else 0
    if isinstance(bits, int) and not isinstance(bits, bool) and 9 <= bits <= 16 and top < 2 ** bits:
        return bits
    return 16
