"""The session settings a mirrored write depends on, tracked as (name, value) for set_config on the mirror."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import pglast.ast as pg_ast
from pglast.parser import ParseError, parse_sql

# Reported by the primary (ParameterStatus) and meaningful for what a write stores: kept current
# from those reports. Others reported (server_version, is_superuser, application_name, …) are not
# the session's to set.
REPORTED = frozenset({"TimeZone", "DateStyle", "IntervalStyle", "client_encoding", "standard_conforming_strings"})
# Settings that cannot be given to set_config on the mirror (or mean nothing there).
_SKIP = frozenset({"session_authorization", "transaction_isolation", "application_name"})
# List settings whose elements Postgres quotes as identifiers when it flattens a SET (GUC_LIST_QUOTE).
_LIST_QUOTE = frozenset({"search_path", "temp_tablespaces", "session_preload_libraries", "local_preload_libraries"})
_PLAIN_IDENT = re.compile(r"^[a-z_][a-z0-9_$]*$")
_STARTUP_NOT_GUC = frozenset({"user", "database", "replication", "options", "application_name"})
_OPTION = re.compile(r"(?:-c\s*|--)([A-Za-z_][\w.]*)=((?:\\.|\S)*)")


# Postgres client encodings (as ParameterStatus names them) and the Python codec that reads the
# same bytes. SQL_ASCII means "no conversion": latin-1 turns any bytes into text and back unchanged.
_CODECS: dict[str, str] = {
    "UTF8": "utf-8", "SQL_ASCII": "latin-1", "LATIN1": "latin-1", "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3", "LATIN4": "iso8859-4", "LATIN5": "iso8859-9", "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13", "LATIN8": "iso8859-14", "LATIN9": "iso8859-15", "LATIN10": "iso8859-16",
    "ISO_8859_5": "iso8859-5", "ISO_8859_6": "iso8859-6", "ISO_8859_7": "iso8859-7", "ISO_8859_8": "iso8859-8",
    "WIN1250": "cp1250", "WIN1251": "cp1251", "WIN1252": "cp1252", "WIN1253": "cp1253", "WIN1254": "cp1254",
    "WIN1255": "cp1255", "WIN1256": "cp1256", "WIN1257": "cp1257", "WIN1258": "cp1258", "WIN866": "cp866",
    "WIN874": "cp874", "KOI8R": "koi8-r", "KOI8U": "koi8-u", "EUC_JP": "euc-jp", "EUC_KR": "euc-kr",
    "EUC_CN": "gb2312", "SJIS": "shift_jis", "BIG5": "big5", "GBK": "gbk", "GB18030": "gb18030", "UHC": "cp949",
    "JOHAB": "johab", "EUC_JIS_2004": "euc_jis_2004", "SHIFT_JIS_2004": "shift_jis_2004",
}  # fmt: skip


def codec_for(encoding: str | None) -> str | None:
    """The Python codec for a Postgres client_encoding (None: not known here)."""
    return _CODECS.get((encoding or "UTF8").upper().replace("-", "_"))


@dataclass(frozen=True, slots=True)
class Change:
    """One effect of a SET/RESET statement: ``value`` None means back to the session's start."""

    name: str
    value: str | None
    local: bool = False


RESET_ALL = Change("*", None)


@lru_cache(maxsize=1024)
def changes(sql: str) -> tuple[Change, ...]:
    """What a statement does to settings that matter for writes (cached: applications repeat them)."""
    try:
        stmts = parse_sql(sql)
    except ParseError:
        return ()
    out: list[Change] = []
    for raw in stmts:
        stmt = raw.stmt
        if isinstance(stmt, pg_ast.SelectStmt):
            out.extend(_set_config_calls(stmt))
            continue
        if isinstance(stmt, pg_ast.DiscardStmt):
            out.append(RESET_ALL)
            continue
        if not isinstance(stmt, pg_ast.VariableSetStmt):
            continue
        kind = int(stmt.kind or 0)
        name = _canonical(stmt.name or "")
        local = bool(stmt.is_local)
        if kind == 5:  # RESET ALL
            out.append(RESET_ALL)
        elif kind in (1, 4):  # SET … TO DEFAULT, RESET name
            out.append(Change(name, None, local))
        elif kind == 0 and name not in _SKIP:
            out.append(Change(name, _flatten(name, stmt.args or ()), local))
    return tuple(out)


def _set_config_calls(stmt: pg_ast.SelectStmt) -> list[Change]:
    """``SELECT set_config('name', 'value', is_local)`` with literal arguments (pg_dump scripts,
    pool reset hooks): the same change as a SET. Other arguments cannot be followed."""
    found = []
    for target in stmt.targetList or ():
        call = getattr(target, "val", None)
        if not isinstance(call, pg_ast.FuncCall) or not call.funcname:
            continue
        if getattr(call.funcname[-1], "sval", None) != "set_config" or len(call.args or ()) != 3:
            continue
        name, value, local = (arg.val if isinstance(arg, pg_ast.A_Const) else None for arg in call.args or ())
        if isinstance(name, pg_ast.String) and isinstance(value, pg_ast.String):
            is_local = isinstance(local, pg_ast.Boolean) and bool(local.boolval)
            found.append(Change(_canonical(name.sval or ""), value.sval, is_local))
    return found


def _canonical(name: str) -> str:
    lowered = name.lower()
    return {"timezone": "TimeZone", "datestyle": "DateStyle", "intervalstyle": "IntervalStyle"}.get(lowered, lowered)


def _flatten(name: str, args: tuple[object, ...] | list[object]) -> str:
    """The value as set_config takes it (what Postgres' flatten_set_variable_args makes of the SET)."""
    parts = []
    for arg in args:
        value = arg.val if isinstance(arg, pg_ast.A_Const) else None
        if isinstance(value, pg_ast.String):
            text = value.sval or ""
            if name in _LIST_QUOTE and not _PLAIN_IDENT.match(text):
                text = '"' + text.replace('"', '""') + '"'
        elif isinstance(value, pg_ast.Integer):
            text = str(value.ival)
        elif isinstance(value, pg_ast.Float):
            text = value.fval or ""
        elif isinstance(value, pg_ast.Boolean):
            text = "on" if value.boolval else "off"
        else:
            text = ""
        parts.append(text)
    return ", ".join(parts)


def from_startup(params: dict[str, str]) -> dict[str, str]:
    """Settings the client gave at startup: GUC parameters and ``options`` (-c name=value)."""
    found: dict[str, str] = {}
    for key, value in params.items():
        if key not in _STARTUP_NOT_GUC:
            found[_canonical(key)] = value
    for name, value in _OPTION.findall(params.get("options", "")):
        found[_canonical(name)] = value.replace("\\ ", " ")
    return {k: v for k, v in found.items() if k not in _SKIP}


class SessionSettings:
    """Committed settings, and those changed in the transaction in progress — explicit, or the
    implicit one of an autocommit statement or a multi-statement Query. Changes wait there until
    it ends: a SET rolled back (or in a failed transaction) never happened, a SET LOCAL ends with
    its transaction, and ROLLBACK TO SAVEPOINT restores what the savepoint saw."""

    __slots__ = ("_committed", "_effective", "_local", "_startup", "_tx")

    def __init__(self, startup: dict[str, str]) -> None:
        self._effective: tuple[tuple[str, str], ...] | None = None  # computed once per change
        self._startup = dict(startup)
        self._committed = dict(startup)
        self._tx: dict[str, str | None] = {}
        self._local: dict[str, str | None] = {}

    def reported(self, name: str, value: str) -> None:
        """The primary reported a new value (ParameterStatus): it is the session's value now —
        Postgres reports every change, including the revert when a transaction rolls back."""
        if name in REPORTED and name not in _SKIP:
            self._effective = None
            self._committed[name] = value
            self._tx.pop(name, None)
            self._local.pop(name, None)

    def apply(self, change: Change) -> None:
        """A SET/RESET that completed: in effect now, kept once its transaction commits."""
        self._effective = None
        if change is RESET_ALL:
            self._tx = {k: self._startup.get(k) for k in {*self._committed, *self._tx}}
            self._local.clear()
            return
        value = change.value if change.value is not None else self._startup.get(change.name)
        if change.local:
            self._local[change.name] = value
        else:
            self._tx[change.name] = value
            self._local.pop(change.name, None)

    def codec(self) -> str | None:
        """The Python codec of the session's client_encoding now (its SQL text is in it)."""
        for layer in (self._local, self._tx):
            if "client_encoding" in layer:
                return codec_for(layer["client_encoding"])
        return codec_for(self._committed.get("client_encoding"))

    def exact_floats(self) -> bool:
        """Whether float8 values print exactly (extra_float_digits >= 1, Postgres' default)."""
        value = self._local.get("extra_float_digits") or self._tx.get("extra_float_digits")
        value = value or self._committed.get("extra_float_digits")
        try:
            return value is None or int(value) >= 1
        except ValueError:
            return True

    def savepoint(self) -> tuple[dict[str, str | None], dict[str, str | None]]:
        return dict(self._tx), dict(self._local)

    def rollback_to(self, saved: tuple[dict[str, str | None], dict[str, str | None]]) -> None:
        self._effective = None
        self._tx, self._local = dict(saved[0]), dict(saved[1])

    def end_transaction(self, committed: bool) -> None:
        if not self._tx and not self._local:
            return  # (every transaction ends here: keep the computed settings when nothing changed)
        self._effective = None
        if committed:
            for name, value in self._tx.items():
                if value is None:
                    self._committed.pop(name, None)
                else:
                    self._committed[name] = value
        self._tx.clear()
        self._local.clear()

    def effective(self) -> tuple[tuple[str, str], ...]:
        if self._effective is None:
            merged: dict[str, str | None] = {**self._committed, **self._tx, **self._local}
            self._effective = tuple(sorted((k, v) for k, v in merged.items() if v is not None))
        return self._effective
