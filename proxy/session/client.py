"""asyncio.Protocol for a client socket: awaitable reads during setup, callbacks while relaying."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast

from proxy.errors import PgShiftError, ProtocolViolation
from proxy.wire.codes import FRONTEND_CODES
from proxy.wire.framing import FrameReader
from proxy.wire.messages import ErrorResponse

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class ClientGone(Exception):
    """The client closed its connection (not an error worth a log line above debug)."""


class ClientConnection(asyncio.Protocol):
    """The client side of one session."""

    def __init__(self, max_message_size: int, on_connect: Callable[[ClientConnection], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(max_message_size, FRONTEND_CODES)
        self.closed = False
        self.tls = False
        self.peer: str = "?"
        self._on_connect = on_connect
        self._inbox: list[bytes] = []
        self._messages: deque[tuple[int, bytes]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        # Relay-mode callbacks, set by the session.
        self.on_data: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.on_write_paused: Callable[[bool], None] | None = None
        self.on_failure: Callable[[Exception], None] | None = None  # a bug in on_data

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        on_data = self.on_data
        if on_data is not None:
            try:
                on_data(data)
            except Exception as exc:  # a bug in the relay: contained to this session
                if self.on_failure is None:
                    raise
                self.on_failure(exc)
            return
        self._inbox.append(data)
        self._wake()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        if self.on_write_paused is not None:
            self.on_write_paused(True)

    def resume_writing(self) -> None:
        if self.on_write_paused is not None:
            self.on_write_paused(False)

    # --- setup-phase reads ------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        if self.closed:
            raise ClientGone
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _take_inbox(self) -> bytes:
        data = b"".join(self._inbox)
        self._inbox.clear()
        return data

    async def read_startup_packet(self) -> bytes:
        while True:
            packet = self.reader.feed_startup(self._take_inbox())
            if packet is not None:
                return packet
            await self._wait()

    async def read_message(self) -> tuple[int, bytes]:
        while not self._messages:
            data = self._take_inbox()
            if data or self.reader.buffered:
                buf, frames = self.reader.feed(data)
                for code, start, end in frames:
                    self._messages.append((code, buf[start + 5 : end]))
                if self._messages:
                    break
            await self._wait()
        return self._messages.popleft()

    def has_unread(self) -> bool:
        return bool(self._inbox) or self.reader.buffered > 0 or bool(self._messages)

    def take_unread(self) -> bytes:
        """Bytes the client already sent past the setup exchange (pipelined early)."""
        if self._messages:
            raise ProtocolViolation("client sent messages before authentication completed")
        return self.reader.take_buffered() + self._take_inbox()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        if self.has_unread():
            # Postgres refuses this too (CVE-2021-23214): data sent before the handshake is unsafe.
            raise ProtocolViolation("received unencrypted data after SSL request")
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        tls = await loop.start_tls(self.transport, self, context, server_side=True)
        if tls is None:
            raise ClientGone
        self.transport = tls
        self.tls = True

    # --- writing -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def send_error(self, exc: PgShiftError) -> None:
        self.write(
            ErrorResponse.build(exc.severity, exc.sqlstate, exc.message, detail=exc.detail, hint=exc.hint).encode()
        )

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.closed = True

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
