"""The audit log (PRODUCT S11, C6): every command and every state change, one JSON object
per line, in the state directory.

Bounded and failing closed:

* an entry is at most :data:`MAX_ENTRY_BYTES` (4 KiB): longer arguments or results are cut
  and the entry says how long they were;
* entries for refused requests are rate-limited per identity (a token bucket); what is left
  out is counted and written as one ``suppressed`` entry when writing resumes, so every
  request still gets its reply and nothing vanishes without a trace;
* the file rotates at :data:`ROTATE_BYTES` and keeps :data:`KEEP_FILES` old ones;
* :meth:`AuditLog.write` says whether the entry reached the disk (written and flushed). The
  gateway refuses state-changing commands with ``AUDIT_UNAVAILABLE`` while it cannot write,
  except ``laser.off`` and ``disarm``, which always run.

Lines are flushed as written, so a crash loses at most the line being written.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

MAX_ENTRY_BYTES = 4096
ROTATE_BYTES = 16 * 1024 * 1024
KEEP_FILES = 4
# Refused requests: a burst of this many per identity, then this many per second.
REFUSED_BURST = 20
REFUSED_PER_S = 2.0
# Long values are cut to this many characters of their JSON text.
FIELD_KEEP_CHARS = 512


def _cut(value, keep: int = FIELD_KEEP_CHARS):
    """The value, or a short stand-in that says how big it was."""
    text = json.dumps(value, default=str, separators=(",", ":"))
    if len(text) <= keep:
        return value
    return {"cut": True, "bytes": len(text.encode()), "start": text[:keep]}


class AuditLog:
    def __init__(self, path: Path, clock_ns=time.time_ns, clock=time.monotonic, *,
                 rotate_bytes: int = ROTATE_BYTES, keep_files: int = KEEP_FILES):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock_ns = clock_ns
        self._clock = clock
        self._lock = threading.Lock()
        self.rotate_bytes = rotate_bytes
        self.keep_files = keep_files
        self._file = None
        self._size = 0
        self.ok = True
        self.last_error: str | None = None
        self.failures = 0
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, last time)
        self._suppressed: dict[str, int] = {}
        self._open()

    def _open(self) -> None:
        try:
            self._file = open(self.path, "a", encoding="utf-8")
            self._size = self._file.tell()
        except OSError as err:
            self._file = None
            self._fail(err)

    def _fail(self, err: Exception) -> None:
        if self.ok:
            log.error("audit log %s cannot be written: %s", self.path, err)
        self.ok = False
        self.last_error = str(err)
        self.failures += 1

    def _rotate(self) -> None:
        self._file.close()
        for n in range(self.keep_files - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        extra = self.path.with_name(f"{self.path.name}.{self.keep_files + 1}")
        if extra.exists():
            extra.unlink()
        self._open()

    def _line(self, kind: str, fields: dict) -> str:
        record = {"t_ns": self._clock_ns(), "kind": kind, **fields}
        line = json.dumps(record, default=str, separators=(",", ":"))
        if len(line.encode()) <= MAX_ENTRY_BYTES:
            return line
        record = {"t_ns": record["t_ns"], "kind": kind,
                  **{k: _cut(v) for k, v in fields.items()}, "entry_cut_from_bytes": len(line.encode())}
        line = json.dumps(record, default=str, separators=(",", ":"))
        if len(line.encode()) > MAX_ENTRY_BYTES:  # very many fields: keep only the short ones
            record = {k: v for k, v in record.items() if len(json.dumps(v, default=str)) < 256}
            record["entry_cut_from_bytes"] = len(line.encode())
            line = json.dumps(record, default=str, separators=(",", ":"))[:MAX_ENTRY_BYTES - 1]
        return line

    def _write_line(self, line: str) -> bool:
        if self._file is None:
            self._open()
            if self._file is None:
                return False
        try:
            if self._size + len(line) + 1 > self.rotate_bytes:
                self._rotate()
            self._file.write(line + "\n")
            self._file.flush()
            self._size += len(line.encode()) + 1
        except (OSError, ValueError) as err:  # disk full or closed
            self._fail(err)
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
            return False
        if not self.ok:
            log.warning("audit log writable again after %d failure(s)", self.failures)
        self.ok = True
        self.last_error = None
        return True

    def write(self, kind: str, **fields) -> bool:
        """Write one entry; True when it reached the file (flushed)."""
        line = self._line(kind, fields)
        with self._lock:
            return self._write_line(line)

    def write_refused(self, identity: str, kind: str, **fields) -> bool:
        """An entry for a refused request, rate-limited per identity. True when written or
        deliberately left out (counted); False only when the file cannot be written."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(identity, (float(REFUSED_BURST), now))
            tokens = min(float(REFUSED_BURST), tokens + (now - last) * REFUSED_PER_S)
            if tokens < 1.0:
                self._buckets[identity] = (tokens, now)
                self._suppressed[identity] = self._suppressed.get(identity, 0) + 1
                return True
            self._buckets[identity] = (tokens - 1.0, now)
            n = self._suppressed.pop(identity, 0)
            if n:
                self._write_line(self._line("suppressed", {"client": identity, "refused_requests": n}))
            return self._write_line(self._line(kind, fields))

    def sync(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            for identity, n in self._suppressed.items():
                self._write_line(self._line("suppressed", {"client": identity, "refused_requests": n}))
            self._suppressed.clear()
            if self._file is not None:
                self._file.close()
                self._file = None
