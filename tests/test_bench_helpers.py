"""The benchmark's own arithmetic and process helpers (the benchmarks themselves start a
full-size cart and take minutes; they are run by ``make bench`` and ``make soak``, never
by the test suite)."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.cartrun import fd_count, proc_children, proc_cmdline, rss_kib
from bench.e2e import ResultWatcher, StreamStats, _per_item, _pipeline_counters, fixed_rois, percentile
from bench.safety_latency import SafetyStats, off_for_good_ns, verdicts
from bench.soak import ProcessSamples


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=200))
def test_the_50th_percentile_is_the_median(values):
    assert percentile(sorted(values), 50) == pytest.approx(statistics.median(values), abs=1e-6)


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=2, max_size=200),
       st.floats(min_value=0, max_value=100))
def test_a_percentile_lies_between_the_extremes_and_grows_with_q(values, q):
    s = sorted(values)
    p = percentile(s, q)
    assert s[0] <= p <= s[-1]
    assert percentile(s, min(100.0, q + 1.0)) >= p


def test_percentile_of_nothing_is_nan():
    assert math.isnan(percentile([], 99))


def test_output_off_for_good_is_the_last_zero_after_the_last_lit_change():
    # modulation: lit and dark frames alternate, then the watchdog cuts the output
    changes = [(100, 50.0), (200, 0.0), (300, 50.0), (400, 0.0)]
    assert off_for_good_ns(changes, after_ns=0) == 400
    # a later change to zero (e.g. drive 0 while already dark) does not move the time back
    assert off_for_good_ns(changes + [(450, 0.0)], after_ns=0) == 400


def test_output_still_lit_at_the_end_is_never_off():
    assert off_for_good_ns([(100, 0.0), (200, 50.0)], after_ns=0) is None
    assert off_for_good_ns([], after_ns=0) is None


def test_output_already_off_counts_from_the_event_that_started_the_wait():
    assert off_for_good_ns([(100, 0.0)], after_ns=500) == 500


class _FakeClient:
    """Hands out prepared telemetry messages as CartClient.receive does."""

    def __init__(self, messages):
        self.messages = list(messages)

    def receive(self, timeout_s):
        return self.messages.pop(0) if self.messages else None


def _result(seq, t_capture_ns, valid=True, **extra):
    return ("result", dict(seq=seq, t_capture_ns=t_capture_ns, valid=valid, frame_seq=2 * seq, **extra), [])


def test_the_watcher_measures_latency_and_counts_telemetry_gaps():
    now = time.time_ns()
    client = _FakeClient([_result(0, now - 10_000_000), _result(1, now - 12_000_000, valid=False),
                          _result(4, now - 8_000_000, t_done_ns=now - 5_000_000, t_ns=now - 4_000_000),
                          ("event", {"kind": "fault", "code": "CAMERA_STALL", "message": "no frame"}, [])])
    stats = StreamStats()
    watcher = ResultWatcher(client, stats)
    watcher.window_start_ns = 0  # everything counts
    while watcher.poll(0) is not None:
        pass
    assert stats.results_total == stats.results_in_window == 3
    assert stats.telemetry_seq_gaps == 2  # seq 2 and 3 never arrived
    assert stats.invalid == 1
    assert all(ms >= 8.0 for ms in stats.latencies_ms)
    assert stats.stage_ms["capture_to_processed"] == [pytest.approx(3.0)]
    assert stats.faults and "CAMERA_STALL" in stats.faults[0]


def test_results_before_the_window_are_warm_up():
    now = time.time_ns()
    stats = StreamStats()
    watcher = ResultWatcher(_FakeClient([_result(0, now - 1_000_000)]), stats)
    watcher.window_start_ns = time.time_ns() + 10**12
    watcher.poll(0)
    assert stats.results_total == 1 and stats.results_in_window == 0 and not stats.latencies_ms


def test_pairs_lost_and_merging_segments():
    a = StreamStats(window_s=10.0, results_in_window=290, results_total=300, pairs_sent=302,
                    latencies_ms=[1.0, 2.0])
    b = StreamStats(window_s=5.0, results_in_window=150, results_total=150, pairs_sent=150,
                    latencies_ms=[3.0], cpu_s={"controller": 1.5})
    assert a.pairs_lost == 2 and b.pairs_lost == 0
    a.merge(b)
    assert a.pairs_lost == 2
    assert a.results_per_s == pytest.approx(440 / 15.0)
    assert a.latency_ms(50) == pytest.approx(2.0)
    assert a.cpu_s == {"controller": 1.5}


def test_fixed_rois_sit_inside_and_outside_the_phantom_disk():
    width, height = 1456, 1088
    rois = fixed_rois(width, height)
    cx, cy, radius = width / 2, height / 2, height / 6
    x, y, w, h = rois["signal"]
    corners = [(x, y), (x + w, y), (x, y + h), (x + w, y + h)]
    assert all((px - cx) ** 2 + (py - cy) ** 2 < radius ** 2 for px, py in corners)
    bx, by, bw, bh = rois["background"]
    nearest_x = min(max(cx, bx), bx + bw)
    nearest_y = min(max(cy, by), by + bh)
    assert (nearest_x - cx) ** 2 + (nearest_y - cy) ** 2 > radius ** 2
    assert bx + bw <= width and by + bh <= height


def test_safety_verdicts_follow_the_targets():
    s = SafetyStats(heartbeat_timeout_ms=500, trip_ms=[40.0, 120.0], freeze_ms=[450.0],
                    kill_off_ms=480.0, kill_stayed_off=True)
    met = {name.split(" (")[0]: ok for name, _m, _t, ok in verdicts(s)}
    assert met["P4 interlock open to FAULT"] is False  # the maximum counts
    assert met["P4 frozen host to output off"] is True
    assert met["P4 killed controller leaves output off"] is True
    s.kill_stayed_off = False
    assert verdicts(s)[-1][3] is False


def test_nothing_measured_is_not_a_pass():
    assert all(ok is False for *_rest, ok in verdicts(SafetyStats()))


def test_process_helpers_see_a_child_its_memory_and_descriptors():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while child.pid not in proc_children(os.getpid()):
            assert time.monotonic() < deadline, "the child never showed up in /proc"
            time.sleep(0.01)
        assert "time.sleep(30)" in proc_cmdline(child.pid)
        assert rss_kib(child.pid) > 0
        before = fd_count(os.getpid())
        with open(__file__):
            assert fd_count(os.getpid()) == before + 1
    finally:
        child.kill()
        child.wait(timeout=10)
    assert rss_kib(child.pid) is None and fd_count(child.pid) is None and proc_cmdline(child.pid) == ""


def test_memory_growth_is_end_against_start():
    p = ProcessSamples(pid=1, samples=[(0.0, 1000, 10), (5.0, 1200, 12), (10.0, 1050, 10)])
    row = p.row()
    assert row["rss_growth_pct"] == pytest.approx(5.0)
    assert row["rss_max_mib"] == pytest.approx(round(1200 / 1024, 1))
    assert (row["fds_start"], row["fds_end"], row["fds_max"]) == (10, 10, 12)
    assert "rss_growth_pct" not in ProcessSamples(pid=1, samples=[(0.0, 1, 1)]).row()


# ---------------------------------------------------------------------- the frame path (P5)
from bench import framepath  # noqa: E402
from bench.subscribers import window_summary  # noqa: E402


def test_shares_are_cpu_seconds_over_the_window():
    assert framepath.cpu_shares({"gateway": 1.5, "imaging": 6.0}, 60.0) == {
        "gateway": pytest.approx(0.025), "imaging": pytest.approx(0.1)}
    with pytest.raises(ValueError, match="0"):
        framepath.cpu_shares({"gateway": 1.0}, 0.0)


def test_the_split_takes_the_hardware_and_the_rendering_out_of_the_device_path():
    shares = {"hardware": 0.2, "launcher": 0.01, "controller": 0.03, "imaging": 0.5, "processing": 0.1}
    split = framepath.split_shares(shares, render_share=0.35)
    assert split.per_process["imaging"] == pytest.approx(0.15)
    assert "hardware" not in split.per_process and "launcher" not in split.per_process
    assert split.device_total == pytest.approx(0.03 + 0.15 + 0.1)
    assert split.simulator_total == pytest.approx(0.2 + 0.01 + 0.35)
    # nothing is lost or counted twice
    assert split.device_total + split.simulator_total == pytest.approx(sum(shares.values()))


def test_a_rendering_estimate_above_imaging_never_makes_its_device_work_negative():
    split = framepath.split_shares({"imaging": 0.3, "gateway": 0.02}, render_share=0.4)
    assert split.per_process["imaging"] == 0.0
    assert split.device_total == pytest.approx(0.02)
    split = framepath.split_shares({"imaging": 0.3, "newcomer": 0.05}, render_share=-0.1)
    assert split.per_process["imaging"] == pytest.approx(0.3)
    assert split.per_process["newcomer"] == pytest.approx(0.05)  # unknown: device path (errs high)


def test_the_memory_bound_share_adds_the_copies_and_the_pipeline():
    # four copies of a 3.17 MB frame at 60 fps over 4 GB/s, plus 5 ms a pair at 30 pairs/s
    share = framepath.memory_bound_share(copies_per_frame=4, frame_bytes=3_168_256, fps=60.0,
                                         copy_bandwidth_bps=4e9, pipeline_s_per_pair=0.005, pairs_per_s=30.0)
    assert share == pytest.approx(4 * 3_168_256 * 60 / 4e9 + 0.15)
    with pytest.raises(ValueError, match="bandwidth"):
        framepath.memory_bound_share(copies_per_frame=1, frame_bytes=1, fps=1.0, copy_bandwidth_bps=0.0,
                                     pipeline_s_per_pair=0.0, pairs_per_s=0.0)


@given(st.floats(min_value=0.0, max_value=2.0), st.floats(min_value=0.0, max_value=1.0),
       st.floats(min_value=1e9, max_value=5e10))
def test_the_pi_estimate_is_an_ordered_range_scaled_from_here(device, memory_fraction, bandwidth):
    memory = device * memory_fraction
    model = framepath.PiModel("test", 2.7e9, (2.7, 4.0))
    lo, hi = framepath.pi_estimate(device, memory, bandwidth, model)
    assert lo <= hi + 1e-12
    expected_lo = memory * bandwidth / 2.7e9 + (device - memory) * 2.7
    assert lo == pytest.approx(expected_lo, rel=1e-9, abs=1e-12)
    # a Pi with this machine's bandwidth and speed costs what it costs here
    same = framepath.PiModel("same", bandwidth, (1.0, 1.0))
    assert framepath.pi_estimate(device, memory, bandwidth, same) == (pytest.approx(device), pytest.approx(device))


def test_the_pi_models_state_the_assumed_figures():
    by_name = {m.name: m for m in framepath.PI_MODELS}
    assert by_name["Pi 4"].copy_bandwidth_bps == 2.7e9 and by_name["Pi 4"].slowdown == (2.7, 4.0)
    assert by_name["Pi 5"].copy_bandwidth_bps == 7.0e9 and by_name["Pi 5"].slowdown == (1.5, 2.0)


def test_every_copy_of_the_table_is_found_once_in_the_code():
    # the table is read from the code path: a marker that moved or vanished must show
    for copy in framepath.FRAME_COPIES + framepath.OTHER_FRAME_COPIES:
        line = framepath.locate(copy)
        text = (framepath.ROOT / copy.path).read_text().splitlines()[line - 1]
        assert copy.marker in text


def test_a_marker_that_is_not_in_the_file_is_an_error(tmp_path):
    (tmp_path / "x.py").write_text("a = 1\na = 1\n")
    with pytest.raises(LookupError, match="0 times"):
        framepath.locate(framepath.FrameCopy("none", "x.py", "b = 2"), tmp_path)
    with pytest.raises(LookupError, match="2 times"):
        framepath.locate(framepath.FrameCopy("twice", "x.py", "a = 1"), tmp_path)
    assert "x.py:?" in framepath.copy_rows((framepath.FrameCopy("none", "x.py", "b = 2"),), tmp_path)[0]


@pytest.mark.parametrize("platform", ["pi4", "pi5"])
def test_the_instrumented_capture_sees_one_copy_into_the_ring(platform):
    v = framepath.verify_driver_copies(platform)
    assert v["mapped_copies"] == 0 and v["driver_copies"] == 1 and v["copies_in_imaging"] == 1
    assert v["in_ring"] and v["frame_contiguous"] and v["values_right"]
    assert v["stride_bytes"] > v["row_bytes"]  # the stand-in pads its rows


def test_heartbeat_figures_come_from_status_when_reported():
    hb = {"interval_ms": 100.0, "median_gap_ms": 100.2, "max_gap_ms": 104.0, "gaps": 599}
    assert framepath.heartbeat_figures({"heartbeat": hb}) == hb
    assert framepath.heartbeat_figures({"state": "SAFE"}) is None
    assert framepath.heartbeat_figures({"heartbeat": {"median_gap_ms": None}}) is None
    assert framepath.heartbeat_figures(None) is None


def test_copy_bandwidth_is_positive_and_finite():
    bw = framepath.copy_bandwidth(size_bytes=1 << 20, repeats=3)
    assert 0 < bw < math.inf


def test_a_subscribers_window_counts_only_receipts_inside_it():
    receipts = [(100, 5.0), (200, 7.0), (300, 9.0), (400, 50.0)]
    s = window_summary(receipts, 200, 400)
    assert s["results"] == 2 and s["p50_ms"] == pytest.approx(8.0) and s["max_ms"] == 9.0
    empty = window_summary(receipts, 500, 600)
    assert empty["results"] == 0 and math.isnan(empty["p99_ms"]) and math.isnan(empty["max_ms"])


def test_a_named_threads_cpu_is_read_apart_from_the_rest_of_its_process():
    import threading

    from bench.cartrun import thread_cpu_seconds, threads_cpu_by_prefix
    from nirf.sim.threads import name_os_thread

    busy_until = time.monotonic() + 0.3
    named = threading.Event()
    done = threading.Event()

    def work():
        name_os_thread("bench-test-thr")
        named.set()
        while time.monotonic() < busy_until:
            pass
        done.wait(10)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        assert named.wait(10)
        while time.monotonic() < busy_until:
            time.sleep(0.01)
        spent = thread_cpu_seconds(os.getpid(), "bench-test-thr")
        assert 0.0 < spent <= thread_cpu_seconds(os.getpid(), "bench-test-thr") + 1e-9
        assert spent < time.process_time() + 0.05  # never more than the whole process used
        assert thread_cpu_seconds(os.getpid(), "no-such-thread") == 0.0
        # by prefix (the simulator's threads are nirf-sim-...): the same thread, nothing else
        assert threads_cpu_by_prefix(os.getpid(), "bench-test") == pytest.approx(
            thread_cpu_seconds(os.getpid(), "bench-test-thr"), abs=0.02)
        assert threads_cpu_by_prefix(os.getpid(), "no-such-") == 0.0
    finally:
        done.set()
        t.join(10)
    assert thread_cpu_seconds(2 ** 22 + 1, "x") is None  # beyond pid_max: no such process
    assert threads_cpu_by_prefix(2 ** 22 + 1, "x") is None


def test_a_counter_per_item_is_the_difference_over_the_items_between_two_readings():
    assert _per_item((1.0, 10), (1.5, 60)) == pytest.approx(0.01)
    assert _per_item(None, (1.5, 60)) is None
    assert _per_item((1.0, 10), (1.5, 10)) is None  # nothing counted in between
    assert _pipeline_counters({"pipeline_cpu_s": 0.25, "pairs_received": 7}) == (0.25, 7)
    assert _pipeline_counters({"pairs_received": 7}) is None  # a processing that does not report it
    assert _pipeline_counters(None) is None


def test_the_soak_reads_the_simulated_sensors_lateness_back_from_the_log():
    from bench.soak import simulator_lateness
    from nirf.sim.picamera2_standin import LATE_WARNING

    assert simulator_lateness("2026-12-02 10:00:00,000 imaging INFO x: ready\n") == {
        "warnings": 0, "frames_late": 0, "latest_ms": None}
    lines = [f"2026-12-02 10:00:0{i},000 imaging WARNING nirf.sim.picamera2_standin: "
             + LATE_WARNING % (100 + i, 150.0 + i, n, latest)
             for i, (n, latest) in enumerate(((1, 150.4), (37, 541.2)))]
    text = "\n".join(["noise", lines[0], "more noise", lines[1], ""])
    assert simulator_lateness(text) == {"warnings": 2, "frames_late": 37, "latest_ms": 541}


def test_the_simulators_zmq_threads_carry_its_prefix_and_the_carts_do_not(tmp_path):
    """The simulated world's sockets have a context of their own, whose I/O thread (woken by
    every world message) the benchmark must count as the simulator's, not the device path's."""
    import glob

    import zmq

    from nirf.sim.threads import PREFIX, name_context_threads, sim_context

    def names() -> list[str]:
        out = []
        for t in glob.glob(f"/proc/{os.getpid()}/task/*/comm"):
            try:
                with open(t) as f:
                    out.append(f.read().strip())
            except OSError:
                pass
        return out

    cart, sim = zmq.Context(), sim_context()
    try:
        pub = cart.socket(zmq.PUB)
        pub.bind(f"ipc://{tmp_path}/w.ipc")
        sub = sim.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"ipc://{tmp_path}/w.ipc")

        def carried(word: bytes) -> bool:
            for _ in range(100):
                pub.send(word)
                if sub.poll(50):
                    return sub.recv(zmq.NOBLOCK) == word
            return False

        # a message through: the context's I/O thread runs (and has named itself)
        assert carried(b"first")
        renamed = name_context_threads()
        assert PREFIX + "zmqio0" in renamed and PREFIX + "zmqrp" in renamed
        now = names()
        assert PREFIX + "zmqio0" in now and "ZMQbg/IO/0" in now  # the cart's context keeps its names
        assert not any(n.startswith("51/") for n in now)
        assert carried(b"world")  # renamed, it still carries messages
    finally:
        cart.destroy(linger=0)
        sim.destroy(linger=0)


def test_thread_shares_are_the_growth_of_each_threads_cpu_and_runs_over_the_window():
    from bench.cartrun import thread_shares, thread_times

    before = {(1, "a"): (1.0, 100), (2, "b"): (2.0, None), (3, "gone"): (5.0, 7)}
    after = {(1, "a"): (1.5, 300), (2, "b"): (2.1, None), (4, "new"): (0.5, 9)}
    rows = thread_shares(before, after, 2.0)
    assert [(r["thread"], r["share"], r["wakes_per_s"]) for r in rows] == [
        ("a", pytest.approx(0.25), pytest.approx(100.0)), ("b", pytest.approx(0.05), None)]
    assert thread_shares(before, after, 0.0) == []
    mine = thread_times(os.getpid())
    assert mine and all(cpu >= 0.0 for cpu, _ in mine.values())
    assert any(tid == threading_native_id() for tid, _ in mine)
    assert thread_times(2 ** 22 + 1) is None


def threading_native_id() -> int:
    import threading

    return threading.get_native_id()


def test_the_thread_lines_leave_the_simulator_out_and_sum_the_small_threads():
    from bench.__main__ import thread_notes

    threads = [
        {"process": "imaging", "thread": "nirf-acquire", "share": 0.06, "wakes_per_s": 120.0},
        {"process": "imaging", "thread": "nirf-sim-camera", "share": 0.23, "wakes_per_s": 200.0},
        {"process": "hardware", "thread": "python", "share": 0.08, "wakes_per_s": 900.0},
        {"process": "controller", "thread": "nirf-supervisor", "share": 0.008, "wakes_per_s": 48.0},
        {"process": "study", "thread": "python", "share": 0.0004, "wakes_per_s": 6.0},
        {"process": "study", "thread": "ZMQbg/IO/0", "share": 0.0003, "wakes_per_s": None},
    ]
    lines = thread_notes(threads)
    text = "\n".join(lines)
    assert "4 threads" in lines[0] and "6.9 %" in lines[0] and "174 wake-ups" in lines[0]
    assert "nirf-acquire" in text and "safety core" in text and "nirf-sim-camera" not in text
    assert "hardware" not in text
    assert "2 more threads" in lines[-1] and "0.1 % together" in lines[-1]
