"""Proxy fixtures for integration tests (clusters come from tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.localpg import LocalCluster
from tests.support.proxy import ProxyThread, single_backend_config


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With PGSHIFT_TEST_LOOP=asyncio, only the tests that start a proxy run: the variable picks
    the loop of ProxyThread (and of `serve` in test_large) and nothing else. pytest-asyncio tests
    always run on the stock loop, and the CLI (sync, verify, d1, demo) always on uvloop, so the
    other tests would only run again unchanged."""
    if os.environ.get("PGSHIFT_TEST_LOOP", "uvloop") != "asyncio":
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        module = getattr(item, "module", None)
        starts_proxy = bool({"proxy", "routed_proxy"} & set(getattr(item, "fixturenames", ()))) or (
            module is not None and hasattr(module, "ProxyThread")
        )
        if item.get_closest_marker("proxy_subprocess") is not None:
            starts_proxy = False  # (its proxy is a subprocess on uvloop whatever the variable says)
        (keep if starts_proxy else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def proxy(pg_cluster: LocalCluster) -> Iterator[ProxyThread]:
    """One proxy in front of ``pg_cluster`` shared by the session (trust auth, no TLS)."""
    with ProxyThread(single_backend_config(pg_cluster.dsn(user="", dbname=""))) as running:
        yield running


# --- two backends: read routing ---

# The same schema and data on both clusters, so a read means the same thing wherever it runs.
ROUTING_SCHEMA = """
create table items (id int primary key, name text, price numeric);
insert into items select g, 'item ' || g, g * 1.5 from generate_series(1, 1000) g;
create table cities (id int primary key, name text);
insert into cities values (1, 'Lisbon'), (2, 'Oslo'), (3, 'Quito'), (4, 'Hanoi'), (5, 'Dakar');
"""


@dataclass(frozen=True)
class TwoClusters:
    old: LocalCluster
    new: LocalCluster


@pytest.fixture(scope="session")
def two_clusters(make_cluster: Callable[..., LocalCluster]) -> TwoClusters:
    """Two started clusters, "old" and "new", each loaded with ROUTING_SCHEMA (shared: tests that
    add objects use unique names and drop them)."""
    old = make_cluster("old")
    new = make_cluster("new")
    for cluster in (old, new):
        cluster.psql(ROUTING_SCHEMA)
    return TwoClusters(old, new)


def routed_config(old: LocalCluster | str, new: LocalCluster | str, **routing: Any) -> dict[str, Any]:
    """Backends "old" and "new" (clusters, or backend dsns) with the given [routing]; primary "old"
    unless ``primary`` is given. Clients' user and database pass through."""

    def dsn(backend: LocalCluster | str) -> str:
        return backend if isinstance(backend, str) else backend.dsn(user="", dbname="")

    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        # (mirror_user: the account that applies mirrored writes when a backend is a mirror)
        "backends": {
            "old": {"dsn": dsn(old), "mirror_user": "postgres"},
            "new": {"dsn": dsn(new), "mirror_user": "postgres"},
        },
        "routing": {"primary": "old", **routing},
    }


@pytest.fixture
def routed_proxy(two_clusters: TwoClusters) -> Iterator[Callable[..., ProxyThread]]:
    """Factory: ``routed_proxy(reads={"old": 50, "new": 50}, rules=[...])`` starts a proxy in front of
    ``two_clusters`` with that [routing]; ``backends=(old, new)`` puts other clusters (or dsns) behind
    it. Every proxy started is stopped at the end of the test."""
    started: list[ProxyThread] = []

    def start(backends: tuple[LocalCluster | str, LocalCluster | str] | None = None, **routing: Any) -> ProxyThread:
        old, new = backends if backends is not None else (two_clusters.old, two_clusters.new)
        running = ProxyThread(routed_config(old, new, **routing)).start()
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in reversed(started):
            running.stop()
