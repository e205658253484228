"""Start the whole simulated cart for a benchmark and take it down again.

The cart is started the way ``make run`` starts it (``nirf.services.launcher`` in its own
process group), on free TCP ports, with its state in a throw-away folder and its sockets in
a short runtime folder (Unix socket paths are limited to 107 bytes). The benchmark needs a
few things a test does not: the process ids of the launcher's children (to freeze, kill
and measure them), the hardware process's world bus (the physical truth of the laser
output) and the memory and descriptor counts of every process.

Every wait here is bounded, and :meth:`BenchCart.stop` kills the launcher's whole process
group whatever state the cart is in.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nirf.services.cli.client import CartClient
from nirf.sim.ports import free_ports

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent

# The launcher's children, told apart by the module each one runs.
CHILD_MODULES = {
    "hardware": "nirf.sim.hardware",
    # "controller": the process that owns the laser link (the safety core since the split)
    "controller": "nirf.controller.main",
    "imaging": "nirf.services.imaging.main",
    "gateway": "nirf.services.gateway.main",
    "study": "nirf.services.study.main",
    "processing": "nirf.services.processing.main",
    "recorder": "nirf.services.study.recorder",
    "display": "nirf.services.display.main",
}


def proc_children(pid: int) -> list[int]:
    """The direct children of ``pid``, read from /proc (every process's parent id)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # the process ended meanwhile
        # the command name in brackets may contain spaces: parse after its closing bracket
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            children.append(int(entry))
    return children


def proc_cmdline(pid: int) -> str:
    """The command line of ``pid`` with spaces between the arguments ("" once it ended)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rss_kib(pid: int) -> int | None:
    """Resident memory of ``pid`` in KiB (``VmRSS`` in /proc/<pid>/status), None once it ended."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    """Open file descriptors of ``pid`` (entries of /proc/<pid>/fd), None once it ended."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time used by ``pid`` so far, in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _threads_cpu(pid: int, wanted) -> float | None:
    """CPU seconds of the threads of ``pid`` whose OS name (/proc/<pid>/task/<tid>/comm)
    ``wanted(name)`` accepts; None once the process ended. A thread that ended takes its
    time with it: sample while it runs."""
    times = thread_times(pid)
    if times is None:
        return None
    return sum(cpu for (_, name), (cpu, _) in times.items() if wanted(name))


def thread_cpu_seconds(pid: int, comm: str) -> float | None:
    """CPU seconds of the threads of ``pid`` named ``comm``; 0.0 when none has that name,
    None once the process ended."""
    return _threads_cpu(pid, lambda name: name == comm)


def threads_cpu_by_prefix(pid: int, prefix: str) -> float | None:
    """CPU seconds of the threads of ``pid`` whose OS name starts with ``prefix``."""
    return _threads_cpu(pid, lambda name: name.startswith(prefix))


def thread_times(pid: int) -> dict[tuple[int, str], tuple[float, int | None]] | None:
    """Every thread of ``pid`` now: ``(tid, OS name) -> (CPU seconds, times it was put on a
    CPU)``, from ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds on a CPU, waits, runs);
    where that file is missing, CPU from ``stat`` (clock ticks) and no count. Every run
    after the first is a wake-up, so the count's growth over a window is the thread's wakes.
    None once the process ended."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    out: dict[tuple[int, str], tuple[float, int | None]] = {}
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            comm = Path(f"{base}/comm").read_text().strip()
            try:
                run_ns, _, runs = Path(f"{base}/schedstat").read_text().split()[:3]
                out[(int(tid), comm)] = (int(run_ns) / 1e9, int(runs))
            except (OSError, ValueError):
                stat = Path(f"{base}/stat").read_text()
                fields = stat[stat.rfind(")") + 2:].split()
                out[(int(tid), comm)] = ((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), None)
        except OSError:
            continue  # the thread ended meanwhile
    return out


def thread_shares(before: dict, after: dict, wall_s: float) -> list[dict]:
    """Per thread alive at both readings of :func:`thread_times`: its share of one core and
    its wake-ups a second over ``wall_s``, largest share first."""
    rows = []
    if not wall_s > 0:
        return rows
    for key, (cpu1, runs1) in after.items():
        if key not in before:
            continue
        cpu0, runs0 = before[key]
        wakes = None if runs0 is None or runs1 is None else (runs1 - runs0) / wall_s
        rows.append({"tid": key[0], "thread": key[1], "share": max(cpu1 - cpu0, 0.0) / wall_s,
                     "wakes_per_s": wakes})
    rows.sort(key=lambda r: -r["share"])
    return rows


class BenchCart:
    """The simulated cart in its processes, for one benchmark run.

    ``width``/``height``/``fps``/``exposure_us`` set the camera; ``emission_delay_s`` the
    arming delay (the shortest allowed keeps repeated measurements quick);
    ``heartbeat_timeout_ms`` the MCU's watchdog; ``extra`` is more TOML appended as is.
    """

    def __init__(self, *, width: int = 1456, height: int = 1088, fps: float = 60.0,
                 exposure_us: int = 8000, emission_delay_s: float = 1.0,
                 heartbeat_timeout_ms: int = 500, preview_rate_hz: float = 10.0,
                 extra: str = "", keep_folder: bool = False):
        self.width, self.height, self.fps = width, height, fps
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.keep_folder = keep_folder
        self.folder = Path(tempfile.mkdtemp(prefix="nirf-bench-"))
        self.state_dir = self.folder / "state"
        self.state_dir.mkdir()
        # kept short on purpose: it holds the ipc sockets
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="nirf-b-"))
        control_port, telemetry_port, display_port = free_ports(3)
        self.control = f"tcp://127.0.0.1:{control_port}"
        self.telemetry = f"tcp://127.0.0.1:{telemetry_port}"
        self.config_path = self.folder / "bench.toml"
        self.config_path.write_text(f"""
[cart]
profile = "sim"
[bus]
control_endpoint = "{self.control}"
telemetry_endpoint = "{self.telemetry}"
preview_rate_hz = {float(preview_rate_hz)}
[safety]
emission_delay_s = {float(emission_delay_s)}
heartbeat_timeout_ms = {int(heartbeat_timeout_ms)}
[display]
port = {display_port}
[camera]
width = {int(width)}
height = {int(height)}
fps = {float(fps)}
exposure_us = {int(exposure_us)}
{extra}
""")
        self.log_path = self.folder / "cart.log"
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._clients: list[CartClient] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self, ready_timeout_s: float = 60.0) -> "BenchCart":
        """Start the launcher and wait (bounded) until the cart publishes its first status."""
        env = dict(os.environ, NIRF_STATE_DIR=str(self.state_dir), NIRF_RUNTIME_DIR=str(self.runtime_dir),
                   PYTHONUNBUFFERED="1", NIRF_LOG_LEVEL=os.environ.get("NIRF_LOG_LEVEL", "INFO"))
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nirf.services.launcher", "--config", str(self.config_path)],
            cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)  # its own process group: stop() kills the whole group
        deadline = time.monotonic() + ready_timeout_s
        key = self.state_dir / "keys" / "local-operator.key_secret"
        while not key.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cart created no keys within {ready_timeout_s} s")
            time.sleep(0.05)
        probe = self.client()
        try:
            probe.subscribe("status")
            while probe.receive(0.5) is None:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the cart published no status within {ready_timeout_s} s\n"
                                       + self.log_tail())
        finally:
            probe.close()
        return self

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("the cart's launcher exited\n" + self.log_tail())

    def stop(self) -> None:
        """Stop the cart: politely first (the launcher stops its children in order), then
        kill the whole process group; remove the folders unless asked to keep them."""
        for c in self._clients:
            c.close()
        self._clients.clear()
        if self.proc is not None:
            pgid = self.proc.pid
            try:
                os.killpg(pgid, signal.SIGCONT)  # a frozen process cannot even die politely
            except (ProcessLookupError, PermissionError):
                pass
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("launcher %d did not exit after SIGKILL", pgid)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if not self.keep_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "BenchCart":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ access
    def client(self) -> CartClient:
        """A new operator client on the cart's control and telemetry endpoints (its own
        context, so clients in different threads never share a socket)."""
        import zmq

        c = CartClient.from_state_dir(self.state_dir, self.control, self.telemetry, context=zmq.Context())
        self._clients.append(c)
        return c

    def hardware_info(self) -> dict:
        """What the hardware process published about itself (ports, world bus endpoints)."""
        return json.loads((self.runtime_dir / "hardware.json").read_text())

    def world_pub_endpoint(self) -> str:
        """The hardware process's world bus (PUB: ``laser``, ``inputs``, ...)."""
        return f"ipc://{self.runtime_dir / 'world.pub'}"

    def pids(self) -> dict[str, int]:
        """Process ids by role: ``launcher`` and its children (``hardware``, ``controller`` (the
        safety core), ``imaging``, ``gateway``, ``study``, ``processing``, ``recorder``,
        ``display``), those that are running."""
        found = {}
        if self.proc is not None and self.proc.poll() is None:
            found["launcher"] = self.proc.pid
            for pid in proc_children(self.proc.pid):
                cmd = proc_cmdline(pid)
                for name, module in CHILD_MODULES.items():
                    if f"-m {module} " in cmd + " ":
                        found[name] = pid
        return found

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the cart's combined log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        """The cart's whole combined log."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# ---------------------------------------------------------------------- driving the cart
def latest_status(client: CartClient) -> dict:
    """The ``status`` command's answer (the same map the telemetry publishes)."""
    return client.call("status", timeout_s=10.0)


def to_safe(client: CartClient, timeout_s: float = 10.0) -> None:
    """Bring the cart back to SAFE with the default world: interlock closed, key on,
    acquisition stopped, any latched fault reset."""
    client.call("sim.set", {"interlock": "closed", "key": True}, timeout_s=timeout_s)
    client.call("acquire.stop", timeout_s=timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        state = latest_status(client)["state"]
        if state == "SAFE":
            return
        if state == "FAULT":
            try:
                client.call("fault.reset", timeout_s=timeout_s)
            except Exception as err:  # the cause may need a moment to clear (inputs debounce)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fault.reset refused until the deadline: {err}") from err
                time.sleep(0.1)
        else:
            client.call("disarm", timeout_s=timeout_s)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cart did not return to SAFE within {timeout_s} s (state {state})")


def arm_and_emit(client: CartClient, power_mw: float, timeout_s: float = 15.0) -> None:
    """From SAFE: arm, wait for ARMED (the emission delay), turn the laser on and wait
    until the cart reports EMITTING."""
    # forget queued telemetry: a status from an earlier round must not pass for this one
    while client.receive(0) is not None:
        pass
    client.call("arm", timeout_s=timeout_s)
    if client.wait_for("status", lambda m: m["state"] == "ARMED", timeout_s=timeout_s) is None:
        raise TimeoutError(f"not ARMED within {timeout_s} s")
    client.call("laser.on", {"power_mw": power_mw}, timeout_s=timeout_s)
    if client.wait_for("status", lambda m: m["state"] == "EMITTING", timeout_s=timeout_s) is None:
        raise TimeoutError(f"not EMITTING within {timeout_s} s")
