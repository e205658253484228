"""The case store's online backup (PRODUCT.md D4, PROTOCOL ``backup``): a consistent copy,
WAL included, while captures are being written; checked with SQLite itself."""

from __future__ import annotations

import datetime
import os
import sqlite3
import threading

import pytest

from nirf.hal.clock import ManualClock
from nirf.hal.errors import DeviceError, InvalidArgument
from nirf.services.study.casestore import CaseStore
from nirf.services.study.backup import backup


def open_store(path):
    store = CaseStore(path)
    when = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=24)).isoformat()
    store.open_case("DFSP-014", "DFSP", "icg_25mg", injection_time=when, clock_synchronised=True)
    return store


def add(store, i):
    store.add_capture("tumor_bed", f"spot {i}", sbr=3.0, intensity=100.0, cnr=4.0, positive=True, threshold=2.0,
                      pairs=8, rois={"signal": [1, 1, 4, 4], "background": [9, 9, 4, 4]}, settings={},
                      files=[], clock_synchronised=True)


def count(db) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM captures").fetchone()[0]
    finally:
        conn.close()


def test_a_backup_while_captures_are_written_is_whole_and_has_every_committed_row(tmp_path):
    db = tmp_path / "study.db"
    store = open_store(db)
    for i in range(20):
        add(store, i)
    assert (tmp_path / "study.db-wal").stat().st_size > 0  # the rows sit in the WAL
    stop = threading.Event()
    written = {"n": 20}

    def writer():
        # the same store the cart uses, from another thread: one capture after another
        with CaseStore(db) as other:
            while not stop.is_set():
                add(other, written["n"])
                written["n"] += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    copies = []
    try:
        for _ in range(5):
            before = count(db)
            result = backup(db, tmp_path / "usb")
            after = count(db)
            copies.append((before, result, after))
    finally:
        stop.set()
        thread.join(30)
        store.close()
    assert written["n"] > 20, "the writer never wrote during the backups"
    for before, result, after in copies:
        path = result["path"]
        assert result["integrity"] == "ok" and result["bytes"] == os.path.getsize(path)
        assert os.path.dirname(path) == str(tmp_path / "usb")
        assert not os.path.exists(path + "-wal")  # one self-contained file
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            rows = conn.execute("SELECT count(*) FROM captures").fetchone()[0]
        finally:
            conn.close()
        assert before <= rows <= after  # every row committed before it, and no half transaction
    assert sorted(os.listdir(tmp_path / "usb")) == sorted(os.path.basename(r["path"]) for _, r, _ in copies)


def test_copying_the_file_alone_would_miss_the_wal(tmp_path):
    """Why the backup API: the committed rows are not in study.db yet."""
    db = tmp_path / "study.db"
    store = open_store(db)
    for i in range(5):
        add(store, i)
    naive = tmp_path / "copy.db"
    naive.write_bytes(db.read_bytes())
    result = backup(db, tmp_path / "usb")
    store.close()
    assert count(result["path"]) == 5
    try:
        naive_rows = count(naive)
    except sqlite3.DatabaseError:
        naive_rows = 0
    assert naive_rows < 5


def test_names_carry_the_time_and_never_overwrite(tmp_path):
    db = tmp_path / "study.db"
    open_store(db).close()
    clock = ManualClock(wall_start_ns=1_764_580_000_000_000_000)
    a = backup(db, tmp_path / "b", clock=clock)
    b = backup(db, tmp_path / "b", clock=clock)
    assert os.path.basename(a["path"]) == "study-20251201T090640Z.db"
    assert os.path.basename(b["path"]) == "study-20251201T090640Z-1.db"
    assert a["same_device"] is True  # same file system as the database: not a backup on its own


def test_bad_destinations_are_refused_by_name(tmp_path):
    db = tmp_path / "study.db"
    open_store(db).close()
    with pytest.raises(InvalidArgument, match="absolute"):
        backup(db, "relative/folder")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DeviceError, match="cannot create the backup folder"):
        backup(db, blocker / "sub")
    with pytest.raises(DeviceError, match="no case database"):
        backup(tmp_path / "missing.db", tmp_path / "b")
