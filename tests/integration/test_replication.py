"""ReplicationConnection against real Postgres: exported snapshot + stream with no gap and no
duplicate, every change kind (TOAST left unchanged, key updates, full old rows, TRUNCATE),
confirmation moving confirmed_flush_lsn, restart from the slot, and the server's errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from proxy.cdc import replication as replication_module
from proxy.cdc.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    Relation,
    Truncate,
    TypeMessage,
    Update,
    Value,
    format_lsn,
    parse_lsn,
)
from proxy.cdc.replication import (
    ChangeEvent,
    PublicationNotFound,
    ReplicationConnection,
    ReplicationError,
    ReplicationNotConfigured,
    ReplicationPermissionDenied,
    SlotAlreadyExists,
    SlotInUse,
    SlotNotFound,
)
from proxy.config import parse_dsn
from proxy.errors import BackendUnavailable
from proxy.localpg import LocalCluster

pytestmark = pytest.mark.timeout(60)

SCHEMA = """
create table items (id int primary key, name text, big text, n int);
-- EXTERNAL: stored out of line without compression, so a large value really is TOASTed.
alter table items alter column big set storage external;
create type mood as enum ('ok', 'sad');
create table fulls (id int primary key, v text, m mood);
alter table fulls replica identity full;
create table unpublished (id serial primary key, pad text);
insert into items values (1, 'a', repeat('x', 100000), 0), (2, 'b', 'small', 0), (3, 'c', null, 0);
insert into fulls values (1, 'old', 'ok');
create publication cdc_pub for table items, fulls;
create role norepl login;
-- A walsender for this role asks for a reply after 0.5 s and hangs up after 1 s without one.
create role impatient login replication;
alter role impatient set wal_sender_timeout = '1s';
"""

BIG_INSERTED = b"y" * 50_000


@pytest.fixture(scope="module")
def source(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    cluster = make_cluster("cdc")
    cluster.psql(SCHEMA)
    return cluster


@pytest.fixture
async def db(source: LocalCluster) -> AsyncIterator[asyncpg.Connection]:
    """An ordinary SQL connection to the source."""
    conn = await asyncpg.connect(source.dsn())
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def replication(source: LocalCluster) -> AsyncIterator[Callable[..., Awaitable[ReplicationConnection]]]:
    """Factory of replication connections to ``source``; all closed at the end of the test."""
    opened: list[ReplicationConnection] = []

    async def connect(**kwargs: Any) -> ReplicationConnection:
        conn = await ReplicationConnection.connect(parse_dsn(source.dsn()), **kwargs)
        opened.append(conn)
        return conn

    try:
        yield connect
    finally:
        for conn in opened:
            await conn.close()


async def write(db: asyncpg.Connection, *statements: str) -> int:
    """Run ``statements`` in one transaction; return its 32-bit xid (what Begin carries)."""
    async with db.transaction():
        for sql in statements:
            await db.execute(sql)
        xid8 = int(await db.fetchval("select pg_current_xact_id()::text"))
    return xid8 & 0xFFFFFFFF


async def transactions(stream: ReplicationConnection, count: int, seconds: float = 10) -> list[list[ChangeEvent]]:
    """The next ``count`` transactions of the stream, each as its events from Begin to Commit."""
    txns: list[list[ChangeEvent]] = []
    current: list[ChangeEvent] = []
    async with asyncio.timeout(seconds):
        async for event in stream:
            current.append(event)
            if isinstance(event.message, Commit):
                txns.append(current)
                current = []
                if len(txns) == count:
                    break
    return txns


async def slot_state(db: asyncpg.Connection, slot: str) -> tuple[bool, str] | None:
    row = await db.fetchrow(
        "select active, confirmed_flush_lsn::text as lsn from pg_replication_slots where slot_name = $1", slot
    )
    return None if row is None else (row["active"], row["lsn"])


async def wait_until(check: Callable[[], Awaitable[bool]], seconds: float = 5) -> None:
    async with asyncio.timeout(seconds):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


def shape(txn: list[ChangeEvent], names: dict[int, str]) -> list[str]:
    """A transaction as message names, with the relation each change is about."""
    out = []
    for event in txn:
        msg = event.message
        relation = getattr(msg, "relation_id", None)
        out.append(type(msg).__name__ + (f"({names[relation]})" if relation is not None else ""))
    return out


async def test_snapshot_then_stream_confirm_and_restart(
    source: LocalCluster, db: asyncpg.Connection, replication: Callable[..., Awaitable[ReplicationConnection]]
) -> None:
    slot_name = "pgshift_cdc_main"
    conn = await replication()
    ident = await conn.identify_system()
    assert ident.systemid.isdigit()
    assert ident.timeline == 1
    assert ident.dbname == "postgres"
    assert ident.xlogpos > 0
    assert conn.server_version.startswith(("15", "16", "17", "18"))

    slot = await conn.create_slot(slot_name)
    assert slot.slot_name == slot_name
    assert slot.output_plugin == "pgoutput"
    assert slot.snapshot_name
    assert slot.consistent_lsn >= ident.xlogpos
    assert await slot_state(db, slot_name) == (False, format_lsn(slot.consistent_lsn))

    # Committed after the slot's consistent point: invisible to the snapshot, so it must stream.
    xids = [await write(db, f"insert into items values (4, 'd', repeat('y', {len(BIG_INSERTED)}), 0)")]

    # The backfill side: another connection reads under the exported snapshot.
    reader = await asyncpg.connect(source.dsn())
    try:
        async with reader.transaction(isolation="repeatable_read"):
            await reader.execute(f"set transaction snapshot '{slot.snapshot_name}'")
            seen = [r["id"] for r in await reader.fetch("select id from items order by id")]
    finally:
        await reader.close()
    assert seen == [1, 2, 3]

    xids.append(await write(db, "update items set n = n + 1 where id = 1"))  # big: TOASTed, unchanged
    xids.append(await write(db, "update items set id = 20 where id = 2"))  # key change: old key tuple
    xids.append(await write(db, "delete from items where id = 3", "update fulls set v = 'new' where id = 1"))
    await write(db, "insert into unpublished (pad) values ('not in the publication')")  # never streamed
    xids.append(await write(db, "truncate items restart identity"))

    await conn.start(slot_name, slot.consistent_lsn, ["cdc_pub"], status_interval=0.2)
    txns = await transactions(conn, 5)

    items_oid = await db.fetchval("select 'items'::regclass::oid")
    fulls_oid = await db.fetchval("select 'fulls'::regclass::oid")
    names = {items_oid: "items", fulls_oid: "fulls"}
    # pgoutput announces a relation before its first change on the connection (and again after
    # a relcache invalidation, as TRUNCATE's new relfilenode causes): drop identical repeats.
    announced: dict[int, Relation] = {}
    for txn in txns:
        for event in list(txn):
            msg = event.message
            if isinstance(msg, Relation):
                if announced.get(msg.relation_id) == msg:
                    txn.remove(event)
                announced[msg.relation_id] = msg
    assert [shape(t, names) for t in txns] == [
        ["Begin", "Relation(items)", "Insert(items)", "Commit"],
        ["Begin", "Update(items)", "Commit"],
        ["Begin", "Update(items)", "Commit"],
        ["Begin", "Delete(items)", "TypeMessage", "Relation(fulls)", "Update(fulls)", "Commit"],
        ["Begin", "Truncate", "Commit"],
    ]

    begins = [t[0].message for t in txns]
    commits = [t[-1] for t in txns]
    assert all(isinstance(b, Begin) for b in begins)
    assert [b.xid for b in begins if isinstance(b, Begin)] == xids
    for begin, commit in zip(begins, commits, strict=True):
        assert isinstance(begin, Begin)
        assert isinstance(commit.message, Commit)
        assert begin.final_lsn == commit.message.commit_lsn
        # A Commit's XLogData position is the end of its commit record: what to confirm.
        assert commit.lsn == commit.message.end_lsn > commit.message.commit_lsn
    ends = [c.lsn for c in commits]
    assert ends == sorted(ends)
    assert ends[0] > slot.consistent_lsn

    # The walsender sends no position with messages written ahead of a change.
    assert [e.lsn for t in txns for e in t if isinstance(e.message, Relation | TypeMessage)] == [0, 0, 0]
    rel = conn.relations.get(items_oid)
    assert (rel.namespace, rel.name, rel.replica_identity, rel.key_columns) == ("public", "items", "d", ("id",))
    assert [c.name for c in rel.columns] == ["id", "name", "big", "n"]
    assert [c.type_oid for c in rel.columns] == [23, 25, 25, 23]
    assert conn.relations.get(fulls_oid).replica_identity == "f"

    ins = txns[0][2].message
    assert isinstance(ins, Insert)
    assert conn.relations.row(items_oid, ins.new) == {"id": b"4", "name": b"d", "big": BIG_INSERTED, "n": b"0"}

    toast = txns[1][1].message
    assert isinstance(toast, Update)
    assert toast.old is None
    assert conn.relations.row(items_oid, toast.new) == {"id": b"1", "name": b"a", "big": UNCHANGED, "n": b"1"}

    key = txns[2][1].message
    assert isinstance(key, Update)
    assert key.old is not None
    assert key.old_kind == "K"
    assert conn.relations.row(items_oid, key.old) == {"id": b"2", "name": None, "big": None, "n": None}
    assert conn.relations.row(items_oid, key.new) == {"id": b"20", "name": b"b", "big": b"small", "n": b"0"}

    mood = txns[3][2].message
    assert isinstance(mood, TypeMessage)
    assert (mood.namespace, mood.name) == ("public", "mood")
    assert conn.relations.type(mood.type_oid) == mood
    assert conn.relations.get(fulls_oid).columns[2].type_oid == mood.type_oid
    delete, full = txns[3][1].message, txns[3][4].message
    assert isinstance(delete, Delete)
    assert delete.old_kind == "K"
    assert conn.relations.row(items_oid, delete.old) == {"id": b"3", "name": None, "big": None, "n": None}
    assert isinstance(full, Update)
    assert full.old is not None
    assert full.old_kind == "O"
    assert conn.relations.row(fulls_oid, full.old) == {"id": b"1", "v": b"old", "m": b"ok"}
    assert conn.relations.row(fulls_oid, full.new) == {"id": b"1", "v": b"new", "m": b"ok"}

    trunc = txns[4][-2].message
    assert isinstance(trunc, Truncate)
    assert trunc.relation_ids == (items_oid,)
    assert (trunc.restart_identity, trunc.cascade) == (True, False)

    # Confirm the first two transactions: the slot's confirmed_flush_lsn moves exactly there.
    confirmed = commits[1].lsn
    conn.confirm(confirmed)
    conn.confirm(commits[0].lsn)  # (never backwards)
    assert conn.confirmed_lsn == confirmed
    conn.send_status()

    async def moved() -> bool:
        return await slot_state(db, slot_name) == (True, format_lsn(confirmed))

    await wait_until(moved)
    await conn.stop()
    # stop() returns once the server left streaming: the slot is already free.
    assert await slot_state(db, slot_name) == (False, format_lsn(confirmed))
    assert not conn.streaming
    assert (await conn.identify_system()).systemid == ident.systemid  # back in command mode

    # Restart from the slot (0/0: its confirmed position): only the unconfirmed three come again.
    again = await replication(application_name="pgshift-test-restart")
    await again.start(slot_name, 0, ["cdc_pub"])
    replayed = await transactions(again, 3)
    assert [t[0].message.xid for t in replayed if isinstance(t[0].message, Begin)] == xids[2:]
    assert [t[-1].lsn for t in replayed] == ends[2:]
    # A fresh connection announces its relations again before using them.
    assert isinstance(replayed[0][1].message, Relation)

    await again.stop()
    await again.drop_slot(slot_name)
    assert await slot_state(db, slot_name) is None


async def test_server_errors_become_clear_errors(
    source: LocalCluster, db: asyncpg.Connection, replication: Callable[..., Awaitable[ReplicationConnection]]
) -> None:
    conn = await replication()
    await conn.create_slot("pgshift_cdc_errors", export_snapshot=False)

    with pytest.raises(SlotAlreadyExists, match='slot "pgshift_cdc_errors" already exists') as exists:
        await conn.create_slot("pgshift_cdc_errors")
    assert exists.value.sqlstate == "42710"
    with pytest.raises(SlotNotFound, match='"pgshift_cdc_nope" does not exist'):
        await conn.drop_slot("pgshift_cdc_nope")
    with pytest.raises(SlotNotFound):
        await conn.start("pgshift_cdc_nope", 0, ["cdc_pub"])
    with pytest.raises(ReplicationError, match="invalid replication slot name"):
        await conn.create_slot("Bad-Name")

    # A second consumer of a slot that is streaming.
    await conn.start("pgshift_cdc_errors", 0, ["cdc_pub"])
    other = await replication()
    with pytest.raises(SlotInUse, match="is active for PID") as in_use:
        await other.start("pgshift_cdc_errors", 0, ["cdc_pub"])
    assert in_use.value.hint is not None
    with pytest.raises(SlotInUse):
        await other.drop_slot("pgshift_cdc_errors", wait=False)
    with pytest.raises(ReplicationError, match="streaming; stop"):
        await conn.identify_system()
    await conn.stop()
    with pytest.raises(ReplicationError, match="this connection has streamed already"):
        await conn.start("pgshift_cdc_errors", 0, ["cdc_pub"])

    # A missing publication is noticed when the first change is decoded, inside the stream; the
    # walsender then returns to command mode and the connection stays usable.
    conn = await replication()
    await conn.start("pgshift_cdc_errors", 0, ["no_such_pub"])
    await write(db, "insert into items values (100, 'p', null, 0)")
    with pytest.raises(PublicationNotFound, match='publication "no_such_pub" does not exist') as missing:
        await transactions(conn, 1)
    assert missing.value.hint is not None
    assert not conn.streaming
    assert (await conn.identify_system()).dbname == "postgres"
    await conn.drop_slot("pgshift_cdc_errors")

    # No REPLICATION attribute: refused at login.
    with pytest.raises(ReplicationPermissionDenied) as denied:
        await replication(user="norepl")
    assert denied.value.hint is not None
    assert 'ALTER ROLE "norepl" REPLICATION' in denied.value.hint


async def test_temporary_slot_goes_with_its_connection(
    db: asyncpg.Connection, replication: Callable[..., Awaitable[ReplicationConnection]]
) -> None:
    conn = await replication()
    slot = await conn.create_slot("pgshift_cdc_temp", temporary=True, export_snapshot=False)
    assert slot.snapshot_name is None
    assert await slot_state(db, "pgshift_cdc_temp") is not None
    await conn.close()
    await conn.close()  # idempotent

    async def gone() -> bool:
        return await slot_state(db, "pgshift_cdc_temp") is None

    await wait_until(gone)


async def test_advance_when_idle_releases_wal_of_unpublished_changes(
    db: asyncpg.Connection, replication: Callable[..., Awaitable[ReplicationConnection]]
) -> None:
    conn = await replication()
    slot = await conn.create_slot("pgshift_cdc_idle", temporary=True, export_snapshot=False)
    await conn.start("pgshift_cdc_idle", 0, ["cdc_pub"], status_interval=0.1, advance_when_idle=True)
    # The same situation without the option: only confirmed positions, so the slot stays put.
    still = await replication()
    kept = await still.create_slot("pgshift_cdc_still", temporary=True, export_snapshot=False)
    await still.start("pgshift_cdc_still", 0, ["cdc_pub"], status_interval=0.1)
    for _ in range(3):
        await write(db, "insert into unpublished (pad) values (repeat('z', 1000))")
    # (insert, not write, position: the test cluster commits asynchronously)
    end = parse_lsn(await db.fetchval("select pg_current_wal_insert_lsn()::text"))

    async def advanced() -> bool:
        state = await slot_state(db, "pgshift_cdc_idle")
        return state is not None and parse_lsn(state[1]) >= end

    # Nothing was delivered, so nothing is unconfirmed: the slot follows the server's position.
    await wait_until(advanced)
    assert conn.confirmed_lsn == 0
    assert slot.consistent_lsn < end
    assert await slot_state(db, "pgshift_cdc_still") == (True, format_lsn(kept.consistent_lsn))


async def test_keepalives_asking_for_a_reply_are_answered_without_the_consumer(
    db: asyncpg.Connection, replication: Callable[..., Awaitable[ReplicationConnection]]
) -> None:
    conn = await replication(user="impatient")
    await conn.create_slot("pgshift_cdc_keepalive", temporary=True, export_snapshot=False)
    replies = 0
    send_status = conn.send_status

    def counting(*, reply_requested: bool = False) -> None:
        nonlocal replies
        replies += 1
        send_status(reply_requested=reply_requested)

    conn.send_status = counting  # type: ignore[method-assign]
    # No periodic updates within the test, and nobody iterating: only the keepalive replies
    # keep the walsender (wal_sender_timeout 1 s) from hanging up.
    await conn.start("pgshift_cdc_keepalive", 0, ["cdc_pub"], status_interval=60)
    await asyncio.sleep(2.2)
    assert replies >= 2
    assert conn.server_wal_end > 0
    xid = await write(db, "insert into items values (200, 'alive', null, 0)")
    [txn] = await transactions(conn, 1)
    assert isinstance(txn[0].message, Begin)
    assert txn[0].message.xid == xid


async def test_origin_and_logical_messages(
    db: asyncpg.Connection, replication: Callable[..., Awaitable[ReplicationConnection]]
) -> None:
    conn = await replication()
    await conn.create_slot("pgshift_cdc_origin", temporary=True, export_snapshot=False)
    await conn.start("pgshift_cdc_origin", 0, ["cdc_pub"], messages=True)
    await db.execute("select pg_replication_origin_create('pgshift_test_origin')")
    await db.execute("select pg_replication_origin_session_setup('pgshift_test_origin')")
    try:
        async with db.transaction():
            await db.execute("select pg_replication_origin_xact_setup('1/ABCDEF', now())")
            await db.execute("insert into items values (300, 'from elsewhere', null, 0)")
            await db.execute("select pg_logical_emit_message(true, 'pgshift', 'in the txn')")
    finally:
        await db.execute("select pg_replication_origin_session_reset()")
        await db.execute("select pg_replication_origin_drop('pgshift_test_origin')")
    await db.execute("select pg_logical_emit_message(false, 'pgshift', '\\x00ff'::bytea)")
    events: list[ChangeEvent] = []
    async with asyncio.timeout(10):
        async for event in conn:
            events.append(event)
            if isinstance(event.message, LogicalMessage) and not event.message.transactional:
                break
    messages = [e.message for e in events]
    assert [type(m).__name__ for m in messages] == [
        "Begin",
        "Origin",
        "Relation",
        "Insert",
        "LogicalMessage",
        "Commit",
        "LogicalMessage",  # non-transactional: outside any Begin/Commit, sent at once
    ]
    assert messages[1] == Origin(commit_lsn=parse_lsn("1/ABCDEF"), name="pgshift_test_origin")
    inside, outside = messages[4], messages[6]
    assert isinstance(inside, LogicalMessage)
    assert (inside.transactional, inside.prefix, inside.content) == (True, "pgshift", b"in the txn")
    assert isinstance(outside, LogicalMessage)
    assert (outside.transactional, outside.content) == (False, b"\x00\xff")
    assert outside.lsn > 0


async def test_a_slow_consumer_pauses_reading_and_loses_nothing(
    db: asyncpg.Connection,
    replication: Callable[..., Awaitable[ReplicationConnection]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replication_module, "QUEUE_HIGH_WATER", 20_000)
    monkeypatch.setattr(replication_module, "QUEUE_LOW_WATER", 5_000)
    conn = await replication()
    await conn.create_slot("pgshift_cdc_slow", temporary=True, export_snapshot=False)
    await conn.start("pgshift_cdc_slow", 0, ["cdc_pub"])
    await write(db, "insert into items select g, repeat('r', 200), null, g from generate_series(1000, 2999) g")
    paused = False
    inserted: list[Value] = []
    async with asyncio.timeout(10):
        async for event in conn:
            paused = paused or conn.reading_paused
            if isinstance(event.message, Insert):
                inserted.append(event.message.new.values[0])
                if len(inserted) % 500 == 0:
                    await asyncio.sleep(0.05)  # let the server fill our buffers
            if isinstance(event.message, Commit):
                break
    assert paused
    assert not conn.reading_paused
    assert inserted == [str(i).encode() for i in range(1000, 3000)]


async def test_a_terminated_walsender_ends_the_iteration_with_an_error(
    db: asyncpg.Connection, replication: Callable[..., Awaitable[ReplicationConnection]]
) -> None:
    conn = await replication(application_name="pgshift-test-victim")
    await conn.create_slot("pgshift_cdc_victim", temporary=True, export_snapshot=False)
    await conn.start("pgshift_cdc_victim", 0, ["cdc_pub"])
    await db.execute(
        "select pg_terminate_backend(pid) from pg_stat_replication where application_name = $1", "pgshift-test-victim"
    )
    with pytest.raises(ReplicationError, match="terminating connection due to administrator command") as info:
        await transactions(conn, 1)
    assert info.value.sqlstate == "57P01"
    with pytest.raises(StopAsyncIteration):
        await conn.__anext__()
    with pytest.raises(BackendUnavailable):
        await conn.identify_system()


async def test_close_ends_a_waiting_iteration(replication: Callable[..., Awaitable[ReplicationConnection]]) -> None:
    conn = await replication()
    await conn.create_slot("pgshift_cdc_close", temporary=True, export_snapshot=False)
    await conn.start("pgshift_cdc_close", 0, ["cdc_pub"])

    async def consume() -> int:
        return len([event async for event in conn])

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    await conn.close()
    assert await asyncio.wait_for(consumer, 5) == 0


async def test_wal_level_replica_is_reported(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster("cdc-replica", settings={"wal_level": "replica"})
    conn = await ReplicationConnection.connect(parse_dsn(cluster.dsn()))
    try:
        with pytest.raises(ReplicationNotConfigured, match="wal_level") as info:
            await conn.create_slot("pgshift_cdc_walllevel")
        assert info.value.hint is not None
        assert "wal_level = logical" in info.value.hint
    finally:
        await conn.close()
        cluster.destroy()


async def test_source_shutdown_ends_the_stream_with_an_error(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster("cdc-shutdown")
    try:
        cluster.psql("create table t (id int primary key); create publication p for table t")
        conn = await ReplicationConnection.connect(parse_dsn(cluster.dsn()))
        await conn.create_slot("pgshift_cdc_shutdown", export_snapshot=False)
        await conn.start("pgshift_cdc_shutdown", 0, ["p"], status_interval=60)
        # A fast shutdown waits for the walsender, which waits until we reported receiving
        # everything it sent (our keepalive reply does), then ends COPY with CommandComplete.
        stopping = asyncio.get_running_loop().run_in_executor(None, cluster.stop)
        with pytest.raises(ReplicationError, match="ended the replication stream"):
            await transactions(conn, 1)
        await asyncio.wait_for(stopping, 30)
        await conn.close()
    finally:
        cluster.destroy()
