"""``make bench``: every performance and safety figure of PRODUCT.md section 8, in one run.

1. P1: the processing pipeline on a 1456x1088 pair against one fused subtract pass, timed
   alternately (:mod:`bench.pipeline_bench`);
2. P2: the simulated camera's render time per frame (:mod:`bench.render_bench`);
3. P3: the whole simulated cart at 1456x1088 and 60 fps, end to end through the bus
   (:mod:`bench.e2e`), with ROIs by command and again in automatic-ROI mode;
4. P4: interlock to FAULT, frozen controller to output off, killed controller leaves the
   output off, on the same cart while it streams (:mod:`bench.safety_latency`).

It ends with one table: each figure, its target and PASS or MISS. ``--quick`` shortens
everything (10 s of streaming, fewer repetitions) for trying it out; the figures of a
quick run are less certain. The exit status is 0 when the run completed, whatever the
verdicts (these machines are noisy: the figures are reported, not enforced), and 2 when
a measurement could not be made.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import traceback

from bench import e2e, pipeline_bench, render_bench, safety_latency
from bench.cartrun import BenchCart

Row = tuple[str, str, str, bool | None]


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def bench_p1(quick: bool) -> list[Row]:
    """P1: the pipeline's median per pair, the fused pass, their ratio."""
    r = pipeline_bench.run(iterations=30 if quick else 100)
    return [
        ("P1 pipeline per 1456x1088 pair (median)", f"{r['pipeline_s'] * 1e3:.2f} ms", "", None),
        ("P1 fused np.subtract pass (median)", f"{r['fused_s'] * 1e3:.2f} ms", "", None),
        ("P1 pipeline / fused pass", f"{r['ratio']:.2f}", f"<= {pipeline_bench.P1_TARGET:.1f}",
         r["ratio"] <= pipeline_bench.P1_TARGET),
        ("P1 v2 pipeline / (on.max() + off.max())", f"{r['ratio_v2']:.2f}", f"<= {pipeline_bench.P1_V2_TARGET:.1f}",
         r["ratio_v2"] <= pipeline_bench.P1_V2_TARGET),
        ("automatic ROI search per call (median, off the pair path)", f"{r['search_s'] * 1e3:.2f} ms",
         f"<= {pipeline_bench.SEARCH_TARGET_MS:.0f} ms", r["search_s"] * 1e3 <= pipeline_bench.SEARCH_TARGET_MS),
    ]


def bench_p2(quick: bool) -> list[Row]:
    """P2: the simulated camera's render time."""
    r = render_bench.run(frames=60 if quick else 200)
    return [("P2 render 1456x1088 frame (median)", f"{r['median_ms']:.2f} ms",
             f"< {render_bench.TARGET_MEDIAN_MS:.0f} ms", r["median_ms"] < render_bench.TARGET_MEDIAN_MS)]


def bench_cart(quick: bool, seconds: float | None) -> tuple[list[Row], list[str]]:
    """P3 then P4 on one cart (the kill measurement last: it leaves the cart dead)."""
    rows: list[Row] = []
    notes: list[str] = []
    cart = BenchCart(width=e2e.WIDTH, height=e2e.HEIGHT, fps=e2e.FPS, exposure_us=e2e.EXPOSURE_US)
    try:
        _say("starting the simulated cart (1456x1088, 60 fps) ...")
        cart.start()
        stream_s = seconds if seconds is not None else (10.0 if quick else 60.0)
        _say(f"P3: streaming for {stream_s:.0f} s ...")
        s = e2e.stream(cart, stream_s)
        summary = s.summary()
        rows += e2e.verdicts(s)
        notes.append(f"P3 over {summary['window_s']} s: max latency {summary['latency_max_ms']} ms, "
                     f"{summary['pairs_incomplete']} pairs incomplete at acquisition (never sent), "
                     f"{summary['lost_before_processing']} lost between controller and processing, "
                     f"{summary['telemetry_seq_gaps']} telemetry gaps, {summary['invalid_results']} invalid results, "
                     f"CPU s per process {summary['cpu_s_per_process']}")
        notes.append(f"P3 latency by stage (p50, p99 ms): {summary['stages_p50_p99_ms']}")
        if s.faults:
            notes.append(f"P3 faults while streaming: {s.faults}")
        # P3 holds in automatic-ROI mode too (PRODUCT.md P5, section 7 v2)
        _say(f"P3 in automatic-ROI mode: streaming for {stream_s:.0f} s ...")
        a = e2e.stream(cart, stream_s, roi_mode="auto")
        rows += e2e.verdicts(a)
        sa = a.summary()
        notes.append(f"P3 auto ROI: {sa['roi_searches']} searches, search ms (p50, max) {sa['roi_search_ms_p50_max']}, "
                     f"{sa['invalid_results']} invalid results, CPU s per process {sa['cpu_s_per_process']}")
        trips, freezes = (3, 2) if quick else (10, 5)
        _say(f"P4: {trips} interlock trips, {freezes} controller freezes, one kill ...")
        # S16 under load: the sender's heartbeat gaps over the streaming just measured
        probe = cart.client()
        try:
            loaded = dict(probe.call("status")["heartbeat"])
        except Exception as err:  # reported as not measured
            loaded = None
            notes.append(f"S16 heartbeat under load not read: {err}")
        finally:
            probe.close()
        _say("S16: the heartbeat over 60 s idle ...")
        p4 = safety_latency.run_on(cart, trips=trips, freezes=freezes, kill=True, heartbeat_loaded=loaded)
        rows += safety_latency.verdicts(p4)
        notes += [f"P4 problem: {p}" for p in p4.problems]
    finally:
        cart.stop()
    return rows, notes


def print_table(rows: list[Row], notes: list[str], elapsed_s: float, quick: bool) -> None:
    """The summary: one line per figure with its target and verdict."""
    width = max(len(r[0]) for r in rows)
    print()
    print(f"NIRF cart benchmarks{' (quick run)' if quick else ''}: {platform.node()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {elapsed_s:.0f} s")
    print(f"  {'figure':{width}s}  {'measured':>24s}  {'target':>16s}  verdict")
    print(f"  {'-' * width}  {'-' * 24}  {'-' * 16}  -------")
    for name, measured, target, met in rows:
        verdict = "" if met is None else ("PASS" if met else "MISS")
        print(f"  {name:{width}s}  {measured:>24s}  {target:>16s}  {verdict}")
    for n in notes:
        print(f"  * {n}")
    misses = [r[0] for r in rows if r[3] is False]
    print(f"\n  {len(misses)} of {sum(r[3] is not None for r in rows)} targets missed"
          + (f": {', '.join(misses)}" if misses else ""))


def main(argv: list[str] | None = None) -> int:
    """Run P1-P4 and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench", description="All of PRODUCT.md section 8 in one run")
    parser.add_argument("--quick", action="store_true", help="short run: 10 s of streaming, fewer repeats")
    parser.add_argument("--seconds", type=float, default=None, help="P3 streaming time (default 60, quick 10)")
    parser.add_argument("--skip-cart", action="store_true", help="only P1 and P2 (no cart processes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    rows: list[Row] = []
    notes: list[str] = []
    status = 0
    # the quiet measurements first, before any cart process loads the machine
    for label, fn in (("P1", bench_p1), ("P2", bench_p2)):
        _say(f"{label} ...")
        try:
            rows += fn(args.quick)
        except Exception:
            notes.append(f"{label} could not be measured: {traceback.format_exc(limit=3)}")
            rows.append((f"{label} (failed)", "-", "", False))
            status = 2
    if not args.skip_cart:
        try:
            cart_rows, cart_notes = bench_cart(args.quick, args.seconds)
            rows += cart_rows
            notes += cart_notes
        except Exception:
            notes.append(f"the cart benchmarks could not run: {traceback.format_exc(limit=5)}")
            rows.append(("P3/P4 (failed)", "-", "", False))
            status = 2
    print_table(rows, notes, time.monotonic() - t0, args.quick)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
