"""``nirfctl doctor``: checks on the Pi what the upstream sources say a working cart needs.

Run it on the cart while the services are stopped (the camera and the serial ports have one
owner at a time)::

    sudo systemctl stop nirf.target
    sudo -u nirf /opt/nirf/venv/bin/nirfctl --config /etc/nirf/device.toml doctor

Each check is a function of a :class:`Probe`, the one object that touches the system, so
tests hand in a probe of their own. The checks:

* ``groups``: the user is in ``dialout``, ``gpio`` and ``video`` (serial ports, GPIO, camera).
* ``device_nodes``: the nodes libcamera and rpi-lgpio open exist and are readable and
  writable: ``/dev/gpiochip*``, ``/dev/video*``, ``/dev/media*``, ``/dev/v4l-subdev*``,
  ``/dev/dma_heap/*``.
* ``udev_names``: the configured serial ports (the udev rule's ``/dev/nirf/...`` links)
  exist and lead to a tty.
* ``lgpio_dir``: the directory lgpio makes its notification FIFO in (``$LG_WD``, else the
  working directory) is writable, and no ``.lgd-nfy*`` was left in ``/`` by a root import.
* ``raw_format``: the camera delivers an unpacked format: ``R10`` (Pi 4) or ``R16`` (Pi 5),
  with the bit alignment the driver expects (left-aligned data have their low bits zero;
  right-aligned never exceed full scale).
* ``black_level``: the mean of dark frames (laser off) matches the configured black level.
* ``trigger``: the frames arrive at the MCU's trigger period (the sensor is in external
  trigger mode, not free running) and the metadata's exposure is not clipped by the frame
  duration; the exposure the pulse gives is reported.
* ``clock``: the wall clock is synchronised (a Pi has no real-time clock).

The camera checks need one sample of frames: :meth:`Probe.camera_sample` triggers them
through the MCU with the laser never enabled.
"""

from __future__ import annotations

import glob as glob_mod
import grp
import json
import logging
import os
import pwd
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

DEVICE_GROUPS = ("dialout", "gpio", "video")
DEVICE_PATTERNS = ("/dev/gpiochip*", "/dev/video*", "/dev/media*", "/dev/v4l-subdev*",
                   "/dev/dma_heap/*")
# Mean of a dark frame may differ from the configured black level by this many counts
# (dark current and read noise of a short dark exposure stay well below it).
BLACK_LEVEL_TOLERANCE = 6.0
# Frame intervals may differ from the trigger period by this fraction.
PERIOD_TOLERANCE = 0.05
TRIGGER_EXPOSURE_EXTRA_US = 14.26  # Raspberry Pi documentation, external trigger


@dataclass
class CheckResult:
    """One check: ``ok`` True, False, or None when it could not run (``detail`` says why)."""

    name: str
    ok: bool | None
    detail: str
    values: dict = field(default_factory=dict)


@dataclass
class CameraSample:
    """What a few triggered frames showed: the raw format the camera gave, the frames as
    16-bit pixel arrays as delivered (before any shift), their metadata, and the trigger
    settings that produced them."""

    raw_format: str
    platform: str  # "pi4" / "pi5" (picamera2's VC4 / PISP), or "" when unknown
    frames: list[np.ndarray]
    metadata: list[dict]
    period_us: float
    pulse_us: int
    exposure_us: int


class Probe:
    """The system as the checks see it. Every method is replaceable in tests."""

    def __init__(self, *, user: str | None = None, environ: Any = None,
                 camera_sampler: Callable[[], CameraSample] | None = None,
                 run: Callable[..., subprocess.CompletedProcess] = subprocess.run):
        self.user = user or pwd.getpwuid(os.getuid()).pw_name
        self.environ = os.environ if environ is None else environ
        self._camera_sampler = camera_sampler
        self._run = run

    def groups(self) -> set[str]:
        """The groups of ``user`` (primary and supplementary)."""
        entry = pwd.getpwnam(self.user)
        names = {g.gr_name for g in grp.getgrall() if self.user in g.gr_mem}
        names.add(grp.getgrgid(entry.pw_gid).gr_name)
        return names

    def glob(self, pattern: str) -> list[str]:
        return sorted(glob_mod.glob(pattern))

    def access_rw(self, path: str) -> bool:
        return os.access(path, os.R_OK | os.W_OK)

    def realpath(self, path: str) -> str | None:
        """Where a path leads, or None when it does not exist."""
        return os.path.realpath(path) if os.path.exists(path) else None

    def cwd(self) -> str:
        return os.getcwd()

    def writable_dir(self, path: str) -> bool:
        return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)

    def camera_sample(self) -> CameraSample:
        if self._camera_sampler is None:
            raise RuntimeError("no camera sampler (give the device configuration)")
        return self._camera_sampler()

    def clock_synchronised(self) -> bool | None:
        """``timedatectl``'s NTPSynchronized, or None when it cannot be asked."""
        try:
            out = self._run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                            capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        value = out.stdout.strip().lower()
        return {"yes": True, "no": False}.get(value)


# -- the checks --------------------------------------------------------------------------


def check_groups(probe: Probe, cfg: Any = None) -> CheckResult:
    have = probe.groups()
    missing = [g for g in DEVICE_GROUPS if g not in have]
    if missing:
        return CheckResult("groups", False,
                           f"user {probe.user} is not in {', '.join(missing)} "
                           f"(sudo usermod -a -G {','.join(missing)} {probe.user})",
                           {"missing": missing})
    return CheckResult("groups", True, f"user {probe.user} in {', '.join(DEVICE_GROUPS)}")


def check_device_nodes(probe: Probe, cfg: Any = None) -> CheckResult:
    problems, found = [], {}
    for pattern in DEVICE_PATTERNS:
        nodes = probe.glob(pattern)
        found[pattern] = len(nodes)
        if not nodes:
            problems.append(f"no {pattern}")
        denied = [n for n in nodes if not probe.access_rw(n)]
        if denied:
            problems.append(f"no read/write access to {denied[0]}")
    if problems:
        return CheckResult("device_nodes", False, "; ".join(problems), found)
    return CheckResult("device_nodes", True,
                       ", ".join(f"{n} {p}" for p, n in found.items()), found)


def check_udev_names(probe: Probe, cfg: Any) -> CheckResult:
    problems, targets = [], {}
    for what, port in (("laser MCU", cfg.laser.port), ("filter wheel", cfg.filter_wheel.port)):
        target = probe.realpath(port)
        targets[port] = target
        if target is None:
            problems.append(f"{what} port {port} does not exist (udev rule 99-nirf.rules; "
                            "udevadm info --query=property --name=/dev/ttyUSB0)")
        elif not os.path.basename(target).startswith("tty"):
            problems.append(f"{what} port {port} leads to {target}, not a tty")
    if problems:
        return CheckResult("udev_names", False, "; ".join(problems), targets)
    return CheckResult("udev_names", True,
                       ", ".join(f"{p} -> {t}" for p, t in targets.items()), targets)


def check_lgpio_dir(probe: Probe, cfg: Any = None) -> CheckResult:
    wd = probe.environ.get("LG_WD") or probe.cwd()
    leftovers = probe.glob("/.lgd-nfy*")
    problems = []
    if not probe.writable_dir(wd):
        problems.append(f"lgpio's directory {wd} is not writable: importing RPi.GPIO would fail "
                        "(set LG_WD to a writable directory; the unit uses /run/nirf)")
    if leftovers:
        problems.append(f"{leftovers[0]} left by an import as root in /; remove it")
    if problems:
        return CheckResult("lgpio_dir", False, "; ".join(problems), {"dir": wd})
    return CheckResult("lgpio_dir", True, f"notification FIFOs go to {wd}", {"dir": wd})


def _sample(probe: Probe) -> CameraSample | CheckResult:
    try:
        return probe.camera_sample()
    except Exception as err:  # a doctor reports, it does not crash
        return CheckResult("camera", None, f"no frames to check: {type(err).__name__}: {err}")


def check_raw_format(sample: CameraSample, cfg: Any) -> CheckResult:
    bits = cfg.camera.bits
    fmt = sample.raw_format
    depth = int("".join(ch for ch in fmt.split("_")[0] if ch.isdigit()) or 0)
    values = {"format": fmt, "platform": sample.platform}
    if "_" in fmt:
        return CheckResult("raw_format", False, f"packed or compressed raw {fmt}: ask for R{bits}",
                           values)
    stacked = np.stack([np.asarray(f, dtype=np.uint16) for f in sample.frames])
    low_bits = int(np.bitwise_or.reduce(stacked & ((1 << (16 - bits)) - 1), axis=None))
    top = int(stacked.max())
    values.update(max=top, low_bits_seen=low_bits != 0)
    if depth == 16 and bits < 16:
        if low_bits:
            return CheckResult("raw_format", False, f"{fmt} but the low {16 - bits} bits are set: "
                               "not left-aligned as the driver assumes", values)
        return CheckResult("raw_format", True, f"{fmt}: {bits}-bit values left-aligned (Pi 5)",
                           values)
    if depth == bits:
        if top > (1 << bits) - 1:
            return CheckResult("raw_format", False, f"{fmt} with values up to {top}, above "
                               f"{(1 << bits) - 1}: left-aligned data in a {bits}-bit format",
                               values)
        return CheckResult("raw_format", True, f"{fmt}: right-aligned (Pi 4)", values)
    return CheckResult("raw_format", False, f"raw {fmt}, expected R{bits} or R16", values)


def check_black_level(sample: CameraSample, cfg: Any) -> CheckResult:
    bits = cfg.camera.bits
    shift = 16 - bits if sample.raw_format.split("_")[0].endswith("16") and bits < 16 else 0
    means = [float(np.mean(np.asarray(f, dtype=np.uint16) >> shift)) for f in sample.frames]
    measured = float(np.median(means))
    configured = cfg.camera.black_level
    values = {"measured": round(measured, 2), "configured": configured}
    if abs(measured - configured) > BLACK_LEVEL_TOLERANCE:
        return CheckResult("black_level", False,
                           f"dark frames average {measured:.1f} counts, configured black_level "
                           f"is {configured} (within {BLACK_LEVEL_TOLERANCE:g}); the IMX296 "
                           "gives 60 at 10 bits", values)
    return CheckResult("black_level", True, f"dark frames average {measured:.1f}, configured "
                       f"{configured}", values)


def check_trigger(sample: CameraSample, cfg: Any = None) -> CheckResult:
    stamps = [int(md["SensorTimestamp"]) for md in sample.metadata]
    intervals_us = [(b - a) / 1000 for a, b in zip(stamps, stamps[1:])]
    values: dict = {"period_us": sample.period_us, "pulse_us": sample.pulse_us,
                    "exposure_from_pulse_us": sample.pulse_us + TRIGGER_EXPOSURE_EXTRA_US}
    if not intervals_us:
        return CheckResult("trigger", None, "fewer than two frames: no interval to check", values)
    # frames may be dropped: an interval is a whole number of periods
    ratios = [i / sample.period_us for i in intervals_us]
    worst = max(abs(r - round(r)) for r in ratios)
    values["worst_interval_error"] = round(worst, 3)
    problems = []
    if worst > PERIOD_TOLERANCE or min(round(r) for r in ratios) < 1:
        problems.append(f"frame intervals {[round(i) for i in intervals_us]} us are not multiples "
                        f"of the trigger period {sample.period_us:g} us: the sensor is not in "
                        "external trigger mode (options imx296 trigger_mode=1)")
    reported = [int(md.get("ExposureTime", 0)) for md in sample.metadata]
    values["metadata_exposure_us"] = reported[-1]
    if reported[-1] < sample.exposure_us * 0.99:
        problems.append(f"metadata say {reported[-1]} us for a {sample.exposure_us} us exposure: "
                        "clipped by FrameDurationLimits")
    if problems:
        return CheckResult("trigger", False, "; ".join(problems), values)
    return CheckResult("trigger", True,
                       f"frames every {sample.period_us:g} us as triggered; exposure = pulse "
                       f"{sample.pulse_us} us + {TRIGGER_EXPOSURE_EXTRA_US} us", values)


def check_clock(probe: Probe, cfg: Any = None) -> CheckResult:
    synced = probe.clock_synchronised()
    if synced is None:
        return CheckResult("clock", None, "cannot ask timedatectl whether the clock is synchronised")
    if not synced:
        return CheckResult("clock", False, "the wall clock is not synchronised (no real-time clock "
                           "on a Pi: case times would be wrong); check systemd-timesyncd")
    return CheckResult("clock", True, "wall clock synchronised")


SYSTEM_CHECKS = (check_groups, check_device_nodes, check_udev_names, check_lgpio_dir)
CAMERA_CHECKS = (check_raw_format, check_black_level, check_trigger)


def run_checks(probe: Probe, cfg: Any, *, camera: bool = True) -> list[CheckResult]:
    """Every check, in order; the camera ones share one sample of frames."""
    results = [check(probe, cfg) for check in SYSTEM_CHECKS]
    if camera:
        sample = _sample(probe)
        if isinstance(sample, CheckResult):
            results.append(sample)
        else:
            results.extend(check(sample, cfg) for check in CAMERA_CHECKS)
    results.append(check_clock(probe, cfg))
    return results


def sample_with_picamera2(camera: Any, start_triggers: Callable[[int, float], None],
                          stop_triggers: Callable[[], None], *, raw_format: str,
                          exposure_us: int, fps: float, frames: int = 6,
                          timeout_s: float = 2.0) -> CameraSample:
    """Configure a Picamera2-like ``camera`` for ``raw_format`` with the frame duration
    open, have ``start_triggers(pulse_us, fps)`` trigger it, and keep ``frames`` raw frames
    as delivered. The laser is never involved."""
    controls = {"ExposureTime": int(exposure_us), "AnalogueGain": 1.0, "AeEnable": False,
                "FrameDurationLimits": (int(exposure_us), 1_000_000)}
    config = camera.create_video_configuration(raw={"format": raw_format}, controls=controls)
    camera.configure(config)
    applied = (camera.camera_configuration() or {}).get("raw", {})
    fmt = str(applied.get("format", raw_format))
    width, height = (int(v) for v in applied.get("size", (0, 0)))
    platform = getattr(camera, "platform", None)
    name = str(getattr(platform, "name", platform or "")).upper()
    pulse_us = max(1, int(exposure_us) - int(TRIGGER_EXPOSURE_EXTRA_US))
    camera.start()
    kept, metadata = [], []
    try:
        start_triggers(pulse_us, fps)
        for _ in range(frames):
            request = camera.capture_request(wait=timeout_s)
            try:
                raw = np.asarray(request.make_array("raw"))
                metadata.append(request.get_metadata())
            finally:
                request.release()
            px = np.ascontiguousarray(raw).view("<u2") if raw.dtype == np.uint8 else raw
            kept.append(np.array(px[:height or None, :width or None], dtype=np.uint16))
    finally:
        stop_triggers()
        camera.stop()
    return CameraSample(fmt, "pi5" if "PISP" in name else "pi4" if "VC4" in name else "",
                        kept, metadata, 1e6 / fps, pulse_us, int(exposure_us))


def cart_camera_sampler(cfg: Any) -> Callable[[], CameraSample]:
    """The sampler for the cart: picamera2, the laser MCU and the filter wheel from the
    configuration. The wheel turns to its blocked slot and the MCU triggers dark frames
    (modulation off, laser never enabled), so the frames show the black level alone."""

    def sample() -> CameraSample:
        import serial  # pyserial, a run-time dependency

        from nirf.drivers.camera import picamera2_factory
        from nirf.drivers.fw102c import Fw102cWheel
        from nirf.drivers.laser_mcu import McuLaser

        wheel = Fw102cWheel(lambda: serial.Serial(cfg.filter_wheel.port,
                                                  cfg.filter_wheel.baudrate, timeout=0.05))
        wheel.connect()
        try:
            wheel.move(cfg.filter_wheel.blocked_position)
        finally:
            wheel.close()
        laser = McuLaser(lambda: serial.Serial(cfg.laser.port, cfg.laser.baudrate, timeout=0.05))
        laser.connect()
        camera = picamera2_factory(0)
        try:
            return sample_with_picamera2(
                camera, lambda pulse_us, fps: laser.start_frames(fps, pulse_us, modulate=False),
                laser.stop_frames, raw_format=f"{'SRGGB' if cfg.camera.colour else 'R'}{cfg.camera.bits}",
                exposure_us=cfg.camera.exposure_us, fps=cfg.camera.fps)
        finally:
            camera.close()
            laser.close()

    return sample


def format_results(results: list[CheckResult]) -> str:
    mark = {True: "ok  ", False: "FAIL", None: "skip"}
    return "\n".join(f"{mark[r.ok]}  {r.name:<13} {r.detail}" for r in results)


def doctor_command(args: Any, cfg: Any, *, probe: Probe | None = None) -> int:
    """``nirfctl doctor``: 0 when every check passed, 1 when one failed (skipped checks do
    not fail it)."""
    if probe is None:
        camera = getattr(args, "camera", True) and cfg.profile != "sim"
        probe = Probe(camera_sampler=cart_camera_sampler(cfg) if camera else None)
    else:
        camera = True
    results = run_checks(probe, cfg, camera=camera and not getattr(args, "no_camera", False))
    if getattr(args, "json", False):
        print(json.dumps([asdict(r) for r in results], default=str))
    else:
        print(format_results(results))
    return 1 if any(r.ok is False for r in results) else 0
