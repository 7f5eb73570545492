"""`pgshift sync start | status | stop` end to end, as subprocesses, against real clusters: pgbench
writing during the copy, old == new row by row after catch-up, a SIGKILLed sync restarted with
nothing lost or duplicated, and no slot or publication left behind by `sync stop` or a failed start."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.localpg import LocalCluster
from tests.integration.conftest import TwoClusters

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
PGBENCH = {"pgbench_accounts": "aid", "pgbench_branches": "bid", "pgbench_tellers": "tid", "pgbench_history": "hid"}


def pgbench(cluster: LocalCluster, *args: str, wait: bool = True) -> subprocess.Popen[bytes]:
    argv = [str(cluster.bindir / "pgbench"), *args, cluster.dsn()]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if wait:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    return proc


@pytest.fixture(scope="module")
def clusters(make_cluster: Callable[..., LocalCluster]) -> TwoClusters:
    old, new = make_cluster("sync-cli-old"), make_cluster("sync-cli-new")
    pgbench(old, "-i", "-q", "-s", "2")  # 200,000 accounts
    pgbench(new, "-i", "-q", "-I", "dtp")  # the same tables and keys, no rows
    for cluster in (old, new):
        # pgbench_history has no primary key: give it one, as a sync needs.
        cluster.psql("alter table pgbench_history add column hid bigserial primary key")
    return TwoClusters(old, new)


@pytest.fixture
def config(clusters: TwoClusters, tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    backends = {"old": clusters.old.dsn(user="", dbname=""), "new": clusters.new.dsn(user="", dbname="")}
    text = "".join(f'[backends.{name}]\ndsn = "{dsn}"\nmirror_user = "postgres"\n\n' for name, dsn in backends.items())
    path.write_text(text + '[routing]\nprimary = "old"\n')
    return path


def argv(config: Path, action: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "sync", action, "--from", "old", "--to", "new", "--config", str(config),
            *args]  # fmt: skip


def cli(config: Path, action: str, *args: str) -> tuple[int, str, str]:
    result = subprocess.run(argv(config, action, *args), capture_output=True, text=True, cwd=ROOT, timeout=60)
    return result.returncode, result.stdout, result.stderr


def status(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = cli(config, "status", "--json", *args)
    assert code in (0, 1), err
    return code, json.loads(out)


class Sync:
    """A `pgshift sync start` running in the background, its stderr in a file."""

    def __init__(self, config: Path, tmp_path: Path, *args: str) -> None:
        self.log = tmp_path / f"sync-{time.monotonic_ns()}.log"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                argv(config, "start", "--status-interval", "1", "--chunk-rows", "30000", *args),
                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text()

    def wait_streaming(self, config: Path, timeout: float = 40) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"sync start ended ({self.proc.returncode}):\n{self.output()}"
            _, report = status(config)
            if report["phase"] == "streaming" and report["slot"] and report["slot"]["active"]:
                return report
            time.sleep(0.3)
        raise AssertionError(f"not streaming after {timeout} s:\n{self.output()}")

    def wait_caught_up(self, config: Path, timeout: float = 40) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        report: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"sync start ended ({self.proc.returncode}):\n{self.output()}"
            code, report = status(config)
            if report["lag_bytes"] == 0:
                assert code == 0 and report["ok"], report
                return report
            time.sleep(0.3)
        raise AssertionError(f"lag did not reach 0 in {timeout} s: {report}\n{self.output()}")

    def terminate(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


def fetch(cluster: LocalCluster, sql: str) -> Any:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        return row[0] if row else None


def digest(cluster: LocalCluster, table: str, key: str) -> tuple[int, str]:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        row = conn.execute(
            f"select count(*), md5(coalesce(string_agg(t::text, ',' order by {key}), '')) from {table} t"
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def assert_equal(clusters: TwoClusters) -> None:
    for table, key in PGBENCH.items():
        old, new = digest(clusters.old, table, key), digest(clusters.new, table, key)
        assert new == old, f"{table}: old {old}, new {new}"


def source_objects(cluster: LocalCluster, slot: str = "pgshift_sync", publication: str = "pgshift_sync") -> tuple:
    return (
        fetch(cluster, f"select count(*) from pg_replication_slots where slot_name = '{slot}'"),
        fetch(cluster, f"select count(*) from pg_publication where pubname = '{publication}'"),
    )


@pytest.fixture
def stray(clusters: TwoClusters) -> Iterator[None]:
    """Tables only the failure test uses (dropped after it, so the other test syncs pgbench only)."""
    for cluster in (clusters.old, clusters.new):
        cluster.psql("create table nopk (id int, v text); create table strict_t (id int primary key, v int)")
    clusters.old.psql("insert into strict_t select g, g * 10 from generate_series(1, 50) g")
    clusters.new.psql("alter table strict_t add check (v < 100)")  # the copy will fail on v >= 100
    yield
    for cluster in (clusters.old, clusters.new):
        cluster.psql("drop table if exists nopk, strict_t")


def test_failed_start_leaves_nothing(clusters: TwoClusters, config: Path, stray: None) -> None:
    # Refused by the check: nothing created at all.
    code, out, err = cli(config, "start", "--tables", "nopk,pgbench_branches")
    assert code == 1, out + err
    assert "public.nopk" in out and "PROBLEM" in out and "nothing was created" in out
    assert source_objects(clusters.old) == (0, 0)

    # Failed after creating the slot and publication (the target refuses the copied rows): both
    # dropped again, the partial copy emptied.
    code, out, err = cli(config, "start", "--tables", "strict_t", "--slot", "failing", "--publication", "failing")
    assert code == 1, out + err
    assert "sync failed" in err and 'dropped the replication slot "failing"' in err, err
    assert 'dropped the publication "failing"' in err
    assert source_objects(clusters.old, "failing", "failing") == (0, 0)
    assert fetch(clusters.new, "select count(*) from strict_t") == 0
    code, report = status(config, "--slot", "failing")
    assert report["phase"] == "stopped" and report["slot"] is None and not report["sync"]
    assert "strict_t" in report["last_error"]


def test_killed_during_the_copy_resumes_from_its_chunks(clusters: TwoClusters, config: Path, tmp_path: Path) -> None:
    old, new = clusters.old, clusters.new
    # Each chunk's COPY waits a little on the target, so that the kill lands in the middle of the copy.
    new.psql(
        "create function slow() returns trigger language plpgsql as"
        " $$ begin perform pg_sleep(0.03); return null; end $$;"
        "create trigger slow after insert on pgbench_accounts for each statement execute function slow()"
    )
    load = pgbench(old, "-c", "2", "-T", "6", wait=False)
    try:
        sync = Sync(config, tmp_path, "--workers", "1", "--chunk-rows", "4000")  # 50 chunks of accounts
        deadline = time.monotonic() + 40
        done: dict[tuple[str, int], Any] = {}
        while time.monotonic() < deadline and len(done) < 5:
            assert sync.proc.poll() is None, sync.output()
            with contextlib.suppress(psycopg.Error), psycopg.connect(new.dsn(), autocommit=True) as conn:
                rows = conn.execute("select table_name, chunk, done_at from pgshift_backfill where done_at is not null")
                done = {(t, c): at for t, c, at in rows}
            time.sleep(0.02)
        sync.terminate(signal.SIGKILL)
        total = fetch(new, "select count(*) from pgshift_backfill")
        finished = fetch(new, "select count(*) from pgshift_backfill where done_at is not null")
        assert 5 <= finished < total, (finished, total)

        again = Sync(config, tmp_path, "--workers", "2", "--chunk-rows", "4000")
        again.wait_streaming(config, timeout=60)
        _, err = load.communicate(timeout=60)
        assert load.returncode == 0, err.decode()
        again.wait_caught_up(config)
        assert_equal(clusters)
        assert "resuming" in again.output(), again.output()
        # The chunks finished before the kill were not copied again.
        with psycopg.connect(new.dsn(), autocommit=True) as conn:
            for (table, chunk), at in done.items():
                row = conn.execute(
                    "select done_at from pgshift_backfill where table_name = %s and chunk = %s", (table, chunk)
                ).fetchone()
                assert row is not None and row[0] == at, (table, chunk)
        code, out, err = cli(config, "stop", "--force")
        assert code == 0, out + err
        again.proc.wait(timeout=30)
        assert source_objects(old) == (0, 0)
    finally:
        if load.poll() is None:
            load.kill()
        new.psql("drop trigger slow on pgbench_accounts; drop function slow()")
        reset_target(clusters, config)


def reset_target(clusters: TwoClusters, config: Path) -> None:
    """No sync, and a target without rows or sync state, for the next test."""
    for cluster in (clusters.old, clusters.new):
        if not cluster.running:
            cluster.start()
    cli(config, "stop", "--force")
    clusters.new.psql(
        "truncate pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history;"
        "drop table if exists pgshift_backfill, pgshift_sync_state"
    )


def ensure_running(sync: Sync, config: Path, tmp_path: Path) -> Sync:
    """The sync as it is if it rode out the interruption, else a new one (it must have said why)."""
    if sync.proc.poll() is None:
        return sync
    assert sync.proc.returncode != 0 and "sync failed" in sync.output(), sync.output()
    return Sync(config, tmp_path)


def test_databases_restarted_while_streaming(clusters: TwoClusters, config: Path, tmp_path: Path) -> None:
    old, new = clusters.old, clusters.new
    sync = Sync(config, tmp_path)
    try:
        sync.wait_streaming(config)
        pgbench(old, "-c", "2", "-t", "200")

        # The target goes away while the source takes writes, then comes back.
        new.stop()
        pgbench(old, "-c", "2", "-t", "300")
        time.sleep(1)
        new.start()
        sync = ensure_running(sync, config, tmp_path)
        sync.wait_streaming(config)
        sync.wait_caught_up(config)
        assert_equal(clusters)

        # The source restarts: the stream resumes from the slot's position.
        old.stop()
        time.sleep(1)
        old.start()
        pgbench(old, "-c", "2", "-t", "300")
        sync = ensure_running(sync, config, tmp_path)
        sync.wait_streaming(config)
        sync.wait_caught_up(config)
        assert_equal(clusters)
        assert "resuming" in sync.output()
    finally:
        reset_target(clusters, config)
        sync.proc.wait(timeout=30)


def test_sync_pgbench_kill_restart_stop(clusters: TwoClusters, config: Path, tmp_path: Path) -> None:
    old, new = clusters.old, clusters.new
    code, out, _ = cli(config, "status")
    assert code == 0 and "no sync" in out

    # pgbench writes on the source during the copy and after it.
    sync = Sync(config, tmp_path, "--workers", "4")
    load = pgbench(old, "-c", "4", "-T", "6", wait=False)
    report = sync.wait_streaming(config)
    assert report["running"] and report["source"] == "old" and report["target"] == "new"
    assert {t["table"] for t in report["tables"]} == {f"public.{t}" for t in PGBENCH}
    assert all(t["chunks_done"] == t["chunks"] for t in report["tables"])
    _, err = load.communicate(timeout=60)
    assert load.returncode == 0, err.decode()
    sync.wait_caught_up(config)
    assert_equal(clusters)
    progress = sync.output()
    assert "copy " in progress and "rows/s" in progress and "ETA" in progress, progress
    assert "streaming:" in progress and "transaction(s) applied" in progress, progress

    # Killed while streaming; the source goes on; a new start resumes from the slot.
    pgbench(old, "-c", "2", "-T", "2")
    sync.terminate(signal.SIGKILL)
    pgbench(old, "-c", "2", "-t", "200")
    old.psql("delete from pgbench_history where hid % 7 = 0; update pgbench_branches set filler = 'after kill'")
    code, report = status(config)
    assert report["phase"] == "streaming" and not report["slot"]["active"]

    again = Sync(config, tmp_path)
    again.wait_streaming(config)
    again.wait_caught_up(config)
    assert_equal(clusters)
    assert "resuming" in again.output()
    assert again.terminate(signal.SIGTERM) == 0, again.output()
    assert "stopped after" in again.output()

    # Stopped cleanly: the slot stays (to resume) and status warns it retains WAL with no consumer.
    old.psql("update pgbench_branches set bbalance = bbalance + 1")
    code, out, _ = cli(config, "status")
    assert code == 1 and "WARNING" in out and "retains" in out, out

    # A sync streaming refuses `stop` without --force.
    third = Sync(config, tmp_path)
    third.wait_streaming(config)
    code, out, err = cli(config, "stop")
    assert code == 1 and "in use" in err, out + err
    code, out, err = cli(config, "stop", "--force")
    assert code == 0, out + err
    assert "terminated the walsender" in out and "dropped replication slot" in out and "dropped publication" in out
    third.proc.wait(timeout=30)
    assert source_objects(old) == (0, 0)
    code, out, _ = cli(config, "status")
    assert code == 0 and "no sync" in out, out
    code, out, _ = cli(config, "stop")  # idempotent
    assert code == 0 and "nothing to drop" in out, out
    assert fetch(new, "select phase from pgshift_sync_state where slot = 'pgshift_sync'") == "stopped"
