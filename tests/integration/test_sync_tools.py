"""`pgshift sync check` and `pgshift sync sequences` against real clusters, through the CLI in-process."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.cli import main
from proxy.localpg import LocalCluster, free_port
from tests.integration.conftest import TwoClusters

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def clusters(make_cluster: Callable[..., LocalCluster]) -> TwoClusters:
    # The target runs with wal_level = replica: as a target that changes nothing, and used as the
    # source (test_wal_level_reported) it is the unprepared source, without a third cluster.
    return TwoClusters(make_cluster("sync-old"), make_cluster("sync-new", settings={"wal_level": "replica"}))


@pytest.fixture
def fresh(clusters: TwoClusters) -> TwoClusters:
    for cluster in (clusters.old, clusters.new):
        cluster.psql("drop schema if exists public cascade; create schema public;")
    return clusters


@pytest.fixture
def config(clusters: TwoClusters, tmp_path: Path) -> Path:
    """Backends "old" and "new" whose dsns leave user and database to the client (as a proxy's
    do), with mirror_user postgres; and "down", where nothing listens."""
    path = tmp_path / "config.toml"
    backends = {
        "old": clusters.old.dsn(user="", dbname=""),
        "new": clusters.new.dsn(user="", dbname=""),
        "down": f"postgresql://127.0.0.1:{free_port()}/postgres?connect_timeout=2",
    }
    text = "".join(f'[backends.{name}]\ndsn = "{dsn}"\nmirror_user = "postgres"\n\n' for name, dsn in backends.items())
    path.write_text(text + '[routing]\nprimary = "old"\n')
    return path


def run(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["sync", *argv, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def check_json(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(capsys, config, "check", "--json", *argv)
    return code, json.loads(out)


def codes(report: dict[str, Any], table: str | None = None) -> list[str]:
    return sorted(f["code"] for f in report["findings"] if table is None or f["table"] == table)


def fetch(cluster: LocalCluster, sql: str) -> Any:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        return row[0] if row else None


# --- sync check ---------------------------------------------------------------------------------

SAME = """
create table accounts (id serial primary key, owner text not null, balance numeric(12,2) default 0);
create table events (id bigint generated always as identity primary key, account int, kind varchar(20),
                     doubled int generated always as (account * 2) stored);
create table fulls (id int, note text);
alter table fulls replica identity full;
create table pgshift_journal (n int);  -- pgshift's own: never checked
"""


def test_all_clear(fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cluster in (fresh.old, fresh.new):
        cluster.psql(SAME)
    code, out, err = run(capsys, config, "check", "--from", "old", "--to", "new")
    assert code == 0, out + err
    assert "wal_level logical" in out
    assert "tables: 3 checked, 3 without findings" in out
    assert "0 problem(s), 0 warning(s): ready to sync" in out


def test_every_problem_reported(fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fresh.old.psql(
        SAME
        + """
        create table nopk (id int, v text);
        create table typed (id int primary key, n int, s text);
        create table gone (id int primary key);
        create table cols (id int primary key, a text, b int);
        create table gen (id int primary key, a int, g int);
        """
    )
    fresh.new.psql(
        SAME
        + """
        create table nopk (id int, v text);
        create table typed (id int primary key, n bigint, s varchar(10));
        create table cols (id int primary key, a text, extra int not null, spare int default 1);
        create table gen (id int primary key, a int, g int generated always as (a + 1) stored);
        """
    )
    code, report = check_json(capsys, config, "--from", "old", "--to", "new")
    assert code == 1
    # The --json shape: a verdict, counts, both endpoints, the tables, and findings with fixes.
    assert set(report) == {"ok", "problems", "warnings", "source", "target", "tables", "findings"}
    assert report["ok"] is False and report["problems"] == len(report["findings"]) == 7
    assert report["source"]["backend"] == "old" and report["source"]["user"] == "postgres"
    assert report["source"]["database"] == "postgres" and report["source"]["wal_level"] == "logical"
    assert report["target"]["backend"] == "new"
    assert "public.pgshift_journal" not in report["tables"] and "public.nopk" in report["tables"]
    for finding in report["findings"]:
        assert set(finding) == {"scope", "level", "code", "table", "message", "fix", "details"}
        assert finding["scope"] == "table" and finding["fix"]

    assert codes(report, "public.nopk") == ["no_replica_identity"]
    mismatches = {f["details"]["column"]: f for f in report["findings"] if f["code"] == "type_mismatch"}
    assert set(mismatches) == {"n", "s"}
    assert (mismatches["n"]["details"]["source_type"], mismatches["n"]["details"]["target_type"]) == (
        "integer",
        "bigint",
    )
    assert "text on the source, character varying(10) on the target" in mismatches["s"]["message"]
    assert codes(report, "public.gone") == ["missing_table"]
    assert codes(report, "public.cols") == ["extra_not_null_column", "missing_column"]
    missing = next(f for f in report["findings"] if f["code"] == "missing_column")
    assert missing["details"] == {"column": "b", "source_type": "integer"}
    assert codes(report, "public.gen") == ["generated_mismatch"]  # a value cannot be written into g there

    # The same, for people: grouped by table, each problem with its fix.
    code, out, _ = run(capsys, config, "check", "--from", "old", "--to", "new")
    assert code == 1
    assert "  public.typed\n    PROBLEM: column n is integer on the source, bigint on the target\n" in out
    assert '      fix: On the target: ALTER TABLE "public"."typed" ALTER COLUMN "n" TYPE integer;' in out
    assert "PROBLEM: no primary key and no replica identity on the source" in out
    assert "7 problem(s), 0 warning(s): not ready" in out

    # --tables: only those; a name that is no table is itself a problem.
    code, report = check_json(capsys, config, "--from", "old", "--to", "new", "--tables", "typed,public.gone,nosuch")
    assert code == 1 and report["tables"] == ["public.typed", "public.gone"]
    assert codes(report) == ["missing_table", "table_not_found", "type_mismatch", "type_mismatch"]


def test_wal_level_reported(fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = check_json(capsys, config, "--from", "new", "--to", "old")
    assert code == 1 and codes(report) == ["wal_level"]
    (finding,) = report["findings"]
    assert finding["scope"] == "source" and "wal_level is replica" in finding["message"]
    assert "wal_level = logical" in finding["fix"] and "restart" in finding["fix"]


def test_user_without_rights(fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cluster in (fresh.old, fresh.new):
        cluster.psql("drop role if exists plain; create role plain login; create table accounts (id int primary key);")
    argv = ["--from", "old", "--to", "new", "--user", "plain", "--database", "postgres"]
    code, report = check_json(capsys, config, *argv)
    assert code == 1
    assert report["source"]["user"] == "plain" and report["source"]["replication"] is False
    assert codes(report) == [
        "create_publication",
        "replication_privilege",
        "select_privilege",
        "table_ownership",
        "write_privilege",
    ]
    by_code = {f["code"]: f for f in report["findings"]}
    assert by_code["replication_privilege"]["fix"] == 'As a superuser on the source: ALTER ROLE "plain" REPLICATION;'
    assert "public.accounts (owner postgres)" in by_code["table_ownership"]["message"]
    assert by_code["write_privilege"]["scope"] == "target"


def test_unreachable_and_usage(fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, config, "check", "--from", "old", "--to", "down")
    assert code == 3 and out == ""
    assert 'cannot connect to backend "down" (127.0.0.1:' in err
    code, _, err = run(capsys, config, "sequences", "--from", "down", "--to", "new")
    assert code == 3 and 'backend "down"' in err
    code, _, err = run(capsys, config, "check", "--from", "old", "--to", "nosuch")
    assert code == 2 and "no backend 'nosuch'" in err
    code, _, err = run(capsys, config, "check", "--from", "old", "--to", "new", "--user", "nobody_here")
    assert code == 3 and "nobody_here" in err


# --- sync sequences -----------------------------------------------------------------------------

SEQUENCES = """
create table serials (id serial primary key, v text);
create table idents (id bigint generated always as identity primary key, v text);
create table copied (id serial primary key, v text);
create sequence standalone start 100;
"""

NAMES = ["public.copied_id_seq", "public.idents_id_seq", "public.serials_id_seq", "public.standalone"]


def last_values(cluster: LocalCluster) -> dict[str, int | None]:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        rows = conn.execute("select schemaname || '.' || sequencename, last_value from pg_sequences").fetchall()
    return dict(rows)


def test_sequences(fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cluster in (fresh.old, fresh.new):
        cluster.psql(SEQUENCES)
    fresh.old.psql(
        """
        insert into serials (v) select 'x' from generate_series(1, 50);
        insert into idents (v) select 'x' from generate_series(1, 30);
        insert into copied (v) select 'x' from generate_series(1, 5);
        select nextval('standalone') from generate_series(1, 7);
        """
    )
    # Rows that reached the target with explicit ids (copied, mirrored): far past both sequences.
    fresh.new.psql("insert into copied values (5000, 'explicit'); select nextval('serials_id_seq');")
    source = last_values(fresh.old)
    assert source == {
        "public.serials_id_seq": 50, "public.idents_id_seq": 30, "public.copied_id_seq": 5, "public.standalone": 106
    }  # fmt: skip
    before = last_values(fresh.new)

    code, out, _ = run(capsys, config, "sequences", "--from", "old", "--to", "new", "--margin", "100", "--dry-run")
    assert code == 0
    assert last_values(fresh.new) == before  # nothing changed
    assert "dry run: nothing changed" in out and "4 would set" in out

    code, out, err = run(capsys, config, "sequences", "--from", "old", "--to", "new", "--margin", "100", "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["ok"] is True and report["counts"] == {"set": 4} and report["margin"] == 100
    results = {r["sequence"]: r for r in report["sequences"]}
    assert sorted(results) == NAMES
    assert results["public.serials_id_seq"] == {
        "sequence": "public.serials_id_seq", "status": "set", "source": 50, "target_before": 1,
        "column": "public.serials.id", "column_extreme": None, "target_after": 150, "next_value": 151,
        "message": None,
    }  # fmt: skip
    assert results["public.standalone"]["target_before"] is None and results["public.standalone"]["column"] is None
    assert results["public.copied_id_seq"]["column_extreme"] == 5000

    # Each target sequence now hands out values past the source's next one by the margin, and
    # past the explicit ids already in its column.
    for name in ["public.serials_id_seq", "public.idents_id_seq", "public.standalone"]:
        source_next = source[name] + 1  # type: ignore[operator]
        assert fetch(fresh.new, f"select nextval('{name}')") == source_next + 100, name
    assert fetch(fresh.new, "select nextval('public.copied_id_seq')") == 5000 + 100 + 1
    fresh.new.psql("insert into idents (v) values ('after')")  # the identity column works from there

    # Again: already far enough, so left alone (no creeping forward on every run).
    after = last_values(fresh.new)
    code, out, _ = run(capsys, config, "sequences", "--from", "old", "--to", "new", "--margin", "100")
    assert code == 0 and "4 unchanged" in out
    assert last_values(fresh.new) == after


def test_missing_sequence(fresh: TwoClusters, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fresh.old.psql("create sequence kept; create sequence only_here; select nextval('kept');")
    fresh.new.psql("create sequence kept;")
    code, out, _ = run(capsys, config, "sequences", "--from", "old", "--to", "new")
    assert code == 1
    assert "public.only_here: missing on the target" in out
    assert "1 missing, 1 set: fix the sequences listed above" in out
    assert fetch(fresh.new, "select nextval('kept')") == 1 + 1000 + 1  # the default margin; the rest still done
