"""The migration's phases, read off the live routing (never stored apart from it), and the steps between them.

The routing version is the one atomic truth about who is primary and who mirrors: the phase is
derived from it, so a crash can never leave "phase" and "routing" disagreeing. Only what the
routing cannot show is kept in the migration state: a cut in progress, the reverse window's start,
decommission.

    shadow → sync → dual-write → read-shift N % → cut → reverse-window → decommissioned

Pure functions over RoutingConfig; no IO.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxy.config import RoutingConfig


class Phase(enum.StrEnum):
    SHADOW = "shadow"  # the target exists; nothing flows to it yet
    SYNC = "sync"  # backfill + change stream source → target
    DUAL_WRITE = "dual-write"  # the proxy also writes to the target; every read on the source
    READ_SHIFT = "read-shift"  # part of the reads on the target (percent)
    CUT = "cut"  # the cut-over (or its way back) is under way
    REVERSE_WINDOW = "reverse-window"  # the target is primary; the source still mirrors, rollback is open
    DECOMMISSIONED = "decommissioned"  # the source is gone from the routing; no way back
    UNKNOWN = "unknown"  # the routing names neither side as primary


ORDER = [
    Phase.SHADOW,
    Phase.SYNC,
    Phase.DUAL_WRITE,
    Phase.READ_SHIFT,
    Phase.CUT,
    Phase.REVERSE_WINDOW,
    Phase.DECOMMISSIONED,
]


@dataclass(frozen=True)
class Where:
    phase: Phase
    percent: int  # reads on the target, of the default read weights (0 to 100)
    primary: str
    problem: str | None = None

    def label(self) -> str:
        return f"read-shift {self.percent}%" if self.phase is Phase.READ_SHIFT else self.phase.value


@dataclass(frozen=True)
class Step:
    """One move: to ``phase`` (with ``percent`` reads on the target for read-shift)."""

    phase: Phase
    percent: int = 0

    def label(self) -> str:
        return f"read-shift {self.percent}%" if self.phase is Phase.READ_SHIFT else self.phase.value


def read_percent(routing: RoutingConfig, target: str) -> int:
    reads = routing.reads or {routing.primary: 100}
    total = sum(reads.values())
    return round(100 * reads.get(target, 0) / total) if total else 0


def locate(
    routing: RoutingConfig, source: str, target: str, *, syncing: bool, cutting: bool, decommissioned: bool
) -> Where:
    """Where the migration stands. ``syncing``: a change stream source → target exists (its state
    on the target); ``cutting``: a cut is under way; ``decommissioned``: from the migration state."""
    primary = routing.primary
    if decommissioned:
        return Where(Phase.DECOMMISSIONED, 100, primary)
    if cutting:
        return Where(Phase.CUT, read_percent(routing, target), primary)
    if primary == target:
        problem = None if source in routing.mirrors else f"{source} is not a mirror: a rollback would lose writes"
        return Where(Phase.REVERSE_WINDOW, read_percent(routing, target), primary, problem)
    if primary != source:
        return Where(Phase.UNKNOWN, 0, primary, f"the primary is {primary}, neither {source} nor {target}")
    if target in routing.mirrors:
        percent = read_percent(routing, target)
        return Where(Phase.READ_SHIFT if percent else Phase.DUAL_WRITE, percent, primary)
    if read_percent(routing, target):
        return Where(
            Phase.UNKNOWN,
            read_percent(routing, target),
            primary,
            f"reads go to {target} but it receives no writes (add it to routing.mirrors)",
        )
    return Where(Phase.SYNC if syncing else Phase.SHADOW, 0, primary)


def next_step(where: Where, steps: list[int]) -> Step | None:
    """The one step forward from ``where`` (None: nothing comes next)."""
    match where.phase:
        case Phase.SHADOW:
            return Step(Phase.SYNC)
        case Phase.SYNC:
            return Step(Phase.DUAL_WRITE)
        case Phase.DUAL_WRITE | Phase.READ_SHIFT:
            higher = [s for s in steps if s > where.percent]
            return Step(Phase.READ_SHIFT, higher[0]) if higher else Step(Phase.CUT)
        case Phase.REVERSE_WINDOW:
            return Step(Phase.DECOMMISSIONED)
        case _:
            return None


def previous_step(where: Where, steps: list[int]) -> Step | None:
    """The previous safe state (None: there is none)."""
    match where.phase:
        case Phase.SYNC:
            return Step(Phase.SHADOW)
        case Phase.DUAL_WRITE:
            return Step(Phase.SYNC)
        case Phase.READ_SHIFT:
            lower = [s for s in steps if s < where.percent]
            return Step(Phase.READ_SHIFT, lower[-1]) if lower else Step(Phase.DUAL_WRITE)
        case Phase.REVERSE_WINDOW:
            return Step(Phase.READ_SHIFT, where.percent or 100)  # the way back: the cut in reverse
        case _:
            return None


def parse_target(text: str) -> Step:
    """``--to`` as typed: a phase name, or read-shift with its percent ("read-shift:50", "50%")."""
    value = text.strip().lower()
    percent_text = value.removeprefix("read-shift").lstrip(":= ").removesuffix("%")
    if percent_text.isdigit() and (value.startswith("read-shift") or value.endswith("%") or value.isdigit()):
        percent = int(percent_text)
        if not 0 <= percent <= 100:
            raise ValueError(f"a read share is 0 to 100 %, not {percent}")
        return Step(Phase.DUAL_WRITE) if percent == 0 else Step(Phase.READ_SHIFT, percent)
    try:
        phase = Phase(value)
    except ValueError:
        names = ", ".join(p.value for p in ORDER)
        raise ValueError(f"unknown phase {text!r}: use one of {names}, or read-shift:N for N % of reads") from None
    if phase is Phase.READ_SHIFT:
        raise ValueError("say which share of reads: read-shift:10 (or 10%)")
    return Step(phase)


def rank(step: Step | Where) -> tuple[int, int]:
    """Order of phases (and read shares within read-shift), for "is this forward or back"."""
    phase = step.phase
    index = ORDER.index(phase) if phase in ORDER else -1
    return index, step.percent if phase is Phase.READ_SHIFT else 0


def reads_for(source: str, target: str, percent: int) -> dict[str, int]:
    """The default read weights that put ``percent`` % of reads on the target."""
    return {source: 100 - percent, target: percent}
