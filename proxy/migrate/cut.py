"""The cut-over and its way back: pause, drain, catch up, sequences, swap, resume — each step journaled.

    1. pause    every instance holds new work on the primary (no error: the client waits)
    2. drain    transactions already running finish; past drain_timeout the cut is aborted
    3. catch-up every instance's mirror queue to the peer is empty; forward, the change stream
                confirmed the source's flushed WAL position
    4. sequences the peer's sequences set past the primary's (serial, identity: no collision)
    5. swap     forward, the change stream is stopped and held (it would replay the reverse
                mirror's writes); then one routing version makes the peer primary and the old
                primary a mirror; the cut waits until every instance runs it
    6. resume   held requests go on, on the new primary

Before the swap, any failure aborts: everyone resumes on the unchanged routing, the stream's hold is
lifted, and the journal says why. The swap is one routing version, written to the store before any
instance installs it: routing is never half-switched. A crash is recovered by ``recover`` from the
journal: a cut whose swap is in the store is finished, any other one is undone.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from proxy.cdc import handover
from proxy.cdc.sequences import sequences_on
from proxy.cdc.sqlconn import Endpoint, SqlConnection
from proxy.config import MigrateConfig
from proxy.control.plane import ControlPlane
from proxy.errors import PgShiftError
from proxy.migrate.coordinate import Answers, Coordinator, PauseRequest

log = logging.getLogger(__name__)

FAULT_ENV = "PGSHIFT_FAULT"  # tests: "cut:<step>" ends the process right after that step is journaled
INSTALL_WAIT = 5.0  # seconds the swap waits for every instance to run the new version

Record = Callable[[str, dict[str, Any]], Awaitable[None]]  # (step, detail): journal + state


@dataclass(frozen=True)
class CutPlan:
    id: str
    direction: str  # "forward" (source → target) or "back" (the rollback after a cut)
    old_primary: str  # the primary before this cut
    new_primary: str
    source: str  # the migration's source and target (the change stream runs source → target)
    target: str

    @classmethod
    def make(cls, direction: str, old_primary: str, new_primary: str, source: str, target: str) -> CutPlan:
        return cls(f"{direction}-{uuid.uuid4().hex[:8]}", direction, old_primary, new_primary, source, target)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "direction": self.direction, "from": self.old_primary, "to": self.new_primary}


class CutAborted(PgShiftError):
    pass


def fault(step: str) -> None:
    """Fault injection for the crash tests: end the process the moment ``step`` is journaled."""
    if os.environ.get(FAULT_ENV) == f"cut:{step}":
        log.error("%s=%s: ending the process here (test fault injection)", FAULT_ENV, os.environ[FAULT_ENV])
        logging.shutdown()
        os._exit(70)


class Cut:
    def __init__(
        self,
        plan: CutPlan,
        *,
        plane: ControlPlane,
        coordinator: Coordinator,
        settings: MigrateConfig,
        endpoint: Callable[[str], Endpoint],
        record: Record,
        caller: str,
        stream: bool,  # a change stream source → target exists (its state row and slot)
    ) -> None:
        self.plan = plan
        self.plane = plane
        self.coordinator = coordinator
        self.settings = settings
        self.endpoint = endpoint
        self.record = record
        self.caller = caller
        self.stream = stream
        self.timings: dict[str, float] = {}
        self._t0 = time.monotonic()
        self.paused = False
        self.held = False
        self.drain_ms = 0.0  # the slowest instance's drain
        self.covered_before = frozenset({plan.target}) if stream and plan.direction == "forward" else frozenset()

    def _mark(self, step: str) -> float:
        now = time.monotonic()
        self.timings[step] = round((now - self._t0) * 1000, 2)
        return now

    async def _step(self, step: str, detail: dict[str, Any]) -> None:
        self._mark(step)
        await self.record(step, {**detail, "at_ms": self.timings[step]})
        fault(step)

    async def run(self) -> dict[str, Any]:
        """The cut. Connections to both databases are opened, and the sequences set once, before the
        pause: what remains inside it is a few round trips on open connections."""
        p = self.plan
        await self._step("begin", {**p.as_dict(), "stream": self.stream})
        try:
            old = await SqlConnection.connect(self.endpoint(p.old_primary), "pgshift-cut")
            try:
                new = await SqlConnection.connect(self.endpoint(p.new_primary), "pgshift-cut")
            except BaseException:
                await old.close()
                raise
        except PgShiftError as exc:
            return await self.abort(f"before the pause: {exc.message}")
        try:
            return await self._run(old, new)
        finally:
            await old.close()
            await new.close()

    async def _run(self, old: SqlConnection, new: SqlConnection) -> dict[str, Any]:
        p, s = self.plan, self.settings
        forward_stream = p.direction == "forward" and self.stream
        try:
            # Most of step 4 ahead of the pause (setting is idempotent: inside the pause only what
            # moved since is set again, usually nothing).
            await sequences_on(old, new, margin=s.sequence_margin)
        except PgShiftError as exc:
            return await self.abort(f"sequences, before the pause: {exc.message}")
        request = PauseRequest(
            f"{p.direction} cut {p.old_primary} -> {p.new_primary}",
            s.drain_timeout,
            s.pause_max,
            s.catchup_timeout,
            p.new_primary,
            streamed=forward_stream,
        )
        # 1-2: pause and drain, and (per instance) the mirror queue to the new primary empty.
        self.paused = True
        answers = await self.coordinator.pause(p.id, request)
        self.drain_ms = max((float(a.get("drain_ms", 0.0)) for a in answers.instances), default=0.0)
        await self._step("paused", {"ok": answers.ok, "instances": answers.instances})
        if not answers.ok:
            return await self.abort(f"pause: {answers.problem}")
        try:
            # 3: the change stream (forward: it still runs source → target; old is the source).
            if forward_stream:
                caught = await handover.caught_up(old, s.sync_slot, s.catchup_timeout)
                await self._step("caught_up", caught)
                if not caught["ok"]:
                    return await self.abort(
                        f"catch-up: the change stream is {caught['behind_bytes']:,} bytes behind after "
                        f"{s.catchup_timeout:g} s (slot confirmed {caught['confirmed_lsn']}, "
                        f"source at {caught['goal_lsn']})"
                    )
            # 4: sequences on the new primary past the old one's final values.
            report = await sequences_on(old, new, margin=s.sequence_margin)
            failed = [r for r in report.results if r.status in ("missing", "unreadable", "error")]
            await self._step(
                "sequences",
                {"counts": report.counts(), "failed": [f"{r.sequence}: {r.message or r.status}" for r in failed]},
            )
            if not report.ok:
                return await self.abort(
                    f"sequences: {len(failed)} could not be set ({failed[0].sequence}: "
                    f"{failed[0].message or failed[0].status})"
                )
            # 5: swap. Forward, the stream stops first: once the target is primary, the source gets
            # the reverse mirror's writes, which the stream must never carry back.
            if forward_stream:
                lines = await handover.hold(old, new, s.sync_slot, f"cut {p.id} made {p.target} the primary")
                self.held = True
                await self._step("stream_held", {"lines": lines})
        except PgShiftError as exc:
            return await self.abort(f"{exc.message}")
        try:
            version, _ = await self.plane.flip(
                p.new_primary, self.caller, f"cut {p.id}: primary {p.old_primary} -> {p.new_primary}"
            )
        except PgShiftError as exc:
            return await self.abort(f"swap: {exc.message}")
        await self._step("swapped", {"version": version.version})
        return await self.finish(version.version, connections=(old, new))

    async def finish(
        self, version: int, *, recovered: bool = False, connections: tuple[SqlConnection, SqlConnection] | None = None
    ) -> dict[str, Any]:
        """After the swap: wait for every instance to run it, release (back), resume."""
        p, s = self.plan, self.settings
        behind = await self.coordinator.installed(version, INSTALL_WAIT)
        if behind:
            log.error("cut %s: %s not at version %d yet; they install it before resuming", p.id, behind, version)
        notes: list[str] = []
        if p.direction == "back" and self.stream:
            # Source and target are equal now: the stream may start again from here.
            try:
                if connections is not None:  # (back: the old primary is the migration's target)
                    notes = await handover.release(connections[1], connections[0], s.sync_slot)
                else:
                    notes = await handover.release_endpoints(self.endpoint(p.source), self.endpoint(p.target),
                                                             s.sync_slot)  # fmt: skip
            except PgShiftError as exc:
                notes = [
                    f"the change stream could not be released ({exc.message}): run `pgshift migrate rollback` "
                    "again later, or clear pgshift_sync_state.hold on the target by hand"
                ]
        elif p.direction == "forward" and self.stream and recovered:
            notes = await handover.hold_endpoints(
                self.endpoint(p.source), self.endpoint(p.target), s.sync_slot, f"cut {p.id} made {p.target} the primary"
            )
        # Forward, the target is the primary now; back, the stream was released: either way no
        # change stream feeds a mirror until `pgshift sync start` runs again.
        answers = await self.coordinator.resume(p.id, frozenset())
        pause = _pause_figures(answers)
        await self._step(
            "resumed", {"ok": answers.ok, "instances": answers.instances, "behind": behind, "notes": notes, **pause}
        )
        return {
            **p.as_dict(),
            "drain_ms": self.drain_ms,
            "result": "done",
            "version": version,
            "recovered": recovered,
            "notes": notes,
            "timings_ms": self.timings,
            **pause,
        }

    async def abort(self, reason: str) -> dict[str, Any]:
        """Before the swap: everyone resumes on the unchanged routing; the stream's hold is lifted."""
        p, s = self.plan, self.settings
        log.error("cut %s aborted: %s", p.id, reason)
        notes: list[str] = []
        if self.held:
            try:
                await handover.unhold(self.endpoint(p.target), s.sync_slot)
                notes.append("the change stream was stopped for the swap: start it again with `pgshift sync start`")
            except PgShiftError as exc:
                notes.append(
                    f"the stream's hold could not be lifted ({exc.message}): clear it before `pgshift sync start`"
                )
        answers = await self.coordinator.resume(p.id, self.covered_before) if self.paused else Answers(True)
        pause = _pause_figures(answers)
        await self._step("aborted", {"reason": reason, "notes": notes, "resumed": answers.ok, **pause})
        return {
            **p.as_dict(),
            "drain_ms": self.drain_ms,
            "result": "aborted",
            "reason": reason,
            "notes": notes,
            "timings_ms": self.timings,
            **pause,
        }


def _pause_figures(answers: Answers) -> dict[str, Any]:
    """What the pause cost, over every instance (from their resume answers)."""
    rows = answers.instances
    return {
        "pause_ms": round(max((float(a.get("last_seconds", 0.0)) for a in rows), default=0.0) * 1000, 2),
        "held_requests": sum(int(a.get("last_held", 0)) for a in rows),
        "wait_p50_ms": round(max((float(a.get("last_wait_p50_s", 0.0)) for a in rows), default=0.0) * 1000, 2),
        "wait_p99_ms": round(max((float(a.get("last_wait_p99_s", 0.0)) for a in rows), default=0.0) * 1000, 2),
        "wait_max_ms": round(max((float(a.get("last_max_wait_s", 0.0)) for a in rows), default=0.0) * 1000, 2),
    }


async def recover(cut: Cut, step: str) -> dict[str, Any]:
    """A cut interrupted at ``step`` (its process died): finish it if its swap reached the store,
    else undo it."""
    p = cut.plan
    current = cut.plane.current
    cut.paused = True  # (other instances may still hold requests: resume them either way)
    if current.routing.primary == p.new_primary:
        log.warning("cut %s was interrupted after its swap (step %s): finishing it", p.id, step)
        return await cut.finish(current.version, recovered=True)
    # (Whatever the step: the process may have died inside the hold, after writing it on the
    # target and before journaling it. Before the swap a forward cut's stream was never held.)
    cut.held = p.direction == "forward" and cut.stream
    log.warning("cut %s was interrupted before its swap (step %s): undoing it", p.id, step)
    return await cut.abort(f"interrupted at step {step!r} (pgshift stopped during the cut); nothing was swapped")
