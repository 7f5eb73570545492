"""Composition root: builds everything from a Config and runs it until told to stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from proxy.admin.api import AdminApi
from proxy.admin.metrics import build_registry
from proxy.config import Config
from proxy.control.pgstore import PgStore
from proxy.control.plane import ControlPlane
from proxy.errors import ConfigError, PgShiftError
from proxy.migrate.coordinate import PauseAgent
from proxy.migrate.migrator import Migrator
from proxy.server import Server
from proxy.verify.sampler import Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Running:
    """What a started proxy consists of (tests and the demo get it through ``on_ready``)."""

    server: Server
    plane: ControlPlane
    admin: AdminApi | None
    sampler: Sampler | None = None  # continuous sampling ([verify] interval > 0)
    migrator: Migrator | None = None


async def serve(
    config: Config,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Running], Awaitable[None] | None] | None = None,
    handle_signals: bool = True,
    config_path: Path | None = None,
) -> None:
    """Run the proxy until ``stop`` is set or SIGINT/SIGTERM arrives, then shut down gracefully.
    SIGHUP re-reads ``config_path``."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    server = Server(config)
    listen_port = config.listen.port
    plane = ControlPlane(
        config,
        server.live,
        server.ctx.requests,
        instance=config.control.instance or f"{socket.gethostname()}:{listen_port}",
        config_path=config_path,
    )
    # The routing version is settled before the first client is accepted: a session must never
    # start on a primary that a persisted flip has already replaced.
    await plane.start()
    admin: AdminApi | None = None
    sampler: Sampler | None = None
    background: asyncio.Task[None] | None = None
    helpers: list[asyncio.Task[Any]] = []
    signals: list[signal.Signals] = []
    reloads: set[asyncio.Task[None]] = set()

    def reload_soon() -> None:
        task = loop.create_task(_reload(plane), name="sighup-reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    try:
        try:
            await server.start()
        except OSError as exc:
            raise _cannot_listen("listen", config.listen.host, listen_port, exc) from None
        if not listen_port and not config.control.instance:
            plane.instance = f"{socket.gethostname()}:{server.port}"
        if config.verify.enabled:
            # Backends from the running config (a reload may change them), the pair from the live
            # routing at each round; [verify] itself is read at startup.
            sampler = Sampler(config.verify, lambda: plane.config, lambda: plane.live.routing)
        migrator = Migrator(
            server, plane, verify=sampler.summary if sampler is not None else lambda: None,
            config_dir=config_path.parent if config_path is not None else None,
        )  # fmt: skip
        if config.admin.enabled:
            registry = build_registry(server, plane, migrator)
            if sampler is not None:
                registry.register(sampler.collector())
            admin = AdminApi(server, plane, registry, verify=sampler, migrator=migrator)
            try:
                await admin.start()
            except OSError as exc:
                raise _cannot_listen("admin", config.admin.host, config.admin.port, exc) from None
            plane.admin_address = f"{config.admin.host}:{admin.port}"
        background = loop.create_task(plane.run(stop), name="control-plane")
        if isinstance(plane.store, PgStore):
            # Every instance obeys the cut's pause through the shared store (migrate/coordinate.py).
            helpers.append(loop.create_task(PauseAgent(server, plane, plane.store).run(stop), name="pause-agent"))
        # The migration's state; a cut this instance was running when it died is finished or undone.
        helpers.append(loop.create_task(_run_migrator(migrator, stop), name="migrate"))
        if sampler is not None:
            sampler.start()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, reload_soon)
            signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        # The relay allocates short-lived tuples and lists per message; with the default gen-0
        # threshold (700) the collector runs every few requests. Freeze what startup built and
        # collect less often: the relay creates no reference cycles.
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        if on_ready is not None:
            result = on_ready(Running(server, plane, admin, sampler, migrator))
            if result is not None:
                await result
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        stop.set()
        if sampler is not None:
            await sampler.stop()  # (a round in progress is cancelled: nothing to finish)
        for helper in helpers:
            helper.cancel()
        if helpers:
            await asyncio.wait(helpers, timeout=2.0)
        await server.stop(config.proxy.shutdown_grace)
        if admin is not None:
            await admin.stop()
        if background is not None:
            try:
                await asyncio.wait_for(background, 5.0)
            except asyncio.CancelledError:
                pass
            except Exception:  # it must not turn a clean shutdown into a crash
                log.exception("control plane background work failed")
        await plane.close()


def _cannot_listen(section: str, host: str, port: int, exc: OSError) -> ConfigError:
    return ConfigError(
        f"cannot listen on {host}:{port} ([{section}] host/port): {exc.strerror or exc}",
        hint="Another process (another pgshift?) may hold the port; choose another or stop it.",
    )


async def _run_migrator(migrator: Migrator, stop: asyncio.Event) -> None:
    try:
        await migrator.start()
    except PgShiftError as exc:
        log.error("migration state: %s", exc.message)
    except Exception:  # the proxy serves on; `pgshift migrate status` reports the problem again
        log.exception("migration state could not be loaded")
    await migrator.run(stop)


async def _reload(plane: ControlPlane) -> None:
    try:
        result = await plane.reload("SIGHUP")
    except PgShiftError as exc:
        log.error("reload rejected, running state kept: %s", exc.message)
        return
    log.info(
        "reload done: routing version %d%s",
        result.version.version,
        " (new, from config.toml)" if result.routing_changed else " (unchanged)",
    )


T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop (a Protocol-based relay on uvloop is what makes Python fast enough here)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; keep working without it
        log.warning("uvloop is not installed; running on the default asyncio loop (slower)")
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
