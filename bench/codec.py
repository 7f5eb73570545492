"""Micro-benchmark of the relay's pure-Python work per pgbench round trip (framing + reply FIFO).

python bench/codec.py  — prints µs per request+reply for the simple, extended and prepared shapes.
"""

from __future__ import annotations

import timeit

from proxy.wire.codes import FRONTEND_CODES
from proxy.wire.framing import FrameReader
from proxy.wire.messages import Parse, Query, frame
from proxy.wire.replies import ExpectedReplies, ReplyScanner

SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
BIND = frame(ord("B"), b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x0512345\x00\x00")
EXECUTE = frame(ord("E"), b"\x00\x00\x00\x00\x00")
SYNC = frame(ord("S"), b"")
DESCRIBE = frame(ord("D"), b"P\x00")
ROW_DESC = frame(ord("T"), b"\x00\x01abalance\x00" + b"\x00" * 18)
ROW = frame(ord("D"), b"\x00\x01\x00\x00\x00\x041234")
DONE = frame(ord("C"), b"SELECT 1\x00")
READY = frame(ord("Z"), b"I")

SHAPES = {
    "simple": (Query(SQL.replace("$1", "12345")).encode(), ROW_DESC + ROW + DONE + READY),
    "extended": (
        Parse("", SQL, ()).encode() + BIND + DESCRIBE + EXECUTE + SYNC,
        frame(ord("1"), b"") + frame(ord("2"), b"") + ROW_DESC + ROW + DONE + READY,
    ),
    "prepared": (BIND + EXECUTE + SYNC, frame(ord("2"), b"") + ROW + DONE + READY),
}


def main() -> None:
    for name, (request, reply) in SHAPES.items():
        fifo = ExpectedReplies()
        scanner = ReplyScanner(fifo, 1 << 30)
        reader = FrameReader(1 << 30, FRONTEND_CODES)

        def round_trip(
            request: bytes = request,
            reply: bytes = reply,
            reader: FrameReader = reader,
            fifo: ExpectedReplies = fifo,
            scanner: ReplyScanner = scanner,
        ) -> None:
            _buf, frames = reader.feed(request)
            fifo.push_frames(frames)
            scanner.feed(reply)

        n = 200_000
        seconds = min(timeit.repeat(round_trip, number=n, repeat=3))
        print(f"{name:<9} {seconds / n * 1e6:5.2f} µs per request+reply")


if __name__ == "__main__":
    main()
