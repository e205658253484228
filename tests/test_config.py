"""Configuration: both profiles load; unknown keys, wrong types and out-of-range values stop
the start with a message naming the file, the key, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nirf import config
from nirf.hal.errors import ConfigError


@pytest.mark.parametrize("profile", ["sim", "device"])
def test_profiles_load(profile):
    cfg = config.load(profile)
    assert cfg.profile == profile
    assert 1.0 <= cfg.safety.emission_delay_s <= 10.0
    assert len(cfg.sha256) == 64


def test_device_profile_keeps_emission_local():
    s = config.load("device").safety
    assert s.footswitch_required and s.boot_requires_key_cycle and s.reset_requires_key_cycle


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needles", [
    ("[safety]\nemission_delay_s = 0.5\n", ["c.toml", "emission_delay_s", "0.5", "1.0 to 10.0"]),
    ("[safety]\nemission_dealy_s = 2.0\n", ["c.toml", "emission_dealy_s", "unknown key"]),
    ("[lasers]\nmax_power_mw = 1\n", ["c.toml", "[lasers]", "unknown section"]),
    ("[laser]\nmax_power_mw = \"lots\"\n", ["max_power_mw", "'lots'", "expected a number"]),
    ("[laser]\nirradiance_limit_mw_cm2 = 151\n", ["irradiance_limit_mw_cm2", "151", "1.0 to 150.0"]),
    ("[laser]\nmax_temp_c = 61\n", ["max_temp_c", "20.0 to 60.0"]),
    ("[safety]\nheartbeat_timeout_ms = 2000\n", ["heartbeat_timeout_ms", "2000", "100 to 1000"]),
    ("[safety]\nfootswitch_required = 1\n", ["footswitch_required", "true or false"]),
    ("[cart]\nprofile = \"lab\"\n", ["profile", "'lab'", "'sim', 'device'"]),
    ("[camera]\nfps = 60\nexposure_us = 20000\n", ["exposure_us", "fps"]),
    ("[processing]\nsignal_roi = [1, 2, 3]\n", ["signal_roi", "[x, y, w, h]"]),
    ("[bus]\ncontrol_endpoint = \"tcp://127.0.0.1:6000\"\ntelemetry_endpoint = \"tcp://127.0.0.1:6000\"\n",
     ["telemetry_endpoint", "control_endpoint", "different ports"]),
    ("not toml at all = = =\n", ["c.toml", "not valid TOML"]),
])
def test_bad_values_are_refused_with_a_useful_message(tmp_path, text, needles):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    for needle in needles:
        assert needle in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml")


def test_the_controller_refuses_to_start_on_a_bad_config(tmp_path):
    bad = write(tmp_path, "[safety]\nemission_delay_s = 0.1\n")
    r = subprocess.run([sys.executable, "-m", "nirf.services.imaging.main", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "emission_delay_s" in r.stderr and "1.0 to 10.0" in r.stderr
