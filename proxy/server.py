"""The client listener: accepts sockets, runs one session task each, drains them at shutdown."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field

from proxy.config import Config
from proxy.mirror.journal import Journal
from proxy.mirror.manager import MirrorManager
from proxy.observability import RequestStats
from proxy.routing import Live, RoutingStats
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


@dataclass
class SessionSummary:
    """What status shows about the sessions of one instance."""

    active: int = 0
    starting: int = 0  # still in the handshake
    in_transaction: int = 0
    pinned: int = 0
    pinned_by_cause: Counter[str] = field(default_factory=Counter)
    by_primary: Counter[str] = field(default_factory=Counter)  # where each session's writes go
    connections: Counter[str] = field(default_factory=Counter)  # open backend connections


@dataclass(frozen=True)
class PauseResult:
    drained: bool  # nothing runs on the primary: the pause holds (else it has ended again)
    seconds: float  # the drain's wait
    writing: int  # sessions still writing when the drain gave up


class Server:
    """Owns the listening socket, the session registry and every session task."""

    def __init__(self, config: Config, live: Live | None = None) -> None:
        self.registry = SessionRegistry()
        self.live = live or Live(config)
        self.ctx = SessionContext(
            live=self.live,
            registry=self.registry,
            tls=tls_context(config),
            analysis=AnalysisCache(),
            stats=RoutingStats(),
            requests=RequestStats(),
            rng=random.Random(),
            catalog=FunctionCatalog(),
            mirror=MirrorManager(self.live, Journal(config.mirror.journal)),
        )
        # A session that may have to follow a flip, or spread reads, knows its requests (analysis,
        # settings, prepared statements); with routing fixed at startup and every read on the
        # primary, each session is a plain relay to it (the fastest path).
        routed = config.control.live or self.live.table.splits_reads or bool(self.live.table.mirrors)
        self._session_class: type[Session] = RoutedSession if routed else Session
        self.draining = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        sock: socket.socket = self._server.sockets[0]
        return int(sock.getsockname()[1])

    @property
    def mirror(self) -> MirrorManager:
        return self.ctx.mirror

    async def start(self) -> None:
        self.ctx.mirror.start()
        listen = self.live.config.listen
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self.live.config.proxy.max_message_size, self._spawn),
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

    def sessions(self) -> SessionSummary:
        summary = SessionSummary()
        for session in self.registry:
            info = session.describe()
            if not info.primary:
                summary.starting += 1
                continue
            summary.active += 1
            summary.in_transaction += info.in_transaction
            if info.pinned:
                summary.pinned += 1
                summary.pinned_by_cause.update(info.pinned)
            summary.by_primary[info.primary] += 1
            summary.connections.update(info.backends)
        return summary

    @property
    def can_pause(self) -> bool:
        """Sessions know their requests (RoutedSession): a plain relay cannot hold one back."""
        return self._session_class is RoutedSession

    def writing(self) -> int:
        """Sessions with work under way on their primary (an open transaction, or a request not
        answered yet)."""
        return sum(1 for session in self.registry if isinstance(session, RoutedSession) and session.writing())

    async def pause_writes(self, reason: str, drain_timeout: float, max_seconds: float) -> PauseResult:
        """Pause new work on the primary, then wait until nothing runs there any more (drained),
        or give up after ``drain_timeout`` s: then the pause ends and everything goes on as before."""
        pause = self.ctx.pause
        pause.begin(reason, max_seconds)
        started = time.monotonic()
        while True:
            busy = self.writing()
            waited = time.monotonic() - started
            if not busy:
                return PauseResult(True, waited, 0)
            if waited >= drain_timeout or not pause.active:  # (or the pause expired meanwhile)
                pause.end()
                return PauseResult(False, waited, busy)
            await asyncio.sleep(0.002)

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
        self.draining = True
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
        # Queued mirror writes get what is left of the grace period (at least a moment); what
        # still waits after that is journaled as not applied.
        await self.ctx.mirror.close(drain=max(1.0, min(grace, 10.0)))
        log.info("stopped")
