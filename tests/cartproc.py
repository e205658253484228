"""Start the whole simulated cart (launcher + hardware + controller + processing) for a test,
on free ports and in throw-away folders, and stop every process afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nirf.sim.ports import free_port, free_ports  # distinct ports, never one twice

__all__ = ["ROOT", "RunningCart", "free_port", "free_ports", "start_cart", "wait_for_file", "write_config"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunningCart:
    proc: subprocess.Popen
    state_dir: Path
    runtime_dir: Path
    config_path: Path
    control: str
    telemetry: str
    log_path: Path

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_keys(self, timeout_s: float = 60.0) -> None:
        """Wait until the launcher has created the keys (the first thing it does)."""
        deadline = time.monotonic() + timeout_s
        while not (self.state_dir / "keys" / "local-operator.key_secret").exists():
            assert self.proc.poll() is None, self.log_text()
            assert time.monotonic() < deadline, "the cart did not create its keys"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the launcher stops its children in order
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def write_config(folder: Path, *, width: int = 728, height: int = 544, fps: float = 30.0,
                 emission_delay_s: float = 1.0, extra: str = "", safety: str = "") -> tuple[Path, str, str]:
    control_port, telemetry_port, display_port = free_ports(3)
    control = f"tcp://127.0.0.1:{control_port}"
    telemetry = f"tcp://127.0.0.1:{telemetry_port}"
    path = folder / "test.toml"
    path.write_text(f"""
[cart]
profile = "sim"
[bus]
control_endpoint = "{control}"
telemetry_endpoint = "{telemetry}"
[safety]
emission_delay_s = {emission_delay_s}
{safety}
[camera]
width = {width}
height = {height}
fps = {fps}
{extra}
""")
    if "[display]" not in extra:
        # the surgical display too gets a free port (a running `make run` may hold 8080)
        with path.open("a") as f:
            f.write(f"\n[display]\nport = {display_port}\n")
    return path, control, telemetry


def start_cart(tmp: Path, **config_kw) -> RunningCart:
    state_dir = tmp / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    runtime_dir = Path(tempfile.mkdtemp(prefix="nirf-t-"))
    cfg_path, control, telemetry = write_config(tmp, **config_kw)
    env = dict(os.environ, NIRF_STATE_DIR=str(state_dir), NIRF_RUNTIME_DIR=str(runtime_dir),
               PYTHONUNBUFFERED="1", NIRF_LOG_LEVEL="INFO")
    log_path = tmp / "cart.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "nirf.services.launcher", "--config", str(cfg_path)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    return RunningCart(proc, state_dir, runtime_dir, cfg_path, control, telemetry, log_path)


def wait_for_file(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False
