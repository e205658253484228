"""Imaging's part of the self-test: the filter wheel and the camera, each checked and
reported on its own. It runs only in SAFE with acquisition stopped (it moves the wheel and
runs the camera through the blocked filter)."""

from __future__ import annotations

import logging
import threading

import numpy as np

from nirf.controller.selftest import _check  # noqa: F401  (one report shape for every device)

log = logging.getLogger(__name__)


def check_wheel(wheel, positions: list[int], move_timeout_s: float) -> dict:
    start = wheel.position()
    visited = {}
    for p in positions:
        visited[str(p)] = wheel.move(p, move_timeout_s) == p
    wheel.move(start, move_timeout_s)
    return {"ok": all(visited.values()), "identity": wheel.identity(), "positions": wheel.position_count(),
            "visited": visited, "returned_to": start}


def check_camera(acquisition, frames_wanted: int, black_level: int, timeout_s: float) -> dict:
    """Dark frames (the caller has moved the wheel to the blocked filter): frames arrive and
    their level sits near the black level."""
    got: list[np.ndarray] = []
    done = threading.Event()

    def on_frame(frame):
        if len(got) < frames_wanted:
            got.append(frame.data.astype(np.float32, copy=True))
            if len(got) >= frames_wanted:
                done.set()

    old_sink = acquisition.on_frame
    acquisition.on_frame = on_frame
    try:
        acquisition.start("dark")
        done.wait(timeout_s)
    finally:
        acquisition.stop()
        acquisition.on_frame = old_sink
    if len(got) < frames_wanted:
        return {"ok": False, "error": f"only {len(got)} of {frames_wanted} frames within {timeout_s} s"}
    stack = np.stack(got)
    dark_mean = float(stack.mean())
    dark_std = float(stack.std())
    ok = abs(dark_mean - black_level) < max(8.0, 0.05 * black_level + 5.0)
    return {"ok": ok, "frames": len(got), "dark_mean": round(dark_mean, 2), "dark_std": round(dark_std, 2),
            "black_level": black_level}
