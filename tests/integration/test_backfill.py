"""Backfill against real clusters: pgbench data copied in parallel chunks, under a replication slot's
snapshot, in text format across a type difference, and resumed after a worker's target dies."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from proxy.cdc.backfill import PROGRESS_TABLE, BackfillError, BackfillReport, TableProgress, backfill
from proxy.cdc.replication import ReplicationConnection
from proxy.cdc.sqlconn import DatabaseUnreachable, Endpoint, SqlError
from proxy.config import parse_dsn
from proxy.localpg import LocalCluster
from tests.integration.conftest import TwoClusters

pytestmark = pytest.mark.timeout(60)

PGBENCH_TABLES = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"]


def endpoint(cluster: LocalCluster, name: str) -> Endpoint:
    return Endpoint(name, parse_dsn(cluster.dsn()), "postgres", "postgres", None)


def pgbench(cluster: LocalCluster, *args: str) -> None:
    argv = [str(cluster.bindir / "pgbench"), "-q", *args, cluster.dsn()]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def clusters(make_cluster: Callable[..., LocalCluster]) -> TwoClusters:
    old, new = make_cluster("backfill-old"), make_cluster("backfill-new")
    pgbench(old, "-i", "-s", "5")  # 500,000 accounts
    return TwoClusters(old, new)


@pytest.fixture
def empty_target(clusters: TwoClusters) -> TwoClusters:
    """The pgbench tables and primary keys on the target, without rows; no progress table; and
    only the pgbench tables on the source (the other tests' tables dropped)."""
    clusters.old.psql("drop table if exists later, typed")
    clusters.new.psql(f"drop table if exists {PROGRESS_TABLE}, later, typed")
    pgbench(clusters.new, "-i", "-I", "dtp")
    return clusters


async def fetchval(cluster: LocalCluster, sql: str) -> Any:
    conn = await asyncpg.connect(cluster.dsn())
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def table_digest(cluster: LocalCluster, table: str, key: str) -> tuple[int, str]:
    sql = f"select count(*), md5(coalesce(string_agg(t::text, ',' order by {key}), '')) from {table} t"
    conn = await asyncpg.connect(cluster.dsn())
    try:
        row = await conn.fetchrow(sql)
    finally:
        await conn.close()
    assert row is not None
    return row[0], row[1]


async def assert_pgbench_equal(clusters: TwoClusters) -> None:
    for table, key in [("pgbench_accounts", "aid"), ("pgbench_branches", "bid"), ("pgbench_tellers", "tid")]:
        assert await table_digest(clusters.new, table, key) == await table_digest(clusters.old, table, key), table


async def test_pgbench_copy(empty_target: TwoClusters) -> None:
    seen: list[tuple[str, int, int, int]] = []

    def progress(p: TableProgress) -> None:
        seen.append((p.table, p.rows, p.bytes, p.chunks_done))

    source, target = endpoint(empty_target.old, "old"), endpoint(empty_target.new, "new")
    report = await backfill(source, target, None, None, workers=4, chunk_rows=50_000, progress=progress)
    print("\n" + "\n".join(report.lines()))
    await assert_pgbench_equal(empty_target)

    tables = {t.table: t for t in report.tables}
    assert sorted(tables) == [f"public.{t}" for t in sorted(PGBENCH_TABLES)]
    accounts = tables["public.pgbench_accounts"]
    assert (accounts.chunks, accounts.chunks_done, accounts.rows) == (10, 10, 500_000)
    assert accounts.format == "binary" and accounts.estimated_rows == 500_000 and accounts.eta == 0
    assert tables["public.pgbench_history"].chunks == 1  # no primary key: one chunk
    assert report.rows == 500_000 + 5 + 50 and report.chunks_skipped == 0
    # The callback saw the accounts' rows and bytes grow chunk by chunk up to the total.
    moves = [(rows, size, done) for table, rows, size, done in seen if table == "public.pgbench_accounts"]
    assert moves == sorted(moves) and moves[-1] == (500_000, accounts.bytes, 10)
    assert len({done for _, _, done in moves}) == 11

    # Every chunk recorded with its bounds and rows; a second run finds nothing to do.
    assert await fetchval(empty_target.new, f"select sum(rows) from {PROGRESS_TABLE} where done_at is not null") == (
        500_055
    )
    again = await backfill(source, target, None, None, chunk_rows=50_000)
    assert again.rows == 0 and again.chunks_skipped == 13
    await assert_pgbench_equal(empty_target)


async def test_slot_snapshot_excludes_later_rows(clusters: TwoClusters) -> None:
    old, new = clusters.old, clusters.new
    old.psql("drop table if exists later; create table later (id int primary key, v text);"
             "insert into later select g, 'before' from generate_series(1, 100) g;")  # fmt: skip
    new.psql(f"drop table if exists later; create table later (id int primary key, v text);"
             f"delete from {PROGRESS_TABLE} where table_name = 'public.later';")  # fmt: skip
    repl = await ReplicationConnection.connect(parse_dsn(old.dsn()))
    try:
        slot = await repl.create_slot("backfill_test", temporary=True)
        assert slot.snapshot_name is not None
        # Committed after the slot's snapshot: the stream brings these, the copy must not.
        old.psql("insert into later select g, 'after' from generate_series(101, 150) g; "
                 "update later set v = 'changed' where id = 1;")  # fmt: skip
        report = await backfill(
            endpoint(old, "old"), endpoint(new, "new"), slot.snapshot_name, ["later"], chunk_rows=30
        )
    finally:
        await repl.close()
    assert report.snapshot == slot.snapshot_name and report.rows == 100
    assert report.tables[0].chunks == 4
    assert await fetchval(new, "select count(*) from later") == 100
    assert await fetchval(new, "select count(*) from later where v = 'before'") == 100


async def test_type_difference_copied_as_text(clusters: TwoClusters) -> None:
    old, new = clusters.old, clusters.new
    ddl = "drop table if exists typed; create table typed (id int primary key, n {}, s text, t timestamptz, a int[]);"
    old.psql(ddl.format("int") + "insert into typed select g, case when g % 7 = 0 then null else g * -3 end, "
             "E'tab\\there ' || g, '2024-02-29 12:00+02'::timestamptz + g * interval '1 hour', array[g, null] "
             "from generate_series(1, 2000) g;")  # fmt: skip
    new.psql(ddl.format("bigint") + f"delete from {PROGRESS_TABLE} where table_name = 'public.typed';")
    report = await backfill(endpoint(old, "old"), endpoint(new, "new"), None, ["public.typed"], chunk_rows=500)
    (table,) = report.tables
    assert (table.format, table.rows, table.chunks) == ("text", 2000, 4)
    assert await fetchval(new, "select format_type(atttypid, null) from pg_attribute "
                          "where attrelid = 'typed'::regclass and attname = 'n'") == "bigint"  # fmt: skip
    assert await table_digest(new, "typed", "id") == await table_digest(old, "typed", "id")

    with pytest.raises(BackfillError, match="no such table on the source: nosuch"):
        await backfill(endpoint(old, "old"), endpoint(new, "new"), None, ["typed", "nosuch"])


async def test_resume_after_a_worker_dies(empty_target: TwoClusters) -> None:
    source, target = endpoint(empty_target.old, "old"), endpoint(empty_target.new, "new")
    killed: list[int] = []

    async def kill_one_target_backend() -> None:
        conn = await asyncpg.connect(empty_target.new.dsn())
        try:
            pid = await conn.fetchval(
                "select pid from pg_stat_activity where application_name = 'pgshift-backfill' "
                "and state = 'active' and query like 'copy %' limit 1"
            )
            if pid is not None:
                killed.append(pid)
                await conn.execute("select pg_terminate_backend($1)", pid)
        finally:
            await conn.close()

    kill: list[asyncio.Task[None]] = []

    def progress(p: TableProgress) -> None:
        if p.table == "public.pgbench_accounts" and p.chunks_done >= 5 and not kill:
            kill.append(asyncio.get_running_loop().create_task(kill_one_target_backend()))

    with pytest.raises((DatabaseUnreachable, SqlError)):
        await backfill(source, target, None, None, chunk_rows=20_000, progress=progress)
    assert killed
    await kill[0]
    # Exactly the rows of the chunks marked done are there: nothing of the interrupted chunks.
    done = await fetchval(empty_target.new, f"select count(*) from {PROGRESS_TABLE} where done_at is not null")
    marked = await fetchval(empty_target.new, f"select sum(rows) from {PROGRESS_TABLE} "
                            "where table_name = 'public.pgbench_accounts' and done_at is not null")  # fmt: skip
    assert 5 <= done < 28
    assert await fetchval(empty_target.new, "select count(*) from pgbench_accounts") == marked
    before = await done_marks(empty_target.new)

    report: BackfillReport = await backfill(source, target, None, None, chunk_rows=20_000)
    assert report.chunks_skipped == done and report.chunks_done == 28 - done
    assert report.rows == 500_055 - marked - sum(t.rows_before for t in report.tables if "accounts" not in t.table)
    await assert_pgbench_equal(empty_target)
    # The chunks done before were not copied again: their marks are untouched.
    after = await done_marks(empty_target.new)
    assert len(after) == 28 and {k: after[k] for k in before} == before


async def done_marks(cluster: LocalCluster) -> dict[str, str]:
    conn = await asyncpg.connect(cluster.dsn())
    try:
        rows = await conn.fetch(f"select table_name || '/' || chunk, done_at::text from {PROGRESS_TABLE} "
                                "where done_at is not null")  # fmt: skip
    finally:
        await conn.close()
    return {r[0]: r[1] for r in rows}


async def test_integer_key_chunks_by_value_cover_every_row(clusters: TwoClusters) -> None:
    """A single integer key is cut by value (min to max, no counting): gaps, negatives and the
    bigint extremes make uneven chunks, never a lost or doubled row."""
    old, new = clusters.old, clusters.new
    ddl = "drop table if exists spread; create table spread (id bigint primary key, v text)"
    old.psql(ddl + "; insert into spread select g, 'dense ' || g from generate_series(-3000, 3000) g;"
             "insert into spread values (-9223372036854775808, 'least'), (9223372036854775807, 'greatest'),"
             " (4611686018427387904, 'far'); analyze spread")  # fmt: skip
    new.psql(ddl + f"; drop table if exists {PROGRESS_TABLE}")
    try:
        report = await backfill(endpoint(old, "old"), endpoint(new, "new"), None, ["spread"], chunk_rows=500)
        (table,) = report.tables
        assert table.chunks >= 12 and table.rows == 6004  # (6,004 rows / 500 per chunk, cut by value)
        assert await table_digest(new, "spread", "id") == await table_digest(old, "spread", "id")
    finally:
        old.psql("drop table spread")
        new.psql(f"drop table spread; drop table {PROGRESS_TABLE}")
