"""The migration's phases read off a routing, the steps between them, and every guard's verdict
(pure functions: no databases)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from proxy.config import MigrateConfig, RoutingConfig
from proxy.migrate import guards as g
from proxy.migrate.phases import Phase, Step, locate, next_step, parse_target, previous_step, rank, reads_for

STEPS = [1, 10, 50, 100]


def routing(primary: str = "old", mirrors: tuple[str, ...] = (), reads: dict[str, int] | None = None) -> RoutingConfig:
    return RoutingConfig(primary=primary, mirrors=list(mirrors), reads=reads)


def where(r: RoutingConfig, **flags: bool) -> Any:
    options = {"syncing": False, "cutting": False, "decommissioned": False, **flags}
    return locate(r, "old", "new", **options)


@pytest.mark.parametrize(
    ("r", "flags", "phase", "percent"),
    [
        (routing(), {}, Phase.SHADOW, 0),
        (routing(), {"syncing": True}, Phase.SYNC, 0),
        (routing(mirrors=("new",)), {"syncing": True}, Phase.DUAL_WRITE, 0),
        (routing(mirrors=("new",), reads={"old": 90, "new": 10}), {}, Phase.READ_SHIFT, 10),
        (routing(mirrors=("new",), reads={"old": 0, "new": 100}), {}, Phase.READ_SHIFT, 100),
        (routing(mirrors=("new",), reads={"old": 0, "new": 100}), {"cutting": True}, Phase.CUT, 100),
        (routing("new", ("old",), {"old": 0, "new": 100}), {}, Phase.REVERSE_WINDOW, 100),
        (routing("new", (), {"new": 100}), {"decommissioned": True}, Phase.DECOMMISSIONED, 100),
    ],
)
def test_the_phase_is_read_off_the_routing(
    r: RoutingConfig, flags: dict[str, bool], phase: Phase, percent: int
) -> None:
    found = where(r, **flags)
    assert (found.phase, found.percent) == (phase, percent)
    assert found.problem is None


def test_half_states_are_named() -> None:
    assert where(routing("new")).problem == "old is not a mirror: a rollback would lose writes"
    assert where(routing("other")).phase is Phase.UNKNOWN
    unknown = where(routing(reads={"old": 50, "new": 50}))
    assert unknown.phase is Phase.UNKNOWN and "receives no writes" in (unknown.problem or "")


def test_forward_and_back_one_step_at_a_time() -> None:
    dual = where(routing(mirrors=("new",)))
    assert next_step(dual, STEPS) == Step(Phase.READ_SHIFT, 1)
    ten = where(routing(mirrors=("new",), reads=reads_for("old", "new", 10)))
    assert next_step(ten, STEPS) == Step(Phase.READ_SHIFT, 50)
    assert previous_step(ten, STEPS) == Step(Phase.READ_SHIFT, 1)
    full = where(routing(mirrors=("new",), reads=reads_for("old", "new", 100)))
    assert next_step(full, STEPS) == Step(Phase.CUT)
    one = where(routing(mirrors=("new",), reads=reads_for("old", "new", 1)))
    assert previous_step(one, STEPS) == Step(Phase.DUAL_WRITE)
    after = where(routing("new", ("old",), reads_for("old", "new", 100)))
    assert next_step(after, STEPS) == Step(Phase.DECOMMISSIONED)
    assert previous_step(after, STEPS) == Step(Phase.READ_SHIFT, 100)  # the cut in reverse
    assert previous_step(where(routing(), syncing=True), STEPS) == Step(Phase.SHADOW)
    assert next_step(where(routing("new", (), {"new": 100}), decommissioned=True), STEPS) is None
    # A share between the configured steps moves to the next one up.
    odd = where(routing(mirrors=("new",), reads=reads_for("old", "new", 30)))
    assert next_step(odd, STEPS) == Step(Phase.READ_SHIFT, 50)


@pytest.mark.parametrize(
    ("text", "step"),
    [
        ("cut", Step(Phase.CUT)),
        ("read-shift:50", Step(Phase.READ_SHIFT, 50)),
        ("50%", Step(Phase.READ_SHIFT, 50)),
        ("10", Step(Phase.READ_SHIFT, 10)),
        ("0%", Step(Phase.DUAL_WRITE)),
        ("Dual-Write", Step(Phase.DUAL_WRITE)),
    ],
)
def test_parse_target(text: str, step: Step) -> None:
    assert parse_target(text) == step


@pytest.mark.parametrize(
    ("text", "message"), [("read-shift", "say which share"), ("150%", "0 to 100"), ("sideways", "unknown phase")]
)
def test_parse_target_refuses_with_the_fix(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_target(text)


def test_rank_orders_phases_and_read_shares() -> None:
    assert rank(Step(Phase.READ_SHIFT, 10)) < rank(Step(Phase.READ_SHIFT, 50)) < rank(Step(Phase.CUT))
    assert rank(Step(Phase.DUAL_WRITE)) < rank(Step(Phase.READ_SHIFT, 1))


def test_read_steps_must_rise_to_100() -> None:
    with pytest.raises(ValueError, match="must rise"):
        MigrateConfig(read_steps=[10, 5, 100])
    with pytest.raises(ValueError, match="end at 100"):
        MigrateConfig(read_steps=[1, 10])


# --- guards ---------------------------------------------------------------------------------------

SETTINGS = MigrateConfig(max_sync_lag=5, verify_max_age=600, dwell=30)


def streaming(lag: float = 0.5, **state: Any) -> dict[str, Any]:
    row = {"phase": "streaming", "process": "host:1", "age": 1.0, "lag_seconds": lag, "hold": None, **state}
    return {"state": row, "slot": {"active": True}}


def facts(**values: Any) -> g.Facts:
    base: dict[str, Any] = {
        "now": 10_000.0,
        "stream": streaming(),
        "version": 7,
        "verify": {
            "tables": {
                "public.t": {
                    "status": "clean",
                    "differences": 0,
                    "unsettled": 0,
                    "last_clean_at": 9_990.0,
                    "checked_at": 9_990.0,
                }
            }
        },
        "mirrors": [
            {"name": "new", "state": "running", "queued": 0, "lag_seconds": 0.0, "diverged": 0, "out_of_sync_tables": 0}
        ],
        "writable": {"in_recovery": False, "read_only": False, "tables": 3, "not_writable": []},
    }
    return g.Facts(**{**base, **values})


def verdicts(step: Step, found: g.Facts, percent: int = 100) -> dict[str, bool]:
    at = where(routing(mirrors=("new",), reads=reads_for("old", "new", percent)))
    return {x.name: x.ok for x in g.evaluate(step, at, found, SETTINGS, "old", "new")}


def test_every_guard_of_the_cut_holds_on_a_healthy_migration() -> None:
    found = verdicts(Step(Phase.CUT), facts())
    assert found == {
        "sync": True,
        "verify": True,
        "mirror new": True,
        "reverse path": True,
        "instances": True,
        "dwell": True,
        "errors on new": True,
    }


@pytest.mark.parametrize(
    ("change", "blocked"),
    [
        ({"stream": streaming(lag=9.0)}, "sync"),
        ({"stream": streaming(phase="backfill")}, "sync"),
        ({"stream": streaming(hold="cut x made new the primary")}, "sync"),
        ({"stream": {"state": None, "slot": None}}, "sync"),
        ({"stream": None, "stream_error": "connection refused"}, "sync"),
        ({"verify": None}, "verify"),
        (
            {
                "verify": {
                    "tables": {
                        "t": {
                            "status": "differs",
                            "differences": 2,
                            "unsettled": 0,
                            "last_clean_at": 1.0,
                            "checked_at": 9_999.0,
                        }
                    }
                }
            },
            "verify",
        ),
        (
            {
                "verify": {
                    "tables": {
                        "t": {
                            "status": "clean",
                            "differences": 0,
                            "unsettled": 0,
                            "last_clean_at": 1.0,
                            "checked_at": 1.0,
                        }
                    }
                }
            },
            "verify",
        ),
        (
            {
                "mirrors": [
                    {
                        "name": "new",
                        "state": "detached",
                        "queued": 0,
                        "lag_seconds": 0.0,
                        "diverged": 0,
                        "out_of_sync_tables": 0,
                    }
                ]
            },
            "mirror new",
        ),
        ({"writable": {"in_recovery": True, "read_only": False, "tables": 3, "not_writable": []}}, "reverse path"),
        (
            {"writable": {"in_recovery": False, "read_only": False, "tables": 3, "not_writable": ["public.t"]}},
            "reverse path",
        ),
        ({"writable": None, "writable_error": "refused"}, "reverse path"),
        ({"instances": [{"instance": "a", "version": 7}, {"instance": "b", "version": 6}]}, "instances"),
        ({"last_change_at": 9_990.0}, "dwell"),
        ({"target_errors": 3}, "errors on new"),
    ],
)
def test_a_guard_that_does_not_hold_blocks_the_cut(change: dict[str, Any], blocked: str) -> None:
    found = verdicts(Step(Phase.CUT), facts(**change))
    assert [name for name, ok in found.items() if not ok] == [blocked]


def test_hot_rows_do_not_block_but_differences_do() -> None:
    hot = {
        "tables": {
            "t": {"status": "unsettled", "differences": 0, "unsettled": 4, "last_clean_at": None, "checked_at": 9_995.0}
        }
    }
    assert verdicts(Step(Phase.CUT), facts(verify=hot))["verify"]


def test_out_of_sync_tables_are_carried_by_a_running_stream() -> None:
    behind = [
        {"name": "new", "state": "running", "queued": 0, "lag_seconds": 0.0, "diverged": 0, "out_of_sync_tables": 2}
    ]
    assert verdicts(Step(Phase.CUT), facts(mirrors=behind))["mirror new"]
    stopped = facts(mirrors=behind, stream={"state": None, "slot": None})
    assert not verdicts(Step(Phase.CUT), stopped)["mirror new"]


def test_without_a_stream_when_it_is_not_required() -> None:
    settings = MigrateConfig(require_sync=False, verify_max_age=0)
    at = where(routing(mirrors=("new",), reads=reads_for("old", "new", 100)))
    checked = g.evaluate(Step(Phase.CUT), at, facts(stream={"state": None, "slot": None}), settings, "old", "new")
    assert all(x.ok for x in checked), [x for x in checked if not x.ok]


def test_decommission_waits_for_the_quiet_period() -> None:
    after = where(routing("new", ("old",), reads_for("old", "new", 100)))
    mirrors = [
        {"name": "old", "state": "running", "queued": 0, "lag_seconds": 0.0, "diverged": 0, "out_of_sync_tables": 0}
    ]
    settings = MigrateConfig(quiet_period=3600)
    early = g.evaluate(
        Step(Phase.DECOMMISSIONED), after, facts(cut_at=9_000.0, mirrors=mirrors), settings, "old", "new"
    )
    assert {x.name: x.ok for x in early}["quiet period"] is False
    late = g.evaluate(Step(Phase.DECOMMISSIONED), after, facts(cut_at=1_000.0, mirrors=mirrors), settings, "old", "new")
    assert all(x.ok for x in late)


def test_rollback_after_the_cut_needs_the_reverse_mirror_and_a_writable_target() -> None:
    after = where(routing("new", ("old",), reads_for("old", "new", 100)))
    broken = [{"name": "old", "state": "down", "queued": 5, "lag_seconds": 3.0, "diverged": 0, "out_of_sync_tables": 0}]
    checked = {x.name: x.ok for x in g.rollback_guards(after, facts(mirrors=broken), "old", "new")}
    assert checked == {"mirror old": False, "reverse path": True, "instances": True}


def test_migrate_names_declared_backends() -> None:
    from proxy.config import parse_config
    from proxy.errors import ConfigError

    document = {
        "backends": {"old": {"dsn": "postgresql://127.0.0.1:5432"}, "new": {"dsn": "postgresql://127.0.0.1:5433"}},
        "routing": {"primary": "old"},
        "migrate": {"target": "nwe"},
    }
    with pytest.raises(
        ConfigError, match=re.escape("migrate.target = 'nwe' is not a backend; declared backends: new, old")
    ):
        parse_config(document)
    with pytest.raises(ConfigError, match="source and target are both"):
        parse_config({**document, "migrate": {"source": "old", "target": "old"}})
