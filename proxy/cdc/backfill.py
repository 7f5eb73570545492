"""Backfill: copy tables from a source to a target under one snapshot, in primary-key chunks, resumably.

How it works:

* Every source connection reads under one snapshot: an exported one (``snapshot``, e.g. the one
  CREATE_REPLICATION_SLOT exported, so that the slot's stream starts exactly where the copy ends),
  or one exported here for the run (``snapshot=None``; its transaction stays open until the end).
* Each table is split into chunks of about ``chunk_rows`` rows by its primary key (any orderable
  key, one column or several): the boundaries come from keyset queries
  ``… WHERE key >= <lower> ORDER BY key OFFSET chunk_rows LIMIT 1``, so planning reads each key once.
  A table without a primary key is one chunk.
* Workers take chunks (largest tables first) from one queue: ``COPY (SELECT … WHERE <range> ORDER BY
  key) TO STDOUT`` on the source, its CopyData frames forwarded byte for byte into ``COPY … FROM
  STDIN`` on the target. Binary format when every column has the same type (same OID) on both
  sides, text otherwise (binary would not load: int4 data in an int8 column, or arrays and
  composites, whose binary form carries type OIDs). When the target's socket buffer is full, the
  source connection stops being read, so memory stays bounded whatever the table size.

Exactly once: the plan (every chunk and its bounds) is stored in the target's ``pgshift_backfill``
table before copying, and each chunk is copied and marked done there in ONE target transaction.
After a crash of anything, a chunk is therefore either complete and marked, or absent; a new run
skips the marked chunks and copies the others.

A new run after an interruption may use a NEW snapshot (the old one dies with its connection). The
chunk bounds stored by the first run are kept, so the ranges still tile the key space without
overlap; the chunks copied later simply hold newer rows than those copied before. That is
consistent once the change stream has been applied from the slot's position on: its idempotent
writes by primary key (insert-or-update, update, delete of what may be absent) replay every
change since the first snapshot over rows that are older or already newer, and end at the
source's state. The stream must be applied after the backfill (not during it): a row it inserted
into a range not yet copied would make that chunk's COPY fail on the primary key.

Triggers and foreign keys on the target are not disabled: tables are copied in parallel, so the
target should have its foreign keys added after the backfill (as pg_dump's post-data section does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.cdc.sqlconn import Endpoint, SqlConnection, SqlError, qualified, quote_ident, quote_literal
from proxy.errors import PgShiftError

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 4
DEFAULT_CHUNK_ROWS = 250_000  # a few chunks per worker for a big table: balance without much per-chunk cost
PROGRESS_TABLE = "pgshift_backfill"
APPLICATION_NAME = "pgshift-backfill"
# How often chunks still running report their bytes (progress between chunk ends).
PROGRESS_INTERVAL = 1.0

_PROGRESS_DDL = f"""
create table if not exists {PROGRESS_TABLE} (
  table_name text not null,  -- schema.name on the source
  chunk int not null,
  lower text,                -- JSON array of the key's values as text; NULL: from the start
  upper text,                -- exclusive; NULL: to the end
  rows bigint,
  bytes bigint,
  done_at timestamptz,       -- NULL until the chunk's rows are committed (in that same transaction)
  primary key (table_name, chunk))
"""

# Ordinary tables and partitioned roots (copying a root reads and writes its partitions, so
# partitions themselves are left out unless named), with what a copy needs.
_TABLES = """
select coalesce(json_agg(json_build_object(
  'schema', n.nspname, 'name', c.relname, 'reltuples', c.reltuples::bigint,
  'key', (select json_agg(json_build_object('name', a.attname, 'type', format_type(a.atttypid, a.atttypmod))
                          order by k.ord)
          from pg_index i cross join unnest(i.indkey) with ordinality k(attnum, ord)
          join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
          where i.indrelid = c.oid and i.indisprimary),
  'columns', (select coalesce(json_agg(json_build_object(
                 'name', a.attname, 'type', format_type(a.atttypid, a.atttypmod), 'oid', a.atttypid,
                 'generated', a.attgenerated <> '') order by a.attnum), '[]')
              from pg_attribute a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped)
) order by n.nspname, c.relname), '[]')
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relkind in ('r', 'p') and {where}
"""
_ALL_TABLES = """n.nspname not in ('pg_catalog', 'information_schema') and n.nspname !~ '^pg_(toast|temp_)'
  and not c.relispartition and c.relname !~ '^pgshift_'"""


class BackfillError(PgShiftError):
    """A backfill could not start (a table missing, a bad snapshot) or a chunk failed."""


@dataclass
class TableProgress:
    """Where one table's copy stands; handed to the progress callback (the same object, updated)."""

    table: str  # schema.name
    format: str  # "binary" or "text"
    chunks: int
    estimated_rows: int | None  # pg_class.reltuples on the source; None when never analyzed
    rows: int = 0  # committed in this run
    bytes: int = 0  # COPY payload committed in this run
    chunks_done: int = 0  # in this run
    chunks_skipped: int = 0  # done by an earlier run
    rows_before: int = 0  # rows of the skipped chunks
    in_flight_rows: int = 0  # forwarded in chunks not yet committed
    in_flight_bytes: int = 0
    started: float | None = None  # monotonic time of its first chunk in this run
    finished: float | None = None

    @property
    def done(self) -> bool:
        return self.chunks_done + self.chunks_skipped >= self.chunks

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.monotonic()) - self.started

    @property
    def rows_per_second(self) -> float:
        elapsed = self.elapsed
        return (self.rows + self.in_flight_rows) / elapsed if elapsed > 0 else 0.0

    @property
    def bytes_per_second(self) -> float:
        elapsed = self.elapsed
        return (self.bytes + self.in_flight_bytes) / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left, from the estimated row count and the rate so far (None: unknown)."""
        if self.done:
            return 0.0
        rate = self.rows_per_second
        if self.estimated_rows is None or rate <= 0:
            return None
        left = self.estimated_rows - self.rows_before - self.rows - self.in_flight_rows
        return max(left, 0) / rate

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "format": self.format,
            "rows": self.rows,
            "bytes": self.bytes,
            "estimated_rows": self.estimated_rows,
            "chunks": self.chunks,
            "chunks_done": self.chunks_done,
            "chunks_skipped": self.chunks_skipped,
            "elapsed": round(self.elapsed, 3),
            "rows_per_second": round(self.rows_per_second, 1),
            "bytes_per_second": round(self.bytes_per_second, 1),
            "eta": None if self.eta is None else round(self.eta, 1),
            "done": self.done,
        }


ProgressCallback = Callable[[TableProgress], None]


@dataclass
class BackfillReport:
    snapshot: str  # the snapshot every table was read under
    tables: list[TableProgress]
    elapsed: float

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tables)

    @property
    def chunks_done(self) -> int:
        return sum(t.chunks_done for t in self.tables)

    @property
    def chunks_skipped(self) -> int:
        return sum(t.chunks_skipped for t in self.tables)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot,
            "rows": self.rows,
            "bytes": self.bytes,
            "chunks_done": self.chunks_done,
            "chunks_skipped": self.chunks_skipped,
            "elapsed": round(self.elapsed, 3),
            "rows_per_second": round(self.rows_per_second, 1),
            "bytes_per_second": round(self.bytes_per_second, 1),
            "tables": [t.as_dict() for t in self.tables],
        }

    def lines(self) -> list[str]:
        """The summary for people: one line per table, then the totals."""
        out = []
        for t in self.tables:
            skipped = f", {t.chunks_skipped} done before" if t.chunks_skipped else ""
            out.append(
                f"{t.table}: {t.rows} rows, {_mb(t.bytes)} in {t.elapsed:.1f} s "
                f"({t.chunks_done}/{t.chunks} chunks{skipped}, {t.format})"
            )
        out.append(
            f"{len(self.tables)} table(s): {self.rows} rows, {_mb(self.bytes)} in {self.elapsed:.1f} s "
            f"({self.rows_per_second:,.0f} rows/s, {_mb(self.bytes_per_second)}/s)"
        )
        return out


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass
class _Table:
    name: str  # schema.name
    sql: str  # quoted
    key: list[dict[str, Any]]  # primary key columns: name, type
    columns: list[str]  # copied columns (generated ones are left to the target)
    binary: bool
    estimated: int | None


@dataclass(frozen=True)
class _Chunk:
    table: _Table
    number: int
    lower: list[str] | None
    upper: list[str] | None


@dataclass
class _Run:
    progress: dict[str, TableProgress]
    callback: ProgressCallback | None
    queue: asyncio.Queue[_Chunk] = field(default_factory=asyncio.Queue)

    def report(self, table: TableProgress) -> None:
        if self.callback is not None:
            self.callback(table)


async def backfill(
    source: Endpoint,
    target: Endpoint,
    snapshot: str | None,
    tables: list[str] | None = None,
    *,
    workers: int = DEFAULT_WORKERS,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: ProgressCallback | None = None,
) -> BackfillReport:
    """Copy ``tables`` (names as in SQL, resolved on the source; None: every table but pgshift's
    own) from source to target under ``snapshot`` (None: a snapshot taken now), skipping chunks
    an earlier run finished. ``progress`` is called with a table's TableProgress whenever it
    moves (chunk ends, and every PROGRESS_INTERVAL while chunks run). Raises BackfillError,
    SqlError or DatabaseUnreachable on failure; what was committed stays, and a new call resumes."""
    if workers < 1 or chunk_rows < 1:
        raise ValueError("workers and chunk_rows must be at least 1")
    started = time.monotonic()
    planner = await SqlConnection.connect(source, APPLICATION_NAME)
    try:
        if snapshot is None:
            # This transaction exports the snapshot and must stay open while others import it.
            await planner.query("begin isolation level repeatable read read only")
            rows = await planner.query("select pg_export_snapshot()")
            snapshot = str(rows[0][0])
        else:
            await _import_snapshot(planner, snapshot)
        await _session_settings(planner)
        plan = await _plan(planner, target, tables, chunk_rows)
        run = _Run(progress={}, callback=progress)
        todo: list[_Chunk] = []
        for table, chunks, done in plan:
            state = TableProgress(
                table.name, "binary" if table.binary else "text", len(chunks), table.estimated,
                chunks_skipped=len(done), rows_before=sum(done.values()),
            )  # fmt: skip
            run.progress[table.name] = state
            todo += [c for c in chunks if c.number not in done]
            run.report(state)
        # Largest tables first, so the long tail is not one big table copied alone at the end.
        todo.sort(key=lambda c: (-(c.table.estimated or 0), c.table.name, c.number))
        for chunk in todo:
            run.queue.put_nowait(chunk)
        count = min(workers, len(todo))
        if count:
            ticker = asyncio.create_task(_tick(run))
            try:
                async with asyncio.TaskGroup() as group:
                    for number in range(count):
                        group.create_task(_worker(run, source, target, snapshot, number))
            except BaseExceptionGroup as failed:
                # One failure stops the others (their open chunks roll back): report the first.
                first = failed.exceptions[0]
                raise first from None
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
    finally:
        await planner.close()
    return BackfillReport(snapshot, list(run.progress.values()), time.monotonic() - started)


async def _import_snapshot(conn: SqlConnection, snapshot: str) -> None:
    try:
        await conn.query(
            f"begin isolation level repeatable read read only; set transaction snapshot {quote_literal(snapshot)}"
        )
    except SqlError as exc:
        if exc.sqlstate in ("22023", "0A000"):  # invalid_parameter_value: gone or malformed
            raise BackfillError(
                f"cannot read under snapshot {snapshot!r}: {exc.message}",
                hint="An exported snapshot lives only while the connection (or transaction) that exported it "
                "stays open and idle; export a new one, or pass none to take one now.",
            ) from None
        raise


async def _session_settings(conn: SqlConnection) -> None:
    # Text-format COPY must mean the same on both sides, whatever the servers' defaults are.
    await conn.query("set datestyle = iso; set intervalstyle = postgres; set extra_float_digits = 3")


async def _catalog(conn: SqlConnection, names: list[str] | None) -> list[dict[str, Any]]:
    if names is None:
        where = _ALL_TABLES
    else:
        array = "array[" + ", ".join(quote_literal(n) for n in names) + "]::text[]"
        where = f"c.oid in (select to_regclass(x) from unnest({array}) x)"
    result: list[dict[str, Any]] = await conn.json(_TABLES.format(where=where))
    return result


async def _plan(
    src: SqlConnection, target: Endpoint, names: list[str] | None, chunk_rows: int
) -> list[tuple[_Table, list[_Chunk], dict[int, int]]]:
    """Per table: its chunks (stored bounds if an earlier run planned it, else new ones, stored
    now) and the chunks already done with their row counts."""
    source_tables = await _catalog(src, names)
    if names is not None and len(source_tables) < len(set(names)):
        missing = await src.json(
            "select coalesce(json_agg(x), '[]') from unnest(array["
            + ", ".join(quote_literal(n) for n in names)
            + "]::text[]) x where to_regclass(x) is null"
        )
        raise BackfillError(f"no such table on the source: {', '.join(missing) or ', '.join(names)}")
    qualified_names = [f"{quote_ident(t['schema'])}.{quote_ident(t['name'])}" for t in source_tables]
    async with await SqlConnection.connect(target, APPLICATION_NAME) as tgt:
        target_tables = {(t["schema"], t["name"]): t for t in await _catalog(tgt, qualified_names)}
        await tgt.query(_PROGRESS_DDL)
        plan: list[tuple[_Table, list[_Chunk], dict[int, int]]] = []
        for found in source_tables:
            table = _table(found, target_tables.get((found["schema"], found["name"])))
            chunks, done = await _stored_plan(tgt, table)
            if not chunks:
                chunks = await _new_plan(src, table, chunk_rows)
                values = ", ".join(
                    f"({quote_literal(table.name)}, {c.number}, {_bound_sql(c.lower)}, {_bound_sql(c.upper)})"
                    for c in chunks
                )
                await tgt.query(f"insert into {PROGRESS_TABLE} (table_name, chunk, lower, upper) values {values}")
            plan.append((table, chunks, done))
    return plan


def _table(source: dict[str, Any], target: dict[str, Any] | None) -> _Table:
    name = f"{source['schema']}.{source['name']}"
    if target is None:
        raise BackfillError(f"table {name} does not exist on the target", hint="Run pgshift sync check.")
    theirs = {c["name"]: c for c in target["columns"]}
    columns = [c for c in source["columns"] if not c["generated"]]
    missing = [c["name"] for c in columns if c["name"] not in theirs]
    if missing:
        raise BackfillError(f"table {name}: column(s) {', '.join(missing)} missing on the target")
    # Same type OID on both sides: built-in types always, user-defined ones only by chance.
    binary = all(c["oid"] == theirs[c["name"]]["oid"] and c["type"] == theirs[c["name"]]["type"] for c in columns)
    return _Table(
        name,
        qualified(source["schema"], source["name"]),
        source["key"] or [],
        [c["name"] for c in columns],
        binary,
        source["reltuples"] if source["reltuples"] >= 0 else None,
    )


async def _stored_plan(tgt: SqlConnection, table: _Table) -> tuple[list[_Chunk], dict[int, int]]:
    rows = await tgt.query(
        f"select chunk, lower, upper, rows, done_at is not null from {PROGRESS_TABLE} "
        f"where table_name = {quote_literal(table.name)} order by chunk"
    )
    chunks: list[_Chunk] = []
    done: dict[int, int] = {}
    for number, lower, upper, count, finished in rows:
        assert number is not None
        chunk = _Chunk(table, int(number), _bound(lower), _bound(upper))
        chunks.append(chunk)
        if finished == "t":
            done[chunk.number] = int(count or 0)
    return chunks, done


_INTEGER_KEYS = frozenset({"smallint", "integer", "bigint"})
MAX_CHUNKS = 100_000  # (a table's plan is one row per chunk in pgshift_backfill)


async def _new_plan(src: SqlConnection, table: _Table, chunk_rows: int) -> list[_Chunk]:
    if not table.key:
        return [_Chunk(table, 0, None, None)]
    if len(table.key) == 1 and table.key[0]["type"] in _INTEGER_KEYS:
        return await _integer_plan(src, table, chunk_rows)
    key_text = ", ".join(f"{quote_ident(k['name'])}::text" for k in table.key)
    order = ", ".join(quote_ident(k["name"]) for k in table.key)
    bounds: list[list[str] | None] = [None]
    while True:
        where = f"where {_compare(table, '>=', bounds[-1])} " if bounds[-1] is not None else ""
        rows = await src.query(
            f"select json_build_array({key_text}) from {table.sql} {where}order by {order} offset {chunk_rows} limit 1"
        )
        if not rows or rows[0][0] is None:
            break
        bounds.append(json.loads(rows[0][0]))
    bounds.append(None)
    return [_Chunk(table, n, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


async def _integer_plan(src: SqlConnection, table: _Table, chunk_rows: int) -> list[_Chunk]:
    """A single integer key: the range from its least to its greatest value (two index probes)
    cut into equal parts, about ``chunk_rows`` rows each if the keys are evenly spread. Counting
    rows with OFFSET, as for other keys, would read every key of the index before the first
    chunk starts; uneven keys only make uneven chunks."""
    key = quote_ident(table.key[0]["name"])
    low, high = (await src.query(f"select min({key})::text, max({key})::text from {table.sql}"))[0]
    if low is None or high is None:
        return [_Chunk(table, 0, None, None)]
    first, last = int(low), int(high)
    span = last - first + 1
    # The planner's estimate of the rows (a table never analyzed has none: then as if dense).
    rows = table.estimated if table.estimated else span
    parts = min(-(-rows // chunk_rows), span, MAX_CHUNKS)
    if parts <= 1:
        return [_Chunk(table, 0, None, None)]
    step = -(-span // parts)
    bounds: list[list[str] | None] = [None, *([str(v)] for v in range(first + step, last + 1, step)), None]
    return [_Chunk(table, n, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


def _bound(text: str | None) -> list[str] | None:
    return None if text is None else list(json.loads(text))


def _bound_sql(values: list[str] | None) -> str:
    return "null" if values is None else quote_literal(json.dumps(values))


def _compare(table: _Table, op: str, values: list[str]) -> str:
    """``(k1, k2) op (v1, v2)`` with the values cast to the key's types (row comparison: the
    btree order of a composite key)."""
    keys = ", ".join(quote_ident(k["name"]) for k in table.key)
    literals = ", ".join(f"{quote_literal(v)}::{k['type']}" for k, v in zip(table.key, values, strict=True))
    if len(table.key) == 1:
        return f"{keys} {op} {literals}"
    return f"({keys}) {op} ({literals})"


def _chunk_select(chunk: _Chunk) -> str:
    table = chunk.table
    columns = ", ".join(quote_ident(c) for c in table.columns)
    conditions = []
    if chunk.lower is not None:
        conditions.append(_compare(table, ">=", chunk.lower))
    if chunk.upper is not None:
        conditions.append(_compare(table, "<", chunk.upper))
    where = f" where {' and '.join(conditions)}" if conditions else ""
    # ORDER BY the key: rows land on the target in key order (a well-correlated heap and index).
    order = " order by " + ", ".join(quote_ident(k["name"]) for k in table.key) if table.key else ""
    return f"select {columns} from {table.sql}{where}{order}"


async def _tick(run: _Run) -> None:
    """Between chunk ends, report the tables whose chunks are moving."""
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        for state in run.progress.values():
            if state.in_flight_bytes and not state.done:
                run.report(state)


async def _worker(run: _Run, source: Endpoint, target: Endpoint, snapshot: str, number: int) -> None:
    src = await SqlConnection.connect(source, APPLICATION_NAME)
    try:
        await _import_snapshot(src, snapshot)
        await _session_settings(src)
        async with await SqlConnection.connect(target, APPLICATION_NAME) as tgt:
            await _session_settings(tgt)
            # Safe without a synchronous commit: a chunk's rows and its done mark commit together,
            # so a target crash loses both or neither, and the chunk is copied again.
            await tgt.query("set synchronous_commit = off")
            while True:
                try:
                    chunk = run.queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await _copy_chunk(run, src, tgt, chunk)
    finally:
        await src.close()


async def _copy_chunk(run: _Run, src: SqlConnection, tgt: SqlConnection, chunk: _Chunk) -> None:
    table = chunk.table
    state = run.progress[table.name]
    if state.started is None:
        state.started = time.monotonic()
    fmt = "binary" if table.binary else "text"
    columns = ", ".join(quote_ident(c) for c in table.columns)
    forwarded = [0, 0]  # bytes, frames

    def forward(frames: bytes, count: int) -> None:
        tgt.send_copy_data(frames)
        forwarded[0] += len(frames)
        forwarded[1] += count
        state.in_flight_bytes += len(frames)
        state.in_flight_rows += count

    def target_paused(paused: bool) -> None:
        # Backpressure: while the target's socket buffer is full, stop reading the source.
        if paused:
            src.pause_reading()
        else:
            src.resume_reading()

    await tgt.query("begin")
    await tgt.copy_in(f"copy {table.sql} ({columns}) from stdin (format {fmt})")
    tgt.on_write_paused = target_paused
    try:
        copied = await src.copy_out(f"copy ({_chunk_select(chunk)}) to stdout (format {fmt})", forward)
        loaded = await tgt.end_copy()
    finally:
        tgt.on_write_paused = None
        src.resume_reading()
        state.in_flight_bytes -= forwarded[0]
        state.in_flight_rows -= forwarded[1]
    if loaded != copied:
        raise BackfillError(f"{table.name} chunk {chunk.number}: {copied} rows read but {loaded} written")
    # The done mark commits with the rows. "done_at is null" makes a concurrent run that copied the
    # same chunk meanwhile roll this copy back instead of duplicating it.
    marked = await tgt.query(
        f"update {PROGRESS_TABLE} set rows = {copied}, bytes = {forwarded[0]}, done_at = clock_timestamp() "
        f"where table_name = {quote_literal(table.name)} and chunk = {chunk.number} and done_at is null "
        "returning chunk"
    )
    if not marked:
        await tgt.query("rollback")
        log.warning("%s chunk %d was copied by another run meanwhile; left as it was", table.name, chunk.number)
        state.chunks_skipped += 1
    else:
        await tgt.query("commit")
        state.rows += copied
        state.bytes += forwarded[0]
        state.chunks_done += 1
    if state.done:
        state.finished = time.monotonic()
    run.report(state)
