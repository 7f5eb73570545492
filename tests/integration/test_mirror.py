"""Dual write against real clusters: every committed write reaches the mirror, row for row."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from proxy.localpg import LocalCluster
from tests.integration.conftest import TwoClusters, routed_config
from tests.support.proxy import ProxyThread

SCHEMA = """
create extension if not exists pgcrypto;
create table accounts (id serial primary key, owner text not null, balance numeric(12,2) not null default 0,
                       created_at timestamptz not null default now());
create table events (id bigint generated always as identity primary key, account int, kind text,
                     at timestamptz default clock_timestamp(), token uuid default gen_random_uuid(),
                     doubled int generated always as (account * 2) stored);
create table tags (account int, tag text, primary key (account, tag));
create table audit (note text, at timestamptz default now());
"""


@pytest.fixture(scope="module")
def clusters(make_cluster: Callable[..., LocalCluster]) -> TwoClusters:
    old = make_cluster("mirror-old")
    new = make_cluster("mirror-new")
    return TwoClusters(old, new)


@pytest.fixture
def fresh(clusters: TwoClusters) -> TwoClusters:
    for cluster in (clusters.old, clusters.new):
        cluster.psql("drop schema if exists public cascade; create schema public;" + SCHEMA)
    return clusters


TOKEN = "mirror-test-token"


def mirror_proxy(two: TwoClusters, mirror: dict[str, Any] | None = None, **routing: Any) -> ProxyThread:
    config = routed_config(two.old, two.new, mirrors=["new"], **routing)
    config["admin"] = {"port": 0, "token": TOKEN}
    if mirror:
        config["mirror"] = mirror
    return ProxyThread(config).start()


def rows(cluster: LocalCluster, table: str, order: str = "1") -> list[tuple[Any, ...]]:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        return conn.execute(f"select * from {table} order by {order}").fetchall()


def wait_applied(proxy: ProxyThread, timeout: float = 10) -> dict[str, Any]:
    """Until every mirror queue is empty; the mirror status then."""
    deadline = time.monotonic() + timeout
    while True:
        status = proxy.running.server.mirror.status()
        busy = [d for m in status["mirrors"] for d in m["databases"] if d["queued"]]
        if not busy or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def assert_same(two: TwoClusters, *tables: str) -> None:
    for table in tables:
        old, new = rows(two.old, table), rows(two.new, table)
        assert old == new, f"{table}: old {old[:5]} != new {new[:5]}"


def test_writes_reach_the_mirror(fresh: TwoClusters) -> None:
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("insert into accounts (owner) values ('ann'), ('bob')")
            cur = conn.execute("insert into accounts (owner, balance) values (%s, %s) returning id, owner", ("cy", 5))
            assert cur.fetchall() == [(3, "cy")]
            assert [d.name for d in cur.description or []] == ["id", "owner"]
            conn.execute("insert into events (account, kind) values (1, 'open'), (2, 'open')")
            conn.execute("update accounts set balance = balance + 10 where id = 1")
            conn.execute("update accounts set created_at = now() where id = 2")
            conn.execute("insert into tags values (1, 'a'), (1, 'b')")
            conn.execute("delete from tags where tag = 'a'")
            conn.execute("insert into audit (note) values ('x')")
            cur = conn.execute("update accounts set balance = 1 where id = 3 returning *")
            assert len(cur.fetchall()[0]) == 4
            with conn.transaction():
                conn.execute("insert into accounts (owner) values ('tx')")
                conn.execute("insert into events (account, kind) select id, 'tx' from accounts where owner = 'tx'")
        status = wait_applied(proxy)
        assert_same(fresh, "accounts", "events", "tags", "audit")
        mirror = status["mirrors"][0]
        assert mirror["diverged"] == 0 and mirror["failed"] == 0, status["recent"]
    finally:
        proxy.stop()


def test_extended_protocol_clients_see_exactly_their_columns(fresh: TwoClusters) -> None:
    """Row images ride on an extra RETURNING column: prepared statements, binary results, Describe
    and pipelines must never show it."""
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
            for i in range(3):  # prepared on the first run: Parse once, Bind/Execute after
                cur = conn.execute("insert into accounts (owner) values (%s)", (f"p{i}",))
                assert cur.description is None and cur.rowcount == 1
            cur = conn.execute("insert into accounts (owner) values (%s) returning id, owner", ("q",), binary=True)
            assert cur.fetchall() == [(4, "q")]
            assert [d.name for d in cur.description or []] == ["id", "owner"]
            cur = conn.execute("delete from accounts where owner = %s returning *", ("p0",), binary=True)
            assert [d.name for d in cur.description or []] == ["id", "owner", "balance", "created_at"]
            assert cur.fetchone() is not None
            with conn.pipeline():
                conn.execute("insert into events (account, kind) values (%s, %s)", (1, "pipe"))
                conn.execute("update accounts set balance = balance + %s where id = %s", (3, 2))
                cur = conn.execute("insert into audit (note) values (%s) returning note", ("piped",))
            assert cur.fetchall() == [("piped",)]
            with conn.cursor() as c2:
                c2.copy  # noqa: B018 - (COPY below)
            with conn.cursor().copy("copy tags (account, tag) from stdin") as copy:
                for i in range(50):
                    copy.write_row((i, f"t{i}"))
        wait_applied(proxy)
        assert_same(fresh, "accounts", "events", "audit", "tags")
    finally:
        proxy.stop()


async def test_asyncpg_binary_formats_per_column(fresh: TwoClusters) -> None:
    """asyncpg asks for one result format per column: the image column gets its own."""
    import asyncpg

    proxy = mirror_proxy(fresh)
    try:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            row = await conn.fetchrow(
                "insert into accounts (owner, balance) values ($1, $2) returning id, balance", "z", 7
            )
            assert row is not None and dict(row) == {"id": 1, "balance": 7}
            await conn.executemany("insert into events (account, kind) values ($1, $2)", [(1, "a"), (1, "b")])
            async with conn.transaction():
                await conn.execute("update accounts set created_at = now() where id = $1", 1)
                await conn.execute("insert into tags values ($1, $2) on conflict (account, tag) do nothing", 1, "x")
                await conn.execute("insert into tags values ($1, $2) on conflict (account, tag) do nothing", 1, "x")
        finally:
            await conn.close()
        wait_applied(proxy)
        assert_same(fresh, "accounts", "events", "tags")
    finally:
        proxy.stop()


def test_rollbacks_savepoints_and_failures_never_reach_the_mirror(fresh: TwoClusters) -> None:
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
                conn.execute("insert into tags values (1, 'kept?')")
                conn.execute("insert into tags values (1, 'kept?')")
            with conn.transaction():
                conn.execute("insert into tags values (2, 'before')")
                with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():  # a savepoint
                    conn.execute("insert into tags values (2, 'inside')")
                    conn.execute("select 1 / 0")
                conn.execute("savepoint s1")
                conn.execute("insert into tags values (2, 'rolled back to s1')")
                conn.execute("rollback to savepoint s1")
                conn.execute("savepoint s2")
                conn.execute("insert into tags values (2, 'released')")
                conn.execute("release savepoint s2")
            conn.execute("begin")
            conn.execute("insert into tags values (3, 'rolled back')")
            conn.execute("rollback")
            with pytest.raises(psycopg.errors.UniqueViolation):  # one implicit transaction: all or nothing
                conn.execute("insert into tags values (4, 'a'); insert into tags values (4, 'a')")
            conn.execute("begin; insert into tags values (5, 'simple'); commit")
        wait_applied(proxy)
        assert rows(fresh.new, "tags") == [(2, "before"), (2, "released"), (5, "simple")]
        assert_same(fresh, "tags")
    finally:
        proxy.stop()


WORKLOAD_SCHEMA = """
create table counters (id int primary key, n bigint not null default 0);
insert into counters values (1, 0), (2, 0);
create table orders (id uuid primary key default gen_random_uuid(), account int not null, amount numeric(10,2),
                     placed_at timestamp default localtimestamp, note text, data jsonb);
"""


async def test_concurrent_application_workload_leaves_identical_databases(fresh: TwoClusters) -> None:
    """12 sessions (simple, extended, pipelined, asyncpg) writing serial/identity/uuid/timestamp
    defaults, INSERT … SELECT, upserts, RETURNING, COPY, savepoints and rollbacks at the same
    time: afterwards every table is identical on both databases, row by row."""
    import asyncio
    import random

    import asyncpg

    for cluster in (fresh.old, fresh.new):
        cluster.psql(WORKLOAD_SCHEMA)
    proxy = mirror_proxy(fresh)
    rounds = 25
    errors: list[BaseException] = []

    def psycopg_client(i: int, style: str) -> None:
        rng = random.Random(i)
        kwargs: dict[str, Any] = {"autocommit": True}
        if style == "simple":
            kwargs["cursor_factory"] = psycopg.ClientCursor  # values inlined: simple Query messages
        if style == "prepared":
            kwargs["prepare_threshold"] = 0
        with psycopg.connect(proxy.dsn(), **kwargs) as conn:
            (account,) = conn.execute("insert into accounts (owner) values (%s) returning id", (f"c{i}",)).fetchone()
            for r in range(rounds):
                if style == "pipeline":
                    with conn.pipeline(), conn.transaction():
                        conn.execute("insert into events (account, kind) values (%s, %s)", (account, f"p{r}"))
                        conn.execute("update counters set n = n + 1 where id = %s", (1 + r % 2,))
                        conn.execute("insert into orders (account, amount, note) values (%s, %s, %s)",
                                     (account, r, f"pipe {r}"))  # fmt: skip
                    continue
                with conn.transaction():
                    conn.execute("update accounts set balance = balance + %s where id = %s", (r, account))
                    conn.execute("insert into events (account, kind) values (%s, 'deposit')", (account,))
                    conn.execute(
                        "insert into orders (account, amount, data) values (%s, %s, %s::jsonb) returning id",
                        (account, r * 1.5, '{"b": 1, "a": [1, 2]}'),
                    ).fetchone()
                    try:
                        with conn.transaction():  # a savepoint that sometimes fails
                            conn.execute("insert into tags values (%s, %s)", (account, f"t{r % 5}"))
                    except psycopg.errors.UniqueViolation:
                        pass
                    conn.execute(
                        "insert into tags values (%s, 'last') "
                        "on conflict (account, tag) do update set tag = excluded.tag",
                        (account,),
                    )  # fmt: skip
                    conn.execute("update counters set n = n + 1 where id = 2")
                if rng.random() < 0.2:
                    with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
                        conn.execute("insert into audit (note) values ('never')")
                        conn.execute("select 1/0")
                if r % 10 == 0:
                    conn.execute(
                        "insert into events (account, kind) select id, 'copy-of-' || owner from accounts where id = %s",
                        (account,),
                    )  # fmt: skip
                    conn.execute(
                        "delete from events where account = %s and kind = 'deposit' and id %% 3 = 0", (account,)
                    )
                    conn.execute("update orders set placed_at = now(), note = 'touched' where account = %s", (account,))
            with conn.cursor().copy("copy audit (note, at) from stdin") as copy:
                for k in range(20):
                    copy.write_row((f"copy {i}.{k}", "2026-01-01 00:00:00+00"))

    async def asyncpg_client(i: int) -> None:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            account = await conn.fetchval("insert into accounts (owner) values ($1) returning id", f"a{i}")
            for r in range(rounds):
                async with conn.transaction():
                    await conn.execute("update accounts set balance = balance - $1 where id = $2", r, account)
                    await conn.fetchrow("insert into events (account, kind) values ($1, $2) returning id, at, token",
                                        account, "withdraw")  # fmt: skip
                    await conn.execute("update counters set n = n + 1 where id = 1")
                if r % 7 == 0:
                    tx = conn.transaction()
                    await tx.start()
                    await conn.execute("insert into audit (note) values ('rolled back')")
                    await tx.rollback()
        finally:
            await conn.close()

    styles = ["simple", "simple", "prepared", "prepared", "pipeline", "pipeline", "default", "default"]

    def guarded(i: int, style: str) -> None:
        try:
            psycopg_client(i, style)
        except BaseException as exc:  # collected: the test reports every failing client
            errors.append(exc)

    try:
        threads = [asyncio.to_thread(guarded, i, style) for i, style in enumerate(styles)]
        await asyncio.gather(*threads, *(asyncpg_client(100 + i) for i in range(4)))
        assert not errors, errors
        status = wait_applied(proxy, timeout=30)
        for table in ("accounts", "events", "tags", "audit", "counters", "orders"):
            assert_same(fresh, table)
        # every increment counted once: 2 pipelines x (13 + 12), 6 others x 25 on id 2, 4 asyncpg x 25 on id 1
        assert rows(fresh.new, "counters") == [(1, 2 * 13 + 4 * rounds), (2, 2 * 12 + 6 * rounds)]
        mirror = status["mirrors"][0]
        assert (mirror["diverged"], mirror["failed"], mirror["unmirrored"]) == (0, 0, 0), status["recent"]
        assert mirror["databases"][0]["applied"] > 8 * rounds
    finally:
        proxy.stop()


CTE = "with x as (insert into tags values (9, 'cte') returning *) select count(*) from x"


@pytest.mark.parametrize("policy", ["record", "reject", "replay"])
def test_unsafe_write_policies(fresh: TwoClusters, policy: str) -> None:
    proxy = mirror_proxy(fresh, {"unsafe": policy})
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            if policy == "reject":
                with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
                    conn.execute(CTE)
                assert "writable CTE" in str(err.value) and 'mirror.unsafe = "record"' in (
                    err.value.diag.message_hint or ""
                )
                with conn.transaction():  # inside a transaction: refused, and the transaction is aborted
                    conn.execute("insert into tags values (8, 'before')")
                    with pytest.raises(psycopg.errors.FeatureNotSupported):
                        conn.execute(CTE, prepare=True)  # (extended protocol)
                    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                        conn.execute("select 1")
                    raise psycopg.Rollback()
                conn.execute("insert into tags values (7, 'after')")  # the session goes on
            else:
                assert conn.execute(CTE).fetchone() == (1,)
        status = wait_applied(proxy)
        if policy == "reject":
            assert rows(fresh.old, "tags") == [(7, "after")] == rows(fresh.new, "tags")
        elif policy == "replay":
            assert rows(fresh.old, "tags") == [(9, "cte")] == rows(fresh.new, "tags")
        else:
            assert rows(fresh.old, "tags") == [(9, "cte")] and rows(fresh.new, "tags") == []
            entry = status["recent"][-1]
            assert entry["kind"] == "unmirrored" and entry["tables"] == ["tags"] and "writable CTE" in entry["reason"]
            assert entry["fingerprint"] and entry["statement"].startswith("with x as")
            assert status["mirrors"][0]["out_of_sync"][0]["table"] == "tags"
    finally:
        proxy.stop()


@pytest.mark.parametrize("ddl", ["primary_only", "mirror", "reject"])
def test_ddl_policies(fresh: TwoClusters, ddl: str) -> None:
    proxy = mirror_proxy(fresh, {"ddl": ddl})
    create = "create table gadgets (id int primary key)"
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            if ddl == "reject":
                with pytest.raises(psycopg.errors.FeatureNotSupported):
                    conn.execute(create)
            else:
                conn.execute(create)
                conn.execute("insert into gadgets values (1)")
        status = wait_applied(proxy)
        exists = "select count(*) from pg_tables where tablename = 'gadgets'"
        on_old, on_new = (int(c.psql(exists).strip()) for c in (fresh.old, fresh.new))
        assert (on_old, on_new) == {"primary_only": (1, 0), "mirror": (1, 1), "reject": (0, 0)}[ddl]
        kinds = [e["kind"] for e in status["recent"]]
        if ddl == "primary_only":
            assert "ddl" in kinds and "failed" in kinds  # and the insert into a table the mirror lacks failed there
        elif ddl == "mirror":
            assert rows(fresh.new, "gadgets") == [(1,)] and not kinds
    finally:
        proxy.stop()


def test_divergence_is_journaled_durably_and_cleared_after_repair(fresh: TwoClusters, tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    proxy = mirror_proxy(fresh, {"journal": str(journal)})
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("insert into tags values (1, 'a'), (2, 'b')")
            wait_applied(proxy)
            fresh.new.psql("delete from tags where account = 2")  # the mirror drifts
            conn.execute("update tags set tag = 'c' where account = 2")
        status = wait_applied(proxy)
        entry = next(e for e in status["recent"] if e["kind"] == "diverged")
        assert entry["reason"] == "tag differs: primary UPDATE 1, mirror UPDATE 0"
        assert entry["tables"] == ["tags"] and entry["fingerprint"] and "update tags" in entry["statement"]
    finally:
        proxy.stop()
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert any(e["kind"] == "diverged" for e in lines)
    proxy = mirror_proxy(fresh, {"journal": str(journal)})  # a restart keeps what needs repair
    try:
        status = proxy.running.server.mirror.status()
        assert [t["table"] for t in status["mirrors"][0]["out_of_sync"]] == ["tags"]
        with httpx.Client(base_url=proxy.admin_url, headers={"Authorization": f"Bearer {TOKEN}"}) as admin:
            reply = admin.post("/api/mirror/new/resume", json={"repaired": True})
            assert reply.status_code == 200, reply.text
            assert reply.json()["cleared"] == ["tags"]
            assert admin.post("/api/mirror/new/resume", json={"repaired": "yes"}).status_code == 400
            metrics = admin.get("/metrics").text
        assert 'pgshift_mirror_journal_entries_total{kind="diverged",mirror="new"} 1.0' in metrics
        assert 'pgshift_mirror_out_of_sync_tables{mirror="new"} 0.0' in metrics
    finally:
        proxy.stop()


def test_sync_mode_waits_for_the_mirror_and_reports_a_timeout(fresh: TwoClusters) -> None:
    proxy = mirror_proxy(fresh, {"mode": "sync", "sync_timeout": 0.5})
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn, psycopg.connect(fresh.new.dsn()) as direct:
            notices: list[str] = []
            conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            for i in range(20):  # visible on the mirror the moment COMMIT returns
                conn.execute("insert into tags values (%s, 'sync')", (i,))
                assert direct.execute("select count(*) from tags").fetchone() == (i + 1,)
                direct.rollback()
            assert not notices
            direct.execute("lock table audit in access exclusive mode")  # the mirror cannot apply
            started = time.monotonic()
            conn.execute("insert into audit (note) values ('late')")
            waited = time.monotonic() - started
            assert 0.45 < waited < 3, waited
            assert notices and "did not confirm within 0.5 s" in notices[0], notices
            direct.rollback()  # lock released: the write is applied after all
        status = wait_applied(proxy)
        assert_same(fresh, "tags", "audit")
        assert status["mirrors"][0]["sync_timeouts"] == 1
        assert any(e["kind"] == "late" for e in status["recent"])
        assert status["mirrors"][0]["out_of_sync"] == []  # late is not lost
    finally:
        proxy.stop()


def test_mirror_down_detaches_without_hurting_clients(fresh: TwoClusters) -> None:
    proxy = mirror_proxy(fresh, {"down_after": 1.0})
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("insert into tags values (0, 'before')")
            wait_applied(proxy)
            fresh.new.stop()
            try:
                slowest = 0.0
                deadline = time.monotonic() + 2.5
                i = 0
                while time.monotonic() < deadline:  # no error, no stall while the mirror is away
                    started = time.monotonic()
                    conn.execute("insert into tags values (%s, 'while down')", (i + 1,))
                    conn.execute("insert into audit (note) values ('x')")
                    slowest = max(slowest, time.monotonic() - started)
                    i += 1
                assert slowest < 0.5, slowest
                status = proxy.running.server.mirror.status()
                database = status["mirrors"][0]["databases"][0]
                assert database["state"] == "detached" and "down_after" in database["detached"]["reason"]
                assert {t["table"] for t in status["mirrors"][0]["out_of_sync"]} == {"tags", "audit"}
            finally:
                fresh.new.start()
            conn.execute("insert into tags values (-1, 'after')")  # still detached: recorded, not queued
        status = proxy.running.server.mirror.status()
        assert status["mirrors"][0]["unmirrored_txns"] > 0
        assert rows(fresh.new, "tags") == [(0, "before")]
    finally:
        proxy.stop()


def test_queue_limit_detaches_instead_of_growing(fresh: TwoClusters) -> None:
    proxy = mirror_proxy(fresh, {"queue_bytes": 65536})
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn, psycopg.connect(fresh.new.dsn()) as direct:
            direct.execute("lock table audit in access exclusive mode")
            for i in range(100):
                conn.execute("insert into audit (note) values (%s)", ("x" * 2000 + str(i),))
            status = proxy.running.server.mirror.status()
            database = status["mirrors"][0]["databases"][0]
            assert database["state"] == "detached" and "queue_bytes" in database["detached"]["reason"]
            assert database["queued_bytes"] <= 65536
            direct.rollback()
        assert [t["table"] for t in status["mirrors"][0]["out_of_sync"]] == ["audit"]
    finally:
        proxy.stop()


def test_cli_mirror_status_and_resume(fresh: TwoClusters, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    def pgshift(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PGSHIFT_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        argv = [sys.executable, "-m", "proxy", *args, "--admin", proxy.admin_url]
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)

    proxy = mirror_proxy(fresh, {"down_after": 0.3})
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("insert into tags values (1, 'a')")
            wait_applied(proxy)
            clean = pgshift("mirror", "status", "--check")
            assert clean.returncode == 0, clean.stderr
            assert "mirror new — journal: diverged 0, failed 0" in clean.stdout and "NEEDS REPAIR" not in clean.stdout
            fresh.new.stop()
            try:
                deadline = time.monotonic() + 10
                while proxy.running.server.mirror.status()["mirrors"][0]["databases"][0]["state"] != "detached":
                    conn.execute("insert into audit (note) values ('while down')")
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            finally:
                fresh.new.start()
        troubled = pgshift("mirror", "status", "--check")
        assert troubled.returncode == 1
        assert "NEEDS REPAIR (1 tables):" in troubled.stdout and "audit" in troubled.stdout
        assert "detached: unreachable" in troubled.stdout
        state = pgshift("status")
        assert "new: detached" in state.stdout and "1 table(s) NEED REPAIR" in state.stdout
        as_json = json.loads(pgshift("mirror", "status", "--json").stdout)
        assert as_json["mirrors"][0]["out_of_sync"][0]["table"] == "audit"
        unknown = pgshift("mirror", "resume", "nope")
        assert unknown.returncode == 4 and 'no backend named "nope"' in unknown.stderr
        resumed = pgshift("mirror", "resume", "new", "--repaired")
        assert resumed.returncode == 0, resumed.stderr
        assert "capture resumed for database(s) postgres" in resumed.stdout and "cleared: audit" in resumed.stdout
        after = pgshift("mirror", "status", "--check")
        assert after.returncode == 0, after.stdout
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:  # captured again
            conn.execute("insert into tags values (2, 'b')")
        wait_applied(proxy)
        assert rows(fresh.new, "tags") == [(1, "a"), (2, "b")]
    finally:
        proxy.stop()


def test_after_a_flip_writes_flow_back_and_pinned_sessions_reach_the_new_primary(fresh: TwoClusters) -> None:
    """A flip swaps roles: the old primary becomes the mirror (reverse dual write). A session pinned
    to the old primary keeps writing there; its writes go to the new primary, never twice to old."""
    proxy = mirror_proxy(fresh)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with (
            psycopg.connect(proxy.dsn(), autocommit=True) as pinned,
            psycopg.connect(proxy.dsn(), autocommit=True) as free,
            httpx.Client(base_url=proxy.admin_url, headers=headers) as admin,
        ):
            pinned.execute("create temp table scratch (x int)")  # stays on old
            free.execute("insert into tags values (1, 'before')")
            wait_applied(proxy)
            assert admin.post("/api/flip", json={"primary": "new"}).status_code == 200
            free.execute("insert into tags values (2, 'after, on new')")
            pinned.execute("insert into tags values (3, 'pinned, on old')")
            assert free.execute("select current_setting('port')").fetchone() == (str(fresh.new.port),)
            assert pinned.execute("select current_setting('port')").fetchone() == (str(fresh.old.port),)
        status = wait_applied(proxy)
        expected = [(1, "before"), (2, "after, on new"), (3, "pinned, on old")]
        assert rows(fresh.old, "tags") == expected == rows(fresh.new, "tags")
        names = {m["name"]: m for m in status["mirrors"]}
        assert names["old"]["diverged"] == names["new"]["diverged"] == 0
    finally:
        proxy.stop()


def test_malformed_bind_ends_only_that_session(fresh: TwoClusters) -> None:
    """A Bind whose parameters do not add up, for a write capture must copy: a protocol error
    for that client (as from Postgres), nothing mirrored, other sessions unaffected."""
    import struct

    from proxy.wire.messages import Parse
    from tests.integration.test_cancel_faults import Raw, _errors

    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as other:
            with Raw(proxy.port) as raw:
                raw.startup()
                bad_bind = b"\0\0" + struct.pack("!hh", 0, 1) + struct.pack("!i", 50) + b"short"
                raw.send(
                    Parse("", "update tags set tag = $1").encode()
                    + b"B" + struct.pack("!I", 4 + len(bad_bind)) + bad_bind
                    + b"E\0\0\0\x09\0\0\0\0\0" + b"S\0\0\0\x04"
                )  # fmt: skip
                errors = _errors(raw.rest())
            assert errors and errors[0]["C"] == "08P01", errors
            other.execute("insert into tags values (1, 'fine')")
        wait_applied(proxy)
        assert rows(fresh.new, "tags") == [(1, "fine")]
    finally:
        proxy.stop()


def test_a_transaction_larger_than_the_queue_is_journaled_not_held(fresh: TwoClusters) -> None:
    proxy = mirror_proxy(fresh, {"queue_bytes": 65536})
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            cur = conn.execute("insert into audit (note) select repeat('x', 100) || g from generate_series(1, 3000) g")
            assert cur.rowcount == 3000
            conn.execute("insert into tags values (1, 'small')")  # the next one is mirrored as usual
        status = wait_applied(proxy)
        assert rows(fresh.new, "audit") == [] and rows(fresh.new, "tags") == [(1, "small")]
        entry = next(e for e in status["recent"] if e["tables"] == ["audit"])
        assert entry["kind"] == "unmirrored" and "larger than mirror.queue_bytes" in entry["reason"]
        assert status["mirrors"][0]["databases"][0]["state"] == "running"  # not detached for it
    finally:
        proxy.stop()


def test_shutdown_journals_what_the_mirror_did_not_get(fresh: TwoClusters, tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    config = routed_config(fresh.old, fresh.new, mirrors=["new"])
    config["mirror"] = {"journal": str(journal)}
    config["proxy"] = {"shutdown_grace": 1}
    proxy = ProxyThread(config).start()
    with psycopg.connect(fresh.new.dsn()) as direct:
        direct.execute("lock table audit in access exclusive mode")  # the mirror cannot apply
        try:
            with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
                for i in range(5):
                    conn.execute("insert into audit (note) values (%s)", (str(i),))
        finally:
            proxy.stop()
        direct.rollback()
    # Sent and not confirmed (the lock held them): outcome unknown; never sent: dropped at the stop.
    # Either way each one is in the journal, against its table.
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    unknown = [e for e in entries if e["kind"] == "failed" and "outcome unknown" in e["reason"]]
    dropped = [e for e in entries if e["kind"] == "out_of_sync" and "proxy stopped with" in e["reason"]]
    counted = len(unknown) + sum(int(e["reason"].split("proxy stopped with ")[1].split()[0]) for e in dropped)
    assert counted == 5, entries
    assert all(e["tables"] == ["audit"] for e in unknown + dropped)


def test_session_settings_mean_the_same_on_the_mirror(fresh: TwoClusters) -> None:
    """A replayed statement runs with the session's search_path and TimeZone on the mirror too."""
    for cluster in (fresh.old, fresh.new):
        cluster.psql(
            "drop schema if exists other cascade; create schema other;"
            "create table other.tags (account int primary key, at timestamptz)"
        )
    proxy = mirror_proxy(fresh)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True, options="-c TimeZone=Asia/Tokyo") as conn:
            conn.execute("insert into other.tags values (1, null), (2, null)")
            conn.execute("set search_path = other, public")
            conn.execute("update tags set at = '2026-01-01 12:00' where account = 1")  # Tokyo noon
            conn.execute("set time zone 'America/New_York'")
            with conn.transaction():
                conn.execute("set local search_path = public")
                conn.execute("insert into tags values (5, 'public, local')")  # public.tags
            conn.execute("update tags set at = '2026-01-01 12:00' where account = 2")  # other.tags, NY noon
        wait_applied(proxy)
        assert_same(fresh, "other.tags", "public.tags")
        at = dict(rows(fresh.new, "other.tags"))
        assert at[1] is not None and at[2] is not None
        assert (at[2] - at[1]).total_seconds() == 14 * 3600  # Tokyo is 14 h ahead of New York in January
        assert rows(fresh.new, "public.tags") == [(5, "public, local")]
    finally:
        proxy.stop()


@pytest.mark.parametrize("functions", [False, True])
def test_writes_inside_functions_are_mirrored_only_when_configured(fresh: TwoClusters, functions: bool) -> None:
    for cluster in (fresh.old, fresh.new):
        cluster.psql("create function bump(n int) returns int language sql as "
                     "$$ insert into tags values (n, 'bumped') returning account $$")  # fmt: skip
    proxy = mirror_proxy(fresh, {"functions": functions})
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            assert conn.execute("select bump(7)").fetchone() == (7,)
        wait_applied(proxy)
        assert rows(fresh.old, "tags") == [(7, "bumped")]
        assert rows(fresh.new, "tags") == ([(7, "bumped")] if functions else [])
    finally:
        proxy.stop()


def test_statements_prepared_before_dual_write_are_mirrored(fresh: TwoClusters) -> None:
    """A pool's connection prepared its INSERT (psycopg prepares after 5 runs) before dual write
    began; then a mirror is added, and later the primary flips: every write through that same
    prepared statement reaches the other side, with the primary's generated values."""
    config = routed_config(fresh.old, fresh.new)
    config["admin"] = {"port": 0, "token": TOKEN}
    proxy = ProxyThread(config).start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    insert = "insert into accounts (owner, balance) values (%s, %s) returning id"
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
            for i in range(3):
                conn.execute(insert, (f"before-{i}", i))  # prepared on old, no mirror yet
            answer = httpx.patch(proxy.admin_url + "/api/routing", json={"mirrors": ["new"]}, headers=headers)
            assert answer.status_code == 200, answer.text
            ids = [conn.execute(insert, (f"after-{i}", 10 + i)).fetchone()[0] for i in range(3)]  # type: ignore[index]
            wait_applied(proxy)
            mirrored = [(r[0], r[1]) for r in rows(fresh.new, "accounts")]
            assert mirrored == [(i, f"after-{n}") for n, i in enumerate(ids)]
            # After a flip the statement is prepared again on new, with its row image: old (now the
            # mirror) gets those writes too.
            answer = httpx.post(proxy.admin_url + "/api/flip", json={"primary": "new"}, headers=headers)
            assert answer.status_code == 200, answer.text
            fresh.new.psql("select setval('accounts_id_seq', 1000)")
            later = conn.execute(insert, ("after-flip", 99)).fetchone()[0]  # type: ignore[index]
            assert later > 1000
            wait_applied(proxy)
            assert (later, "after-flip") in [(r[0], r[1]) for r in rows(fresh.old, "accounts")]
        status = proxy.running.server.mirror.status()  # type: ignore[union-attr]
        assert all(m["unmirrored"] == 0 and m["failed"] == 0 for m in status["mirrors"]), status
    finally:
        proxy.stop()
