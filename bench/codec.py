"""Micro-benchmarks of the relay's pure-Python work: framing + reply FIFO per pgbench round trip,
and the statement-analysis cache (hit, literal-free-key hit, miss).

python bench/codec.py
"""

from __future__ import annotations

import timeit

from proxy.sql import AnalysisCache, analyze
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
    analysis_cache()


def analysis_cache() -> None:
    cache = AnalysisCache()
    prepared = SQL
    cache.get(prepared)
    n = 200_000
    hit = min(timeit.repeat(lambda: cache.get(prepared), number=n, repeat=3)) / n
    texts = iter([SQL.replace("$1", str(i)) for i in range(n)] * 4)
    cache.get(SQL.replace("$1", "0"))
    literal = min(timeit.repeat(lambda: cache.get(next(texts)), number=n, repeat=3)) / n
    miss = min(timeit.repeat(lambda: analyze(SQL), number=2000, repeat=3)) / 2000
    print(f"analysis  {hit * 1e6:5.2f} µs cache hit (same text, as in extended/prepared mode)")
    print(f"analysis  {literal * 1e6:5.2f} µs cache hit through the literal-free key (simple mode)")
    print(f"analysis  {miss * 1e6:5.2f} µs uncached (pglast parse + walk)")


if __name__ == "__main__":
    main()
