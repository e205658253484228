"""The systemd units and the install script: what the units promise (notify, watchdog,
restart, hardening, devices), `systemd-analyze verify` on a copy whose executables exist,
the offline security score, and `bash -n` / shellcheck on the install script."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from nirf import config as config_mod
ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "systemd"
INSTALL_SCRIPT = ROOT / "install" / "install-pi.sh"
SERVICES = ("nirf-safety.service", "nirf-imaging.service", "nirf-gateway.service", "nirf-study.service",
            "nirf-processing.service", "nirf-recorder.service")
TARGET = "nirf.target"
# every service shipped, the core ones and optional ones (a display) alike
ALL_SERVICES = tuple(sorted(p.name for p in UNIT_DIR.glob("nirf-*.service")))
VENV_BIN = "/opt/nirf/venv/bin/"
MAX_EXPOSURE = 4.0
TOOL_TIMEOUT_S = 60


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> every value given (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not key=value"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert values, f"[{section}] {key}= missing"
    return values[-1]


@pytest.fixture(scope="module")
def units() -> dict[str, dict]:
    return {name: parse_unit(UNIT_DIR / name) for name in (*ALL_SERVICES, TARGET)}


def project_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


# ---------------------------------------------------------------------- what the units say
@pytest.mark.parametrize("name", ALL_SERVICES)
def test_service_is_notify_with_watchdog_and_restart(units, name):
    u = units[name]
    assert one(u, "Service", "Type") == "notify"
    assert one(u, "Service", "NotifyAccess") == "main"
    watchdog = one(u, "Service", "WatchdogSec")
    assert re.fullmatch(r"\d+s", watchdog) and int(watchdog[:-1]) > 0
    assert one(u, "Service", "Restart") == "on-failure"
    # start limits: a unit that keeps failing stops being restarted
    assert int(one(u, "Unit", "StartLimitBurst")) > 1
    assert int(one(u, "Unit", "StartLimitIntervalSec")) > 0
    assert one(u, "Unit", "PartOf") == TARGET
    assert one(u, "Install", "WantedBy") == TARGET


@pytest.mark.parametrize("name", SERVICES)
def test_service_hardening(units, name):
    s = units[name]["Service"]
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes",
        "DevicePolicy": "closed", "StateDirectory": "nirf", "ConfigurationDirectory": "nirf",
        "RuntimeDirectory": "nirf", "RuntimeDirectoryPreserve": "yes", "User": "nirf",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert s.get(key, [None])[-1] == value, f"{name}: {key}= should be {value!r}"


@pytest.mark.parametrize("name", SERVICES)
def test_service_runs_the_venv_script_with_the_device_config(units, name):
    u = units[name]
    exec_start = one(u, "Service", "ExecStart").split()
    assert exec_start[0] == VENV_BIN + name.removesuffix(".service")
    assert exec_start[1:] == ["--config", "%E/nirf/device.toml"]
    env = dict(item.split("=", 1) for item in one(u, "Service", "Environment").split())
    # the names config.Config.state_dir() and runtime_dir() read
    assert env["NIRF_STATE_DIR"] == "%S/nirf"
    assert env["NIRF_RUNTIME_DIR"] == "%t/nirf"


@pytest.mark.parametrize("name", SERVICES)
def test_service_script_is_declared_in_pyproject(name):
    script = name.removesuffix(".service")
    scripts = project_scripts()
    if script == "nirf-recorder" and script not in scripts:
        pytest.skip("the recorder's entry point (nirf-recorder) is not in pyproject.toml yet; "
                    "the install script skips its unit until it is")
    assert script in scripts, f"{script} is not a console script of the project"


def test_each_process_reaches_only_its_devices(units):
    """The safety core: the MCU's serial port and GPIO; imaging: the wheel's serial port and
    every device libcamera opens; nobody else any device. Only the gateway faces a network."""
    wanted = {"nirf-safety.service": (("ttyUSB", "ttyACM", "ttyAMA", "gpiochip"), {"dialout", "gpio"}),
              "nirf-imaging.service": (("ttyUSB", "ttyACM", "video4linux", "media", "dma_heap"), {"dialout", "video"})}
    for name, (groups, supplementary) in wanted.items():
        s = units[name]["Service"]
        allowed = " ".join(s["DeviceAllow"])
        for group in groups:
            assert f"char-{group} rw" in allowed, f"{name} cannot open char-{group}"
        assert set(s["SupplementaryGroups"][-1].split()) == supplementary
        assert "PrivateDevices" not in s  # it would hide the serial ports, GPIO and the camera
        assert s["PrivateNetwork"][-1] == "yes"  # Unix sockets only
    assert "char-video4linux rw" not in " ".join(units["nirf-safety.service"]["Service"]["DeviceAllow"])
    assert "char-gpiochip rw" not in " ".join(units["nirf-imaging.service"]["Service"]["DeviceAllow"])
    for name in ("nirf-gateway.service", "nirf-study.service", "nirf-processing.service", "nirf-recorder.service"):
        s = units[name]["Service"]
        assert "DeviceAllow" not in s and "SupplementaryGroups" not in s
        assert s["PrivateDevices"][-1] == "yes"
        if name != "nirf-gateway.service":
            assert s["PrivateNetwork"][-1] == "yes"  # ipc sockets only


def test_target_pulls_in_the_core_services(units):
    wants = one(units[TARGET], "Unit", "Wants").split()
    assert set(SERVICES) <= set(wants)
    assert one(units[TARGET], "Install", "WantedBy") == "multi-user.target"


def test_device_profile_is_valid_and_names_real_device_settings():
    cfg = config_mod.load("device")
    assert cfg.profile == "device"
    assert cfg.laser.port.startswith("/dev/") and cfg.filter_wheel.port.startswith("/dev/")
    assert cfg.safety.footswitch_required and cfg.safety.reset_requires_key_cycle


# ---------------------------------------------------------------------- systemd-analyze
def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    return tool


@pytest.fixture(scope="module")
def unit_copy(tmp_path_factory) -> Path:
    """The units with ExecStart pointing at stand-in executables that exist here
    (verify refuses a unit whose executable is missing)."""
    base = tmp_path_factory.mktemp("units")
    bin_dir = base / "bin"
    bin_dir.mkdir()
    units = base / "units"
    units.mkdir()
    for path in UNIT_DIR.iterdir():
        if path.suffix not in (".service", ".target"):
            continue
        text = path.read_text()
        for script in set(re.findall(re.escape(VENV_BIN) + r"([\w.-]+)", text)):
            stub = bin_dir / script
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(stub.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        (units / path.name).write_text(text.replace(VENV_BIN, str(bin_dir) + "/"))
    return units


def _verify(tool: str, folder: Path, names: list[str]) -> subprocess.CompletedProcess:
    # the trailing colon keeps the system's unit path after ours (for After=udev etc.)
    env = {"SYSTEMD_UNIT_PATH": f"{folder}:", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    return subprocess.run([tool, "verify", "--man=no", *names], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)


def _complaints(result: subprocess.CompletedProcess, folder: Path) -> list[str]:
    """Lines about our units (verify reports parse problems on stderr with exit status 0)."""
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if str(folder) in line or "nirf" in line]


def test_systemd_analyze_verify_passes(unit_copy):
    tool = _analyze()
    names = sorted(p.name for p in unit_copy.iterdir())
    assert set(SERVICES) | {TARGET} <= set(names)
    result = _verify(tool, unit_copy, names)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _complaints(result, unit_copy) == [], result.stdout + result.stderr


def test_verify_would_catch_a_broken_unit(unit_copy, tmp_path):
    """The check above can fail: a misspelt key and a wrong type are reported."""
    tool = _analyze()
    broken = tmp_path / "units"
    shutil.copytree(unit_copy, broken)
    path = broken / "nirf-processing.service"
    text = path.read_text().replace("WatchdogSec=", "WatchdgSec=").replace("Type=notify", "Type=notifyy")
    path.write_text(text)
    result = _verify(tool, broken, ["nirf-processing.service"])
    complaints = _complaints(result, broken)
    assert any("WatchdgSec" in line for line in complaints), result.stdout + result.stderr
    assert any("notifyy" in line for line in complaints), result.stdout + result.stderr


@pytest.mark.parametrize("name", ALL_SERVICES)
def test_security_exposure_at_most_4(unit_copy, name):
    tool = _analyze()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    help_text = subprocess.run([tool, "security", "--help"], capture_output=True, text=True, env=env,
                               timeout=TOOL_TIMEOUT_S).stdout
    if "--offline" not in help_text:
        pytest.skip("this systemd-analyze has no security --offline (systemd 250 or newer needed)")
    result = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(unit_copy / name)],
                            cwd=unit_copy, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, result.stdout


# ---------------------------------------------------------------------- the install script
def test_install_script_syntax():
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run([bash, "-n", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                            timeout=TOOL_TIMEOUT_S)
    assert result.returncode == 0, result.stderr


def test_install_script_shellcheck():
    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.skip("shellcheck is not installed here")
    result = subprocess.run([tool, "-x", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                            cwd=INSTALL_SCRIPT.parent, timeout=TOOL_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_script_steps_are_guarded():
    """Idempotence, checked where a repeated run could do harm: it never recreates the
    user, never overwrites an edited configuration, keeps the venv's system packages and
    the apt numpy, and creates keys only through the command that keeps existing ones."""
    text = INSTALL_SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert re.search(r"getent passwd \"\$SERVICE_USER\".*\n\s+useradd", text)
    assert re.search(r"if \[\[ ! -e \"\$CONF_FILE\" \]\]", text)
    assert "--system-site-packages" in text
    assert re.search(r"numpy==", text) and "--constraint" in text
    assert "python3-picamera2" in text and "rpi-lgpio" in text.lower()
    assert "keys init" in text
    assert "usermod -a -G" in text
    # every core unit the script installs is in the folder it copies from
    for unit in (*SERVICES, TARGET):
        assert (UNIT_DIR / unit).exists()



def test_the_display_sees_no_secret_key_but_its_own(units):
    """C5: the display faces the network without authentication; its unit lays an empty
    folder over keys/ and puts back only its own pair and the cart's public key."""
    s = units["nirf-display.service"]["Service"]
    assert any(v.startswith("%S/nirf/keys") for v in s["TemporaryFileSystem"])
    shown = " ".join(s["BindReadOnlyPaths"]).split()
    assert sorted(p.rsplit("/", 1)[-1] for p in shown) == ["display.key", "display.key_secret", "server.key"]
    # and it runs as a user of its own, which the installer hands its key (test_keys.py
    # reads the keys as such a user)
    assert s["User"] == ["nirf-display"] and s["Group"] == ["nirf-display"]
    script = INSTALL_SCRIPT.read_text()
    assert "DISPLAY_USER=nirf-display" in script and "give_display_its_key" in script
    for name in ALL_SERVICES:
        if name != "nirf-display.service":
            assert "BindReadOnlyPaths" not in units[name]["Service"] or "keys" not in " ".join(
                units[name]["Service"]["BindReadOnlyPaths"])


# ---------------------------------------------------------------------- devices and lgpio
RULES = UNIT_DIR / "99-nirf.rules"


def device_unit_name(path: str) -> str:
    """systemd's name for the .device unit of a /dev path (slashes become dashes, a dash
    inside a name is escaped as \\x2d)."""
    parts = path.strip("/").split("/")
    return "-".join(p.replace("-", "\\x2d") for p in parts) + ".device"


def udev_links() -> dict[str, str]:
    """SYMLINK+= of each rule in the shipped rules file, by what it matches."""
    links = {}
    for line in RULES.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        # every assignment and match is KEY OP "value"
        pairs = re.findall(r'([A-Z_]+(?:\{[^}]+\})?)\s*(==|!=|\+=|=)\s*"([^"]*)"', line)
        assert pairs, f"not a udev rule: {line!r}"
        rule = {(k, op): v for k, op, v in pairs}
        if ("SYMLINK", "+=") in rule:
            assert rule.get(("TAG", "+=")) == "systemd", f"{line!r}: systemd must see the link"
            links[rule[("ENV{ID_SERIAL}", "==")]] = "/dev/" + rule[("SYMLINK", "+=")]
    return links


def test_udev_rules_name_the_ports_the_config_uses():
    links = udev_links()
    assert len(links) == 2
    cfg = config_mod.load("device")
    assert set(links.values()) == {cfg.laser.port, cfg.filter_wheel.port}


def test_units_wait_for_the_udev_named_ports(units):
    """A slow USB adapter must not use up a unit's restarts: the safety core starts once the
    laser MCU's port exists (After=) and is bound to it; imaging waits for the wheel's."""
    cfg = config_mod.load("device")
    laser, wheel = device_unit_name(cfg.laser.port), device_unit_name(cfg.filter_wheel.port)
    safety = units["nirf-safety.service"]["Unit"]
    assert laser in " ".join(safety["After"]).split()
    assert laser in one(units["nirf-safety.service"], "Unit", "BindsTo").split()
    imaging = units["nirf-imaging.service"]["Unit"]
    assert wheel in " ".join(imaging["After"]).split()
    assert wheel in one(units["nirf-imaging.service"], "Unit", "Wants").split()
    assert "BindsTo" not in imaging  # a loose wheel cable must not stop imaging


def test_the_safety_core_gives_lgpio_a_writable_directory(units):
    """rpi-lgpio's lgpio makes its FIFO in $LG_WD or the working directory at import; under
    ProtectSystem=strict only the runtime directory is writable."""
    s = units["nirf-safety.service"]["Service"]
    env = dict(item.split("=", 1) for item in one(units["nirf-safety.service"], "Service",
                                                   "Environment").split())
    runtime = "%t/" + one(units["nirf-safety.service"], "Service", "RuntimeDirectory")
    assert env["LG_WD"] == runtime
    assert s["WorkingDirectory"][-1] == runtime
    assert s["ProtectSystem"][-1] == "strict"


def test_install_script_checks_imports_away_from_root_and_installs_the_rules():
    text = INSTALL_SCRIPT.read_text()
    # the import check runs in a scratch folder with LG_WD there, as the service user
    check = re.search(r'\(cd "\$CHECK_DIR" && runuser -u "\$SERVICE_USER" -- env LG_WD="\$CHECK_DIR"', text)
    assert check, "the import check must not run from / (lgpio would leave /.lgd-nfy0)"
    assert 'CHECK_DIR="$(mktemp -d)"' in text
    assert '99-nirf.rules' in text and "udevadm control --reload" in text


def test_install_script_offline_needs_no_index_nor_build_backend_download():
    text = INSTALL_SCRIPT.read_text()
    offline = re.search(r'if \[\[ \$RUN_APT -eq 0 \]\]; then\n(.*?)\nfi', text, re.S)
    assert offline, "no offline branch for pip"
    assert "--no-index" in offline.group(1) and "--no-build-isolation" in offline.group(1)
    assert "python3-setuptools" in text
    # every pip install goes through the one command line that carries the offline flags
    assert not re.search(r'"\$VENV/bin/pip" install(?!.*PIP=)', text.replace("PIP=(\"$VENV/bin/pip\" install", ""))
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    # Debian bookworm's python3-setuptools (66) must satisfy the build requirement
    floor = [r for r in build if r.startswith("setuptools")][0]
    assert int(re.search(r">=(\d+)", floor).group(1)) <= 66
