"""D1 table definitions derived from Postgres tables, and their differences from a D1 database.

From the Postgres catalog (read by the caller's connection: anything with an async ``json(sql)``,
such as ``proxy.cdc.sqlconn.SqlConnection``) each table becomes a STRICT SQLite table: the same
columns in the same order, each with the D1 type of ``types.codec_for``, NOT NULL where Postgres
has it, and the same primary key. A table in schema ``public`` keeps its name; one in another
schema is named ``schema_table``. A table without a primary key is refused: changes are applied
to D1 by primary key.

``schema_sql`` is a file for ``wrangler d1 execute DB --remote --file schema.sql`` (or a
migration in ``wrangler d1 migrations``); ``differences`` compares the expected tables with what
``PRAGMA table_list`` / ``table_info`` report on D1, one line per difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.d1.client import D1Client, Statement
from proxy.d1.types import Codec, codec_for, quote_ident
from proxy.errors import PgShiftError


class D1SchemaError(PgShiftError):
    """A table cannot be put in D1 as asked (missing on the source, no primary key, name clash)."""


class JsonQuery(Protocol):
    """A Postgres connection that runs a query returning one JSON value (SqlConnection.json)."""

    async def json(self, sql: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class PgColumn:
    name: str
    type: str  # format_type(): "character varying(40)", "integer[]", "public.mood"
    base: str  # pg_type.typname of the base type (a domain's underlying type): "varchar", "_int4"
    not_null: bool


@dataclass(frozen=True, slots=True)
class PgTable:
    schema: str
    name: str
    columns: tuple[PgColumn, ...]
    primary_key: tuple[str, ...]  # column names in key order; () when there is none

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class D1Column:
    name: str
    pg_type: str
    codec: Codec
    not_null: bool

    @property
    def sqlite_type(self) -> str:
        return self.codec.sqlite_type


@dataclass(frozen=True, slots=True)
class D1Table:
    """A table as D1 holds it, and where it comes from (``source``: schema.table on Postgres)."""

    name: str
    source: str
    columns: tuple[D1Column, ...]
    primary_key: tuple[str, ...]
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update({c.name: i for i, c in enumerate(self.columns)})

    def position(self, column: str) -> int:
        return self._index[column]

    @property
    def key_positions(self) -> tuple[int, ...]:
        return tuple(self._index[c] for c in self.primary_key)


def split_name(name: str) -> tuple[str, str]:
    """``"schema.table"`` or ``"table"`` (schema public) → (schema, table)."""
    schema, dot, table = name.partition(".")
    return (schema, table) if dot else ("public", name)


def d1_name(schema: str, table: str) -> str:
    return table if schema == "public" else f"{schema}_{table}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def catalog_sql(names: Sequence[str]) -> str:
    """One query returning, as one JSON array, the columns and primary key of each named table."""
    pairs = ", ".join(f"({_literal(s)}, {_literal(t)})" for s, t in map(split_name, names))
    return f"""
SELECT coalesce(json_agg(t ORDER BY t.schema, t.name), '[]')::text FROM (
  SELECT n.nspname AS schema, c.relname AS name,
    (SELECT json_agg(json_build_object(
        'name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
        'base', bt.typname, 'not_null', a.attnotnull) ORDER BY a.attnum)
       FROM pg_attribute a
       JOIN pg_type ty ON ty.oid = a.atttypid
       JOIN pg_type bt ON bt.oid = CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE ty.oid END
      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
    (SELECT json_agg(a.attname ORDER BY k.ord)
       FROM pg_index i
       CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
      WHERE i.indrelid = c.oid AND i.indisprimary) AS primary_key
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p') AND (n.nspname, c.relname) IN (VALUES {pairs})
) t"""


def parse_catalog(data: Any) -> list[PgTable]:
    tables = []
    for t in data:
        columns = tuple(PgColumn(c["name"], c["type"], c["base"], bool(c["not_null"])) for c in t["columns"] or [])
        tables.append(PgTable(t["schema"], t["name"], columns, tuple(t["primary_key"] or ())))
    return tables


async def read_pg_tables(conn: JsonQuery, names: Sequence[str]) -> list[PgTable]:
    """The named tables from the Postgres catalog, in the order named; D1SchemaError if any is missing."""
    found = {t.qualified: t for t in parse_catalog(await conn.json(catalog_sql(names)))}
    wanted = ["{}.{}".format(*split_name(n)) for n in names]
    missing = [w for w in wanted if w not in found]
    if missing:
        raise D1SchemaError(
            f"table(s) {', '.join(missing)} not found on the source database",
            hint="check the store's tables = [...] (a table outside schema public is written schema.table)",
        )
    return [found[w] for w in wanted]


def to_d1(tables: Sequence[PgTable]) -> list[D1Table]:
    """The D1 definitions of Postgres tables; D1SchemaError for a table without primary key or a name clash."""
    out: list[D1Table] = []
    seen: dict[str, str] = {}
    problems = []
    for table in tables:
        name = d1_name(table.schema, table.name)
        if name in seen:
            problems.append(f"{table.qualified} and {seen[name]} would both be table {name!r} in D1")
        seen[name] = table.qualified
        if not table.primary_key:
            problems.append(
                f"{table.qualified} has no primary key: D1 receives changes by primary key, so it needs one"
            )
            continue
        columns = tuple(
            D1Column(c.name, c.type, codec_for(c.base), c.not_null or c.name in table.primary_key)
            for c in table.columns
        )
        out.append(D1Table(name, table.qualified, columns, table.primary_key))
    if problems:
        raise D1SchemaError("; ".join(problems))
    return out


def create_table_sql(table: D1Table) -> str:
    width = max(len(quote_ident(c.name)) for c in table.columns)
    lines = []
    for column in table.columns:
        null = " NOT NULL" if column.not_null else ""
        definition = f"{quote_ident(column.name).ljust(width)} {column.sqlite_type}{null},"
        lines.append(f"  {definition.ljust(width + 18)} -- {column.pg_type}")
    key = ", ".join(quote_ident(c) for c in table.primary_key)
    lines.append(f"  PRIMARY KEY ({key})")
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_ident(table.name)} (  -- {table.source}\n"
        + "\n".join(lines)
        + "\n) STRICT;"
    )


def schema_sql(tables: Sequence[D1Table], header: Sequence[str] = ()) -> str:
    """The whole schema file: a comment header, then one CREATE TABLE per table."""
    lines = [f"-- {line}" if line else "--" for line in header]
    body = "\n\n".join(create_table_sql(t) for t in tables)
    return ("\n".join(lines) + "\n\n" if lines else "") + body + "\n"


@dataclass(frozen=True, slots=True)
class ExistingColumn:
    name: str
    type: str
    not_null: bool
    pk: int  # position in the primary key, 1-based; 0: not in it


@dataclass(frozen=True, slots=True)
class ExistingTable:
    name: str
    strict: bool
    columns: tuple[ExistingColumn, ...]


_EXISTING_SQL = (
    'SELECT l.name, l.strict, i.cid, i.name, i.type, i."notnull", i.pk '
    "FROM pragma_table_list AS l JOIN pragma_table_info(l.name) AS i "
    "WHERE l.schema = 'main' AND l.type = 'table' AND l.name IN ({}) ORDER BY l.name, i.cid"
)


async def read_d1_tables(client: D1Client, names: Sequence[str]) -> dict[str, ExistingTable]:
    """The named tables as D1 has them (absent names: not there)."""
    statements = []
    step = client.limits.max_params
    for start in range(0, len(names), step):
        chunk = list(names[start : start + step])
        statements.append(Statement(_EXISTING_SQL.format(", ".join("?" * len(chunk))), tuple(chunk)))
    found: dict[str, tuple[bool, list[ExistingColumn]]] = {}
    for result in await client.batch_raw(statements) if statements else []:
        for name, strict, _cid, column, type_, not_null, pk in result.rows:
            entry = found.setdefault(name, (bool(strict), []))
            entry[1].append(ExistingColumn(column, str(type_).upper(), bool(not_null), int(pk)))
    return {name: ExistingTable(name, strict, tuple(cols)) for name, (strict, cols) in found.items()}


def table_differences(expected: D1Table, existing: ExistingTable | None) -> list[str]:
    """Each way the D1 table differs from what it should be, as a sentence; [] when it matches."""
    where = f"table {expected.name!r}"
    if existing is None:
        return [f"{where} ({expected.source}) does not exist on D1"]
    out = []
    if not existing.strict:
        out.append(f"{where} is not STRICT on D1 (values of any type would be accepted)")
    have = {c.name: c for c in existing.columns}
    for column in expected.columns:
        got = have.get(column.name)
        if got is None:
            out.append(
                f"{where}: column {column.name!r} is missing on D1 (expected {column.sqlite_type}, {column.pg_type})"
            )
            continue
        if got.type != column.sqlite_type:
            out.append(
                f"{where}: column {column.name!r} is {got.type or '(no type)'} on D1, expected "
                f"{column.sqlite_type} (Postgres {column.pg_type})"
            )
        if got.not_null != column.not_null:
            state = "NOT NULL" if got.not_null else "nullable"
            want = "NOT NULL" if column.not_null else "nullable"
            out.append(f"{where}: column {column.name!r} is {state} on D1, expected {want}")
    wanted = {c.name for c in expected.columns}
    for extra in existing.columns:
        if extra.name not in wanted:
            out.append(f"{where}: column {extra.name!r} exists on D1 but not on Postgres ({expected.source})")
    key = tuple(c.name for c in sorted((c for c in existing.columns if c.pk), key=lambda c: c.pk))
    if key != expected.primary_key:
        out.append(
            f"{where}: primary key is ({', '.join(key) or 'none'}) on D1, expected ({', '.join(expected.primary_key)})"
        )
    return out


async def differences(client: D1Client, tables: Sequence[D1Table]) -> dict[str, list[str]]:
    """Per table name: how D1 differs from the expected definition ([] = it matches)."""
    existing = await read_d1_tables(client, [t.name for t in tables])
    return {t.name: table_differences(t, existing.get(t.name)) for t in tables}


@dataclass
class ApplyResult:
    created: list[str]
    unchanged: list[str]
    differences: dict[str, list[str]]  # tables that exist but differ: left alone

    @property
    def ok(self) -> bool:
        return not self.differences


async def apply_schema(client: D1Client, tables: Sequence[D1Table]) -> ApplyResult:
    """Create the tables missing on D1 (in one transaction); tables that exist are left alone and
    reported if they differ."""
    existing = await read_d1_tables(client, [t.name for t in tables])
    found = {t.name: table_differences(t, existing.get(t.name)) for t in tables}
    missing = [t for t in tables if t.name not in existing]
    different = {name: diff for name, diff in found.items() if diff and name in existing}
    unchanged = [t.name for t in tables if t.name in existing and not found[t.name]]
    if missing:
        await client.batch([Statement(create_table_sql(t)) for t in missing])
    return ApplyResult([t.name for t in missing], unchanged, different)
