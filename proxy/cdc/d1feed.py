"""The D1 feed (issue 8): a store's reference tables copied into Cloudflare D1, then kept in step
with the source through a logical replication slot.

``pgshift d1 sync --store NAME`` runs ``D1Feed``:

1. Prerequisites, before anything is created: the store's tables exist on the source (its
   ``source`` backend, else routing.primary) with primary keys and the default (or FULL) replica
   identity; the source writes dates as ISO (DateStyle); D1's tables match what ``pgshift d1
   schema`` derives (else the error lists each difference and names ``pgshift d1 schema --apply``).
2. On the source, publication ``pgshift_d1_<store>`` FOR TABLE the store's tables, and logical slot
   ``pgshift_d1_<store>`` (pgoutput) created with an exported snapshot.
3. The backfill under that snapshot: per table ``COPY (SELECT … ORDER BY pk) TO STDOUT`` (text),
   rows decoded from COPY's text format and upserted in batches (``D1Writer``); then the keys D1
   held that the snapshot does not hold are deleted (rows of an earlier feed whose deletes no slot
   kept). Progress: rows and rows/s per table.
4. The stream from the slot: each source transaction becomes ``Change`` items (upserts, deletes,
   patches for updates that left TOASTed columns out, moves for such updates that changed the key,
   ``DELETE FROM t`` for a truncate); the transactions that arrive while a request is in flight are
   sent together as one D1 batch request (one D1 transaction when it fits one request). A commit's
   ``end_lsn`` is confirmed to the slot only after D1 accepted the request that held it, in commit
   order. Transient D1 failures are retried (by the client, then here, every few seconds, without
   confirming anything meanwhile); a permanent one (SQL refused, a value D1 cannot hold) stops the
   feed naming the statement and the LSN, confirming nothing from that transaction on.

State, and why it lives in D1. The slot (on the source) holds the stream position. Whether the
backfill finished is recorded in D1 itself, in the table ``_pgshift_feed`` (one row per slot:
phase ``backfill`` or ``streaming``): the record describes what D1 holds, so it lives with it and
follows it — a D1 database replaced by an empty one has no record, and the feed copies again
instead of streaming into emptiness; a local state file could not know that (and is lost with
the machine), and a table on the source would put pgshift's bookkeeping into the application's
database (the feed otherwise only adds a publication and a slot there). It also lets
``d1 status`` run from any machine. The record is set to ``backfill`` *before* a slot is created,
and to ``streaming`` only once every table is copied, so a crash before the copy completed is always
seen as an unfinished backfill.

Restart semantics. A run that finds the slot streams from its confirmed position (the server never
goes back further). If the record does not say ``streaming``, the backfill runs again first, under
a new snapshot of its own (REPEATABLE READ on the copying connection), newer than the slot's
position P. This converges: every change the source committed after P is still in the slot and is
replayed in commit order after the copy; each is idempotent by primary key (upsert of the whole row,
delete by key, patch of the columns it carries), so for every key the last change after P decides
its final value, and a key with no change after P keeps the copy's value, which is its current one.
(A patch leaves out only columns its update did not change: their current value comes from the last
replayed change that did change them, which carried it, or, if none is after P, from the copy.)
Rows deleted on the source meanwhile are either not in the new snapshot (the sweep removes them)
or deleted again by the replayed delete. Rows that briefly go back to an older version while the
replay catches up are corrected by the later changes of the same replay.

Stop (``d1 stop``) drops the slot and the publication and forgets the record. A failed start (any
error before streaming began, in a run that created the slot) drops the slot and publication it
created, so nothing is left retaining WAL; an interruption (Ctrl-C, SIGTERM) during the copy keeps
them, and the next run copies again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from proxy.cdc.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    Relation,
    Truncate,
    TupleData,
    Update,
    Value,
    format_lsn,
)
from proxy.cdc.replication import ReplicationConnection
from proxy.cdc.sqlconn import DatabaseUnreachable, Endpoint, SqlConnection, qualified, quote_ident, quote_literal
from proxy.cdc.sync import StopResult, drop_slot_and_publication, publication_exists, release_slot, slot_info
from proxy.d1.client import D1Client, D1Error, D1SqlError, D1Unavailable, Param, Statement
from proxy.d1.schema import D1Table, differences, read_pg_tables, split_name, to_d1
from proxy.d1.types import D1TypeError
from proxy.d1.types import quote_ident as d1_ident
from proxy.d1.writes import Change, D1Writer, Row, change_statements, read_all_keys
from proxy.errors import PgShiftError

log = logging.getLogger(__name__)

STATE_TABLE = "_pgshift_feed"  # in D1: one row per slot
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # stopped during the copy: run again (the copy starts over)

BACKFILL_BATCH_ROWS = 2000  # rows per upsert call during the copy (one or a few D1 requests)
GROUP_MAX_CHANGES = 5000  # changes of queued transactions sent together in one go
MAX_PENDING_CHANGES = 50_000  # queued changes above which the stream is not read
STATUS_INTERVAL = 5.0
ACTIVE_WAIT = 10.0  # how long a start waits for a dying walsender (a killed feed's) to let the slot go
DRAIN_TIMEOUT = 10.0  # on stop, queued transactions get this long to reach D1
RETRY_MAX_DELAY = 60.0  # D1 unavailable: retried every 2, 4, … up to this many seconds
_PROBE_TABLE = "_pgshift_no_such_table"  # a statement that fails: ends a probe batch unapplied


class FeedError(PgShiftError):
    """The feed cannot start, or stopped on an error."""


def feed_name(store: str) -> str:
    """The slot's and the publication's name for a store: ``pgshift_d1_<store>`` (lower-case
    letters, digits and underscores: what a slot name allows)."""
    return ("pgshift_d1_" + re.sub(r"[^a-z0-9_]", "_", store.lower()))[:63]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- COPY text format ---------------------------------------------------------------------------

_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)
_SIMPLE_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_U32 = struct.Struct("!I")


def _unescape(match: re.Match[bytes]) -> bytes:
    octal, hexa, char = match.groups()
    if octal is not None:
        return bytes((int(octal, 8) & 0xFF,))
    if hexa is not None:
        return bytes((int(hexa, 16),))
    return _SIMPLE_ESCAPES.get(char, char)


def decode_copy_field(field: bytes) -> str | None:
    """One field of a COPY text row → its text (None for ``\\N``). Postgres' rules (COPY, "Text
    Format"): ``\\b \\f \\n \\r \\t \\v``, ``\\digits`` (1-3 octal), ``\\xdigits`` (1-2 hex), and a
    backslash before any other character stands for that character (``\\\\`` for a backslash).
    Escapes make bytes; the field is UTF-8 (the connection's client_encoding) once unescaped."""
    if field == b"\\N":
        return None
    if b"\\" in field:
        field = _ESCAPE.sub(_unescape, field)
    return field.decode()


def decode_copy_line(line: bytes) -> list[str | None]:
    """One COPY text row (without its newline) → its values."""
    return [decode_copy_field(f) for f in line.split(b"\t")]


class CopyRows:
    """Receives the CopyData frames of a ``COPY … TO STDOUT`` (text) as ``SqlConnection.copy_out``
    forwards them (whole frames or cut anywhere), and keeps the decoded rows until ``take``. Reading
    the connection pauses while more than ``high`` rows wait."""

    def __init__(self, conn: SqlConnection, columns: int, high: int) -> None:
        self.conn = conn
        self.columns = columns
        self.high = high
        self.rows: deque[list[str | None]] = deque()
        self.total = 0
        self._frames = b""  # the start of a frame cut by the end of a chunk
        self._line = b""  # the start of a row cut between frames
        self._paused = False
        self._changed = asyncio.Event()
        self.error: Exception | None = None

    def feed(self, data: bytes, count: int) -> None:
        """The CopyForward callback (runs in the receive callback: must not block)."""
        if self.error is not None:
            return
        try:
            self._feed(data)
        except Exception as exc:  # (bad text: reported by take(), not in the receive callback)
            self.error = exc
        self._changed.set()

    def _feed(self, data: bytes) -> None:
        buf = self._frames + data if self._frames else data
        n = len(buf)
        pos = 0
        payloads = []
        while n - pos >= 5:
            end = pos + 1 + _U32.unpack_from(buf, pos + 1)[0]
            if end > n:
                break
            payloads.append(buf[pos + 5 : end])
            pos = end
        self._frames = buf[pos:]
        if not payloads:
            return
        text = self._line + b"".join(payloads)
        lines = text.split(b"\n")
        self._line = lines.pop()
        for line in lines:
            row = decode_copy_line(line)
            if len(row) != self.columns:
                raise FeedError(f"a COPY row has {len(row)} fields for {self.columns} columns")
            self.rows.append(row)
        self.total += len(lines)
        if len(self.rows) > self.high and not self._paused:
            self._paused = True
            self.conn.pause_reading()

    async def take(self, n: int, copy: asyncio.Future[Any]) -> list[list[str | None]]:
        """Up to ``n`` rows, waiting for ``n`` unless the COPY has ended ([]: it ended, all taken)."""
        while len(self.rows) < n and not copy.done() and self.error is None:
            self._changed.clear()
            waiter = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({waiter, copy}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        if self.error is not None:
            raise self.error
        out = [self.rows.popleft() for _ in range(min(n, len(self.rows)))]
        if self._paused and len(self.rows) <= self.high // 2:
            self._paused = False
            self.conn.resume_reading()
        return out


# --- progress and results -----------------------------------------------------------------------


@dataclass
class TableProgress:
    table: str  # the D1 table
    source: str  # schema.table on the source
    rows: int = 0
    deleted: int = 0  # keys D1 held that the snapshot does not
    seconds: float = 0.0
    done: bool = False

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        state = "done" if self.done else "copying"
        gone = f", {self.deleted:,} stale row(s) deleted" if self.deleted else ""
        return (
            f"backfill {self.source} -> D1 {self.table}: {self.rows:,} rows in {self.seconds:.1f} s "
            f"({self.rows_per_second:,.0f} rows/s){gone}, {state}"
        )


@dataclass
class FeedStats:
    transactions: int = 0  # source transactions with changes for D1, applied
    changes: int = 0  # row changes applied
    requests: int = 0  # groups sent to D1
    confirmed_lsn: int = 0
    pending: int = 0  # transactions received, not yet applied
    last_apply: float | None = None  # monotonic time of the last applied group

    def as_dict(self) -> dict[str, Any]:
        return {
            "transactions": self.transactions,
            "changes": self.changes,
            "requests": self.requests,
            "confirmed_lsn": format_lsn(self.confirmed_lsn),
            "pending": self.pending,
        }


@dataclass
class FeedResult:
    exit_code: int = EXIT_OK
    error: str | None = None
    hint: str | None = None
    messages: list[str] = field(default_factory=list)
    backfill: list[TableProgress] = field(default_factory=list)
    streamed: bool = False
    stats: FeedStats = field(default_factory=FeedStats)

    def as_dict(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "error": self.error,
            "hint": self.hint,
            "messages": self.messages,
            "backfill": [
                {
                    "table": t.table,
                    "source": t.source,
                    "rows": t.rows,
                    "deleted": t.deleted,
                    "seconds": round(t.seconds, 3),
                    "rows_per_second": round(t.rows_per_second),
                    "done": t.done,
                }
                for t in self.backfill
            ],
            "streamed": self.streamed,
            "stats": self.stats.as_dict(),
        }


# --- the source and D1's record -------------------------------------------------------------------


_STATE_DDL = (
    f"CREATE TABLE IF NOT EXISTS {d1_ident(STATE_TABLE)} (slot TEXT PRIMARY KEY, store TEXT NOT NULL, "
    "source TEXT NOT NULL, tables TEXT NOT NULL, phase TEXT NOT NULL, started_at TEXT NOT NULL, "
    "backfilled_at TEXT, backfill_rows INTEGER, updated_at TEXT NOT NULL) STRICT"
)


async def read_record(client: D1Client, slot: str) -> dict[str, Any] | None:
    """The feed's record in D1 (None: none, or no record table)."""
    found = await client.query(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?", [STATE_TABLE]
    )  # (a missing table is not an error: the feed never ran against this database)
    if not found.results:
        return None
    result = await client.query(f"SELECT * FROM {d1_ident(STATE_TABLE)} WHERE slot = ?", [slot])
    return result.results[0] if result.results else None


async def _forget_record(client: D1Client, slot: str) -> None:
    if await read_record(client, slot) is not None:
        await client.query(f"DELETE FROM {d1_ident(STATE_TABLE)} WHERE slot = ?", [slot])


def _source_name(table: D1Table) -> str:
    schema, name = split_name(table.source)
    return qualified(schema, name)


# --- the feed -------------------------------------------------------------------------------------


@dataclass
class FeedOptions:
    batch_rows: int = BACKFILL_BATCH_ROWS
    group_max_changes: int = GROUP_MAX_CHANGES
    status_interval: float = STATUS_INTERVAL
    drain_timeout: float = DRAIN_TIMEOUT


@dataclass
class _Target:
    """A relation of the stream mapped onto its D1 table."""

    table: D1Table
    positions: tuple[int, ...]  # per D1 column: its index in the relation's tuples
    keys: tuple[int, ...]  # per key column (key order): its index in the relation's tuples


@dataclass
class _Txn:
    end_lsn: int
    changes: list[Change]


def _text(value: Value) -> str | None:
    if value is None:
        return None
    assert isinstance(value, bytes)
    return value.decode()


class D1Feed:
    """One store's feed: see the module docstring. ``say`` gets the lines for people (stderr);
    ``progress`` each table's backfill progress (at most once per second per table, and when done)."""

    def __init__(
        self,
        store: str,
        tables: Sequence[str],
        source: Endpoint,
        client: D1Client,
        options: FeedOptions | None = None,
        *,
        say: Callable[[str], None] | None = None,
        progress: Callable[[TableProgress], None] | None = None,
    ) -> None:
        self.store = store
        self.table_names = list(tables)
        self.source = source
        self.client = client
        self.options = options or FeedOptions()
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.progress = progress or (lambda table: self.say(table.line()))
        self.name = feed_name(store)  # the slot's and the publication's
        self.writer = D1Writer(client)
        self.stop_requested = asyncio.Event()
        self.phase = "check"  # check, backfill, streaming, stopped, failed
        self.result = FeedResult()
        self.tables: list[D1Table] = []
        self._by_source: dict[str, D1Table] = {}
        self._targets: dict[int, _Target | None] = {}
        self._pending: deque[_Txn] = deque()
        self._pending_changes = 0
        self._changed = asyncio.Event()  # a transaction was queued, or the reader ended
        self._drained = asyncio.Event()  # the writer took transactions off the queue
        self._draining = False
        self._repl: ReplicationConnection | None = None

    def request_stop(self) -> None:
        self.stop_requested.set()

    @property
    def stats(self) -> FeedStats:
        return self.result.stats

    # --- the run --------------------------------------------------------------------------------

    async def run(self) -> FeedResult:
        result = self.result
        try:
            conn = await SqlConnection.connect(self.source, application_name="pgshift-d1")
        except BaseException:
            self.phase = "failed"
            raise
        created_slot = created_publication = False
        fresh: bool | None = None  # (None: not known yet)
        repl: ReplicationConnection | None = None
        try:
            await self._check(conn)
            await self.client.query(_STATE_DDL)
            slot = await self._wait_inactive(conn)
            if slot is not None and slot["active"]:
                raise FeedError(
                    f'slot "{self.name}" is in use by process {slot["active_pid"]} on the source: a feed of store '
                    f'"{self.store}" is running already (stop it first, or `pgshift d1 stop --force`)'
                )
            if slot is not None and slot["plugin"] != "pgoutput":
                raise FeedError(f'slot "{self.name}" exists with plugin {slot["plugin"]}, not pgoutput')
            fresh = slot is None
            record = None if fresh else await read_record(self.client, self.name)
            created_publication = await self._publication(conn)
            repl = await ReplicationConnection.connect(
                self.source.address, user=self.source.user, database=self.source.database,
                password=self.source.password, application_name="pgshift-d1", source=self.source.backend,
            )  # fmt: skip
            self._repl = repl
            snapshot: str | None = None
            backfill = fresh or record is None or record.get("phase") != "streaming"
            if backfill:
                # Recorded before the slot exists: a crash from here on is an unfinished backfill.
                await self._record("backfill", started=True)
            if fresh:
                created = await repl.create_slot(self.name)
                created_slot = True
                snapshot = created.snapshot_name
                self.say(f'created replication slot "{self.name}" at {format_lsn(created.consistent_lsn)}')
            elif backfill:
                self.say(
                    f'resuming: slot "{self.name}" exists (confirmed {slot["confirmed_flush_lsn"] if slot else "?"}) '
                    "but the backfill had not finished: copying again under a new snapshot, then replaying the "
                    "slot's changes"
                )
            else:
                self.say(
                    f'resuming: slot "{self.name}" exists (confirmed {slot["confirmed_flush_lsn"] if slot else "?"})'
                )
            if backfill:
                self.phase = "backfill"
                copy = asyncio.ensure_future(self._backfill(conn, snapshot))
                if not await self._until_stopped(copy):
                    self.phase = "stopped"
                    result.exit_code = EXIT_INTERRUPTED
                    result.messages.append(
                        f'interrupted during the backfill: the slot and publication "{self.name}" stay; run '
                        "`pgshift d1 sync` again (the copy starts over) or `pgshift d1 stop` to drop them"
                    )
                    return result
                rows = sum(t.rows for t in result.backfill)
                await self._record("streaming", backfill_rows=rows)
            await conn.close()
            await self._stream(repl)
            return result
        except BaseException as exc:
            self.phase = "failed"
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
                raise  # (abandoned: like a crash, what exists stays; a restart resumes)
            error = exc.message if isinstance(exc, PgShiftError) else f"{type(exc).__name__}: {exc}"
            result.error = error
            result.hint = exc.hint if isinstance(exc, PgShiftError) else None
            result.exit_code = EXIT_FAILED
            if isinstance(exc, DatabaseUnreachable) or (isinstance(exc, D1Error) and not isinstance(exc, D1SqlError)):
                result.exit_code = exc.exit_code  # (3: unreachable; 4: D1 refused the token or database)
            if repl is not None:
                with contextlib.suppress(Exception):
                    await repl.close()
                repl = None
            if not result.streamed and (created_slot or created_publication):
                await self._undo(created_slot, created_publication)
            elif result.streamed or fresh is False:
                result.messages.append(
                    f'the slot and publication "{self.name}" stay: fix the cause and run `pgshift d1 sync` again to '
                    "resume (unconfirmed transactions are sent again), or `pgshift d1 stop` to drop them"
                )
            else:
                result.messages.append("nothing was created on the source")
            if isinstance(exc, PgShiftError | OSError):
                return result
            raise
        finally:
            if repl is not None:
                with contextlib.suppress(Exception):
                    await repl.close()
            with contextlib.suppress(Exception):
                await conn.close()

    async def _until_stopped(self, work: asyncio.Future[Any]) -> bool:
        """Wait for ``work``; False if a stop was requested first (it is then cancelled)."""
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            work.cancel()
            raise
        finally:
            stop.cancel()
        if work.done():
            work.result()
            return True
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, PgShiftError):
            await work
        return False

    # --- prerequisites ----------------------------------------------------------------------------

    async def _check(self, conn: SqlConnection) -> None:
        self.tables = to_d1(await read_pg_tables(conn, self.table_names))
        self._by_source = {t.source: t for t in self.tables}
        pairs = ", ".join(f"({quote_literal(s)}, {quote_literal(n)})" for s, n in map(split_name, self.table_names))
        identity: list[list[str]] = await conn.json(
            "select coalesce(json_agg(json_build_array(format('%s.%s', n.nspname, c.relname), c.relreplident)), "
            "'[]') from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            f"where (n.nspname, c.relname) in (values {pairs}) and c.relreplident not in ('d', 'f')"
        )
        problems = [
            f"{name} has REPLICA IDENTITY {'NOTHING' if kind == 'n' else 'USING INDEX'}: its deletes and key "
            f"changes would not carry the primary key (ALTER TABLE {name} REPLICA IDENTITY DEFAULT)"
            for name, kind in identity
        ]
        datestyle = (await conn.query("show DateStyle"))[0][0] or ""
        if not datestyle.upper().startswith("ISO"):
            problems.append(
                f"the source writes dates as {datestyle!r}; the feed reads ISO dates (ALTER ROLE "
                f"{quote_ident(self.source.user)} SET DateStyle = 'ISO, MDY', or ALTER DATABASE … SET DateStyle)"
            )
        found = await differences(self.client, self.tables)
        diffs = [line for lines in found.values() for line in lines]
        if diffs:
            problems.append(
                "D1's tables differ from the source's: " + "; ".join(diffs) + " — run `pgshift d1 schema --apply` "
                "(it creates missing tables; a table that differs must be dropped on D1 first, or fixed by hand: "
                "`pgshift d1 schema --check` lists what differs)"
            )
        if problems:
            raise FeedError(
                f'the feed of D1 store "{self.store}" cannot start: ' + " | ".join(problems),
                hint="nothing was created on the source",
            )

    async def _wait_inactive(self, conn: SqlConnection) -> dict[str, Any] | None:
        deadline = time.monotonic() + ACTIVE_WAIT
        while True:
            slot = await slot_info(conn, self.name)
            if slot is None or not slot["active"] or time.monotonic() >= deadline:
                return slot
            await asyncio.sleep(0.3)

    async def _publication(self, conn: SqlConnection) -> bool:
        """Create the publication (True), or make it publish exactly the store's tables."""
        names = ", ".join(_source_name(t) for t in self.tables)
        if not await publication_exists(conn, self.name):
            await conn.query(f"create publication {quote_ident(self.name)} for table {names}")
            self.say(f'created publication "{self.name}" for {len(self.tables)} table(s) on {self.source.backend}')
            return True
        await conn.query(f"alter publication {quote_ident(self.name)} set table {names}")
        return False

    async def _record(self, phase: str, *, started: bool = False, backfill_rows: int | None = None) -> None:
        now = _now()
        if started:
            await self.client.query(
                f"INSERT INTO {d1_ident(STATE_TABLE)} (slot, store, source, tables, phase, started_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (slot) DO UPDATE SET store = excluded.store, "
                "source = excluded.source, tables = excluded.tables, phase = excluded.phase, "
                "started_at = excluded.started_at, backfilled_at = NULL, backfill_rows = NULL, "
                "updated_at = excluded.updated_at",
                [self.name, self.store, self.source.backend, json.dumps([t.source for t in self.tables]), phase, now,
                 now],
            )  # fmt: skip
        else:
            await self.client.query(
                f"UPDATE {d1_ident(STATE_TABLE)} SET phase = ?, backfilled_at = ?, backfill_rows = ?, updated_at = ? "
                "WHERE slot = ?",
                [phase, now, None if backfill_rows is None else str(backfill_rows), now, self.name],
            )

    async def _undo(self, created_slot: bool, created_publication: bool) -> None:
        """A failed start: drop the slot and publication this run created."""
        messages = self.result.messages
        try:
            async with await SqlConnection.connect(self.source, application_name="pgshift-d1") as conn:
                if created_slot:
                    await conn.query(
                        "select pg_drop_replication_slot(slot_name) from pg_replication_slots "
                        f"where slot_name = {quote_literal(self.name)}"
                    )
                    messages.append(f'dropped the replication slot "{self.name}" this run created')
                if created_publication:
                    await conn.query(f"drop publication if exists {quote_ident(self.name)}")
                    messages.append(f'dropped the publication "{self.name}" this run created')
        except PgShiftError as exc:
            messages.append(
                f"could not clean up on the source ({exc.message}); run there: "
                f"SELECT pg_drop_replication_slot({quote_literal(self.name)}); "
                f"DROP PUBLICATION IF EXISTS {quote_ident(self.name)};"
            )
        if created_slot:
            with contextlib.suppress(PgShiftError):
                await _forget_record(self.client, self.name)

    # --- the backfill -----------------------------------------------------------------------------

    async def _backfill(self, conn: SqlConnection, snapshot: str | None) -> None:
        begin = "begin isolation level repeatable read read only"
        if snapshot is not None:
            begin += f"; set transaction snapshot {quote_literal(snapshot)}"
        await conn.query(begin)
        for table in self.tables:
            await self._copy(conn, table)
        await conn.query("commit")

    async def _copy(self, conn: SqlConnection, table: D1Table) -> None:
        o = self.options
        progress = TableProgress(table.name, table.source)
        self.result.backfill.append(progress)
        started = time.monotonic()
        held = await read_all_keys(self.client, table)  # what D1 has: the keys not copied go after
        seen: set[tuple[Param, ...]] = set()
        key_codecs = [(p, table.columns[p].codec) for p in table.key_positions]
        columns = ", ".join(quote_ident(c.name) for c in table.columns)
        order = ", ".join(quote_ident(c) for c in table.primary_key)
        sql = f"copy (select {columns} from {_source_name(table)} order by {order}) to stdout"
        rows = CopyRows(conn, len(table.columns), high=4 * o.batch_rows)
        copy = asyncio.ensure_future(conn.copy_out(sql, rows.feed))
        last = 0.0
        try:
            while batch := await rows.take(o.batch_rows, copy):
                await self.writer.upsert(table, batch)
                seen.update(tuple(codec.encode(row[p]) for p, codec in key_codecs) for row in batch)
                progress.rows += len(batch)
                progress.seconds = time.monotonic() - started
                if progress.seconds - last >= 1.0:
                    last = progress.seconds
                    self.progress(progress)
            await copy
        except BaseException:
            copy.cancel()
            raise
        stale = list(held - seen)
        if stale:
            await self.writer.delete_encoded(table, stale)
            progress.deleted = len(stale)
        progress.seconds = time.monotonic() - started
        progress.done = True
        self.progress(progress)

    # --- the stream ---------------------------------------------------------------------------------

    async def _stream(self, repl: ReplicationConnection) -> None:
        o, result = self.options, self.result
        # 0: from the slot's confirmed position. advance_when_idle: while the store's tables are
        # idle, the slot follows the source's WAL instead of holding it back.
        await repl.start(self.name, 0, [self.name], status_interval=1.0, advance_when_idle=True)
        result.streamed = True
        self.phase = "streaming"
        self.say(f'streaming changes from slot "{self.name}" into D1 store "{self.store}"; Ctrl-C to stop')
        reader = asyncio.ensure_future(self._read(repl))
        writer = asyncio.ensure_future(self._write(repl))
        abandoned = False
        before = 0
        try:
            while not (reader.done() or writer.done() or self.stop_requested.is_set()):
                stop = asyncio.ensure_future(self.stop_requested.wait())
                try:
                    await asyncio.wait({reader, writer, stop}, timeout=o.status_interval,
                                       return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                finally:
                    stop.cancel()
                if not (reader.done() or writer.done() or self.stop_requested.is_set()):
                    before = self._status_line(repl, before)
        except BaseException:
            abandoned = True
            raise
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            if abandoned or writer.done():
                writer.cancel()
            else:
                # What was received gets a moment to reach D1 (and be confirmed) before the end.
                self._draining = True
                self._changed.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(writer), o.drain_timeout)
                writer.cancel()
            with contextlib.suppress(BaseException):
                await writer
            if not abandoned:
                with contextlib.suppress(PgShiftError):
                    await repl.stop()  # (sends the last confirmed position)
        for task in (writer, reader):
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc
        self.phase = "stopped"
        s = self.stats
        result.messages.append(
            f"stopped after {s.transactions} transaction(s), {s.changes} change(s); confirmed "
            f'{format_lsn(s.confirmed_lsn)}. The slot "{self.name}" keeps its position and retains WAL until '
            "`pgshift d1 sync` resumes or `pgshift d1 stop` drops it"
        )

    def _status_line(self, repl: ReplicationConnection, before: int) -> int:
        s = self.stats
        s.pending = len(self._pending)
        lag = max(repl.server_wal_end - s.confirmed_lsn, 0) if s.pending else 0
        self.say(
            f"streaming: {s.transactions} transaction(s) (+{s.transactions - before}), {s.changes} change(s) "
            f"applied in {s.requests} request(s), confirmed {format_lsn(s.confirmed_lsn)}, "
            f"{s.pending} pending, lag {lag:,} bytes"
        )
        return s.transactions

    async def _read(self, repl: ReplicationConnection) -> None:
        """The stream → transactions of Change items, queued for the writer in commit order."""
        txn: list[Change] | None = None
        try:
            async for event in repl:
                message = event.message
                if isinstance(message, Begin):
                    txn = []
                elif isinstance(message, Commit):
                    if txn is None:
                        raise FeedError(f"a Commit at {format_lsn(message.end_lsn)} without a Begin")
                    while self._pending_changes > MAX_PENDING_CHANGES:
                        self._drained.clear()
                        await self._drained.wait()
                    self._pending.append(_Txn(message.end_lsn, txn))
                    self._pending_changes += len(txn)
                    txn = None
                    self._changed.set()
                elif isinstance(message, Relation):
                    self._targets.pop(message.relation_id, None)  # (its definition changed)
                elif isinstance(message, Insert | Update | Delete | Truncate):
                    if txn is None:
                        raise FeedError("a change outside a transaction in the replication stream")
                    self._change(repl, txn, message, event.lsn)
        finally:
            self._changed.set()

    def _target(self, repl: ReplicationConnection, relation_id: int) -> _Target | None:
        if relation_id in self._targets:
            return self._targets[relation_id]
        rel = repl.relations.get(relation_id)
        table = self._by_source.get(rel.qualified_name)
        target: _Target | None = None
        if table is not None:
            index = {c.name: i for i, c in enumerate(rel.columns)}
            missing = [c.name for c in table.columns if c.name not in index]
            extra = [c.name for c in rel.columns if c.name not in {c.name for c in table.columns}]
            if missing or extra:
                what = []
                if extra:
                    what.append(f"column(s) {', '.join(extra)} on the source but not in D1's table {table.name}")
                if missing:
                    what.append(f"column(s) {', '.join(missing)} in D1's table {table.name} but not published")
                raise FeedError(
                    f"{rel.qualified_name} changed on the source: " + "; ".join(what),
                    hint="bring D1's table in line (`pgshift d1 schema --check` lists the differences) and run "
                    "`pgshift d1 sync` again: the changes since the last confirmed one are sent again",
                )
            target = _Target(
                table, tuple(index[c.name] for c in table.columns), tuple(index[c] for c in table.primary_key)
            )
        self._targets[relation_id] = target
        return target

    def _change(
        self, repl: ReplicationConnection, txn: list[Change], message: Insert | Update | Delete | Truncate, lsn: int
    ) -> None:
        if isinstance(message, Truncate):
            for relation_id in message.relation_ids:
                target = self._target(repl, relation_id)
                if target is not None:
                    txn.append(Change("truncate", target.table, ()))
            return
        target = self._target(repl, message.relation_id)
        if target is None:
            return
        table = target.table
        if isinstance(message, Insert):
            txn.append(Change("upsert", table, [_text(message.new.values[i]) for i in target.positions]))
        elif isinstance(message, Delete):
            txn.append(Change("delete", table, [_text(message.old.values[i]) for i in target.keys]))
        else:
            self._update(txn, target, message, lsn)

    def _update(self, txn: list[Change], target: _Target, message: Update, lsn: int) -> None:
        table = target.table
        new: list[Value] = list(message.new.values)
        old: TupleData | None = message.old
        if old is not None and message.old_kind == "O":
            # REPLICA IDENTITY FULL: the old row is whole, so it supplies the unchanged values.
            new = [o if n is UNCHANGED else n for n, o in zip(new, old.values, strict=True)]
        for i in target.keys:
            if new[i] is UNCHANGED:
                if old is None or old.values[i] is UNCHANGED:
                    raise FeedError(
                        f"{table.source}: an update at {format_lsn(lsn)} without the value of a key column",
                    )
                new[i] = old.values[i]
        row: list[str | None] = [None if new[i] is UNCHANGED else _text(new[i]) for i in target.positions]
        present = tuple(p for p, i in enumerate(target.positions) if new[i] is not UNCHANGED)
        key = [_text(new[i]) for i in target.keys]
        old_key: Row | None = [_text(old.values[i]) for i in target.keys] if old is not None else None
        moved = old_key is not None and list(old_key) != key
        if len(present) == len(row):
            if moved and old_key is not None:
                txn.append(Change("delete", table, old_key))
            txn.append(Change("upsert", table, row))
        elif moved:
            txn.append(Change("move", table, row, present, old_key))
        else:
            txn.append(Change("patch", table, row, present))

    async def _write(self, repl: ReplicationConnection) -> None:
        """Queued transactions → D1, in order; confirms each group's last end_lsn once D1 accepted it."""
        o, s = self.options, self.stats
        while True:
            while not self._pending:
                if self._draining:
                    return
                self._changed.clear()
                await self._changed.wait()
            group: list[_Txn] = []
            count = 0
            while self._pending and (not group or count + len(self._pending[0].changes) <= o.group_max_changes):
                t = self._pending.popleft()
                group.append(t)
                count += len(t.changes)
            self._pending_changes -= count
            self._drained.set()
            if count:
                await self._send(group)
                s.transactions += sum(1 for t in group if t.changes)
                s.changes += count
                s.requests += 1
                s.last_apply = time.monotonic()
            s.confirmed_lsn = group[-1].end_lsn
            repl.confirm(s.confirmed_lsn)

    def _statements(self, txns: Sequence[_Txn]) -> list[Statement]:
        try:
            return change_statements([c for t in txns for c in t.changes], self.client.limits)
        except D1TypeError as exc:
            raise FeedError(
                f"a change of the source transaction ending at {format_lsn(txns[-1].end_lsn)} cannot go to D1: "
                f"{exc.message}",
                hint="nothing from this transaction on was confirmed: fix the row on the source (the feed sends the "
                "transaction again when it restarts)",
            ) from None

    async def _send(self, group: list[_Txn]) -> None:
        statements = self._statements(group)
        delay = 2.0
        while True:
            try:
                await self.client.execute(statements)
                return
            except D1Unavailable as exc:
                if self._draining or self.stop_requested.is_set():
                    raise
                self.say(f"D1 unavailable ({exc.message}); trying again in {delay:.0f} s (nothing confirmed meanwhile)")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)
            except D1SqlError as exc:
                raise await self._pinpoint(group, exc) from None

    async def _pinpoint(self, group: list[_Txn], error: D1SqlError) -> FeedError:
        """D1 refused a group: apply its transactions one by one (confirming those it takes) to find
        the one it refuses, then the statement, by probe batches that end in a failing statement (a
        batch is one transaction: the probe applies nothing)."""
        repl = self._repl
        for txn in group:
            statements = self._statements([txn])
            try:
                if statements:
                    await self.client.execute(statements)
            except D1SqlError as exc:
                index = await self._failing_statement(statements)
                where = f"the source transaction ending at LSN {format_lsn(txn.end_lsn)}"
                if index is not None:
                    st = statements[index]
                    sql = st.sql if len(st.sql) <= 300 else st.sql[:300] + "…"
                    params = ", ".join("NULL" if p is None else repr(p[:60]) for p in st.params[:12])
                    what = f"statement {index + 1} of {len(statements)} of {where}: {sql} (parameters: {params})"
                else:
                    what = where
                return FeedError(
                    f"D1 refused {what}: {exc.message}",
                    hint="nothing from this transaction on was confirmed: fix the cause (D1's table, or the row on the "
                    "source) and run `pgshift d1 sync` again to resume from it",
                )
            if repl is not None:
                self.stats.confirmed_lsn = txn.end_lsn
                repl.confirm(txn.end_lsn)
        return FeedError(f"D1 refused the batch ending at LSN {format_lsn(group[-1].end_lsn)}: {error.message}")

    async def _failing_statement(self, statements: list[Statement]) -> int | None:
        probe = Statement(f"SELECT * FROM {d1_ident(_PROBE_TABLE)}")
        good, bad = 0, len(statements)  # statements[:good] pass; statements[:bad] fail
        try:
            while bad - good > 1:
                middle = (good + bad) // 2
                try:
                    await self.client.batch([*statements[:middle], probe])
                except D1SqlError as exc:
                    if _PROBE_TABLE in exc.message:
                        good = middle
                    else:
                        bad = middle
        except D1Error:
            return None
        return bad - 1


# --- status and stop ----------------------------------------------------------------------------


@dataclass
class FeedStatus:
    store: str
    name: str
    slot: dict[str, Any] | None
    publication: bool
    record: dict[str, Any] | None
    d1_error: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def phase(self) -> str:
        if self.slot is None:
            return "none"
        if self.record is None:
            return "unknown" if self.d1_error else "backfill"
        return str(self.record.get("phase") or "unknown")

    @property
    def ok(self) -> bool:
        return not self.warnings

    def as_dict(self) -> dict[str, Any]:
        slot = self.slot
        return {
            "ok": self.ok,
            "store": self.store,
            "slot_name": self.name,
            "publication_name": self.name,
            "phase": self.phase,
            "active": bool(slot and slot["active"]),
            "confirmed_lsn": slot["confirmed_flush_lsn"] if slot else None,
            "lag_bytes": slot["lag_bytes"] if slot else None,
            "retained_bytes": slot["retained_bytes"] if slot else None,
            "publication": self.publication,
            "record": self.record,
            "d1_error": self.d1_error,
            "warnings": self.warnings,
        }

    def lines(self) -> list[str]:
        slot = self.slot
        if slot is None:
            out = [f'no feed for D1 store "{self.store}" (slot "{self.name}" does not exist on the source)']
            if self.publication:
                out.append(f'  publication "{self.name}" still exists: `pgshift d1 stop` drops it')
        else:
            active = f"active (pid {slot['active_pid']})" if slot["active"] else "inactive"
            out = [
                f'feed of D1 store "{self.store}": phase {self.phase}; slot "{self.name}" {active}, confirmed '
                f"{slot['confirmed_flush_lsn']}, lag {slot['lag_bytes'] or 0:,} bytes, retains "
                f"{slot['retained_bytes'] or 0:,} bytes of WAL",
                f'  publication "{self.name}": {"exists" if self.publication else "missing"}',
            ]
            record = self.record
            if record is not None:
                done = record.get("backfilled_at")
                copied = f"backfill done {done} ({record.get('backfill_rows')} rows)" if done else "backfill not done"
                out.append(f"  started {record.get('started_at')}, {copied}")
        if self.d1_error:
            out.append(f"  D1 could not be read: {self.d1_error}")
        return out + [f"WARNING: {w}" for w in self.warnings]


async def feed_status(store: str, source: Endpoint, client: D1Client | None) -> FeedStatus:
    name = feed_name(store)
    async with await SqlConnection.connect(source, application_name="pgshift-d1") as conn:
        info = await slot_info(conn, name)
        publication = await publication_exists(conn, name)
    record: dict[str, Any] | None = None
    d1_error: str | None = None
    if client is not None and info is not None:
        try:
            record = await read_record(client, name)
        except PgShiftError as exc:
            d1_error = exc.message
    report = FeedStatus(store, name, info, publication, record, d1_error)
    if info is not None and not info["active"] and (info.get("retained_bytes") or 0) > 0:
        report.warnings.append(
            f'slot "{name}" is inactive and retains {info["retained_bytes"]:,} bytes of WAL on the source (growing '
            "with every write) unless a `pgshift d1 sync` is copying right now: resume with `pgshift d1 sync`, or "
            "drop it with `pgshift d1 stop`"
        )
    return report


async def feed_stop(store: str, source: Endpoint, client: D1Client | None, *, force: bool = False) -> StopResult:
    """Drop the feed's slot and publication on the source and its record in D1."""
    name = feed_name(store)
    lines: list[str] = []
    async with await SqlConnection.connect(source, application_name="pgshift-d1") as conn:
        info = await slot_info(conn, name)
        if info is not None and info["active"]:
            if not force:
                return StopResult(False, [
                    f'slot "{name}" is in use: process {info["active_pid"]} streams from it. Stop that feed first '
                    "(Ctrl-C / SIGTERM), or pass --force to terminate its walsender and drop the slot anyway"
                ])  # fmt: skip
            if not await release_slot(conn, name, int(info["active_pid"]), lines):
                return StopResult(False, lines)
        await drop_slot_and_publication(conn, source.backend, name, name, lines)
    if client is not None:
        try:
            await _forget_record(client, name)
        except PgShiftError as exc:
            lines.append(
                f"could not remove the feed's record from D1 ({exc.message}): the next start copies again anyway"
            )
    return StopResult(True, lines)
