"""Conformance of the FW102C emulator to the wheel's ASCII protocol, byte by byte.

Written from the protocol (commands end in CR; the wheel echoes the line, then any value,
then a ``"> "`` prompt; errors read ``Command error CMD_...``), driven through ``feed`` and
``take_output`` with a manual clock.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nirf.hal.clock import ManualClock
from nirf.sim.fw102c_emulator import HIGH_SPEED_FACTOR, MAX_INPUT_BYTES, MAX_LINE_BYTES, Fw102cEmulator
from nirf.sim.world import World

NOT_DEFINED = b"Command error CMD_NOT_DEFINED"
ARG_INVALID = b"Command error CMD_ARG_INVALID"
STEP_S = 0.3


def make(positions: int = 6, start: int = 1, **kwargs):
    clock = ManualClock()
    world = World(clock)
    world.set_filter(start, moving=False)
    emu = Fw102cEmulator(world, clock, positions=positions, step_s=STEP_S, **kwargs)
    return clock, world, emu


def send(emu: Fw102cEmulator, line: bytes) -> bytes:
    emu.feed(line + b"\r")
    return emu.take_output()


def reply(line: bytes, value: bytes | None = None) -> bytes:
    """What the protocol says the wheel answers to a line that completes at once."""
    if value is not None and value.startswith(b"Command error"):
        return line + b"\r" + value + b"\n\r> "  # error lines end in LF (then CR)
    return line + b"\r" + (value + b"\r" if value is not None else b"") + b"> "


def run_until_prompt(emu: Fw102cEmulator, clock: ManualClock, limit_s: float, dt: float = 0.001):
    """Tick in small steps until a prompt appears; return (output, elapsed_s) or raise."""
    out = bytearray()
    t0 = clock.monotonic()
    while clock.monotonic() - t0 <= limit_s:
        clock.advance(dt)
        emu.tick()
        out += emu.take_output()
        if b">" in out:
            return bytes(out), clock.monotonic() - t0
    raise AssertionError(f"no prompt within {limit_s} s (got {bytes(out)!r})")


def run_for(emu: Fw102cEmulator, clock: ManualClock, seconds: float, dt: float = 0.01) -> bytes:
    out = bytearray()
    for _ in range(int(round(seconds / dt))):
        clock.advance(dt)
        emu.tick()
        out += emu.take_output()
    return bytes(out)


def shortest_steps(a: int, b: int, n: int) -> int:
    d = abs(a - b)
    return min(d, n - d)


# -- queries -------------------------------------------------------------------------------

def test_idn_echoes_then_names_the_model_then_prompts():
    _, _, emu = make()
    out = send(emu, b"*idn?")
    assert out.startswith(b"*idn?\r")
    assert out.endswith(b"\r> ")
    value = out[len(b"*idn?\r"):-2]
    assert b"FW102C" in value


@pytest.mark.parametrize("start", [1, 3, 6])
def test_pos_query_reports_the_world_position(start):
    _, _, emu = make(start=start)
    assert send(emu, b"pos?") == reply(b"pos?", str(start).encode())


@pytest.mark.parametrize("positions", [6, 12])
def test_pcount_reports_the_slot_count(positions):
    _, _, emu = make(positions=positions)
    assert send(emu, b"pcount?") == reply(b"pcount?", str(positions).encode())


def test_pcount_can_be_set_to_6_or_12_only():
    _, _, emu = make()
    assert send(emu, b"pcount=12") == reply(b"pcount=12")
    assert send(emu, b"pcount?") == reply(b"pcount?", b"12")
    assert send(emu, b"pcount=7") == reply(b"pcount=7", ARG_INVALID)
    assert send(emu, b"pcount?") == reply(b"pcount?", b"12")


@pytest.mark.parametrize("keyword", [b"speed", b"trig", b"sensors", b"baud"])
def test_binary_settings_round_trip(keyword):
    _, _, emu = make()
    for value in (b"1", b"0", b"1"):
        assert send(emu, keyword + b"=" + value) == reply(keyword + b"=" + value)
        assert send(emu, keyword + b"?") == reply(keyword + b"?", value)
    assert send(emu, keyword + b"=2") == reply(keyword + b"=2", ARG_INVALID)
    assert send(emu, keyword + b"?") == reply(keyword + b"?", b"1")


def test_save_is_acknowledged_with_a_prompt():
    _, _, emu = make()
    assert send(emu, b"save") == reply(b"save")


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("line", [b"foo?", b"foo=1", b"POS?", b"Pos=2", b"pos", b"save?",
                                  b"pos=3?", b"*idn", b"speed"])
def test_unknown_commands_are_not_defined(line):
    _, world, emu = make()
    assert send(emu, line) == reply(line, NOT_DEFINED)
    assert world.filter_position == 1 and not world.filter_moving


@pytest.mark.parametrize("line", [b"pos=0", b"pos=7", b"pos=", b"pos=abc", b"pos=-1", b"pos=2.5",
                                  b"pos= 3", b"pos=+3", b"pos=3x", b"pos=99999"])
def test_invalid_positions_are_refused_and_nothing_moves(line):
    clock, world, emu = make()
    assert send(emu, line) == reply(line, ARG_INVALID)
    run_for(emu, clock, 1.0)
    assert not emu.moving
    assert world.filter_position == 1 and not world.filter_moving
    assert send(emu, b"pos?") == reply(b"pos?", b"1")


def test_position_range_follows_the_wheel_type():
    clock, _, emu = make(positions=12)
    out = send(emu, b"pos=12")
    assert out == b"pos=12\r"
    run_until_prompt(emu, clock, 5.0)
    assert send(emu, b"pos?") == reply(b"pos?", b"12")
    assert send(emu, b"pos=13") == reply(b"pos=13", ARG_INVALID)


# -- malformed input -------------------------------------------------------------------------

def test_empty_line_gives_a_new_prompt():
    _, _, emu = make()
    assert send(emu, b"") == b"\r> "


def test_non_ascii_line_is_not_defined():
    _, _, emu = make()
    line = b"pos\xff?"
    assert send(emu, line) == reply(line, NOT_DEFINED)


def test_overlong_line_is_not_defined():
    _, _, emu = make()
    line = b"pos?" + b" " * MAX_LINE_BYTES
    out = send(emu, line)
    assert out.startswith(b"pos?")
    assert out.endswith(b"\r" + NOT_DEFINED + b"\n\r> ")
    assert send(emu, b"pos?") == reply(b"pos?", b"1")


def test_line_feed_is_ignored_and_does_not_end_a_line():
    _, _, emu = make()
    emu.feed(b"pos?\n")
    assert emu.take_output() == b""
    emu.feed(b"\r\n")
    assert emu.take_output() == reply(b"pos?", b"1")


def test_bytes_arriving_one_at_a_time_give_the_same_answer():
    _, _, emu = make(start=5)
    out = bytearray()
    for byte in b"pos?\r":
        emu.feed(bytes([byte]))
        out += emu.take_output()
    assert bytes(out) == reply(b"pos?", b"5")


def test_several_lines_in_one_write_are_answered_in_order():
    _, _, emu = make()
    emu.feed(b"speed=1\rspeed?\rpcount?\r")
    assert emu.take_output() == reply(b"speed=1") + reply(b"speed?", b"1") + reply(b"pcount?", b"6")


def test_input_buffer_is_bounded():
    _, _, emu = make()
    emu.feed(b"x" * (MAX_INPUT_BYTES * 4))
    assert emu.take_output() == b""
    emu.feed(b"\r")
    out = emu.take_output()
    assert out.endswith(NOT_DEFINED + b"\n\r> ")
    # the wheel keeps no more than a line's worth of the garbage
    assert len(out) <= MAX_LINE_BYTES + 1 + len(NOT_DEFINED) + 5  # echo CR, LF, CR, "> "
    assert send(emu, b"pos?") == reply(b"pos?", b"1")


# -- moves -------------------------------------------------------------------------------------

def test_move_echoes_at_once_and_prompts_when_done():
    clock, world, emu = make()
    assert send(emu, b"pos=3") == b"pos=3\r"
    assert world.filter_moving
    out, elapsed = run_until_prompt(emu, clock, 5.0)
    assert out == b"> "
    assert elapsed == pytest.approx(2 * STEP_S, abs=0.002)
    assert world.filter_position == 3 and not world.filter_moving
    assert send(emu, b"pos?") == reply(b"pos?", b"3")


def test_move_to_the_current_position_completes_at_once():
    _, world, emu = make(start=2)
    assert send(emu, b"pos=2") == reply(b"pos=2")
    assert world.filter_position == 2 and not world.filter_moving


@settings(max_examples=40, deadline=None)
@given(start=st.integers(1, 6), target=st.integers(1, 6))
def test_move_time_is_proportional_to_the_shortest_way_round(start, target):
    clock, world, emu = make(start=start)
    steps = shortest_steps(start, target, 6)
    out = send(emu, f"pos={target}".encode())
    if steps == 0:
        assert out.endswith(b"> ")
        return
    assert not out.endswith(b"> ")
    _, elapsed = run_until_prompt(emu, clock, 6 * STEP_S)
    assert elapsed == pytest.approx(steps * STEP_S, abs=0.002)
    assert world.filter_position == target and not world.filter_moving


def test_high_speed_moves_take_a_fraction_of_the_time():
    clock, _, emu = make()
    assert send(emu, b"speed=1") == reply(b"speed=1")
    send(emu, b"pos=3")
    _, elapsed = run_until_prompt(emu, clock, 5.0)
    assert elapsed == pytest.approx(2 * STEP_S * HIGH_SPEED_FACTOR, abs=0.002)


def _scene_positions(world: World) -> list[tuple[int, bool]]:
    seen: list[tuple[int, bool]] = []

    def on_change(kind: str, _payload: dict) -> None:
        if kind == "scene":
            seen.append((world.filter_position, world.filter_moving))

    world.add_listener(on_change)
    return seen


@pytest.mark.parametrize("start,target,path", [
    (1, 3, [1, 2, 3]),
    (1, 5, [1, 6, 5]),       # backwards over the 6-1 boundary is shorter
    (6, 2, [6, 1, 2]),       # forwards over the boundary
    (1, 4, [1, 2, 3, 4]),    # a tie turns towards higher numbers
])
def test_world_sees_each_slot_passed_then_the_target_at_rest(start, target, path):
    clock, world, emu = make(start=start)
    seen = _scene_positions(world)
    send(emu, f"pos={target}".encode())
    run_until_prompt(emu, clock, 5.0)
    assert [p for p, _ in seen] == path
    assert all(moving for _, moving in seen[:-1])
    assert seen[-1] == (target, False)


def test_lines_sent_during_a_move_wait_for_its_end():
    clock, _, emu = make()
    send(emu, b"pos=4")
    emu.feed(b"pos?\r")
    assert emu.take_output() == b""
    out = run_for(emu, clock, 3 * STEP_S + 0.05)
    assert out == b"> " + reply(b"pos?", b"4")


# -- stuck wheel -----------------------------------------------------------------------------

def test_stuck_wheel_stays_put_then_gives_up_with_a_prompt():
    clock, world, emu = make(stall_give_up_s=2.0)
    world.faults["wheel_stuck"] = True
    assert send(emu, b"pos=3") == b"pos=3\r"
    assert run_for(emu, clock, 1.9) == b""
    assert world.filter_position == 1 and world.filter_moving
    out, _ = run_until_prompt(emu, clock, 1.0)
    assert out == b"> "
    assert world.filter_position == 1 and not world.filter_moving
    assert send(emu, b"pos?") == reply(b"pos?", b"1")


def test_stuck_wheel_that_never_gives_up_finishes_once_freed():
    clock, world, emu = make(stall_give_up_s=None)
    world.faults["wheel_stuck"] = True
    send(emu, b"pos=3")
    assert run_for(emu, clock, 30.0, dt=0.1) == b""
    assert world.filter_position == 1 and emu.moving
    world.faults["wheel_stuck"] = False
    out, elapsed = run_until_prompt(emu, clock, 5.0)
    assert out == b"> "
    assert elapsed == pytest.approx(2 * STEP_S, abs=0.002)
    assert world.filter_position == 3 and not world.filter_moving


def test_jam_during_a_move_stops_the_wheel_where_it_is():
    clock, world, emu = make(stall_give_up_s=1.0)
    send(emu, b"pos=4")
    run_for(emu, clock, 1.5 * STEP_S, dt=0.001)
    world.faults["wheel_stuck"] = True
    run_until_prompt(emu, clock, 2.0)
    assert world.filter_position == 2 and not world.filter_moving
    assert send(emu, b"pos?") == reply(b"pos?", b"2")


def test_move_to_the_current_slot_succeeds_even_when_stuck():
    _, world, emu = make(start=3)
    world.faults["wheel_stuck"] = True
    assert send(emu, b"pos=3") == reply(b"pos=3")


def test_constructor_rejects_impossible_wheels():
    clock = ManualClock()
    world = World(clock)
    with pytest.raises(ValueError, match="positions"):
        Fw102cEmulator(world, clock, positions=7)
    with pytest.raises(ValueError, match="step_s"):
        Fw102cEmulator(world, clock, step_s=-1.0)


def test_lines_queued_during_a_move_are_bounded():
    clock, _, emu = make()
    send(emu, b"pos=4")
    emu.feed(b"pos?\r" * MAX_INPUT_BYTES)
    out = run_for(emu, clock, 3 * STEP_S + 0.05)
    answers = out.count(reply(b"pos?", b"4"))
    assert 1 <= answers <= MAX_INPUT_BYTES // len(b"pos?\r")
    # whatever the full buffer cut in half, the next whole line is answered
    emu.feed(b"\r")
    emu.take_output()
    assert send(emu, b"pos?") == reply(b"pos?", b"4")


# -- the wheel as peers see it (sim.set wheel) --------------------------------------------


def test_prompt_is_a_greater_than_sign_and_a_space_by_default():
    """Odemis's driver (tlfw.py, _sendQuery) reads until the last two bytes are "> "."""
    _, _, emu = make()
    assert send(emu, b"pos?").endswith(b"\r> ")
    assert emu.prompt == b"> "


def test_variants_bare_prompt_and_cr_errors():
    _, world, emu = make()
    world.apply({"wheel": {"prompt_space": False, "lf_errors": False}})
    assert send(emu, b"pos?") == b"pos?\r1\r>"
    assert send(emu, b"bogus") == b"bogus\r" + NOT_DEFINED + b"\r>"


def test_error_lines_end_in_lf():
    _, _, emu = make()
    assert send(emu, b"pos=9") == b"pos=9\r" + ARG_INVALID + b"\n\r> "


def test_first_line_after_power_up_is_answered_with_nul_garbage():
    clock = ManualClock()
    world = World(clock)
    world.apply({"wheel": {"powerup_garbage": True}})
    emu = Fw102cEmulator(world, clock)
    out = send(emu, b"*idn?")
    assert out.startswith(b"\x00") and NOT_DEFINED in out and b"*idn?" not in out
    assert out.endswith(b"> ")
    # from the second line on, the wheel is itself
    assert send(emu, b"pos?") == reply(b"pos?", b"1")
    # a power cycle (setting the variant again) garbles the next line once more
    world.apply({"wheel": {"powerup_garbage": True}})
    assert send(emu, b"pos?").startswith(b"\x00")
    assert send(emu, b"pos?") == reply(b"pos?", b"1")
