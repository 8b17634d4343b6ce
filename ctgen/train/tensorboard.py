"""A TensorFlow-free TensorBoard event-file writer for scalars.

Event files are TFRecord streams of `tensorflow.Event` protocol buffers. Only three messages are
needed (Event, Summary, Summary.Value with `simple_value`), so they are encoded by hand here; the
framing is length + masked CRC32C, as in TFRecord. TensorBoard reads these files as usual:
`tensorboard --logdir WORKDIR/tensorboard`.
"""
from __future__ import annotations

import os
import socket
import struct
import time

# --- CRC32C (Castagnoli), table driven --------------------------------------------------------
_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- minimal protobuf encoding ------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, summary: bytes | None = None) -> bytes:
    msg = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if summary is not None:
        msg += _bytes_field(5, summary)
    return msg


def _scalar_summary(scalars: dict[str, float]) -> bytes:
    values = b""
    for tag, value in scalars.items():
        v = _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(value))
        values += _bytes_field(1, v)
    return values


class EventWriter:
    """Appends scalar summaries to `logdir/events.out.tfevents.<time>.<host>`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + record + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write(_event(time.time(), int(step), summary=_scalar_summary(values)))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def read_scalars(path: str) -> list[tuple[int, str, float]]:
    """Decode (step, tag, value) triples from an event file written by `EventWriter`, checking
    every CRC. Used by tests and `ctgen` tooling; TensorBoard itself is not needed."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if hcrc != _masked_crc(header):
            raise ValueError(f"{path}: corrupt record header at byte {pos}")
        record = data[pos + 12:pos + 12 + length]
        (dcrc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if dcrc != _masked_crc(record):
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += 16 + length
        out.extend(_decode_event(record))
    return out


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def _fields(buf: bytes):
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _read_varint(buf, i)
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            val, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, val


def _decode_event(record: bytes) -> list[tuple[int, str, float]]:
    step, out = 0, []
    summary = None
    for field, val in _fields(record):
        if field == 2:
            step = val
        elif field == 5:
            summary = val
    if summary is not None:
        for field, value_msg in _fields(summary):
            if field != 1:
                continue
            tag, num = "", None
            for f2, v2 in _fields(value_msg):
                if f2 == 1:
                    tag = v2.decode()
                elif f2 == 2:
                    (num,) = struct.unpack("<f", v2)
            if num is not None:
                out.append((step, tag, num))
    return out
