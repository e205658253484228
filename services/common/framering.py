"""Frames in shared memory: imaging writes each camera frame once, processing reads it in place.

The camera driver copies a frame's pixels once, from the camera's buffer into a slot of
this ring (a file in shared memory, mapped by imaging and by processing); the pair message
to processing then carries only the slots' numbers, not the pixels. A slot's lifetime is
explicit:

* **held in imaging** from the moment the driver is given it until the last numpy view of
  it is gone (the acquisition's frame, the record tap's send, a calibration's sum: whoever
  still holds the frame). The ring knows by a finalizer on the object every view of the
  slot keeps alive, so nothing has to remember to give a slot back.
* **leased to processing** from the moment its pair is sent until processing says it is
  done with that pair, or with a later one (messages to one subscriber arrive in order:
  a later pair done means every earlier one was handled or never arrived), or says it has
  received nothing since a moment after the pair was sent (a pair lost on the way), or a
  new processing process starts.

A slot is written again only when neither holds. So no frame is overwritten while in use;
when every slot is busy the driver falls back to an ordinary array, whose pair travels
with its pixels as before (counted, never blocking). At most
:data:`MAX_PAIRS_IN_FLIGHT` pairs are leased at once: a processing that is behind or gone
loses pairs, as it did with a bounded queue, and never takes every slot.

Every slot also has a generation number in the file's header, written by imaging when the
slot is given out. Processing checks it before and after using a frame and drops a pair
whose slot changed meanwhile (:class:`RingReader`): a lifetime bug shows up as a counted
drop, never as a result computed on a torn frame.

Layout of the file: a 4096-byte header (magic, version, slot count, slot size, a random
token naming this ring, then one little-endian uint64 generation per slot), then the slots,
each a whole number of pages. Imaging creates the file under a temporary name and renames
it into place, so processing never maps a half-made ring; a restarted imaging makes a new
ring (a new token) and processing maps the new file when a message names it.

The ring lives in the runtime folder when that is a tmpfs (``/run/nirf`` on the cart), else
in ``/dev/shm`` (the simulator's temporary runtime folder is usually on disk, where mapped
pages would be written back to the disk).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import secrets
import struct
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"NIRFRING"
VERSION = 1
HEADER_BYTES = 4096
_HEAD = struct.Struct("<8sIIQ16s")  # magic, version, slots, slot bytes, token
GENS_OFFSET = 64
PAGE = mmap.PAGESIZE
DEFAULT_SLOTS = 14  # 4 pairs leased + the acquisition's frames + room; 44 MB at 1456x1088
MAX_SLOTS = (HEADER_BYTES - GENS_OFFSET) // 8
MAX_PAIRS_IN_FLIGHT = 4  # leased to processing at once (the old bounded queue held 4 pairs)
DELIVERY_MARGIN_S = 0.05  # an ipc message is delivered well within this on one machine
IDLE_REPORT_S = 0.25  # processing reports "nothing received since" this long after its last pair


def _on_tmpfs(path: Path) -> bool:
    """Whether ``path`` lies on a tmpfs (by the longest mount point above it)."""
    try:
        real = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, parts[2]
        return fstype == "tmpfs"
    except OSError:
        return False


def ring_path(runtime_dir: Path) -> Path:
    """Where imaging puts the ring and processing looks for it (both compute it alike)."""
    runtime_dir = Path(runtime_dir)
    if _on_tmpfs(runtime_dir) or not Path("/dev/shm").is_dir():
        return runtime_dir / "frames.ring"
    digest = hashlib.sha1(str(runtime_dir.resolve()).encode()).hexdigest()[:16]
    return Path("/dev/shm") / f"nirf-{os.getuid()}-{digest}.ring"


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class _SlotBuffer:
    """What every numpy view of one slot keeps alive (through ``ndarray.base``); its
    finalizer tells the ring the slot is no longer held in this process."""

    __slots__ = ("__array_interface__", "ring", "slot", "gen", "_keep", "__weakref__")

    def __init__(self, ring: "FrameRing", slot: int, gen: int, shape: tuple[int, int]):
        self.ring, self.slot, self.gen = ring, slot, gen
        self._keep = ring._base  # the mapping stays while a view exists
        addr = ring._base.ctypes.data + ring.slot_offset(slot)
        self.__array_interface__ = {"data": (addr, False), "shape": shape, "typestr": "<u2", "version": 3}


@dataclass(frozen=True)
class SlotRef:
    """One frame's place in the ring, as a pair message names it."""

    slot: int
    gen: int
    height: int
    width: int

    def as_list(self) -> list[int]:
        return [self.slot, self.gen, self.height, self.width]


def slot_of(frame: np.ndarray) -> SlotRef | None:
    """The ring slot ``frame`` is (all of), or None for an ordinary array or a partial view."""
    buf = frame.base if isinstance(frame, np.ndarray) else None
    if not isinstance(buf, _SlotBuffer) or frame.dtype != np.uint16:
        return None
    if frame.shape != buf.__array_interface__["shape"] or not frame.flags.c_contiguous \
            or frame.__array_interface__["data"][0] != buf.__array_interface__["data"][0]:
        return None
    return SlotRef(buf.slot, buf.gen, int(frame.shape[0]), int(frame.shape[1]))


class FrameRing:
    """Imaging's side: the slots, who holds them, the leases to processing.

    ``clock.monotonic()`` must be the machine's monotonic clock in the real processes
    (processing's idle reports are on it); tests give a manual one to both sides."""

    def __init__(self, path: Path, slot_bytes: int, *, slots: int = DEFAULT_SLOTS, clock=None):
        if not 2 <= slots <= MAX_SLOTS:
            raise ValueError(f"frame ring: {slots} slots outside 2-{MAX_SLOTS}")
        if slot_bytes <= 0:
            raise ValueError(f"frame ring: slot size {slot_bytes} bytes")
        from nirf.hal.clock import SystemClock

        self.clock = clock or SystemClock()
        self.path = Path(path)
        self.slots = slots
        self.slot_bytes = _round_up(slot_bytes, PAGE)
        self.token = secrets.token_bytes(16)
        size = HEADER_BYTES + self.slots * self.slot_bytes
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # space reserved now: no SIGBUS on a full tmpfs later
            except OSError:
                os.unlink(tmp)
                raise
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._base = np.frombuffer(self._mm, dtype=np.uint8)
        self._mm[:_HEAD.size] = _HEAD.pack(MAGIC, VERSION, self.slots, self.slot_bytes, self.token)
        self._gens = np.frombuffer(self._mm, dtype="<u8", count=self.slots, offset=GENS_OFFSET)
        os.replace(tmp, self.path)
        self._lock = threading.Lock()
        self._held = [False] * self.slots  # a view of the slot exists in this process
        self._lease: list[tuple[int, float] | None] = [None] * self.slots  # (pair seq, sent at)
        self._next_gen = 1
        self._next_slot = 0
        self._pair_seq = 0
        self._instance: str | None = None  # the processing process last heard from
        self.stats = {"given": 0, "full": 0, "pairs_leased": 0, "pairs_held_back": 0, "released_done": 0,
                      "released_idle": 0, "released_restart": 0, "reports_bad": 0}
        self._closed = False

    # -- geometry
    def slot_offset(self, slot: int) -> int:
        return HEADER_BYTES + slot * self.slot_bytes

    def fits(self, height: int, width: int) -> bool:
        return height * width * 2 <= self.slot_bytes

    @property
    def token_hex(self) -> str:
        return self.token.hex()

    # -- giving out slots
    def allocate(self, height: int, width: int) -> np.ndarray | None:
        """A writable (height, width) uint16 array in a free slot, or None when every slot
        is held or leased (the caller uses an ordinary array) or the frame does not fit."""
        if self._closed or not self.fits(height, width):
            return None
        with self._lock:
            for i in range(self.slots):
                k = (self._next_slot + i) % self.slots
                if not self._held[k] and self._lease[k] is None:
                    break
            else:
                self.stats["full"] += 1
                return None
            self._next_slot = (k + 1) % self.slots
            gen = self._next_gen
            self._next_gen += 1
            self._held[k] = True
            self._gens[k] = gen  # before any pixel: a reader of the old frame sees the change
            self.stats["given"] += 1
        buf = _SlotBuffer(self, k, gen, (height, width))
        weakref.finalize(buf, self._unheld, k)
        return np.asarray(buf)

    def _unheld(self, slot: int) -> None:
        with self._lock:
            self._held[slot] = False

    # -- leases to processing
    def lease_pair(self, on: np.ndarray, off: np.ndarray) -> tuple[str, dict | None]:
        """How to send a pair: ``("ring", part)`` with the ring part of the message when both
        frames are whole slots of this ring (their slots are now leased); ``("pixels", None)``
        when they are not (send the pixels); ``("held_back", None)`` when
        MAX_PAIRS_IN_FLIGHT pairs are leased already (processing is behind: send nothing)."""
        a, b = slot_of(on), slot_of(off)
        if a is None or b is None or on.base.ring is not self or off.base.ring is not self:
            return "pixels", None
        now = self.clock.monotonic()
        with self._lock:
            leased = {s[0] for s in self._lease if s is not None}
            if len(leased) >= MAX_PAIRS_IN_FLIGHT:
                self.stats["pairs_held_back"] += 1
                return "held_back", None
            self._pair_seq += 1
            seq = self._pair_seq
            self._lease[a.slot] = self._lease[b.slot] = (seq, now)
            self.stats["pairs_leased"] += 1
        return "ring", {"token": self.token_hex, "seq": seq, "on": a.as_list(), "off": b.as_list()}

    def unlease_pair(self, ring_part: dict) -> None:
        """The pair could not be sent after all: its slots are not leased."""
        with self._lock:
            for key in ("on", "off"):
                s = ring_part[key][0]
                if self._lease[s] is not None and self._lease[s][0] == ring_part["seq"]:
                    self._lease[s] = None

    def on_report(self, msg: dict | None) -> None:
        """A report from processing: ``{"kind": "done", "token", "seq", "instance"}`` after
        each pair; ``{"kind": "idle", "token", "since", "instance"}`` when nothing came for a
        while (``since``: its monotonic time of the last pair received, or of its start).
        Malformed reports are counted and ignored."""
        if not isinstance(msg, dict) or msg.get("token") not in (self.token_hex, None) \
                or not isinstance(msg.get("instance"), str):
            self.stats["reports_bad"] += 1
            return
        kind = msg.get("kind")
        with self._lock:
            if msg["instance"] != self._instance:
                if self._instance is not None:
                    # a new processing process: the one the leases were for is gone
                    n = sum(1 for s in self._lease if s is not None)
                    self._lease = [None] * self.slots
                    self.stats["released_restart"] += n
                self._instance = msg["instance"]
            if kind == "done" and isinstance(msg.get("seq"), int) and msg.get("token") == self.token_hex:
                for k, lease in enumerate(self._lease):
                    if lease is not None and lease[0] <= msg["seq"]:
                        self._lease[k] = None
                        self.stats["released_done"] += 1
            elif kind == "idle" and isinstance(msg.get("since"), (int, float)) and not isinstance(msg["since"], bool):
                cutoff = float(msg["since"]) - DELIVERY_MARGIN_S
                for k, lease in enumerate(self._lease):
                    if lease is not None and lease[1] < cutoff:
                        self._lease[k] = None
                        self.stats["released_idle"] += 1
            elif kind not in ("done", "idle"):
                self.stats["reports_bad"] += 1

    # -- state
    def busy(self) -> dict:
        """How many slots are held here, leased, free (for status, tests and the soak)."""
        with self._lock:
            held = sum(self._held)
            leased = sum(1 for s in self._lease if s is not None)
            free = sum(1 for h, s in zip(self._held, self._lease) if not h and s is None)
        return {"slots": self.slots, "held": held, "leased": leased, "free": free}

    def close(self) -> None:
        """Unlink the file; the mapping stays until the last view of a slot is gone."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.path.exists():
                with open(self.path, "rb") as f:
                    head = f.read(_HEAD.size)
                if len(head) == _HEAD.size and _HEAD.unpack(head)[4] == self.token:
                    self.path.unlink()  # only our own ring, not a newer one at the same path
        except OSError:
            pass


class RingMiss(Exception):
    """A pair's frames are not (or no longer) in the ring; the pair is dropped."""


class RingReader:
    """Processing's side: maps the ring a message names and gives read-only views of slots."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        self._token: str | None = None
        self._slots = 0
        self._slot_bytes = 0
        self._gens: np.ndarray | None = None

    def _map(self, token: str) -> None:
        if token == self._token:
            return
        self._mm = self._gens = None  # the old mapping goes with its last view
        self._token = None
        try:
            with open(self.path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as err:
            raise RingMiss(f"frame ring {self.path}: {err}") from err
        if len(mm) < HEADER_BYTES:
            raise RingMiss("frame ring: file shorter than its header")
        magic, version, slots, slot_bytes, tok = _HEAD.unpack(mm[:_HEAD.size])
        if magic != MAGIC or version != VERSION or not 2 <= slots <= MAX_SLOTS \
                or len(mm) < HEADER_BYTES + slots * slot_bytes:
            raise RingMiss("frame ring: not a ring of this version")
        if tok.hex() != token:
            raise RingMiss("frame ring: the pair names a ring that is gone (imaging restarted)")
        self._mm, self._token, self._slots, self._slot_bytes = mm, token, slots, slot_bytes
        self._gens = np.frombuffer(mm, dtype="<u8", count=slots, offset=GENS_OFFSET)

    def views(self, ring_part: dict) -> tuple[np.ndarray, np.ndarray]:
        """Read-only (height, width) views of the pair's two frames. Raises RingMiss for a
        malformed reference, another ring or a slot already written again."""
        try:
            token = ring_part["token"]
            refs = [SlotRef(*(int(v) for v in ring_part[k])) for k in ("on", "off")]
            if not isinstance(token, str) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                     for k in ("on", "off") for v in ring_part[k]):
                raise TypeError("not integers")
        except (KeyError, TypeError, ValueError) as err:
            raise RingMiss(f"frame ring: malformed reference {ring_part!r}") from err
        self._map(token)
        out = []
        for r in refs:
            if not 0 <= r.slot < self._slots or r.height <= 0 or r.width <= 0 \
                    or r.height * r.width * 2 > self._slot_bytes:
                raise RingMiss(f"frame ring: slot reference {r} outside the ring")
            a = np.frombuffer(self._mm, dtype="<u2", count=r.height * r.width,
                              offset=HEADER_BYTES + r.slot * self._slot_bytes).reshape(r.height, r.width)
            out.append(a)
        if not self.current(ring_part):
            raise RingMiss("frame ring: a slot was written again before the pair was read")
        return out[0], out[1]

    def current(self, ring_part: dict) -> bool:
        """Both slots still hold the frames the message named (checked after use too)."""
        if self._gens is None or ring_part.get("token") != self._token:
            return False
        return all(int(self._gens[ring_part[k][0]]) == int(ring_part[k][1]) for k in ("on", "off"))


class RingAllocator:
    """The driver's allocator in imaging: a ring sized for the frames asked for (made anew,
    with a new token, when a larger frame size comes), reports from processing taken in
    first (``drain``, called before each allocation). When the ring cannot be made (no room
    in shared memory) it says why once and gives ordinary arrays (None)."""

    def __init__(self, path: Path, *, slots: int = DEFAULT_SLOTS, clock=None,
                 drain: Callable[[], None] | None = None):
        self.path, self.slots, self.clock, self.drain = Path(path), slots, clock, drain
        self.ring: FrameRing | None = None
        self._failed_for: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def __call__(self, height: int, width: int) -> np.ndarray | None:
        if self.drain is not None:
            self.drain()
        with self._lock:
            ring = self.ring
            if ring is None or not ring.fits(height, width):
                if self._failed_for == (height, width):
                    return None
                try:
                    new = FrameRing(self.path, height * width * 2, slots=self.slots, clock=self.clock)
                except OSError as err:
                    log.warning("frames in shared memory unavailable (%s): pairs carry their pixels", err)
                    self._failed_for = (height, width)
                    return None
                if ring is not None:
                    ring.close()
                self.ring = ring = new
        return ring.allocate(height, width)

    def close(self) -> None:
        with self._lock:
            if self.ring is not None:
                self.ring.close()


def report(kind: str, token: str | None, instance: str, **fields) -> dict:
    """A report from processing to imaging (see :meth:`FrameRing.on_report`)."""
    return {"kind": kind, "token": token, "instance": instance, **fields}


Allocator = Callable[[int, int], "np.ndarray | None"]
