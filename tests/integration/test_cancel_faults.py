"""Cancel requests, backend failures and bad bytes on the wire: each affects one session only."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.localpg import LocalCluster, free_port
from proxy.wire.messages import CancelRequest, StartupMessage
from tests.support.proxy import ProxyThread, single_backend_config
from tests.support.relay import Relay

pytestmark = pytest.mark.timeout(60)


# --- a minimal raw protocol client (exact bytes, no driver in between) ------------------------


def _fields(body: bytes) -> dict[str, str]:
    return {chr(p[0]): p[1:].decode("utf-8", "replace") for p in body.split(b"\0") if p}


class Raw:
    """Blocking socket speaking just enough of the v3 protocol to observe the proxy exactly."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buf = b""
        self.pid = self.secret = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self._buf += chunk
        return True

    def message(self) -> tuple[str, bytes] | None:
        """The next backend message, or None at EOF."""
        if not self._fill(5):
            assert self._buf == b"", f"connection closed inside a message header: {self._buf!r}"
            return None
        (length,) = struct.unpack_from("!I", self._buf, 1)
        assert length >= 4, self._buf[:5]
        if not self._fill(1 + length):
            raise AssertionError(f"connection closed inside a message: {self._buf[:16]!r}")
        code, body = chr(self._buf[0]), self._buf[5 : 1 + length]
        self._buf = self._buf[1 + length :]
        return code, body

    def until(self, *codes: str) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        while True:
            msg = self.message()
            assert msg is not None, f"EOF while waiting for {codes}; got {[c for c, _ in out]}"
            out.append(msg)
            if msg[0] in codes:
                return out

    def rest(self) -> list[tuple[str, bytes]]:
        """Every message up to EOF."""
        out: list[tuple[str, bytes]] = []
        while (msg := self.message()) is not None:
            out.append(msg)
        return out

    def startup(self, user: str = "postgres", database: str = "postgres", **params: str) -> None:
        self.send(StartupMessage({"user": user, "database": database, **params}).encode())
        for code, body in self.until("Z", "E"):
            assert code != "E", _fields(body)
            if code == "K":
                self.pid, self.secret = struct.unpack("!ii", body)

    def query(self, sql: str) -> None:
        body = sql.encode() + b"\0"
        self.send(b"Q" + struct.pack("!I", 4 + len(body)) + body)


def _errors(messages: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    return [_fields(body) for code, body in messages if code == "E"]


def _send_cancel(port: int, pid: int, secret: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(CancelRequest(pid, secret).encode())
        assert sock.recv(1) == b""  # the proxy answers a CancelRequest by closing, like Postgres


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        start = time.monotonic()
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc
        result["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _backend_state(cluster: LocalCluster, pid: int) -> str:
    return cluster.psql(f"SELECT state FROM pg_stat_activity WHERE pid = {pid}").strip()


def _wait_running(cluster: LocalCluster, pid: int) -> None:
    _wait_for(lambda: _backend_state(cluster, pid) == "active")


# --- cancel -------------------------------------------------------------------------------


def test_psycopg_cancel(proxy: ProxyThread) -> None:
    # cancel_safe(), not cancel(): the latter calls libpq's blocking PQcancel() holding the GIL,
    # which would deadlock against a proxy running in a thread of this same process.
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        start = time.monotonic()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled) as info:
                conn.execute("SELECT pg_sleep(30)")
        finally:
            timer.join()
        assert info.value.sqlstate == "57014"
        assert time.monotonic() - start < 3
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)


async def test_asyncpg_timeout_cancels(proxy: ProxyThread) -> None:
    conn = await asyncpg.connect(proxy.dsn(), ssl=False)
    try:
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
        # asyncpg cancels the query on timeout; the connection is usable right after.
        assert await asyncio.wait_for(conn.fetchval("SELECT 41 + 1"), 5) == 42
        assert time.monotonic() - start < 3
    finally:
        await conn.close()


def test_backend_key_pid_is_the_real_backend_pid(proxy: ProxyThread, pg_cluster: LocalCluster) -> None:
    with psycopg.connect(proxy.dsn(application_name="pgshift-pid-check")) as conn:
        pid = conn.info.backend_pid
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == (pid,)
        seen = pg_cluster.psql(f"SELECT application_name FROM pg_stat_activity WHERE pid = {pid}").strip()
        assert seen == "pgshift-pid-check"


def test_forged_cancel_does_nothing(proxy: ProxyThread, pg_cluster: LocalCluster) -> None:
    with Raw(proxy.port) as raw:
        raw.startup()
        with pg_cluster_conn(pg_cluster) as direct:
            assert direct.execute("SELECT pg_backend_pid() <> %s", [raw.pid]).fetchone() == (True,)
        # Wrong secret (right pid), and right secret with a wrong pid: both ignored.
        raw.query("SELECT pg_sleep(1), 'slept'")
        _wait_running(pg_cluster, raw.pid)
        _send_cancel(proxy.port, raw.pid, raw.secret ^ 0x5A5A)
        _send_cancel(proxy.port, raw.pid + 1, raw.secret)
        replies = raw.until("Z")
        assert not _errors(replies), _errors(replies)
        assert b"slept" in b"".join(body for code, body in replies if code == "D")
        # The control: the real key does cancel.
        raw.query("SELECT pg_sleep(30)")
        _wait_running(pg_cluster, raw.pid)
        _send_cancel(proxy.port, raw.pid, raw.secret)
        errors = _errors(raw.until("Z"))
        assert [e["C"] for e in errors] == ["57014"]


def test_forged_cancel_leaves_psycopg_query_alone(proxy: ProxyThread, pg_cluster: LocalCluster) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        pid = conn.info.backend_pid
        thread, result = _in_thread(lambda: conn.execute("SELECT pg_sleep(1), 'done'").fetchone())
        _wait_running(pg_cluster, pid)
        for secret in (0, 1, -1, 123456789):
            _send_cancel(proxy.port, pid, secret)
        thread.join(10)
        assert "error" not in result, result
        assert result["value"] == ("", "done")
        assert result["elapsed"] >= 0.9


def pg_cluster_conn(cluster: LocalCluster) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(cluster.dsn(), connect_timeout=10)


# --- backend down / unresponsive ----------------------------------------------------------


async def test_backend_down() -> None:
    port = free_port()  # nothing listens there
    with ProxyThread(single_backend_config(f"postgresql://127.0.0.1:{port}?connect_timeout=3")) as proxy:
        start = time.monotonic()
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncio.wait_for(asyncpg.connect(proxy.dsn(), ssl=False, timeout=10), 10)
        assert info.value.sqlstate == "08006"
        assert 'backend "old"' in info.value.args[0], info.value.args[0]
        with pytest.raises(psycopg.OperationalError, match=f'cannot connect to backend "old" \\(127.0.0.1:{port}\\)'):
            psycopg.connect(proxy.dsn(connect_timeout="10"))
        assert time.monotonic() - start < 3


async def test_backend_stalled_during_connect(pg_cluster: LocalCluster) -> None:
    with Relay(pg_cluster.host, pg_cluster.port) as relay:
        relay.stall()
        config = single_backend_config(relay.dsn(connect_timeout="1", sslmode="disable"))
        with ProxyThread(config) as proxy:
            start = time.monotonic()
            with pytest.raises(asyncpg.PostgresError) as info:
                await asyncio.wait_for(asyncpg.connect(proxy.dsn(), ssl=False, timeout=10), 10)
            elapsed = time.monotonic() - start
            assert info.value.sqlstate == "08006"
            assert info.value.args[0] == f'backend "old" (127.0.0.1:{relay.port}) did not answer within 1 s'
            assert 0.9 < elapsed < 3
            assert relay.accepted == 1
            relay.resume()
            conn = await asyncpg.connect(proxy.dsn(), ssl=False, timeout=10)
            try:
                assert await conn.fetchval("SELECT 1") == 1
            finally:
                await conn.close()


@pytest.mark.parametrize("n_bytes", [1, 9, 40])
async def test_backend_cut_during_startup(pg_cluster: LocalCluster, n_bytes: int) -> None:
    with (
        Relay(pg_cluster.host, pg_cluster.port) as relay,
        ProxyThread(single_backend_config(relay.dsn(sslmode="disable"))) as proxy,
    ):
        relay.cut_after(n_bytes)
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncio.wait_for(asyncpg.connect(proxy.dsn(), ssl=False, timeout=10), 10)
        assert info.value.sqlstate == "08006"
        assert 'backend "old"' in info.value.args[0]
        # Only that one connection was cut.
        conn = await asyncpg.connect(proxy.dsn(), ssl=False, timeout=10)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()


# --- backend dies mid-session ------------------------------------------------------------


def _assert_dead(result: dict[str, Any], conn: psycopg.Connection[Any]) -> BaseException:
    error = result.get("error")
    assert isinstance(error, psycopg.OperationalError), result
    assert result["elapsed"] < 5
    assert conn.closed or conn.broken
    return error


def test_backend_terminated_ends_only_that_session(proxy: ProxyThread, pg_cluster: LocalCluster) -> None:
    with psycopg.connect(proxy.dsn()) as victim, psycopg.connect(proxy.dsn()) as bystander:
        other_pid = bystander.info.backend_pid
        pid = victim.info.backend_pid
        thread, result = _in_thread(lambda: victim.execute("SELECT pg_sleep(30)"))
        _wait_running(pg_cluster, pid)
        assert pg_cluster.psql(f"SELECT pg_terminate_backend({pid})").strip() == "t"
        thread.join(10)
        error = _assert_dead(result, victim)
        assert "terminating connection due to administrator command" in str(error)
        assert bystander.execute("SELECT pg_backend_pid()").fetchone() == (other_pid,)
        with psycopg.connect(proxy.dsn()) as fresh:
            assert fresh.execute("SELECT 1").fetchone() == (1,)


@pytest.fixture(scope="module")
def relayed(pg_cluster: LocalCluster) -> Iterator[tuple[Relay, ProxyThread]]:
    with (
        Relay(pg_cluster.host, pg_cluster.port) as relay,
        ProxyThread(single_backend_config(relay.dsn(sslmode="disable"))) as proxy,
    ):
        yield relay, proxy


def test_backend_severed_mid_query(relayed: tuple[Relay, ProxyThread], pg_cluster: LocalCluster) -> None:
    relay, proxy = relayed
    first = relay.accepted
    with psycopg.connect(proxy.dsn()) as victim, psycopg.connect(proxy.dsn()) as bystander:
        assert relay.accepted == first + 2
        pid = victim.info.backend_pid
        thread, result = _in_thread(lambda: victim.execute("SELECT pg_sleep(29.5)"))
        _wait_running(pg_cluster, pid)
        assert relay.sever(first) == 1
        thread.join(10)
        error = _assert_dead(result, victim)
        assert 'backend "old"' in str(error) and "closed the connection" in str(error), str(error)
        assert bystander.execute("SELECT 'alive'").fetchone() == ("alive",)
        with psycopg.connect(proxy.dsn()) as fresh:
            assert fresh.execute("SELECT 1").fetchone() == (1,)
    # The orphaned backend would sleep on; end it.
    pg_cluster.psql(f"SELECT pg_terminate_backend({pid})")


def test_backend_severed_while_idle(relayed: tuple[Relay, ProxyThread]) -> None:
    relay, proxy = relayed
    with Raw(proxy.port) as victim, psycopg.connect(proxy.dsn()) as bystander:
        victim.startup()
        index = relay.accepted - 1
        with Raw(proxy.port) as other:
            other.startup()
            assert relay.sever(index) == 1
            # The proxy tells the idle client at once, then closes: no waiting for its next query.
            errors = _errors(victim.rest())
            assert [(e["S"], e["C"]) for e in errors] == [("FATAL", "08006")]
            assert 'backend "old"' in errors[0]["M"]
            other.query("SELECT 1")
            assert [c for c, _ in other.until("Z")] == ["T", "D", "C", "Z"]
        assert bystander.execute("SELECT 1").fetchone() == (1,)


# --- bad bytes on the wire ----------------------------------------------------------------


def test_protocol_2_startup_is_refused(proxy: ProxyThread) -> None:
    params = b"user\0postgres\0\0"
    with Raw(proxy.port) as raw:
        raw.send(struct.pack("!II", 8 + len(params), 2 << 16) + params)
        messages = raw.rest()
    assert [code for code, _ in messages] == ["E"]
    error = _errors(messages)[0]
    assert (error["S"], error["C"]) == ("FATAL", "0A000")
    assert "protocol" in error["M"] and "2.0" in error["M"], error["M"]


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x01\x00\x00\x00\x04", id="invalid-type-byte"),
        pytest.param(b"Q" + struct.pack("!I", 0x7FFFFFF0), id="absurd-length"),
        pytest.param(b"Q\x00\x00\x00\x02", id="length-below-4"),
        pytest.param(b"Q\x00\x00\x00\x09select 1", id="bad-type-after-valid-frame"),
    ],
)
def test_garbage_after_startup(proxy: ProxyThread, pg_cluster: LocalCluster, garbage: bytes) -> None:
    with Raw(proxy.port) as raw:
        raw.startup()
        pid = raw.pid
        if garbage.startswith(b"Q\x00\x00\x00\x09"):
            garbage += b"\x00" + b"\xff\x00\x00\x00\x04"  # a whole Query, then an invalid type byte
        raw.send(garbage)
        messages = raw.rest()
    errors = _errors(messages)
    assert errors, messages
    assert (errors[-1]["S"], errors[-1]["C"]) == ("FATAL", "08P01")
    assert messages[-1][0] == "E"
    # The session's backend connection ends too.
    _wait_for(lambda: _backend_state(pg_cluster, pid) == "")


_FRONTEND = b"QPBEDSHCXFdcfp"


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    """Mostly well-framed messages with random bodies (these reach the backend), some not."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        code = draw(st.sampled_from(_FRONTEND) | st.integers(0, 255))
        body = draw(st.binary(max_size=64))
        length = draw(st.just(len(body) + 4) | st.integers(0, 2**32 - 1))
        out += bytes([code]) + struct.pack("!I", length) + body
    return out


@pytest.fixture(scope="module")
def healthy(proxy: ProxyThread) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    with psycopg.connect(proxy.dsn()) as conn:
        yield conn


@pytest.mark.timeout(120)
@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(after_startup=st.booleans(), data=st.binary(min_size=1, max_size=200) | _frames())
def test_random_bytes(
    proxy: ProxyThread, healthy: psycopg.Connection[tuple[Any, ...]], after_startup: bool, data: bytes
) -> None:
    with Raw(proxy.port) as raw:
        if after_startup:
            raw.startup()
        raw.send(data)
        raw.sock.shutdown(socket.SHUT_WR)  # so a proxy waiting for more bytes sees EOF
        if not after_startup and raw._fill(1) and raw._buf[:1] in (b"N", b"S"):
            raw._buf = raw._buf[1:]  # the random bytes happened to be an SSL/GSS request
        messages = raw.rest()  # well-framed replies, then a close (never a hang)
    for error in _errors(messages):
        assert error["C"] != "XX000" and "internal error" not in error["M"], error
    assert healthy.execute("SELECT 1").fetchone() == (1,)
