"""``make soak``: the simulated cart streaming for minutes, watched for leaks and faults.

Fluorescence streams at full size (1456x1088) and 60 fps, with a capture every few
seconds into an open case from a second client, while this process subscribes to the
results like any client. After a warm-up (memory settles: caches, buffers, allocator
arenas), the resident memory (``VmRSS`` in /proc/<pid>/status) and the open descriptors
(/proc/<pid>/fd) of every process of the cart are sampled until the end. The report:
results/s, capture-to-result latency percentiles, pairs lost, memory and descriptors of
each process at the start and at the end with the growth (target: under 5 % per process
after warm-up; reported, not asserted), captures done, and any fault.

Continuous emission ends by itself after ``laser.max_emission_s`` (PRODUCT.md S7), so the
soak runs it at the longest allowed (1800 s) and streams in segments shorter than that,
turning emission off and on again between them, as an operator would.

    python -m bench.soak --minutes 30 [--capture-every-s 10] [--json out.json] [--hog]

``--hog`` (PRODUCT P6, ``make soak-hog``): a busy loop on every core beside the cart for the
whole run. As on the cart, the safety core runs ahead of the other services (the unit's
``Nice=-10``), and the simulated hardware ahead of everything, as a real MCU is not slowed by
the Pi's load; both are reniced when the soak may (as root). The report then shows whether
the MCU's watchdog tripped (a fault) or a pair was lost.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import math
import re
import sys
import threading
import time
from dataclasses import dataclass, field

from bench.cartrun import BenchCart, fd_count, rss_kib
from bench.e2e import EXPOSURE_US, FPS, HEIGHT, WIDTH, StreamStats, percentile, stream
from nirf.services.launcher import NICENESS
from nirf.sim.picamera2_standin import LATE_FRAME_S

log = logging.getLogger(__name__)

TARGET_GROWTH_PCT = 5.0
SEGMENT_MAX_S = 1500.0  # under the 1800 s emission limit configured below
SOAK_CONFIG = """
[laser]
max_emission_s = 1800.0
[sim]
mcu_max_on_s = 3600.0
"""
SITES = ("gross_tumor", "tumor_bed", "specimen_cross_section")


@dataclass
class ProcessSamples:
    """Memory and descriptor samples of one process: (elapsed_s, rss_kib, fds)."""

    pid: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    def add(self, elapsed_s: float) -> None:
        rss, fds = rss_kib(self.pid), fd_count(self.pid)
        if rss is not None and fds is not None:
            self.samples.append((elapsed_s, rss, fds))

    def row(self) -> dict:
        """Start, end, maximum and growth (None when fewer than two samples)."""
        if len(self.samples) < 2:
            return {"pid": self.pid, "samples": len(self.samples)}
        (_, rss0, fd0), (_, rss1, fd1) = self.samples[0], self.samples[-1]
        return {"pid": self.pid, "samples": len(self.samples),
                "rss_start_mib": round(rss0 / 1024, 1), "rss_end_mib": round(rss1 / 1024, 1),
                "rss_max_mib": round(max(s[1] for s in self.samples) / 1024, 1),
                "rss_growth_pct": round(100.0 * (rss1 - rss0) / rss0, 2) if rss0 else None,
                "fds_start": fd0, "fds_end": fd1, "fds_max": max(s[2] for s in self.samples)}


class CaptureWorker(threading.Thread):
    """Opens a case and captures every ``every_s`` from its own client, so a capture
    that takes its time never delays the measuring subscriber. Falls silent, with a note,
    when the cart does not know the case or capture commands yet."""

    def __init__(self, cart: BenchCart, every_s: float, pairs: int):
        super().__init__(name="soak-captures", daemon=True)
        self.cart = cart
        self.every_s = every_s
        self.pairs = pairs
        self.stop_event = threading.Event()
        self.done = 0
        self.durations_s: list[float] = []
        self.errors: dict[str, int] = {}
        self.note = ""

    def run(self) -> None:
        from nirf.services.cli.client import CartError

        client = self.cart.client()
        injected = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=24)
        try:
            # the study's id pattern; the fixed-dose arm needs no weight; injected 24 h ago,
            # inside the imaging window
            client.call("case.open", {"case_id": f"SOAK-{int(time.time()) % 100_000:05d}", "histology": "DFSP",
                                      "arm": "icg_25mg", "injection_time": injected.isoformat()},
                        timeout_s=10.0)
        except CartError as err:
            self.note = (f"captures skipped: case.open answered {err.code} ({err.message})"
                         if err.code != "UNKNOWN_COMMAND" else
                         "captures skipped: this cart does not know case.open/capture yet (UNKNOWN_COMMAND)")
            return
        except Exception as err:
            self.note = f"captures skipped: case.open failed: {err}"
            return
        for n in itertools.count(1):
            if self.stop_event.wait(self.every_s):
                break
            t0 = time.monotonic()
            try:
                client.call("capture", {"site": SITES[n % len(SITES)], "label": f"soak {n}",
                                        "pairs": self.pairs}, timeout_s=30.0)
                self.done += 1
                self.durations_s.append(time.monotonic() - t0)
            except CartError as err:
                if err.code == "UNKNOWN_COMMAND":
                    self.note = "captures skipped: this cart does not know the capture command yet (UNKNOWN_COMMAND)"
                    break
                self.errors[err.code] = self.errors.get(err.code, 0) + 1
            except Exception as err:
                key = type(err).__name__
                self.errors[key] = self.errors.get(key, 0) + 1
        try:
            client.call("case.close", timeout_s=10.0)
        except Exception:
            pass  # the report says what the captures did; closing is a courtesy

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=40.0)


HOG_CODE = "while True:\n    pass\n"
# niceness while hogged (root only): the launcher's own, by the benchmark's names for the processes
PRIORITIES = {"hardware": NICENESS["hardware"], "controller": NICENESS["safety"]}


def start_hogs(n: int) -> list:
    """``n`` busy loops, one process each, at the default priority."""
    import subprocess

    return [subprocess.Popen([sys.executable, "-c", HOG_CODE], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]


def stop_hogs(hogs: list) -> None:
    for h in hogs:
        h.kill()
    for h in hogs:
        h.wait(timeout=5)


def prioritise(pids: dict[str, int]) -> str:
    """Renice the simulated MCU and the safety core as on the cart; what was done, for the report."""
    import os

    done = []
    for name, nice in PRIORITIES.items():
        if name in pids:
            try:
                os.setpriority(os.PRIO_PROCESS, pids[name], nice)
                done.append(f"{name} nice {nice}")
            except PermissionError:
                done.append(f"{name} not reniced (needs root)")
    return ", ".join(done)


def run(minutes: float, *, warmup_s: float = 60.0, capture_every_s: float = 10.0, capture_pairs: int = 2,
        sample_every_s: float = 10.0, hog: bool = False) -> dict:
    """Run the soak; return the report as a map."""
    total_s = max(1.0, minutes * 60.0)
    cart = BenchCart(width=WIDTH, height=HEIGHT, fps=FPS, exposure_us=EXPOSURE_US, extra=SOAK_CONFIG)
    processes: dict[str, ProcessSamples] = {}
    stats = StreamStats()
    worker: CaptureWorker | None = None
    final_status: dict = {}
    hogs: list = []
    priorities = ""
    try:
        cart.start()
        processes = {name: ProcessSamples(pid) for name, pid in cart.pids().items()}
        if hog:
            import os

            priorities = prioritise(cart.pids())
            hogs = start_hogs(os.cpu_count() or 2)
            print(f"  CPU hog: {len(hogs)} busy loops; {priorities}", file=sys.stderr, flush=True)
        worker = CaptureWorker(cart, capture_every_s, capture_pairs)
        worker.start()
        segments = max(1, math.ceil(total_s / SEGMENT_MAX_S))
        done_s = 0.0
        progress = {"minute": 0}
        for i in range(segments):
            seg_s = total_s / segments

            def sample(_watcher, elapsed_s, base=done_s):
                for p in processes.values():
                    p.add(base + elapsed_s)
                minute = int((base + elapsed_s) // 60)
                if minute > progress["minute"]:  # a line a minute, so a long soak shows it is alive
                    progress["minute"] = minute
                    rss = ", ".join(f"{name} {p.samples[-1][1] / 1024:.0f}Mi" for name, p in processes.items()
                                    if p.samples)
                    print(f"  {minute:3d} min: captures {worker.done}, RSS {rss}", file=sys.stderr, flush=True)

            # the first segment's warm-up is the memory warm-up too; later ones only settle
            seg = stream(cart, seg_s, warmup_s=warmup_s if i == 0 else 3.0, on_tick=sample,
                         tick_s=sample_every_s)
            stats.merge(seg)
            done_s += seg.window_s
            print(f"  segment {i + 1}/{segments}: {seg.window_s:.0f} s, {seg.results_per_s:.1f} results/s",
                  file=sys.stderr, flush=True)
        worker.stop()
        control = cart.client()
        final_status = control.call("status", timeout_s=10.0)
    finally:
        stop_hogs(hogs)
        if worker is not None:
            worker.stop()
        sim_late = simulator_lateness(cart.log_text())  # before stop(): it removes the log
        cart.stop()
    lat = sorted(stats.latencies_ms)
    return {
        "minutes": round(stats.window_s / 60.0, 2),
        "hog": {"busy_loops": len(hogs), "priorities": priorities} if hog else None,
        "warmup_s": warmup_s,
        "results_per_s": round(stats.results_per_s, 2),
        "latency_ms": {"p50": round(percentile(lat, 50), 2), "p90": round(percentile(lat, 90), 2),
                       "p99": round(percentile(lat, 99), 2), "max": round(lat[-1], 2) if lat else None},
        # where the latency comes from: capture to processed, processed to published by the
        # gateway, published to received here
        "latency_stages_ms": {name: {"p50": round(percentile(sorted(v), 50), 2), "p90": round(percentile(sorted(v), 90), 2),
                                     "p99": round(percentile(sorted(v), 99), 2)}
                              for name, v in stats.stage_ms.items() if v},
        # frames the simulated sensor completed late (warm-up included): its own delay, in
        # the latency above, which a real sensor would not add
        "simulator_late": sim_late,
        "pairs_sent": stats.pairs_sent, "results_received": stats.results_total,
        "pairs_lost": stats.pairs_lost, "pairs_incomplete": stats.pairs_incomplete,
        "telemetry_seq_gaps": stats.telemetry_seq_gaps, "invalid_results": stats.invalid,
        "captures": {"done": worker.done if worker else 0, "errors": dict(worker.errors) if worker else {},
                     "median_s": round(sorted(worker.durations_s)[len(worker.durations_s) // 2], 2)
                     if worker and worker.durations_s else None,
                     "note": worker.note if worker else ""},
        "faults": stats.faults,
        "final_state": final_status.get("state"),
        "final_faults": final_status.get("faults"),
        # the frame ring at the end (streaming stopped): every slot free again, or held by the
        # acquisition's current frames only; pairs sent each way over the whole run
        "frame_ring": {k: (final_status.get("pairs") or {}).get(k)
                       for k in ("ring", "in_shared_memory", "with_pixels", "held_back")},
        "cpu_s_per_process": stats.cpu_s,
        "processes": {name: p.row() for name, p in processes.items()},
    }


_LATE_RE = re.compile(r"simulated sensor late: .*?\((\d+) late so far, the latest (\d+) ms\)")


def simulator_lateness(log_text: str) -> dict:
    """What the simulated sensor logged about falling behind its triggers (see
    sim/picamera2_standin.py, LATE_WARNING): how many warnings, and from the last one the
    frames late so far and the latest lateness. The latency figures hold that delay."""
    found = _LATE_RE.findall(log_text)
    if not found:
        return {"warnings": 0, "frames_late": 0, "latest_ms": None}
    frames, latest = found[-1]
    return {"warnings": len(found), "frames_late": int(frames), "latest_ms": int(latest)}


def print_report(r: dict) -> None:
    """The soak's report as a readable table."""
    print(f"\nSoak: {r['minutes']} min measured after a {r['warmup_s']:.0f} s warm-up, "
          f"{WIDTH}x{HEIGHT} at {FPS:.0f} fps")
    lat = r["latency_ms"]
    if r.get("hog"):
        print(f"  CPU hog                 {r['hog']['busy_loops']} busy loops; {r['hog']['priorities']}")
    print(f"  results/s               {r['results_per_s']}")
    print(f"  latency ms              p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}")
    for name, v in (r.get("latency_stages_ms") or {}).items():
        print(f"    {name.replace('_', ' '):21s} p50 {v['p50']}  p90 {v['p90']}  p99 {v['p99']}")
    late = r.get("simulator_late") or {}
    if late.get("frames_late"):
        print(f"  simulator late          {late['frames_late']} frames completed > {LATE_FRAME_S * 1e3:.0f} ms after exposure "
              f"(latest {late['latest_ms']} ms): the simulator's delay, in the latency above")
    else:
        print("  simulator late          none (the latency above is the cart's own)")
    print(f"  pairs                   sent {r['pairs_sent']}, results {r['results_received']}, "
          f"lost {r['pairs_lost']}, incomplete at acquisition {r['pairs_incomplete']}, "
          f"telemetry gaps {r['telemetry_seq_gaps']}")
    cap = r["captures"]
    print(f"  captures                {cap['done']} done, errors {cap['errors'] or 'none'}, "
          f"median {cap['median_s']} s {('- ' + cap['note']) if cap['note'] else ''}")
    print(f"  faults                  {r['faults'] or 'none'}; final state {r['final_state']}")
    print(f"  CPU s per process       {r['cpu_s_per_process']}")
    ring = r.get("frame_ring") or {}
    print(f"  frame ring              at the end {ring.get('ring')}; pairs in shared memory "
          f"{ring.get('in_shared_memory')}, with pixels {ring.get('with_pixels')}, held back {ring.get('held_back')}")
    print(f"\n  {'process':11s} {'pid':>7s} {'RSS start':>10s} {'RSS end':>9s} {'RSS max':>9s} "
          f"{'growth':>8s} {'fds start':>9s} {'fds end':>8s}  verdict (growth < {TARGET_GROWTH_PCT:.0f} %)")
    for name, row in r["processes"].items():
        if "rss_start_mib" not in row:
            print(f"  {name:11s} {row['pid']:>7d}  (not enough samples)")
            continue
        growth = row["rss_growth_pct"]
        ok = growth is not None and growth < TARGET_GROWTH_PCT and row["fds_end"] <= row["fds_start"]
        print(f"  {name:11s} {row['pid']:>7d} {row['rss_start_mib']:>8.1f}Mi {row['rss_end_mib']:>7.1f}Mi "
              f"{row['rss_max_mib']:>7.1f}Mi {growth:>7.2f}% {row['fds_start']:>9d} {row['fds_end']:>8d}  "
              f"{'PASS' if ok else 'MISS'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``make soak``; exit status 0 when the run completed (targets are reported)."""
    parser = argparse.ArgumentParser(description="Soak the simulated cart: streaming, captures, memory")
    parser.add_argument("--minutes", type=float, default=30.0, help="measured minutes (after the warm-up)")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="streaming before the first memory sample")
    parser.add_argument("--capture-every-s", type=float, default=10.0)
    parser.add_argument("--capture-pairs", type=int, default=2, help="pairs averaged per capture")
    parser.add_argument("--sample-every-s", type=float, default=10.0, help="memory sampling period")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    parser.add_argument("--hog", action="store_true", help="a busy loop on every core beside the cart (P6)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.warmup_s < 0 or args.capture_every_s <= 0 or args.sample_every_s <= 0 \
            or args.capture_pairs < 1:
        parser.error("minutes, capture and sample periods must be positive; warm-up >= 0; pairs >= 1")
    logging.basicConfig(level=logging.WARNING)
    print(f"Soak: {args.minutes} min after a {args.warmup_s:.0f} s warm-up (Ctrl-C stops it and cleans up)",
          file=sys.stderr, flush=True)
    report = run(args.minutes, warmup_s=args.warmup_s, capture_every_s=args.capture_every_s,
                 capture_pairs=args.capture_pairs, sample_every_s=args.sample_every_s, hog=args.hog)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
