"""The cut's pause across every proxy instance: ask, wait for each one's answer, resume.

One instance (no shared store): the pause is this process's own (LocalCoordinator). Several
instances sharing a control store (StoreCoordinator): the cut writes a pause request into the
store (pgshift_pause, NOTIFY pgshift_pause); every instance's PauseAgent pauses its sessions,
drains them, waits until its own mirror queue to the future mirror is empty, and answers in
pgshift_pause_acks. The swap happens only after every live instance answered "drained"; an
instance that says no, or does not answer in time, aborts the cut and everyone resumes.

Resume is also a request: each instance first installs the newest routing version, then lets its
held requests go, so none of them can run on the old primary after the swap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.control.pgstore import PgStore
from proxy.control.plane import ControlPlane
from proxy.errors import PgShiftError, StoreUnavailable
from proxy.server import Server

log = logging.getLogger(__name__)

POLL = 0.003  # seconds between looks at queues, acks and versions (the pause is measured in ms)
ANSWER_GRACE = 2.0  # seconds an instance may take to answer beyond the drain and catch-up limits


@dataclass(frozen=True)
class PauseRequest:
    reason: str
    drain_timeout: float
    max_seconds: float
    catchup_timeout: float
    mirror: str  # the backend that must have every write before the swap (the new primary)
    # The change stream also carries every write to ``mirror`` (and the cut waits for it): tables
    # the proxy could not mirror are not lost, so they do not stop the cut.
    streamed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "drain_timeout": self.drain_timeout,
            "max_seconds": self.max_seconds,
            "catchup_timeout": self.catchup_timeout,
            "mirror": self.mirror,
            "streamed": self.streamed,
        }


@dataclass
class Answers:
    """Every instance's answer to a pause or resume."""

    ok: bool
    instances: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None


class Coordinator(Protocol):
    async def pause(self, cut: str, request: PauseRequest) -> Answers: ...

    async def resume(self, cut: str, covered: frozenset[str] = frozenset()) -> Answers:
        """End the pause everywhere; each instance first sets the mirrors a change stream covers."""
        ...

    async def cover(self, covered: frozenset[str]) -> Answers:
        """Every instance's mirrors stop applying to ``covered`` (a change stream writes them)."""
        ...

    async def installed(self, version: int, within: float) -> list[str]:
        """Wait (``within`` s at most) until every live instance runs ``version``; the ones that do not."""
        ...


async def mirror_caught_up(
    server: Server, mirror: str, within: float, *, streamed: bool = False
) -> tuple[bool, dict[str, Any]]:
    """Wait until this instance's apply streams to ``mirror`` hold nothing (queued or in flight)."""
    deadline = time.monotonic() + within
    started = time.monotonic()
    while True:
        entry = next((m for m in server.mirror.status()["mirrors"] if m["name"] == mirror), None)
        databases = entry["databases"] if entry else []
        queued = sum(d["queued"] for d in databases)
        broken = [d["database"] for d in databases if d["state"] in ("down", "detached")]
        diverged = (entry["diverged"] + entry["failed"]) if entry else 0
        out_of_sync = len(entry["out_of_sync"]) if entry else 0
        detail = {
            "mirror": mirror,
            "queued": queued,
            "broken": broken,
            "diverged": diverged,
            "out_of_sync_tables": out_of_sync,
            "catchup_ms": round((time.monotonic() - started) * 1000, 2),
        }
        if broken or (out_of_sync and not streamed):
            return False, detail
        if queued == 0:
            return True, detail
        if time.monotonic() >= deadline:
            return False, detail
        await asyncio.sleep(POLL)


async def pause_here(server: Server, cut: str, request: PauseRequest) -> dict[str, Any]:
    """This instance's part of a pause: pause, drain, catch the mirror up. The answer (``ok``)."""
    result = await server.pause_writes(f"cut {cut}: {request.reason}", request.drain_timeout, request.max_seconds)
    answer: dict[str, Any] = {
        "ok": result.drained,
        "drained": result.drained,
        "drain_ms": round(result.seconds * 1000, 2),
        "writing": result.writing,
        "version": server.live.version,
    }
    if not result.drained:
        answer["problem"] = (
            f"{result.writing} session(s) still had a transaction or a request on the primary after the drain "
            f"timeout ({request.drain_timeout:g} s)"
        )
        return answer
    caught_up, detail = await mirror_caught_up(
        server, request.mirror, request.catchup_timeout, streamed=request.streamed
    )
    answer.update(detail)
    if not caught_up:
        answer["ok"] = False
        answer["problem"] = (
            f"the mirror queue to {request.mirror} did not empty within {request.catchup_timeout:g} s "
            f"({detail['queued']} transaction(s) left"
            + (f"; stream(s) {', '.join(detail['broken'])} down or detached" if detail["broken"] else "")
            + (f"; {detail['out_of_sync_tables']} table(s) out of sync" if detail["out_of_sync_tables"] else "")
            + ")"
        )
        server.ctx.pause.end()
    return answer


def resume_here(server: Server, covered: frozenset[str]) -> dict[str, Any]:
    server.mirror.covered = covered
    pause = server.ctx.pause
    was = pause.active
    pause.end()
    return {"ok": True, "was_paused": was, "version": server.live.version, **pause.summary()}


class LocalCoordinator:
    """The only instance: pause and resume are calls into this process."""

    def __init__(self, server: Server, plane: ControlPlane) -> None:
        self.server = server
        self.plane = plane

    async def pause(self, cut: str, request: PauseRequest) -> Answers:
        answer = {"instance": self.plane.instance, **await pause_here(self.server, cut, request)}
        return Answers(bool(answer["ok"]), [answer], answer.get("problem"))

    async def resume(self, cut: str, covered: frozenset[str] = frozenset()) -> Answers:
        return Answers(True, [{"instance": self.plane.instance, **resume_here(self.server, covered)}])

    async def cover(self, covered: frozenset[str]) -> Answers:
        self.server.mirror.covered = covered
        return Answers(True, [{"instance": self.plane.instance, "covered": sorted(covered)}])

    async def installed(self, version: int, within: float) -> list[str]:
        return [] if self.server.live.version >= version else [self.plane.instance]


class StoreCoordinator:
    """Every live instance of the shared control store (pgshift_instances, recent heartbeat)."""

    def __init__(self, server: Server, plane: ControlPlane, store: PgStore) -> None:
        self.server = server
        self.plane = plane
        self.store = store

    def live_window(self) -> float:
        return max(3.0, 5 * self.plane.config.control.heartbeat)

    async def members(self) -> list[str]:
        rows = await self.store.instances()
        live = {r.instance for r in rows if r.age < self.live_window()}
        return sorted(live | {self.plane.instance})

    async def _collect(self, cut: str, action: str, members: list[str], within: float) -> Answers:
        deadline = time.monotonic() + within
        while True:
            acks = {a["instance"]: a for a in await self.store.pause_acks(cut, action)}
            missing = [m for m in members if m not in acks]
            refused = [a for a in acks.values() if not a["ok"]]
            answers = [acks[m] for m in members if m in acks]
            if refused:
                problem = "; ".join(f"{a['instance']}: {a.get('problem', 'refused')}" for a in refused)
                return Answers(False, answers, problem)
            if not missing:
                return Answers(True, answers)
            if time.monotonic() >= deadline:
                return Answers(False, answers, f"no answer from {', '.join(missing)} within {within:g} s")
            await asyncio.sleep(POLL)

    async def pause(self, cut: str, request: PauseRequest) -> Answers:
        members = await self.members()
        await self.store.request_pause(cut, "pause", request.as_dict(), time.time())
        timeout = request.drain_timeout + request.catchup_timeout + ANSWER_GRACE
        answers = await self._collect(cut, "pause", members, timeout)
        answers.instances.sort(key=lambda a: str(a["instance"]))
        return answers

    async def resume(self, cut: str, covered: frozenset[str] = frozenset()) -> Answers:
        members = await self.members()
        await self.store.request_pause(cut, "resume", {"covered": sorted(covered)}, time.time())
        return await self._collect(cut, "resume", members, ANSWER_GRACE + 3.0)

    async def cover(self, covered: frozenset[str]) -> Answers:
        members = await self.members()
        request = f"cover-{time.time_ns()}"
        await self.store.request_pause(request, "cover", {"covered": sorted(covered)}, time.time())
        return await self._collect(request, "cover", members, ANSWER_GRACE + 3.0)

    async def installed(self, version: int, within: float) -> list[str]:
        self.plane.poke()  # (the other instances heard the NOTIFY; this one may not have looked yet)
        deadline = time.monotonic() + within
        while True:
            rows = await self.store.instances()
            behind = [r.instance for r in rows if r.age < self.live_window() and r.version < version]
            if self.server.live.version < version:
                behind.append(self.plane.instance)
            if not behind or time.monotonic() >= deadline:
                return sorted(set(behind))
            await asyncio.sleep(POLL)


class PauseAgent:
    """Each instance's side of StoreCoordinator: obeys the pause request in the shared store."""

    def __init__(self, server: Server, plane: ControlPlane, store: PgStore) -> None:
        self.server = server
        self.plane = plane
        self.store = store
        self._wake = asyncio.Event()
        self._done: set[tuple[str, str]] = set()  # (cut, action) answered
        store.on_pause = self._wake.set

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.plane.config.control.heartbeat):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if stop.is_set():
                return
            try:
                await self.check()
            except StoreUnavailable as exc:
                log.warning("pause agent: %s", exc.message)
            except PgShiftError as exc:
                log.error("pause agent: %s", exc.message)
            except Exception:  # a bug must not end the agent: the next request would go unanswered
                log.exception("pause agent failed")

    async def check(self) -> None:
        request = await self.store.pause_request()
        if request is None:
            return
        cut, action = str(request["cut"]), str(request["action"])
        if (cut, action) in self._done:
            return
        self._done.add((cut, action))
        if action == "pause":
            if time.time() - float(request["at"]) > float(request["max_seconds"]):
                return  # a request from a cut long over (this instance started after it)
            pause = PauseRequest(
                str(request["reason"]),
                float(request["drain_timeout"]),
                float(request["max_seconds"]),
                float(request["catchup_timeout"]),
                str(request["mirror"]),
                bool(request.get("streamed")),
            )
            answer = await pause_here(self.server, cut, pause)
        elif action == "cover":
            self.server.mirror.covered = frozenset(request.get("covered") or ())
            answer = {"ok": True, "covered": sorted(self.server.mirror.covered)}
        else:
            # The swap's version first: a held request must not run on the old primary.
            await self.plane.refresh()
            answer = resume_here(self.server, frozenset(request.get("covered") or ()))
        detail = {k: v for k, v in answer.items() if k != "ok"}
        await self.store.ack_pause(self.plane.instance, cut, action, bool(answer["ok"]), detail, time.time())
