"""The D1 feed (proxy/cdc/d1feed.py) against a real Postgres and the local D1 server: a backfill
of thousands of rows of awkward types, changes (TOASTed columns left unchanged, key changes,
deletes, truncate) visible in D1 within seconds, a crash mid-stream and one mid-backfill followed
by a restart that converges row by row, stop leaving nothing behind, a failed start that names
the fix and leaves nothing behind, and the CLI (sync in a subprocess, status, stop)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.cdc.d1feed import D1Feed, FeedOptions, TableProgress, feed_name, feed_status, feed_stop, read_record
from proxy.cdc.pgoutput import parse_lsn
from proxy.cdc.sqlconn import Endpoint, resolve_endpoint
from proxy.cli import main
from proxy.config import parse_config
from proxy.d1.client import D1Client
from proxy.d1.local import LocalD1, missing_reason
from proxy.d1.schema import D1Table, apply_schema, read_pg_tables, to_d1
from proxy.d1.writes import encode_row, read_keys, read_rows
from proxy.localpg import LocalCluster

pytestmark = pytest.mark.timeout(120)

_REASON = missing_reason()
if _REASON is not None and not os.environ.get("PGSHIFT_REQUIRE_D1"):
    pytest.skip(f"local D1 unavailable: {_REASON}", allow_module_level=True)

DATABASES = [f"00000000-0000-4000-8000-{i:012d}" for i in range(1, 7)]
_ids = itertools.count()
VISIBLE_WITHIN = 5.0  # seconds: a change on the source must be in D1 by then
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def d1local() -> Iterator[LocalD1]:
    with LocalD1.start(database_ids=DATABASES) as server:
        yield server


@pytest.fixture(scope="module")
def source(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return make_cluster("d1-feed-source")


@pytest.fixture
def database_id() -> str:
    return DATABASES[next(_ids) % len(DATABASES)]


@pytest.fixture
async def client(d1local: LocalD1, database_id: str) -> AsyncIterator[D1Client]:
    async with D1Client(
        account_id=d1local.account_id, database_id=database_id, token=d1local.token, api_base=d1local.api_base
    ) as c:
        yield c


def endpoint(cluster: LocalCluster) -> Endpoint:
    config = parse_config({"backends": {"old": {"dsn": cluster.dsn()}}, "routing": {"primary": "old"}})
    return resolve_endpoint(config, "old")


class PgJson:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def json(self, sql: str) -> Any:
        cur = await self.conn.execute(sql)
        row = await cur.fetchone()
        assert row is not None
        return json.loads(row[0])


async def pg_tables(cluster: LocalCluster, names: Sequence[str]) -> list[D1Table]:
    async with await psycopg.AsyncConnection.connect(cluster.dsn(), autocommit=True) as conn:
        return to_d1(await read_pg_tables(PgJson(conn), names))


async def source_rows(cluster: LocalCluster, table: D1Table) -> list[tuple[str | None, ...]]:
    """The source's rows as Postgres text, encoded as the feed encodes them (canonical form)."""
    cols = ", ".join(f'"{c.name}"::text' for c in table.columns)
    async with await psycopg.AsyncConnection.connect(cluster.dsn(), autocommit=True) as conn:
        await conn.execute("SET DateStyle = ISO; SET TimeZone = 'America/Sao_Paulo'")
        cur = await conn.execute(f"SELECT {cols} FROM {table.source}")
        return sorted(tuple(encode_row(table, list(r))) for r in await cur.fetchall())


async def d1_rows(client: D1Client, table: D1Table) -> list[tuple[str | None, ...]]:
    out: list[tuple[str | None, ...]] = []
    after: list[str | None] | None = None
    while True:
        chunk = await read_rows(client, table, after=after, limit=5000)
        out.extend(chunk)
        if len(chunk) < 5000:
            return sorted(out)
        after = [chunk[-1][p] for p in table.key_positions]


async def assert_same(cluster: LocalCluster, client: D1Client, tables: Sequence[D1Table]) -> None:
    for table in tables:
        want, got = await source_rows(cluster, table), await d1_rows(client, table)
        assert len(got) == len(want), table.name
        assert got == want, table.name


async def eventually(check: Callable[[], Awaitable[bool]], within: float = VISIBLE_WITHIN) -> float:
    """Seconds until ``check()`` held (polled every 20 ms); fails after ``within``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not visible in D1 within {within} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def slots_and_publications(cluster: LocalCluster, name: str) -> tuple[str, str]:
    slots = cluster.psql(f"select count(*) from pg_replication_slots where slot_name = '{name}'").strip()
    pubs = cluster.psql(f"select count(*) from pg_publication where pubname = '{name}'").strip()
    return slots, pubs


async def start_feed(feed: D1Feed) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(feed.run())
    deadline = time.monotonic() + 60
    while feed.phase != "streaming":
        if task.done():
            raise AssertionError(f"the feed ended: {task.result().as_dict()}")
        assert time.monotonic() < deadline, "the feed did not reach streaming"
        await asyncio.sleep(0.02)
    return task


async def crash(task: asyncio.Task[Any]) -> None:
    """End the feed as a crash would: cancelled where it stands, no stop, no cleanup of its own."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


SCHEMA = """
CREATE TABLE {t} (
  id int8 PRIMARY KEY, name text NOT NULL, code text, price numeric(12, 2), ratio float8, at timestamptz,
  flag bool, raw bytea, notes text);
ALTER TABLE {t} ALTER COLUMN notes SET STORAGE EXTERNAL;  -- out of line, uncompressed: TOASTed
INSERT INTO {t}
SELECT g, 'city ' || g, lpad((g % 1000)::text, 3, '0'), (g * 1.25)::numeric(12, 2), g / 7.0,
       '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 minute 0.5 second',
       CASE WHEN g % 3 = 0 THEN NULL ELSE g % 2 = 0 END, CASE WHEN g % 5 = 0 THEN '\\x00ff'::bytea END,
       CASE WHEN g % 10 = 0 THEN repeat('long text ' || g || ' ', 400) END
FROM generate_series(1, {n}) g;
INSERT INTO {t} VALUES (9007199254740993, 'big key', '1e3', 0.10, 1e300, '1999-12-31 23:59:59.999999-08',
                        true, '\\x5c27', repeat('x', 5000)),
                       (-9223372036854775808, '007', '007', NULL, NULL, NULL, NULL, NULL, NULL);
"""


# --- backfill, changes within seconds, a crash mid-stream ---------------------------------------


async def test_backfill_changes_crash_and_resume(source: LocalCluster, client: D1Client) -> None:
    source.psql(SCHEMA.format(t="feed_cities", n=4000))
    source.psql(
        "CREATE TABLE feed_categories (kind text, code int, title text NOT NULL, PRIMARY KEY (kind, code));"
        "INSERT INTO feed_categories SELECT 'k' || (g % 7), g, 'title ' || g FROM generate_series(1, 500) g;"
    )
    tables = await pg_tables(source, ["feed_cities", "feed_categories"])
    cities = tables[0]
    assert (await apply_schema(client, tables)).ok
    # A row left in D1 by an earlier feed whose slot is gone: the backfill removes it.
    await client.query('INSERT INTO "feed_cities" ("id", "name") VALUES (?, ?)', ["-1", "stale"])

    lines: list[str] = []
    progress: list[TableProgress] = []
    feed = D1Feed("cities", ["feed_cities", "feed_categories"], endpoint(source), client,
                  FeedOptions(status_interval=0.5), say=lines.append, progress=progress.append)  # fmt: skip
    task = await start_feed(feed)
    done = list({p.table: p for p in progress if p.done}.values())  # (one object per table, updated)
    assert [(p.table, p.rows, p.deleted) for p in done] == [("feed_cities", 4002, 1), ("feed_categories", 500, 0)]
    assert all(p.rows_per_second > 0 for p in done)
    assert any('created replication slot "pgshift_d1_cities"' in line for line in lines)
    await assert_same(source, client, tables)
    record = await read_record(client, "pgshift_d1_cities")
    assert record is not None and record["phase"] == "streaming" and record["backfill_rows"] == 4502

    async def row(table: D1Table, *key: str) -> tuple[str | None, ...] | None:
        return (await read_keys(client, table, [list(key)])).get(key)

    def col(table: D1Table, values: tuple[str | None, ...] | None, name: str) -> str | None:
        assert values is not None
        return values[table.position(name)]

    latencies: list[float] = []

    async def visible(sql: str, check: Callable[[], Awaitable[bool]]) -> None:
        source.psql(sql)
        latencies.append(await eventually(check))

    # insert
    async def inserted() -> bool:
        return await row(cities, "5000") is not None

    await visible("INSERT INTO feed_cities VALUES (5000, 'new', '042', 1.50, 0.1, now(), true, NULL, NULL)", inserted)
    # an update that leaves the TOASTed notes out: D1 keeps its notes
    notes_before = col(cities, await row(cities, "10"), "notes")
    assert notes_before is not None and len(notes_before) > 4000

    async def patched() -> bool:
        return col(cities, await row(cities, "10"), "name") == "renamed"

    await visible("UPDATE feed_cities SET name = 'renamed', price = 99999.99 WHERE id = 10", patched)
    assert col(cities, await row(cities, "10"), "notes") == notes_before

    # a key change of a row with a TOASTed column (a move: its notes go along) and of one without
    async def moved() -> bool:
        return await row(cities, "100020") is not None and await row(cities, "50011") is not None

    await visible("UPDATE feed_cities SET id = 100020, name = 'moved' WHERE id = 20;"
                  "UPDATE feed_cities SET id = 50011 WHERE id = 11", moved)  # fmt: skip
    assert await row(cities, "20") is None and await row(cities, "11") is None
    now = {r[0]: r for r in await source_rows(source, cities)}
    assert await row(cities, "100020") == now["100020"] and await row(cities, "50011") == now["50011"]
    assert col(cities, now["100020"], "notes") is not None  # (carried along from the old key)

    # delete, and a truncate followed by new rows in the same transaction
    async def deleted() -> bool:
        return await row(cities, "30") is None

    await visible("DELETE FROM feed_cities WHERE id BETWEEN 30 AND 39", deleted)

    async def truncated() -> bool:
        count = await client.raw('SELECT count(*) FROM "feed_categories"')
        return bool(count.rows[0][0] == 2)

    await visible("BEGIN; TRUNCATE feed_categories; INSERT INTO feed_categories VALUES ('a', 1, 'one'), "
                  "('b', 2, 'two'); COMMIT", truncated)  # fmt: skip
    await assert_same(source, client, tables)
    assert max(latencies) < VISIBLE_WITHIN, latencies

    # A crash in the middle of a burst of changes; more changes while the feed is down.
    burst = asyncio.ensure_future(asyncio.to_thread(source.psql, """
        UPDATE feed_cities SET ratio = ratio * 2 WHERE id % 7 = 0;
        UPDATE feed_cities SET name = name || '!' WHERE id BETWEEN 100 AND 900;
        DELETE FROM feed_cities WHERE id BETWEEN 1000 AND 1100;
        INSERT INTO feed_categories SELECT 'z', g, 'z ' || g FROM generate_series(1, 300) g;
        UPDATE feed_cities SET notes = 'short now' WHERE id = 50;
        UPDATE feed_cities SET id = id + 200000 WHERE id BETWEEN 2000 AND 2010;
    """))  # fmt: skip
    applied = feed.stats.transactions

    async def arriving() -> bool:
        return feed.stats.transactions > applied

    await eventually(arriving, 10)  # the burst has begun to reach D1
    await crash(task)
    await burst
    source.psql(
        "UPDATE feed_cities SET flag = NOT flag WHERE id < 500; DELETE FROM feed_categories WHERE code < 50;"
        "UPDATE feed_cities SET code = 'after crash' WHERE id = 60"  # (notes TOASTed and unchanged)
    )
    lines.clear()
    progress.clear()
    feed = D1Feed("cities", ["feed_cities", "feed_categories"], endpoint(source), client,
                  FeedOptions(status_interval=0.5), say=lines.append, progress=progress.append)  # fmt: skip
    task = await start_feed(feed)
    assert progress == []  # the backfill had finished: streaming resumes from the slot
    assert any("resuming" in line for line in lines)

    async def caught_up() -> bool:
        return col(cities, await row(cities, "60"), "code") == "after crash"

    await eventually(caught_up, 10)
    await assert_same(source, client, tables)

    # stop: asked to stop, then `d1 stop`: no slot and no publication left, nor the record
    feed.request_stop()
    result = await task
    assert result.exit_code == 0 and result.streamed, result.as_dict()
    status = await feed_status("cities", endpoint(source), client)
    assert status.phase == "streaming" and not status.slot["active"]  # type: ignore[index]
    stopped = await feed_stop("cities", endpoint(source), client)
    assert stopped.ok, stopped.lines
    assert slots_and_publications(source, "pgshift_d1_cities") == ("0", "0")
    assert await read_record(client, "pgshift_d1_cities") is None


# --- a crash during the backfill ------------------------------------------------------------------


async def test_crash_during_backfill_copies_again(source: LocalCluster, client: D1Client) -> None:
    source.psql(SCHEMA.format(t="feed_towns", n=3000))
    (towns,) = await pg_tables(source, ["feed_towns"])
    assert (await apply_schema(client, [towns])).ok
    feed = D1Feed("towns", ["feed_towns"], endpoint(source), client, FeedOptions(batch_rows=200),
                  say=lambda line: None, progress=lambda p: None)  # fmt: skip
    task = asyncio.ensure_future(feed.run())
    # cancelled as soon as some rows are in D1 (the copy sends 200 rows per request)
    while not task.done():
        count = (await client.raw('SELECT count(*) FROM "feed_towns"')).rows[0][0]
        if count >= 400:
            task.cancel()
            break
        await asyncio.sleep(0.005)
    with pytest.raises(asyncio.CancelledError):
        await task
    partial = (await client.raw('SELECT count(*) FROM "feed_towns"')).rows[0][0]
    assert 0 < partial < 3002
    assert slots_and_publications(source, "pgshift_d1_towns") == ("1", "1")  # a crash leaves them
    record = await read_record(client, "pgshift_d1_towns")
    assert record is not None and record["phase"] == "backfill"

    # While the feed is down: rows copied already are deleted or changed, new ones come.
    source.psql(
        "DELETE FROM feed_towns WHERE id <= 100; UPDATE feed_towns SET name = 'changed' WHERE id BETWEEN 101 AND 300;"
        "INSERT INTO feed_towns (id, name) SELECT g, 'late ' || g FROM generate_series(10001, 10100) g;"
    )
    lines: list[str] = []
    feed = D1Feed("towns", ["feed_towns"], endpoint(source), client, say=lines.append, progress=lambda p: None)
    task = await start_feed(feed)
    assert any("backfill had not finished" in line for line in lines), lines
    source.psql("UPDATE feed_towns SET name = 'after restart' WHERE id = 500")

    async def caught_up() -> bool:
        found = await read_keys(client, towns, [["500"]])
        return found[("500",)][towns.position("name")] == "after restart"

    await eventually(caught_up)
    await assert_same(source, client, [towns])
    feed.request_stop()
    assert (await task).exit_code == 0
    assert (await feed_stop("towns", endpoint(source), client)).ok
    assert slots_and_publications(source, "pgshift_d1_towns") == ("0", "0")


# --- a failed start, a permanent D1 error ---------------------------------------------------------


async def test_failed_start_leaves_nothing_and_names_the_fix(source: LocalCluster, client: D1Client) -> None:
    source.psql("CREATE TABLE feed_regions (id int PRIMARY KEY, name text NOT NULL, area float8)")
    await client.query('CREATE TABLE "feed_regions" ("id" INTEGER NOT NULL, "name" TEXT NOT NULL, PRIMARY KEY ("id")) '
                       "STRICT")  # fmt: skip
    feed = D1Feed("regions", ["feed_regions"], endpoint(source), client, say=lambda line: None)
    result = await feed.run()
    assert result.exit_code == 1 and result.error is not None
    assert "column 'area' is missing on D1" in result.error
    assert "pgshift d1 schema --apply" in result.error
    assert slots_and_publications(source, "pgshift_d1_regions") == ("0", "0")
    # A failure after the slot was created (a source row D1 cannot hold): the slot goes again.
    await client.query('DROP TABLE "feed_regions"')
    (regions,) = await pg_tables(source, ["feed_regions"])
    assert (await apply_schema(client, [regions])).ok
    source.psql("INSERT INTO feed_regions VALUES (1, 'a', 1.5), (2, 'b', 'NaN')")
    feed = D1Feed("regions", ["feed_regions"], endpoint(source), client, say=lambda line: None)
    result = await feed.run()
    assert result.exit_code == 1 and result.error is not None and "NaN" in result.error
    assert any("dropped the replication slot" in m for m in result.messages), result.messages
    assert slots_and_publications(source, "pgshift_d1_regions") == ("0", "0")


async def test_permanent_d1_error_stops_without_confirming(source: LocalCluster, client: D1Client) -> None:
    source.psql("CREATE TABLE feed_zones (id int PRIMARY KEY, name text NOT NULL)")
    (zones,) = await pg_tables(source, ["feed_zones"])
    assert (await apply_schema(client, [zones])).ok
    feed = D1Feed("zones", ["feed_zones"], endpoint(source), client, say=lambda line: None)
    task = await start_feed(feed)
    source.psql("INSERT INTO feed_zones VALUES (1, 'one')")
    await eventually(lambda: _has(client, zones, "1"))
    # D1 refuses the next transaction (a trigger there raises): the feed stops and names it.
    await client.query(
        'CREATE TRIGGER "refuse" BEFORE INSERT ON "feed_zones" WHEN NEW."id" = 3 '
        "BEGIN SELECT RAISE(ABORT, 'zone 3 refused'); END"
    )
    source.psql("INSERT INTO feed_zones VALUES (2, 'two')")
    source.psql("INSERT INTO feed_zones VALUES (3, 'three')")
    result = await asyncio.wait_for(task, 10)
    assert result.exit_code == 1 and result.error is not None
    assert "zone 3 refused" in result.error and "LSN" in result.error
    assert 'INSERT INTO "feed_zones"' in result.error and "'3'" in result.error
    assert any("stay" in m for m in result.messages)
    confirmed = source.psql("select confirmed_flush_lsn from pg_replication_slots where slot_name = 'pgshift_d1_zones'")
    refused = re.search(r"ending at LSN ([0-9A-F]+/[0-9A-F]+)", result.error)
    assert refused is not None and parse_lsn(confirmed) < parse_lsn(refused[1])  # not confirmed: sent again
    assert await _has(client, zones, "2") and not await _has(client, zones, "3")
    # fixed on D1: a restart sends both transactions again
    await client.query('DROP TRIGGER "refuse"')
    feed = D1Feed("zones", ["feed_zones"], endpoint(source), client, say=lambda line: None)
    task = await start_feed(feed)
    await eventually(lambda: _has(client, zones, "3"))
    await assert_same(source, client, [zones])
    feed.request_stop()
    await task
    assert (await feed_stop("zones", endpoint(source), client)).ok


async def _has(client: D1Client, table: D1Table, key: str) -> bool:
    return (key,) in await read_keys(client, table, [[key]])


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_sync_status_stop(
    source: LocalCluster, d1local: LocalD1, database_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source.psql(
        "CREATE TABLE feed_cli (id int PRIMARY KEY, label text);"
        "INSERT INTO feed_cli SELECT g, 'label ' || g FROM generate_series(1, 1000) g;"
    )
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[backends.old]
dsn = "{source.dsn()}"
[routing]
primary = "old"
[stores.edge]
kind = "d1"
account_id = "{d1local.account_id}"
database_id = "{database_id}"
token = "{d1local.token}"
api_base = "{d1local.api_base}"
tables = ["feed_cli"]
"""
    )
    base = ["--config", str(config)]
    assert main(["d1", "schema", "--apply", *base]) == 0
    capsys.readouterr()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "d1", "sync", *base, "--status-interval", "0.5"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "streaming changes from slot" in line:
                break
        assert any("feed_cli -> D1 feed_cli: 1,000 rows" in line for line in seen), seen
        source.psql("UPDATE feed_cli SET label = 'cli' WHERE id = 7")

        async def check() -> bool:
            async with D1Client(account_id=d1local.account_id, database_id=database_id, token=d1local.token,
                                api_base=d1local.api_base) as c:  # fmt: skip
                result = await c.raw('SELECT label FROM "feed_cli" WHERE id = 7')
                return bool(result.rows == [["cli"]])

        asyncio.run(eventually(check))
        assert main(["d1", "status", *base, "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["phase"] == "streaming" and status["active"] and status["slot_name"] == feed_name("edge")
        assert main(["d1", "stop", *base]) == 1  # in use
        assert "in use" in capsys.readouterr().err
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(30) == 0, rest
        assert "stopped after" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert main(["d1", "status", *base]) == 1  # the slot stays, retaining WAL with no feed
    assert "WARNING" in capsys.readouterr().out
    assert main(["d1", "stop", *base]) == 0
    assert 'dropped replication slot "pgshift_d1_edge"' in capsys.readouterr().out
    assert slots_and_publications(source, "pgshift_d1_edge") == ("0", "0")
    assert main(["d1", "status", *base]) == 0
    assert "no feed" in capsys.readouterr().out
