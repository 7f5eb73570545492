"""`pgshift sync start --schema` and `--metrics-port` against real clusters: into an EMPTY target
database, the schema (tables, sequences, then primary keys, indexes and foreign keys) and the data
are copied, the stream applies new writes, /metrics answers with growing pgshift_sync_* values; and
--schema is refused when a selected table exists on the target."""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from proxy.localpg import LocalCluster, free_port
from tests.integration.conftest import TwoClusters
from tests.integration.test_sync_cli import Sync, assert_equal, cli, fetch, pgbench, source_objects

pytestmark = pytest.mark.timeout(120)

METRICS = (
    "pgshift_sync_phase",
    "pgshift_sync_table_rows_copied_total",
    "pgshift_sync_table_bytes_copied_total",
    "pgshift_sync_table_chunks_done",
    "pgshift_sync_table_chunks",
    "pgshift_sync_transactions_applied_total",
    "pgshift_sync_rows_applied_total",
    "pgshift_sync_confirmed_lsn",
    "pgshift_sync_lag_bytes",
    "pgshift_sync_lag_seconds",
)


@pytest.fixture(scope="module")
def clusters(make_cluster: Callable[..., LocalCluster]) -> TwoClusters:
    old, new = make_cluster("sync-schema-old"), make_cluster("sync-schema-new")
    pgbench(old, "-i", "-q", "-s", "1", "-I", "dtgvpf")  # with the foreign keys
    old.psql("alter table pgbench_history add column hid bigserial primary key")
    return TwoClusters(old, new)  # new: an empty database


@pytest.fixture
def config(clusters: TwoClusters, tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    backends = {"old": clusters.old.dsn(user="", dbname=""), "new": clusters.new.dsn(user="", dbname="")}
    text = "".join(f'[backends.{name}]\ndsn = "{dsn}"\nmirror_user = "postgres"\n\n' for name, dsn in backends.items())
    path.write_text(text + '[routing]\nprimary = "old"\n')
    return path


def constraints(cluster: LocalCluster) -> set[tuple[str, str, str]]:
    """(table, kind, definition) of every primary key, foreign key, unique and check constraint."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "select conrelid::regclass::text, contype::text, pg_get_constraintdef(oid) from pg_constraint "
            "where connamespace = 'public'::regnamespace and conrelid <> 0"
        ).fetchall()
    return {(r[0], r[1], r[2]) for r in rows if not r[0].startswith("pgshift_")}


def indexes(cluster: LocalCluster) -> set[str]:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        rows = conn.execute("select indexdef from pg_indexes where schemaname = 'public'").fetchall()
    return {r[0] for r in rows if "pgshift_" not in r[0]}


def scrape(port: int) -> dict[str, float]:
    """The samples of /metrics: {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    for name in METRICS:
        assert f"# HELP {name} " in text, f"{name} has no help text:\n{text}"
        assert any(re.match(rf"{name}(\{{|$)", s) for s in samples), f"no {name} sample:\n{text}"
    return samples


def test_schema_refused_when_a_table_exists(clusters: TwoClusters, config: Path) -> None:
    new = clusters.new
    new.psql("create table pgbench_branches (bid int primary key, bbalance int, filler char(88))")
    try:
        code, out, err = cli(config, "start", "--schema", "--tables", "pgbench_branches,pgbench_tellers")
        assert code == 1, out + err
        assert "--schema creates the tables" in err and "public.pgbench_branches" in err, err
        refusal = next(line for line in err.splitlines() if "--schema creates the tables" in line)
        assert "pgbench_tellers" not in refusal, refusal
        assert "nothing was created" in err
        assert source_objects(clusters.old) == (0, 0)
        assert fetch(new, "select count(*) from pg_tables where schemaname = 'public'") == 1  # (its own)
    finally:
        new.psql("drop table pgbench_branches")


def test_schema_copy_stream_and_metrics(clusters: TwoClusters, config: Path, tmp_path: Path) -> None:
    old, new = clusters.old, clusters.new
    assert fetch(new, "select count(*) from pg_tables where schemaname = 'public'") == 0
    port = free_port()
    sync = Sync(config, tmp_path, "--schema", "--metrics-port", str(port), "--workers", "2")
    sync.wait_streaming(config)
    output = sync.output()
    assert "copying the schema of the whole database" in output and "created " in output, output
    assert "indexes and constraints applied" in output, output

    # The schema: every primary key, foreign key and index of the source, and the serial's sequence.
    assert constraints(new) == constraints(old)
    assert {kind for _, kind, _ in constraints(new)} >= {"p", "f"}
    assert indexes(new) == indexes(old)
    assert fetch(new, "select pg_get_serial_sequence('pgbench_history', 'hid')") == "public.pgbench_history_hid_seq"

    first = scrape(port)
    assert first['pgshift_sync_phase{phase="streaming"}'] == 1.0
    assert first['pgshift_sync_phase{phase="backfill"}'] == 0.0
    assert first['pgshift_sync_table_rows_copied_total{table="public.pgbench_accounts"}'] == 100_000
    assert (
        first['pgshift_sync_table_chunks_done{table="public.pgbench_accounts"}']
        == (first['pgshift_sync_table_chunks{table="public.pgbench_accounts"}'])
    )

    # New writes arrive (upserts on the primary keys post-data created), and the metrics grow.
    pgbench(old, "-c", "2", "-t", "100")
    old.psql("delete from pgbench_history where hid % 5 = 0")
    sync.wait_caught_up(config)
    assert_equal(clusters)
    assert fetch(new, "select count(*) from pgbench_history") == fetch(old, "select count(*) from pgbench_history")
    second = scrape(port)
    assert second["pgshift_sync_transactions_applied_total"] >= first["pgshift_sync_transactions_applied_total"] + 200
    assert second['pgshift_sync_rows_applied_total{kind="insert"}'] >= 200
    assert second['pgshift_sync_rows_applied_total{kind="delete"}'] >= 1
    assert second["pgshift_sync_confirmed_lsn"] > first["pgshift_sync_confirmed_lsn"]
    assert second["pgshift_sync_lag_bytes"] >= 0 and second["pgshift_sync_lag_seconds"] >= 0

    assert sync.terminate(signal.SIGTERM) == 0, sync.output()
    with pytest.raises(OSError):
        scrape(port)  # the metrics end with the run
    code, out, err = cli(config, "stop")
    assert code == 0, out + err
    assert source_objects(old) == (0, 0)


def test_schema_of_selected_tables(clusters: TwoClusters, tmp_path: Path) -> None:
    """--tables: only their schema (pg_dump -t, exact names), into another empty database."""
    clusters.new.psql("create database part")
    config = tmp_path / "config.toml"
    dsns = {"old": clusters.old.dsn(user="", dbname=""), "new": clusters.new.dsn(user="", dbname="part")}
    text = "".join(f'[backends.{name}]\ndsn = "{dsn}"\nmirror_user = "postgres"\n\n' for name, dsn in dsns.items())
    config.write_text(text + '[routing]\nprimary = "old"\n')
    sync = Sync(config, tmp_path, "--schema", "--tables", "pgbench_branches,pgbench_tellers", "--slot", "part",
                "--publication", "part")  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        while "streaming changes from slot" not in sync.output():
            assert sync.proc.poll() is None and time.monotonic() < deadline, sync.output()
            time.sleep(0.2)
        with psycopg.connect(clusters.new.dsn(dbname="part"), autocommit=True) as conn:
            tables = {r[0] for r in conn.execute("select tablename from pg_tables where schemaname = 'public'")}
            count = conn.execute("select count(*) from pgbench_tellers").fetchone()
            keys = conn.execute(
                "select count(*) from pg_constraint where contype in ('p', 'f') "
                "and conrelid::regclass::text like 'pgbench%'"
            ).fetchone()
        assert tables == {"pgbench_branches", "pgbench_tellers", "pgshift_sync_state", "pgshift_backfill"}
        assert count == (10,) and keys == (3,)  # two primary keys, tellers -> branches
    finally:
        assert sync.terminate(signal.SIGTERM) == 0, sync.output()
        code, out, err = cli(config, "stop", "--slot", "part")
        assert code == 0, out + err
