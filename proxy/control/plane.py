"""The control plane: every routing change becomes a new persisted, audited version, installed live.

Changes come from the admin API (put, patch, flip, rollback), from a reload of config.toml, and
from other instances through the shared store. Each one is validated against the declared
backends, written to the store first (a change that cannot be persisted is not made), then
installed in ``Live`` — sessions pick it up at their next request boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from proxy.config import Config, RoutingConfig, format_errors, load_config
from proxy.control.health import Probe, RateWindow, probe
from proxy.control.pgstore import InstanceRow, PgStore
from proxy.control.store import FileStore, MemoryStore, VersionStore
from proxy.control.versions import RoutingVersion, describe_change
from proxy.errors import ConfigError, ControlError, PgShiftError, StoreUnavailable, VersionConflict
from proxy.observability import RequestStats
from proxy.routing import Live

log = logging.getLogger(__name__)

_FROM_FILE = ("config", "reload")  # sources whose routing is what config.toml said
RATE_SAMPLE_INTERVAL = 5.0  # seconds between samples of the request counters


def parse_routing(data: Any, where: str = "routing") -> RoutingConfig:
    """A routing document from an API body; every problem named with its location."""
    if not isinstance(data, dict):
        raise ControlError(f'{where} must be a JSON object like {{"primary": "old", "reads": {{"old": 100}}}}')
    try:
        return RoutingConfig.model_validate(data)
    except ValidationError as exc:
        raise ControlError(f"{where} is invalid:\n{format_errors(exc, prefix=where)}") from None


@dataclass
class StoreHealth:
    ok: bool = True
    error: str | None = None
    down_since: float | None = None


@dataclass
class ReloadResult:
    version: RoutingVersion
    routing_changed: bool
    warnings: list[str] = field(default_factory=list)


class ControlPlane:
    def __init__(
        self,
        config: Config,
        live: Live,
        requests: RequestStats,
        *,
        instance: str,
        admin_address: str = "",
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.live = live
        self.requests = requests
        self.instance = instance
        self.admin_address = admin_address
        self.config_path = config_path
        control = config.control
        self.store: VersionStore
        if control.store:
            self.store = PgStore(control.store, control.resolved_store_password, self._notified)
        elif control.state_file is not None:
            self.store = FileStore(control.state_file)
        else:
            self.store = MemoryStore()
        self.history: list[RoutingVersion] = []
        self.store_health = StoreHealth()
        self.changes: Counter[str] = Counter()  # by source, this instance's own
        # Why the newest version in the store is not the one running here, if it is not.
        self.problem: str | None = None
        self._current: RoutingVersion | None = None  # the installed version
        self.applied_at = 0.0
        self.probes: dict[str, Probe] = {}
        self.window = RateWindow()
        self.instances: list[InstanceRow] = []
        self._lock = asyncio.Lock()
        self._poke = asyncio.Event()

    @property
    def current(self) -> RoutingVersion:
        """The installed version (the newest in ``history``, unless this instance could not
        install that one: see ``problem``)."""
        assert self._current is not None, "control plane not started"
        return self._current

    @property
    def newest(self) -> int:
        return self.history[-1].version if self.history else 0

    @property
    def shared(self) -> bool:
        return isinstance(self.store, PgStore)

    # --- startup ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the history; install its newest version, unless config.toml's [routing] changed
        since it was last applied (then that becomes a new version). A store that cannot be read
        stops the start: serving an old routing after a flip could send writes to the wrong side."""
        await self.store.open()
        for _attempt in range(3):
            self.history = await self.store.load()
            file_routing = self.config.routing.named()
            last_file = self._last_from_file()
            if self.history and last_file is not None and last_file.routing == file_routing:
                break
            note = "first start" if not self.history else "config.toml [routing] changed since it was last applied"
            candidate = self._next(file_routing, "config", "config.toml", note)
            try:
                await self.store.append(candidate)
            except VersionConflict:
                continue  # another instance starting at the same time was first: read again
            self.history.append(candidate)
            self.changes["config"] += 1
            break
        else:
            raise ControlError("could not settle the routing version at startup (the store keeps changing)")
        current = self.history[-1]
        problems = current.routing.problems(self.config.backends)
        if problems:
            raise ConfigError(
                f"the current routing version {current.version} ({self.store.location}) does not fit this "
                f"config: {'; '.join(problems)}. Declare the backend(s) again, or make a new version from a "
                "running instance"
            )
        self._install(current)
        differs = current.routing != self.config.routing.named()
        log.info(
            "routing version %d (%s by %s)%s; store: %s",
            current.version,
            current.source,
            current.caller,
            " — differs from config.toml [routing]" if differs else "",
            self.store.location,
        )

    def _last_from_file(self) -> RoutingVersion | None:
        return next((v for v in reversed(self.history) if v.source in _FROM_FILE), None)

    def _next(self, routing: RoutingConfig, source: str, caller: str, note: str) -> RoutingVersion:
        """Numbered after the newest known version; its parent is the one it replaces here."""
        parent = self._current.version if self._current is not None else None
        return RoutingVersion(self.newest + 1, routing, source, caller, note, parent)

    def _install(self, version: RoutingVersion, config: Config | None = None) -> None:
        self.live.install(version.routing, version.version, config)
        if config is not None:
            self.config = config
        self._current = version
        self.problem = None if version.version == self.newest else self.problem
        self.applied_at = time.time()

    def _install_newest(self) -> bool:
        """Install the newest known version if it fits this instance's backends; else say why."""
        latest = self.history[-1]
        problems = latest.routing.problems(self.config.backends)
        if problems:
            self.problem = (
                f"routing version {latest.version} names backends this instance lacks ({'; '.join(problems)}); "
                f"still serving version {self.current.version}: declare them here and reload"
            )
            log.error("%s", self.problem)
            return False
        if latest is not self._current:
            self._install(latest)
        return True

    async def close(self) -> None:
        if isinstance(self.store, PgStore) and self.store.connected:
            with contextlib.suppress(StoreUnavailable):
                await self.store.leave(self.instance)
        await self.store.close()

    # --- changes ----------------------------------------------------------------------------

    def _check_live(self) -> None:
        if not self.config.control.live:
            raise ControlError(
                "routing is fixed at startup ([control] live = false); set live = true and restart to change it",
            )

    def _check_expected(self, expect_version: int | None) -> None:
        if expect_version is not None and expect_version != self.current.version:
            raise VersionConflict(
                f"routing is at version {self.current.version}, not {expect_version} as expected; "
                "read the current state and try again"
            )

    async def _commit(
        self,
        routing: RoutingConfig,
        source: str,
        caller: str,
        note: str = "",
        *,
        config: Config | None = None,
        expect_version: int | None = None,
    ) -> tuple[RoutingVersion, bool]:
        """Validate, persist, install. Returns (version, whether anything changed); must hold _lock."""
        self._check_expected(expect_version)
        backends = (config or self.config).backends
        problems = routing.problems(backends)
        if problems:
            raise ControlError("; ".join(problems))
        routing = routing.named()
        if routing == self.current.routing and config is None:
            return self.current, False  # idempotent: the same state again is not a new version
        if routing == self.current.routing:
            self._install(self.current, config)
            return self.current, False
        version = self._next(routing, source, caller, note)
        await self._persist(version)
        self.history.append(version)
        self._install(version, config)
        self.changes[source] += 1
        log.info(
            "routing version %d by %s (%s): %s",
            version.version,
            caller,
            source,
            "; ".join(describe_change(self.history[-2].routing if len(self.history) > 1 else None, routing)),
        )
        return version, True

    async def _persist(self, version: RoutingVersion) -> None:
        try:
            await self.store.append(version)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            raise StoreUnavailable(
                f"{exc.message}; the change was not made (routing stays at version {self.live.version})"
            ) from None
        except VersionConflict:
            self._poke.set()  # another instance was first: catch up now
            raise
        self._store_ok()

    async def put(
        self, routing: RoutingConfig, caller: str, note: str = "", expect_version: int | None = None
    ) -> tuple[RoutingVersion, bool]:
        async with self._lock:
            self._check_live()
            return await self._commit(routing, "put", caller, note, expect_version=expect_version)

    async def patch(
        self, changes: dict[str, Any], caller: str, rule: str | None = None, note: str = "",
        expect_version: int | None = None,
    ) -> tuple[RoutingVersion, bool]:  # fmt: skip
        """Change some fields of the default routing, or of one rule (``rule``): any of ``reads``,
        ``sticky``, ``mirrors`` (routing only), criteria (rules only)."""
        async with self._lock:
            self._check_live()
            current = self.current.routing
            if not isinstance(changes, dict) or not changes:
                raise ControlError('body must be a JSON object with the fields to change, e.g. {"reads": {"old": 90}}')
            if rule is None:
                allowed = {"reads", "sticky", "mirrors"}
                document = current.model_dump(mode="json", exclude_none=True)
            else:
                names = [r.name for r in current.rules]
                if rule not in names:
                    known = ", ".join(str(n) for n in names) or "(none)"
                    raise ControlError(f"no rule named {rule!r}; rules: {known}")
                allowed = {"reads", "sticky", "tables", "users", "application_names"}
                document = current.model_dump(mode="json", exclude_none=True)
            unknown = sorted(set(changes) - allowed)
            if unknown:
                raise ControlError(
                    f"cannot change {', '.join(unknown)} here; allowed fields: {', '.join(sorted(allowed))}"
                    + ("" if rule is None else " (use PUT /api/routing to rename or reorder rules)")
                )
            if rule is None:
                document.update(changes)
            else:
                index = [r.name for r in current.rules].index(rule)
                document["rules"][index].update(changes)
            routing = parse_routing(document, "routing")
            return await self._commit(routing, "patch", caller, note, expect_version=expect_version)

    async def flip(
        self, primary: str, caller: str, note: str = "", expect_version: int | None = None, *, force: bool = False
    ) -> tuple[RoutingVersion, bool]:
        """Make ``primary`` the primary. Roles swap: if it was a mirror, the old primary takes its
        place among the mirrors (so it keeps receiving writes and a rollback stays instant)."""
        async with self._lock:
            self._check_live()
            current = self.current.routing
            if primary not in self.config.backends:
                declared = ", ".join(sorted(self.config.backends))
                raise ControlError(f"cannot flip to {primary!r}: not a backend; declared backends: {declared}")
            probe = self.probes.get(primary)
            if probe is not None and not probe.up and not force and primary != current.primary:
                # Sessions cannot write anywhere else once they moved: each would end at its next request.
                raise ControlError(
                    f"backend {primary!r} was unreachable at the last probe ({probe.error}); a flip now would end "
                    "every session at its next request. Check it, or flip with force"
                )
            mirrors = [current.primary if m == primary else m for m in current.mirrors]
            routing = current.model_copy(update={"primary": primary, "mirrors": mirrors})
            note = note or f"primary {current.primary} -> {primary}"
            return await self._commit(routing, "flip", caller, note, expect_version=expect_version)

    async def rollback(
        self, caller: str, to: int | None = None, note: str = "", expect_version: int | None = None
    ) -> tuple[RoutingVersion, bool]:
        """Restore an earlier version's routing exactly (default: the one the current replaced),
        as a new version: history only grows."""
        async with self._lock:
            self._check_live()
            current = self.current
            target_number = to if to is not None else current.parent
            if target_number is None:
                raise ControlError(f"version {current.version} is the first one: there is nothing to roll back to")
            target = next((v for v in self.history if v.version == target_number), None)
            if target is None:
                raise ControlError(
                    f"no routing version {target_number}; versions are 1 to {current.version} (see pgshift history)"
                )
            return await self._commit(
                target.routing, "rollback", caller, note or f"restores version {target.version}",
                expect_version=expect_version,
            )  # fmt: skip

    async def reload(self, caller: str) -> ReloadResult:
        """Re-read config.toml. An invalid file changes nothing (ConfigError says why). Its
        [routing] becomes a new version only if it differs from what the file said last time."""
        if self.config_path is None:
            raise ControlError("this proxy was not started from a config file; there is nothing to reload")
        new = await asyncio.to_thread(load_config, self.config_path)
        warnings = []
        old = self.config
        for section in ("listen", "admin", "control", "verify"):
            if getattr(old, section) != getattr(new, section):
                warnings.append(f"[{section}] changed: takes effect at restart")
        new = new.model_copy(
            update={"listen": old.listen, "admin": old.admin, "control": old.control, "verify": old.verify}
        )
        async with self._lock:
            last_file = self._last_from_file()
            file_routing = new.routing.named()
            routing_changed = last_file is None or last_file.routing != file_routing
            if routing_changed:
                self._check_live()
                version, _ = await self._commit(
                    file_routing, "reload", caller, "config.toml [routing] changed", config=new
                )
            else:
                problems = self.current.routing.problems(new.backends)
                if problems:
                    raise ControlError(
                        f"the new config does not fit the running routing version {self.current.version}: "
                        f"{'; '.join(problems)}; change the routing first"
                    )
                self._install(self.current, new)
                if self.newest != self.current.version:
                    self._install_newest()  # a version that waited for a backend this file declares
                version = self.current
        log.info("config reloaded by %s%s", caller, "; ".join(["", *warnings]))
        return ReloadResult(version, routing_changed, warnings)

    # --- other instances (shared store) -----------------------------------------------------

    def _notified(self) -> None:
        self._poke.set()

    def poke(self) -> None:
        """Look at the shared store now (new versions, heartbeat) rather than at the next beat."""
        self._poke.set()

    async def refresh(self) -> None:
        """Install versions other instances made (newest valid one wins)."""
        async with self._lock:
            newer = await self.store.load(after=self.newest)
            if not newer:
                return
            self.history.extend(newer)
            if self._install_newest():
                latest = self.current
                log.info("routing version %d installed (%s by %s)", latest.version, latest.source, latest.caller)

    def _store_ok(self) -> None:
        health = self.store_health
        if not health.ok:
            log.warning("control store %s reachable again", self.store.location)
        health.ok, health.error, health.down_since = True, None, None

    def _store_failed(self, exc: StoreUnavailable) -> None:
        health = self.store_health
        if health.ok:
            log.error("%s; serving routing version %d until it is back", exc.message, self.live.version)
            health.down_since = time.time()
        health.ok, health.error = False, exc.message

    async def run(self, stop: asyncio.Event) -> None:
        """Background work until ``stop``: store heartbeat and catch-up, backend probes."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._rates_loop(stop), name="control-rates")
            if self.config.control.health_interval:
                tasks.create_task(self._probe_loop(stop), name="control-probes")
            if isinstance(self.store, PgStore):
                tasks.create_task(self._store_loop(self.store, stop), name="control-store")

    async def _store_loop(self, store: PgStore, stop: asyncio.Event) -> None:
        interval = self.config.control.heartbeat
        while not stop.is_set():
            poked = False
            try:
                async with asyncio.timeout(interval):
                    await _first(self._poke.wait(), stop.wait())
                poked = self._poke.is_set()
            except TimeoutError:
                pass
            if stop.is_set():
                return
            self._poke.clear()
            try:
                if poked:
                    await self.refresh()
                newest = await store.heartbeat(self.instance, self.live.version, _host(), self.admin_address)
                if newest > self.newest:
                    await self.refresh()
                self.instances = await store.instances()
                self._store_ok()
            except StoreUnavailable as exc:
                self._store_failed(exc)
            except PgShiftError as exc:  # e.g. a version row this instance cannot read
                self._store_failed(StoreUnavailable(f"control store {store.location}: {exc.message}"))
            except Exception as exc:  # a bug: keep serving the last version, keep trying, say so
                log.exception("control store loop failed")
                self._store_failed(StoreUnavailable(f"control store {store.location}: internal error: {exc!r}"))

    async def _probe_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            backends = self.config.backends
            results = await asyncio.gather(*(probe(b.address) for b in backends.values()))
            self.probes = dict(zip(backends, results, strict=True))
            await _sleep(self.config.control.health_interval, stop)

    async def _rates_loop(self, stop: asyncio.Event) -> None:
        """Samples of the request counters: status shows rates over the last minute."""
        while not stop.is_set():
            self.window.sample(self.requests, list(self.config.backends))
            await _sleep(RATE_SAMPLE_INTERVAL, stop)


async def _sleep(seconds: float, stop: asyncio.Event) -> None:
    """Sleep, but wake as soon as ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def _first(*aws: Any) -> None:
    """Wait until the first of ``aws`` finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _host() -> str:
    return socket.gethostname()
