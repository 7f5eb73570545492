"""The Python cost per request of each relay, without sockets: `python bench/relay.py`.

Drives a plain session (routing fixed, every read on the primary) and a routed session (the live
default; optionally with reads split) through real code — framing, request scan, analysis cache,
routing, the expected-reply FIFO, the reply scanner — with transports that only count bytes. What
it prints is the interpreter time per request and reply, the part of the proxy's CPU that code
changes can move (pgbench through the real proxy adds the kernel's share: see bench/run.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.backends.connection import BackendConnection
from proxy.config import parse_config
from proxy.mirror.journal import Journal
from proxy.mirror.manager import MirrorManager
from proxy.observability import RequestStats
from proxy.routing import Live, RoutingStats
from proxy.session.catalog import FunctionCatalog
from proxy.session.client import ClientConnection
from proxy.session.registry import SessionRegistry
from proxy.session.routed import RoutedSession
from proxy.session.session import Session, SessionContext
from proxy.sql import AnalysisCache
from proxy.wire.codes import BackendCode, FrontendCode
from proxy.wire.messages import SYNC, CommandComplete, Parse, Query, frame

SQL_SIMPLE = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"
SQL_EXTENDED = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
# mode "write": an autocommit UPDATE through a prepared statement (with dual write: one committed
# transaction per request, replayed on the mirror as it is).
SQL_WRITE = "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = $1"


class CountingTransport:
    """Stands in for a socket: accepts writes, remembers how much."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _bind(statement: str, value: int) -> bytes:
    param = str(value).encode()
    body = b"\x00" + statement.encode() + b"\x00" + struct.pack("!hhi", 0, 1, len(param)) + param + b"\x00\x00"
    return frame(FrontendCode.BIND, body)


def requests(mode: str, count: int) -> list[bytes]:
    """What pgbench -S -M MODE sends, one chunk per transaction."""
    rng = random.Random(1)
    describe = frame(FrontendCode.DESCRIBE, b"P\x00")
    execute = frame(FrontendCode.EXECUTE, b"\x00" + struct.pack("!i", 0))
    out = []
    for _ in range(count):
        aid = rng.randrange(1, 1_000_000)
        if mode == "simple":
            out.append(Query(SQL_SIMPLE.format(aid)).encode())
        elif mode == "extended":
            out.append(Parse("", SQL_EXTENDED, ()).encode() + _bind("", aid) + describe + execute + SYNC)
        elif mode == "write":
            out.append(_bind("P0_1", aid) + execute + SYNC)
        else:
            out.append(_bind("P0_1", aid) + describe + execute + SYNC)
    return out


def reply(mode: str) -> bytes:
    if mode == "write":
        done = CommandComplete("UPDATE 1").encode() + frame(BackendCode.READY_FOR_QUERY, b"I")
        return frame(BackendCode.BIND_COMPLETE, b"") + done
    column = b"abalance\x00" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0)
    row_desc = frame(BackendCode.ROW_DESCRIPTION, struct.pack("!h", 1) + column)
    row = frame(BackendCode.DATA_ROW, struct.pack("!hi", 1, 1) + b"0")
    done = CommandComplete("SELECT 1").encode() + frame(BackendCode.READY_FOR_QUERY, b"I")
    if mode == "simple":
        return row_desc + row + done
    parse = frame(BackendCode.PARSE_COMPLETE, b"") if mode == "extended" else b""
    return parse + frame(BackendCode.BIND_COMPLETE, b"") + row_desc + row + done


def _config(routing: dict[str, Any], live: bool) -> Any:
    return parse_config(
        {
            "backends": {
                "main": {"dsn": "postgresql://127.0.0.1:1"},
                "second": {"dsn": "postgresql://127.0.0.1:2", "mirror_user": "apply"},
            },
            "routing": {"primary": "main", **routing},
            "control": {"live": live},
        }
    )


async def measure(kind: str, mode: str, count: int) -> float:
    """Seconds per request+reply for ``kind`` = plain | routed | split | mirrored (routed, with dual
    write on: every request planned and every reply passed through the capture tap)."""
    routing: dict[str, Any] = {}
    if kind == "split":
        routing = {"reads": {"main": 1, "second": 1}}
    elif kind == "mirrored":
        routing = {"mirrors": ["second"]}
    config = _config(routing, live=kind != "plain")
    live = Live(config)
    ctx = SessionContext(
        live=live,
        registry=SessionRegistry(),
        tls=None,
        analysis=AnalysisCache(),
        stats=RoutingStats(),
        requests=RequestStats(),
        rng=random.Random(0),
        catalog=FunctionCatalog(),
        mirror=MirrorManager(live, Journal(None)),
    )
    client = ClientConnection(1 << 30, lambda _c: None)
    client.transport = CountingTransport()  # type: ignore[assignment]
    session = (Session if kind == "plain" else RoutedSession)(ctx, client)
    session.primary = "main"
    session.user = "postgres"
    if kind == "mirrored":  # what the proxy asks the primary once per database and role: nothing in the way
        ctx.mirror.learn_targets(session._database, session.user, [])
    backends = {}
    for name in ("main", "second"):
        conn = BackendConnection(name, config.backends[name].address, 1 << 30)
        conn.transport = CountingTransport()  # type: ignore[assignment]
        backends[name] = conn
    session.backend = backends["main"]
    session._start_relay(backends["main"])
    if isinstance(session, RoutedSession):
        session._adopt(backends["second"])
    answer = reply(mode)
    if mode in ("prepared", "write"):  # the statement, prepared once
        session._client_data(Parse("P0_1", SQL_WRITE if mode == "write" else SQL_EXTENDED, ()).encode() + SYNC)
        ready = frame(BackendCode.READY_FOR_QUERY, b"I")
        backends["main"].data_received(frame(BackendCode.PARSE_COMPLETE, b"") + ready)
    # A fixed pool, cycled: building the requests must not grow with ``count`` (instruction
    # counts under callgrind are taken as the difference between two counts).
    pool = requests(mode, 64)
    chunks = [pool[i % 64] for i in range(count)]
    gc.collect()
    begin = time.perf_counter()
    for chunk in chunks:
        client.data_received(chunk)
        if kind == "split":
            assert isinstance(session, RoutedSession)
            conn = session._current or backends["main"]
            conn.data_received(answer)
        else:
            backends["main"].data_received(answer)
    elapsed = time.perf_counter() - begin
    sent = sum(t.transport.written for t in backends.values())  # type: ignore[union-attr]
    assert sent and client.transport.written, "nothing was relayed"  # type: ignore[union-attr]
    return elapsed / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="requests per measurement (default 20000)")
    parser.add_argument("--repeat", type=int, default=5, help="best of N runs (default 5)")
    parser.add_argument(
        "--only", metavar="KIND:MODE", help="one measurement, e.g. routed:extended (for callgrind: see bench/README.md)"
    )
    args = parser.parse_args()
    if args.only:
        kind, _, mode = args.only.partition(":")
        print(f"{kind} {mode}: {asyncio.run(measure(kind, mode, args.count)) * 1e6:.2f} µs")
        return
    print(f"python {sys.version.split()[0]}, best of {args.repeat} x {args.count} requests; µs per request + reply")
    print(f"{'mode':<10}{'plain':>10}{'routed':>10}{'split 50/50':>14}{'mirrored':>10}{'routed - plain':>16}")
    for mode in ("simple", "extended", "prepared", "write"):
        results = {}
        for kind in ("plain", "routed", "split", "mirrored"):
            if mode == "write" and kind == "split":
                results[kind] = float("nan")  # (a write is never split)
                continue
            results[kind] = min(asyncio.run(measure(kind, mode, args.count)) for _ in range(args.repeat)) * 1e6
        print(
            f"{mode:<10}{results['plain']:>10.2f}{results['routed']:>10.2f}{results['split']:>14.2f}"
            f"{results['mirrored']:>10.2f}{results['routed'] - results['plain']:>16.2f}"
        )


if __name__ == "__main__":
    main()
