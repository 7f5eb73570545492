"""The client-compatibility scenarios of test_clients.py through a proxy whose routing is fixed at
startup (``[control] live = false``): every session is a plain relay to the primary, the data
path without statement analysis. (test_clients.py itself runs the default, live routing, where
every session is a routed one; test_clients_routed.py splits reads 50/50.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.localpg import LocalCluster
from proxy.session.session import Session
from tests.integration.test_clients import *  # noqa: F403  (the scenarios, their fixtures and pytestmark)
from tests.support.proxy import ProxyThread, single_backend_config


@pytest.fixture(scope="module")
def proxy(pg_cluster: LocalCluster) -> Iterator[ProxyThread]:
    config = single_backend_config(pg_cluster.dsn(user="", dbname=""), control={"live": False})
    with ProxyThread(config) as running:
        assert running.server is not None and running.server._session_class is Session  # the plain relay
        yield running
