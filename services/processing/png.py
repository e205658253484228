"""PNG encoding of the false-colour preview, with zlib and numpy only.

The surgical display sends the preview to browsers as PNG: lossless (a false-colour map
must keep its colours), understood by every browser without a decoder of ours, and small
enough at preview size. The format (PNG specification, ISO/IEC 15948) is a signature
followed by chunks ``length, type, data, CRC-32``: ``IHDR`` (size and pixel format),
``IDAT`` (the zlib-compressed, filtered scanlines) and ``IEND``.

Each scanline is stored with filter type 2 ("Up": the byte minus the byte above it,
modulo 256). A smooth image differs little from row to row, so the filtered bytes are
mostly small and compress well; the subtraction is one numpy operation over the whole
image, so no Python loop touches a pixel.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from nirf.hal.errors import InvalidArgument

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR colour types we write: 2 = RGB triplets, 0 = greyscale; bit depth 8 for both.
_COLOUR_TYPES = {3: 2, 1: 0}
_FILTER_UP = 2
# zlib level 1: the preview is encoded up to tens of times a second; higher levels cost
# several times the time for a few per cent of size.
DEFAULT_COMPRESS_LEVEL = 1
# Larger than any preview we make; stops a bad header from asking for gigabytes.
MAX_SIDE_PX = 8192


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(pixels, width: int | None = None, height: int | None = None, *,
               channels: int = 3, compress_level: int = DEFAULT_COMPRESS_LEVEL) -> bytes:
    """Encode 8-bit pixels as a PNG file (bytes).

    ``pixels`` is either a uint8 array of shape (height, width, 3) (RGB) or (height, width)
    (grey), or raw row-major bytes with ``width``, ``height`` and ``channels`` (3 for
    the protocol's ``rgb8``, 1 for grey). Raises :class:`InvalidArgument` when the size does
    not match the data.
    """
    if isinstance(pixels, np.ndarray):
        img = pixels
        if img.dtype != np.uint8:
            raise InvalidArgument(f"png: pixels of dtype {img.dtype}, need uint8")
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3 or img.shape[2] not in _COLOUR_TYPES:
            raise InvalidArgument(f"png: array of shape {pixels.shape}, need (height, width) or (height, width, 3)")
        if (width is not None and width != img.shape[1]) or (height is not None and height != img.shape[0]):
            raise InvalidArgument(f"png: array of shape {pixels.shape} does not match {width}x{height}")
        height, width, channels = img.shape
    else:
        if width is None or height is None:
            raise InvalidArgument("png: raw bytes need a width and a height")
        if channels not in _COLOUR_TYPES:
            raise InvalidArgument(f"png: channels = {channels}, allowed 1 (grey) or 3 (RGB)")
        for name, side in (("width", width), ("height", height)):
            if not isinstance(side, int) or isinstance(side, bool) or not 1 <= side <= MAX_SIDE_PX:
                raise InvalidArgument(f"png: {name} = {side!r}, allowed 1 to {MAX_SIDE_PX}")
        expected = width * height * channels
        buf = memoryview(pixels).cast("B")
        if buf.nbytes != expected:
            raise InvalidArgument(f"png: {buf.nbytes} bytes of pixels for {width}x{height}x{channels}, "
                                  f"need exactly {expected}")
        img = np.frombuffer(buf, dtype=np.uint8).reshape(height, width, channels)
    if not (1 <= width <= MAX_SIDE_PX and 1 <= height <= MAX_SIDE_PX):
        raise InvalidArgument(f"png: size {width}x{height}, each side allowed 1 to {MAX_SIDE_PX}")
    if not 0 <= compress_level <= 9:
        raise InvalidArgument(f"png: compress_level = {compress_level}, allowed 0 to 9")

    rows = img.reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = _FILTER_UP
    # "Up" of the first row subtracts an all-zero row above it, so the row stays as it is.
    filtered[0, 1:] = rows[0]
    # uint8 arithmetic wraps modulo 256, which is exactly what the filter needs.
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])

    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[channels], 0, 0, 0)
    return b"".join((
        PNG_SIGNATURE,
        _chunk(b"IHDR", header),
        _chunk(b"IDAT", zlib.compress(filtered.tobytes(), compress_level)),
        _chunk(b"IEND", b""),
    ))
