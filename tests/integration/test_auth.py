"""Authentication and identity through the proxy, against a real Postgres and real clients.

Client auth at the proxy (trust, scram-sha-256, md5, reject, the default rule), backend auth with
the proxy's own credentials (DSN, env:VAR, PGPASSFILE) for each hba method, SCRAM pass-through,
identity transparency and startup parameters (DESIGN.md §3 "Identity and authentication").
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.localpg import LocalCluster, create_cluster
from tests.support.proxy import ProxyThread, single_backend_config
from tests.support.relay import Relay

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

ALICE_PW = "alice in wonderland"  # a space, to check the password survives --password-stdin
BOB_PW = "bob-md5-secret"
CAROL_PW = "carol-secret"

# Service accounts on the backend, one per hba method (DSN-credential mode).
SERVICE_ACCOUNTS = {
    "password": ("svc_pw", "pw-cleartext"),
    "md5": ("svc_md5", "pw-md5"),
    "scram-sha-256": ("svc_scram", "pw-scram"),
}

SETUP_SQL = f"""
CREATE ROLE alice LOGIN;
CREATE ROLE bob LOGIN;
CREATE ROLE mallory LOGIN;
CREATE ROLE ident_user LOGIN;
CREATE DATABASE identdb OWNER ident_user;
SET password_encryption = 'scram-sha-256';
CREATE ROLE svc_pw LOGIN PASSWORD 'pw-cleartext';
CREATE ROLE svc_scram LOGIN PASSWORD 'pw-scram';
CREATE ROLE carol LOGIN PASSWORD '{CAROL_PW}';
SET password_encryption = 'md5';
CREATE ROLE svc_md5 LOGIN PASSWORD 'pw-md5';
"""


def passwd_entry(user: str, password: str, *, md5: bool = False) -> dict[str, Any]:
    """Run `pgshift passwd USER --password-stdin [--md5]` and parse the TOML it prints."""
    argv = [sys.executable, "-m", "proxy", "passwd", user, "--password-stdin", *(["--md5"] if md5 else [])]
    result = subprocess.run(argv, input=password + "\n", capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 0, result.stderr
    entry: dict[str, Any] = tomllib.loads(result.stdout)["auth"]["users"][user]
    return entry


@pytest.fixture(autouse=True)
def _no_libpq_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Inherited libpq settings or a ~/.pgpass would make "no password" cases pass (client or proxy).
    for name in ("PGPASSWORD", "PGSSLMODE", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGOPTIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """One cluster whose hba demands each password method from the service accounts and carol."""
    hba = [
        "host all svc_pw 127.0.0.1/32 password",
        "host all svc_md5 127.0.0.1/32 md5",
        "host all svc_scram 127.0.0.1/32 scram-sha-256",
        "host all carol 127.0.0.1/32 scram-sha-256",
    ]
    cl = create_cluster("auth", hba=hba)
    try:
        cl.psql(SETUP_SQL)
        stored = cl.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'svc_md5'").strip()
        assert stored.startswith("md5"), stored
        yield cl
    finally:
        cl.destroy()


def psycopg_connect(
    proxy: ProxyThread, user: str, password: str | None = None, dbname: str = "postgres", **kw: Any
) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=user,
        password=password,
        dbname=dbname,
        connect_timeout=10,
        sslmode="disable",
        **kw,
    )


async def asyncpg_connect(
    proxy: ProxyThread, user: str, password: str | None = None, dbname: str = "postgres", **kw: Any
) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=proxy.port, user=user, password=password, database=dbname, ssl=False, timeout=10, **kw
    )


# --- client authentication at the proxy ------------------------------------------------------


@pytest.fixture(scope="module")
def relay(cluster: LocalCluster) -> Iterator[Relay]:
    with Relay(cluster.host, cluster.port) as running:
        yield running


@pytest.fixture(scope="module")
def auth_proxy(relay: Relay) -> Iterator[ProxyThread]:
    """Proxy → relay → cluster; alice uses SCRAM, bob md5, mallory is rejected, others: trust."""
    users = {
        "alice": passwd_entry("alice", ALICE_PW),
        "bob": passwd_entry("bob", BOB_PW, md5=True),
        "mallory": {"method": "reject"},
    }
    assert users["alice"]["method"] == "scram-sha-256"
    assert users["alice"]["verifier"].startswith("SCRAM-SHA-256$4096:")
    assert users["bob"] == {"method": "md5", "md5": users["bob"]["md5"]}
    config = single_backend_config(relay.dsn(), auth={"users": users})
    with ProxyThread(config) as running:
        yield running


def test_trust_for_unlisted_user(auth_proxy: ProxyThread) -> None:
    # No password at all: the default rule [auth] method = "trust" admits users not listed.
    with psycopg_connect(auth_proxy, "ident_user") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("ident_user",)


def test_scram_right_password_psycopg(auth_proxy: ProxyThread) -> None:
    with psycopg_connect(auth_proxy, "alice", ALICE_PW) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("alice",)


async def test_scram_right_password_asyncpg(auth_proxy: ProxyThread) -> None:
    conn = await asyncpg_connect(auth_proxy, "alice", ALICE_PW)
    try:
        assert await conn.fetchval("SELECT current_user") == "alice"
    finally:
        await conn.close()


def test_scram_wrong_password_psycopg(auth_proxy: ProxyThread, relay: Relay) -> None:
    before = relay.accepted
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg_connect(auth_proxy, "alice", "not alice's password")
    assert 'FATAL:  password authentication failed for user "alice"' in str(info.value)
    assert relay.accepted == before, "a wrong client password must not reach the backend"


async def test_scram_wrong_password_asyncpg(auth_proxy: ProxyThread, relay: Relay) -> None:
    before = relay.accepted
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg_connect(auth_proxy, "alice", "wrong")
    assert info.value.sqlstate == "28P01"
    assert info.value.args[0] == 'password authentication failed for user "alice"'
    assert relay.accepted == before, "a wrong client password must not reach the backend"


def test_md5_right_password(auth_proxy: ProxyThread) -> None:
    with psycopg_connect(auth_proxy, "bob", BOB_PW) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("bob",)


async def test_md5_right_password_asyncpg(auth_proxy: ProxyThread) -> None:
    conn = await asyncpg_connect(auth_proxy, "bob", BOB_PW)
    try:
        assert await conn.fetchval("SELECT current_user") == "bob"
    finally:
        await conn.close()


async def test_md5_wrong_password(auth_proxy: ProxyThread, relay: Relay) -> None:
    before = relay.accepted
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg_connect(auth_proxy, "bob", ALICE_PW)
    assert info.value.sqlstate == "28P01"
    assert info.value.args[0] == 'password authentication failed for user "bob"'
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "bob"'):
        psycopg_connect(auth_proxy, "bob", "nope")
    assert relay.accepted == before


async def test_reject(auth_proxy: ProxyThread, relay: Relay) -> None:
    before = relay.accepted
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as info:
        await asyncpg_connect(auth_proxy, "mallory", "anything")
    assert info.value.sqlstate == "28000"
    assert "mallory" in info.value.args[0]
    assert relay.accepted == before


async def test_unknown_users_follow_default_reject(relay: Relay) -> None:
    users = {"alice": passwd_entry("alice", ALICE_PW)}
    config = single_backend_config(relay.dsn(), auth={"method": "reject", "users": users})
    with ProxyThread(config) as proxy:
        before = relay.accepted
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as info:
            await asyncpg_connect(proxy, "ident_user")
        assert info.value.sqlstate == "28000"
        with pytest.raises(psycopg.OperationalError, match="ident_user"):
            psycopg_connect(proxy, "ident_user")
        assert relay.accepted == before
        # A listed user still gets its own rule.
        conn = await asyncpg_connect(proxy, "alice", ALICE_PW)
        try:
            assert await conn.fetchval("SELECT current_user") == "alice"
        finally:
            await conn.close()


# --- backend authentication with the proxy's credentials -------------------------------------


@pytest.mark.parametrize("source", ["dsn", "env", "pgpass"])
@pytest.mark.parametrize("method", sorted(SERVICE_ACCOUNTS))
def test_backend_login_with_proxy_credentials(
    cluster: LocalCluster, method: str, source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    svc, password = SERVICE_ACCOUNTS[method]
    backend: dict[str, Any] = {"dsn": cluster.dsn(user=svc, dbname="postgres")}
    if source == "dsn":
        backend["dsn"] = cluster.dsn(user=svc, dbname="postgres", password=password)
    elif source == "env":
        monkeypatch.setenv("PGSHIFT_TEST_SVC_PW", password)
        backend["password"] = "env:PGSHIFT_TEST_SVC_PW"
    else:
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"# test\n127.0.0.1:{cluster.port}:postgres:{svc}:{password}\n")
        passfile.chmod(0o600)
        monkeypatch.setenv("PGPASSFILE", str(passfile))
    # Service-account mode: whoever the client is, the backend session is the pinned role.
    with (
        ProxyThread(single_backend_config(backend["dsn"], backends={"old": backend})) as proxy,
        psycopg_connect(proxy, "some_app", dbname="whatever") as conn,
    ):
        row = conn.execute("SELECT current_user, session_user, current_database()").fetchone()
    assert row == (svc, svc, "postgres")


@pytest.mark.parametrize("method", sorted(SERVICE_ACCOUNTS))
async def test_wrong_backend_password_surfaces_backend_error(cluster: LocalCluster, method: str) -> None:
    svc, _ = SERVICE_ACCOUNTS[method]
    dsn = cluster.dsn(user=svc, dbname="postgres", password="definitely-wrong")
    with ProxyThread(single_backend_config(dsn)) as proxy:
        with pytest.raises(asyncpg.InvalidPasswordError) as info:
            await asyncpg_connect(proxy, "app")
        # The backend's own error, fields as Postgres sent them.
        assert info.value.sqlstate == "28P01"
        assert info.value.args[0] == f'password authentication failed for user "{svc}"'
        with pytest.raises(psycopg.OperationalError, match=f'FATAL:  password authentication failed for user "{svc}"'):
            psycopg_connect(proxy, "app")


@pytest.mark.parametrize("method", sorted(SERVICE_ACCOUNTS))
async def test_missing_backend_password_names_the_backend(cluster: LocalCluster, method: str) -> None:
    svc, _ = SERVICE_ACCOUNTS[method]
    with ProxyThread(single_backend_config(cluster.dsn(user=svc, dbname="postgres"))) as proxy:
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg_connect(proxy, "app")
        assert info.value.sqlstate == "28P01"
        message = info.value.args[0]
        assert "old" in message and "password" in message and svc in message, message
        with pytest.raises(psycopg.OperationalError, match=r"backend .old. asks for a password"):
            psycopg_connect(proxy, "app")


# --- SCRAM pass-through ------------------------------------------------------------------


def _carol_verifier(cluster: LocalCluster) -> str:
    verifier = cluster.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'carol'").strip()
    assert verifier.startswith("SCRAM-SHA-256$")
    return verifier


async def test_scram_pass_through(cluster: LocalCluster) -> None:
    # The backend requires SCRAM for carol and the proxy holds no password for her: only the
    # ClientKey recovered from carol's own proof can log the proxy in.
    users = {"carol": {"method": "scram-sha-256", "verifier": _carol_verifier(cluster)}}
    config = single_backend_config(cluster.dsn(user="", dbname=""), auth={"users": users})
    with ProxyThread(config) as proxy:
        with psycopg_connect(proxy, "carol", CAROL_PW) as conn:
            assert conn.execute("SELECT current_user, session_user").fetchone() == ("carol", "carol")
        conn2 = await asyncpg_connect(proxy, "carol", CAROL_PW)
        try:
            assert await conn2.fetchval("SELECT current_user") == "carol"
        finally:
            await conn2.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg_connect(proxy, "carol", "wrong")


async def test_scram_pass_through_needs_the_backends_verifier(cluster: LocalCluster) -> None:
    # Same password, different salt: the client passes the proxy's check, but the recovered
    # ClientKey is not the backend's, so the backend refuses with its own error.
    users = {"carol": passwd_entry("carol", CAROL_PW)}
    config = single_backend_config(cluster.dsn(user="", dbname=""), auth={"users": users})
    with ProxyThread(config) as proxy:
        with pytest.raises(asyncpg.InvalidPasswordError) as info:
            await asyncpg_connect(proxy, "carol", CAROL_PW)
        assert info.value.args[0] == 'password authentication failed for user "carol"'


# --- identity -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transparent_proxy(cluster: LocalCluster) -> Iterator[ProxyThread]:
    with ProxyThread(single_backend_config(cluster.dsn(user="", dbname=""))) as running:
        yield running


@pytest.mark.parametrize(
    ("user", "dbname"), [("ident_user", "identdb"), ("postgres", "postgres"), ("alice", "identdb")]
)
def test_identity_is_transparent(transparent_proxy: ProxyThread, user: str, dbname: str) -> None:
    with psycopg_connect(transparent_proxy, user, dbname=dbname) as conn:
        row = conn.execute("SELECT current_user, session_user, current_database()").fetchone()
    assert row == (user, user, dbname)


async def test_identity_is_transparent_asyncpg(transparent_proxy: ProxyThread) -> None:
    conn = await asyncpg_connect(transparent_proxy, "ident_user", dbname="identdb")
    try:
        row = await conn.fetchrow("SELECT current_user, session_user, current_database()")
        assert tuple(row) == ("ident_user", "ident_user", "identdb")
    finally:
        await conn.close()


def test_unknown_role_gets_the_backends_error(transparent_proxy: ProxyThread) -> None:
    with pytest.raises(psycopg.OperationalError, match='role "ghost" does not exist'):
        psycopg_connect(transparent_proxy, "ghost")


def test_pinned_user_and_dbname_map_every_client(cluster: LocalCluster) -> None:
    with ProxyThread(single_backend_config(cluster.dsn(user="ident_user", dbname="identdb"))) as proxy:
        for user, dbname in [("postgres", "postgres"), ("ghost", "nowhere"), ("alice", "postgres")]:
            with psycopg_connect(proxy, user, dbname=dbname) as conn:
                row = conn.execute("SELECT current_user, session_user, current_database()").fetchone()
            assert row == ("ident_user", "ident_user", "identdb"), (user, dbname)


# --- startup parameters ---------------------------------------------------------------------


def test_startup_parameters_reach_the_backend(
    transparent_proxy: ProxyThread, cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libpq sends PGDATESTYLE as a "datestyle" startup parameter (there is no DateStyle kwarg).
    monkeypatch.setenv("PGDATESTYLE", "SQL, DMY")
    with psycopg_connect(
        transparent_proxy, "postgres", application_name="pgshift-startup-test", options="-c search_path=foo"
    ) as conn:
        row = conn.execute(
            "SELECT current_setting('application_name'), current_setting('search_path'),"
            " current_setting('DateStyle'), pg_backend_pid()"
        ).fetchone()
        assert row is not None
        assert row[:3] == ("pgshift-startup-test", "foo", "SQL, DMY")
        # And the real backend session carries them (seen from outside the proxy).
        seen = cluster.psql(f"SELECT application_name FROM pg_stat_activity WHERE pid = {row[3]}").strip()
        assert seen == "pgshift-startup-test"


async def test_startup_parameters_asyncpg(transparent_proxy: ProxyThread) -> None:
    settings = {"application_name": "pgshift-asyncpg", "search_path": "bar, public", "DateStyle": "German, DMY"}
    conn = await asyncpg_connect(transparent_proxy, "postgres", server_settings=settings)
    try:
        row = await conn.fetchrow(
            "SELECT current_setting('application_name'), current_setting('search_path'), current_setting('DateStyle')"
        )
        assert tuple(row) == ("pgshift-asyncpg", "bar, public", "German, DMY")
    finally:
        await conn.close()
