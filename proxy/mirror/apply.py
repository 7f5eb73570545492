"""Apply committed transactions on one mirror database, in order, pipelined over one connection.

Each transaction goes out as one extended-protocol block ending in a single Sync: Postgres runs
everything up to a Sync as one implicit transaction, committed at the Sync and rolled back whole
if any message fails (protocol-flow.html, "Extended Query"). So no BEGIN/COMMIT is sent, blocks
are self-contained, and up to ``max_in_flight`` of them can be on the wire at once; replies are
matched to blocks in order, one ReadyForQuery per block.

The stream speaks the wire protocol itself (not asyncpg) because tier-1 writes are the client's
own Parse/Bind frames, replayed byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from proxy.backends.connection import BackendConnection, BackendSink
from proxy.config import BackendAddress
from proxy.errors import ProtocolViolation
from proxy.mirror.model import Divergence, Txn, Write, WriteKind
from proxy.mirror.settings import codec_for
from proxy.mirror.tablemeta import CATALOG_SQL, ImageError, TableMeta, image_sql
from proxy.wire.codes import BackendCode, FrontendCode, TxStatus
from proxy.wire.messages import SYNC, ErrorResponse, decode_data_row, frame

log = logging.getLogger(__name__)

# Reconnect backoff: doubles from the first to the cap while the mirror stays unreachable.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
# On stop, blocks already sent get this long for their ReadyForQuery (their outcome is then
# known instead of "unknown"); the mirror answers in milliseconds unless it is stuck.
CLOSE_GRACE = 1.0
# Divergences carry the statement cut to this many characters.
STATEMENT_LIMIT = 500

LOST_REASON = "connection to the mirror lost before the commit was confirmed: outcome unknown"

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")

COPY_DONE = frame(FrontendCode.COPY_DONE, b"")
# Execute the unnamed portal with no row limit (a limit would suspend the portal mid-write).
EXECUTE_ALL = frame(FrontendCode.EXECUTE, b"\0" + _I32.pack(0))

# Statements that may change a table's columns or keys: the catalog cache is dropped behind them.
# Leading whitespace and comments are skipped; anything subtler (DDL in a function) is not seen.
_DDL = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*(?:create|alter|drop)\b", re.IGNORECASE | re.DOTALL)

_READY = BackendCode.READY_FOR_QUERY.value
_COMPLETE = BackendCode.COMMAND_COMPLETE.value
_EMPTY = BackendCode.EMPTY_QUERY_RESPONSE.value
_ERROR = BackendCode.ERROR_RESPONSE.value
_DATA_ROW = BackendCode.DATA_ROW.value
_NOTICE = BackendCode.NOTICE_RESPONSE.value
_IDLE = TxStatus.IDLE.value
_ACTED_ON = frozenset({_DATA_ROW, _ERROR, _NOTICE, _COMPLETE, _EMPTY, BackendCode.READY_FOR_QUERY.value})


def parse_unnamed(sql: str, encoding: str = "utf-8") -> bytes:
    """Parse of the unnamed statement, parameter types left to the server; the text in
    ``encoding``, the client_encoding the block runs with."""
    return frame(FrontendCode.PARSE, b"\0" + sql.encode(encoding) + b"\0" + _I16.pack(0))


def bind_unnamed(params: Sequence[bytes] = ()) -> bytes:
    """Bind of the unnamed portal to the unnamed statement: text parameters, text results."""
    parts = [b"\0\0", _I16.pack(0), _I16.pack(len(params))]
    for param in params:
        parts.append(_I32.pack(len(param)))
        parts.append(param)
    parts.append(_I16.pack(0))
    return frame(FrontendCode.BIND, b"".join(parts))


def statement(sql: str, params: Sequence[bytes] = (), encoding: str = "utf-8") -> bytes:
    """Parse/Bind/Execute of one statement (no Sync: it joins the block it is put in)."""
    return parse_unnamed(sql, encoding) + bind_unnamed(params) + EXECUTE_ALL


def looks_like_ddl(sql: str) -> bool:
    return _DDL.match(sql) is not None


def _row_count(tag: str) -> int | None:
    """The trailing row count of a command tag ("INSERT 0 3" → 3); None when it has none."""
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else None


def _search_path(txn: Txn) -> str | None:
    value = None
    for name, setting in txn.settings:
        if name.lower() == "search_path":
            value = setting
    return value


class StreamState(enum.Enum):
    CONNECTING = "connecting"  # first connection attempt under way
    RUNNING = "running"  # connected, applying
    DOWN = "down"  # cannot connect, or the connection was lost: retrying with backoff
    STOPPED = "stopped"


@dataclass
class Outcome:
    """What happened to one Txn on this mirror."""

    applied: bool  # committed, every write's tag matched the primary's
    divergences: list[Divergence]


# A key into the catalog cache: (the txn's search_path setting or None, the table as written).
_TableKey = tuple[str | None, str]


@dataclass(eq=False)
class _TxnBlock:
    """One submitted Txn: waiting, then sent as one Sync-terminated block, then settled."""

    txn: Txn
    future: asyncio.Future[Outcome]
    size: int
    submitted: float
    sent: bool = False
    # What each Execute of the block applies, in order: a Write, or None for the settings.
    steps: list[Write | None] = field(default_factory=list)
    step: int = 0  # index of the next Execute whose completion is expected
    errored: bool = False
    divergences: list[Divergence] = field(default_factory=list)


@dataclass(eq=False)
class _Lookup:
    """A catalog query block: the columns and primary key of one table on the mirror."""

    key: _TableKey
    future: asyncio.Future[TableMeta | str | None]  # meta, a failure reason, None: connection lost
    catalog_step: int  # index of the catalog Execute in the block (1 when search_path is set first)
    completes: int = 0
    rows: list[list[bytes | None]] = field(default_factory=list)
    error: str | None = None


_Block = _TxnBlock | _Lookup


class ApplyStream(BackendSink):
    """Applies Txns on one mirror database, in submission order, over one pipelined connection."""

    def __init__(
        self,
        mirror: str,
        database: str,
        address: BackendAddress,
        *,
        user: str,
        password: str | None,
        max_message_size: int = 1 << 30,
        max_in_flight: int = 64,
        on_outcome: Callable[[Txn, Outcome], None] | None = None,
    ) -> None:
        self.mirror = mirror
        self.database = database
        self.address = address
        self.user = user
        self.password = password
        self.max_message_size = max_message_size
        self.max_in_flight = max(1, max_in_flight)
        self.on_outcome = on_outcome
        self.state = StreamState.CONNECTING
        self.down_since: float | None = None
        self.last_error = ""
        self.queued_bytes = 0
        self.applied = 0
        # Txns tried on the mirror and not applied (taken or dropped unsent ones do not count).
        self.failed = 0
        self.last_applied_seq = 0
        self._pending: deque[_TxnBlock] = deque()  # submitted, not sent
        self._in_flight: deque[_Block] = deque()  # sent (or settled unsent), awaiting their turn
        self._catalog: dict[_TableKey, TableMeta] = {}
        # Statements prepared on the mirror connection, by their Parse body (text + parameter
        # types): the mirror parses and plans each statement once, not once per transaction.
        self._named: dict[bytes, bytes] = {}
        self._fresh: dict[int, list[bytes]] = {}  # txn seq -> Parse bodies first sent in its block
        self._stale: list[bytes] = []  # names to close first (their Parse may have failed)
        self._serial = 0
        self._conn: BackendConnection | None = None
        self._inbox = bytearray()
        self._lost: str | None = None  # why the current connection ended
        self._fatal: str | None = None  # a FATAL error the mirror sent before closing
        self._write_paused = False
        self._running = False
        self._stopping = False
        self._wakeup = asyncio.Event()  # the sender: something to send, or room to send it
        self._progress = asyncio.Event()  # waiters on the queue: a block settled or the link dropped
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()

    # --- the owner's side ------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Txns waiting or in flight."""
        return len(self._pending) + sum(1 for b in self._in_flight if isinstance(b, _TxnBlock))

    @property
    def lag_seconds(self) -> float:
        """Age of the oldest txn not yet settled (0 when none)."""
        oldest = next((b for b in self._in_flight if isinstance(b, _TxnBlock)), None)
        if oldest is None and self._pending:
            oldest = self._pending[0]
        return time.monotonic() - oldest.submitted if oldest is not None else 0.0

    def submit(self, txn: Txn) -> asyncio.Future[Outcome]:
        """Queue ``txn``; never blocks (the owner bounds the queue with ``queued_bytes``)."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        block = _TxnBlock(txn, future, txn.size or sum(w.size for w in txn.writes), time.monotonic())
        self.queued_bytes += block.size
        # (After stop() it stays queued, unsent, until take_queued().)
        self._pending.append(block)
        self._wakeup.set()
        return future

    def take_queued(self) -> list[Txn]:
        """Remove and return every txn not sent yet; each resolves as not applied (out_of_sync)."""
        taken = list(self._pending)
        self._pending.clear()
        for block in taken:
            outcome = self._out_of_sync(block.txn, "taken off the mirror's queue before it was applied")
            self._finish(block, outcome, attempted=False)
        return [block.txn for block in taken]

    async def run(self) -> None:
        """Connect, apply, reconnect on loss (backoff 0.1 s doubling to 5 s); returns after stop()."""
        if self._running:
            raise RuntimeError(f'the apply stream of mirror "{self.mirror}" is already running')
        self._running = True
        backoff = BACKOFF_FIRST
        try:
            while not self._stopping:
                conn = await self._connect()
                if conn is not None:
                    connected = time.monotonic()
                    await self._serve(conn)
                    if time.monotonic() - connected >= BACKOFF_MAX:
                        backoff = BACKOFF_FIRST  # it worked for a while: a new loss starts over
                if self._stop_requested.is_set():
                    break
                await self._pause(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            # Unsent txns stay queued: the owner takes them with take_queued() (and journals them).
            self._running = False
            self._stopping = True
            self.state = StreamState.STOPPED
            self._stopped.set()

    async def stop(self, *, drain: float = 0) -> None:
        """Wait up to ``drain`` seconds for the queue to empty, then close. Txns already sent get
        CLOSE_GRACE to be confirmed; unsent ones stay queued for take_queued()."""
        if drain > 0 and not self._stopping:
            await self._wait_until(lambda: self.queued == 0, drain)
        self._stopping = True
        self._stop_requested.set()
        self._wakeup.set()
        if self._running:
            await self._stopped.wait()
        else:
            self.state = StreamState.STOPPED

    # --- connection lifecycle ----------------------------------------------------------------

    async def _connect(self) -> BackendConnection | None:
        params = {"user": self.user, "database": self.database, "application_name": "pgshift-mirror"}
        opening = asyncio.ensure_future(
            BackendConnection.open(
                f"mirror:{self.mirror}",
                self.address,
                params,
                password=self.password,
                scram_keys=None,
                max_message_size=self.max_message_size,
            )
        )
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            # A connect may take connect_timeout (10 s by default): stop() must not wait for it.
            await asyncio.wait({opening, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not opening.done():
                opening.cancel()  # open() aborts its half-made connection
            await asyncio.wait({opening, stop})  # let both finish; wait() itself never raises
            if not opening.cancelled() and opening.exception() is None and self._stopping:
                opening.result().abort()  # opened just as stop() came
        if opening.cancelled() or self._stopping:
            return None
        failure = opening.exception()
        if failure is not None:
            # Unreachable, refused, auth failed: all mean "try again later" for a mirror.
            self._went_down(f"cannot connect: {failure}")
            return None
        return opening.result()

    async def _serve(self, conn: BackendConnection) -> None:
        """Apply over ``conn`` until it is lost or stop() is called."""
        self._conn = conn
        self._inbox.clear()
        self._lost = None
        self._fatal = None
        self._write_paused = False
        # The mirror may have been changed while we were away; learn its tables afresh.
        self._catalog.clear()
        self._named.clear()  # (a new connection has no prepared statements)
        self._fresh.clear()
        self._stale.clear()
        if self.state is not StreamState.RUNNING:
            if self.state is StreamState.DOWN:
                log.info('mirror "%s" (%s): connected again', self.mirror, self.address.label())
            self.state = StreamState.RUNNING
        self.down_since = None
        # Replies from here on go to backend_data (notices that came right behind the login first).
        leftover = conn.attach(self, scan=False)
        if leftover:
            self.backend_data(leftover)
        pump = asyncio.ensure_future(self._pump(conn))
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({pump, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                # stop(): nothing new is sent; what is on the wire gets a moment to be confirmed.
                await self._wait_until(lambda: not self._in_flight or self._lost is not None, CLOSE_GRACE)
        finally:
            for task in (pump, stop):
                task.cancel()
            await asyncio.wait({pump, stop})  # (wait() does not raise what the pump may have raised)
            self._conn = None
            if not conn.closed:
                conn.terminate()
            if self._lost is None and pump.done() and not pump.cancelled() and pump.exception() is not None:
                self._lost = f"internal error: {pump.exception()!r}"
                log.error('mirror "%s": apply stream failed', self.mirror, exc_info=pump.exception())
            self._fail_in_flight()
            if self._lost is not None and not self._stopping:
                self._went_down(f"connection lost: {self._lost}")
        await conn.wait_closed()

    def _went_down(self, reason: str) -> None:
        self.last_error = reason
        if self.down_since is None:
            self.down_since = time.monotonic()
        if self.state is not StreamState.DOWN:
            log.warning('mirror "%s" (%s): %s; retrying', self.mirror, self.address.label(), reason)
            self.state = StreamState.DOWN
        else:
            log.debug('mirror "%s": %s', self.mirror, reason)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop_requested.wait()

    async def _wait_until(self, done: Callable[[], bool], seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not done():
                    self._progress.clear()
                    await self._progress.wait()
        return done()

    def _abandon(self, conn: BackendConnection, reason: str) -> None:
        """Give up on ``conn`` (its reply stream can no longer be trusted); run() reconnects."""
        if conn is not self._conn or self._lost is not None:
            return
        self._lost = reason
        conn.abort()  # abort() marks it closed first: no backend_lost call comes back
        self._fail_in_flight()
        self._wakeup.set()

    # --- sending -----------------------------------------------------------------------------

    async def _pump(self, conn: BackendConnection) -> None:
        while True:
            block = await self._next_to_send()
            if block is None:
                return
            catalog: dict[_TableKey, TableMeta | str] | Exception | None
            try:
                catalog = await self._lookup_tables(conn, block)
            except Exception as exc:  # (a bug: reported with the txn below)
                catalog = exc
            if catalog is None or self._lost is not None:
                return  # lost while looking up: the txn stays queued for the next connection
            if not self._pending or self._pending[0] is not block:
                continue  # take_queued() took it meanwhile
            self._pending.popleft()
            data = None
            try:
                if isinstance(catalog, Exception):
                    raise catalog
                data = self._build(block, catalog)
            except Exception as exc:
                # A bug preparing one txn fails that txn, not the stream (nor, by staying at the
                # head of the queue, every txn behind it).
                log.exception('mirror "%s": cannot build txn %d', self.mirror, block.txn.seq)
                reason = f"cannot build the transaction for the mirror: {exc!r}"
                block.divergences.append(self._divergence(block.txn, None, "failed", reason))
            self._in_flight.append(block)
            if data is None:
                self._settle_unsent()  # settles now, or once the blocks sent before it settle
            else:
                block.sent = True
                conn.send(data)

    async def _next_to_send(self) -> _TxnBlock | None:
        while True:
            if self._lost is not None or self._stopping:
                return None
            if self._pending and not self._write_paused and len(self._in_flight) < self.max_in_flight:
                return self._pending[0]
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _lookup_tables(
        self, conn: BackendConnection, block: _TxnBlock
    ) -> dict[_TableKey, TableMeta | str] | None:
        """The catalog of every table the txn's row images touch; unknown tables are looked up on
        the mirror in blocks of their own, pipelined behind what is in flight. None: lost."""
        search_path = _search_path(block.txn)
        found: dict[_TableKey, TableMeta | str] = {}
        lookups: list[_Lookup] = []
        for write in block.txn.writes:
            if write.kind is WriteKind.COPY and write.copy_columns is not None and write.copy_table:
                table = write.copy_table
            elif write.kind is WriteKind.IMAGE and write.image is not None and write.image.rows:
                table = write.image.table
            else:
                continue
            key = (search_path, table)
            if key in found:
                continue
            meta = self._catalog.get(key)
            if meta is not None:
                found[key] = meta
                continue
            found[key] = ""  # placeholder until the lookup answers
            loop = asyncio.get_running_loop()
            lookups.append(_Lookup(key, loop.create_future(), catalog_step=0 if search_path is None else 1))
        for lookup in lookups:
            parts: list[bytes] = []
            if search_path is not None:
                # Local to the lookup's implicit transaction: gone at its Sync.
                parts.append(statement("SELECT pg_catalog.set_config('search_path', $1, true)", [search_path.encode()]))
            parts.append(statement(CATALOG_SQL, [lookup.key[1].encode()]))
            parts.append(SYNC)
            self._in_flight.append(lookup)
            conn.send(b"".join(parts))
        for lookup in lookups:
            result = await lookup.future
            if result is None:
                return None
            found[lookup.key] = result
            if isinstance(result, TableMeta):
                self._catalog[lookup.key] = result
        return found

    def _prepared(self, parse: bytes, bind: bytes, fresh: list[bytes]) -> bytes:
        """Parse (the first time on this connection) of a named statement, Bind of it, Execute:
        ``parse`` and ``bind`` name the unnamed statement and portal, as the capture made them."""
        stop = parse.index(b"\0", 5)
        body = parse[stop + 1 :]  # text and parameter types: what makes two Parses the same
        name = self._named.get(body)
        out = b""
        if name is None:
            name = b"pgshift_%d" % (len(self._named) + len(self._stale) + self._serial)
            self._serial += 1
            self._named[body] = name
            fresh.append(body)
            out = frame(FrontendCode.PARSE, name + b"\0" + body)
        # The Bind names the unnamed portal (one byte) and statement (one byte): name the statement.
        return out + frame(FrontendCode.BIND, b"\0" + name + b"\0" + bind[7:]) + EXECUTE_ALL

    @staticmethod
    def _copy_computes(write: Write, catalog: dict[_TableKey, TableMeta | str], search_path: str | None) -> list[str]:
        """Columns a COPY with a column list leaves to their defaults on the mirror."""
        if write.copy_columns is None or not write.copy_table:
            return []
        meta = catalog.get((search_path, write.copy_table))
        return meta.computed_when_omitted(write.copy_columns) if isinstance(meta, TableMeta) else []

    def _build(self, block: _TxnBlock, catalog: dict[_TableKey, TableMeta | str]) -> bytes | None:
        """The txn's block (None when a write cannot be built: then nothing of it is sent, so a
        txn is applied whole or not at all, and its divergences say why)."""
        txn = block.txn
        parts: list[bytes] = []
        if self._stale:
            parts.extend(frame(FrontendCode.CLOSE, b"S" + name + b"\0") for name in self._stale)
            self._stale.clear()
        fresh: list[bytes] = []
        steps: list[Write | None] = []
        failures: list[Divergence] = []
        if txn.settings:
            placeholders = ", ".join(f"set_config(${2 * i + 1}, ${2 * i + 2}, true)" for i in range(len(txn.settings)))
            params = [part.encode() for setting in txn.settings for part in setting]
            parts.append(self._prepared(parse_unnamed(f"SELECT {placeholders}"), bind_unnamed(params), fresh))
            steps.append(None)
        search_path = _search_path(txn)
        # The settings' SELECT sets the session's client_encoding first: the statements after it
        # are read in that encoding (the client's own frames and row images already are in it).
        codec = codec_for(dict(txn.settings).get("client_encoding")) or "utf-8"
        ddl = False
        for write in txn.writes:
            ddl = ddl or looks_like_ddl(write.sql)
            if write.kind is WriteKind.QUERY:
                parts.append(statement(write.sql, encoding=codec))
            elif write.kind is WriteKind.EXTENDED:
                parts.append(self._prepared(write.parse, write.bind, fresh))
            elif write.kind is WriteKind.COPY and (computed := self._copy_computes(write, catalog, search_path)):
                reason = (
                    f"COPY leaves out {', '.join(computed)}: the mirror would compute their defaults again "
                    "(serial, identity, now(), …) instead of the primary's values"
                )
                failures.append(self._divergence(txn, write, "failed", reason))
                continue
            elif write.kind is WriteKind.COPY:
                # In copy-in mode the server takes CopyData until CopyDone, then goes on with the
                # next message; after an error it discards everything up to the Sync.
                parts.append(statement(write.sql, encoding=codec))
                parts.extend(write.copy_data)
                parts.append(COPY_DONE)
            else:
                image = write.image
                if image is None:
                    failures.append(self._divergence(txn, write, "failed", "an IMAGE write without its row images"))
                    continue
                if not image.rows:
                    # Nothing to apply: the primary changed no rows either, or the capture is off.
                    if _row_count(write.tag) not in (0, None):
                        reason = f"tag differs: primary {write.tag}, mirror (no row images to apply)"
                        block.divergences.append(self._divergence(txn, write, "diverged", reason))
                    continue
                meta = catalog.get((search_path, image.table))
                if not isinstance(meta, TableMeta):
                    reason = meta or f"table {image.table} is not known on the mirror"
                    failures.append(self._divergence(txn, write, "failed", reason))
                    continue
                try:
                    sql = image_sql(image, meta)
                except ImageError as exc:
                    failures.append(self._divergence(txn, write, "failed", str(exc)))
                    continue
                rows = b"[" + b",".join(image.rows) + b"]"
                parts.append(self._prepared(parse_unnamed(sql, codec), bind_unnamed([rows]), fresh))
            steps.append(write)
        if failures:
            block.divergences.extend(failures)
            for body in fresh:  # never sent: not prepared
                self._named.pop(body, None)
            return None
        if ddl:
            # Lookups from now on queue behind this block, so they see the mirror after the DDL.
            self._catalog.clear()
            # And statements prepared before it are closed: a cached plan whose result columns the
            # DDL changed fails rather than re-plans ("cached plan must not change result type").
            self._stale.extend(self._named.values())
            self._named.clear()
        if fresh:
            self._fresh[txn.seq] = fresh
        parts.append(SYNC)
        block.steps = steps
        return b"".join(parts)

    # --- BackendSink: the reply stream -------------------------------------------------------

    def backend_data(self, data: bytes) -> None:
        if self._conn is None or self._lost is not None:
            return  # replies of a connection being given up: nobody waits for them any more
        inbox = self._inbox
        inbox += data
        n = len(inbox)
        pos = 0
        while n - pos >= 5 and self._lost is None:
            code = inbox[pos]
            (length,) = _U32.unpack_from(inbox, pos + 1)
            if length < 4 or length > self.max_message_size:
                raise ProtocolViolation(f"mirror sent invalid message length {length} for type {chr(code)!r}")
            end = pos + 1 + length
            if end > n:
                break
            if code in _ACTED_ON:  # (ParseComplete, BindComplete and the like: nothing to do)
                self._reply(code, inbox, pos + 5, end)
            pos = end
        if pos:
            del inbox[:pos]
        self._progress.set()

    def _reply(self, code: int, buf: bytearray, start: int, end: int) -> None:
        if code == _DATA_ROW:
            # Rows of a write (RETURNING) are ignored; only catalog lookups read theirs.
            head = self._in_flight[0] if self._in_flight else None
            if isinstance(head, _Lookup) and head.completes == head.catalog_step:
                head.rows.append(decode_data_row(bytes(buf[start:end])))
            return
        if code == _ERROR:
            self._error(ErrorResponse.decode(bytes(buf[start:end])))
            return
        if code not in (_COMPLETE, _EMPTY, _READY):
            if code == _NOTICE:
                log.debug('mirror "%s": %s', self.mirror, ErrorResponse.decode(bytes(buf[start:end])).message)
            return  # ParseComplete, BindComplete, RowDescription, CopyInResponse, ParameterStatus …
        if not self._in_flight:
            raise ProtocolViolation(f"mirror sent {chr(code)!r} with no request outstanding")
        head = self._in_flight[0]
        if code == _READY:
            self._in_flight.popleft()
            status = buf[start] if end > start else 0
            if isinstance(head, _Lookup):
                self._settle_lookup(head)
            else:
                self._settle_txn(head, status)
            self._settle_unsent()
            self._wakeup.set()
            return
        tag = bytes(buf[start : end - 1]).decode(errors="replace") if code == _COMPLETE else ""
        if isinstance(head, _Lookup):
            head.completes += 1
            return
        if head.step >= len(head.steps):
            log.warning('mirror "%s": txn %d: unexpected completion %r', self.mirror, head.txn.seq, tag)
            return
        write = head.steps[head.step]
        head.step += 1
        if write is None or not write.tag:
            return  # the settings' SELECT, or a write with no tag to compare (CDC)
        # An image's statement differs from the primary's; the number of rows must not.
        same = _row_count(tag) == _row_count(write.tag) if write.kind is WriteKind.IMAGE else tag == write.tag
        if not same:
            reason = f"tag differs: primary {write.tag}, mirror {tag}"
            head.divergences.append(self._divergence(head.txn, write, "diverged", reason))

    def _error(self, err: ErrorResponse) -> None:
        reason = f"mirror error {err.sqlstate}: {err.message}"
        if err.severity in ("FATAL", "PANIC"):
            # The session ends (admin shutdown, crash): whatever is in flight has an unknown
            # outcome, which the loss that follows reports.
            self._fatal = reason
            log.warning('mirror "%s": %s', self.mirror, reason)
            return
        if not self._in_flight:
            log.warning('mirror "%s": error outside any request: %s', self.mirror, reason)
            return
        head = self._in_flight[0]
        if isinstance(head, _Lookup):
            head.error = reason
            return
        # The server now skips everything up to the Sync and rolls the whole block back.
        head.errored = True
        if head.step < len(head.steps):
            write = head.steps[head.step]
            if write is None:
                names = ", ".join(name for name, _ in head.txn.settings)
                reason += f" (applying the settings {names})"
        else:
            write = None
            reason += " (at commit)"
        head.divergences.append(self._divergence(head.txn, write, "failed", reason))

    def backend_lost(self, conn: BackendConnection, exc: BaseException | None) -> None:
        if conn is not self._conn or self._lost is not None:
            return
        self._lost = self._fatal or (str(exc) if exc else "the mirror closed the connection")
        self._fail_in_flight()
        self._wakeup.set()

    def backend_write_paused(self, paused: bool) -> None:
        # The socket's buffer is full: send no further txns until it drains.
        self._write_paused = paused
        if not paused:
            self._wakeup.set()

    def relay_failed(self, exc: Exception) -> None:
        log.error('mirror "%s": cannot follow the reply stream', self.mirror, exc_info=exc)
        if self._conn is not None:
            self._abandon(self._conn, f"cannot follow the mirror's replies: {exc!r}")

    # --- settling ------------------------------------------------------------------------

    def _settle_txn(self, block: _TxnBlock, status: int) -> None:
        fresh = self._fresh.pop(block.txn.seq, None)
        if fresh and (block.errored or status != _IDLE):
            # A Parse of this block may have failed: prepare those statements again next time
            # (closing first: Close of a statement that does not exist is not an error).
            for body in fresh:
                name = self._named.pop(body, None)
                if name is not None:
                    self._stale.append(name)
        divergences = block.divergences
        if status != _IDLE:
            # A write opened a transaction block (BEGIN) and left it open: nothing is committed,
            # and the blocks behind it would run inside it. Drop the connection, which rolls it
            # back; those behind report an unknown outcome.
            reason = f"the block left a transaction open on the mirror (status {chr(status)!r}): rolled back"
            divergences.append(self._divergence(block.txn, None, "failed", reason))
        elif not block.errored and block.step != len(block.steps):
            reason = f"the mirror completed {block.step} of {len(block.steps)} statements"
            divergences.append(self._divergence(block.txn, None, "failed", reason))
        applied = status == _IDLE and not block.errored and not divergences
        self._finish(block, Outcome(applied, divergences))
        if status != _IDLE and self._conn is not None:
            self._abandon(self._conn, "a transaction was left open on the mirror")

    def _settle_lookup(self, lookup: _Lookup) -> None:
        table = lookup.key[1]
        result: TableMeta | str
        if lookup.error is not None:
            result = f"cannot look up table {table} on the mirror: {lookup.error}"
        else:
            result = TableMeta.from_rows(table, lookup.rows) or f"table {table} does not exist on the mirror"
        if not lookup.future.done():
            lookup.future.set_result(result)

    def _settle_unsent(self) -> None:
        """Txns that failed before sending settle in order, once every block before them has."""
        while self._in_flight:
            head = self._in_flight[0]
            if not isinstance(head, _TxnBlock) or head.sent:
                return
            self._in_flight.popleft()
            self._finish(head, Outcome(False, head.divergences))

    def _fail_in_flight(self) -> None:
        """The connection is gone: settle everything sent and not confirmed."""
        blocks = list(self._in_flight)
        self._in_flight.clear()
        for block in blocks:
            if isinstance(block, _Lookup):
                if not block.future.done():
                    block.future.set_result(None)
                continue
            divergences = block.divergences
            if block.sent and not block.errored:
                # The commit may or may not have happened; resending could apply it twice.
                divergences.append(self._divergence(block.txn, None, "failed", LOST_REASON))
            # An errored block was rolled back: its outcome is known, its divergences say why.
            self._finish(block, Outcome(False, divergences))
        self._progress.set()

    def _finish(self, block: _TxnBlock, outcome: Outcome, *, attempted: bool = True) -> None:
        self.queued_bytes -= block.size
        if outcome.applied:
            self.applied += 1
            self.last_applied_seq = block.txn.seq
        elif attempted:
            self.failed += 1
        if self.on_outcome is not None:
            try:
                self.on_outcome(block.txn, outcome)
            except Exception:  # the owner's bug must not stop the stream
                log.exception('mirror "%s": on_outcome failed for txn %d', self.mirror, block.txn.seq)
        if not block.future.done():
            block.future.set_result(outcome)
        self._progress.set()

    # --- divergences -----------------------------------------------------------------------

    def _divergence(self, txn: Txn, write: Write | None, kind: str, reason: str) -> Divergence:
        if write is None and len(txn.writes) == 1:
            write = txn.writes[0]  # a one-statement txn: name the statement
        if write is None:
            return Divergence(self.mirror, self.database, reason, txn.tables, seq=txn.seq, kind=kind)
        return Divergence(
            self.mirror,
            self.database,
            reason,
            write.tables,
            fingerprint=write.fingerprint,
            statement=write.sql[:STATEMENT_LIMIT],
            seq=txn.seq,
            kind=kind,
        )

    def _out_of_sync(self, txn: Txn, reason: str) -> Outcome:
        return Outcome(False, [self._divergence(txn, None, "out_of_sync", reason)])
