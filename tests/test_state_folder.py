"""Where the cart keeps its state (PRODUCT.md section 9): an installed cart never writes
under its installation; a checkout keeps ``var/sim``."""

from __future__ import annotations

from pathlib import Path

from nirf import config as config_mod
def test_a_checkout_keeps_var_sim(monkeypatch):
    monkeypatch.delenv("NIRF_STATE_DIR", raising=False)
    assert config_mod.running_from_checkout()  # these tests run from the checkout
    assert config_mod.load("sim").state_dir() == config_mod.PROJECT_ROOT / "var" / "sim"


def test_an_installed_cart_uses_the_user_state_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("NIRF_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(config_mod, "running_from_checkout", lambda root=None: False)
    cfg = config_mod.load("sim")
    assert cfg.state_dir() == tmp_path / "home" / ".local" / "state" / "nirf" / "sim"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert cfg.state_dir() == tmp_path / "xdg" / "nirf" / "sim"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/path")  # not absolute: ignored, as XDG says
    assert cfg.state_dir() == tmp_path / "home" / ".local" / "state" / "nirf" / "sim"
    monkeypatch.setenv("NIRF_STATE_DIR", str(tmp_path / "given"))
    assert cfg.state_dir() == tmp_path / "given"


def test_an_installation_folder_is_not_a_checkout(tmp_path):
    site = tmp_path / "site-packages"
    (site / "config").mkdir(parents=True)
    assert not config_mod.running_from_checkout(site)
    (site / "pyproject.toml").write_text("")
    (site / "Makefile").write_text("")
    assert config_mod.running_from_checkout(site)


def test_the_device_keeps_var_lib_nirf(monkeypatch):
    monkeypatch.delenv("NIRF_STATE_DIR", raising=False)
    assert config_mod.load("device").state_dir() == Path("/var/lib/nirf")
