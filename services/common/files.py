"""Files that are never half-written: the helper every process uses for state it keeps."""

from __future__ import annotations

import os
from pathlib import Path

from nirf.hal.errors import NirfError


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content, never a
    mixture: temporary file in the same folder, fsync, rename, fsync of the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise NirfError(f"cannot write {path.name} in {path.parent} "
                        f"({err.strerror or err}; {len(data)} bytes)") from err
