"""Sans-IO decoder for pgoutput (logical replication protocol version 1) and the replication CopyData frames.

Two layers, both from the Postgres 15 protocol documentation:

* The streaming replication framing carried in CopyData while the connection is in CopyBoth mode
  (protocol-replication.html): XLogData ('w') and Primary keepalive ('k') from the server, Standby
  status update ('r') from us.
* The pgoutput messages inside an XLogData payload (protocol-logicalrep-message-formats.html):
  Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate and Message, decoded into
  frozen dataclasses. Only protocol version 1 is understood: the streamed-transaction (v2) and
  two-phase (v3) messages are refused as protocol violations, since we never ask for them.

Column values stay the bytes the server sent (text output in the connection's client_encoding, or
binary with the ``binary`` option): the apply side hands them to the target as they are, so
decoding them here would only cost a round trip through ``str``.

Every malformed input raises ProtocolViolation naming the message it was in.
"""

from __future__ import annotations

import enum
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

from proxy.errors import ProtocolViolation

# --- LSNs and timestamps ---------------------------------------------------------------------

_LSN_TEXT = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def format_lsn(lsn: int) -> str:
    """An LSN as Postgres prints a pg_lsn: two unpadded upper-case hex halves, "16/B374D848"."""
    if not 0 <= lsn < 1 << 64:
        raise ValueError(f"LSN {lsn} is out of range")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """The inverse of format_lsn; ValueError for anything that is not "X/Y" with 1-8 hex digits each."""
    match = _LSN_TEXT.match(text.strip())
    if match is None:
        raise ValueError(f"invalid LSN {text!r}: expected the form X/Y in hex, like 16/B374D848")
    return int(match.group(1), 16) << 32 | int(match.group(2), 16)


# Postgres timestamps count microseconds from 2000-01-01 00:00 UTC (POSTGRES_EPOCH_JDATE).
PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_UNIX = 946_684_800  # PG_EPOCH as seconds since 1970-01-01


def pg_now() -> int:
    """The current time as a Postgres timestamp (microseconds since 2000-01-01 UTC)."""
    return time.time_ns() // 1000 - _PG_EPOCH_UNIX * 1_000_000


def pg_timestamp(micros: int) -> datetime:
    """A Postgres timestamp (as carried by Begin, Commit, XLogData …) as an aware UTC datetime."""
    return PG_EPOCH + timedelta(microseconds=micros)


# --- struct formats (all network byte order) -------------------------------------------------

_U8 = struct.Struct("!B")
_I16 = struct.Struct("!h")
_U32 = struct.Struct("!I")  # OIDs and xids are unsigned 32-bit
_I32 = struct.Struct("!i")
_U64 = struct.Struct("!Q")  # LSNs
_I64 = struct.Struct("!q")  # timestamps
_XLOG_HEADER = struct.Struct("!QQq")  # after 'w': start LSN, current end of WAL, server clock
_KEEPALIVE = struct.Struct("!QqB")  # after 'k': end of WAL, server clock, reply requested
_STATUS = struct.Struct("!BQQQqB")  # 'r', write, flush, apply, client clock, reply requested


class _Reader:
    """A cursor over one message; every read checks bounds and reports the message's name."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str, pos: int = 1) -> None:
        self.data = data
        self.what = what
        self.pos = pos  # the type byte has been read by the dispatcher

    def error(self, why: str) -> ProtocolViolation:
        return ProtocolViolation(f"malformed pgoutput {self.what} message: {why}")

    def _unpack(self, fmt: struct.Struct) -> int:
        pos = self.pos
        if pos + fmt.size > len(self.data):
            raise self.error("truncated")
        self.pos = pos + fmt.size
        value: int = fmt.unpack_from(self.data, pos)[0]
        return value

    def u8(self) -> int:
        return self._unpack(_U8)

    def i16(self) -> int:
        return self._unpack(_I16)

    def u32(self) -> int:
        return self._unpack(_U32)

    def i32(self) -> int:
        return self._unpack(_I32)

    def u64(self) -> int:
        return self._unpack(_U64)

    def i64(self) -> int:
        return self._unpack(_I64)

    def take(self, n: int) -> bytes:
        pos = self.pos
        if n < 0 or pos + n > len(self.data):
            raise self.error("truncated")
        self.pos = pos + n
        return self.data[pos : pos + n]

    def cstr(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise self.error("unterminated string")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise self.error("invalid UTF-8 in a name") from exc

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.error(f"{len(self.data) - self.pos} unexpected bytes at the end")


# _HOT: the messages made for every change (TupleData, Begin, Commit, Insert, Update, Delete,
# XLogData) are plain slotted dataclasses, not frozen ones: a frozen dataclass's __init__ sets each
# field through object.__setattr__ and costs four times as much, which a stream of thousands of
# transactions a second feels. Treat them as immutable all the same.

# --- tuple data ------------------------------------------------------------------------------


class Unchanged(enum.Enum):
    """Type of UNCHANGED: a TOASTed column an UPDATE left as it was (the server does not send it)."""

    UNCHANGED = "unchanged-toast"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged.UNCHANGED

# A column's value: its bytes ('t' text or 'b' binary), None for SQL NULL, or UNCHANGED.
Value = bytes | None | Literal[Unchanged.UNCHANGED]

KIND_NULL: Final = ord("n")
KIND_UNCHANGED: Final = ord("u")
KIND_TEXT: Final = ord("t")
KIND_BINARY: Final = ord("b")


@dataclass(slots=True)  # not frozen: see _HOT
class TupleData:
    """One row image. ``kinds`` holds each column's kind byte (b"tnub": text, null, unchanged
    TOAST, binary), so a value's format is known without a parallel list of objects."""

    values: tuple[Value, ...]
    kinds: bytes

    def __len__(self) -> int:
        return len(self.values)

    def is_binary(self, index: int) -> bool:
        return self.kinds[index] == KIND_BINARY


def _tuple_data(r: _Reader) -> TupleData:
    # The hottest loop of the decoder: positions in locals, no method call per column.
    data = r.data
    size = len(data)
    pos = r.pos
    if pos + 2 > size:
        raise r.error("truncated")
    count = _I16.unpack_from(data, pos)[0]
    pos += 2
    if count < 0:
        raise r.error(f"negative column count {count}")
    values: list[Value] = []
    append = values.append
    kinds = bytearray(count)
    unpack_i32 = _I32.unpack_from
    for i in range(count):
        if pos >= size:
            raise r.error("truncated")
        kind = data[pos]
        pos += 1
        if kind in (KIND_TEXT, KIND_BINARY):
            if pos + 4 > size:
                raise r.error("truncated")
            length = unpack_i32(data, pos)[0]
            pos += 4
            if length < 0:
                raise r.error(f"negative length {length} for column {i + 1}")
            if pos + length > size:
                raise r.error("truncated")
            append(data[pos : pos + length])
            pos += length
        elif kind == KIND_NULL:
            append(None)
        elif kind == KIND_UNCHANGED:
            append(UNCHANGED)
        else:
            raise r.error(f"unknown kind {chr(kind)!r} for column {i + 1}")
        kinds[i] = kind
    r.pos = pos
    return TupleData(tuple(values), bytes(kinds))


# --- the messages ----------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: see _HOT
class Begin:
    """Start of a transaction: ``final_lsn`` is where its commit record starts."""

    final_lsn: int
    commit_time: int  # Postgres timestamp (pg_timestamp() makes it a datetime)
    xid: int


@dataclass(slots=True)  # not frozen: see _HOT
class Commit:
    """End of a transaction. ``end_lsn`` (just past the commit record) is the position to confirm
    once the transaction is applied: a slot re-sends every transaction whose commit record starts
    at or after its confirmed position, so confirming ``commit_lsn`` would replay this one."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True, slots=True)
class Origin:
    """The transaction was replicated into the source from ``name`` (sent only when it was)."""

    commit_lsn: int  # the commit's LSN on the origin server
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    flags: int  # bit 0: part of the replica identity key
    name: str
    type_oid: int
    typmod: int

    @property
    def key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    """A table's shape as the publication sends it (generated columns, and columns outside a
    PG15 column list, are absent). Sent before the first change to the table on each connection
    and again after its definition changed, always inside a transaction."""

    relation_id: int
    namespace: str  # "" stands for pg_catalog
    name: str
    replica_identity: str  # pg_class.relreplident: d(efault), n(othing), f(ull), i(ndex)
    columns: tuple[RelationColumn, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace or 'pg_catalog'}.{self.name}"

    @property
    def key_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.key)

    def row(self, data: TupleData) -> dict[str, Value]:
        """``data`` as a dict keyed by column name (UNCHANGED and None kept as they are)."""
        if len(data.values) != len(self.columns):
            raise ProtocolViolation(
                f"pgoutput tuple for {self.qualified_name} has {len(data.values)} columns, "
                f"its Relation message announced {len(self.columns)}"
            )
        return {column.name: value for column, value in zip(self.columns, data.values, strict=True)}


@dataclass(frozen=True, slots=True)
class TypeMessage:
    """A non-built-in data type used by a following Relation (pgoutput's 'Y' message)."""

    type_oid: int
    namespace: str
    name: str


@dataclass(slots=True)  # not frozen: see _HOT
class Insert:
    relation_id: int
    new: TupleData


# Which old row image an Update or Delete carries: the replica identity key columns ('K', the
# other columns null) or the whole row ('O', REPLICA IDENTITY FULL).
OldKind = Literal["K", "O"]


@dataclass(slots=True)  # not frozen: see _HOT
class Update:
    """A row update. ``old`` is None when the key did not change under the default replica
    identity: the key is then found in ``new``. Columns in ``new`` may be UNCHANGED."""

    relation_id: int
    new: TupleData
    old: TupleData | None = None
    old_kind: OldKind | None = None


@dataclass(slots=True)  # not frozen: see _HOT
class Delete:
    relation_id: int
    old: TupleData
    old_kind: OldKind


TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2


@dataclass(frozen=True, slots=True)
class Truncate:
    options: int
    relation_ids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & TRUNCATE_CASCADE)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & TRUNCATE_RESTART_IDENTITY)


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """pg_logical_emit_message() output ('M'; only with the ``messages`` option)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgOutputMessage = (
    Begin | Commit | Origin | Relation | TypeMessage | Insert | Update | Delete | Truncate | LogicalMessage
)


def _begin(r: _Reader) -> Begin:
    return Begin(r.u64(), r.i64(), r.u32())


def _commit(r: _Reader) -> Commit:
    return Commit(r.u8(), r.u64(), r.u64(), r.i64())


def _origin(r: _Reader) -> Origin:
    return Origin(r.u64(), r.cstr())


def _relation(r: _Reader) -> Relation:
    relation_id = r.u32()
    namespace = r.cstr()
    name = r.cstr()
    identity = r.u8()
    if identity not in b"dnfi":
        raise r.error(f"unknown replica identity {chr(identity)!r}")
    count = r.i16()
    if count < 0:
        raise r.error(f"negative column count {count}")
    columns = tuple(RelationColumn(r.u8(), r.cstr(), r.u32(), r.i32()) for _ in range(count))
    return Relation(relation_id, namespace, name, chr(identity), columns)


def _type(r: _Reader) -> TypeMessage:
    return TypeMessage(r.u32(), r.cstr(), r.cstr())


def _expect(r: _Reader, wanted: bytes, what: str) -> int:
    marker = r.u8()
    if marker not in wanted:
        raise r.error(f"expected {what}, found {chr(marker)!r}")
    return marker


def _old_kind(marker: int) -> OldKind:
    return "K" if marker == ord("K") else "O"


def _insert(r: _Reader) -> Insert:
    relation_id = r.u32()
    _expect(r, b"N", "'N' (new tuple)")
    return Insert(relation_id, _tuple_data(r))


def _update(r: _Reader) -> Update:
    relation_id = r.u32()
    marker = _expect(r, b"KON", "'K', 'O' or 'N'")
    if marker == ord("N"):
        return Update(relation_id, _tuple_data(r))
    old = _tuple_data(r)
    _expect(r, b"N", "'N' (new tuple) after the old one")
    return Update(relation_id, _tuple_data(r), old, _old_kind(marker))


def _delete(r: _Reader) -> Delete:
    relation_id = r.u32()
    marker = _expect(r, b"KO", "'K' or 'O' (old tuple)")
    return Delete(relation_id, _tuple_data(r), _old_kind(marker))


def _truncate(r: _Reader) -> Truncate:
    count = r.i32()
    if count < 0:
        raise r.error(f"negative relation count {count}")
    options = r.u8()
    return Truncate(options, tuple(r.u32() for _ in range(count)))


def _message(r: _Reader) -> LogicalMessage:
    flags = r.u8()
    lsn = r.u64()
    prefix = r.cstr()
    length = r.i32()
    return LogicalMessage(bool(flags & 1), lsn, prefix, r.take(length))


_DECODERS: dict[int, tuple[str, Callable[[_Reader], PgOutputMessage]]] = {
    ord("B"): ("Begin", _begin),
    ord("C"): ("Commit", _commit),
    ord("O"): ("Origin", _origin),
    ord("R"): ("Relation", _relation),
    ord("Y"): ("Type", _type),
    ord("I"): ("Insert", _insert),
    ord("U"): ("Update", _update),
    ord("D"): ("Delete", _delete),
    ord("T"): ("Truncate", _truncate),
    ord("M"): ("Message", _message),
}
# Stream start/stop/commit/abort (protocol v2) and the two-phase messages (v3).
_NEWER_PROTOCOL = frozenset(b"SEcAbPKrp")


def decode_message(payload: bytes) -> PgOutputMessage:
    """Decode one pgoutput message (an XLogData payload)."""
    if not payload:
        raise ProtocolViolation("malformed pgoutput message: empty")
    code = payload[0]
    entry = _DECODERS.get(code)
    if entry is None:
        if code in _NEWER_PROTOCOL:
            raise ProtocolViolation(
                f"pgoutput message type {chr(code)!r} belongs to a newer protocol version",
                hint="pgshift asks for proto_version '1', which never sends it.",
            )
        raise ProtocolViolation(f"unknown pgoutput message type {chr(code)!r}")
    name, decoder = entry
    reader = _Reader(payload, name)
    message = decoder(reader)
    reader.end()
    return message


# --- relation cache --------------------------------------------------------------------------


class RelationCache:
    """What the Relation and Type messages announced so far, keyed by OID.

    A connection's first change to a table is preceded by its Relation message, and so is the
    first one after the table's definition changed; a fresh connection starts empty.
    """

    __slots__ = ("_relations", "_types")

    def __init__(self) -> None:
        self._relations: dict[int, Relation] = {}
        self._types: dict[int, TypeMessage] = {}

    def __len__(self) -> int:
        return len(self._relations)

    def __contains__(self, relation_id: object) -> bool:
        return relation_id in self._relations

    def update(self, message: PgOutputMessage) -> None:
        """Record a Relation or Type message; any other message is ignored."""
        if isinstance(message, Relation):
            self._relations[message.relation_id] = message
        elif isinstance(message, TypeMessage):
            self._types[message.type_oid] = message

    def get(self, relation_id: int) -> Relation:
        try:
            return self._relations[relation_id]
        except KeyError:
            raise ProtocolViolation(
                f"pgoutput change for relation {relation_id}, which no Relation message announced"
            ) from None

    def type(self, type_oid: int) -> TypeMessage | None:
        """A non-built-in type a Type message announced (built-in ones never get one)."""
        return self._types.get(type_oid)

    def row(self, relation_id: int, data: TupleData) -> dict[str, Value]:
        """``data`` of a change to ``relation_id`` as a dict keyed by column name."""
        return self.get(relation_id).row(data)

    def clear(self) -> None:
        self._relations.clear()
        self._types.clear()


# --- replication CopyData framing ------------------------------------------------------------


@dataclass(slots=True)  # not frozen: see _HOT
class XLogData:
    """'w': a piece of the stream. For logical replication ``payload`` is one pgoutput message and
    ``start_lsn`` its position (a Commit's is the end of the commit record)."""

    start_lsn: int
    end_lsn: int  # the current end of WAL on the server (logical walsenders repeat start_lsn)
    server_time: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """'k': the server is alive; ``reply_requested`` means answer at once, or be disconnected
    after wal_sender_timeout."""

    end_lsn: int  # how far the server has sent (and, for logical, decoded) WAL
    server_time: int
    reply_requested: bool


@dataclass(frozen=True, slots=True)
class StandbyStatusUpdate:
    """'r': the client's progress. For a logical slot only ``flush`` matters: it becomes the slot's
    confirmed_flush_lsn, below which the server may recycle WAL and never replays a transaction."""

    write: int
    flush: int
    apply: int
    client_time: int  # Postgres timestamp; pg_now() when built by the client
    reply_requested: bool = False

    def encode(self) -> bytes:
        """The CopyData payload (the caller frames it as a 'd' message)."""
        return _STATUS.pack(
            ord("r"), self.write, self.flush, self.apply, self.client_time, 1 if self.reply_requested else 0
        )


def decode_copy_data(body: bytes) -> XLogData | PrimaryKeepalive:
    """A CopyData body the server sends during START_REPLICATION."""
    if not body:
        raise ProtocolViolation("malformed replication CopyData message: empty")
    kind = body[0]
    if kind == ord("w"):
        if len(body) < 1 + _XLOG_HEADER.size:
            raise ProtocolViolation("malformed XLogData message: truncated header")
        start, end, clock = _XLOG_HEADER.unpack_from(body, 1)
        return XLogData(start, end, clock, body[1 + _XLOG_HEADER.size :])
    if kind == ord("k"):
        if len(body) != 1 + _KEEPALIVE.size:
            raise ProtocolViolation(f"malformed Primary keepalive message: {len(body)} bytes, expected 18")
        end, clock, reply = _KEEPALIVE.unpack_from(body, 1)
        return PrimaryKeepalive(end, clock, bool(reply))
    raise ProtocolViolation(f"unknown replication CopyData message type {chr(kind)!r}")
