"""What a mirror knows about a table (columns, primary key) and the SQL that applies row images to it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.mirror.model import Image, ImageOp

# One row per live column of the table named by $1 (resolved with the session's search_path):
# name, stored-generated, identity ALWAYS, part of the primary key. No rows: no such table.
# to_regclass returns NULL for a missing table but raises on a malformed name, so each table is
# looked up in a block of its own (an error there fails only that lookup).
CATALOG_SQL = (
    "SELECT a.attname, a.attgenerated <> '', a.attidentity = 'a',"
    " coalesce(a.attnum = ANY (i.indkey), false), (a.atthasdef OR a.attidentity <> '') AND a.attgenerated = ''"
    " FROM pg_catalog.pg_attribute a"
    " LEFT JOIN pg_catalog.pg_index i ON i.indrelid = a.attrelid AND i.indisprimary"
    " WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped"
    " ORDER BY a.attnum"
)

_ON_CONFLICT = re.compile(r"^\s*on\s+conflict\s+", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    generated: bool  # GENERATED ALWAYS AS (…) STORED: never written
    identity_always: bool  # GENERATED ALWAYS AS IDENTITY: written only with OVERRIDING SYSTEM VALUE
    primary_key: bool
    defaulted: bool = False  # a DEFAULT or identity: a value computed when a row omits it


@dataclass(frozen=True, slots=True)
class TableMeta:
    table: str  # as the writes name it
    columns: tuple[Column, ...]

    @property
    def primary_key(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.primary_key)

    @property
    def writable(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if not c.generated)

    @classmethod
    def from_rows(cls, table: str, rows: list[list[bytes | None]]) -> TableMeta | None:
        """Build from CATALOG_SQL's text-format rows; None when the mirror has no such table."""
        if not rows:
            return None
        columns = tuple(
            Column(
                name=(name or b"").decode(),
                generated=generated == b"t",
                identity_always=identity == b"t",
                primary_key=pk == b"t",
                defaulted=defaulted == b"t",
            )
            for name, generated, identity, pk, defaulted in rows
        )
        return cls(table, columns)

    def computed_when_omitted(self, given: tuple[str, ...]) -> list[str]:
        """Columns a row that gives only ``given`` gets a computed value for (COPY t (a, b) …)."""
        return [c.name for c in self.columns if c.defaulted and c.name not in given]


class ImageError(Exception):
    """Row images that cannot be applied to this table on the mirror (the reason says why)."""


def quote_ident(name: str) -> str:
    # Always quoted: catalog names are exact (case, spaces), and quoting is never wrong.
    return '"' + name.replace('"', '""') + '"'


def image_sql(image: Image, meta: TableMeta) -> str:
    """The statement applying ``image`` with its rows as one json parameter ($1)."""
    table = image.table
    source = f"json_populate_recordset(NULL::{table}, $1::json)"
    pk = [quote_ident(c.name) for c in meta.primary_key]
    if image.op in (ImageOp.INSERT, ImageOp.UPSERT):
        cols = ", ".join(quote_ident(c.name) for c in meta.writable)
        # The primary chose the identity values; the mirror must take them as they are.
        overriding = " OVERRIDING SYSTEM VALUE" if any(c.identity_always for c in meta.columns) else ""
        sql = f"INSERT INTO {table} ({cols}){overriding} SELECT {cols} FROM {source}"
        if image.op is ImageOp.INSERT:
            return sql
        if pk:
            target = "(" + ", ".join(pk) + ")"
        elif image.conflict:
            # The client's target, "(a, b)" or "ON CONSTRAINT x"; tolerate the keywords in front.
            target = _ON_CONFLICT.sub("", image.conflict)
        else:
            raise ImageError(
                f"no primary key on the mirror and no ON CONFLICT target: upserted rows of {table} cannot be matched"
            )
        # Identity ALWAYS columns can only be updated to DEFAULT; their value does not change anyway.
        settable = [c for c in meta.writable if not c.identity_always and (not c.primary_key or not pk)]
        if settable:
            assignments = ", ".join(f"{quote_ident(c.name)} = EXCLUDED.{quote_ident(c.name)}" for c in settable)
            return f"{sql} ON CONFLICT {target} DO UPDATE SET {assignments}"
        # Only key columns: a no-op update still counts the row, as the primary's upsert did
        # (DO NOTHING would make the mirror's tag one short for every row that existed).
        keys = [c for c in meta.primary_key if not c.identity_always]
        if keys:
            name = quote_ident(keys[0].name)
            return f"{sql} ON CONFLICT {target} DO UPDATE SET {name} = EXCLUDED.{name}"
        return f"{sql} ON CONFLICT {target} DO NOTHING"
    if not pk:
        raise ImageError("no primary key on the mirror: row images cannot be matched")
    match = "(" + ", ".join(f"t.{c}" for c in pk) + ") = (" + ", ".join(f"r.{c}" for c in pk) + ")"
    if image.op is ImageOp.DELETE:
        return f"DELETE FROM {table} AS t USING {source} AS r WHERE {match}"
    if image.op in (ImageOp.PATCH, ImageOp.MOVE):
        return _patch_sql(image, meta, pk, match)
    settable = [c for c in meta.writable if not c.primary_key and not c.identity_always]
    if not settable:
        # Nothing but key columns: assign one to itself so the row still counts as updated.
        keys = [c for c in meta.primary_key if not c.identity_always] or list(meta.primary_key)
        settable = keys[:1]
    assignments = ", ".join(f"{quote_ident(c.name)} = r.{quote_ident(c.name)}" for c in settable)
    return f"UPDATE {table} AS t SET {assignments} FROM {source} AS r WHERE {match}"


def _patch_sql(image: Image, meta: TableMeta, pk: list[str], match: str) -> str:
    """PATCH and MOVE: set only ``image.columns`` (the others are TOASTed values the source left
    unchanged and did not send), so what the mirror holds for them stays."""
    table = image.table
    given = set(image.columns)
    moving = image.op is ImageOp.MOVE
    # A MOVE sets the key too; identity ALWAYS columns can only be set to DEFAULT (nor could the source).
    settable = [c for c in meta.writable if c.name in given and not c.identity_always and (moving or not c.primary_key)]
    if not settable:
        keys = [c for c in meta.primary_key if not c.identity_always] or list(meta.primary_key)
        settable = keys[:1]
    if not moving:
        assignments = ", ".join(f"{quote_ident(c.name)} = r.{quote_ident(c.name)}" for c in settable)
        source = f"json_populate_recordset(NULL::{table}, $1::json)"
        return f"UPDATE {table} AS t SET {assignments} FROM {source} AS r WHERE {match}"
    assignments = ", ".join(f"{quote_ident(c.name)} = n.{quote_ident(c.name)}" for c in settable)
    old_key = "(" + ", ".join(f"t.{c}" for c in pk) + ") = (" + ", ".join(f"o.{c}" for c in pk) + ")"
    new_key = "(" + ", ".join(f"x.{c}" for c in pk) + ") = (" + ", ".join(f"n.{c}" for c in pk) + ")"
    return (
        f"UPDATE {table} AS t SET {assignments}"
        f" FROM json_array_elements($1::json) AS e(v),"
        f" json_populate_record(NULL::{table}, e.v -> 'old') AS o,"
        f" json_populate_record(NULL::{table}, e.v -> 'new') AS n"
        # Replayed after a restart: the row has its new key already (and a newer row may have
        # taken the old one); moving would break the key or clobber that row.
        f" WHERE {old_key} AND NOT EXISTS (SELECT 1 FROM {table} AS x WHERE {new_key})"
    )
