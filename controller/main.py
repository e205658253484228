"""The safety core process: the laser MCU link, the safety inputs and indicators, the state
machine and its supervisor, and the validated power table. Nothing else.

It never touches frames, the case store or the network: the bus gateway relays operators'
commands over an internal socket (checked like network input), and the imaging process asks
for frame timing over the same socket. What it tells the others goes out on one publisher:

* ``state``: the safety part of ``status`` (10 Hz and on every change);
* ``event``: state changes, faults, safety refusals;
* ``frame``: the MCU's record of each camera trigger (counter, lit or dark, times), which
  imaging pairs frames from.

It watches two processes (PRODUCT section 3): the gateway and imaging send a heartbeat every
100 ms; when either is silent for ``services_timeout_s`` while ARMING, ARMED or EMITTING, the
laser goes off and the cart goes to FAULT ``SERVICE_LOST`` naming it. Imaging also tells the
camera's frames (at most every 100 ms), which feed the camera-stall rule (S9) only: they are
no heartbeat.

Threads: the supervisor (fixed rate, the only one that grants emission), the command server,
the notices and publications loop, and the frame-record relay. systemd's watchdog is fed from
the supervisor's healthy ticks only while all four are alive.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

import zmq

from nirf import config as config_mod
from nirf.controller import selftest
from nirf.controller.power import PowerCalibrations
from nirf.controller.cart import Cart
from nirf.controller.state import SERVICE_LOST, State
from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import DeviceError, InvalidArgument, NirfError, WrongState
from nirf.hal.threads import os_named
from nirf.services.common import entry, ipc, sdnotify

log = logging.getLogger(__name__)

VERSION = "0.2.0"
SUPERVISOR_THREAD = "nirf-supervisor"  # its OS name: the benchmark measures this thread alone (P5)
# Processes whose silence while armed turns the laser off.
WATCHED = ("gateway", "imaging")
SERVICES_TIMEOUT_S = 0.5
STATE_PERIOD_S = 0.2  # the state goes out this often, and at once on a change
STOP_LINGER_S = 0.5  # at stop, how long the last events may take to leave
FRAME_POLL_S = 0.005  # a laser driver that cannot block until input is polled this often
FRAME_WAIT_S = 0.1  # the frames thread's longest sleep (it checks for the stop this often)


class ServiceWatch:
    """Heartbeats of the processes the safety core depends on (a :meth:`Cart.add_watch`
    rule): silent for longer than ``timeout_s`` while armed is ``SERVICE_LOST``."""

    # A gap this long between two checks means the safety core itself did not run (frozen,
    # starved): heartbeats may be waiting unread, so silence is measured from the resume.
    STALL_S = 0.2

    def __init__(self, names: tuple[str, ...], timeout_s: float, clock: Clock,
                 active=lambda: False):
        self.timeout_s = timeout_s
        self.clock = clock
        self.active = active  # whether the cart is ARMING, ARMED or EMITTING now
        self.last: dict[str, float | None] = {n: None for n in names}
        self._checked: float | None = None
        # Each process names its instance in its heartbeats: a new one while armed means the
        # old one died and was restarted faster than the timeout; it lost what it knew.
        self.instance: dict[str, str] = {}
        self.restarted: set[str] = set()
        # When the reader of the heartbeats last emptied its socket. A refusal (arm,
        # fault.reset) measures silence up to then: heartbeats still waiting unread because
        # that thread did not run (the process was descheduled) are not silence. Trips keep
        # measuring up to now, so a reader that stops for good still ends in SERVICE_LOST.
        self._serviced: float | None = None

    def beat(self, name: str, instance: str | None = None) -> None:
        if name not in self.last:
            return
        if instance is not None:
            before = self.instance.get(name)
            if before is not None and before != instance and self.active():
                self.restarted.add(name)
            self.instance[name] = instance
        self.last[name] = self.clock.monotonic()

    def silent(self, now: float) -> list[tuple[str, float | None]]:
        return [(n, None if t is None else now - t) for n, t in self.last.items()
                if t is None or now - t > self.timeout_s]

    def trips(self, now: float, state: State) -> list[tuple[str, str]]:
        if self._checked is not None and now - self._checked > self.STALL_S:
            self.last = {n: (t if t is None else max(t, now - self.STALL_S)) for n, t in self.last.items()}
        self._checked = now
        restarted, self.restarted = self.restarted, set()
        return [(SERVICE_LOST, f"{name} process restarted while {state.value} (it lost what it knew)")
                for name in sorted(restarted)] + [(SERVICE_LOST, f"{name} process silent "
                 f"{'since start' if age is None else f'for {age * 1000:.0f} ms'} "
                 f"(limit {self.timeout_s * 1000:.0f} ms) while {state.value}")
                for name, age in self.silent(now)]

    def serviced(self, now: float) -> None:
        """The heartbeat reader has read everything that was waiting, at ``now``."""
        self._serviced = now

    def causes(self, now: float) -> list[str]:
        ref = now if self._serviced is None else min(now, self._serviced)
        return [f"the {name} process is not running" for name, _ in self.silent(ref)]

    def ages_ms(self) -> dict:
        now = self.clock.monotonic()
        return {n: None if t is None else round((now - t) * 1000) for n, t in self.last.items()}


# ---------------------------------------------------------------------- devices
def _serial_factory(port: str, baudrate: int):
    import serial

    def open_port():
        try:
            return serial.Serial(port, baudrate, timeout=0.05, write_timeout=0.5)
        except (serial.SerialException, OSError) as err:
            raise DeviceError("serial", f"cannot open {port}: {err}") from err

    return open_port


def pins(cfg) -> dict:
    g = cfg.gpio
    return {"key": g.key_pin, "interlock": g.interlock_pin, "footswitch": g.footswitch_pin,
            "indicator": g.indicator_pin, "white_light": g.white_light_pin}


def wait_hardware_info(runtime_dir: Path, wait_s: float = 15.0) -> dict:
    """The simulated hardware's ports and sockets, once its process has written them."""
    info_path = Path(runtime_dir) / "hardware.json"
    deadline = time.monotonic() + wait_s
    while not info_path.exists():
        if time.monotonic() > deadline:
            raise DeviceError("sim-hardware", f"the simulated hardware did not start within {wait_s} s "
                                              f"(no {info_path})")
        time.sleep(0.05)
    return json.loads(info_path.read_text())


def remote_world(cfg, runtime_dir: Path, topics: tuple[str, ...] | None = None):
    """The simulated world as this process sees it; ``topics``: the world's publications it
    follows (None: all)."""
    from nirf.sim.remote import RemoteWorldView
    from nirf.sim.world import SensorModel

    info = wait_hardware_info(runtime_dir)
    cam = cfg.camera
    sensor = SensorModel(width=cam.width, height=cam.height, bits=cam.bits, black_level=cam.black_level)
    return RemoteWorldView(info["world_pub"], info["world_ctl"], sensor, topics=topics), info


def build_devices(cfg, runtime_dir: Path):
    """(laser, safety io, world or None) for the profile."""
    from nirf.drivers.gpio import GpioSafetyIO
    from nirf.drivers.laser_mcu import McuLaser

    world = None
    if cfg.profile == "sim":
        from nirf.sim.gpio_standin import GpioStandIn

        world, info = remote_world(cfg, runtime_dir, topics=("inputs", "values"))
        laser_port = _serial_factory(info["mcu_port"], cfg.laser.baudrate)
        gpio = GpioStandIn(world, pins(cfg))
    else:
        from nirf.drivers.gpio import import_rpi_gpio

        if not cfg.laser.port:
            raise config_mod.ConfigError(f"{cfg.source}: [laser] port must be set in the device profile")
        laser_port = _serial_factory(cfg.laser.port, cfg.laser.baudrate)
        gpio = import_rpi_gpio()
    laser = McuLaser(laser_port, timeout_s=cfg.laser.command_timeout_s, retries=cfg.laser.command_retries,
                     heartbeat_timeout_ms=cfg.safety.heartbeat_timeout_ms)
    io = GpioSafetyIO(gpio, pins(cfg), debounce_ms=cfg.gpio.debounce_ms)
    return laser, io, world


# ---------------------------------------------------------------------- the process
class SafetyCore:
    def __init__(self, cfg, laser, io, *, state_dir: Path, runtime_dir: Path, world=None,
                 clock: Clock | None = None, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.laser, self.io, self.world = laser, io, world
        self.state_dir, self.runtime_dir = Path(state_dir), Path(runtime_dir)
        self.clock = clock or SystemClock()
        self.started = time.monotonic()
        self.stop_event = threading.Event()
        self.power = PowerCalibrations(cfg, self.state_dir, self.clock,
                                       on_change=lambda body: self._publish_event(body))
        # the S7a emission budget is kept in the state folder so it survives a restart
        self.cart = Cart(cfg, laser=laser, wheel=None, inputs=io, indicators=io, clock=self.clock,
                         calibration=self.power.load(),
                         budget_path=self.state_dir / "safety" / "emission_budget.json")
        self.watch = ServiceWatch(WATCHED, SERVICES_TIMEOUT_S, self.clock, active=lambda: self.cart.state.active)
        self.cart.add_watch(self.watch)
        self._events: queue.Queue = queue.Queue(maxsize=1000)
        self.cart.add_listener(self._on_cart_event)
        self.watchdog = sdnotify.WatchdogPinger(clock=self.clock)
        self.ctx = ctx or zmq.Context()
        self.notices_bad = 0
        self._camera_instance: str | None = None  # the imaging process whose camera is watched
        self._rev = ipc.Revision()
        self._threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = os.pipe()  # wakes the notices loop (see _wake_notices)
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.cart.on_status_change = self._wake_notices

    # -- commands (all quick; the long ones live elsewhere)
    def handlers(self) -> dict:
        c = self.cart
        return {
            "ping": lambda a, who: {"version": VERSION, "uptime_s": round(time.monotonic() - self.started, 3)},
            "safety.status": lambda a, who: self.state_snapshot(),
            "arm": lambda a, who: _noargs(a, "arm") or c.arm(),
            "disarm": lambda a, who: _noargs(a, "disarm") or c.disarm(),
            "laser.on": lambda a, who: c.laser_on(_power(a)),
            "laser.set": lambda a, who: c.laser_set(_power(a)),
            "laser.off": lambda a, who: _noargs(a, "laser.off") or c.laser_off(),
            "fault.reset": lambda a, who: _noargs(a, "fault.reset") or c.fault_reset(),
            "calibrate.power": lambda a, who: self.power.command(a, who, self.cart),
            "frames.start": self.cmd_frames_start,
            "frames.stop": lambda a, who: self.laser.stop_frames() or {"frame_timing": False},
            "light.white": self.cmd_white_light,
            "safety.selftest": self.cmd_selftest,
        }

    def cmd_frames_start(self, args, who) -> dict:
        _only(args, {"fps", "exposure_us", "modulate"}, "frames.start")
        fps, exposure, modulate = args.get("fps"), args.get("exposure_us"), args.get("modulate", False)
        if not ipc.finite_number(fps) or not isinstance(exposure, int) or isinstance(exposure, bool) \
                or not isinstance(modulate, bool):
            raise InvalidArgument("frames.start needs fps (number), exposure_us (int) and modulate (bool)")
        self.laser.start_frames(float(fps), exposure, modulate)
        return {"frame_timing": True, "fps": fps, "exposure_us": exposure, "modulate": modulate}

    def cmd_white_light(self, args, who) -> dict:
        _only(args, {"on"}, "light.white")
        if not isinstance(args.get("on"), bool):
            raise InvalidArgument("light.white needs on: true or false")
        self.io.set_white_light(args["on"])
        return {"white_light": args["on"]}

    def cmd_selftest(self, args, who) -> dict:
        _noargs(args, "safety.selftest")
        if self.cart.state is not State.SAFE:
            raise WrongState(f"selftest needs state SAFE; state is {self.cart.state.value}")
        return {"laser-mcu": selftest._check("laser", lambda: selftest.check_laser(self.laser, self.cfg.laser.max_temp_c)),
                "gpio": selftest._check("gpio", lambda: selftest.check_gpio(self.io))}

    # -- what the others learn
    def state_snapshot(self) -> dict:
        s = self.cart.safety_status()
        s["rev"] = self._rev.next()
        s["emission_enabled"] = self.cart.emission_enabled
        s["power_calibration"] = self.cart.calibration.calibration_id
        s["power_problems"] = list(self.power.problems) + list(self.cart.calibration_problems)
        s["services"] = self.watch.ages_ms()
        if self.world is not None:
            s["sim"] = self.world.values
        return s

    def _on_cart_event(self, kind: str, detail: dict) -> None:
        try:
            self._events.put_nowait((kind, detail))
            self._wake_notices()
        except queue.Full:
            pass

    def _publish_event(self, body: dict) -> None:
        self.pub.publish("event", body)
        if body.get("kind") not in ("state", "fault", "safety", "info", "input"):
            self.pub.publish("audit", body)

    # -- threads
    def _notices_loop(self) -> None:
        """Heartbeats and camera notices in; state and events out. It sleeps until a notice
        comes, the cart reports an event or an MCU status reading that changed what status
        shows (the wake pipe), or the periodic state is due (STATE_PERIOD_S); the state is
        built and compared only then, not for every notice."""
        poller = zmq.Poller()
        poller.register(self.notices, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        last_state = -1e9  # when the state last went out
        last = None
        while not self.stop_event.is_set():
            try:
                now = time.monotonic()
                due_at = last_state + STATE_PERIOD_S
                ready = dict(poller.poll(max(1, int((due_at - now) * 1000) + 1) if due_at > now else 0))
                if self.notices in ready:
                    while True:
                        try:
                            data = self.notices.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_notice(ipc.unpack_map(data))
                self.watch.serviced(self.clock.monotonic())
                woken = self._wake_r in ready
                if woken:
                    try:
                        while os.read(self._wake_r, 256):
                            pass
                    except BlockingIOError:
                        pass
                changed = False
                while True:
                    try:
                        kind, detail = self._events.get_nowait()
                    except queue.Empty:
                        break
                    changed = True
                    if kind in ("state", "fault", "safety", "info", "input"):
                        self._publish_event({"kind": kind, **detail})
                now = time.monotonic()
                due = now >= last_state + STATE_PERIOD_S
                if not (changed or woken or due):
                    continue
                snap = self.state_snapshot()
                key = {k: v for k, v in snap.items() if k not in ("services", "sim", "rev", "heartbeat")}
                # On every change of what status shows (a tick after laser.on the MCU reports
                # its output on), and about every STATE_PERIOD_S whatever happens.
                if changed or key != last or due:
                    self.pub.publish("state", snap)
                    last_state = now
                    last = key
            except zmq.ZMQError as err:
                if err.errno == zmq.ETERM:
                    return
                log.exception("notices loop")
            except Exception:
                log.exception("notices loop: unexpected error")

    def _publish_pending_events(self) -> None:
        """Publish the queued cart events and a last state (only once the notices thread has
        ended: the publisher socket is not shared between threads)."""
        try:
            while True:
                try:
                    kind, detail = self._events.get_nowait()
                except queue.Empty:
                    break
                if kind in ("state", "fault", "safety", "info", "input"):
                    self._publish_event({"kind": kind, **detail})
            self.pub.publish("state", self.state_snapshot())
        except (zmq.ZMQError, NirfError) as err:
            log.warning("last events at stop not published: %s", err)

    def _wake_notices(self) -> None:
        """Tell the notices loop something may have changed (a cart event, a status read)."""
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already

    def _on_notice(self, msg: dict | None) -> None:
        kind = msg.get("kind") if msg else None
        instance = msg.get("instance") if msg and isinstance(msg.get("instance"), str) else None
        from_imaging = kind == "camera" or (kind == "hb" and msg.get("process") == "imaging")
        if from_imaging and instance is not None and instance != self._camera_instance:
            # A new imaging process: the stream the old one watched died with it. Until the
            # new one starts its own, there is no camera to wait for (else a reset would be
            # refused for ever: "camera still delivers no frames").
            if self._camera_instance is not None:
                self.cart.note_camera(False)
            self._camera_instance = instance
        if kind == "hb" and isinstance(msg.get("process"), str):
            self.watch.beat(msg["process"], instance)
        elif kind == "camera" and isinstance(msg.get("watching"), bool):
            # Not a heartbeat: the acquisition thread sends these, and frames still coming
            # say nothing of imaging's other threads (its heartbeat stops when one died).
            self.cart.note_camera(msg["watching"], self.clock.monotonic() if msg.get("frame") is True else None)
        else:
            self.notices_bad += 1

    def _frames_loop(self) -> None:
        """The MCU's frame records (and its other notices), relayed to imaging as they come:
        the thread sleeps until the MCU sends something (the port's descriptor, see
        ``McuLaser.wait_input``), at most FRAME_WAIT_S. An input edge, a fault or a reset the
        MCU reports wakes the supervisor for an immediate status read."""
        wait = getattr(self.laser, "wait_input", None)
        while not self.stop_event.is_set():
            if wait is not None:
                wait(FRAME_WAIT_S)
            elif self.stop_event.wait(FRAME_POLL_S):
                return
            try:
                tags, notices = self.laser.poll()
            except NirfError:
                continue  # the supervisor handles a failed link
            except Exception:
                log.exception("frame relay: poll failed")
                continue
            for t in tags:
                self.pub.publish("frame", {"counter": t.counter, "lit": t.lit, "mcu_time_us": t.mcu_time_us,
                                           "host_time_ns": t.host_time_ns})
            for n in notices:
                self.pub.publish("notice", {"kind": n.kind, "detail": list(n.detail)})
            self.cart.on_mcu_notices(notices)

    def threads_alive(self) -> bool:
        return all(t.is_alive() for t in self._threads) and self.server.worker_alive()

    def _healthy_tick(self) -> None:
        # the threads are looked at only when a ping is due (a few times per watchdog period)
        if self.watchdog.due() and self.threads_alive():
            self.watchdog()

    def start(self) -> None:
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.pub = ipc.Publisher(self.ctx, ipc.endpoint(self.runtime_dir, "safety_pub"))
        self.notices = self.ctx.socket(zmq.PULL)
        self.notices.setsockopt(zmq.LINGER, 0)
        self.notices.setsockopt(zmq.MAXMSGSIZE, 4096)
        self.notices.bind(ipc.endpoint(self.runtime_dir, "safety_in"))
        self.server = ipc.InternalServer(self.ctx, ipc.endpoint(self.runtime_dir, "safety"), self.handlers(),
                                         clock=self.clock, name="safety", state=self.state_snapshot)
        self.cart.start()
        self.cart.tick()
        self._threads = [
            threading.Thread(target=os_named(SUPERVISOR_THREAD, self.cart.run), args=(self.stop_event,),
                             kwargs={"on_healthy_tick": self._healthy_tick}, name="supervisor", daemon=True),
            threading.Thread(target=os_named("nirf-commands", self.server.serve), args=(self.stop_event,),
                             name="commands", daemon=True),
            threading.Thread(target=os_named("nirf-notices", self._notices_loop), name="notices", daemon=True),
            threading.Thread(target=os_named("nirf-mcu-frames", self._frames_loop), name="frames", daemon=True),
        ]
        for t in self._threads:
            t.start()
        log.info("safety core ready (state %s)", self.cart.state.value)

    def stop(self) -> None:
        self.stop_event.set()
        self.server.wake()  # the command thread sees the stop now
        self.cart.wake()  # the supervisor sees the stop now, not at its next tick
        for t in self._threads:
            t.join(timeout=3.0)
        try:
            self.laser.stop_frames()
        except NirfError:
            pass
        self.cart.shutdown()
        # The threads are gone: what the shutdown reported (EMITTING -> SAFE, "shutdown") goes
        # out from here, and the socket lingers long enough for the gateway to get it.
        self._publish_pending_events()
        try:
            self.io.close()
        except NirfError:
            log.exception("gpio close")
        self.server.close()
        self.pub.close(linger_s=STOP_LINGER_S)
        self.notices.close(linger=0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.world is not None:
            self.world.close()
        self.ctx.destroy(linger=0)


def _only(args: dict, allowed: set, cmd: str) -> None:
    extra = sorted(set(map(str, args)) - allowed)
    if extra:
        raise InvalidArgument(f"{cmd}: unknown argument {extra[0]!r}; allowed: {', '.join(sorted(allowed)) or 'none'}")


def _noargs(args: dict, cmd: str) -> None:
    if args:
        raise InvalidArgument(f"{cmd} takes no arguments, got {', '.join(sorted(map(str, args)))}")


def _power(args: dict):
    _only(args, {"power_mw"}, "laser")
    if "power_mw" not in args:
        raise InvalidArgument("power_mw is required (a number of milliwatts)")
    return args["power_mw"]


def main(argv=None) -> int:
    p = entry.parser("NIRF cart safety core (laser, safety inputs, state machine)")
    args = p.parse_args(argv)
    entry.configure_logging("safety")
    try:
        cfg = config_mod.load(args.config)
        state_dir, runtime_dir = cfg.state_dir(), cfg.runtime_dir()
        state_dir.mkdir(parents=True, exist_ok=True)
        laser, io, world = build_devices(cfg, runtime_dir)
        core = SafetyCore(cfg, laser, io, state_dir=state_dir, runtime_dir=runtime_dir, world=world)
        core.start()
    except NirfError as err:
        log.error("cannot start: %s", err)
        return 2
    except zmq.ZMQError as err:
        log.error("cannot start: %s (is another cart already running in %s?)", err, os.environ.get(
            "NIRF_RUNTIME_DIR", "this runtime folder"))
        return 2
    entry.stop_on_signals(core.stop_event)
    sdnotify.ready()
    sdnotify.status(f"state {core.cart.state.value}")
    try:
        while not core.stop_event.wait(0.5):
            pass
    finally:
        sdnotify.stopping()
        core.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
