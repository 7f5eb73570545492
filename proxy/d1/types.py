"""Postgres → D1 (SQLite) type mapping, and Postgres text values → D1 bound parameters and back.

D1's REST API binds JSON values, and a JSON number binds as a double (REAL): 2^53 + 1 arrives as
2^53. So every value is sent as a JSON *string* (or null), into a STRICT table whose column types
make SQLite convert it losslessly (a string "9007199254740993" into an INTEGER column is stored
as that integer; a string that cannot be converted exactly is refused with
SQLITE_CONSTRAINT_DATATYPE instead of stored as something else). Reading back, D1 answers JSON
numbers again, so integers are selected as ``CAST(col AS TEXT)``, blobs as ``hex(col)``.

Values come in as Postgres *text format* (what pgoutput and ``COPY … TO STDOUT`` give, DateStyle
ISO and bytea_output hex: the server defaults). ``Codec.encode`` turns one into its D1 parameter;
``Codec.decode`` turns the value D1 answers for ``Codec.select(col)`` into the same string, so a
row compares equal in this canonical form exactly when D1 holds what Postgres holds.

- int2, int4, int8 (oid, xid8 too) → INTEGER: decimal digits, exact to ±2^63 (read back as text).
- bool → INTEGER: "1" / "0".
- float4, float8 → REAL: the shortest round-trip repr; ±Infinity as ±9e999; NaN refused (SQLite
  stores a NaN REAL as NULL); -0 becomes 0 (D1 does not keep the sign of a zero).
- numeric → TEXT: Postgres' text, exact (NaN, ±Infinity as written).
- text, varchar, char(n), name, uuid, enums, citext → TEXT as Postgres writes it (char(n) padded).
- date → TEXT YYYY-MM-DD; timestamp → TEXT YYYY-MM-DDTHH:MM:SS.ffffff; timestamptz → TEXT
  YYYY-MM-DDTHH:MM:SS.ffffffZ (converted to UTC). Fixed width, so text order is time order.
- json, jsonb → TEXT: Postgres' text (json keeps its input text; jsonb is Postgres' normal form).
- bytea → BLOB, sent as hex through ``unhex(?)``; canonical form: lowercase hex.
- anything else (time, timetz, interval, arrays, ranges, composites, inet, money, …) → TEXT:
  Postgres' text, as is.

Dates and timestamps outside years 1-9999 (BC, or ``infinity``) are kept as Postgres writes them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from proxy.errors import PgShiftError

SqliteType = Literal["INTEGER", "REAL", "TEXT", "BLOB"]


class D1TypeError(PgShiftError):
    """A Postgres value that D1 cannot hold as it is (e.g. a float NaN), or text that is not the
    Postgres text format the codec expects."""


_INTEGER_TYPES = frozenset({"int2", "int4", "int8", "smallint", "integer", "bigint", "oid", "xid8"})
_FLOAT_TYPES = frozenset({"float4", "float8", "real", "double precision"})
_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_TS_RE = re.compile(r"^([0-9]{4}-[0-9]{2}-[0-9]{2})[ T]([0-9]{2}:[0-9]{2}:[0-9]{2})(\.[0-9]{1,6})?$")
_TSTZ_RE = re.compile(
    r"^([0-9]{4}-[0-9]{2}-[0-9]{2})[ T]([0-9]{2}:[0-9]{2}:[0-9]{2})(\.[0-9]{1,6})?"
    r"(Z|[+-][0-9]{2}(?::?[0-9]{2}(?::?[0-9]{2})?)?)$"
)
_HEX_RE = re.compile(r"^[0-9a-fA-F]*$")
INFINITY = "9e999"  # what SQLite reads as +Inf (a REAL column refuses the string "Infinity")


def quote_ident(name: str) -> str:
    """An SQLite identifier, double-quoted."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class Codec:
    """How one Postgres type is stored in D1: the column type, the parameter and select forms."""

    kind: Literal["integer", "bool", "float", "text", "date", "timestamp", "timestamptz", "bytea"]
    sqlite_type: SqliteType

    @property
    def placeholder(self) -> str:
        """The SQL expression a bound parameter of this type is written as."""
        return "unhex(?)" if self.kind == "bytea" else "?"

    def select(self, column: str) -> str:
        """The expression that reads this column back without loss through D1's JSON."""
        col = quote_ident(column)
        if self.kind in ("integer", "bool"):
            return f"CAST({col} AS TEXT)"
        if self.kind == "bytea":
            return f"CASE WHEN {col} IS NULL THEN NULL ELSE lower(hex({col})) END"  # (hex(NULL) is '')
        if self.kind == "float":
            # JSON has no Infinity: D1 would answer null for it.
            return f"CASE WHEN abs({col}) = {INFINITY} THEN CAST({col} AS TEXT) ELSE {col} END"
        return col

    def encode(self, text: str | None) -> str | None:
        """A Postgres text-format value → the D1 parameter (None: NULL)."""
        if text is None:
            return None
        kind = self.kind
        if kind == "text":
            return text
        if kind == "integer":
            if not _INT_RE.match(text):
                raise D1TypeError(f"{text!r} is not an integer")
            return str(int(text))
        if kind == "bool":
            if text in ("t", "true", "1"):
                return "1"
            if text in ("f", "false", "0"):
                return "0"
            raise D1TypeError(f"{text!r} is not a Postgres boolean (t/f)")
        if kind == "float":
            return _encode_float(text)
        if kind == "bytea":
            return _encode_bytea(text)
        if kind == "date":
            return _encode_date(text)
        if kind == "timestamp":
            return _encode_timestamp(text)
        return _encode_timestamptz(text)

    def decode(self, value: Any) -> str | None:
        """A value as D1 answers it for ``select(col)`` → the canonical string ``encode`` gives."""
        if value is None:
            return None
        if self.kind == "float":
            if isinstance(value, str):  # ±Inf, read as text
                return f"-{INFINITY}" if value.startswith("-") else INFINITY
            return repr(float(value) + 0.0)
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            # (a TEXT column never yields one; an INTEGER selected without CAST could)
            return str(int(value)) if value.is_integer() else repr(value)
        if isinstance(value, list):  # a BLOB selected as is: bytes as numbers
            return bytes(value).hex()
        return str(value)


def _encode_float(text: str) -> str:
    lowered = text.strip().lower()
    if lowered in ("nan", "+nan", "-nan"):
        raise D1TypeError("NaN cannot be stored in D1 (SQLite stores a NaN REAL as NULL)")
    try:
        value = float(text)
    except ValueError:
        raise D1TypeError(f"{text!r} is not a floating-point number") from None
    if math.isinf(value):
        return INFINITY if value > 0 else f"-{INFINITY}"
    return repr(value + 0.0)  # (-0.0 + 0.0 is 0.0: D1 does not keep the sign of a zero)


def _encode_bytea(text: str) -> str:
    if text.startswith("\\x"):
        digits = text[2:]
        if len(digits) % 2 or not _HEX_RE.match(digits):
            raise D1TypeError("bytea hex text has an odd length or a non-hex digit")
        return digits.lower()
    # bytea_output = escape: printable bytes as themselves, \\ for a backslash, \ooo octal.
    out = bytearray()
    raw = text.encode()
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte != 0x5C:
            out.append(byte)
            i += 1
        elif raw[i + 1 : i + 2] == b"\\":
            out.append(0x5C)
            i += 2
        elif re.fullmatch(rb"[0-3][0-7][0-7]", raw[i + 1 : i + 4]):
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            raise D1TypeError("bytea escape text has a backslash not followed by \\ or three octal digits")
    return out.hex()


_BIG_YEAR = re.compile(r"^[0-9]{5,}-")


def _kept_as_is(text: str) -> bool:
    """A date Postgres writes outside ISO 8601's years 1-9999: infinity, BC, year 10000 on."""
    return text in ("infinity", "-infinity") or text.endswith(" BC") or bool(_BIG_YEAR.match(text))


def _encode_date(text: str) -> str:
    if _DATE_RE.match(text) and text[:4] != "0000":
        return text
    if _kept_as_is(text):
        return text  # outside what ISO 8601 text sorts correctly: kept as Postgres writes it
    raise D1TypeError(f"{text!r} is not a date in DateStyle ISO (YYYY-MM-DD)")


def _fraction(part: str | None) -> str:
    return ((part or ".")[1:] + "000000")[:6]


def _encode_timestamp(text: str) -> str:
    match = _TS_RE.match(text)
    if match:
        return f"{match[1]}T{match[2]}.{_fraction(match[3])}"
    if _kept_as_is(text):
        return text
    raise D1TypeError(f"{text!r} is not a timestamp in DateStyle ISO (YYYY-MM-DD HH:MM:SS[.ffffff])")


def _encode_timestamptz(text: str) -> str:
    match = _TSTZ_RE.match(text)
    if not match:
        if _kept_as_is(text):
            return text
        raise D1TypeError(f"{text!r} is not a timestamptz in DateStyle ISO (YYYY-MM-DD HH:MM:SS[.ffffff]+TZ)")
    zone = match[4]
    if zone != "Z":
        sign, digits = zone[0], zone[1:].replace(":", "")
        digits = (digits + "0000")[:6]
        zone = f"{sign}{digits[:2]}:{digits[2:4]}:{digits[4:6]}"
    try:
        moment = datetime.fromisoformat(f"{match[1]}T{match[2]}.{_fraction(match[3])}{zone.replace('Z', '+00:00')}")
        utc = moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return text  # (a UTC conversion past year 1 or 9999)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if 1 <= utc.year <= 9999 else text


INTEGER = Codec("integer", "INTEGER")
BOOL = Codec("bool", "INTEGER")
FLOAT = Codec("float", "REAL")
TEXT = Codec("text", "TEXT")
DATE = Codec("date", "TEXT")
TIMESTAMP = Codec("timestamp", "TEXT")
TIMESTAMPTZ = Codec("timestamptz", "TEXT")
BYTEA = Codec("bytea", "BLOB")

_BY_NAME: dict[str, Codec] = {
    **dict.fromkeys(_INTEGER_TYPES, INTEGER),
    **dict.fromkeys(_FLOAT_TYPES, FLOAT),
    "bool": BOOL,
    "boolean": BOOL,
    "date": DATE,
    "timestamp": TIMESTAMP,
    "timestamp without time zone": TIMESTAMP,
    "timestamptz": TIMESTAMPTZ,
    "timestamp with time zone": TIMESTAMPTZ,
    "bytea": BYTEA,
}


def codec_for(base_type: str) -> Codec:
    """The codec of a Postgres type, by the name of its base type (``pg_type.typname`` of a
    domain's base type; ``int8``, ``timestamptz``, …). Every other type is TEXT, kept as written."""
    return _BY_NAME.get(base_type, TEXT)
