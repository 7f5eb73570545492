"""D1 value encoding (Postgres text → D1 parameters), statement building within D1's limits, and
the [stores] configuration."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import parse_config
from proxy.d1.client import Limits
from proxy.d1.schema import PgColumn, PgTable, create_table_sql, to_d1
from proxy.d1.types import BOOL, BYTEA, DATE, FLOAT, INTEGER, TEXT, TIMESTAMP, TIMESTAMPTZ, D1TypeError, codec_for
from proxy.d1.writes import Change, change_statements, delete_statements, upsert_statements
from proxy.errors import ConfigError


@pytest.mark.parametrize(
    ("codec", "text", "param"),
    [
        (INTEGER, "9007199254740993", "9007199254740993"),
        (INTEGER, "-9223372036854775808", "-9223372036854775808"),
        (BOOL, "t", "1"),
        (BOOL, "f", "0"),
        (FLOAT, "0.1", "0.1"),
        (FLOAT, "1e+300", "1e+300"),
        (FLOAT, "Infinity", "9e999"),
        (FLOAT, "-Infinity", "-9e999"),
        (FLOAT, "-0", "0.0"),
        (TEXT, "007", "007"),
        (TEXT, "12.50", "12.50"),
        (DATE, "2024-02-29", "2024-02-29"),
        (DATE, "infinity", "infinity"),
        (TIMESTAMP, "2024-01-02 03:04:05", "2024-01-02T03:04:05.000000"),
        (TIMESTAMP, "2024-01-02 03:04:05.5", "2024-01-02T03:04:05.500000"),
        (TIMESTAMPTZ, "2024-01-02 03:04:05.123456+02", "2024-01-02T01:04:05.123456Z"),
        (TIMESTAMPTZ, "2024-01-02 03:04:05+05:30", "2024-01-01T21:34:05.000000Z"),
        (TIMESTAMPTZ, "1900-01-01 00:00:00+00:19:32", "1899-12-31T23:40:28.000000Z"),
        (TIMESTAMPTZ, "0001-01-01 00:00:00+01", "0001-01-01 00:00:00+01"),  # before year 1 in UTC: as is
        (BYTEA, "\\x00FF10", "00ff10"),
        (BYTEA, "a\\\\b\\001", "615c6201"),  # bytea_output = escape
        (INTEGER, None, None),
    ],
)
def test_encode(codec: Any, text: str | None, param: str | None) -> None:
    assert codec.encode(text) == param


@pytest.mark.parametrize(
    ("codec", "value", "canonical"),
    [
        (INTEGER, "9007199254740993", "9007199254740993"),
        (FLOAT, 1000, "1000.0"),
        (FLOAT, "Inf", "9e999"),
        (FLOAT, "-Inf", "-9e999"),
        (FLOAT, -0.0, "0.0"),
        (BYTEA, [0, 255], "00ff"),
        (TEXT, None, None),
    ],
)
def test_decode(codec: Any, value: object, canonical: str | None) -> None:
    assert codec.decode(value) == canonical


@pytest.mark.parametrize(
    ("codec", "text"),
    [(FLOAT, "NaN"), (INTEGER, "1.5"), (BOOL, "yes"), (TIMESTAMPTZ, "Jan 2 2024"), (BYTEA, "\\x0")],
)
def test_refused(codec: Any, text: str) -> None:
    with pytest.raises(D1TypeError):
        codec.encode(text)


def test_type_mapping() -> None:
    assert [codec_for(t).sqlite_type for t in ("int2", "int4", "int8", "bool", "float4", "float8")] == [
        "INTEGER", "INTEGER", "INTEGER", "INTEGER", "REAL", "REAL",
    ]  # fmt: skip
    assert {codec_for(t).sqlite_type for t in ("numeric", "text", "uuid", "json", "jsonb", "_int4", "mood")} == {"TEXT"}
    assert codec_for("bytea").sqlite_type == "BLOB"


def table(columns: int, key: tuple[str, ...] = ("c0",)) -> Any:
    cols = tuple(PgColumn(f"c{i}", "integer" if i == 0 else "text", "int4" if i == 0 else "text", False)
                 for i in range(columns))  # fmt: skip
    (t,) = to_d1([PgTable("public", "t", cols, key)])
    return t


def test_upserts_keep_within_the_parameter_limit() -> None:
    wide = table(30)
    rows = [[str(i), *(f"v{i}" for _ in range(29))] for i in range(10)]
    statements = upsert_statements(wide, rows)
    assert [len(s.params) for s in statements] == [90, 90, 90, 30]  # 3 rows of 30 per statement
    first = statements[0].sql
    assert first.startswith('INSERT INTO "t" ("c0", "c1"')
    assert 'ON CONFLICT ("c0") DO UPDATE SET "c1" = excluded."c1", "c2" = excluded."c2"' in first
    assert first.endswith('"c29" = excluded."c29"') and first.count("(?, ?, ?") == 3
    narrow = table(2)
    assert [len(s.params) for s in upsert_statements(narrow, [[str(i), "x"] for i in range(120)])] == [100, 100, 40]
    tiny_sql = Limits(max_sql_bytes=300)
    assert all(len(s.sql) <= 300 for s in upsert_statements(narrow, [[str(i), "x"] for i in range(50)], tiny_sql))
    only_key = table(1)
    assert upsert_statements(only_key, [["1"]])[0].sql.endswith('ON CONFLICT ("c0") DO NOTHING')


def test_deletes_and_change_order() -> None:
    single = table(2)
    (delete,) = delete_statements(single, [["1"], ["2"]])
    assert delete.sql == 'DELETE FROM "t" WHERE "c0" IN (?, ?)' and delete.params == ("1", "2")
    composite = table(3, ("c1", "c0"))
    (delete,) = delete_statements(composite, [["a", "1"]])
    assert delete.sql == 'DELETE FROM "t" WHERE ("c1" = ? AND "c0" = ?)'
    assert [len(s.params) for s in delete_statements(single, [[str(i)] for i in range(250)])] == [100, 100, 50]
    statements = change_statements(
        [
            Change("upsert", single, ["1", "a"]),
            Change("upsert", single, ["2", "b"]),
            Change("delete", single, ["1"]),
            Change("upsert", single, ["1", "c"]),
        ]
    )
    assert [s.sql.split()[0] for s in statements] == ["INSERT", "DELETE", "INSERT"]
    assert statements[0].params == ("1", "a", "2", "b")


def test_create_table_and_refusals() -> None:
    cols = (PgColumn("id", "bigint", "int8", True), PgColumn("at", "timestamp with time zone", "timestamptz", False))
    (t,) = to_d1([PgTable("ref", "cities", cols, ("id",))])
    sql = create_table_sql(t)
    assert sql.startswith('CREATE TABLE IF NOT EXISTS "ref_cities" (')
    assert '"id" INTEGER NOT NULL,' in sql and '"at" TEXT,' in sql and sql.endswith('PRIMARY KEY ("id")\n) STRICT;')
    with pytest.raises(Exception, match="has no primary key"):
        to_d1([PgTable("public", "nokey", cols, ())])


BASE = {"backends": {"old": {"dsn": "postgresql://u@127.0.0.1/db"}}, "routing": {"primary": "old"}}
STORE = {"kind": "d1", "account_id": "acc", "database_id": "db", "token": "env:PGSHIFT_UNIT_D1_TOKEN",
         "tables": ["cities", "ref.categories"]}  # fmt: skip


def test_store_config(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({**BASE, "stores": {"edge": STORE}})
    store = config.stores["edge"]
    assert store.api_base == "https://api.cloudflare.com/client/v4" and store.requests_per_window == 1200
    monkeypatch.delenv("PGSHIFT_UNIT_D1_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="PGSHIFT_UNIT_D1_TOKEN, which is not set"):
        store.resolved_token("edge")
    monkeypatch.setenv("PGSHIFT_UNIT_D1_TOKEN", "secret")
    assert store.resolved_token("edge") == "secret"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "kv"}, "stores.edge.kind = 'kv' is not supported (supported: d1)"),
        ({"kind": None}, "stores.edge needs kind"),
        ({"api_base": "http://example.com/client/v4"}, "plain http is only allowed to a loopback address"),
        ({"tables": ["cities", "public.cities"]}, "tables lists public.cities twice"),
        ({"tables": ["bad name"]}, "must be written as table or schema.table"),
        ({"tables": []}, "tables"),
        ({"source": "nope"}, "stores.edge.source = 'nope' is not a backend"),
        ({"colour": "blue"}, "unknown setting"),
    ],
)
def test_store_config_errors(change: dict[str, Any], message: str) -> None:
    store = {k: v for k, v in {**STORE, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config({**BASE, "stores": {"edge": store}})
