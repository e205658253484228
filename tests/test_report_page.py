"""The report page: self-contained HTML with the ROC curves and SBR by pathology, looked at
in a real browser (Debian's headless Chromium) whose screenshot must show a drawn page."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from nirf.hal.clock import ManualClock
from nirf.services.study.casestore import CaseStore
from nirf.services.study.report import ReportOptions
from nirf.services.study import page
from tests.study_synth import make_study

# Where a copy of the screenshot is left for people to look at, when that folder is named.
SCREENSHOT_COPY = os.environ.get("NIRF_REPORT_SCREENSHOT")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    clock = ManualClock()
    with CaseStore(tmp_path_factory.mktemp("page") / "study.db", clock=clock,
                   report_options=ReportOptions(bootstrap_resamples=200)) as store:
        make_study(store, clock, per_cell=4, seed=21)
        return store.report()


def test_the_page_is_self_contained_and_shows_every_part(report):
    text = page.render(report)
    assert text.startswith("<!DOCTYPE html>") and "</html>" in text
    assert "<script" not in text and not re.search(r"""(src|href)=["']?(https?:|//)""", text)
    assert text.count("<svg") == 2
    assert text.count("<polyline") == sum(r["auc"] is not None for r in report["roc"]) > 0
    dots = sum(len(g["positive"]) + len(g["negative"]) for g in report["sbr_by_pathology"])
    assert text.count("<circle") == dots > 0
    for heading in ("Flow", "per margin", "per patient", "ROC", "Positive margins among the arms",
                    "Local recurrence", "Adverse events", "Methods"):
        assert heading in text, heading
    observer = {k: v for k, v in report.items() if k not in ("margins_by_arm", "recurrence", "adverse_events")}
    text = page.render(observer)
    assert "Local recurrence" not in text and "Adverse events" not in text


def _png_size_and_colours(data: bytes) -> tuple[int, int, int]:
    """Width, height and the number of distinct colours of an 8-bit RGB(A) PNG (enough
    of the format for Chromium's screenshots)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big")
            depth, colour_type = body[8], body[9]
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert depth == 8 and colour_type in (2, 6)
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    colours: set[bytes] = set()
    prev = bytearray(stride)
    for row in range(height):
        f = raw[row * (stride + 1)]
        line = bytearray(raw[row * (stride + 1) + 1:(row + 1) * (stride + 1)])
        for i in range(stride):  # undo the PNG filters
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        if row % 4 == 0:
            for x in range(0, stride, channels * 2):
                colours.add(bytes(line[x:x + 3]))
        prev = line
    return width, height, len(colours)


def test_the_page_in_a_real_browser(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): the page is not looked at")
    html_file = tmp_path / "report.html"
    html_file.write_text(page.render(report), encoding="utf-8")
    shot = tmp_path / "report.png"
    profile = tmp_path / "profile"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1200,1600",
           f"--screenshot={shot}", html_file.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    width, height, colours = _png_size_and_colours(shot.read_bytes())
    assert (width, height) == (1200, 1600)
    # a blank or error page has a handful of colours; text, tables and curves have many
    assert colours > 50, colours
    if SCREENSHOT_COPY:
        shutil.copyfile(shot, Path(SCREENSHOT_COPY))
