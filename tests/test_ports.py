"""The free-port picker that every test cart and the benchmark use (sim/ports.py).

A CI run once started a cart whose control and telemetry endpoints had the same port (two
separate bind-to-0 requests got the same answer), so the gateway could not start. These
tests pin the picker's promises, each judged by the kernel: a bind, a listening socket."""

from __future__ import annotations

import random
import socket

import pytest

from nirf.sim import ports


def test_one_call_returns_distinct_ports_below_the_ephemeral_range():
    low, _ = ports.ephemeral_range()
    got = ports.free_ports(50)
    assert len(set(got)) == 50
    assert all(ports.LOWEST <= p < low for p in got)
    for p in got:  # each one is really free: the kernel lets us bind it
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_port_is_never_handed_out_twice_in_a_process():
    seen: set[int] = set()
    for _ in range(200):
        p = ports.free_port()
        assert p not in seen
        seen.add(p)


class _Scripted(random.Random):
    """Returns the scripted ports first, then random ones."""

    def __init__(self, script):
        super().__init__(1)
        self.script = list(script)

    def randrange(self, *args):  # noqa: D102
        return self.script.pop(0) if self.script else super().randrange(*args)


def test_a_port_something_listens_on_is_skipped():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        # offer the busy port first, and the same port twice: neither may come back
        got = ports.free_ports(2, rng=_Scripted([taken, taken]))
        assert taken not in got and len(set(got)) == 2


def test_the_same_candidate_twice_in_one_call_is_returned_once():
    first = ports.free_ports(1)[0]
    ports._issued.discard(first)  # make it eligible again, then offer it twice
    got = ports.free_ports(2, rng=_Scripted([first, first]))
    assert got[0] == first and got[1] != first


def test_ephemeral_range_is_read_from_the_kernel_and_defaults_when_unreadable(tmp_path):
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert ports.ephemeral_range(f) == (40000, 50000)
    assert ports.ephemeral_range(tmp_path / "missing") == (32768, 60999)
    f.write_text("garbage")
    assert ports.ephemeral_range(f) == (32768, 60999)


def test_bad_requests_say_so():
    with pytest.raises(ValueError):
        ports.free_ports(-1)
    assert ports.free_ports(0) == []
