"""Conformance of the MCU emulator to docs/mcu-protocol.md, driven with raw bytes.

The checksum here is computed independently of the emulator (the standard library's
CRC-CCITT with the protocol's initial value), so a wrong CRC in either shows up.
"""

from __future__ import annotations

import binascii

import pytest

from nirf.hal.clock import ManualClock
from nirf.hal.errors import InvalidArgument
from nirf.sim.mcu_emulator import McuEmulator
from nirf.sim.world import World

FULL_SCALE_MW = 500.0
CEILING = 0.8


def crc(text: str) -> int:
    return binascii.crc_hqx(text.encode("ascii"), 0xFFFF)


def line(text: str) -> bytes:
    return f"{text}*{crc(text):04X}\n".encode("ascii")


def checksum_ok(raw: str) -> bool:
    body, star, digits = raw.rpartition("*")
    if not star or len(digits) != 4 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        return False
    return crc(body) == int(digits, 16)


class Host:
    """A minimal host: sends command lines, collects replies and unsolicited lines."""

    def __init__(self, emu: McuEmulator, clock: ManualClock):
        self.emu = emu
        self.clock = clock
        self.seq = 100
        self.notices: list[str] = []
        self.replies: list[str] = []
        self.bad: list[str] = []

    def pump(self) -> None:
        self.emu.tick()
        for raw in self.emu.take_output().decode("ascii").splitlines():
            if not checksum_ok(raw):
                self.bad.append(raw)
                continue
            body = raw.rpartition("*")[0]
            (self.notices if body.startswith("! ") else self.replies).append(body)

    def raw(self, data: bytes) -> list[str]:
        """Feed raw bytes; return the reply lines (bodies) they produced."""
        self.replies.clear()
        self.emu.feed(data)
        self.pump()
        return list(self.replies)

    def cmd(self, command: str, seq: int | None = None) -> str:
        """Send one command; return the reply after the sequence number."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        replies = self.raw(line(f"{seq} {command}"))
        assert len(replies) == 1, replies
        s, _, rest = replies[0].partition(" ")
        assert s == str(seq)
        return rest

    def status(self) -> dict[str, str]:
        reply = self.cmd("ST")
        assert reply.startswith("OK ")
        return dict(tok.split("=", 1) for tok in reply[3:].split(" "))

    def advance(self, seconds: float, heartbeat_every_s: float | None = None, step_s: float = 0.01) -> None:
        """Let time pass in small steps, ticking the emulator (and sending heartbeats)."""
        t = 0.0
        since_hb = 0.0
        while t < seconds - 1e-12:
            dt = min(step_s, seconds - t)
            self.clock.advance(dt)
            t += dt
            since_hb += dt
            if heartbeat_every_s is not None and since_hb >= heartbeat_every_s - 1e-12:
                assert self.cmd("HB") == "OK"
                since_hb = 0.0
            self.pump()


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def world(clock):
    return World(clock)


@pytest.fixture
def emu(world, clock):
    return McuEmulator(world, clock, full_scale_mw=FULL_SCALE_MW, duty_ceiling=CEILING, seed=1)


@pytest.fixture
def host(emu, clock):
    h = Host(emu, clock)
    h.pump()
    return h


def test_boot_notice_and_output_off(host, world):
    assert any(n.startswith("! BOOT ") for n in host.notices)
    st = host.status()
    assert st["out"] == "0"
    assert float(st["duty"]) == 0.0
    assert st["faults"] == "-"
    assert world.laser_output_mw() == 0.0


def test_boot_zeroes_a_drive_left_on_the_world(clock):
    world = World(clock)
    world.set_laser_drive(300.0)
    McuEmulator(world, clock)
    assert world.laser_output_mw() == 0.0


def test_identity(host):
    reply = host.cmd("ID")
    assert reply.startswith("OK ")
    fields = dict(tok.split("=", 1) for tok in reply[3:].split(" "))
    assert fields["model"] == "NIRF-LMCU"
    assert fields["proto"] == "2"
    assert fields["fw"] and fields["sn"]


def test_status_has_every_documented_field(host):
    st = host.status()
    for key in ("out", "duty", "ceil", "ilk", "key", "temp", "pd", "faults", "fc", "ft", "mod", "wdt"):
        assert key in st, key
    assert float(st["ceil"]) == pytest.approx(CEILING)
    assert st["ilk"] == "1" and st["key"] == "1"
    assert st["ft"] == "0" and st["mod"] == "0" and st["fc"] == "0"
    assert st["wdt"] == "500"


def test_every_line_carries_a_valid_checksum(host):
    host.cmd("ID")
    host.cmd("ST")
    host.cmd("NOPE")
    assert host.bad == []


@pytest.mark.parametrize("data", [
    b"hello\n",  # no checksum
    b"12 ST*12G4\n",  # not hex
    b"12 ST*123\n",  # three digits
    b"\xff\xfe ST*0000\n",  # not ASCII
    line("x ST"),  # sequence number not a number
    line("99999 ST"),  # sequence number out of range
    line("-1 ST"),
])
def test_malformed_lines_get_malformed_without_seq(host, data):
    assert host.raw(data) == ["- ERR MALFORMED"]


def test_malformed_with_valid_seq_is_answered_with_seq(host):
    assert host.raw(line("7 DUTY  0.1")) == ["7 ERR MALFORMED"]  # doubled space
    assert host.raw(line("8")) == ["8 ERR MALFORMED"]  # no command


def test_overlong_line_answered_once_and_skipped(host):
    replies = host.raw(b"1 " + b"A" * 300 + b"*0000\n")
    assert replies == ["- ERR MALFORMED"]
    # the link works again on the next line
    assert host.cmd("HB") == "OK"


def test_bad_checksum_is_not_acted_on(host, world):
    host.cmd("DUTY 0.2 100.0")
    bad = f"50 EN 1*{crc('50 EN 1') ^ 0x0001:04X}\n".encode()
    assert host.raw(bad) == ["- ERR CRC"]
    assert host.status()["out"] == "0"
    assert world.laser_output_mw() == 0.0


def test_lowercase_hex_checksum_accepted(host):
    text = "60 ID"
    assert host.raw(f"{text}*{crc(text):04x}\r\n".encode())[0].startswith("60 OK ")


def test_unknown_command(host):
    assert host.cmd("FIRE") == "ERR UNKNOWN"
    assert host.cmd("st") == "ERR UNKNOWN"  # case-sensitive


def test_wrong_argument_count_is_arg(host):
    assert host.cmd("EN") == "ERR ARG"
    assert host.cmd("HB 1") == "ERR ARG"
    assert host.cmd("EN 2") == "ERR ARG"


def test_repeated_seq_is_answered_from_cache_not_acted_twice(host, emu):
    host.cmd("DUTY 0.2 100.0")
    host.cmd("EN 1 100.0")
    first = host.cmd("FTON 20000 5000 1", seq=500)
    host.advance(0.05)  # frames 0, 1, 2 triggered (no other command: the cache holds one)
    triggered = sum(1 for n in host.notices if n.startswith("! FRM "))
    assert triggered >= 2
    again = host.cmd("FTON 20000 5000 1", seq=500)
    assert again == first  # same reply, same t0
    assert int(host.status()["fc"]) == triggered  # the counter was not restarted
    assert sum(1 for c in emu.executed if c.startswith("500 ")) == 1
    # the same text under a new sequence number is a new command: it restarts frames
    host.cmd("FTON 20000 5000 1", seq=501)
    assert host.status()["fc"] == "1"  # only the new run's frame 0, triggered at once


def test_same_seq_with_other_text_is_a_new_command(host):
    host.cmd("DUTY 0.1 50.0", seq=42)
    host.cmd("DUTY 0.3 150.0", seq=42)
    assert float(host.status()["duty"]) == pytest.approx(0.3)


def test_enable_drives_the_world(host, world):
    assert host.cmd("DUTY 0.2 100.0") == "OK duty=0.200000 mw=100.000"
    assert world.laser_output_mw() == 0.0  # duty alone does not emit
    assert host.cmd("EN 1 100.0") == "OK out=1"
    assert world.laser_output_mw() == pytest.approx(0.2 * FULL_SCALE_MW)
    assert host.cmd("DUTY 0.3 150.0").startswith("OK")
    assert world.laser_output_mw() == pytest.approx(0.3 * FULL_SCALE_MW)
    assert host.cmd("EN 0") == "OK out=0"
    assert world.laser_output_mw() == 0.0


@pytest.mark.parametrize("change, code", [({"interlock": "open"}, "ILK"), ({"key": False}, "KEY")])
def test_open_loop_zeroes_output_and_latches(host, world, change, code):
    host.cmd("DUTY 0.2 100.0")
    host.cmd("EN 1 100.0")
    assert world.laser_output_mw() > 0
    world.apply(change)
    assert world.laser_output_mw() == 0.0  # the series loop, at once
    host.pump()
    assert f"! FAULT {code}" in host.notices
    st = host.status()
    assert st["out"] == "0"
    assert code in st["faults"].split(",")
    # closing the loop again does not bring the light back: the fault latched
    world.apply({"interlock": "closed", "key": True})
    host.pump()
    assert world.laser_output_mw() == 0.0
    assert host.status()["out"] == "0"


def test_clear_refused_while_cause_persists(host, world):
    host.cmd("EN 1 0.0")
    world.apply({"interlock": "open"})
    host.pump()
    assert host.cmd("CLR") == "ERR REFUSED ILK"
    assert "ILK" in host.status()["faults"]
    assert host.cmd("EN 1 0.0").startswith("ERR REFUSED FAULT")
    world.apply({"interlock": "closed"})
    assert host.cmd("CLR") == "OK cleared=ILK"
    st = host.status()
    assert st["faults"] == "-"
    assert st["out"] == "0"  # clearing never turns the output on
    assert host.cmd("EN 1 0.0") == "OK out=1"


def test_enable_refused_with_loop_open_without_latching(host, world):
    world.apply({"key": False})
    assert host.cmd("EN 1 0.0") == "ERR REFUSED KEY"
    world.apply({"key": True, "interlock": "open"})
    assert host.cmd("EN 1 0.0") == "ERR REFUSED ILK"
    assert host.status()["faults"] == "-"


def test_watchdog_trips_when_host_goes_silent(host, world):
    assert host.cmd("WDT 200") == "OK wdt=200"
    host.cmd("DUTY 0.1 50.0")
    host.cmd("EN 1 50.0")
    host.advance(1.0, heartbeat_every_s=0.1)  # fed: stays on
    assert host.status()["out"] == "1"
    host.advance(0.15)
    assert host.status()["out"] == "1"  # not yet
    host.advance(0.1)  # now 0.25 s since the last feed
    st = host.status()
    assert st["out"] == "0"
    assert "WDOG" in st["faults"]
    assert "! FAULT WDOG" in host.notices
    assert world.laser_output_mw() == 0.0
    assert host.cmd("CLR") == "OK cleared=WDOG"  # no lasting cause


def test_watchdog_not_armed_while_off(host):
    host.advance(5.0, step_s=0.5)
    assert host.status()["faults"] == "-"


def test_status_polls_do_not_feed_the_watchdog(host):
    host.cmd("EN 1 0.0")
    for _ in range(10):
        host.clock.advance(0.1)
        host.cmd("ST")
    assert "WDOG" in host.status()["faults"]


def test_replayed_heartbeat_does_not_feed_the_watchdog(host):
    host.cmd("WDT 100")
    host.cmd("EN 1 0.0")
    host.cmd("HB", seq=900)
    host.clock.advance(0.08)
    assert host.cmd("HB", seq=900) == "OK"  # replay
    host.clock.advance(0.08)  # 0.16 s since the only real feed
    host.pump()
    assert "WDOG" in host.status()["faults"]


def test_hbst_feeds_the_watchdog_and_answers_the_status(host, world):
    host.cmd("WDT 200")
    host.cmd("DUTY 0.1 50.0")
    host.cmd("EN 1 50.0")
    for _ in range(10):  # 1 s fed by HBST alone: stays on
        host.clock.advance(0.1)
        host.pump()
        reply = host.cmd("HBST")
        assert reply.startswith("OK ")
        fields = dict(tok.split("=", 1) for tok in reply[3:].split(" "))
        assert fields.keys() == host.status().keys()  # the same fields as ST, in the same order
        assert fields["out"] == "1" and fields["faults"] == "-"
    assert world.laser_output_mw() > 0.0
    host.clock.advance(0.25)  # then silence: the watchdog trips as after HB
    host.pump()
    assert "WDOG" in host.status()["faults"] and world.laser_output_mw() == 0.0


def test_replayed_hbst_does_not_feed_the_watchdog(host):
    host.cmd("WDT 100")
    host.cmd("EN 1 0.0")
    first = host.cmd("HBST", seq=901)
    host.clock.advance(0.08)
    assert host.cmd("HBST", seq=901) == first  # the replay gets the cached reply
    host.clock.advance(0.08)  # 0.16 s since the only real feed
    host.pump()
    assert "WDOG" in host.status()["faults"]


def test_hbst_takes_no_argument(host):
    assert host.cmd("HBST 1") == "ERR ARG"


@pytest.mark.parametrize("value", ["50", "1500", "abc", "-200", "500.5"])
def test_watchdog_range(host, value):
    assert host.cmd(f"WDT {value}") == "ERR ARG"
    assert host.status()["wdt"] == "500"


def test_max_on_time(world, clock):
    emu = McuEmulator(world, clock, max_on_s=3.0, heartbeat_timeout_ms=1000)
    host = Host(emu, clock)
    host.cmd("DUTY 0.1 50.0")
    host.cmd("EN 1 50.0")
    host.advance(2.9, heartbeat_every_s=0.2, step_s=0.1)
    assert host.status()["out"] == "1"
    host.advance(0.3, heartbeat_every_s=0.2, step_s=0.1)
    st = host.status()
    assert st["out"] == "0"
    assert "MAXON" in st["faults"]
    assert world.laser_output_mw() == 0.0


def test_duty_above_ceiling_rejected_and_unchanged(host):
    host.cmd("DUTY 0.5 250.0")
    reply = host.cmd("DUTY 0.9 450.0")
    assert reply.startswith("ERR REFUSED CEILING")
    assert float(reply.split()[-1]) == pytest.approx(CEILING)
    assert float(host.status()["duty"]) == pytest.approx(0.5)
    assert host.cmd(f"DUTY {CEILING} {CEILING * FULL_SCALE_MW:.1f}").startswith("OK")  # the ceiling itself is allowed


@pytest.mark.parametrize("value", ["1.5", "-0.1", "abc", "nan", "1e-3", "0.1234567", ""])
def test_duty_bad_values(host, value):
    host.cmd("DUTY 0.25 125.0")
    reply = host.cmd(f"DUTY {value}") if value else host.cmd("DUTY")
    assert reply == "ERR ARG"
    assert float(host.status()["duty"]) == pytest.approx(0.25)


def test_temperature_rises_with_power(world, clock):
    emu = McuEmulator(world, clock, heartbeat_timeout_ms=1000, max_temp_c=90.0)
    host = Host(emu, clock)
    t_idle = float(host.status()["temp"])
    host.cmd("DUTY 0.7 350.0")
    host.cmd("EN 1 350.0")
    temps = []
    for _ in range(6):
        host.advance(10.0, heartbeat_every_s=0.5, step_s=0.5)
        temps.append(float(host.status()["temp"]))
    assert temps[0] > t_idle
    assert all(b >= a for a, b in zip(temps, temps[1:]))  # rises monotonically
    assert temps[-1] - t_idle > 5.0
    # cools again with the laser off
    host.cmd("EN 0")
    host.advance(30.0, step_s=1.0)
    assert float(host.status()["temp"]) < temps[-1]


def test_overtemp_latches_and_clear_waits_for_cooling(host, world):
    host.cmd("EN 1 0.0")
    world.apply({"fault": {"mcu_overtemp": True}})
    host.pump()
    st = host.status()
    assert float(st["temp"]) > 65.0
    assert "OTEMP" in st["faults"] and st["out"] == "0"
    assert host.cmd("CLR") == "ERR REFUSED OTEMP"
    world.apply({"fault": {"mcu_overtemp": False}})
    assert host.cmd("CLR").startswith("OK")


def test_photodiode_tracks_output_and_gain(host, world):
    assert float(host.status()["pd"]) < 2.0
    host.cmd("DUTY 0.2 100.0")
    host.cmd("EN 1 100.0")
    expected = world.laser_output_mw()
    assert float(host.status()["pd"]) == pytest.approx(expected, rel=0.05)
    world.apply({"fault": {"photodiode_gain": 0.5}})
    assert float(host.status()["pd"]) == pytest.approx(0.5 * expected, rel=0.05)
    world.apply({"interlock": "open"})  # light gone: the monitor sees nothing
    host.pump()
    assert float(host.status()["pd"]) < 2.0


def test_serial_corruption_changes_one_character(host, world):
    clean = host.raw(line("77 ID"))
    clean_raw = line("77 " + clean[0].partition(" ")[2]).decode().rstrip("\n")
    world.apply({"fault": {"serial_corruption": 1.0}})
    host.emu.feed(line("77 ID"))  # a retry: the cached reply is sent again, corrupted
    out = host.emu.take_output().decode("ascii").splitlines()
    assert len(out) == 1
    corrupted = out[0]
    assert not checksum_ok(corrupted)
    assert len(corrupted) == len(clean_raw)
    assert sum(a != b for a, b in zip(corrupted, clean_raw)) == 1


def test_serial_corruption_probability(host, world):
    world.apply({"fault": {"serial_corruption": 0.3}})
    bad = 0
    n = 400
    for i in range(n):
        host.emu.feed(line(f"{1000 + i} HB"))
        raw = host.emu.take_output().decode("ascii").splitlines()
        bad += sum(not checksum_ok(r) for r in raw)
    assert 0.15 * n < bad < 0.45 * n


def _collect_triggers(world):
    triggers = []
    world.add_listener(lambda kind, p: triggers.append(p) if kind == "trigger" else None)
    return triggers


def test_frame_timing_exact_times_and_alternate_lit_frames(host, world, clock):
    triggers = _collect_triggers(world)
    period_us, exposure_us = 33_333, 10_000
    host.cmd("WDT 1000")
    host.cmd("DUTY 0.2 100.0")
    host.cmd("EN 1 100.0")
    t_command_ns = clock.time_ns()
    reply = host.cmd(f"FTON {period_us} {exposure_us} 1")
    assert reply.startswith("OK t0=")
    # irregular, late ticks must not move the triggers off the grid
    for step in (0.007, 0.031, 0.0, 0.052, 0.013, 0.1, 0.004, 0.09):
        clock.advance(step)
        host.pump()
        host.cmd("HB")
    assert len(triggers) >= 8
    t0 = triggers[0]["t_start_ns"]
    assert t0 == t_command_ns
    lit_level = 0.2 * FULL_SCALE_MW
    for n, trig in enumerate(triggers):
        assert trig["counter"] == n
        assert trig["t_start_ns"] == t0 + n * period_us * 1000
        assert trig["lit"] == (n % 2 == 0)
        t_ns = trig["t_start_ns"]
        mean = world.laser_mean_mw(t_ns, t_ns + exposure_us * 1000)
        assert mean == pytest.approx(lit_level if n % 2 == 0 else 0.0)
    # one frame notice per trigger, same counter, lit flag and the MCU's clock
    frames = [n.split() for n in host.notices if n.startswith("! FRM ")]
    assert [int(f[2]) for f in frames] == [t["counter"] for t in triggers]
    assert [f[3] == "L" for f in frames] == [t["lit"] for t in triggers]
    mcu_us = [int(f[4]) for f in frames]
    assert all(b - a == period_us for a, b in zip(mcu_us, mcu_us[1:]))
    assert mcu_us[0] == int(reply.split("=")[1])
    st = host.status()
    assert st["ft"] == "1" and st["mod"] == "1" and int(st["fc"]) == len(triggers)


def test_frame_timing_without_modulation_is_continuous(host, world, clock):
    triggers = _collect_triggers(world)
    host.cmd("DUTY 0.1 50.0")
    host.cmd("EN 1 50.0")
    host.cmd("FTON 20000 5000 0")
    host.advance(0.1, heartbeat_every_s=0.05, step_s=0.005)
    assert len(triggers) >= 5
    assert all(t["lit"] for t in triggers)
    t_first, t_last = triggers[0]["t_start_ns"], triggers[-1]["t_start_ns"]
    assert world.laser_mean_mw(t_first, t_last) == pytest.approx(0.1 * FULL_SCALE_MW)


def test_frames_dark_while_output_off(host, world):
    triggers = _collect_triggers(world)
    host.cmd("DUTY 0.1 50.0")
    host.cmd("FTON 20000 5000 1")
    host.advance(0.1, step_s=0.01)
    assert triggers and not any(t["lit"] for t in triggers)
    assert world.laser_output_mw() == 0.0


def test_frame_timing_stop(host, world):
    triggers = _collect_triggers(world)
    host.cmd("WDT 1000")
    host.cmd("DUTY 0.1 50.0")
    host.cmd("EN 1 50.0")
    host.cmd("FTON 20000 5000 1")
    host.advance(0.05, step_s=0.01)
    reply = host.cmd("FTOFF")
    count = len(triggers)
    assert reply == f"OK fc={count}"
    host.advance(0.1, heartbeat_every_s=0.05, step_s=0.01)
    assert len(triggers) == count
    assert host.status()["ft"] == "0"
    assert world.laser_output_mw() == pytest.approx(0.1 * FULL_SCALE_MW)  # continuous again


@pytest.mark.parametrize("args", ["100 50 1", "33333 33333 1", "33333 0 1", "33333 1000 2", "33333 1000"])
def test_frame_timing_bad_arguments(host, args):
    assert host.cmd(f"FTON {args}") == "ERR ARG"
    assert host.status()["ft"] == "0"


def test_constructor_validates():
    clock = ManualClock()
    world = World(clock)
    with pytest.raises(InvalidArgument):
        McuEmulator(world, clock, duty_ceiling=1.5)
    with pytest.raises(InvalidArgument):
        McuEmulator(world, clock, heartbeat_timeout_ms=50)


def test_protocol_document_examples_carry_real_checksums():
    """Every example line in docs/mcu-protocol.md section 12 checks out (but the two that
    show a damaged line), with the standard library's CRC."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "mcu-protocol.md").read_text()
    session = text[text.index("## 12."):text.index("## 13.")]
    lines = [ln[2:] for ln in session.splitlines() if ln.startswith(("> ", "< "))]
    assert len(lines) > 60
    damaged = [ln for ln in lines if not checksum_ok(ln)]
    assert damaged == ["4252 EN 1 100*0000", "hello"]
    assert "proto=2" in session and "fw=2.0.0" in session
