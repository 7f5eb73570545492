"""The admin HTTP API (aiohttp, on the proxy's own event loop): state, routing changes, metrics, health.

Every answer is JSON (but /metrics). Errors are ``{"error": {"status", "message"}}`` with a message
that says what to do. Mutating calls need ``Authorization: Bearer <admin.token>``; on a
non-loopback bind every call does, except /healthz and /readyz (probes of load balancers).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.config import is_loopback
from proxy.control.plane import ControlPlane, parse_routing
from proxy.control.versions import RoutingVersion, describe_change, dump_routing
from proxy.errors import ControlError, PgShiftError
from proxy.migrate.migrator import Blocked, Migrator
from proxy.server import Server

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_OPEN = frozenset({"/healthz", "/readyz"})


class StatusSource(Protocol):
    """Background work that reports in GET /api/state (the verify layer's sampler: the admin layer
    does not import it, app.py hands it over)."""

    def summary(self) -> dict[str, Any]: ...


def _seconds(body: dict[str, Any], key: str, default: float, least: float, most: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not least <= value <= most:
        raise ControlError(f"{key} must be a number of seconds from {least:g} to {most:g}, not {value!r}")
    return float(value)


async def _step(work: Awaitable[dict[str, Any]]) -> web.Response:
    """A migration step's answer; a blocked step is 409 with every guard in the body."""
    try:
        return web.json_response(await work)
    except Blocked as exc:
        return web.json_response({"error": {"status": 409, "message": exc.message}, **exc.answer}, status=409)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message}}, status=status)


class AdminApi:
    def __init__(
        self,
        server: Server,
        plane: ControlPlane,
        registry: CollectorRegistry,
        *,
        verify: StatusSource | None = None,
        migrator: Migrator | None = None,
    ) -> None:
        self.server = server
        self.plane = plane
        self.registry = registry
        self.verify = verify  # continuous sampling ([verify] interval > 0)
        self.migrator = migrator
        admin = plane.config.admin
        self.token = admin.resolved_token
        self.everything_guarded = not is_loopback(admin.host)
        self.app = web.Application(client_max_size=admin.max_body, middlewares=[self._errors, self._auth])
        r = self.app.router
        r.add_get("/api/state", self.state)
        r.add_post("/api/pause", self.pause)
        r.add_post("/api/resume", self.resume)
        r.add_get("/api/history", self.history)
        r.add_put("/api/routing", self.put_routing)
        r.add_patch("/api/routing", self.patch_routing)
        r.add_patch("/api/routing/rules/{name}", self.patch_rule)
        r.add_post("/api/flip", self.flip)
        r.add_post("/api/rollback", self.rollback)
        r.add_post("/api/reload", self.reload)
        r.add_get("/api/mirror", self.mirror_status)
        r.add_post("/api/mirror/{name}/resume", self.mirror_resume)
        r.add_get("/api/migrate", self.migrate_status)
        r.add_post("/api/migrate/advance", self.migrate_advance)
        r.add_post("/api/migrate/rollback", self.migrate_rollback)
        r.add_post("/api/migrate/decommission", self.migrate_decommission)
        r.add_get("/metrics", self.metrics)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        admin = self.plane.config.admin
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, admin.host, admin.port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else admin.port
        log.info("admin API on http://%s:%d", admin.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- middlewares ------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ControlError as exc:
            return _error(exc.status, exc.message)
        except PgShiftError as exc:  # ConfigError from a reload: the file is wrong, the state is kept
            return _error(400, exc.message)
        except web.HTTPRequestEntityTooLarge:
            limit = self.plane.config.admin.max_body
            return _error(413, f"body too large; the limit is admin.max_body = {limit} bytes")
        except web.HTTPNotFound:
            return _error(404, f"no endpoint {request.path}; see README 'Admin API' for the list")
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            return _error(405, f"{request.method} is not allowed on {request.path}; use {allowed}")
        except web.HTTPException as exc:
            return _error(exc.status, exc.reason)
        except Exception:
            log.exception("admin API: %s %s failed", request.method, request.path)
            return _error(500, "internal error in pgshift's admin API; see the proxy log")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        mutating = request.method not in ("GET", "HEAD", "OPTIONS")
        if request.path in _OPEN or not (mutating or self.everything_guarded):
            return await handler(request)
        if self.token is None:
            return _error(
                403,
                'changes (routing, mirror resume) need an admin token: set [admin] token = "env:PGSHIFT_ADMIN_TOKEN" '
                "in the config, export that variable, and reload or restart",
            )
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            return _error(401, "missing or wrong admin token: send 'Authorization: Bearer <token>' "
                          "(the CLI reads it from PGSHIFT_ADMIN_TOKEN or the config's [admin] token)")  # fmt: skip
        return await handler(request)

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _caller(request: web.Request) -> str:
        name = request.headers.get("X-Pgshift-Caller", "").strip()[:200] or "anonymous"
        return f"{name} ({request.remote or 'unix'})"

    @staticmethod
    async def _body(request: web.Request, *, optional: bool = False) -> Any:
        raw = await request.read()
        if not raw.strip():
            if optional:
                return {}
            raise ControlError("request body is empty; send a JSON object")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ControlError(f"body is not valid JSON: {exc}") from None

    @staticmethod
    def _options(request: web.Request) -> tuple[str, int | None]:
        note = request.query.get("note", "")[:500]
        expect = request.query.get("expect_version")
        if expect is None:
            return note, None
        try:
            return note, int(expect)
        except ValueError:
            raise ControlError(f"expect_version must be a version number, not {expect!r}") from None

    def _result(self, version: RoutingVersion, changed: bool) -> web.Response:
        parent = next((v for v in self.plane.history if v.version == version.parent), None)
        return web.json_response(
            {
                "version": version.version,
                "changed": changed,
                "changes": describe_change(parent.routing if parent else None, version.routing) if changed else [],
                "routing": dump_routing(version.routing),
                "instance": self.plane.instance,
            }
        )

    # --- endpoints --------------------------------------------------------------------------

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(await self.snapshot())

    async def snapshot(self) -> dict[str, Any]:
        plane, live = self.plane, self.plane.live
        current = plane.current
        summary = self.server.sessions()
        backends = {}
        for name, backend in plane.config.backends.items():
            probe = plane.probes.get(name)
            rates = plane.window.rates(self.server.ctx.requests, name)
            requests, _seconds, errors = self.server.ctx.requests.totals(name)
            backends[name] = {
                "address": backend.address.label(),
                "role": "primary" if name == live.routing.primary else (
                    "mirror" if name in live.routing.mirrors else "read"
                ),
                "up": None if probe is None else probe.up,
                "probe_ms": None if probe is None else round(probe.seconds * 1000, 3),
                "probe_error": None if probe is None else probe.error,
                "requests_per_s": round(rates.requests_per_s, 2),
                "mean_latency_ms": None if rates.mean_latency_ms is None else round(rates.mean_latency_ms, 3),
                "errors_per_s": round(rates.errors_per_s, 3),
                "error_ratio": rates.error_ratio,
                "requests_total": requests,
                "errors_total": errors,
                "connections": summary.connections[name],
                "sessions_writing_here": summary.by_primary[name],
            }  # fmt: skip
        instances: list[dict[str, Any]] = []
        stale_after = max(5.0, plane.config.control.heartbeat * 5)
        for row in plane.instances:
            instances.append(
                {"instance": row.instance, "version": row.version, "host": row.host, "admin": row.admin,
                 "heartbeat_age_s": round(row.age, 3), "stale": row.age > stale_after,
                 "self": row.instance == plane.instance}
            )  # fmt: skip
        if not any(i["self"] for i in instances):
            me = {"instance": plane.instance, "version": live.version, "host": "", "admin": plane.admin_address}
            instances.insert(0, {**me, "heartbeat_age_s": 0.0, "stale": False, "self": True})
        health = plane.store_health
        return {
            "instance": plane.instance,
            "version": live.version,
            "live": plane.config.control.live,
            "problem": plane.problem,
            "routing": dump_routing(live.routing),
            "last_change": {
                "at": current.created_at,
                "source": current.source,
                "caller": current.caller,
                "note": current.note,
                "applied_at": plane.applied_at,
            },
            "store": {
                "kind": plane.store.kind,
                "location": plane.store.location,
                "ok": health.ok,
                "error": health.error,
                "down_since": health.down_since,
            },
            "instances": instances,
            "backends": backends,
            "sessions": {
                "active": summary.active,
                "starting": summary.starting,
                "in_transaction": summary.in_transaction,
                "pinned": summary.pinned,
                "pinned_by_cause": dict(summary.pinned_by_cause),
                "by_primary": dict(summary.by_primary),
                # Pinned sessions keep writing to the primary they started on until they end.
                "on_previous_primary": sum(n for b, n in summary.by_primary.items() if b != live.routing.primary),
            },
            "mirror": self.server.mirror.summary(),
            "pause": self.server.ctx.pause.summary(),
            "verify": self.verify.summary() if self.verify is not None else {"enabled": False, "interval": 0},
        }

    async def history(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            limit = -1
        if limit < 0:
            raise ControlError("limit must be a whole number of versions (0: all)")
        history = self.plane.history
        by_number = {v.version: v for v in history}
        entries = []
        for version in reversed(history[-limit:] if limit > 0 else history):
            parent = by_number.get(version.parent) if version.parent is not None else None
            entries.append(
                {
                    **version.to_json(),
                    "changes": describe_change(parent.routing if parent else None, version.routing),
                    "before": dump_routing(parent.routing) if parent else None,
                }
            )
        return web.json_response({"current": self.plane.live.version, "versions": entries})

    async def put_routing(self, request: web.Request) -> web.Response:
        note, expect = self._options(request)
        routing = parse_routing(await self._body(request))
        return self._result(*await self.plane.put(routing, self._caller(request), note, expect))

    async def patch_routing(self, request: web.Request) -> web.Response:
        note, expect = self._options(request)
        body = await self._body(request)
        return self._result(*await self.plane.patch(body, self._caller(request), None, note, expect))

    async def patch_rule(self, request: web.Request) -> web.Response:
        note, expect = self._options(request)
        body = await self._body(request)
        name = request.match_info["name"]
        return self._result(*await self.plane.patch(body, self._caller(request), name, note, expect))

    async def flip(self, request: web.Request) -> web.Response:
        note, expect = self._options(request)
        body = await self._body(request)
        primary = body.get("primary") if isinstance(body, dict) else None
        if not isinstance(primary, str) or not primary:
            raise ControlError('body must name the new primary: {"primary": "new"}')
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise ControlError("force must be true or false")
        return self._result(*await self.plane.flip(primary, self._caller(request), note, expect, force=force))

    async def rollback(self, request: web.Request) -> web.Response:
        note, expect = self._options(request)
        body = await self._body(request, optional=True)
        if not isinstance(body, dict):
            raise ControlError('body must be a JSON object: {} or {"to": 3}')
        to = body.get("to")
        if to is not None and (not isinstance(to, int) or isinstance(to, bool) or to < 1):
            raise ControlError(f"to must be a version number (1 or more), not {to!r}")
        return self._result(*await self.plane.rollback(self._caller(request), to, note, expect))

    async def reload(self, request: web.Request) -> web.Response:
        result = await self.plane.reload(self._caller(request))
        return web.json_response(
            {
                "version": result.version.version,
                "routing_changed": result.routing_changed,
                "warnings": result.warnings,
                "instance": self.plane.instance,
            }
        )

    async def pause(self, request: web.Request) -> web.Response:
        """Pause new work on the primary and drain what runs there (a cut-over's first steps).
        Body (all optional): {"reason": "...", "drain_timeout": 5, "max_seconds": 30}."""
        body = await self._body(request, optional=True)
        if not isinstance(body, dict):
            raise ControlError('body must be a JSON object, e.g. {"drain_timeout": 5}')
        unknown = sorted(set(body) - {"reason", "drain_timeout", "max_seconds"})
        if unknown:
            raise ControlError(f"unknown key(s) {', '.join(unknown)}: use reason, drain_timeout, max_seconds")
        drain = _seconds(body, "drain_timeout", 5.0, 0.0, 300.0)
        longest = _seconds(body, "max_seconds", 30.0, 0.1, 3600.0)
        reason = str(body.get("reason") or f"paused by {self._caller(request)}")[:300]
        if not self.server.can_pause:
            raise ControlError(
                "this proxy relays sessions without looking at their requests, so it cannot hold them: "
                "set [control] live = true (or route reads, or mirror) and restart"
            )
        result = await self.server.pause_writes(reason, drain, longest)
        log.warning(
            "pause requested by %s: %s", self._caller(request), "drained" if result.drained else "drain timed out"
        )
        summary = {"drained": result.drained, "drain_ms": round(result.seconds * 1000, 3), "writing": result.writing,
                   **self.server.ctx.pause.summary()}  # fmt: skip
        if not result.drained:
            message = (f"the drain timed out after {drain:g} s: {result.writing} session(s) still had a transaction "
                       "or a request on the primary; the pause has ended and everything goes on as before")  # fmt: skip
            return web.json_response({"error": {"status": 409, "message": message}, **summary}, status=409)
        return web.json_response(summary)

    async def resume(self, request: web.Request) -> web.Response:
        pause = self.server.ctx.pause
        was = pause.active
        seconds = pause.end()
        log.warning("resume requested by %s (%s)", self._caller(request), "was paused" if was else "was not paused")
        return web.json_response({"was_paused": was, "paused_ms": round(seconds * 1000, 3), **pause.summary()})

    # --- the migration (issue 9) ---------------------------------------------------------------

    def _migrator(self) -> Migrator:
        if self.migrator is None:
            raise ControlError("this proxy runs no migration (it was started without one)")
        return self.migrator

    async def _migrate_body(self, request: web.Request, allowed: set[str]) -> dict[str, Any]:
        body = await self._body(request, optional=True)
        if not isinstance(body, dict):
            raise ControlError('body must be a JSON object, e.g. {"to": "cut"}')
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ControlError(f"unknown key(s) {', '.join(unknown)}: use {', '.join(sorted(allowed))}")
        to = body.get("to")
        if to is not None and not isinstance(to, str | int):
            raise ControlError(f'to must be a phase name or a read share ("cut", "read-shift:50"), not {to!r}')
        return body

    async def migrate_status(self, request: web.Request) -> web.Response:
        return web.json_response(await self._migrator().status())

    async def migrate_advance(self, request: web.Request) -> web.Response:
        body = await self._migrate_body(request, {"to", "read_steps"})
        steps = body.get("read_steps")
        numbers = isinstance(steps, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in steps)
        if steps is not None and not numbers:
            raise ControlError(f"read_steps must be a list of percentages like [1, 10, 50, 100], not {steps!r}")
        to = body.get("to")
        return await _step(self._migrator().advance(None if to is None else str(to), steps, self._caller(request)))

    async def migrate_rollback(self, request: web.Request) -> web.Response:
        body = await self._migrate_body(request, {"to"})
        to = body.get("to")
        return await _step(self._migrator().rollback(None if to is None else str(to), self._caller(request)))

    async def migrate_decommission(self, request: web.Request) -> web.Response:
        body = await self._migrate_body(request, {"report"})
        report = body.get("report")
        if report is not None and not isinstance(report, str):
            raise ControlError("report must be a file path")
        return await _step(self._migrator().decommission(self._caller(request), report))

    async def mirror_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.server.mirror.status())

    async def mirror_resume(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await self._body(request, optional=True)
        if not isinstance(body, dict) or set(body) - {"repaired"}:
            raise ControlError('body must be a JSON object: {} or {"repaired": true}')
        repaired = body.get("repaired", False)
        if not isinstance(repaired, bool):
            raise ControlError("repaired must be true or false")
        manager = self.server.mirror
        known = set(self.plane.config.backends)
        if name not in known:
            raise ControlError(f'no backend named "{name}"; declared backends: {", ".join(sorted(known))}')
        result = manager.resume(name, repaired=repaired)
        log.warning("mirror %s resumed by %s (repaired=%s)", name, self._caller(request), repaired)
        return web.json_response(result)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "time": time.time()})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready = accepting clients, a routing version installed, and its primary reachable."""
        problems = []
        if self.server.draining:
            problems.append("shutting down")
        primary = self.plane.live.routing.primary
        probe = self.plane.probes.get(primary)
        if probe is not None and not probe.up:
            problems.append(f"primary {primary!r} is unreachable: {probe.error}")
        if problems:
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready", "version": self.plane.live.version})
