"""Graceful shutdown of a real `pgshift serve` process on SIGTERM / SIGINT (DESIGN.md §9.9)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.localpg import LocalCluster, free_port
from proxy.wire.messages import StartupMessage

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SHUTDOWN_MESSAGE = "terminating connection due to administrator command"


class ProxyProcess:
    """`python -m proxy serve --config …` as a child process, its stderr collected by a thread."""

    def __init__(self, tmp_path: Path, backend_dsn: str, grace: float) -> None:
        self.port = free_port()
        config = tmp_path / "pgshift.toml"
        config.write_text(
            f'[listen]\nhost = "127.0.0.1"\nport = {self.port}\n\n'
            f"[proxy]\nshutdown_grace = {grace}\n\n"
            f'[backends.old]\ndsn = "{backend_dsn}"\n\n'
            '[routing]\nprimary = "old"\n'
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "listening on" in line:
                self._listening.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            assert self.proc.poll() is None, f"proxy exited with {self.proc.returncode}:\n{self.log}"
            assert time.monotonic() < deadline, f"proxy did not log 'listening on':\n{self.log}"
        with socket.create_connection(("127.0.0.1", self.port), timeout=5):
            pass

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def start_proxy(tmp_path: Path, pg_cluster: LocalCluster) -> Iterator[Callable[[float], ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(grace: float) -> ProxyProcess:
        proxy = ProxyProcess(tmp_path, pg_cluster.dsn(user="", dbname=""), grace)
        started.append(proxy)
        proxy.wait_ready()
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            proxy.close()


# --- a minimal raw protocol client ---------------------------------------------------------


def _fields(body: bytes) -> dict[str, str]:
    return {chr(p[0]): p[1:].decode() for p in body.split(b"\0") if p}


class Raw:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self._buf = b""
        self.pid = 0

    def close(self) -> None:
        self.sock.close()

    def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self._buf += chunk
        return True

    def message(self) -> tuple[str, bytes] | None:
        if not self._fill(5):
            assert self._buf == b""
            return None
        (length,) = struct.unpack_from("!I", self._buf, 1)
        assert self._fill(1 + length)
        code, body = chr(self._buf[0]), self._buf[5 : 1 + length]
        self._buf = self._buf[1 + length :]
        return code, body

    def until(self, code: str) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        while True:
            msg = self.message()
            assert msg is not None, f"EOF before {code!r}; got {out}"
            out.append(msg)
            if msg[0] == code:
                return out

    def rest(self) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        while (msg := self.message()) is not None:
            out.append(msg)
        return out

    def startup(self) -> None:
        self.sock.sendall(StartupMessage({"user": "postgres", "database": "postgres"}).encode())
        for code, body in self.until("Z"):
            assert code != "E", _fields(body)
            if code == "K":
                self.pid = struct.unpack("!i", body[:4])[0]

    def query(self, sql: str) -> None:
        body = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!I", 4 + len(body)) + body)


def _assert_admin_shutdown(messages: list[tuple[str, bytes]]) -> None:
    assert [code for code, _ in messages] == ["E"], messages
    error = _fields(messages[0][1])
    assert (error["S"], error["C"], error["M"]) == ("FATAL", "57P01", SHUTDOWN_MESSAGE)


def _wait_active(cluster: LocalCluster, pid: int) -> None:
    deadline = time.monotonic() + 5
    query = f"SELECT state FROM pg_stat_activity WHERE pid = {pid}"
    while cluster.psql(query).strip() != "active":
        assert time.monotonic() < deadline, "query did not start"
        time.sleep(0.05)


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown(start_proxy: Callable[[float], ProxyProcess], pg_cluster: LocalCluster, sig: int) -> None:
    proxy = start_proxy(5)
    assert f"listening on 127.0.0.1:{proxy.port}" in proxy.log

    idle, busy = Raw(proxy.port), Raw(proxy.port)
    driver = psycopg.connect(f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres", autocommit=True)
    try:
        idle.startup()
        busy.startup()
        driver_pid = driver.info.backend_pid
        driver_result: dict[str, Any] = {}

        def run_driver() -> None:
            try:
                driver_result["row"] = driver.execute("SELECT pg_sleep(1), 'driver slept'").fetchone()
            except BaseException as exc:
                driver_result["error"] = exc

        driver_thread = threading.Thread(target=run_driver, daemon=True)
        busy.query("SELECT pg_sleep(1), 'slept'")
        driver_thread.start()
        _wait_active(pg_cluster, busy.pid)
        _wait_active(pg_cluster, driver_pid)

        signalled = time.monotonic()
        proxy.proc.send_signal(sig)

        # An idle session ends at once, with Postgres' own shutdown error.
        _assert_admin_shutdown(idle.rest())
        assert time.monotonic() - signalled < 1
        # No new sessions once the signal is handled.
        assert _refused(proxy.port)

        # A running query finishes and its client gets the result, then 57P01.
        result = busy.until("Z")
        assert [code for code, _ in result] == ["T", "D", "C", "Z"]
        assert b"slept" in result[1][1]
        _assert_admin_shutdown(busy.rest())
        assert time.monotonic() - signalled >= 0.5  # it was not cut short

        driver_thread.join(10)
        assert driver_result.get("row") == ("", "driver slept"), driver_result
        with pytest.raises(psycopg.OperationalError):
            driver.execute("SELECT 1")

        assert proxy.proc.wait(5) == 0
        assert time.monotonic() - signalled < 5
    finally:
        idle.close()
        busy.close()
        driver.close()
    assert "shutting down" in proxy.log and "stopped" in proxy.log, proxy.log


def test_open_transaction_is_ended_at_the_deadline(
    start_proxy: Callable[[float], ProxyProcess], pg_cluster: LocalCluster
) -> None:
    grace = 1.5
    proxy = start_proxy(grace)
    in_tx = Raw(proxy.port)
    try:
        in_tx.startup()
        in_tx.query("BEGIN; CREATE TEMP TABLE t AS SELECT 1 AS x")
        ready = in_tx.until("Z")[-1]
        assert ready == ("Z", b"T")  # idle in transaction

        signalled = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        _assert_admin_shutdown(in_tx.rest())
        waited = time.monotonic() - signalled
        assert grace - 0.2 <= waited < grace + 1.5, waited
        assert proxy.proc.wait(5) == 0
    finally:
        in_tx.close()
    # The backend session (and its transaction) is gone too.
    deadline = time.monotonic() + 5
    while pg_cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {in_tx.pid}").strip() != "0":
        assert time.monotonic() < deadline, "backend session survived the proxy"
        time.sleep(0.05)
    assert "grace period over" in proxy.log, proxy.log
