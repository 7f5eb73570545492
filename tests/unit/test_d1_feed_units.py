"""The D1 feed's COPY text decoding (proxy/cdc/d1feed.py): Postgres' escapes, and CopyData frames
cut anywhere."""

from __future__ import annotations

import asyncio
import struct

import pytest

from proxy.cdc.d1feed import CopyRows, decode_copy_field, decode_copy_line, feed_name


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"plain", "plain"),
        (b"\\N", None),
        (b"\\\\N", "\\N"),  # a literal backslash-N is not NULL
        (b"", ""),
        (b"a\\tb\\nc\\rd\\\\e", "a\tb\nc\rd\\e"),
        (b"\\b\\f\\v", "\b\f\v"),
        (b"\\101\\0\\7x", "A\x00\x07x"),  # octal, 1-3 digits
        (b"\\x41\\x4g", "A\x04g"),  # hex, 1-2 digits
        (b"\\303\\251", "é"),  # escapes make bytes; UTF-8 once unescaped
        (b"\\q", "q"),  # any other character: itself
        ("é ☃".encode(), "é ☃"),
    ],
)
def test_decode_copy_field(raw: bytes, text: str | None) -> None:
    assert decode_copy_field(raw) == text


def test_decode_copy_line() -> None:
    assert decode_copy_line(b"1\t\\N\ta\\tb\t") == ["1", None, "a\tb", ""]


class _Conn:
    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def _frames(rows: list[bytes]) -> bytes:
    return b"".join(b"d" + struct.pack("!I", len(r) + 4) + r for r in rows)


async def test_copy_rows_cut_anywhere_and_backpressure() -> None:
    rows = [b"%d\trow %d\\n\\\\\n" % (i, i) for i in range(50)]
    data = _frames(rows)
    for step in (1, 3, 7, 64, len(data)):
        conn = _Conn()
        sink = CopyRows(conn, 2, high=10)  # type: ignore[arg-type]
        for start in range(0, len(data), step):
            sink.feed(data[start : start + step], 0)
        assert conn.paused  # more than 10 rows waiting
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        got = []
        while batch := await sink.take(8, done):
            got.extend(batch)
        assert not conn.paused
        assert got == [[str(i), f"row {i}\n\\"] for i in range(50)]


async def test_copy_rows_reports_a_bad_row() -> None:
    sink = CopyRows(_Conn(), 3, high=10)  # type: ignore[arg-type]
    sink.feed(_frames([b"1\t2\n"]), 1)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    with pytest.raises(Exception, match="2 fields for 3 columns"):
        await sink.take(10, done)


def test_feed_name() -> None:
    assert feed_name("edge") == "pgshift_d1_edge"
    assert feed_name("Edge-EU.1") == "pgshift_d1_edge_eu_1"
    assert len(feed_name("x" * 100)) == 63
