"""TIFF recording: round trip, structure, atomic writes under failure, gap counting."""

from __future__ import annotations

import errno
import logging
import os
import struct

import numpy as np
import pytest

from nirf.hal.errors import DeviceError, InvalidArgument
from nirf.services.study import tiff
from nirf.services.study.tiff import (RecorderDiskFull, RecorderError, SequenceGapCounter, TiffFormatError,
                           parse_tiff, read_tiff, tiff_bytes, write_tiff_atomic)


def frame(height=48, width=64, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1024, size=(height, width), dtype=np.uint16)


META = {
    "capture_id": "DFSP-014-c003",
    "exposure_us": 10_000,
    "gain": 2.5,
    "laser_mw": 120.0,
    "filter": {"position": 1, "name": "ICG emission"},
    "t_start_ns": 1_700_000_000_000_000_000,
    "t_end_ns": 1_700_000_000_010_000_000,
    "seq": 41,
    "mcu_frame": 82,
    "lit": True,
}


def visible(folder):
    return sorted(os.listdir(folder))


def test_round_trip_pixels_and_metadata(tmp_path):
    a = frame()
    a[0, 0], a[-1, -1] = 0, 65535  # both ends of the range survive
    path = tmp_path / "f.tif"
    n = write_tiff_atomic(path, a, META)
    assert n == path.stat().st_size
    b, meta = read_tiff(path)
    assert b.dtype == np.uint16 and b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    assert meta == META
    assert visible(tmp_path) == ["f.tif"]


def test_numpy_metadata_values_are_converted(tmp_path):
    path = tmp_path / "n.tif"
    write_tiff_atomic(path, frame(8, 8), {"seq": np.int64(7), "gain": np.float32(1.5),
                                          "lit": np.bool_(False), "roi": np.array([1, 2, 3, 4])})
    _, meta = read_tiff(path)
    assert meta == {"seq": 7, "gain": 1.5, "lit": False, "roi": [1, 2, 3, 4]}


def test_file_is_a_baseline_tiff():
    a = frame(5, 7)
    raw = tiff_bytes(a, {"x": 1})
    assert raw[:4] == b"II*\x00"
    (ifd,) = struct.unpack_from("<I", raw, 4)
    (count,) = struct.unpack_from("<H", raw, ifd)
    tags = {}
    for i in range(count):
        tag, kind, n, value = struct.unpack_from("<HHII", raw, ifd + 2 + 12 * i)
        if kind == 3 and n == 1:
            value &= 0xFFFF
        tags[tag] = (kind, n, value)
    tag_ids = list(tags)
    assert tag_ids == sorted(tag_ids), "IFD entries must be in ascending tag order"
    for required in (256, 257, 258, 259, 262, 273, 277, 278, 279, 282, 283, 296):
        assert required in tags
    assert tags[256][2] == 7 and tags[257][2] == 5
    assert tags[258][2] == 16 and tags[259][2] == 1 and tags[262][2] == 1
    offset, nbytes = tags[273][2], tags[279][2]
    assert nbytes == a.size * 2 and offset % 2 == 0
    np.testing.assert_array_equal(np.frombuffer(raw[offset:offset + nbytes], "<u2").reshape(5, 7), a)


def test_non_json_description_is_returned_as_text():
    raw = bytearray(tiff_bytes(frame(4, 4), {"k": 1}))
    start = raw.index(b'{"k": 1}')
    raw[start:start + 8] = b"not json"
    _, meta = parse_tiff(bytes(raw))
    assert meta == {"description": "not json"}


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.uint16),
                                 np.zeros(16, np.uint16), [[1, 2], [3, 4]]])
def test_writer_rejects_other_arrays(tmp_path, bad):
    with pytest.raises(InvalidArgument, match="uint16"):
        write_tiff_atomic(tmp_path / "x.tif", bad, {})
    assert visible(tmp_path) == []


def test_writer_rejects_metadata_that_is_not_json(tmp_path):
    with pytest.raises(InvalidArgument, match="JSON"):
        write_tiff_atomic(tmp_path / "x.tif", frame(4, 4), {"gain": float("nan")})
    with pytest.raises(InvalidArgument, match="JSON"):
        write_tiff_atomic(tmp_path / "x.tif", frame(4, 4), {"obj": object()})
    assert visible(tmp_path) == []


def test_existing_file_is_not_replaced(tmp_path):
    path = tmp_path / "f.tif"
    write_tiff_atomic(path, frame(seed=1), {"n": 1})
    with pytest.raises(InvalidArgument, match="exists"):
        write_tiff_atomic(path, frame(seed=2), {"n": 2})
    assert read_tiff(path)[1] == {"n": 1}
    write_tiff_atomic(path, frame(seed=2), {"n": 2}, overwrite=True)
    assert read_tiff(path)[1] == {"n": 2}
    assert visible(tmp_path) == ["f.tif"]


def test_reader_rejects_garbage(tmp_path):
    with pytest.raises(TiffFormatError):
        parse_tiff(b"definitely not a tiff")
    raw = tiff_bytes(frame(8, 8), {})
    with pytest.raises(TiffFormatError):
        parse_tiff(raw[:-10])  # the strip runs past the end
    with pytest.raises(RecorderError):
        read_tiff(tmp_path / "missing.tif")


# --- failures leave nothing behind ------------------------------------------------------


def test_disk_full_on_write_leaves_no_file(tmp_path, mocker):
    mocker.patch("nirf.services.study.tiff.os.write", side_effect=OSError(errno.ENOSPC, "No space left on device"))
    fsync = mocker.spy(tiff.os, "fsync")
    with pytest.raises(RecorderDiskFull) as info:
        write_tiff_atomic(tmp_path / "f.tif", frame(), META)
    err = info.value
    assert isinstance(err, DeviceError) and err.device == "recorder"
    assert "disk full" in str(err) and "f.tif" in str(err)
    assert visible(tmp_path) == []
    assert fsync.call_count == 0  # never reached


def test_short_writes_are_completed(tmp_path, mocker):
    real_write = os.write

    def dribble(fd, data):
        return real_write(fd, bytes(data[:1000]))  # the kernel may take less than asked

    mocker.patch("nirf.services.study.tiff.os.write", side_effect=dribble)
    a = frame()
    write_tiff_atomic(tmp_path / "f.tif", a, META)
    np.testing.assert_array_equal(read_tiff(tmp_path / "f.tif")[0], a)


def test_failed_fsync_leaves_no_file(tmp_path, mocker):
    mocker.patch("nirf.services.study.tiff.os.fsync", side_effect=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(RecorderDiskFull):
        write_tiff_atomic(tmp_path / "f.tif", frame(), META)
    assert visible(tmp_path) == []


def test_other_io_error_is_a_recorder_error(tmp_path, mocker):
    mocker.patch("nirf.services.study.tiff.os.fsync", side_effect=OSError(errno.EIO, "Input/output error"))
    with pytest.raises(RecorderError) as info:
        write_tiff_atomic(tmp_path / "f.tif", frame(), META)
    assert not isinstance(info.value, RecorderDiskFull)
    assert "errno 5" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert visible(tmp_path) == []


def test_failed_folder_fsync_removes_renamed_file(tmp_path, mocker):
    real_fsync = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the first is the file, the second the folder
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    mocker.patch("nirf.services.study.tiff.os.fsync", side_effect=fsync)
    with pytest.raises(RecorderError):
        write_tiff_atomic(tmp_path / "f.tif", frame(), META)
    assert len(calls) == 2
    assert visible(tmp_path) == []


def test_rename_failure_leaves_no_file(tmp_path, mocker):
    mocker.patch("nirf.services.study.tiff.os.rename", side_effect=OSError(errno.EDQUOT, "Disk quota exceeded"))
    with pytest.raises(RecorderDiskFull):
        write_tiff_atomic(tmp_path / "f.tif", frame(), META)
    assert visible(tmp_path) == []


def test_success_syncs_file_and_folder(tmp_path, mocker):
    fsync = mocker.spy(tiff.os, "fsync")
    rename = mocker.spy(tiff.os, "rename")
    write_tiff_atomic(tmp_path / "f.tif", frame(), META)
    assert fsync.call_count == 2
    src, dst = rename.call_args.args
    assert os.path.dirname(src) == str(tmp_path) and dst == str(tmp_path / "f.tif")


def test_reserve_refuses_before_writing(tmp_path, mocker):
    usage = type("Usage", (), {"free": 1_000_000, "total": 10**9, "used": 0})
    mocker.patch("nirf.services.study.tiff.shutil.disk_usage", return_value=usage)
    with pytest.raises(RecorderDiskFull, match="1000000 bytes free"):
        write_tiff_atomic(tmp_path / "f.tif", frame(), META, reserve_bytes=999_000)
    assert visible(tmp_path) == []
    write_tiff_atomic(tmp_path / "f.tif", frame(), META, reserve_bytes=10_000)
    assert visible(tmp_path) == ["f.tif"]


# --- sequence gaps -------------------------------------------------------------------------


def test_gap_counter_in_order():
    c = SequenceGapCounter()
    assert [c.feed(s) for s in range(10, 20)] == [0] * 10
    assert c.summary() == {"frames": 10, "gaps": 0, "missing": 0, "out_of_order": 0,
                           "first_seq": 10, "last_seq": 19, "gap_ranges": []}


def test_gap_counter_counts_missing(caplog):
    c = SequenceGapCounter("rec")
    seqs = [0, 1, 2, 5, 6, 10, 11]
    with caplog.at_level(logging.WARNING, logger="nirf.services.study.tiff"):
        missed = [c.feed(s) for s in seqs]
    assert missed == [0, 0, 0, 2, 0, 3, 0]
    assert c.gaps == 2 and c.missing == 5 and c.lost == 5
    assert c.summary()["gap_ranges"] == [[3, 4], [7, 9]]
    expected_missing = len(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
    assert c.missing == expected_missing
    gap_logs = [r for r in caplog.records if "missing" in r.getMessage()]
    assert len(gap_logs) == 2  # never silent


def test_gap_counter_restart_and_duplicates(caplog):
    c = SequenceGapCounter()
    with caplog.at_level(logging.WARNING, logger="nirf.services.study.tiff"):
        for s in (5, 6, 6, 0, 1):
            c.feed(s)
    assert c.out_of_order == 2 and c.missing == 0
    assert len(caplog.records) == 2


def test_gap_counter_keeps_bounded_ranges_and_resets():
    c = SequenceGapCounter(max_kept_gaps=3)
    for s in range(0, 40, 2):
        c.feed(s)
    assert c.gaps == 19 and c.missing == 19
    assert len(c.summary()["gap_ranges"]) == 3
    c.reset()
    assert c.summary()["frames"] == 0 and c.missing == 0 and c.last_seq is None


def test_gap_counter_rejects_non_integers():
    c = SequenceGapCounter()
    with pytest.raises(InvalidArgument):
        c.feed(1.5)
    c.feed(np.uint32(3))
    assert c.last_seq == 3


# ---------------------------------------------------------------------- OME-TIFF pairs
# tifffile is the reference reader (PRODUCT.md section 9); every value is read back from
# the OME-XML that tifffile hands out, never from our own parser.

ON_META = {"seq": 41, "mcu_frame": 82, "lit": True, "t_start_ns": 1_764_580_000_123_456_789,
           "t_end_ns": 1_764_580_000_133_456_789, "exposure_us": 10_000, "gain": 2.5, "laser_mw": 120.5,
           "filter_position": 1, "filter_name": "ICG 832/37", "bits": 12, "width": 64, "height": 48,
           "capture_id": "DFSP-014-c003", "site": "tumor_bed", "label": "12 o'clock \u00e9"}
OFF_META = dict(ON_META, seq=42, mcu_frame=83, lit=False, laser_mw=0.0,
                t_start_ns=ON_META["t_start_ns"] + 33_333_333, t_end_ns=ON_META["t_end_ns"] + 33_333_333)


def _ome(path):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return (tif.is_ome, tif.series[0].axes, tif.asarray(), tifffile.xml2dict(tif.ome_metadata)["OME"],
                {t.name: t.value for t in tif.pages.first.tags.values()})


def test_a_pair_is_one_ome_tiff_whose_metadata_tifffile_reads_back(tmp_path):
    import datetime

    on, off = frame(seed=3), frame(seed=4)
    on[0, 0], off[-1, -1] = 65535, 0
    path = tmp_path / tiff.pair_file_name(0, 41)
    n = tiff.write_pair_atomic(path, on, off, ON_META, OFF_META, name="DFSP-014-c003 pair 0",
                               pixel_size_um=52.5)
    assert n == path.stat().st_size and visible(tmp_path) == [path.name]
    is_ome, axes, stack, ome, tags = _ome(path)
    assert is_ome and axes == "CYX" and stack.dtype == np.uint16
    np.testing.assert_array_equal(stack[0], on)
    np.testing.assert_array_equal(stack[1], off)

    image = ome["Image"]
    pixels = image["Pixels"]
    assert [c["Name"] for c in pixels["Channel"]] == ["laser-on", "laser-off"]
    assert (pixels["SizeC"], pixels["SizeX"], pixels["SizeY"], pixels["Type"]) == (2, 64, 48, "uint16")
    assert pixels["SignificantBits"] == 12
    assert (pixels["PhysicalSizeX"], pixels["PhysicalSizeY"]) == (52.5, 52.5)
    assert pixels["PhysicalSizeXUnit"] == "\u00b5m"
    # the acquisition time, from the laser-on frame's start (worked out here independently)
    want = datetime.datetime.fromtimestamp(ON_META["t_start_ns"] // 10**9, datetime.timezone.utc)
    assert image["AcquisitionDate"] == want.strftime("%Y-%m-%dT%H:%M:%S") + ".123456Z"
    planes = sorted(pixels["Plane"], key=lambda p: p["TheC"])
    assert [p["ExposureTime"] for p in planes] == [10_000, 10_000]
    assert {p["ExposureTimeUnit"] for p in planes} == {"\u00b5s"}
    assert planes[1]["DeltaT"] == pytest.approx(0.033333333) and planes[0]["DeltaT"] == 0
    assert [c["DetectorSettings"]["Gain"] for c in pixels["Channel"]] == [2.5, 2.5]
    laser = ome["Instrument"]["Laser"]
    assert (laser["Power"], laser["PowerUnit"], laser["Wavelength"]) == (120.5, "mW", 785)
    assert pixels["Channel"][0]["LightSourceSettings"]["ID"] == laser["ID"]
    assert "LightSourceSettings" not in pixels["Channel"][1]  # the laser is off for that plane
    filt = ome["Instrument"]["Filter"]
    assert filt["Model"] == "ICG 832/37"
    assert {c["LightPath"]["EmissionFilterRef"]["ID"] for c in pixels["Channel"]} == {filt["ID"]}
    # the plain TIFF tags too, for readers that skip OME-XML
    assert tags["Make"] == "nirf-cart" and tags["DateTime"] == want.strftime("%Y:%m:%d %H:%M:%S")
    assert tags["XResolution"][0] / tags["XResolution"][1] == pytest.approx(1e4 / 52.5)
    assert tags["ResolutionUnit"] == 3  # centimetre
    # and the complete frame metadata of each plane, as JSON in the map annotation
    values = {m["K"]: m["value"] for m in ome["StructuredAnnotations"]["MapAnnotation"]["Value"]["M"]}
    import json

    assert json.loads(values["nirf:on"]) == ON_META and json.loads(values["nirf:off"]) == OFF_META
    a_on, a_off, m_on, m_off = tiff.read_pair(path)
    assert m_on == ON_META and m_off == OFF_META
    np.testing.assert_array_equal(a_off, off)


@pytest.fixture(scope="module")
def ome_schema():
    xmlschema = pytest.importorskip("xmlschema")
    ome_types = pytest.importorskip("ome_types")
    xsd = os.path.join(os.path.dirname(ome_types.__file__), "ome-2016-06.xsd")
    if not os.path.exists(xsd):
        pytest.skip("ome-types ships no OME 2016-06 schema in this version")
    return xmlschema.XMLSchema(xsd)


@pytest.mark.slow  # seconds of CPU: in make test, not in test-quick
@pytest.mark.parametrize("on_meta, off_meta, pixel_size", [(ON_META, OFF_META, 52.5), ({}, {}, None)])
def test_the_ome_xml_is_valid_against_the_ome_schema(tmp_path, ome_schema, on_meta, off_meta, pixel_size):
    """Checked with xmlschema against the OME 2016-06 schema (the copy ome-types ships),
    with every metadata field and with none."""
    import tifffile

    path = tmp_path / "p.ome.tiff"
    tiff.write_pair_atomic(path, frame(), frame(seed=2), on_meta, off_meta, pixel_size_um=pixel_size)
    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    errors = [f"{e.reason} at {e.path}" for e in ome_schema.iter_errors(xml)]
    assert errors == []
    # and the validator does catch a broken document
    assert list(ome_schema.iter_errors(xml.replace('Name="laser-on"', 'Name="laser-on" Bogus="1"')))


def test_pixel_size_is_left_out_when_not_configured(tmp_path):
    path = tmp_path / "p.ome.tiff"
    tiff.write_pair_atomic(path, frame(), frame(seed=2), ON_META, OFF_META)
    _, _, _, ome, tags = _ome(path)
    assert "PhysicalSizeX" not in ome["Image"]["Pixels"] and tags.get("ResolutionUnit", 1) == 1  # none


def test_a_pair_is_written_atomically(tmp_path, mocker):
    fsync = mocker.spy(tiff.os, "fsync")
    rename = mocker.spy(tiff.os, "rename")
    path = tmp_path / "p.ome.tiff"
    tiff.write_pair_atomic(path, frame(), frame(seed=2), ON_META, OFF_META)
    (src, dst), _ = rename.call_args
    assert os.path.basename(src).startswith(".p.ome.tiff.") and dst == str(path)
    assert fsync.call_count == 2  # the file, then its folder


def test_a_full_disk_leaves_no_pair_behind(tmp_path, mocker):
    mocker.patch("nirf.services.study.tiff.os.write", side_effect=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(RecorderDiskFull, match="p.ome.tiff"):
        tiff.write_pair_atomic(tmp_path / "p.ome.tiff", frame(), frame(seed=2), ON_META, OFF_META)
    assert visible(tmp_path) == []


@pytest.mark.parametrize("on, off, match", [
    (frame(), frame(24, 32), "differ in size"),
    (frame().astype(np.uint8), frame(), "uint16"),
    (np.zeros((0, 4), np.uint16), np.zeros((0, 4), np.uint16), "non-empty"),
])
def test_a_bad_pair_is_refused_with_its_shape(tmp_path, on, off, match):
    with pytest.raises(InvalidArgument, match=match):
        tiff.write_pair_atomic(tmp_path / "p.ome.tiff", on, off, ON_META, OFF_META)


def test_read_tiff_reads_the_laser_on_plane_of_a_pair(tmp_path):
    path = tmp_path / "p.ome.tiff"
    on = frame(seed=9)
    tiff.write_pair_atomic(path, on, frame(seed=2), ON_META, OFF_META)
    array, meta = read_tiff(path)
    np.testing.assert_array_equal(array, on)
    assert meta == ON_META
