"""decide(): the backend for one request, from the analysis and the session's explicit state."""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.routing.table import RoutingTable, WeightedChoice
from proxy.sql import Analysis, Kind


class Reason(enum.Enum):
    """Why a request went where it went (a metric label; see README "Routing")."""

    IN_TRANSACTION = "in_transaction"  # follows the transaction's backend
    PINNED = "pinned"  # session state that lives on the primary only
    NOT_A_READ = "not_a_read"  # write, DDL, volatile/unknown function, locking read, … or doubt
    HINT = "hint"  # /* pgshift:route=NAME */
    RULE = "rule"
    STICKY = "sticky"  # the session's earlier draw for a sticky rule
    DEFAULT = "default"  # [routing] reads
    PRIMARY_ONLY = "primary_only"  # every weight names only the primary: no plan needed


@dataclass(frozen=True, slots=True)
class RouteContext:
    analysis: Analysis
    user: str
    application_name: str
    in_transaction: str | None = None  # the backend the open transaction runs on
    pinned: bool = False
    functions_safe: bool = False  # every unknown function was found non-volatile in pg_proc
    sticky: Mapping[str, str] | None = None  # rule name (or "" for the default) → backend drawn


@dataclass(frozen=True, slots=True)
class Decision:
    target: str
    reason: Reason
    rule: str | None = None  # the rule that chose the weights (or "" for the default)
    sticky: bool = False  # a fresh draw the session must keep for this rule
    stat_key: tuple[str, str] = ("", "")  # (target, reason) for the decision counters

    def __post_init__(self) -> None:
        object.__setattr__(self, "stat_key", (self.target, self.reason.value))


def _routable(analysis: Analysis, functions_safe: bool) -> bool:
    if analysis.is_read:
        return True
    # A read whose only doubt is functions the catalog vouched for (stable/immutable).
    return functions_safe and bool(analysis.unknown_functions) and _read_but_for_functions(analysis)


def needs_catalog(a: Analysis) -> bool:
    """A read but for functions only the catalog can judge (``functions_safe`` would route it)."""
    return not a.is_read and bool(a.unknown_functions) and _read_but_for_functions(a)


def _read_but_for_functions(a: Analysis) -> bool:
    return a.kind is Kind.READ and not (
        a.locking or a.volatile or a.writable_cte or a.select_into or a.pins or a.backend_local
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """The deterministic part of a decision for one statement (memoisable per analysis, user and
    application); ``draw`` adds the weighted random choice and the session's sticky draws."""

    fixed: Decision | None  # not a read, or a hint: no draw
    choice: WeightedChoice | None = None
    rule: str = ""
    reason: Reason = Reason.DEFAULT
    sticky: bool = False
    outcomes: dict[str, Decision] = field(default_factory=dict)  # one Decision per backend, built once

    def __post_init__(self) -> None:
        if self.choice is not None:
            for name in self.choice.names:
                self.outcomes[name] = Decision(name, self.reason, self.rule, self.sticky)

    def draw(self, rng: random.Random, sticky: Mapping[str, str] | None = None) -> Decision:
        if self.fixed is not None:
            return self.fixed
        if self.sticky and sticky is not None:
            kept = sticky.get(self.rule)
            # Kept only while the routing still gives that backend reads here: after a weight
            # change to 0 (a rollback, say) the session draws again instead of staying behind.
            if kept is not None and kept in self.outcomes:
                return Decision(kept, Reason.STICKY, self.rule)
        assert self.choice is not None
        return self.outcomes[self.choice.pick(rng)]


def plan(
    analysis: Analysis, user: str, application_name: str, table: RoutingTable, functions_safe: bool = False
) -> Plan:
    """Everything about routing ``analysis`` that does not depend on chance or session state."""
    # Transactions, BEGIN READ ONLY included, stay on the primary: a session setting made inside a
    # transaction elsewhere could not be replayed faithfully (it may yet be rolled back).
    if not _routable(analysis, functions_safe):
        return Plan(Decision(table.primary, Reason.NOT_A_READ))
    if analysis.hint is not None and analysis.hint in table.backends:
        return Plan(Decision(analysis.hint, Reason.HINT))
    tables = table.bare_tables(analysis.tables_read)
    for rule in table.rules:
        if rule.matches(tables, user, application_name):
            return Plan(None, rule.reads, rule.name, Reason.RULE, rule.sticky)
    return Plan(None, table.default, "", Reason.DEFAULT, table.default_sticky)


def decide(ctx: RouteContext, table: RoutingTable, rng: random.Random) -> Decision:
    """Route one request. Any doubt → the primary (an application must see one database)."""
    if ctx.in_transaction is not None:
        return Decision(ctx.in_transaction, Reason.IN_TRANSACTION)
    if ctx.pinned:
        return Decision(table.primary, Reason.PINNED)
    return plan(ctx.analysis, ctx.user, ctx.application_name, table, ctx.functions_safe).draw(rng, ctx.sticky)
