"""D1 against the local D1 server (workerd's D1 via miniflare, d1local/) and a real Postgres:
schema print/apply/check, row writes split at D1's limits, exact round trips of the type traps,
a backfill of thousands of rows plus changes, an injected difference found and repaired, and
refused tokens."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.cli import main
from proxy.d1.client import D1AuthError, D1Client, D1NotFound, D1SqlError, Limits, Statement
from proxy.d1.local import LocalD1, missing_reason
from proxy.d1.schema import D1Table, read_pg_tables, to_d1
from proxy.d1.types import D1TypeError
from proxy.d1.writes import Change, D1Writer, encode_row, read_keys, read_rows
from proxy.localpg import LocalCluster

pytestmark = pytest.mark.timeout(90)

_REASON = missing_reason()
if _REASON is not None and not os.environ.get("PGSHIFT_REQUIRE_D1"):
    pytest.skip(f"local D1 unavailable: {_REASON}", allow_module_level=True)

DATABASES = [f"00000000-0000-4000-8000-{i:012d}" for i in range(1, 9)]
_ids = itertools.count()


@pytest.fixture(scope="module")
def d1local() -> Iterator[LocalD1]:
    with LocalD1.start(database_ids=DATABASES) as server:
        yield server


@pytest.fixture(scope="module")
def source(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return make_cluster("d1-source")


@pytest.fixture
def database_id(d1local: LocalD1) -> str:
    """A D1 database of its own for each test."""
    return DATABASES[next(_ids) % len(DATABASES)]


@pytest.fixture
async def client(d1local: LocalD1, database_id: str) -> AsyncIterator[D1Client]:
    async with D1Client(
        account_id=d1local.account_id, database_id=database_id, token=d1local.token, api_base=d1local.api_base
    ) as c:
        yield c


class PgJson:
    """The JsonQuery protocol over psycopg (the CLI uses SqlConnection)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def json(self, sql: str) -> Any:
        cur = await self.conn.execute(sql)  # type: ignore[arg-type]
        row = await cur.fetchone()
        assert row is not None
        import json

        return json.loads(row[0])


async def pg_tables(cluster: LocalCluster, names: Sequence[str]) -> list[D1Table]:
    async with await psycopg.AsyncConnection.connect(cluster.dsn(), autocommit=True) as conn:
        return to_d1(await read_pg_tables(PgJson(conn), names))


async def pg_rows(cluster: LocalCluster, table: D1Table, where: str = "") -> list[list[str | None]]:
    """Rows as Postgres text (what pgoutput / COPY text give), in primary-key order."""
    cols = ", ".join(f'"{c.name}"::text' for c in table.columns)
    order = ", ".join(f'"{c}"' for c in table.primary_key)
    async with await psycopg.AsyncConnection.connect(cluster.dsn(), autocommit=True) as conn:
        await conn.execute("SET DateStyle = ISO; SET TimeZone = 'Asia/Kolkata'")
        cur = await conn.execute(f"SELECT {cols} FROM {table.source} {where} ORDER BY {order}")  # type: ignore[arg-type]
        return [list(r) for r in await cur.fetchall()]


async def all_rows(client: D1Client, table: D1Table) -> list[tuple[str | None, ...]]:
    out: list[tuple[str | None, ...]] = []
    after: list[str | None] | None = None
    while True:
        chunk = await read_rows(client, table, after=after, limit=2000)
        out.extend(chunk)
        if len(chunk) < 2000:
            return out
        last = chunk[-1]
        after = [last[p] for p in table.key_positions]


async def create_in_d1(client: D1Client, tables: Sequence[D1Table]) -> None:
    from proxy.d1.schema import apply_schema

    result = await apply_schema(client, tables)
    assert result.ok


# --- types ---

TYPES_SQL = """
CREATE TYPE mood AS ENUM ('sad', 'ok');
CREATE TABLE d1_types (
  id int8 PRIMARY KEY, small int2, whole int4 NOT NULL, flag bool, price numeric(12, 2), exact numeric,
  ratio float8, ratio4 float4, label text, code varchar(10), fixed char(5), uid uuid, feeling mood,
  day date, at timestamp, at_tz timestamptz, doc json, docb jsonb, raw bytea, tags int4[], span int4range,
  dur interval
);
INSERT INTO d1_types VALUES
  (9007199254740993, 32767, 7, true, 12.50, 1e3, 0.1, 1.1, '007', '1e3', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
   'ok', '2024-02-29', '2024-01-02 03:04:05.5', '2024-01-02 03:04:05.123456+02', '{"b": 1,  "a": [1, 2.50]}',
   '{"b": 1, "a": [1, 2.50], "big": 12345678901234567890}', '\\x00ff10', '{1,2,NULL}', '[1,5)', '1 day 02:00:00'),
  (-9223372036854775808, -32768, 0, false, -0.01, 'NaN', 1e300, -3.4e38, '12.50', ' 1 ', 'x', NULL, 'sad',
   'infinity', '-infinity', '1999-12-31 23:59:59.999999-08', '[]', 'null', '', '{}', 'empty', '-1 mon'),
  (9223372036854775807, NULL, -2147483648, NULL, NULL, '-1.5e-10', 'Infinity', '-Infinity', 'é ☃ "quoted" ''s',
   NULL, NULL, NULL, NULL, '0044-03-15 BC', NULL, '2024-06-01 00:00:00+05:30', NULL, NULL, '\\x5c27', NULL, NULL,
   NULL),
  (1, NULL, 1, NULL, NULL, NULL, '-0', NULL, '', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL);
"""


async def test_type_traps_round_trip_exactly(source: LocalCluster, client: D1Client) -> None:
    source.psql(TYPES_SQL)
    (table,) = await pg_tables(source, ["d1_types"])
    await create_in_d1(client, [table])
    rows = await pg_rows(source, table)
    await D1Writer(client).upsert(table, rows)

    back = await all_rows(client, table)
    expected = sorted((encode_row(table, r) for r in rows), key=lambda r: int(r[0] or 0))
    assert back == expected
    by_id = {r[0]: r for r in back}
    names = [c.name for c in table.columns]

    def value(row_id: str, column: str) -> str | None:
        return by_id[row_id][names.index(column)]

    assert value("9007199254740993", "label") == "007"  # text that looks like a number stays text
    assert value("9007199254740993", "code") == "1e3"
    assert value("9007199254740993", "price") == "12.50"  # numeric keeps its scale
    assert value("9007199254740993", "exact") == "1000"
    assert value("9007199254740993", "flag") == "1"
    assert value("9007199254740993", "at") == "2024-01-02T03:04:05.500000"
    assert value("9007199254740993", "at_tz") == "2024-01-02T01:04:05.123456Z"
    assert value("9007199254740993", "doc") == '{"b": 1,  "a": [1, 2.50]}'  # json: its own text
    assert value("9007199254740993", "docb") == '{"a": [1, 2.50], "b": 1, "big": 12345678901234567890}'
    assert value("9007199254740993", "raw") == "00ff10"
    assert value("9007199254740993", "tags") == "{1,2,NULL}"
    assert value("-9223372036854775808", "at_tz") == "2000-01-01T07:59:59.999999Z"
    assert value("-9223372036854775808", "ratio") == "1e+300"
    assert value("9223372036854775807", "ratio") == "9e999"  # +Infinity
    assert value("9223372036854775807", "day") == "0044-03-15 BC"
    assert value("9223372036854775807", "raw") == "5c27"
    assert value("1", "ratio") == "0.0"  # (the sign of a zero is not kept)
    # what D1 itself holds: integers as INTEGER (exact), bool 0/1, blob bytes, STRICT types
    raw = await client.raw(
        "SELECT typeof(id), CAST(id AS TEXT), typeof(flag), flag, typeof(raw), hex(raw), typeof(label), typeof(ratio) "
        "FROM d1_types WHERE id = ?",
        ["9007199254740993"],
    )
    assert raw.rows == [["integer", "9007199254740993", "integer", 1, "blob", "00FF10", "text", "real"]]
    # the trap itself: an integer bound as a JSON number arrives as a double
    trap = await client.raw("SELECT CAST(? AS TEXT)", [9007199254740993])  # type: ignore[list-item]
    assert trap.rows != [["9007199254740993"]]
    # NaN cannot be held by a REAL column: refused before anything is sent
    nan = [*rows[0]]
    nan[names.index("ratio")] = "NaN"
    with pytest.raises(D1TypeError, match="NaN"):
        await D1Writer(client).upsert(table, [nan])


# --- limits ---


async def test_batches_split_at_the_limits(source: LocalCluster, d1local: LocalD1, database_id: str) -> None:
    cols = ", ".join(f"c{i} text" for i in range(29))
    source.psql(f"CREATE TABLE d1_wide (id int PRIMARY KEY, {cols})")
    (table,) = await pg_tables(source, ["d1_wide"])
    rows = [[str(i), *(f"row {i} col {j} " + "x" * (i % 50) for j in range(29))] for i in range(3000)]
    limits = Limits(max_request_bytes=300_000)
    async with D1Client(
        account_id=d1local.account_id, database_id=database_id, token=d1local.token, api_base=d1local.api_base,
        limits=limits,
    ) as client:  # fmt: skip
        await create_in_d1(client, [table])
        before = client.stats.requests
        await D1Writer(client).upsert(table, rows)
        sent = client.stats.requests - before
        assert client.stats.statements >= 3000 // 3  # 30 columns: 3 rows (90 parameters) per statement
        assert sent > 1  # and more than one request
        count = await client.raw("SELECT count(*), sum(length(c28)) FROM d1_wide")
        assert count.rows[0][0] == 3000
        assert await all_rows(client, table) == [encode_row(table, r) for r in rows]

    # The local D1 enforces D1's limits as Cloudflare does: a client that did not split is refused.
    loose = Limits(max_params=1000, max_sql_bytes=10_000_000)
    async with D1Client(
        account_id=d1local.account_id, database_id=database_id, token=d1local.token, api_base=d1local.api_base,
        limits=loose,
    ) as client:  # fmt: skip
        sql = "SELECT " + ", ".join("?" for _ in range(101))
        with pytest.raises(D1SqlError, match="too many SQL variables") as info:
            await client.query(sql, ["1"] * 101)
        assert info.value.code == 7500 and info.value.status == 400
        long = "SELECT '" + "x" * 100_001 + "'"
        with pytest.raises(D1SqlError, match="SQLITE_TOOBIG"):
            await client.query(long)
        assert client.stats.retries == 0


# --- a backfill and a change stream ---


async def test_backfill_changes_difference_and_repair(source: LocalCluster, client: D1Client) -> None:
    source.psql(
        """
        CREATE TABLE d1_cities (id int PRIMARY KEY, name text NOT NULL, country char(2), population int8,
                                lat float8, updated timestamptz NOT NULL DEFAULT '2024-01-01 00:00+00');
        INSERT INTO d1_cities SELECT g, 'city ' || g, 'PT', g * 1000, g / 7.0, now() FROM generate_series(1, 5000) g;
        CREATE SCHEMA ref;
        CREATE TABLE ref.categories (kind text, code int, title text NOT NULL, PRIMARY KEY (kind, code));
        INSERT INTO ref.categories SELECT 'k' || (g % 10), g, 'title ' || g FROM generate_series(1, 2000) g;
        """
    )
    cities, categories = await pg_tables(source, ["d1_cities", "ref.categories"])
    assert categories.name == "ref_categories"
    await create_in_d1(client, [cities, categories])
    writer = D1Writer(client)
    started = asyncio.get_running_loop().time()
    await writer.upsert(cities, await pg_rows(source, cities))
    await writer.upsert(categories, await pg_rows(source, categories))
    elapsed = asyncio.get_running_loop().time() - started
    assert writer.rows == 7000
    assert elapsed < 30

    # Changes on the source, applied in order: insert, update, delete, re-insert of a deleted key.
    source.psql(
        """
        INSERT INTO d1_cities VALUES (5001, 'new', 'NO', 1, 0.5, now());
        UPDATE d1_cities SET name = 'renamed', population = 9007199254740993 WHERE id = 10;
        DELETE FROM d1_cities WHERE id BETWEEN 100 AND 199;
        DELETE FROM ref.categories WHERE code IN (5, 6);
        UPDATE ref.categories SET title = 'changed' WHERE code = 7;
        """
    )
    now = {r[0]: r for r in await pg_rows(source, cities, "WHERE id IN (10, 5001)")}
    changes = [
        Change("upsert", cities, now["5001"]),
        Change("upsert", cities, now["10"]),
        *(Change("delete", cities, [str(i)]) for i in range(100, 200)),
        Change("delete", categories, ["k5", "5"]),
        Change("delete", categories, ["k6", "6"]),
        Change("upsert", categories, (await pg_rows(source, categories, "WHERE code = 7"))[0]),
        Change("delete", cities, ["5001"]),  # deleted, then back: order matters
        Change("upsert", cities, now["5001"]),
    ]
    await writer.apply(changes)

    for table in (cities, categories):
        expected = [encode_row(table, r) for r in await pg_rows(source, table)]
        got = await all_rows(client, table)
        assert sorted(got) == sorted(expected), table.name

    # An injected difference is found by key lookup, and repaired by an upsert of the source row.
    await client.query("UPDATE d1_cities SET name = 'wrong' WHERE id = 42")
    await client.query("DELETE FROM d1_cities WHERE id = 43")
    keys = [[str(i)] for i in range(40, 46)]
    source_rows = {
        encode_row(cities, r)[0]: encode_row(cities, r)
        for r in await pg_rows(source, cities, "WHERE id BETWEEN 40 AND 45")
    }
    found = await read_keys(client, cities, keys)
    differing = sorted(k for k, row in source_rows.items() if found.get((k,)) != row)
    assert differing == ["42", "43"]
    await writer.upsert(cities, await pg_rows(source, cities, "WHERE id IN (42, 43)"))
    found = await read_keys(client, cities, keys)
    assert {k[0]: v for k, v in found.items()} == source_rows


# --- errors ---


async def test_refused_token_database_and_sql(d1local: LocalD1, client: D1Client) -> None:
    async with D1Client(
        account_id=d1local.account_id, database_id=DATABASES[0], token="wrong", api_base=d1local.api_base
    ) as bad:
        with pytest.raises(D1AuthError) as info:
            await bad.query("SELECT 1")
        assert info.value.status == 403 and info.value.code == 10000
        assert "Authentication error" in info.value.message
        assert info.value.hint is not None and "D1 Read and D1 Edit" in info.value.hint
        assert bad.stats.requests == 1  # never retried
    async with D1Client(
        account_id=d1local.account_id, database_id="no-such-db", token=d1local.token, api_base=d1local.api_base
    ) as lost:
        with pytest.raises(D1NotFound, match="could not be found"):
            await lost.query("SELECT 1")
    with pytest.raises(D1SqlError, match="no such table") as sql_error:
        await client.batch([Statement("CREATE TABLE IF NOT EXISTS kept (id INTEGER PRIMARY KEY) STRICT"),
                            Statement("SELECT * FROM no_such_table")])  # fmt: skip
    assert sql_error.value.code == 7500 and client.stats.retries == 0
    # a batch is one transaction: the CREATE TABLE before the failure was rolled back
    tables = await client.raw("SELECT name FROM sqlite_master WHERE name = 'kept'")
    assert tables.rows == []


# --- the CLI: pgshift d1 schema ---


def _config(tmp: Path, source: LocalCluster, d1local: LocalD1, database_id: str, tables: list[str]) -> Path:
    path = tmp / "config.toml"
    listed = ", ".join(f'"{t}"' for t in tables)
    path.write_text(
        f"""
[backends.old]
dsn = "{source.dsn()}"
[routing]
primary = "old"
[stores.edge]
kind = "d1"
account_id = "{d1local.account_id}"
database_id = "{database_id}"
token = "env:PGSHIFT_TEST_D1_TOKEN"
api_base = "{d1local.api_base}"
tables = [{listed}]
"""
    )
    return path


def test_cli_schema_print_apply_check(
    source: LocalCluster,
    d1local: LocalD1,
    database_id: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source.psql(
        """
        CREATE TABLE d1_cli_cities (id int4 PRIMARY KEY, name varchar(80) NOT NULL, big int8, at timestamptz,
                                    flag bool, doc jsonb, raw bytea, price numeric);
        CREATE TABLE d1_cli_pairs (a text, b int2, note text, PRIMARY KEY (b, a));
        CREATE TABLE d1_cli_nokey (x int);
        """
    )
    config = _config(tmp_path, source, d1local, database_id, ["d1_cli_cities", "public.d1_cli_pairs"])
    base = ["d1", "schema", "--config", str(config)]

    assert main([*base, "--check"]) == 2  # the token's variable is not set
    assert "PGSHIFT_TEST_D1_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("PGSHIFT_TEST_D1_TOKEN", d1local.token)

    assert main(base) == 0  # --print is the default, and needs no token
    sql = capsys.readouterr().out
    assert 'CREATE TABLE IF NOT EXISTS "d1_cli_cities" (' in sql
    assert '"big"   INTEGER,' in sql and '"name"  TEXT NOT NULL,' in sql and '"raw"   BLOB,' in sql
    assert 'PRIMARY KEY ("b", "a")' in sql and sql.count(") STRICT;") == 2
    assert "wrangler d1 execute" in sql

    assert main([*base, "--check"]) == 1
    out = capsys.readouterr().out
    assert "table 'd1_cli_cities' (public.d1_cli_cities) does not exist on D1" in out

    assert main([*base, "--apply"]) == 0
    assert capsys.readouterr().out.splitlines() == ["created table d1_cli_cities", "created table d1_cli_pairs"]
    assert main([*base, "--check"]) == 0
    assert "2 table(s) match" in capsys.readouterr().out
    assert main([*base, "--apply"]) == 0  # again: nothing to do
    assert "already matches" in capsys.readouterr().out

    # A D1 table that drifted: every difference is listed, exactly.
    async def drift() -> None:
        async with D1Client(
            account_id=d1local.account_id, database_id=database_id, token=d1local.token, api_base=d1local.api_base
        ) as c:
            await c.batch([
                Statement('DROP TABLE "d1_cli_pairs"'),
                Statement('CREATE TABLE "d1_cli_pairs" ("a" TEXT NOT NULL, "b" TEXT, "extra" REAL, PRIMARY KEY ("a"))'),
            ])  # fmt: skip

    asyncio.run(drift())
    assert main([*base, "--check", "--json"]) == 1
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["differences"]["d1_cli_cities"] == []
    assert report["differences"]["d1_cli_pairs"] == [
        "table 'd1_cli_pairs' is not STRICT on D1 (values of any type would be accepted)",
        "table 'd1_cli_pairs': column 'b' is TEXT on D1, expected INTEGER (Postgres smallint)",
        "table 'd1_cli_pairs': column 'b' is nullable on D1, expected NOT NULL",
        "table 'd1_cli_pairs': column 'note' is missing on D1 (expected TEXT, text)",
        "table 'd1_cli_pairs': column 'extra' exists on D1 but not on Postgres (public.d1_cli_pairs)",
        "table 'd1_cli_pairs': primary key is (a) on D1, expected (b, a)",
    ]
    assert main([*base, "--apply"]) == 1  # an existing table that differs is left alone, and said so
    assert "left alone: table 'd1_cli_pairs'" in capsys.readouterr().out

    absent = _config(tmp_path, source, d1local, database_id, ["d1_cli_cities", "d1_cli_absent"])
    assert main(["d1", "schema", "--config", str(absent)]) == 1
    assert "public.d1_cli_absent not found on the source database" in capsys.readouterr().err
    nokey = _config(tmp_path, source, d1local, database_id, ["d1_cli_nokey"])
    assert main(["d1", "schema", "--config", str(nokey)]) == 1
    assert "public.d1_cli_nokey has no primary key" in capsys.readouterr().err
