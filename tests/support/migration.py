"""What the migration tests share: an application schema with every kind of generated key, a load
of concurrent sessions through the proxy that counts every error, the CLI, and a row-by-row compare."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from proxy.localpg import LocalCluster

ROOT = Path(__file__).resolve().parents[2]

# serial, identity, uuid and timestamp defaults: what a replayed INSERT would get wrong, and what
# collides on the new primary if its sequences were left behind.
APP_SCHEMA = """
create table orders (id serial primary key, customer int not null, amount numeric(12,2) not null,
                     created_at timestamptz not null default now(), note text);
create table events (id bigint generated always as identity primary key, order_id int, kind text not null,
                     at timestamptz not null default clock_timestamp());
create table tokens (id uuid primary key default gen_random_uuid(), owner int not null,
                     issued timestamptz default now());
create table counters (id int primary key, n bigint not null default 0);
insert into counters select g, 0 from generate_series(1, 20) g;
insert into orders (customer, amount) select g % 50, g * 1.25 from generate_series(1, 500) g;
"""
APP_TABLES = {"orders": "id", "events": "id", "tokens": "id", "counters": "id"}


def create_schema(old: LocalCluster, new: LocalCluster) -> None:
    """The schema on both; rows only on old (the sync copies them)."""
    old.psql(APP_SCHEMA)
    new.psql(APP_SCHEMA.split("insert into counters")[0])  # tables, no rows


class Load:
    """``sessions`` application sessions through the proxy, each running small transactions in a
    loop (inserts with every kind of default, updates, reads) until stopped; every error is kept."""

    def __init__(self, dsn: str, sessions: int = 8, pause: float = 0.002) -> None:
        self.dsn = dsn
        self.pause = pause
        self.errors: list[str] = []
        self.transactions = 0
        self.inserted: dict[str, int] = {"orders": 0, "events": 0, "tokens": 0}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(sessions)]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, worker: int) -> None:
        rng = random.Random(worker)
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            with self._lock:
                self.errors.append(f"session {worker}: connect: {exc}")
            return
        with conn:
            while not self._stop.is_set():
                try:
                    self._one(conn, rng, worker)
                except psycopg.Error as exc:
                    with self._lock:
                        self.errors.append(f"session {worker}: {type(exc).__name__}: {exc}".strip())
                    if conn.closed:
                        return
                    continue
                with self._lock:
                    self.transactions += 1
                time.sleep(self.pause * rng.random())

    def _one(self, conn: psycopg.Connection[Any], rng: random.Random, worker: int) -> None:
        kind = rng.random()
        if kind < 0.5:
            with conn.transaction():
                order = conn.execute(
                    "insert into orders (customer, amount, note) values (%s, %s, %s) returning id",
                    (worker, rng.randint(1, 10_000) / 100, f"w{worker}"),
                ).fetchone()
                assert order is not None
                conn.execute("insert into events (order_id, kind) values (%s, 'created')", (order[0],))
                conn.execute("update counters set n = n + 1 where id = %s", (rng.randint(1, 20),))
            with self._lock:
                self.inserted["orders"] += 1
                self.inserted["events"] += 1
        elif kind < 0.7:
            conn.execute("insert into tokens (owner) values (%s)", (worker,))
            with self._lock:
                self.inserted["tokens"] += 1
        elif kind < 0.85:
            conn.execute("update orders set amount = amount + 1 where id = %s", (rng.randint(1, 500),))
        else:
            conn.execute("select count(*), max(id) from orders where customer = %s", (worker,)).fetchone()


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=timeout, env=env)  # fmt: skip
    return result.returncode, result.stdout, result.stderr


def migrate(
    admin_url: str, token: str, action: str, *args: str, timeout: float = 120
) -> tuple[int, dict[str, Any], str]:
    """`pgshift migrate ACTION --json` against one proxy: (exit code, the JSON answer, stderr)."""
    import os

    env = {**os.environ, "PGSHIFT_ADMIN_TOKEN": token}
    code, out, err = cli("migrate", action, "--admin", admin_url, "--json", "--timeout", "30", *args, env=env,
                         timeout=timeout)  # fmt: skip
    try:
        data = json.loads(out) if out.strip() else {}
    except ValueError:
        data = {"raw": out}
    return code, data, err


def table_digest(cluster: LocalCluster, table: str, key: str) -> tuple[int, str]:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute("set timezone = 'UTC'")
        row = conn.execute(
            f"select count(*), md5(coalesce(string_agg(t::text, ',' order by {key}), '')) from {table} t"
        ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def differing_tables(old: LocalCluster, new: LocalCluster, tables: dict[str, str] = APP_TABLES) -> dict[str, Any]:
    out = {}
    for table, key in tables.items():
        a, b = table_digest(old, table, key), table_digest(new, table, key)
        if a != b:
            out[table] = {"old": a, "new": b}
    return out


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")
