"""The cut when things go wrong (issue 9), against real clusters: a transaction that outlives the
drain timeout aborts the cut and leaves routing, the change stream and the data as they were; a
proxy killed in the middle of a cut (PGSHIFT_FAULT=cut:<step> ends it right after that step is
journaled) finishes the cut at restart if its swap reached the store, and undoes it otherwise, in
either direction; two proxy instances sharing a control store in Postgres pause, drain and swap
together, their clients seeing no error.

Each test gets its own pair of clusters: a test leaves a change stream, a slot and a hold behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import tomli_w

from proxy.localpg import LocalCluster, create_cluster, free_port
from proxy.migrate.cut import FAULT_ENV
from tests.integration.conftest import TwoClusters
from tests.integration.test_migrate import (
    TOKEN,
    Sync,
    advance,
    explain,
    fetch,
    proxy_config,
    ready_for_next,
    status,
    write_config,
)
from tests.support.migration import ROOT, Load, create_schema, differing_tables, migrate, wait_until
from tests.support.proxy import ProxyThread

pytestmark = pytest.mark.timeout(240)

CUT_STEPS = ["begin", "paused", "caught_up", "sequences", "stream_held", "swapped", "resumed"]
FAULT_EXIT = 70  # cut.fault: os._exit(70)


@pytest.fixture
def clusters() -> Iterator[TwoClusters]:
    """A fresh pair per test: each test leaves a change stream (slot, state row, hold) behind."""
    old = create_cluster("mf-old")
    try:
        new = create_cluster("mf-new")
        try:
            create_schema(old, new)
            yield TwoClusters(old, new)
        finally:
            new.destroy()
    finally:
        old.destroy()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSHIFT_ADMIN_TOKEN", TOKEN)
    monkeypatch.delenv(FAULT_ENV, raising=False)


class ProxyProcess:
    """`python -m proxy serve --config FILE` as a child process (a crash must end the whole
    process, which an in-process proxy cannot do); fixed ports, so a restart is found where it was."""

    def __init__(self, config: dict[str, Any], directory: Path) -> None:
        self.config = {
            **config,
            "listen": {"host": "127.0.0.1", "port": free_port()},
            "admin": {**config["admin"], "host": "127.0.0.1", "port": free_port()},
            "control": {"health_interval": 0, **config["control"]},
        }
        self.path = directory / "proxy.toml"
        self.path.write_text(tomli_w.dumps(self.config))
        self.log = directory / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.config['admin']['port']}"

    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.config['listen']['port']}/postgres"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def start(self, fault: str | None = None) -> ProxyProcess:
        env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
        env.update({"PYTHONPATH": str(ROOT), "PGSHIFT_ADMIN_TOKEN": TOKEN})
        if fault is not None:
            env[FAULT_ENV] = fault
        with self.log.open("ab") as err:
            err.write(f"\n--- pytest: starting the proxy ({FAULT_ENV}={fault}) ---\n".encode())
            err.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(self.path)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"the proxy exited with {self.proc.returncode}:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"the proxy did not start:\n{self.log_tail()}"
            try:
                if httpx.get(f"{self.admin_url}/api/state", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        # (the migration's state is loaded, and an interrupted cut recovered, in the background)
        wait_until(lambda: migrate(self.admin_url, TOKEN, "status")[0] == 0, 60, "migrate status answers")
        return self

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the proxy did not exit within {timeout} s:\n{self.log_tail()}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def to_the_cut(url: str, sync: Sync, timeout: float = 90) -> dict[str, Any]:
    """From shadow (with ``sync`` started) to read-shift 100 with every guard of the cut holding."""
    wait_until(
        lambda: (x := status(url))["phase"] == "sync" and x["next"]["ready"] and x,
        timeout,
        f"sync streaming (sync log: {sync.log})",
    )
    assert advance(url)["taken"][0]["step"] == "dual-write"
    s = ready_for_next(url, timeout)
    assert s["next"]["step"] == "read-shift 100%", s["next"]
    assert advance(url)["status"]["read_percent"] == 100
    s = ready_for_next(url, timeout)
    assert s["next"]["step"] == "cut", s["next"]
    return s


def cut_entries(s: dict[str, Any], cut: str) -> list[dict[str, Any]]:
    return [e for e in s["journal"] if e.get("cut") == cut]


def recovered(url: str, timeout: float = 60) -> dict[str, Any]:
    """The status once no cut is in progress any more (a restarted proxy finished or undid it)."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: (x := status(url))["cut"] is None and x["operation"] is None and x, timeout, "the cut recovered"
    )


def hold(new: LocalCluster) -> Any:
    return fetch(new, "select hold from pgshift_sync_state")


def stored_cut(tmp_path: Path) -> tuple[dict[str, Any], list[str]]:
    """The cut in progress as the file store has it (pgshift-migration.json beside the state file),
    and the steps its journal holds for it."""
    cut: dict[str, Any] = json.loads((tmp_path / "pgshift-migration.json").read_text())["state"]["cut"]
    assert cut is not None
    entries = [
        json.loads(line) for line in (tmp_path / "pgshift-migration.json.journal.jsonl").read_text().splitlines()
    ]
    return cut, [e["step"] for e in entries if e.get("cut") == cut["id"]]


def progress(load: Load, more: int = 50, timeout: float = 30) -> None:
    before = load.transactions
    wait_until(lambda: load.transactions > before + more, timeout, f"{more} more transactions of the load")


def settled(old: LocalCluster, new: LocalCluster, timeout: float = 30) -> None:
    try:
        wait_until(lambda: not differing_tables(old, new), timeout, "old == new")
    except AssertionError:
        raise AssertionError(f"old != new: {differing_tables(old, new)}; {explain(old, new)}") from None


def written_everywhere(dsn: str, old: LocalCluster, new: LocalCluster, owner: int) -> None:
    """A row inserted through the proxy lands on the primary and, mirrored, on the other one."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("insert into tokens (owner) values (%s) returning id", (owner,)).fetchone()
    assert row is not None
    for cluster in (old, new):
        wait_until(
            lambda c=cluster: fetch(c, f"select count(*) from tokens where id = '{row[0]}'") == 1,
            30,
            f"token {row[0]} on {cluster.name}",
        )


def test_cut_aborted_by_a_long_transaction(clusters: TwoClusters, tmp_path: Path, env: None) -> None:
    old, new = clusters.old, clusters.new
    config_path = tmp_path / "config.toml"
    write_config(config_path, clusters)
    proxy = ProxyThread(proxy_config(clusters, tmp_path, drain_timeout=1.0, read_steps=[100])).start()
    url = proxy.admin_url
    sync = Sync(config_path, tmp_path / "sync.log")
    load: Load | None = None
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("insert into counters values (99, 0)")  # a row the load does not touch
        to_the_cut(url, sync)
        load = Load(proxy.dsn(), sessions=4).start()
        progress(load)
        before = status(url)
        assert before["primary"] == "old" and before["mirrors"] == ["new"], before

        with psycopg.connect(proxy.dsn(), connect_timeout=10) as txn:
            txn.execute("update counters set n = n + 1000 where id = 99")  # open, not committed
            code, data, err = migrate(url, TOKEN, "advance")
            assert code == 1, f"exit {code}\n{err}\n{data}"
            cut = data["taken"][0]
            assert cut["step"] == "cut" and cut["result"] == "aborted", cut
            # (the open transaction at least; a load session may be caught mid-transaction too)
            assert re.search(r"\d+ session\(s\) still had a transaction", cut["reason"]), cut
            assert "after the drain timeout (1 s)" in cut["reason"], cut

            # Routing, roles and the change stream as they were.
            s = status(url)
            assert s["phase"] == "read-shift" and s["read_percent"] == 100 and s["cut"] is None, s
            assert s["primary"] == "old" and s["mirrors"] == ["new"], s
            assert s["routing_version"] == before["routing_version"], s
            assert s["last_cut"]["result"] == "aborted" and s["last_cut"]["id"] == cut["id"], s["last_cut"]
            assert [e["step"] for e in cut_entries(s, cut["id"])] == ["begin", "paused", "aborted"]
            paused = cut_entries(s, cut["id"])[1]
            assert paused["ok"] is False and paused["instances"][0]["drained"] is False, paused
            assert paused["instances"][0]["writing"] >= 1, paused
            assert hold(new) is None
            assert fetch(new, "select phase from pgshift_sync_state") == "streaming"
            assert sync.proc.poll() is None, sync.log.read_text()[-3000:]
            assert fetch(old, "select count(*) from pg_replication_slots where active") == 1
            assert fetch(new, "select n from counters where id = 99") == 0  # not committed yet

            # The transaction was left alone, and the writes held during the drain went on.
            progress(load)
            txn.commit()
        wait_until(lambda: fetch(new, "select n from counters where id = 99") == 1000, 30, "the commit streamed")
        load.stop()
        assert not load.errors, f"{len(load.errors)} client error(s), first: {load.errors[:5]}"
        settled(old, new)

        # Nothing is left broken: the cut goes through once no transaction outlives the drain.
        ready_for_next(url)
        cut = advance(url)["taken"][0]
        assert cut["result"] == "done", cut
        assert status(url)["primary"] == "new"
    finally:
        if load is not None:
            load.stop()
        sync.stop()
        proxy.stop()


@pytest.mark.proxy_subprocess
def test_killed_between_swap_and_resume(clusters: TwoClusters, tmp_path: Path, env: None) -> None:
    old, new = clusters.old, clusters.new
    config_path = tmp_path / "config.toml"
    write_config(config_path, clusters)
    proxy = ProxyProcess(proxy_config(clusters, tmp_path, read_steps=[100]), tmp_path)
    proxy.start(fault="cut:swapped")
    url = proxy.admin_url
    sync = Sync(config_path, tmp_path / "sync.log")
    load: Load | None = None
    try:
        to_the_cut(url, sync)
        load = Load(proxy.dsn(), sessions=4).start()
        progress(load)
        before = status(url)

        code, data, err = migrate(url, TOKEN, "advance")
        assert code in (3, 5), f"exit {code}\n{err}\n{data}"  # the proxy died under the request
        assert proxy.wait() == FAULT_EXIT, proxy.log_tail()
        assert f"{FAULT_ENV}=cut:swapped: ending the process here" in proxy.log_tail()
        load.stop()  # (its sessions lost their connections with the proxy: expected here)
        cut, steps = stored_cut(tmp_path)
        assert cut["direction"] == "forward" and cut["owner"] == "a", cut
        assert steps == CUT_STEPS[:-1], steps  # ended right after the swap was journaled

        # Restarted without the fault, the proxy finishes the cut: its swap is in the store.
        proxy.start()
        s = recovered(url)
        assert s["phase"] == "reverse-window" and s["primary"] == "new" and s["mirrors"] == ["old"], s
        assert s["routing_version"] == before["routing_version"] + 1, s  # the swap's version, no other
        last = s["last_cut"]
        assert last["id"] == cut["id"] and last["result"] == "done" and last["recovered"] is True, last
        assert [e["step"] for e in cut_entries(s, cut["id"])] == CUT_STEPS
        assert hold(new) is not None
        sync.proc.wait(30)  # its walsender was ended at stream_held: the stream is over
        assert fetch(old, "select count(*) from pg_replication_slots where active") == 0

        # Writes through the restarted proxy go to new and are mirrored to old.
        written_everywhere(proxy.dsn(), old, new, owner=-2)
        load = Load(proxy.dsn(), sessions=4).start()
        progress(load)
        load.stop()
        assert not load.errors, f"{len(load.errors)} client error(s), first: {load.errors[:5]}"
        settled(old, new)
    finally:
        if load is not None:
            load.stop()
        sync.stop()
        proxy.stop()


def cut_then_restart(clusters: TwoClusters, tmp_path: Path, fault: str) -> tuple[ProxyProcess, dict[str, Any]]:
    """A proxy subprocess brought through a successful cut (under load), then restarted with
    ``fault``; the status at the end of the cut."""
    config_path = tmp_path / "config.toml"
    write_config(config_path, clusters)
    proxy = ProxyProcess(proxy_config(clusters, tmp_path, read_steps=[100]), tmp_path)
    proxy.start()
    sync = Sync(config_path, tmp_path / "sync.log")
    load: Load | None = None
    try:
        to_the_cut(proxy.admin_url, sync)
        load = Load(proxy.dsn(), sessions=4).start()
        progress(load)
        cut = advance(proxy.admin_url)["taken"][0]
        assert cut["result"] == "done", cut
        progress(load)
        load.stop()
        assert not load.errors, f"{len(load.errors)} client error(s), first: {load.errors[:5]}"
        s = status(proxy.admin_url)
        assert s["phase"] == "reverse-window" and s["primary"] == "new", s
        sync.proc.wait(30)  # held: the stream is over
        proxy.stop()
        proxy.start(fault=fault)
    except BaseException:
        if load is not None:
            load.stop()
        sync.stop()
        proxy.stop()
        raise
    return proxy, s


def rollback_killed_then_restarted(
    proxy: Any, tmp_path: Path, steps: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`migrate rollback` on a proxy set to die after ``steps[-1]``: it dies there (the journal says
    so), starts again without the fault, and recovers; the cut as journaled, and the status then."""
    code, data, err = migrate(proxy.admin_url, TOKEN, "rollback")
    assert code in (3, 5), f"exit {code}\n{err}\n{data}"
    assert proxy.wait() == FAULT_EXIT, proxy.log_tail()
    back, done = stored_cut(tmp_path)
    assert back["direction"] == "back" and done == steps, (back, done)
    proxy.start()
    return back, recovered(proxy.admin_url)


@pytest.mark.proxy_subprocess
def test_killed_during_rollback(clusters: TwoClusters, tmp_path: Path, env: None) -> None:
    """Killed before the swap of a rollback (after "sequences"): the restart undoes it; the cut stays."""
    old, new = clusters.old, clusters.new
    proxy, after_cut = cut_then_restart(clusters, tmp_path, "cut:sequences")
    url = proxy.admin_url
    load: Load | None = None
    try:
        back, s = rollback_killed_then_restarted(proxy, tmp_path, ["begin", "paused", "sequences"])
        assert s["phase"] == "reverse-window" and s["primary"] == "new" and s["mirrors"] == ["old"], s
        assert s["routing_version"] == after_cut["routing_version"], s  # nothing was swapped
        last = s["last_cut"]
        assert last["id"] == back["id"] and last["direction"] == "back", last
        assert last["result"] == "aborted" and "interrupted" in last["reason"], last
        assert [e["step"] for e in cut_entries(s, back["id"])] == ["begin", "paused", "sequences", "aborted"]
        assert hold(new) is not None  # still the reverse window: the stream stays held
        written_everywhere(proxy.dsn(), old, new, owner=-3)

        # The rollback, run again, goes through (under load).
        load = Load(proxy.dsn(), sessions=4).start()
        progress(load)
        code, data, err = migrate(url, TOKEN, "rollback")
        assert code == 0, f"exit {code}\n{err}\n{data}"
        assert data["taken"][0]["result"] == "done" and data["taken"][0]["direction"] == "back", data
        s = status(url)
        assert s["phase"] == "read-shift" and s["read_percent"] == 100 and s["primary"] == "old", s
        assert s["mirrors"] == ["new"], s
        assert hold(new) is None
        progress(load)
        load.stop()
        assert not load.errors, f"{len(load.errors)} client error(s), first: {load.errors[:5]}"
        settled(old, new)
    finally:
        if load is not None:
            load.stop()
        proxy.stop()


@pytest.mark.proxy_subprocess
def test_killed_after_the_swap_of_a_rollback(clusters: TwoClusters, tmp_path: Path, env: None) -> None:
    """Killed after the swap of a rollback: the restart finishes it — primary old, the stream released."""
    old, new = clusters.old, clusters.new
    proxy, after_cut = cut_then_restart(clusters, tmp_path, "cut:swapped")
    load: Load | None = None
    try:
        back, s = rollback_killed_then_restarted(proxy, tmp_path, ["begin", "paused", "sequences", "swapped"])
        assert s["phase"] == "read-shift" and s["read_percent"] == 100, s
        assert s["primary"] == "old" and s["mirrors"] == ["new"], s
        assert s["routing_version"] == after_cut["routing_version"] + 1, s
        last = s["last_cut"]
        assert last["id"] == back["id"] and last["direction"] == "back", last
        assert last["result"] == "done" and last["recovered"] is True, last
        steps = [e["step"] for e in cut_entries(s, back["id"])]
        assert steps == ["begin", "paused", "sequences", "swapped", "resumed"], steps
        # Released: the stream may start again from here (`pgshift sync start`).
        assert hold(new) is None
        assert fetch(new, "select phase from pgshift_sync_state") == "released"

        written_everywhere(proxy.dsn(), old, new, owner=-4)
        load = Load(proxy.dsn(), sessions=4).start()
        progress(load)
        load.stop()
        assert not load.errors, f"{len(load.errors)} client error(s), first: {load.errors[:5]}"
        settled(old, new)
    finally:
        if load is not None:
            load.stop()
        proxy.stop()


def api_state(url: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/api/state", timeout=10)
    answer.raise_for_status()
    data: dict[str, Any] = answer.json()
    return data


def test_two_instances_pause_and_swap_together(clusters: TwoClusters, tmp_path: Path, env: None) -> None:
    old, new = clusters.old, clusters.new
    old.psql("create database pgshift_control")
    store = old.dsn(dbname="pgshift_control") + "?sslmode=disable"
    config_path = tmp_path / "config.toml"
    write_config(config_path, clusters)
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = proxy_config(clusters, tmp_path / name, read_steps=[100])
        config["control"] = {"store": store, "instance": name}
        configs.append(config)
    proxies = [ProxyThread(config) for config in configs]
    with ThreadPoolExecutor(2) as pool:  # together: they race for the first version and state
        list(pool.map(ProxyThread.start, proxies))
    a, b = proxies
    sync = Sync(config_path, tmp_path / "sync.log")
    loads: list[Load] = []
    try:
        loads = [Load(p.dsn(), sessions=4).start() for p in proxies]
        s = to_the_cut(a.admin_url, sync)
        assert {i["instance"] for i in s["instances"]} == {"a", "b"}, s["instances"]
        assert status(b.admin_url)["phase"] == "read-shift"
        for load in loads:
            progress(load)

        cut = advance(a.admin_url)["taken"][0]
        assert cut["result"] == "done", cut
        s = status(a.admin_url)
        entries = {e["step"]: e for e in cut_entries(s, cut["id"])}
        assert list(entries) == CUT_STEPS, list(entries)
        paused = entries["paused"]
        assert paused["ok"] is True, paused
        assert [i["instance"] for i in paused["instances"]] == ["a", "b"], paused
        assert all(i["ok"] and i["drained"] and i["queued"] == 0 for i in paused["instances"]), paused
        resumed = entries["resumed"]
        assert sorted(i["instance"] for i in resumed["instances"]) == ["a", "b"], resumed
        assert not resumed["behind"], resumed  # both installed the swap before resuming

        # One routing version on both, primary new; b reports the same migration.
        states = [api_state(p.admin_url) for p in proxies]
        assert states[0]["version"] == states[1]["version"] == entries["swapped"]["version"], states
        assert all(x["routing"]["primary"] == "new" and x["routing"]["mirrors"] == ["old"] for x in states), states
        sb = status(b.admin_url)
        assert sb["phase"] == "reverse-window" and sb["primary"] == "new", sb
        assert sb["last_cut"]["id"] == cut["id"], sb["last_cut"]

        for load in loads:
            progress(load)
        for load in loads:
            load.stop()
        for name, load in zip("ab", loads, strict=True):
            assert not load.errors, f"{name}: {len(load.errors)} client error(s), first: {load.errors[:5]}"
        settled(old, new)
    finally:
        for load in loads:
            load.stop()
        sync.stop()
        for proxy in proxies:
            proxy.stop()
