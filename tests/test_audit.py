"""The audit log is bounded and fails closed (PRODUCT C6): entries of at most 4 KiB,
refused requests rate-limited per identity (counted, never silently dropped), rotation,
and a write that reports whether it reached the disk."""

from __future__ import annotations

import errno
import json
import os

import pytest

from nirf.services.gateway.audit import MAX_ENTRY_BYTES, REFUSED_BURST, AuditLog


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_an_entry_is_at_most_4_kib_and_says_how_big_it_was(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.write("command", client="tech", cmd="sim.set", args={"blob": "x" * 60_000})
    log.close()
    (rec,) = lines(tmp_path / "audit.jsonl")
    raw = (tmp_path / "audit.jsonl").read_bytes()
    assert len(raw) <= MAX_ENTRY_BYTES + 1
    assert rec["client"] == "tech" and rec["cmd"] == "sim.set"
    assert rec["args"]["cut"] is True and rec["args"]["bytes"] > 60_000
    assert rec["entry_cut_from_bytes"] > 60_000


def test_ten_thousand_refused_60_kib_requests_stay_under_40_mb_and_are_counted(tmp_path):
    clock = Clock()
    log = AuditLog(tmp_path / "audit.jsonl", clock=clock)
    big = {"x": "y" * 60 * 1024}
    for i in range(10_000):
        clock.t = i * 0.0015  # 10,000 requests in 15 s, as the version-1 attack
        assert log.write_refused("observer-1", "command", client="observer-1", cmd="laser.on", args=big,
                                 ok=False, result={"code": "NOT_PERMITTED"})
    log.close()
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    print(f"audit after 10,000 refused 60 KiB requests: {size / 1e6:.2f} MB")
    assert size <= 40e6
    recs = lines(tmp_path / "audit.jsonl")
    written = sum(1 for r in recs if r["kind"] == "command")
    suppressed = sum(r["refused_requests"] for r in recs if r["kind"] == "suppressed")
    assert written >= REFUSED_BURST
    assert written + suppressed == 10_000  # nothing vanishes without a trace


def test_the_rate_limit_is_per_identity(tmp_path):
    clock = Clock()
    log = AuditLog(tmp_path / "audit.jsonl", clock=clock)
    for _ in range(200):
        log.write_refused("noisy", "command", client="noisy")
    log.write_refused("quiet", "command", client="quiet")
    log.close()
    recs = lines(tmp_path / "audit.jsonl")
    assert [r["client"] for r in recs if r["kind"] == "command"].count("quiet") == 1
    assert sum(r["refused_requests"] for r in recs if r["kind"] == "suppressed") == 200 - REFUSED_BURST


def test_the_log_rotates_and_keeps_a_bounded_number_of_files(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", rotate_bytes=10_000, keep_files=3)
    for i in range(1_000):
        log.write("command", n=i, pad="p" * 100)
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    assert all(p.stat().st_size <= 10_000 for p in tmp_path.iterdir())
    assert lines(tmp_path / "audit.jsonl")[-1]["n"] == 999


def test_a_full_disk_is_reported_and_recovery_is_noticed(tmp_path, mocker):
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.write("start")
    real_write = log._file.write

    def full(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    mocker.patch.object(log._file, "write", side_effect=full)
    assert log.write("command", cmd="arm") is False
    assert log.ok is False and "No space" in log.last_error
    mocker.stopall()
    assert log.write("command", cmd="arm") is True  # reopened
    assert log.ok is True
    log.close()
    assert [r["kind"] for r in lines(tmp_path / "audit.jsonl")] == ["start", "command"]
    del real_write


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_dev_full_fails_every_write(tmp_path):
    (tmp_path / "audit.jsonl").symlink_to("/dev/full")
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.write("command", cmd="arm") is False
    assert log.ok is False
