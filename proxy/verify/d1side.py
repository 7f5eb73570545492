"""`pgshift verify --store` and `pgshift repair --store`: a D1 store's tables against their Postgres source.

The source of each table is the store's ``source`` backend (else routing.primary: the feed's). Rows
are compared in the D1 canonical form -- the strings ``proxy.d1.types`` gives: what the feed writes
(``encode_row`` of the Postgres text values) and what D1 answers for ``Codec.select`` decoded back
-- so a row is equal exactly when D1 holds what the feed would have written for the source row.
The source is therefore read with the session's own text settings, as the feed reads it (only
``default_transaction_read_only`` and ``statement_timeout`` are set): a value stored in D1 as
Postgres' text (intervals, arrays, money, ...) is compared with the same text the feed got.

Modes:

* ``full`` (also what ``checksum`` does here: D1 has no hash of a row that could match one computed
  by Postgres): the source table is read in primary-key order by keyset pagination (``WHERE key >
  last ORDER BY key LIMIT n``, the primary-key index serves it), chunks of at most ``D1_CHUNK_ROWS``
  rows; the D1 rows of each chunk are fetched *by key list* (one D1 request of ``IN (…)``
  lookups; the next source chunk is read meanwhile). D1 orders keys as SQLite does (binary text,
  numbers before text), which need not be Postgres' collation order, so nothing is ever paired by
  position. Rows only in D1: every key D1 holds (keyset pages in D1's own order) that the source
  scan did not meet, each then looked up on both sides.
* ``sample``: ``sample`` random source rows (TABLESAMPLE, as verify does) looked up in D1, and
  ``sample`` random D1 keys (``ORDER BY random()``: D1 reads the table's key index once) looked up
  on the source.

Every difference is a candidate until the recheck rule (``compare.judge``) settles it after the lag
window (``recheck_after``, default 2 s): the feed streams, so a row written on the source a moment
ago may not be in D1 yet. Differences are reported in ``VerifyReport``/``TableResult``, keys and
values in the canonical form (bool ``1``/``0``, timestamptz in UTC ``…Z``, bytea as hex).

Repair (``repair_d1``) reads the source rows of the differing keys and, through the D1 writer's
statements, upserts them (keys the source has) or deletes them (keys it has not) -- in one D1
request, so one D1 transaction, when they fit one (1 MB) -- then compares those keys again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.cdc.sqlconn import Endpoint, SqlConnection, SqlError, qualified, quote_ident, quote_literal
from proxy.config import D1StoreConfig
from proxy.d1.client import D1Client, D1SqlError, Param, Statement
from proxy.d1.schema import (
    D1Column,
    D1SchemaError,
    D1Table,
    ExistingTable,
    read_d1_tables,
    read_pg_tables,
    split_name,
    table_differences,
    to_d1,
)
from proxy.d1.types import INFINITY, D1TypeError
from proxy.d1.types import quote_ident as d1_ident
from proxy.d1.writes import (
    delete_encoded_statements,
    encode_row,
    read_all_keys,
    read_encoded_keys,
    upsert_statements,
)
from proxy.errors import ConfigError
from proxy.verify.catalog import Note
from proxy.verify.chunks import Key
from proxy.verify.compare import Row, RowDifference, Verdict, diff_one, judge, sort_key
from proxy.verify.repair import RepairReport, keys_from_report
from proxy.verify.report import Mode, TableResult, VerifyReport
from proxy.verify.verify import (
    APPLICATION_NAME,
    DEFAULT_RECHECK_AFTER,
    KEY_BATCH,
    VerifyError,
    VerifyOptions,
    _Pace,
    timeout_sql,
)

D1_CHUNK_ROWS = 2_000  # source rows per chunk at most: their D1 rows come back in one request
CHECKSUM_NOTE = (
    "mode checksum is not available for a D1 store (D1 has no row hash that could match Postgres'): "
    "every row is compared (mode full)"
)


def _encode_row(table: D1Table, raw: Sequence[str | None]) -> tuple[Param, ...]:
    """A source row (Postgres text) in canonical form, as the feed writes it. A value D1 cannot
    hold (a float NaN) becomes a description, which no D1 value equals: reported, not fatal."""
    try:
        return encode_row(table, raw)
    except D1TypeError:
        out: list[str | None] = []
        for column, value in zip(table.columns, raw, strict=True):
            try:
                out.append(column.codec.encode(value))
            except D1TypeError as exc:
                out.append(f"(cannot be stored in D1: {exc.message})")
        return tuple(out)


@dataclass(frozen=True, slots=True)
class D1Place:
    """A D1 store as one side of a comparison (report.Place)."""

    store: str
    database_id: str
    api_base: str

    @classmethod
    def from_store(cls, name: str, store: D1StoreConfig) -> D1Place:
        return cls(name, store.database_id, store.api_base)

    @property
    def backend(self) -> str:
        return f"d1:{self.store}"

    @property
    def host(self) -> str:
        return urlsplit(self.api_base).netloc

    def label(self) -> str:
        return f"D1 database {self.database_id} at {self.host}"

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "kind": "d1",
            "store": self.store,
            "database_id": self.database_id,
            "address": self.host,
        }


# --- the source side --------------------------------------------------------------------------------


async def connect_source(endpoint: Endpoint, options: VerifyOptions) -> SqlConnection:
    """A read-only session with the server's own text settings (the feed's), DateStyle checked."""
    conn = await SqlConnection.connect(endpoint, APPLICATION_NAME)
    try:
        await conn.query("set default_transaction_read_only = on")
        datestyle = (await conn.query("show DateStyle"))[0][0] or ""
        if not datestyle.upper().startswith("ISO"):
            raise VerifyError(
                f"{endpoint.label()} writes dates as {datestyle!r}: the D1 feed reads (and verify compares) "
                "ISO dates (ALTER ROLE … SET DateStyle = 'ISO, MDY')"
            )
    except BaseException:
        await conn.close()
        raise
    return conn


def _source_sql(table: D1Table) -> str:
    schema, name = split_name(table.source)
    return qualified(schema, name)


def _select(table: D1Table) -> str:
    columns = ", ".join(quote_ident(c.name) for c in table.columns)
    return f"select {columns} from {_source_sql(table)}"


def _key_columns(table: D1Table) -> list[D1Column]:
    return [table.columns[p] for p in table.key_positions]


def _order(table: D1Table) -> str:
    return ", ".join(quote_ident(c) for c in table.primary_key)


def _tuple(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"({', '.join(items)})"


def _raw_literal(column: D1Column, text: str) -> str:
    """A Postgres text value of ``column`` as an SQL literal of its type."""
    return f"{quote_literal(text)}::{column.pg_type}"


def _canonical_literal(column: D1Column, value: str | None) -> str:
    """A canonical (D1) key value as an SQL literal of the source column's type: integers, text,
    dates, timestamps (``T``, ``Z``), numerics and uuids read back as they are; bool ``1``/``0``
    is valid boolean input; bytea from hex; ±Infinity from SQLite's ±9e999."""
    if value is None:
        return "null"
    kind = column.codec.kind
    if kind == "bytea":
        return f"decode({quote_literal(value)}, 'hex')"
    if kind == "float" and value.lstrip("-") == INFINITY:
        value = "-Infinity" if value.startswith("-") else "Infinity"
    return _raw_literal(column, value)


def _key_of(table: D1Table, row: Sequence[Param]) -> Key:
    return tuple(row[p] for p in table.key_positions)


async def source_chunk(
    conn: SqlConnection, table: D1Table, after: Sequence[str | None] | None, limit: int
) -> list[list[str | None]]:
    """Up to ``limit`` source rows (Postgres text) in primary-key order after the key ``after``
    (Postgres text values; None: from the start)."""
    where = ""
    if after is not None:
        columns = _key_columns(table)
        left = _tuple([quote_ident(c.name) for c in columns])
        right = _tuple(["null" if v is None else _raw_literal(c, v) for c, v in zip(columns, after, strict=True)])
        where = f" where {left} > {right}"
    return await conn.query(f"{_select(table)}{where} order by {_order(table)} limit {int(limit)}")


async def source_raw_by_keys(conn: SqlConnection, table: D1Table, keys: Sequence[Key]) -> dict[Key, list[str | None]]:
    """The source rows (Postgres text) with these canonical keys, by canonical key."""
    columns = _key_columns(table)
    left = _tuple([quote_ident(c.name) for c in columns])
    found: dict[Key, list[str | None]] = {}
    for at in range(0, len(keys), KEY_BATCH):
        batch = keys[at : at + KEY_BATCH]
        values = ", ".join(
            _tuple([_canonical_literal(c, v) for c, v in zip(columns, key, strict=True)]) for key in batch
        )
        for raw in await conn.query(f"{_select(table)} where {left} in ({values})"):
            found[_key_of(table, _encode_row(table, raw))] = raw
    return found


async def source_by_keys(conn: SqlConnection, table: D1Table, keys: Sequence[Key]) -> dict[Key, Row]:
    """The source rows with these canonical keys, in canonical form."""
    return {k: _encode_row(table, raw) for k, raw in (await source_raw_by_keys(conn, table, keys)).items()}


async def source_sample(conn: SqlConnection, table: D1Table, rows: int) -> dict[Key, Row]:
    """About ``rows`` random source rows (TABLESAMPLE sized from the planner's estimate; every page,
    Bernoulli, when that gives too few), in canonical form."""
    estimate = (await conn.query(f"select reltuples::bigint from pg_class where oid = {_regclass(table)}"))[0][0]
    count = int(estimate or 0)
    percent = 100.0 if count <= 0 else min(100.0, 100.0 * 3 * rows / count)

    async def take(method: str, pct: float) -> list[list[str | None]]:
        sample = "" if pct >= 100 else f" tablesample {method} ({pct:.6f})"
        columns = ", ".join(quote_ident(c.name) for c in table.columns)
        return await conn.query(f"select {columns} from {_source_sql(table)}{sample} order by random() limit {rows}")

    found = await take("system", percent)
    if percent < 100 and len(found) < rows:
        found = await take("bernoulli", min(100.0, percent * 4))
    return {_key_of(table, row): row for row in (_encode_row(table, raw) for raw in found)}


def _regclass(table: D1Table) -> str:
    return f"{quote_literal(_source_sql(table))}::regclass"


async def d1_sample_keys(client: D1Client, table: D1Table, rows: int) -> list[Key]:
    """``rows`` random keys of the D1 table (canonical form)."""
    columns = _key_columns(table)
    select = ", ".join(c.codec.select(c.name) for c in columns)
    result = await client.raw(f"SELECT {select} FROM {d1_ident(table.name)} ORDER BY random() LIMIT {int(rows)}")
    return [tuple(c.codec.decode(v) for c, v in zip(columns, values, strict=True)) for values in result.rows]


# --- the comparison ---------------------------------------------------------------------------------


@dataclass
class _Candidate:
    source: Row | None  # the last look at each side (None: no such row)
    target: Row | None


@dataclass
class _Table:
    d1: D1Table | None
    result: TableResult
    candidates: dict[Key, _Candidate] = field(default_factory=dict)


def _schema_notes(expected: D1Table, existing: ExistingTable | None) -> list[Note]:
    """How D1's table differs from the one the source implies. A missing table, a missing column or
    another primary key make it not comparable; the rest (types, NOT NULL, STRICT, extra columns)
    are notes: values are still compared in canonical form."""
    lines = table_differences(expected, existing)
    if not lines:
        return []
    have = {c.name: c for c in existing.columns} if existing is not None else {}
    key = tuple(c.name for c in sorted((c for c in have.values() if c.pk), key=lambda c: c.pk))
    problem = existing is None or any(c.name not in have for c in expected.columns) or key != expected.primary_key
    return [Note("d1_schema", line, problem=problem) for line in lines]


class D1Verifier:
    """Compares the tables of a D1 store (``place``, through ``client``) with their Postgres
    ``source``; ``tables`` as in the store's ``tables`` (``table`` or ``schema.table``)."""

    def __init__(
        self,
        source: Endpoint,
        place: D1Place,
        tables: Sequence[str],
        client: D1Client,
        options: VerifyOptions | None = None,
        *,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.source = source
        self.place = place
        self.table_names = list(tables)
        self.client = client
        self.options = options or VerifyOptions(mode="full")
        self._say = say or (lambda line: None)
        self._deadline: float | None = None
        self._stopped: str | None = None
        self._pace = _Pace(None)
        self._last_look = 0.0

    async def run(self) -> VerifyReport:
        options = self.options
        started = time.monotonic()
        self._deadline = started + options.max_duration if options.max_duration else None
        self._stopped = None
        self._pace = _Pace(options.rate_limit)
        window = options.recheck_after if options.recheck_after is not None else DEFAULT_RECHECK_AFTER
        warnings = [CHECKSUM_NOTE] if options.mode == "checksum" else []
        mode: Mode = "sample" if options.mode == "sample" else "full"
        report = VerifyReport(
            self.source, self.place, mode, [], recheck_after=window, rechecks=options.rechecks, warnings=warnings
        )
        conn = await connect_source(self.source, options)
        try:
            tables = await self._plan(conn)
            report.tables = [t.result for t in tables]
            await conn.query(timeout_sql(options))
            for table in tables:
                await self._table(conn, table)
            report.rechecked = await self._recheck(conn, tables, window)
        finally:
            await conn.close()
        report.stopped = self._stopped
        report.seconds = time.monotonic() - started
        return report

    async def _plan(self, conn: SqlConnection) -> list[_Table]:
        tables: list[_Table] = []
        for name in self.table_names:
            try:
                (d1,) = to_d1(await read_pg_tables(conn, [name]))
            except D1SchemaError as exc:
                note = Note("table_not_comparable", exc.message, problem=True)
                tables.append(_Table(None, TableResult("{}.{}".format(*split_name(name)), notes=[note])))
                continue
            notes = []
            if d1.name != split_name(name)[1]:
                notes.append(Note("d1_table", f"D1 table {d1.name}"))
            result = TableResult(d1.source, list(d1.primary_key), [c.name for c in d1.columns], notes)
            tables.append(_Table(d1, result))
        found = [t.d1 for t in tables if t.d1 is not None]
        existing = await read_d1_tables(self.client, [t.name for t in found])
        for table in tables:
            if table.d1 is not None:
                table.result.notes += _schema_notes(table.d1, existing.get(table.d1.name))
        return tables

    def _expired(self) -> bool:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._stopped = f"--max-duration {self.options.max_duration:g} s reached"
            return True
        return False

    async def _table(self, conn: SqlConnection, table: _Table) -> None:
        result = table.result
        if table.d1 is None or not result.comparable:
            result.complete = True
            return
        if self._expired():
            return
        began = time.monotonic()
        try:
            if self.options.mode == "sample":
                await self._sample(conn, table, table.d1)
            else:
                await self._full(conn, table, table.d1)
        except SqlError as exc:
            result.error = exc.message + (f" ({exc.hint})" if exc.hint else "")
        except D1SqlError as exc:
            result.error = f"D1: {exc.message}"
        result.seconds += time.monotonic() - began
        result.checked_at = time.time()
        rate = result.rows_compared / result.seconds if result.seconds > 0 else 0
        self._say(
            f"{result.table}: {result.rows_compared:,} rows, {result.chunks:,} chunk(s), "
            f"{len(table.candidates):,} candidate difference(s), {result.seconds:.1f} s ({rate:,.0f} rows/s)"
        )

    async def _full(self, conn: SqlConnection, table: _Table, d1: D1Table) -> None:
        """Every source row, chunk by chunk in the source's key order, each chunk's D1 rows by key;
        then every D1 key the source scan did not meet."""
        result = table.result
        limit = max(1, min(self.options.chunk_rows, D1_CHUNK_ROWS))
        seen: set[Key] = set()
        stopped = False
        pending: asyncio.Future[list[list[str | None]]] | None = asyncio.ensure_future(
            source_chunk(conn, d1, None, limit)
        )
        try:
            while pending is not None:
                raws = await pending
                pending = None
                if not raws:
                    break
                if len(raws) == limit:  # (more may follow: read the next chunk while D1 answers)
                    if self._expired():
                        stopped = True
                    else:
                        after = [raws[-1][p] for p in d1.key_positions]
                        pending = asyncio.ensure_future(source_chunk(conn, d1, after, limit))
                smap = {_key_of(d1, row): row for row in (_encode_row(d1, raw) for raw in raws)}
                tmap = await read_encoded_keys(self.client, d1, list(smap))
                result.chunks += 1
                result.rows_compared += len(smap)
                if smap != tmap:
                    result.chunks_mismatched += 1
                    self._observe(table, smap, tmap, list(smap))
                seen.update(smap)
                await self._pace.account(len(smap))
        finally:
            if pending is not None:  # (a failure meanwhile: let the read end, the connection stays usable)
                with contextlib.suppress(Exception):
                    await pending
        if stopped:
            return  # (incomplete: the D1-only keys are only known once the source was read to its end)
        held = await read_all_keys(self.client, d1)
        result.target_rows = len(held)
        extra = sorted((k for k in held if k not in seen), key=sort_key)
        for at in range(0, len(extra), KEY_BATCH):
            batch = extra[at : at + KEY_BATCH]
            smap = await source_by_keys(conn, d1, batch)
            tmap = await read_encoded_keys(self.client, d1, batch)
            self._observe(table, smap, tmap, batch)
        result.chunks_total = result.chunks
        result.complete = True

    async def _sample(self, conn: SqlConnection, table: _Table, d1: D1Table) -> None:
        n = self.options.sample
        smap = await source_sample(conn, d1, n)
        d1_keys = await d1_sample_keys(self.client, d1, n)
        lookup = [k for k in dict.fromkeys(d1_keys) if k not in smap]
        keys = [*smap, *lookup]
        tmap = await read_encoded_keys(self.client, d1, keys)
        if lookup:
            smap = {**await source_by_keys(conn, d1, lookup), **smap}
        self._observe(table, smap, tmap, keys)
        table.result.rows_compared = len(keys)
        table.result.target_rows = len(d1_keys)
        table.result.complete = True

    def _observe(self, table: _Table, smap: dict[Key, Row], tmap: dict[Key, Row], keys: Sequence[Key]) -> None:
        """Record the keys that differ as candidates (to recheck)."""
        self._last_look = time.monotonic()
        for key in keys:
            s, t = smap.get(key), tmap.get(key)
            if s == t:
                continue
            if key not in table.candidates and len(table.candidates) >= self.options.max_differences:
                table.result.differences_truncated = True
                continue
            table.candidates[key] = _Candidate(s, t)

    async def _recheck(self, conn: SqlConnection, tables: list[_Table], window: float) -> int:
        """Settle every candidate with the recheck rule (compare.judge); how many were rechecked."""
        pending = [t for t in tables if t.candidates]
        total = sum(len(t.candidates) for t in pending)
        for _ in range(self.options.rechecks):
            if not any(t.candidates for t in pending):
                break
            await asyncio.sleep(max(0.0, self._last_look + window - time.monotonic()))
            self._last_look = time.monotonic()
            for table in pending:
                if table.candidates:
                    await self._recheck_table(conn, table)
        for table in pending:
            result = table.result
            for key, cand in table.candidates.items():
                diff = diff_one(result.columns, key, cand.source, cand.target)
                if diff is not None:
                    # (never rechecked: rechecks 0; else it kept changing)
                    (result.unsettled if self.options.rechecks else result.differences).append(diff)
            table.candidates.clear()
            result.differences.sort(key=lambda d: sort_key(d.key))
            result.unsettled.sort(key=lambda d: sort_key(d.key))
        return total

    async def _recheck_table(self, conn: SqlConnection, table: _Table) -> None:
        assert table.d1 is not None
        keys = list(table.candidates)
        smap = await source_by_keys(conn, table.d1, keys)
        tmap = await read_encoded_keys(self.client, table.d1, keys)
        for key in keys:
            cand = table.candidates[key]
            s, t = smap.get(key), tmap.get(key)
            verdict = judge(cand.source, s, t)
            if verdict is Verdict.RESOLVED:
                del table.candidates[key]
            elif verdict is Verdict.CONFIRMED:
                del table.candidates[key]
                diff = diff_one(table.result.columns, key, s, t)
                if diff is not None:
                    table.result.differences.append(diff)
            else:
                table.candidates[key] = _Candidate(s, t)


async def verify_d1(
    source: Endpoint,
    place: D1Place,
    tables: Sequence[str],
    client: D1Client,
    options: VerifyOptions | None = None,
    *,
    say: Callable[[str], None] | None = None,
) -> VerifyReport:
    """One verification of a D1 store's ``tables`` against ``source``."""
    return await D1Verifier(source, place, tables, client, options, say=say).run()


# --- repair -----------------------------------------------------------------------------------------


def store_table(tables: Sequence[str], name: str) -> str:
    """The store's table named ``name`` (``t``, ``public.t``, ``schema.t``); ConfigError if none."""
    wanted = "{}.{}".format(*split_name(name.replace('"', "")))
    for table in tables:
        if "{}.{}".format(*split_name(table)) == wanted:
            return table
    raise ConfigError(f"table {name} is not one of the store's tables ({', '.join(tables)})")


def _as_key(key_columns: Sequence[str], given: Any) -> Key:
    if isinstance(given, dict):
        try:
            return tuple(given[c] for c in key_columns)
        except KeyError:
            raise ConfigError(f"a key in the report ({given}) does not have the columns {list(key_columns)}") from None
    return tuple(given)


async def repair_d1(
    source: Endpoint,
    place: D1Place,
    tables: Sequence[str],
    client: D1Client,
    table: str,
    *,
    report: Path | None = None,
    dry_run: bool = False,
    options: VerifyOptions | None = None,
) -> RepairReport:
    """Rewrite in D1 the rows of ``table`` (one of the store's ``tables``) that differ from the
    source: the keys listed for it in ``report`` (a ``verify --store … --report`` file), or else
    the differences a D1 verification finds now (with ``options``)."""
    options = options or VerifyOptions(mode="full")
    began = time.monotonic()
    given: list[dict[str, Any]] | None = None
    found_by = ""
    if report is not None:
        table, given = keys_from_report(report, table, source, place)
        found_by = f"report {report}"
    name = store_table(tables, table)
    conn = await connect_source(source, options)
    try:
        (d1,) = to_d1(await read_pg_tables(conn, [name]))
        await conn.query(timeout_sql(options))
        if given is None:
            found = await verify_d1(source, place, [name], client, replace(options, tables=None, state_file=None))
            result = found.tables[0]
            problems = [n.message for n in result.notes if n.problem] + ([result.error] if result.error else [])
            if problems:
                raise ConfigError(f"cannot repair {result.table}: " + "; ".join(problems))
            keys = [d.key for d in result.differences + result.unsettled]
            found_by = f"verify (mode {found.mode})"
        else:
            keys = [_as_key(d1.primary_key, k) for k in given]
        out = RepairReport(source, place, d1.source, list(d1.primary_key), dry_run, found_by)
        if keys:
            await _rewrite(conn, client, d1, keys, out)
            if not dry_run and out.error is None:
                out.still_differing = await _reverify(conn, client, d1, keys, options)
    finally:
        await conn.close()
    out.seconds = time.monotonic() - began
    return out


async def _rewrite(conn: SqlConnection, client: D1Client, d1: D1Table, keys: list[Key], out: RepairReport) -> None:
    """Upsert the keys the source has, delete the others: D1 writer statements, in as few requests
    (each one D1 transaction) as the limits allow -- one for a few thousand rows."""
    found = await source_raw_by_keys(conn, d1, keys)
    out.upserted = [k for k in keys if k in found]
    out.deleted = [k for k in keys if k not in found]
    if out.dry_run:
        return
    try:
        statements: list[Statement] = upsert_statements(d1, [found[k] for k in out.upserted], client.limits)
    except D1TypeError as exc:
        out.error = exc.message
        return
    statements += delete_encoded_statements(d1, [tuple(k) for k in out.deleted], client.limits)
    batches = client.plan(statements)
    for number, batch in enumerate(batches):
        try:
            await client.batch(batch)
        except D1SqlError as exc:
            out.error = f"D1: {exc.message}"
            if number:
                out.error += f" (request {number + 1} of {len(batches)}: the {number} before it were applied)"
            return


async def _reverify(
    conn: SqlConnection, client: D1Client, d1: D1Table, keys: list[Key], options: VerifyOptions
) -> list[RowDifference]:
    """The keys compared again; one that differs is rechecked as verify does (the feed may have
    written a newer source row into D1 just after repair read the source)."""
    window = options.recheck_after if options.recheck_after is not None else DEFAULT_RECHECK_AFTER
    columns = [c.name for c in d1.columns]
    previous: dict[Key, Row | None] = {}
    confirmed: list[RowDifference] = []
    pending = keys
    for attempt in range(options.rechecks + 1):
        smap = await source_by_keys(conn, d1, pending)
        tmap = await read_encoded_keys(client, d1, pending)
        waiting: list[Key] = []
        for key in pending:
            s, t = smap.get(key), tmap.get(key)
            diff = diff_one(columns, key, s, t)
            if diff is None:
                continue
            settled = attempt > 0 and judge(previous[key], s, t) is Verdict.CONFIRMED
            if settled or attempt == options.rechecks:
                confirmed.append(diff)
            else:
                waiting.append(key)
                previous[key] = s
        pending = waiting
        if not pending:
            break
        await asyncio.sleep(window)
    return confirmed
