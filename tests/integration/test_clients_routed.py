"""The client-compatibility scenarios of test_clients.py through a proxy that splits reads 50/50.

The same test functions run here with ``proxy`` pointing at a routed proxy in front of two
clusters ("old" = primary, "new") and ``pg_cluster`` (what the scenarios compare against
directly) being "old". The scenarios create their tables directly on "old" (``new_table``) or
through the proxy (writes and DDL go to the primary), so those tables exist on "old" only: a read
of one drawn for "new" fails there and is retried on "old". The read failover path is exercised
end to end, and the client must not notice anything of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.localpg import LocalCluster
from tests.integration.conftest import TwoClusters, routed_config
from tests.integration.test_clients import *  # noqa: F403  (the scenarios, their fixtures and pytestmark)
from tests.support.proxy import ProxyThread


@pytest.fixture(scope="module")
def pg_cluster(two_clusters: TwoClusters) -> LocalCluster:
    """What the scenarios compare with directly: the primary."""
    return two_clusters.old


@pytest.fixture(scope="module")
def proxy(two_clusters: TwoClusters) -> Iterator[ProxyThread]:
    with ProxyThread(routed_config(two_clusters.old, two_clusters.new, reads={"old": 50, "new": 50})) as running:
        yield running
    assert running.server is not None
    stats = running.server.ctx.stats
    # The module did route reads to "new". (Whether one of them hit a table that exists on "old"
    # only is chance — the draws are random — so the failover itself is asserted where it is
    # deterministic: test_routing.py's failover tests.)
    assert stats.decisions[("new", "default")] > 0, stats
