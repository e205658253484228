"""An online backup of the case store (PRODUCT.md D4, the bus command ``backup``).

Copying ``study.db`` with ``cp`` while the cart runs gives a database without its latest
records: in WAL mode the committed transactions sit in ``study.db-wal`` until a
checkpoint. SQLite's online backup API reads the database as one connection sees it,
the WAL included, in one read transaction (a consistent snapshot; writers carry on
meanwhile, WAL readers do not block them).

The copy is written to a hidden temporary name in the destination folder, turned into a
self-contained single file (rollback journal, no ``-wal`` beside it), checked with
``PRAGMA integrity_check``, fsynced and renamed into place: a copy either appears whole
and checked or not at all. Names carry the UTC time: ``study-YYYYMMDDTHHMMSSZ.db``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
from pathlib import Path

from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import DeviceError, InvalidArgument

log = logging.getLogger(__name__)

DEVICE = "case-store"
BACKUPS_FOLDER = "backups"


def backup(db_path: str | os.PathLike, dest: str | os.PathLike, *, clock: Clock | None = None) -> dict:
    """Copy the live database ``db_path`` into the folder ``dest`` (created if missing);
    returns ``{"path", "bytes", "integrity": "ok", "same_device"}``. ``same_device`` is
    true when the copy lies on the database's own file system (no protection against a
    lost SD card)."""
    clock = clock or SystemClock()
    db_path = Path(db_path)
    if not db_path.is_file():
        raise DeviceError(DEVICE, f"no case database at {db_path}; nothing to back up")
    dest = Path(dest)
    if not dest.is_absolute():
        raise InvalidArgument(f"dest = {str(dest)!r}: an absolute folder on the cart is needed, such as a USB stick's")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DeviceError(DEVICE, f"cannot create the backup folder {dest}: {err.strerror or err}") from err
    if not os.access(dest, os.W_OK):
        raise DeviceError(DEVICE, f"backup folder {dest} is not writable")
    stamp = dt.datetime.fromtimestamp(clock.time_ns() / 1e9, tz=dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    final = dest / f"study-{stamp}.db"
    n = 1
    while final.exists():  # two backups within a second
        final = dest / f"study-{stamp}-{n}.db"
        n += 1
    tmp = dest / f".{final.name}.tmp"
    try:
        _copy(db_path, tmp)
        result = _check(tmp)
        if result != "ok":
            raise DeviceError(DEVICE, f"backup copy of {db_path} failed its integrity check: {result}; "
                                      f"the case database itself may be damaged (nothing was kept)")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.rename(tmp, final)
        _fsync_folder(dest)
    except sqlite3.Error as err:
        raise DeviceError(DEVICE, f"backup of {db_path} to {dest} failed: {err}") from err
    except OSError as err:
        raise DeviceError(DEVICE, f"backup of {db_path} to {dest} failed: {err.strerror or err}") from err
    finally:
        for leftover in (tmp, Path(f"{tmp}-journal"), Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                log.warning("could not remove %s", leftover)
    size = final.stat().st_size
    same = _same_device(db_path, dest)
    log.info("case store backed up to %s (%d bytes)%s", final, size,
             "; on the same storage as the database: copy it off the cart" if same else "")
    return {"path": str(final), "bytes": size, "integrity": "ok", "same_device": same}


def _copy(db_path: Path, tmp: Path) -> None:
    src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10.0)
    try:
        dst = sqlite3.connect(str(tmp))
        try:
            # pages=-1: the whole database in one step, so in one read transaction: a
            # snapshot of the committed state even while captures are being written.
            src.backup(dst, pages=-1)
            # A single self-contained file: no WAL to carry along on the stick.
            dst.execute("PRAGMA journal_mode=DELETE")
            dst.commit()
        finally:
            dst.close()
    finally:
        src.close()


def _check(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    return "ok" if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:5])


def _same_device(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
