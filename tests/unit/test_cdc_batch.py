"""How a batch of source transactions becomes target writes: in source order, or as its net change."""

from __future__ import annotations

import json

from proxy.cdc.changes import _RowChange, _Table, _TxnChanges, render_compacted, render_exact
from proxy.cdc.pgoutput import UNCHANGED, Begin, Relation, RelationColumn, Value
from proxy.mirror.model import ImageOp, Write, WriteKind

T = _Table.of(
    Relation(
        1,
        "public",
        "t",
        "d",
        (RelationColumn(1, "id", 23, -1), RelationColumn(0, "a", 25, -1), RelationColumn(0, "b", 25, -1)),
    )
)
U = _Table.of(Relation(2, "public", "u", "d", (RelationColumn(1, "id", 23, -1), RelationColumn(0, "v", 25, -1))))


def txn(*changes: tuple[ImageOp, _Table, list[Value]] | Write) -> _TxnChanges:
    out = _TxnChanges(Begin(0, 0, 1))
    for change in changes:
        if isinstance(change, Write):
            out.write(change)
        else:
            op, table, values = change
            out.row(op, table, (values[0],), values)
    return out


def rows(writes: list[Write]) -> list[tuple[str, str, list[object], tuple[str, ...]]]:
    """(op, table, rows as dicts, columns) per image; ("query", sql, [], ()) per query."""
    out: list[tuple[str, str, list[object], tuple[str, ...]]] = []
    for w in writes:
        if w.image is None:
            out.append(("query", w.sql, [], ()))
        else:
            out.append((w.image.op.value, w.image.table, [json.loads(r) for r in w.image.rows], w.image.columns))
    return out


UP, DEL, PATCH = ImageOp.UPSERT, ImageOp.DELETE, ImageOp.PATCH
TRUNC = Write(WriteKind.QUERY, 'TRUNCATE "public"."u"', "", "cdc", ('"public"."u"',))


def test_exact_keeps_source_order_and_groups_only_neighbours() -> None:
    batch = [
        txn((UP, T, [b"1", b"x", b"y"]), (UP, T, [b"2", b"x", b"y"]), (UP, U, [b"1", b"v"])),
        txn((UP, T, [b"1", b"z", b"y"])),
    ]
    assert [(op, table, len(r)) for op, table, r, _ in rows(render_exact(batch))] == [
        ("upsert", '"public"."t"', 2),
        ("upsert", '"public"."u"', 1),
        ("upsert", '"public"."t"', 1),
    ]


def test_net_change_merges_each_rows_changes() -> None:
    batch = [
        txn((UP, T, [b"1", b"a1", b"b1"]), (UP, T, [b"2", b"a2", b"b2"]), (UP, T, [b"3", b"a3", b"b3"])),
        # 1: a whole row, then a patch of a: one upsert with both
        txn((PATCH, T, [b"1", b"a1'", UNCHANGED])),
        # 2: deleted, then inserted again: the new row
        txn((DEL, T, [b"2", UNCHANGED, UNCHANGED]), (UP, T, [b"2", b"new", None])),
        # 3: deleted, and the patch after it changes nothing
        txn((DEL, T, [b"3", UNCHANGED, UNCHANGED]), (PATCH, T, [b"3", UNCHANGED, b"late"])),
        # 4 and 5: patches only; 4 twice (columns merge, the later value wins), 5 of another column set
        txn((PATCH, T, [b"4", b"p", UNCHANGED]), (PATCH, T, [b"5", UNCHANGED, b"q"])),
        txn((PATCH, T, [b"4", b"p'", b"r"])),
    ]
    assert rows(render_compacted(batch)) == [
        ("delete", '"public"."t"', [{"id": "3"}], ()),
        ("upsert", '"public"."t"', [{"id": "1", "a": "a1'", "b": "b1"}, {"id": "2", "a": "new", "b": None}], ()),
        ("patch", '"public"."t"', [{"id": "4", "a": "p'", "b": "r"}], ("id", "a", "b")),
        ("patch", '"public"."t"', [{"id": "5", "b": "q"}], ("id", "b")),
    ]


def test_net_change_never_crosses_a_barrier() -> None:
    batch = [
        txn((UP, U, [b"1", b"before"]), (UP, T, [b"1", b"a", b"b"])),
        txn(TRUNC, (UP, U, [b"1", b"after"])),
    ]
    assert rows(render_compacted(batch)) == [
        ("upsert", '"public"."u"', [{"id": "1", "v": "before"}], ()),
        ("upsert", '"public"."t"', [{"id": "1", "a": "a", "b": "b"}], ()),
        ("query", 'TRUNCATE "public"."u"', [], ()),
        ("upsert", '"public"."u"', [{"id": "1", "v": "after"}], ()),
    ]


def test_a_hot_row_is_written_once_per_batch() -> None:
    batch = [txn((UP, U, [b"1", str(i).encode()])) for i in range(500)]
    assert rows(render_compacted(batch)) == [("upsert", '"public"."u"', [{"id": "1", "v": "499"}], ())]
    assert len(render_exact(batch)) == 500  # the same key cannot repeat within one upsert


def test_row_change_records_its_size() -> None:
    t = txn((UP, T, [b"1", b"abc", None]))
    assert t.size == 16 + 4 and isinstance(t.items[0], _RowChange)
