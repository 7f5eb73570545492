"""Apply a pgoutput change stream to the target database, idempotently, confirming only what it committed.

Source transactions (Begin … Commit) are applied in batches: while the target applies one batch,
the transactions that arrive gather into the next, which becomes one mirror Txn on an ApplyStream
(one implicit transaction on the target). An idle target gets each transaction at once; a busy one
gets larger batches, so the cost per change falls as the source writes faster. Every change is
made idempotent by primary key, so a change the target holds already (the copy overlapped the
stream, or a restart replays what was applied but not yet confirmed) is absorbed instead of
failing:

* Insert, and Update with the whole new row: UPSERT (INSERT … ON CONFLICT DO UPDATE).
* Update whose new row lacks TOASTed columns the source left unchanged (pgoutput does not send
  them): PATCH, an UPDATE of only the columns sent, so the target keeps its value for the others.
* Update that changed the key: DELETE of the old key, then the new row; when columns are missing
  from it, a MOVE of the old row to the new key first (it carries the missing values along).
* Delete: DELETE by the old key. Truncate: TRUNCATE of the same tables, with the same options.

Values travel as pgoutput sent them, in text format, inside a JSON document that
json_populate_recordset turns into rows of the target table: each string goes through the
column type's input function, so every type round-trips exactly. (json and jsonb objects and
arrays are embedded as JSON instead, since json_populate_recordset would keep a string as a JSON
string; their other values, a JSON null above all, are set by a statement of their own.)

As the replica (session_replication_role, which needs a superuser), a batch is applied as its net
change (render_compacted): each row's changes merged into one, and per table one statement for
many rows. TPC-B's 4 statements per transaction become 4 per batch, and a hot row updated by
every transaction is written once. Should the target refuse a batch (a unique constraint other
than the key, which a different order of rows could trip), its transactions and those after it
are applied again one by one, in source order.

Confirmation follows commit order: a source transaction's ``end_lsn`` is confirmed once the
target committed it and every transaction before it. A transaction the target refused when
applied on its own stops the applier (ApplyFailed) and nothing after it is confirmed, so the
slot sends it again next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Final, Protocol

from proxy.cdc.pgoutput import (
    KIND_BINARY,
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
    pg_now,
)
from proxy.cdc.replication import ChangeEvent
from proxy.cdc.sqlconn import Endpoint, quote_ident, quote_literal
from proxy.errors import PgShiftError, ProtocolViolation
from proxy.mirror.apply import ApplyStream, Outcome, StreamState
from proxy.mirror.model import Image, ImageOp, Txn, Write, WriteKind

log = logging.getLogger(__name__)

# json, jsonb: their text is embedded as JSON (see the module docstring).
_JSON_TYPES: Final = frozenset({114, 3802})
# One Image holds at most this many rows / bytes of JSON: one statement's parameter stays bounded.
IMAGE_MAX_ROWS = 1000
IMAGE_MAX_BYTES = 4 * 1024 * 1024
# A batch (one target transaction) closes at this many changes or bytes, even while the target is busy.
BATCH_MAX_CHANGES = 20_000
BATCH_MAX_BYTES = 16 * 1024 * 1024
# Batches submitted at once: one applied, the next waiting, the one after gathering.
PIPELINE_BATCHES = 2
# Submitted and not settled: reading the stream pauses above either bound.
MAX_QUEUED_BYTES = 64 * 1024 * 1024
MAX_QUEUED_TXNS = 1024
# On stop, transactions already submitted get this long to be applied (and confirmed).
DRAIN_TIMEOUT = 10.0

KINDS: Final = ("insert", "update", "delete", "truncate")
_CHANGE_TYPES: Final = (Insert, Update, Delete, Truncate)  # (a tuple: isinstance with a union is slower)


class ApplyFailed(PgShiftError):
    """A source transaction could not be applied on the target; nothing from it on is confirmed."""

    def __init__(self, message: str, *, reasons: Sequence[str], lsn: int, hint: str | None = None) -> None:
        super().__init__(message, detail="; ".join(reasons) or None, hint=hint)
        self.reasons = tuple(reasons)
        self.lsn = lsn  # the end_lsn of the transaction (0: not known)


class ChangeSource(Protocol):
    """What the applier needs of the replication connection (ReplicationConnection has it)."""

    server_wal_end: int

    def confirm(self, lsn: int) -> None: ...


# --- converting changes into writes -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Table:
    """A Relation, prepared for turning its tuples into JSON rows."""

    name: str  # "schema"."table"
    columns: tuple[str, ...]
    keys: tuple[int, ...]  # indexes of the replica identity columns
    json_names: tuple[str, ...]  # each column name as a JSON string
    raw: tuple[bool, ...]  # the value is JSON text already (json, jsonb)
    any_raw: bool  # a json or jsonb column: values may need a fixup

    @classmethod
    def of(cls, rel: Relation) -> _Table:
        return cls(
            name=f"{quote_ident(rel.namespace or 'pg_catalog')}.{quote_ident(rel.name)}",
            columns=tuple(c.name for c in rel.columns),
            keys=tuple(i for i, c in enumerate(rel.columns) if c.key),
            json_names=tuple(encode_basestring(c.name) for c in rel.columns),
            raw=tuple(c.type_oid in _JSON_TYPES for c in rel.columns),
            any_raw=any(c.type_oid in _JSON_TYPES for c in rel.columns),
        )

    def json(self, values: Sequence[Value], indexes: Sequence[int], fixups: list[int] | None = None) -> bytes:
        """The columns at ``indexes`` as one JSON object (name → text value, or null). A json or
        jsonb value that is not an object or array (a JSON null, or a json string, number or
        outer whitespace json_populate_recordset would not keep) goes as null and its index into
        ``fixups``: the caller sets it with a statement of its own."""
        parts = []
        for i in indexes:
            value = values[i]
            if value is None:
                text = "null"
            elif value is UNCHANGED:
                raise ProtocolViolation(f"{self.name}: unchanged TOAST value where the whole row is needed")
            elif self.raw[i]:
                text = value.decode()
                if fixups is not None and not (text[:1] in "{[" and text[-1:] in "}]"):
                    fixups.append(i)
                    text = "null"
            else:
                text = encode_basestring(value.decode())
            parts.append(f"{self.json_names[i]}:{text}")
        return ("{" + ",".join(parts) + "}").encode()

    def scalars(self, values: Sequence[Value], indexes: Iterable[int]) -> list[int]:
        """The indexes of json/jsonb values that ``json`` sends as null (see there)."""
        out: list[int] = []
        if not self.any_raw:
            return out
        for i in indexes:
            value = values[i]
            if self.raw[i] and isinstance(value, bytes):
                text = value.decode()
                if not (text[:1] in "{[" and text[-1:] in "}]"):
                    out.append(i)
        return out


def _fixup_sql(table: _Table, values: Sequence[Value], fixups: Sequence[int]) -> str:
    """Sets json values the row image could not carry exactly (see _Table.json), by key; the
    literals are untyped, so they take the column's type."""

    def text(i: int) -> str:
        value = values[i]
        assert isinstance(value, bytes)
        return quote_literal(value.decode())

    sets = ", ".join(f"{quote_ident(table.columns[i])} = {text(i)}" for i in fixups)
    where = " AND ".join(f"{quote_ident(table.columns[i])} = {text(i)}" for i in table.keys)
    return f"UPDATE {table.name} SET {sets} WHERE {where}"


# --- one source transaction's changes, and how a batch of them becomes writes ------------------


@dataclass(slots=True)
class _RowChange:
    """A change to one row: UPSERT (every column present), DELETE (key columns present) or PATCH
    (the columns present are set; UNCHANGED marks the others)."""

    op: ImageOp
    table: _Table
    key: tuple[Value, ...]
    values: list[Value]


# A change that is not a plain row change: a TRUNCATE, a json fixup, the images of a moved key.
# It orders everything around it: compaction never moves a row change across it.
_Item = _RowChange | Write


class _TxnChanges:
    """The changes of one source transaction, in order, as received."""

    def __init__(self, begin: Begin) -> None:
        self.begin = begin
        self.items: list[_Item] = []
        self.counts = dict.fromkeys(KINDS, 0)
        self.size = 0  # bytes of values, roughly: bounds batches and the queue

    def row(self, op: ImageOp, table: _Table, key: tuple[Value, ...], values: list[Value]) -> None:
        self.items.append(_RowChange(op, table, key, values))
        self.size += 16 + sum([len(v) for v in values if v.__class__ is bytes])

    def write(self, write: Write) -> None:
        self.items.append(write)
        self.size += write.size


def _present(change: _RowChange) -> Sequence[int]:
    if change.op is ImageOp.DELETE:
        return [i for i in change.table.keys if change.values[i] is not UNCHANGED]
    if change.op is ImageOp.UPSERT:
        return range(len(change.values))  # (a whole row: nothing is UNCHANGED)
    return [i for i, v in enumerate(change.values) if v is not UNCHANGED]


class _Images:
    """Consecutive row changes of the same operation, table and columns as one Image (one
    statement), as long as no key repeats in it (an upsert cannot touch a row twice)."""

    def __init__(self, writes: list[Write]) -> None:
        self.writes = writes
        self._group: tuple[ImageOp, str, tuple[str, ...]] | None = None
        self._rows: list[bytes] = []
        self._keys: set[tuple[Value, ...]] = set()
        self._bytes = 0

    def add(self, change: _RowChange) -> None:
        table = change.table
        present = _present(change)
        columns = tuple(table.columns[i] for i in present) if change.op is ImageOp.PATCH else ()
        row = table.json(change.values, present, [])  # (json scalars: null here, set by their fixup)
        group = (change.op, table.name, columns)
        if (
            group != self._group
            or change.key in self._keys
            or len(self._rows) >= IMAGE_MAX_ROWS
            or self._bytes + len(row) > IMAGE_MAX_BYTES
        ):
            self.flush()
            self._group = group
        self._rows.append(row)
        self._keys.add(change.key)
        self._bytes += len(row)

    def flush(self) -> None:
        if self._group is not None and self._rows:
            op, table, columns = self._group
            image = Image(op, table, None, tuple(self._rows), columns)
            self.writes.append(Write(WriteKind.IMAGE, f"-- cdc {op.value} {table}", "", "cdc", (table,), image=image))
        self._group = None
        self._rows = []
        self._keys = set()
        self._bytes = 0


def render_exact(txns: Sequence[_TxnChanges]) -> list[Write]:
    """Every change in source order (consecutive rows of one kind share a statement)."""
    writes: list[Write] = []
    images = _Images(writes)
    for txn in txns:
        for item in txn.items:
            if isinstance(item, _RowChange):
                images.add(item)
            else:
                images.flush()
                writes.append(item)
    images.flush()
    return writes


def _merge(before: _RowChange, after: _RowChange) -> _RowChange:
    """One change with the effect of ``before`` then ``after`` on the same row."""
    if after.op is not ImageOp.PATCH:
        return after  # a whole row, or its deletion, whatever came before
    if before.op is ImageOp.DELETE:
        return before  # (an update of a row deleted before it: nothing to update)
    values = [b if a is UNCHANGED else a for a, b in zip(after.values, before.values, strict=True)]
    return _RowChange(before.op, before.table, after.key, values)  # an UPSERT stays one, with the new values


def render_compacted(txns: Sequence[_TxnChanges]) -> list[Write]:
    """The net change of a batch: each row's changes merged into one (the last whole row, its
    deletion, or the union of its patches), then per table one DELETE, one UPSERT and one PATCH
    per set of columns, each of many rows. A Write (TRUNCATE, fixup, moved key) is a barrier:
    what came before it is written before it.

    The result equals applying the changes one by one when nothing on the target looks across
    rows while they are applied: no trigger (session_replication_role = replica keeps ordinary and
    foreign-key triggers quiet) and no unique constraint but the key that a different order could
    violate. The applier runs this form only as replica, and when the target refuses it, applies
    the same transactions again one by one (render_exact), so a constraint never decides the
    outcome."""
    writes: list[Write] = []
    net: dict[tuple[str, tuple[Value, ...]], _RowChange] = {}

    def flush() -> None:
        by_table: dict[str, list[_RowChange]] = {}
        for change in net.values():
            by_table.setdefault(change.table.name, []).append(change)
        net.clear()
        for changes in by_table.values():
            # Deletions first: a key or unique value freed in the batch may be taken again in it.
            changes.sort(key=lambda c: c.op is not ImageOp.DELETE)
            images = _Images(writes)
            patches: dict[tuple[int, ...], list[_RowChange]] = {}
            for change in changes:
                if change.op is ImageOp.PATCH:
                    patches.setdefault(tuple(_present(change)), []).append(change)
                else:
                    images.add(change)
            for group in patches.values():
                for change in group:
                    images.add(change)
            images.flush()

    for txn in txns:
        for item in txn.items:
            if isinstance(item, _RowChange):
                slot = (item.table.name, item.key)
                before = net.get(slot)
                net[slot] = item if before is None else _merge(before, item)
            else:
                flush()
                writes.append(item)
    flush()
    return writes


# --- the applier -------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Pending:
    """A source transaction received, in commit order, until confirmed."""

    end_lsn: int
    commit_time: int
    changes: _TxnChanges | None  # None once nothing is left to apply (empty, or confirmed)
    submitted: bool = False
    done: bool = False


@dataclass(slots=True)
class _Batch:
    """Source transactions on their way to the target as one target transaction."""

    pendings: list[_Pending]
    exact: bool  # one source transaction, changes in source order: a refusal is final


@dataclass(frozen=True, slots=True)
class ApplierStats:
    transactions_applied: int
    rows: dict[str, int]  # insert, update, delete, truncate (tables) applied
    confirmed_lsn: int  # end_lsn of the last source transaction the target committed
    lag_bytes: int  # the source's end of WAL minus confirmed_lsn
    lag_seconds: float  # age of the oldest source commit not yet applied (0: none)
    pending: int  # source transactions received and not yet confirmed
    target_state: str
    target_error: str
    last_commit_time: int = 0  # Postgres timestamp of the last applied source commit
    errors: tuple[str, ...] = field(default=())


class ChangeApplier:
    """Applies a replication stream (ChangeEvents) to ``target``; see the module docstring.

    An applier runs once. ``run(stream)`` returns when the stream ends or after ``stop()``, having given the
    transactions already submitted up to ``drain`` seconds to be applied; it raises ApplyFailed
    when the target refused one, and whatever the stream raised. Stop the applier before the
    replication connection, so that the last confirmations reach the source: the connection
    sends the confirmed position when it stops. Anything not confirmed is sent again by the
    slot to the next connection, and applying it twice is harmless.
    """

    def __init__(
        self,
        source: ChangeSource,
        target: Endpoint,
        *,
        start_lsn: int = 0,
        max_in_flight: int = 64,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        drain: float = DRAIN_TIMEOUT,
        replica: bool = False,
        compact: bool | None = None,
        batch_changes: int = BATCH_MAX_CHANGES,
    ) -> None:
        self.source = source
        self.target = target
        # As Postgres' own logical replication applies: triggers and foreign-key checks on the
        # target do not fire again for rows the source already checked (needs a superuser).
        self._settings: tuple[tuple[str, str], ...] = (("session_replication_role", "replica"),) if replica else ()
        # Net changes per batch (render_compacted) need the replica role: no trigger looks across rows.
        self.compact = replica if compact is None else compact
        self.batch_changes = max(1, batch_changes)
        self.max_in_flight = max_in_flight
        self.max_queued_bytes = max_queued_bytes
        self.drain = drain
        self.transactions_applied = 0
        self.rows = dict.fromkeys(KINDS, 0)
        self.confirmed_lsn = start_lsn
        self.last_commit_time = 0
        self.failure: ApplyFailed | None = None
        self._tables: dict[int, _Table] = {}
        self._txn: _TxnChanges | None = None
        self._seq = 0
        self._pending: deque[_Pending] = deque()  # received, in commit order, not yet confirmed
        self._open: list[_Pending] = []  # committed, not yet submitted: the next batch
        self._open_changes = 0
        self._open_bytes = 0
        self._batches: dict[int, _Batch] = {}  # submitted, by Txn seq, until settled
        self._exact_until: _Pending | None = None  # one by one until this one is confirmed
        self.batches_applied = 0
        self.retried_exactly = 0
        self._apply: ApplyStream | None = None
        self._closing = False
        self._running = False
        self._progress = asyncio.Event()  # a transaction settled
        self._stop_requested = asyncio.Event()
        self._failed = asyncio.Event()
        self._finished = asyncio.Event()

    # --- the owner's side ----------------------------------------------------------------------

    @property
    def lag_bytes(self) -> int:
        return max(0, self.source.server_wal_end - self.confirmed_lsn)

    @property
    def lag_seconds(self) -> float:
        if not self._pending:
            return 0.0
        return max(0.0, (pg_now() - self._pending[0].commit_time) / 1e6)

    def stats(self) -> ApplierStats:
        apply = self._apply
        return ApplierStats(
            transactions_applied=self.transactions_applied,
            rows=dict(self.rows),
            confirmed_lsn=self.confirmed_lsn,
            lag_bytes=self.lag_bytes,
            lag_seconds=self.lag_seconds,
            pending=len(self._pending),
            target_state=apply.state.value if apply is not None else StreamState.STOPPED.value,
            target_error=apply.last_error if apply is not None else "",
            last_commit_time=self.last_commit_time,
            errors=self.failure.reasons if self.failure is not None else (),
        )

    async def stop(self) -> None:
        """Ask run() to end (after its drain) and wait until it has."""
        self._stop_requested.set()
        if self._running:
            await self._finished.wait()

    async def run(self, stream: AsyncIterator[ChangeEvent]) -> None:
        if self._running:
            raise RuntimeError("the change applier is already running")
        self._running = True
        self._finished.clear()
        target = self.target
        apply = ApplyStream(
            target.backend,
            target.database,
            target.address,
            user=target.user,
            password=target.password,
            max_in_flight=self.max_in_flight,
            on_outcome=self._on_outcome,
        )
        self._apply = apply
        apply_task = asyncio.create_task(apply.run())
        consume = asyncio.ensure_future(self._consume(stream))
        stop = asyncio.ensure_future(self._stop_requested.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        drain = True
        try:
            await asyncio.wait({consume, stop, failed}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            drain = False  # killed: what was applied and not confirmed comes again next time
            raise
        finally:
            for task in (consume, stop, failed):
                task.cancel()
            await asyncio.wait({consume, stop, failed})
            try:
                if drain and self.failure is None:
                    await self._drain()
            finally:
                # A partial transaction (Begin without its Commit yet) is dropped: unconfirmed.
                self._txn = None
                self._closing = True  # what stop leaves unapplied is not a failure
                await apply.stop()
                apply.take_queued()
                await apply_task
                self._running = False
                self._finished.set()
        if self.failure is not None:
            raise self.failure
        if not consume.cancelled() and (exc := consume.exception()) is not None:
            raise exc

    # --- consuming the stream --------------------------------------------------------------------

    async def _consume(self, stream: AsyncIterator[ChangeEvent]) -> None:
        next_batch = getattr(stream, "next_batch", None)
        if next_batch is None:  # any async iterator of events (tests)
            async for event in stream:
                if self._event(event) and self._congested():
                    await self._backpressure()
            return
        # A ReplicationConnection: every event waiting at once, no await per message.
        while batch := await next_batch():
            for event in batch:
                if self._event(event) and self._congested():
                    await self._backpressure()

    def _event(self, event: ChangeEvent) -> bool:
        """Take one event; True after a Commit (the caller then applies backpressure)."""
        message = event.message
        if isinstance(message, _CHANGE_TYPES):
            txn = self._txn
            if txn is None:
                raise ProtocolViolation(f"pgoutput change outside a transaction at {format_lsn(event.lsn)}")
            self._change(txn, message, event.lsn)
        elif isinstance(message, Begin):
            self._txn = _TxnChanges(message)
        elif isinstance(message, Commit):
            self._commit(message)
            return True
        elif isinstance(message, Relation):
            self._tables[message.relation_id] = _Table.of(message)
        # (Origin, Type and logical messages change nothing on the target.)
        return False

    def _congested(self) -> bool:
        apply = self._apply
        assert apply is not None
        return apply.queued_bytes > self.max_queued_bytes or apply.queued >= MAX_QUEUED_TXNS

    async def _backpressure(self) -> None:
        """The stream is read no faster than the target applies."""
        while self._congested():
            self._progress.clear()
            await self._progress.wait()

    def _table(self, relation_id: int) -> _Table:
        table = self._tables.get(relation_id)
        if table is None:
            raise ProtocolViolation(f"pgoutput change for relation {relation_id}, which no Relation message announced")
        return table

    def _refuse(self, lsn: int, why: str) -> ApplyFailed:
        return ApplyFailed(f"cannot apply the change at {format_lsn(lsn)}: {why}", reasons=[why], lsn=lsn)

    def _change(self, txn: _TxnChanges, message: Insert | Update | Delete | Truncate, lsn: int) -> None:
        if isinstance(message, Truncate):
            tables = tuple(self._table(rid).name for rid in message.relation_ids)
            options = (" RESTART IDENTITY" if message.restart_identity else "") + (
                " CASCADE" if message.cascade else ""
            )
            txn.write(_query(f"TRUNCATE {', '.join(tables)}{options}", tables))
            txn.counts["truncate"] += len(tables)
            return
        table = self._table(message.relation_id)
        tuples: list[TupleData | None]
        if isinstance(message, Delete):
            tuples = [message.old]
        elif isinstance(message, Update):
            tuples = [message.new, message.old]
        else:
            tuples = [message.new]
        for data in tuples:
            if data is None:
                continue
            if KIND_BINARY in data.kinds:
                raise self._refuse(lsn, f"{table.name}: binary-format values (the stream must be in text format)")
            if len(data.values) != len(table.columns):
                raise ProtocolViolation(
                    f"pgoutput tuple for {table.name} has {len(data.values)} columns, "
                    f"its Relation message announced {len(table.columns)}"
                )
        if not table.keys:
            raise self._refuse(lsn, f"{table.name} has no replica identity key: its rows cannot be matched")
        try:
            if isinstance(message, Insert):
                new = list(message.new.values)
                if UNCHANGED in new:
                    raise ProtocolViolation(f"{table.name}: unchanged TOAST value in an inserted row")
                txn.row(ImageOp.UPSERT, table, _key(table, new), new)
                _fixup(txn, table, new, range(len(new)))
                txn.counts["insert"] += 1
            elif isinstance(message, Delete):
                old = list(message.old.values)
                txn.row(ImageOp.DELETE, table, _key(table, old), old)
                txn.counts["delete"] += 1
            else:
                self._update(txn, table, message, lsn)
                txn.counts["update"] += 1
        except UnicodeDecodeError as exc:
            raise self._refuse(lsn, f"{table.name}: a value is not valid UTF-8 ({exc})") from None

    def _update(self, txn: _TxnChanges, table: _Table, message: Update, lsn: int) -> None:
        new = list(message.new.values)
        old = message.old.values if message.old is not None else None
        if old is not None and message.old_kind == "O":
            # REPLICA IDENTITY FULL: the old row is complete, so it supplies the unchanged values.
            new = [o if n is UNCHANGED else n for n, o in zip(new, old, strict=True)]
        for i in table.keys:
            if new[i] is UNCHANGED:
                # A TOASTed key value left as it was: the old key tuple carries it.
                if old is None or old[i] is UNCHANGED:
                    raise self._refuse(
                        lsn, f"{table.name}: an update without the value of key column {table.columns[i]}"
                    )
                new[i] = old[i]
        old_key = None if old is None else _key(table, old)
        new_key = _key(table, new)
        moved = old is not None and old_key != new_key
        present = [i for i, v in enumerate(new) if v is not UNCHANGED]
        if len(present) == len(new):
            if moved and old is not None:
                txn.row(ImageOp.DELETE, table, old_key or (), list(old))
            txn.row(ImageOp.UPSERT, table, new_key, new)
        else:
            if moved and old is not None:
                # The row must take the values the source did not send along to its new key.
                old_json = table.json(old, table.keys)
                new_json = table.json(new, present, [])
                columns = tuple(table.columns[i] for i in present)
                image = Image(
                    ImageOp.MOVE, table.name, None, (b'{"old":' + old_json + b',"new":' + new_json + b"}",), columns
                )
                txn.write(Write(WriteKind.IMAGE, f"-- cdc move {table.name}", "", "cdc", (table.name,), image=image))
                # Replayed (the move found the new key taken): the old key goes, as with a whole row.
                txn.row(ImageOp.DELETE, table, old_key or (), list(old))
            txn.row(ImageOp.PATCH, table, new_key, new)
        _fixup(txn, table, new, present)

    def _commit(self, commit: Commit) -> None:
        txn = self._txn
        self._txn = None
        if txn is None:
            raise ProtocolViolation(f"pgoutput Commit at {format_lsn(commit.end_lsn)} without a Begin")
        pending = _Pending(commit.end_lsn, commit.commit_time, txn if txn.items else None)
        self._pending.append(pending)
        if pending.changes is None:
            # Nothing for the target (pgoutput may send an empty transaction): settled in order.
            pending.done = True
            self._advance()
            return
        apply = self._apply
        assert apply is not None
        self._open.append(pending)
        self._open_changes += len(txn.items)
        self._open_bytes += txn.size
        # Batching: while the target is busy, transactions gather into the next batch, so the
        # faster the source writes, the larger (and cheaper per change) the target's transactions.
        if (
            self._exact_until is not None
            or apply.queued < PIPELINE_BATCHES
            or self._open_changes >= self.batch_changes
            or self._open_bytes >= BATCH_MAX_BYTES
        ):
            self._submit_open()

    def _submit_open(self) -> None:
        pendings, self._open = self._open, []
        self._open_changes = self._open_bytes = 0
        if not pendings:
            return
        if self._exact_until is not None:
            for pending in pendings:
                self._submit([pending], exact=True)
        else:
            self._submit(pendings, exact=False)

    def _submit(self, pendings: list[_Pending], *, exact: bool) -> None:
        apply = self._apply
        assert apply is not None
        changes = [p.changes for p in pendings if p.changes is not None]
        in_order = exact or not self.compact
        writes = render_exact(changes) if in_order else render_compacted(changes)
        exact = in_order and len(pendings) == 1  # a refusal of anything else is retried one by one
        self._seq += 1
        for pending in pendings:
            pending.submitted = True
        self._batches[self._seq] = _Batch(pendings, exact)
        first = changes[0].begin.xid
        apply.submit(
            Txn(
                seq=self._seq,
                database=self.target.database,
                session=f"cdc xid {first}" + (f" (+{len(changes) - 1})" if len(changes) > 1 else ""),
                settings=self._settings,  # (values are text, read by their types' input functions)
                writes=tuple(writes),
                size=sum(c.size for c in changes),
            )
        )

    # --- outcomes (called by the apply stream, in submission order) -------------------------------

    def _on_outcome(self, txn: Txn, outcome: Outcome) -> None:
        self._progress.set()
        batch = self._batches.pop(txn.seq, None)
        if batch is None:
            return  # superseded: sent again one by one (below)
        if outcome.applied:
            self.batches_applied += 1
            for pending in batch.pendings:
                pending.done = True
            self._advance()
            if self._open and self._apply is not None and self._apply.queued < PIPELINE_BATCHES:
                self._submit_open()
            return
        if self._closing or self.failure is not None:
            return  # taken off the queue by stop, or behind the transaction that failed
        reasons = [d.reason for d in outcome.divergences] or ["not applied (no reason given)"]
        if not batch.exact:
            self._retry_exactly(batch, reasons[0])
            return
        pending = batch.pendings[0]
        self.failure = ApplyFailed(
            f"the target refused the source transaction ending at {format_lsn(pending.end_lsn)}: {reasons[0]}",
            reasons=reasons,
            lsn=pending.end_lsn,
            hint="Fix the cause on the target and start again: the slot sends this transaction again.",
        )
        log.error("%s", self.failure)
        self._failed.set()

    def _retry_exactly(self, batch: _Batch, reason: str) -> None:
        """A batch was refused: apply its transactions, and every one submitted after it, again,
        one by one and in source order. Those applied already are applied again, which the
        changes' idempotence allows and the order requires (a later batch was applied before
        this one's writes). Batching resumes once they are all confirmed."""
        log.warning(
            "the target refused a batch of %d source transaction(s) (%s); applying them one by one",
            len(batch.pendings), reason,
        )  # fmt: skip
        self.retried_exactly += 1
        self._batches.clear()  # outcomes of the blocks still in flight no longer count
        again = [p for p in self._pending if p.submitted and p.changes is not None]
        for pending in again:
            pending.done = False
        self._exact_until = again[-1] if again else None
        for pending in again:
            self._submit([pending], exact=True)
        # (The open batch, not submitted yet, follows one by one too: _exact_until is set.)

    def _advance(self) -> None:
        """Confirm the longest prefix of applied transactions: never past one still pending."""
        confirmed = 0
        while self._pending and self._pending[0].done:
            pending = self._pending.popleft()
            if pending is self._exact_until:
                self._exact_until = None
            counts = pending.changes.counts if pending.changes is not None else None
            pending.changes = None  # (its memory goes with it)
            self.transactions_applied += 1
            if counts is not None:
                for kind, n in counts.items():
                    self.rows[kind] += n
            confirmed = pending.end_lsn
            self.last_commit_time = pending.commit_time
        if confirmed > self.confirmed_lsn:
            self.confirmed_lsn = confirmed
            self.source.confirm(confirmed)

    async def _drain(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.drain):
                while self._pending and self.failure is None:
                    self._progress.clear()
                    await self._progress.wait()


def _key(table: _Table, values: Sequence[Value]) -> tuple[Value, ...]:
    return tuple(values[i] for i in table.keys)


def _query(sql: str, tables: tuple[str, ...]) -> Write:
    return Write(WriteKind.QUERY, sql, "", "cdc", tables)


def _fixup(txn: _TxnChanges, table: _Table, values: Sequence[Value], indexes: Iterable[int]) -> None:
    """json and jsonb values a row image cannot carry exactly get a statement of their own."""
    fixups = table.scalars(values, indexes)
    if fixups:
        txn.write(_query(_fixup_sql(table, values, fixups), (table.name,)))
