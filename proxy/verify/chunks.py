"""Primary-key ranges: the chunks a table is compared in, their SQL predicates, and key lookups.

A range is ``lower <= key < upper`` (either bound open), the bounds being key values as canonical
text, cast to each side's own key types. Composite keys use row comparison -- ``(a, b) >= (x, y)``
is the btree order of a two-column key -- so the primary key index serves every range. Text keys
are ordered by their column's collation when both sides have the same one, else under
``COLLATE "C"`` on both sides (same bytes, same order everywhere; but then the index cannot serve
the range). Boundaries are found on the source by keyset: the key ``N`` rows after the lower bound
(an index-only scan), so chunks hold about N source rows wherever the keys are dense or sparse; a
single integer key is stepped by value instead (verify._IntegerSteps: one index probe per chunk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.cdc.sqlconn import quote_literal
from proxy.verify.canonical import COLLATABLE, canonical_text, from_text
from proxy.verify.catalog import Side

Key = tuple[str | None, ...]  # a primary key value as canonical text, one entry per key column


@dataclass(frozen=True, slots=True)
class KeyRange:
    lower: Key | None = None  # inclusive; None: from the start
    upper: Key | None = None  # exclusive; None: to the end

    def as_list(self) -> list[list[str | None] | None]:
        return [None if self.lower is None else list(self.lower), None if self.upper is None else list(self.upper)]


def _literals(side: Side, key: Key) -> list[str]:
    out = []
    for column, value in zip(side.key, key, strict=True):
        literal = "null" if value is None else from_text(column, quote_literal(value))
        if side.key_collate_c and column.base in COLLATABLE:
            literal += ' collate "C"'
        out.append(literal)
    return out


def compare(side: Side, op: str, key: Key) -> str:
    """``key_columns op key`` (row comparison for a composite key)."""
    columns = [side.key_ref(c) for c in side.key]
    literals = _literals(side, key)
    if len(columns) == 1:
        return f"{columns[0]} {op} {literals[0]}"
    return f"({', '.join(columns)}) {op} ({', '.join(literals)})"


def range_where(side: Side, chunk: KeyRange) -> str:
    """`` where …`` selecting the chunk on ``side`` (empty for the whole table)."""
    conditions = []
    if chunk.lower is not None:
        conditions.append(compare(side, ">=", chunk.lower))
    if chunk.upper is not None:
        conditions.append(compare(side, "<", chunk.upper))
    return f" where {' and '.join(conditions)}" if conditions else ""


def key_texts(side: Side) -> str:
    """The key columns as canonical text (select list). Aliased: an ORDER BY of the statement
    would otherwise take a bare column name for the output column of that name -- its text."""
    return ", ".join(f"{canonical_text(c)} as pgshift_k{i}" for i, c in enumerate(side.key))


def key_aliases(side: Side) -> str:
    return ", ".join(f"pgshift_k{i}" for i in range(len(side.key)))


def boundary_sql(side: Side, lower: Key | None, rows: int) -> str:
    """The key ``rows`` rows past ``lower`` (in key order): the next chunk's lower bound, or no row."""
    where = f" where {compare(side, '>=', lower)}" if lower is not None else ""
    return f"select {key_texts(side)} from {side.sql}{where} order by {side.key_order()} offset {rows} limit 1"


def keys_where(side: Side, keys: Sequence[Key]) -> str:
    """`` where key in (…)`` for these keys (by canonical text, cast to this side's types)."""
    columns = [c.sql for c in side.key]
    if len(columns) == 1:
        values = ", ".join(_plain_literals(side, k)[0] for k in keys)
        return f" where {columns[0]} in ({values})"
    rows = ", ".join(f"({', '.join(_plain_literals(side, k))})" for k in keys)
    return f" where ({', '.join(columns)}) in ({rows})"


def key_equals(side: Side, key: Key) -> str:
    """``k1 = v1 and k2 = v2`` for one key."""
    return " and ".join(f"{c.sql} = {v}" for c, v in zip(side.key, _plain_literals(side, key), strict=True))


def _plain_literals(side: Side, key: Key) -> list[str]:
    # Equality needs no collation: deterministic collations compare bytes for equality.
    return ["null" if v is None else from_text(c, quote_literal(v)) for c, v in zip(side.key, key, strict=True)]
