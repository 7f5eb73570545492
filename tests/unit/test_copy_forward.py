"""The COPY OUT fast path of the sync's SQL connection: CopyData frames forwarded byte for byte
however the stream is cut into chunks, and everything around them decoded as usual."""

from __future__ import annotations

import random
from typing import Any

import pytest

from proxy.cdc.sqlconn import _Framer
from proxy.errors import ProtocolViolation
from proxy.wire.messages import frame


class Owner:
    """What _Framer needs of a SqlConnection (the codec layer: a hand-written stand-in)."""

    def __init__(self) -> None:
        self.forwarded = bytearray()
        self.rows = 0
        self.received: list[tuple[int, bytes]] = []
        self._copy_forward: Any = self.forward
        self.endpoint = type("E", (), {"backend": "old"})()

    def forward(self, frames: bytes, count: int) -> None:
        self.forwarded += frames
        self.rows += count

    def _received(self, code: int, body: bytes) -> None:
        self.received.append((code, body))


def stream(rows: list[bytes]) -> tuple[bytes, bytes]:
    data = b"".join(frame(ord("d"), r) for r in rows)
    before = frame(ord("H"), b"\x01\x00\x00")
    after = frame(ord("c"), b"") + frame(ord("C"), b"COPY %d\x00" % len(rows)) + frame(ord("Z"), b"I")
    return before + data + after, data


ROWS = [bytes([i % 251]) * (i % 23) for i in range(300)] + [b"x" * 70_000]


@pytest.mark.parametrize("seed", range(20))
def test_frames_forwarded_whole_whatever_the_chunks(seed: int) -> None:
    rnd = random.Random(seed)
    whole, data = stream(ROWS)
    owner = Owner()
    framer = _Framer(owner)  # type: ignore[arg-type]
    pos = 0
    while pos < len(whole):
        size = rnd.choice([1, 2, 3, 4, 5, 6, 7, 64, 1000, 100_000])
        framer.backend_data(whole[pos : pos + size])
        pos += size
    assert bytes(owner.forwarded) == data
    assert owner.rows == len(ROWS)
    assert [chr(code) for code, _ in owner.received] == ["H", "c", "C", "Z"]
    assert owner.received[2][1] == b"COPY %d\x00" % len(ROWS)


def test_error_in_the_middle_of_the_rows_ends_the_fast_path() -> None:
    whole, _ = stream(ROWS[:5])
    head = whole[: whole.index(b"c\x00\x00\x00\x04")]
    error = frame(ord("E"), b"SERROR\x00C57014\x00Mcanceling statement\x00\x00") + frame(ord("Z"), b"I")
    owner = Owner()
    _Framer(owner).backend_data(head + error)  # type: ignore[arg-type]
    assert [chr(code) for code, _ in owner.received] == ["H", "E", "Z"]
    assert owner.rows == 5


def test_a_copydata_length_below_four_is_refused() -> None:
    owner = Owner()
    framer = _Framer(owner)  # type: ignore[arg-type]
    with pytest.raises(ProtocolViolation, match="length 2"):
        framer.backend_data(frame(ord("H"), b"\x01\x00\x00") + b"d\x00\x00\x00\x02")
