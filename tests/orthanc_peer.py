"""A real Orthanc PACS for the tests: the Debian package's server, started on free ports
with its own configuration and storage in a temporary folder, stopped (its whole process
group) at the end. Its REST API on 127.0.0.1 tells what it stored.

Skips, naming the reason, where the ``orthanc`` package is not installed (``.ci/run``
installs it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from nirf.sim.ports import free_ports

ORTHANC_PATHS = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
AE_TITLE = "TESTPACS"


def orthanc_binary() -> str | None:
    """The Orthanc server program, or None."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return next((p for p in ORTHANC_PATHS if os.access(p, os.X_OK)), None)


def require_orthanc() -> str:
    binary = orthanc_binary()
    if binary is None:
        pytest.skip("Orthanc is not installed (Debian package 'orthanc'; .ci/run installs it): "
                    "the PACS tests need a real server")
    return binary


class OrthancPeer:
    """One Orthanc server; ``start``/``stop`` may be called again (same storage)."""

    def __init__(self, folder: Path, *, ae_title: str = AE_TITLE):
        self.binary = require_orthanc()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.dicom_port, self.http_port = free_ports(2)
        self.proc: subprocess.Popen | None = None
        self.config_path = self.folder / "orthanc.json"
        self.config_path.write_text(json.dumps({
            "Name": "nirf-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "StableAge": 1,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
        }, indent=1))
        self.log_path = self.folder / "orthanc.log"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and wait until its REST API answers."""
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab")
        try:
            # A session of its own so that stop() (and the suite's clean-up) ends its group.
            self.proc = subprocess.Popen([self.binary, str(self.config_path)], cwd=self.folder, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            log.close()
        _register(self.proc)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                self.get("/system", timeout_s=1.0)
                if self._dicom_listening():
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s:.0f} s; log:\n{self.log_tail()}")

    def _dicom_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1.0):
                return True
        except OSError:
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server (SIGTERM to its group, SIGKILL if it lingers)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(5.0)

    def get(self, path: str, timeout_s: float = 10.0):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout_s) as r:
            return json.loads(r.read().decode("utf-8"))

    def sop_instance_uids(self) -> list[str]:
        """Every stored instance's SOP Instance UID (one entry per stored instance)."""
        out = []
        for orthanc_id in self.get("/instances"):
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            out.append(tags["SOPInstanceUID"])
        return out

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "OrthancPeer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


_started: list[subprocess.Popen] = []


def _register(proc: subprocess.Popen) -> None:
    _started.append(proc)
    try:
        import conftest  # the suite's process-group clean-up, when present

        conftest.register_process_group(proc)
    except (ImportError, AttributeError):
        pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
