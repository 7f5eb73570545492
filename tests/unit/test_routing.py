"""Pure routing decisions: precedence, weights, stickiness, and "any doubt → primary"."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.routing import Reason, RouteContext, RoutingTable, decide
from proxy.sql import analyze


def table(**routing: Any) -> RoutingTable:
    config = parse_config(
        {
            "backends": {"old": {"dsn": "postgresql://h:1"}, "new": {"dsn": "postgresql://h:2"}},
            "routing": {"primary": "old", **routing},
        }
    )
    return RoutingTable.build(config.routing, config.backends)


def route(sql: str, t: RoutingTable, seed: int = 1, **ctx: Any) -> Any:
    context = RouteContext(analysis=analyze(sql), user=ctx.pop("user", "app"),
                           application_name=ctx.pop("application_name", ""), **ctx)  # fmt: skip
    return decide(context, t, random.Random(seed))


def test_without_weights_everything_goes_to_the_primary() -> None:
    t = table()
    assert not t.splits_reads
    assert route("select 1", t).target == "old"


@pytest.mark.parametrize(
    "sql",
    [
        "insert into t values (1)",
        "update t set a = 1",
        "create table x (a int)",
        "select nextval('s')",
        "select * from t for update",
        "with d as (delete from t returning *) select * from d",
        "select * into t2 from t",
        "select my_func(1)",
        "listen ch",
        "this is not sql",
        "select pg_backend_pid()",
        "begin",
    ],
)
def test_anything_but_a_plain_read_goes_to_the_primary(sql: str) -> None:
    decision = route(sql, table(reads={"old": 0, "new": 100}))
    assert (decision.target, decision.reason) == ("old", Reason.NOT_A_READ)


def test_weights_are_exact_at_the_extremes_and_proportional_between() -> None:
    assert route("select 1", table(reads={"old": 0, "new": 100})).target == "new"
    assert route("select 1", table(reads={"old": 100, "new": 0})).target == "old"
    t, rng = table(reads={"old": 90, "new": 10}), random.Random(7)
    ctx = RouteContext(analysis=analyze("select * from t"), user="u", application_name="")
    counts = Counter(decide(ctx, t, rng).target for _ in range(20_000))
    assert 0.08 < counts["new"] / 20_000 < 0.12


def test_transaction_and_pin_override_everything() -> None:
    t = table(reads={"old": 0, "new": 100})
    assert route("select 1", t, in_transaction="new").reason is Reason.IN_TRANSACTION
    assert route("select 1", t, in_transaction="new").target == "new"
    pinned = route("select 1", t, pinned=True)
    assert (pinned.target, pinned.reason) == ("old", Reason.PINNED)


def test_precedence_hint_then_most_specific_rule_then_default() -> None:
    t = table(
        reads={"old": 100, "new": 0},
        rules=[
            {"name": "ref", "tables": ["cities", "categories"], "reads": {"new": 1}},
            {"name": "ref-batch", "tables": ["cities"], "application_names": ["batch"], "reads": {"old": 1}},
            {"name": "reporting", "users": ["report"], "reads": {"new": 1}},
        ],
    )
    assert route("select * from cities", t).rule == "ref"
    assert route("select * from public.cities c join categories k on true", t).target == "new"
    # a read touching a table outside the rule's list does not match it
    assert route("select * from cities join listings on true", t).reason is Reason.DEFAULT
    # two criteria beat one
    assert route("select * from cities", t, application_name="batch").rule == "ref-batch"
    assert route("select * from listings", t, user="report").target == "new"
    hinted = route("/* pgshift:route=new */ select * from listings", t)
    assert (hinted.target, hinted.reason) == ("new", Reason.HINT)
    # a hint never moves a write, and an unknown backend name in a hint is ignored
    assert route("/* pgshift:route=new */ delete from listings", t).target == "old"
    assert route("/* pgshift:route=nope */ select 1", t).reason is Reason.DEFAULT


def test_transactions_start_on_the_primary_even_read_only() -> None:
    assert route("BEGIN READ ONLY", table(reads={"old": 0, "new": 100})).target == "old"
    assert route("BEGIN", table(reads={"old": 0, "new": 100})).target == "old"


def test_sticky_rule_reuses_the_sessions_draw() -> None:
    t = table(rules=[{"name": "s", "users": ["u"], "reads": {"old": 50, "new": 50}, "sticky": "session"}])
    assert route("select 1", t, user="u", sticky={"s": "new"}).reason is Reason.STICKY
    assert route("select 1", t, user="u", sticky={"s": "new"}).target == "new"


def test_sticky_draw_is_dropped_when_its_backend_loses_its_weight() -> None:
    """A rollback to weights old=100 new=0 must reach sticky sessions too."""
    rolled_back = table(rules=[{"name": "s", "users": ["u"], "reads": {"old": 100, "new": 0}, "sticky": "session"}])
    decision = route("select 1", rolled_back, user="u", sticky={"s": "new"})
    assert (decision.target, decision.reason, decision.sticky) == ("old", Reason.RULE, True)  # a fresh draw, kept


def test_catalog_vouched_functions_make_a_read_routable() -> None:
    t = table(reads={"old": 0, "new": 100})
    assert route("select my_stable(1)", t).target == "old"
    assert route("select my_stable(1)", t, functions_safe=True).target == "new"
    assert route("select nextval('s')", t, functions_safe=True).target == "old"


@pytest.mark.parametrize(
    ("routing", "needle"),
    [
        ({"reads": {"old": -1}}, "greater than or equal to 0"),
        ({"reads": {"old": 0, "new": 0}}, "at least one weight above 0"),
        ({"reads": {"gone": 1}}, "routing.reads names unknown backend(s) gone"),
        ({"rules": [{"reads": {"new": 1}}]}, "needs at least one of tables"),
        ({"rules": [{"tables": ["t"], "reads": {"x": 1}}]}, "routing.rules[0].reads names unknown backend(s) x"),
        ({"rules": [{"name": "a", "tables": ["t"], "reads": {"new": 1}}] * 2}, "rule names must be unique: a"),
    ],
)
def test_bad_routing_config_is_named(routing: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        table(**routing)
    assert needle in info.value.message
