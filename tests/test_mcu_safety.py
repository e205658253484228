"""The MCU's own limits (protocol 2), the emulator alone, no host software.

Judged by the world's record of the true optical output (``World.laser_events``) and of
the camera trigger windows (``World.triggers``), never by what the MCU reports about
itself. Checksums come from the standard library, not from the emulator.
"""

from __future__ import annotations

import binascii
import math
import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nirf.hal.clock import ManualClock
from nirf.hal.laser import FactoryCalibration
from nirf.sim.mcu_emulator import McuEmulator, factory_for
from nirf.sim.world import World, judge_frames

FULL_SCALE_MW = 500.0
MAX_MW = 200.0
TRIP_MW = 1.1 * MAX_MW
BUDGET_S = 10.0


def line(text: str) -> bytes:
    return f"{text}*{binascii.crc_hqx(text.encode('ascii'), 0xFFFF):04X}\n".encode("ascii")


class Host:
    """Raw command lines to the emulator; replies and notices collected."""

    def __init__(self, emu: McuEmulator, clock: ManualClock):
        self.emu, self.clock = emu, clock
        self.seq = 1000
        self.since_hb = 0.0
        self.notices: list[str] = []
        self.replies: list[str] = []

    def pump(self) -> None:
        self.emu.tick()
        for raw in self.emu.take_output().decode("ascii").splitlines():
            body = raw.rpartition("*")[0]
            (self.notices if body.startswith("! ") else self.replies).append(body)

    def cmd(self, command: str) -> str:
        self.seq = (self.seq + 1) % 65536
        self.replies.clear()
        self.emu.feed(line(f"{self.seq} {command}"))
        self.pump()
        assert len(self.replies) == 1, self.replies
        seq, _, rest = self.replies[0].partition(" ")
        assert seq == str(self.seq)
        return rest

    def status(self) -> dict[str, str]:
        reply = self.cmd("ST")
        assert reply.startswith("OK ")
        return dict(tok.split("=", 1) for tok in reply[3:].split(" "))

    def advance(self, seconds: float, step_s: float = 0.001, heartbeat_s: float | None = 0.1) -> None:
        t = 0.0
        while t < seconds - 1e-12:
            dt = min(step_s, seconds - t)
            self.clock.advance(dt)
            t += dt
            self.since_hb += dt  # across calls: many short waits still get their heartbeats
            if heartbeat_s is not None and self.since_hb >= heartbeat_s - 1e-12:
                assert self.cmd("HB") == "OK"
                self.since_hb = 0.0
            self.pump()


def make(factory: FactoryCalibration | None | str = "cfg", **kw):
    clock = ManualClock()
    world = World(clock)
    world.laser_history_s = 1e6  # keep the whole record for judging
    if factory == "cfg":
        factory = factory_for(FULL_SCALE_MW, MAX_MW, BUDGET_S)
    emu = McuEmulator(world, clock, full_scale_mw=FULL_SCALE_MW, heartbeat_timeout_ms=500, seed=7,
                      factory=factory, **kw)
    host = Host(emu, clock)
    host.pump()
    return clock, world, emu, host


def fac(host: Host) -> dict[str, str]:
    reply = host.cmd("FAC")
    assert reply.startswith("OK "), reply
    return dict(tok.split("=", 1) for tok in reply[3:].split(" "))


def longest_above(events: list[tuple[int, float]], limit_mw: float, end_ns: int) -> int:
    """Longest stretch (ns) of the true output above ``limit_mw``."""
    longest, since = 0, None
    for t, mw in events:
        if mw > limit_mw and since is None:
            since = t
        elif mw <= limit_mw and since is not None:
            longest, since = max(longest, t - since), None
    if since is not None:
        longest = max(longest, end_ns - since)
    return longest


# -- factory record (S6a) ------------------------------------------------------------------
def test_factory_record_reads_back_and_ceiling_gives_1_1_x_max():
    clock, world, emu, host = make()
    f = fac(host)
    assert float(f["max"]) == MAX_MW and float(f["trip"]) == pytest.approx(TRIP_MW)
    ceiling = float(f["ceil"])
    # the world's true output at the ceiling is 1.1 x max (never more), one step above it
    # is refused
    assert ceiling == pytest.approx(TRIP_MW / FULL_SCALE_MW, abs=1e-6)
    assert ceiling * FULL_SCALE_MW <= TRIP_MW
    points = [host.cmd(f"FACR {i}") for i in range(int(f["n"]))]
    assert points == ["OK i=0 d=0.000000 mw=0.000", "OK i=1 d=1.000000 mw=500.000"]
    assert host.cmd(f"DUTY {ceiling + 0.000001:.6f} {TRIP_MW:.3f}").startswith("ERR REFUSED CEILING")
    assert host.cmd("DUTY 1 500").startswith("ERR REFUSED CEILING")
    assert host.status()["duty"] == "0.0000"


def test_factory_writes_need_the_service_jumper():
    clock, world, emu, host = make()
    before = fac(host)
    for command in ("FACB 2 1.0 400 100", "FACW 1 1.0 2000", "FACC"):
        assert host.cmd(command) == "ERR REFUSED JUMPER", command
    assert fac(host) == before
    world.apply({"service_jumper": True})
    assert host.cmd("FACB 3 0.5 300 100") == "OK n=3"
    assert host.cmd("FACW 0 0 0") == "OK i=0"
    assert host.cmd("FACC") == "ERR REFUSED INCOMPLETE"  # and the stage is dropped
    assert host.cmd("FACB 3 0.5 300 100") == "OK n=3"
    for i, (d, mw) in enumerate(((0, 0), (0.5, 100), (1.0, 600))):
        assert host.cmd(f"FACW {i} {d} {mw}") == f"OK i={i}"
    reply = host.cmd("FACC")
    # 330 mW (1.1 x 300) lies on the segment 100 -> 600 mW at duty 0.5 + 0.5 x 230/500
    assert reply == "OK ceil=0.730000 trip=330.000"
    world.apply({"service_jumper": False})
    f = fac(host)
    assert (f["n"], f["pdf"], f["max"], f["ceil"], f["budget"]) == ("3", "0.500000", "300.000", "0.730000", "100.000")
    assert host.cmd("FACB 2 1.0 400 100") == "ERR REFUSED JUMPER"


def test_factory_write_refused_while_emitting_and_bad_tables_refused():
    clock, world, emu, host = make()
    world.apply({"service_jumper": True})
    assert host.cmd("DUTY 0.1 50") .startswith("OK")
    assert host.cmd("EN 1 50") == "OK out=1"
    assert host.cmd("FACB 2 1.0 200 100") == "ERR REFUSED OUT"
    host.cmd("EN 0")
    for table in (((0, 0), (0.5, 300), (1.0, 200)),  # power falls
                  ((0.1, 0), (1.0, 500)),  # does not start at duty 0
                  ((0, 0), (0.9, 500))):  # does not reach duty 1
        assert host.cmd(f"FACB {len(table)} 1.0 200 100").startswith("OK")
        for i, (d, mw) in enumerate(table):
            host.cmd(f"FACW {i} {d} {mw}")
        assert host.cmd("FACC") == "ERR REFUSED TABLE", table
    assert fac(host)["ceil"] == f"{TRIP_MW / FULL_SCALE_MW:.6f}"


def test_blank_mcu_refuses_to_emit():
    clock, world, emu, host = make(factory=None)
    assert host.cmd("FAC") == "ERR REFUSED NOFAC"
    assert host.cmd("DUTY 0 0").startswith("OK")  # forcing off always works
    assert host.cmd("DUTY 0.1 50") == "ERR REFUSED NOFAC"
    assert host.cmd("EN 1 0") == "ERR REFUSED NOFAC"
    assert world.laser_output_mw() == 0.0


# -- expected mW (S6a) ---------------------------------------------------------------------
def test_version_1_attack_is_refused_at_the_command():
    """Version 1: a host table said 40 mW at duty 0.8; the true output was 400 mW."""
    clock, world, emu, host = make()
    assert host.cmd("DUTY 0.8 40").startswith("ERR REFUSED CEILING")
    # inside the ceiling, a lie about the power is refused against the factory table
    assert host.cmd("DUTY 0.4 20") == "ERR REFUSED XMW 200.000"
    assert host.cmd("DUTY 0.4 250") == "ERR REFUSED LIMIT 220.000"
    # the S6a tolerance itself passes: 0.2 x 200 + 0.02 x 500 = 50 mW either side
    assert host.cmd("DUTY 0.4 249").startswith("ERR REFUSED LIMIT")
    assert host.cmd("DUTY 0.4 150").startswith("OK")
    assert host.cmd("DUTY 0.4 149.9").startswith("ERR REFUSED XMW")
    assert world.laser_output_mw() == 0.0


@pytest.mark.parametrize("modulate", [False, True])
def test_reading_disagreeing_with_expected_trips_xmw_after_50_ms(modulate):
    clock, world, emu, host = make()
    if modulate:
        assert host.cmd("FTON 16667 8000 1").startswith("OK")
    host.cmd("DUTY 0.2 100")
    assert host.cmd("EN 1 100") == "OK out=1"
    host.advance(1.0)
    assert emu.faults == ()  # agreeing readings never trip, gated or not
    # the monitor now reads 40 % high (a drifted diode, a wrong table: same to the MCU)
    world.apply({"fault": {"photodiode_gain": 1.4}})
    host.advance(0.045)
    assert "XMW" not in emu.faults
    host.advance(0.040 if not modulate else 0.060)  # a dark frame holds the lit reading
    assert "XMW" in emu.faults
    assert world.laser_output_mw() == 0.0
    assert host.cmd("EN 1 100").startswith("ERR REFUSED FAULT XMW")


@pytest.mark.parametrize("step_s", [0.001, 0.025], ids=["every-ms", "late-loop"])
@pytest.mark.parametrize("leak", [0.0, 0.05, 0.2])
def test_light_in_a_dark_exposure_is_reported_once_for_that_frame(leak, step_s):
    """A leaking gate (sim fault ``gate_leak``) puts light into dark frames; the MCU's
    photodiode sees it during the exposure and reports ``! LIT <counter>`` once per such
    frame, never for a lit frame, never without light (judged on the world's record). The
    firmware watches the whole exposure: so does the emulator when its loop runs late (25 ms
    between its steps, longer than a frame period and three times an 8 ms exposure)."""
    clock, world, emu, host = make()
    assert host.cmd("FTON 16667 8000 1").startswith("OK")
    host.cmd("DUTY 0.2 100")
    assert host.cmd("EN 1 100") == "OK out=1"
    host.advance(0.1)
    world.apply({"fault": {"gate_leak": leak}})
    t_apply = clock.time_ns()
    host.notices.clear()
    host.advance(0.5, step_s=step_s)
    t_end = clock.time_ns()
    reported = [int(n.split()[2]) for n in host.notices if n.startswith("! LIT ")]
    assert len(reported) == len(set(reported)), "a frame reported twice"
    rec = world.record(0)
    events = [tuple(e) for e in rec["laser"]]
    dark_lit = set()  # dark frames after the fault whose whole exposure the world lit
    for counter, t_start, exposure_ns, lit in rec["triggers"]:
        if lit or t_start <= t_apply or t_start + exposure_ns > t_end:
            continue
        value = [mw for t, mw in events if t <= t_start][-1]  # the level from the trigger on
        if value > 0:
            dark_lit.add(counter)
    if leak == 0.0:
        assert reported == [] and dark_lit == set()
    else:
        assert dark_lit and dark_lit <= set(reported), (sorted(dark_lit), reported)
        lit_counters = {c for c, _, _, lit in rec["triggers"] if lit}
        assert not set(reported) & lit_counters
    assert emu.faults == ()  # a measurement problem, not a safety fault: light is permitted


def test_light_in_the_dark_is_reported_again_after_frame_timing_restarts():
    """Frame counters start from 0 at every FTON: a dark frame reported before a restart
    does not hide the new run's frame of the same number."""
    clock, world, emu, host = make()
    host.cmd("DUTY 0.2 100")
    world.apply({"fault": {"gate_leak": 0.2}})
    runs = []
    for _ in range(2):
        assert host.cmd("EN 1 100") == "OK out=1"  # enabled first: frame 0 is lit
        host.notices.clear()
        assert host.cmd("FTON 16667 8000 1").startswith("OK")
        host.advance(0.03)  # frame 0 (lit) and frame 1 (dark, leaked): the run's last report is 1
        runs.append({int(n.split()[2]) for n in host.notices if n.startswith("! LIT ")})
        assert host.cmd("EN 0").startswith("OK")
        assert host.cmd("FTOFF").startswith("OK")
    assert runs == [{1}, {1}], runs


def test_a_low_reading_trips_xmw_too():
    clock, world, emu, host = make()
    host.cmd("DUTY 0.3 150")
    host.cmd("EN 1 150")
    world.apply({"fault": {"photodiode_gain": 0.5}})
    host.advance(0.1)
    assert "XMW" in emu.faults and world.laser_output_mw() == 0.0


def test_optical_trip_on_own_photodiode_after_5_ms():
    clock, world, emu, host = make()
    host.cmd("DUTY 0.4 200")
    host.cmd("EN 1 200")
    host.advance(0.2)
    # the monitor sees 260 mW (> 220 mW trip) while the host still expects 200
    world.apply({"fault": {"photodiode_gain": 1.3}})
    host.advance(0.0035, step_s=0.0005)
    assert emu.faults == ()
    host.advance(0.002, step_s=0.0005)
    assert emu.faults[0] == "OPT"  # long before XMW's 50 ms
    assert world.laser_output_mw() == 0.0


def test_a_wrong_factory_table_is_caught_by_the_optical_trip_within_5_ms():
    """A record written under the jumper that understates the diode by half: the ceiling
    lets the true output reach twice the trip; the MCU's own photodiode ends it."""
    clock, world, emu, host = make()
    world.apply({"service_jumper": True})
    host.cmd("FACB 2 1.0 200 100")
    host.cmd("FACW 0 0 0")
    host.cmd("FACW 1 1 250")  # the true diode gives 500 mW at duty 1
    assert host.cmd("FACC") == "OK ceil=0.880000 trip=220.000"
    world.apply({"service_jumper": False})
    assert host.cmd("DUTY 0.8 200").startswith("OK")  # the table says 200 mW; truly 400
    assert host.cmd("EN 1 200") == "OK out=1"
    host.advance(0.05)
    assert emu.faults[0] == "OPT"
    longest = longest_above(world.laser_events(), TRIP_MW, clock.time_ns())
    assert 0 < longest <= 5_000_000


_COMMANDS = st.one_of(
    # mostly an expected power near the truth (which the MCU accepts), sometimes a lie
    st.tuples(st.just("DUTY"), st.one_of(st.floats(0, 0.45), st.floats(0, 1)),
              st.one_of(st.floats(-0.3, 0.3), st.floats(-1, 3))),
    st.tuples(st.just("EN1"), st.one_of(st.floats(-0.3, 0.3), st.floats(-1, 3))),
    st.tuples(st.just("EN0")),
    st.tuples(st.just("FTON"), st.sampled_from([8333, 16667, 33333, 100000]), st.booleans()),
    st.tuples(st.just("FTOFF")),
    st.tuples(st.just("CLR")),
    st.tuples(st.just("FAC"), st.integers(2, 4), st.floats(0.1, 10), st.floats(1, 900)),
    st.tuples(st.just("WAIT"), st.floats(0.0005, 0.3)),
    st.tuples(st.just("GAIN"), st.sampled_from([0.5, 1.0, 1.0, 1.0, 1.5])),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_COMMANDS, min_size=1, max_size=60))
def test_no_command_sequence_gets_true_output_above_1_1_max_for_5_ms(commands):
    clock, world, emu, host = make()
    # start from light, so every example probes the limits with the output on
    duty = 0.3
    assert host.cmd("DUTY 0.3 150").startswith("OK") and host.cmd("EN 1 150") == "OK out=1"
    for c in commands:
        kind = c[0]
        if kind == "DUTY":
            if host.cmd(f"DUTY {c[1]:.6f} {FULL_SCALE_MW * c[1] * (1 + c[2]):.3f}").startswith("OK"):
                duty = c[1]
        elif kind == "EN1":
            host.cmd(f"EN 1 {FULL_SCALE_MW * duty * (1 + c[1]):.3f}")
        elif kind == "EN0":
            host.cmd("EN 0")
        elif kind == "FTON":
            host.cmd(f"FTON {c[1]} {c[1] // 2} {int(c[2])}")
        elif kind == "FTOFF":
            host.cmd("FTOFF")
        elif kind == "CLR":
            host.cmd("CLR")
        elif kind == "FAC":
            # without the jumper, every attempt to rewrite the limits must fail
            n = c[1]
            host.cmd(f"FACB {n} {c[2]:.6f} {c[3]:.3f} 100")
            for i in range(n):
                host.cmd(f"FACW {i} {i / (n - 1):.6f} {2000 * i:.3f}")
            host.cmd("FACC")
        elif kind == "WAIT":
            host.advance(c[1], step_s=0.002)
        elif kind == "GAIN":
            world.apply({"fault": {"photodiode_gain": c[1]}})
    host.advance(0.05)
    peak = max(mw for _, mw in world.laser_events())
    event("emitted" if peak > 0 else "no light")
    event(f"faults: {','.join(sorted(set(emu.faults))) or 'none'}")
    assert emu.factory.max_power_mw == MAX_MW
    assert longest_above(world.laser_events(), TRIP_MW, clock.time_ns()) <= 5_000_000
    assert max(mw for _, mw in world.laser_events()) <= TRIP_MW + 1e-9


# -- edge-latched inputs (S3a) -------------------------------------------------------------
@pytest.mark.parametrize("name, opened, closed, code, count",
                         [("interlock", "open", "closed", "ILK", "ilkc"), ("key", False, True, "KEY", "keyc")])
def test_opening_between_ticks_latches(name, opened, closed, code, count):
    clock, world, emu, host = make()
    host.cmd("DUTY 0.2 100")
    host.cmd("EN 1 100")
    host.advance(0.01)
    # open and close again with no tick in between: only the interrupt sees it
    world.set_inputs({name: opened})
    clock.advance(0.0002)
    world.set_inputs({name: closed})
    assert world.laser_output_mw() == 0.0
    host.advance(0.01)
    assert code in emu.faults
    assert world.laser_output_mw() == 0.0  # no light comes back by itself
    st_ = host.status()
    assert st_[count] == "1" and st_["out"] == "0"
    assert f"! IN {code} 0" in host.notices and f"! IN {code} 1" in host.notices
    assert host.cmd("CLR").startswith("OK cleared=")
    assert host.cmd("EN 1 100") == "OK out=1"


def test_openings_are_counted_while_off_without_latching():
    clock, world, emu, host = make()
    for _ in range(3):
        world.set_inputs({"interlock": "open"})
        world.set_inputs({"interlock": "closed"})
        world.set_inputs({"key": False})
        world.set_inputs({"key": True})
    host.advance(0.01)
    st_ = host.status()
    assert (st_["ilkc"], st_["keyc"], st_["faults"]) == ("3", "3", "-")


@pytest.mark.parametrize("name", ["interlock", "key"])
def test_real_time_pulses_latch_every_time(name):
    """1, 2, 5 and 10 ms pulses from the world's timer thread, 10 each, while ON."""
    from nirf.hal.clock import SystemClock

    clock = SystemClock()
    world = World(clock)
    emu = McuEmulator(world, clock, full_scale_mw=FULL_SCALE_MW, factory=factory_for(FULL_SCALE_MW, MAX_MW, 3600),
                      heartbeat_timeout_ms=1000)
    seq = [20000]

    def cmd(c: str) -> str:
        seq[0] += 1
        emu.feed(line(f"{seq[0]} {c}"))
        out = [r.rpartition("*")[0] for r in emu.take_output().decode().splitlines()]
        return next(r for r in out if r.startswith(f"{seq[0]} ")).partition(" ")[2]

    code = "ILK" if name == "interlock" else "KEY"
    lengths_ms = []
    cmd("DUTY 0.2 100")
    for ms in (1, 2, 5, 10):
        for _ in range(10):
            assert cmd("CLR").startswith("OK")
            assert cmd("EN 1 100") == "OK out=1"
            n_events = len(world.input_events())
            world.pulse(name, ms)
            world._pulses[name].join(timeout=5.0)
            assert not world._pulses[name].is_alive()
            emu.tick()  # the next main-loop pass after the pulse
            assert code in emu.faults, (ms, emu.faults)
            assert not emu.output_enabled and world.laser_output_mw() == 0.0
            edges = world.input_events()[n_events:]
            assert [v for _, _, v in edges] == [False, True]
            lengths_ms.append((edges[1][0] - edges[0][0]) / 1e6 - ms)
            # no light after the pulse without a new enable
            emu.tick()
            assert world.laser_output_mw() == 0.0
    assert min(lengths_ms) >= -0.05  # never shorter than asked
    print(f"pulse length error ms: median {sorted(lengths_ms)[len(lengths_ms) // 2]:.3f}, "
          f"max {max(lengths_ms):.3f}")


# -- budget (S7a) --------------------------------------------------------------------------
def test_budget_accumulates_over_reissued_enables_and_latches():
    clock, world, emu, host = make()
    host.cmd("DUTY 0.1 50")
    t_first_on = clock.monotonic()
    for _ in range(3):
        host.cmd("EN 1 50")
        host.advance(2.0, step_s=0.01)
        host.cmd("EN 1 50")  # re-issuing never restarts anything
        host.advance(0.5, step_s=0.01)
        host.cmd("EN 0")
        host.advance(0.2, step_s=0.01)
    assert float(host.status()["ont"]) == pytest.approx(7.5, abs=0.02)
    assert host.cmd("EN 1 50") == "OK out=1"
    host.advance(5.0, step_s=0.01)
    assert "BUDGET" in emu.faults
    assert float(host.status()["ont"]) == pytest.approx(10.0, abs=0.02)
    lit = lit_intervals(world.laser_events(), clock.time_ns())
    assert sum(b - a for a, b in lit) / 1e9 == pytest.approx(10.0, abs=0.02)  # the true output agrees
    assert host.cmd("CLR").startswith("OK")
    reply = host.cmd("EN 1 50")
    assert reply.startswith("ERR REFUSED BUDGET ")
    # min(60 s, budget / 10) = 1 s must be free: the first second of the first on period
    # leaves the window 2 x budget after it was used
    free_at = t_first_on + 2 * BUDGET_S + 1.0
    wait_s = int(reply.split()[-1])
    assert wait_s == math.ceil(free_at - clock.monotonic())
    host.advance(free_at - clock.monotonic() - 0.05, step_s=0.05, heartbeat_s=None)
    assert host.cmd("EN 1 50").startswith("ERR REFUSED BUDGET")
    host.advance(0.1, step_s=0.05, heartbeat_s=None)
    assert host.cmd("EN 1 50") == "OK out=1"


def test_budget_used_in_any_2x_window_never_exceeds_budget_under_random_toggles():
    clock, world, emu, host = make()
    rng = random.Random(5)
    host.cmd("DUTY 0.1 50")
    for _ in range(400):
        host.cmd(rng.choice(["EN 1 50", "EN 1 50", "EN 0", "CLR"]))
        host.advance(rng.uniform(0.01, 0.4), step_s=0.005)
    on = lit_intervals(world.laser_events(), clock.time_ns())
    assert sum(b - a for a, b in on) > 1.5 * BUDGET_S * 1e9  # the budget was really used
    assert max_in_window(on, 2 * BUDGET_S * 1e9) <= BUDGET_S * 1e9 + 5_000_000
    # the MCU's own count is the true lit time of the window that ends now
    now = clock.time_ns()
    start = now - 2 * BUDGET_S * 1e9
    true_s = sum(max(0, min(b, now) - max(a, start)) for a, b in on) / 1e9
    assert float(host.status()["ont"]) == pytest.approx(true_s, abs=0.002)


def lit_intervals(events: list[tuple[int, float]], end_ns: int) -> list[tuple[int, int]]:
    out, since = [], None
    for t, mw in events:
        if mw > 0 and since is None:
            since = t
        elif mw <= 0 and since is not None:
            out.append((since, t))
            since = None
    if since is not None:
        out.append((since, end_ns))
    return out


def max_in_window(intervals: list[tuple[int, int]], window_ns: float) -> float:
    """The most lit time within any window of ``window_ns`` (the maximum is reached with
    a window starting at an interval's start)."""
    best = 0.0
    for a, _ in intervals:
        end = a + window_ns
        best = max(best, sum(max(0, min(y, end) - max(x, a)) for x, y in intervals))
    return best


# -- frame-boundary gating (S15) -----------------------------------------------------------
def test_600_random_toggles_during_modulated_frames_respect_frame_boundaries():
    clock, world, emu, host = make(factory=factory_for(FULL_SCALE_MW, MAX_MW, 3600))
    rng = random.Random(11)
    period_us, exposure_us = 33333, 20000
    host_duty = [0.1]
    assert host.cmd("DUTY 0.1 50").startswith("OK")
    assert host.cmd(f"FTON {period_us} {exposure_us} 1").startswith("OK")
    offs = []
    for _ in range(600):
        choice = rng.random()
        if choice < 0.3:
            host.cmd(f"EN 1 {host_duty[0] * FULL_SCALE_MW:.3f}")
        elif choice < 0.55:
            host.cmd("EN 0")
            offs.append(clock.time_ns())
            assert world.laser_output_mw() == 0.0  # at once, never at a boundary
        else:
            d = rng.choice([0.05, 0.1, 0.2, 0.3, 0.4])
            if host.cmd(f"DUTY {d} {d * FULL_SCALE_MW:.3f}").startswith("OK"):
                host_duty[0] = d
        host.advance(rng.uniform(0.0005, 0.03), step_s=0.0005)
    host.advance(0.1)
    assert emu.faults == ()
    events = world.laser_events()
    triggers = world.triggers()
    assert len(triggers) > 200 and all(t.exposure_ns == exposure_us * 1000 for t in triggers)
    cut_expected = set()
    lit_frames = 0
    for tr in triggers:
        t0, t1 = tr.t_start_ns, tr.t_start_ns + tr.exposure_ns
        level = value_at(events, t0)
        inside = [mw for t, mw in events if t0 < t < t1]
        if not tr.lit:
            assert level == 0.0 and all(mw == 0.0 for mw in inside), tr  # no light in a D frame
            continue
        lit_frames += 1
        seq = [level] + inside
        assert all(b <= a for a, b in zip(seq, seq[1:])), (tr, seq)  # never gains power mid-exposure
        if any(b < a for a, b in zip(seq, seq[1:])):
            cut_expected.add(tr.counter)
    cuts = {int(n.split()[2]) for n in host.notices if n.startswith("! CUT ")}
    assert lit_frames > 50 and cut_expected  # the run did exercise turn-offs inside exposures
    assert cuts == cut_expected  # every cut frame marked, and only those
    # the world's own judge (what bus-level tests use) agrees with the one above
    rec = world.record()
    verdict = judge_frames(rec["laser"], rec["triggers"])
    assert verdict["frames"] == len(triggers) and verdict["lit"] == lit_frames
    assert verdict["dark_lit"] == [] and verdict["rose"] == [] and set(verdict["cut"]) == cut_expected
    print(f"S15: {len(triggers)} frames, {lit_frames} lit, {len(offs)} turn-offs, {len(cuts)} cut and marked")


def test_frame_judge_sees_light_in_a_dark_frame_and_a_rise_mid_exposure():
    laser = [[0, 0.0], [1_000, 50.0], [15_000, 80.0], [30_000, 0.0], [45_000, 10.0]]
    triggers = [[0, 0, 10_000, True], [1, 10_000, 10_000, True], [2, 20_000, 5_000, True],
                [3, 40_000, 10_000, False]]
    v = judge_frames(laser, triggers)
    assert v["rose"] == [0, 1] and v["dark_lit"] == [3] and v["cut"] == []



def value_at(events: list[tuple[int, float]], t_ns: int) -> float:
    v = events[0][1]
    for t, mw in events:
        if t <= t_ns:
            v = mw
        else:
            break
    return v


def test_client_over_the_pty_cannot_exceed_the_budget_by_reissuing_enables(tmp_path):
    """A test client heartbeating the emulator directly over its pseudo-terminal, as a
    hostile or buggy host would, re-issuing EN 1 and cycling EN 0 / EN 1."""
    import time

    import serial

    from nirf.hal.clock import SystemClock
    from nirf.sim.serial_link import PtyLink

    budget_s = 1.0
    clock = SystemClock()
    world = World(clock)
    world.laser_history_s = 1e6
    emu = McuEmulator(world, clock, full_scale_mw=FULL_SCALE_MW, heartbeat_timeout_ms=500,
                      factory=factory_for(FULL_SCALE_MW, MAX_MW, budget_s))
    link = PtyLink(emu, "mcu", tmp_path / "mcu.tty").start()
    port = serial.Serial(link.port, 115200, timeout=0.05)
    rng = random.Random(3)
    replies: list[str] = []
    try:
        seq = 30000

        def send(command: str) -> None:
            nonlocal seq
            seq += 1
            port.write(line(f"{seq} {command}"))
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                raw = port.readline().decode("ascii", "replace").strip()
                if raw.startswith(f"{seq} "):
                    replies.append(raw.rpartition("*")[0].partition(" ")[2])
                    return
            raise AssertionError(f"no reply to {command!r}")

        send("DUTY 0.1 50")
        t_end = time.monotonic() + 5.5
        next_toggle = 0.0
        while time.monotonic() < t_end:
            send("HB")
            if time.monotonic() >= next_toggle:
                next_toggle = time.monotonic() + 0.1
                for command in rng.choice([["EN 1 50"], ["EN 0", "EN 1 50"], ["CLR", "EN 1 50"]]):
                    send(command)
            time.sleep(0.03)
        send("EN 0")
    finally:
        port.close()
        link.stop()
    on = lit_intervals(world.laser_events(), clock.time_ns())
    used = max_in_window(on, 2 * budget_s * 1e9) / 1e9
    total = sum(b - a for a, b in on) / 1e9
    print(f"pty client: lit {total:.3f} s in 5.5 s, most in any {2 * budget_s:.0f} s window {used:.4f} s "
          f"(budget {budget_s} s); refusals {sum(r.startswith('ERR REFUSED BUDGET') for r in replies)}")
    assert total > 1.5 * budget_s  # the client did get light whenever the budget allowed
    assert any(r.startswith("ERR REFUSED BUDGET") for r in replies)
    # one control-loop pass of slack (1 ms ticks; allow for a loaded machine)
    assert used <= budget_s + 0.05


@pytest.mark.parametrize("period_us", [8333, 33333, 100000, 250000])
def test_no_false_xmw_while_modulating_with_honest_level_changes(period_us):
    """Dark frames longer than XMW's 50 ms must not trip on a held reading of an old level."""
    clock, world, emu, host = make(factory=factory_for(FULL_SCALE_MW, MAX_MW, 3600))
    rng = random.Random(period_us)
    host.cmd("DUTY 0.2 100")
    assert host.cmd(f"FTON {period_us} {period_us // 2} 1").startswith("OK")
    assert host.cmd("EN 1 100") == "OK out=1"
    for _ in range(40):
        d = rng.choice([0.05, 0.1, 0.2, 0.3, 0.4])
        assert host.cmd(f"DUTY {d} {d * FULL_SCALE_MW:.3f}").startswith("OK")
        host.advance(rng.uniform(0.01, 0.15), step_s=0.002)
    assert emu.faults == ()
    assert any(tr.lit for tr in world.triggers())
