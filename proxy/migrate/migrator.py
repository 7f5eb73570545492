"""The migration's orchestrator in a proxy instance: status, advance, rollback, decommission.

The CLI (`pgshift migrate …`) calls the admin API of one instance; that instance runs the step
here, as a task of its own (a CLI that goes away does not stop a cut half-way), one operation at a
time. Routing changes go through the control plane like any other (versioned, audited, shared);
the migration's own state and step journal live in the control store (migrate/store.py), so any
instance can report them and a restarted one finishes or undoes a cut it was running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proxy.cdc.handover import stream_row, unhold
from proxy.cdc.sqlconn import Endpoint, SqlConnection, resolve_endpoint
from proxy.cdc.sync import drop_slot_and_publication, sync_stop
from proxy.config import MigrateConfig, RoutingConfig
from proxy.control.pgstore import PgStore
from proxy.control.plane import ControlPlane
from proxy.errors import ControlError, PgShiftError, VersionConflict
from proxy.migrate import guards as g
from proxy.migrate.coordinate import Coordinator, LocalCoordinator, StoreCoordinator
from proxy.migrate.cut import Cut, CutPlan, recover
from proxy.migrate.phases import Phase, Step, Where, locate, next_step, parse_target, previous_step, rank, reads_for
from proxy.migrate.store import FileMigrationStore, MemoryMigrationStore, MigrationStore, PgMigrationStore
from proxy.server import Server
from proxy.verify.verify import Verifier, VerifyOptions

log = logging.getLogger(__name__)

JOURNAL_SHOWN = 12
COVERAGE_INTERVAL = 1.0  # seconds between looks at the change stream's state (mirror coverage)
_ERROR_CLASSES_IGNORED = ("23", "40", "57")  # the application's own (constraints, serialization, cancel)


class Busy(ControlError):
    status = 409


class Blocked(ControlError):
    """A guard does not hold: the step was not taken (409, with every guard in the answer)."""

    status = 409

    def __init__(self, message: str, answer: dict[str, Any]) -> None:
        super().__init__(message)
        self.answer = answer


class Migrator:
    def __init__(
        self,
        server: Server,
        plane: ControlPlane,
        *,
        verify: Callable[[], dict[str, Any] | None] = lambda: None,
        config_dir: Path | None = None,
    ) -> None:
        self.server = server
        self.plane = plane
        self.verify_summary = verify
        self.config_dir = config_dir or Path.cwd()
        store = plane.store
        self.store: MigrationStore
        self.coordinator: Coordinator
        if isinstance(store, PgStore):
            self.store = PgMigrationStore(store)
            self.coordinator = StoreCoordinator(server, plane, store)
        else:
            path = self.settings.state_file or (
                plane.config.control.state_file.with_name("pgshift-migration.json")
                if plane.config.control.state_file
                else None
            )
            self.store = FileMigrationStore(path) if path else MemoryMigrationStore()
            self.coordinator = LocalCoordinator(server, plane)
        self.state: dict[str, Any] = {}
        self.revision = 0
        self._op: asyncio.Task[dict[str, Any]] | None = None
        self.operation: str | None = None
        self._errors_mark = 0  # the target's error count when reads last moved

    @property
    def settings(self) -> MigrateConfig:
        return self.plane.config.migrate

    @property
    def source(self) -> str:
        return str(self.state["source"])

    @property
    def target(self) -> str:
        return str(self.state["target"])

    def endpoint(self, name: str) -> Endpoint:
        return resolve_endpoint(self.plane.config, name)

    # --- state ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load (or begin) the migration's state; finish or undo a cut this instance was running."""
        await self._load()
        if not self.state:
            routing = self.plane.current.routing
            source = self.settings.source or routing.primary
            target = (
                self.settings.target
                or next((m for m in routing.mirrors if m != source), None)
                or next((b for b in self.plane.config.backends if b != source), None)
            )
            if target is None:
                log.warning("migration: no target ([migrate] target, or a second backend): migrate commands are off")
                return
            try:
                await self._save(
                    {
                        "source": source,
                        "target": target,
                        "created_at": time.time(),
                        "cut": None,
                        "cuts": [],
                        "cut_at": None,
                        "reads_moved_at": None,
                        "decommissioned_at": None,
                    }
                )
            except VersionConflict:
                await self._load()  # another instance, started at the same time, began it: theirs it is
        self._errors_mark = self._target_errors()
        cut = self.state.get("cut")
        if cut and cut.get("owner") == self.plane.instance:
            await self._run_op("recovering an interrupted cut", self._recover)

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: keep this instance's mirror coverage in step with the change stream."""
        while not stop.is_set():
            if self.state:
                try:
                    await self.refresh_coverage()
                except PgShiftError as exc:
                    log.debug("coverage: %s", exc.message)  # (kept as it was: the database may be restarting)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(COVERAGE_INTERVAL):
                    await stop.wait()

    async def refresh_coverage(self, *, mirrors: list[str] | None = None) -> frozenset[str]:
        """The target is covered while it mirrors and a change stream feeds it (its state on the
        target says backfill or streaming, not held): the stream is then its only writer
        (MirrorManager.covered). ``mirrors``: the mirrors about to be installed (dual write)."""
        covered: frozenset[str] = frozenset()
        if self.target in (mirrors if mirrors is not None else self.plane.current.routing.mirrors):
            state = await stream_row(self.endpoint(self.target), self.settings.sync_slot)
            if state is not None and state["phase"] in ("backfill", "streaming") and not state.get("hold"):
                covered = frozenset({self.target})
        if covered != self.server.mirror.covered:
            log.warning(
                "mirror coverage: %s",
                f"the change stream writes {self.target}; the proxy does not"
                if covered
                else "the proxy's mirror writes every mirror",
            )
            self.server.mirror.covered = covered
        return covered

    async def _load(self) -> None:
        state, self.revision = await self.store.load()
        self.state = state or {}

    async def _save(self, state: dict[str, Any]) -> None:
        self.revision = await self.store.save(state, self.revision)
        self.state = state

    async def _update(self, **changes: Any) -> None:
        await self._load()
        await self._save({**self.state, **changes})

    def _ready(self) -> None:
        if not self.state:
            raise ControlError('no migration: name its target ([migrate] target = "new") and restart')
        if not self.plane.config.control.live:
            raise ControlError("routing is fixed at startup ([control] live = false): a migration needs live = true")

    # --- status -----------------------------------------------------------------------------

    def where(self, routing: RoutingConfig | None = None, *, syncing: bool = False) -> Where:
        return locate(
            routing or self.plane.current.routing,
            self.source,
            self.target,
            syncing=syncing,
            cutting=bool(self.state.get("cut")),
            decommissioned=bool(self.state.get("decommissioned_at")),
        )

    async def facts(self, step: Step | None, where: Where) -> g.Facts:
        facts = g.Facts(
            now=time.time(),
            version=self.plane.current.version,
            last_change_at=self.state.get("reads_moved_at"),
            cut_at=self.state.get("cut_at"),
            verify=self.verify_summary(),
            mirrors=self.server.mirror.summary(),
            target_errors=self._target_errors() - self._errors_mark,
        )
        window = max(3.0, 5 * self.plane.config.control.heartbeat)
        facts.instances = [
            {"instance": i.instance, "version": i.version, "age": round(i.age, 1)}
            for i in self.plane.instances
            if i.age < window
        ]
        if where.phase in (Phase.SHADOW, Phase.SYNC, Phase.DUAL_WRITE, Phase.READ_SHIFT):
            facts.stream, facts.stream_error = await g.read_stream(
                self.endpoint(self.source), self.endpoint(self.target), self.settings.sync_slot
            )
        peer = None
        if step is not None and step.phase is Phase.CUT:
            peer = self.source
        elif where.phase is Phase.REVERSE_WINDOW:
            peer = self.target
        if peer is not None:
            facts.writable, facts.writable_error = await g.read_writable(self.endpoint(peer))
        return facts

    def _target_errors(self) -> int:
        errors = self.server.ctx.requests.errors
        return sum(
            n
            for (backend, sqlstate), n in errors.items()
            if backend == self.target and not sqlstate.startswith(_ERROR_CLASSES_IGNORED)
        )

    async def _stream(self) -> dict[str, Any]:
        """The change stream's state row and slot ({} when they cannot be read)."""
        try:
            stream, _ = await g.read_stream(
                self.endpoint(self.source), self.endpoint(self.target), self.settings.sync_slot
            )
        except PgShiftError:
            return {}
        return stream or {}

    async def _syncing(self) -> bool:
        state = (await self._stream()).get("state")
        return state is not None and state["phase"] != "stopped"

    async def status(self) -> dict[str, Any]:
        self._ready()
        await self._load()
        routing = self.plane.current.routing
        where = self.where(routing, syncing=await self._syncing())
        step = next_step(where, self.settings.read_steps)
        facts = await self.facts(step, where)
        guards = g.evaluate(step, where, facts, self.settings, self.source, self.target) if step else []
        back = previous_step(where, self.settings.read_steps)
        back_guards = g.rollback_guards(where, facts, self.source, self.target) if back else []
        cuts = self.state.get("cuts") or []
        answer: dict[str, Any] = {
            "phase": where.phase.value,
            "label": where.label(),
            "read_percent": where.percent,
            "problem": where.problem,
            "source": self.source,
            "target": self.target,
            "primary": routing.primary,
            "mirrors": list(routing.mirrors),
            "routing_version": self.plane.current.version,
            "next": None
            if step is None
            else {"step": step.label(), "ready": all(x.ok for x in guards), "guards": [x.as_dict() for x in guards]},
            "rollback": None
            if back is None
            else {
                "step": back.label(),
                "ready": all(x.ok for x in back_guards),
                "guards": [x.as_dict() for x in back_guards],
            },
            "operation": self.operation,
            "cut": self.state.get("cut"),
            "last_cut": cuts[-1] if cuts else None,
            "cuts": len(cuts),
            "cut_at": self.state.get("cut_at"),
            "decommissioned_at": self.state.get("decommissioned_at"),
            "reads_moved_at": self.state.get("reads_moved_at"),
            "store": self.store.location,
            "instances": facts.instances,
            "journal": await self.store.journal(JOURNAL_SHOWN),
        }
        if self.state.get("cut_at") and where.phase is Phase.REVERSE_WINDOW:
            answer["quiet_period_left"] = max(
                0.0, round(self.settings.quiet_period - (time.time() - self.state["cut_at"]), 1)
            )
        return answer

    # --- operations -------------------------------------------------------------------------

    async def _run_op(self, label: str, work: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        if self._op is not None and not self._op.done():
            raise Busy(f"another migration step is running ({self.operation}); wait for it (pgshift migrate status)")
        self.operation = label

        async def run() -> dict[str, Any]:
            try:
                return await work()
            finally:
                self.operation = None

        self._op = asyncio.get_running_loop().create_task(run(), name=f"migrate: {label}")
        # A client that goes away (Ctrl-C, timeout) does not cancel the step half-way.
        return await asyncio.shield(self._op)

    async def _recover(self) -> dict[str, Any]:
        cut = self.state["cut"]
        plan = CutPlan(cut["id"], cut["direction"], cut["from"], cut["to"], self.source, self.target)
        result = await recover(self._cut(plan, "recovery", bool(cut.get("stream"))), str(cut.get("step")))
        await self._end_cut(plan, result)
        return result

    async def _take_over(self) -> None:
        """A cut left by an instance that is gone (no heartbeat): finish or undo it here."""
        await self._load()
        cut = self.state.get("cut")
        if not cut:
            return
        live = {i.instance for i in self.plane.instances if i.age < max(3.0, 5 * self.plane.config.control.heartbeat)}
        if cut.get("owner") not in live or cut.get("owner") == self.plane.instance:
            await self._save({**self.state, "cut": {**cut, "owner": self.plane.instance}})
            await self._recover()
        else:
            raise Busy(f"cut {cut['id']} is running on {cut['owner']}; wait for it (pgshift migrate status)")

    def _cut(self, plan: CutPlan, caller: str, stream: bool) -> Cut:
        async def record(step: str, detail: dict[str, Any]) -> None:
            # Every step goes to the journal. The state's copy of the step matters to a recovery
            # only once the stream is held (the routing tells whether the swap happened): written
            # then, it keeps the pause two file writes shorter per step.
            await self.store.append(time.time(), plan.id, step, detail)
            if step in ("begin", "stream_held"):
                await self._load()
                cut = self.state.get("cut")
                if cut and cut["id"] == plan.id:
                    await self._save({**self.state, "cut": {**cut, "step": step}})

        return Cut(
            plan,
            plane=self.plane,
            coordinator=self.coordinator,
            settings=self.settings,
            endpoint=self.endpoint,
            record=record,
            caller=caller,
            stream=stream,
        )

    async def _end_cut(self, plan: CutPlan, result: dict[str, Any]) -> None:
        await self._load()
        done = result["result"] == "done"
        changes: dict[str, Any] = {
            "cut": None,
            "cuts": [*(self.state.get("cuts") or []), {**result, "ended_at": time.time()}],
        }
        if done:
            changes["cut_at"] = time.time() if plan.direction == "forward" else None
        await self._save({**self.state, **changes})
        self._errors_mark = self._target_errors()

    async def advance(self, to: str | None, read_steps: list[int] | None, caller: str) -> dict[str, Any]:
        self._ready()
        steps = read_steps or self.settings.read_steps
        if read_steps is not None and (
            read_steps != sorted(set(read_steps)) or read_steps[-1] != 100 or not all(1 <= s <= 100 for s in read_steps)
        ):
            raise ControlError(f"read steps must rise from 1 to 100, e.g. 1,10,50,100 (not {read_steps})")
        goal = _goal(to)
        return await self._run_op(
            f"advance to {goal.label() if goal else 'the next step'}", lambda: self._advance(goal, steps, caller)
        )

    async def _advance(self, goal: Step | None, steps: list[int], caller: str) -> dict[str, Any]:
        await self._take_over()
        taken: list[dict[str, Any]] = []
        while True:
            await self._load()
            where = self.where(syncing=await self._syncing())
            step = next_step(where, steps)
            if goal is not None and rank(where) >= rank(goal):
                if not taken and rank(where) > rank(goal):
                    raise ControlError(f"the migration is at {where.label()}, past {goal.label()}: use rollback")
                break
            if step is None:
                if not taken:
                    raise ControlError(
                        f"the migration is at {where.label()}: nothing comes next"
                        + (" (decommission is its own command)" if where.phase is Phase.REVERSE_WINDOW else "")
                    )
                break
            if step.phase is Phase.DECOMMISSIONED:
                if goal is None and not taken:
                    raise ControlError("the next step is decommission: run `pgshift migrate decommission`")
                break
            if (
                goal is not None
                and step.phase is Phase.READ_SHIFT
                and goal.phase is Phase.READ_SHIFT
                and step.percent > goal.percent
            ):
                step = goal
            if taken and step.phase in (Phase.READ_SHIFT, Phase.CUT) and self.settings.dwell:
                await self._dwell(where)
            result = await self._step(step, where, caller)
            taken.append(result)
            if result.get("result") == "aborted" or goal is None:
                break
        return {"taken": taken, "status": await self.status()}

    async def _dwell(self, where: Where) -> None:
        """Wait out the dwell at a read step, watching the target's errors: any error ends the
        advance there (the guard names it; `pgshift migrate rollback` moves reads back)."""
        moved = self.state.get("reads_moved_at") or time.time()
        while (left := moved + self.settings.dwell - time.time()) > 0:
            if self._target_errors() > self._errors_mark:
                break
            await asyncio.sleep(min(left, 0.5))

    async def _check(self, step: Step, where: Where) -> None:
        facts = await self.facts(step, where)
        checked = g.evaluate(step, where, facts, self.settings, self.source, self.target)
        blocking = [x for x in checked if not x.ok]
        if blocking:
            raise Blocked(
                f"{step.label()} is blocked by {', '.join(x.name for x in blocking)}: "
                + "; ".join(f"{x.name}: {x.detail}" for x in blocking),
                {"step": step.label(), "guards": [x.as_dict() for x in checked]},
            )

    async def _step(self, step: Step, where: Where, caller: str) -> dict[str, Any]:
        if step.phase is Phase.SYNC:
            await self._check(step, where)
            raise ControlError("the change stream runs outside the proxy: start it with `pgshift sync start`")
        await self._check(step, where)
        routing = self.plane.current.routing
        s, t = self.source, self.target
        if step.phase is Phase.DUAL_WRITE:
            mirrors = [*routing.mirrors, t] if t not in routing.mirrors else list(routing.mirrors)
            # Coverage first, on every instance: the first mirrored transactions must not race the stream.
            covered = await self.refresh_coverage(mirrors=mirrors)
            answers = await self.coordinator.cover(covered)
            if not answers.ok:
                raise ControlError(f"dual write not started: {answers.problem}")
            version, _ = await self.plane.patch(
                {"mirrors": mirrors, "reads": reads_for(s, t, 0)}, caller, note="migrate: dual write"
            )
            return await self._moved(step, version.version)
        if step.phase is Phase.READ_SHIFT:
            version, _ = await self.plane.patch(
                {"reads": reads_for(s, t, step.percent)}, caller, note=f"migrate: read-shift {step.percent}%"
            )
            return await self._moved(step, version.version)
        assert step.phase is Phase.CUT
        return await self._cut_over("forward", s, t, caller)

    async def _moved(self, step: Step, version: int) -> dict[str, Any]:
        await self._update(reads_moved_at=time.time())
        await self.store.append(time.time(), None, "moved", {"to": step.label(), "version": version})
        self._errors_mark = self._target_errors()
        return {"step": step.label(), "result": "done", "version": version}

    async def _cut_over(self, direction: str, old: str, new: str, caller: str) -> dict[str, Any]:
        stream = await self._stream_exists()
        plan = CutPlan.make(direction, old, new, self.source, self.target)
        await self._load()
        await self._save(
            {
                **self.state,
                "cut": {
                    **plan.as_dict(),
                    "step": "planned",
                    "owner": self.plane.instance,
                    "stream": stream,
                    "started_at": time.time(),
                },
            }
        )
        try:
            result = await self._cut(plan, caller, stream).run()
        except BaseException:
            log.exception("cut %s failed unexpectedly; recovering", plan.id)
            result = await recover(self._cut(plan, caller, stream), "failed")
        await self._end_cut(plan, result)
        return {"step": "cut" if direction == "forward" else "rollback", **result}

    async def _stream_exists(self) -> bool:
        stream = await self._stream()
        return stream.get("state") is not None and stream.get("slot") is not None

    async def rollback(self, to: str | None, caller: str) -> dict[str, Any]:
        self._ready()
        goal = _goal(to)
        return await self._run_op("rollback", lambda: self._rollback(goal, caller))

    async def _rollback(self, goal: Step | None, caller: str) -> dict[str, Any]:
        await self._take_over()
        taken: list[dict[str, Any]] = []
        while True:
            await self._load()
            where = self.where(syncing=await self._syncing())
            if where.phase is Phase.DECOMMISSIONED:
                raise ControlError(
                    "the migration is decommissioned: the source no longer receives writes; there is no way back"
                )
            back = previous_step(where, self.settings.read_steps)
            if back is None or (goal is not None and rank(where) <= rank(goal)):
                if not taken:
                    raise ControlError(
                        f"the migration is at {where.label()}: nothing to roll back to"
                        if back is None
                        else f"the migration is at {where.label()}, not past {goal.label() if goal else ''}"
                    )
                break
            if (
                goal is not None
                and back.phase is Phase.READ_SHIFT
                and goal.phase is Phase.READ_SHIFT
                and back.percent < goal.percent
            ):
                back = goal
            result = await self._back(back, where, caller)
            taken.append(result)
            if result.get("result") == "aborted" or goal is None:
                break
        return {"taken": taken, "status": await self.status()}

    async def _back(self, back: Step, where: Where, caller: str) -> dict[str, Any]:
        s, t = self.source, self.target
        routing = self.plane.current.routing
        if where.phase is Phase.REVERSE_WINDOW:
            facts = await self.facts(back, where)
            checked = g.rollback_guards(where, facts, s, t)
            blocking = [x for x in checked if not x.ok]
            if blocking:
                raise Blocked(
                    "rollback is blocked: " + "; ".join(f"{x.name}: {x.detail}" for x in blocking),
                    {"step": back.label(), "guards": [x.as_dict() for x in checked]},
                )
            return await self._cut_over("back", t, s, caller)
        if back.phase is Phase.READ_SHIFT or (back.phase is Phase.DUAL_WRITE and where.phase is Phase.READ_SHIFT):
            version, _ = await self.plane.patch(
                {"reads": reads_for(s, t, back.percent)}, caller, note=f"migrate rollback: {back.label()}"
            )
            return await self._moved(back, version.version)
        if back.phase is Phase.SYNC:
            mirrors = [m for m in routing.mirrors if m != t]
            reads = {k: v for k, v in (routing.reads or {}).items() if k != t} or None
            version, _ = await self.plane.patch(
                {"mirrors": mirrors, "reads": reads or {s: 100}}, caller, note="migrate rollback: dual write off"
            )
            return await self._moved(back, version.version)
        if back.phase is Phase.SHADOW:
            stopped = await sync_stop(self.endpoint(s), self.endpoint(t), self.settings.sync_slot, force=True)
            await self.store.append(time.time(), None, "moved", {"to": "shadow", "lines": stopped.lines})
            if not stopped.ok:
                raise ControlError("could not stop the change stream: " + "; ".join(stopped.lines))
            return {"step": "shadow", "result": "done", "lines": stopped.lines}
        raise ControlError(f"no way back from {where.label()}")

    async def decommission(self, caller: str, report_path: str | None = None) -> dict[str, Any]:
        self._ready()
        return await self._run_op("decommission", lambda: self._decommission(caller, report_path))

    async def _decommission(self, caller: str, report_path: str | None) -> dict[str, Any]:
        await self._take_over()
        await self._load()
        where = self.where()
        if where.phase is not Phase.REVERSE_WINDOW:
            raise ControlError(
                f"decommission comes after the cut (reverse-window); the migration is at {where.label()}"
            )
        step = Step(Phase.DECOMMISSIONED)
        await self._check(step, where)
        s, t = self.source, self.target
        lines: list[str] = []
        # 1. The final comparison, while the source still mirrors (recheck absorbs writes in flight).
        async with Verifier(self.endpoint(t), self.endpoint(s), VerifyOptions(mode="checksum")) as verifier:
            report = await verifier.run()
        path = (
            Path(report_path)
            if report_path
            else (self.settings.report_dir or self.config_dir)
            / f"pgshift-final-verify-{time.strftime('%Y%m%dT%H%M%S')}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.as_dict(), indent=2, default=str))
        lines.append(f"final verify {t} -> {s}: {report.differences} difference(s); report {path}")
        await self.store.append(
            time.time(), None, "final_verify", {"differences": report.differences, "report": str(path)}
        )
        if not report.ok:
            raise ControlError(
                f"the final verify found {report.differences} difference(s) between {t} and {s} (report {path}): "
                f"repair them (pgshift repair --from {t} --to {s} --from-report {path}) and decommission again"
            )
        # 2. Stop mirroring to the source; its reads go too.
        routing = self.plane.current.routing
        mirrors = [m for m in routing.mirrors if m != s]
        reads = {k: v for k, v in (routing.reads or {t: 100}).items() if k != s} or {t: 100}
        version, _ = await self.plane.patch({"mirrors": mirrors, "reads": reads}, caller, note="migrate: decommission")
        lines.append(f"routing version {version.version}: {s} no longer mirrors or serves reads")
        # 3. The change stream's slot and publication on the source.
        stream, _ = await g.read_stream(self.endpoint(s), self.endpoint(t), self.settings.sync_slot)
        publication = ((stream or {}).get("state") or {}).get("publication") or self.settings.sync_slot
        try:
            async with await SqlConnection.connect(self.endpoint(s), "pgshift-migrate") as src:
                await drop_slot_and_publication(src, s, self.settings.sync_slot, str(publication), lines)
            await unhold(self.endpoint(t), self.settings.sync_slot)
        except PgShiftError as exc:
            lines.append(f"could not drop the slot/publication on {s} ({exc.message}): `pgshift sync stop --force`")
        # 4. Archive: the whole state goes into the journal; the state says decommissioned.
        await self._load()
        await self.store.append(time.time(), None, "archived", {"state": self.state, "lines": lines})
        await self._save({**self.state, "decommissioned_at": time.time(), "final_report": str(path)})
        return {
            "step": "decommissioned",
            "result": "done",
            "lines": lines,
            "report": str(path),
            "status": await self.status(),
        }


def _goal(to: str | None) -> Step | None:
    """``--to`` of advance and rollback, or None; a typo is a ControlError that lists the phases."""
    if to is None:
        return None
    try:
        return parse_target(to)
    except ValueError as exc:
        raise ControlError(str(exc)) from None
