"""The durable DICOM outbox: files wait in a folder until the research PACS has them.

Why a folder: an entry is a file, so it survives a power cut or a restart of the cart as
soon as it is written (hard link or copy to a hidden name, fsync, rename, fsync of the
folder), and taking the entry out is one unlink after the PACS confirmed the C-STORE. A
PACS that is down only delays: every attempt that fails waits longer before the next one
(``retry_initial_s``, doubling up to ``retry_max_s``), and nothing is dropped. A crash
between the PACS's confirmation and the unlink sends the file again after the restart; the
PACS keeps one copy, because the instance keeps its SOP Instance UID.

A file the PACS refuses outright (a failure status, not a network error) is tried again
``max_refusals`` times, then moved to ``refused/`` beside the outbox and reported in the
log, so one bad file cannot hold back the others for ever.

Entries are named ``<enqueue time ns, 20 digits>-<name>`` so that they go out in the order
they came in.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import InvalidArgument

log = logging.getLogger(__name__)

SUFFIX = ".dcm"
REFUSED = "refused"
# C-STORE statuses that mean "stored": success and the warnings (PS3.4 B.2.3).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass
class SendResult:
    """The outcome for one file: ``stored``; or not, with ``refused`` telling a PACS
    refusal (status given) from a transport failure."""

    stored: bool
    refused: bool = False
    message: str = ""


class CStoreSender:
    """Sends files by C-STORE (pynetdicom), one association per batch."""

    def __init__(self, host: str, port: int, called_ae: str, calling_ae: str, *, timeout_s: float = 10.0):
        self.host, self.port = host, int(port)
        self.called_ae, self.calling_ae = called_ae, calling_ae
        self.timeout_s = float(timeout_s)

    @classmethod
    def from_config(cls, cfg) -> "CStoreSender":
        d = cfg.dicom
        return cls(d.pacs_host, d.pacs_port, d.pacs_ae_title, d.ae_title, timeout_s=d.timeout_s)

    def describe(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"

    def send(self, paths: list[Path]) -> list[SendResult]:
        """C-STORE each file; a failure to associate fails them all (transport)."""
        from pydicom import dcmread
        from pynetdicom import AE

        classes: dict[str, set[str]] = {}
        unreadable: dict[Path, SendResult] = {}
        for p in paths:
            try:
                ds = dcmread(p, stop_before_pixels=True)
                classes.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
            except Exception as err:  # noqa: BLE001 - a damaged file is refused, not fatal
                unreadable[p] = SendResult(False, refused=True, message=f"unreadable: {type(err).__name__}: {err}")
        sendable = [p for p in paths if p not in unreadable]
        if not sendable:
            return [unreadable[p] for p in paths]
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        for sop_class, syntaxes in classes.items():
            ae.add_requested_context(sop_class, sorted(syntaxes))
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no connection"
            failed = SendResult(False, message=f"association with {self.describe()}: {why}")
            return [unreadable.get(p, failed) for p in paths]
        results = {}
        try:
            for p in sendable:
                if not assoc.is_established:
                    results[p] = SendResult(False, message=f"association with {self.describe()} lost")
                    continue
                try:
                    status = assoc.send_c_store(p)
                except Exception as err:  # noqa: BLE001 - a broken file or a dropped link
                    results[p] = SendResult(False, message=f"{type(err).__name__}: {err}")
                    continue
                code = getattr(status, "Status", None)
                if code is None:
                    results[p] = SendResult(False, message="no answer (timeout or abort)")
                elif code in _STORED:
                    results[p] = SendResult(True, message=f"status 0x{code:04X}")
                else:
                    results[p] = SendResult(False, refused=True, message=f"refused with status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        return [unreadable.get(p) or results[p] for p in paths]


class Outbox:
    """A folder of files waiting for the PACS, and the loop that sends them.

    ``send``: takes a list of paths, returns a :class:`SendResult` per path (a
    :class:`CStoreSender`'s ``send``). ``clock``: for the back-off (tests pass a fake).
    """

    def __init__(self, folder: str | os.PathLike, send: Callable[[list[Path]], list[SendResult]], *,
                 retry_initial_s: float = 2.0, retry_max_s: float = 300.0, max_refusals: int = 5,
                 batch: int = 16, clock: Clock | None = None, describe: str = "the PACS"):
        if not 0 < retry_initial_s <= retry_max_s:
            raise InvalidArgument(f"retry_initial_s = {retry_initial_s!r}: must be above 0 and at most "
                                  f"retry_max_s ({retry_max_s!r})")
        self.folder = Path(folder)
        self.refused_folder = self.folder / REFUSED
        self.folder.mkdir(parents=True, exist_ok=True)
        self._send = send
        self.retry_initial_s, self.retry_max_s = float(retry_initial_s), float(retry_max_s)
        self.max_refusals, self.batch = int(max_refusals), int(batch)
        self.clock = clock or SystemClock()
        self.describe = describe
        self.failures = 0  # consecutive failed attempts: sets the back-off
        self.next_try = 0.0  # clock.monotonic() before which no attempt is made
        self.sent = 0
        self.last_error = ""
        self._refusals: dict[str, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._remove_temporaries()

    @classmethod
    def from_config(cls, cfg, state_dir: str | os.PathLike, **kw) -> "Outbox":
        d = cfg.dicom
        sender = CStoreSender.from_config(cfg)
        return cls(Path(state_dir) / "outbox", sender.send, retry_initial_s=d.retry_initial_s,
                   retry_max_s=d.retry_max_s, describe=sender.describe(), **kw)

    # ------------------------------------------------------------------ entries
    def add(self, source: str | os.PathLike, name: str | None = None) -> Path:
        """Queue ``source`` (a complete file): a hard link when the outbox is on the same
        file system, else a copy; on disk (fsynced) before this returns."""
        source = Path(source)
        name = name or source.name
        if "/" in name or name.startswith("."):
            raise InvalidArgument(f"outbox entry name {name!r}: a plain file name without a leading dot")
        stamp = self.clock.time_ns()
        final = self.folder / f"{stamp:020d}-{name}"
        while final.exists():  # a coarse or fake clock: keep names unique and in order
            stamp += 1
            final = self.folder / f"{stamp:020d}-{name}"
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
        try:
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.rename(tmp, final)
            _fsync_folder(self.folder)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._wake.set()
        return final

    def pending(self) -> list[Path]:
        """The entries still to send, oldest first."""
        return sorted(p for p in self.folder.iterdir()
                      if p.is_file() and not p.name.startswith(".") and p.name.endswith(SUFFIX))

    def status(self) -> dict:
        """A JSON-ready account: pending, sent, refused, the back-off and the last error."""
        refused = len(list(self.refused_folder.glob(f"*{SUFFIX}"))) if self.refused_folder.is_dir() else 0
        wait = max(0.0, self.next_try - self.clock.monotonic())
        return {"pending": len(self.pending()), "sent": self.sent, "refused": refused,
                "failures": self.failures, "retry_in_s": round(wait, 3), "last_error": self.last_error,
                "pacs": self.describe}

    # ------------------------------------------------------------------ sending
    def send_due(self) -> int:
        """One attempt, unless the back-off says not yet: sends up to ``batch`` entries;
        returns how many the PACS stored."""
        with self._lock:
            if self.clock.monotonic() < self.next_try:
                return 0
            batch = self.pending()[: self.batch]
            if not batch:
                return 0
            try:
                results = self._send(batch)
            except Exception as err:  # noqa: BLE001 - a sender bug must not stop the loop
                log.exception("outbox: sending failed")
                results = [SendResult(False, message=f"{type(err).__name__}: {err}")] * len(batch)
            stored = 0
            transport_failed = False
            for path, result in zip(batch, results):
                if result.stored:
                    path.unlink(missing_ok=True)
                    self._refusals.pop(path.name, None)
                    stored += 1
                elif result.refused:
                    n = self._refusals.get(path.name, 0) + 1
                    self._refusals[path.name] = n
                    self.last_error = f"{path.name}: {result.message}"
                    if n >= self.max_refusals:
                        self.refused_folder.mkdir(exist_ok=True)
                        os.rename(path, self.refused_folder / path.name)
                        self._refusals.pop(path.name, None)
                        log.error("outbox: %s refused %d times by %s (%s); moved to %s", path.name, n,
                                  self.describe, result.message, self.refused_folder)
                    transport_failed = True
                else:
                    self.last_error = f"{path.name}: {result.message}"
                    transport_failed = True
            if stored:
                _fsync_folder(self.folder)
                self.sent += stored
            if transport_failed:
                self.failures += 1
                delay = min(self.retry_max_s, self.retry_initial_s * 2 ** (self.failures - 1))
                self.next_try = self.clock.monotonic() + delay
                log.warning("outbox: %d of %d file(s) not sent to %s (%s); next attempt in %.1f s, %d waiting",
                            len(batch) - stored, len(batch), self.describe, self.last_error, delay,
                            len(self.pending()))
            else:
                if self.failures:
                    log.info("outbox: %s reachable again", self.describe)
                self.failures, self.next_try = 0, 0.0
            return stored

    def wait_s(self) -> float:
        """How long the loop may sleep: until the back-off ends, or a while when idle."""
        if not self.pending():
            return 5.0
        return max(0.0, min(5.0, self.next_try - self.clock.monotonic()))

    def run(self, stop: threading.Event) -> None:
        """Send until ``stop`` is set (the recorder runs this in a thread)."""
        while not stop.is_set():
            try:
                while self.send_due():
                    if stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - keep trying; the files stay queued
                log.exception("outbox: attempt failed")
            self._wake.wait(self.wait_s() or 0.05)
            self._wake.clear()

    def wake(self) -> None:
        """Make the loop look again now (new entries, or shutting down)."""
        self._wake.set()

    def _remove_temporaries(self) -> None:
        for p in self.folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
