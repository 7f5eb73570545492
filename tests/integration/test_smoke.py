"""The shortest proof that the proxy relays: one query through each client library."""

from __future__ import annotations

import asyncpg
import psycopg

from tests.support.proxy import ProxyThread


def test_psycopg_sync(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1 + 1").fetchone() == (2,)


async def test_asyncpg(proxy: ProxyThread) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        assert await conn.fetchval("select $1::int * 2", 21) == 42
    finally:
        await conn.close()
