"""`pgshift repair`: rewrite only the differing rows on the target from the source, by primary key, then re-verify.

For each key: the source row is read (every column the target can be written, as the type's own
output text under fixed session settings, which the target's input functions read back, so every
type round-trips); then, in ONE target transaction, keys without a source row are deleted and the
others upserted (``INSERT … ON CONFLICT (key) DO UPDATE`` of every column; generated columns
skipped; ``OVERRIDING SYSTEM VALUE`` for identity columns). Nothing but rows with those keys is
written. As the sync's apply does, a superuser account writes as ``session_replication_role =
replica``: the target's triggers and foreign-key checks do not fire for rows the source already
checked. Afterwards the keys are compared again on both sides (with the recheck rule, as verify
does), and any key that still differs is reported.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from proxy.cdc.sqlconn import Endpoint, SqlConnection, SqlError, quote_literal
from proxy.errors import ConfigError
from proxy.verify.canonical import ColumnType, to_text
from proxy.verify.catalog import SERVER_INFO, Side, TablePlan, plan_tables
from proxy.verify.checksum import rows_by_key_sql
from proxy.verify.chunks import Key, key_texts, keys_where
from proxy.verify.compare import Row, RowDifference, Verdict, diff_one, judge, split_rows
from proxy.verify.report import Place, difference_line
from proxy.verify.verify import KEY_BATCH, VerifyOptions, connect, timeout_sql, verify

Action = Literal["upsert", "delete"]
ROWS_PER_STATEMENT = 200


@dataclass
class RepairReport:
    source: Endpoint
    target: Place  # a backend, or a D1 store (d1side.repair_d1)
    table: str
    key: list[str]
    dry_run: bool
    found_by: str  # "report FILE" or "verify (mode …)"
    upserted: list[Key] = field(default_factory=list)
    deleted: list[Key] = field(default_factory=list)
    still_differing: list[RowDifference] = field(default_factory=list)
    replica_role: bool = False  # written as session_replication_role = replica
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.still_differing

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "table": self.table,
            "dry_run": self.dry_run,
            "found_by": self.found_by,
            "source": self.source.describe(),
            "target": self.target.describe(),
            "upserted": [dict(zip(self.key, k, strict=True)) for k in self.upserted],
            "deleted": [dict(zip(self.key, k, strict=True)) for k in self.deleted],
            "still_differing": [d.as_dict(self.key) for d in self.still_differing],
            "replica_role": self.replica_role,
            "error": self.error,
            "seconds": round(self.seconds, 3),
        }

    def lines(self) -> list[str]:
        src, tgt = self.source.backend, self.target.backend
        verb = ("would upsert", "would delete") if self.dry_run else ("upserted", "deleted")
        lines = [f"repair {self.table} on {tgt} from {src} (differences from {self.found_by})"]
        for key in self.upserted:
            lines.append(f"  {verb[0]} {_key(self.key, key)}")
        for key in self.deleted:
            lines.append(f"  {verb[1]} {_key(self.key, key)}")
        for diff in self.still_differing:
            lines.append("  STILL DIFFERS: " + difference_line(diff, self.key, src, tgt))
        if self.error:
            lines.append(f"  FAILED (nothing written): {self.error}")
        summary = f"{len(self.upserted)} row(s) {verb[0]}, {len(self.deleted)} {verb[1]}"
        if self.dry_run:
            summary += " (dry run: nothing written)"
        elif self.ok:
            summary += ": re-verified, the rows now match"
            if self.replica_role:
                summary += " (written as session_replication_role = replica)"
        lines.append(summary)
        return lines


def _key(columns: Sequence[str], key: Key) -> str:
    return ", ".join(f"{c}={'NULL' if v is None else v}" for c, v in zip(columns, key, strict=True))


def keys_from_report(path: Path, table: str, source: Endpoint, target: Place) -> tuple[str, list[dict[str, Any]]]:
    """The table's entry (its schema.name) and its differing keys (dicts) in a verify report file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--from-report {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tables"), list):
        raise ConfigError(f"--from-report {path}: not a pgshift verify report (verify --json or --report)")
    for side, endpoint in (("source", source), ("target", target)):
        named = (data.get(side) or {}).get("backend")
        if named != endpoint.backend:
            raise ConfigError(
                f"--from-report {path}: the report's {side} is backend {named!r}, not {endpoint.backend!r}",
                hint="Repair with the --from and --to the report was made with.",
            )
    bare = table.split(".")[-1].strip('"')
    entries = [t for t in data["tables"] if t.get("table") in (table, f"public.{bare}")]
    if not entries:
        entries = [t for t in data["tables"] if str(t.get("table", "")).split(".")[-1] == bare]
    if len(entries) != 1:
        known = ", ".join(str(t.get("table")) for t in data["tables"])
        raise ConfigError(f"--from-report {path}: no single entry for table {table} (it lists: {known or 'none'})")
    entry = entries[0]
    return str(entry["table"]), [d["key"] for d in (entry.get("differences") or []) + (entry.get("unsettled") or [])]


async def repair(
    source: Endpoint,
    target: Endpoint,
    table: str,
    *,
    report: Path | None = None,
    dry_run: bool = False,
    options: VerifyOptions | None = None,
) -> RepairReport:
    """Repair ``table`` on ``target``: the keys listed for it in ``report`` (a verify report
    file), or else the differences a verify run finds now (with ``options``)."""
    options = options or VerifyOptions()
    began = time.monotonic()
    given: list[dict[str, Any]] | None = None
    if report is not None:
        table, given = keys_from_report(report, table, source, target)
        found_by = f"report {report}"
    src, tgt = await asyncio.gather(connect(source, options), connect(target, options, read_only=False))
    try:
        plans = await plan_tables(src, tgt, [table])
        await asyncio.gather(src.query(timeout_sql(options)), tgt.query(timeout_sql(options)))
        plan = plans[0]
        problems = [n.message for n in plan.notes if n.problem]
        if problems or not plan.key:
            raise ConfigError(f"cannot repair {plan.name}: " + ("; ".join(problems) or "it has no primary key"))
        if given is None:
            found = await verify(source, target, _replace(options, tables=[plan.name]))
            result = found.tables[0]
            keys = [d.key for d in result.differences + result.unsettled]
            found_by = f"verify (mode {options.mode})"
        else:
            keys = [_as_key(plan, k) for k in given]
        out = RepairReport(source, target, plan.name, plan.key, dry_run, found_by)
        if keys:
            await _repair(src, tgt, plan, keys, out)
            if not dry_run and out.error is None:
                out.still_differing = await _reverify(src, tgt, plan, keys, options)
    finally:
        await asyncio.gather(src.close(), tgt.close(), return_exceptions=True)
    out.seconds = time.monotonic() - began
    return out


def _replace(options: VerifyOptions, **changes: Any) -> VerifyOptions:
    from dataclasses import replace

    return replace(options, state_file=None, **changes)


def _as_key(plan: TablePlan, given: Any) -> Key:
    if isinstance(given, dict):
        try:
            return tuple(given[c] for c in plan.key)
        except KeyError:
            raise ConfigError(f"a key in the report ({given}) does not have the columns {plan.key}") from None
    return tuple(given)


def _writable(plan: TablePlan) -> list[tuple[ColumnType, ColumnType]]:
    """(source column, target column) of every column the target can be written: on both sides,
    not generated on the target."""
    assert plan.source is not None and plan.target is not None
    theirs = {c.name: c for c in plan.target.all_columns}
    return [(c, theirs[c.name]) for c in plan.source.all_columns if c.name in theirs and not theirs[c.name].generated]


async def _repair(src: SqlConnection, tgt: SqlConnection, plan: TablePlan, keys: list[Key], out: RepairReport) -> None:
    source, target = plan.source, plan.target
    assert source is not None and target is not None
    columns = _writable(plan)
    width = len(plan.key)
    found: dict[Key, list[str | None]] = {}
    for at in range(0, len(keys), KEY_BATCH):
        batch = keys[at : at + KEY_BATCH]
        values = ", ".join(to_text(s) for s, _ in columns)
        rows = await src.query(f"select {key_texts(source)}, {values} from {source.sql}{keys_where(source, batch)}")
        found.update({tuple(r[:width]): r[width:] for r in rows})
    out.upserted = [k for k in keys if k in found]
    out.deleted = [k for k in keys if k not in found]
    if out.dry_run:
        return
    statements = [f"delete from {target.sql}{keys_where(target, out.deleted[at : at + KEY_BATCH])}"
                  for at in range(0, len(out.deleted), KEY_BATCH)]  # fmt: skip
    names = ", ".join(t.sql for _, t in columns)
    overriding = " overriding system value" if any(t.identity == "a" for _, t in columns) else ""
    conflict = ", ".join(c.sql for c in target.key)
    updates = ", ".join(f"{t.sql} = excluded.{t.sql}" for _, t in columns if t.name not in plan.key)
    action = f"do update set {updates}" if updates else "do nothing"
    for at in range(0, len(out.upserted), ROWS_PER_STATEMENT):
        tuples = ", ".join(
            "(" + ", ".join(_literal(t, v) for (_, t), v in zip(columns, found[k], strict=True)) + ")"
            for k in out.upserted[at : at + ROWS_PER_STATEMENT]
        )
        statements.append(
            f"insert into {target.sql} ({names}){overriding} values {tuples} on conflict ({conflict}) {action}"
        )
    info = await tgt.json(SERVER_INFO)
    out.replica_role = bool(info["superuser"])
    await tgt.query("begin")
    try:
        if out.replica_role:
            await tgt.query("set local session_replication_role = replica")
        for statement in statements:
            await tgt.query(statement)
        await tgt.query("commit")
    except SqlError as exc:
        await tgt.query("rollback")
        out.error = exc.message + (f" ({exc.detail})" if exc.detail else "")


def _literal(column: ColumnType, value: str | None) -> str:
    if value is None:
        return "null"
    if column.base == "money":
        return f"{quote_literal(value)}::numeric::money"
    return f"{quote_literal(value)}::{column.type}"


async def _reverify(
    src: SqlConnection, tgt: SqlConnection, plan: TablePlan, keys: list[Key], options: VerifyOptions
) -> list[RowDifference]:
    """The keys compared again on both sides; one that differs is rechecked as verify does
    (a target written just before a mirrored or streamed change lands can differ for a moment)."""
    window = options.recheck_after if options.recheck_after is not None else 2.0
    previous: dict[Key, Row | None] = {}
    confirmed: list[RowDifference] = []
    pending = keys
    for attempt in range(options.rechecks + 1):
        smap, tmap = await _rows(src, tgt, plan, pending)
        waiting: list[Key] = []
        for key in pending:
            s, t = smap.get(key), tmap.get(key)
            diff = diff_one(plan.columns, key, s, t)
            if diff is None:
                continue
            settled = attempt > 0 and judge(previous[key], s, t) is Verdict.CONFIRMED
            if settled or attempt == options.rechecks:
                confirmed.append(diff)
            else:
                waiting.append(key)
                previous[key] = s
        pending = waiting
        if not pending:
            break
        await asyncio.sleep(window)
    return confirmed


async def _rows(
    src: SqlConnection, tgt: SqlConnection, plan: TablePlan, keys: list[Key]
) -> tuple[dict[Key, Row], dict[Key, Row]]:
    source, target = plan.source, plan.target
    assert isinstance(source, Side) and isinstance(target, Side)
    smap: dict[Key, Row] = {}
    tmap: dict[Key, Row] = {}
    for at in range(0, len(keys), KEY_BATCH):
        batch = keys[at : at + KEY_BATCH]
        s, t = await asyncio.gather(
            src.query(rows_by_key_sql(source, batch)), tgt.query(rows_by_key_sql(target, batch))
        )
        smap.update(split_rows(s, len(plan.key)))
        tmap.update(split_rows(t, len(plan.key)))
    return smap, tmap
