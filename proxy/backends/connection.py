"""One connection to one backend: TCP/TLS, startup and auth (setup phase), then the reply relay."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import cast

from proxy.backends import pgpass
from proxy.config import BackendAddress
from proxy.errors import BackendUnavailable, PgShiftError, ProtocolViolation
from proxy.wire.framing import FrameReader
from proxy.wire.messages import TERMINATE, CancelRequest, SSLRequest, frame
from proxy.wire.replies import ExpectedReplies, ReplyScanner
from proxy.wire.startup import Credentials, StartupResult, StartupSteps, backend_startup

log = logging.getLogger(__name__)

# Above this much unsent data the peer's reading is paused (asyncio's default is 64 kB; a bit
# more keeps large results flowing in fewer, bigger writes while memory stays a few MB).
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
# How long a closing backend connection may take to finish its TLS shutdown before it is aborted.
CLOSE_GRACE = 1.0


class BackendSink:
    """What a backend connection calls in its owner (the session) once relaying."""

    def backend_data(self, data: bytes) -> None:
        raise NotImplementedError

    def backend_lost(self, conn: BackendConnection, exc: BaseException | None) -> None:
        raise NotImplementedError

    def backend_write_paused(self, paused: bool) -> None:
        raise NotImplementedError

    def relay_failed(self, exc: Exception) -> None:
        """A bug in the owner's reply handling: end that session (only), never the proxy."""
        raise NotImplementedError


def _ssl_context(address: BackendAddress) -> ssl.SSLContext:
    """TLS settings per libpq's sslmode semantics (libpq-ssl.html, table 34.1)."""
    if address.sslmode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        root = address.sslrootcert or str(Path.home() / ".postgresql" / "root.crt")
        ctx.load_verify_locations(cafile=root)
        ctx.check_hostname = address.sslmode == "verify-full"
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # require/prefer/allow: encryption without server identity
    return ctx


class BackendConnection(asyncio.Protocol):
    """asyncio.Protocol for a backend socket; ``open()`` runs setup, then replies are relayed."""

    def __init__(self, name: str, address: BackendAddress, max_message_size: int) -> None:
        self.name = name
        self.address = address
        self.expected = ExpectedReplies()
        self.scanner = ReplyScanner(self.expected, max_message_size)
        self.transport: asyncio.Transport | None = None
        self.startup: StartupResult | None = None
        self.closed = False
        self._sink: BackendSink | None = None
        self._on_data: Callable[[bytes], None] | None = None
        self._scan = True
        self._reader = FrameReader(max_message_size)
        self._inbox = bytearray()
        self._messages: deque[tuple[int, bytes]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self._gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- setup ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        name: str,
        address: BackendAddress,
        params: dict[str, str],
        *,
        password: str | None,
        scram_keys: tuple[bytes, bytes] | None,
        max_message_size: int,
    ) -> BackendConnection:
        """Connect and log in with the client's startup parameters; errors name the backend."""
        self = cls(name, address, max_message_size)
        loop = asyncio.get_running_loop()
        user = params.get("user", "")
        dbname = params.get("database", user)

        def lookup_password() -> str | None:
            if password is not None:
                return password
            return pgpass.lookup(address.host, address.port, dbname, user)

        creds = Credentials(
            password=lookup_password,
            scram_client_key=scram_keys[0] if scram_keys else None,
            scram_server_key=scram_keys[1] if scram_keys else None,
        )
        try:
            async with asyncio.timeout(address.connect_timeout):
                if address.is_unix:
                    path = f"{address.host}/.s.PGSQL.{address.port}"
                    await loop.create_unix_connection(lambda: self, path)
                else:
                    await loop.create_connection(lambda: self, address.host, address.port)
                if address.sslmode != "disable" and not address.is_unix:
                    await self._negotiate_tls(loop)
                self.startup = await self._drive(backend_startup(name, params, creds))
        except TimeoutError:
            self.abort()
            raise BackendUnavailable(
                f'backend "{name}" ({address.label()}) did not answer within {address.connect_timeout:g} s',
                hint="Check that the backend is up and reachable, or raise connect_timeout in its dsn.",
            ) from None
        except OSError as exc:
            self.abort()
            raise BackendUnavailable(
                f'cannot connect to backend "{name}" ({address.label()}): {exc.strerror or exc}',
                hint="Check that the backend is running and its dsn in the pgshift config is right.",
            ) from None
        except BaseException:
            self.abort()
            raise
        return self

    async def _negotiate_tls(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.transport is not None
        self.transport.write(SSLRequest().encode())
        await self._wait_for(lambda: len(self._inbox) >= 1)
        answer = bytes(self._inbox[:1])
        if len(self._inbox) > 1:
            # Bytes after 'S' before the handshake would be a man-in-the-middle (CVE-2021-23222).
            raise ProtocolViolation(f'backend "{self.name}" sent unencrypted data after its SSL response')
        self._inbox.clear()
        if answer == b"S":
            tls = await loop.start_tls(
                self.transport, self, _ssl_context(self.address), server_hostname=self.address.host
            )
            if tls is None:
                raise BackendUnavailable(f'TLS handshake with backend "{self.name}" failed')
            self.transport = tls
        elif answer == b"N":
            if self.address.sslmode in ("require", "verify-ca", "verify-full"):
                raise BackendUnavailable(
                    f'backend "{self.name}" does not support TLS, but its dsn says sslmode={self.address.sslmode}'
                )
        else:
            raise ProtocolViolation(f'backend "{self.name}" answered the SSL request with {answer!r}')

    async def _drive(self, steps: StartupSteps) -> StartupResult:
        """Run a sans-IO startup generator: bytes out are written, None asks for a message."""
        assert self.transport is not None
        out = steps.send(None)
        while True:
            try:
                if out is None:
                    out = steps.send(await self._next_message())
                else:
                    self.transport.write(out)
                    out = steps.send(None)
            except StopIteration as stop:
                result: StartupResult = stop.value
                return result

    async def _next_message(self) -> tuple[int, bytes]:
        while not self._messages:
            if self._inbox:
                data = bytes(self._inbox)
                self._inbox.clear()
                buf, frames = self._reader.feed(data)
                for code, start, end in frames:
                    self._messages.append((code, buf[start + 5 : end]))
                continue
            await self._wait_for(lambda: bool(self._inbox))
        return self._messages.popleft()

    async def _wait_for(self, ready: Callable[[], bool]) -> None:
        while not ready():
            if self._lost is not None or self.closed:
                raise BackendUnavailable(f'backend "{self.name}" closed the connection during startup')
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- relay ---------------------------------------------------------------------------

    def attach(self, sink: BackendSink, on_data: Callable[[bytes], None] | None = None, *, scan: bool = True) -> bytes:
        """Switch to relay mode; returns replies already received (to send to the client).
        ``on_data`` replaces ``sink.backend_data`` (e.g. a partial that names this connection).
        ``scan=False``: the bytes go to the sink as they arrive, without the reply scanner (a
        sink that frames the replies itself and injects nothing: the scanner would walk every
        message a second time, which a COPY of millions of rows feels)."""
        self._sink = sink
        self._on_data = on_data or sink.backend_data
        self._scan = scan
        leftover = self._reader.take_buffered() + bytes(self._inbox)
        self._inbox.clear()
        # Async messages (notices, parameter changes) that arrived right behind ReadyForQuery.
        pending = b"".join(frame(code, body) for code, body in self._messages)
        self._messages.clear()
        if not (pending or leftover):
            return b""
        return self.scanner.feed(pending + leftover) if scan else pending + leftover

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        on_data = self._on_data
        if on_data is None:
            self._inbox += data
            self._wake()
            return
        try:
            out = self.scanner.feed(data) if self._scan else data
        except PgShiftError as exc:
            self._fail(exc)
            return
        try:
            on_data(out)
        except Exception as exc:  # a bug above us: contained to this session (zero cost when none)
            if self._sink is None:
                raise
            self._sink.relay_failed(exc)

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self._lost = exc or ConnectionResetError("connection closed")
        self._wake()
        if not self._gone.done():
            self._gone.set_result(None)
        if self._sink is not None and not was_closed:
            self._sink.backend_lost(self, exc)

    def pause_writing(self) -> None:
        if self._sink is not None:
            self._sink.backend_write_paused(True)

    def resume_writing(self) -> None:
        if self._sink is not None:
            self._sink.backend_write_paused(False)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # --- ending --------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        log.warning('backend "%s": %s; closing its connection', self.name, exc)
        sink = self._sink
        self.abort()
        if sink is not None:
            sink.backend_lost(self, exc)

    def terminate(self) -> None:
        """Polite close: Terminate, then close once the write buffer is flushed."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.write(TERMINATE)
            self.transport.close()

    async def wait_closed(self) -> None:
        """Wait (bounded) until the socket is really closed, then abort if it is not.

        Closing a TLS connection waits for the peer's close_notify; a loop that stops first (the
        proxy shutting down) would leave the socket open. The session awaits this before ending.
        """
        if self.transport is None:
            return
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                await asyncio.shield(self._gone)
        except TimeoutError:
            self.transport.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
        self.closed = True

    async def cancel(self) -> None:
        """Send a CancelRequest for this connection's running query (a separate connection)."""
        if self.startup is None or self.startup.key is None:
            return
        key = self.startup.key
        await send_cancel(self.address, key.pid, key.secret)


async def send_cancel(address: BackendAddress, pid: int, secret: int) -> None:
    """CancelRequest on a fresh connection; the server answers by closing it (protocol-flow.html)."""
    try:
        async with asyncio.timeout(address.connect_timeout):
            if address.is_unix:
                reader, writer = await asyncio.open_unix_connection(f"{address.host}/.s.PGSQL.{address.port}")
            else:
                reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(CancelRequest(pid, secret).encode())
            await writer.drain()
            await reader.read()
            writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("cancel request to %s failed: %s", address.label(), exc)
