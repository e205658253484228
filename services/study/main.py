"""The study process: the case store, cases, captures, pathology and the report.

It owns no hardware. A capture asks the imaging process to tap the frame stream for the
recorder (``record.*`` on imaging's internal socket) and collects the results processing
publishes (relayed by the gateway). A damaged case store (``<state_dir>/study.db``) never
stops the cart: this process then starts without it, refuses every study command with the
reason, and says so in its published state, which ``status`` carries under ``study``.

Threads: the command server (quick commands inline; ``capture`` in its worker), the followers
of the safety core's and imaging's states and of the results, and the state publisher.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import zmq

from nirf import config as config_mod
from nirf.controller.state import State
from nirf.hal.errors import DeviceError, NirfError
from nirf.services.common import entry, ipc, sdnotify
from nirf.services.common.follow import LatestState, Results

log = logging.getLogger(__name__)

STATE_PERIOD_S = 0.2
LONG_COMMANDS = frozenset({"capture"})


class _SafetyView:
    """The safety core's state as the capture needs it."""

    def __init__(self, latest: LatestState):
        self.latest = latest

    @property
    def state(self) -> State:
        """The safety core's state as of now (for commands: waits for the next publication,
        at most a few hundred milliseconds, so a command right after laser.on sees EMITTING)."""
        try:
            return State(self.latest.fresh().get("state", "FAULT"))
        except ValueError:
            return State.FAULT

    @property
    def setpoint_mw(self):
        return self.latest.get().get("laser", {}).get("setpoint_mw")


class _ImagingView:
    """Imaging's published state, with the attribute names the capture code reads."""

    def __init__(self, latest: LatestState):
        self.latest = latest

    @property
    def mode(self) -> str:
        v = self.latest.fresh(0.4).get("acquisition", "off")
        return v if isinstance(v, str) else "off"

    def current_id(self) -> str:
        v = self.latest.get().get("calibration_id")
        return v if isinstance(v, str) else "nominal"

    def capture_problems(self) -> list[str]:
        """Imaging's word on the flat field and the day's QC (PRODUCT section 7); unknown
        counts as a problem, so a capture is never let through on a silence."""
        state = self.latest.fresh(0.4)
        v = state.get("capture_problems")
        if not isinstance(v, list):
            return ["the imaging process has not reported its calibration state"]
        return [str(x) for x in v]


class StudyService:
    def __init__(self, cfg, *, state_dir: Path, runtime_dir: Path, ctx: zmq.Context | None = None, clock=None):
        from nirf.hal.clock import SystemClock

        self.cfg = cfg
        self.state_dir, self.runtime_dir = Path(state_dir), Path(runtime_dir)
        self.clock = clock or SystemClock()
        self.stop_event = threading.Event()
        self.ctx = ctx or zmq.Context()
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self._safety = LatestState(self.ctx, ipc.endpoint(self.runtime_dir, "safety_pub"), name="study-safety")
        self._imaging = LatestState(self.ctx, ipc.endpoint(self.runtime_dir, "imaging_pub"), name="study-imaging")
        self.cart = _SafetyView(self._safety)
        self.acquisition = self.calibration = _ImagingView(self._imaging)
        self.results = Results(self.ctx, ipc.endpoint(self.runtime_dir, "gateway_pub"), name="study-results")
        self.imaging = ipc.InternalClient(self.ctx, ipc.endpoint(self.runtime_dir, "imaging"), name="imaging")
        self.pub = ipc.Publisher(self.ctx, ipc.endpoint(self.runtime_dir, "study_pub"))
        self.telemetry = self.audit = ipc.EventsOut(self.pub)
        self.clinical = None
        self.store_error: str | None = None
        self.watchdog = sdnotify.WatchdogPinger(clock=self.clock)
        self._threads: list[threading.Thread] = []
        self._rev = ipc.Revision()

    # the attributes the capture code reads from the imaging process's state
    @property
    def filter(self) -> dict:
        v = self._imaging.get().get("filter")
        return dict(v) if isinstance(v, dict) else {}

    @property
    def fps(self) -> float:
        v = self._imaging.get().get("fps", 30.0)
        return float(v) if ipc.finite_number(v) and v > 0 else 30.0

    def wait_results(self, count: int, timeout_s: float, valid_only: bool = True) -> list[dict]:
        return self.results.wait_results(count, timeout_s, valid_only)

    def start(self) -> None:
        from nirf.services.study.clinical import Clinical

        try:
            self.clinical = Clinical(self)
            handlers = self.clinical.handlers()
        except Exception as err:  # a damaged case store: run without it, say why
            self.store_error = f"the case store {self.state_dir / 'study.db'} cannot be used: {err}"
            log.error("%s", self.store_error)
            handlers = {name: self._refuse for name in ("case.open", "case.close", "capture", "pathology.set",
                                                        "margin.set", "followup.add", "ae.add", "case.correct",
                                                        "report", "backup")}
        self.server = ipc.InternalServer(self.ctx, ipc.endpoint(self.runtime_dir, "study"), handlers,
                                         long_commands=LONG_COMMANDS, clock=self.clock, name="study",
                                         state=self.state_snapshot)
        self._threads = [threading.Thread(target=self.server.serve, args=(self.stop_event,), name="commands",
                                          daemon=True),
                         threading.Thread(target=self._state_loop, name="state", daemon=True)]
        for t in self._threads:
            t.start()

    def _refuse(self, args, caller):
        raise DeviceError("case-store", f"{self.store_error}; study commands are refused until it is "
                                        f"repaired or restored from a backup (laser and imaging work as usual)")

    def state_snapshot(self) -> dict:
        case = self.clinical.current_case_id() if self.clinical is not None else None
        return {"rev": self._rev.next(), "case": case, "store": {"ok": self.store_error is None, "error": self.store_error}}

    def alive(self) -> bool:
        return (all(t.is_alive() for t in self._threads) and self.server.worker_alive()
                and self._safety.follower.alive() and self._imaging.follower.alive() and self.results.follower.alive())

    def _state_loop(self) -> None:
        while not self.stop_event.wait(STATE_PERIOD_S):
            if not self.alive():
                log.error("a thread of the study process died; its watchdog pings stop")
                continue
            self.watchdog()
            try:
                self.pub.publish("state", self.state_snapshot())
            except Exception:
                log.exception("study state not published")

    def stop(self) -> None:
        self.stop_event.set()
        self.server.wake()  # the command thread sees the stop now
        for t in self._threads:
            t.join(timeout=3.0)
        if self.clinical is not None:
            self.clinical.close()
        self.server.close()
        for f in (self._safety, self._imaging, self.results):
            f.close()
        self.imaging.close()
        self.pub.close()
        self.ctx.destroy(linger=0)


def main(argv=None) -> int:
    p = entry.parser("NIRF cart study service (cases, captures, pathology, report)")
    args = p.parse_args(argv)
    entry.configure_logging("study")
    try:
        cfg = config_mod.load(args.config)
        state_dir, runtime_dir = cfg.state_dir(), cfg.runtime_dir()
        state_dir.mkdir(parents=True, exist_ok=True)
        svc = StudyService(cfg, state_dir=state_dir, runtime_dir=runtime_dir)
        svc.start()
    except NirfError as err:
        log.error("cannot start: %s", err)
        return 2
    except zmq.ZMQError as err:
        log.error("cannot start: %s (is another cart already running in this runtime folder?)", err)
        return 2
    entry.stop_on_signals(svc.stop_event)
    sdnotify.ready()
    try:
        while not svc.stop_event.wait(0.5):
            time.sleep(0)
    finally:
        sdnotify.stopping()
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
