"""Canonical text of a column value, so that equal data compares equal across servers, versions and settings.

Every comparison (checksums, sampled rows, row-by-row) is made on text the *server* renders under
fixed session settings (``SESSION_SETTINGS``: UTC, ISO dates, postgres intervals, shortest exact
floats, hex bytea), from an expression chosen per column type:

* numeric (and money, through numeric): ``trim_scale`` -- 1.50 in a numeric(12,2) equals 1.5 in a
  numeric; NaN and infinities keep their names;
* float4/float8: the value plus positive zero (so -0 equals 0), printed shortest-exact
  (``extra_float_digits = 3`` means that from Postgres 12 on: the same text for the same double);
* timestamptz in UTC; timestamp, date, time, interval in ISO / postgres style;
* json as jsonb (key order and whitespace normalised; jsonb keeps the last of duplicate keys);
* bytea as lowercase hex; char(n) without its padding (``::text``);
* everything else (text, uuid, bool, integers, arrays, enums, composites, ...) as its output text.
  Text is compared byte for byte: collations never make two different strings equal here.

NULL is never confused with an empty string: in a row's hashed text a column is either a *safe*
value (a type whose text cannot contain the separator U+001F nor be the marker ``N``), or its byte
length followed by the value (``-1`` for NULL), so a row's text can be parsed back unambiguously.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.cdc.sqlconn import quote_ident

# Applied to every verify session on both sides: the text of a value depends on them.
SESSION_SETTINGS = (
    "set timezone = 'UTC'; set datestyle = 'ISO, YMD'; set intervalstyle = 'postgres'; "
    "set extra_float_digits = 3; set bytea_output = 'hex'"
)
SEPARATOR = "E'\\x1f'"  # between the pieces of a row's text (U+001F, unit separator)
NULL_MARK = "'N'"  # a NULL safe value

# Types whose output text never contains U+001F and is never exactly "N" (numbers, dates, uuids,
# booleans, hex): their value goes into a row's text as it is.
SAFE_TYPES = frozenset(
    {
        "int2", "int4", "int8", "oid", "numeric", "money", "float4", "float8", "bool", "uuid",
        "date", "time", "timetz", "timestamp", "timestamptz", "interval", "bytea",
    }
)  # fmt: skip
# Types whose own value is already canonical text-wise (no expression needed around the column).
_AS_IS = frozenset(
    {
        "int2", "int4", "int8", "oid", "bool", "uuid", "date", "time", "timetz", "timestamp",
        "timestamptz", "interval", "text", "varchar", "name", "jsonb",
    }
)  # fmt: skip
_TEXT_TYPES = frozenset({"text", "varchar", "name"})
# Key types that can delimit a range with ``<``/``>=`` (btree-ordered, comparable with a literal).
COLLATABLE = frozenset({"text", "varchar", "bpchar", "name", "citext"})


@dataclass(frozen=True, slots=True)
class ColumnType:
    """A column on one side: its name, its declared type, the base type's name (domains resolved),
    and what the catalog says about it."""

    name: str
    type: str  # format_type(): "numeric(12,2)", "timestamp with time zone", ...
    base: str  # pg_type.typname of the base type: "numeric", "timestamptz", "_int4", ...
    not_null: bool = False
    generated: bool = False
    identity: str = ""  # "", "a" (always), "d" (by default)
    collation: str | None = None  # the column's collation name, for collatable types

    @property
    def sql(self) -> str:
        return quote_ident(self.name)


def canonical(column: ColumnType, ref: str | None = None) -> str:
    """An expression whose output text is the canonical text of ``column`` (``ref`` to refer to
    the column another way, e.g. qualified)."""
    x = ref or column.sql
    base = column.base
    if base in _AS_IS:
        return x
    if base == "numeric":
        return f"trim_scale({x})"
    if base == "money":
        return f"trim_scale({x}::numeric)"
    if base == "float8":
        return f"({x} + 0::float8)"  # IEEE: -0 + 0 = +0
    if base == "float4":
        return f"({x} + 0::float4)"
    if base == "json":
        return f"{x}::jsonb"
    if base == "bytea":
        return f"encode({x}, 'hex')"
    return f"{x}::text"


def canonical_text(column: ColumnType, ref: str | None = None) -> str:
    """The canonical text itself (type text), NULL for NULL."""
    expr = canonical(column, ref)
    return expr if column.base in _TEXT_TYPES else f"({expr})::text"


def row_piece(column: ColumnType, safe: bool, same_type: bool = False) -> str:
    """The column's part of a row's hashed text (arguments of concat_ws, which skips NULLs).

    ``safe`` and ``same_type`` must be decided for the column on *both* sides (``is_safe`` of
    both; the same declared type on both): the two sides must render equal values identically,
    whatever their types. With the same char(n) on both sides the padded value is hashed as it is
    (stripping the padding costs a third of the whole checksum on pgbench_accounts)."""
    if safe:
        expr = canonical(column)
        return expr if column.not_null else f"coalesce(({expr})::text, {NULL_MARK})"
    text = column.sql if same_type and column.base == "bpchar" else canonical_text(column)
    length = f"octet_length({text})"
    return f"{length}, {text}" if column.not_null else f"coalesce({length}, -1), {text}"


def is_safe(column: ColumnType) -> bool:
    return column.base in SAFE_TYPES


def row_hash(pieces: list[str]) -> str:
    """A 64-bit hash (bigint) of a row's canonical text; see checksum.py for why this one."""
    return f'hashtextextended(concat_ws({SEPARATOR}, {", ".join(pieces)}) collate "C", 0)'


def from_text(column: ColumnType, literal: str) -> str:
    """The SQL value of ``column``'s type from its canonical text (a quoted literal): keys are
    looked up on either side by their canonical text."""
    if column.base == "bytea":
        return f"decode({literal}, 'hex')"
    if column.base == "money":
        return f"{literal}::numeric::money"
    return f"{literal}::{column.type}"


def to_text(column: ColumnType) -> str:
    """The value as text for moving it to the other side (repair): the type's own output under
    SESSION_SETTINGS, which its input function reads back (money through numeric)."""
    if column.base == "money":
        return f"{column.sql}::numeric::text"
    return f"{column.sql}::text"
