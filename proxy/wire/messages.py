"""Frozen message dataclasses for every message the proxy reads or builds, with encode/decode.

Messages the proxy merely relays are never decoded (DESIGN.md §3: frame first, decode lazily);
these classes are for the startup/auth exchange, errors the proxy raises itself, and the few
frames whose contents steer the session (ParameterStatus, ReadyForQuery, Query, Parse).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

from proxy.errors import FeatureNotSupported, ProtocolViolation
from proxy.wire.codes import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    AuthCode,
    BackendCode,
    FrontendCode,
    TxStatus,
)

_I32 = struct.Struct("!i")
_I32_PAIR = struct.Struct("!ii")
_HEADER = struct.Struct("!BI")


def frame(code: int, payload: bytes) -> bytes:
    """One typed message: code byte, int32 length (counting itself), payload."""
    return _HEADER.pack(code, len(payload) + 4) + payload


def _cstr(value: str) -> bytes:
    return value.encode() + b"\x00"


class _Cursor:
    """Reads NUL-terminated strings and integers from a payload; malformed → ProtocolViolation."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def cstr(self) -> str:
        end = self._data.find(b"\x00", self._pos)
        if end < 0:
            raise ProtocolViolation(f"malformed {self._what} message: unterminated string")
        raw = self._data[self._pos : end]
        self._pos = end + 1
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolViolation(f"malformed {self._what} message: invalid UTF-8") from exc

    def int32(self) -> int:
        if self._pos + 4 > len(self._data):
            raise ProtocolViolation(f"malformed {self._what} message: truncated")
        (value,) = _I32.unpack_from(self._data, self._pos)
        self._pos += 4
        return int(value)

    def int16(self) -> int:
        if self._pos + 2 > len(self._data):
            raise ProtocolViolation(f"malformed {self._what} message: truncated")
        value = int.from_bytes(self._data[self._pos : self._pos + 2], "big", signed=True)
        self._pos += 2
        return value

    def rest(self) -> bytes:
        value = self._data[self._pos :]
        self._pos = len(self._data)
        return value

    def at_end(self) -> bool:
        return self._pos >= len(self._data)


# --- startup packets (no type byte) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """StartupMessage; ``params`` keeps the client's order (user, database, options, …)."""

    params: dict[str, str]
    protocol: int = PROTOCOL_3_0

    def encode(self) -> bytes:
        body = _I32.pack(self.protocol) + b"".join(_cstr(k) + _cstr(v) for k, v in self.params.items())
        body += b"\x00"
        return _I32.pack(len(body) + 4) + body

    @classmethod
    def decode_params(cls, payload: bytes, protocol: int) -> StartupMessage:
        """``payload`` is everything after the protocol version."""
        cur = _Cursor(payload, "startup")
        params: dict[str, str] = {}
        while True:
            if cur.at_end():
                raise ProtocolViolation("malformed startup message: missing terminator")
            key = cur.cstr()
            if key == "":
                break
            params[key] = cur.cstr()
        if not cur.at_end():
            raise ProtocolViolation("malformed startup message: data after terminator")
        return cls(params, protocol)

    @property
    def major(self) -> int:
        return self.protocol >> 16

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _I32_PAIR.pack(8, SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _I32_PAIR.pack(8, GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: int

    def encode(self) -> bytes:
        return _I32_PAIR.pack(16, CANCEL_REQUEST_CODE) + _I32_PAIR.pack(self.pid, self.secret)


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def decode_startup_packet(payload: bytes) -> StartupPacket:
    """Decode a startup-phase packet body (after its int32 length).

    Protocol 2 and unknown major versions are refused with FeatureNotSupported, like Postgres'
    ProcessStartupPacket ("unsupported frontend protocol").
    """
    if len(payload) < 4:
        raise ProtocolViolation("invalid length of startup packet")
    (code,) = _I32.unpack_from(payload, 0)
    if code == SSL_REQUEST_CODE and len(payload) == 4:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and len(payload) == 4:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(payload) != 12:
            raise ProtocolViolation("invalid length of cancel request packet")
        pid, secret = _I32_PAIR.unpack_from(payload, 4)
        return CancelRequest(pid, secret)
    major = (code >> 16) & 0xFFFF
    if major != 3:
        raise FeatureNotSupported(
            f"unsupported frontend protocol {major}.{code & 0xFFFF}: server supports 3.0 to 3.0",
            hint="Use a client library that speaks protocol version 3 (every libpq since 7.4 does).",
        )
    return StartupMessage.decode_params(payload[4:], code)


# --- authentication ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authentication:
    """Any 'R' message: ``code`` says which; ``data`` is the code-specific rest."""

    code: AuthCode
    data: bytes = b""

    def encode(self) -> bytes:
        return frame(BackendCode.AUTHENTICATION, _I32.pack(self.code) + self.data)

    @classmethod
    def decode(cls, payload: bytes) -> Authentication:
        if len(payload) < 4:
            raise ProtocolViolation("malformed Authentication message")
        (code,) = _I32.unpack_from(payload, 0)
        try:
            return cls(AuthCode(code), payload[4:])
        except ValueError as exc:
            raise ProtocolViolation(f"unknown authentication request code {code}") from exc

    @classmethod
    def sasl(cls, mechanisms: list[str]) -> Authentication:
        return cls(AuthCode.SASL, b"".join(_cstr(m) for m in mechanisms) + b"\x00")

    def sasl_mechanisms(self) -> list[str]:
        return [m for m in self.data.decode(errors="replace").split("\x00") if m]


AUTH_OK = Authentication(AuthCode.OK).encode()


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """'p' carrying a (cleartext or md5) password; the payload ends with a NUL."""

    password: bytes

    def encode(self) -> bytes:
        return frame(FrontendCode.PASSWORD, self.password + b"\x00")

    @classmethod
    def decode(cls, payload: bytes) -> PasswordMessage:
        if not payload.endswith(b"\x00"):
            raise ProtocolViolation("malformed password message: missing terminator")
        return cls(payload[:-1])


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    mechanism: str
    data: bytes

    def encode(self) -> bytes:
        return frame(FrontendCode.PASSWORD, _cstr(self.mechanism) + _I32.pack(len(self.data)) + self.data)

    @classmethod
    def decode(cls, payload: bytes) -> SASLInitialResponse:
        cur = _Cursor(payload, "SASLInitialResponse")
        mechanism = cur.cstr()
        length = cur.int32()
        data = cur.rest()
        if length != len(data):
            raise ProtocolViolation("malformed SASLInitialResponse message: bad data length")
        return cls(mechanism, data)


@dataclass(frozen=True, slots=True)
class SASLResponse:
    data: bytes

    def encode(self) -> bytes:
        return frame(FrontendCode.PASSWORD, self.data)


# --- session-level messages -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str

    def encode(self) -> bytes:
        return frame(BackendCode.PARAMETER_STATUS, _cstr(self.name) + _cstr(self.value))

    @classmethod
    def decode(cls, payload: bytes) -> ParameterStatus:
        cur = _Cursor(payload, "ParameterStatus")
        return cls(cur.cstr(), cur.cstr())


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    pid: int
    secret: int

    def encode(self) -> bytes:
        return frame(BackendCode.BACKEND_KEY_DATA, _I32_PAIR.pack(self.pid, self.secret))

    @classmethod
    def decode(cls, payload: bytes) -> BackendKeyData:
        # Protocol 3.2 allows longer secrets; we only negotiate 3.0, where it is an int32.
        if len(payload) != 8:
            raise ProtocolViolation("malformed BackendKeyData message")
        pid, secret = _I32_PAIR.unpack(payload)
        return cls(pid, secret)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: TxStatus

    def encode(self) -> bytes:
        return frame(BackendCode.READY_FOR_QUERY, bytes([self.status]))

    @classmethod
    def decode(cls, payload: bytes) -> ReadyForQuery:
        if len(payload) != 1 or payload[0] not in (73, 84, 69):
            raise ProtocolViolation("malformed ReadyForQuery message")
        return cls(TxStatus(payload[0]))


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    newest_minor: int
    unrecognized: tuple[str, ...]

    def encode(self) -> bytes:
        body = _I32_PAIR.pack(self.newest_minor, len(self.unrecognized))
        body += b"".join(_cstr(o) for o in self.unrecognized)
        return frame(BackendCode.NEGOTIATE_PROTOCOL_VERSION, body)


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """ErrorResponse/NoticeResponse: one-letter field codes → values (protocol-error-fields.html)."""

    fields: dict[str, str] = field(default_factory=dict)
    code: ClassVar[int] = BackendCode.ERROR_RESPONSE

    @classmethod
    def build(
        cls,
        severity: str,
        sqlstate: str,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
    ) -> ErrorResponse:
        fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
        if detail:
            fields["D"] = detail
        if hint:
            fields["H"] = hint
        return cls(fields)

    def encode(self) -> bytes:
        body = b"".join(k.encode() + _cstr(v) for k, v in self.fields.items()) + b"\x00"
        return frame(self.code, body)

    @classmethod
    def decode(cls, payload: bytes) -> ErrorResponse:
        fields: dict[str, str] = {}
        pos = 0
        while True:
            if pos >= len(payload):
                raise ProtocolViolation("malformed ErrorResponse message: missing terminator")
            kind = payload[pos]
            if kind == 0:
                return cls(fields)
            end = payload.find(b"\x00", pos + 1)
            if end < 0:
                raise ProtocolViolation("malformed ErrorResponse message: unterminated field")
            # Servers send fields in their client_encoding; never fail on an odd byte here.
            fields[chr(kind)] = payload[pos + 1 : end].decode(errors="replace")
            pos = end + 1

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def severity(self) -> str:
        return self.fields.get("V", self.fields.get("S", ""))


@dataclass(frozen=True, slots=True)
class NoticeResponse(ErrorResponse):
    code: ClassVar[int] = BackendCode.NOTICE_RESPONSE


@dataclass(frozen=True, slots=True)
class Query:
    sql: str

    def encode(self) -> bytes:
        return frame(FrontendCode.QUERY, _cstr(self.sql))

    @classmethod
    def decode(cls, payload: bytes) -> Query:
        cur = _Cursor(payload, "Query")
        sql = cur.cstr()
        return cls(sql)


@dataclass(frozen=True, slots=True)
class Close:
    """Close a prepared statement (``kind`` b"S") or a portal (b"P")."""

    kind: bytes
    name: str

    def encode(self) -> bytes:
        return frame(FrontendCode.CLOSE, self.kind + _cstr(self.name))

    @classmethod
    def decode(cls, payload: bytes) -> Close:
        kind = payload[:1]
        if kind not in (b"S", b"P"):
            raise ProtocolViolation(f"malformed Close message: target {kind!r} is neither 'S' nor 'P'")
        cur = _Cursor(payload[1:], "Close")
        return cls(kind, cur.cstr())


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    sql: str
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        body = (
            _cstr(self.name)
            + _cstr(self.sql)
            + struct.pack(f"!h{len(self.param_types)}I", len(self.param_types), *self.param_types)
        )
        return frame(FrontendCode.PARSE, body)

    @classmethod
    def decode(cls, payload: bytes) -> Parse:
        cur = _Cursor(payload, "Parse")
        name = cur.cstr()
        sql = cur.cstr()
        count = cur.int16()
        rest = cur.rest()
        if count < 0 or len(rest) != 4 * count:
            raise ProtocolViolation("malformed Parse message: bad parameter type count")
        return cls(name, sql, struct.unpack(f"!{count}I", rest))


@dataclass(frozen=True, slots=True)
class CommandComplete:
    tag: str

    def encode(self) -> bytes:
        return frame(BackendCode.COMMAND_COMPLETE, _cstr(self.tag))

    @classmethod
    def decode(cls, payload: bytes) -> CommandComplete:
        return cls(_Cursor(payload, "CommandComplete").cstr())


TERMINATE = frame(FrontendCode.TERMINATE, b"")
SYNC = frame(FrontendCode.SYNC, b"")
FLUSH = frame(FrontendCode.FLUSH, b"")


def decode_data_row(payload: bytes) -> list[bytes | None]:
    """A DataRow body: its column values as raw bytes (None for SQL NULL)."""
    if len(payload) < 2:
        raise ProtocolViolation("malformed DataRow message")
    (count,) = struct.unpack_from("!h", payload, 0)
    pos = 2
    values: list[bytes | None] = []
    for _ in range(count):
        if pos + 4 > len(payload):
            raise ProtocolViolation("malformed DataRow message: truncated")
        (length,) = _I32.unpack_from(payload, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        if pos + length > len(payload):
            raise ProtocolViolation("malformed DataRow message: truncated")
        values.append(payload[pos : pos + length])
        pos += length
    return values
