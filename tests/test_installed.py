"""The cart installed as a user installs it: a fresh virtual environment, PyPI's ``config``
package first, then the cart (``pip install <checkout>``). Both must import and the cart
must run; without ``NIRF_STATE_DIR`` it writes its state under the user's state folder
(``$XDG_STATE_HOME/nirf``, else ``~/.local/state/nirf``), never inside its installation.

The checks go through the installed entry points (``nirfctl``), not the cart's import
names, so they hold whichever namespace the packages live under. Slow: it installs from
the package index (numpy, pyzmq ...), a minute or more."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cartproc import ROOT

PIP_TIMEOUT_S = 900

# the installing fixture runs two pip installs, each with its own limit
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * PIP_TIMEOUT_S + 120)]


def run(cmd, env, timeout=120, check=True):
    # from the user's home, never the checkout: "python -c" would import its folders
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          cwd=env.get("HOME") or "/")
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("installed")
    venv = base / "venv"
    home = base / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NIRF_", "XDG_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(HOME=str(home), PIP_DISABLE_PIP_VERSION_CHECK="1")
    run([sys.executable, "-m", "venv", str(venv)], env)
    py = venv / "bin" / "python"
    proc = run([str(py), "-m", "pip", "install", "--quiet", "config"], env, timeout=PIP_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        pytest.skip(f"PyPI's 'config' package could not be installed (no package index?): {proc.stderr[-500:]}")
    # A copy of the checkout without its virtual environment, state and build leftovers (a
    # stale build/ folder would be packed into the wheel as it is), as a user has it.
    import shutil
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", "build", "var", "*.egg-info", ".git", "__pycache__", ".hypothesis", ".pytest_cache"))
    run([str(py), "-m", "pip", "install", "--quiet", str(source)], env, timeout=PIP_TIMEOUT_S)
    site = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env).stdout.strip()
    return {"venv": venv, "py": py, "bin": venv / "bin", "home": home, "env": env, "site": Path(site)}


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_the_cart_runs_and_keeps_its_state_in_the_user_state_folder(installed):
    env, home = dict(installed["env"]), installed["home"]
    before = files_under(installed["site"])
    nirfctl = installed["bin"] / "nirfctl"
    version = run([str(nirfctl), "--version"], env)
    assert version.stdout.startswith("nirfctl ")
    run([str(nirfctl), "keys", "init"], env, timeout=60)
    state = home / ".local" / "state" / "nirf"
    assert any(p.name == "server.key_secret" for p in state.rglob("*")), sorted(files_under(home))
    after = files_under(installed["site"])
    new = {f for f in after - before if "__pycache__" not in f}
    assert not new, f"the installed cart wrote into site-packages: {sorted(new)[:10]}"
    assert not any(part == "var" for f in after for part in Path(f).parts[:1])


def test_xdg_state_home_is_honoured(installed, tmp_path):
    env = dict(installed["env"], XDG_STATE_HOME=str(tmp_path / "xdg"))
    run([str(installed["bin"] / "nirfctl"), "keys", "init"], env, timeout=60)
    assert list((tmp_path / "xdg" / "nirf").rglob("server.key_secret"))


def test_pypi_config_still_imports_beside_the_cart(installed):
    """PyPI's ``config`` keeps working with the cart installed after it."""
    code = "from config import Config; import io; c = Config(io.StringIO('a: 1')); print(c.a)"
    proc = run([str(installed["py"]), "-c", code], installed["env"], check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr
    assert not (installed["site"] / "config" / "sim.toml").exists(), "the cart wrote into PyPI's config package"


def test_the_cart_installs_one_top_level_name(installed):
    """Everything the cart installs is under ``nirf/`` (plus its dist-info)."""
    record = next(installed["site"].glob("nirf_cart-*.dist-info")) / "RECORD"
    tops = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines() if line}
    tops = {t for t in tops if not t.endswith(".dist-info") and t != ".."}
    assert tops == {"nirf"}, sorted(tops)
    code = "import nirf.config, nirf.controller.main, nirf.services.gateway.main; print(nirf.config.__name__)"
    proc = run([str(installed["py"]), "-c", code], installed["env"])
    assert proc.stdout.strip() == "nirf.config"


def test_the_installed_simulated_cart_starts_answers_and_stops(installed, tmp_path):
    import signal
    import time

    from tests.cartproc import write_config

    env = dict(installed["env"], PYTHONUNBUFFERED="1")
    cfg_path, control, telemetry = write_config(tmp_path, width=364, height=272)
    before = files_under(installed["site"])
    log_path = tmp_path / "cart.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(installed["bin"] / "nirf-sim"), "--config", str(cfg_path)], env=env,
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while b"simulated cart is up" not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        ping = run([str(installed["bin"] / "nirfctl"), "--config", str(cfg_path), "--json", "ping"], env)
        assert json.loads(ping.stdout)["result"]["profile"] == "sim"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    state = installed["home"] / ".local" / "state" / "nirf" / "sim"
    assert (state / "study.db").is_file() and (state / "keys" / "server.key").is_file()
    new = {f for f in files_under(installed["site"]) - before if "__pycache__" not in f}
    assert not new, f"the installed cart wrote into site-packages: {sorted(new)[:10]}"
