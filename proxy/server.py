"""The client listener: accepts sockets, runs one session task each, drains them at shutdown."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl

from proxy.config import Config
from proxy.routing import RoutingStats, RoutingTable
from proxy.session.catalog import FunctionCatalog
from proxy.session.client import ClientConnection
from proxy.session.registry import SessionRegistry
from proxy.session.routed import RoutedSession
from proxy.session.session import Session, SessionContext
from proxy.sql import AnalysisCache

log = logging.getLogger(__name__)


def tls_context(config: Config) -> ssl.SSLContext | None:
    listen = config.listen
    if listen.tls_cert is None or listen.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(listen.tls_cert, listen.tls_key)
    return ctx


class Server:
    """Owns the listening socket, the session registry and every session task."""

    def __init__(self, config: Config) -> None:
        self.registry = SessionRegistry()
        routing = RoutingTable.from_config(config)
        self.ctx = SessionContext(
            config=config,
            registry=self.registry,
            tls=tls_context(config),
            routing=routing,
            analysis=AnalysisCache(),
            stats=RoutingStats(),
            rng=random.Random(),
            catalog=FunctionCatalog(),
        )
        # Statement analysis and multi-backend bookkeeping only when reads can leave the primary;
        # otherwise every session is a plain relay to it (the fastest path).
        self._session_class: type[Session] = RoutedSession if routing.splits_reads else Session
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        sock: socket.socket = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        listen = self.ctx.config.listen
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self.ctx.config.proxy.max_message_size, self._spawn),
            listen.host,
            listen.port,
            backlog=1024,
            reuse_address=True,
        )
        log.info(
            "listening on %s:%d%s",
            listen.host,
            self.port,
            " (TLS available)" if self.ctx.tls else "",
        )

    def _spawn(self, client: ClientConnection) -> None:
        # Called from connection_made: each client gets a named task the server tracks, so
        # shutdown can wait for (and, past the grace period, cancel) every one of them.
        self._next_id += 1
        session = self._session_class(self.ctx, client)
        task = asyncio.get_running_loop().create_task(session.run(), name=f"session-{self._next_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, grace: float) -> None:
        """Stop accepting, let running requests finish within ``grace`` s, then end every session."""
        if self._server is not None:
            self._server.close()
        busy = len(self.registry)
        log.info("shutting down: %d session(s), grace period %.1f s", busy, grace)
        for session in self.registry:
            session.begin_shutdown()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            if pending:
                log.info("grace period over: closing %d busy session(s)", len(pending))
                for session in self.registry:
                    session.force_close()
                _, pending = await asyncio.wait(pending, timeout=2.0)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=2.0)
        if self._server is not None:
            await self._server.wait_closed()
        log.info("stopped")
