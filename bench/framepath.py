"""P5 (and the issue on the frame path): where the cart's CPU goes at 1456x1088 and 60 fps,
how often a frame's bytes are copied, and what that would cost on a Raspberry Pi.

* **CPU share per process**: user + system time (/proc/<pid>/stat, utime + stime) of each
  process of the cart over the measured streaming window, divided by the window's wall time:
  1.0 is one core kept busy.
* **Simulator-only against device-path work**: the hardware process (the MCU and filter-wheel
  emulators and the world) and the launcher (systemd on the cart) are simulator-only. Inside
  imaging, the picamera2 stand-in renders every frame (the scene, the noise, the packing into
  a padded raw buffer, which the sensor's DMA does on a Pi). That part is measured by running
  the same renderer and packing alone, in this process, for the same number of frames
  (one per MCU trigger: fps x window), timing its thread's CPU (``time.thread_time``), and
  subtracted from imaging's share. Everything else (the safety core, imaging's driver and
  frame path, gateway, study, processing, recorder, display) is device-path work: what would
  run on the Pi. The small simulator pieces left inside those processes (the world views the
  GPIO and camera stand-ins read, the serial links to the emulators) stay in the device-path
  figure, so it errs high.
* **Copies of a frame's bytes** between the camera buffer and the pipeline: read from the
  code path (:data:`FRAME_COPIES`, each located by a marker string so the file and line stay
  right as the code moves), and checked for the driver's part by an instrumented capture
  (:func:`verify_driver_copies`: which arrays share memory with which, and whether the frame
  is a slot of the shared-memory ring that processing reads in place).
* **Pi 4 / Pi 5 estimate**: the device-path share split into a memory-bound part (the frame
  copies at this machine's measured copy bandwidth, plus the pipeline's time per pair, which
  streams over both frames) scaled by the ratio of copy bandwidths, and the rest
  (interpreter, bus, serial: compute-bound) scaled by a slowdown factor. The Pi figures are
  assumptions, stated in :data:`PI_MODELS`, not measurements.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# process -> simulator-only (True) or device path (False). Imaging is device path with the
# stand-in's rendering taken out (see the module docstring).
SIMULATOR_ONLY = {
    "launcher": True,  # systemd starts and watches the units on the cart
    "hardware": True,  # MCU and FW102C emulators, the world
    "controller": False,  # the safety core
    "imaging": False,
    "gateway": False,
    "study": False,
    "processing": False,
    "recorder": False,
    "display": False,
}
PROCESS_LABELS = {"controller": "safety core"}


@dataclass(frozen=True)
class PiModel:
    """Assumed figures of one Pi: large-block copy bandwidth (bytes/s) and how many times
    slower than this machine compute-bound Python code runs (a range)."""

    name: str
    copy_bandwidth_bps: float
    slowdown: tuple[float, float]


# Assumptions, not measurements on this project's hardware: a Pi 4's large memcpy about
# 2.7 GB/s, a Pi 5's about 7 GB/s; interpreter-bound code 2.7-4x slower on a Pi 4 and 1.5-2x
# on a Pi 5 than on a current x86 core.
PI_MODELS = (
    PiModel("Pi 4", 2.7e9, (2.7, 4.0)),
    PiModel("Pi 5", 7.0e9, (1.5, 2.0)),
)


@dataclass(frozen=True)
class FrameCopy:
    """One copy of a frame's bytes on the way from the camera buffer to the pipeline."""

    what: str
    path: str  # file in this repository
    marker: str  # a string on the line that makes (or starts) the copy, unique in the file
    upstream: str = ""  # where upstream does the same, when the copy happens outside our code
    condition: str = ""  # when it happens only sometimes


FRAME_COPIES = (
    FrameCopy("the driver's one copy: from the camera buffer, read in place through picamera2's "
              "MappedArray, into a slot of the shared-memory frame ring (a right shift on a Pi 5, whose "
              "16-bit raw is left-aligned; a copy that drops the row padding on a Pi 4); processing "
              "reads the slot in place and the pair message carries only the slots' numbers",
              "drivers/camera.py", "return np.right_shift(px, px.dtype.type(shift), out=out)",
              upstream="picamera2 request.py MappedArray: the mapped dmabuf as an array, no copy "
                       "(make_array would copy it)"),
)

# Not between the camera and the pipeline, or not in the normal course, listed so nobody
# counts them twice.
OTHER_FRAME_COPIES = (
    FrameCopy("while a capture collects: the pair sent to the recorder too (two more kernel copies)",
              "services/imaging/record_tap.py", "self._push.send_multipart([b\"pair\"",
              condition="captures only"),
    FrameCopy("fallback: a pair whose frames are not in the ring (every slot busy, the ring could not "
              "be made, colour binning) carries its pixels: the kernel's copies of the ipc send and "
              "receive (imaging's status counts the pairs each way)", "services/imaging/main.py",
              "self.frames_out.send_multipart([b\"pair\", ipc.pack(header), on.data, off.data]",
              condition="only when no slot is free"),
    FrameCopy("simulator only: the stand-in renders each frame in place into one of its recycled raw "
              "buffers (the sensor's DMA fills it on a Pi)", "sim/picamera2_standin.py",
              "self._renderer.render(scene, laser_mw, render_us, gain, out=view)"),
)


def locate(copy: FrameCopy, root: Path = ROOT) -> int:
    """The 1-based line of ``copy.marker`` in ``copy.path``. Raises LookupError when the
    marker is missing or not unique (the table no longer matches the code)."""
    lines = (root / copy.path).read_text().splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if copy.marker in line]
    if len(hits) != 1:
        raise LookupError(f"{copy.path}: marker {copy.marker!r} found {len(hits)} times, expected once")
    return hits[0]


def copy_rows(copies=FRAME_COPIES, root: Path = ROOT) -> list[str]:
    """One printable line per copy: ``file:line  what (condition)``."""
    rows = []
    for c in copies:
        try:
            where = f"{c.path}:{locate(c, root)}"
        except (LookupError, OSError) as err:
            where = f"{c.path}:? ({err})"
        extra = f" [{c.condition}]" if c.condition else ""
        up = f" (upstream: {c.upstream})" if c.upstream else ""
        rows.append(f"{where}  {c.what}{extra}{up}")
    return rows


# ---------------------------------------------------------------------- arithmetic
def cpu_shares(cpu_s: dict[str, float], wall_s: float) -> dict[str, float]:
    """CPU seconds per process over a window of ``wall_s`` -> share of one core."""
    if not wall_s > 0:
        raise ValueError(f"window of {wall_s!r} s: must be positive")
    return {name: cpu / wall_s for name, cpu in cpu_s.items()}


@dataclass
class Split:
    """Shares of one core, simulator-only against device path."""

    per_process: dict[str, float]  # device-path share per process (imaging without rendering)
    simulator: dict[str, float]  # simulator-only share per item
    device_total: float
    simulator_total: float


def split_shares(shares: dict[str, float], render_share: float) -> Split:
    """Split per-process shares into device-path and simulator-only work. ``render_share``
    is the stand-in's rendering inside imaging (taken out of imaging, never below zero: a
    noisy measurement must not make imaging's device work negative). Unknown processes
    count as device path (errs high)."""
    device: dict[str, float] = {}
    sim: dict[str, float] = {}
    for name, share in shares.items():
        if SIMULATOR_ONLY.get(name, False):
            sim[name] = share
        elif name == "imaging":
            taken = min(max(render_share, 0.0), share)
            sim["imaging: camera stand-in rendering"] = taken
            device[name] = share - taken
        else:
            device[name] = share
    return Split(device, sim, sum(device.values()), sum(sim.values()))


def memory_bound_share(*, copies_per_frame: int, frame_bytes: int, fps: float, copy_bandwidth_bps: float,
                       pipeline_s_per_pair: float, pairs_per_s: float) -> float:
    """Share of one core spent moving frame bytes here: the copies (bytes per second over
    the copy bandwidth) plus the pipeline's time per pair (it streams over both frames)."""
    if not copy_bandwidth_bps > 0:
        raise ValueError(f"copy bandwidth {copy_bandwidth_bps!r} B/s: must be positive")
    return copies_per_frame * frame_bytes * fps / copy_bandwidth_bps + pipeline_s_per_pair * pairs_per_s


def pi_estimate(device_share: float, memory_share: float, copy_bandwidth_bps: float,
                model: PiModel) -> tuple[float, float]:
    """(low, high) share of one core of ``model`` for the device-path work: the memory-bound
    part scaled by the copy bandwidths, the rest by the model's slowdown range. The memory
    part is capped at the whole device share (it is an estimate of part of it)."""
    memory = min(max(memory_share, 0.0), max(device_share, 0.0))
    compute = max(device_share, 0.0) - memory
    scaled_memory = memory * copy_bandwidth_bps / model.copy_bandwidth_bps
    return scaled_memory + compute * model.slowdown[0], scaled_memory + compute * model.slowdown[1]


def heartbeat_figures(status: dict) -> dict | None:
    """The safety core's heartbeat gaps as ``status`` reports them (PRODUCT S16, measured at
    the sender: ``heartbeat`` with ``median_gap_ms``, ``max_gap_ms``, ...), or None when this
    safety core does not report them."""
    hb = status.get("heartbeat") if isinstance(status, dict) else None
    if not isinstance(hb, dict) or hb.get("median_gap_ms") is None:
        return None
    return hb


# ---------------------------------------------------------------------- measurements
def copy_bandwidth(size_bytes: int = 64 << 20, repeats: int = 7) -> float:
    """This machine's large-block copy bandwidth in bytes copied per second: the median of
    ``repeats`` ``np.copyto`` of ``size_bytes`` (larger than the caches, as the Pi figures are)."""
    src = np.ones(size_bytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages once
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return size_bytes / statistics.median(times)


def render_cpu_s(frames: int, *, laser_mw: float = 50.0, exposure_us: int = 8000, seed: int = 1) -> float:
    """CPU seconds (this thread's) the picamera2 stand-in spends on ``frames`` frames as it
    makes them in the cart: rendered in place into its padded raw buffer, the buffer given
    back to its pool once used (as a released request's is), alternating laser-on and
    laser-off as modulation does."""
    from nirf.hal.clock import ManualClock
    from nirf.sim.picamera2_standin import Picamera2StandIn
    from nirf.sim.render import FrameRenderer
    from nirf.sim.world import World
    from nirf.sim.worldview import LocalWorldView

    world = World(ManualClock())
    standin = Picamera2StandIn(LocalWorldView(world), platform="pi4")
    standin._renderer = FrameRenderer(world.sensor, seed=seed)
    scene = world.scene()

    def one(mw: float) -> None:
        raw = standin._render_packed(scene, mw, exposure_us, 1.0)
        with standin._lock:
            standin._recycle_locked(raw)

    for p in (laser_mw, 0.0):  # warm-up, as the first frames of a stream build their maps
        one(p)
    t0 = time.thread_time()
    for i in range(frames):
        one(laser_mw if i % 2 == 0 else 0.0)
    return time.thread_time() - t0


def verify_driver_copies(platform: str = "pi4") -> dict:
    """An instrumented capture through the camera driver on a stand-in request, as the cart
    makes it: the raw buffer read in place (MappedArray) and the frame written into a slot of
    a frame ring. Returns the copies seen between the camera buffer and the frame, whether the
    frame is a whole ring slot (so the pair message needs no pixels) and its values."""
    import tempfile

    from nirf.drivers.camera import PiCamera
    from nirf.hal.camera import CameraSettings
    from nirf.hal.clock import ManualClock
    from nirf.services.common.framering import FrameRing, slot_of
    from nirf.sim.picamera2_standin import MappedArray, Picamera2StandIn, StandInRequest
    from nirf.sim.world import World
    from nirf.sim.worldview import LocalWorldView

    world = World(ManualClock())
    standin = Picamera2StandIn(LocalWorldView(world), platform=platform)
    s = world.sensor
    counts = np.full((s.height, s.width), 100, np.uint16)
    camera_buffer = standin._pack(counts)
    fmt = f"R{16 if platform == 'pi5' else s.bits}"
    md = {"SensorTimestamp": 1_000_000, "ExposureTime": 8000, "AnalogueGain": 1.0}
    request = StandInRequest(standin, camera_buffer, md, {"raw": {"format": fmt}})
    with tempfile.TemporaryDirectory() as d:
        ring = FrameRing(Path(d) / "frames.ring", s.width * s.height * 2, slots=2)
        driver = PiCamera(lambda: standin, bits=s.bits, left_aligned=(platform == "pi5"),
                          mapped_array=MappedArray, allocator=ring.allocate)
        with MappedArray(request, "raw") as m:
            mapped_shares = np.shares_memory(m.array, camera_buffer)
            frame = driver._build_frame(m.array, md, CameraSettings(8000, 1.0, s.width, s.height), shared=True)
        request.release()
        result = {"platform": platform, "stride_bytes": camera_buffer.shape[1], "row_bytes": s.width * 2,
                  "mapped_copies": int(not mapped_shares),
                  "driver_copies": int(not np.shares_memory(frame.data, camera_buffer)),
                  "in_ring": slot_of(frame.data) is not None,
                  "frame_contiguous": bool(frame.data.flags["C_CONTIGUOUS"]),
                  "values_right": bool(int(frame.data[0, 0]) == 100 and int(frame.data[-1, -1]) == 100)}
        result["copies_in_imaging"] = result["mapped_copies"] + result["driver_copies"]
        del frame
        ring.close()
    return result


def fmt_share(x: float) -> str:
    """A share of one core as a percentage."""
    return f"{100.0 * x:.1f} %"


