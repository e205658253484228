"""The world as seen from the controller's process: a mirror kept up to date from the
hardware process (:mod:`nirf.sim.hardware`), implementing :class:`nirf.sim.worldview.WorldView`.

A subscriber thread follows the hardware process's ``world.pub`` messages (laser output
changes with their exact times, camera triggers, inputs, the scene); requests (outputs,
``sim.set``, port unplug/replug) go over ``world.ctl`` with a timeout, the socket being
recreated after a timeout so one lost reply never wedges it.

Inputs (PRODUCT S3a): the hardware process publishes an ``inputs`` message for every edge,
stamped with its ``t_ns``, so a 1 ms pulse arrives as two messages and the input listeners
(the RPi.GPIO stand-in) are called for each, in order: every edge becomes a GPIO callback.
The same topic also carries a periodic snapshot without an edge time, for a subscriber
that lost a message; a snapshot is read before it is sent, so it can be older than an edge
message that overtook it, and it is applied only when two snapshots in a row agree on a
value that differs from the mirror's (a stale one never makes or undoes an edge).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import msgpack
import zmq

from nirf.hal.errors import DeviceTimeout, InvalidArgument, NirfError
from nirf.sim.world import Phantom, SceneSnapshot, SensorModel, Trigger, mean_of_steps
from nirf.sim.threads import name_context_threads, name_os_thread, sim_context

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 2.0
# the inputs that are electrical lines (other keys of an inputs message are metadata)
INPUT_KEYS = ("key", "interlock_closed", "footswitch")


def _lines(msg: dict) -> dict:
    return {k: msg[k] for k in INPUT_KEYS if k in msg}


def scene_to_dict(s: SceneSnapshot) -> dict:
    return {
        "version": s.version, "phantom": s.phantom.to_dict(), "ambient_e_per_ms": s.ambient_e_per_ms,
        "illumination": s.illumination, "laser_leak": s.laser_leak, "filter_position": s.filter_position,
        "filter_moving": s.filter_moving, "seed": s.seed, "camera_stall": s.camera_stall,
        "white_light": s.white_light, "k_fluo": s.k_fluo,
        "filters": [[k, list(v)] for k, v in sorted(s.filters.items())],
        "camera_platform": s.camera_platform,
        "motion_px": s.motion_px,
    }


def scene_from_dict(d: dict) -> SceneSnapshot:
    return SceneSnapshot(
        version=int(d["version"]), phantom=Phantom.from_dict(d["phantom"]),
        ambient_e_per_ms=float(d["ambient_e_per_ms"]), illumination=d["illumination"],
        laser_leak=float(d["laser_leak"]), filter_position=int(d["filter_position"]),
        filter_moving=bool(d["filter_moving"]), seed=int(d["seed"]), camera_stall=bool(d["camera_stall"]),
        white_light=bool(d["white_light"]), k_fluo=float(d["k_fluo"]),
        filters={int(k): tuple(v) for k, v in d["filters"]},
        camera_platform=str(d.get("camera_platform", "pi4")),
        motion_px=float(d.get("motion_px", 0.0)),
    )


class RemoteWorldView:
    """A :class:`~sim.worldview.WorldView` over the hardware process's sockets."""

    def __init__(self, pub_endpoint: str, ctl_endpoint: str, sensor: SensorModel, *, context=None,
                 topics: tuple[str, ...] | None = None):
        self.sensor = sensor
        # A context of its own unless given one: its I/O thread is the simulator's work
        # (named so for the benchmark, see sim/threads.py), not the cart process's.
        self._own_ctx = context is None
        self.ctx = context or sim_context()
        self.ctl_endpoint = ctl_endpoint
        self._req_lock = threading.Lock()
        self._req: zmq.Socket | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._triggers: collections.deque[Trigger] = collections.deque(maxlen=256)
        self._laser: collections.deque[tuple[int, float]] = collections.deque(maxlen=4096)
        self._input_listeners = []
        self._stop = threading.Event()
        self.values: dict = {}
        self._sub = self.ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 100000)
        # ``topics``: only what this process's stand-ins read (the safety core's GPIO stand-in
        # needs the inputs, not the 130 laser and trigger messages a second of a stream)
        for topic in (("",) if topics is None else topics):
            self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sub.connect(pub_endpoint)
        # Subscribe first, then take a snapshot, so nothing falls between the two.
        snap = self.request({"op": "get"})
        if self._own_ctx:
            name_context_threads()  # they carried the request: started, named by libzmq
        self._scene = scene_from_dict(snap["scene"])
        self._inputs = _lines(snap["inputs"])
        self._last_edge_ns = int(snap["inputs"].get("t_ns", 0) or 0)
        self._snapshot_candidate: dict | None = None
        self._laser.extend((int(t), float(mw)) for t, mw in snap["laser"])
        self.values = snap["values"]
        self._thread = threading.Thread(target=self._follow, name="world-follow", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- requests
    def request(self, req: dict, timeout_s: float = REQUEST_TIMEOUT_S) -> dict:
        with self._req_lock:
            if self._req is None:
                self._req = self.ctx.socket(zmq.REQ)
                self._req.setsockopt(zmq.LINGER, 0)
                self._req.connect(self.ctl_endpoint)
            self._req.send(msgpack.packb(req, use_bin_type=True))
            if not self._req.poll(int(timeout_s * 1000)):
                self._req.close(linger=0)
                self._req = None
                raise DeviceTimeout("sim-hardware", f"no answer to {req.get('op')!r} within {timeout_s} s")
            reply = msgpack.unpackb(self._req.recv(), raw=False, strict_map_key=False)
        if not reply.get("ok"):
            if reply.get("code") == "INVALID_ARGUMENT":
                raise InvalidArgument(reply.get("error", "invalid"))
            raise NirfError(reply.get("error", "simulated hardware refused the request"))
        return reply

    def sim_set(self, changes: dict) -> dict:
        return self.request({"op": "set", "changes": changes})["values"]

    def port(self, op: str, port: str) -> None:
        self.request({"op": op, "port": port})

    # -------------------------------------------------------------- WorldView
    def inputs(self) -> dict:
        with self._lock:
            return dict(self._inputs)

    def add_input_listener(self, listener) -> None:
        self._input_listeners.append(listener)

    def set_output(self, name: str, value: bool) -> None:
        self.request({"op": "output", "name": name, "value": bool(value)})

    def scene(self) -> SceneSnapshot:
        with self._lock:
            return self._scene

    def laser_mean_mw(self, t0_ns: int, t1_ns: int) -> float:
        with self._lock:
            events = list(self._laser)
        if not events:
            return 0.0
        return mean_of_steps(events, t0_ns, t1_ns)

    def wait_trigger(self, timeout_s: float) -> Trigger | None:
        with self._cond:
            if not self._triggers:
                self._cond.wait(timeout_s)
            return self._triggers.popleft() if self._triggers else None

    def now_ns(self) -> int:
        return time.time_ns()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        if self._own_ctx and not self._thread.is_alive():
            with self._req_lock:
                self._req = None
                self.ctx.destroy(linger=0)  # its sockets too (the follower's closed with it)

    # -------------------------------------------------------------- following
    def _on_inputs(self, msg: dict) -> None:
        """One ``inputs`` message: an edge (with ``t_ns``) is applied at once, in order; a
        periodic snapshot (without) only when two in a row agree (module docstring)."""
        lines = _lines(msg)
        t_ns = msg.get("t_ns")
        with self._lock:
            if t_ns is not None:
                if int(t_ns) < self._last_edge_ns:
                    return  # older than an edge already applied
                self._last_edge_ns = int(t_ns)
                self._snapshot_candidate = None
            else:
                if lines == self._inputs:
                    self._snapshot_candidate = None
                    return
                if lines != self._snapshot_candidate:
                    self._snapshot_candidate = lines
                    return
                self._snapshot_candidate = None
            changed = lines != self._inputs
            self._inputs = dict(lines)
        if changed:
            for listener in list(self._input_listeners):
                try:
                    listener(dict(lines))
                except Exception:
                    log.exception("input listener failed")

    def _follow(self) -> None:
        name_os_thread("nirf-sim-world")  # simulator-only work in whichever process follows
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                kind, data = self._sub.recv_multipart()
                msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
                self._on(kind.decode(), msg)
        finally:
            self._sub.close(linger=0)

    def _on(self, kind: str, msg: dict) -> None:
        if kind == "laser":
            with self._lock:
                t = int(msg["t_ns"])
                # keep change points sorted; a late duplicate of a known point is dropped
                if not self._laser or t >= self._laser[-1][0]:
                    self._laser.append((t, float(msg["mw"])))
        elif kind == "trigger":
            with self._cond:
                self._triggers.append(Trigger(int(msg["counter"]), int(msg["t_start_ns"]), bool(msg["lit"]),
                                              exposure_ns=int(msg.get("exposure_ns", 0)),
                                              pulse_us=int(msg.get("pulse_us", 0))))
                self._cond.notify_all()
        elif kind == "inputs":
            self._on_inputs(msg)
        elif kind == "scene":
            scene = scene_from_dict(msg)
            with self._lock:
                if scene.version != self._scene.version:
                    self._scene = scene
        elif kind == "values":
            self.values = msg
