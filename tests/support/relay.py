"""A small TCP fault relay for tests: sits between the proxy and a backend and misbehaves on demand.

Runs its own asyncio loop in a background thread (like ProxyThread), so blocking tests can drive
it. Listens on a free 127.0.0.1 port and forwards every accepted connection to ``target``.

- ``accepted``: how many connections it has accepted (e.g. "nothing reached the backend").
- ``sever(index=None)``: abort current connections abruptly (RST); all, or only the
  ``index``-th accepted one (0-based, in accept order).
- ``stall()`` / ``resume()``: stop / restart forwarding in both directions (nothing is read
  while stalled, so buffers stay bounded and the peers' TCP windows fill up).
- ``cut_after(n)``: the next accepted connection is aborted once ``n`` bytes (both directions
  together) have passed through it.

``close()`` (or leaving the ``with`` block) aborts everything and stops the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

_CHUNK = 64 * 1024
_T = TypeVar("_T")


class _Link:
    """One relayed connection: the accepted socket and the one to the target."""

    def __init__(self, index: int, cut_after: int | None) -> None:
        self.index = index
        self.budget = cut_after  # bytes left before the cut; None = no cut
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0: close() sends RST, like a crashed host or a dropped route.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class Relay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.accepted = 0
        self._links: list[_Link] = []
        self._cut_next: int | None = None
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-fault-relay", daemon=True)
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Relay:
        self._thread.start()
        self._call(self._start)
        return self

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._shutdown)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = [t for link in self._links for t in link.tasks]
        for link in self._links:
            link.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self._server.wait_closed()

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dsn(self, user: str = "", dbname: str = "", password: str | None = None, **params: str) -> str:
        """A backend DSN that goes through the relay (empty user/dbname: the client's pass through)."""
        auth = user if password is None else f"{user}:{password}"
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}" + (f"?{query}" if query else "")

    # --- faults (callable from any thread) ------------------------------------------------------

    @property
    def active(self) -> int:
        """Connections currently open through the relay."""
        return self._call_sync(lambda: sum(1 for link in self._links if not link.closed))

    def sever(self, index: int | None = None) -> int:
        """Abort current connections (all, or the ``index``-th accepted); returns how many."""

        def run() -> int:
            hit = [link for link in self._links if not link.closed and (index is None or link.index == index)]
            for link in hit:
                link.abort()
            return len(hit)

        return self._call_sync(run)

    def stall(self) -> None:
        self._call_sync(lambda: self._flow().clear())

    def resume(self) -> None:
        self._call_sync(lambda: self._flow().set())

    def cut_after(self, n_bytes: int) -> None:
        """Abort the next accepted connection once ``n_bytes`` have passed through it."""

        def run() -> None:
            self._cut_next = n_bytes

        self._call_sync(run)

    # --- internals -----------------------------------------------------------------------------

    def _flow(self) -> asyncio.Event:
        assert self._flowing is not None
        return self._flowing

    def _call(self, coro_fn: Callable[[], Any], timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout)

    def _call_sync(self, fn: Callable[[], _T]) -> _T:
        async def wrapper() -> _T:
            return fn()

        result: _T = self._call(wrapper)
        return result

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(self.accepted, self._cut_next)
        self.accepted += 1
        self._cut_next = None
        self._links = [x for x in self._links if not x.closed]
        self._links.append(link)
        link.writers.append(writer)
        link.tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            link.abort()
            return
        link.writers.append(up_writer)
        if link.closed:  # severed while connecting
            up_writer.transport.abort()
            return
        down = asyncio.create_task(self._pump(link, up_reader, writer))
        up = asyncio.create_task(self._pump(link, reader, up_writer))
        link.tasks += [down, up]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([down, up], return_when=asyncio.FIRST_COMPLETED)
        link.abort()
        await asyncio.wait([down, up])

    async def _pump(self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        flowing = self._flow()
        try:
            while not link.closed:
                await flowing.wait()
                data = await src.read(_CHUNK)
                if not data:
                    return  # EOF: end the whole link (Postgres peers never half-close)
                await flowing.wait()  # stalled while this chunk was in flight: hold it
                if link.budget is not None:
                    if len(data) >= link.budget:
                        # Deliver exactly the allowed bytes, then the caller aborts the link.
                        dst.write(data[: link.budget])
                        link.budget = 0
                        await dst.drain()
                        return
                    link.budget -= len(data)
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            return
