"""TLS on both sides of the proxy: clients → proxy ([listen] tls_*) and proxy → backend (dsn sslmode)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy.localpg import LocalCluster, create_cluster
from proxy.wire.messages import SSLRequest, StartupMessage
from tests.support.proxy import ProxyThread, single_backend_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_libpq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGSSLMODE", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGREQUIRESSL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "server.crt", tmp / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


@pytest.fixture(scope="module")
def tls_proxy(pg_cluster: LocalCluster, cert_pair: tuple[Path, Path]) -> Iterator[ProxyThread]:
    cert, key = cert_pair
    config = single_backend_config(
        pg_cluster.dsn(user="", dbname=""), listen={"tls_cert": str(cert), "tls_key": str(key)}
    )
    with ProxyThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def tls_only_proxy(pg_cluster: LocalCluster, cert_pair: tuple[Path, Path]) -> Iterator[ProxyThread]:
    cert, key = cert_pair
    listen = {"tls_cert": str(cert), "tls_key": str(key), "tls_required": True}
    with ProxyThread(single_backend_config(pg_cluster.dsn(user="", dbname=""), listen=listen)) as running:
        yield running


def _connect(proxy: ProxyThread, sslmode: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(sslmode=sslmode, connect_timeout="10"))


# --- client side --------------------------------------------------------------------------


def test_sslmode_require(tls_proxy: ProxyThread) -> None:
    with _connect(tls_proxy, "require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_sslmode_disable_still_allowed(tls_proxy: ProxyThread) -> None:
    with _connect(tls_proxy, "disable") as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_tls_required_refuses_plaintext(tls_only_proxy: ProxyThread) -> None:
    with pytest.raises(psycopg.OperationalError, match="pgshift accepts only TLS connections"):
        _connect(tls_only_proxy, "disable")
    with _connect(tls_only_proxy, "require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


async def test_tls_required_refusal_is_28000(tls_only_proxy: ProxyThread) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as info:
        await asyncpg.connect(tls_only_proxy.dsn(), ssl=False, timeout=10)
    assert info.value.sqlstate == "28000"


async def test_asyncpg_ssl(tls_only_proxy: ProxyThread) -> None:
    # tls_required: a session that works at all is encrypted.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = await asyncpg.connect(tls_only_proxy.dsn(), ssl=ctx, timeout=10)
    try:
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        transport = conn._transport  # the only place asyncpg exposes the socket state
        assert transport.get_extra_info("ssl_object") is not None
    finally:
        await conn.close()


def test_without_tls_config_the_proxy_declines_ssl(pg_cluster: LocalCluster) -> None:
    with ProxyThread(single_backend_config(pg_cluster.dsn(user="", dbname=""))) as proxy:
        with pytest.raises(psycopg.OperationalError, match=r"server does not support SSL"):
            _connect(proxy, "require")
        with _connect(proxy, "prefer") as conn:
            assert not conn.pgconn.ssl_in_use


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


def test_data_after_ssl_request_is_refused(tls_proxy: ProxyThread) -> None:
    # CVE-2021-23214: bytes pipelined behind SSLRequest could be injected by a man in the middle.
    startup = StartupMessage({"user": "postgres", "database": "postgres"}).encode()
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=10) as sock:
        sock.sendall(SSLRequest().encode() + startup)
        answer = _read_exactly(sock, 1)
        assert answer == b"S"
        header = _read_exactly(sock, 5)
        assert header[:1] == b"E", header
        (length,) = struct.unpack("!I", header[1:])
        fields = _error_fields(_read_exactly(sock, length - 4))
        assert fields["C"] == "08P01"
        assert "unencrypted data after SSL request" in fields["M"]
        assert sock.recv(1) == b""  # and the connection is closed


# --- backend side -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssl_cluster(cert_pair: tuple[Path, Path]) -> Iterator[LocalCluster]:
    cert, key = cert_pair
    cluster = create_cluster("tlsbackend", ssl_cert=cert, ssl_key=key)
    try:
        yield cluster
    finally:
        cluster.destroy()


_SSL_IN_USE = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@pytest.mark.parametrize(("sslmode", "expected"), [("require", True), ("prefer", True), ("disable", False)])
def test_backend_tls(ssl_cluster: LocalCluster, sslmode: str, expected: bool) -> None:
    dsn = f"postgresql://127.0.0.1:{ssl_cluster.port}?sslmode={sslmode}"
    with ProxyThread(single_backend_config(dsn)) as proxy, _connect(proxy, "disable") as conn:
        assert conn.execute(_SSL_IN_USE).fetchone() == (expected,)


async def test_backend_tls_asyncpg(ssl_cluster: LocalCluster) -> None:
    dsn = f"postgresql://127.0.0.1:{ssl_cluster.port}?sslmode=require"
    with ProxyThread(single_backend_config(dsn)) as proxy:
        conn = await asyncpg.connect(proxy.dsn(), ssl=False, timeout=10)
        try:
            assert await conn.fetchval(_SSL_IN_USE) is True
        finally:
            await conn.close()


async def test_backend_without_tls_but_sslmode_require(pg_cluster: LocalCluster) -> None:
    dsn = f"postgresql://127.0.0.1:{pg_cluster.port}?sslmode=require"
    with ProxyThread(single_backend_config(dsn)) as proxy:
        with pytest.raises(psycopg.OperationalError, match=r'backend "old" does not support TLS'):
            _connect(proxy, "disable")
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncio.wait_for(asyncpg.connect(proxy.dsn(), ssl=False, timeout=10), 15)
        assert info.value.sqlstate == "08006"
        assert "old" in info.value.args[0] and "sslmode=require" in info.value.args[0]
