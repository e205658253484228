#!/usr/bin/env bash
# Install or update the NIRF cart software on a Raspberry Pi (Raspberry Pi OS Bookworm,
# 64-bit, Lite). Run it as root from a copy of the project:
#
#     sudo ./install/install-pi.sh            # install, or update after a new copy
#     sudo ./install/install-pi.sh --no-apt   # offline update: no apt, no package index
#     sudo ./install/install-pi.sh --no-apt --wheelhouse DIR   # offline, new wheels from DIR
#
# --no-apt touches no network: apt is skipped, pip uses no package index (only what is
# installed, or the wheels in DIR) and builds the project with the setuptools already
# installed (python3-setuptools) instead of fetching a build backend. A first install
# needs the network once (without --no-apt).
#
# Safe to run again: every step first looks at what is there and changes only what is
# missing or out of date. It never overwrites a configuration a technician has edited and
# never replaces existing keys. It does not start the cart: the first start follows the
# bring-up checklist in docs/operations.md.
#
# What it does, in order:
#   1. system packages from apt (picamera2 and libcamera come from Raspberry Pi OS only)
#   2. the service user `nirf` in the dialout, gpio and video groups
#   3. a virtual environment that sees the system's packages (picamera2, numpy)
#   4. the project and rpi-lgpio into it, with numpy pinned to the system's version
#   5. /etc/nirf (configuration) and /var/lib/nirf (state)
#   6. the cart's first key pair and the local operator's
#   7. the camera's external trigger mode, set when its driver loads
#   8. the udev rules naming the serial ports (/dev/nirf/laser, /dev/nirf/wheel)
#   9. the systemd units, enabled (not started)
set -euo pipefail

PREFIX=/opt/nirf
VENV="$PREFIX/venv"
CONF_DIR=/etc/nirf
CONF_FILE="$CONF_DIR/device.toml"
STATE_DIR=/var/lib/nirf
UNIT_DIR=/etc/systemd/system
SERVICE_USER=nirf
DISPLAY_USER=nirf-display   # the surgical display: its own user, its own key only
DEVICE_GROUPS=(dialout gpio video)
# picamera2 and libcamera come from here (Raspberry Pi OS), never from PyPI.
APT_PACKAGES=(
    python3 python3-venv python3-pip
    python3-picamera2 python3-libcamera python3-numpy
    python3-lgpio            # the C library and binding rpi-lgpio drives
    python3-setuptools python3-wheel   # the build backend, so offline updates need no index
    rpicam-apps-lite         # rpicam-hello --list-cameras, for the bring-up checks
    systemd-timesyncd        # the wall clock in case records and TIFF metadata
)

SRC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$SRC_DIR/install/$(basename "${BASH_SOURCE[0]}")"
# Every path below is absolute; run from / so the commands run as the service user never
# start in a folder they cannot read, nor import the source copy instead of the installed one.
cd /
RUN_APT=1
WHEELHOUSE=""

say() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf 'install-pi: %s\n' "$*" >&2; exit 1; }

usage() {
    # the comment block at the top of this file, without the comment marks
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SELF"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-apt) RUN_APT=0 ;;
        --wheelhouse)
            [[ $# -ge 2 && -d "$2" ]] || die "--wheelhouse needs a folder of wheels"
            WHEELHOUSE="$(cd "$2" && pwd)"
            shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

# ---------------------------------------------------------------------------- checks
[[ $(id -u) -eq 0 ]] || die "run as root: sudo $SELF"
[[ -f "$SRC_DIR/pyproject.toml" && -d "$SRC_DIR/systemd" ]] \
    || die "run this script from a copy of the project (no pyproject.toml in $SRC_DIR)"
if [[ -r /etc/os-release ]]; then
    # shellcheck disable=SC1091  # a system file, not part of the project
    . /etc/os-release
    if [[ "${VERSION_CODENAME:-}" != "bookworm" ]]; then
        note "warning: written for Raspberry Pi OS Bookworm; this is ${PRETTY_NAME:-unknown}"
    fi
fi
if ! grep -qi "raspberry pi" /proc/device-tree/model 2>/dev/null; then
    note "warning: this does not look like a Raspberry Pi; the camera and GPIO will not work here"
fi

# ---------------------------------------------------------------------------- 1. apt
if [[ $RUN_APT -eq 1 ]]; then
    say "system packages"
    # apt-get install does nothing for a package that is already at its candidate version
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    # no recommends: they pull in a desktop (Qt, OpenGL) the headless cart does not need
    apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
else
    say "system packages: skipped (--no-apt)"
fi

# ---------------------------------------------------------------------------- 2. user
say "service user '$SERVICE_USER'"
for group in "${DEVICE_GROUPS[@]}"; do
    # Raspberry Pi OS has all three; create one only where an image lacks it
    getent group "$group" >/dev/null || groupadd --system "$group"
done
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "NIRF imaging cart" "$SERVICE_USER"
    note "created"
fi
if ! getent passwd "$DISPLAY_USER" >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "NIRF cart surgical display" "$DISPLAY_USER"
    note "created $DISPLAY_USER"
fi
# -a adds to the groups the user already has; repeating it changes nothing
usermod -a -G "$(IFS=,; echo "${DEVICE_GROUPS[*]}")" "$SERVICE_USER"
note "groups: $(id -nG "$SERVICE_USER")"

# ---------------------------------------------------------------------------- 3. venv
say "virtual environment in $VENV"
install -d -m 0755 "$PREFIX"
if [[ ! -x "$VENV/bin/python" ]]; then
    # --system-site-packages: picamera2 and libcamera's bindings exist only as apt
    # packages, and the apt numpy is the one they were built against
    python3 -m venv --system-site-packages "$VENV"
    note "created"
elif ! grep -q '^include-system-site-packages = true' "$VENV/pyvenv.cfg"; then
    die "$VENV exists without system site packages; remove it and run this script again"
fi

# ---------------------------------------------------------------------------- 4. packages
say "the cart software and rpi-lgpio"
SYSTEM_NUMPY="$(/usr/bin/python3 -c 'import numpy; print(numpy.__version__)')" \
    || die "the system numpy (python3-numpy) does not import; run without --no-apt"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
# pip must never bring a numpy of its own: one built for another ABI than the apt
# picamera2's compiled helpers (simplejpeg) breaks the camera at import
printf 'numpy==%s\n' "$SYSTEM_NUMPY" >"$CONSTRAINTS"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check --constraint "$CONSTRAINTS")
if [[ $RUN_APT -eq 0 ]]; then
    # Offline: no package index, and no isolated build environment (pip would download
    # setuptools into it); the build backend is the system's python3-setuptools.
    PIP+=(--no-index --no-build-isolation)
    [[ -n "$WHEELHOUSE" ]] && PIP+=(--find-links "$WHEELHOUSE")
    "$VENV/bin/python" -c 'import setuptools.build_meta' 2>/dev/null \
        || die "offline: setuptools is not installed (python3-setuptools); run once without --no-apt"
fi
# Dependencies first (already satisfied ones are left alone), then the project itself,
# reinstalled every time so a new copy of the code replaces the old one even when the
# version number did not change.
"${PIP[@]}" "${SRC_DIR}[pi]" \
    || die "installing the dependencies failed (offline: are they installed, or in --wheelhouse?)"
"${PIP[@]}" --no-deps --force-reinstall "$SRC_DIR"
# The check runs as the service user in a scratch folder, never in / (or the source copy):
# importing rpi-lgpio makes lgpio create its FIFO .lgd-nfy* in LG_WD or the working folder,
# and the project must come from the venv, not from the folder the check starts in.
CHECK_DIR="$(mktemp -d)"
chmod 0755 "$CHECK_DIR"
trap 'rm -rf "$CONSTRAINTS" "$CHECK_DIR"' EXIT
chown "$SERVICE_USER" "$CHECK_DIR"
(cd "$CHECK_DIR" && runuser -u "$SERVICE_USER" -- env LG_WD="$CHECK_DIR" "$VENV/bin/python" - <<'EOF') \
    || die "the virtual environment is incomplete (see the error above)"
import numpy, serial, zmq, msgpack
import nirf.config, nirf.controller.main, nirf.services.imaging.main, nirf.services.gateway.main, nirf.services.study.main, nirf.services.processing.main
print(f"    numpy {numpy.__version__}, pyzmq {zmq.__version__}, pyserial {serial.__version__}")
try:
    import RPi.GPIO, picamera2  # noqa: F401  (both only import on a Pi)
    print("    picamera2 and RPi.GPIO (rpi-lgpio) import")
except Exception as err:  # not fatal here: reported for the bring-up checklist
    print(f"    warning: picamera2 or RPi.GPIO does not import: {err}")
EOF
install -d -m 0755 "$PREFIX/docs"
install -m 0644 "$SRC_DIR/docs/"*.md "$PREFIX/docs/"

# ---------------------------------------------------------------------------- 5. folders
say "configuration in $CONF_DIR, state in $STATE_DIR"
# root owns the configuration; the services only read it (their group may)
install -d -o root -g "$SERVICE_USER" -m 0750 "$CONF_DIR"
if [[ ! -e "$CONF_FILE" ]]; then
    install -o root -g "$SERVICE_USER" -m 0640 "$SRC_DIR/config/device.toml" "$CONF_FILE"
    note "installed $CONF_FILE: set the serial ports and pins for this cart"
elif ! cmp -s "$SRC_DIR/config/device.toml" "$CONF_FILE"; then
    # never overwrite a technician's edits: leave the new version beside it
    install -o root -g "$SERVICE_USER" -m 0640 "$SRC_DIR/config/device.toml" "$CONF_FILE.dist"
    note "kept your $CONF_FILE; the shipped version is in $CONF_FILE.dist (compare with diff)"
fi
install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$STATE_DIR"
runuser -u "$SERVICE_USER" -- env NIRF_STATE_DIR="$STATE_DIR" "$VENV/bin/python" \
    -c 'import sys, config; config.load(sys.argv[1]); print("    " + sys.argv[1] + " is valid")' "$CONF_FILE" \
    || die "$CONF_FILE is not valid (the message above names the key and the allowed range)"

# ---------------------------------------------------------------------------- 6. keys
say "keys"
# creates the cart's pair and the local operator's only when they are missing
runuser -u "$SERVICE_USER" -- env NIRF_STATE_DIR="$STATE_DIR" \
    "$VENV/bin/nirfctl" --config "$CONF_FILE" keys init
# the surgical display's read-only (observer) key, also only when missing
runuser -u "$SERVICE_USER" -- "$VENV/bin/python" -c '
import sys
from pathlib import Path
from nirf.services.common import keys
ensure = getattr(keys, "ensure_display_key", None)  # versions without a display have none
if ensure is not None:
    ensure(Path(sys.argv[1]))
' "$STATE_DIR"
# hand the display its own secret key, and only that one (root: a chown)
"$VENV/bin/python" -c '
import pwd, sys
from pathlib import Path
from nirf.services.common import keys
user = pwd.getpwnam(sys.argv[2])
keys.give_display_its_key(Path(sys.argv[1]), user.pw_uid, user.pw_gid)
' "$STATE_DIR" "$DISPLAY_USER"
note "the display ($DISPLAY_USER) reads its own key only"
note "technicians' keys: see 'Adding a technician's key' in $PREFIX/docs/operations.md"

# ---------------------------------------------------------------------------- 7. trigger
say "camera external trigger"
# The MCU triggers every exposure. The controller runs with /sys read-only
# (ProtectKernelTunables=), so the IMX296 driver is told at load time instead.
MODPROBE_CONF=/etc/modprobe.d/nirf-imx296.conf
MODPROBE_WANTED="$(mktemp)"
trap 'rm -rf "$CONSTRAINTS" "$CHECK_DIR" "$MODPROBE_WANTED"' EXIT
printf '%s\n' "# NIRF cart: the laser MCU triggers each exposure on XTR (install-pi.sh)" \
    "options imx296 trigger_mode=1" >"$MODPROBE_WANTED"
if cmp -s "$MODPROBE_WANTED" "$MODPROBE_CONF"; then
    note "already set in $MODPROBE_CONF"
else
    install -m 0644 "$MODPROBE_WANTED" "$MODPROBE_CONF"
    note "written to $MODPROBE_CONF; takes effect at the next boot"
fi

# ---------------------------------------------------------------------------- 8. udev
say "udev rules for the serial ports"
UDEV_RULES=/etc/udev/rules.d/99-nirf.rules
if cmp -s "$SRC_DIR/systemd/99-nirf.rules" "$UDEV_RULES"; then
    note "already in $UDEV_RULES"
else
    install -m 0644 "$SRC_DIR/systemd/99-nirf.rules" "$UDEV_RULES"
    udevadm control --reload
    # name the adapters already plugged in, so the units' device dependencies are met
    udevadm trigger --subsystem-match=tty --action=add
    note "installed $UDEV_RULES"
fi

# ---------------------------------------------------------------------------- 9. units
say "systemd units"
install -m 0644 "$SRC_DIR/systemd/nirf.target" "$UNIT_DIR/nirf.target"
wanted=()
# Every service shipped in systemd/ (the core ones and optional ones such as a display,
# which join nirf.target through their own WantedBy=), but only when the program it
# starts exists in this version: a unit without its program would fail at every boot.
for unit in "$SRC_DIR"/systemd/nirf-*.service; do
    name="$(basename "$unit")"
    program="$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$unit" | head -n 1)"
    if [[ ! -x "$program" ]]; then
        note "skipping $name: this version has no $program"
        continue
    fi
    install -m 0644 "$unit" "$UNIT_DIR/$name"
    wanted+=("$name")
done
systemctl daemon-reload
# enable only creates the links that are missing
systemctl enable nirf.target "${wanted[@]}"

say "done"
cat <<EOF
    Next steps (docs/operations.md, 'First start' and 'Bring-up checklist'):
      1. ls -l /dev/nirf/ shows laser and wheel (else adjust $UDEV_RULES: udevadm info);
         edit $CONF_FILE: GPIO pins
      2. sudo systemctl start nirf.target
      3. journalctl -u nirf-safety -f           and       systemctl status nirf.target
      4. sudo -u $SERVICE_USER $VENV/bin/nirfctl doctor   (groups, devices, camera, clock)
    After an update of a running cart:  sudo systemctl restart nirf.target
    (never while a patient is being imaged: a restart turns the laser off).
EOF
