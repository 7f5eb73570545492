"""`pgshift sync sequences`: move every sequence on the target past the source's value (before a cut-over).

Logical replication does not carry sequences, so after a sync the target's sequences (serial,
identity and standalone ones alike) still stand where the schema copy left them. Before the
target becomes the primary, each one must hand out only values the source never did: it is set
to the source's position plus a margin (room for rows the source writes after this runs).
Sequences are matched by schema-qualified name. A sequence owned by a column (serial, identity)
also goes past the largest value in that column on the target, in case rows arrived there with
explicit ids the target's sequence never handed out.

Setting is idempotent: a target sequence that is already far enough is left alone, so running
it again (e.g. after an aborted cut-over) does not keep moving sequences forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from proxy.cdc.sqlconn import Endpoint, SqlConnection, SqlError, connect_both, qualified, quote_ident

DEFAULT_MARGIN = 1000

Status = Literal["set", "would_set", "unchanged", "missing", "unreadable", "error"]
# Statuses that make the command fail (exit 1).
FAILED: frozenset[str] = frozenset({"missing", "unreadable", "error"})

# pg_sequences.last_value is NULL both for a sequence never called and for one the user may not
# read: the privilege tells them apart.
_SEQUENCES = """
select coalesce(json_agg(json_build_object(
  'oid', c.oid, 'schema', s.schemaname, 'name', s.sequencename,
  'start', s.start_value, 'last', s.last_value, 'increment', s.increment_by,
  'min', s.min_value, 'max', s.max_value,
  'readable', has_sequence_privilege(c.oid, 'SELECT') or has_sequence_privilege(c.oid, 'USAGE'),
  'owner', (select json_build_object('schema', tn.nspname, 'table', t.relname, 'column', a.attname)
            from pg_depend d join pg_class t on t.oid = d.refobjid
            join pg_namespace tn on tn.oid = t.relnamespace
            join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
            where d.classid = 'pg_class'::regclass and d.objid = c.oid and d.refclassid = 'pg_class'::regclass
              and d.deptype in ('a', 'i') and d.refobjsubid > 0
              and a.atttypid in ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)
            limit 1)
) order by s.schemaname, s.sequencename), '[]')
from pg_sequences s
join pg_namespace n on n.nspname = s.schemaname
join pg_class c on c.relnamespace = n.oid and c.relname = s.sequencename
"""


@dataclass
class SequenceResult:
    """One sequence: where it stood on each side and where the target stands now."""

    sequence: str  # schema.name
    status: Status
    source: int | None = None  # the source's position: last value handed out (start value if never)
    target_before: int | None = None  # the target's last value (None: never called)
    column: str | None = None  # schema.table.column owning the sequence on the target
    column_extreme: int | None = None  # max (min for a descending sequence) of that column on the target
    target_after: int | None = None  # the value set with setval(…, true)
    next_value: int | None = None  # what nextval() returns next on the target
    message: str | None = None


@dataclass
class SequencesReport:
    source: Endpoint
    target: Endpoint
    margin: int
    dry_run: bool
    results: list[SequenceResult]

    @property
    def ok(self) -> bool:
        return not any(r.status in FAILED for r in self.results)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for result in self.results:
            counts[result.status] = counts.get(result.status, 0) + 1
        return counts

    def lines(self) -> list[str]:
        """The report as text, line by line."""
        return report_lines(self)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "dry_run": self.dry_run,
            "margin": self.margin,
            "source": self.source.describe(),
            "target": self.target.describe(),
            "counts": self.counts(),
            "sequences": [asdict(r) for r in self.results],
        }


async def sync_sequences(
    source: Endpoint, target: Endpoint, *, margin: int = DEFAULT_MARGIN, dry_run: bool = False
) -> SequencesReport:
    """Read every sequence on both sides and set the target's (unless ``dry_run``)."""
    src, tgt = await connect_both(source, target)
    try:
        return await sequences_on(src, tgt, margin=margin, dry_run=dry_run)
    finally:
        await src.close()
        await tgt.close()


async def sequences_on(
    src: SqlConnection, tgt: SqlConnection, *, margin: int = DEFAULT_MARGIN, dry_run: bool = False
) -> SequencesReport:
    """sync_sequences on connections already open (a cut-over opens them before it pauses)."""
    source_sequences: list[dict[str, Any]] = await src.json(_SEQUENCES)
    target_sequences: list[dict[str, Any]] = await tgt.json(_SEQUENCES)
    on_target = {(s["schema"], s["name"]): s for s in target_sequences}
    results = []
    for seq in source_sequences:
        if seq["name"].startswith("pgshift_"):
            continue  # pgshift's own bookkeeping lives on each side separately
        results.append(await _one(tgt, seq, on_target.get((seq["schema"], seq["name"])), margin, dry_run))
    return SequencesReport(src.endpoint, tgt.endpoint, margin, dry_run, results)


async def _one(
    tgt: SqlConnection, seq: dict[str, Any], other: dict[str, Any] | None, margin: int, dry_run: bool
) -> SequenceResult:
    name = f"{seq['schema']}.{seq['name']}"
    sql_name = qualified(seq["schema"], seq["name"])
    if other is None:
        return SequenceResult(
            name, "missing", message=f"missing on the target: create it there (CREATE SEQUENCE {sql_name} …)"
        )
    if not seq["readable"]:
        return SequenceResult(
            name, "unreadable", message="the source user may not read it: GRANT SELECT ON SEQUENCE on the source"
        )
    if not other["readable"]:
        return SequenceResult(
            name, "unreadable", message="the target user may not read it: GRANT SELECT, UPDATE ON SEQUENCE there"
        )
    # Positions as setval(…, true) takes them: nextval() returns position + increment. A target
    # sequence never called is at start - increment (its nextval() is the start value); a source
    # sequence never called counts as at its start value (one value to spare, never one short).
    source_pos: int = seq["last"] if seq["last"] is not None else seq["start"]
    increment: int = other["increment"]
    up = increment > 0
    target_pos: int = other["last"] if other["last"] is not None else other["start"] - increment
    result = SequenceResult(name, "unchanged", source=source_pos, target_before=other["last"])

    wanted = [source_pos]
    owner = other["owner"]
    if owner is not None:
        result.column = f"{owner['schema']}.{owner['table']}.{owner['column']}"
        try:
            result.column_extreme = await _column_extreme(tgt, owner, up)
        except SqlError as exc:
            result.status, result.message = "error", f"reading {result.column} on the target failed: {exc.message}"
            return result
        if result.column_extreme is not None:
            wanted.append(result.column_extreme)
    # Far enough already: past the source by the margin, and past every value in its column
    # (values there below the target's own position were handed out by it, and need no margin).
    # Otherwise it goes to the largest of both plus the margin.
    if up:
        goal = max(wanted) + margin
        reached = target_pos >= max(source_pos + margin, *wanted)
    else:
        goal = min(wanted) - margin
        reached = target_pos <= min(source_pos - margin, *wanted)
    if reached:
        result.target_after, result.next_value = target_pos, target_pos + increment
        return result
    if goal > other["max"] or goal < other["min"]:
        bound = "MAXVALUE" if up else "MINVALUE"
        result.status = "error"
        result.message = (
            f"{goal} is beyond the target's {bound} ({other['max'] if up else other['min']}): "
            f"ALTER SEQUENCE {sql_name} {bound} … on the target, or use a smaller --margin"
        )
        return result
    result.target_after, result.next_value = goal, goal + increment
    if dry_run:
        result.status = "would_set"
        return result
    try:
        # By oid: the name was matched already, and an oid needs no quoting. (A nextval() on the
        # target between our read and this setval is not lost in practice: goal lies at least the
        # margin beyond the position read.)
        await tgt.query(f"select setval({int(other['oid'])}::oid::regclass, {goal}, true)")
    except SqlError as exc:
        result.status, result.message = "error", f"setval on the target failed: {exc.message}"
        result.target_after = result.next_value = None
        return result
    result.status = "set"
    return result


async def _column_extreme(tgt: SqlConnection, owner: dict[str, Any], up: bool) -> int | None:
    """max (or min, for a descending sequence) of the owning column; an index on it (the usual
    primary key) makes this one index probe."""
    func = "max" if up else "min"
    table = qualified(owner["schema"], owner["table"])
    rows = await tgt.query(f"select {func}({quote_ident(owner['column'])})::text from {table}")
    value = rows[0][0] if rows and rows[0] else None
    return int(value) if value is not None else None


# --- rendering --------------------------------------------------------------------------------


def _cell(value: int | str | None) -> str:
    return "-" if value is None else str(value)


def report_lines(report: SequencesReport) -> list[str]:
    """The human-readable report: one row per sequence, then the totals."""
    mode = ", dry run: nothing changed" if report.dry_run else ""
    lines = [
        f'sequences: source "{report.source.backend}" -> target "{report.target.backend}", margin {report.margin}{mode}'
    ]
    headers = ["sequence", "source", "target before", "column max", "target after", "next", "status"]
    rows = [
        [
            r.sequence, _cell(r.source), _cell(r.target_before), _cell(r.column_extreme),
            _cell(r.target_after), _cell(r.next_value), r.status.replace("_", " "),
        ]
        for r in report.results
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        cells = [c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  " + "  ".join(cells).rstrip())
    for result in report.results:
        if result.message:
            lines.append(f"  {result.sequence}: {result.message}")
    if not report.results:
        lines.append("  (no sequences on the source)")
    counts = report.counts()
    summary = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in sorted(counts.items())) or "nothing to do"
    lines.append(summary + ("" if report.ok else ": fix the sequences listed above and run it again"))
    return lines
