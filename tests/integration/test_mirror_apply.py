"""ApplyStream against real Postgres: the protocol facts it rests on (one Sync = one implicit
transaction, set_config(…, true) scope, COPY in the extended protocol), every write kind, row
images on awkward tables, divergences, ordering under pipelining, and a mirror that goes away."""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from proxy.config import parse_dsn
from proxy.localpg import LocalCluster
from proxy.mirror.apply import ApplyStream, Outcome, StreamState
from proxy.mirror.model import Image, ImageOp, Txn, Write, WriteKind

pytestmark = pytest.mark.timeout(60)

MIRROR_DB = "postgres"
PRIMARY_DB = "primary_db"  # same cluster, same schema: where row images are produced

SCHEMA = """
create schema other;
create table probe (tag text, xid xid8, sp text, tz text);
create table kinds (id int primary key, n numeric, t text, b bytea);
create table copied (id int primary key, t text);
create table rows_all (
    id serial primary key,
    ident int generated always as identity,
    doubled int generated always as (id * 2) stored,
    u uuid,
    ts timestamptz,
    n numeric,
    j jsonb,
    b bytea,
    arr text[],
    note text
);
create table pair (a int, b text, v numeric, primary key (a, b));
create table only_keys (a int, b int, primary key (a, b));
create table no_pk (code text unique, v int);
create table sp_target (id int primary key, v text);
create table other.sp_target (id int primary key, v text, extra int);
create table tz_probe (id int primary key, at timestamptz);
create table counter (id int primary key, log int[] not null default '{}', hits int not null default 0);
insert into counter values (1);
create table evolving (id int primary key, v text);
"""


@pytest.fixture(scope="module")
def mirror(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    cluster = make_cluster("apply")
    cluster.psql(f"create database {PRIMARY_DB}")
    for db in (MIRROR_DB, PRIMARY_DB):
        cluster.psql(SCHEMA, dbname=db)
    return cluster


_seq = itertools.count(1)

# Records which transaction ran it (xid) under which settings.
PROBE = (
    "INSERT INTO probe SELECT '{tag}', pg_current_xact_id(), current_setting('search_path'),"
    " current_setting('TimeZone')"
)


def make_txn(*writes: Write, settings: Sequence[tuple[str, str]] = ()) -> Txn:
    return Txn(seq=next(_seq), database=MIRROR_DB, session="test", settings=tuple(settings), writes=writes)


def query(sql: str, tag: str, *tables: str) -> Write:
    return Write(WriteKind.QUERY, sql, tag, "fp-" + sql[:20], tables)


def _frame(code: bytes, body: bytes) -> bytes:
    return code + struct.pack("!I", len(body) + 4) + body


def extended(
    sql: str, tag: str, params: Sequence[bytes | None], *, types: Sequence[int] = (), formats: Sequence[int] = ()
) -> Write:
    """The client's Parse and Bind frames of the unnamed statement, as a driver would send them."""
    parse = _frame(b"P", b"\0" + sql.encode() + b"\0" + struct.pack(f"!h{len(types)}I", len(types), *types))
    bind = b"\0\0" + struct.pack(f"!h{len(formats)}h", len(formats), *formats) + struct.pack("!h", len(params))
    for value in params:
        bind += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    bind += struct.pack("!h", 0)
    return Write(WriteKind.EXTENDED, sql, tag, "fp-ext", (), parse=parse, bind=_frame(b"B", bind))


def copy(sql: str, tag: str, chunks: Sequence[bytes]) -> Write:
    return Write(WriteKind.COPY, sql, tag, "fp-copy", (), copy_data=tuple(_frame(b"d", c) for c in chunks))


def image(op: ImageOp, table: str, rows: Sequence[str], tag: str, conflict: str | None = None) -> Write:
    img = Image(op, table, conflict, tuple(r.encode() for r in rows))
    return Write(WriteKind.IMAGE, f"-- {op.value} {table}", tag, "fp-img", (table,), image=img)


async def outcome(future: asyncio.Future[Outcome]) -> Outcome:
    return await asyncio.wait_for(future, 20)


async def fetch(cluster: LocalCluster, sql: str, *args: Any, db: str = MIRROR_DB) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(cluster.dsn(dbname=db))
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


def state_of(stream: ApplyStream) -> tuple[StreamState, float | None]:
    return stream.state, stream.down_since  # (a call: mypy would keep earlier narrowings of the attributes)


async def wait_for(condition: Callable[[], bool], seconds: float = 20) -> None:
    async with asyncio.timeout(seconds):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


@pytest.fixture
async def streams(mirror: LocalCluster) -> AsyncIterator[Callable[..., ApplyStream]]:
    """Factory: a running ApplyStream on ``mirror`` (or the given cluster); all stopped at the end."""
    started: list[tuple[ApplyStream, asyncio.Task[None]]] = []

    def start(cluster: LocalCluster = mirror, *, run: bool = True, **kwargs: Any) -> ApplyStream:
        stream = ApplyStream("m1", MIRROR_DB, parse_dsn(cluster.dsn()), user="postgres", password=None, **kwargs)
        if run:
            started.append((stream, asyncio.create_task(stream.run())))
        return stream

    yield start
    for stream, task in started:
        await stream.stop()
        await asyncio.wait_for(task, 5)
        stream.take_queued()


# --- protocol facts ---------------------------------------------------------------------------


async def test_one_sync_block_is_one_implicit_transaction(
    mirror: LocalCluster, streams: Callable[..., ApplyStream]
) -> None:
    stream = streams()
    first = make_txn(query(PROBE.format(tag="a1"), "INSERT 0 1"), query(PROBE.format(tag="a2"), "INSERT 0 1"))
    second = make_txn(query(PROBE.format(tag="b"), "INSERT 0 1"))
    results = await asyncio.gather(outcome(stream.submit(first)), outcome(stream.submit(second)))
    assert all(r.applied and not r.divergences for r in results)
    rows = {
        r["tag"]: r["xid"]
        for r in await fetch(mirror, "SELECT tag, xid::text FROM probe WHERE tag IN ('a1', 'a2', 'b')")
    }
    # Both statements of one block ran in one transaction (no BEGIN sent), committed at its Sync;
    # the next block is a transaction of its own.
    assert rows["a1"] == rows["a2"] != rows["b"]
    assert stream.applied == 2 and stream.last_applied_seq == second.seq and stream.queued == 0


async def test_set_config_local_lasts_until_the_sync(mirror: LocalCluster, streams: Callable[..., ApplyStream]) -> None:
    stream = streams()
    (default,) = await fetch(mirror, "SELECT current_setting('search_path') AS sp, current_setting('TimeZone') AS tz")
    settings = [("search_path", "other, public"), ("TimeZone", "Asia/Tokyo")]
    with_settings = make_txn(
        query(PROBE.format(tag="s1"), "INSERT 0 1"), query(PROBE.format(tag="s2"), "INSERT 0 1"), settings=settings
    )
    after = make_txn(query(PROBE.format(tag="s3"), "INSERT 0 1"))
    results = await asyncio.gather(outcome(stream.submit(with_settings)), outcome(stream.submit(after)))
    assert all(r.applied for r in results), results
    rows = {r["tag"]: (r["sp"], r["tz"]) for r in await fetch(mirror, "SELECT tag, sp, tz FROM probe")}
    # In force for every statement of the block, gone after its Sync (the next block, pipelined
    # behind it on the same connection, sees the defaults again).
    assert rows["s1"] == rows["s2"] == ("other, public", "Asia/Tokyo")
    assert rows["s3"] == (default["sp"], default["tz"])


async def test_a_failing_write_rolls_back_its_whole_txn(
    mirror: LocalCluster, streams: Callable[..., ApplyStream]
) -> None:
    seen: list[tuple[int, bool]] = []
    stream = streams(on_outcome=lambda txn, out: seen.append((txn.seq, out.applied)))
    bad = make_txn(
        query("INSERT INTO kinds (id, t) VALUES (100, 'before')", "INSERT 0 1", "kinds"),
        query("INSERT INTO kinds (id, t) VALUES (101, (1/0)::text)", "INSERT 0 1", "kinds"),
        query("INSERT INTO kinds (id, t) VALUES (102, 'after')", "INSERT 0 1", "kinds"),
    )
    good = make_txn(query("INSERT INTO kinds (id, t) VALUES (103, 'next')", "INSERT 0 1", "kinds"))
    bad_out, good_out = await asyncio.gather(outcome(stream.submit(bad)), outcome(stream.submit(good)))
    assert not bad_out.applied
    [div] = bad_out.divergences
    assert div.kind == "failed" and div.reason.startswith("mirror error 22012: division by zero")
    assert div.statement.startswith("INSERT INTO kinds (id, t) VALUES (101") and div.seq == bad.seq
    assert div.mirror == "m1" and div.database == MIRROR_DB and div.tables == ("kinds",)
    assert good_out.applied
    ids = [r["id"] for r in await fetch(mirror, "SELECT id FROM kinds WHERE id BETWEEN 100 AND 103 ORDER BY id")]
    assert ids == [103]  # 100 was rolled back with the failing statement; 102 was never run
    assert seen == [(bad.seq, False), (good.seq, True)]
    assert stream.failed == 1 and stream.applied == 1


async def test_copy_in_the_extended_protocol(mirror: LocalCluster, streams: Callable[..., ApplyStream]) -> None:
    stream = streams()
    # After CopyDone the server goes on with the next messages of the same block.
    ok = make_txn(
        copy("COPY copied (id, t) FROM STDIN", "COPY 3", [b"1\tone\n2\ttwo\n", b"3\tthree\n"]),
        query("UPDATE copied SET t = upper(t) WHERE id = 2", "UPDATE 1"),
    )
    # A bad row: error, everything up to the Sync discarded (the CopyData after it, the INSERT),
    # the rows before it rolled back with the whole block.
    bad = make_txn(
        query("INSERT INTO copied VALUES (10, 'x')", "INSERT 0 1"),
        copy("COPY copied (id, t) FROM STDIN", "COPY 2", [b"11\televen\n", b"twelve\t12\n", b"13\tx\n"]),
        query("INSERT INTO copied VALUES (14, 'y')", "INSERT 0 1"),
    )
    later = make_txn(copy("COPY copied FROM STDIN WITH (FORMAT csv)", "COPY 1", [b"20,csv\n"]))
    results = await asyncio.gather(*(outcome(stream.submit(t)) for t in (ok, bad, later)))
    assert [r.applied for r in results] == [True, False, True]
    [div] = results[1].divergences
    assert div.kind == "failed" and "22P02" in div.reason and div.statement.startswith("COPY copied")
    rows = await fetch(mirror, "SELECT id, t FROM copied ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, "one"), (2, "TWO"), (3, "three"), (20, "csv")]


# --- write kinds ------------------------------------------------------------------------------


async def test_extended_writes_with_binary_and_text_parameters(
    mirror: LocalCluster, streams: Callable[..., ApplyStream]
) -> None:
    stream = streams()
    sql = "INSERT INTO kinds (id, n, t, b) VALUES ($1, $2, $3, $4)"
    binary = extended(
        sql,
        "INSERT 0 1",
        [struct.pack("!i", 200), b"12.50", "héllo".encode(), b"\x00\xff\x10"],
        types=(23, 1700, 25, 17),
        formats=(1, 0, 0, 1),
    )
    text = extended(sql, "INSERT 0 1", [b"201", None, b"plain", b"\\x0102"])  # one format for all: text
    update = extended("UPDATE kinds SET n = n + $1 WHERE id = $2", "UPDATE 1", [b"1", b"200"], formats=(0,))
    results = await asyncio.gather(
        outcome(stream.submit(make_txn(binary, text))), outcome(stream.submit(make_txn(update)))
    )
    assert all(r.applied for r in results), results
    rows = await fetch(mirror, "SELECT id, n::text, t, b FROM kinds WHERE id IN (200, 201) ORDER BY id")
    assert [tuple(r) for r in rows] == [(200, "13.50", "héllo", b"\x00\xff\x10"), (201, None, "plain", b"\x01\x02")]


async def test_tag_mismatch_is_a_divergence(mirror: LocalCluster, streams: Callable[..., ApplyStream]) -> None:
    stream = streams()
    missing = make_txn(query("UPDATE kinds SET t = 'gone' WHERE id = 99999", "UPDATE 1", "kinds"))
    fine = make_txn(query("INSERT INTO kinds (id) VALUES (300)", "INSERT 0 1", "kinds"))
    first, second = await asyncio.gather(outcome(stream.submit(missing)), outcome(stream.submit(fine)))
    assert not first.applied and second.applied
    [div] = first.divergences
    assert div.kind == "diverged" and div.reason == "tag differs: primary UPDATE 1, mirror UPDATE 0"
    assert div.tables == ("kinds",) and div.fingerprint.startswith("fp-") and div.seq == missing.seq


# --- row images -------------------------------------------------------------------------------


async def primary_rows(cluster: LocalCluster, sql: str, *args: Any) -> list[str]:
    """Run a writing statement on the primary database; its rows as row_to_json text."""
    rows = await fetch(
        cluster, f"WITH w AS ({sql} RETURNING *) SELECT row_to_json(w)::text AS r FROM w", *args, db=PRIMARY_DB
    )
    return [r["r"] for r in rows]


async def same_table(cluster: LocalCluster, table: str, order: str) -> list[str]:
    sql = f"SELECT row_to_json(t)::text AS r FROM {table} t ORDER BY {order}"
    primary = [r["r"] for r in await fetch(cluster, sql, db=PRIMARY_DB)]
    mirrored = [r["r"] for r in await fetch(cluster, sql)]
    assert mirrored == primary
    return mirrored


async def test_row_images_on_awkward_columns(mirror: LocalCluster, streams: Callable[..., ApplyStream]) -> None:
    stream = streams()
    inserted = await primary_rows(
        mirror,
        "INSERT INTO rows_all (u, ts, n, j, b, arr, note) SELECT gen_random_uuid(), now() - g * interval '1 day',"
        " 1.0 / 3 + g, jsonb_build_object('g', g, 'nested', jsonb_build_array(g, 'x\"y')),"
        " int4send(g) || '\\x00ff'::bytea, ARRAY['a,b', NULL, 'quote\"'], E'line\\nbreak é'"
        " FROM generate_series(1, 3) g",
    )
    assert len(inserted) == 3
    out = await outcome(stream.submit(make_txn(image(ImageOp.INSERT, "rows_all", inserted, "INSERT 0 3"))))
    assert out.applied, out.divergences
    rows = await same_table(mirror, "rows_all", "id")
    assert '"doubled":2' in rows[0] and '"ident":1' in rows[0]  # generated on the mirror, identity kept

    upserted = await primary_rows(
        mirror,
        "INSERT INTO rows_all (id, note, n) VALUES (2, 'upserted', 7), (40, 'new', 8)"
        " ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.note, n = EXCLUDED.n",
    )
    updated = await primary_rows(
        mirror, "UPDATE rows_all SET j = j || '{\"u\": true}', arr = arr || 'z'::text WHERE id <> 2"
    )
    deleted = await primary_rows(mirror, "DELETE FROM rows_all WHERE id = 1")
    txn = make_txn(
        image(ImageOp.UPSERT, "rows_all", upserted, "INSERT 0 2"),
        image(ImageOp.UPDATE, "public.rows_all", updated, "UPDATE 3"),
        image(ImageOp.DELETE, "rows_all", deleted, "DELETE 1"),
        image(ImageOp.DELETE, "rows_all", [], "DELETE 0"),  # nothing to send
    )
    out = await outcome(stream.submit(txn))
    assert out.applied, out.divergences
    assert len(await same_table(mirror, "rows_all", "id")) == 3


async def test_row_images_composite_key_only_keys_and_no_key(
    mirror: LocalCluster, streams: Callable[..., ApplyStream]
) -> None:
    stream = streams()
    pairs = await primary_rows(mirror, "INSERT INTO pair VALUES (1, 'x', 1.5), (1, 'y', 2.5), (2, 'x', 3.5)")
    keys = await primary_rows(mirror, "INSERT INTO only_keys VALUES (1, 1), (2, 2)")
    no_pk = await primary_rows(mirror, "INSERT INTO no_pk VALUES ('c1', 1), ('c2', 2)")
    first = make_txn(
        image(ImageOp.INSERT, "pair", pairs, "INSERT 0 3"),
        image(ImageOp.INSERT, "only_keys", keys, "INSERT 0 2"),
        image(ImageOp.INSERT, "no_pk", no_pk, "INSERT 0 2"),
    )
    assert (await outcome(stream.submit(first))).applied
    pair_up = await primary_rows(mirror, "UPDATE pair SET v = v * 10 WHERE b = 'x'")
    pair_upsert = await primary_rows(
        mirror, "INSERT INTO pair VALUES (1, 'y', 0), (3, 'z', 9) ON CONFLICT (a, b) DO UPDATE SET v = EXCLUDED.v"
    )
    # Only key columns: the existing row comes back too, so the mirror must count it as well.
    keys_upsert = await primary_rows(
        mirror, "INSERT INTO only_keys VALUES (1, 1), (5, 5) ON CONFLICT (a, b) DO UPDATE SET a = EXCLUDED.a"
    )
    no_pk_upsert = await primary_rows(
        mirror, "INSERT INTO no_pk VALUES ('c1', 10), ('c3', 3) ON CONFLICT (code) DO UPDATE SET v = EXCLUDED.v"
    )
    second = make_txn(
        image(ImageOp.UPDATE, "pair", pair_up, "UPDATE 2"),
        image(ImageOp.UPSERT, "pair", pair_upsert, "INSERT 0 2"),
        image(ImageOp.UPSERT, "only_keys", keys_upsert, "INSERT 0 2"),
        image(ImageOp.UPSERT, "no_pk", no_pk_upsert, "INSERT 0 2", conflict="(code)"),
    )
    out = await outcome(stream.submit(second))
    assert out.applied, out.divergences
    await same_table(mirror, "pair", "a, b")
    await same_table(mirror, "only_keys", "a, b")
    await same_table(mirror, "no_pk", "code")

    # Without a primary key rows cannot be matched: nothing of the txn is sent.
    no_pk_update = make_txn(
        query("INSERT INTO kinds (id) VALUES (400)", "INSERT 0 1"),
        image(ImageOp.UPDATE, "no_pk", ['{"code":"c1","v":5}'], "UPDATE 1"),
    )
    no_target = make_txn(image(ImageOp.UPSERT, "no_pk", ['{"code":"c9","v":5}'], "INSERT 0 1"))
    missing = make_txn(image(ImageOp.INSERT, "nowhere", ['{"id":1}'], "INSERT 0 1"))
    results = await asyncio.gather(*(outcome(stream.submit(t)) for t in (no_pk_update, no_target, missing)))
    reasons = [[(d.kind, d.reason) for d in r.divergences] for r in results]
    assert reasons == [
        [("failed", "no primary key on the mirror: row images cannot be matched")],
        [("failed", reasons[1][0][1])],
        [("failed", "table nowhere does not exist on the mirror")],
    ]
    assert "no primary key" in reasons[1][0][1] and "ON CONFLICT" in reasons[1][0][1]
    assert not any(r.applied for r in results)
    assert await fetch(mirror, "SELECT 1 FROM kinds WHERE id = 400") == []


async def test_image_count_mismatch_diverges(mirror: LocalCluster, streams: Callable[..., ApplyStream]) -> None:
    stream = streams()
    rows = ['{"a":77,"b":"gone","v":1}']  # a row the mirror does not have
    out = await outcome(stream.submit(make_txn(image(ImageOp.UPDATE, "pair", rows, "UPDATE 1"))))
    assert [(d.kind, d.reason) for d in out.divergences] == [
        ("diverged", "tag differs: primary UPDATE 1, mirror UPDATE 0")
    ]


# --- settings and the catalog -------------------------------------------------------------------


async def test_settings_steer_writes_and_catalog(mirror: LocalCluster, streams: Callable[..., ApplyStream]) -> None:
    stream = streams()
    other = [("search_path", "other, public")]
    txns = [
        make_txn(query("INSERT INTO sp_target VALUES (1, 'q')", "INSERT 0 1"), settings=other),
        # The same table text means another table under another search_path: its own catalog entry.
        make_txn(image(ImageOp.INSERT, "sp_target", ['{"id":2,"v":"img","extra":5}'], "INSERT 0 1"), settings=other),
        make_txn(image(ImageOp.INSERT, "sp_target", ['{"id":3,"v":"pub","extra":6}'], "INSERT 0 1")),
        make_txn(
            query("INSERT INTO tz_probe VALUES (1, '2024-01-01 12:00')", "INSERT 0 1"),
            settings=[("TimeZone", "America/New_York")],
        ),
        make_txn(query("INSERT INTO tz_probe VALUES (2, '2024-01-01 12:00+00')", "INSERT 0 1")),
    ]
    results = await asyncio.gather(*(outcome(stream.submit(t)) for t in txns))
    assert all(r.applied for r in results), results
    assert [tuple(r) for r in await fetch(mirror, "SELECT id, v, extra FROM other.sp_target ORDER BY id")] == [
        (1, "q", None),
        (2, "img", 5),
    ]
    assert [tuple(r) for r in await fetch(mirror, "SELECT id, v FROM public.sp_target ORDER BY id")] == [(3, "pub")]
    at = {r["id"]: r["at"] for r in await fetch(mirror, "SELECT id, at FROM tz_probe")}
    assert at[1] == datetime(2024, 1, 1, 17, tzinfo=UTC)  # noon in New York
    assert at[2] == datetime(2024, 1, 1, 12, tzinfo=UTC)


async def test_ddl_refreshes_the_catalog(mirror: LocalCluster, streams: Callable[..., ApplyStream]) -> None:
    stream = streams()
    before = make_txn(image(ImageOp.INSERT, "evolving", ['{"id":1,"v":"a"}'], "INSERT 0 1"))
    ddl = make_txn(query("/* migrate */ ALTER TABLE evolving ADD COLUMN extra int", "ALTER TABLE"))
    after = make_txn(image(ImageOp.INSERT, "evolving", ['{"id":2,"v":"b","extra":42}'], "INSERT 0 1"))
    results = await asyncio.gather(*(outcome(stream.submit(t)) for t in (before, ddl, after)))
    assert all(r.applied for r in results), results
    assert [tuple(r) for r in await fetch(mirror, "SELECT id, v, extra FROM evolving ORDER BY id")] == [
        (1, "a", None),
        (2, "b", 42),
    ]


# --- ordering, loss, queue ----------------------------------------------------------------------


async def test_pipelined_txns_apply_in_order(mirror: LocalCluster, streams: Callable[..., ApplyStream]) -> None:
    futures: dict[int, asyncio.Future[Outcome]] = {}
    calls: list[tuple[int, bool]] = []

    def on_outcome(txn: Txn, out: Outcome) -> None:
        calls.append((txn.seq, futures[txn.seq].done()))

    stream = streams(max_in_flight=16, on_outcome=on_outcome)
    txns = [
        make_txn(query(f"UPDATE counter SET log = log || {i}, hits = hits + 1 WHERE id = 1", "UPDATE 1"))
        for i in range(200)
    ]
    for txn in txns:
        futures[txn.seq] = stream.submit(txn)
    assert stream.queued == 200 and stream.queued_bytes > 0
    results = await asyncio.gather(*(outcome(f) for f in futures.values()))
    assert all(r.applied for r in results)
    assert calls == [(t.seq, False) for t in txns]  # exactly once each, in order, before the future
    [row] = await fetch(mirror, "SELECT log, hits FROM counter WHERE id = 1")
    assert list(row["log"]) == list(range(200)) and row["hits"] == 200
    assert stream.queued == 0 and stream.queued_bytes == 0 and stream.lag_seconds == 0
    assert stream.last_applied_seq == txns[-1].seq


async def test_take_queued_and_stop(mirror: LocalCluster, streams: Callable[..., ApplyStream]) -> None:
    seen: list[Outcome] = []
    stream = streams(run=False, on_outcome=lambda txn, out: seen.append(out))
    txns = [make_txn(query(f"INSERT INTO kinds (id) VALUES ({500 + i})", "INSERT 0 1", "kinds")) for i in range(3)]
    futures = [stream.submit(t) for t in txns]
    assert stream.queued == 3 and stream.lag_seconds >= 0
    assert stream.take_queued() == txns
    for future in futures:
        out = future.result()
        assert not out.applied and [d.kind for d in out.divergences] == ["out_of_sync"]
    assert len(seen) == 3 and stream.queued == 0 and stream.queued_bytes == 0 and stream.failed == 0
    await stream.stop()
    assert stream.state is StreamState.STOPPED
    late = stream.submit(txns[0])  # after stop: kept unsent for the owner to take
    assert not late.done() and stream.take_queued() == [txns[0]] and late.done()


async def test_stop_drains_the_queue(mirror: LocalCluster) -> None:
    stream = ApplyStream("m1", MIRROR_DB, parse_dsn(mirror.dsn()), user="postgres", password=None)
    task = asyncio.create_task(stream.run())
    futures = [
        stream.submit(make_txn(query(f"INSERT INTO kinds (id) VALUES ({700 + i})", "INSERT 0 1"))) for i in range(20)
    ]
    await stream.stop(drain=10)
    await asyncio.wait_for(task, 5)
    assert all(f.done() and f.result().applied for f in futures)
    assert stream.state is StreamState.STOPPED and stream.queued == 0 and stream.applied == 20


async def test_a_txn_that_cannot_be_built_fails_alone(
    mirror: LocalCluster, streams: Callable[..., ApplyStream]
) -> None:
    stream = streams()
    txns = [
        make_txn(query("INSERT INTO kinds (id) VALUES (800)", "INSERT 0 1")),
        # A lone surrogate cannot be encoded: a bug upstream, contained to this txn.
        make_txn(query("INSERT INTO kinds (id) VALUES (801)", "INSERT 0 1"), query("SELECT '\udc80'", "SELECT 1")),
        make_txn(query("INSERT INTO kinds (id) VALUES (802)", "INSERT 0 1"), settings=[("no_such_setting", "1")]),
        make_txn(image(ImageOp.INSERT, "bad\udc80", ['{"id":1}'], "INSERT 0 1")),  # fails looking it up
        make_txn(query("INSERT INTO kinds (id) VALUES (803)", "INSERT 0 1")),
    ]
    results = await asyncio.gather(*(outcome(stream.submit(t)) for t in txns))
    assert [r.applied for r in results] == [True, False, False, False, True]
    assert "UnicodeEncodeError" in results[3].divergences[0].reason
    [built] = results[1].divergences
    assert built.kind == "failed" and "UnicodeEncodeError" in built.reason and built.seq == txns[1].seq
    [setting] = results[2].divergences
    assert setting.kind == "failed" and "42704" in setting.reason and "no_such_setting" in setting.reason
    ids = [r["id"] for r in await fetch(mirror, "SELECT id FROM kinds WHERE id BETWEEN 800 AND 803 ORDER BY id")]
    assert ids == [800, 803]


async def test_connection_lost_mid_txn_is_unknown_not_resent(
    mirror: LocalCluster, streams: Callable[..., ApplyStream]
) -> None:
    stream = streams()
    await wait_for(lambda: stream.state is StreamState.RUNNING)
    slow = make_txn(
        query("INSERT INTO kinds (id) VALUES (600)", "INSERT 0 1"), query("SELECT pg_sleep(30)", "SELECT 1")
    )
    behind = make_txn(query("INSERT INTO kinds (id) VALUES (601)", "INSERT 0 1"))
    slow_future, behind_future = stream.submit(slow), stream.submit(behind)
    ours = "FROM pg_stat_activity WHERE application_name = 'pgshift-mirror'"
    async with asyncio.timeout(10):
        while True:  # both blocks went out together; once the first sleeps, kill the connection
            if await fetch(mirror, f"SELECT 1 {ours} AND query LIKE 'SELECT pg_sleep%'"):
                break
            await asyncio.sleep(0.05)
    await fetch(mirror, f"SELECT pg_terminate_backend(pid) {ours}")
    for future in (slow_future, behind_future):
        out = await outcome(future)
        assert not out.applied
        assert [d.reason for d in out.divergences][-1].endswith("outcome unknown")
    # Later txns go out on a new connection; the lost ones are not replayed.
    after = await outcome(stream.submit(make_txn(query("INSERT INTO kinds (id) VALUES (602)", "INSERT 0 1"))))
    assert after.applied
    assert [r["id"] for r in await fetch(mirror, "SELECT id FROM kinds WHERE id BETWEEN 600 AND 602")] == [602]
    assert stream.state is StreamState.RUNNING and stream.down_since is None


@pytest.fixture(scope="module")
def flaky(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    cluster = make_cluster("apply-down")
    cluster.psql("create table seen (n int)")
    return cluster


async def test_mirror_down_then_back(flaky: LocalCluster, streams: Callable[..., ApplyStream]) -> None:
    stream = streams(flaky)
    assert (await outcome(stream.submit(make_txn(query("INSERT INTO seen VALUES (0)", "INSERT 0 1"))))).applied
    await asyncio.to_thread(flaky.stop)
    await wait_for(lambda: stream.state is StreamState.DOWN)
    down_since = stream.down_since
    assert down_since is not None and stream.last_error
    txns = [make_txn(query(f"INSERT INTO seen VALUES ({i})", "INSERT 0 1")) for i in range(1, 6)]
    futures = [stream.submit(t) for t in txns]
    await asyncio.sleep(0.5)  # a few failed reconnects
    assert state_of(stream) == (StreamState.DOWN, down_since)  # kept from the loss while retrying
    assert stream.queued == 5 and stream.lag_seconds >= 0.5 and "cannot connect" in stream.last_error
    await asyncio.to_thread(flaky.start)
    results = [await outcome(f) for f in futures]
    assert all(r.applied for r in results)
    assert state_of(stream) == (StreamState.RUNNING, None)
    assert [r["n"] for r in await fetch(flaky, "SELECT n FROM seen ORDER BY ctid")] == [0, 1, 2, 3, 4, 5]
