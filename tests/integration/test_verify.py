"""`pgshift verify` and `pgshift repair` against real clusters, through the CLI in-process.

The "new" cluster runs with other display settings than "old" (time zone, float digits, date and
interval styles, bytea output), so every test also shows those never make equal data differ.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.cli import main
from proxy.localpg import LocalCluster, free_port
from tests.integration.conftest import TwoClusters, routed_config
from tests.support.proxy import ProxyThread
from tests.support.relay import Relay

pytestmark = pytest.mark.timeout(90)

NEW_SETTINGS = {
    "timezone": "America/New_York",
    "extra_float_digits": "0",
    "datestyle": "SQL, DMY",
    "intervalstyle": "sql_standard",
    "bytea_output": "escape",
}


@pytest.fixture(scope="module")
def clusters(make_cluster: Callable[..., LocalCluster]) -> TwoClusters:
    return TwoClusters(make_cluster("verify-old"), make_cluster("verify-new", settings=NEW_SETTINGS))


@pytest.fixture
def fresh(clusters: TwoClusters) -> TwoClusters:
    for cluster in (clusters.old, clusters.new):
        cluster.psql("drop schema if exists public cascade; create schema public;")
    return clusters


@pytest.fixture
def config(clusters: TwoClusters, tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    backends = {
        "old": clusters.old.dsn(user="", dbname=""),
        "new": clusters.new.dsn(user="", dbname=""),
        "down": f"postgresql://127.0.0.1:{free_port()}/postgres?connect_timeout=2",
    }
    text = "".join(f'[backends.{name}]\ndsn = "{dsn}"\nmirror_user = "postgres"\n\n' for name, dsn in backends.items())
    path.write_text(text + '[routing]\nprimary = "old"\n')
    return path


def cli(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def verify_json(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, err = cli(capsys, config, "verify", "--from", "old", "--to", "new", "--json", "--quiet", *argv)
    assert out, err
    return code, json.loads(out)


def found(report: dict[str, Any]) -> dict[str, set[tuple[str, str, tuple[str, ...]]]]:
    """Per table: (kind, key as text, differing columns) of every difference."""
    out: dict[str, set[tuple[str, str, tuple[str, ...]]]] = {}
    for table in report["tables"]:
        diffs = out.setdefault(table["table"], set())
        for d in table["differences"]:
            key = ",".join(f"{c}={v}" for c, v in d["key"].items())
            diffs.add((d["kind"], key, tuple(d["columns"])))
    return out


def rows(cluster: LocalCluster, table: str, order: str = "1") -> list[tuple[Any, ...]]:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute("set datestyle = 'ISO'; set intervalstyle = 'postgres'")  # (what psycopg parses)
        return conn.execute(f"select * from {table} order by {order}").fetchall()


# --- injected differences, found exactly by every mode -------------------------------------------

SCHEMA = """
create table items (id int primary key, name text, note text, price numeric(12,2), token uuid, at timestamptz);
insert into items select g, 'item ' || g, case when g % 3 = 0 then null else 'n' || g end, g * 1.25,
  md5(g::text)::uuid, '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 minute'
from generate_series(1, 5000) g;
create table pairs (region text, seq int, v text, primary key (region, seq));
insert into pairs select 'r' || (g % 5), g, 'v' || g from generate_series(1, 1500) g;
create table things (id uuid primary key, label text);
insert into things select md5('t' || g)::uuid, 'label ' || g from generate_series(1, 800) g;
"""

INJECT = """
delete from items where id = 17;                                  -- missing row
insert into items values (5001, 'extra', null, 1, null, null);    -- extra row
update items set price = 99.99 where id = 42;                     -- changed value
update items set note = '' where id = 3000;                       -- NULL on old, empty string on new
update items set name = 'item 4321 ' where id = 4321;             -- trailing whitespace
update items set token = md5('other')::uuid where id = 77;        -- changed uuid value
update pairs set v = 'changed' where region = 'r3' and seq = 8;   -- composite key
delete from pairs where region = 'r0' and seq = 1000;
update things set id = md5('new id')::uuid where id = md5('t5')::uuid;  -- changed uuid key
update things set label = 'label  7' where id = md5('t7')::uuid;  -- doubled space
"""


def _uuid(text: str) -> str:
    import hashlib
    import uuid

    return str(uuid.UUID(hashlib.md5(text.encode()).hexdigest()))


EXPECTED = {
    "public.items": {
        ("only_in_source", "id=17", ()),
        ("only_in_target", "id=5001", ()),
        ("different", "id=42", ("price",)),
        ("different", "id=3000", ("note",)),
        ("different", "id=4321", ("name",)),
        ("different", "id=77", ("token",)),
    },
    "public.pairs": {
        ("different", "region=r3,seq=8", ("v",)),
        ("only_in_source", "region=r0,seq=1000", ()),
    },
    "public.things": {
        ("only_in_source", f"id={_uuid('t5')}", ()),
        ("only_in_target", f"id={_uuid('new id')}", ()),
        ("different", f"id={_uuid('t7')}", ("label",)),
    },
}


@pytest.fixture
def injected(fresh: TwoClusters) -> TwoClusters:
    for cluster in (fresh.old, fresh.new):
        cluster.psql(SCHEMA + "analyze;")
    fresh.new.psql(INJECT)
    return fresh


@pytest.mark.parametrize(
    "argv",
    [
        ["--mode", "checksum", "--chunk-rows", "2000"],  # several chunks; mismatching ones split, then row hashes
        ["--mode", "checksum", "--workers", "1", "--chunk-rows", "100000"],  # one chunk per table
        ["--mode", "full", "--chunk-rows", "700"],
        ["--mode", "sample", "--sample", "100000"],  # a sample as large as the tables: every row
    ],
    ids=["checksum", "checksum-one-chunk", "full", "sample-all"],
)
def test_injected_differences_found_exactly(
    injected: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, report = verify_json(capsys, config, "--recheck-after", "0.1", *argv)
    assert code == 1
    assert found(report) == EXPECTED
    items = next(t for t in report["tables"] if t["table"] == "public.items")
    assert items["status"] == "differs" and items["key"] == ["id"]
    null_vs_empty = next(d for d in items["differences"] if d["key"] == {"id": "3000"})
    assert null_vs_empty["source"] == {"note": None} and null_vs_empty["target"] == {"note": ""}
    changed = next(d for d in items["differences"] if d["key"] == {"id": "42"})
    assert changed["source"] == {"price": "52.5"} and changed["target"] == {"price": "99.99"}
    if argv[1] != "sample":
        assert items["rows_compared"] == 5000 and items["target_rows"] == 5000
    assert report["rechecked"] == sum(len(v) for v in EXPECTED.values())


def test_small_sample_finds_only_real_differences(
    injected: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = verify_json(capsys, config, "--mode", "sample", "--sample", "200", "--rechecks", "0")
    for table, diffs in found(report).items():
        assert diffs <= EXPECTED[table]
    assert code == (1 if report["differences"] else 0)
    assert all(0 < t["rows_compared"] <= 400 for t in report["tables"])


def test_human_output(injected: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(
        capsys, config, "verify", "--from", "old", "--to", "new", "--tables", "items", "--recheck-after", "0.1"
    )
    assert code == 1
    assert "public.items: 6 difference(s) (5,000 rows, 2 chunk(s), 1 mismatching" in out  # (2nd: keys > 10000)
    assert "    only in old  id=17\n" in out and "    only in new  id=5001\n" in out
    assert '    different    id=3000: note: old NULL, new ""\n' in out
    assert '    different    id=4321: name: old "item 4321", new "item 4321 "\n' in out
    assert "1 table(s), 5,000 rows in" in out and "6 difference(s) in 1 table(s)" in out
    assert "public.items: 5,000 rows" in err  # progress on stderr


# --- canonical form ------------------------------------------------------------------------------

CANON_OLD = """
create table canon (
  id int primary key, amount numeric(12,2), ratio float8, small float4, at timestamptz, day date,
  local timestamp, span interval, doc json, docb jsonb, blob bytea, big int, label varchar(20), tag text,
  flag bool, code char(5), cash money);
create table tkeys (name text collate "C" primary key, v int);
"""
CANON_NEW = """
create table canon (
  id int primary key, amount numeric, ratio float8, small float4, at timestamptz, day date,
  local timestamp, span interval, doc json, docb jsonb, blob bytea, big bigint, label text, tag text,
  flag bool, code char(8), cash money);
create table tkeys (name text collate "POSIX" primary key, v int);
"""
CANON_ROWS = """
insert into canon values
  (1, 1.50, 0.1, 0.1, '2024-03-01 12:00:00+02', '2024-02-29', '2024-01-01 10:00', '1 day 2 hours',
   %(doc1)s, '{"b": [1, 2], "a": {"y": 1, "x": 2}}', '\\x00ff10', 2147483647, 'abc', 'Straße', true, 'ab', 12.5),
  (2, 0, -0.0, 1e-30, 'infinity', '-infinity', '2000-01-01', '1 mon 3 days 00:00:01.5', '[]', 'null', '', -1,
   '', '', false, '', 0),
  (3, null, 'NaN', 'Infinity', null, null, null, null, null, null, null, null, null, null, null, null, null),
  (4, 123456.78, 1e300, 3.4e38, '1999-12-31 23:59:59.999999-08', '0001-01-01', '2024-06-01 00:00:00.5',
   '0', '{"k": "v\\u00e9"}', '{"k": "é"}', '\\x', 0, 'x', 'tab	in', true, 'xyz', -3.33);
insert into tkeys select 'k' || g, g from generate_series(1, 300) g;
insert into tkeys values ('B', 1), ('a', 2), ('_', 3), ('Z', 4);
"""


def test_equal_data_compares_equal_across_types_and_settings(
    fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh.old.psql(CANON_OLD + CANON_ROWS.replace("%(doc1)s", """'{"a": 1,  "b": [true, null]}'"""))
    # The same values written another way: json keys reordered and spaced differently, numeric scale.
    fresh.new.psql(CANON_NEW + CANON_ROWS.replace("%(doc1)s", """'{"b":[true,null],"a":1}'"""))
    fresh.new.psql("update canon set amount = 1.5000 where id = 1; update canon set ratio = '-0' where id = 2")
    for mode in ("checksum", "full", "sample"):
        code, report = verify_json(capsys, config, "--mode", mode, "--rechecks", "0", "--chunk-rows", "50")
        assert code == 0, (mode, found(report), report["tables"])
    canon = next(t for t in report["tables"] if t["table"] == "public.canon")
    mismatches = {n["column"]: n["message"] for n in canon["notes"] if n["code"] == "type_mismatch"}
    assert set(mismatches) == {"amount", "big", "label", "code"}
    assert mismatches["big"] == (
        "column big is integer on the source, bigint on the target (values compared in canonical form)"
    )
    tkeys = next(t for t in report["tables"] if t["table"] == "public.tkeys")
    assert [n["code"] for n in tkeys["notes"]] == ["key_collation"]

    # And a real difference in the same table is still seen, whatever the settings.
    fresh.new.psql("update canon set ratio = 0.30000000000000004 where id = 1; update tkeys set v = 0 where name = '_'")
    code, report = verify_json(capsys, config, "--rechecks", "0", "--chunk-rows", "50")
    assert code == 1
    assert found(report) == {
        "public.canon": {("different", "id=1", ("ratio",))},
        "public.tkeys": {("different", "name=_", ("v",))},
    }


def test_tables_that_cannot_be_compared(fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fresh.old.psql("create table gone (id int primary key); create table log (line text); insert into log values ('a')")
    fresh.new.psql("create table log (line text); insert into log values ('b')")
    code, report = verify_json(capsys, config, "--rechecks", "0")
    assert code == 1
    status = {t["table"]: t["status"] for t in report["tables"]}
    assert status == {"public.gone": "not_compared", "public.log": "differs"}
    log = next(t for t in report["tables"] if t["table"] == "public.log")
    assert log["digest_differs"] and [n["code"] for n in log["notes"]] == ["no_primary_key"]
    fresh.new.psql("update log set line = 'a'")
    code, report = verify_json(capsys, config, "--tables", "log", "--rechecks", "0")
    assert code == 0 and report["tables"][0]["status"] == "clean"
    code, _, _ = cli(capsys, config, "verify", "--from", "old", "--to", "new", "--tables", "nosuch")
    assert code == 1


def test_unreachable_and_usage(fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, config, "verify", "--from", "old", "--to", "down")
    assert code == 3 and 'backend "down"' in err
    code, _, err = cli(capsys, config, "verify", "--from", "old", "--to", "old")
    assert code == 2 and "same backend" in err
    code, _, err = cli(capsys, config, "verify", "--from", "old", "--to", "new", "--source-replica", "nosuch")
    assert code == 2 and "nosuch" in err


# --- repair --------------------------------------------------------------------------------------

REPAIR_SCHEMA = """
create table accounts (id bigint generated always as identity primary key, owner text not null,
                       balance numeric(12,2), doubled numeric generated always as (balance * 2) stored,
                       opened timestamptz, tags text[], meta jsonb, blob bytea);
insert into accounts (owner, balance, opened, tags, meta, blob)
select 'owner ' || g, g * 10.5, '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 hour',
       array['a', 'b' || g], jsonb_build_object('n', g), decode(md5(g::text), 'hex')
from generate_series(1, 3000) g;
"""


def test_repair_fixes_exactly_the_reported_rows(
    fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for cluster in (fresh.old, fresh.new):
        cluster.psql(REPAIR_SCHEMA)
    fresh.new.psql(
        """
        delete from accounts where id in (5, 2500);
        update accounts set balance = 0, tags = array['x'] where id = 10;
        update accounts set owner = 'owner 11 ' where id = 11;
        update accounts set meta = null, blob = '' where id = 1200;
        insert into accounts (id, owner) overriding system value values (9001, 'stray');
        """
    )
    report_file = tmp_path / "report.json"
    code, out, _ = cli(
        capsys, config, "verify", "--from", "old", "--to", "new", "--rechecks", "0", "--report", str(report_file),
        "--chunk-rows", "1000", "--quiet",
    )  # fmt: skip
    assert code == 1
    reported = {d["key"]["id"] for d in json.loads(report_file.read_text())["tables"][0]["differences"]}
    assert reported == {"5", "2500", "10", "11", "1200", "9001"}

    # A difference made after the report is not in it: repair must leave that row alone.
    fresh.new.psql("update accounts set owner = 'later' where id = 20")
    before = {r[0]: r for r in rows(fresh.new, "accounts")}

    code, out, _ = cli(
        capsys, config, "repair", "--from", "old", "--to", "new", "--table", "accounts", "--from-report",
        str(report_file), "--dry-run",
    )  # fmt: skip
    assert code == 0 and "would delete id=9001" in out and "would upsert id=5" in out
    assert {r[0]: r for r in rows(fresh.new, "accounts")} == before  # a dry run writes nothing

    code, out, err = cli(
        capsys, config, "repair", "--from", "old", "--to", "new", "--table", "accounts", "--from-report",
        str(report_file), "--json",
    )  # fmt: skip
    assert code == 0, out + err
    result = json.loads(out)
    assert result["ok"] and not result["still_differing"]
    assert sorted(int(k["id"]) for k in result["upserted"]) == [5, 10, 11, 1200, 2500]
    assert [k["id"] for k in result["deleted"]] == ["9001"]

    after = {r[0]: r for r in rows(fresh.new, "accounts")}
    source = {r[0]: r for r in rows(fresh.old, "accounts")}
    touched = {5, 2500, 10, 11, 1200, 9001}
    for key in (before.keys() | after.keys()) - touched:
        assert after.get(key) == before.get(key), key  # every other row exactly as it was
    for key in touched:
        assert after.get(key) == source.get(key), key  # the repaired ones as on the source
    assert after[20][1] == "later"

    # Without a report: repair finds the remaining difference itself.
    code, out, _ = cli(
        capsys, config, "repair", "--from", "old", "--to", "new", "--table", "accounts", "--rechecks", "0"
    )
    assert code == 0 and "upserted id=20" in out and "1 row(s) upserted, 0 deleted" in out
    code, _ = verify_json(capsys, config, "--rechecks", "0")
    assert code == 0
    assert rows(fresh.new, "accounts") == rows(fresh.old, "accounts")


def test_repair_refuses_a_report_of_other_backends(
    fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"source": {"backend": "x"}, "target": {"backend": "new"}, "tables": []}))
    code, _, err = cli(
        capsys, config, "repair", "--from", "old", "--to", "new", "--table", "t", "--from-report", str(report)
    )
    assert code == 2 and "report's source is backend 'x'" in err


# --- time box and resume -------------------------------------------------------------------------


def test_max_duration_then_resume(
    fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    setup = "create table big (id int primary key, v text); "
    setup += "insert into big select g, 'v' || g from generate_series(1, 40000) g"
    for cluster in (fresh.old, fresh.new):
        cluster.psql(setup)
    fresh.new.psql("update big set v = 'early' where id = 10; update big set v = 'late' where id = 39000")
    state = tmp_path / "state.json"
    common = ["--chunk-rows", "1000", "--workers", "1", "--rechecks", "0", "--state", str(state)]
    # 5,000 rows/s for 1 s: a few chunks, then the time box ends the run.
    code, report = verify_json(capsys, config, *common, "--rate-limit", "5000", "--max-duration", "1")
    assert code == 1  # the early difference was covered (and is reported); the run is incomplete
    big = report["tables"][0]
    assert not report["complete"] and report["stopped"] == "--max-duration 1 s reached"
    assert big["status"] == "differs" and not big["complete"]
    assert found(report)["public.big"] == {("different", "id=10", ("v",))}
    covered = big["rows_compared"]
    assert 1000 <= covered < 40000
    saved = json.loads(state.read_text())
    assert not saved["finished"] and saved["tables"]["public.big"]["done_upto"] is not None

    # Options that do not match the saved run are refused, not mixed in.
    code, _, err = cli(
        capsys, config, "verify", "--from", "old", "--to", "new", "--state", str(state), "--mode", "full"
    )
    assert code == 2 and "another run" in err

    code, report = verify_json(capsys, config, *common)
    big = report["tables"][0]
    assert code == 1 and report["complete"] and big["complete"]
    assert found(report)["public.big"] == {("different", "id=10", ("v",)), ("different", "id=39000", ("v",))}
    assert big["rows_compared"] == 40000  # every row once, over both runs
    assert json.loads(state.read_text())["finished"]

    # Once finished, the same state file starts a new run from the beginning.
    fresh.new.psql("update big set v = 'v10' where id = 10; update big set v = 'v39000' where id = 39000")
    code, report = verify_json(capsys, config, *common)
    assert code == 0 and report["tables"][0]["rows_compared"] == 40000


def test_statement_timeout_is_an_error_not_a_difference(
    fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = "create table slow (id int primary key, v text); "
    setup += "insert into slow select g, 'x' from generate_series(1, 300000) g"
    for cluster in (fresh.old, fresh.new):
        cluster.psql(setup)
    code, report = verify_json(capsys, config, "--chunk-rows", "300000", "--statement-timeout", "0.005")
    assert code == 4 and report["tables"][0]["status"] == "error"
    # ("… due to statement timeout", or "… due to user request" when a parallel worker was cancelled)
    assert "canceling statement" in report["tables"][0]["error"]


# --- live traffic through the proxy: no false positives -------------------------------------------

LIVE_SCHEMA = """
create table stock (id int primary key, qty int not null, note text, updated timestamptz);
insert into stock select g, g % 50, 'n' || g, '2024-01-01 00:00:00+00' from generate_series(1, 3000) g;
create table moves (id bigint primary key, item int, delta int);
"""


@dataclass
class Live:
    proxy: ProxyThread
    relay: Relay  # between the proxy and "new": stalled now and then, so the mirror lags for real


@pytest.fixture
def live(fresh: TwoClusters) -> Iterator[Live]:
    for cluster in (fresh.old, fresh.new):
        cluster.psql(LIVE_SCHEMA)
    with Relay(fresh.new.host, fresh.new.port) as relay:
        proxy = ProxyThread(routed_config(fresh.old, relay.dsn(), mirrors=["new"])).start()
        try:
            yield Live(proxy, relay)
        finally:
            relay.resume()
            proxy.stop()


def _lagging(relay: Relay, stop: threading.Event) -> None:
    """The mirror's writes held back 0.3 s out of every second: new lags old by up to about 0.4 s
    (bounded: the mirror catches up in between; a lag growing past the window would be reported)."""
    while not stop.is_set():
        relay.stall()
        stop.wait(0.3)
        relay.resume()
        stop.wait(0.7)


def _writer(dsn: str, stop: threading.Event, seed: int, counter: list[int]) -> None:
    rnd = random.Random(seed)
    next_move = seed * 10_000_000
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            item = rnd.randint(1, 2500)  # rows above 2500 are never written by the application
            with conn.transaction():
                conn.execute(
                    "update stock set qty = qty + 1, updated = %s where id = %s",
                    (f"2024-02-{item % 28 + 1} 00:00:00+00", item),
                )
                next_move += 1
                conn.execute("insert into moves values (%s, %s, 1)", (next_move, item))
            if rnd.random() < 0.2:
                conn.execute("delete from moves where id = %s", (next_move - rnd.randint(0, 5),))
            counter[0] += 1


def test_live_dual_write_no_false_positives(
    fresh: TwoClusters, live: Live, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stop = threading.Event()
    counters = [[0], [0]]
    threads = [
        threading.Thread(target=_writer, args=(live.proxy.dsn(), stop, n + 1, counters[n]), daemon=True)
        for n in range(2)
    ]
    threads.append(threading.Thread(target=_lagging, args=(live.relay, stop), daemon=True))
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        # A real difference, made behind the proxy's back, in a row the application never writes.
        fresh.new.psql("update stock set note = 'drift' where id = 2900")
        reports = []
        # (the checksum pass paced to last a few seconds: it reads through several stalls)
        checksum = ["--mode", "checksum", "--chunk-rows", "500", "--rate-limit", "1500"]
        for argv in (checksum, ["--mode", "sample", "--sample", "400"]):
            code, report = verify_json(capsys, config, "--recheck-after", "2", "--rechecks", "5", *argv)
            reports.append((code, report))
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert all(c[0] > 20 for c in counters), counters  # the application kept writing throughout
    code, report = reports[0]
    assert code == 1, report
    # Exactly the one real difference; the rows being written (lagging on new) are never reported.
    assert found(report) == {"public.stock": {("different", "id=2900", ("note",))}, "public.moves": set()}
    assert all(not t["unsettled"] for t in report["tables"])
    # The lag was real: chunks differed while they were read (the rows behind them had caught up
    # by the drill-down, or were candidates the recheck dismissed).
    assert sum(t["chunks_mismatched"] for t in report["tables"]) > 1
    code, report = reports[1]
    assert found(report)["public.moves"] == set()
    assert found(report)["public.stock"] <= {("different", "id=2900", ("note",))}
    assert all(not t["unsettled"] for t in report["tables"])
