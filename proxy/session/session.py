"""One client session: handshake, then the relay between the client and its backend connection."""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.backends.connection import BackendConnection, BackendSink
from proxy.errors import (
    AdminShutdown,
    BackendRejected,
    BackendUnavailable,
    FeatureNotSupported,
    PgShiftError,
    ProtocolViolation,
    ProxyBug,
)
from proxy.mirror.manager import MirrorManager
from proxy.observability import RequestStats
from proxy.routing import Live, RoutingStats
from proxy.session.catalog import FunctionCatalog
from proxy.session.client import ClientConnection, ClientGone
from proxy.session.handshake import ScramKeys, authenticate, read_startup
from proxy.session.pause import WritePause
from proxy.session.registry import SessionRegistry
from proxy.sql import AnalysisCache
from proxy.wire.codes import TxStatus
from proxy.wire.messages import AUTH_OK, BackendKeyData, CancelRequest, ErrorResponse, ParameterStatus, ReadyForQuery

log = logging.getLogger(__name__)

_IDLE = TxStatus.IDLE.value


def _discard(_data: bytes) -> None:
    """Write target of a side that is gone (or not connected yet)."""


class SessionState(enum.Enum):
    HANDSHAKE = "handshake"  # TLS, startup packet, client auth, backend login
    RELAY = "relay"  # requests and replies flow
    DRAINING = "draining"  # shutdown: finish what runs, then FATAL 57P01
    CLOSED = "closed"


_TRANSITIONS = {
    SessionState.HANDSHAKE: {SessionState.RELAY, SessionState.CLOSED},
    SessionState.RELAY: {SessionState.DRAINING, SessionState.CLOSED},
    SessionState.DRAINING: {SessionState.CLOSED},
    SessionState.CLOSED: set(),
}


@dataclass(frozen=True)
class SessionContext:
    """What every session of one server shares. ``live`` holds the config and routing table the
    control plane swaps; the counters and the cache are shared mutable state of the one event loop."""

    live: Live
    registry: SessionRegistry
    tls: ssl.SSLContext | None
    analysis: AnalysisCache
    stats: RoutingStats
    requests: RequestStats
    rng: random.Random
    catalog: FunctionCatalog
    mirror: MirrorManager
    pause: WritePause = field(default_factory=WritePause)  # a cut-over's write pause (session/pause.py)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    primary: str
    pinned: frozenset[str]  # causes (see sql.Pin)
    backends: tuple[str, ...]  # open backend connections
    in_transaction: bool


class Session(BackendSink):
    def __init__(self, ctx: SessionContext, client: ClientConnection) -> None:
        self.ctx = ctx
        self.client = client
        self.state = SessionState.HANDSHAKE
        self.backend: BackendConnection | None = None
        self.primary = ""  # the backend that holds this session's writes (and its transactions)
        self.cancel_key: tuple[int, int] | None = None
        self._draining = False  # mirrors state DRAINING; a plain bool for the hot path
        self.user = ""
        self.client_params: dict[str, str] = {}
        self.scram_keys: ScramKeys | None = None
        # Bound transport writes, cached once relaying starts (the hot path calls them directly).
        self._to_backend: Callable[[bytes], object] = _discard
        self._to_client: Callable[[bytes], object] = _discard
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _to(self, state: SessionState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise AssertionError(f"session state {self.state.value} -> {state.value} is not allowed")
        self.state = state

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        registry = self.ctx.registry
        registry.add(self)
        try:
            await self._handshake()
            if self.state is SessionState.RELAY:
                await self._done
        except ClientGone:
            log.debug("client %s left during startup", self.client.peer)
        except BackendRejected as exc:
            self.client.write(ErrorResponse(exc.fields).encode())
        except PgShiftError as exc:
            log.info("session %s (user %r): %s", self.client.peer, self.user, exc.message)
            self.client.send_error(exc)
        except TimeoutError:
            log.info("client %s did not finish startup in time; closing", self.client.peer)
        except asyncio.CancelledError:
            self.client.send_error(AdminShutdown())
            raise
        except Exception:
            # A bug must end only this session, never the proxy (and never silently).
            log.exception("session %s failed", self.client.peer)
            self.client.send_error(ProxyBug())
        finally:
            self._close()
            registry.remove(self)
            self.ctx.pause.forget(self)
            # The task ends when the backend sockets have closed (a TLS close takes a round
            # trip), so a shutdown that waits for session tasks leaves no socket behind.
            for backend in self._all_backends():
                await backend.wait_closed()

    async def _handshake(self) -> None:
        config = self.ctx.live.config
        async with asyncio.timeout(config.proxy.auth_timeout):
            startup = await read_startup(self.client, self.ctx.tls, config.listen.tls_required)
            if isinstance(startup, CancelRequest):
                await self._forward_cancel(startup)
                return
            params = startup.params
            self.user = params["user"]
            if "replication" in params and params["replication"].lower() not in ("false", "off", "no", "0"):
                raise FeatureNotSupported(
                    "pgshift does not proxy replication connections",
                    hint="Point replication and CDC tools at the database itself.",
                )
            self.scram_keys = await authenticate(self.client, self.user, config.auth.for_user(self.user))
            self.client_params = params
            self.primary = self.ctx.live.table.primary
            self.backend = await self._open_backend(self.primary)
        self._greet(self.backend)
        self._start_relay(self.backend)

    async def _open_backend(self, name: str) -> BackendConnection:
        """Log in to backend ``name`` as this client (same user, database, startup parameters)."""
        config = self.ctx.live.config
        backend = config.backends.get(name)
        if backend is None:  # a reload removed it while this session still wanted it
            raise BackendUnavailable(f'backend "{name}" is no longer in the configuration')
        address = backend.address
        keys = self.scram_keys
        params = dict(self.client_params)
        # A DSN that pins user/dbname maps every client to them (service-account mode).
        if address.user:
            params["user"] = address.user
        if address.dbname:
            params["database"] = address.dbname
        scram = (keys.client_key, keys.server_key) if keys and params["user"] == self.user else None
        return await BackendConnection.open(
            name,
            address,
            params,
            password=address.password,
            scram_keys=scram,
            max_message_size=config.proxy.max_message_size,
        )

    def _greet(self, backend: BackendConnection) -> None:
        """The client sees one server: the primary's parameters, its real pid, our secret."""
        result = backend.startup
        assert result is not None
        pid = result.key.pid if result.key else 0
        secret = self.ctx.registry.issue_key(self, pid)
        out = [AUTH_OK, *result.notices]
        out.extend(ParameterStatus(k, v).encode() for k, v in result.parameters.items())
        out.append(BackendKeyData(pid, secret).encode())
        out.append(ReadyForQuery(TxStatus(result.tx_status)).encode())
        self.client.write(b"".join(out))

    def _start_relay(self, backend: BackendConnection) -> None:
        self._to(SessionState.RELAY)
        client = self.client
        assert client.transport is not None and backend.transport is not None
        self._to_client = client.transport.write
        self._to_backend = backend.transport.write
        self._count_errors(backend)
        early = backend.attach(self)
        if early:
            self._to_client(early)
        self._listen_to_client()

    def _count_errors(self, backend: BackendConnection) -> None:
        backend.scanner.on_error = functools.partial(self.ctx.requests.error, backend.name)

    def describe(self) -> SessionInfo:
        """For status: where this session's writes go and what keeps it there."""
        return SessionInfo(
            self.primary,
            frozenset(),
            tuple(b.name for b in self._all_backends()),
            any(b.scanner.tx_status != _IDLE for b in self._all_backends()),
        )

    def _listen_to_client(self) -> None:
        """Hand the client's callbacks to the relay, then relay what it already sent."""
        client = self.client
        client.on_lost = self._client_lost
        client.on_write_paused = self._client_write_paused
        client.on_failure = self.relay_failed
        unread = client.take_unread()
        client.on_data = self._client_data
        if unread:
            self._client_data(unread)
        if client.closed:
            self._finish()

    async def _forward_cancel(self, request: CancelRequest) -> None:
        target = self.ctx.registry.by_key(request.pid, request.secret)
        if target is None:
            log.info("cancel request with an unknown key from %s ignored", self.client.peer)
            return
        await target.cancel_running()

    def _all_backends(self) -> list[BackendConnection]:
        return [self.backend] if self.backend is not None else []

    async def cancel_running(self) -> None:
        """Cancel whatever this session's backends are running (a no-op when they are idle)."""
        for backend in self._all_backends():
            if not backend.scanner.idle:
                await backend.cancel()

    def begin_shutdown(self) -> None:
        """Stop accepting: idle sessions end now, busy ones when their request is answered."""
        if self.state is SessionState.RELAY:
            self._to(SessionState.DRAINING)
            self._draining = True
            self._end_if_drained()
        elif self.state is SessionState.HANDSHAKE:
            self.client.send_error(AdminShutdown())
            self._finish()
            self.client.close()

    def force_close(self) -> None:
        if self.state is not SessionState.CLOSED:
            self.client.send_error(AdminShutdown())
            self._finish()

    def _end_if_drained(self) -> None:
        if all(b.scanner.idle and b.scanner.tx_status == _IDLE for b in self._all_backends()):
            self.client.send_error(AdminShutdown())
            self._finish()

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _close(self) -> None:
        if self.state is not SessionState.CLOSED:
            self._to(SessionState.CLOSED)
        self._to_backend = self._to_client = _discard
        for backend in self._all_backends():
            backend.terminate()
        self.client.close()

    # --- relay (callbacks: the hot path) ---------------------------------------------------------

    def _client_data(self, data: bytes) -> None:
        try:
            buf, frames = self.client.reader.feed(data)
        except ProtocolViolation as exc:
            self.client.send_error(exc)
            self._finish()
            return
        if not frames:
            return
        backend = self.backend
        assert backend is not None
        terminate_at = backend.expected.push_frames(frames)
        if terminate_at < 0:
            self._to_backend(buf)
            return
        if terminate_at:
            self._to_backend(buf[:terminate_at])
        self._finish()  # the client said goodbye; we close the backend ourselves

    def backend_data(self, data: bytes) -> None:
        if data:
            self._to_client(data)
        if self._draining:
            self._end_if_drained()

    def backend_lost(self, conn: BackendConnection, exc: BaseException | None) -> None:
        if self.state is SessionState.CLOSED or self._done.done():
            return
        detail = str(exc) if exc else None
        log.warning('session %s: backend "%s" closed the connection (%s)', self.client.peer, conn.name, detail)
        if conn.scanner.ended_with_error:
            # Its last word was an error (FATAL "terminating connection due to administrator
            # command"): the client sees that and the close, as when connected directly.
            self._finish()
            return
        self.client.send_error(
            BackendUnavailable(
                f'server closed the connection unexpectedly: backend "{conn.name}" ({conn.address.label()}) '
                "ended the session",
                detail=detail,
            )
        )
        self._finish()

    def relay_failed(self, exc: Exception) -> None:
        """A bug in the relay code: this session ends with an error the client sees; others go on."""
        if self._done.done():
            return
        log.error("session %s: internal error in the relay; ending the session", self.client.peer, exc_info=exc)
        self.client.send_error(ProxyBug())
        self._finish()

    def _client_lost(self) -> None:
        self._to_client = _discard  # replies still in flight have nowhere to go
        self._finish()

    def _client_write_paused(self, paused: bool) -> None:
        # The client reads slower than the backend answers: stop reading the backend so the
        # kernel buffers fill and Postgres waits, instead of proxy memory growing.
        for backend in self._all_backends():
            if paused:
                backend.pause_reading()
            else:
                backend.resume_reading()

    def backend_write_paused(self, paused: bool) -> None:
        # The backend reads slower than the client sends (a big COPY FROM): stop reading the client.
        if paused:
            self.client.pause_reading()
        else:
            self.client.resume_reading()
