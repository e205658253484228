"""``make run``: start the simulated cart in the foreground.

Starts the simulated hardware and the cart's processes (the safety core, imaging, the bus
gateway, study, processing, the recorder and the surgical display) as child processes,
creates the keys on first start, waits until the cart publishes its first ``status`` and
prints how to reach it. Like systemd on the cart, it restarts a process that dies (at most
:data:`MAX_RESTARTS` times a minute each); if the simulated hardware dies, or a process keeps
dying, it stops everything and the exit status says so. Ctrl-C (or SIGTERM) stops every
process it started: the services first, then the safety core, the hardware last.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nirf import config as config_mod
from nirf.hal.errors import NirfError
from nirf.services.common import entry
from nirf.services.common import keys as keys_mod

log = logging.getLogger("nirf.launcher")

# The recorder holds a capture's frames (megabytes each) only until they are written. With
# glibc's default, freeing such buffers raises its mmap threshold, later ones come from the
# heap and the memory is kept: a fixed threshold hands every frame buffer back when freed.
# The systemd unit sets the same.
RECORDER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

IPC_PATH_LIMIT = 100  # Unix socket paths are limited to 107 bytes
MAX_RESTARTS = 10  # per process and minute, as the units' StartLimitBurst
RESTART_DELAY_S = 0.5  # as the units' RestartSec

# name -> (module, extra environment); started in this order
PROCESSES = {
    "hardware": ("nirf.sim.hardware", {}),
    "safety": ("nirf.controller.main", {}),
    "imaging": ("nirf.services.imaging.main", {}),
    "gateway": ("nirf.services.gateway.main", {}),
    "study": ("nirf.services.study.main", {}),
    "processing": ("nirf.services.processing.main", {}),
    "recorder": ("nirf.services.study.recorder", RECORDER_ENV),
    "display": ("nirf.services.display.main", {}),
}
# Niceness as on the cart: the safety core as its systemd unit sets it (Nice=-10 in
# systemd/nirf-safety.service), the simulated hardware above it (a real MCU is unaffected by
# the Pi's load, PRODUCT P6). Raising a priority needs root (or CAP_SYS_NICE); without it the
# cart runs at the default priority and says so once.
NICENESS = {"hardware": -15, "safety": -10}
# stopped in these groups, in order: the safety core first, so it ends any emission itself (a
# shutdown, not the SERVICE_LOST fault it latches when imaging or the gateway vanish under it)
# while the gateway can still record that; nothing can ask for light once it is gone. The
# hardware last, so the safety core can still turn the laser off through it.
STOP_ORDER = (("safety",), ("display", "processing", "study", "gateway", "recorder", "imaging"), ("hardware",))


def runtime_dir_for(cfg) -> Path:
    """The configured runtime folder, or a short temporary one when socket paths under it
    would be too long."""
    rd = cfg.runtime_dir()
    if len(str(rd / "frames.ipc")) > IPC_PATH_LIMIT:
        rd = Path(tempfile.mkdtemp(prefix="nirf-"))
        log.info("runtime folder path too long for sockets; using %s", rd)
    return rd


class Launcher:
    def __init__(self, config: str, *, quiet_children: bool = False):
        self.config = config
        self.cfg = config_mod.load(config)
        if self.cfg.profile != "sim":
            raise NirfError("the launcher runs the sim profile only; on the cart, systemd starts the services")
        self.state_dir = self.cfg.state_dir()
        self.runtime_dir = runtime_dir_for(self.cfg)
        self.children: dict[str, subprocess.Popen] = {}
        self.quiet_children = quiet_children
        self.stopping = False
        self._renice_refused = False
        self.restarts: dict[str, list[float]] = {}

    def env(self) -> dict:
        env = dict(os.environ)
        env["NIRF_STATE_DIR"] = str(self.state_dir)
        env["NIRF_RUNTIME_DIR"] = str(self.runtime_dir)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[entry.UNDER_LAUNCHER] = "1"  # Ctrl-C is the launcher's to handle
        return env

    def spawn(self, name: str, module: str | None = None, *args: str, env: dict | None = None) -> None:
        if module is None:
            module, env = PROCESSES[name]
            if name == "hardware":
                args = ("--runtime-dir", str(self.runtime_dir))
        cmd = [sys.executable, "-m", module, "--config", self.config, *args]
        out = subprocess.DEVNULL if self.quiet_children else None
        self.children[name] = subprocess.Popen(cmd, env={**self.env(), **(env or {})}, stdout=out, stderr=None)
        log.info("started %s (pid %d)", name, self.children[name].pid)
        if name in NICENESS:
            self._renice(name, self.children[name].pid, NICENESS[name])

    def _renice(self, name: str, pid: int, nice: int) -> None:
        """Give a child its niceness (every thread of it: the threads it starts inherit it)."""
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except PermissionError:
            if not self._renice_refused:
                self._renice_refused = True
                log.info("not permitted to raise %s's priority (nice %d, as on the cart): it runs at the "
                         "default priority; the heartbeat may then wait behind the simulator's rendering",
                         name, nice)
        except (ProcessLookupError, OSError) as err:
            log.warning("could not renice %s: %s", name, err)

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        keys_mod.ensure_sim_keys(self.state_dir)
        keys_mod.ensure_display_key(self.state_dir)
        try:
            (self.runtime_dir / "hardware.json").unlink()
        except FileNotFoundError:
            pass
        for name in PROCESSES:
            self.spawn(name)

    def wait_ready(self, timeout_s: float = 30.0, should_stop=lambda: False) -> bool:
        from nirf.services.cli.client import CartClient

        client = CartClient.from_state_dir(self.state_dir, self.cfg.bus.control_endpoint,
                                           self.cfg.bus.telemetry_endpoint)
        try:
            client.subscribe("status")
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.dead() or should_stop():
                    return False
                if client.receive(0.5) is not None:
                    return True
            return False
        finally:
            client.close()

    def dead(self) -> str | None:
        for name, p in self.children.items():
            if p.poll() is not None:
                return name
        return None

    def restart_dead(self, now: float | None = None) -> str | None:
        """Restart every process that died, as systemd's ``Restart=on-failure`` would.
        Returns the name of one that must not or cannot be restarted (the hardware, or a
        process that died more than :data:`MAX_RESTARTS` times in a minute), else None."""
        now = time.monotonic() if now is None else now
        for name, p in list(self.children.items()):
            if p.poll() is None:
                continue
            if name == "hardware":
                return name
            recent = [t for t in self.restarts.get(name, []) if now - t < 60.0]
            if len(recent) >= MAX_RESTARTS:
                return name
            if recent and now - recent[-1] < RESTART_DELAY_S:
                continue
            log.warning("%s exited with status %s; restarting it", name, p.returncode)
            self.restarts[name] = recent + [now]
            self.spawn(name)
        return None

    def stop(self) -> None:
        """Stop the safety core first (it turns the laser and the indicator off and reports a
        shutdown), then the services, and the simulated hardware last."""
        self.stopping = True
        for group in STOP_ORDER:
            procs = [self.children[n] for n in group if n in self.children]
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + 5.0
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=2.0)
        # imaging unlinks its frame ring when it stops; one that was killed cannot
        from nirf.services.common.framering import ring_path

        try:
            ring_path(self.runtime_dir).unlink(missing_ok=True)
        except OSError:
            pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run the simulated NIRF cart in the foreground (Ctrl-C stops it)")
    p.add_argument("--profile", default=None, help="profile name (only 'sim' here)")
    p.add_argument("--config", default=None, help="a TOML configuration file instead of a profile")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("NIRF_LOG_LEVEL", "INFO"),
                        format="%(asctime)s launcher %(levelname)s: %(message)s")
    try:
        launcher = Launcher(args.config or args.profile or "sim")
    except NirfError as err:
        log.error("%s", err)
        return 2
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    launcher.start()
    code = 0
    try:
        if launcher.wait_ready(should_stop=lambda: stop["flag"]):
            b = launcher.cfg.bus
            # The hint names this cart's configuration and keys: the defaults could reach
            # another cart (another user's on the same machine, say).
            flags = f" --config {os.path.abspath(launcher.cfg.source)}" if args.config else ""
            if os.environ.get("NIRF_STATE_DIR"):
                flags += f" --state-dir {launcher.state_dir}"
            print(f"\nThe simulated cart is up.\n"
                  f"  control:   {b.control_endpoint}\n  telemetry: {b.telemetry_endpoint}\n"
                  f"  keys:      {launcher.state_dir / 'keys'}\n"
                  f"  display:   http://{launcher.cfg.display.bind_address}:{launcher.cfg.display.port}/\n"
                  f"Try, in another terminal:  .venv/bin/nirfctl{flags} status   or   "
                  f".venv/bin/nirfctl{flags} watch\n"
                  f"Press Ctrl-C to stop.\n", flush=True)
        elif not stop["flag"]:
            log.error("the cart did not publish its status in time (dead: %s)", launcher.dead())
            code = 1
            stop["flag"] = True
        while not stop["flag"]:
            dead = launcher.restart_dead()
            if dead:
                log.error("%s exited with status %s and is not restarted; stopping the cart", dead,
                          launcher.children[dead].returncode)
                code = 1
                break
            time.sleep(0.1)
    finally:
        launcher.stop()
        log.info("stopped")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
