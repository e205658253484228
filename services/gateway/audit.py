"""The audit log (PRODUCT S11): every command and every state change, one JSON object per
line, in the state directory. Lines are flushed as written so a crash loses at most the
line being written."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: Path, clock_ns=time.time_ns):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, kind: str, **fields) -> None:
        record = {"t_ns": self._clock_ns(), "kind": kind, **fields}
        line = json.dumps(record, default=str, separators=(",", ":"))
        with self._lock:
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except (OSError, ValueError) as err:  # disk full or closed: never break the caller
                log.error("audit log write failed: %s", err)

    def sync(self) -> None:
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            self._file.close()
