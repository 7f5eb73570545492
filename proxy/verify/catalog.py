"""Which tables to compare and how: columns and primary keys on both sides, paired, with the schema notes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.cdc.sqlconn import SqlConnection, SqlError, qualified, quote_literal
from proxy.errors import ConfigError
from proxy.verify.canonical import COLLATABLE, ColumnType, is_safe, row_piece

_TABLES = """
select coalesce(json_agg(json_build_object(
  'schema', n.nspname, 'name', c.relname, 'reltuples', c.reltuples::bigint,
  'key', (select json_agg(a.attname order by k.ord)
          from pg_index i cross join unnest(i.indkey) with ordinality k(attnum, ord)
          join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
          where i.indrelid = c.oid and i.indisprimary),
  'columns', (select coalesce(json_agg(json_build_object(
                 'name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
                 'base', case when t.typtype = 'd' then bt.typname else t.typname end,
                 'not_null', a.attnotnull, 'generated', a.attgenerated <> '', 'identity', a.attidentity::text,
                 'collation', co.collname) order by a.attnum), '[]')
              from pg_attribute a join pg_type t on t.oid = a.atttypid
              left join pg_type bt on bt.oid = t.typbasetype
              left join pg_collation co on co.oid = a.attcollation
              where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped)
) order by n.nspname, c.relname), '[]')
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relkind in ('r', 'p') and {where}
"""
_ALL = """n.nspname not in ('pg_catalog', 'information_schema') and n.nspname !~ '^pg_(toast|temp_)'
  and not c.relispartition and c.relname !~ '^pgshift_'"""

SERVER_INFO = """
select json_build_object('version', current_setting('server_version'),
  'version_num', current_setting('server_version_num')::int,
  'encoding', current_setting('server_encoding'),
  'superuser', (select rolsuper from pg_roles where rolname = current_user))
"""


@dataclass(frozen=True, slots=True)
class Note:
    """Something about a table's schema worth knowing: a column only on one side, types that differ."""

    code: str  # type_mismatch | column_only_in_source | column_only_in_target | key_mismatch | no_primary_key | ...
    message: str
    column: str | None = None
    problem: bool = False  # the table cannot be (fully) verified because of it

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "column": self.column, "problem": self.problem}


@dataclass(frozen=True, slots=True)
class Side:
    """A table on one side: its quoted name and the compared columns (in the same order on both sides)."""

    sql: str
    columns: tuple[ColumnType, ...]  # compared columns, paired by position with the other side's
    key: tuple[ColumnType, ...]  # the primary key columns (source's key order)
    pieces: tuple[str, ...]  # row_piece() of each compared column
    key_collate_c: bool  # order text keys under COLLATE "C" (the two sides' collations differ)
    all_columns: tuple[ColumnType, ...] = ()  # every column of the table on this side

    def key_order(self) -> str:
        return ", ".join(self.key_ref(k) for k in self.key)

    def key_ref(self, column: ColumnType) -> str:
        if self.key_collate_c and column.base in COLLATABLE:
            return f'{column.sql} collate "C"'
        return column.sql


@dataclass
class TablePlan:
    """One table to compare: both sides, or why it cannot be compared."""

    name: str  # schema.name
    source: Side | None
    target: Side | None
    notes: list[Note] = field(default_factory=list)
    reltuples: int | None = None  # the source's estimate (None: never analyzed)

    @property
    def columns(self) -> list[str]:
        return [c.name for c in self.source.columns] if self.source else []

    @property
    def key(self) -> list[str]:
        return [c.name for c in self.source.key] if self.source else []

    @property
    def comparable(self) -> bool:
        return self.source is not None and self.target is not None


def _column(raw: dict[str, Any]) -> ColumnType:
    return ColumnType(
        raw["name"], raw["type"], raw["base"], bool(raw["not_null"]), bool(raw["generated"]),
        raw["identity"] or "", raw["collation"],
    )  # fmt: skip


async def read_tables(conn: SqlConnection, names: list[str] | None) -> list[dict[str, Any]]:
    """Catalog rows of the tables (all but pgshift_* when ``names`` is None; quoted names)."""
    if names is None:
        where = _ALL
    elif not names:
        return []
    else:
        array = "array[" + ", ".join(quote_literal(n) for n in names) + "]::text[]"
        where = f"c.oid in (select to_regclass(x) from unnest({array}) x)"
    result: list[dict[str, Any]] = await conn.json(_TABLES.format(where=where))
    return result


async def resolve_names(conn: SqlConnection, names: list[str]) -> tuple[list[str], list[str]]:
    """``--tables`` resolved on the source the way SQL would (search_path): (schema.name of each
    found, the names not found)."""
    array = "array[" + ", ".join(quote_literal(n) for n in names) + "]::text[]"
    sql = f"""
        select json_agg(json_build_object('given', g, 'schema', n.nspname, 'name', c.relname) order by o)
        from unnest({array}) with ordinality u(g, o)
        left join pg_class c on c.oid = to_regclass(g) and c.relkind in ('r', 'p')
        left join pg_namespace n on n.oid = c.relnamespace"""
    try:
        found: list[dict[str, Any]] = await conn.json(sql)
    except SqlError as exc:
        if exc.sqlstate == "42602":  # invalid_name
            raise ConfigError(f"--tables: {exc.message}") from None
        raise
    resolved: list[str] = []
    missing: list[str] = []
    for row in found:
        if row["name"] is None:
            missing.append(row["given"])
        elif qualified(row["schema"], row["name"]) not in resolved:
            resolved.append(qualified(row["schema"], row["name"]))
    return resolved, missing


async def plan_tables(src: SqlConnection, tgt: SqlConnection, names: list[str] | None) -> list[TablePlan]:
    """Pair every selected source table with the target's; tables named but not found are plans
    without sides (reported as problems)."""
    missing: list[str] = []
    if names is not None:
        names, missing = await resolve_names(src, names)
    source_tables = await read_tables(src, names)
    quoted = [qualified(t["schema"], t["name"]) for t in source_tables]
    target_tables = {(t["schema"], t["name"]): t for t in await read_tables(tgt, quoted)}
    plans = [pair(s, target_tables.get((s["schema"], s["name"]))) for s in source_tables]
    for given in missing:
        plans.append(
            TablePlan(given, None, None, [Note("table_not_found", f"no table {given} on the source", problem=True)])
        )
    return plans


def pair(source: dict[str, Any], target: dict[str, Any] | None) -> TablePlan:
    """The plan for one table from both sides' catalog rows (pure: unit-tested)."""
    name = f"{source['schema']}.{source['name']}"
    sql = qualified(source["schema"], source["name"])
    reltuples = source["reltuples"] if source.get("reltuples", -1) >= 0 else None
    if target is None:
        return TablePlan(
            name,
            None,
            None,
            [Note("missing_on_target", f"table {name} does not exist on the target", problem=True)],
            reltuples,
        )
    notes: list[Note] = []
    src_cols = [_column(c) for c in source["columns"]]
    tgt_by_name = {c["name"]: _column(c) for c in target["columns"]}
    src_names = {c.name for c in src_cols}
    pairs: list[tuple[ColumnType, ColumnType]] = []
    for col in src_cols:
        other = tgt_by_name.get(col.name)
        if other is None:
            notes.append(
                Note(
                    "column_only_in_source",
                    f"column {col.name} ({col.type}) only on the source: not compared",
                    col.name,
                )
            )
            continue
        if other.type != col.type:
            notes.append(
                Note("type_mismatch", f"column {col.name} is {col.type} on the source, {other.type} on the target "
                     "(values compared in canonical form)", col.name)
            )  # fmt: skip
        pairs.append((col, other))
    for col in target["columns"]:
        if col["name"] not in src_names:
            notes.append(
                Note(
                    "column_only_in_target",
                    f"column {col['name']} ({col['type']}) only on the target: not compared",
                    col["name"],
                )
            )
    key_names: list[str] = source.get("key") or []
    if not key_names:
        notes.append(Note("no_primary_key", f"{name} has no primary key on the source: only whole-table checksums "
                          "(count and sum), rows cannot be named", problem=False))  # fmt: skip
    elif (target.get("key") or []) != key_names:
        notes.append(Note("key_mismatch", f"primary key ({', '.join(key_names)}) on the source, "
                          f"({', '.join(target.get('key') or [])}) on the target"))  # fmt: skip
    paired = {s.name: (s, t) for s, t in pairs}
    if any(k not in paired for k in key_names):
        notes.append(
            Note("key_column_missing", "a primary key column is missing on the target: cannot compare", problem=True)
        )
        return TablePlan(name, None, None, notes, reltuples)
    collate_c = False
    for k in key_names:
        s, t = paired[k]
        if s.base in COLLATABLE and (s.collation != t.collation or t.base not in COLLATABLE):
            collate_c = True
            notes.append(
                Note("key_collation", f"key column {k} has collation {s.collation} on the source, {t.collation} on "
                     'the target: ranges are ordered under COLLATE "C" (the index cannot serve them: slower)', k)
            )  # fmt: skip
    safe = [is_safe(s) and is_safe(t) for s, t in pairs]
    same = [s.type == t.type for s, t in pairs]
    src_side = Side(
        sql, tuple(s for s, _ in pairs), tuple(paired[k][0] for k in key_names),
        tuple(row_piece(s, ok, eq) for (s, _), ok, eq in zip(pairs, safe, same, strict=True)), collate_c,
        tuple(src_cols),
    )  # fmt: skip
    tgt_side = Side(
        sql, tuple(t for _, t in pairs), tuple(paired[k][1] for k in key_names),
        tuple(row_piece(t, ok, eq) for (_, t), ok, eq in zip(pairs, safe, same, strict=True)), collate_c,
        tuple(tgt_by_name.values()),
    )  # fmt: skip
    return TablePlan(name, src_side, tgt_side, notes, reltuples)
