"""What a verification found: per table rows compared, chunks, differing keys; as text and as JSON."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from proxy.cdc.sqlconn import Endpoint
from proxy.verify.catalog import Note
from proxy.verify.compare import RowDifference

Mode = Literal["checksum", "sample", "full"]
Status = Literal["clean", "differs", "incomplete", "not_compared", "error"]

EXIT_CLEAN = 0
EXIT_DIFFERS = 1
EXIT_INCOMPLETE = 4  # nothing differs in what was covered, but not everything was (time box, errors)

SHOWN_PER_TABLE = 20  # text output; --json and --report list every difference kept
VALUE_WIDTH = 60


class Place(Protocol):
    """What a side of a comparison is: a Postgres backend (``Endpoint``), or another store (a D1
    database, ``proxy.verify.d1side.D1Place``)."""

    @property
    def backend(self) -> str: ...  # its name in the text output and in a report's JSON

    def label(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def where(place: Place) -> str:
    """Where a side's data lives, for the report's first line."""
    if isinstance(place, Endpoint):
        return f"{place.address.label()} database {place.database}"
    return place.label()


@dataclass
class TableResult:
    """One table: how much was compared and what differs (typed: the proxy's continuous sampler
    reads ``rows_compared``, ``differences`` and ``clean_at``)."""

    table: str  # schema.name
    key: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    rows_compared: int = 0  # source rows covered (sample: distinct keys looked at on both sides)
    target_rows: int = 0  # target rows covered (checksum, full)
    chunks: int = 0
    chunks_total: int | None = None  # known once the table was covered to its end
    chunks_mismatched: int = 0
    differences: list[RowDifference] = field(default_factory=list)  # confirmed
    unsettled: list[RowDifference] = field(default_factory=list)  # kept changing at every recheck
    digest_differs: bool = False  # a table without primary key whose whole-table digest differs
    differences_truncated: bool = False  # more than --max-differences: the rest not listed
    complete: bool = False
    error: str | None = None
    seconds: float = 0.0
    checked_at: float | None = None  # epoch seconds when the comparison finished

    @property
    def comparable(self) -> bool:
        return not any(n.problem for n in self.notes)

    @property
    def status(self) -> Status:
        if not self.comparable:
            return "not_compared"
        if self.differences or self.unsettled or self.digest_differs:
            return "differs"
        if self.error is not None:
            return "error"
        if not self.complete:
            return "incomplete"
        return "clean"

    @property
    def clean_at(self) -> float | None:
        """When this table was last seen clean (this run), else None."""
        return self.checked_at if self.status == "clean" else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "status": self.status,
            "key": self.key,
            "rows_compared": self.rows_compared,
            "target_rows": self.target_rows,
            "chunks": self.chunks,
            "chunks_total": self.chunks_total,
            "chunks_mismatched": self.chunks_mismatched,
            "complete": self.complete,
            "differences": [d.as_dict(self.key) for d in self.differences],
            "unsettled": [d.as_dict(self.key) for d in self.unsettled],
            "differences_truncated": self.differences_truncated,
            "digest_differs": self.digest_differs,
            "notes": [n.as_dict() for n in self.notes],
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "checked_at": self.checked_at,
        }


@dataclass
class VerifyReport:
    source: Endpoint
    target: Place
    mode: Mode
    tables: list[TableResult]
    started_at: float = field(default_factory=time.time)
    seconds: float = 0.0
    recheck_after: float = 0.0
    rechecks: int = 0
    rechecked: int = 0  # candidate differences rechecked
    source_read: Endpoint | None = None  # a replica the source side was read from
    stopped: str | None = None  # why the run stopped before covering everything
    warnings: list[str] = field(default_factory=list)

    @property
    def differences(self) -> int:
        return sum(len(t.differences) + len(t.unsettled) + t.digest_differs for t in self.tables)

    @property
    def complete(self) -> bool:
        return self.stopped is None and all(t.complete and t.error is None for t in self.tables)

    @property
    def ok(self) -> bool:
        """Nothing differs and everything was compared."""
        return self.exit_code == EXIT_CLEAN

    @property
    def exit_code(self) -> int:
        if self.differences or any(t.status == "not_compared" for t in self.tables):
            return EXIT_DIFFERS
        return EXIT_CLEAN if self.complete else EXIT_INCOMPLETE

    @property
    def rows_compared(self) -> int:
        return sum(t.rows_compared for t in self.tables)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "exit_code": self.exit_code,
            "mode": self.mode,
            "complete": self.complete,
            "stopped": self.stopped,
            "source": self.source.describe(),
            "source_read": self.source_read.describe() if self.source_read else None,
            "target": self.target.describe(),
            "started_at": self.started_at,
            "seconds": round(self.seconds, 3),
            "rows_compared": self.rows_compared,
            "differences": self.differences,
            "recheck_after": self.recheck_after,
            "rechecks": self.rechecks,
            "rechecked": self.rechecked,
            "warnings": self.warnings,
            "tables": [t.as_dict() for t in self.tables],
        }

    def lines(self) -> list[str]:
        return report_lines(self)


def _value(value: str | None) -> str:
    if value is None:
        return "NULL"
    text = json.dumps(value, ensure_ascii=False)  # quoted: whitespace and empty strings show
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 4] + '…"'


def _key(columns: list[str], key: tuple[str | None, ...]) -> str:
    return ", ".join(f"{c}={'NULL' if v is None else v}" for c, v in zip(columns, key, strict=False))


def difference_line(diff: RowDifference, key_columns: list[str], source: str, target: str) -> str:
    key = _key(key_columns, diff.key)
    width = len("only in ") + max(len(source), len(target))
    if diff.kind == "only_in_source":
        return f"{'only in ' + source:<{width}}  {key}"
    if diff.kind == "only_in_target":
        return f"{'only in ' + target:<{width}}  {key}"
    src, tgt = diff.source or {}, diff.target or {}
    values = "; ".join(f"{c}: {source} {_value(src.get(c))}, {target} {_value(tgt.get(c))}" for c in diff.columns)
    return f"{'different':<{width}}  {key}: {values}"


def _n(count: int) -> str:
    return f"{count:,}"


def report_lines(report: VerifyReport) -> list[str]:
    src, tgt = report.source.backend, report.target.backend
    read = f" (read from {report.source_read.backend})" if report.source_read else ""
    lines = [f"verify {src}{read} -> {tgt}, mode {report.mode}: {where(report.source)} -> {where(report.target)}"]
    lines += [f"warning: {w}" for w in report.warnings]
    for t in report.tables:
        counts = f"{_n(t.rows_compared)} rows"
        if report.mode != "sample":
            counts += f", {_n(t.chunks)} chunk(s), {_n(t.chunks_mismatched)} mismatching"
        status = t.status
        if status == "differs":
            n = len(t.differences)
            head = f"{n} difference(s)" + (f", {len(t.unsettled)} unsettled" if t.unsettled else "")
            if t.digest_differs:
                head = "row count or checksum differs (no primary key: rows cannot be named)"
        elif status == "incomplete":
            head = "incomplete (stopped before the end)"
        elif status == "not_compared":
            head = "NOT COMPARED"
        elif status == "error":
            head = f"ERROR: {t.error}"
        else:
            head = "clean"
        lines.append(f"  {t.table}: {head} ({counts}, {t.seconds:.1f} s)")
        for note in t.notes:
            lines.append(f"    {'problem' if note.problem else 'note'}: {note.message}")
        shown = t.differences[:SHOWN_PER_TABLE]
        for diff in shown:
            lines.append("    " + difference_line(diff, t.key, src, tgt))
        if len(t.differences) > len(shown):
            lines.append(f"    … and {_n(len(t.differences) - len(shown))} more (see --json or --report)")
        if t.differences_truncated:
            lines.append("    (more differences than --max-differences: the rest are not listed)")
        for diff in t.unsettled[:SHOWN_PER_TABLE]:
            lines.append("    unsettled: " + difference_line(diff, t.key, src, tgt) + " (changed at every recheck)")
    scanning = sum(t.seconds for t in report.tables)  # (without the recheck's waiting)
    rate = report.rows_compared / scanning if scanning > 0 else 0.0
    differing = sum(1 for t in report.tables if t.status in ("differs", "not_compared"))
    summary = (
        f"{len(report.tables)} table(s), {_n(report.rows_compared)} rows in {report.seconds:.1f} s "
        f"({scanning:.1f} s comparing, {_n(int(rate))} rows/s): "
    )
    if report.differences:
        summary += f"{_n(report.differences)} difference(s) in {differing} table(s)"
    elif differing:
        summary += f"{differing} table(s) not compared"
    else:
        summary += "no differences"
    if report.rechecked:
        summary += f"; {_n(report.rechecked)} candidate(s) rechecked after {report.recheck_after:g} s"
    lines.append(summary)
    if report.stopped:
        lines.append(f"INCOMPLETE: {report.stopped}")
    return lines
