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

from nirf.hal.threads import WakeSignal
from nirf.services.common import ipc

log = logging.getLogger(__name__)


class Follower:
    """A thread that hands every valid publication of ``topics`` to ``on_message``.

    The thread sleeps until a message comes (no timer): :meth:`close` and a change of
    :meth:`subscribe` wake it through a pipe. ``subscribed=False`` starts it with no
    subscription, so the publisher sends it nothing until :meth:`subscribe` (a ZeroMQ
    publisher filters at its end: an unsubscribed follower costs neither process a
    wake-up per message)."""

    def __init__(self, ctx: zmq.Context, address: str, topics: tuple[str, ...],
                 on_message: Callable[[str, dict], None], *, name: str, subscribed: bool = True):
        self.topics = tuple(topics)
        self.sock = ipc.subscriber(ctx, address, self.topics if subscribed else ())
        self.on_message = on_message
        self.name = name
        self.dropped = 0
        self._subscribed = subscribed  # what the socket has (the thread's own)
        self._want = subscribed  # what was asked for (any thread)
        self._stop = threading.Event()
        self._wake = WakeSignal()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def subscribe(self, on: bool) -> None:
        """Start (True) or stop (False) receiving ``topics``. The socket belongs to the
        follower's thread, which makes the change when this wakes it; messages published
        before the publisher hears of a new subscription are not received."""
        self._want = bool(on)
        self._wake.set()

    def _apply_subscription(self) -> None:
        want = self._want
        if want == self._subscribed:
            return
        option = zmq.SUBSCRIBE if want else zmq.UNSUBSCRIBE
        for t in self.topics:
            self.sock.setsockopt(option, t.encode("ascii"))
        self._subscribed = want

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        wake_fd = self._wake.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    events = dict(poller.poll())
                    if wake_fd in events:
                        self._wake.consume()
                        self._apply_subscription()
                    if self.sock not in events:
                        continue
                    while True:
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        msg = publication(frames)
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
                    self._stop.wait(0.1)  # not a spin on a socket that keeps failing
        finally:
            self.sock.close(linger=0)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout=1.0)


def publication(frames: list) -> tuple[str, dict] | None:
    """``(topic, map)`` of a received ``[topic, msgpack map]`` message, or None when it is
    malformed."""
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

    The follower is subscribed only while a :meth:`wait_results` runs: a process that waits
    for results now and then (a calibration, a capture) is not woken thirty times a second
    the rest of the time. The results of a wait are kept (the last few hundred), so none is
    missed between two of its wake-ups."""

    KEEP = 512

    def __init__(self, ctx: zmq.Context, address: str, *, name: str = "results"):
        import collections

        self._cond = threading.Condition()
        self._recent: collections.deque = collections.deque(maxlen=self.KEEP)
        self.seen = 0
        self._waiting = 0
        self.follower = Follower(ctx, address, ("result",), self._on, name=name, subscribed=False)

    def _on(self, topic: str, body: dict) -> None:
        with self._cond:
            self.seen += 1
            self._recent.append((self.seen, body))
            self._cond.notify_all()

    def wait_results(self, count: int, timeout_s: float, valid_only: bool = True) -> list[dict]:
        """The next ``count`` results (valid ones only by default) published after now."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._waiting += 1
            if self._waiting == 1:
                self.follower.subscribe(True)
            try:
                return self._collect(count, deadline, valid_only)
            finally:
                self._waiting -= 1
                if self._waiting == 0:
                    self.follower.subscribe(False)

    def _collect(self, count: int, deadline: float, valid_only: bool) -> list[dict]:
        """The waiting of :meth:`wait_results`, with the condition held."""
        got: list[dict] = []
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
