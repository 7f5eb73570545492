"""Pure routing decisions: which backend serves a request (no IO, no pglast, injected randomness)."""

from proxy.routing.decide import Decision, Plan, Reason, RouteContext, decide, needs_catalog, plan
from proxy.routing.live import Live
from proxy.routing.stats import RoutingStats
from proxy.routing.table import RoutingTable, Rule

__all__ = [
    "Decision",
    "Live",
    "Plan",
    "Reason",
    "RouteContext",
    "RoutingStats",
    "RoutingTable",
    "Rule",
    "decide",
    "needs_catalog",
    "plan",
]
