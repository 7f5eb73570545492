"""Composition root: builds everything from a Config and runs it until told to stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from proxy.config import Config
from proxy.server import Server

log = logging.getLogger(__name__)


async def serve(
    config: Config,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Server], Awaitable[None] | None] | None = None,
    handle_signals: bool = True,
) -> None:
    """Run the proxy until ``stop`` is set or SIGINT/SIGTERM arrives, then shut down gracefully."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    server = Server(config)
    await server.start()
    # The relay allocates short-lived tuples and lists per message; with the default gen-0
    # threshold (700) the collector runs every few requests. Freeze what startup built and
    # collect less often: the relay creates no reference cycles.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        if on_ready is not None:
            result = on_ready(server)
            if result is not None:
                await result
        await stop.wait()
    finally:
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        await server.stop(config.proxy.shutdown_grace)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop (a Protocol-based relay on uvloop is what makes Python fast enough here)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; keep working without it
        log.warning("uvloop is not installed; running on the default asyncio loop (slower)")
        asyncio.run(main)
        return
    if sys.version_info >= (3, 12):
        uvloop.run(main)
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
