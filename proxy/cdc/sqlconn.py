"""A plain SQL connection to a configured backend on our own wire codec, for the sync tools' catalog queries.

The sync tools (``sync check``, ``sync sequences``) only read catalogs and call ``setval``: a
simple-query client is enough, and it keeps the cdc layer on our codec (no driver), as the
replication connection is. Queries return text; the tools ask the server for one JSON document
per query (``json_agg``), so types (booleans, numbers, NULLs, names with odd characters) survive
without a text-format parser per type.

The backfill also runs COPY through it: ``copy_out`` hands the CopyData frames of a ``COPY … TO
STDOUT`` on, undecoded, as they arrive, and ``copy_in``/``send_copy_data``/``end_copy`` feed them
to a ``COPY … FROM STDIN`` on another connection (frontend and backend CopyData share one layout).
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from proxy.backends.connection import BackendConnection, BackendSink
from proxy.config import BackendAddress, Config
from proxy.errors import (
    BackendAuthFailed,
    BackendRejected,
    BackendUnavailable,
    ConfigError,
    PgShiftError,
    ProtocolViolation,
)
from proxy.wire.codes import BackendCode, FrontendCode
from proxy.wire.framing import FrameReader
from proxy.wire.messages import CommandComplete, ErrorResponse, Query, decode_data_row, frame

# Catalog answers are small; a generous bound still stops a runaway reply.
MAX_MESSAGE_SIZE = 256 * 1024 * 1024
EXIT_UNREACHABLE = 3

_DATA_ROW = BackendCode.DATA_ROW.value
_ERROR = BackendCode.ERROR_RESPONSE.value
_READY = BackendCode.READY_FOR_QUERY.value
_COPY_DATA = BackendCode.COPY_DATA.value
_U32 = struct.Struct("!I")
_COPY_IN = BackendCode.COPY_IN_RESPONSE.value
_COPY_OUT = BackendCode.COPY_OUT_RESPONSE.value
_COMPLETE = BackendCode.COMMAND_COMPLETE.value
_COPY_DONE_FRAME = frame(FrontendCode.COPY_DONE, b"")

# What a COPY's CopyData frames are handed to: (the frames as sent, how many frames).
CopyForward = Callable[[bytes, int], None]


class DatabaseUnreachable(PgShiftError):
    """A backend could not be connected to (or its connection was lost): the CLI exits 3."""

    exit_code = EXIT_UNREACHABLE


class SqlError(PgShiftError):
    """The server answered a query with an ErrorResponse."""

    def __init__(self, message: str, *, sqlstate: str, detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, detail=detail, hint=hint)
        self.sqlstate = sqlstate


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    # E'' with backslashes doubled means the same whatever standard_conforming_strings is.
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def qualified(schema: str, name: str) -> str:
    """schema.name quoted for SQL."""
    return f"{quote_ident(schema)}.{quote_ident(name)}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A configured backend and the account the sync tools use on it."""

    backend: str  # the name in [backends.NAME]
    address: BackendAddress
    user: str
    database: str
    password: str | None  # None: ~/.pgpass, or no password (trust)

    def label(self) -> str:
        return f'backend "{self.backend}" ({self.address.label()}, database {self.database}, user {self.user})'

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "address": self.address.label(),
            "database": self.database,
            "user": self.user,
        }


def resolve_endpoint(config: Config, name: str, *, user: str | None = None, database: str | None = None) -> Endpoint:
    """The backend ``name`` of the config as an Endpoint.

    User: ``user`` if given, else the backend's mirror_user, else the dsn's user (its
    apply_account: the account that writes on a new database already). Database: ``database``,
    else the dsn's, else the user's name (as libpq does)."""
    backend = config.backends.get(name)
    if backend is None:
        known = ", ".join(sorted(config.backends))
        raise ConfigError(f"no backend {name!r} in the config (backends: {known})")
    address = backend.address
    account = backend.apply_account
    if user:
        # An account of the operator's choosing: the dsn's password (or ~/.pgpass), not the mirror's.
        password = address.password
    elif account is not None:
        user, password = account
    else:
        raise ConfigError(
            f'backend "{name}" names no user: set backends.{name}.mirror_user, a user in its dsn, or pass --user'
        )
    return Endpoint(name, address, user, database or address.dbname or user, password)


class _Framer(BackendSink):
    def __init__(self, owner: SqlConnection) -> None:
        self._owner = owner
        self._reader = FrameReader(MAX_MESSAGE_SIZE)
        self._in_copy = False  # COPY OUT rows are arriving: _forward_copy takes them
        self._copy_rest = 0  # bytes of the current CopyData frame still to come
        self._copy_head = b""  # the first bytes (< 5) of a frame header cut by the chunk's end

    def backend_data(self, data: bytes) -> None:
        owner = self._owner
        while data:
            if self._in_copy and owner._copy_forward is not None:
                data = self._forward_copy(data)
                if not data:
                    return
                self._in_copy = False  # CopyDone, or an error: the rows have ended
            buf, frames = self._reader.feed(data)
            data = b""
            for code, start, end in frames:
                owner._received(code, buf[start + 5 : end])
                if code == _COPY_OUT and owner._copy_forward is not None:
                    # The rows follow: the rest of the chunk, and the reader's tail (a message
                    # cut short), go round again, the fast way.
                    self._in_copy = True
                    data = buf[end:] + self._reader.take_buffered()
                    break

    def _forward_copy(self, data: bytes) -> bytes:
        """The COPY OUT fast path: forwards the CopyData frames at the start of ``data`` as they
        came, without decoding them, and returns what follows them (CopyDone and the rest).

        One walk over the frame headers, no object per row: a table of millions of rows passes
        through here. A frame cut by the end of the chunk is forwarded in part at once (the
        target's COPY IN reads a byte stream; a source that fails mid-frame closes the target's
        connection, which rolls its COPY back)."""
        forward = self._owner._copy_forward
        assert forward is not None
        if self._copy_head:
            data = self._copy_head + data
            self._copy_head = b""
        n = len(data)
        pos = 0
        rest = self._copy_rest
        if rest:
            pos = rest if rest < n else n
            self._copy_rest = rest - pos
            if pos == n:
                forward(data, 0)
                return b""
        count = 0
        unpack = _U32.unpack_from
        while n - pos >= 5:
            if data[pos] != _COPY_DATA:
                break
            length = unpack(data, pos + 1)[0]
            if length < 4:
                raise ProtocolViolation(f"{self._owner.endpoint.backend} sent a CopyData message of length {length}")
            end = pos + 1 + length
            count += 1
            if end >= n:
                self._copy_rest = end - n
                pos = n
                break
            pos = end
        else:
            if pos < n and data[pos] == _COPY_DATA:
                self._copy_head = data[pos:]  # a header cut short: wait for the rest of it
                if pos:
                    forward(data[:pos], count)
                return b""
        if pos:
            forward(data if pos == n else data[:pos], count)
        return data[pos:]

    def backend_lost(self, conn: BackendConnection, exc: BaseException | None) -> None:
        self._owner._lost(exc)

    def backend_write_paused(self, paused: bool) -> None:
        # Queries are small; only a COPY IN fed from another connection fills the socket buffer.
        if self._owner.on_write_paused is not None:
            self._owner.on_write_paused(paused)

    def relay_failed(self, exc: Exception) -> None:
        self._owner._lost(exc)


class SqlConnection:
    """One connection, one simple query at a time; results as text. Close with ``close()`` or
    use it as an async context manager."""

    def __init__(self, conn: BackendConnection, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._conn = conn
        self._replies: deque[tuple[int, bytes]] = deque()
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._gone: PgShiftError | None = None
        self._copy_forward: CopyForward | None = None
        # Called with True when this connection's unsent data passes the socket's high-water
        # mark, False when it drains (or the connection is lost): a COPY IN pauses its source.
        self.on_write_paused: Callable[[bool], None] | None = None

    @classmethod
    async def connect(cls, endpoint: Endpoint, application_name: str = "pgshift-sync") -> SqlConnection:
        params = {
            "user": endpoint.user,
            "database": endpoint.database,
            "application_name": application_name,
            "client_encoding": "UTF8",
        }
        try:
            conn = await BackendConnection.open(
                endpoint.backend,
                endpoint.address,
                params,
                password=endpoint.password,
                scram_keys=None,
                max_message_size=MAX_MESSAGE_SIZE,
            )
        except (BackendUnavailable, BackendAuthFailed, BackendRejected, ProtocolViolation) as exc:
            # Refused logins (and a port where no Postgres answers) count as unreachable too:
            # either way nothing can be checked there.
            raise DatabaseUnreachable(f"cannot connect to {endpoint.label()}: {exc.message}", hint=exc.hint) from None
        self = cls(conn, endpoint)
        sink = _Framer(self)
        leftover = conn.attach(sink, scan=False)
        if leftover:
            sink.backend_data(leftover)
        return self

    async def query(self, sql: str) -> list[list[str | None]]:
        """Run one statement; its rows, every value as text (None for NULL)."""
        async with self._lock:
            if self._gone is not None:
                raise self._gone
            self._replies.clear()
            self._conn.send(Query(sql).encode())
            rows: list[list[str | None]] = []
            error: ErrorResponse | None = None
            while True:
                while not self._replies:
                    if self._gone is not None:
                        raise self._gone
                    self._changed.clear()
                    await self._changed.wait()
                code, body = self._replies.popleft()
                if code == _DATA_ROW:
                    rows.append([None if v is None else v.decode() for v in decode_data_row(body)])
                elif code == _ERROR:
                    error = ErrorResponse.decode(body)
                elif code == _READY:
                    break
                # (RowDescription, CommandComplete, notices, parameter changes: nothing to do)
        if error is not None:
            fields = error.fields
            raise SqlError(
                f"{self.endpoint.backend}: {fields.get('M', 'query failed')}",
                sqlstate=fields.get("C", "XX000"),
                detail=fields.get("D"),
                hint=fields.get("H"),
            )
        return rows

    async def copy_out(self, sql: str, forward: CopyForward) -> int:
        """Run a ``COPY … TO STDOUT``: its CopyData frames, whole and undecoded, go to ``forward``
        as they arrive (in the event loop's receive callback: it must not block). Returns the row
        count of its CommandComplete."""
        async with self._lock:
            self._check_open()
            self._replies.clear()
            self._copy_forward = forward
            try:
                self._conn.send(Query(sql).encode())
                replies = await self._until_ready()
            finally:
                self._copy_forward = None
        return _copy_count(self._raise_error(replies), self.endpoint.backend)

    async def copy_in(self, sql: str) -> None:
        """Start a ``COPY … FROM STDIN``: returns once the server is in copy-in mode; then
        ``send_copy_data`` and ``end_copy``. Queries must wait until ``end_copy``; a COPY abandoned
        before it (its source failed) is ended by closing the connection, which rolls it back."""
        await self._lock.acquire()
        try:
            self._check_open()
            self._replies.clear()
            self._conn.send(Query(sql).encode())
            replies: list[tuple[int, bytes]] = []
            while True:
                code, body = await self._next_reply()
                if code == _COPY_IN:
                    return  # (the lock stays held until end_copy)
                replies.append((code, body))
                if code == _READY:
                    self._raise_error(replies)
                    raise SqlError(f"{self.endpoint.backend}: not a COPY FROM STDIN", sqlstate="XX000")
        except BaseException:
            self._lock.release()
            raise

    def send_copy_data(self, frames: bytes) -> None:
        """Whole CopyData frames (as ``copy_out`` hands them on) into the running COPY IN."""
        self._conn.send(frames)

    async def end_copy(self) -> int:
        """CopyDone: the COPY IN ends (its transaction, if any, stays open); its row count."""
        try:
            self._check_open()
            self._conn.send(_COPY_DONE_FRAME)
            replies = await self._until_ready()
        finally:
            self._lock.release()
        return _copy_count(self._raise_error(replies), self.endpoint.backend)

    def pause_reading(self) -> None:
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()

    @property
    def backend_pid(self) -> int | None:
        startup = self._conn.startup
        return startup.key.pid if startup is not None and startup.key is not None else None

    @property
    def gone(self) -> bool:
        """The connection was lost or closed: every call raises."""
        return self._gone is not None

    def _check_open(self) -> None:
        if self._gone is not None:
            raise self._gone

    async def _next_reply(self) -> tuple[int, bytes]:
        while not self._replies:
            self._check_open()
            self._changed.clear()
            await self._changed.wait()
        return self._replies.popleft()

    async def _until_ready(self) -> list[tuple[int, bytes]]:
        """The replies up to ReadyForQuery (DataRows are not expected here)."""
        replies: list[tuple[int, bytes]] = []
        while True:
            code, body = await self._next_reply()
            if code == _READY:
                return replies
            if code in (_ERROR, _COMPLETE):
                replies.append((code, body))

    def _raise_error(self, replies: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        for code, body in replies:
            if code == _ERROR:
                fields = ErrorResponse.decode(body).fields
                raise SqlError(
                    f"{self.endpoint.backend}: {fields.get('M', 'query failed')}",
                    sqlstate=fields.get("C", "XX000"),
                    detail=fields.get("D"),
                    hint=fields.get("H"),
                )
        return replies

    async def json(self, sql: str) -> Any:
        """Run a query that returns one JSON value (one row, one column); that value decoded."""
        rows = await self.query(sql)
        if len(rows) != 1 or len(rows[0]) != 1 or rows[0][0] is None:
            raise SqlError(f"{self.endpoint.backend}: expected one JSON value, got {len(rows)} rows", sqlstate="XX000")
        return json.loads(rows[0][0])

    async def close(self) -> None:
        self._conn.terminate()
        await self._conn.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _received(self, code: int, body: bytes) -> None:
        self._replies.append((code, body))
        self._changed.set()

    def _lost(self, exc: BaseException | None) -> None:
        if self._gone is None:
            self._gone = DatabaseUnreachable(f"lost the connection to {self.endpoint.label()}: {exc or 'closed'}")
        self._changed.set()
        if self.on_write_paused is not None:
            # Nothing will drain any more: a source paused for us must not wait forever.
            self.on_write_paused(False)


def _copy_count(replies: list[tuple[int, bytes]], backend: str) -> int:
    """The row count of a COPY's CommandComplete ("COPY 42")."""
    for code, body in replies:
        if code == _COMPLETE:
            tag = CommandComplete.decode(body).tag
            if tag.startswith("COPY "):
                return int(tag[5:])
    raise SqlError(f"{backend}: COPY ended without its row count", sqlstate="XX000")


async def connect_both(source: Endpoint, target: Endpoint) -> tuple[SqlConnection, SqlConnection]:
    """Connect to both at once; if either fails, one DatabaseUnreachable names every failure."""
    results = await asyncio.gather(SqlConnection.connect(source), SqlConnection.connect(target), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if not failures:
        src, tgt = results
        assert isinstance(src, SqlConnection) and isinstance(tgt, SqlConnection)
        return src, tgt
    for result in results:
        if isinstance(result, SqlConnection):
            await result.close()
    for failure in failures:
        if not isinstance(failure, DatabaseUnreachable):
            raise failure
    if len(failures) == 1:
        raise failures[0]
    raise DatabaseUnreachable("; ".join(f.message for f in failures if isinstance(f, PgShiftError)))
