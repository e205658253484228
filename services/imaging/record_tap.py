"""The recorder's tap on the frame stream, inside the imaging process.

The study process runs a capture; the frames are here. While a capture collects, every
laser-on/laser-off pair the acquisition produces goes to the recorder (``record.ipc``,
never blocking: a pair the socket cannot take at once is counted and shows up as lost
frames), and the study process asks which pairs went (``record.status``) and, at the end,
has the ``end`` message queued behind the last pair (``record.end``), so the recorder sees
them in order.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import zmq

from nirf.hal.errors import Busy, DeviceTimeout, InvalidArgument
from nirf.services.common import ipc

log = logging.getLogger(__name__)

RECORD_SNDHWM = 32
MAX_PAIRS_LISTED = 4096


class _Collecting:
    def __init__(self, capture_id: str, case_id: str, folder: str, extra: dict, t_request_ns: int = 0):
        self.capture_id, self.case_id, self.folder, self.extra = capture_id, case_id, folder, extra
        self.t_request_ns = t_request_ns  # automatic ROIs must be found after this (wall clock)
        self.forwarded: list[int] = []
        self.index = 0
        self.first_on_meta: dict | None = None
        self.sent = 0
        self.not_sent = 0


class RecordTap:
    def __init__(self, ctx: zmq.Context, address: str):
        self._push = ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, RECORD_SNDHWM)
        self._push.bind(address)
        self._lock = threading.Lock()
        self._collecting: _Collecting | None = None
        self._closed = False
        self.pairs_not_sent = 0

    def handlers(self) -> dict:
        return {"record.begin": self.cmd_begin, "record.status": self.cmd_status,
                "record.stop": self.cmd_stop, "record.end": self.cmd_end}

    # -- the acquisition thread
    def on_pair(self, on, off, header: dict) -> None:
        """Forward a pair to the recorder while a capture collects; never blocks or raises."""
        c = self._collecting
        if c is None:
            return
        try:
            # processing searches ROIs afresh on a pair captured after the request
            header["roi_refresh_after_ns"] = c.t_request_ns
            seq = header["frame_seq"]
            msg = {"capture_id": c.capture_id, "case_id": c.case_id, "folder": c.folder, "index": c.index,
                   "frame_seq": seq, "on": header["on"], "off": header["off"], "extra": c.extra}
            with self._lock:
                if self._closed or self._collecting is not c:
                    return
                c.index += 1
                if c.first_on_meta is None:
                    c.first_on_meta = header["on"]
                try:
                    self._push.send_multipart([b"pair", ipc.pack(msg), _contiguous(on.data), _contiguous(off.data)],
                                              zmq.NOBLOCK, copy=False)
                    c.sent += 1
                except zmq.Again:
                    c.not_sent += 1
                    self.pairs_not_sent += 1
                if len(c.forwarded) < MAX_PAIRS_LISTED:
                    c.forwarded.append(seq)
        except Exception:  # the acquisition thread must carry on whatever happens here
            log.exception("forwarding a pair to the recorder failed")

    # -- commands from the study process
    def cmd_begin(self, args, caller) -> dict:
        for k in ("capture_id", "case_id", "folder"):
            if not isinstance(args.get(k), str) or not args[k]:
                raise InvalidArgument(f"record.begin: {k} must be a non-empty string")
        extra = args.get("extra") or {}
        if not isinstance(extra, dict):
            raise InvalidArgument("record.begin: extra must be a map")
        t_request_ns = args.get("t_request_ns", 0)
        if not isinstance(t_request_ns, int) or isinstance(t_request_ns, bool) or t_request_ns < 0:
            raise InvalidArgument("record.begin: t_request_ns must be a non-negative whole number")
        with self._lock:
            if self._collecting is not None:
                raise Busy(f"capture {self._collecting.capture_id} is being recorded")
            self._collecting = _Collecting(args["capture_id"], args["case_id"], args["folder"], extra, t_request_ns)
        return {"capture_id": args["capture_id"]}

    def _status(self, c: _Collecting) -> dict:
        return {"capture_id": c.capture_id, "forwarded": list(c.forwarded), "sent": c.sent,
                "not_sent": c.not_sent, "first_on_meta": c.first_on_meta}

    def cmd_status(self, args, caller) -> dict:
        with self._lock:
            c = self._collecting
            if c is None or c.capture_id != args.get("capture_id"):
                raise InvalidArgument(f"record.status: capture {args.get('capture_id')!r} is not being recorded")
            return self._status(c)

    def cmd_stop(self, args, caller) -> dict:
        with self._lock:
            c = self._collecting
            if c is None or c.capture_id != args.get("capture_id"):
                return {"capture_id": args.get("capture_id"), "forwarded": [], "sent": 0, "not_sent": 0,
                        "first_on_meta": None}
            self._collecting = None
            return self._status(c)

    def cmd_end(self, args, caller) -> dict:
        seqs = args.get("frame_seqs")
        if not isinstance(seqs, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seqs):
            raise InvalidArgument("record.end: frame_seqs must be a list of whole numbers")
        for k in ("capture_id", "case_id", "folder"):
            if not isinstance(args.get(k), str):
                raise InvalidArgument(f"record.end: {k} must be a string")
        timeout_s = args.get("timeout_s", 2.0)
        if not ipc.finite_number(timeout_s) or not 0 < timeout_s <= 30:
            raise InvalidArgument("record.end: timeout_s must be a number in (0, 30]")
        header = {"capture_id": args["capture_id"], "case_id": args["case_id"], "folder": args["folder"],
                  "frame_seqs": seqs}
        if isinstance(args.get("measurements"), dict):
            header["measurements"] = args["measurements"]  # for the capture's DICOM report
        msg = [b"end", ipc.pack(header)]
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self._closed:
                    raise DeviceTimeout("recorder", "imaging is stopping")
                try:
                    self._push.send_multipart(msg, zmq.NOBLOCK)
                    return {"queued": True}
                except zmq.Again:
                    pass
            if time.monotonic() >= deadline:
                raise DeviceTimeout("recorder", f"capture {args['capture_id']}: the recorder took no message "
                                                f"within {timeout_s:.1f} s (is it running?)")
            time.sleep(0.01)  # the queue to the recorder is full; it drains as it writes

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._collecting = None
            self._push.close(linger=0)


def _contiguous(array):
    return array if array.flags["C_CONTIGUOUS"] else np.ascontiguousarray(array)
