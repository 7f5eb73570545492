"""The guards of each step: what must hold before the migration moves, each with its value and verdict.

``gather`` reads the facts (the change stream's state, the verify sampler, this instance's mirror
queues, the peer's writability, the instances of the control store); ``evaluate`` is a pure
function of those facts and the step, so the rules are unit-tested without databases. A guard
that cannot be read (a database down) is not passed: when in doubt, the migration does not move.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from proxy.cdc.handover import stream_state
from proxy.cdc.sqlconn import Endpoint, SqlConnection
from proxy.config import MigrateConfig
from proxy.errors import PgShiftError
from proxy.migrate.phases import Phase, Step, Where

# Mirrored writes need these on every table of the database that becomes the mirror.
_WRITABLE = """
select json_build_object(
  'in_recovery', pg_is_in_recovery(),
  'read_only', current_setting('default_transaction_read_only') = 'on',
  'tables', (select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace
             where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema')
               and n.nspname !~ '^pg_toast' and c.relname !~ '^pgshift_'),
  'not_writable', (select coalesce(json_agg(format('%I.%I', n.nspname, c.relname) order by 1), '[]')
             from pg_class c join pg_namespace n on n.oid = c.relnamespace
             where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema')
               and n.nspname !~ '^pg_toast' and c.relname !~ '^pgshift_'
               and not (has_table_privilege(c.oid, 'INSERT') and has_table_privilege(c.oid, 'UPDATE')
                        and has_table_privilege(c.oid, 'DELETE'))))
"""


@dataclass
class Guard:
    name: str
    ok: bool
    value: Any
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Facts:
    """What the guards look at, read once per status/step."""

    now: float
    stream: dict[str, Any] | None = None  # {"state": row | None, "slot": info | None}
    stream_error: str | None = None
    verify: dict[str, Any] | None = None  # the sampler's summary (None: [verify] is off)
    mirrors: list[dict[str, Any]] = field(default_factory=list)  # this instance's MirrorManager.summary()
    writable: dict[str, Any] | None = None  # the future mirror, if the step swaps roles
    writable_error: str | None = None
    instances: list[dict[str, Any]] = field(default_factory=list)  # {"instance", "version", "age"}
    version: int = 0  # the routing version this instance runs
    last_change_at: float | None = None  # when the reads last moved (dwell)
    cut_at: float | None = None  # when the reverse window began
    target_errors: int = 0  # errors the target returned to clients since the last read step


async def read_stream(source: Endpoint, target: Endpoint, slot: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return await stream_state(source, target, slot), None
    except PgShiftError as exc:
        return None, exc.message


async def read_writable(endpoint: Endpoint) -> tuple[dict[str, Any] | None, str | None]:
    try:
        async with await SqlConnection.connect(endpoint, "pgshift-migrate") as conn:
            found: dict[str, Any] = await conn.json(_WRITABLE)
            return found, None
    except PgShiftError as exc:
        return None, exc.message


def _stream_guard(facts: Facts, settings: MigrateConfig) -> Guard:
    if facts.stream is None:
        return Guard("sync", False, None, f"cannot read the change stream's state: {facts.stream_error}")
    state, slot = facts.stream["state"], facts.stream["slot"]
    if state is None or slot is None:
        if not settings.require_sync:
            return Guard("sync", True, None, "no change stream ([migrate] require_sync = false: dual write alone)")
        return Guard("sync", False, None, "no change stream: run `pgshift sync start` (backfill + CDC)")
    if state.get("hold"):
        return Guard(
            "sync", False, None, f"the stream is held ({state['hold']}): `pgshift sync start` after a rollback"
        )
    running = bool(state.get("process")) and (state.get("age") or 1e9) < 30 and bool(slot.get("active"))
    if state["phase"] != "streaming" or not running:
        what = "copying (backfill)" if state["phase"] == "backfill" else "not running"
        return Guard(
            "sync", False, state["phase"], f"the change stream is {what}: it must stream (`pgshift sync start`)"
        )
    lag = float(state.get("lag_seconds") or 0.0)
    ok = lag <= settings.max_sync_lag
    return Guard(
        "sync",
        ok,
        round(lag, 3),
        f"streaming, {lag:.1f} s behind (at most {settings.max_sync_lag:g} s)"
        f"{'' if ok else ': wait for it to catch up'}",
    )


def _verify_guard(facts: Facts, settings: MigrateConfig) -> Guard:
    if settings.verify_max_age == 0:
        return Guard("verify", True, None, "not required ([migrate] verify_max_age = 0)")
    summary = facts.verify
    if summary is None:
        return Guard("verify", False, None, "no continuous verify in this proxy: set [verify] interval (and restart)")
    tables = summary.get("tables") or {}
    if not tables:
        return Guard("verify", False, None, "verify has not compared any table yet")
    # A row that changed at every look is "unsettled", not different: hot rows under live writes.
    # Confirmed differences and tables that could not be compared block.
    differing = sorted(
        name for name, t in tables.items() if t["differences"] or t["status"] in ("error", "not_compared")
    )
    if differing:
        return Guard(
            "verify",
            False,
            len(differing),
            f"not clean in its last round: {', '.join(differing[:5])} — repair (pgshift repair) first",
        )
    oldest = min(
        float((t["last_clean_at"] if t["status"] == "clean" else t["checked_at"]) or 0.0) for t in tables.values()
    )
    unsettled = sum(int(t["unsettled"]) for t in tables.values())
    age = facts.now - oldest
    ok = age <= settings.verify_max_age
    return Guard(
        "verify",
        ok,
        round(age, 1),
        f"no difference in any table, the oldest look {age:.0f} s ago (at most {settings.verify_max_age:g} s)"
        + (f"; {unsettled} hot row(s) changed at every look" if unsettled else ""),
    )


def _mirror_guard(facts: Facts, mirror: str, *, streamed: bool = False) -> Guard:
    """``streamed``: the change stream also carries every write to ``mirror`` (and the cut waits
    for it to catch up), so tables the proxy could not mirror are not lost: they only warn."""
    entry = next((m for m in facts.mirrors if m["name"] == mirror), None)
    if entry is None:
        return Guard(f"mirror {mirror}", True, None, f"{mirror} mirrors; no write has needed it on this instance yet")
    out_of_sync = entry["out_of_sync_tables"] and not streamed
    bad = entry["state"] in ("down", "detached") or entry["diverged"] or out_of_sync
    return Guard(
        f"mirror {mirror}",
        not bad,
        {
            "state": entry["state"],
            "queued": entry["queued"],
            "lag_seconds": entry["lag_seconds"],
            "diverged": entry["diverged"],
            "out_of_sync_tables": entry["out_of_sync_tables"],
        },
        f"{entry['state']}, {entry['queued']} queued, {entry['lag_seconds']:.2f} s lag, {entry['diverged']} "
        f"divergence(s), {entry['out_of_sync_tables']} table(s) out of sync"
        + ("" if not bad else ": fix and resume the mirror (pgshift mirror status) first")
        + (" (the change stream carries them)" if entry["out_of_sync_tables"] and streamed else ""),
    )


def _writable_guard(facts: Facts, peer: str) -> Guard:
    name = "reverse path"
    w = facts.writable
    if w is None:
        return Guard(name, False, None, f"{peer} is not reachable: {facts.writable_error}")
    if w["in_recovery"] or w["read_only"]:
        why = "is a standby (in recovery)" if w["in_recovery"] else "is read-only (default_transaction_read_only)"
        return Guard(name, False, None, f"{peer} {why}: it could not take mirrored writes")
    if w["not_writable"]:
        return Guard(
            name,
            False,
            w["not_writable"][:10],
            f"the mirror account may not write {len(w['not_writable'])} table(s) on {peer}: "
            "GRANT INSERT, UPDATE, DELETE",
        )
    return Guard(name, True, w["tables"], f"{peer} reachable and writable ({w['tables']} table(s))")


def _instances_guard(facts: Facts) -> Guard:
    if not facts.instances:
        return Guard("instances", True, facts.version, f"one instance, at routing version {facts.version}")
    behind = [i["instance"] for i in facts.instances if i["version"] != facts.version]
    ok = not behind
    return Guard(
        "instances",
        ok,
        {i["instance"]: i["version"] for i in facts.instances},
        f"{len(facts.instances)} live instance(s) at version {facts.version}"
        if ok
        else f"not at version {facts.version}: {', '.join(behind)}",
    )


def _dwell_guard(facts: Facts, settings: MigrateConfig) -> Guard:
    if not settings.dwell or facts.last_change_at is None:
        return Guard("dwell", True, None, "no dwell required" if not settings.dwell else "first step")
    waited = facts.now - facts.last_change_at
    ok = waited >= settings.dwell
    return Guard("dwell", ok, round(waited, 1), f"{waited:.0f} s at this step (at least {settings.dwell:g} s)")


def _errors_guard(facts: Facts, target: str) -> Guard:
    n = facts.target_errors
    return Guard(
        f"errors on {target}", n == 0, n, f"{n} error(s) returned by {target} to clients since reads last moved"
    )


def evaluate(step: Step, where: Where, facts: Facts, settings: MigrateConfig, source: str, target: str) -> list[Guard]:
    """The guards that must hold before ``step`` (forward steps; ``rollback_guards`` for the way back)."""
    match step.phase:
        case Phase.SYNC:
            return [_stream_guard(facts, settings)]
        case Phase.DUAL_WRITE:
            return [_stream_guard(facts, settings), _instances_guard(facts)]
        case Phase.READ_SHIFT:
            stream = _stream_guard(facts, settings)
            guards = [
                stream,
                _verify_guard(facts, settings),
                _mirror_guard(facts, target, streamed=stream.ok),
                _instances_guard(facts),
            ]
            if where.phase is Phase.READ_SHIFT:
                guards += [_dwell_guard(facts, settings), _errors_guard(facts, target)]
            return guards
        case Phase.CUT:
            stream = _stream_guard(facts, settings)
            return [
                stream,
                _verify_guard(facts, settings),
                _mirror_guard(facts, target, streamed=stream.ok),
                _writable_guard(facts, source),
                _instances_guard(facts),
                _dwell_guard(facts, settings),
                _errors_guard(facts, target),
            ]
        case Phase.DECOMMISSIONED:
            since = facts.now - facts.cut_at if facts.cut_at else 0.0
            quiet = Guard(
                "quiet period",
                since >= settings.quiet_period,
                round(since, 1),
                f"{since:.0f} s since the cut (at least {settings.quiet_period:g} s)",
            )
            return [quiet, _mirror_guard(facts, source), _instances_guard(facts)]
        case _:
            return []


def rollback_guards(where: Where, facts: Facts, source: str, target: str) -> list[Guard]:
    """Going back after the cut runs the cut in reverse: the source must have every write."""
    if where.phase is not Phase.REVERSE_WINDOW:
        return [_instances_guard(facts)]
    return [_mirror_guard(facts, source), _writable_guard(facts, target), _instances_guard(facts)]
