"""CURVE keys and the key ring (PRODUCT C1, C3): secret files are private, public keys are
authorised by copying them into a role's folder, and the ring follows the folders while the
server runs - proven here in-process through real sockets and the real ZAP authenticator."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.auth

from nirf.hal.errors import ConfigError
from nirf.services.common import keys
from nirf.services.gateway.bus import CommandServer
from tests.cartproc import free_port

REPLY_TIMEOUT_S = 1.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------------- key files
def test_a_new_key_pair_has_a_private_secret_file(tmp_path):
    public, secret = keys.create_keypair(tmp_path / "alice", "alice")
    assert _mode(secret) == 0o600
    # the public half is meant to be handed around; it must at least be readable by us
    assert _mode(public) & 0o400
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert sec is not None and pub == zmq.auth.load_certificate(str(public))[0]


def test_the_secret_file_is_private_even_under_a_permissive_umask(tmp_path):
    old = os.umask(0o000)
    try:
        _, secret = keys.create_keypair(tmp_path, "bob")
    finally:
        os.umask(old)
    assert _mode(secret) == 0o600


def test_sim_key_setup_makes_every_secret_private_and_lists_the_local_operator(tmp_path):
    keys.ensure_sim_keys(tmp_path)
    kd = keys.keys_dir(tmp_path)
    for name in ("server.key_secret", "local-operator.key_secret"):
        assert _mode(kd / name) == 0o600, name
    listed, _ = zmq.auth.load_certificate(str(kd / "operators" / "local-operator.key"))
    assert listed == zmq.auth.load_certificate(str(kd / "local-operator.key"))[0]
    # no secret key anywhere in the role folders
    for sub in ("operators", "observers"):
        assert not list((kd / sub).glob("*_secret"))


def test_sim_key_setup_keeps_existing_keys(tmp_path):
    keys.ensure_sim_keys(tmp_path)
    first = keys.load_server_keys(tmp_path)
    keys.ensure_sim_keys(tmp_path)
    assert keys.load_server_keys(tmp_path) == first


def test_the_display_key_is_private_and_an_observer(tmp_path):
    secret = keys.ensure_display_key(tmp_path)
    assert _mode(secret) == 0o600
    ring = keys.KeyRing(tmp_path)
    public, _ = zmq.auth.load_certificate(str(secret))
    assert ring.lookup(public) == (keys.OBSERVER, keys.DISPLAY_KEY_NAME)


def test_missing_server_key_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="server.key_secret.*keys init"):
        keys.load_server_keys(tmp_path)


def test_a_public_file_is_not_a_client_identity(tmp_path):
    public, _ = keys.create_keypair(tmp_path, "carol")
    with pytest.raises(ConfigError, match="no secret key"):
        keys.load_client_keys(public)


# ---------------------------------------------------------------------- authorising
def test_authorise_copies_the_public_key_into_the_role_folder(tmp_path):
    public, _ = keys.create_keypair(tmp_path / "out", "dave")
    dest = keys.authorise(tmp_path / "state", public, keys.OBSERVER)
    assert dest == keys.keys_dir(tmp_path / "state") / "observers" / "dave.key"
    assert dest.read_bytes() == public.read_bytes()
    renamed = keys.authorise(tmp_path / "state", public, keys.OPERATOR, name="dave-tablet")
    assert renamed.name == "dave-tablet.key" and renamed.parent.name == "operators"
    # nothing half-written is left behind
    assert not list(keys.keys_dir(tmp_path / "state").rglob("*.tmp"))


def test_authorise_refuses_a_secret_key_file(tmp_path):
    _, secret = keys.create_keypair(tmp_path / "out", "erin")
    with pytest.raises(ConfigError, match="secret key file"):
        keys.authorise(tmp_path / "state", secret, keys.OPERATOR)
    assert not (keys.keys_dir(tmp_path / "state") / "operators").exists()


@pytest.mark.parametrize("role", ["admin", "operators", ""])
def test_authorise_refuses_an_unknown_role(tmp_path, role):
    public, _ = keys.create_keypair(tmp_path / "out", "frank")
    with pytest.raises(ConfigError, match="allowed operator, observer"):
        keys.authorise(tmp_path / "state", public, role)


@pytest.mark.parametrize("name", ["../operators/evil", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_authorise_refuses_a_name_that_leaves_the_role_folder(tmp_path, name):
    public, _ = keys.create_keypair(tmp_path / "out", "gina")
    with pytest.raises(ConfigError, match="key name"):
        keys.authorise(tmp_path / "state", public, keys.OBSERVER, name=name)
    assert not (keys.keys_dir(tmp_path / "state") / "operators").exists()


def test_authorise_refuses_a_file_that_is_not_a_key(tmp_path):
    junk = tmp_path / "junk.key"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="junk.key"):
        keys.authorise(tmp_path / "state", junk, keys.OPERATOR)


# ---------------------------------------------------------------------- the key ring
class StepClock:
    """A monotonic clock for the ring that moves only when told."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_ring_gives_each_listed_key_its_role(tmp_path):
    keys.ensure_sim_keys(tmp_path)
    obs_pub, _ = keys.create_keypair(tmp_path / "out", "olga")
    keys.authorise(tmp_path, obs_pub, keys.OBSERVER)
    ring = keys.KeyRing(tmp_path)
    op = zmq.auth.load_certificate(str(keys.keys_dir(tmp_path) / "local-operator.key"))[0]
    obs = zmq.auth.load_certificate(str(obs_pub))[0]
    stranger = zmq.auth.load_certificate(str(keys.create_keypair(tmp_path / "out", "x")[0]))[0]
    assert ring.lookup(op) == (keys.OPERATOR, "local-operator")
    assert ring.lookup(obs) == (keys.OBSERVER, "olga")
    assert ring.lookup(stranger) is None
    assert ring.callback(keys.ZAP_DOMAIN, op) and ring.callback(keys.ZAP_DOMAIN, obs)
    assert not ring.callback(keys.ZAP_DOMAIN, stranger)
    # the ring answers only for the cart's own ZAP domain
    assert not ring.callback("*", op)


def test_a_key_in_both_folders_is_an_operator(tmp_path):
    public, _ = keys.create_keypair(tmp_path / "out", "hank")
    keys.authorise(tmp_path, public, keys.OBSERVER)
    keys.authorise(tmp_path, public, keys.OPERATOR)
    ring = keys.KeyRing(tmp_path)
    assert ring.lookup(zmq.auth.load_certificate(str(public))[0])[0] == keys.OPERATOR


def test_an_unreadable_key_file_is_skipped_not_fatal(tmp_path):
    public, _ = keys.create_keypair(tmp_path / "out", "ivan")
    keys.authorise(tmp_path, public, keys.OPERATOR)
    (keys.keys_dir(tmp_path) / "operators" / "broken.key").write_text("garbage\n")
    ring = keys.KeyRing(tmp_path)
    assert ring.lookup(zmq.auth.load_certificate(str(public))[0]) == (keys.OPERATOR, "ivan")


def test_the_ring_follows_the_folders_at_most_once_per_check_interval(tmp_path):
    keys.ensure_sim_keys(tmp_path)
    clock = StepClock()
    ring = keys.KeyRing(tmp_path, clock=clock)
    public, _ = keys.create_keypair(tmp_path / "out", "judy")
    z85 = zmq.auth.load_certificate(str(public))[0]
    assert ring.lookup(z85) is None  # this lookup starts a check interval

    dest = keys.authorise(tmp_path, public, keys.OBSERVER)
    clock.t += keys.RELOAD_CHECK_S / 2
    assert ring.lookup(z85) is None  # not re-read inside the interval
    clock.t += keys.RELOAD_CHECK_S
    assert ring.lookup(z85) == (keys.OBSERVER, "judy")

    dest.unlink()
    clock.t += keys.RELOAD_CHECK_S * 1.1
    assert ring.lookup(z85) is None

    # moving a key from one folder to the other changes its role
    keys.authorise(tmp_path, public, keys.OPERATOR)
    clock.t += keys.RELOAD_CHECK_S * 1.1
    assert ring.lookup(z85) == (keys.OPERATOR, "judy")


# ---------------------------------------------------------------------- through real sockets
class Server:
    """A CommandServer with the real key ring and ZAP authenticator on a free port."""

    def __init__(self, state_dir: Path, handlers: dict):
        keys.ensure_sim_keys(state_dir)
        self.state_dir = state_dir
        self.ctx = zmq.Context()
        self.ring = keys.KeyRing(state_dir)
        self.auth = keys.start_authenticator(self.ctx, self.ring)
        self.server_keys = keys.load_server_keys(state_dir)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.server = CommandServer(self.ctx, self.endpoint, self.server_keys, self.ring, handlers)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.server.serve, args=(self.stop_event, 20), daemon=True)
        self.thread.start()
        self.auth_running = True

    def stop_authenticator(self) -> None:
        self.auth.stop()
        self.auth_running = False

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=2.0)
        if self.auth_running:
            self.auth.stop()
        self.server.close()
        self.ctx.destroy(linger=0)


def ask(server: Server, key_file: Path, cmd: str = "ping", args: dict | None = None,
        timeout_s: float = REPLY_TIMEOUT_S) -> dict | None:
    """One request on a fresh REQ socket; the reply map, or None when nothing came back."""
    pub, sec = zmq.auth.load_certificate(str(key_file))
    sock = server.ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    keys.make_curve_client(sock, server.server_keys[0], pub, sec)
    sock.connect(server.endpoint)
    try:
        body = {"id": "k1", "cmd": cmd}
        if args is not None:
            body["args"] = args
        sock.send(msgpack.packb(body))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        return msgpack.unpackb(sock.recv())
    finally:
        sock.close(linger=0)


def ask_until(server: Server, key_file: Path, want_answer: bool, within_s: float) -> bool:
    """Ask with fresh sockets until the answer's presence matches ``want_answer``, for at
    most ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if (ask(server, key_file, timeout_s=0.5) is not None) == want_answer:
            return True
        time.sleep(0.05)  # between attempts only; the loop ends at the deadline
    return False


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "state", {"ping": lambda a, c: {"pong": True, "role": c.role, "name": c.name}})
    yield s
    s.close()


def test_the_local_operator_is_answered_with_its_role(server):
    reply = ask(server, keys.keys_dir(server.state_dir) / "local-operator.key_secret")
    assert reply is not None and reply["ok"], reply
    assert reply["result"] == {"pong": True, "role": keys.OPERATOR, "name": "local-operator"}


def test_a_key_authorised_while_running_connects_and_a_removed_one_stops(server, tmp_path):
    public, secret = keys.create_keypair(tmp_path / "tech", "kim")
    assert ask(server, secret) is None  # not listed yet: no answer at all

    listed = keys.authorise(server.state_dir, public, keys.OBSERVER)
    assert ask_until(server, secret, want_answer=True, within_s=4 * keys.RELOAD_CHECK_S + 2)
    reply = ask(server, secret)
    assert reply["result"]["role"] == keys.OBSERVER and reply["result"]["name"] == "kim"

    listed.unlink()
    assert ask_until(server, secret, want_answer=False, within_s=4 * keys.RELOAD_CHECK_S + 2)


def test_a_connection_opened_before_removal_loses_access_too(server, tmp_path):
    """ZAP runs once per connection; the server itself must also drop a removed key."""
    public, secret = keys.create_keypair(tmp_path / "tech", "lee")
    listed = keys.authorise(server.state_dir, public, keys.OPERATOR)
    assert ask_until(server, secret, want_answer=True, within_s=4 * keys.RELOAD_CHECK_S + 2)

    pub, sec = zmq.auth.load_certificate(str(secret))
    sock = server.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    keys.make_curve_client(sock, server.server_keys[0], pub, sec)
    sock.connect(server.endpoint)
    try:
        sock.send_multipart([b"", msgpack.packb({"id": "before", "cmd": "ping"})])
        assert sock.poll(2000), "the open connection was not answered while the key was listed"
        assert msgpack.unpackb(sock.recv_multipart()[-1])["id"] == "before"

        listed.unlink()
        answered_after_removal = None
        deadline = time.monotonic() + 4 * keys.RELOAD_CHECK_S + 2
        i = 0
        while time.monotonic() < deadline:
            i += 1
            sock.send_multipart([b"", msgpack.packb({"id": f"after{i}", "cmd": "ping"})])
            if not sock.poll(250):
                answered_after_removal = False
                break
            sock.recv_multipart()
            time.sleep(0.05)  # between attempts only; the loop ends at the deadline
        assert answered_after_removal is False, "the removed key kept its open connection's access"
    finally:
        sock.close(linger=0)


# -- the display's own user (the installer's permissions) --------------------------------
def _world_runnable_python() -> str | None:
    """An interpreter that an unprivileged user can run (every folder on its way and the
    file itself open to others): the venv's may live under root's home."""
    import shutil
    import sys

    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if not candidate:
            continue
        path = Path(os.path.realpath(candidate))
        if path.exists() and all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents]) \
                and os.stat(path).st_mode & 0o004:
            return str(path)
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a file to another user")
def test_the_display_user_reads_its_own_secret_key_and_no_other(tmp_path_factory):
    """As the installer leaves the state folder (``give_display_its_key``), an unprivileged
    user standing in for ``nirf-display`` (here ``nobody``) can read its own secret key and
    the cart's public key, and no other secret key; it cannot list ``keys/``."""
    import json
    import pwd
    import subprocess
    import sys
    import tempfile

    from nirf.services.common import keys as keys_mod

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="nirf-keys-"))  # /tmp: every parent is traversable
    try:
        os.chmod(base, 0o755)
        state = base / "state"
        state.mkdir(mode=0o750)
        keys_mod.ensure_sim_keys(state)
        keys_mod.create_keypair(keys_mod.keys_dir(state), "technician-a")
        own = keys_mod.give_display_its_key(state, nobody.pw_uid, nobody.pw_gid)
        kd = keys_mod.keys_dir(state)
        secrets = sorted(str(p) for p in kd.glob("*.key_secret"))
        assert len(secrets) == 4 and str(own) in secrets
        probe = ("import json, os, sys\n"
                 "out = {}\n"
                 "for p in sys.argv[2:]:\n"
                 "    try:\n"
                 "        open(p, 'rb').read(1); out[p] = 'read'\n"
                 "    except PermissionError:\n"
                 "        out[p] = 'denied'\n"
                 "try:\n"
                 "    os.listdir(sys.argv[1]); out['list'] = 'read'\n"
                 "except PermissionError:\n"
                 "    out['list'] = 'denied'\n"
                 "print(json.dumps(out))\n")
        server_public = str(kd / "server.key")
        python = _world_runnable_python()
        if python is None:
            pytest.skip("no Python interpreter here that another user may run")
        proc = subprocess.run([python, "-I", "-c", probe, str(kd), *secrets, server_public],
                              user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], capture_output=True,
                              text=True, timeout=30, cwd="/")
        assert proc.returncode == 0, proc.stderr
        seen = json.loads(proc.stdout)
        assert seen.pop(str(own)) == "read"
        assert seen.pop(server_public) == "read"
        assert seen.pop("list") == "denied"
        assert set(seen.values()) == {"denied"}, seen  # the cart's, the operator's, the technician's
    finally:
        import shutil
        shutil.rmtree(base, ignore_errors=True)
