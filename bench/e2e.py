"""Benchmark P3: the whole simulated cart end to end through the bus.

The cart streams fluorescence pairs at full size (1456x1088) and 60 frames/s (30 pairs/s).
A telemetry subscriber here, a client like any other, takes every ``result`` and notes
when it arrived (wall clock, ``time.time_ns()``): the capture-to-result latency is that
minus the result's ``t_capture_ns`` (the end of the pair's second exposure, on the same
wall clock since everything runs on this machine).

Figures (PRODUCT.md section 8, P3), over the measured window after a short warm-up:

* results/s on the telemetry endpoint (target at least 29);
* latency p50 (target under 20 ms) and p99 (under 50 ms);
* pairs lost inside processing (target 0): pairs the controller handed to processing
  (its ``status.pairs.sent`` counter, before the start and after the stop and drain)
  minus the results that reached the subscriber. Pairs the acquisition could not form
  (a frame missing on the camera side: ``status.pairs.incomplete``) are reported apart:
  they never reached processing.

**v2** P3 holds in automatic-ROI mode too: ``stream(..., roi_mode="auto")`` streams with
the automatic search on (it runs in its own thread in the processing service, off the
per-pair path); the results then also give the search's time per call
(``roi_search_ms``) and how many ROI generations were found.

Run alone: ``python -m bench.e2e [--seconds 60] [--auto-roi]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from bench import cartrun
from bench.cartrun import BenchCart, arm_and_emit, cpu_seconds, latest_status, to_safe

log = logging.getLogger(__name__)

WIDTH, HEIGHT, FPS, EXPOSURE_US = 1456, 1088, 60.0, 8000
POWER_MW = 50.0
TARGET_RESULTS_PER_S = 29.0
TARGET_P50_MS = 20.0
TARGET_P99_MS = 50.0
SEARCH_TARGET_MS = 5.0  # PRODUCT.md section 7 v2, per automatic ROI search
DRAIN_QUIET_S = 1.0  # after the stop, results stop once this long passes without one
DRAIN_MAX_S = 5.0


def fixed_rois(width: int, height: int) -> dict:
    """Boxes inside and outside the default phantom's disk (radius height/6 at the
    centre), so the run does not depend on the automatic ROI search."""
    half = max(2, height // 12)
    return {"signal": [width // 2 - half, height // 2 - half, 2 * half, 2 * half],
            "background": [height // 40 + 2, height // 40 + 2, height // 5, height // 5]}


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation of sorted values."""
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class StreamStats:
    """What a telemetry subscriber saw of a fluorescence stream."""

    window_s: float = 0.0
    results_in_window: int = 0
    results_total: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    # the latency in stages: capture -> processed (controller frame path, transfer,
    # pipeline), processed -> published (result relay in the controller), published ->
    # received (telemetry bus, CURVE, this subscriber)
    stage_ms: dict[str, list[float]] = field(default_factory=lambda: {
        "capture_to_processed": [], "processed_to_published": [], "published_to_received": []})
    invalid: int = 0
    telemetry_seq_gaps: int = 0  # result messages the subscriber missed (per-topic seq)
    pairs_sent: int = 0
    pairs_incomplete: int = 0
    processing_received: int = 0  # pairs the processing service took in (its own counter)
    faults: list[str] = field(default_factory=list)
    # CPU seconds per process over the measured window (not the warm-up), and that window's
    # wall time as the CPU samples bracket it
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_wall_s: float = 0.0
    # CPU seconds of the camera stand-in's sensor thread inside imaging over the same window
    # (simulator-only work, read from /proc by the thread's name), None when not found
    sim_camera_cpu_s: float | None = None
    # CPU seconds of every simulator-only thread (OS name "nirf-sim-...": the stand-in's
    # sensor, the world followers) per process of the device path, over the same window
    sim_threads_cpu_s: dict[str, float] = field(default_factory=dict)
    # CPU seconds of the safety core's supervisor thread (OS name nirf-supervisor) over the
    # same window, None when not found
    supervisor_cpu_s: float | None = None
    roi_mode: str = "fixed"
    search_ms: dict[int, float] = field(default_factory=dict)  # ROI generation -> search time
    heartbeat: dict | None = None  # the safety core's heartbeat gaps (status), when it reports them
    # the device path's two memory-bound parts as the cart measures them in place (thread CPU):
    # the camera driver's one copy per frame (imaging's status) and the pipeline per pair
    # (statistics and previews, from the results), None when not reported
    copy_cpu_s_per_frame: float | None = None
    pipeline_cpu_s_per_pair: float | None = None
    subscribers: list[dict] = field(default_factory=list)  # the extra subscribers' figures
    # every thread of the cart's processes over the CPU window: process, OS name, share of a
    # core, wake-ups a second (cartrun.thread_shares), largest first
    threads: list[dict] = field(default_factory=list)

    @property
    def results_per_s(self) -> float:
        """Results received in the measured window per second of it."""
        return self.results_in_window / self.window_s if self.window_s > 0 else 0.0

    @property
    def pairs_lost(self) -> int:
        """Pairs handed to processing that never came back as a result to the subscriber."""
        return max(0, self.pairs_sent - self.results_total)

    def merge(self, other: "StreamStats") -> None:
        """Add another stretch of streaming (the soak streams in segments)."""
        self.window_s += other.window_s
        self.results_in_window += other.results_in_window
        self.results_total += other.results_total
        self.latencies_ms.extend(other.latencies_ms)
        for name, values in other.stage_ms.items():
            self.stage_ms.setdefault(name, []).extend(values)
        self.invalid += other.invalid
        self.telemetry_seq_gaps += other.telemetry_seq_gaps
        self.pairs_sent += other.pairs_sent
        self.pairs_incomplete += other.pairs_incomplete
        self.processing_received += other.processing_received
        self.faults.extend(other.faults)
        for name, cpu in other.cpu_s.items():
            self.cpu_s[name] = round(self.cpu_s.get(name, 0.0) + cpu, 2)
        self.search_ms.update(other.search_ms)
        self.cpu_wall_s += other.cpu_wall_s
        if other.sim_camera_cpu_s is not None:
            self.sim_camera_cpu_s = (self.sim_camera_cpu_s or 0.0) + other.sim_camera_cpu_s
        for n, v in other.sim_threads_cpu_s.items():
            self.sim_threads_cpu_s[n] = self.sim_threads_cpu_s.get(n, 0.0) + v
        if other.supervisor_cpu_s is not None:
            self.supervisor_cpu_s = (self.supervisor_cpu_s or 0.0) + other.supervisor_cpu_s
        self.heartbeat = other.heartbeat or self.heartbeat
        self.subscribers.extend(other.subscribers)
        self.threads = other.threads or self.threads  # the last stretch's

    def latency_ms(self, q: float) -> float:
        """The q-th percentile (0..100) of the capture-to-result latency, ms."""
        return percentile(sorted(self.latencies_ms), q)

    def summary(self) -> dict:
        """The figures as a plain map (for printing and for the soak's report)."""
        return {
            "window_s": round(self.window_s, 2),
            "results_per_s": round(self.results_per_s, 2),
            "latency_p50_ms": round(self.latency_ms(50), 2),
            "latency_p99_ms": round(self.latency_ms(99), 2),
            "latency_max_ms": round(max(self.latencies_ms), 2) if self.latencies_ms else float("nan"),
            "pairs_sent": self.pairs_sent,
            "results_received": self.results_total,
            "pairs_lost": self.pairs_lost,
            "pairs_incomplete": self.pairs_incomplete,
            "lost_before_processing": max(0, self.pairs_sent - self.processing_received)
            if self.processing_received else None,
            "telemetry_seq_gaps": self.telemetry_seq_gaps,
            "invalid_results": self.invalid,
            "faults": list(self.faults),
            "cpu_s_per_process": dict(self.cpu_s),
            "stages_p50_p99_ms": {name: (round(percentile(sorted(v), 50), 2), round(percentile(sorted(v), 99), 2))
                                  for name, v in self.stage_ms.items() if v},
            "roi_mode": self.roi_mode,
            "roi_searches": len(self.search_ms),
            "roi_search_ms_p50_max": (round(percentile(sorted(self.search_ms.values()), 50), 3),
                                      round(max(self.search_ms.values()), 3)) if self.search_ms else None,
        }


class ResultWatcher:
    """Collects results (and notes faults) from a client subscribed to ``result`` and
    ``status``/``event``; ``poll`` handles whatever arrives within its timeout."""

    def __init__(self, client, stats: StreamStats):
        self.client = client
        self.stats = stats
        self.window_start_ns: int | None = None  # results received before this are warm-up
        self._last_seq: int | None = None
        self.first_result: dict | None = None
        self.last_result: dict | None = None
        self.last_receipt_ns = 0

    def poll(self, timeout_s: float) -> str | None:
        """Handle one message; return its topic (None when nothing came)."""
        got = self.client.receive(timeout_s)
        if got is None:
            return None
        now_ns = time.time_ns()
        topic, msg, _extra = got
        if topic == "result":
            self.stats.results_total += 1
            if self.first_result is None:
                self.first_result = msg
            self.last_result = msg
            self.last_receipt_ns = now_ns
            seq = msg.get("seq")
            if self._last_seq is not None and isinstance(seq, int) and seq > self._last_seq + 1:
                self.stats.telemetry_seq_gaps += seq - self._last_seq - 1
            self._last_seq = seq
            if self.window_start_ns is not None and now_ns >= self.window_start_ns:
                self.stats.results_in_window += 1
                t_capture = int(msg["t_capture_ns"])
                self.stats.latencies_ms.append((now_ns - t_capture) / 1e6)
                t_done, t_pub = msg.get("t_done_ns"), msg.get("t_ns")
                if isinstance(t_done, int) and isinstance(t_pub, int):
                    stages = self.stats.stage_ms
                    stages["capture_to_processed"].append((t_done - t_capture) / 1e6)
                    stages["processed_to_published"].append((t_pub - t_done) / 1e6)
                    stages["published_to_received"].append((now_ns - t_pub) / 1e6)
                if not msg.get("valid"):
                    self.stats.invalid += 1
                gen, ms = msg.get("roi_generation"), msg.get("roi_search_ms")
                if msg.get("roi_mode") == "auto" and isinstance(gen, int) and isinstance(ms, (int, float)):
                    self.stats.search_ms[gen] = float(ms)
        elif topic == "event" and msg.get("kind") == "fault":
            self.stats.faults.append(f"{msg.get('code')}: {msg.get('message')}")
        return topic


def stream(cart: BenchCart, seconds: float, *, warmup_s: float = 3.0, power_mw: float = POWER_MW,
           on_tick=None, tick_s: float = 5.0, roi_mode: str = "fixed", extra_subscribers: int = 0) -> StreamStats:
    """Stream fluorescence for ``warmup_s + seconds`` and measure. ``on_tick(watcher,
    elapsed_s)``, when given, is called at the start of the measured part and then about
    every ``tick_s`` (the soak samples memory with it); it must return quickly, or the
    receipt times of the results queued meanwhile would be late. ``roi_mode`` "fixed" sets boxes
    on the phantom, "auto" lets processing search them (PRODUCT P5: P3 holds in both).
    ``extra_subscribers`` more telemetry clients subscribe to the results meanwhile, in a
    process of their own (:mod:`bench.subscribers`); their latency figures land in
    ``subscribers``. The CPU time of every process is sampled at the start and the end of the
    measured part (after the warm-up)."""
    if roi_mode not in ("fixed", "auto"):
        raise ValueError(f"roi mode {roi_mode!r}: allowed fixed, auto")
    client = cart.client()
    client.subscribe("result", "status", "event")
    stats = StreamStats(roi_mode=roi_mode)
    watcher = ResultWatcher(client, stats)
    to_safe(client)
    client.call("roi.set", fixed_rois(cart.width, cart.height) if roi_mode == "fixed" else {"auto": True})
    extras = _start_subscribers(cart, extra_subscribers) if extra_subscribers > 0 else None
    try:
        arm_and_emit(client, power_mw)
        before = latest_status(client)["pairs"]
        pids = cart.pids()
        client.call("acquire.start", {"mode": "fluorescence"}, timeout_s=15.0)
        t0 = time.monotonic()
        window_t0 = t0 + warmup_s
        end = window_t0 + seconds
        watcher.window_start_ns = time.time_ns() + int(warmup_s * 1e9)
        next_tick = window_t0  # the first call marks the start of the measured part
        cpu0: dict | None = None
        cam0: float | None = None
        copy0: tuple[float, int] | None = None
        pipe0: tuple[float, int] | None = None
        sup0: float | None = None
        sim0: dict[str, float] = {}
        thr0: dict = {}
        thr1: dict = {}
        cpu_t0 = 0.0
        try:
            while (now := time.monotonic()) < end:
                watcher.poll(min(0.2, end - now))
                if cpu0 is None and time.monotonic() >= window_t0:
                    cpu_t0 = time.monotonic()
                    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    cam0 = _sim_camera_cpu(pids)
                    sim0 = _sim_threads_cpu(pids)
                    thr0 = {name: cartrun.thread_times(pid) for name, pid in pids.items()}
                    sup0 = _supervisor_cpu(pids)
                    copy0, pipe0 = _copy_counters(client), _pipeline_counters(watcher.last_result)
                if on_tick is not None and now >= next_tick:
                    next_tick = now + tick_s
                    on_tick(watcher, now - window_t0)
            window_end_ns = time.time_ns()
            stats.window_s = time.monotonic() - window_t0
            cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            cam1 = _sim_camera_cpu(pids)
            sup1 = _supervisor_cpu(pids)
            if cpu0 is not None and sup0 is not None and sup1 is not None:
                stats.supervisor_cpu_s = round(sup1 - sup0, 3)
            if cpu0 is not None:
                stats.copy_cpu_s_per_frame = _per_item(copy0, _copy_counters(client))
                stats.pipeline_cpu_s_per_pair = _per_item(pipe0, _pipeline_counters(watcher.last_result))
                sim1 = _sim_threads_cpu(pids)
                stats.sim_threads_cpu_s = {n: round(sim1[n] - sim0[n], 3) for n in sim1 if n in sim0}
                thr1 = {name: cartrun.thread_times(pid) for name, pid in pids.items()}
            stats.cpu_wall_s = time.monotonic() - cpu_t0 if cpu0 is not None else 0.0
            if cpu0 is not None:
                stats.threads = sorted(
                    ({"process": name, **row} for name in pids
                     if thr0.get(name) is not None and thr1.get(name) is not None
                     for row in cartrun.thread_shares(thr0[name], thr1[name], stats.cpu_wall_s)),
                    key=lambda r: -r["share"])
            if cpu0 is not None and cam0 is not None and cam1 is not None and cam1 > 0:
                stats.sim_camera_cpu_s = round(cam1 - cam0, 3)
            if on_tick is not None:
                on_tick(watcher, stats.window_s)  # the end of the measured part
            cpu0 = cpu0 or {}
            stats.cpu_s = {n: round(cpu1[n] - cpu0[n], 3) for n in pids
                           if cpu0.get(n) is not None and cpu1.get(n) is not None}
            stats.heartbeat = latest_status(client).get("heartbeat")
        finally:
            client.call("acquire.stop", timeout_s=15.0)
        if extras is not None:
            stats.subscribers = _stop_subscribers(extras, watcher.window_start_ns, window_end_ns)
            extras = None
    finally:
        if extras is not None:
            _stop_subscribers(extras, 0, 0)
    # results still under way (in processing, in the relay) count too
    quiet_since = time.monotonic()
    drain_end = quiet_since + DRAIN_MAX_S
    while time.monotonic() < drain_end and time.monotonic() - quiet_since < DRAIN_QUIET_S:
        if watcher.poll(0.1) == "result":
            quiet_since = time.monotonic()
    after = latest_status(client)["pairs"]
    stats.pairs_sent = after["sent"] - before["sent"]
    stats.pairs_incomplete = after["incomplete"] - before["incomplete"]
    first, last = watcher.first_result, watcher.last_result
    if first is not None and isinstance(first.get("pairs_received"), int):
        stats.processing_received = last["pairs_received"] - first["pairs_received"] + 1
    to_safe(client)
    return stats


def _copy_counters(client) -> tuple[float, int] | None:
    """(CPU seconds, frames) of the camera driver's copies so far, from imaging's status."""
    cam = latest_status(client).get("camera") or {}
    cpu, n = cam.get("copy_cpu_s"), cam.get("frames_copied")
    return (float(cpu), int(n)) if isinstance(cpu, (int, float)) and isinstance(n, int) else None


def _pipeline_counters(result: dict | None) -> tuple[float, int] | None:
    """(CPU seconds, pairs) of processing's pipeline so far, from one of its results."""
    if not result:
        return None
    cpu, n = result.get("pipeline_cpu_s"), result.get("pairs_received")
    return (float(cpu), int(n)) if isinstance(cpu, (int, float)) and isinstance(n, int) else None


def _per_item(first: tuple[float, int] | None, last: tuple[float, int] | None) -> float | None:
    """CPU seconds per item between two (CPU seconds, items) readings of one counter."""
    if first is None or last is None or last[1] <= first[1]:
        return None
    return (last[0] - first[0]) / (last[1] - first[1])


def _sim_threads_cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of the simulator-only threads of each device-path process."""
    from nirf.sim.threads import PREFIX

    out = {}
    for name, pid in pids.items():
        if name in ("hardware", "launcher"):
            continue  # simulator-only as a whole
        v = cartrun.threads_cpu_by_prefix(pid, PREFIX)
        if v is not None:
            out[name] = v
    return out


def _supervisor_cpu(pids: dict[str, int]) -> float | None:
    """CPU seconds so far of the safety core's supervisor thread (None when not found)."""
    from nirf.controller.main import SUPERVISOR_THREAD

    pid = pids.get("controller")
    return None if pid is None else cartrun.thread_cpu_seconds(pid, SUPERVISOR_THREAD)


def _sim_camera_cpu(pids: dict[str, int]) -> float | None:
    """CPU seconds so far of imaging's camera stand-in thread (None without imaging)."""
    from nirf.sim.picamera2_standin import OS_THREAD_NAME

    pid = pids.get("imaging")
    return None if pid is None else cartrun.thread_cpu_seconds(pid, OS_THREAD_NAME)


def _start_subscribers(cart: BenchCart, count: int, ready_timeout_s: float = 30.0) -> subprocess.Popen:
    """The extra subscribers' process, once it says it has connected (bounded wait)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.subscribers", "--state-dir", str(cart.state_dir),
         "--telemetry", cart.telemetry, "--count", str(count), "--max-s", "300"],
        cwd=cartrun.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready: list[str] = []
    reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(ready_timeout_s + 5.0)  # it gives up on its own after 30 s
    if not ready or ready[0].strip() != "ready":
        proc.kill()
        proc.wait(timeout=10)
        raise RuntimeError(f"the {count} extra subscribers did not start within {ready_timeout_s} s")
    return proc


def _stop_subscribers(proc: subprocess.Popen, start_ns: int, end_ns: int) -> list[dict]:
    """Tell the subscribers the measured window, read their figures, make sure they end."""
    try:
        out, _ = proc.communicate(f"{start_ns} {end_ns}\n", timeout=20)
        return json.loads(out.strip().splitlines()[-1])["subscribers"]
    except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError) as err:
        log.warning("extra subscribers gave no figures: %s", err)
        return []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def verdicts(s: StreamStats) -> list[tuple[str, str, str, bool]]:
    """(figure, measured, target, met) rows for the summary table."""
    mode = " (auto ROI)" if s.roi_mode == "auto" else ""
    rows = [
        (f"P3 results/s on the telemetry endpoint{mode}", f"{s.results_per_s:.1f}", f">= {TARGET_RESULTS_PER_S:.0f}",
         s.results_per_s >= TARGET_RESULTS_PER_S),
        (f"P3 capture-to-result latency p50{mode}", f"{s.latency_ms(50):.1f} ms", f"< {TARGET_P50_MS:.0f} ms",
         s.latency_ms(50) < TARGET_P50_MS),
        (f"P3 capture-to-result latency p99{mode}", f"{s.latency_ms(99):.1f} ms", f"< {TARGET_P99_MS:.0f} ms",
         s.latency_ms(99) < TARGET_P99_MS),
        (f"P3 pairs lost inside processing{mode}", f"{s.pairs_lost} of {s.pairs_sent}", "0",
         s.pairs_lost == 0 and s.pairs_sent > 0),
    ]
    if s.roi_mode == "auto" and s.search_ms:
        p50 = percentile(sorted(s.search_ms.values()), 50)
        rows.append(("automatic ROI search per call on the cart (p50)", f"{p50:.2f} ms",
                     f"<= {SEARCH_TARGET_MS:.0f} ms", p50 <= SEARCH_TARGET_MS))
    return rows


def run(seconds: float = 60.0, *, warmup_s: float = 3.0, roi_mode: str = "fixed") -> StreamStats:
    """Start a full-size 60 fps cart, stream for ``seconds`` and stop it."""
    cart = BenchCart(width=WIDTH, height=HEIGHT, fps=FPS, exposure_us=EXPOSURE_US)
    try:
        cart.start()
        return stream(cart, seconds, warmup_s=warmup_s, roi_mode=roi_mode)
    finally:
        cart.stop()


def main(argv: list[str] | None = None) -> int:
    """Print the P3 figures; exit status 0 (a benchmark reports, the table says PASS/MISS)."""
    parser = argparse.ArgumentParser(description="P3: end to end on the simulated cart")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time (after warm-up)")
    parser.add_argument("--auto-roi", action="store_true", help="stream with the automatic ROI search on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    s = run(args.seconds, roi_mode="auto" if args.auto_roi else "fixed")
    for name, value in s.summary().items():
        print(f"  {name:22s} {value}")
    for name, measured, target, met in verdicts(s):
        print(f"  {name:40s} {measured:>16s}  target {target:8s} {'PASS' if met else 'MISS'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
