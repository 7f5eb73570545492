"""Byte-level edits of single protocol messages for capture: trim the row-image column, rename, reformat.

Every function takes and returns one whole message (type byte, length, body). They are pure and
small so the unit tests can pin each rule; malformed input raises ProtocolViolation.
"""

from __future__ import annotations

import struct

from proxy.errors import ProtocolViolation

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_HEAD = struct.Struct("!cI")
NO_DATA = b"n\x00\x00\x00\x04"
PORTAL_SUSPENDED = b"s\x00\x00\x00\x04"
# RowDescription field after its name: table oid, column number, type oid, type size, typmod, format.
_FIELD_TAIL = 18


def _message(code: bytes, body: bytes) -> bytes:
    return _HEAD.pack(code, len(body) + 4) + body


def _cstring_end(msg: bytes, pos: int, what: str) -> int:
    end = msg.find(b"\x00", pos)
    if end < 0:
        raise ProtocolViolation(f"malformed {what} message: unterminated string")
    return end


def split_last_column(msg: bytes) -> tuple[bytes, bytes | None]:
    """A DataRow without its last column, and that column's value (None for NULL)."""
    try:
        (count,) = _I16.unpack_from(msg, 5)
        pos = 7
        for _ in range(count - 1):
            (length,) = _I32.unpack_from(msg, pos)
            pos += 4 + max(length, 0)
        last = pos
        (length,) = _I32.unpack_from(msg, pos)
    except struct.error:
        raise ProtocolViolation("malformed DataRow message") from None
    if count < 1 or last + 4 + max(length, 0) != len(msg):
        raise ProtocolViolation("malformed DataRow message: column lengths do not add up")
    value = msg[last + 4 : last + 4 + length] if length >= 0 else None
    return _message(b"D", _I16.pack(count - 1) + msg[7:last]), value


def drop_last_field(msg: bytes) -> tuple[bytes, int]:
    """A RowDescription without its last field, and how many fields remain."""
    try:
        (count,) = _I16.unpack_from(msg, 5)
    except struct.error:
        raise ProtocolViolation("malformed RowDescription message") from None
    if count < 1:
        raise ProtocolViolation("RowDescription without the row-image column")
    pos = 7
    for _ in range(count - 1):
        pos = _cstring_end(msg, pos, "RowDescription") + 1 + _FIELD_TAIL
    if pos > len(msg):
        raise ProtocolViolation("malformed RowDescription message")
    return _message(b"T", _I16.pack(count - 1) + msg[7:pos]), count - 1


def parse_parts(msg: bytes, codec: str = "utf-8") -> tuple[str, str, int]:
    """(statement name, SQL text, offset of the parameter-type section) of a Parse message; the
    text read with ``codec``, the session's client encoding."""
    stop = _cstring_end(msg, 5, "Parse")
    end = _cstring_end(msg, stop + 1, "Parse")
    return msg[5:stop].decode(errors="replace"), msg[stop + 1 : end].decode(codec, errors="replace"), end + 1


def unnamed_parse(msg: bytes) -> bytes:
    """The same Parse for the unnamed statement (how a mirror replays it)."""
    stop = _cstring_end(msg, 5, "Parse")
    return _message(b"P", b"\x00" + msg[stop + 1 :])


def bind_names(msg: bytes) -> tuple[str, str]:
    """(portal, statement) a Bind message names."""
    stop = _cstring_end(msg, 5, "Bind")
    end = _cstring_end(msg, stop + 1, "Bind")
    return msg[5:stop].decode(errors="replace"), msg[stop + 1 : end].decode(errors="replace")


def _bind_sections(msg: bytes) -> tuple[int, int]:
    """Offsets in a Bind message: where the parameters start (after the names), where the result
    format count starts."""
    stop = _cstring_end(msg, 5, "Bind")
    pos = _cstring_end(msg, stop + 1, "Bind") + 1
    start = pos
    try:
        (nformats,) = _I16.unpack_from(msg, pos)
        pos += 2 + 2 * nformats
        (nparams,) = _I16.unpack_from(msg, pos)
        pos += 2
        for _ in range(nparams):
            (length,) = _I32.unpack_from(msg, pos)
            pos += 4 + max(length, 0)
        _I16.unpack_from(msg, pos)
    except struct.error:
        raise ProtocolViolation("malformed Bind message") from None
    return start, pos


def bind_for_replay(msg: bytes) -> bytes:
    """The Bind a mirror replays: unnamed portal and statement, the same parameters, no result
    formats (the mirror's rows are discarded; text is always accepted)."""
    start, results = _bind_sections(msg)
    return _message(b"B", b"\x00\x00" + msg[start:results] + b"\x00\x00")


def bind_with_image_format(msg: bytes, returning: bool) -> bytes:
    """A Bind for a statement with the row-image column appended: one result format per column
    (a count above 1) must cover that column too; 0 or 1 format codes already do. Without the
    client's own RETURNING the statement had no columns, and Postgres ignored whatever formats
    the Bind listed; the image column then gets the default (text)."""
    _, results = _bind_sections(msg)
    (count,) = _I16.unpack_from(msg, results)
    if count <= 1:
        return msg
    if not returning:
        return _message(b"B", msg[5:results] + b"\x00\x00")
    return _message(b"B", msg[5:results] + _I16.pack(count + 1) + msg[results + 2 :] + b"\x00\x00")


def command_tag(msg: bytes) -> str:
    """The tag of a CommandComplete message ("INSERT 0 3")."""
    return msg[5:-1].decode(errors="replace")


def with_row_count(msg: bytes, rows: int) -> bytes:
    """A CommandComplete whose trailing row count is ``rows`` ("INSERT 0 5" → "INSERT 0 2")."""
    head, _, last = command_tag(msg).rpartition(" ")
    if not head or not last.isdigit():
        return msg
    return _message(b"C", f"{head} {rows}".encode() + b"\x00")


def notice(severity: str, sqlstate: str, message: str, detail: str = "") -> bytes:
    """A NoticeResponse the proxy adds (e.g. a sync mirror that did not confirm in time)."""
    body = b"S" + severity.encode() + b"\x00V" + severity.encode() + b"\x00C" + sqlstate.encode() + b"\x00"
    body += b"M" + message.encode() + b"\x00"
    if detail:
        body += b"D" + detail.encode() + b"\x00"
    return _message(b"N", body + b"\x00")
