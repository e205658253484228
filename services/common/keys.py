"""CURVE keys and roles (PROTOCOL: keys under ``<state_dir>/keys``).

* ``server.key`` / ``server.key_secret``: the cart's key pair;
* ``operators/*.key``: public keys allowed to change state;
* ``observers/*.key``: public keys allowed to read only;
* ``local-operator.key`` / ``.key_secret``: the identity the CLI on the cart uses by default.

Files are pyzmq certificate files. Secret key files are written with mode 0600 and never
logged; public ones 0644. :class:`KeyRing` answers the ZAP authenticator's question "is this key allowed?"
and the command server's "which role has it?", and re-reads the folders when they change.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

import zmq
import zmq.auth

from nirf.hal.errors import ConfigError

log = logging.getLogger(__name__)

OPERATOR = "operator"
OBSERVER = "observer"
ROLES = (OPERATOR, OBSERVER)
ZAP_DOMAIN = "nirf"
RELOAD_CHECK_S = 1.0
_KEY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def keys_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "keys"


def _secure(path: Path) -> None:
    os.chmod(path, 0o600)


def create_keypair(folder: Path, name: str) -> tuple[Path, Path]:
    """Create ``name.key`` and ``name.key_secret`` in ``folder`` (secret 0600, public
    0644: a public key is meant to be handed out)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old)
    _secure(Path(secret))
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


def authorise(state_dir: Path, public_key_file: Path, role: str, name: str | None = None) -> Path:
    """Copy a public key file into the role's folder (operators/ or observers/)."""
    if role not in ROLES:
        raise ConfigError(f"role {role!r}: allowed {', '.join(ROLES)}")
    public_key_file = Path(public_key_file)
    try:
        public, secret = zmq.auth.load_certificate(str(public_key_file))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{public_key_file}: not a readable public key file ({err})") from err
    if secret is not None or public_key_file.name.endswith("_secret"):
        raise ConfigError(f"{public_key_file}: this is a secret key file; authorise the public .key file")
    key_name = name or public_key_file.stem
    # The name becomes a file name in the role's folder: no way out of that folder.
    if not _KEY_NAME.fullmatch(key_name):
        raise ConfigError(f"key name {key_name!r}: allowed letters, digits, '.', '_' and '-' "
                          "(at most 64, not starting with '.')")
    dest_dir = keys_dir(state_dir) / (role + "s")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / (key_name + ".key")
    # Copy then rename, so the running cart never reads a half-written key file.
    tmp = dest_dir / (key_name + ".key.tmp")
    shutil.copyfile(public_key_file, tmp)
    os.replace(tmp, dest)
    return dest


def ensure_sim_keys(state_dir: Path) -> None:
    """Create the server pair and the local operator's pair if missing (sim profile and
    first set-up on a device)."""
    kd = keys_dir(state_dir)
    kd.mkdir(parents=True, exist_ok=True, mode=0o700)
    for sub in ("operators", "observers"):
        (kd / sub).mkdir(exist_ok=True)
    if not (kd / "server.key_secret").exists():
        create_keypair(kd, "server")
        log.info("created the cart's key pair in %s", kd)
    if not (kd / "local-operator.key_secret").exists():
        create_keypair(kd, "local-operator")
    if not (kd / "operators" / "local-operator.key").exists():
        shutil.copyfile(kd / "local-operator.key", kd / "operators" / "local-operator.key")


DISPLAY_KEY_NAME = "display"


def ensure_display_key(state_dir: Path) -> Path:
    """Create the surgical display's key pair (``display.key`` / ``display.key_secret``) if
    missing and list its public key under ``observers/``; return the secret key file.
    The display only reads, so it is never an operator."""
    kd = keys_dir(state_dir)
    kd.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = kd / f"{DISPLAY_KEY_NAME}.key_secret"
    if not secret.exists():
        create_keypair(kd, DISPLAY_KEY_NAME)
        log.info("created the display's observer key pair in %s", kd)
    listed = kd / "observers" / f"{DISPLAY_KEY_NAME}.key"
    if not listed.exists():
        listed.parent.mkdir(exist_ok=True)
        shutil.copyfile(kd / f"{DISPLAY_KEY_NAME}.key", listed)
    return secret


def give_display_its_key(state_dir: Path, uid: int, gid: int) -> Path:
    """On the device the display runs as a user of its own (``nirf-display``): hand it its
    secret key and nothing else. The display's ``.key_secret`` becomes that user's (0600);
    every other secret key stays the cart user's (0600); ``keys/`` and the state folder
    let it reach a file it knows the name of (0711) without listing them. Root only; the
    installer calls it, and again after a key is replaced. Returns the display's key."""
    kd = keys_dir(state_dir)
    secret = ensure_display_key(state_dir)
    for folder in (Path(state_dir), kd):
        mode = os.stat(folder).st_mode & 0o777
        os.chmod(folder, (mode & 0o770) | 0o711)  # others: traverse only (no r, no w)
    for path in kd.glob("*.key_secret"):
        if path != secret:
            os.chmod(path, 0o600)
    for public in (kd / "server.key", kd / f"{DISPLAY_KEY_NAME}.key"):
        os.chmod(public, 0o644)
    os.chown(secret, uid, gid)
    os.chmod(secret, 0o600)
    return secret


def load_server_keys(state_dir: Path) -> tuple[bytes, bytes]:
    path = keys_dir(state_dir) / "server.key_secret"
    if not path.exists():
        raise ConfigError(f"{path}: the cart's secret key is missing; run the key set-up "
                          "(nirfctl keys init) or start the sim profile once")
    public, secret = zmq.auth.load_certificate(str(path))
    return public, secret


def load_client_keys(path: Path) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ConfigError(f"{path}: no secret key in this file; give the .key_secret file")
    return public, secret


class KeyRing:
    """Allowed public keys with their roles, re-read when the folders change."""

    def __init__(self, state_dir: Path, clock=time.monotonic):
        self.dir = keys_dir(state_dir)
        self._clock = clock
        self._lock = threading.Lock()
        self._roles: dict[bytes, tuple[str, str]] = {}
        self._stamp = None
        self._checked = -1e9
        # Counts reloads that removed a key (or changed its role): whoever holds open
        # connections (the telemetry publisher) drops them all when it changes (C7).
        self.revocations = 0
        self.reload()

    def _folder_stamp(self):
        stamp = []
        for role in ROLES:
            d = self.dir / (role + "s")
            try:
                entries = sorted((p.name, p.stat().st_mtime_ns) for p in d.glob("*.key"))
            except OSError:
                entries = []
            stamp.append((role, tuple(entries)))
        return tuple(stamp)

    def reload(self) -> None:
        """Read both folders again now."""
        # The stamp is taken before reading: a file that changes while we read makes the
        # next check see a difference and read again, rather than being missed for good.
        stamp = self._folder_stamp()
        roles: dict[bytes, tuple[str, str]] = {}
        for role in ROLES:
            for path in sorted((self.dir / (role + "s")).glob("*.key")):
                try:
                    public, _ = zmq.auth.load_certificate(str(path))
                except (OSError, ValueError) as err:
                    log.warning("ignoring unreadable key file %s: %s", path.name, err)
                    continue
                # operator wins if a key is listed in both folders
                if public not in roles or role == OPERATOR:
                    roles[public] = (role, path.stem)
        with self._lock:
            if any(roles.get(k) != v for k, v in self._roles.items()):
                self.revocations += 1
            self._roles = roles
            self._stamp = stamp
        log.info("key ring: %d operator(s), %d observer(s)",
                 sum(1 for r, _ in roles.values() if r == OPERATOR),
                 sum(1 for r, _ in roles.values() if r == OBSERVER))

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        if self._folder_stamp() != self._stamp:
            self.reload()

    def check(self) -> int:
        """Re-read the folders if they changed (at most once a second); the revocation count."""
        self._maybe_reload()
        return self.revocations

    def lookup(self, z85_public: bytes) -> tuple[str, str] | None:
        """(role, key name) of an allowed key, else None."""
        self._maybe_reload()
        with self._lock:
            return self._roles.get(bytes(z85_public))

    # the pyzmq authenticator's credentials-provider interface
    def callback(self, domain: str, z85_public: bytes) -> bool:
        return domain == ZAP_DOMAIN and self.lookup(z85_public) is not None


def start_authenticator(ctx: zmq.Context, ring: KeyRing):
    """Start a ZAP authenticator thread that admits only the ring's keys."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("nirf.zap"))
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=ring)
    return auth


def make_curve_server(sock: zmq.Socket, server_public: bytes, server_secret: bytes) -> None:
    """CURVE server with ZAP enforced: without an authenticator nobody connects."""
    sock.curve_server = True
    sock.curve_publickey = server_public
    sock.curve_secretkey = server_secret
    sock.zap_domain = ZAP_DOMAIN.encode()
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def make_curve_client(sock: zmq.Socket, server_public: bytes, client_public: bytes, client_secret: bytes) -> None:
    sock.curve_serverkey = server_public
    sock.curve_publickey = client_public
    sock.curve_secretkey = client_secret
