"""The routing snapshot every session reads: swapped whole by the control plane, read once per request."""

from __future__ import annotations

from proxy.config import Config, RoutingConfig
from proxy.routing.table import RoutingTable


class Live:
    """The running config and routing table. Assignments replace whole immutable objects on the one
    event loop, so a session never sees half a change; it reads ``table`` at each request boundary."""

    __slots__ = ("config", "routing", "table", "version")

    def __init__(self, config: Config, routing: RoutingConfig | None = None, version: int = 0) -> None:
        self.config = config
        self.routing = routing or config.routing
        self.table = RoutingTable.build(self.routing, config.backends)
        self.version = version

    def install(self, routing: RoutingConfig, version: int, config: Config | None = None) -> None:
        if config is not None:
            self.config = config
        table = RoutingTable.build(routing, self.config.backends)  # built first: no half-installed state
        self.routing = routing
        self.version = version
        self.table = table
