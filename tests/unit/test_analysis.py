"""sql.analyze() over a table of real statements, its robustness on arbitrary text, and the analysis cache."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sql import Analysis, AnalysisCache, Kind, Pin, TxOp, analyze
from proxy.sql.analysis import _FIELD_TYPES
from proxy.sql.cache import literal_free_key
from tests.unit.test_analysis_cases import BOOL_FIELDS, CASES, Case


def test_case_table_is_large_and_unique() -> None:
    assert len(CASES) >= 150
    sqls = [c.sql for c in CASES]
    assert len(sqls) == len(set(sqls)), "duplicate statements in the case table"


@pytest.mark.parametrize("c", CASES, ids=[f"{i:03d}:{c.sql[:60]}" for i, c in enumerate(CASES)])
def test_statement(c: Case) -> None:
    a = analyze(c.sql)
    assert a.kind is c.kind, a
    assert a.is_read is c.is_read, a
    assert a.statement_count == c.count, a
    assert a.pins == c.pins, a
    assert a.tx_op is c.tx_op, a
    assert a.hint == c.hint, a
    for name in BOOL_FIELDS:
        assert getattr(a, name) is (name in c.flags), f"{name}: {a}"
    if c.read is not None:
        assert a.tables_read == c.read, a
    if c.written is not None:
        assert a.tables_written == c.written, a
    if c.unknown is not None:
        assert a.unknown_functions == c.unknown, a
    assert (a.parse_error is not None) is (c.kind is Kind.UNKNOWN and c.count == 0), a


def test_functions_are_reported_lowercased_and_qualified_as_written() -> None:
    a = analyze("SELECT pg_catalog.NOW(), Lower(x), App.Calc(1), count(*) FROM t")
    assert a.functions == {"pg_catalog.now", "lower", "app.calc", "count"}
    assert a.unknown_functions == {"app.calc"}


def test_parse_error_carries_pglasts_message() -> None:
    a = analyze("SELEC 1")
    assert a.kind is Kind.UNKNOWN and not a.is_read
    assert a.parse_error is not None and "syntax error" in a.parse_error


def test_is_read_requires_every_condition() -> None:
    base = analyze("SELECT * FROM t")
    assert base.is_read
    changes: list[tuple[str, Any]] = [
        ("kind", Kind.COPY_OUT),
        ("locking", True),
        ("volatile", True),
        ("unknown_functions", frozenset({"f"})),
        ("writable_cte", True),
        ("select_into", True),
        ("pins", frozenset({Pin.LISTEN})),
        ("backend_local", True),
    ]
    for field, value in changes:
        assert not dataclasses.replace(base, **{field: value}).is_read, field


def test_analysis_is_immutable() -> None:
    a = analyze("SELECT 1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.kind = Kind.WRITE  # type: ignore[misc]


def test_first_transaction_statement_sets_tx_op() -> None:
    a = analyze("SAVEPOINT a; RELEASE a; ROLLBACK")
    assert a.kind is Kind.TRANSACTION and a.tx_op is TxOp.SAVEPOINT and a.statement_count == 3


def test_walker_knows_the_schema_fields_it_relies_on() -> None:
    # libpg_query's JSON drops the node wrapper on these fields; the walk takes their types from pglast's schema.
    assert _FIELD_TYPES["InsertStmt"]["relation"] == "RangeVar"
    assert _FIELD_TYPES["SelectStmt"]["larg"] == "SelectStmt"
    assert _FIELD_TYPES["SelectStmt"]["intoClause"] == "IntoClause"
    assert _FIELD_TYPES["CallStmt"]["funccall"] == "FuncCall"
    assert _FIELD_TYPES["IntoClause"]["rel"] == "RangeVar"


def test_deep_nesting_does_not_raise() -> None:
    shallow = analyze("SELECT " + "(" * 300 + "nextval('s')" + ")" * 300)
    assert shallow.kind is Kind.READ and shallow.volatile
    for text in ("SELECT " + "(" * 20000 + "1" + ")" * 20000, "SELECT " + " + ".join(["f(1)"] * 5000)):
        deep = analyze(text)
        assert deep.kind is Kind.UNKNOWN and deep.parse_error and not deep.is_read


def test_lone_surrogate_is_unknown() -> None:
    a = analyze("SELECT '\ud800'")
    assert a.kind is Kind.UNKNOWN and a.parse_error


SQLISH = st.lists(
    st.sampled_from(
        [
            "SELECT", "INSERT", "INTO", "FROM", "WITH", "AS", "(", ")", ",", ";", "*", "t", "u", "nextval('s')",
            "DELETE", "UPDATE", "SET", "x", "=", "1", "'a'", "$1", "RETURNING", "FOR UPDATE", "WHERE", "DO",
            "$$", "BEGIN", "END", "COPY", "TO", "STDOUT", "EXPLAIN", "ANALYZE", "/*", "*/", "--", "\n",
            "pgshift:route=x", "LISTEN", "PREPARE", "EXECUTE", "DECLARE", "CURSOR", "WITH HOLD", "TEMP", "TABLE",
            "CREATE", "VALUES", "UNION", "JOIN", "ON", "CALL", "f()", "set_config('a','b',false)", "::int", "[1]",
        ]
    ),
    max_size=30,
).map(" ".join)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_analyze_never_raises_on_arbitrary_text(sql: str) -> None:
    a = analyze(sql)
    assert isinstance(a, Analysis)
    assert not (a.parse_error and a.is_read)


@settings(max_examples=500, deadline=None)
@given(SQLISH)
def test_analyze_never_raises_on_sql_like_text(sql: str) -> None:
    a = analyze(sql)
    assert isinstance(a, Analysis)
    if a.is_read:
        assert a.kind is Kind.READ and not a.tables_written and not a.pins


# --- cache --------------------------------------------------------------------------------------------------------


def test_cache_counts_hits_and_misses_and_returns_the_same_object() -> None:
    cache = AnalysisCache(capacity=4)
    first = cache.get("SELECT 1")
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    again = cache.get("SELECT 1")
    assert again is first
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.get("select 1") is not first  # keyed by the exact text
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)


def test_cache_evicts_least_recently_used() -> None:
    cache = AnalysisCache(capacity=2)
    a = cache.get("SELECT a")
    cache.get("SELECT b")
    assert cache.get("SELECT a") is a  # refreshes "SELECT a"
    cache.get("SELECT c")  # evicts "SELECT b", the least recently used
    assert len(cache) == 2
    assert "SELECT b" not in cache and "SELECT a" in cache and "SELECT c" in cache
    hits = cache.hits
    assert cache.get("SELECT a") is a and cache.hits == hits + 1
    cache.get("SELECT b")
    assert cache.misses == 4


def test_cache_bounds_memory_by_text_length() -> None:
    cache = AnalysisCache(capacity=100, max_text_length=100, max_total_length=250)
    long = "SELECT " + "1," * 60 + "1"
    assert cache.get(long).kind is Kind.READ
    assert len(cache) == 0  # too long to keep
    texts = [f"SELECT c{i} " + "x" * 80 for i in range(4)]  # ~90 characters each
    for text in texts:
        cache.get(text)
    assert len(cache) == 2 and texts[0] not in cache and texts[3] in cache


def test_cache_caches_failures_too() -> None:
    cache = AnalysisCache()
    bad = cache.get("SELEC 1")
    assert bad.kind is Kind.UNKNOWN and cache.get("SELEC 1") is bad and cache.hits == 1


def test_cache_rejects_a_useless_capacity() -> None:
    with pytest.raises(ValueError):
        AnalysisCache(capacity=0)


def test_cache_clear_keeps_counters() -> None:
    cache = AnalysisCache()
    cache.get("SELECT 1")
    cache.get("SELECT 1")
    cache.clear()
    assert len(cache) == 0 and (cache.hits, cache.misses) == (1, 1)


# --- literal-free cache keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 99;",
        ),
        ("select * from t where a = 'x''y' and b = 1.5e3", "select * from t where a = 'z' and b = 2"),
        ("SET search_path = 'a'", "SET search_path = 'b'"),
    ],
)
def test_texts_differing_only_in_literals_share_a_key(a: str, b: str) -> None:
    assert literal_free_key(a) is not None
    assert literal_free_key(a) == literal_free_key(b)


@pytest.mark.parametrize(
    "sql",
    [
        "select $1::int",
        'select "col 1" from t',
        "select 1 /* pgshift:route=new */",
        "select 1 -- pgshift:route=new",
        "select set_config('a', 'b', false)",
        "EXPLAIN (ANALYZE 0) DELETE FROM t",
        "DO 'begin perform 1; end'",
        "select E'\\\\x'",
        "select 'unterminated",
    ],
)
def test_texts_whose_analysis_depends_on_literals_keep_their_exact_text(sql: str) -> None:
    assert literal_free_key(sql) is None


def test_explain_analyze_is_never_confused_by_the_cache() -> None:
    cache = AnalysisCache()
    assert cache.get("EXPLAIN (ANALYZE 0) DELETE FROM t").kind is not Kind.WRITE
    assert cache.get("EXPLAIN (ANALYZE 1) DELETE FROM t").kind is Kind.WRITE


def test_cache_hit_through_the_literal_free_key() -> None:
    cache = AnalysisCache()
    first = cache.get("select * from items where id = 1")
    assert cache.get("select * from items where id = 2") is first
    assert (cache.hits, cache.misses) == (1, 1)
