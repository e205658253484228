"""The controller process: owns the hardware, runs the safety supervisor, serves the
control and telemetry endpoints and streams frame pairs to the processing service.

Threads: the supervisor loop (the safety decision, fixed rate); the command server (one
request at a time); the status publisher (2 Hz and on every change); the result relay
(results and previews from the processing service onto the telemetry endpoint); the
acquisition (camera frames). Only the supervisor decides whether light may be emitted.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

import zmq

import config as config_mod
from controller.acquisition import Acquisition
from controller.cart import Cart
from controller.state import State
from hal.camera import CameraSettings
from hal.clock import SystemClock
from hal.errors import ConfigError, DeviceDisconnected, DeviceError, InvalidArgument, NirfError, NotAvailable, WrongState
from services import bus as bus_mod
from services import entry
from services import keys as keys_mod
from services import sdnotify
from services.audit import AuditLog

log = logging.getLogger(__name__)

VERSION = "0.1.0"
SITES = ("gross_tumor", "tumor_bed", "specimen_cross_section")


# ---------------------------------------------------------------------- devices per profile
class Devices:
    """The device objects a profile picks. The controller sees only the hal interfaces."""

    def __init__(self, laser, wheel, io, camera, world=None):
        self.laser, self.wheel, self.io, self.camera, self.world = laser, wheel, io, camera, world


def _serial_factory(port: str, baudrate: int):
    import serial

    def open_port():
        try:
            return serial.Serial(port, baudrate, timeout=0.05, write_timeout=0.5)
        except (serial.SerialException, OSError) as err:
            raise DeviceError("serial", f"cannot open {port}: {err}") from err

    return open_port


def build_sim_devices(cfg, runtime_dir: Path, wait_s: float = 15.0) -> Devices:
    from drivers.camera import PiCamera
    from drivers.fw102c import Fw102cWheel
    from drivers.gpio import GpioSafetyIO
    from drivers.laser_mcu import McuLaser
    from sim.gpio_standin import GpioStandIn
    from sim.picamera2_standin import Picamera2StandIn
    from sim.remote import RemoteWorldView
    from sim.world import SensorModel

    info_path = runtime_dir / "hardware.json"
    deadline = time.monotonic() + wait_s
    while not info_path.exists():
        if time.monotonic() > deadline:
            raise DeviceError("sim-hardware", f"the simulated hardware did not start within {wait_s} s "
                                              f"(no {info_path})")
        time.sleep(0.05)
    info = json.loads(info_path.read_text())
    cam = cfg.camera
    sensor = SensorModel(width=cam.width, height=cam.height, bits=cam.bits, black_level=cam.black_level)
    world = RemoteWorldView(info["world_pub"], info["world_ctl"], sensor)
    return _build_common(cfg, world=world,
                         laser_port=_serial_factory(info["mcu_port"], cfg.laser.baudrate),
                         wheel_port=_serial_factory(info["wheel_port"], cfg.filter_wheel.baudrate),
                         gpio=GpioStandIn(world, _pins(cfg)),
                         camera_factory=lambda: Picamera2StandIn(world, seed=cfg.sim.seed),
                         classes=(McuLaser, Fw102cWheel, GpioSafetyIO, PiCamera))


def build_device_devices(cfg) -> Devices:
    from drivers.camera import PiCamera, picamera2_factory
    from drivers.fw102c import Fw102cWheel
    from drivers.gpio import GpioSafetyIO, import_rpi_gpio
    from drivers.laser_mcu import McuLaser

    if not cfg.laser.port or not cfg.filter_wheel.port:
        raise ConfigError(f"{cfg.source}: [laser] port and [filter_wheel] port must be set in the device profile")
    return _build_common(cfg, world=None,
                         laser_port=_serial_factory(cfg.laser.port, cfg.laser.baudrate),
                         wheel_port=_serial_factory(cfg.filter_wheel.port, cfg.filter_wheel.baudrate),
                         gpio=import_rpi_gpio(), camera_factory=picamera2_factory,
                         classes=(McuLaser, Fw102cWheel, GpioSafetyIO, PiCamera))


def _pins(cfg) -> dict:
    g = cfg.gpio
    return {"key": g.key_pin, "interlock": g.interlock_pin, "footswitch": g.footswitch_pin,
            "indicator": g.indicator_pin, "white_light": g.white_light_pin}


def _build_common(cfg, *, world, laser_port, wheel_port, gpio, camera_factory, classes) -> Devices:
    McuLaser, Fw102cWheel, GpioSafetyIO, PiCamera = classes
    laser = McuLaser(laser_port, timeout_s=cfg.laser.command_timeout_s, retries=cfg.laser.command_retries,
                     heartbeat_timeout_ms=cfg.safety.heartbeat_timeout_ms)
    wheel = Fw102cWheel(wheel_port, move_timeout_s=cfg.filter_wheel.move_timeout_s)
    io = GpioSafetyIO(gpio, _pins(cfg), debounce_ms=cfg.gpio.debounce_ms)
    camera = PiCamera(camera_factory, bits=cfg.camera.bits, black_level=cfg.camera.black_level,
                      colour=cfg.camera.colour, stall_timeout_s=cfg.safety.camera_stall_s)
    return Devices(laser, wheel, io, camera, world)


# ---------------------------------------------------------------------- the service
class ControllerService:
    def __init__(self, cfg, devices: Devices, *, state_dir: Path, runtime_dir: Path, clock=None):
        self.cfg = cfg
        self.devices = devices
        self.state_dir = Path(state_dir)
        self.runtime_dir = Path(runtime_dir)
        self.clock = clock or SystemClock()
        self.started_monotonic = time.monotonic()
        self.stop_event = threading.Event()
        self.audit = AuditLog(self.state_dir / "audit.jsonl")
        # the S7a emission budget is kept in the state folder so it survives a restart
        self.cart = Cart(cfg, laser=devices.laser, wheel=devices.wheel, inputs=devices.io,
                         indicators=devices.io, clock=self.clock,
                         budget_path=self.state_dir / "safety" / "emission_budget.json")
        self._changes: queue.Queue = queue.Queue(maxsize=1000)
        self.cart.add_listener(self._on_cart_event)
        fw = cfg.filter_wheel
        self.filter_names = {fw.emission_position: "icg_emission", fw.open_position: "open",
                             fw.blocked_position: "blocked"}
        self.filter = {"position": None, "name": None, "moving": False}
        cam = cfg.camera
        self.camera_settings = CameraSettings(cam.exposure_us, cam.gain, cam.width, cam.height)
        self.acquisition = Acquisition(
            devices.camera, devices.laser, clock=self.clock, on_pair=self._send_pair,
            laser_mw=self._lit_power_mw, on_liveness=self.cart.note_camera,
            stall_timeout_s=cfg.safety.camera_stall_s,
            filter_position=lambda: self.filter["position"] or 0)
        self.fps = cam.fps
        p = cfg.processing
        self.roi: dict | str = ({"signal": list(p.signal_roi), "background": list(p.background_roi)}
                                if p.signal_roi and p.background_roi else "auto")
        self.roi_version = 1
        self.last_result: dict | None = None
        self._result_cond = threading.Condition()
        self._results_seen = 0
        self.case_id: str | None = None
        self.handlers = self._handlers()
        # systemd's watchdog, fed from the supervisor's healthy ticks only (no-op off systemd)
        self.watchdog = sdnotify.WatchdogPinger(clock=self.clock)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        keys_mod.ensure_sim_keys(self.state_dir) if self.cfg.profile == "sim" else None
        self.ctx = zmq.Context()
        self.ring = keys_mod.KeyRing(self.state_dir)
        self.auth = keys_mod.start_authenticator(self.ctx, self.ring)
        server_keys = keys_mod.load_server_keys(self.state_dir)
        b = self.cfg.bus
        self.telemetry = bus_mod.Telemetry(self.ctx, b.telemetry_endpoint, server_keys)
        self.server = bus_mod.CommandServer(self.ctx, b.control_endpoint, server_keys, self.ring, self.handlers,
                                            max_message_bytes=b.max_message_bytes, audit=self.audit)
        # calibration procedures and the stored calibrations in use (services/calibration_service.py)
        from services.calibration_service import Calibration
        self.calibration = Calibration(self)
        self.server.handlers.update(self.calibration.handlers())
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.frames_out = self.ctx.socket(zmq.PUB)
        self.frames_out.setsockopt(zmq.LINGER, 0)
        self.frames_out.setsockopt(zmq.SNDHWM, 8)  # live path: a slow consumer loses old pairs (~40 MB at full size)
        self.frames_out.bind(f"ipc://{self.runtime_dir / 'frames.ipc'}")
        self.results_in = self.ctx.socket(zmq.PULL)
        self.results_in.setsockopt(zmq.LINGER, 0)
        self.results_in.setsockopt(zmq.RCVHWM, 100)
        self.results_in.bind(f"ipc://{self.runtime_dir / 'results.ipc'}")
        self._frames_lock = threading.Lock()
        from services.clinical import Clinical  # cases, captures and the recorder (issue 8)
        self.clinical = Clinical(self)
        self.server.handlers.update(self.clinical.handlers())

        self.cart.start()
        self.cart.tick()
        try:
            self.filter["position"] = self.devices.wheel.position()
            self.filter["name"] = self._filter_name(self.filter["position"])
        except DeviceError as err:
            log.error("filter wheel: %s", err)
        try:
            self.acquisition.configure(self.camera_settings, self.fps)
        except NirfError as err:
            log.error("camera: %s", err)
        self.audit.write("start", profile=self.cfg.profile, version=VERSION, config_sha256=self.cfg.sha256)
        self._threads = [
            threading.Thread(target=self.cart.run, args=(self.stop_event,), kwargs={"on_healthy_tick": self.watchdog},
                             name="supervisor", daemon=True),
            threading.Thread(target=self.server.serve, args=(self.stop_event,), name="commands", daemon=True),
            threading.Thread(target=self._status_loop, name="status", daemon=True),
            threading.Thread(target=self._relay_loop, name="results", daemon=True),
        ]
        for t in self._threads:
            t.start()
        log.info("controller ready: control %s, telemetry %s", self.cfg.bus.control_endpoint,
                 self.cfg.bus.telemetry_endpoint)

    def stop(self) -> None:
        self.stop_event.set()
        try:
            self.acquisition.stop()
        except NirfError:
            log.exception("stopping acquisition")
        for t in getattr(self, "_threads", []):
            t.join(timeout=3.0)
        self.cart.shutdown()
        self.audit.write("stop")
        self.clinical.close()
        try:
            self.auth.stop()
        except Exception:
            pass
        self.ctx.destroy(linger=0)
        if self.devices.world is not None:
            self.devices.world.close()
        self.audit.close()

    # ------------------------------------------------------------------ events and status
    def _on_cart_event(self, kind: str, detail: dict) -> None:
        try:
            self._changes.put_nowait((kind, detail))
        except queue.Full:
            pass

    def status(self) -> dict:
        s = self.cart.safety_status()
        cam = self.acquisition.camera.settings if self.acquisition else self.camera_settings
        s.update({
            "filter": dict(self.filter),
            "camera": {"streaming": self.acquisition.mode != "off", "fps": round(self.acquisition.measured_fps, 2)
                       if self.acquisition.mode != "off" else 0.0, "set_fps": self.fps,
                       "exposure_us": cam.exposure_us, "gain": cam.gain,
                       "width": cam.width, "height": cam.height},
            "acquisition": self.acquisition.mode,
            "case": self.clinical.current_case_id(),
            "profile": self.cfg.profile,
            "roi": self.roi,
            "pairs": {"sent": self.acquisition.pairs, "incomplete": self.acquisition.pairs_incomplete},
        })
        if self.devices.world is not None:
            s["sim"] = self.devices.world.values
        return s

    def _status_loop(self) -> None:
        period = 1.0 / self.cfg.bus.status_rate_hz
        next_t = 0.0
        while not self.stop_event.is_set():
            try:
                kind, detail = self._changes.get(timeout=max(0.0, min(period, next_t - time.monotonic())))
            except queue.Empty:
                kind = None
            if kind is not None:
                if kind in ("state", "fault", "safety", "info"):
                    self.telemetry.publish("event", {"kind": kind, **detail})
                    self.audit.write(kind, **detail)
                if kind == "input":
                    self.audit.write("input", **detail)
                # drain what else queued up, then publish one status
                while True:
                    try:
                        k2, d2 = self._changes.get_nowait()
                    except queue.Empty:
                        break
                    if k2 in ("state", "fault", "safety", "info"):
                        self.telemetry.publish("event", {"kind": k2, **d2})
                        self.audit.write(k2, **d2)
                    elif k2 == "input":
                        self.audit.write("input", **d2)
            if kind is not None or time.monotonic() >= next_t:
                try:
                    self.telemetry.publish("status", self.status())
                except Exception:
                    log.exception("status publish failed")
                next_t = time.monotonic() + period

    # ------------------------------------------------------------------ frames and results
    def _lit_power_mw(self) -> float:
        c = self.cart
        return c.setpoint_mw if c.state is State.EMITTING and c.emission_enabled else 0.0

    def _send_pair(self, on, off) -> None:
        header = {
            "frame_seq": on.meta.mcu_frame,
            "on": _meta(on.meta), "off": _meta(off.meta),
            "roi": self.roi, "roi_version": self.roi_version,
            "threshold": self.cfg.processing.sbr_threshold,
            # every result records the calibration; processing applies the named flat field
            "calibration_id": self.calibration.current_id(),
            "flat_field": self.calibration.flat_field_file(),
        }
        self.calibration.on_pair(on, off, header)  # the flat-field procedure's tap
        self.clinical.on_pair(on, off, header)  # to the recorder while a capture collects
        with self._frames_lock:
            try:
                self.frames_out.send_multipart([b"pair", bus_mod.pack(header), on.data, off.data],
                                               zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass

    def _relay_loop(self) -> None:
        while not self.stop_event.is_set():
            if not self.results_in.poll(100):
                continue
            frames = self.results_in.recv_multipart()
            topic = frames[0].decode("ascii", "replace")
            try:
                body = bus_mod.unpack(frames[1])
            except ValueError:
                continue
            if topic == "result":
                if isinstance(body.get("roi"), dict) and self.roi == "auto":
                    body["roi_auto"] = True
                msg = self.telemetry.publish("result", body)
                with self._result_cond:
                    self.last_result = msg
                    self._results_seen += 1
                    self._result_cond.notify_all()
            elif topic == "preview":
                self.telemetry.publish("preview", body, frames[2:3])

    def wait_results(self, count: int, timeout_s: float, valid_only: bool = True) -> list[dict]:
        """The next ``count`` results (valid ones only by default) published after now."""
        got: list[dict] = []
        deadline = time.monotonic() + timeout_s
        with self._result_cond:
            seen = self._results_seen
            while len(got) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._result_cond.wait(remaining)
                if self._results_seen != seen:
                    seen = self._results_seen
                    r = self.last_result
                    if r is not None and (r.get("valid") or not valid_only):
                        got.append(r)
        return got

    # ------------------------------------------------------------------ commands
    def _handlers(self) -> dict:
        return {
            "ping": self.cmd_ping, "status": lambda a, c: self.status(),
            "arm": lambda a, c: self._noargs(a, "arm") or self.cart.arm(),
            "disarm": lambda a, c: self._noargs(a, "disarm") or self.cart.disarm(),
            "laser.on": lambda a, c: self.cart.laser_on(self._power(a)),
            "laser.set": lambda a, c: self.cart.laser_set(self._power(a)),
            "laser.off": lambda a, c: self._noargs(a, "laser.off") or self.cart.laser_off(),
            "fault.reset": lambda a, c: self._noargs(a, "fault.reset") or self.cart.fault_reset(),
            "filter.move": self.cmd_filter_move,
            "camera.set": self.cmd_camera_set,
            "acquire.start": self.cmd_acquire_start,
            "acquire.stop": self.cmd_acquire_stop,
            "roi.set": self.cmd_roi_set,
            "sim.set": self.cmd_sim_set,
            "selftest": self.cmd_selftest,
        }

    @staticmethod
    def _noargs(args: dict, cmd: str) -> None:
        if args:
            raise InvalidArgument(f"{cmd} takes no arguments, got {', '.join(sorted(map(str, args)))}")

    @staticmethod
    def _power(args: dict) -> float:
        _only(args, {"power_mw"}, "laser")
        if "power_mw" not in args:
            raise InvalidArgument("power_mw is required (a number of milliwatts)")
        return args["power_mw"]

    def cmd_ping(self, args, caller) -> dict:
        return {"version": VERSION, "profile": self.cfg.profile,
                "uptime_s": round(time.monotonic() - self.started_monotonic, 3)}

    def _filter_name(self, position: int | None) -> str | None:
        if position is None:
            return None
        return self.filter_names.get(position, f"spare{position}")

    def _move_filter(self, position: int) -> dict:
        self.filter["moving"] = True
        try:
            try:
                reached = self.devices.wheel.move(position)
            except DeviceDisconnected:
                # the port came back under the same name (USB re-enumeration): reopen once
                self.devices.wheel.connect()
                reached = self.devices.wheel.move(position)
        finally:
            self.filter["moving"] = False
        self.filter.update(position=reached, name=self._filter_name(reached))
        return {"position": reached, "name": self.filter["name"]}

    def cmd_filter_move(self, args, caller) -> dict:
        _only(args, {"position", "name"}, "filter.move")
        if ("position" in args) == ("name" in args):
            raise InvalidArgument("filter.move needs exactly one of position (int) or name (str)")
        if "name" in args:
            by_name = {v: k for k, v in self.filter_names.items()}
            if not isinstance(args["name"], str) or args["name"] not in by_name:
                raise InvalidArgument(f"filter name {args['name']!r}: known {', '.join(sorted(by_name))}")
            position = by_name[args["name"]]
        else:
            position = args["position"]
        return self._move_filter(position)

    def cmd_camera_set(self, args, caller) -> dict:
        _only(args, {"exposure_us", "gain", "fps"}, "camera.set")
        cur = self.acquisition.camera.settings
        exposure = args.get("exposure_us", cur.exposure_us)
        gain = args.get("gain", cur.gain)
        fps = args.get("fps", self.fps)
        if isinstance(exposure, bool) or not isinstance(exposure, int):
            raise InvalidArgument(f"exposure_us {exposure!r} is not a whole number of microseconds")
        if isinstance(gain, bool) or not isinstance(gain, (int, float)):
            raise InvalidArgument(f"gain {gain!r} is not a number")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 1.0 <= fps <= 60.0:
            raise InvalidArgument(f"fps {fps!r} outside 1-60")
        settings = CameraSettings(exposure, float(gain), cur.width, cur.height).validated()
        applied = self.acquisition.configure(settings, float(fps))
        self.fps = float(fps)
        self.camera_settings = applied
        return {"exposure_us": applied.exposure_us, "gain": applied.gain, "fps": self.fps}

    def cmd_acquire_start(self, args, caller) -> dict:
        _only(args, {"mode"}, "acquire.start")
        mode = args.get("mode")
        fw = self.cfg.filter_wheel
        positions = {"fluorescence": fw.emission_position, "white": fw.open_position, "dark": fw.blocked_position}
        if not isinstance(mode, str) or mode not in positions:
            raise InvalidArgument(f"mode {mode!r}: allowed fluorescence, white, dark")
        if mode == "fluorescence" and self.cart.state is not State.EMITTING:
            raise WrongState(f"fluorescence acquisition needs state EMITTING, state is {self.cart.state.value}")
        self._move_filter(positions[mode])
        self.devices.io.set_white_light(mode == "white")
        self.acquisition.start(mode)
        return {"mode": mode, "filter": dict(self.filter)}

    def cmd_acquire_stop(self, args, caller) -> dict:
        self._noargs(args, "acquire.stop")
        self.acquisition.stop()
        self.devices.io.set_white_light(False)
        return {"mode": "off"}

    def cmd_roi_set(self, args, caller) -> dict:
        _only(args, {"signal", "background", "auto"}, "roi.set")
        cam = self.acquisition.camera.settings
        if args.get("auto") is True and not ({"signal", "background"} & set(args)):
            self.roi = "auto"
        elif "auto" in args and args["auto"] is not False:
            raise InvalidArgument("roi.set: give auto: true alone, or signal and background boxes")
        else:
            if not {"signal", "background"} <= set(args):
                raise InvalidArgument("roi.set needs signal and background as [x, y, w, h], or auto: true")
            self.roi = {k: _box(k, args[k], cam.width, cam.height) for k in ("signal", "background")}
        self.roi_version += 1
        return {"roi": self.roi}

    def cmd_selftest(self, args, caller) -> dict:
        """Each device checked and reported on its own; SAFE and acquisition off only."""
        from controller import selftest

        self._noargs(args, "selftest")
        if self.cart.state is not State.SAFE or self.acquisition.mode != "off":
            raise WrongState(f"selftest needs state SAFE with acquisition off; state is {self.cart.state.value}, "
                             f"acquisition {self.acquisition.mode}")
        fw = self.cfg.filter_wheel
        devices = {
            "laser-mcu": selftest._check("laser", lambda: selftest.check_laser(self.devices.laser,
                                                                               self.cfg.laser.max_temp_c)),
            "filter-wheel": selftest._check("wheel", lambda: selftest.check_wheel(
                self.devices.wheel, [fw.emission_position, fw.open_position, fw.blocked_position],
                fw.move_timeout_s)),
        }
        start = self.filter["position"]

        def camera():
            self._move_filter(fw.blocked_position)
            try:
                return selftest.check_camera(self.acquisition, 4, self.cfg.camera.black_level,
                                             timeout_s=3.0 + 8.0 / self.fps)
            finally:
                if start is not None:
                    self._move_filter(start)

        devices["camera"] = selftest._check("camera", camera)
        devices["gpio"] = selftest._check("gpio", lambda: selftest.check_gpio(self.devices.io))
        result = {"ok": all(d["ok"] for d in devices.values()), "devices": devices}
        self.telemetry.publish("event", {"kind": "selftest", "ok": result["ok"]})
        return result

    def cmd_sim_set(self, args, caller) -> dict:
        if self.devices.world is None:
            raise NotAvailable(f"sim.set exists only in the sim profile; this cart runs {self.cfg.profile!r}")
        values = self.devices.world.sim_set(args)
        self.audit.write("sim.set", args=args)
        return values


def _only(args: dict, allowed: set, cmd: str) -> None:
    extra = sorted(set(map(str, args)) - allowed)
    if extra:
        raise InvalidArgument(f"{cmd}: unknown argument {extra[0]!r}; allowed: {', '.join(sorted(allowed))}")


def _box(name: str, v, width: int, height: int) -> list[int]:
    if not isinstance(v, list) or len(v) != 4 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise InvalidArgument(f"{name} ROI {v!r}: expected [x, y, w, h] as whole numbers")
    x, y, w, h = v
    if w < 2 or h < 2 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise InvalidArgument(f"{name} ROI {v!r} does not fit the {width}x{height} frame (w, h >= 2)")
    return [x, y, w, h]


def _meta(m) -> dict:
    return {"seq": m.seq, "mcu_frame": m.mcu_frame, "lit": m.lit, "t_start_ns": m.t_start_ns,
            "t_end_ns": m.t_end_ns, "exposure_us": m.exposure_us, "gain": m.gain, "laser_mw": m.laser_mw,
            "filter_position": m.filter_position, "bits": m.bits, "black_level": m.black_level,
            "width": m.width, "height": m.height}


def main(argv=None) -> int:
    p = entry.parser("NIRF cart controller")
    args = p.parse_args(argv)
    entry.configure_logging("controller")
    try:
        cfg = config_mod.load(args.config)
        state_dir, runtime_dir = cfg.state_dir(), cfg.runtime_dir()
        state_dir.mkdir(parents=True, exist_ok=True)
        devices = (build_sim_devices(cfg, runtime_dir) if cfg.profile == "sim" else build_device_devices(cfg))
        svc = ControllerService(cfg, devices, state_dir=state_dir, runtime_dir=runtime_dir)
        svc.start()
    except NirfError as err:
        log.error("cannot start: %s", err)
        return 2
    except zmq.ZMQError as err:
        log.error("cannot start: %s (is another cart already running on these endpoints?)", err)
        return 2
    entry.stop_on_signals(svc.stop_event)
    # devices connected and SAFE reached: start-up is complete for systemd (Type=notify)
    sdnotify.ready()
    sdnotify.status(f"state {svc.cart.state.value}; control {cfg.bus.control_endpoint}")
    try:
        while not svc.stop_event.wait(0.5):
            pass
    finally:
        sdnotify.stopping()
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
