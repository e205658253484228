"""The bus gateway: the public CURVE endpoints, roles, request checks, the audit log, and
routing each command to the process that owns it (services/gateway/commands.py).

One thread serves every socket without blocking: a request is checked, audited and passed
on to its owner over an internal socket; the owner's reply is passed back when it comes. So
no command waits behind another: a 60 s capture in the study process holds up nobody else,
and ``laser.off``, ``disarm``, ``status`` and ``ping`` are answered within milliseconds
whatever runs (PRODUCT S14). ``status`` and ``ping`` are answered here from the states the
other processes publish, each with its age.

The gateway also relays to the telemetry endpoint: events from every process, and the
results and previews of processing. It sends the safety core a heartbeat every 100 ms from
this same loop; if the loop stops, the laser goes off (``SERVICE_LOST``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from nirf import config as config_mod
from nirf.hal.errors import NirfError
from nirf.services.common import entry, ipc, sdnotify
from nirf.services.common import keys as keys_mod
from nirf.services.gateway import bus as bus_mod
from nirf.services.gateway.audit import AuditLog
from nirf.services.gateway.commands import COMMANDS, OWNERS, Command

log = logging.getLogger(__name__)

VERSION = "0.2.0"
HEARTBEAT_S = 0.1
KEY_CHECK_S = 0.5
STALE_SAFETY_S = 1.0
# The first status waits for every process at most this long (see Gateway._ready).
READY_WAIT_S = 30.0
ALWAYS = frozenset(name for name, c in COMMANDS.items() if c.always)
PROCESS_STATES = ("safety", "imaging", "study")
AUDITED_EVENTS = frozenset({"state", "fault", "safety", "info", "input"})


@dataclass
class Pending:
    envelope: list
    client_id: str
    cmd: Command
    caller: bus_mod.Caller
    args: dict
    arrived: float  # monotonic
    deadline: float


class Gateway:
    def __init__(self, cfg, *, state_dir: Path, runtime_dir: Path, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.state_dir, self.runtime_dir = Path(state_dir), Path(runtime_dir)
        self.ctx = ctx or zmq.Context()
        self.started = time.monotonic()
        self._is_ready = False
        import threading

        self.stop_event = threading.Event()
        self.audit = AuditLog(self.state_dir / "audit.jsonl")
        self.states: dict[str, dict] = {}
        self.state_at: dict[str, float] = {}
        self.pending: dict[str, Pending] = {}
        self.long_running: Pending | None = None
        self._n = 0
        self.requests = 0
        self.internal_dropped = 0
        self.watchdog = sdnotify.WatchdogPinger()
        self._last_status_key = None
        self._started: dict[str, int] = {}
        import os

        self.instance = f"{os.getpid()}-{time.time_ns()}"  # tells the safety core of a restart

    # ------------------------------------------------------------------ sockets
    def start(self) -> None:
        if self.cfg.profile == "sim":
            keys_mod.ensure_sim_keys(self.state_dir)
        self.ring = keys_mod.KeyRing(self.state_dir)
        self.auth = keys_mod.start_authenticator(self.ctx, self.ring)
        self.server_keys = keys_mod.load_server_keys(self.state_dir)
        b = self.cfg.bus
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.MAXMSGSIZE, b.max_message_bytes)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.control.setsockopt(zmq.SNDHWM, 1000)
        keys_mod.make_curve_server(self.control, *self.server_keys)
        self.control.bind(b.control_endpoint)
        self.telemetry = bus_mod.Telemetry(self.ctx, b.telemetry_endpoint, self.server_keys)
        self._revocations = self.ring.revocations
        rd = self.runtime_dir
        rd.mkdir(parents=True, exist_ok=True)
        self.owners: dict[str, zmq.Socket] = {}
        for name in OWNERS:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, ipc.INTERNAL_MAX_BYTES)
            s.connect(ipc.endpoint(rd, name))
            self.owners[name] = s
        self.subs = {name: ipc.subscriber(self.ctx, ipc.endpoint(rd, f"{name}_pub"), ("state", "event", "audit"))
                     for name in PROCESS_STATES}
        self.results_in = self.ctx.socket(zmq.PULL)
        self.results_in.setsockopt(zmq.LINGER, 0)
        self.results_in.setsockopt(zmq.RCVHWM, 100)
        self.results_in.bind(ipc.endpoint(rd, "results"))
        self.internal_pub = ipc.Publisher(self.ctx, ipc.endpoint(rd, "gateway_pub"))
        self.heartbeat = ipc.Notifier(self.ctx, ipc.endpoint(rd, "safety_in"))
        self.audit.write("start", profile=self.cfg.profile, version=VERSION, config_sha256=self.cfg.sha256)
        log.info("gateway ready: control %s, telemetry %s", b.control_endpoint, b.telemetry_endpoint)

    def close(self) -> None:
        self.audit.write("stop")
        try:
            self.auth.stop()
        except Exception:
            pass
        self.internal_pub.close()
        self.heartbeat.close()
        self.telemetry.close()
        self.ctx.destroy(linger=0)
        self.audit.close()

    # ------------------------------------------------------------------ the loop
    def _beat_if_due(self, next_hb: float) -> float:
        """Send the safety core a heartbeat (and systemd its watchdog ping) when one is due;
        the next due time."""
        now = time.monotonic()
        if now < next_hb:
            return next_hb
        self.heartbeat.send({"kind": "hb", "process": "gateway", "instance": self.instance})
        self.watchdog()
        self._expire_pending(now)
        return now + HEARTBEAT_S

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        for s in self.owners.values():
            poller.register(s, zmq.POLLIN)
        for s in self.subs.values():
            poller.register(s, zmq.POLLIN)
        poller.register(self.results_in, zmq.POLLIN)
        period = 1.0 / self.cfg.bus.status_rate_hz
        next_status = next_hb = next_keys = time.monotonic()
        while not self.stop_event.is_set():
            now = time.monotonic()
            timeout = max(0.0, min(next_status, next_hb, next_keys) - now)
            try:
                events = dict(poller.poll(int(timeout * 1000) + 1))
            except zmq.ZMQError as err:
                if err.errno == zmq.ETERM:
                    return
                raise
            try:
                # the heartbeat is checked between the drains too: a burst of publications
                # under load does not delay it past its period
                for name, s in self.subs.items():
                    if s in events:
                        self._drain(s, lambda frames, n=name: self._on_publication(n, frames))
                next_hb = self._beat_if_due(next_hb)
                for name, s in self.owners.items():
                    if s in events:
                        self._drain(s, self._on_owner_reply)
                if self.results_in in events:
                    self._drain(self.results_in, self._on_result)
                next_hb = self._beat_if_due(next_hb)
                if self.control in events:
                    self._drain(self.control, self._on_request, limit=200)
                next_hb = self._beat_if_due(next_hb)
                now = time.monotonic()
                if now >= next_keys:
                    self._check_keys()
                    next_keys = now + KEY_CHECK_S
                changed = self._status_changed()
                if now >= next_status or changed:
                    if self._ready():
                        self.telemetry.publish("status", self.status())
                    next_status = now + period
            except Exception:  # the loop outlives any single bad message
                log.exception("gateway loop: unexpected error")

    @staticmethod
    def _drain(sock: zmq.Socket, handle, limit: int = 1000) -> None:
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    # ------------------------------------------------------------------ internal traffic
    def _on_publication(self, process: str, frames) -> None:
        if len(frames) != 2:
            self.internal_dropped += 1
            return
        topic = frames[0].bytes
        body = ipc.unpack_map(frames[1].bytes)
        if body is None:
            self.internal_dropped += 1
            return
        if topic == b"state":
            self.state_at[process] = time.monotonic()
            self._note_start(process, body)
            if ipc.newer(body, self.states.get(process)):
                self.states[process] = body
        elif topic == b"event" and isinstance(body.get("kind"), str):
            self.telemetry.publish("event", body)
            # State changes and safety events go to the audit log as they come; the other
            # events (a capture, a QC) are audited by their process with the full record.
            if body["kind"] in AUDITED_EVENTS:
                self.audit.write(body["kind"], process=process, **{k: v for k, v in body.items() if k != "kind"})
        elif topic == b"audit" and isinstance(body.get("kind"), str):
            self.audit.write(body["kind"], process=process, **{k: v for k, v in body.items() if k != "kind"})
        else:
            self.internal_dropped += 1

    def _note_start(self, process: str, body: dict) -> None:
        """A process's first state after it (re)started goes to the audit log (S11, S12)."""
        rev = body.get("rev")
        started = rev[0] if isinstance(rev, list) and rev else None
        if started is None or self._started.get(process) == started:
            return
        restarted = process in self._started
        self._started[process] = started
        self.audit.write("start", process=process, restarted=restarted)
        if restarted:
            log.warning("%s restarted", process)

    def _on_result(self, frames) -> None:
        if len(frames) < 2:
            self.internal_dropped += 1
            return
        topic = frames[0].bytes
        body = ipc.unpack_map(frames[1].bytes)
        if body is None:
            self.internal_dropped += 1
            return
        if topic == b"result":
            if isinstance(body.get("roi"), dict) and self.states.get("imaging", {}).get("roi") == "auto":
                body["roi_auto"] = True
            # the same bytes to the operators and to the processes that wait for results
            _, data = self.telemetry.publish_packed("result", body)
            self.internal_pub.publish_packed("result", data)
        elif topic == b"preview" and len(frames) == 3:
            self.telemetry.publish("preview", body, [frames[2]])
        else:
            self.internal_dropped += 1

    def _on_owner_reply(self, frames) -> None:
        reply = ipc.unpack_map(frames[-1].bytes) if frames else None
        p = self.pending.pop(reply.get("id"), None) if reply is not None and isinstance(reply.get("id"), str) else None
        if p is None:
            self.internal_dropped += reply is None
            return  # a late reply to a request already answered with TIMEOUT
        if self.long_running is p:
            self.long_running = None
        if isinstance(reply.get("state"), dict) and ipc.newer(reply["state"], self.states.get(p.cmd.owner)):
            self.states[p.cmd.owner] = reply["state"]
        ok = reply.get("ok") is True
        out = {"id": p.client_id, "ok": ok}
        if ok:
            out["result"] = reply.get("result")
        else:
            err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            out["error"] = {"code": str(err.get("code", "DEVICE_ERROR")), "message": str(err.get("message", ""))}
        self._send(p.envelope, out)
        self._audit_command(p.caller, p.cmd.name, p.args, out)

    def _expire_pending(self, now: float) -> None:
        for rid, p in list(self.pending.items()):
            if now > p.deadline:
                del self.pending[rid]
                if self.long_running is p:
                    self.long_running = None
                out = bus_mod.error_reply(p.client_id, "TIMEOUT", f"{p.cmd.owner} did not answer {p.cmd.name} "
                                                                  f"within {p.cmd.reply_timeout_s:.0f} s")
                self._send(p.envelope, out)
                self._audit_command(p.caller, p.cmd.name, p.args, out)

    def _check_keys(self) -> None:
        """Keys added under keys/ work at once (the ring re-reads its folders); a key
        removed loses its telemetry too: the publisher is rebuilt, every subscriber
        reconnects, and the authenticator lets back only the keys still listed (C7)."""
        revocations = self.ring.check()
        if revocations != self._revocations:
            self._revocations = revocations
            log.warning("a key was revoked: telemetry connections are dropped and re-authenticated")
            self.telemetry.rebind()

    # ------------------------------------------------------------------ client requests
    def _send(self, envelope: list, reply: dict) -> None:
        try:
            body = bus_mod.pack(reply)
        except (TypeError, ValueError, OverflowError) as err:
            body = bus_mod.pack(bus_mod.error_reply(reply.get("id"), "DEVICE_ERROR",
                                                    f"the result could not be encoded ({type(err).__name__})"))
        try:
            self.control.send_multipart(list(envelope) + [body], zmq.NOBLOCK)
        except zmq.ZMQError as err:
            log.warning("reply not sent: %s", err)

    def _audit_command(self, caller, cmd: str, args: dict, reply: dict) -> bool:
        if cmd in ("status", "ping"):
            return True
        fields = dict(client=caller.name, role=caller.role, cmd=cmd, args=args, ok=reply["ok"],
                      result=reply.get("result") if reply["ok"] else reply["error"])
        if reply["ok"]:
            return self.audit.write("command", **fields)
        return self.audit.write_refused(caller.name, "command", **fields)

    def _on_request(self, frames) -> None:
        self.requests += 1
        envelope = [f.bytes for f in frames[:-1]]
        payload = frames[-1]
        try:
            user = payload.get("User-Id")
        except zmq.ZMQError:
            user = None
        known = self.ring.lookup(user.encode()) if isinstance(user, str) else None
        if known is None:
            return  # a key not (or no longer) listed gets no answer at all
        caller = bus_mod.Caller(*known)
        decoded = bus_mod.decode_request(payload.bytes)
        if isinstance(decoded, dict) and "error" in decoded:
            self._send(envelope, decoded)
            self.audit.write_refused(caller.name, "bad_request", client=caller.name, error=decoded["error"])
            return
        req_id, name, args = decoded
        cmd = COMMANDS.get(name)
        reply = self._refusal(caller, req_id, name, cmd, args)
        if reply is not None:
            self._send(envelope, reply)
            self._audit_command(caller, name[:64], args, reply)
            return
        if cmd.lane == "local":
            reply = {"id": req_id, "ok": True, "result": self.status() if name == "status" else self.ping()}
            self._send(envelope, reply)
            return
        # State-changing commands are written down before they run (fail closed, C6).
        if not self.audit.write("request", client=caller.name, role=caller.role, cmd=name, args=args) \
                and name not in ALWAYS:
            reply = bus_mod.error_reply(req_id, "AUDIT_UNAVAILABLE",
                                        f"{name} refused: the audit log cannot be written ({self.audit.last_error}); "
                                        "laser.off and disarm still work")
            self._send(envelope, reply)
            return
        if cmd.lane == "long":
            if self.long_running is not None:
                lr = self.long_running
                log.info("BUSY for %s (%s): %s (%s) from %s pending for %.2f s, %d pending in all", name, req_id,
                         lr.cmd.name, lr.client_id, lr.caller.name, time.monotonic() - lr.arrived, len(self.pending))
                reply = bus_mod.error_reply(req_id, "BUSY", f"{self.long_running.cmd.name} is running; try {name} "
                                                            "when it has finished")
                self._send(envelope, reply)
                self._audit_command(caller, name, args, reply)
                return
        self._n += 1
        rid = f"g{self._n}"
        now = time.monotonic()
        p = Pending(envelope, req_id, cmd, caller, args, now, now + cmd.reply_timeout_s)
        self.pending[rid] = p
        if cmd.lane == "long":
            self.long_running = p
        msg = {"id": rid, "cmd": name, "args": args, "caller": {"role": caller.role, "name": caller.name},
               "t_arrival_ns": time.time_ns(), "expires": cmd.expires}
        try:
            self.owners[cmd.owner].send(ipc.pack(msg), zmq.NOBLOCK)
        except zmq.Again:
            del self.pending[rid]
            if self.long_running is p:
                self.long_running = None
            reply = bus_mod.error_reply(req_id, "DEVICE_ERROR", f"the {cmd.owner} process is not taking "
                                                                f"requests; {name} not sent")
            self._send(envelope, reply)
            self._audit_command(caller, name, args, reply)

    def _refusal(self, caller, req_id, name: str, cmd: Command | None, args: dict) -> dict | None:
        observer_ok = cmd is not None and cmd.role == "observer"
        if not observer_ok and caller.role != "operator":
            # the role comes first: an observer learns nothing about which commands exist
            return bus_mod.error_reply(req_id, "NOT_PERMITTED",
                                       f"{name[:64]!r} is not allowed for key {caller.name!r}: it is an observer "
                                       f"(observers may call {', '.join(sorted(c for c, v in COMMANDS.items() if v.role == 'observer'))})")
        if cmd is None:
            return bus_mod.error_reply(req_id, "UNKNOWN_COMMAND",
                                       f"unknown command {name[:64]!r}; known: {', '.join(sorted(COMMANDS))}")
        if cmd.args is not None:
            extra = sorted(set(map(str, args)) - cmd.args)
            if extra:
                allowed = ", ".join(sorted(cmd.args)) or "none"
                return bus_mod.error_reply(req_id, "INVALID_ARGUMENT",
                                           f"{name}: unknown argument {extra[0][:64]!r}; allowed: {allowed}")
        if cmd.name == "sim.set" and self.cfg.profile != "sim":
            return bus_mod.error_reply(req_id, "NOT_AVAILABLE", f"sim.set exists only in the sim profile; this "
                                                                f"cart runs {self.cfg.profile!r}")
        return None

    # ------------------------------------------------------------------ answered here
    def ping(self) -> dict:
        return {"version": VERSION, "profile": self.cfg.profile,
                "uptime_s": round(time.monotonic() - self.started, 3)}

    def _ready(self, now: float | None = None) -> bool:
        """The cart is up (and its first status goes out) once the safety core and imaging
        have both reported and the safety core has heard every process it watches (so an
        ``arm`` right after the first status is not refused for a process still starting).
        After ``READY_WAIT_S`` the status goes out anyway: a process that never comes up
        is then shown as a problem instead of hiding the whole cart."""
        if self._is_ready:
            return True
        now = time.monotonic() if now is None else now
        safety = self.states.get("safety")
        heard = (safety is not None and "imaging" in self.states
                 and all(age is not None for age in (safety.get("services") or {"?": None}).values()))
        if heard or (safety is not None and now - self.started > READY_WAIT_S):
            self._is_ready = True
        return self._is_ready

    def _status_changed(self) -> bool:
        s = self.states.get("safety") or {}
        laser = s.get("laser") if isinstance(s.get("laser"), dict) else {}
        # the laser's own report that it is on (or off) goes out at once too: a display or
        # a client waiting for the light must not wait for the next periodic status
        key = (s.get("state"), tuple(f.get("code") for f in s.get("faults") or [] if isinstance(f, dict)),
               (self.states.get("study") or {}).get("case"), laser.get("on"))
        changed = key != self._last_status_key
        self._last_status_key = key
        return changed

    def status(self) -> dict:
        now = time.monotonic()
        safety = dict(self.states.get("safety") or {})
        imaging = self.states.get("imaging") or {}
        study = self.states.get("study") or {}
        ages = {n: None if n not in self.state_at else round((now - self.state_at[n]) * 1000) for n in PROCESS_STATES}
        s = {k: v for k, v in safety.items() if k not in ("emission_enabled", "power_problems", "services", "rev")}
        s.setdefault("state", "FAULT")
        s.setdefault("faults", [])
        if ages["safety"] is None or ages["safety"] > STALE_SAFETY_S * 1000:
            # A silent safety core sends the MCU no heartbeat: its watchdog has turned the
            # laser off by now (500 ms). What the core said last is history, not the state.
            s["state"] = "FAULT"
            s["faults"] = list(s["faults"]) + [{"code": "SERVICE_LOST", "message": (
                ("the safety core has not reported yet" if ages["safety"] is None
                 else f"the safety core is not reporting ({ages['safety']} ms)")
                + "; the laser controller's watchdog turns the laser off by itself")}]
            if isinstance(s.get("laser"), dict):
                s["laser"] = dict(s["laser"], on=False)
        for k in ("filter", "camera", "acquisition", "roi", "pairs"):  # not "rev"
            if k in imaging:
                s[k] = imaging[k]
        s.setdefault("acquisition", "off")
        s["case"] = study.get("case")
        s["study"] = study.get("store", {"ok": None, "error": "the study process has not reported"})
        s["profile"] = self.cfg.profile
        s["processes"] = {n: {"age_ms": ages[n]} for n in PROCESS_STATES}
        s["audit"] = {"ok": self.audit.ok, "error": self.audit.last_error}
        return s


def main(argv=None) -> int:
    p = entry.parser("NIRF cart bus gateway (control and telemetry endpoints)")
    args = p.parse_args(argv)
    entry.configure_logging("gateway")
    try:
        cfg = config_mod.load(args.config)
        state_dir, runtime_dir = cfg.state_dir(), cfg.runtime_dir()
        state_dir.mkdir(parents=True, exist_ok=True)
        gw = Gateway(cfg, state_dir=state_dir, runtime_dir=runtime_dir)
        gw.start()
    except NirfError as err:
        log.error("cannot start: %s", err)
        return 2
    except zmq.ZMQError as err:
        log.error("cannot start: %s (is another cart already running on these endpoints?)", err)
        return 2
    entry.stop_on_signals(gw.stop_event)
    sdnotify.ready()
    try:
        gw.serve()
    finally:
        sdnotify.stopping()
        gw.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
