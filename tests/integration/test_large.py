"""Big values and big results: byte-exact through the proxy, with proxy memory that does not grow.

A 40 MB value is one DataRow (or one Bind/Query message) bigger than any socket read, so it
crosses the proxy in pieces. A 300 MB result read by a slow client must be throttled at the
backend (backpressure), not buffered in the proxy: the proxy runs as a subprocess here so that
its resident memory can be read from /proc.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import sql

from proxy.localpg import LocalCluster, free_port
from proxy.wire.codes import BackendCode
from proxy.wire.messages import TERMINATE, Query, StartupMessage
from tests.support.proxy import ProxyThread, loop_kind

REPO = Path(__file__).resolve().parents[2]
BIG = 40 * 1024 * 1024


@pytest.fixture(scope="module")
def big_bytes() -> bytes:
    return os.urandom(BIG)


@pytest.fixture(scope="module")
def big_text() -> str:
    # Multi-byte characters at both ends; 40 M characters (a bit more in UTF-8 bytes).
    body = base64.b64encode(os.urandom(BIG * 3 // 4)).decode()
    return "ünïcødé € " + body[: BIG - 20] + " — the end"


@pytest.fixture
def big_table(pg_cluster: LocalCluster) -> Iterator[str]:
    name = f"big_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {name} (id int primary key, b bytea, t text)")
    yield name
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"drop table {name}")


def server_digests(dsn: str, table: str, id_: int) -> tuple[str, str, int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"select md5(b), md5(t), length(b), length(t) from {table} where id = %s", (id_,)).fetchone()
        assert row is not None
        return row


@pytest.mark.timeout(60)
def test_huge_values_psycopg(
    proxy: ProxyThread, pg_cluster: LocalCluster, big_table: str, big_bytes: bytes, big_text: str
) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        # Extended protocol: one 80+ MB Bind message from the client.
        conn.execute(f"insert into {big_table} values (1, %s, %s)", (big_bytes, big_text))
        # Text results: the bytea comes back hex-encoded, one ~120 MB DataRow.
        b, t = conn.execute(f"select b, t from {big_table} where id = 1").fetchone()  # type: ignore[misc]
        assert b == big_bytes
        assert t == big_text
        cur = conn.cursor(binary=True)
        b, t = cur.execute(f"select b, t from {big_table} where id = %s", (1,)).fetchone()  # type: ignore[misc]
        assert b == big_bytes
        assert t == big_text
        # Simple protocol: a 40 MB Query message.
        query = sql.SQL("select length({}), md5({})").format(sql.Literal(big_text), sql.Literal(big_text))
        assert conn.execute(query).fetchone() == (len(big_text), hashlib.md5(big_text.encode()).hexdigest())
        assert conn.execute("select 'small after big'").fetchone() == ("small after big",)
    assert server_digests(pg_cluster.dsn(), big_table, 1) == (
        hashlib.md5(big_bytes).hexdigest(),
        hashlib.md5(big_text.encode()).hexdigest(),
        len(big_bytes),
        len(big_text),
    )


@pytest.mark.timeout(60)
async def test_huge_values_asyncpg(
    proxy: ProxyThread, pg_cluster: LocalCluster, big_table: str, big_bytes: bytes, big_text: str
) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        await conn.execute(f"insert into {big_table} values ($1, $2, $3)", 2, big_bytes, big_text)
        row = await conn.fetchrow(f"select b, t from {big_table} where id = $1", 2)
        assert row is not None
        assert row["b"] == big_bytes
        assert row["t"] == big_text
        assert await conn.fetchval("select $1::bytea = (select b from " + big_table + " where id = 2)", big_bytes)
    finally:
        await conn.close()
    assert server_digests(pg_cluster.dsn(), big_table, 2)[:2] == (
        hashlib.md5(big_bytes).hexdigest(),
        hashlib.md5(big_text.encode()).hexdigest(),
    )


# --- a huge result to a slow client, with the proxy's memory watched --------------------------


def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class ProxyProcess:
    """`python -m proxy serve` in a subprocess (on the stock loop when PGSHIFT_TEST_LOOP=asyncio)."""

    def __init__(self, tmp_path: Path, backend_dsn: str) -> None:
        self.port = free_port()
        self.config = tmp_path / "pgshift.toml"
        self.config.write_text(
            f'[listen]\nhost = "127.0.0.1"\nport = {self.port}\n\n'
            f'[backends.old]\ndsn = "{backend_dsn}"\n\n'
            '[routing]\nprimary = "old"\n\n'
            "[proxy]\nshutdown_grace = 5\n"
        )
        self.log = tmp_path / "pgshift.log"
        if loop_kind() == "asyncio":
            argv = [
                sys.executable,
                "-c",
                "import asyncio, sys; from pathlib import Path; from proxy.app import serve; "
                "from proxy.config import load_config; asyncio.run(serve(load_config(Path(sys.argv[1]))))",
                str(self.config),
            ]
        else:
            argv = [sys.executable, "-m", "proxy", "serve", "--config", str(self.config)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"proxy did not listen on {self.port} within {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


_HEADER = struct.Struct("!cI")
_DATA_ROW = bytes([BackendCode.DATA_ROW])
_READY = bytes([BackendCode.READY_FOR_QUERY])
_ERROR = bytes([BackendCode.ERROR_RESPONSE])
_COMPLETE = bytes([BackendCode.COMMAND_COMPLETE])


class RawClient:
    """Just enough of the protocol, with a small receive buffer, to be a deliberately slow reader."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))
        self.buf = bytearray()
        self.received = 0

    def close(self) -> None:
        self.sock.close()

    def recv(self, size: int = 64 * 1024) -> None:
        chunk = self.sock.recv(size)
        if not chunk:
            raise EOFError("the proxy closed the connection")
        self.received += len(chunk)
        self.buf += chunk

    def take(self) -> list[tuple[bytes, bytes]]:
        """Complete messages in the buffer: (type, body); DataRow bodies are not copied (b"")."""
        buf = self.buf
        out: list[tuple[bytes, bytes]] = []
        pos = 0
        while len(buf) - pos >= 5:
            code, length = _HEADER.unpack_from(buf, pos)
            end = pos + 1 + length
            if end > len(buf):
                break
            out.append((code, b"" if code == _DATA_ROW else bytes(buf[pos + 5 : end])))
            pos = end
        del buf[:pos]
        return out

    def until_ready(self) -> list[tuple[bytes, bytes]]:
        seen: list[tuple[bytes, bytes]] = []
        while True:
            self.recv()
            for code, body in self.take():
                seen.append((code, body))
                if code == _READY:
                    return seen


@pytest.mark.timeout(60)
def test_huge_result_to_slow_client_keeps_proxy_memory_bounded(pg_cluster: LocalCluster, tmp_path: Path) -> None:
    rows, width = 300_000, 1000
    proxy = ProxyProcess(tmp_path, pg_cluster.dsn(user="", dbname=""))
    client: RawClient | None = None
    try:
        proxy.wait_ready()
        client = RawClient(proxy.port)
        client.sock.sendall(StartupMessage({"user": "postgres", "database": "postgres"}).encode())
        greeting = client.until_ready()
        assert not [body for code, body in greeting if code == _ERROR], greeting
        client.sock.sendall(Query("select 1").encode())
        client.until_ready()

        time.sleep(0.2)  # let the allocator settle after startup
        before = memory_kb(proxy.pid)["VmRSS"]
        exact_peak = reset_peak(proxy.pid)
        client.sock.sendall(Query(f"select repeat('x', {width}) from generate_series(1, {rows})").encode())
        data_rows = 0
        tags: list[bytes] = []
        sampled_peak = before
        reads = 0
        started = time.monotonic()
        done = False
        while not done:
            client.recv()
            reads += 1
            for code, body in client.take():
                if code == _DATA_ROW:
                    data_rows += 1
                elif code == _COMPLETE:
                    tags.append(body)
                elif code == _ERROR:
                    raise AssertionError(f"error from the proxy: {body!r}")
                elif code == _READY:
                    done = True
            if reads % 64 == 0:
                sampled_peak = max(sampled_peak, memory_kb(proxy.pid)["VmRSS"])
            time.sleep(0.0004)  # a slow reader: well below what Postgres and the proxy can push
        elapsed = time.monotonic() - started
        after = memory_kb(proxy.pid)
        peak = after["VmHWM"] if exact_peak else max(sampled_peak, after["VmRSS"])

        assert data_rows == rows
        assert tags == [f"SELECT {rows}\0".encode()]
        assert client.received > rows * width
        growth_mb = (peak - before) / 1024
        assert growth_mb < 30, (
            f"proxy RSS grew by {growth_mb:.1f} MB (from {before / 1024:.1f} MB) while "
            f"{client.received / 2**20:.0f} MB flowed to a client reading at "
            f"{client.received / 2**20 / elapsed:.0f} MB/s"
        )

        client.sock.sendall(TERMINATE)
        client.close()
        client = None
        stopping = time.monotonic()
        status = proxy.stop()
        assert status == 0, f"proxy exit status {status} after SIGTERM:\n{proxy.log_text()}"
        assert time.monotonic() - stopping < 5
    finally:
        if client is not None:
            client.close()
        proxy.stop()
