"""Shared fixtures: throw-away Postgres clusters (and, below, the proxy)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

from proxy.localpg import LocalCluster, create_cluster

# --- clusters ---


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    # `timeout`, CI cancellation and `kill` send SIGTERM, whose default action skips fixture
    # teardown and atexit hooks and so leaks postmasters; unwind like Ctrl-C instead.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster]:
    """One started cluster ("old") shared by the whole session; treat it as shared state."""
    cluster = create_cluster("old")
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def make_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """Factory: ``make_cluster("name", **create_cluster_kwargs)``; all are destroyed at session end."""
    created: list[LocalCluster] = []

    def make(name: str, **kwargs: Any) -> LocalCluster:
        cluster = create_cluster(name, **kwargs)
        created.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in reversed(created):
            cluster.destroy()
