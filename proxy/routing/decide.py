"""decide(): the backend for one request, from the analysis and the session's explicit state."""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.routing.table import RoutingTable
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


def _routable(analysis: Analysis, functions_safe: bool) -> bool:
    if analysis.is_read:
        return True
    # A read whose only doubt is functions the catalog vouched for (stable/immutable).
    return functions_safe and bool(analysis.unknown_functions) and _read_but_for_functions(analysis)


def _read_but_for_functions(a: Analysis) -> bool:
    return a.kind is Kind.READ and not (
        a.locking or a.volatile or a.writable_cte or a.select_into or a.pins or a.backend_local
    )


def decide(ctx: RouteContext, table: RoutingTable, rng: random.Random) -> Decision:
    """Route one request. Any doubt → the primary (an application must see one database)."""
    if ctx.in_transaction is not None:
        return Decision(ctx.in_transaction, Reason.IN_TRANSACTION)
    if ctx.pinned:
        return Decision(table.primary, Reason.PINNED)
    a = ctx.analysis
    # Transactions, BEGIN READ ONLY included, stay on the primary: a session setting made inside a
    # transaction elsewhere could not be replayed faithfully (it may yet be rolled back).
    if not _routable(a, ctx.functions_safe):
        return Decision(table.primary, Reason.NOT_A_READ)
    if a.hint is not None and a.hint in table.backends:
        return Decision(a.hint, Reason.HINT)
    tables = table.bare_tables(a.tables_read)
    for rule in table.rules:
        if rule.matches(tables, ctx.user, ctx.application_name):
            if rule.sticky and ctx.sticky is not None and rule.name in ctx.sticky:
                return Decision(ctx.sticky[rule.name], Reason.STICKY, rule.name)
            return Decision(rule.reads.pick(rng), Reason.RULE, rule.name, rule.sticky)
    if table.default_sticky and ctx.sticky is not None and "" in ctx.sticky:
        return Decision(ctx.sticky[""], Reason.STICKY, "")
    return Decision(table.default.pick(rng), Reason.DEFAULT, "", table.default_sticky)
