"""Row-level comparison and the recheck rule (pure functions over canonical text)."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.verify.chunks import Key

Row = tuple[str | None, ...]  # the compared columns of a row, canonical text (None: NULL)
Kind = Literal["only_in_source", "only_in_target", "different"]


@dataclass
class RowDifference:
    """One primary key whose row differs: missing on a side, or with different values (the
    differing columns, and their values on each side)."""

    kind: Kind
    key: Key
    columns: list[str] = field(default_factory=list)  # the differing columns (kind "different")
    source: dict[str, str | None] | None = None  # the differing columns' values on each side
    target: dict[str, str | None] | None = None

    def as_dict(self, key_columns: Sequence[str]) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": dict(zip(key_columns, self.key, strict=True)),
            "columns": self.columns,
            "source": self.source,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], key_columns: Sequence[str]) -> RowDifference:
        key = data["key"]
        values = tuple(key[c] for c in key_columns) if isinstance(key, dict) else tuple(key)
        return cls(data["kind"], values, list(data.get("columns") or []), data.get("source"), data.get("target"))


def split_rows(rows: Iterable[Sequence[str | None]], key_width: int) -> dict[Key, Row]:
    """Query rows (key columns, then the compared columns) by key."""
    return {tuple(r[:key_width]): tuple(r[key_width:]) for r in rows}


def diff_one(columns: Sequence[str], key: Key, source: Row | None, target: Row | None) -> RowDifference | None:
    """How the row ``key`` differs (None: it does not)."""
    if source is None and target is None:
        return None
    if target is None:
        return RowDifference("only_in_source", key)
    if source is None:
        return RowDifference("only_in_target", key)
    differing = [i for i, (a, b) in enumerate(zip(source, target, strict=True)) if a != b]
    if not differing:
        return None
    return RowDifference(
        "different",
        key,
        [columns[i] for i in differing],
        {columns[i]: source[i] for i in differing},
        {columns[i]: target[i] for i in differing},
    )


def diff_rows(columns: Sequence[str], source: dict[Key, Row], target: dict[Key, Row]) -> list[RowDifference]:
    """Every key whose row differs between the two maps, in key-text order."""
    out = []
    for key in sorted(source.keys() | target.keys(), key=sort_key):
        found = diff_one(columns, key, source.get(key), target.get(key))
        if found is not None:
            out.append(found)
    return out


def diff_hashes(source: dict[Key, str | None], target: dict[Key, str | None]) -> list[Key]:
    """The keys whose row hash differs, or that one side lacks."""
    return sorted((k for k in source.keys() | target.keys() if source.get(k) != target.get(k)), key=sort_key)


def sort_key(key: Key) -> tuple[tuple[int, int, str], ...]:
    # Numbers in numeric order where they are numbers (reads better), text otherwise.
    out = []
    for v in key:
        if v is None:
            out.append((0, 0, ""))
        elif v.lstrip("-").isdigit():
            out.append((1, int(v), ""))
        else:
            out.append((2, 0, v))
    return tuple(out)


class Verdict(enum.Enum):
    """What a recheck concludes about a candidate difference."""

    RESOLVED = "resolved"  # the sides agree now: it was lag
    CONFIRMED = "confirmed"  # still differs although the source row did not change for a lag window
    PENDING = "pending"  # still differs, but the source row changed meanwhile: look again


def judge(previous_source: Row | None, source: Row | None, target: Row | None) -> Verdict:
    """The recheck rule for one key, at one recheck (``None``: no such row on that side).

    A difference is real when it outlives the lag window while the source row stays put: the
    target (fed by the mirror or the CDC stream) then had the whole window to catch up. If the
    source row changed since the previous look, the target may just be applying that change:
    undecided, look again after another window."""
    if source == target:
        return Verdict.RESOLVED
    if source == previous_source:
        return Verdict.CONFIRMED
    return Verdict.PENDING
