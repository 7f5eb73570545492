"""Row images → D1 statements (upserts and deletes by primary key), and rows read back from D1.

A row is a sequence of Postgres text-format values in the table's column order (None for NULL),
as pgoutput and ``COPY … TO STDOUT`` give them; a key is the primary-key values in key order.

- Upserts: ``INSERT INTO t (cols) VALUES (…), (…) ON CONFLICT (pk) DO UPDATE SET c = excluded.c``
  with as many rows per statement as D1's 100 bound parameters allow (100 // columns), fewer if
  the SQL would pass D1's 100,000 bytes. A later row for the same key wins, as in the source.
- Deletes: ``DELETE FROM t WHERE pk IN (?, …)`` (``(a = ? AND b = ?) OR …`` for a composite key).
- ``change_statements`` keeps the order of a change stream: consecutive changes of one kind to one
  table share statements; anything else starts a new one.
- ``D1Writer`` sends them with ``D1Client.execute``: batches within the request budget, each batch
  one transaction.
- For a change stream (``proxy.cdc.d1feed``) a ``Change`` may also be a ``patch`` (an update that
  left TOASTed columns out: ``UPDATE t SET <the columns sent> WHERE pk = ?``), a ``move`` (such an
  update that also changed the key: the old row is copied to the new key with the columns sent,
  the old key deleted, the new key patched in case the old row was not there) or a ``truncate``
  (``DELETE FROM t``).

Reading back (``read_rows``, ``read_keys``) selects each column in its lossless form
(``Codec.select``) and decodes it to the same canonical strings ``encode_row`` gives, so a row is
equal on both sides exactly when D1 holds what Postgres holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from proxy.d1.client import D1Client, Limits, Param, Statement
from proxy.d1.schema import D1Table
from proxy.d1.types import D1TypeError, quote_ident

Row = Sequence[str | None]
Canonical = tuple[str | None, ...]


def encode_row(table: D1Table, row: Row) -> tuple[Param, ...]:
    """Postgres text values (every column, in order) → D1 parameters (= canonical form)."""
    if len(row) != len(table.columns):
        raise D1TypeError(f"table {table.name!r}: a row has {len(row)} values for {len(table.columns)} columns")
    try:
        return tuple(c.codec.encode(v) for c, v in zip(table.columns, row, strict=True))
    except D1TypeError as exc:
        raise D1TypeError(f"table {table.name!r}: {exc.message}") from None


def encode_key(table: D1Table, key: Row) -> tuple[Param, ...]:
    """Postgres text values of the primary key (in key order) → D1 parameters."""
    if len(key) != len(table.primary_key):
        raise D1TypeError(f"table {table.name!r}: a key has {len(key)} values for {len(table.primary_key)} columns")
    columns = [table.columns[p] for p in table.key_positions]
    try:
        return tuple(c.codec.encode(v) for c, v in zip(columns, key, strict=True))
    except D1TypeError as exc:
        raise D1TypeError(f"table {table.name!r}: {exc.message}") from None


def _chunks(
    items: Sequence[tuple[Param, ...]], per_item: int, head: int, item_sql: int, limits: Limits
) -> Iterable[Sequence[tuple[Param, ...]]]:
    """Runs of items whose parameters and SQL stay within the statement limits."""
    per_statement = max(1, limits.max_params // max(per_item, 1))
    if item_sql:
        per_statement = max(1, min(per_statement, (limits.max_sql_bytes - head) // item_sql))
    for start in range(0, len(items), per_statement):
        yield items[start : start + per_statement]


def upsert_statements(table: D1Table, rows: Iterable[Row], limits: Limits | None = None) -> list[Statement]:
    """Multi-row upserts of ``rows`` (Postgres text values, every column in order)."""
    limits = limits or Limits()
    encoded = [encode_row(table, row) for row in rows]
    if not encoded:
        return []
    names = ", ".join(quote_ident(c.name) for c in table.columns)
    values = "(" + ", ".join(c.codec.placeholder for c in table.columns) + ")"
    key = ", ".join(quote_ident(c) for c in table.primary_key)
    rest = [quote_ident(c.name) for c in table.columns if c.name not in table.primary_key]
    action = "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in rest) if rest else "DO NOTHING"
    head = f"INSERT INTO {quote_ident(table.name)} ({names}) VALUES "
    tail = f" ON CONFLICT ({key}) {action}"
    out = []
    for chunk in _chunks(encoded, len(table.columns), len(head.encode()) + len(tail.encode()), len(values) + 2, limits):
        sql = head + ", ".join([values] * len(chunk)) + tail
        out.append(Statement(sql, tuple(p for row in chunk for p in row)))
    return out


def _key_match(table: D1Table) -> tuple[str, str, str]:
    """(head, one key's condition, joiner) of a WHERE clause matching any of some keys."""
    columns = [table.columns[p] for p in table.key_positions]
    if len(columns) == 1:
        return f"{quote_ident(columns[0].name)} IN (", columns[0].codec.placeholder, ", "
    condition = "(" + " AND ".join(f"{quote_ident(c.name)} = {c.codec.placeholder}" for c in columns) + ")"
    return "", condition, " OR "


def delete_statements(table: D1Table, keys: Iterable[Row], limits: Limits | None = None) -> list[Statement]:
    """Deletes of the rows with these primary keys (Postgres text values, in key order)."""
    return delete_encoded_statements(table, [encode_key(table, key) for key in keys], limits)


def delete_encoded_statements(
    table: D1Table, encoded: Sequence[tuple[Param, ...]], limits: Limits | None = None
) -> list[Statement]:
    """Deletes of the rows with these primary keys given as D1 parameters (the canonical form
    ``read_all_keys`` gives, which ``encode_key`` would not take back for every type: bytea)."""
    limits = limits or Limits()
    if not encoded:
        return []
    open_, condition, joiner = _key_match(table)
    close = ")" if open_ else ""
    head = f"DELETE FROM {quote_ident(table.name)} WHERE {open_}"
    out = []
    size = len(head.encode()) + len(close)
    for chunk in _chunks(encoded, len(table.primary_key), size, len(condition) + len(joiner), limits):
        sql = head + joiner.join([condition] * len(chunk)) + close
        out.append(Statement(sql, tuple(p for key in chunk for p in key)))
    return out


@dataclass(frozen=True, slots=True)
class Change:
    """One change to apply: ``upsert`` carries the whole new row, ``delete`` the key.

    ``patch`` and ``move`` carry a whole-width row of which only the positions in ``present`` hold
    values (the others: TOASTed columns the source left unchanged and did not send); ``move`` also
    carries the row's previous key in ``old_key``. ``truncate`` empties the table (``values`` ())."""

    kind: Literal["upsert", "delete", "patch", "move", "truncate"]
    table: D1Table
    values: Row
    present: tuple[int, ...] | None = None  # patch, move: the positions of the columns sent
    old_key: Row | None = None  # move: the key the row had


def _key_where(table: D1Table) -> str:
    columns = [table.columns[p] for p in table.key_positions]
    return " AND ".join(f"{quote_ident(c.name)} = {c.codec.placeholder}" for c in columns)


def _present_params(table: D1Table, row: Row, positions: Sequence[int]) -> tuple[Param, ...]:
    try:
        return tuple(table.columns[p].codec.encode(row[p]) for p in positions)
    except D1TypeError as exc:
        raise D1TypeError(f"table {table.name!r}: {exc.message}") from None


def patch_statements(table: D1Table, row: Row, present: Sequence[int]) -> list[Statement]:
    """``UPDATE t SET <present non-key columns> WHERE pk = <row's key>``: an update whose other
    columns (TOASTed, unchanged) the source did not send, so D1 keeps its values for them."""
    keys = set(table.key_positions)
    positions = [p for p in sorted(present) if p not in keys]
    if not positions:
        return []  # (only the key was sent: nothing to change)
    sets = ", ".join(f"{quote_ident(table.columns[p].name)} = {table.columns[p].codec.placeholder}" for p in positions)
    key = encode_key(table, [row[p] for p in table.key_positions])
    sql = f"UPDATE {quote_ident(table.name)} SET {sets} WHERE {_key_where(table)}"
    return [Statement(sql, _present_params(table, row, positions) + key)]


def move_statements(table: D1Table, old_key: Row, row: Row, present: Sequence[int]) -> list[Statement]:
    """An update that changed the key and left columns out: the old row copied to the new key with
    the columns sent (``INSERT … SELECT … FROM t WHERE <old key> ON CONFLICT DO UPDATE``), the old
    key deleted, and the new key patched (for when the old row is not in D1: a replay after the row
    had moved on; the new key's row then holds the other columns already)."""
    wanted = set(present) | set(table.key_positions)
    select = ", ".join(c.codec.placeholder if i in wanted else quote_ident(c.name) for i, c in enumerate(table.columns))
    names = ", ".join(quote_ident(c.name) for c in table.columns)
    key = ", ".join(quote_ident(c) for c in table.primary_key)
    rest = [quote_ident(c.name) for c in table.columns if c.name not in table.primary_key]
    action = "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in rest) if rest else "DO NOTHING"
    old = encode_key(table, old_key)
    # (the WHERE also keeps SQLite from reading ON CONFLICT as a join constraint of the SELECT)
    insert = Statement(
        f"INSERT INTO {quote_ident(table.name)} ({names}) SELECT {select} FROM {quote_ident(table.name)} "
        f"WHERE {_key_where(table)} ON CONFLICT ({key}) {action}",
        _present_params(table, row, sorted(wanted)) + old,
    )
    delete = Statement(f"DELETE FROM {quote_ident(table.name)} WHERE {_key_where(table)}", old)
    return [insert, delete, *patch_statements(table, row, present)]


def change_statements(changes: Iterable[Change], limits: Limits | None = None) -> list[Statement]:
    """Statements applying ``changes`` in order (consecutive upserts, or deletes, to one table
    grouped; patches, moves and truncates one by one)."""
    out: list[Statement] = []
    run: list[Row] = []
    current: tuple[str, str] | None = None
    table: D1Table | None = None

    def flush() -> None:
        if table is not None and run:
            build = upsert_statements if current and current[0] == "upsert" else delete_statements
            out.extend(build(table, run, limits))
        run.clear()

    for change in changes:
        if change.kind in ("patch", "move", "truncate"):
            flush()
            current = table = None
            t = change.table
            if change.kind == "truncate":
                out.append(Statement(f"DELETE FROM {quote_ident(t.name)}"))
            elif change.kind == "patch":
                out.extend(patch_statements(t, change.values, change.present or ()))
            else:
                assert change.old_key is not None, "a move needs old_key"
                out.extend(move_statements(t, change.old_key, change.values, change.present or ()))
            continue
        kind = (change.kind, change.table.name)
        if kind != current:
            flush()
            current, table = kind, change.table
        run.append(change.values)
    flush()
    return out


class D1Writer:
    """Applies row images to D1 tables through a client; counts what it sent."""

    def __init__(self, client: D1Client) -> None:
        self.client = client
        self.rows = 0  # rows (upserted or deleted) handed in
        self.changes = 0  # rows D1 reported changed

    async def upsert(self, table: D1Table, rows: Sequence[Row]) -> int:
        return await self._run(upsert_statements(table, rows, self.client.limits), len(rows))

    async def delete(self, table: D1Table, keys: Sequence[Row]) -> int:
        return await self._run(delete_statements(table, keys, self.client.limits), len(keys))

    async def apply(self, changes: Sequence[Change]) -> int:
        return await self._run(change_statements(changes, self.client.limits), len(changes))

    async def delete_encoded(self, table: D1Table, keys: Sequence[tuple[Param, ...]]) -> int:
        """Deletes by keys in their canonical form (as ``read_all_keys`` gives them)."""
        return await self._run(delete_encoded_statements(table, keys, self.client.limits), len(keys))

    async def _run(self, statements: list[Statement], rows: int) -> int:
        changed = await self.client.execute(statements)
        self.rows += rows
        self.changes += changed
        return changed


# --- reading back ---


def decode_row(table: D1Table, values: Sequence[object]) -> Canonical:
    """A row as ``select_list`` reads it from D1 → canonical strings (as ``encode_row`` gives)."""
    return tuple(c.codec.decode(v) for c, v in zip(table.columns, values, strict=True))


def select_list(table: D1Table) -> str:
    return ", ".join(c.codec.select(c.name) for c in table.columns)


def _order(table: D1Table) -> str:
    return ", ".join(quote_ident(c) for c in table.primary_key)


async def read_rows(
    client: D1Client, table: D1Table, *, after: Row | None = None, limit: int = 1000
) -> list[Canonical]:
    """Up to ``limit`` rows in D1's primary-key order, after the key ``after`` (Postgres text
    values; None: from the start): keyset pagination for a chunked scan."""
    sql = f"SELECT {select_list(table)} FROM {quote_ident(table.name)}"
    params: tuple[Param, ...] = ()
    if after is not None:
        columns = [table.columns[p] for p in table.key_positions]
        left = ", ".join(quote_ident(c.name) for c in columns)
        right = ", ".join(c.codec.placeholder for c in columns)
        sql += f" WHERE ({left}) > ({right})"
        params = encode_key(table, after)
    sql += f" ORDER BY {_order(table)} LIMIT {int(limit)}"
    result = await client.raw(sql, params)
    return [decode_row(table, row) for row in result.rows]


async def read_keys(client: D1Client, table: D1Table, keys: Sequence[Row]) -> dict[Canonical, Canonical]:
    """The D1 rows with these primary keys (Postgres text values), by canonical key; absent keys
    are missing from the answer. One request, one statement per 100 key values."""
    return await read_encoded_keys(client, table, [encode_key(table, key) for key in keys])


async def read_encoded_keys(
    client: D1Client, table: D1Table, encoded: Sequence[tuple[Param, ...]]
) -> dict[Canonical, Canonical]:
    """``read_keys`` for keys already in canonical form (as ``encode_key`` or ``read_all_keys``
    give them; ``encode_key`` would not take a canonical bytea key back)."""
    if not encoded:
        return {}
    open_, condition, joiner = _key_match(table)
    close = ")" if open_ else ""
    head = f"SELECT {select_list(table)} FROM {quote_ident(table.name)} WHERE {open_}"
    statements = [
        Statement(head + joiner.join([condition] * len(chunk)) + close, tuple(p for key in chunk for p in key))
        for chunk in _chunks(
            encoded, len(table.primary_key), len(head.encode()), len(condition) + len(joiner), client.limits
        )
    ]
    found: dict[Canonical, Canonical] = {}
    for batch in client.plan(statements):
        for result in await client.batch_raw(batch):
            for row in result.rows:
                decoded = decode_row(table, row)
                found[tuple(decoded[p] for p in table.key_positions)] = decoded
    return found


async def read_all_keys(client: D1Client, table: D1Table, *, page: int = 5000) -> set[tuple[Param, ...]]:
    """Every primary key D1 holds in ``table``, in canonical form (what ``encode_key`` gives), by
    keyset pagination in D1's key order."""
    columns = [table.columns[p] for p in table.key_positions]
    select = ", ".join(c.codec.select(c.name) for c in columns)
    left = ", ".join(quote_ident(c.name) for c in columns)
    right = ", ".join(c.codec.placeholder for c in columns)
    found: set[tuple[Param, ...]] = set()
    after: tuple[Param, ...] | None = None
    while True:
        sql = f"SELECT {select} FROM {quote_ident(table.name)}"
        if after is not None:
            sql += f" WHERE ({left}) > ({right})"
        sql += f" ORDER BY {_order(table)} LIMIT {int(page)}"
        result = await client.raw(sql, after or ())
        for values in result.rows:
            found.add(tuple(c.codec.decode(v) for c, v in zip(columns, values, strict=True)))
        if len(result.rows) < page:
            return found
        last = result.rows[-1]
        after = tuple(c.codec.decode(v) for c, v in zip(columns, last, strict=True))
