"""An asyncio client for a ``replication=database`` connection on our own wire codec.

It logs in with BackendConnection.open (TCP/TLS/auth as for any backend) and then speaks the
streaming replication protocol (protocol-replication.html) over the simple query protocol:
IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT … LOGICAL pgoutput with an exported snapshot,
DROP_REPLICATION_SLOT, and START_REPLICATION, after which the connection is in CopyBoth mode and
the changes arrive as pgoutput messages inside XLogData.

Flow control of the stream, and why it is safe:

* The consumer calls ``confirm(lsn)`` once the target has *committed* everything up to ``lsn``
  (a Commit's ``end_lsn``). Only that position is reported to the server as flushed (unless the
  consumer opts into ``advance_when_idle``, see start()), so the slot's confirmed_flush_lsn, and
  with it the point a restart streams from, never passes what the target holds: after a crash of
  anything, the unconfirmed transactions come again.
* Keepalives that ask for a reply are answered from the receive callback, and a status update
  goes out every ``status_interval`` seconds from a timer, so neither depends on how fast the
  consumer iterates. While the consumer lags by more than QUEUE_HIGH_WATER bytes, reading pauses
  (the server then waits; it still gets our periodic status updates, so it does not time us out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import NamedTuple, Self

from proxy.backends.connection import BackendConnection, BackendSink
from proxy.cdc.pgoutput import (
    Begin,
    Commit,
    PgOutputMessage,
    PrimaryKeepalive,
    Relation,
    RelationCache,
    StandbyStatusUpdate,
    TypeMessage,
    XLogData,
    decode_copy_data,
    decode_message,
    format_lsn,
    parse_lsn,
    pg_now,
)
from proxy.config import BackendAddress
from proxy.errors import BackendRejected, BackendUnavailable, PgShiftError, ProtocolViolation
from proxy.wire.codes import BackendCode, FrontendCode
from proxy.wire.framing import FrameReader
from proxy.wire.messages import ErrorResponse, Query, decode_data_row, frame

log = logging.getLogger(__name__)

# Postgres accepts messages up to 1 GB; a row change can be that big.
MAX_MESSAGE_SIZE = 1 << 30
# wal_receiver_status_interval's default: well inside wal_sender_timeout (60 s by default).
STATUS_INTERVAL = 10.0
# Undelivered XLogData payload above which reading pauses, and below which it resumes.
QUEUE_HIGH_WATER = 16 * 1024 * 1024
QUEUE_LOW_WATER = 4 * 1024 * 1024
# How long stop() waits for the server to leave CopyBoth mode before giving up on it.
STOP_TIMEOUT = 5.0

# ReplicationSlotValidateName(): lower-case letters, digits and underscores, at most NAMEDATALEN-1.
_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
_ROW_DESCRIPTION_FIELD = struct.Struct("!IhIhih")  # after the name: table, attnum, type, len, mod, format

_COPY_DATA = BackendCode.COPY_DATA.value
_COPY_DONE = BackendCode.COPY_DONE.value
_COPY_BOTH = BackendCode.COPY_BOTH_RESPONSE.value
_ERROR = BackendCode.ERROR_RESPONSE.value
_NOTICE = BackendCode.NOTICE_RESPONSE.value
_PARAMETER = BackendCode.PARAMETER_STATUS.value
_READY = BackendCode.READY_FOR_QUERY.value
_COMPLETE = BackendCode.COMMAND_COMPLETE.value
_ROW_DESCRIPTION = BackendCode.ROW_DESCRIPTION.value
_DATA_ROW = BackendCode.DATA_ROW.value
_EMPTY_QUERY = BackendCode.EMPTY_QUERY_RESPONSE.value
_COPY_DONE_FRAME = frame(FrontendCode.COPY_DONE, b"")


# --- errors ----------------------------------------------------------------------------------


class ReplicationError(PgShiftError):
    """The source refused a replication command, or ended the replication stream."""

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str = "XX000",
        detail: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, detail=detail, hint=hint)
        self.sqlstate = sqlstate


class ReplicationNotConfigured(ReplicationError):
    """The source's settings do not allow logical replication (wal_level, max_wal_senders, slots)."""


class ReplicationPermissionDenied(ReplicationError):
    """The user lacks the REPLICATION attribute (or another privilege a command needs)."""


class SlotAlreadyExists(ReplicationError):
    """CREATE_REPLICATION_SLOT for a name that is taken."""


class SlotNotFound(ReplicationError):
    """START_REPLICATION or DROP_REPLICATION_SLOT for a slot that does not exist."""


class SlotInUse(ReplicationError):
    """Another connection is streaming from the slot."""


class PublicationNotFound(ReplicationError):
    """A publication named in START_REPLICATION does not exist (reported once decoding reads it)."""


def server_error(source: str, doing: str, fields: dict[str, str], user: str = "") -> ReplicationError:
    """An ErrorResponse of the source as the matching ReplicationError, with a hint that says
    what to change."""
    sqlstate = fields.get("C", "XX000")
    text = fields.get("M", "unknown error")
    hint = fields.get("H")
    cls: type[ReplicationError] = ReplicationError
    if sqlstate == "55000" and "wal_level" in text:  # object_not_in_prerequisite_state
        cls = ReplicationNotConfigured
        hint = "Set wal_level = logical on the source (ALTER SYSTEM SET wal_level = logical) and restart it."
    elif sqlstate == "53300" and "max_wal_senders" in text:  # too_many_connections
        cls = ReplicationNotConfigured
        hint = "Raise max_wal_senders on the source (it needs a restart), or end other replication connections."
    elif sqlstate == "53400" and "replication slots" in text:  # configuration_limit_exceeded
        cls = ReplicationNotConfigured
        hint = "Raise max_replication_slots on the source (it needs a restart), or drop unused slots."
    elif sqlstate == "42501":  # insufficient_privilege
        cls = ReplicationPermissionDenied
        hint = hint or f"Give the user the REPLICATION attribute: ALTER ROLE {_ident(user or 'the_user')} REPLICATION;"
    elif sqlstate == "42710":  # duplicate_object
        cls = SlotAlreadyExists
        hint = "Stream from the existing slot to resume, or drop it to start over."
    elif sqlstate == "42704" and "replication slot" in text:  # undefined_object
        cls = SlotNotFound
    elif sqlstate == "42704" and "publication" in text:
        cls = PublicationNotFound
        hint = "Create it on the source: CREATE PUBLICATION name FOR TABLE …"
    elif sqlstate == "55006":  # object_in_use
        cls = SlotInUse
        hint = "Another process streams from this slot (pg_replication_slots.active_pid); stop it first."
    return cls(f'{doing} on "{source}" failed: {text}', sqlstate=sqlstate, detail=fields.get("D"), hint=hint)


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SystemIdentity:
    """IDENTIFY_SYSTEM: which cluster this is and where its WAL ends."""

    systemid: str
    timeline: int
    xlogpos: int  # current WAL flush position
    dbname: str | None  # the database a replication=database connection is bound to


@dataclass(frozen=True, slots=True)
class CreatedSlot:
    """CREATE_REPLICATION_SLOT: stream from ``consistent_lsn`` to get exactly the transactions that
    committed after ``snapshot_name``'s view of the data (None when no snapshot was exported)."""

    slot_name: str
    consistent_lsn: int
    snapshot_name: str | None
    output_plugin: str


class ChangeEvent(NamedTuple):
    """One decoded message of the stream and its position: the XLogData start LSN, which for a
    Commit is its end_lsn, and 0 for the Relation and Type messages written ahead of a change."""

    lsn: int
    message: PgOutputMessage


@dataclass
class _Result:
    columns: list[str]
    rows: list[list[bytes | None]]

    def one(self, what: str) -> dict[str, str | None]:
        if len(self.rows) != 1 or len(self.rows[0]) != len(self.columns):
            raise ProtocolViolation(f"{what} answered {len(self.rows)} rows, expected one row")
        return {
            name: None if value is None else value.decode(errors="replace")
            for name, value in zip(self.columns, self.rows[0], strict=True)
        }


def _row_description(body: bytes) -> list[str]:
    """The column names of a RowDescription body."""
    if len(body) < 2:
        raise ProtocolViolation("malformed RowDescription message")
    (count,) = struct.unpack_from("!h", body, 0)
    names: list[str] = []
    pos = 2
    for _ in range(count):
        end = body.find(b"\x00", pos)
        if end < 0 or end + 1 + _ROW_DESCRIPTION_FIELD.size > len(body):
            raise ProtocolViolation("malformed RowDescription message: truncated")
        names.append(body[pos:end].decode(errors="replace"))
        pos = end + 1 + _ROW_DESCRIPTION_FIELD.size
    return names


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    # The replication command scanner takes standard SQL strings: '' for a quote, no backslashes.
    return "'" + text.replace("'", "''") + "'"


def _check_slot_name(name: str) -> None:
    if not _SLOT_NAME.match(name):
        raise ReplicationError(
            f"invalid replication slot name {name!r}",
            hint="Slot names use only lower-case letters, digits and underscores, at most 63 of them.",
        )


def _text(row: dict[str, str | None], column: str, what: str) -> str:
    value = row.get(column)
    if value is None:
        raise ProtocolViolation(f"{what} answered no {column}")
    return value


def _lsn(row: dict[str, str | None], column: str, what: str) -> int:
    value = _text(row, column, what)
    try:
        return parse_lsn(value)
    except ValueError:
        raise ProtocolViolation(f"{what} answered an invalid {column} {value!r}") from None


# --- the connection --------------------------------------------------------------------------


class _Phase(Enum):
    COMMAND = "command"  # simple queries (replication commands) and their replies
    STREAMING = "streaming"  # CopyBoth after START_REPLICATION
    STOPPING = "stopping"  # we sent CopyDone; waiting for the server to return to COMMAND


class _Framer(BackendSink):
    """The BackendSink: splits the byte stream into whole messages for its connection."""

    def __init__(self, owner: ReplicationConnection, max_message_size: int) -> None:
        self._owner = owner
        self._reader = FrameReader(max_message_size)

    def backend_data(self, data: bytes) -> None:
        buf, frames = self._reader.feed(data)
        handle = self._owner._received_message
        for code, start, end in frames:
            handle(code, buf[start + 5 : end])

    def backend_lost(self, conn: BackendConnection, exc: BaseException | None) -> None:
        self._owner._gone(BackendUnavailable(f'replication connection to "{conn.name}" lost: {exc or "closed"}'))

    def backend_write_paused(self, paused: bool) -> None:
        # We only ever send small status updates; a full socket buffer needs no action.
        pass

    def relay_failed(self, exc: Exception) -> None:
        self._owner._failed(exc)


class ReplicationConnection:
    """A ``replication=database`` connection: replication commands, then one change stream.

    Open with ``connect()``; close with ``close()`` (or use it as an async context manager). The
    commands run one at a time. ``start()`` returns the connection itself as an async iterator of
    ChangeEvents; the iteration ends normally only after ``stop()``/``close()``; when the server
    ends the stream, reports an error, or the connection is lost, it raises (after delivering the
    events received before).
    """

    def __init__(self, conn: BackendConnection, source: str, user: str, max_message_size: int) -> None:
        self.source = source
        self.user = user
        self.relations = RelationCache()
        self._conn = conn
        self._sink = _Framer(self, max_message_size)
        self._phase = _Phase.COMMAND
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._replies: deque[tuple[int, bytes]] = deque()
        self._gone_error: PgShiftError | None = None
        self._closed = False
        self._streamed = False  # START_REPLICATION entered CopyBoth on this connection
        # The server ended a stream on its own: the replies that end its START_REPLICATION
        # (CommandComplete, ReadyForQuery) are still to come and belong to no command of ours.
        self._stale_replies = False
        # Streaming state.
        self._events: deque[XLogData | PgShiftError] = deque()
        self._queued_bytes = 0
        self._reading_paused = False
        self._status_task: asyncio.Task[None] | None = None
        self._advance_when_idle = False
        self._confirmed = 0  # what the consumer confirmed (the target committed)
        self._reported_flush = 0  # the flush position last sent: never goes backwards
        self._received = 0  # start LSN of the newest XLogData
        self._keepalive_end = 0  # end of WAL the server has sent/decoded, from its keepalives
        self._in_txn = False  # the consumer got a Begin and not yet its Commit
        self._delivered_commit_end = 0  # end_lsn of the last Commit handed to the consumer
        self.server_wal_end = 0
        self.server_time = 0  # the server's clock in its last message (Postgres timestamp)

    @classmethod
    async def connect(
        cls,
        address: BackendAddress,
        *,
        user: str | None = None,
        database: str | None = None,
        password: str | None = None,
        application_name: str = "pgshift-sync",
        source: str = "source",
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> ReplicationConnection:
        """Log in with ``replication=database``; user, database and password default to the dsn's
        (and ~/.pgpass). ``source`` names the server in error messages."""
        user = user or address.user
        database = database or address.dbname or user
        if not user or not database:
            raise ReplicationError(f'replication connection to "{source}" needs a user and a database')
        params = {
            "user": user,
            "database": database,
            "replication": "database",
            "application_name": application_name,
            # pgoutput sends names and text values in the client encoding (pq_sendcountedtext
            # converts): ask for UTF-8, whatever the database's encoding is.
            "client_encoding": "UTF8",
        }
        try:
            conn = await BackendConnection.open(
                source,
                address,
                params,
                password=password if password is not None else address.password,
                scram_keys=None,
                max_message_size=max_message_size,
            )
        except BackendRejected as exc:
            raise server_error(source, "replication connection", exc.fields, user) from None
        self = cls(conn, source, user, max_message_size)
        leftover = conn.attach(self._sink, scan=False)
        if leftover:
            self._sink.backend_data(leftover)
        return self

    # --- properties ------------------------------------------------------------------------

    @property
    def server_version(self) -> str:
        startup = self._conn.startup
        return startup.parameters.get("server_version", "") if startup else ""

    @property
    def streaming(self) -> bool:
        return self._phase is _Phase.STREAMING

    @property
    def confirmed_lsn(self) -> int:
        return self._confirmed

    @property
    def received_lsn(self) -> int:
        return self._received

    @property
    def reading_paused(self) -> bool:
        """The consumer lags by more than QUEUE_HIGH_WATER bytes: the socket is not read."""
        return self._reading_paused

    # --- commands --------------------------------------------------------------------------

    async def identify_system(self) -> SystemIdentity:
        what = "IDENTIFY_SYSTEM"
        row = (await self._command("IDENTIFY_SYSTEM", what)).one(what)
        try:
            timeline = int(_text(row, "timeline", what))
        except ValueError:
            raise ProtocolViolation(f"{what} answered an invalid timeline {row.get('timeline')!r}") from None
        return SystemIdentity(
            systemid=_text(row, "systemid", what),
            timeline=timeline,
            xlogpos=_lsn(row, "xlogpos", what),
            dbname=row.get("dbname"),
        )

    async def create_slot(self, name: str, *, temporary: bool = False, export_snapshot: bool = True) -> CreatedSlot:
        """CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput (SNAPSHOT 'export'|'nothing').

        The exported snapshot shows the data exactly as of ``consistent_lsn``: read the tables
        under it (``BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '…'`` on other
        connections) and stream from ``consistent_lsn``, and every row is copied or streamed once.
        It stays importable only while *this* connection runs no other command and stays open:
        every reader must have imported it before you call anything else here, start() included
        (a transaction that imported it keeps it afterwards).

        Creating a logical slot waits until every transaction running on the source at that
        moment has ended, so it can block behind a long transaction there. A TEMPORARY slot is
        dropped when this connection ends.
        """
        _check_slot_name(name)
        what = f'creating replication slot "{name}"'
        temp = " TEMPORARY" if temporary else ""
        snapshot = "export" if export_snapshot else "nothing"
        sql = f"CREATE_REPLICATION_SLOT {_ident(name)}{temp} LOGICAL pgoutput (SNAPSHOT '{snapshot}')"
        row = (await self._command(sql, what)).one(what)
        return CreatedSlot(
            slot_name=_text(row, "slot_name", what),
            consistent_lsn=_lsn(row, "consistent_point", what),
            snapshot_name=row.get("snapshot_name"),
            output_plugin=row.get("output_plugin") or "",
        )

    async def drop_slot(self, name: str, *, wait: bool = True) -> None:
        """DROP_REPLICATION_SLOT; with ``wait`` a slot still in use is waited for instead of
        refused (SlotInUse). A missing slot raises SlotNotFound."""
        _check_slot_name(name)
        sql = f"DROP_REPLICATION_SLOT {_ident(name)}{' WAIT' if wait else ''}"
        await self._command(sql, f'dropping replication slot "{name}"')

    async def start(
        self,
        slot: str,
        start_lsn: int,
        publications: Sequence[str],
        *,
        messages: bool = False,
        status_interval: float = STATUS_INTERVAL,
        advance_when_idle: bool = False,
    ) -> Self:
        """START_REPLICATION SLOT slot LOGICAL start_lsn (proto_version '1', publication_names …).

        Returns this connection as an async iterator of ChangeEvents; a connection streams once
        (after stop() its other commands still work). ``start_lsn`` 0 means the slot's confirmed
        position; the server never goes back further than that, whatever is asked. ``messages``
        adds pg_logical_emit_message() output (LogicalMessage).

        ``advance_when_idle`` (off by default: only confirmed positions are reported) also
        reports the server's sent position from its last keepalive as flushed, but only while
        the consumer holds no unconfirmed event: everything decoded up to there was either handed
        over and confirmed, or filtered out (other tables, other databases). It keeps the slot
        from holding WAL back while the published tables are idle and the rest of the server
        is not. A transaction that is still open is not skipped by this: the server decides by
        the position of its commit record, which lies beyond.
        """
        _check_slot_name(slot)
        if not publications:
            raise ReplicationError("START_REPLICATION needs at least one publication")
        names = ",".join(_ident(p) for p in publications)
        options = ["proto_version '1'", f"publication_names {_literal(names)}"]
        if messages:
            options.append("messages 'true'")
        sql = f"START_REPLICATION SLOT {_ident(slot)} LOGICAL {format_lsn(start_lsn)} ({', '.join(options)})"
        what = f'starting replication from slot "{slot}"'
        async with self._lock:
            self._check_command_phase(what)
            if self._streamed:
                # A PG15 walsender does not reset its end-of-streaming flags for a second logical
                # START_REPLICATION: the new stream would end at once with "COPY 0".
                raise ReplicationError(
                    f"{what}: this connection has streamed already",
                    hint="Open a new replication connection for each stream.",
                )
            await self._settle()
            self._reset_stream(advance_when_idle)
            self._replies.clear()
            self._conn.send(Query(sql).encode())
            error: ErrorResponse | None = None
            while True:
                code, body = await self._next_reply()
                if code == _COPY_BOTH:
                    break  # (_received_message switched to STREAMING already)
                if code == _ERROR:
                    error = ErrorResponse.decode(body)
                elif code == _READY:
                    if error is None:
                        raise ProtocolViolation(f"{what}: the server did not enter CopyBoth mode")
                    raise server_error(self.source, what, error.fields, self.user)
        self._status_task = asyncio.create_task(self._status_loop(status_interval))
        return self

    def confirm(self, lsn: int) -> None:
        """The target has committed everything up to ``lsn`` (pass a Commit's end_lsn): the next
        status update reports it as flushed. Positions never move backwards."""
        if lsn > self._confirmed:
            self._confirmed = lsn
            if self._advance_when_idle and self._idle():
                # Caught up: say so now rather than at the next status tick, so that a cut-over
                # waiting for this stream (cdc/handover.py) sees it within milliseconds.
                self.send_status()

    def _idle(self) -> bool:
        return not self._events and not self._in_txn and self._confirmed >= self._delivered_commit_end

    def send_status(self, *, reply_requested: bool = False) -> None:
        """Send a Standby status update now (they also go out every status_interval seconds)."""
        if self._phase is not _Phase.STREAMING or self._conn.closed:
            return
        flush = max(self._confirmed, self._reported_flush)
        if self._advance_when_idle and self._idle():
            flush = max(flush, self._keepalive_end)
        self._reported_flush = flush
        # write: how far we have received. Only flush moves a logical slot; write is what a
        # shutting-down server waits for (WalSndDone) before it ends the stream.
        write = max(self._received, self._keepalive_end, flush)
        # A flush of 0 (nothing confirmed yet) is InvalidXLogRecPtr, which the server ignores.
        update = StandbyStatusUpdate(write, flush, flush, pg_now(), reply_requested)
        self._conn.send(frame(FrontendCode.COPY_DATA, update.encode()))

    async def stop(self, grace: float = STOP_TIMEOUT) -> None:
        """End streaming: report the confirmed position one last time, send CopyDone and wait for
        the server to return to command mode (then the slot is free for another connection).
        Events not yet delivered are dropped: they are unconfirmed, so the slot sends them again."""
        if self._phase is not _Phase.STREAMING:
            return
        self.send_status()
        self._phase = _Phase.STOPPING
        self._stop_status_task()
        self._drop_events()
        self._changed.set()  # a consumer waiting for the next event ends its iteration
        async with self._lock:
            self._conn.send(_COPY_DONE_FRAME)
            error: ErrorResponse | None = None
            try:
                async with asyncio.timeout(grace):
                    while True:
                        code, body = await self._next_reply()
                        if code == _ERROR:
                            error = ErrorResponse.decode(body)
                        elif code == _READY:
                            break
                        # (the server's CopyDone and CommandComplete need no action)
            except TimeoutError:
                raise ReplicationError(
                    f'"{self.source}" did not end the replication stream within {grace:g} s'
                ) from None
            finally:
                self._phase = _Phase.COMMAND
            if error is not None:
                raise server_error(self.source, "ending replication", error.fields, self.user)

    async def close(self) -> None:
        """Stop streaming (if it is), then end the connection. Idempotent."""
        if self._closed:
            return
        if self._phase is _Phase.STREAMING and not self._conn.closed:
            with contextlib.suppress(PgShiftError):
                await self.stop()
        self._closed = True
        self._stop_status_task()
        self._drop_events()
        self._phase = _Phase.COMMAND
        self._changed.set()
        self._conn.terminate()
        await self._conn.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- the stream --------------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ChangeEvent:
        events = self._events
        while not events:
            if self._phase is not _Phase.STREAMING or self._closed:
                raise StopAsyncIteration
            self._changed.clear()
            await self._changed.wait()
        item = events.popleft()
        if isinstance(item, PgShiftError):
            raise item
        event = self._decode(item)
        self._freed(len(item.payload))
        return event

    async def next_batch(self, limit: int = 2000) -> list[ChangeEvent]:
        """The events waiting (at least one, at most ``limit``), decoded; [] once the stream has
        ended. What ``async for`` gives one at a time, without an await per message."""
        events = self._events
        while not events:
            if self._phase is not _Phase.STREAMING or self._closed:
                return []
            self._changed.clear()
            await self._changed.wait()
        out: list[ChangeEvent] = []
        freed = 0
        decode = self._decode
        while events and len(out) < limit:
            item = events[0]
            if isinstance(item, PgShiftError):
                if out:
                    break  # the events before the error first; the error next time
                events.popleft()
                raise item
            events.popleft()
            freed += len(item.payload)
            out.append(decode(item))
        self._freed(freed)
        return out

    def _decode(self, item: XLogData) -> ChangeEvent:
        message = decode_message(item.payload)
        if isinstance(message, (Relation, TypeMessage)):  # (a tuple: faster than a union)
            self.relations.update(message)
        elif isinstance(message, Begin):
            self._in_txn = True
        elif isinstance(message, Commit):
            self._in_txn = False
            self._delivered_commit_end = message.end_lsn
        return ChangeEvent(item.start_lsn, message)

    def _freed(self, size: int) -> None:
        self._queued_bytes -= size
        if self._reading_paused and self._queued_bytes <= QUEUE_LOW_WATER:
            self._reading_paused = False
            self._conn.resume_reading()

    # --- internals ---------------------------------------------------------------------------

    def _check_command_phase(self, what: str) -> None:
        if self._closed:
            raise ReplicationError(f'{what}: the replication connection to "{self.source}" is closed')
        if self._gone_error is not None:
            raise self._gone_error
        if self._phase is not _Phase.COMMAND:
            raise ReplicationError(f"{what}: the connection is streaming; stop() it first")

    async def _command(self, sql: str, what: str) -> _Result:
        async with self._lock:
            self._check_command_phase(what)
            await self._settle()
            self._replies.clear()
            self._conn.send(Query(sql).encode())
            result = _Result([], [])
            error: ErrorResponse | None = None
            while True:
                code, body = await self._next_reply()
                if code == _DATA_ROW:
                    result.rows.append(decode_data_row(body))
                elif code == _ROW_DESCRIPTION:
                    result.columns = _row_description(body)
                elif code == _ERROR:
                    error = ErrorResponse.decode(body)
                elif code == _READY:
                    break
                elif code not in (_COMPLETE, _EMPTY_QUERY):
                    raise ProtocolViolation(f"{what}: unexpected message {chr(code)!r} from the server")
        if error is not None:
            raise server_error(self.source, what, error.fields, self.user)
        return result

    async def _settle(self) -> None:
        """Wait for the ReadyForQuery that ends a stream the server ended itself."""
        while self._stale_replies:
            if self._gone_error is not None:
                raise self._gone_error
            self._changed.clear()
            await self._changed.wait()

    async def _next_reply(self) -> tuple[int, bytes]:
        while not self._replies:
            if self._gone_error is not None:
                raise self._gone_error
            if self._closed:
                raise ReplicationError(f'the replication connection to "{self.source}" was closed')
            self._changed.clear()
            await self._changed.wait()
        return self._replies.popleft()

    def _reset_stream(self, advance_when_idle: bool) -> None:
        # (confirm() may have been called before start(): that position stays.)
        self._drop_events()
        self._advance_when_idle = advance_when_idle
        self._in_txn = False
        # pgoutput announces every relation again on a new stream.
        self.relations.clear()

    def _drop_events(self) -> None:
        self._events.clear()
        self._queued_bytes = 0
        if self._reading_paused:
            self._reading_paused = False
            self._conn.resume_reading()

    async def _status_loop(self, interval: float) -> None:
        while self._phase is _Phase.STREAMING:
            await asyncio.sleep(interval)
            self.send_status()

    def _stop_status_task(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
            self._status_task = None

    def _end_stream(self, error: PgShiftError) -> None:
        """The stream ended without stop(): the consumer gets the events before, then ``error``."""
        self._phase = _Phase.COMMAND
        self._stale_replies = True
        self._events.append(error)
        self._stop_status_task()
        self._changed.set()

    # --- called by the sink, on the event loop, in stream order --------------------------------

    def _received_message(self, code: int, body: bytes) -> None:
        phase = self._phase
        if code == _COPY_DATA:
            if phase is _Phase.STREAMING:
                self._copy_data(body)
            elif phase is not _Phase.STOPPING:
                raise ProtocolViolation(f'"{self.source}" sent CopyData outside a replication stream')
            # (STOPPING: data sent before the server saw our CopyDone; never confirmed, so resent)
            return
        if code == _NOTICE:
            log.info('replication connection to "%s": %s', self.source, ErrorResponse.decode(body).message)
            return
        if code == _PARAMETER:
            return
        if phase is _Phase.STREAMING:
            self._stream_interrupted(code, body)
            return
        if self._stale_replies:
            self._stale_replies = code != _READY
            self._changed.set()
            return
        if code == _COPY_BOTH:
            # Switched here, not in start(): CopyData may follow in the same chunk.
            self._phase = _Phase.STREAMING
            self._streamed = True
        self._replies.append((code, body))
        self._changed.set()

    def _copy_data(self, body: bytes) -> None:
        item = decode_copy_data(body)
        if isinstance(item, PrimaryKeepalive):
            self._keepalive_end = max(self._keepalive_end, item.end_lsn)
            self.server_wal_end = max(self.server_wal_end, item.end_lsn)
            self.server_time = item.server_time
            if item.reply_requested or (
                self._advance_when_idle and item.end_lsn > self._reported_flush and self._idle()
            ):
                self.send_status()
            return
        self._received = max(self._received, item.start_lsn)
        self.server_wal_end = max(self.server_wal_end, item.end_lsn)
        self.server_time = item.server_time
        self._events.append(item)
        self._queued_bytes += len(item.payload)
        if self._queued_bytes > QUEUE_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self._conn.pause_reading()
        self._changed.set()

    def _stream_interrupted(self, code: int, body: bytes) -> None:
        """Something other than CopyData while streaming: the server ended the stream."""
        if code == _ERROR:
            # The walsender reports the error and returns to command mode (ReadyForQuery follows),
            # or ends the connection if it is FATAL.
            err = ErrorResponse.decode(body)
            self._end_stream(server_error(self.source, "replication stream", err.fields, self.user))
        elif code == _COPY_DONE:
            # The server ends COPY first; the protocol wants our CopyDone in return.
            self._conn.send(_COPY_DONE_FRAME)
            self._end_stream(ReplicationError(f'"{self.source}" ended the replication stream'))
        elif code == _COMPLETE:
            # A shutting-down walsender ends the stream with CommandComplete and exits (WalSndDone).
            self._end_stream(ReplicationError(f'"{self.source}" ended the replication stream (shutting down?)'))
        else:
            raise ProtocolViolation(f'"{self.source}" sent message {chr(code)!r} in the replication stream')

    def _gone(self, error: PgShiftError) -> None:
        if self._gone_error is None:
            self._gone_error = error
        if self._phase is _Phase.STREAMING:
            self._end_stream(error)
        self._changed.set()

    def _failed(self, exc: Exception) -> None:
        """Our handling of the stream raised (a malformed message, or a bug): give up on it."""
        if isinstance(exc, PgShiftError):
            error = exc
        else:
            log.error('replication connection to "%s": cannot follow the stream', self.source, exc_info=exc)
            error = ReplicationError(f'cannot follow the replication stream of "{self.source}": {exc!r}')
        self._conn.abort()  # (abort marks it closed first: no backend_lost call follows)
        self._gone(error)
