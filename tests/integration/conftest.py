"""Proxy fixtures for integration tests (clusters come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.localpg import LocalCluster
from tests.support.proxy import ProxyThread, single_backend_config


@pytest.fixture(scope="session")
def proxy(pg_cluster: LocalCluster) -> Iterator[ProxyThread]:
    """One proxy in front of ``pg_cluster`` shared by the session (trust auth, no TLS)."""
    with ProxyThread(single_backend_config(pg_cluster.dsn(user="", dbname=""))) as running:
        yield running
