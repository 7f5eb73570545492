"""Continuous sampling inside the proxy ([verify] interval > 0) against two real clusters: clean
rounds, a difference injected on the target found (state, metrics, `pgshift status`) and gone
after a repair, the pair following a flip, and a target that is down (recorded, the proxy serves)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from proxy.cli import main
from proxy.localpg import LocalCluster, free_port
from tests.integration.conftest import TwoClusters, routed_config
from tests.support.proxy import ProxyThread

pytestmark = pytest.mark.timeout(60)

TOKEN = "sampler-test-token"
TABLE = "public.sampled"
SCHEMA = """
drop schema if exists public cascade; create schema public;
create table sampled (id int primary key, v text, n numeric);
insert into sampled select g, 'row ' || g, g * 0.5 from generate_series(1, 60) g;
create table no_key (note text);
insert into no_key values ('a'), ('b');
"""
VERIFY = {"interval": 0.3, "sample": 500, "recheck_after": 0.2, "rechecks": 2}


@pytest.fixture(scope="module")
def clusters(make_cluster: Callable[..., LocalCluster]) -> TwoClusters:
    return TwoClusters(make_cluster("sampler-old"), make_cluster("sampler-new"))


@pytest.fixture
def fresh(clusters: TwoClusters) -> TwoClusters:
    for cluster in (clusters.old, clusters.new):
        cluster.psql(SCHEMA)
    return clusters


def start(config: dict[str, Any]) -> ProxyThread:
    config["admin"] = {"port": 0, "token": TOKEN}
    return ProxyThread(config).start()


def admin(proxy: ProxyThread) -> httpx.Client:
    return httpx.Client(base_url=proxy.admin_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)


def wait_for(
    client: httpx.Client, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 8
) -> dict[str, Any]:
    """GET /api/state until ``check(state["verify"])``; that section."""
    deadline = time.monotonic() + timeout
    while True:
        verify = client.get("/api/state").json()["verify"]
        if check(verify):
            return verify
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {verify}")
        time.sleep(0.1)


def table(verify: dict[str, Any]) -> dict[str, Any]:
    return verify["tables"].get(TABLE) or {}


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start} in /metrics")


def test_sampling_finds_a_difference_and_sees_the_repair(
    fresh: TwoClusters, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # (the status command must not read the repository's config.toml)
    proxy = start({**routed_config(fresh.old, fresh.new, mirrors=["new"]), "verify": VERIFY})
    try:
        with admin(proxy) as client:
            verify = wait_for(client, lambda v: table(v).get("last_clean_at") is not None, "a clean round")
            assert verify["enabled"] and (verify["source"], verify["target"]) == ("old", "new")
            assert verify["last_round"]["result"] == "clean" and verify["rounds"]["clean"] >= 1
            assert table(verify)["rows_checked"] >= 60 and table(verify)["differences"] == 0
            assert "public.no_key" not in verify["tables"]  # no primary key: sampling skips it
            text = client.get("/metrics").text
            assert metric(text, f'pgshift_verify_rows_checked_total{{table="{TABLE}"}}') >= 60
            assert metric(text, f'pgshift_verify_differences{{table="{TABLE}"}}') == 0
            assert metric(text, f'pgshift_verify_last_clean_timestamp_seconds{{table="{TABLE}"}}') > 0
            assert metric(text, 'pgshift_verify_rounds_total{result="clean"}') >= 1

            # A difference made on the target behind the proxy's back (every row is sampled).
            fresh.new.psql("update sampled set v = 'changed' where id = 7")
            verify = wait_for(client, lambda v: table(v).get("differences") == 1, "the difference")
            found = table(verify)
            assert found["status"] == "differs" and found["differences_found_total"] >= 1
            assert found["differing_keys"][0]["key"] == {"id": "7"} and found["differing_keys"][0]["columns"] == ["v"]
            assert verify["last_round"]["result"] == "differences"
            text = client.get("/metrics").text
            assert metric(text, f'pgshift_verify_differences{{table="{TABLE}"}}') == 1
            assert metric(text, f'pgshift_verify_differences_found_total{{table="{TABLE}"}}') >= 1
            assert metric(text, 'pgshift_verify_rounds_total{result="differences"}') >= 1
            assert main(["status", "--admin", proxy.admin_url]) == 0
            status = capsys.readouterr().out
            assert "verify  old -> new, 500 rows per table every 0.3 s" in status, status
            line = next(x for x in status.splitlines() if TABLE in x and "DIFFERENCE" in x)
            assert "<-- 1 DIFFERENCE(S)" in line, status
            assert f"pgshift repair --from old --to new --table {TABLE}" in status
            dirty_since = time.time()

            # Repaired directly: clean again.
            fresh.new.psql("update sampled set v = 'row 7' where id = 7")
            verify = wait_for(
                client,
                lambda v: table(v).get("differences") == 0 and (table(v).get("last_clean_at") or 0) > dirty_since,
                "a clean round after the repair",
            )
            assert verify["last_round"]["result"] == "clean"
            assert main(["status", "--admin", proxy.admin_url]) == 0
            status = capsys.readouterr().out
            assert "DIFFERENCE(S)" not in status and "NEED REPAIR" not in status, status

            # A flip: the defaulted pair follows the writes (new is primary, old its mirror).
            assert client.post("/api/flip", json={"primary": "new"}).status_code == 200
            rounds = sum(verify["rounds"].values())
            verify = wait_for(
                client,
                lambda v: (v["source"], v["target"]) == ("new", "old") and sum(v["rounds"].values()) > rounds + 1,
                "rounds new -> old",
            )
            assert verify["last_round"]["result"] == "clean", verify
    finally:
        proxy.stop()


def test_a_target_that_is_down_is_recorded_and_the_proxy_keeps_serving(fresh: TwoClusters) -> None:
    config = routed_config(fresh.old, fresh.new)
    config["backends"]["down"] = {
        "dsn": f"postgresql://127.0.0.1:{free_port()}/postgres?connect_timeout=2",
        "mirror_user": "postgres",
    }
    config["verify"] = {**VERIFY, "target": "down", "tables": ["sampled"]}
    proxy = start(config)
    try:
        with admin(proxy) as client:
            verify = wait_for(client, lambda v: v["rounds"]["error"] >= 2, "two failed rounds")
            assert (verify["source"], verify["target"]) == ("old", "down")
            assert verify["last_round"]["result"] == "error"
            assert "cannot connect" in verify["last_round"]["error"], verify
            assert verify["rounds"]["clean"] == 0 and verify["tables"] == {}
            assert 'pgshift_verify_rounds_total{result="error"}' in client.get("/metrics").text
            with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
                assert conn.execute("select count(*) from sampled").fetchone() == (60,)
    finally:
        proxy.stop()


def test_a_target_lost_between_rounds_is_reconnected(fresh: TwoClusters) -> None:
    proxy = start({**routed_config(fresh.old, fresh.new), "verify": {**VERIFY, "target": "new"}})
    try:
        with admin(proxy) as client:
            wait_for(client, lambda v: v["rounds"]["clean"] >= 1, "a clean round")
            fresh.new.stop()  # the sampler's open connections to it are lost
            try:
                verify = wait_for(client, lambda v: v["last_round"]["result"] == "error", "a failed round")
                assert verify["last_error"]
                with psycopg.connect(proxy.dsn(), autocommit=True) as conn:  # sessions do not notice
                    assert conn.execute("select 1").fetchone() == (1,)
            finally:
                fresh.new.start()
            clean = verify["rounds"]["clean"]
            verify = wait_for(client, lambda v: v["rounds"]["clean"] > clean, "a clean round after the restart")
            assert verify["last_error"] and verify["last_round"]["error"] is None
    finally:
        proxy.stop()
