"""Following another process's publications: its latest state, and the stream of results.

Each follower runs one thread on one SUB socket, checks every message (a malformed one is
counted and dropped, never raised) and keeps what it learnt with the time it arrived, so a
reader can tell how old a value is.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import zmq

from nirf.services.common import ipc

log = logging.getLogger(__name__)


class Follower:
    """A thread that hands every valid publication of ``topics`` to ``on_message``."""

    def __init__(self, ctx: zmq.Context, address: str, topics: tuple[str, ...],
                 on_message: Callable[[str, dict], None], *, name: str):
        self.sock = ipc.subscriber(ctx, address, topics)
        self.on_message = on_message
        self.name = name
        self.dropped = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    if not poller.poll(100):
                        continue
                    while True:
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        msg = _publication(frames)
                        if msg is None:
                            self.dropped += 1
                            continue
                        try:
                            self.on_message(*msg)
                        except Exception:  # one bad message must not end the thread
                            self.dropped += 1
                            log.exception("%s: message not handled", self.name)
                except zmq.ZMQError as err:
                    if err.errno == zmq.ETERM:
                        return
                    log.exception("%s: socket error", self.name)
        finally:
            self.sock.close(linger=0)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=1.0)


def _publication(frames: list) -> tuple[str, dict] | None:
    if len(frames) < 2:
        return None
    try:
        topic = frames[0].decode("ascii")
    except UnicodeDecodeError:
        return None
    body = ipc.unpack_map(frames[1])
    return None if body is None else (topic, body)


class LatestState:
    """The latest ``state`` map a process published, and when it arrived."""

    def __init__(self, ctx: zmq.Context, address: str, *, name: str, on_event=None):
        self._lock = threading.Lock()
        self.value: dict | None = None
        self.received: float | None = None  # time.monotonic() of the last state
        self._changed = threading.Condition(self._lock)
        self._on_event = on_event
        topics = ("state", "event") if on_event else ("state",)
        self.follower = Follower(ctx, address, topics, self._on, name=name)

    def _on(self, topic: str, body: dict) -> None:
        if topic == "state":
            with self._lock:
                self.value = body
                self.received = time.monotonic()
                self._changed.notify_all()
        elif self._on_event is not None:
            self._on_event(topic, body)

    def get(self) -> dict:
        with self._lock:
            return dict(self.value or {})

    def fresh(self, timeout_s: float = 0.3) -> dict:
        """The first state that arrives after this call (so it reflects every command that
        was answered before the call), or the latest one after ``timeout_s``."""
        asked = time.monotonic()
        with self._lock:
            deadline = asked + timeout_s
            while self.received is None or self.received <= asked:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return dict(self.value or {})

    def age_s(self) -> float | None:
        with self._lock:
            return None if self.received is None else time.monotonic() - self.received

    def wait(self, predicate: Callable[[dict], bool], timeout_s: float) -> dict | None:
        """Wait until a state satisfies ``predicate``; that state, or None on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                if self.value is not None and predicate(self.value):
                    return dict(self.value)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def close(self) -> None:
        self.follower.close()


class Results:
    """The results processing publishes (relayed by the gateway), for waiting on the next N.
    The last few hundred are kept, so none is missed between two wake-ups."""

    KEEP = 512

    def __init__(self, ctx: zmq.Context, address: str, *, name: str = "results"):
        import collections

        self._cond = threading.Condition()
        self._recent: collections.deque = collections.deque(maxlen=self.KEEP)
        self.seen = 0
        self.follower = Follower(ctx, address, ("result",), self._on, name=name)

    @property
    def last(self) -> dict | None:
        with self._cond:
            return self._recent[-1][1] if self._recent else None

    def _on(self, topic: str, body: dict) -> None:
        with self._cond:
            self.seen += 1
            self._recent.append((self.seen, body))
            self._cond.notify_all()

    def wait_results(self, count: int, timeout_s: float, valid_only: bool = True) -> list[dict]:
        """The next ``count`` results (valid ones only by default) published after now."""
        got: list[dict] = []
        deadline = time.monotonic() + timeout_s
        with self._cond:
            after = self.seen
            while len(got) < count:
                for n, r in self._recent:
                    if n > after:
                        after = n
                        if r.get("valid") or not valid_only:
                            got.append(r)
                            if len(got) == count:
                                break
                if len(got) >= count:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        return got

    def close(self) -> None:
        self.follower.close()
