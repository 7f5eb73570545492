"""`pgshift demo`: two clusters with the sample, the proxy in front, the local D1 with store
"edge" (or one line saying why not), and a clean Ctrl-C."""

from __future__ import annotations

import glob
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import psycopg
import pytest

from proxy.config import parse_config
from proxy.d1.local import missing_reason
from proxy.demo import demo_config, to_toml
from proxy.localpg import free_port

REPO = Path(__file__).resolve().parents[2]
# The demo starts the local D1 when it can; PGSHIFT_REQUIRE_D1=1 (.ci/run) makes that a must.
D1 = missing_reason() is None or bool(os.environ.get("PGSHIFT_REQUIRE_D1"))


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
    proc = _start_demo(argv)
    sync: subprocess.Popen[str] | None = None
    try:
        banner = _banner(proc, "Ctrl-C stops the proxy")
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
        config = None
        if D1:
            # The banner's D1 commands work as printed: the feed copies cities and categories into
            # the local D1 and streams a change made through the proxy; verify finds D1 equal to "old".
            assert 'store "edge"' in banner and "D1 left out" not in banner, banner
            sync_args = _printed(banner, "pgshift d1 sync --store edge --config ")
            config = Path(sync_args[sync_args.index("--config") + 1])
            assert config.is_file()
            sync = subprocess.Popen(
                [sys.executable, "-m", "proxy", *sync_args, "--status-interval", "0.5"],
                stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
            )  # fmt: skip
            assert sync.stderr is not None
            copied = []
            for line in sync.stderr:
                copied.append(line)
                if "streaming changes from slot" in line:
                    break
            assert any("cities -> D1 cities: 50 rows" in line for line in copied), copied
            assert any("categories -> D1 categories: 20 rows" in line for line in copied), copied
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("update cities set name = 'Berlin (edge)' where id = 1")
            # The curl line: the token and the query URL of the local API.
            curl = re.search(r'curl -s -H "Authorization: Bearer (\S+)" .*\n\s+(http://\S+/query)', banner)
            assert curl is not None, banner
            deadline = time.monotonic() + 10
            while True:
                answer = httpx.post(
                    curl.group(2), headers={"Authorization": f"Bearer {curl.group(1)}"},
                    json={"sql": "select name from cities where id = 1"}, timeout=10,
                ).json()  # fmt: skip
                if answer["result"][0]["results"] == [{"name": "Berlin (edge)"}] or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert answer["result"][0]["results"] == [{"name": "Berlin (edge)"}], answer
            verify_args = _printed(banner, "pgshift verify --store edge --config ")
            done = subprocess.run(
                [sys.executable, "-m", "proxy", *verify_args, "--quiet"],
                capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            assert "cities: clean (50 rows" in done.stdout and "categories: clean (20 rows" in done.stdout
            sync.send_signal(signal.SIGTERM)
            rest = sync.stderr.read()
            assert sync.wait(30) == 0, rest
        else:
            assert "D1 left out: " in banner and "npm ci" in banner, banner
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "removing the demo clusters" in rest
        if config is not None:
            assert "stopping the local D1" in rest
            assert not config.parent.exists(), "the demo's config stayed"
            d1_port = re.search(r"local Cloudflare D1 \(http://127\.0\.0\.1:(\d+)/", banner)
            assert d1_port is not None and not _port_open(int(d1_port.group(1)))
    finally:
        if sync is not None:
            if sync.poll() is None:
                sync.kill()
                sync.wait()
            if sync.stderr is not None:
                sync.stderr.close()
        _stop_demo(proc)
    assert not _port_open(old_port) and not _port_open(new_port)
    after = set(glob.glob("/tmp/pgshift-old-*")) | set(glob.glob("/tmp/pgshift-new-*"))
    assert after <= before, f"demo left {after - before}"


@pytest.mark.timeout(120)
def test_demo_goes_on_without_d1(tmp_path: Path) -> None:
    """No local D1 here (an empty d1local directory): --no-proxy still starts the clusters and
    says in one line why D1 is left out and how to enable it."""
    old_port, new_port = free_port(), free_port()
    argv = ["--no-proxy", "--port", str(free_port()), "--old-port", str(old_port), "--new-port", str(new_port)]
    proc = _start_demo(argv, PGSHIFT_D1LOCAL_DIR=str(tmp_path))
    try:
        banner = _banner(proc, "Ctrl-C here to stop")
        assert "Clusters are up (no proxy)" in banner, banner
        left_out = [line for line in banner.splitlines() if line.startswith("D1 left out: ")]
        assert len(left_out) == 1, banner
        assert f"{tmp_path}/server.mjs not found" in left_out[0] and "cd d1local && npm ci" in left_out[0]
        assert "starting the local D1" not in banner and "pgshift d1 sync" not in banner
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{old_port}/marketplace") as conn:
            assert conn.execute("select count(*) from cities").fetchone() == (50,)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "removing the demo clusters" in rest and "stopping the local D1" not in rest
    finally:
        _stop_demo(proc)
    assert not _port_open(old_port) and not _port_open(new_port)


def _start_demo(argv: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )


def test_demo_config_with_the_store_as_toml() -> None:
    """The file the demo writes for the D1 commands reads back as its config, [stores.edge] included."""
    store = {"kind": "d1", "account_id": "a", "database_id": "d", "token": 'to"k', "api_base": "http://127.0.0.1:1/v4"}
    data = demo_config(6543, 1, 2, admin_port=3, token="t", d1=store)
    assert tomllib.loads(to_toml(data)) == data
    config = parse_config(tomllib.loads(to_toml(data)))
    assert config.stores["edge"].tables == ["cities", "categories"] and config.stores["edge"].source == "old"


def _stop_demo(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:  # the test failed half-way: let the demo remove its clusters
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _banner(proc: subprocess.Popen[str], last: str) -> str:
    """The demo's output up to the line containing ``last`` (the end of its banner)."""
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if last in line:
            break
    return "".join(seen)


def _printed(banner: str, command: str) -> list[str]:
    """The arguments (after "pgshift") of the banner's line that starts with ``command``."""
    found = [line.strip() for line in banner.splitlines() if line.strip().startswith(command)]
    assert len(found) == 1, banner
    return shlex.split(found[0])[1:]
