"""The validator's pure parts: canonical expressions, range SQL, table pairing, diffs, the recheck rule, reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.cdc.sqlconn import Endpoint
from proxy.config import parse_dsn
from proxy.errors import ConfigError
from proxy.verify.canonical import ColumnType, canonical, canonical_text, from_text, row_piece
from proxy.verify.catalog import pair
from proxy.verify.chunks import KeyRange, boundary_sql, compare, keys_where, range_where
from proxy.verify.compare import RowDifference, Verdict, diff_hashes, diff_one, diff_rows, judge, split_rows
from proxy.verify.report import TableResult, VerifyReport
from proxy.verify.state import Progress


def col(name: str, type_: str, base: str, **kw: Any) -> ColumnType:
    return ColumnType(name, type_, base, **kw)


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("int4", '"c"'),
        ("text", '"c"'),
        ("timestamptz", '"c"'),
        ("numeric", 'trim_scale("c")'),
        ("money", 'trim_scale("c"::numeric)'),
        ("float8", '("c" + 0::float8)'),
        ("float4", '("c" + 0::float4)'),
        ("json", '"c"::jsonb'),
        ("bytea", "encode(\"c\", 'hex')"),
        ("bpchar", '"c"::text'),
        ("_int4", '"c"::text'),
    ],
)
def test_canonical_expression_by_type(base: str, expected: str) -> None:
    assert canonical(col("c", base, base)) == expected


def test_row_pieces_tell_null_from_empty() -> None:
    # Safe types: the value, or the marker N for NULL (no safe value prints as N).
    assert row_piece(col("n", "integer", "int4"), True) == "coalesce((\"n\")::text, 'N')"
    assert row_piece(col("n", "integer", "int4", not_null=True), True) == '"n"'
    # Others: byte length then value; NULL is length -1 and no value (concat_ws skips NULLs).
    assert row_piece(col("t", "text", "text"), False) == 'coalesce(octet_length("t"), -1), "t"'
    assert row_piece(col("j", "json", "json"), False) == (
        'coalesce(octet_length(("j"::jsonb)::text), -1), ("j"::jsonb)::text'
    )
    assert canonical_text(col("t", "text", "text")) == '"t"'
    assert from_text(col("b", "bytea", "bytea"), "'00ff'") == "decode('00ff', 'hex')"
    assert from_text(col("u", "uuid", "uuid"), "'x'") == "'x'::uuid"


def _raw(name: str, columns: list[tuple[str, str, str]], key: list[str] | None, **extra: Any) -> dict[str, Any]:
    return {
        "schema": "public",
        "name": name,
        "reltuples": 100,
        "key": key,
        "columns": [
            {"name": n, "type": t, "base": b, "not_null": n in (key or []), "generated": False, "identity": "",
             "collation": "C" if b == "text" else None, **extra.get(n, {})}
            for n, t, b in columns
        ],
    }  # fmt: skip


def test_pair_notes_and_pieces() -> None:
    source = _raw(
        "t",
        [("a", "text", "text"), ("b", "integer", "int4"), ("c", "integer", "int4"), ("d", "text", "text")],
        ["a", "b"],
    )
    target = _raw(
        "t",
        [("a", "text", "text"), ("b", "bigint", "int8"), ("c", "text", "text"), ("e", "integer", "int4")],
        ["a", "b"],
        a={"collation": "en_US"},
    )
    plan = pair(source, target)
    assert plan.comparable and plan.key == ["a", "b"] and plan.columns == ["a", "b", "c"]
    codes = [(n.code, n.column) for n in plan.notes]
    assert codes == [
        ("type_mismatch", "b"), ("type_mismatch", "c"), ("column_only_in_source", "d"),
        ("column_only_in_target", "e"), ("key_collation", "a"),
    ]  # fmt: skip
    assert plan.source is not None and plan.target is not None
    # c is int on one side, text on the other: length-prefixed on both, so equal values hash equal.
    assert plan.source.pieces[2] == 'coalesce(octet_length(("c")::text), -1), ("c")::text'
    assert plan.target.pieces[2] == 'coalesce(octet_length("c"), -1), "c"'
    # Different key collations: ranges under COLLATE "C" on both sides.
    assert (
        compare(plan.source, ">=", ("x", "5"))
        == '("a" collate "C", "b") >= (E\'x\'::text collate "C", E\'5\'::integer)'
    )
    assert (
        compare(plan.target, "<", ("x", "5")) == '("a" collate "C", "b") < (E\'x\'::text collate "C", E\'5\'::bigint)'
    )


def test_pair_problems() -> None:
    source = _raw("t", [("id", "integer", "int4")], ["id"])
    assert [n.code for n in pair(source, None).notes] == ["missing_on_target"]
    missing_key = pair(source, _raw("t", [("other", "integer", "int4")], None))
    assert not missing_key.comparable and any(n.problem for n in missing_key.notes)
    nokey = pair(_raw("t", [("v", "text", "text")], None), _raw("t", [("v", "text", "text")], None))
    assert nokey.comparable and nokey.key == [] and [n.code for n in nokey.notes] == ["no_primary_key"]


def test_range_sql() -> None:
    plan = pair(_raw("t", [("id", "integer", "int4"), ("v", "text", "text")], ["id"]),
                _raw("t", [("id", "integer", "int4"), ("v", "text", "text")], ["id"]))  # fmt: skip
    side = plan.source
    assert side is not None
    assert range_where(side, KeyRange()) == ""
    assert (
        range_where(side, KeyRange(("10",), ("20",))) == " where \"id\" >= E'10'::integer and \"id\" < E'20'::integer"
    )
    assert range_where(side, KeyRange(None, ("20",))) == " where \"id\" < E'20'::integer"
    # Key outputs are aliased: ORDER BY "id" must mean the column, not the text output named "id".
    assert boundary_sql(side, ("5",), 100) == (
        'select ("id")::text as pgshift_k0 from "public"."t" where "id" >= E\'5\'::integer order by "id" '
        "offset 100 limit 1"
    )
    assert keys_where(side, [("1",), ("it's",)]) == " where \"id\" in (E'1'::integer, E'it''s'::integer)"


def test_diffs() -> None:
    columns = ["id", "a", "b"]
    source = split_rows([["1", "1", "x", None], ["2", "2", "y", "z"], ["3", "3", "", None]], 1)
    target = split_rows(
        [["1", "1", "x", None], ["2", "2", "y ", "z"], ["4", "4", "w", None], ["3", "3", None, None]], 1
    )
    diffs = diff_rows(columns, source, target)
    assert [(d.kind, d.key, d.columns) for d in diffs] == [
        ("different", ("2",), ["a"]),
        ("different", ("3",), ["a"]),  # empty string vs NULL
        ("only_in_target", ("4",), []),
    ]
    assert diffs[1].source == {"a": ""} and diffs[1].target == {"a": None}
    assert diff_one(columns, ("9",), None, None) is None
    assert diff_hashes({("1",): "5", ("2",): "6"}, {("1",): "5", ("3",): "7", ("10",): "1"}) == [
        ("2",),
        ("3",),
        ("10",),
    ]
    restored = RowDifference.from_dict(diffs[0].as_dict(["id"]), ["id"])
    assert restored == diffs[0]


def test_recheck_rule() -> None:
    a, b = ("1",), ("2",)
    assert judge(a, a, a) is Verdict.RESOLVED  # caught up
    assert judge(a, b, b) is Verdict.RESOLVED
    assert judge(a, a, b) is Verdict.CONFIRMED  # the source stood still for a window, the target still differs
    assert judge(None, None, b) is Verdict.CONFIRMED  # a row only on the target that stays
    assert judge(a, b, a) is Verdict.PENDING  # the source moved: the target may be applying it now
    assert judge(None, a, None) is Verdict.PENDING  # just inserted on the source


def _endpoint(name: str) -> Endpoint:
    return Endpoint(name, parse_dsn(f"postgresql://127.0.0.1:5432/{name}"), "postgres", name, None)


def test_report_exit_codes_and_text() -> None:
    table = TableResult("public.t", ["id"], ["id", "v"], complete=True, rows_compared=10, chunks=1)
    report = VerifyReport(_endpoint("old"), _endpoint("new"), "checksum", [table], seconds=1.0)
    assert report.exit_code == 0 and report.ok and table.status == "clean"
    table.differences.append(RowDifference("different", ("3",), ["v"], {"v": "a"}, {"v": "a "}))
    table.differences.append(RowDifference("only_in_target", ("4",)))
    assert report.exit_code == 1 and table.status == "differs" and table.clean_at is None
    text = "\n".join(report.lines())
    assert '    different    id=3: v: old "a", new "a "' in text
    assert "    only in new  id=4" in text
    data = report.as_dict()
    assert json.loads(json.dumps(data))["tables"][0]["differences"][1] == {
        "kind": "only_in_target", "key": {"id": "4"}, "columns": [], "source": None, "target": None,
    }  # fmt: skip
    table.differences.clear()
    report.stopped = "--max-duration 1 s reached"
    assert report.exit_code == 4 and "INCOMPLETE" in report.lines()[-1]


def test_progress_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    identity = {"mode": "checksum", "tables": ["public.t"]}
    progress = Progress.open(path, identity)
    assert not progress.resumed
    progress.table("public.t").done_upto = ["100"]
    progress.table("public.t").rows = 99
    progress.save(force=True)
    again = Progress.open(path, identity)
    assert again.resumed and again.table("public.t").done_upto == ["100"] and again.table("public.t").rows == 99
    with pytest.raises(ConfigError, match="another run"):
        Progress.open(path, {**identity, "mode": "full"})
    again.save(finished=True)
    assert not Progress.open(path, {"other": 1}).resumed  # a finished run: start afresh
    path.write_text("not json")
    with pytest.raises(ConfigError, match="cannot read"):
        Progress.open(path, identity)
