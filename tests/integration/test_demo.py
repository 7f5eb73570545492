"""`pgshift demo`: two clusters with the sample, the proxy in front, and a clean Ctrl-C."""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from proxy.localpg import free_port

REPO = Path(__file__).resolve().parents[2]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(120)
def test_demo_serves_the_sample_and_cleans_up() -> None:
    before = set(glob.glob("/tmp/pgshift-old-*")) | set(glob.glob("/tmp/pgshift-new-*"))
    # Free ports, not the defaults: a long-lived client socket of an earlier test may hold 54322
    # as its local port, and then no server can listen there.
    port, admin_port, old_port, new_port = free_port(), free_port(), free_port(), free_port()
    argv = [
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        "--old-port",
        str(old_port),
        "--new-port",
        str(new_port),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        seen = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "Ctrl-C stops" in line:
                break
        banner = "".join(seen)
        assert "pgshift demo is running" in banner, banner
        dsn = f"postgresql://postgres@127.0.0.1:{port}/marketplace"
        assert dsn in banner
        with psycopg.connect(dsn) as conn:
            counts = conn.execute(
                "select (select count(*) from listings), (select count(*) from cities), inet_server_port()"
            ).fetchone()
        assert counts == (2000, 50, old_port)
        # "new" holds the same schema, empty: phase 0 ("shadow") of a migration.
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{new_port}/marketplace") as conn:
            assert conn.execute("select count(*) from listings").fetchone() == (0,)
        # The banner's control commands work as printed: every read to "new" (empty), then back.
        token = re.search(r"export PGSHIFT_ADMIN_TOKEN=(\w+)", banner)
        assert token is not None and f"--admin http://127.0.0.1:{admin_port}" in banner
        env = {**os.environ, "PGSHIFT_ADMIN_TOKEN": token.group(1), "PYTHONPATH": str(REPO)}

        def cli(*args: str) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "proxy", *args, "--admin", f"http://127.0.0.1:{admin_port}"],
                capture_output=True, text=True, env=env, timeout=30, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert "routing version 2 (changed)" in cli("weights", "set", "old=0", "new=100")
        with psycopg.connect(dsn, autocommit=True) as conn:  # (a transaction would stay on the primary)
            assert conn.execute("select count(*) from listings").fetchone() == (0,)
        cli("rollback", "--to", "1")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("select count(*) from listings").fetchone() == (2000,)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "removing the demo clusters" in rest
    finally:
        if proc.poll() is None:  # the test failed half-way: let the demo remove its clusters
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert not _port_open(old_port) and not _port_open(new_port)
    after = set(glob.glob("/tmp/pgshift-old-*")) | set(glob.glob("/tmp/pgshift-new-*"))
    assert after <= before, f"demo left {after - before}"
