"""ChangeApplier against real clusters: every change kind and awkward types applied by key, pgbench
writing while it runs, old == new row by row after catch-up, a hard restart from the slot with
nothing lost or duplicated, a slot that never passes what the target committed, and a refusal."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
import pytest

from proxy.cdc.changes import ApplyFailed, ChangeApplier
from proxy.cdc.pgoutput import parse_lsn
from proxy.cdc.replication import ReplicationConnection
from proxy.cdc.sqlconn import Endpoint
from proxy.config import parse_dsn
from proxy.localpg import LocalCluster

pytestmark = pytest.mark.timeout(90)

SCHEMA = """
create table kinds (
    id serial primary key,
    ident int generated always as identity,
    u uuid default gen_random_uuid(),
    ts timestamptz,
    n numeric,
    j jsonb,
    js json,
    b bytea,
    arr text[],
    note text
);
create table pair (a int, b text, v numeric, primary key (a, b));
-- EXTERNAL: stored out of line without compression, so a large value really is TOASTed.
create table docs (id int primary key, title text, body text);
alter table docs alter column body set storage external;
create table beat (id int primary key, at timestamptz);
create schema strict;
create table strict.t (id int primary key, v int);
create schema trig;
create table trig.t (id int primary key, v int);
create table trig.log (id int);
create table uniq (id int primary key, u text unique);
"""
TABLES = ("kinds", "pair", "docs", "pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")
SLOT = "cdc_apply"
PUB = "cdc_apply_pub"


@dataclass(frozen=True)
class Pair:
    old: LocalCluster
    new: LocalCluster


def pgbench(cluster: LocalCluster, *args: str) -> None:
    binary = cluster.bindir / "pgbench"
    program = str(binary) if binary.exists() else shutil.which("pgbench")
    assert program, "pgbench not found"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    argv = [program, "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres", *args, "postgres"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def clusters(make_cluster: Callable[..., LocalCluster]) -> Pair:
    old, new = make_cluster("cdc_old"), make_cluster("cdc_new")
    for cluster in (old, new):
        cluster.psql(SCHEMA)
        pgbench(cluster, "-i", "-q")  # the same deterministic data on both
        cluster.psql("alter table pgbench_history add column hid bigserial primary key")
    # The target refuses what the source accepts: a transaction the applier cannot apply.
    new.psql("alter table strict.t add check (v < 100)")
    old.psql(f"create publication {PUB} for table {', '.join(TABLES)}, beat")
    old.psql("create publication strict_pub for table strict.t")
    # A trigger only the target has (post-data of a schema copy brings the source's along).
    new.psql(
        "create function trig.note() returns trigger language plpgsql as "
        "$$ begin insert into trig.log values (new.id); return new; end $$;"
        "create trigger note after insert on trig.t for each row execute function trig.note()"
    )
    old.psql("create publication trig_pub for table trig.t")
    old.psql("create publication uniq_pub for table uniq")
    return Pair(old, new)


@pytest.fixture
async def src(clusters: Pair) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(clusters.old.dsn())
    try:
        yield conn
    finally:
        await conn.close()


def endpoint(cluster: LocalCluster) -> Endpoint:
    return Endpoint("new", parse_dsn(cluster.dsn()), "postgres", "postgres", None)


class Running:
    """A replication connection from the slot and an applier consuming it."""

    def __init__(
        self, clusters: Pair, slot: str = SLOT, publication: str = PUB, *, replica: bool = False, **options: int
    ) -> None:
        self.clusters = clusters
        self.slot = slot
        self.publication = publication
        self.replica = replica
        self.options = options

    async def start(self) -> Running:
        self.conn = await ReplicationConnection.connect(parse_dsn(self.clusters.old.dsn()))
        await self.conn.start(self.slot, 0, [self.publication], status_interval=0.2)
        self.applier = ChangeApplier(self.conn, endpoint(self.clusters.new), replica=self.replica, **self.options)
        self.task = asyncio.create_task(self.applier.run(self.conn))
        return self

    async def catch_up(self, src: asyncpg.Connection, seconds: float = 30) -> None:
        """Wait until the target committed everything the source had written so far."""
        # (The insert position: with synchronous_commit off the write position can trail a commit.)
        lsn = parse_lsn(await src.fetchval("select pg_current_wal_insert_lsn()::text"))
        # Past that point: a last transaction of our own, whose commit the applier confirms.
        await src.execute("insert into beat values (1, now()) on conflict (id) do update set at = excluded.at")
        async with asyncio.timeout(seconds):
            while self.applier.confirmed_lsn < lsn:
                if self.task.done():
                    self.task.result()
                    raise AssertionError("the applier ended")
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """As a crash would: no drain, no last confirmation beyond what went out already."""
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        await self.conn.close()

    async def stop(self) -> None:
        await self.applier.stop()
        await self.task
        await self.conn.close()


async def compare(clusters: Pair) -> None:
    for table in TABLES:
        rows = []
        for cluster in (clusters.old, clusters.new):
            conn = await asyncpg.connect(cluster.dsn())
            try:
                rows.append([r[0] for r in await conn.fetch(f"select t::text from {table} t order by 1")])
            finally:
                await conn.close()
        old, new = rows
        if old != new:
            missing, extra = sorted(set(old) - set(new))[:5], sorted(set(new) - set(old))[:5]
            raise AssertionError(f"{table}: {len(old)} rows old, {len(new)} new; missing {missing}, extra {extra}")


async def fetch(cluster: LocalCluster, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(cluster.dsn())
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def slot_lsn(src: asyncpg.Connection, slot: str = SLOT) -> int:
    text = await src.fetchval("select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1", slot)
    return parse_lsn(text)


async def create_slot(clusters: Pair, slot: str) -> None:
    conn = await ReplicationConnection.connect(parse_dsn(clusters.old.dsn()))
    try:
        await conn.create_slot(slot, export_snapshot=False)
    finally:
        await conn.close()


CHANGES = [
    # Awkward values of every type, several rows in one transaction (one statement on the target).
    """insert into kinds (ts, n, j, js, b, arr, note) values
        ('2024-02-29 12:34:56.789012+05:30', 12345678901234567890.123456789, '{"a": [1, 2.50, null], "é": "\\u00e9"}',
         '{"dup": 1,  "dup": 2}', '\\x00ff10', array['a', null, 'q"uote', 'com,ma'], 'line1
line2	tab \\ backslash'),
        ('infinity', 'NaN', '"just a string"', ' "\\u00e9 as written" ', '', '{}', ''),
        (null, null, null, null, null, null, null),
        ('-infinity', -0.000001, '{"nested": {"deep": [true, false]}}', 'null', '\\x', '{}', '😀 ünïcode')""",
    "update kinds set n = n * 2, note = coalesce(note, '') || '!' where id <= 2",
    # Insert, update and delete of one row in one transaction: order within it matters.
    "begin; insert into kinds (note) values ('short-lived');"
    " update kinds set note = 'changed' where note = 'short-lived'; delete from kinds where note = 'changed'; commit",
    "insert into pair values (1, 'a', 1.5), (1, 'b', 2.5), (2, 'a', 3.5)",
    "update pair set b = 'c' where (a, b) = (1, 'a')",  # a composite key changes
    "delete from pair where a = 2",
    "insert into docs values (1, 'first', repeat('0123456789', 20000)), (2, 'second', repeat('x', 30000))",
    "update docs set title = 'renamed' where id = 1",  # body TOASTed, unchanged: not sent
    "update docs set id = 10, title = 'moved' where id = 1",  # key change, body not sent either
    "update docs set body = 'now small' where id = 2",
    "truncate pair",
    "insert into pair values (5, 'after truncate', 0)",
    "delete from docs where id = 2",
]


# As replica, batches are applied as their net change (render_compacted); otherwise in source order.
@pytest.mark.parametrize("replica", [False, True], ids=["in-order", "net-change"])
async def test_stream_applied_row_by_row_with_restart_and_confirmation(
    clusters: Pair, src: asyncpg.Connection, replica: bool
) -> None:
    for cluster in (clusters.old, clusters.new):
        cluster.psql("truncate kinds, pair, docs")
    await create_slot(clusters, SLOT)
    first = await Running(clusters, replica=replica).start()
    for sql in CHANGES:
        await src.execute(sql)
    await asyncio.to_thread(pgbench, clusters.old, "-T", "3", "-c", "4")
    await first.catch_up(src)
    await compare(clusters)
    stats = first.applier.stats()
    assert stats.transactions_applied > 50  # pgbench's, and ours
    # (pgbench truncates pgbench_history before it starts: that and ours)
    assert stats.rows["insert"] > 50 and stats.rows["update"] > 150 and stats.rows["truncate"] == 2
    assert stats.pending == 0 and stats.lag_seconds == 0 and stats.target_state == "running"
    assert await fetch(clusters.new, "select id, title, length(body) from docs") == [(10, "moved", 200000)]

    # Killed mid-stream while pgbench writes; a new connection and applier resume from the slot.
    bench = asyncio.create_task(asyncio.to_thread(pgbench, clusters.old, "-T", "3", "-c", "4"))
    await asyncio.sleep(1.2)
    await first.kill()
    killed_at = await slot_lsn(src)
    assert killed_at <= first.applier.confirmed_lsn
    second = await Running(clusters, replica=replica).start()
    await bench
    await src.execute("update docs set title = 'after restart' where id = 10")
    await second.catch_up(src)
    await compare(clusters)

    assert second.applier.retried_exactly == 0
    if replica:  # pgbench at 4 clients outran the target now and then: batches of several transactions
        assert second.applier.batches_applied < second.applier.transactions_applied

    # The target blocked: the slot does not move past what it committed.
    target = await asyncpg.connect(clusters.new.dsn())
    try:
        lock = target.transaction()
        await lock.start()
        await target.execute("lock table docs in access exclusive mode")
        before = parse_lsn(await src.fetchval("select pg_current_wal_insert_lsn()::text"))
        await src.execute("insert into docs values (3, 'blocked', 'b')")
        await src.execute("insert into pair values (6, 'behind the blocked one', 0)")
        after = parse_lsn(await src.fetchval("select pg_current_wal_insert_lsn()::text"))
        await asyncio.sleep(1.0)  # five status intervals
        assert second.applier.confirmed_lsn <= before
        assert await slot_lsn(src) <= before
        await lock.rollback()
    finally:
        await target.close()
    await second.catch_up(src)
    assert second.applier.confirmed_lsn >= after
    await compare(clusters)

    # A clean stop reports the last confirmed position to the slot.
    await second.stop()
    assert await slot_lsn(src) == second.applier.confirmed_lsn
    await src.execute(f"select pg_drop_replication_slot('{SLOT}')")


async def test_refused_transaction_stops_and_is_not_confirmed(clusters: Pair, src: asyncpg.Connection) -> None:
    await create_slot(clusters, "cdc_strict")
    running = await Running(clusters, "cdc_strict", "strict_pub").start()
    await src.execute("insert into strict.t values (1, 5)")
    ok = parse_lsn(await src.fetchval("select pg_current_wal_insert_lsn()::text"))
    await src.execute("insert into strict.t values (2, 500)")  # violates the target's check
    await src.execute("insert into strict.t values (3, 7)")
    with pytest.raises(ApplyFailed) as failed:
        await asyncio.wait_for(running.task, 20)
    assert "23514" in failed.value.reasons[0]  # check_violation
    assert 0 < running.applier.confirmed_lsn <= ok < failed.value.lsn
    await running.conn.close()
    assert await slot_lsn(src, "cdc_strict") <= ok
    # (The row behind the refused one may have been applied: pipelined, and harmless to apply twice.)
    assert (1,) in await fetch(clusters.new, "select id from strict.t")
    assert (2,) not in await fetch(clusters.new, "select id from strict.t")
    await src.execute("select pg_drop_replication_slot('cdc_strict')")


@pytest.mark.parametrize("replica", [True, False])
async def test_target_triggers_fire_only_without_the_replica_role(
    clusters: Pair, src: asyncpg.Connection, replica: bool
) -> None:
    slot = f"cdc_trig_{int(replica)}"
    await create_slot(clusters, slot)
    clusters.new.psql("truncate trig.log")
    running = await Running(clusters, slot, "trig_pub", replica=replica).start()
    try:
        await src.execute(f"insert into trig.t values ({10 + int(replica)}, 1)")
        async with asyncio.timeout(20):  # (polling the target database: no event to wait on)
            while running.applier.transactions_applied < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert (10 + int(replica),) in await fetch(clusters.new, "select id from trig.t")
        logged = await fetch(clusters.new, "select id from trig.log")
        assert logged == ([] if replica else [(10,)])
    finally:
        await running.stop()
        await src.execute(f"select pg_drop_replication_slot('{slot}')")


async def test_refused_batch_is_applied_again_one_by_one(clusters: Pair, src: asyncpg.Connection) -> None:
    """Two rows swap a unique value through a third: fine in source order, a unique violation as
    one net-change statement. The batch is applied again in order, and batching resumes."""
    await create_slot(clusters, "cdc_uniq")
    running = await Running(clusters, "cdc_uniq", "uniq_pub", replica=True).start()
    try:
        await src.execute("insert into uniq values (1, 'a'), (2, 'b')")
        await src.execute(
            "begin; update uniq set u = 'x' where id = 1; update uniq set u = 'a' where id = 2;"
            " update uniq set u = 'b' where id = 1; commit"
        )
        await src.execute("insert into uniq values (3, 'c')")
        async with asyncio.timeout(20):  # (polling the target database: no event to wait on)
            while running.applier.transactions_applied < 3:
                if running.task.done():
                    running.task.result()
                await asyncio.sleep(0.05)
        assert await fetch(clusters.new, "select id, u from uniq order by id") == [(1, "b"), (2, "a"), (3, "c")]
        assert running.applier.retried_exactly == 1
        await src.execute("update uniq set u = 'd' where id = 3")
        async with asyncio.timeout(20):
            while running.applier.transactions_applied < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert await fetch(clusters.new, "select u from uniq where id = 3") == [("d",)]
        assert running.applier._exact_until is None  # batching again
    finally:
        await running.stop()
        await src.execute("select pg_drop_replication_slot('cdc_uniq')")
