"""Several proxy instances sharing routing through a control store in Postgres (LISTEN/NOTIFY)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest

from proxy.localpg import LocalCluster
from tests.integration.conftest import TwoClusters
from tests.integration.test_control import TOKEN, api, control_config, port_of
from tests.support.proxy import ProxyThread

WRITE = "select current_setting('port') from pg_class for update limit 1"


@pytest.fixture(autouse=True)
def _admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSHIFT_TEST_ADMIN_TOKEN", TOKEN)


@pytest.fixture(scope="module")
def store_cluster(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return make_cluster("ctlstore")


@pytest.fixture
def store_dsn(store_cluster: LocalCluster) -> str:
    """A fresh, empty database for this test's control tables."""
    name = f"ctl_{uuid.uuid4().hex[:8]}"
    store_cluster.psql(f"create database {name}")
    return store_cluster.dsn(dbname=name) + "?sslmode=disable"


@pytest.fixture
def instances(two_clusters: TwoClusters) -> Iterator[Callable[..., list[ProxyThread]]]:
    started: list[ProxyThread] = []

    def start(store: str, count: int = 3, **control: Any) -> list[ProxyThread]:
        proxies = [
            ProxyThread(control_config(two_clusters, control={"store": store, "instance": f"p{i + 1}", **control}))
            for i in range(count)
        ]
        # Started together: they race to create the tables and the first version.
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(ProxyThread.start, proxies))
        started.extend(proxies)
        return proxies

    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()


def wait_for(check: Callable[[], bool], within: float) -> float:
    """Seconds until ``check()`` holds; fails the test if it does not within ``within`` s."""
    begin = time.monotonic()
    while not check():
        if time.monotonic() - begin > within:
            pytest.fail(f"condition not met within {within} s")
        time.sleep(0.005)
    return time.monotonic() - begin


def version_of(proxy: ProxyThread) -> int:
    with httpx.Client(base_url=proxy.admin_url, timeout=5) as client:
        return int(client.get("/api/state").json()["version"])


def test_three_instances_see_one_change_within_a_second(
    instances: Callable[..., list[ProxyThread]], store_dsn: str, two_clusters: TwoClusters
) -> None:
    proxies = instances(store_dsn)
    assert {version_of(p) for p in proxies} == {1}  # one first version, not three
    with api(proxies[0]) as client:
        assert client.patch("/api/routing", json={"reads": {"old": 0, "new": 100}}).json()["version"] == 2
    for proxy in proxies:
        wait_for(lambda p=proxy: version_of(p) == 2, within=1.0)  # type: ignore[misc]
        assert port_of(proxy) == two_clusters.new.port
        assert port_of(proxy, WRITE) == two_clusters.old.port

    with api(proxies[1]) as client:  # any instance takes changes
        assert client.post("/api/flip", json={"primary": "new"}).json()["version"] == 3
    for proxy in proxies:
        wait_for(lambda p=proxy: version_of(p) == 3, within=1.0)  # type: ignore[misc]
        assert port_of(proxy, WRITE) == two_clusters.new.port

    def all_report_three() -> bool:
        with api(proxies[2]) as client:
            listed = client.get("/api/state").json()["instances"]
        return sorted((i["instance"], i["version"]) for i in listed) == [("p1", 3), ("p2", 3), ("p3", 3)]

    wait_for(all_report_three, within=3.0)  # reported at each heartbeat (1 s)
    with api(proxies[0]) as client:
        history = client.get("/api/history").json()["versions"]
        assert [(v["version"], v["source"]) for v in history] == [(3, "flip"), (2, "patch"), (1, "config")]
        # Each instance refreshes its list of instances at its own heartbeat.
        wait_for(lambda: 'pgshift_control_instances{version="3"} 3.0' in client.get("/metrics").text, within=3.0)

    proxies[2].stop()  # a clean stop leaves the list of instances

    def two_left() -> bool:
        with api(proxies[0]) as client:
            return [i["instance"] for i in client.get("/api/state").json()["instances"]] == ["p1", "p2"]

    wait_for(two_left, within=3.0)


def test_stale_instance_gets_a_conflict_not_a_lost_update(
    instances: Callable[..., list[ProxyThread]], store_dsn: str
) -> None:
    first, second = instances(store_dsn, count=2)
    with api(first) as a, api(second) as b:
        assert a.patch("/api/routing", json={"reads": {"old": 1, "new": 1}}).json()["version"] == 2
        wait_for(lambda: version_of(second) == 2, within=1.0)
        # A client that read version 1 and writes now must not silently undo version 2.
        reply = b.put("/api/routing?expect_version=1", json={"primary": "old"})
        assert reply.status_code == 409 and "not 1 as expected" in reply.json()["error"]["message"]


def test_restart_keeps_the_shared_version(instances: Callable[..., list[ProxyThread]], store_dsn: str) -> None:
    (proxy,) = instances(store_dsn, count=1)
    with api(proxy) as client:
        client.post("/api/flip", json={"primary": "new"})
    proxy.stop()
    (again,) = instances(store_dsn, count=1)
    with api(again) as client:
        state = client.get("/api/state").json()
    assert state["version"] == 2 and state["routing"]["primary"] == "new"
    assert state["store"]["kind"] == "postgres" and "ctl_" in state["store"]["location"]


def test_losing_the_store_keeps_serving_and_says_so(
    instances: Callable[..., list[ProxyThread]],
    make_cluster: Callable[..., LocalCluster],
    two_clusters: TwoClusters,
) -> None:
    store = make_cluster("ctllost")
    (proxy,) = instances(store.dsn() + "?sslmode=disable", count=1, heartbeat=0.2)
    with api(proxy) as client:
        client.patch("/api/routing", json={"reads": {"old": 0, "new": 1}})
        store.stop()
        try:
            wait_for(lambda: not client.get("/api/state").json()["store"]["ok"], within=5.0)
            state = client.get("/api/state").json()
            assert state["version"] == 2 and state["store"]["down_since"] is not None
            assert "unreachable" in state["store"]["error"] or "failed" in state["store"]["error"]
            assert "pgshift_control_store_up 0.0" in client.get("/metrics").text
            assert port_of(proxy) == two_clusters.new.port  # still serving version 2
            with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
            refused = client.post("/api/flip", json={"primary": "new"})
            assert refused.status_code == 503, refused.text
            assert (
                "the change was not made" in refused.json()["error"]["message"]
                or "unreachable" in (refused.json()["error"]["message"])
            )
            assert client.get("/api/state").json()["routing"]["primary"] == "old"
        finally:
            store.start()
        wait_for(lambda: client.get("/api/state").json()["store"]["ok"], within=10.0)
        assert client.post("/api/flip", json={"primary": "new"}).json()["version"] == 3
        assert "pgshift_control_store_up 1.0" in client.get("/metrics").text


def test_an_unreadable_version_in_the_store_is_reported_not_installed(
    instances: Callable[..., list[ProxyThread]], store_dsn: str, store_cluster: LocalCluster, two_clusters: TwoClusters
) -> None:
    (proxy,) = instances(store_dsn, count=1, heartbeat=0.2)
    dbname = store_dsn.rsplit("/", 1)[1].split("?")[0]
    store_cluster.psql(
        "insert into pgshift_routing_versions values (2, '{\"primary\": 5}', 'put', 'by hand', '', 1, 0);"
        " notify pgshift_routing, '2'",
        dbname=dbname,
    )
    with api(proxy) as client:
        wait_for(lambda: not client.get("/api/state").json()["store"]["ok"], within=3.0)
        state = client.get("/api/state").json()
        assert "stored routing version is unreadable" in state["store"]["error"]
        assert state["version"] == 1  # still serving what it had
    assert port_of(proxy) == two_clusters.old.port


def test_a_version_naming_a_backend_this_instance_lacks_is_reported_not_installed(
    store_dsn: str, two_clusters: TwoClusters
) -> None:
    """Instances with different backends: the one lacking a backend keeps its version, says why
    in status, and a later change it can run is installed again."""
    wide = control_config(two_clusters, control={"store": store_dsn, "instance": "wide"})
    wide["backends"]["third"] = {"dsn": two_clusters.new.dsn(user="", dbname="")}
    narrow = control_config(two_clusters, control={"store": store_dsn, "instance": "narrow"})
    with ProxyThread(wide) as first, ProxyThread(narrow) as second, api(first) as a, api(second) as b:
        assert a.patch("/api/routing", json={"reads": {"old": 1, "third": 1}}).json()["version"] == 2

        def reports_problem() -> bool:
            return bool(b.get("/api/state").json()["problem"])

        wait_for(reports_problem, within=3.0)
        state = b.get("/api/state").json()
        assert state["version"] == 1 and "names backends this instance lacks" in state["problem"]
        assert "third" in state["problem"]
        assert a.patch("/api/routing", json={"reads": {"old": 1, "new": 1}}).json()["version"] == 3
        wait_for(lambda: version_of(second) == 3, within=1.0)
        assert b.get("/api/state").json()["problem"] is None
