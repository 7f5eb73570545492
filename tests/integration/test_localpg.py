"""proxy.localpg against real Postgres: start, settings, hba, SSL, demo data, teardown."""

from __future__ import annotations

import glob
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

import proxy
from proxy.errors import ClusterError
from proxy.localpg import LocalCluster, create_cluster, find_bindir, free_port

pytestmark = pytest.mark.timeout(90)

DEMO_SQL = Path(proxy.__file__).parent / "demo" / "marketplace.sql"


@pytest.fixture(autouse=True)
def _no_libpq_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An inherited PGPASSWORD or ~/.pgpass would make "connect without a password" succeed.
    for name in ("PGPASSWORD", "PGSSLMODE", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("ssl")
    cert, key = tmp / "server.crt", tmp / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def secure_cluster(make_cluster: Callable[..., LocalCluster], self_signed: tuple[Path, Path]) -> LocalCluster:
    """One cluster for both the hba and the SSL tests (each cluster costs ~1s of initdb)."""
    cert, key = self_signed
    cluster = make_cluster(
        "secure",
        hba=["host all alice 127.0.0.1/32 scram-sha-256"],
        ssl_cert=cert,
        ssl_key=key,
    )
    cluster.psql("SET password_encryption = 'scram-sha-256'; CREATE ROLE alice LOGIN PASSWORD 'wonderland'")
    return cluster


def test_cluster_answers_over_its_dsn(pg_cluster: LocalCluster) -> None:
    with psycopg.connect(pg_cluster.dsn(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.host == "127.0.0.1"
        assert conn.info.port == pg_cluster.port
    assert pg_cluster.dsn(user="bob", dbname="db", password="p@ss") == (
        f"postgresql://bob:p%40ss@127.0.0.1:{pg_cluster.port}/db"
    )


def test_settings_are_applied(pg_cluster: LocalCluster) -> None:
    out = pg_cluster.psql("SHOW wal_level; SHOW max_connections; SHOW fsync; SHOW listen_addresses")
    assert out.split() == ["logical", "200", "off", "127.0.0.1"]


def test_psql_failure_raises_with_stderr(pg_cluster: LocalCluster) -> None:
    with pytest.raises(ClusterError) as info:
        pg_cluster.psql("SELECT 1; SELECT no_such_column")
    assert "no_such_column" in (info.value.detail or "")


def test_hba_prepend_requires_scram_for_alice(secure_cluster: LocalCluster) -> None:
    with psycopg.connect(secure_cluster.dsn(user="alice", password="wonderland"), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("alice",)
    for password in (None, "wrong"):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(secure_cluster.dsn(user="alice", password=password), connect_timeout=10)
    # The default trust lines still apply to everyone else.
    with psycopg.connect(secure_cluster.dsn(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_ssl_with_self_signed_cert(secure_cluster: LocalCluster) -> None:
    with psycopg.connect(secure_cluster.dsn(), sslmode="require", connect_timeout=10) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)


def test_find_bindir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    for binary in ("initdb", "pg_ctl", "postgres"):
        (fake / binary).write_text("#!/bin/sh\n")
        (fake / binary).chmod(0o755)
    monkeypatch.setenv("PGSHIFT_PG_BINDIR", str(fake))
    assert find_bindir() == fake

    monkeypatch.setenv("PGSHIFT_PG_BINDIR", str(tmp_path / "nowhere"))
    with pytest.raises(ClusterError, match="PGSHIFT_PG_BINDIR"):
        find_bindir()

    monkeypatch.delenv("PGSHIFT_PG_BINDIR")
    assert (find_bindir() / "initdb").exists()


def test_demo_sql_loads_with_designed_counts(pg_cluster: LocalCluster) -> None:
    pg_cluster.psql("CREATE DATABASE demo_marketplace")
    try:
        pg_cluster.load_file(DEMO_SQL, dbname="demo_marketplace")
        counts = pg_cluster.psql(
            "SELECT (SELECT count(*) FROM cities), (SELECT count(*) FROM categories),"
            " (SELECT count(*) FROM users), (SELECT count(*) FROM vehicles),"
            " (SELECT count(*) FROM listings),"
            " (SELECT count(*) FROM listings WHERE status = 'active')",
            dbname="demo_marketplace",
        )
        assert counts.strip() == "50|20|500|1000|2000|1400"
    finally:
        pg_cluster.psql("DROP DATABASE demo_marketplace")


def test_stop_start_destroy() -> None:
    with create_cluster("lifecycle") as cluster:
        base_dir = cluster.base_dir
        assert base_dir.is_dir()
        assert base_dir.stat().st_mode & 0o777 == 0o755
        cluster.stop()
        assert not cluster.running
        cluster.stop()  # stopping a stopped cluster is a no-op
        cluster.start()
        assert cluster.psql("SELECT 42").strip() == "42"
    assert not base_dir.exists()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", cluster.port), timeout=2):
        pass
    cluster.destroy()  # idempotent


def test_failed_start_raises_with_log_and_cleans_up() -> None:
    with pytest.raises(ClusterError) as info:
        create_cluster("badconf", settings={"shared_buffers": "lots"})
    assert "shared_buffers" in (info.value.detail or "")
    assert glob.glob("/tmp/pgshift-badconf-*") == []


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536
