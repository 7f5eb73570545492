"""Splits a client byte stream into whole, length-checked messages without quadratic copying."""

from __future__ import annotations

import struct

from proxy.errors import ProtocolViolation

_U32 = struct.Struct("!I")

# Postgres' own limit for a startup packet (MAX_STARTUP_PACKET_LENGTH in pqcomm.h).
MAX_STARTUP_PACKET = 10_000

# A frame is (type code, start offset, end offset) into the buffer ``feed`` returned; its body is
# buf[start + 5:end]. Offsets instead of slices keep the relay path free of per-message copies.
Frame = tuple[int, int, int]


class FrameReader:
    """Sans-IO framer for the frontend → proxy direction.

    ``feed`` returns the buffer holding every message completed so far plus their offsets; bytes
    of an incomplete message are kept (as a list of chunks, joined once the message is whole, so a
    50 MB message arriving in 64 kB pieces is copied once, not 800 times).
    """

    __slots__ = ("_chunks", "_have", "_need", "_valid", "max_size")

    def __init__(self, max_size: int, valid_codes: frozenset[int] | None = None) -> None:
        self.max_size = max_size
        self._valid = valid_codes
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete message."""
        return self._have

    def feed(self, data: bytes) -> tuple[bytes, list[Frame]]:
        n = len(data)
        if not self._chunks and n >= 5:
            # Fast path: the chunk is exactly one message (a simple Query, a pgbench round trip).
            (length,) = _U32.unpack_from(data, 1)
            if length + 1 == n and 4 <= length <= self.max_size and (self._valid is None or data[0] in self._valid):
                return data, [(data[0], 0, n)]
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return b"", []
            data = b"".join(self._chunks)
            self._chunks = []
            self._have = 0
        frames: list[Frame] = []
        pos = 0
        n = len(data)
        valid = self._valid
        while n - pos >= 5:
            code = data[pos]
            (length,) = _U32.unpack_from(data, pos + 1)
            if length < 4 or length > self.max_size:
                raise ProtocolViolation(
                    f"invalid message length {length} for message type {chr(code)!r}",
                    hint=f"The proxy accepts messages up to {self.max_size} bytes (proxy.max_message_size).",
                )
            if valid is not None and code not in valid:
                raise ProtocolViolation(f"invalid frontend message type {code}")
            end = pos + 1 + length
            if end > n:
                break
            frames.append((code, pos, end))
            pos = end
        if pos < n:
            tail = data[pos:]
            self._chunks = [tail]
            self._have = len(tail)
            self._need = 5 if len(tail) < 5 else 1 + _U32.unpack_from(tail, 1)[0]
            data = data[:pos]
        return data, frames

    def feed_startup(self, data: bytes) -> bytes | None:
        """Startup-phase packets have no type byte; return one whole packet body, or None.

        Bytes after the packet stay buffered for ``feed`` (a client may pipeline its first
        messages right behind the startup packet).
        """
        if data:
            self._chunks.append(data)
            self._have += len(data)
        if self._have < 4:
            return None
        buf = b"".join(self._chunks)
        (length,) = _U32.unpack_from(buf, 0)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise ProtocolViolation("invalid length of startup packet")
        if len(buf) < length:
            self._chunks = [buf]
            return None
        rest = buf[length:]
        self._chunks = [rest] if rest else []
        self._have = len(rest)
        self._need = 5
        return buf[4:length]

    def take_buffered(self) -> bytes:
        """Hand over whatever is buffered (e.g. after a TLS upgrade nothing may be left)."""
        buf = b"".join(self._chunks)
        self._chunks = []
        self._have = 0
        return buf
