"""What every service's entry point does the same way: the ``--config`` option, logging
(configured here and only in entry points) and stopping on SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from nirf.services.common import sdnotify


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--config`` (a profile name or a TOML file; default
    ``$NIRF_CONFIG``, else ``sim``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=os.environ.get("NIRF_CONFIG", "sim"),
                   help="profile name (sim, device) or TOML file")
    return p


def configure_logging(process: str) -> None:
    """Log lines name the process; the level comes from ``$NIRF_LOG_LEVEL`` (default INFO).
    Under systemd the lines go to the journal."""
    logging.basicConfig(level=os.environ.get("NIRF_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s")


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM (systemd, the launcher) and SIGINT (Ctrl-C) set ``stop``.

    Under the simulator's launcher, Ctrl-C reaches every process of the terminal at once;
    the children then ignore it and let the launcher stop them in order (services first,
    the simulated hardware last), so the controller can still turn the laser off."""
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if os.environ.get(UNDER_LAUNCHER):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, lambda *_: stop.set())


# Set by the launcher in its children's environment.
UNDER_LAUNCHER = "NIRF_UNDER_LAUNCHER"


def serve(svc, ready_message: str) -> int:
    """Run a service whose ``serve()`` loops until its ``stop_event`` is set: stop on
    signals, tell systemd it is ready, and always tell it it is stopping and close."""
    stop_on_signals(svc.stop_event)
    logging.getLogger(type(svc).__module__).info("%s", ready_message)
    sdnotify.ready()
    try:
        svc.serve()
    finally:
        sdnotify.stopping()
        svc.close()
    return 0
