"""The recorder service: its own process, writing the frames of each capture to disk.

Why a process of its own: a slow or full disk, or a crash while writing, must never
stall the controller's acquisition or touch laser safety (PRODUCT.md, processes).

Sockets (both ``ipc://`` in the runtime folder; the controller binds, the recorder
connects, so either side may restart):

- ``record.ipc``: the controller PUSHes, the recorder PULLs;
- ``record_ack.ipc``: the recorder PUSHes its answers, the controller PULLs.

Messages to the recorder (multipart; every header is a msgpack map):

``[b"pair", header, on_bytes, off_bytes]``
    one laser-on/laser-off pair forwarded while a capture is collecting. ``header``::

        {"capture_id": str,        # e.g. "DFSP-014-c003"
         "case_id": str,           # e.g. "DFSP-014"
         "folder": str,            # "captures/<case_id>/<capture_id>", relative to the state folder
         "index": int,             # 0, 1, 2 ... pairs forwarded for this capture
         "frame_seq": int,         # the pair's sequence number (the laser-on frame's MCU frame)
         "on": {frame metadata},   # seq, mcu_frame, lit, t_start_ns, t_end_ns, exposure_us,
         "off": {frame metadata},  #   gain, laser_mw, filter_position, bits, black_level, width, height
         "extra": {...}}           # optional: site, label, filter_name ... embedded in the files

    ``on_bytes`` and ``off_bytes`` are the raw frames: ``uint16``, native byte order,
    ``height`` x ``width`` from the metadata.

``[b"end", header]``
    the capture's results are in. ``header``::

        {"capture_id": str, "case_id": str, "folder": str,
         "frame_seqs": [int, ...],  # the pairs whose results were averaged; [] aborts
         "measurements": {...}}     # optional: sbr, intensity, cnr (number or null), rois
                                    #   {"signal": [x, y, w, h], "background": [...]},
                                    #   site, t_ns: what the DICOM report carries

The answer to ``end`` (on ``record_ack.ipc``)::

    [b"done", {"capture_id": str, "case_id": str,
               "files": [str, ...],      # relative to the state folder: one OME-TIFF per pair,
                                         #   pair<index>-frame<frame_seq>.ome.tiff, in acquisition order
               "dicom": [str, ...],      # the capture's DICOM files (frames, report), when enabled
               "dicom_errors": [str],    # why no DICOM was made (the capture itself is kept)
               "frames_lost": int,       # frames of the capture's span that never reached the disk
               "gaps": {...},            # SequenceGapCounter.summary() of that span
               "missing_pairs": [int],   # requested frame_seqs the recorder never received
               "bytes_written": int,
               "errors": [{"code": "DISK_FULL" | "WRITE_FAILED" | "BAD_REQUEST", "message": str}]}]

How a capture reaches the disk, so that nothing half-written is ever visible (D2): the
recorder keeps the forwarded pairs in memory (bounded by ``[recorder] buffer_mb``) until
``end``; it then writes each requested pair as one OME-TIFF with
:func:`nirf.services.study.tiff.write_pair_atomic` (and, with ``[dicom] enabled``, the capture's DICOM
files, queued in the durable outbox of :mod:`nirf.services.study.outbox`) into a hidden staging folder ``captures/<case_id>/.<capture_id>.partial``, and renames
that folder to ``captures/<case_id>/<capture_id>`` (atomic) once every file is on disk,
then flushes the parent folder. A crash leaves at most a hidden staging folder, removed
when the recorder starts again. A full disk (or less free space than
``[recorder] reserve_mb`` would leave) refuses the whole capture: nothing is renamed
into place and the staging folder is removed.

Gaps (D3): every frame that arrives for a capture is accounted for with a
:class:`~services.study.tiff.SequenceGapCounter`; the frames missing from the capture's span
(first requested laser-on frame to last requested laser-off frame) are reported as
``frames_lost``, never dropped silently.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from nirf import config as config_mod
from nirf.hal.clock import Clock, SystemClock
from nirf.hal.errors import NirfError
from nirf.services.gateway import bus as bus_mod
from nirf.services.common import entry
from nirf.services.common import sdnotify
from nirf.services.study.tiff import (RecorderDiskFull, RecorderError, SequenceGapCounter, pair_file_name,
                           write_bytes_atomic, write_pair_atomic)

log = logging.getLogger(__name__)

DEVICE = "recorder"
CAPTURES_FOLDER = "captures"
STAGING_SUFFIX = ".partial"
# ids are the case store's pseudonymous codes: letters, digits, "_", "." and "-" only,
# so they can never climb out of the captures folder.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A capture whose "end" never comes (the controller died) is forgotten after this long.
STALE_AFTER_S = 120.0
_MB = 1024 * 1024
_META_KEYS = ("seq", "mcu_frame", "lit", "t_start_ns", "t_end_ns", "exposure_us", "gain", "laser_mw",
              "filter_position", "bits", "black_level", "width", "height")


class BadMessage(ValueError):
    """A message to the recorder did not have the documented shape."""


def _need(header: dict, key: str, kind) -> Any:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BadMessage(f"{key} = {value!r}: expected {getattr(kind, '__name__', kind)}")
    return value


def _check_ids(header: dict) -> tuple[str, str, str]:
    capture_id = _need(header, "capture_id", str)
    case_id = _need(header, "case_id", str)
    for name, value in (("capture_id", capture_id), ("case_id", case_id)):
        if not _ID_RE.fullmatch(value) or value in (".", ".."):
            raise BadMessage(f"{name} = {value!r}: not a study code (letters, digits, _ . -)")
    folder = f"{CAPTURES_FOLDER}/{case_id}/{capture_id}"
    if header.get("folder", folder) != folder:
        raise BadMessage(f"folder = {header.get('folder')!r}: expected {folder!r}")
    return capture_id, case_id, folder


@dataclass
class _Pair:
    index: int
    frame_seq: int
    on_meta: dict
    off_meta: dict
    extra: dict
    on: Any  # bytes-like
    off: Any


@dataclass
class _Buffer:
    """The pairs of one capture held until its end."""

    capture_id: str
    case_id: str
    pairs: dict[int, _Pair] = field(default_factory=dict)
    arrivals: list[int] = field(default_factory=list)  # frame numbers, in order of arrival
    bytes_held: int = 0
    dropped_pairs: int = 0  # not kept: buffer full or malformed frames
    last_arrival_s: float = 0.0


class Recorder:
    """The recorder's logic, without sockets (so tests drive it in-process).

    ``state_dir``: the cart's state folder; files go under ``<state_dir>/captures``.
    ``reserve_bytes``: free space a capture may not eat into. ``max_buffer_bytes``: memory
    for one capture's frames while it is collected; pairs beyond it are not kept and show
    up as lost frames. ``clock``: for forgetting captures whose end never came.
    ``on_progress``: called after every file written (feeds the service watchdog).
    """

    def __init__(self, state_dir: str | os.PathLike, *, reserve_bytes: int = 256 * _MB,
                 max_buffer_bytes: int = 1024 * _MB, stale_after_s: float = STALE_AFTER_S,
                 clock: Clock | None = None, on_progress=None, pixel_size_um: float | None = None,
                 dicom=None, outbox=None):
        self.state_dir = Path(state_dir)
        self.pixel_size_um = pixel_size_um or None
        # services.study.dicom.DicomSettings and services.study.outbox.Outbox, or None
        self.dicom = dicom
        self.outbox = outbox
        # called after each file written: a long capture must keep the service watchdog fed
        self.on_progress = on_progress or (lambda: None)
        self.captures_dir = self.state_dir / CAPTURES_FOLDER
        self.reserve_bytes = int(reserve_bytes)
        self.max_buffer_bytes = int(max_buffer_bytes)
        self.stale_after_s = float(stale_after_s)
        self.clock = clock or SystemClock()
        self.buffers: dict[str, _Buffer] = {}
        self.bad_messages = 0
        self.captures_written = 0
        self.captures_refused = 0

    @classmethod
    def from_config(cls, cfg, state_dir: str | os.PathLike | None = None, **kw) -> "Recorder":
        """A recorder using the ``[recorder]`` section of a validated config."""
        r = cfg.recorder
        state_dir = state_dir if state_dir is not None else cfg.state_dir()
        if cfg.dicom.enabled and "dicom" not in kw:
            from nirf.services.study.dicom import DicomSettings
            from nirf.services.study.outbox import Outbox

            kw["dicom"] = DicomSettings.from_config(cfg, software_version=_software_version())
            kw.setdefault("outbox", Outbox.from_config(cfg, state_dir))
        return cls(state_dir, reserve_bytes=r.reserve_mb * _MB, max_buffer_bytes=r.buffer_mb * _MB,
                   pixel_size_um=r.pixel_size_um or None, **kw)

    # ------------------------------------------------------------------ start-up
    def remove_leftovers(self) -> list[Path]:
        """Delete what a crash can leave behind: hidden staging folders and hidden
        temporary files under the captures folder. Visible files are never touched.
        Returns what was removed."""
        removed: list[Path] = []
        if not self.captures_dir.is_dir():
            return removed
        for case_dir in self.captures_dir.iterdir():
            if not case_dir.is_dir() or case_dir.name.startswith("."):
                continue
            for item in case_dir.iterdir():
                if item.name.startswith(".") and item.name.endswith(STAGING_SUFFIX) and item.is_dir():
                    shutil.rmtree(item, ignore_errors=True)
                    removed.append(item)
                elif item.name.startswith(".") and item.name.endswith(".tmp") and item.is_file():
                    item.unlink(missing_ok=True)
                    removed.append(item)
                elif item.is_dir() and not item.name.startswith("."):
                    for f in item.iterdir():  # temporary files of an interrupted atomic write
                        if f.name.startswith(".") and f.name.endswith(".tmp"):
                            f.unlink(missing_ok=True)
                            removed.append(f)
        for path in removed:
            log.warning("removed %s left by an interrupted recording", path)
        return removed

    # ------------------------------------------------------------------ messages
    def handle(self, frames: list) -> list[bytes] | None:
        """Handle one multipart message; returns the answer's frames for ``end``, else
        ``None``. A malformed message is counted and logged, never raised."""
        try:
            if len(frames) < 2:
                raise BadMessage(f"{len(frames)} frame(s); at least a topic and a header expected")
            topic = bytes(frames[0])
            try:
                header = bus_mod.unpack(bytes(frames[1]))
            except ValueError as err:
                raise BadMessage(f"header is not msgpack: {err}") from err
            if not isinstance(header, dict):
                raise BadMessage(f"header must be a map, got {type(header).__name__}")
            if topic == b"pair":
                if len(frames) != 4:
                    raise BadMessage(f"pair with {len(frames)} frames; expected 4")
                self.add_pair(header, frames[2], frames[3])
                return None
            if topic == b"end":
                try:
                    done = self.finish(header)
                except BadMessage:
                    raise
                except Exception as err:  # noqa: BLE001 - the controller must get an answer
                    log.exception("recorder: capture could not be finished")
                    done = {"capture_id": header.get("capture_id"), "files": [], "frames_lost": 0,
                            "missing_pairs": [], "bytes_written": 0,
                            "errors": [{"code": "WRITE_FAILED",
                                        "message": f"{DEVICE}: internal error: {type(err).__name__}: {err}"}]}
                return [b"done", bus_mod.pack(done)]
            raise BadMessage(f"unknown topic {topic[:32]!r}")
        except BadMessage as err:
            self.bad_messages += 1
            log.error("recorder: message refused: %s", err)
            if frames and bytes(frames[0]) == b"end":
                # The controller waits for an answer: give it one, naming the problem.
                capture_id = None
                try:
                    capture_id = bus_mod.unpack(bytes(frames[1])).get("capture_id")
                except Exception:  # noqa: BLE001 - already known to be malformed
                    pass
                return [b"done", bus_mod.pack({"capture_id": capture_id, "files": [], "frames_lost": 0,
                                               "missing_pairs": [], "bytes_written": 0,
                                               "errors": [{"code": "BAD_REQUEST", "message": str(err)}]})]
            return None

    def add_pair(self, header: dict, on, off) -> None:
        """Keep one forwarded pair in the capture's buffer (or count it as dropped)."""
        capture_id, case_id, _ = _check_ids(header)
        seq = _need(header, "frame_seq", int)
        index = header.get("index", 0)
        on_meta, off_meta = header.get("on"), header.get("off")
        if not isinstance(on_meta, dict) or not isinstance(off_meta, dict):
            raise BadMessage("on and off must be frame metadata maps")
        buf = self.buffers.get(capture_id)
        if buf is None:
            # One capture at a time: pairs of a new one mean any other will never end.
            for old in list(self.buffers):
                log.warning("recorder: capture %s never ended; its %d pair(s) are dropped", old,
                            len(self.buffers[old].pairs))
                del self.buffers[old]
            buf = self.buffers[capture_id] = _Buffer(capture_id, case_id)
        buf.last_arrival_s = self.clock.monotonic()
        size = len(memoryview(on)) + len(memoryview(off))
        for meta, data, role in ((on_meta, on, "on"), (off_meta, off, "off")):
            w, h = meta.get("width"), meta.get("height")
            if not isinstance(w, int) or not isinstance(h, int) or len(memoryview(data)) != w * h * 2:
                buf.dropped_pairs += 1
                log.error("recorder: capture %s pair %s: %s frame of %d bytes does not match %rx%r "
                          "uint16; pair not recorded", capture_id, seq, role, len(memoryview(data)), w, h)
                return
        if buf.bytes_held + size > self.max_buffer_bytes:
            buf.dropped_pairs += 1
            log.error("recorder: capture %s: buffer full (%d of %d bytes); pair %d not kept",
                      capture_id, buf.bytes_held, self.max_buffer_bytes, seq)
            return
        buf.pairs[seq] = _Pair(index, seq, on_meta, off_meta, header.get("extra") or {}, on, off)
        buf.bytes_held += size
        buf.arrivals.append(_frame_number(on_meta, seq))
        buf.arrivals.append(_frame_number(off_meta, seq + 1))

    def expire_stale(self) -> int:
        """Forget captures whose end has not come within ``stale_after_s``; returns how
        many (their memory would otherwise be held for ever)."""
        now = self.clock.monotonic()
        stale = [cid for cid, b in self.buffers.items() if now - b.last_arrival_s > self.stale_after_s]
        for cid in stale:
            log.warning("recorder: capture %s had no end within %.0f s; %d pair(s) dropped", cid,
                        self.stale_after_s, len(self.buffers[cid].pairs))
            del self.buffers[cid]
        return len(stale)

    # ------------------------------------------------------------------ committing
    def finish(self, header: dict) -> dict:
        """Write the requested pairs of a capture and answer with its files."""
        capture_id, case_id, folder = _check_ids(header)
        seqs = header.get("frame_seqs")
        if not isinstance(seqs, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seqs):
            raise BadMessage(f"frame_seqs = {seqs!r}: expected a list of whole numbers")
        buf = self.buffers.pop(capture_id, None) or _Buffer(capture_id, case_id)
        done: dict[str, Any] = {"capture_id": capture_id, "case_id": case_id, "files": [], "frames_lost": 0,
                                "gaps": {}, "missing_pairs": [], "bytes_written": 0, "errors": [],
                                "dicom": [], "dicom_errors": []}
        measurements = header.get("measurements")
        if not seqs:
            log.info("recorder: capture %s aborted; %d pair(s) discarded", capture_id, len(buf.pairs))
            return done
        wanted = sorted(set(seqs))
        done["frames_lost"], done["gaps"] = self._account(buf, wanted)
        done["missing_pairs"] = [s for s in wanted if s not in buf.pairs]
        present = [buf.pairs[s] for s in wanted if s in buf.pairs]

        case_dir = self.captures_dir / case_id
        final = case_dir / capture_id
        staging = case_dir / f".{capture_id}{STAGING_SUFFIX}"
        try:
            if final.exists():
                raise RecorderError(f"capture folder {folder} already exists; refusing to replace it")
            case_dir.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)
            self._check_space(case_dir, present, folder)
            staging.mkdir()
            files, written = [], 0
            frames, frame_meta = [], []
            for i, pair in enumerate(present):
                # Names carry the position in the capture, zero-padded: they sort in
                # acquisition order.
                name = pair_file_name(i, pair.frame_seq)
                arrays, metas = [], []
                for role, meta, data in (("on", pair.on_meta, pair.on), ("off", pair.off_meta, pair.off)):
                    arrays.append(np.frombuffer(data, dtype=np.uint16).reshape(meta["height"], meta["width"]))
                    metas.append(self._metadata(buf, pair, role, meta))
                written += write_pair_atomic(staging / name, arrays[0], arrays[1], metas[0], metas[1],
                                             name=f"{capture_id} pair {i}", pixel_size_um=self.pixel_size_um,
                                             reserve_bytes=self.reserve_bytes)
                files.append(f"{folder}/{name}")
                frames += arrays
                frame_meta += metas
                self.on_progress()
            queued = self._write_dicom(staging, folder, capture_id, case_id, frames, frame_meta,
                                       measurements, done)
            written += sum(q[1] for q in queued)
            # The DICOM files are queued before the folder is committed: a crash in between
            # may send a capture the archive lacks, but never loses one.
            entries = []
            try:
                for path, _size in queued:
                    entries.append(self.outbox.add(path))
                # The folder appears in one step, complete: there is no moment where a reader
                # sees some files of the capture and not others.
                os.rename(staging, final)
            except BaseException:
                for e in entries:
                    e.unlink(missing_ok=True)
                raise
            _fsync_folder(case_dir)
            if entries:
                self.outbox.wake()
        except RecorderError as err:
            self._discard(staging)
            done["dicom"] = []
            self.captures_refused += 1
            code = "DISK_FULL" if isinstance(err, RecorderDiskFull) else "WRITE_FAILED"
            log.error("recorder: capture %s refused: %s", capture_id, err)
            done["errors"].append({"code": code, "message": str(err)})
            return done
        except OSError as err:
            self._discard(staging)
            done["dicom"] = []
            self.captures_refused += 1
            full = err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
            message = (f"{DEVICE}: cannot commit capture {capture_id} in {folder}: "
                       f"{err.strerror or err}; capture refused, nothing kept")
            log.error("%s", message)
            done["errors"].append({"code": "DISK_FULL" if full else "WRITE_FAILED", "message": message})
            return done
        self.captures_written += 1
        done["files"], done["bytes_written"] = files, written
        log.info("recorder: capture %s: %d file(s), %d bytes, %d frame(s) lost", capture_id, len(files),
                 written, done["frames_lost"])
        return done

    def _write_dicom(self, staging: Path, folder: str, capture_id: str, case_id: str, frames: list,
                     frame_meta: list, measurements: Any, done: dict) -> list[tuple[Path, int]]:
        """The capture as DICOM into the staging folder; returns ``[(path, bytes)]``. A
        failure to build the objects is reported (``dicom_errors``), never refuses the
        capture: the OME-TIFF archive is complete without them. A failure to write them
        (disk full) refuses it like any other write."""
        if self.dicom is None or self.outbox is None or not frames:
            return []
        if not isinstance(measurements, dict):
            done["dicom_errors"].append("no measurements in the end message; no DICOM made")
            log.error("recorder: capture %s: no measurements came with it; no DICOM made", capture_id)
            return []
        from nirf.services.study import dicom as dicom_mod

        try:
            objects = dicom_mod.capture_files(frames, frame_meta, measurements, case_id=case_id,
                                              capture_id=capture_id, settings=self.dicom)
        except Exception as err:  # noqa: BLE001 - the archive must not depend on the DICOM encoder
            log.exception("recorder: capture %s: DICOM could not be made", capture_id)
            done["dicom_errors"].append(f"{type(err).__name__}: {err}")
            return []
        out = []
        for kind, _uid, data in objects:
            name = f"{capture_id}-{kind}.dcm"
            size = write_bytes_atomic(staging / name, data, reserve_bytes=self.reserve_bytes)
            out.append((staging / name, size))
            done["dicom"].append(f"{folder}/{name}")
            self.on_progress()
        return out

    def _check_space(self, folder: Path, pairs: list[_Pair], name: str) -> None:
        # Refuse up front, before the first byte, when the whole capture cannot fit.
        needed = sum(len(memoryview(p.on)) + len(memoryview(p.off)) + 2 * 4096 for p in pairs)
        if self.dicom is not None and self.outbox is not None:
            needed *= 2  # the DICOM frames hold the same pixels again (the outbox only links them)
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return
        if free - needed < self.reserve_bytes:
            raise RecorderDiskFull(f"disk nearly full for capture {name}: {free} bytes free, need "
                                   f"{needed} plus {self.reserve_bytes} in reserve; capture refused, "
                                   f"nothing written")

    @staticmethod
    def _discard(staging: Path) -> None:
        try:
            shutil.rmtree(staging)
        except FileNotFoundError:
            pass
        except OSError as err:  # a hidden folder; the next start removes it
            log.error("recorder: could not remove %s: %s", staging, err)

    @staticmethod
    def _metadata(buf: _Buffer, pair: _Pair, role: str, meta: dict) -> dict:
        out = {k: meta.get(k) for k in _META_KEYS}
        out.update(pair.extra)
        out.update(role=role, frame_seq=pair.frame_seq, pair_index=pair.index,
                   capture_id=buf.capture_id, case_id=buf.case_id)
        return out

    @staticmethod
    def _account(buf: _Buffer, wanted: list[int]) -> tuple[int, dict]:
        """Frames of the span [first requested on, last requested off] that did not
        reach the recorder: the counter sees what arrived, the edges are added."""
        first = wanted[0]
        last_pair = buf.pairs.get(wanted[-1])
        last = _frame_number(last_pair.off_meta, wanted[-1] + 1) if last_pair else wanted[-1] + 1
        counter = SequenceGapCounter(f"capture {buf.capture_id}")
        for n in buf.arrivals:
            if first <= n <= last:
                counter.feed(n)
        if counter.first_seq is None:
            lost = last - first + 1
        else:
            lost = (counter.first_seq - first) + counter.missing + (last - counter.last_seq if
                                                                   counter.last_seq < last else 0)
        summary = counter.summary()
        summary.update(span=[first, last], dropped_pairs=buf.dropped_pairs)
        if lost:
            log.warning("recorder: capture %s: %d frame(s) of %d..%d never reached the recorder",
                        buf.capture_id, lost, first, last)
        return lost, summary


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return version("nirf-cart")
    except Exception:  # noqa: BLE001 - a checkout without metadata
        return ""


def _frame_number(meta: dict, default: int) -> int:
    n = meta.get("mcu_frame")
    return n if isinstance(n, int) and not isinstance(n, bool) else default


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RecorderService:
    """The recorder's sockets around :class:`Recorder` (connects to the controller)."""

    def __init__(self, recorder: Recorder, runtime_dir: str | os.PathLike, *,
                 context: zmq.Context | None = None):
        self.recorder = recorder
        self.runtime_dir = Path(runtime_dir)
        self.ctx = context or zmq.Context()
        self.stop_event = threading.Event()
        self.watchdog = sdnotify.WatchdogPinger()
        recorder.on_progress = self.watchdog

    def connect(self) -> None:
        """Connect to the controller's recording sockets (they need not exist yet)."""
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.RCVHWM, 32)
        self.pull.connect(f"ipc://{self.runtime_dir / 'record.ipc'}")
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 1000)  # let a last answer out when stopping
        self.push.setsockopt(zmq.SNDHWM, 100)
        self.push.connect(f"ipc://{self.runtime_dir / 'record_ack.ipc'}")

    def serve_once(self, timeout_ms: int = 200) -> bool:
        """Handle at most one message; returns whether one came."""
        if not self.pull.poll(timeout_ms):
            self.recorder.expire_stale()
            return False
        frames = self.pull.recv_multipart(copy=False)
        reply = self.recorder.handle([f.buffer for f in frames])
        if reply is not None:
            try:
                self.push.send_multipart(reply, zmq.NOBLOCK)
            except zmq.Again:
                log.error("recorder: the controller is not there to take the answer")
        return True

    def serve(self) -> None:
        """Serve until ``stop_event`` is set (and send the DICOM outbox meanwhile)."""
        outbox = self.recorder.outbox
        sender = None
        if outbox is not None:
            sender = threading.Thread(target=outbox.run, args=(self.stop_event,), name="dicom-outbox",
                                      daemon=True)
            sender.start()
        try:
            self._serve()
        finally:
            if sender is not None:
                outbox.wake()
                sender.join(timeout=15.0)

    def _serve(self) -> None:
        while not self.stop_event.is_set():
            self.watchdog()
            try:
                self.serve_once()
            except Exception:  # one bad capture must not stop the recorder
                log.exception("recorder: message could not be handled")

    def close(self) -> None:
        self.ctx.destroy(linger=0)


LOCK_FILE = "recorder.lock"


def take_lock(state_dir: Path):
    """One recorder per state folder (D4): an exclusive lock held for the process's life.
    Two recorders would split every capture between them. Returns the open lock file;
    raises NirfError naming the holder when another recorder runs."""
    import fcntl

    path = Path(state_dir) / LOCK_FILE
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise NirfError(f"another recorder (pid {holder}) already records into {state_dir}; "
                        "only one may run") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def main(argv=None) -> int:
    p = entry.parser("NIRF capture recorder")
    args = p.parse_args(argv)
    entry.configure_logging("recorder")
    # pynetdicom narrates every association at INFO; the outbox logs what matters.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        cfg = config_mod.load(args.config)
        state_dir, runtime_dir = cfg.state_dir(), cfg.runtime_dir()
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = take_lock(state_dir)  # noqa: F841 (held until the process ends)
        recorder = Recorder.from_config(cfg, state_dir)
        recorder.remove_leftovers()
    except (NirfError, OSError) as err:
        log.error("cannot start: %s", err)
        return 2
    svc = RecorderService(recorder, runtime_dir)
    svc.connect()
    runtime_dir.mkdir(parents=True, exist_ok=True)
    (runtime_dir / "recorder.pid").write_text(f"{os.getpid()}\n")
    return entry.serve(svc, f"recorder ready: captures in {recorder.captures_dir}")


if __name__ == "__main__":
    raise SystemExit(main())
