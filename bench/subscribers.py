"""Extra telemetry subscribers for the benchmark (PRODUCT.md P3/P5: latency with 1, 5 and 20
subscribers), in a process of their own so their receiving never competes for the measuring
subscriber's interpreter lock.

Each subscriber is an operator client like any other (CURVE, the cart's local operator key),
subscribed to ``result`` only. One poller serves them all; every result is noted with its
receipt time (wall clock, the clock ``t_capture_ns`` is on). When the parent writes the
measured window (``<start_ns> <end_ns>``) to this process's standard input, or closes it, or
``--max-s`` passes, it prints one JSON line: per subscriber the results received inside the
window and their latency p50/p99/max in ms.

    python -m bench.subscribers --state-dir DIR --telemetry tcp://... --count 19
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import msgpack
import zmq
import zmq.auth

from bench.e2e import percentile

MAX_COUNT = 64
MAX_RUN_S = 600.0


def window_summary(receipts: list[tuple[int, float]], start_ns: int, end_ns: int) -> dict:
    """Results received in ``[start_ns, end_ns)`` of one subscriber's ``(receipt_ns,
    latency_ms)`` notes: how many, and the latency p50/p99/max (ms, NaN when none)."""
    lat = sorted(ms for t, ms in receipts if start_ns <= t < end_ns)
    return {"results": len(lat), "p50_ms": round(percentile(lat, 50), 2),
            "p99_ms": round(percentile(lat, 99), 2), "max_ms": round(lat[-1], 2) if lat else float("nan")}


def _sockets(ctx: zmq.Context, state_dir: Path, telemetry: str, count: int) -> list[zmq.Socket]:
    keys = state_dir / "keys"
    server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
    public, secret = zmq.auth.load_certificate(str(keys / "local-operator.key_secret"))
    socks = []
    for _ in range(count):
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 1000)
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server_public, public, secret
        s.setsockopt(zmq.SUBSCRIBE, b"result")
        s.setsockopt(zmq.SUBSCRIBE, b"status")  # only to know the subscription is in place
        s.connect(telemetry)
        socks.append(s)
    return socks


def main(argv: list[str] | None = None) -> int:
    """Run the subscribers until told the window (stdin) or ``--max-s``; print the JSON line."""
    parser = argparse.ArgumentParser(description="extra telemetry subscribers for the benchmark")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--telemetry", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--max-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    if not 1 <= args.count <= MAX_COUNT:
        parser.error(f"--count {args.count} outside 1-{MAX_COUNT}")
    if not 0 < args.max_s <= MAX_RUN_S:
        parser.error(f"--max-s {args.max_s} outside 0-{MAX_RUN_S:.0f} s")
    ctx = zmq.Context()
    socks = _sockets(ctx, args.state_dir, args.telemetry, args.count)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    receipts: list[list[tuple[int, float]]] = [[] for _ in socks]
    window: list[int] = []
    told = threading.Event()

    def read_window() -> None:
        line = sys.stdin.readline().split()
        if len(line) == 2:
            window.extend(int(v) for v in line)
        told.set()

    index = {s: i for i, s in enumerate(socks)}
    # Ready once every subscriber has had a message (the CURVE handshake and the
    # subscription are through): the parent waits for this line before it streams.
    heard: set[int] = set()
    ready_end = time.monotonic() + 30.0
    while len(heard) < len(socks) and time.monotonic() < ready_end:
        for s, _ev in poller.poll(100):
            s.recv_multipart()
            heard.add(index[s])
    print("ready" if len(heard) == len(socks) else f"only {len(heard)} of {len(socks)} connected", flush=True)
    threading.Thread(target=read_window, daemon=True).start()
    end = time.monotonic() + args.max_s
    while not told.is_set() and time.monotonic() < end:
        for s, _ev in poller.poll(100):
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now_ns = time.time_ns()
                if frames[0] != b"result":
                    continue
                try:
                    msg = msgpack.unpackb(frames[1], raw=False)
                    receipts[index[s]].append((now_ns, (now_ns - int(msg["t_capture_ns"])) / 1e6))
                except (IndexError, KeyError, TypeError, ValueError, msgpack.UnpackException):
                    continue  # not a result map: not ours to judge here
    start_ns, end_ns = window if len(window) == 2 else (0, time.time_ns())
    print(json.dumps({"subscribers": [window_summary(r, start_ns, end_ns) for r in receipts]}), flush=True)
    for s in socks:
        s.close(linger=0)
    ctx.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
