"""Configuration: TOML profiles (``sim``, ``device``), read once at start and validated here,
in one place.

Every key the cart understands is declared in :data:`SCHEMA` with its type, allowed range and
default. A profile file may set any of them; an unknown section or key, a wrong type or a
value out of range stops the start with a :class:`~hal.errors.ConfigError` whose message
names the file, the key, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nirf.hal.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = CONFIG_DIR.parent
PROFILES = ("sim", "device")


@dataclass(frozen=True)
class Spec:
    kind: type | tuple  # float, int, bool, str, list, dict
    default: Any
    lo: float | None = None
    hi: float | None = None
    choices: tuple | None = None
    doc: str = ""

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.lo is not None and self.hi is not None:
            return f"{self.lo} to {self.hi}"
        name = self.kind.__name__ if isinstance(self.kind, type) else "value"
        return f"a {name}"


def _f(default, lo, hi, doc=""):
    return Spec(float, default, lo, hi, doc=doc)


def _i(default, lo, hi, doc=""):
    return Spec(int, default, lo, hi, doc=doc)


def _b(default, doc=""):
    return Spec(bool, default, doc=doc)


def _s(default, choices=None, doc=""):
    return Spec(str, default, choices=choices, doc=doc)


# section -> key -> Spec. Bounds come from the product's safety requirements where it
# gives them (emission delay 1-10 s, heartbeat 100-1000 ms, irradiance <= 150 mW/cm2,
# emission <= 1800 s, temperature <= 60 C).
SCHEMA: dict[str, dict[str, Spec]] = {
    "cart": {
        "profile": _s("sim", PROFILES),
        "state_dir": _s("", doc="empty: $NIRF_STATE_DIR, else the profile's default"),
        "runtime_dir": _s("", doc="empty: $NIRF_RUNTIME_DIR, else a default"),
    },
    "bus": {
        "control_endpoint": _s("tcp://127.0.0.1:5560"),
        "telemetry_endpoint": _s("tcp://127.0.0.1:5561"),
        "max_message_bytes": _i(65536, 1024, 1 << 20),
        "status_rate_hz": _f(2.0, 2.0, 50.0),
        "preview_rate_hz": _f(20.0, 0.5, 30.0),
    },
    "safety": {
        "emission_delay_s": _f(2.0, 1.0, 10.0),
        "footswitch_required": _b(False),
        "boot_requires_key_cycle": _b(False),
        "reset_requires_key_cycle": _b(False),
        "heartbeat_timeout_ms": _i(500, 100, 1000),
        "heartbeat_interval_ms": _i(100, 20, 500, "S16: at most half of heartbeat_timeout_ms"),
        "supervisor_rate_hz": _f(20.0, 20.0, 200.0, "the backstop tick: input edges and MCU events act at once"),
        "camera_stall_s": _f(1.0, 0.2, 5.0),
        "output_tolerance": _f(0.2, 0.05, 0.2),
        "output_settle_s": _f(0.2, 0.0, 1.0),
        "idle_output_limit_mw": _f(2.0, 0.1, 10.0),
    },
    "laser": {
        "port": _s("", doc="serial device; empty in the sim profile (the emulator's pty)"),
        "baudrate": _i(115200, 9600, 1_000_000),
        "max_power_mw": _f(200.0, 1.0, 500.0),
        "beam_peak_to_mean": _f(2.0, 1.0, 10.0),
        "field_area_cm2": _f(20.0, 0.5, 1000.0),
        "irradiance_limit_mw_cm2": _f(50.0, 1.0, 150.0),
        "max_emission_s": _f(300.0, 1.0, 1800.0),
        "max_temp_c": _f(45.0, 20.0, 60.0),
        "full_scale_mw": _f(500.0, 1.0, 1000.0, "nominal optical mW at duty 1.0"),
        "duty_ceiling": _f(0.8, 0.01, 1.0, "the MCU's own ceiling, set at calibration"),
        "command_timeout_s": _f(0.2, 0.02, 2.0),
        "command_retries": _i(3, 0, 5),
    },
    "filter_wheel": {
        "port": _s(""),
        "baudrate": _i(115200, 9600, 115200),
        "move_timeout_s": _f(5.0, 0.5, 30.0),
        "emission_position": _i(1, 1, 12),
        "open_position": _i(2, 1, 12),
        "blocked_position": _i(3, 1, 12),
    },
    "camera": {
        "exposure_us": _i(10_000, 100, 1_000_000),
        "gain": _f(1.0, 1.0, 16.0),
        "fps": _f(30.0, 1.0, 60.0),
        "width": _i(1456, 16, 4096),
        "height": _i(1088, 16, 4096),
        "bits": _i(10, 8, 16),
        "black_level": _i(16, 0, 4096),
        "colour": _b(False, "a colour sensor: 2x2 Bayer cells are summed"),
    },
    "gpio": {
        "key_pin": _i(17, 0, 27),
        "interlock_pin": _i(27, 0, 27),
        "footswitch_pin": _i(22, 0, 27),
        "indicator_pin": _i(23, 0, 27),
        "white_light_pin": _i(24, 0, 27),
        "debounce_ms": _i(20, 0, 200),
    },
    "processing": {
        "sbr_threshold": _f(2.0, 1.0, 100.0),
        "saturation_limit": _f(0.0, 0.0, 1.0, "largest fraction of an ROI at full scale in a valid result (0: any saturated pixel invalidates)"),
        "intensity_floor_cps_mw": _f(50.0, 0.0, 1e6, "a positive call needs at least this intensity, counts/s/mW (no-ICG autofluorescence reads ~2, ICG tumor ~1,190)"),
        "cnr_floor": _f(3.0, 0.0, 1000.0, "a positive call needs at least this CNR (Rose criterion)"),
        "motion_limit_px": _f(1.0, 0.0, 100.0, "largest shift between consecutive laser-on frames in a valid result, px"),
        "background_min_snr": _f(10.0, 0.0, 1e6, "the background mean must be at least this many standard errors of itself"),
        "capture_requires_calibration": _b(False, "a capture needs a valid flat field and a passed QC of the day (always so in the device profile)"),
        "average_pairs": _i(1, 1, 64),
        "preview_downsample": _i(8, 1, 32),
        "signal_roi": Spec(list, [], doc="[x, y, w, h]; empty: automatic"),
        "background_roi": Spec(list, [], doc="[x, y, w, h]; empty: automatic"),
    },
    "study": {
        "imaging_window_h": Spec(list, [18.0, 30.0], doc="[earliest, latest] hours after injection"),
        "fixed_dose_mg": _f(25.0, 0.1, 100.0),
        "dose_mg_per_kg": _f(0.25, 0.01, 5.0),
        "centre_id": _s("CENTRE-01", doc="the centre this cart belongs to (on every record)"),
        "cart_id": _s("", doc="this cart's id on every record; empty: the host name"),
        "case_id_pattern": _s(r"^[A-Z]{2,6}-[0-9]{3,5}$", doc="regular expression a pseudonymous case id must match"),
        "close_as": _s("exclude", choices=("exclude", "positive", "negative"), doc="how a close margin enters the 2x2 tables"),
        "indeterminate_as": _s("exclude", choices=("exclude", "positive", "negative"), doc="how an indeterminate margin enters the 2x2 tables"),
        "bootstrap_resamples": _i(2000, 100, 100_000, "resamples of the AUC's cluster bootstrap"),
        "bootstrap_seed": _i(20240501, 0, 2**31 - 1, "seed of the AUC's cluster bootstrap"),
    },
    "calibration": {
        "qc_intensity_tolerance": _f(0.10, 0.01, 0.5, "daily QC passes with intensity within this fraction of the baseline"),
        "qc_sbr_tolerance": _f(0.05, 0.01, 0.5, "daily QC passes with SBR within this fraction of the baseline"),
        "qc_results": _i(16, 1, 256, "valid results averaged per QC measurement"),
    },
    "recorder": {
        "reserve_mb": _i(256, 0, 100_000, "free disk space a capture may not eat into (keeps room for the case database)"),
        "buffer_mb": _i(1024, 16, 16_384, "memory holding one capture's frames until it is committed"),
        "pixel_size_um": _f(0.0, 0.0, 10_000.0, "size of one pixel in the field (micrometres); 0: not calibrated, left out of the files"),
    },
    "dicom": {
        "enabled": _b(False, "write each capture as DICOM and send it to the research PACS"),
        "uid_root": _s("", doc="the cart's DICOM UID root (digits and dots); required when enabled"),
        "pacs_host": _s("127.0.0.1", doc="research PACS address"),
        "pacs_port": _i(104, 1, 65535, "research PACS DICOM port"),
        "pacs_ae_title": _s("ORTHANC", doc="the PACS's application entity title"),
        "ae_title": _s("NIRFCART", doc="the cart's own application entity title"),
        "institution": _s("", doc="InstitutionName written in the files; empty: left out"),
        "retry_initial_s": _f(2.0, 0.1, 600.0, "first wait after a failed send; doubles per failure"),
        "retry_max_s": _f(300.0, 1.0, 3600.0, "longest wait between two attempts"),
        "timeout_s": _f(10.0, 1.0, 120.0, "network timeout of one association"),
    },
    "display": {
        "bind_address": _s("127.0.0.1", doc="the surgical display's HTTP address; 0.0.0.0 on the device"),
        "port": _i(8080, 1, 65535),
        "stale_after_s": _f(1.0, 0.2, 10.0, "no fresh frame or status for this long: the page says STALE"),
        "max_update_hz": _f(25.0, 1.0, 60.0, "at most this many pushes per second to one browser"),
        "max_clients": _i(8, 1, 64, "browsers served at once; more get 503"),
        "key_file": _s("", doc="observer secret key; empty: <state_dir>/keys/display.key_secret"),
    },
    "sim": {
        "seed": _i(12345, 0, 2**31 - 1),
        "laser_max_mw": _f(500.0, 1.0, 1000.0),
        "k_fluo": _f(0.0265, 0.0, 10.0),
        "wheel_step_s": _f(0.3, 0.0, 2.0),
        "mcu_max_on_s": _f(1800.0, 1.0, 3600.0),
    },
}


class Section:
    """Read-only attribute access to one validated section."""

    def __init__(self, name: str, values: dict):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key: str):
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"config section [{self._name}] has no key {key!r}") from None

    def __setattr__(self, key, value):
        raise AttributeError("configuration is read-only")

    def as_dict(self) -> dict:
        return dict(self._values)


class Config:
    """The validated configuration. Sections are attributes: ``cfg.safety.emission_delay_s``."""

    def __init__(self, source: str, values: dict[str, dict], raw_bytes: bytes = b""):
        self.source = source
        self._values = values
        self.sha256 = hashlib.sha256(raw_bytes).hexdigest()
        for name, section in values.items():
            setattr(self, name, Section(name, section))

    def as_dict(self) -> dict:
        return {k: dict(v) for k, v in self._values.items()}

    @property
    def profile(self) -> str:
        return self._values["cart"]["profile"]

    def state_dir(self) -> Path:
        """``$NIRF_STATE_DIR`` when set, else the configured one, else the profile's
        default: ``/var/lib/nirf`` on the device; for the simulator ``var/sim`` in a
        source checkout, and the user's state folder (``$XDG_STATE_HOME/nirf/sim``, else
        ``~/.local/state/nirf/sim``) when the cart is installed, so an installed cart never
        writes into its own installation."""
        env = os.environ.get("NIRF_STATE_DIR")
        if env:
            return Path(env)
        if self.cart.state_dir:
            return Path(self.cart.state_dir)
        if self.profile == "device":
            return Path("/var/lib/nirf")
        if running_from_checkout():
            return PROJECT_ROOT / "var" / "sim"
        return user_state_home() / "nirf" / "sim"

    def runtime_dir(self) -> Path:
        env = os.environ.get("NIRF_RUNTIME_DIR")
        if env:
            return Path(env)
        if self.cart.runtime_dir:
            return Path(self.cart.runtime_dir)
        if self.profile == "device":
            return Path("/run/nirf")
        return self.state_dir() / "run"


def running_from_checkout(root: Path = PROJECT_ROOT) -> bool:
    """Whether this code runs from a source checkout (the project file sits beside the
    packages) rather than from an installation (site-packages has no pyproject.toml)."""
    return (root / "pyproject.toml").is_file() and (root / "Makefile").is_file()


def user_state_home() -> Path:
    """The user's state folder: ``$XDG_STATE_HOME`` when it is an absolute path (the XDG
    base directory rule), else ``~/.local/state``."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    return Path.home() / ".local" / "state"


def _check(file: str, section: str, key: str, spec: Spec, value: Any) -> Any:
    where = f"{file}: [{section}] {key} = {value!r}"
    if spec.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, allowed {spec.describe()}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: not a finite number, allowed {spec.describe()}")
    elif spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, allowed {spec.describe()}")
    elif spec.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value
    elif spec.kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, allowed {spec.describe()}")
        if spec.choices and value not in spec.choices:
            raise ConfigError(f"{where}: not allowed, allowed {spec.describe()}")
        return value
    elif spec.kind is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return value
    if spec.lo is not None and not spec.lo <= value <= spec.hi:
        raise ConfigError(f"{where}: out of range, allowed {spec.describe()}")
    return value


def _check_rois(file: str, values: dict) -> None:
    for key in ("signal_roi", "background_roi"):
        roi = values["processing"][key]
        if roi and (len(roi) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in roi)
                    or roi[2] < 1 or roi[3] < 1):
            raise ConfigError(f"{file}: [processing] {key} = {roi!r}: expected [] or [x, y, w, h], whole numbers >= 0, w and h >= 1")
    win = values["study"]["imaging_window_h"]
    if (len(win) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in win)
            or not 0 <= win[0] < win[1] <= 96):
        raise ConfigError(f"{file}: [study] imaging_window_h = {win!r}: expected [earliest, latest] hours, 0 <= earliest < latest <= 96")


_UID_ROOT_MAX = 40  # leaves 24 characters of the 64 for the cart's own suffixes
_AE_TITLE_MAX = 16


def _check_dicom(file: str, d: dict) -> None:
    """A UID root is dot-separated numbers without leading zeros (PS3.5 9.1); AE titles
    are 1-16 printable characters without backslash."""
    root = d["uid_root"]
    if root or d["enabled"]:
        parts = root.split(".")
        if (not root or len(root) > _UID_ROOT_MAX
                or not all(p.isdigit() and p.isascii() and (p == "0" or not p.startswith("0")) for p in parts)):
            raise ConfigError(
                f"{file}: [dicom] uid_root = {root!r}: expected dot-separated numbers without leading zeros "
                f"(such as '1.2.826.0.1.3680043.10.1234'), at most {_UID_ROOT_MAX} characters"
                + ("; required when enabled = true" if d["enabled"] else ""))
    for key in ("pacs_ae_title", "ae_title"):
        ae = d[key]
        if not 1 <= len(ae.strip()) <= _AE_TITLE_MAX or len(ae) > _AE_TITLE_MAX or "\\" in ae \
                or not all(32 <= ord(ch) < 127 for ch in ae):
            raise ConfigError(f"{file}: [dicom] {key} = {ae!r}: expected 1 to {_AE_TITLE_MAX} printable "
                              f"ASCII characters without backslash")
    if d["retry_initial_s"] > d["retry_max_s"]:
        raise ConfigError(f"{file}: [dicom] retry_initial_s = {d['retry_initial_s']!r}: must not exceed "
                          f"retry_max_s ({d['retry_max_s']})")


def _check_consistency(file: str, v: dict) -> None:
    """Rules that tie keys together."""
    laser = v["laser"]
    if laser["max_power_mw"] > laser["full_scale_mw"] * laser["duty_ceiling"]:
        raise ConfigError(
            f"{file}: [laser] max_power_mw = {laser['max_power_mw']!r}: above what the MCU's duty ceiling allows "
            f"({laser['full_scale_mw'] * laser['duty_ceiling']:.1f} mW = full_scale_mw x duty_ceiling)")
    # no irradiance check here: that limit is applied per setpoint (a max power above it is
    # only unusable, not unsafe)
    bus = v["bus"]
    if bus["control_endpoint"] == bus["telemetry_endpoint"]:
        raise ConfigError(
            f"{file}: [bus] telemetry_endpoint = {bus['telemetry_endpoint']!r}: the same as control_endpoint; "
            "the gateway binds both, so they need different ports")
    s = v["safety"]
    if s["heartbeat_interval_ms"] * 2 > s["heartbeat_timeout_ms"]:
        raise ConfigError(
            f"{file}: [safety] heartbeat_interval_ms = {s['heartbeat_interval_ms']!r}: must be at most half of "
            f"heartbeat_timeout_ms ({s['heartbeat_timeout_ms']})")
    _check_dicom(file, v["dicom"])
    cam = v["camera"]
    if cam["exposure_us"] >= 1e6 / cam["fps"]:
        raise ConfigError(
            f"{file}: [camera] exposure_us = {cam['exposure_us']!r}: must be shorter than a frame at "
            f"fps = {cam['fps']} ({1e6 / cam['fps']:.0f} us)")


def validate(data: dict, file: str = "<config>") -> dict[str, dict]:
    """Check a parsed TOML map against :data:`SCHEMA`; return every key with its value
    (defaults filled in)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a table at the top level")
    values: dict[str, dict] = {}
    for section, specs in SCHEMA.items():
        given = data.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"{file}: [{section}] must be a table, got {given!r}")
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise ConfigError(
                f"{file}: [{section}] {unknown[0]} = {given[unknown[0]]!r}: unknown key; "
                f"known keys are {', '.join(sorted(specs))}")
        values[section] = {key: _check(file, section, key, spec, given[key]) if key in given else spec.default
                           for key, spec in specs.items()}
    unknown_sections = sorted(set(data) - set(SCHEMA))
    if unknown_sections:
        raise ConfigError(f"{file}: [{unknown_sections[0]}]: unknown section; known sections are "
                          f"{', '.join(SCHEMA)}")
    _check_rois(file, values)
    _check_consistency(file, values)
    return values


def profile_path(profile: str) -> Path:
    if profile not in PROFILES:
        raise ConfigError(f"profile {profile!r}: unknown, allowed one of {', '.join(PROFILES)}")
    return CONFIG_DIR / f"{profile}.toml"


def load(profile_or_path: str | os.PathLike = "sim") -> Config:
    """Load and validate a profile by name (``sim``, ``device``) or a TOML file by path."""
    text = str(profile_or_path)
    path = profile_path(text) if text in PROFILES else Path(text)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the configuration: {err.strerror}") from err
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    return Config(str(path), validate(data, str(path)), raw)
