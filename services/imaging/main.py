"""The imaging process: the camera, the filter wheel, frame tagging and distribution, the
ROIs, and the long camera procedures (dark and flat-field calibration, QC, the device
self-test).

It never decides about the laser. The safety core times the camera (the MCU triggers each
exposure), so frame timing is asked of it over its internal socket, and its frame record
(counter, lit or dark) arrives on its publisher; imaging pairs frames from it. Imaging sends
the safety core a heartbeat every 100 ms and a notice per frame (the camera-stall rule);
when it goes silent while the laser is armed, the safety core turns the laser off.

Threads: the command server (quick commands inline, long ones in its worker), the
acquisition (which also takes the frame records off their socket), the followers of the
safety core's state and of the results (subscribed only while a procedure waits for
results), and the heartbeat.
"""

from __future__ import annotations

import os
import logging
import math
import threading
import time
from pathlib import Path

import zmq

from nirf import config as config_mod
from nirf.controller.state import State
from nirf.hal.camera import CameraSettings
from nirf.hal.clock import SystemClock
from nirf.hal.errors import ConfigError, DeviceDisconnected, DeviceError, InvalidArgument, NirfError, NotAvailable, WrongState
from nirf.hal.laser import FrameTag, McuNotice
from nirf.services.common import entry, framering, ipc, sdnotify
from nirf.services.common.follow import LatestState, Results, publication
from nirf.services.imaging.acquisition import Acquisition
from nirf.services.imaging.record_tap import RecordTap

log = logging.getLogger(__name__)

VERSION = "0.2.0"
HEARTBEAT_S = 0.1
CAMERA_NOTICE_S = 0.1  # frames are told to the safety core at most this often (S9 needs 1 s)
FRAME_QUEUE = 1024  # frame records (17 s at 60 fps) queued while nobody acquires; older ones are dropped
STATE_PERIOD_S = 0.2  # the periodic state (the gateway's status goes out at 2 Hz)
LONG_COMMANDS = frozenset({"calibrate.dark", "calibrate.flat", "qc.baseline", "qc.run", "selftest"})


# ---------------------------------------------------------------------- the safety core, as imaging sees it
class SafetyLink:
    """What imaging knows of and asks from the safety core.

    Reads (``state``, ``setpoint_mw``, ``emission_enabled``) come from its latest published
    state; frame timing is asked over its internal socket; frame records arrive on its
    publisher and are handed to the acquisition by :meth:`poll`, like a laser driver's."""

    def __init__(self, ctx: zmq.Context, runtime_dir: Path):
        self.client = ipc.InternalClient(ctx, ipc.endpoint(runtime_dir, "safety"), name="safety")
        self.notifier = ipc.Notifier(ctx, ipc.endpoint(runtime_dir, "safety_in"))
        self.instance = f"{os.getpid()}-{time.time_ns()}"  # tells the safety core of a restart
        self._camera_told: tuple[bool, bool] | None = None
        self._camera_told_at = 0.0
        self.latest = LatestState(ctx, ipc.endpoint(runtime_dir, "safety_pub"), name="safety-state")
        # The frame records and notices stay queued on this socket until the acquisition
        # asks (poll, wait_input): no thread of ours wakes for each of the 60 a second.
        self._frames_sock = ipc.subscriber(ctx, ipc.endpoint(runtime_dir, "safety_pub"), ("frame", "notice"),
                                           hwm=FRAME_QUEUE)
        self._frames_lock = threading.Lock()  # the socket is used by one thread at a time
        self.frames_dropped = 0  # malformed records

    def _take(self, frames: list, tags: list, notices: list) -> None:
        msg = publication(frames)
        if msg is None:
            self.frames_dropped += 1
            return
        topic, body = msg
        if topic == "frame":
            c, lit, us, host = body.get("counter"), body.get("lit"), body.get("mcu_time_us"), body.get("host_time_ns")
            if isinstance(c, int) and isinstance(lit, bool) and isinstance(us, int) and isinstance(host, int):
                tags.append(FrameTag(c, lit, us, host))
            else:
                self.frames_dropped += 1
        elif topic == "notice" and isinstance(body.get("kind"), str):
            notices.append(McuNotice(body["kind"], tuple(map(str, body.get("detail") or ()))))

    # -- laser-driver surface used by the acquisition
    def poll(self) -> tuple[list[FrameTag], list[McuNotice]]:
        """The frame records and notices the safety core published since the last call."""
        tags: list[FrameTag] = []
        notices: list[McuNotice] = []
        with self._frames_lock:
            if self._frames_sock is None:
                return tags, notices
            sock = self._frames_sock
            # called for every frame: the end of the queue costs one option read, not a raised
            # zmq.Again
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._take(frames, tags, notices)
        return tags, notices

    def wait_input(self, timeout_s: float) -> bool:
        """Sleep until a frame record or notice is queued, at most ``timeout_s``; whether one
        is (the acquisition then calls :meth:`poll`)."""
        with self._frames_lock:
            if self._frames_sock is None:
                return False
            return bool(self._frames_sock.poll(max(0, math.ceil(timeout_s * 1000))))  # whole ms, never 0 for a wait

    def start_frames(self, fps: float, exposure_us: int, modulate: bool) -> None:
        self.client.call("frames.start", {"fps": float(fps), "exposure_us": int(exposure_us),
                                          "modulate": bool(modulate)})

    def stop_frames(self) -> None:
        self.client.call("frames.stop")

    # -- reads
    @property
    def state(self) -> State:
        """The safety core's state as of now (for commands: waits for the next publication,
        at most a few hundred milliseconds, so a command right after laser.on sees EMITTING)."""
        try:
            return State(self.latest.fresh().get("state", "FAULT"))
        except ValueError:
            return State.FAULT

    @property
    def setpoint_mw(self) -> float:
        v = self.latest.get().get("laser", {}).get("setpoint_mw", 0.0)
        return float(v) if ipc.finite_number(v) else 0.0

    @property
    def emission_enabled(self) -> bool:
        return self.latest.get().get("emission_enabled") is True

    def lit_power_mw(self) -> float:
        s = self.latest.get()
        if s.get("state") == State.EMITTING.value and s.get("emission_enabled") is True:
            v = s.get("laser", {}).get("setpoint_mw", 0.0)
            return float(v) if ipc.finite_number(v) else 0.0
        return 0.0

    def power_calibration_id(self) -> str:
        v = self.latest.get().get("power_calibration")
        return v if isinstance(v, str) else "nominal"

    def power_problems(self) -> list[str]:
        v = self.latest.get().get("power_problems")
        return [str(x) for x in v] if isinstance(v, list) else []

    # -- notices
    def note_camera(self, watching: bool, last_frame_monotonic: float | None = None) -> None:
        """Tell the safety core the camera is watched (and that a frame came). A frame is
        told at most every CAMERA_NOTICE_S: the safety core then takes the last frame to be
        at most that much older than it was, so its stall rule (S9) can only act early, never
        late; a start or stop of the watch is told at once."""
        frame = last_frame_monotonic is not None
        now = time.monotonic()
        if frame and watching and self._camera_told == (True, True) and now - self._camera_told_at < CAMERA_NOTICE_S:
            return
        self._camera_told, self._camera_told_at = (bool(watching), frame), now
        self.notifier.send({"kind": "camera", "watching": bool(watching), "frame": frame,
                            "instance": self.instance})

    def heartbeat(self) -> None:
        self.notifier.send({"kind": "hb", "process": "imaging", "instance": self.instance})

    def alive(self) -> bool:
        return self.latest.follower.alive()

    def close(self) -> None:
        self.latest.close()
        with self._frames_lock:
            if self._frames_sock is not None:
                self._frames_sock.close(linger=0)
                self._frames_sock = None
        self.client.close()
        self.notifier.close()


# ---------------------------------------------------------------------- devices per profile
class Devices:
    """The device objects a profile picks. Imaging sees only the hal interfaces."""

    def __init__(self, wheel, camera, world=None):
        self.wheel, self.camera, self.world = wheel, camera, world


def build_sim_devices(cfg, runtime_dir: Path) -> Devices:
    from nirf.controller.main import _serial_factory, remote_world
    from nirf.drivers.camera import PiCamera
    from nirf.drivers.fw102c import Fw102cWheel
    from nirf.sim.picamera2_standin import MappedArray, Picamera2StandIn

    world, info = remote_world(cfg, runtime_dir)
    wheel = Fw102cWheel(_serial_factory(info["wheel_port"], cfg.filter_wheel.baudrate),
                        move_timeout_s=cfg.filter_wheel.move_timeout_s)
    camera = PiCamera(lambda: Picamera2StandIn(world, seed=cfg.sim.seed), bits=cfg.camera.bits,
                      black_level=cfg.camera.black_level, colour=cfg.camera.colour,
                      stall_timeout_s=cfg.safety.camera_stall_s, mapped_array=MappedArray)
    return Devices(wheel, camera, world)


def build_device_devices(cfg) -> Devices:
    from nirf.controller.main import _serial_factory
    from nirf.drivers.camera import PiCamera, picamera2_factory, upstream_mapped_array
    from nirf.drivers.fw102c import Fw102cWheel

    if not cfg.filter_wheel.port:
        raise ConfigError(f"{cfg.source}: [filter_wheel] port must be set in the device profile")
    wheel = Fw102cWheel(_serial_factory(cfg.filter_wheel.port, cfg.filter_wheel.baudrate),
                        move_timeout_s=cfg.filter_wheel.move_timeout_s)
    camera = PiCamera(picamera2_factory, bits=cfg.camera.bits, black_level=cfg.camera.black_level,
                      colour=cfg.camera.colour, stall_timeout_s=cfg.safety.camera_stall_s,
                      mapped_array=upstream_mapped_array)
    return Devices(wheel, camera, None)


# ---------------------------------------------------------------------- the service
class ImagingService:
    def __init__(self, cfg, devices: Devices, *, state_dir: Path, runtime_dir: Path, clock=None,
                 ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.devices = devices
        self.state_dir = Path(state_dir)
        self.runtime_dir = Path(runtime_dir)
        self.clock = clock or SystemClock()
        self.started_monotonic = time.monotonic()
        self.stop_event = threading.Event()
        self.ctx = ctx or zmq.Context()
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.cart = SafetyLink(self.ctx, self.runtime_dir)
        self.pub = ipc.Publisher(self.ctx, ipc.endpoint(self.runtime_dir, "imaging_pub"))
        self.telemetry = self.audit = ipc.EventsOut(self.pub)
        self.results = Results(self.ctx, ipc.endpoint(self.runtime_dir, "gateway_pub"), name="imaging-results")
        fw = cfg.filter_wheel
        self.filter_names = {fw.emission_position: "icg_emission", fw.open_position: "open",
                             fw.blocked_position: "blocked"}
        self._filter_lock = threading.Lock()  # one wheel move at a time; readers copy under it
        self.filter = {"position": None, "name": None, "moving": False}
        cam = cfg.camera
        self.camera_settings = CameraSettings(cam.exposure_us, cam.gain, cam.width, cam.height)
        self.acquisition = Acquisition(
            devices.camera, self.cart, clock=self.clock, on_pair=self._send_pair,
            laser_mw=self.cart.lit_power_mw, on_liveness=self.cart.note_camera,
            stall_timeout_s=cfg.safety.camera_stall_s,
            filter_position=lambda: self.filter["position"] or 0)
        self.fps = cam.fps
        p = cfg.processing
        self._roi_lock = threading.Lock()
        self.roi: dict | str = ({"signal": list(p.signal_roi), "background": list(p.background_roi)}
                                if p.signal_roi and p.background_roi else "auto")
        self.roi_version = 1
        self.watchdog = sdnotify.WatchdogPinger(clock=self.clock)
        self._threads: list[threading.Thread] = []
        self._rev = ipc.Revision()

    def wait_results(self, count: int, timeout_s: float, valid_only: bool = True) -> list[dict]:
        return self.results.wait_results(count, timeout_s, valid_only)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        from nirf.services.imaging.calibration import Calibration

        self.calibration = Calibration(self)
        self.frames_out = self.ctx.socket(zmq.PUB)
        self.frames_out.setsockopt(zmq.LINGER, 0)
        self.frames_out.setsockopt(zmq.SNDHWM, 8)  # live path: a slow consumer loses old pairs (~40 MB at full size)
        self.frames_out.bind(ipc.endpoint(self.runtime_dir, "frames"))
        self._frames_lock = threading.Lock()
        # frames in shared memory (services/common/framering.py): the driver writes each
        # frame into a ring slot, the pair message names the slots, processing reports back
        self.ring_reports = self.ctx.socket(zmq.PULL)
        self.ring_reports.setsockopt(zmq.LINGER, 0)
        self.ring_reports.setsockopt(zmq.MAXMSGSIZE, 4096)
        self.ring_reports.bind(ipc.endpoint(self.runtime_dir, "frames_done"))
        self._reports_lock = threading.Lock()
        self.ring = framering.RingAllocator(framering.ring_path(self.runtime_dir), clock=self.clock,
                                            drain=self._drain_ring_reports)
        if hasattr(self.devices.camera, "allocator"):
            self.devices.camera.allocator = self.ring
        self.pairs_held_back = 0  # processing behind: pairs not sent (its leases full)
        self.pairs_in_ring = 0  # sent as slot numbers, the pixels in shared memory
        self.pairs_with_pixels = 0  # sent with their pixels (no ring slot for them)
        self.record = RecordTap(self.ctx, ipc.endpoint(self.runtime_dir, "record"))
        handlers = self._handlers()
        handlers.update(self.calibration.handlers())
        handlers.update(self.record.handlers())
        self.server = ipc.InternalServer(self.ctx, ipc.endpoint(self.runtime_dir, "imaging"), handlers,
                                         long_commands=LONG_COMMANDS, clock=self.clock, name="imaging",
                                         state=self.state_snapshot)
        self.devices.wheel.connect()
        try:
            position = self.devices.wheel.position()
            self.filter.update(position=position, name=self._filter_name(position))
        except DeviceError as err:
            log.error("filter wheel: %s", err)
        try:
            self.acquisition.configure(self.camera_settings, self.fps)
        except NirfError as err:
            log.error("camera: %s", err)
        self._threads = [
            threading.Thread(target=self.server.serve, args=(self.stop_event,), name="commands", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
        ]
        for t in self._threads:
            t.start()
        log.info("imaging ready")

    def alive(self) -> bool:
        """Every thread this process depends on is running (feeds the heartbeat and systemd)."""
        return (all(t.is_alive() for t in self._threads) and self.server.worker_alive()
                and self.cart.alive() and self.results.follower.alive()
                and (self.acquisition.mode == "off" or self.acquisition.running()))

    def _heartbeat_loop(self) -> None:
        next_state = 0.0
        while not self.stop_event.wait(HEARTBEAT_S):
            if not self.alive():
                log.error("a thread of the imaging process died; heartbeats stop so the laser goes off")
                continue
            self.cart.heartbeat()
            self.watchdog()
            now = time.monotonic()
            if now >= next_state:
                try:
                    self.pub.publish("state", self.state_snapshot())
                except Exception:
                    log.exception("imaging state not published")
                next_state = now + STATE_PERIOD_S

    def stop(self) -> None:
        self.stop_event.set()
        self.server.wake()  # the command thread sees the stop now
        try:
            self.acquisition.stop()
        except NirfError:
            log.exception("stopping acquisition")
        for t in self._threads:
            t.join(timeout=3.0)
        try:
            self.devices.wheel.close()
        except NirfError:
            pass
        self.server.close()
        self.ring_reports.close(linger=0)
        self.ring.close()
        self.record.close()
        self.results.close()
        self.cart.close()
        self.pub.close()
        if self.devices.world is not None:
            self.devices.world.close()
        self.ctx.destroy(linger=0)

    # ------------------------------------------------------------------ status
    def state_snapshot(self) -> dict:
        acq = self.acquisition
        cam = acq.camera.settings if acq else self.camera_settings
        with self._filter_lock:
            filt = dict(self.filter)
        with self._roi_lock:
            roi = self.roi
        return {
            "rev": self._rev.next(),
            "filter": filt,
            "camera": {"streaming": acq.mode != "off",
                       "fps": round(acq.measured_fps, 2) if acq.mode != "off" else 0.0, "set_fps": self.fps,
                       "exposure_us": cam.exposure_us, "gain": cam.gain, "width": cam.width, "height": cam.height,
                       "frames_copied": int(getattr(acq.camera, "frames_copied", 0)) if acq else 0,
                       "copy_cpu_s": round(float(getattr(acq.camera, "copy_cpu_s", 0.0)), 6) if acq else 0.0},
            "acquisition": acq.mode,
            "roi": roi,
            "pairs": {"sent": acq.pairs, "incomplete": acq.pairs_incomplete,
                      "cut_notices": acq.cuts, "cut_notices_late": acq.cuts_late,
                      "dark_light_notices": acq.dark_lit, "dark_light_notices_late": acq.dark_lit_late,
                      "in_shared_memory": getattr(self, "pairs_in_ring", 0),
                      "with_pixels": getattr(self, "pairs_with_pixels", 0),
                      "held_back": getattr(self, "pairs_held_back", 0),
                      "ring": self._ring_busy()},
            "calibration_id": self.calibration.current_id(),
            # why a patient capture should not be taken now (no flat field, no QC today)
            "capture_problems": self.calibration.capture_problems(),
            "fps": self.fps,
        }

    # ------------------------------------------------------------------ frames
    def _send_pair(self, on, off) -> None:
        with self._roi_lock:
            roi, roi_version = self.roi, self.roi_version
        header = {
            "frame_seq": on.meta.mcu_frame,
            "on": _meta(on.meta), "off": _meta(off.meta),
            "roi": roi, "roi_version": roi_version,
            "threshold": self.cfg.processing.sbr_threshold,
            # every result records the calibration; processing applies the named flat field
            "calibration_id": self.calibration.current_id(),
            "flat_field": self.calibration.flat_field_file(),
        }
        self.calibration.on_pair(on, off, header)  # the flat-field procedure's tap
        self.record.on_pair(on, off, header)  # to the recorder while a capture collects
        self._drain_ring_reports()
        ring = self.ring.ring
        how, part = ring.lease_pair(on.data, off.data) if ring is not None else ("pixels", None)
        if how == "held_back":
            self.pairs_held_back += 1
            return
        with self._frames_lock:
            try:
                if how == "ring":
                    header["ring"] = part  # the pixels stay in shared memory
                    self.frames_out.send_multipart([b"pair", ipc.pack(header)], zmq.NOBLOCK)
                    self.pairs_in_ring += 1
                else:
                    self.frames_out.send_multipart([b"pair", ipc.pack(header), on.data, off.data],
                                                   zmq.NOBLOCK, copy=False)
                    self.pairs_with_pixels += 1
            except zmq.Again:
                if how == "ring":
                    ring.unlease_pair(part)

    def _ring_busy(self) -> dict | None:
        ring = getattr(self, "ring", None)
        if ring is None or ring.ring is None:
            return None
        self._drain_ring_reports()  # while no frame comes, nothing else takes them in
        return ring.ring.busy()

    def _drain_ring_reports(self) -> None:
        """Processing's reports (done with a pair, idle since): the leases they end."""
        with self._reports_lock:
            # looked at before each frame: the common case (nothing came) costs one option
            # read, not a raised zmq.Again
            while self.ring_reports.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                try:
                    data = self.ring_reports.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
                ring = self.ring.ring
                if ring is not None:
                    ring.on_report(ipc.unpack_map(data))

    # ------------------------------------------------------------------ commands
    def _handlers(self) -> dict:
        return {
            "imaging.ping": lambda a, c: {"version": VERSION},
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

    def _filter_name(self, position: int | None) -> str | None:
        if position is None:
            return None
        return self.filter_names.get(position, f"spare{position}")

    def _move_filter(self, position: int) -> dict:
        with self._filter_lock:
            self.filter["moving"] = True
        try:
            try:
                reached = self.devices.wheel.move(position)
            except DeviceDisconnected:
                # the port came back under the same name (USB re-enumeration): reopen once
                self.devices.wheel.connect()
                reached = self.devices.wheel.move(position)
        finally:
            with self._filter_lock:
                self.filter["moving"] = False
        with self._filter_lock:
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
        self.cart.client.call("light.white", {"on": mode == "white"})
        self.acquisition.start(mode)
        with self._filter_lock:
            return {"mode": mode, "filter": dict(self.filter)}

    def cmd_acquire_stop(self, args, caller) -> dict:
        self._noargs(args, "acquire.stop")
        self.acquisition.stop()
        self.cart.client.call("light.white", {"on": False})
        return {"mode": "off"}

    def cmd_roi_set(self, args, caller) -> dict:
        _only(args, {"signal", "background", "auto"}, "roi.set")
        cam = self.acquisition.camera.settings
        if args.get("auto") is True and not ({"signal", "background"} & set(args)):
            roi = "auto"
        elif "auto" in args and args["auto"] is not False:
            raise InvalidArgument("roi.set: give auto: true alone, or signal and background boxes")
        else:
            if not {"signal", "background"} <= set(args):
                raise InvalidArgument("roi.set needs signal and background as [x, y, w, h], or auto: true")
            roi = {k: _box(k, args[k], cam.width, cam.height) for k in ("signal", "background")}
        with self._roi_lock:
            self.roi = roi
            self.roi_version += 1
        return {"roi": roi}

    def cmd_selftest(self, args, caller) -> dict:
        """Each device checked and reported on its own; SAFE and acquisition off only."""
        from nirf.services.imaging import selftest

        self._noargs(args, "selftest")
        if self.cart.state is not State.SAFE or self.acquisition.mode != "off":
            raise WrongState(f"selftest needs state SAFE with acquisition off; state is {self.cart.state.value}, "
                             f"acquisition {self.acquisition.mode}")
        fw = self.cfg.filter_wheel
        devices = dict(self.cart.client.call("safety.selftest", timeout_s=10.0))
        devices["filter-wheel"] = selftest._check("wheel", lambda: selftest.check_wheel(
            self.devices.wheel, [fw.emission_position, fw.open_position, fw.blocked_position], fw.move_timeout_s))
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
        order = ("laser-mcu", "filter-wheel", "camera", "gpio")
        devices = {k: devices[k] for k in order if k in devices}
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
            "width": m.width, "height": m.height, "cut": m.cut, "light_seen": m.light_seen}


def main(argv=None) -> int:
    p = entry.parser("NIRF cart imaging (camera, filter wheel, frames)")
    args = p.parse_args(argv)
    entry.configure_logging("imaging")
    try:
        cfg = config_mod.load(args.config)
        state_dir, runtime_dir = cfg.state_dir(), cfg.runtime_dir()
        state_dir.mkdir(parents=True, exist_ok=True)
        devices = build_sim_devices(cfg, runtime_dir) if cfg.profile == "sim" else build_device_devices(cfg)
        svc = ImagingService(cfg, devices, state_dir=state_dir, runtime_dir=runtime_dir)
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
            pass
    finally:
        sdnotify.stopping()
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
